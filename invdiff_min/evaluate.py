"""Judge a (guided) model: sample N images per class, read which attribute (background, colour, ...) and which
class each shows, and report the paper's Bias, the minority share per class and fidelity (share of samples
showing the requested class).

How the images are read depends on the domain (`make_judge`):
    shapes   exact rules of `data.py` for both (no classifier error);
    cmnist   the exact colour reader of `datasets.py` for the attribute, a small CNN for the digit;
    others   small CNNs for both, trained on the balanced eval split (`classifiers.py`).

Image quality (when `make_judge` is given a folder): the distance between the generated images and the
balanced real set (the eval split) in the feature space of the judge's two small CNNs (class and attribute,
their pooled features side by side), so it sees both what the object is and what surrounds it. Inception
weights cannot be downloaded here, so this is the project's own stand-in for FID / KID / improved precision
and recall: comparable between models of one run (same features, same reference, same number of samples),
not with published FIDs. Where a domain has an exact reader (the built-in shapes, Colored-MNIST colours), the
exact reader judges and the CNN's held-out accuracy is reported next to it (`Judge.how`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .data import ATTRIBUTE_NAMES, CLASS_NAMES, DataConfig, from_model_range, make_dataset, read_background, read_shape
from .diffusion import make_sampler, sample
from .metrics import (attribute_counts, bias_score, fidelity, frechet_distance, image_features, kernel_distance,
                      minority_share, precision_recall)


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
    features: Callable[[torch.Tensor], torch.Tensor] | None = None   # (N, C, H, W) -> (N, D), for quality
    reference: torch.Tensor | None = None                      # (N_real, D) features of the balanced real set
    class_names: list[str] | None = None
    attribute_names: list[str] | None = None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        attributes = self.read_attribute(images)
        readable = attributes >= 0               # a reader may answer -1 (e.g. a blank Colored-MNIST image)
        a, y = attributes[readable], labels[readable]
        nan = float("nan")
        result = {"bias": nan, "minority_share": [nan] * self.num_classes,
                  "attribute_share": [[nan] * self.num_attributes for _ in range(self.num_classes)]}
        if len(a):                               # nothing readable: no Bias to speak of
            classes, counts = attribute_counts(a, y, self.num_attributes)          # (P, K) for present classes
            shares = torch.full((self.num_classes, self.num_attributes), nan)
            shares[classes] = counts / counts.sum(1, keepdim=True)
            result = {"bias": bias_score(a, y, self.num_attributes),
                      "minority_share": minority_share(a, y, self.num_classes),
                      "attribute_share": shares.tolist()}                        # [class][attribute]
        result.update(fidelity=fidelity(self.read_class(images), labels), n=len(labels),
                      unreadable_attribute=int((~readable).sum()))
        if self.features is not None and self.reference is not None:
            result.update(self.quality(images))
        return result

    def quality(self, images: torch.Tensor) -> dict:
        """Distances of `images` to the balanced real set in the judge's feature space: Frechet distance (fd),
        kernel distance (kid), improved precision and recall (k = 3); lower fd / kid is better."""
        fake = self.features(images)
        p, r = precision_recall(self.reference, fake)
        kid, kid_std = kernel_distance(self.reference, fake)
        return {"fd": frechet_distance(self.reference, fake), "kid": kid, "kid_std": kid_std,
                "precision": p, "recall": r}


SHAPES_JUDGE = Judge(read_background, read_shape, 2, 2, {"attribute": "exact rule (background colour)",
                                                         "class": "exact rule (bounding-box corners)"},
                     class_names=list(CLASS_NAMES), attribute_names=list(ATTRIBUTE_NAMES))


def judge(images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Bias, minority share per class and fidelity of generated images of the built-in domain (exact rules)."""
    return SHAPES_JUDGE(images, labels)


def make_judge(data_cfg: DataConfig, folder=None, device="cpu", steps: int = 400) -> Judge:
    """The judge of a run's domain. Classifiers are trained on the balanced eval split and cached in `folder`
    (e.g. RUN/judges); their held-out accuracy is in `Judge.how` and is printed. With a folder the judge also
    measures image quality (module docstring); without one only the built-in domain can be judged (exact
    rules, no quality)."""
    if folder is None:
        if data_cfg.name == "shapes":
            return SHAPES_JUDGE
        raise ValueError(f"dataset {data_cfg.name!r} is judged by classifiers; pass a folder to cache them in")
    from .classifiers import load_or_train

    ev = make_dataset(data_cfg, "eval")

    def classifier(name, targets, k):
        model, acc = load_or_train(folder, name, ev.images, targets, k, device=device, steps=steps)
        print(f"[judge] {name} classifier: held-out accuracy {acc:.3f}")
        return model, f"small CNN on the balanced eval split, held-out accuracy {acc:.3f}"

    class_net, class_how = classifier("class", ev.labels, ev.num_classes)
    attribute_net, attribute_how = classifier("attribute", ev.bias, ev.num_attributes)
    read_class, read_attribute = class_net.predict, attribute_net.predict
    how = {"class": class_how, "attribute": attribute_how}
    if data_cfg.name == "shapes":                 # exact rules judge; the CNNs are reported next to them
        read_class, read_attribute = SHAPES_JUDGE.read_class, SHAPES_JUDGE.read_attribute
        how = {**SHAPES_JUDGE.how, "class_cnn": class_how, "attribute_cnn": attribute_how}
    elif data_cfg.name == "cmnist":               # exact colour reader; its CNN is reported next to it
        from .datasets import read_digit_colour
        k = ev.num_attributes
        read_attribute = lambda images: read_digit_colour(images, k)   # noqa: E731
        exact = float((read_attribute(ev.images) == ev.bias).float().mean())
        how["attribute"] = f"exact colour reader (agrees with the eval split's labels on {exact:.3f})"
        how["attribute_cnn"] = attribute_how

    def features(images: torch.Tensor) -> torch.Tensor:                  # (N, D_class + D_attribute)
        return torch.cat([image_features(class_net, images), image_features(attribute_net, images)], dim=1)

    reference = features(ev.images)
    how["quality"] = (f"pooled features of the class and attribute CNNs ({reference.shape[1]} dims); "
                      f"reference: the balanced eval split, {len(ev)} images")
    names = dict(class_names=list(ev.class_names), attribute_names=list(ev.attribute_names))
    return Judge(read_attribute, read_class, ev.num_classes, ev.num_attributes, how, features, reference, **names)
