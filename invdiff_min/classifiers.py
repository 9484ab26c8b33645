"""Small CNN judges for domains without an exact reader: they say which class and which attribute a generated
image shows, so Bias and fidelity can be measured on real datasets.

They are trained on the **balanced** evaluation split (every (y, b) cell equally often), so neither judge can
score by the spurious correlation: the attribute judge must look at the attribute. A held-out fifth of that
split gives the accuracy printed and stored next to the weights (`<run>/judges/<name>.safetensors` + `.json`),
and a second call with the same data loads them instead of training again.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .checkpoint import fingerprint, load_state_into, load_tensors, read_json, save_tensors, write_json


MIN_IMAGES = 10                  # a classifier is trained on 80% of them and checked on the rest


class SmallCNN(nn.Module):
    """(N, C, H, W) images in [0, 1] -> (N, num_outputs) logits; three conv stages, global average pooling."""

    def __init__(self, in_channels: int, num_outputs: int, width: int = 32):
        super().__init__()
        self.in_channels, self.num_outputs, self.width = in_channels, num_outputs, width

        def stage(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())
        self.features = nn.Sequential(stage(in_channels, width), nn.MaxPool2d(2), stage(width, 2 * width),
                                      nn.MaxPool2d(2), stage(2 * width, 2 * width), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(2 * width, num_outputs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images * 2 - 1).flatten(1))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """(N,) argmax class, in batches, on the model's device."""
        device = next(self.parameters()).device
        self.eval()
        return torch.cat([self(images[i:i + batch_size].to(device)).argmax(1).cpu()
                          for i in range(0, len(images), batch_size)])


def train_classifier(images: torch.Tensor, targets: torch.Tensor, num_outputs: int, steps: int = 400,
                     batch_size: int = 64, lr: float = 2e-3, holdout: float = 0.2, seed: int = 0,
                     device="cpu") -> tuple[SmallCNN, float]:
    """Fit a SmallCNN by cross-entropy on a random (1 - holdout) share of (images, targets); returns the model
    and its accuracy on the held-out rest. Light augmentation (random flips, one-pixel shifts) keeps it from
    memorising the few hundred images of small eval splits."""
    if images.ndim != 4 or len(images) != len(targets):
        raise ValueError(f"need images (N, C, H, W) and targets (N,), got {tuple(images.shape)} and "
                         f"{tuple(targets.shape)}")
    if len(images) < MIN_IMAGES:
        raise ValueError(f"need at least {MIN_IMAGES} images to train and check a classifier, got {len(images)}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    perm = torch.randperm(len(images), generator=g)
    n_test = max(1, int(round(holdout * len(images))))
    test, train = perm[:n_test], perm[n_test:]
    model = SmallCNN(images.shape[1], num_outputs).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for step in range(steps):
        idx = train[torch.randint(0, len(train), (batch_size,), generator=g)]
        x = images[idx]
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(3)
        dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        loss = nn.functional.cross_entropy(model(x.to(device)), targets[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    accuracy = float((model.predict(images[test]) == targets[test]).float().mean())
    return model.eval(), accuracy


def load_or_train(folder, name: str, images: torch.Tensor, targets: torch.Tensor, num_outputs: int,
                  device="cpu", **kwargs) -> tuple[SmallCNN, float]:
    """A judge cached in `folder` (safetensors + JSON), retrained when the data it was fitted on changed."""
    folder = Path(folder)
    weights, meta = folder / f"{name}.safetensors", folder / f"{name}.json"
    data_id = fingerprint({"images": images, "targets": targets})
    if weights.exists() and meta.exists():
        info = read_json(meta)
        if info.get("data_fingerprint") == data_id:
            model = SmallCNN(images.shape[1], info["num_outputs"], info["width"]).to(device)
            load_state_into(model, load_tensors(weights), str(weights))
            return model.eval(), info["heldout_accuracy"]
    model, accuracy = train_classifier(images, targets, num_outputs, device=device, **kwargs)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(weights, model.state_dict())
    write_json(meta, {"num_outputs": num_outputs, "width": model.width, "heldout_accuracy": accuracy,
                      "data_fingerprint": data_id, "trained_on": "balanced eval split, 80%; accuracy on the rest"})
    return model, accuracy
