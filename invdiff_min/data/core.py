"""What every dataset is: its config, its in-memory form, the errors its loaders raise, and the spec each
dataset declares for the registry (`data/__init__.py`).

A dataset is a pair of splits `(train, eval)`: `train` is biased (the spurious correlation InvDiff must
remove), `eval` is balanced over the (class y, attribute b) cells. Every sample carries its class y, its
hidden attribute b and a stable index; training stages read only `images`, `labels` and `index`, while `bias`
(and the derived `group`, `conflicting`) is read only by the named oracle and by evaluation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch


@dataclass
class DataConfig:
    """Which data a run trains on: `name` is a key of `DATASETS` (shapes, cmnist, waterbirds, celeba, fairface,
    folder); real datasets read `data_root`, and `options` go to the loader (e.g. {"target": "Blond_Hair",
    "bias": "Male"} for CelebA, {"digits": [0, 1]} for cmnist)."""
    name: str = "shapes"              # "shapes" (built in) or another key of DATASETS
    resolution: int = 16              # image side in pixels; 16, 32 and 64 are tested
    num_samples: int | None = 4000    # training set size (None: all a real dataset has)
    aligned_fraction: float | None = 0.95   # share of bias-aligned samples (b == y); None: the data as it is
    eval_per_group: int | None = 250  # balanced evaluation split: this many samples in each (y, b) cell
    seed: int = 0                     # the data seed (the reported results use a different one than tuning)
    data_root: str | None = None      # folder of a real dataset (not used by shapes and cmnist)
    options: dict = field(default_factory=dict)   # loader-specific options

    def to_dict(self) -> dict:
        return asdict(self)

    def sampling_options(self) -> dict:
        """The options every loader shares (bias ratio, sizes, seed), as keywords."""
        return dict(aligned_fraction=self.aligned_fraction, num_samples=self.num_samples,
                    eval_per_group=self.eval_per_group, seed=self.seed)


@dataclass
class BiasedDataset:
    """One split in memory; `images` are (N, 3, H, W) floats in [0, 1]."""
    images: torch.Tensor
    labels: torch.Tensor        # y, (N,) long
    bias: torch.Tensor          # b, hidden, (N,) long
    index: torch.Tensor         # stable sample index, (N,) long
    num_classes: int = 2
    num_attributes: int = 2
    class_names: tuple[str, ...] = ()       # class_names[y]
    attribute_names: tuple[str, ...] = ()   # attribute_names[b]
    info: dict = field(default_factory=dict)  # where it came from: dataset, root, options, cache file, skipped

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def group(self) -> torch.Tensor:
        """Hidden (y, b) cell: y * num_attributes + b."""
        return self.labels * self.num_attributes + self.bias

    @property
    def conflicting(self) -> torch.Tensor:
        """Hidden: True where b != y (the minority)."""
        return self.bias != self.labels


@dataclass
class DataSplits:
    """The two splits of one dataset, built once per process and passed down to every stage."""
    train: BiasedDataset
    eval: BiasedDataset
    spec: "DatasetSpec"


# a real dataset as its authors distribute it, unless a bias ratio or sizes are asked for (DataConfig defaults)
AS_DISTRIBUTED = dict(num_samples=None, eval_per_group=None, aligned_fraction=None)

Reader = Callable[[torch.Tensor, int], torch.Tensor]   # (images (N, 3, H, W) in [0, 1], K) -> (N,) index, -1 unread


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset declares: how to load it, the defaults it overrides in `DataConfig`, and the exact
    readers of its class and attribute when its domain has them (the judge uses them instead of a CNN)."""
    name: str
    load: Callable[[DataConfig], tuple[BiasedDataset, BiasedDataset]]   # -> (train, eval)
    loader: Callable | None = None                 # the function whose keyword-only arguments are the options
    defaults: dict = field(default_factory=dict)   # DataConfig fields this dataset sets when chosen
    read_class: Reader | None = None               # exact class reader, or None (a CNN judges)
    read_attribute: Reader | None = None           # exact attribute reader, or None (a CNN judges)
    needs_root: bool = False                       # reads a folder from disk (--data-root)
    about: str = ""                                # one line for --help and errors


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1], the range the diffusion model works in."""
    return images * 2 - 1


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((x + 1) / 2).clamp(0, 1)


def check_rgb(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")


class DatasetLayoutError(FileNotFoundError):
    """A folder or file of the dataset's layout is missing; the message names the path and the layout."""


class DatasetFormatError(ValueError):
    """A metadata file lacks a column, an attribute or a value; the message names what it found."""


class DatasetWarning(UserWarning):
    """Skipped images, an unwritable or unreadable cache."""
