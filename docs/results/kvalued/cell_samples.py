"""What a model draws in given (class, background) cells of a built-in shapes benchmark, and what the exact reader
makes of it: sample the base (or eps_theta + w G_psi of a head) with the run's evaluation settings, print for every
cell the classes its samples read as, and save a picture per asked cell: up to 16 samples over their object masks.

    PYTHONPATH=. python docs/results/kvalued/cell_samples.py RUN HEAD|base W OUT_PREFIX CLASS:VALUE [CLASS:VALUE ...]

OUT_PREFIX_cC_bV.png per asked cell (6x nearest upscaling); OUT_PREFIX.json the read-class counts per cell."""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

from invdiff_min import pipeline
from invdiff_min.checkpoint import load_unet, read_json
from invdiff_min.config import RunConfig
from invdiff_min.data import load_splits
from invdiff_min.data.shapes import object_mask
from invdiff_min.evaluate import make_judge, sample_and_judge
from invdiff_min.guidance import load_head

run, head_arg, w, prefix = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
cells = [tuple(int(v) for v in arg.split(":")) for arg in sys.argv[5:]]
cfg = RunConfig.from_dict(read_json(run / "config.json")["config"])
device = torch.device("cpu")
base, _, _ = load_unet(run, device)
head = None if head_arg == "base" else load_head(Path(head_arg), base, device)[0]
splits = load_splits(cfg.data)
judge = make_judge(splits, run / "judges", device, cfg.eval.judge_steps)
how = pipeline.sample_settings(cfg, device, n_per_class=cfg.eval.n_per_class)
images, labels, _ = sample_and_judge(base, head, w if head is not None else 0.0, judge, how, cfg.head.mode,
                                     cfg.head.mix_ratio)
value, read = judge.read_attribute(images), judge.read_class(images)
C, K = judge.num_classes, judge.num_attributes

report = {"run": str(run), "model": head_arg, "strength": w, "read_as": "counts over -1 (no object), 0..C-1",
          "cells": {}}
for y in range(C):
    for v in range(K):
        here = (labels == y) & (value == v)
        if here.any():
            counts = torch.bincount(read[here] + 1, minlength=C + 1).tolist()     # column 0: unreadable (-1)
            report["cells"][f"{y}:{v}"] = counts
            print(f"class {y} on value {v}: {int(here.sum())} samples, read as (-1, 0..{C - 1}) {counts}")
for y, v in cells:
    picked = ((labels == y) & (value == v)).nonzero().squeeze(1)[:16]
    if len(picked) == 0:
        print(f"class {y} on value {v}: no samples")
        continue
    x = images[picked]
    masks = object_mask(x).float()[:, None].expand(-1, 3, -1, -1)                 # (n, 3, H, W) white = object
    save_image(F.interpolate(torch.cat([x, masks]), scale_factor=6, mode="nearest"), f"{prefix}_c{y}_b{v}.png",
               nrow=len(picked), padding=2)
Path(f"{prefix}.json").write_text(json.dumps(report, indent=1))
