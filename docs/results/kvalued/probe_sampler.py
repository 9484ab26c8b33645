"""Probe of rule 20 (rule_cfg.md): the recipe's models sampled with other samplers and step counts.

    PYTHONPATH=. python docs/results/kvalued/probe_sampler.py RUN W OUT.json SAMPLER:STEPS [...] -- HEAD [HEAD ...]

For each SAMPLER:STEPS (`ddim` or `ddpm`, as `eval.sampler` / `eval.num_steps`), samples the run's base alone and
the base with each HEAD at strength W, with the run's other evaluation settings and noise seed, and judges them.
`ddim:25` is the recipe's own sampling (train.py's numbers at W). Each entry in OUT.json holds, beside the metrics,
its samples' counts and class-read counts per (class, attribute value) cell (`benchmarks/cell_fidelity.py`)."""
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

split = sys.argv.index("--")
run, w, out = Path(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
arms = [(a.split(":")[0], int(a.split(":")[1])) for a in sys.argv[4:split]]
head_dirs = [Path(h) for h in sys.argv[split + 1:]]
cfg = RunConfig.from_dict(read_json(run / "config.json")["config"])
device = torch.device("cpu")
base, _, _ = load_unet(run, device)
heads = {str(h): load_head(h, base, device)[0] for h in head_dirs}
judge = make_judge(load_splits(cfg.data), run / "judges", device, cfg.eval.judge_steps)
report = {"run": str(run), "strength": w, "arms": {}}
for sampler, steps in arms:
    how = pipeline.sample_settings(cfg, device, sampler=sampler, num_steps=steps)
    for name, head in (("base", None), *heads.items()):
        images, labels, m = sample_and_judge(base, head, w if head is not None else 0.0, judge, how)
        gap = max(abs(v - 1 / judge.num_attributes) for row in m["attribute_share"] for v in row)
        cells = cell_table(judge, images, labels, judge.num_classes, judge.num_attributes)
        report["arms"][f"{sampler}:{steps} {name}"] = {**m, "largest_gap": gap, "cells": cells}
        print(f"{sampler}:{steps} {name}: Bias {m['bias']:.3f} gap {gap:.3f} fidelity {m['fidelity']:.4f} unreadable "
              f"{m['unreadable_attribute']}", flush=True)
        out.write_text(json.dumps(report, indent=1))
