"""Probe of rules 11 and 14 (rule_cfg.md): classifier-free guidance on the class only below a timestep, with the head's
push kept out of the class guidance.

    PYTHONPATH=. python docs/results/kvalued/probe_cfg.py RUN HEAD W OUT.json S:T_CFG [S:T_CFG ...]

For each S:T_CFG, samples the run's base with HEAD at strength W (the run's evaluation settings and noise) as

    eps = eps(x_t, t, null) + S (eps(x_t, t, y) - eps(x_t, t, null)) + W G_psi(x_t, t, .)   for t < T_CFG
    eps = eps(x_t, t, y) + W G_psi(x_t, t, .)                                                for t >= T_CFG

and judges it; also the base alone at S:T_CFG. Each arm's entry in OUT.json holds, beside the metrics, its samples'
counts and class-read counts per (class, attribute value) cell (`cells`: `benchmarks/cell_fidelity.py`'s table).

This is the library's `guidance_t_max` with `head_outside_cfg` (rules 11 and 14 ran it as a class of its own here
before the option existed; the option gives the same numbers, option_check.json). With T_CFG = 1000 it equals the
library's plain CFG, which puts the head inside the conditional branch, at strength W / S."""
import json
import sys
from pathlib import Path

import torch

from benchmarks.cell_fidelity import cell_table
from invdiff_min import pipeline
from invdiff_min.checkpoint import load_unet, read_json
from invdiff_min.config import RunConfig
from invdiff_min.data import load_splits
from invdiff_min.evaluate import make_judge, sample_and_judge
from invdiff_min.guidance import load_head

run, head_dir, w, out = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])
arms = [(float(a.split(":")[0]), int(a.split(":")[1])) for a in sys.argv[5:]]
cfg = RunConfig.from_dict(read_json(run / "config.json")["config"])
device = torch.device("cpu")
base, _, _ = load_unet(run, device)
head = load_head(head_dir, base, device)[0]
judge = make_judge(load_splits(cfg.data), run / "judges", device, cfg.eval.judge_steps)
report = {"run": str(run), "head": str(head_dir), "strength": w, "arms": {}}
for s, t_cfg in arms:
    how = pipeline.sample_settings(cfg, device, guidance_scale=s, guidance_t_max=t_cfg)
    for name, model, strength in (("base", None, 0.0), ("head", head, w)):
        images, labels, m = sample_and_judge(base, model, strength, judge, how, head_outside_cfg=True)
        gap = max(abs(v - 1 / judge.num_attributes) for row in m["attribute_share"] for v in row)
        cells = cell_table(judge, images, labels, judge.num_classes, judge.num_attributes)
        report["arms"][f"{name} s={s} t_cfg={t_cfg}"] = {**m, "largest_gap": gap, "cells": cells}
        print(f"{name} s={s} t_cfg={t_cfg}: Bias {m['bias']:.3f} gap {gap:.3f} fidelity {m['fidelity']:.3f} "
              f"unreadable {m['unreadable_attribute']} shares "
              + ", ".join("/".join(f"{v:.2f}" for v in row) for row in m["attribute_share"]), flush=True)
        out.write_text(json.dumps(report, indent=1))
