"""Probe (rule 11, outside the library): classifier-free guidance on the class only below a timestep, with the head's
push kept out of the class guidance.

    PYTHONPATH=. python docs/results/kvalued/probe_cfg.py RUN HEAD W OUT.json S:T_CFG [S:T_CFG ...]

For each S:T_CFG, samples the run's base with HEAD at strength W (the run's evaluation settings and noise) as

    eps = eps(x_t, t, y) + W G_psi(x_t, t, .) + (S - 1) (eps(x_t, t, y) - eps(x_t, t, null))   for t < T_CFG
    eps = eps(x_t, t, y) + W G_psi(x_t, t, .)                                                  for t >= T_CFG

and judges it; also the base alone at S:T_CFG. Each arm's entry in OUT.json holds, beside the metrics, its samples'
counts and class-read counts per (class, attribute value) cell (`cells`: `benchmarks/cell_fidelity.py`'s table).

The library's CFG (`sample(..., guidance_scale=S)`) puts the head inside the conditional branch, eps(null) + S (eps(y)
+ W G - eps(null)), so it scales the head's push by S; with T_CFG = 1000 this probe equals the library at strength
W / S. The head is told each sample's sub-group on both branches (the one `labels_for` drew), so the class guidance
compares the same guided state with and without the class; at t >= T_CFG the null branch is replaced by the
conditional one (eps_u = eps_c: no class guidance)."""
import json
import sys
from pathlib import Path

import torch

from benchmarks.cell_fidelity import cell_table
from invdiff_min import pipeline
from invdiff_min.checkpoint import load_unet, read_json
from invdiff_min.config import RunConfig
from invdiff_min.data import load_splits
from invdiff_min.evaluate import generate, make_judge
from invdiff_min.guidance import GuidedModel, load_head


class IntervalCFG(GuidedModel):
    """The guided model as `sample` calls it under CFG: rows [y; null] of one batch, (2n, ...); additive mode only."""

    def __init__(self, base, head, strength, t_cfg):
        super().__init__(base, head, strength)
        self.t_cfg = t_cfg

    def forward(self, x, t, y):
        if y is None or int((y == self.null_label).sum()) != len(y) // 2:   # not a CFG call: the plain model
            return super().forward(x, t, y)
        n = len(y) // 2
        y_pair = torch.cat([y[:n], y[:n]])                          # row i + n is row i with the null label
        y_class = self.label_class[y] if self.group_class is not None else y
        if int(t[0]) >= self.t_cfg:
            y_class = torch.cat([y_class[:n], y_class[:n]])         # no class guidance: eps_u = eps_c
        with torch.no_grad():
            eps = self.base(x, t, y_class).float()                  # [eps(y); eps(null)]
        if self.head is None or self.strength == 0.0:
            return eps
        return eps + self.strength * self.head(x, t, y_pair).float()    # the same W G on both rows: outside CFG


run, head_dir, w, out = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])
arms = [(float(a.split(":")[0]), int(a.split(":")[1])) for a in sys.argv[5:]]
cfg = RunConfig.from_dict(read_json(run / "config.json")["config"])
device = torch.device("cpu")
base, _, _ = load_unet(run, device)
head = load_head(head_dir, base, device)[0]
splits = load_splits(cfg.data)
judge = make_judge(splits, run / "judges", device, cfg.eval.judge_steps)
report = {"run": str(run), "head": str(head_dir), "strength": w, "arms": {}}
for s, t_cfg in arms:
    how = pipeline.sample_settings(cfg, device, n_per_class=cfg.eval.n_per_class, guidance_scale=s)
    for name, model in (("base", IntervalCFG(base, None, 0.0, t_cfg)), ("head", IntervalCFG(base, head, w, t_cfg))):
        images, labels = generate(model, **vars(how))
        m = judge(images, labels)
        gap = max(abs(v - 1 / judge.num_attributes) for row in m["attribute_share"] for v in row)
        cells = cell_table(judge, images, labels, judge.num_classes, judge.num_attributes)
        report["arms"][f"{name} s={s} t_cfg={t_cfg}"] = {**m, "largest_gap": gap, "cells": cells}
        print(f"{name} s={s} t_cfg={t_cfg}: Bias {m['bias']:.3f} gap {gap:.3f} fidelity {m['fidelity']:.3f} "
              f"unreadable {m['unreadable_attribute']} shares "
              + ", ".join("/".join(f"{v:.2f}" for v in row) for row in m["attribute_share"]), flush=True)
        out.write_text(json.dumps(report, indent=1))
