"""Judge a (guided) model: sample N images per class, read which attribute (background, colour, ...) and which
class each shows, and report the paper's Bias, the minority share per class and fidelity (share of samples
showing the requested class).

How the images are read depends on the domain (`make_judge`):
    shapes   exact rules of `data.py` for both (no classifier error);
    cmnist   the exact colour reader of `datasets.py` for the attribute, a small CNN for the digit;
    others   small CNNs for both, trained on the balanced eval split (`classifiers.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .data import DataConfig, from_model_range, make_dataset, read_background, read_shape
from .diffusion import make_sampler, sample
from .metrics import bias_score, fidelity, minority_share


def generate(model, diffusion_kwargs: dict, n_per_class: int, num_classes: int, image_shape: tuple[int, int, int],
             sampler: str = "ddim", num_steps: int = 25, guidance_scale: float = 1.0, eta: float = 0.0,
             seed: int = 0, device="cpu", batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [0, 1] (N, C, H, W), labels (N,)), class-major, deterministic given `seed`."""
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    scheduler = make_sampler(sampler, diffusion_kwargs).to(device)
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(labels), batch_size):
        y = labels[start:start + batch_size]
        x = sample(model, scheduler, (len(y), *image_shape), y, num_steps, guidance_scale=guidance_scale,
                   null_label=getattr(model, "null_label", None), eta=eta, generator=g, device=device)
        out.append(from_model_range(x).cpu())
    return torch.cat(out), labels


@dataclass
class Judge:
    """Reads the attribute and the class of images in [0, 1] and scores a set of samples."""
    read_attribute: Callable[[torch.Tensor], torch.Tensor]     # (N, C, H, W) -> (N,) attribute index
    read_class: Callable[[torch.Tensor], torch.Tensor]         # (N, C, H, W) -> (N,) class index
    num_classes: int = 2
    num_attributes: int = 2
    how: dict = field(default_factory=dict)                    # how each is read, with held-out accuracies

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        attributes = self.read_attribute(images)
        readable = attributes >= 0               # a reader may answer -1 (e.g. a blank Colored-MNIST image)
        a, y = attributes[readable], labels[readable]
        if not len(a):                           # nothing readable: no Bias to speak of
            return {"bias": float("nan"), "minority_share": [float("nan")] * self.num_classes,
                    "fidelity": fidelity(self.read_class(images), labels), "n": len(labels),
                    "unreadable_attribute": len(labels)}
        return {"bias": bias_score(a, y, self.num_attributes),
                "minority_share": minority_share(a, y, self.num_classes),
                "fidelity": fidelity(self.read_class(images), labels),
                "n": len(labels), "unreadable_attribute": int((~readable).sum())}


SHAPES_JUDGE = Judge(read_background, read_shape, 2, 2, {"attribute": "exact rule (background colour)",
                                                         "class": "exact rule (fill ratio)"})


def judge(images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Bias, minority share per class and fidelity of generated images of the built-in domain (exact rules)."""
    return SHAPES_JUDGE(images, labels)


def make_judge(data_cfg: DataConfig, folder=None, device="cpu", steps: int = 400) -> Judge:
    """The judge of a run's domain. Classifiers are trained on the balanced eval split and cached in `folder`
    (e.g. RUN/judges); their held-out accuracy is in `Judge.how` and is printed."""
    if data_cfg.name == "shapes":
        return SHAPES_JUDGE
    from .classifiers import load_or_train

    if folder is None:
        raise ValueError(f"dataset {data_cfg.name!r} is judged by classifiers; pass a folder to cache them in")
    ev = make_dataset(data_cfg, "eval")
    how = {}

    def classifier(name, targets, k):
        model, acc = load_or_train(folder, name, ev.images, targets, k, device=device, steps=steps)
        how[name] = f"small CNN on the balanced eval split, held-out accuracy {acc:.3f}"
        print(f"[judge] {name} classifier: held-out accuracy {acc:.3f}")
        return model.predict

    read_class = classifier("class", ev.labels, ev.num_classes)
    if data_cfg.name == "cmnist":
        from .datasets import read_digit_colour
        k = ev.num_attributes
        read_attribute = lambda images: read_digit_colour(images, k)   # noqa: E731
        exact = float((read_attribute(ev.images) == ev.bias).float().mean())
        how["attribute"] = f"exact colour reader (agrees with the eval split's labels on {exact:.3f})"
    else:
        read_attribute = classifier("attribute", ev.bias, ev.num_attributes)
    return Judge(read_attribute, read_class, ev.num_classes, ev.num_attributes, how)
