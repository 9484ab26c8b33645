"""Which value each drawn sub-group gives: sample a head told the sub-group (head.condition = class_group) with the
run's evaluation settings, record the sub-group each sample drew, and read the attribute value it got. Hidden values
are read (for the composition of each sub-group's training images), so this is a diagnosis on tuning seeds only.

    PYTHONPATH=. python docs/results/kvalued/drawn_groups.py RUN HEAD W OUT.json [class_label_topk TOP_FRACTION]

Without the last two arguments the head's sub-groups are those of RUN/groups.safetensors (a head trained by
`debias.py --variants invdiff`); with them, the groups `debias.py --variants invdiff_label_topk` computes."""
import json
import sys
from pathlib import Path

import torch

from invdiff_min import guidance, pipeline
from invdiff_min.checkpoint import load_tensors, load_unet, read_json
from invdiff_min.config import RunConfig
from invdiff_min.data import load_splits
from invdiff_min.evaluate import make_judge, sample_and_judge
from invdiff_min.groups import class_label_topk_groups, condition_groups

torch.set_num_threads(1)
run, head_dir, w, out = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])
cfg = RunConfig.from_dict(read_json(run / "config.json")["config"])
device = torch.device("cpu")
base, _, _ = load_unet(run, device)
head = guidance.load_head(head_dir, base, device)[0]
splits = load_splits(cfg.data)
data, K = splits.train, cfg.unet.num_classes
if len(sys.argv) > 5:                                   # the label_topk groups debias.py computes
    assert sys.argv[5] == "class_label_topk", sys.argv[5]
    saved = load_tensors(run / "losses.safetensors")
    assert torch.equal(saved["index"], data.index)
    W = class_label_topk_groups(saved["loss"], data.labels, saved["profile"], float(sys.argv[6]))
else:
    saved = load_tensors(run / "groups.safetensors")
    assert torch.equal(saved["index"], data.index)
    W = saved["weights"]
group_of, group_class = condition_groups(W, data.labels)
assert torch.equal(group_class, head.group_class.cpu()), "the head was trained on other sub-groups"

drawn = []                                              # the sub-group labels each sampling call drew
draw = guidance.GuidedModel.labels_for


def recording_draw(self, y, generator=None):
    drawn.append(draw(self, y, generator))
    return drawn[-1]


guidance.GuidedModel.labels_for = recording_draw
judge = make_judge(splits, run / "judges", device, cfg.eval.judge_steps)
how = pipeline.sample_settings(cfg, device, n_per_class=cfg.eval.n_per_class)
images, labels, metrics = sample_and_judge(base, head, w, judge, how, cfg.head.mode, cfg.head.mix_ratio)
drawn, read = torch.cat(drawn), judge.read_attribute(images)
correct = judge.read_class(images) == labels

rows = []
for g in range(len(group_class)):
    got = (drawn == g) & (read >= 0)
    rows.append({"group": g, "class": int(group_class[g]),
                 "training_values": [int(((group_of == g) & (data.bias == v)).sum()) for v in range(K)],
                 "drawn": int((drawn == g).sum()), "unreadable": int(((drawn == g) & (read < 0)).sum()),
                 "shares": [round(float((read[got] == v).float().mean()), 3) for v in range(K)],
                 "fidelity": round(float(correct[drawn == g].float().mean()), 3)})
    print(rows[-1], flush=True)
report = {"run": str(run), "head": str(head_dir), "strength": w, "groups": sys.argv[5:] or "RUN/groups.safetensors",
          "bias": metrics["bias"], "fidelity": metrics["fidelity"], "attribute_share": metrics["attribute_share"],
          "sub_groups": rows}
print(f"Bias {metrics['bias']:.3f} fidelity {metrics['fidelity']:.3f}")
out.write_text(json.dumps(report, indent=1))
