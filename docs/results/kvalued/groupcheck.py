"""Rule 6 / 7 grouping check (tuning seeds only): the K > 2 sub-groups at several top fractions, and the hidden
values of each sub-group's members (read for this check only).
Usage: groupcheck.py RUN [class_label_topk | class_topk] TOP_FRACTION...   (default class_label_topk)"""
import sys

import torch

from invdiff_min.checkpoint import load_tensors, read_json
from invdiff_min.config import RunConfig
from invdiff_min.data import load_splits
from invdiff_min.groups import class_label_topk_groups, class_topk_groups

torch.set_num_threads(1)
run, args = sys.argv[1], sys.argv[2:]
method = args.pop(0) if args and args[0] in ("class_label_topk", "class_topk") else "class_label_topk"
cfg = RunConfig.from_dict(read_json(f"{run}/config.json")["config"])
data = load_splits(cfg.data).train
saved = load_tensors(f"{run}/losses.safetensors")
loss, profile, y, b = saved["loss"], saved["profile"], data.labels, data.bias
K = profile.shape[1]
for tf in map(float, args):
    if method == "class_label_topk":        # equal-size sub-groups: the top losses of each best-other-label part
        g = class_label_topk_groups(loss, y, profile, tf).argmax(1)
        print(f"top_fraction {tf}")
    else:                                   # the class's top losses, then split by best other label (sizes vary)
        g = class_topk_groups(loss, y, K, tf, profile, cfg.groups.min_subgroup).argmax(1)
        print(f"class_topk split by the label profile, top_fraction {tf}, min_subgroup {cfg.groups.min_subgroup}")
    for c in range(K):
        rows = ["/".join(str(int((b[g == K * c + j] == v).sum())) for v in range(K)) for j in range(K)]
        allmin = [int(((y == c) & (b == v)).sum()) for v in range(K)]
        print(f"  class {c}: data {allmin}; sub-groups (rest, then high): {' | '.join(rows)}")
