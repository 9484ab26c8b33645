"""Probe of rule 19 (rule_cfg.md): the head's push only at large t, the base alone below a timestep.

    PYTHONPATH=. python docs/results/kvalued/probe_head_interval.py RUN HEAD W OUT.json T_LO [T_LO ...]

For each T_LO, samples the run's base with HEAD at strength W (the run's evaluation settings and noise) as

    eps = eps_theta(x_t, t, y) + W G_psi(x_t, t, .)   for t >= T_LO
    eps = eps_theta(x_t, t, y)                        for t <  T_LO

and judges it; also the base alone once. T_LO = 0 is the recipe's own sampling (train.py's numbers at W). Each arm's
entry in OUT.json holds, beside the metrics, its samples' counts and class-read counts per (class, attribute value)
cell (`cells`: `benchmarks/cell_fidelity.py`'s table). The interval is a wrapper around the head's forward here,
outside the library; the library gets an option only if the rule is met."""
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
t_los = [int(a) for a in sys.argv[5:]]
cfg = RunConfig.from_dict(read_json(run / "config.json")["config"])
device = torch.device("cpu")
base, _, _ = load_unet(run, device)
head = load_head(head_dir, base, device)[0]
push = head.forward


def judged(name, model, strength):
    images, labels, m = sample_and_judge(base, model, strength, judge, how)
    gap = max(abs(v - 1 / judge.num_attributes) for row in m["attribute_share"] for v in row)
    report["arms"][name] = {**m, "largest_gap": gap, "cells": cell_table(judge, images, labels, judge.num_classes,
                                                                          judge.num_attributes)}
    print(f"{name}: Bias {m['bias']:.3f} gap {gap:.3f} fidelity {m['fidelity']:.4f} unreadable "
          f"{m['unreadable_attribute']} shares " + ", ".join("/".join(f"{v:.2f}" for v in row)
                                                            for row in m["attribute_share"]), flush=True)
    out.write_text(json.dumps(report, indent=1))


judge = make_judge(load_splits(cfg.data), run / "judges", device, cfg.eval.judge_steps)
how = pipeline.sample_settings(cfg, device)
report = {"run": str(run), "head": str(head_dir), "strength": w, "arms": {}}
judged("base", None, 0.0)
for t_lo in t_los:
    def interval_push(x, t, y, t_lo=t_lo):
        g = push(x, t, y)
        return g * (t >= t_lo).to(g.dtype).view(-1, 1, 1, 1)       # (B, C, H, W): zero push below t_lo
    head.forward = interval_push
    judged(f"head w={w} t_lo={t_lo}", head, w)
