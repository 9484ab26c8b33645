"""Rule 6 grouping check (tuning seeds only): the class_label_topk sub-groups at several top fractions, and the
hidden values of each sub-group's members (read for this check only). Usage: groupcheck.py RUN TOP_FRACTION..."""
import sys, json, torch
from invdiff_min.checkpoint import load_tensors
from invdiff_min.config import RunConfig
from invdiff_min.data import load_splits
from invdiff_min.groups import class_label_topk_groups
torch.set_num_threads(1)
run = sys.argv[1]
cfg = RunConfig.from_dict(json.load(open(f"{run}/config.json"))["config"])
data = load_splits(cfg.data).train
L = load_tensors(f"{run}/losses.safetensors")
y, b = data.labels, data.bias if hasattr(data, "bias") else data.attributes
K = L["profile"].shape[1]
for tf in map(float, sys.argv[2:]):
    g = class_label_topk_groups(L["loss"], y, L["profile"], tf).argmax(1)
    print(f"top_fraction {tf}")
    for c in range(K):
        rows = []
        for j in range(K):
            m = g == K * c + j
            rows.append("/".join(str(int((b[m] == v).sum())) for v in range(K)))
        allmin = [int(((y == c) & (b == v)).sum()) for v in range(K)]
        print(f"  class {c}: data {allmin}; sub-groups (rest, then high): {' | '.join(rows)}")
