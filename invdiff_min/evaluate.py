"""Judge a (guided) model on the built-in domain: sample N images per class, read their background and
object with the exact rules of `data.py`, and report the paper's Bias, the minority share per class and
fidelity (share of samples showing the requested object)."""
from __future__ import annotations

import torch

from .data import from_model_range, read_background, read_shape
from .diffusion import make_sampler, sample
from .metrics import bias_score, minority_share


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


def judge(images: torch.Tensor, labels: torch.Tensor, num_classes: int = 2, num_attributes: int = 2) -> dict:
    """Bias, minority share per class and fidelity of generated images of the built-in domain."""
    attributes = read_background(images)
    shapes = read_shape(images)
    return {"bias": bias_score(attributes, labels, num_attributes),
            "minority_share": minority_share(attributes, labels, num_classes),
            "fidelity": float((shapes == labels).float().mean()),
            "n": len(labels)}
