"""Judge a (guided) model: sample N images per class, read which attribute (background, colour, ...) and which
class each shows, and report the paper's Bias, the minority share per class and fidelity (share of samples
showing the requested class).

How the images are read is the dataset's to say (`make_judge` asks its `DatasetSpec`): an exact reader where
the domain has one (the built-in shapes: both; Colored-MNIST: the colour), else a small CNN trained on the
balanced eval split (`classifiers.py`); the CNN's held-out accuracy is reported either way (`Judge.how`).

Image quality (when `make_judge` is given a folder): the distance between the generated images and the
balanced real set (the eval split) in the feature space of the judge's two small CNNs (class and attribute,
their pooled features side by side), so it sees both what the object is and what surrounds it. Inception
weights cannot be downloaded here, so this is the project's own stand-in for FID / KID / improved precision
and recall: comparable between models of one run (same features, same reference, same number of samples),
not with published FIDs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from . import amp
from .data import ATTRIBUTE_NAMES, CLASS_NAMES, DataSplits, from_model_range, read_background, read_shape
from .diffusion import make_sampler, sample
from .guidance import GuidedModel
from .metrics import (attribute_shares, bias_score, fidelity, frechet_distance, image_features, kernel_distance,
                      minority_share, precision_recall)


@dataclass
class SampleSettings:
    """How a model is sampled for judging: the arguments of `generate` after the model."""
    diffusion_kwargs: dict                       # the noise schedule (DiffusionConfig.scheduler_kwargs())
    n_per_class: int
    num_classes: int
    image_shape: tuple[int, int, int]            # (C, H, W)
    sampler: str = "ddim"
    num_steps: int = 25
    guidance_scale: float = 1.0                  # classifier-free guidance scale s (1 = plain conditional)
    eta: float = 0.0
    seed: int = 0
    device: object = "cpu"
    batch_size: int = 500
    precision: str = "fp32"                      # autocast of the network calls (amp.py)
    guidance_t_max: int | None = None            # class guidance only at t < this (None: every step)


def generate(model, diffusion_kwargs: dict, n_per_class: int, num_classes: int, image_shape: tuple[int, int, int],
             sampler: str = "ddim", num_steps: int = 25, guidance_scale: float = 1.0, eta: float = 0.0,
             seed: int = 0, device="cpu", batch_size: int = 500, precision: str = "fp32",
             guidance_t_max: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [0, 1] (N, C, H, W), labels (N,)), class-major, deterministic given `seed`."""
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    model_labels = labels
    if hasattr(model, "labels_for"):     # a head told the sub-group: one of its class's sub-groups per image, from
        model_labels = model.labels_for(labels, torch.Generator().manual_seed(seed + 1))   # its own generator
    scheduler = make_sampler(sampler, diffusion_kwargs).to(device)
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(labels), batch_size):
        y = model_labels[start:start + batch_size]
        with amp.autocast(device, precision):
            x = sample(model, scheduler, (len(y), *image_shape), y, num_steps, guidance_scale=guidance_scale,
                       null_label=getattr(model, "null_label", None), eta=eta, generator=g, device=device,
                       guidance_t_max=guidance_t_max)
        out.append(from_model_range(x).cpu())
    return torch.cat(out), labels


def sample_and_judge(base, head, strength: float, judge: "Judge", settings: SampleSettings, mode: str = "additive",
                     mix_ratio: float = 0.5, head_outside_cfg: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Sample eps_theta + w G_psi (w = `strength`; w = 0 or head None: the base model alone) and judge the
    samples. Returns (images in [0, 1], labels, metrics). Every caller that compares models (the pipeline's
    evaluation, sample.py --evaluate, the benchmarks) samples through here, so a seed means the same noise."""
    model = GuidedModel(base, head if strength else None, strength, mode, mix_ratio,
                        head_outside_cfg=head_outside_cfg and bool(strength))
    images, labels = generate(model, **vars(settings))
    return images, labels, judge(images, labels)


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
            result = {"bias": bias_score(a, y, self.num_attributes),
                      "minority_share": minority_share(a, y, self.num_classes),
                      "attribute_share": attribute_shares(a, y, self.num_attributes, self.num_classes)}
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


SHAPES_JUDGE = Judge(lambda images: read_background(images), lambda images: read_shape(images), 2, 2,
                     {"attribute": "exact rule (background colour)", "class": "exact rule (bounding-box corners)"},
                     class_names=list(CLASS_NAMES), attribute_names=list(ATTRIBUTE_NAMES))


def judge(images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Bias, minority share per class and fidelity of generated images of the built-in domain (exact rules)."""
    return SHAPES_JUDGE(images, labels)


def check_judgeable(splits: DataSplits) -> None:
    """Refuse, before any training, a dataset whose evaluation could not run at the end: without an exact reader
    its judges are small CNNs trained on the balanced eval split, which needs a few images."""
    from .classifiers import MIN_IMAGES

    spec, ev = splits.spec, splits.eval
    if (spec.read_class is None or spec.read_attribute is None) and len(ev) < MIN_IMAGES:
        per_cell = len(ev) // max(1, ev.num_classes * ev.num_attributes)
        raise ValueError(f"the balanced eval split of {spec.name} holds {len(ev)} images ({per_cell} per (class, "
                         f"attribute) cell), but its judges (small CNNs) need at least {MIN_IMAGES} to train and "
                         f"check; "
                         f"raise it with --set data.eval_per_group=N or add images to the dataset")


def make_judge(splits: DataSplits, folder=None, device="cpu", steps: int = 400) -> Judge:
    """The judge of a dataset: its exact readers where its spec has them, else small CNNs trained on the
    balanced eval split and cached in `folder` (e.g. RUN/judges), whose held-out accuracy is in `Judge.how` and
    is printed. With a folder the judge also measures image quality (module docstring); without one only a
    dataset with exact readers for both class and attribute can be judged (no quality)."""
    spec, ev = splits.spec, splits.eval
    names = dict(class_names=list(ev.class_names), attribute_names=list(ev.attribute_names))
    exact = {"class": (spec.read_class, ev.labels, ev.num_classes),
             "attribute": (spec.read_attribute, ev.bias, ev.num_attributes)}
    readers, how = {}, {}
    for what, (reader, truth, k) in exact.items():
        if reader is not None:
            readers[what] = lambda images, reader=reader, k=k: reader(images, k)
            agree = float((readers[what](ev.images) == truth).float().mean())
            how[what] = f"exact reader of {spec.name} (agrees with the eval split's labels on {agree:.3f})"
    if folder is None:
        if len(readers) < 2:
            raise ValueError(f"dataset {spec.name!r} is judged by classifiers; pass a folder to cache them in")
        return Judge(readers["attribute"], readers["class"], ev.num_classes, ev.num_attributes, how, **names)
    from .classifiers import load_or_train

    nets = {}
    for what, (reader, truth, k) in exact.items():
        nets[what], acc = load_or_train(folder, what, ev.images, truth, k, device=device, steps=steps)
        print(f"[judge] {what} classifier: held-out accuracy {acc:.3f}")
        cnn = f"small CNN on the balanced eval split, held-out accuracy {acc:.3f}"
        if what in readers:                        # the exact reader judges; its CNN is reported beside it
            how[f"{what}_cnn"] = cnn
        else:
            readers[what], how[what] = nets[what].predict, cnn

    def features(images: torch.Tensor) -> torch.Tensor:                  # (N, D_class + D_attribute)
        return torch.cat([image_features(nets["class"], images), image_features(nets["attribute"], images)], dim=1)

    reference = features(ev.images)
    how["quality"] = (f"pooled features of the class and attribute CNNs ({reference.shape[1]} dims); "
                      f"reference: the balanced eval split, {len(ev)} images")
    return Judge(readers["attribute"], readers["class"], ev.num_classes, ev.num_attributes, how, features, reference,
                 **names)
