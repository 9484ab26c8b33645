"""Metadata tables and the selection of samples, shared by the loaders that read from disk.

A loader reads its metadata files into a `MetadataTable` (one row per image, before any image is decoded);
`select_rows` then picks the training rows (optionally re-sampled to a bias ratio or to cell sizes,
`Sampling`) and a balanced eval split, deterministically given the seed. Every helper raises a one-line
`DatasetLayoutError` / `DatasetFormatError` naming the file, what it expected and what it found.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch

from .core import DatasetFormatError, DatasetLayoutError

TRAIN, EVAL, UNUSED = 0, 1, -1      # values of MetadataTable.split

# ----- metadata -> table ---------------------------------------------------------------------------------
@dataclass
class MetadataTable:
    """What a loader reads from the metadata files, before any image is decoded; one entry per row."""
    files: list[str]                 # image paths relative to the root
    labels: torch.Tensor             # y, (R,) long
    bias: torch.Tensor               # b, (R,) long
    split: torch.Tensor              # (R,) long: TRAIN, EVAL or UNUSED
    class_names: tuple
    attribute_names: tuple


@dataclass(frozen=True)
class Sampling:
    aligned_fraction: float | None
    group_sizes: object
    num_samples: int | None
    eval_per_group: int | None
    seed: int

    def __post_init__(self):
        if self.aligned_fraction is not None and self.group_sizes is not None:
            raise ValueError("give aligned_fraction or group_sizes, not both")
        if self.aligned_fraction is not None and not 0.0 <= self.aligned_fraction <= 1.0:
            raise ValueError(f"aligned_fraction must be in [0, 1], got {self.aligned_fraction}")
        for name in ("num_samples", "eval_per_group"):
            v = getattr(self, name)
            if v is not None and (int(v) != v or v < 0):
                raise ValueError(f"{name} must be a positive integer (or None / 0 for all), got {v}")
        object.__setattr__(self, "group_sizes", _parse_sizes(self.group_sizes))

    def to_dict(self) -> dict:
        return {"aligned_fraction": self.aligned_fraction, "group_sizes": self.group_sizes,
                "num_samples": self.num_samples or None, "eval_per_group": self.eval_per_group or None,
                "seed": self.seed}


def _parse_sizes(sizes) -> list[float] | None:
    """group_sizes from "3:2:1:1", "3,2,1,1" or a sequence of numbers."""
    if sizes is None:
        return None
    if isinstance(sizes, str):
        sizes = sizes.replace(",", ":").split(":")
    try:
        out = [float(s) for s in sizes]
    except (TypeError, ValueError):
        raise ValueError(f"group_sizes must be numbers like '3:2:1:1' or [3, 2, 1, 1], got {sizes!r}") from None
    if any(s < 0 for s in out) or sum(out) <= 0:
        raise ValueError(f"group_sizes must be non-negative with a positive sum, got {out}")
    return out


def require_dir(path, what: str, layout: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DatasetLayoutError(f"{what} not found: expected the folder {path}{found_near(path)}. {layout}")
    return path


def require_file(path: Path, layout: str) -> Path:
    if not path.is_file():
        raise DatasetLayoutError(f"missing file {path}{found_near(path)}. {layout}")
    return path


def found_near(path: Path) -> str:
    """' (ROOT holds: a, b, ...)' for the nearest existing parent, to show what is there instead."""
    parent = path.parent
    if not parent.is_dir():
        return ""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in parent.iterdir() if not p.name.startswith("."))
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} entries)" if len(names) > 8 else "")
    return f" ({parent} holds: {shown or 'nothing'})"


def read_csv(path: Path, required: list[str], layout: str) -> list[dict]:
    """Rows of a CSV file with a header, as dicts; refuses a file lacking a required column."""
    with open(path, newline="", encoding="utf-8-sig") as f:     # utf-8-sig: tolerate a byte-order mark
        reader = csv.DictReader(f)
        found = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in dict.fromkeys(required) if c not in found]
        if missing:
            raise DatasetFormatError(f"{path}: missing column(s) {', '.join(missing)}; found "
                                     f"{', '.join(found) or 'no header'}. {layout}")
        reader.fieldnames = found
        rows = []
        for row in reader:
            if None in row.values():
                raise DatasetFormatError(f"{path}:{reader.line_num}: fewer fields than the header ({len(found)})")
            rows.append(row)
    if not rows:
        raise DatasetFormatError(f"{path} has a header but no rows")
    return rows


def read_ints(rows: list[dict], column: str, path: Path, allowed: set[int]) -> torch.Tensor:
    try:
        values = [int(float(r[column])) for r in rows]
    except (TypeError, ValueError):
        raise DatasetFormatError(f"{path}: column {column!r} must hold integers {sorted(allowed)}") from None
    odd = sorted(set(values) - allowed)
    if odd:
        raise DatasetFormatError(f"{path}: column {column!r} holds {odd}; expected only {sorted(allowed)}")
    return torch.tensor(values, dtype=torch.long)


def read_mapped(rows: list[dict], column: str, mapping: dict, path: Path) -> list[int]:
    odd = sorted({r[column] for r in rows} - set(mapping))
    if odd:
        raise DatasetFormatError(f"{path}: column {column!r} holds unknown values {', '.join(map(repr, odd[:5]))}; "
                                 f"expected {', '.join(mapping)}")
    return [mapping[r[column]] for r in rows]


def index_values(values: list[str], column: str, path: Path) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Map the values of a column to 0..K-1 in sorted order (numerically if all are integers)."""
    values = [v.strip() for v in values]
    if any(v == "" for v in values):
        raise DatasetFormatError(f"{path}: column {column!r} is empty in row {values.index('') + 2}")
    try:
        names = sorted(set(values), key=int)
    except ValueError:
        names = sorted(set(values))
    lookup = {v: i for i, v in enumerate(names)}
    return torch.tensor([lookup[v] for v in values], dtype=torch.long), tuple(names)


def choose(value: str, options: dict, name: str):
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(options)}, got {value!r}")
    return options[value]


def check_resolution(resolution: int) -> None:
    if int(resolution) != resolution or resolution < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution}")


# ----- selection: training re-sampling and the balanced eval split --------------------------------------
def class_counts(n: int, aligned_fraction: float, c: int, k: int) -> torch.Tensor:
    """(K,) counts of one class c of n samples: round((1 - aligned_fraction) * n) conflicting, spread over the
    other attribute values in turn (c+1, c+2, ...), the rest aligned (b == c)."""
    m = round((1 - aligned_fraction) * n) if k > 1 else 0
    counts = torch.zeros(k, dtype=torch.long)
    counts[c] = n - m
    for j in range(1, k):
        counts[(c + j) % k] = m // (k - 1) + (j <= m % (k - 1))
    return counts


def _train_counts(avail: torch.Tensor, s: Sampling, names: tuple) -> torch.Tensor | None:
    """(C, A) training samples to take per (y, b) cell given the (C, A) available ones; None = the first
    num_samples of the pool in priority order (no re-sampling)."""
    c_, a_ = avail.shape
    if s.group_sizes is not None:
        if len(s.group_sizes) != c_ * a_:
            raise ValueError(f"group_sizes has {len(s.group_sizes)} entries but there are {c_} classes x {a_} "
                             f"attribute values = {c_ * a_} cells (order y * {a_} + b)")
        w = torch.tensor(s.group_sizes, dtype=torch.float64).view(c_, a_)
        if s.num_samples:
            exact = w / w.sum() * s.num_samples
            counts = exact.floor().long()
            short = s.num_samples - int(counts.sum())                # largest remainder
            order = (exact - counts).flatten().argsort(descending=True, stable=True)[:short]
            counts.view(-1)[order] += 1
        else:
            scale = (avail[w > 0] / w[w > 0]).min()
            counts = (w * scale + 1e-9).floor().long()
    elif s.aligned_fraction is not None:
        if c_ != a_:
            raise ValueError(f"aligned_fraction needs as many attribute values as classes (aligned means "
                             f"b == y); this data has {c_} classes and {a_} attribute values: use group_sizes")
        rows = []
        for c in range(c_):
            if s.num_samples:
                n = s.num_samples // c_ + (c < s.num_samples % c_)
            else:   # the largest class size the available cells allow, searched down from a bound
                r = s.aligned_fraction
                n = int(avail[c].sum())
                if r > 0:        # aligned = n - round((1 - r) n) >= r n - 0.5 must fit
                    n = min(n, int((avail[c, c] + 1) / r) + 1)
                if r < 1 and c_ > 1:   # the smallest conflicting share, floor(m / (A - 1)), must fit
                    n = min(n, int((avail[c][torch.arange(a_) != c].min() + 1) * (a_ - 1) / (1 - r)) + 1)
                while n > 0 and (class_counts(n, r, c, a_) > avail[c]).any():
                    n -= 1
            rows.append(class_counts(n, s.aligned_fraction, c, a_))
        counts = torch.stack(rows)
    elif s.num_samples:
        if s.num_samples > int(avail.sum()):
            raise ValueError(f"num_samples={s.num_samples} but the training split has {int(avail.sum())} "
                             f"readable samples")
        return None
    else:
        counts = avail.clone()
    over = (counts > avail).nonzero().tolist()
    if over:
        y, b = over[0]
        raise ValueError(f"the training split has {int(avail[y, b])} samples in cell {_cell(y, b, names)} but the "
                         f"re-sampling asks for {int(counts[y, b])}; available per cell (y * A + b): "
                         f"{avail.flatten().tolist()}; lower num_samples or leave it unset for the largest set")
    return counts


def _cell(y: int, b: int, names) -> str:
    class_names, attribute_names = names
    return f"(y={y} {class_names[y]}, b={b} {attribute_names[b]})"


def _top(pool: torch.Tensor, priority: torch.Tensor, k: int) -> torch.Tensor:
    """The k rows of `pool` (row ids) with the lowest priority."""
    return pool[priority[pool].argsort()[:k]]


def select_rows(table: MetadataTable, s: Sampling, holdout: bool, bad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ids of the training and eval samples, each in a seeded random order. Every row has a fixed random
    priority; each (y, b) cell takes its rows in priority order, so excluding an unreadable row (`bad`, (R,)
    bool) only brings in the next row of its cell."""
    n_rows, c_, a_ = len(table.files), len(table.class_names), len(table.attribute_names)
    names = (table.class_names, table.attribute_names)
    priority = torch.randperm(n_rows, generator=torch.Generator().manual_seed(s.seed))   # (R,) rank of each row
    cell = table.labels * a_ + table.bias                                                 # (R,)
    ok = ~bad
    eval_pool = ok & (table.split == (TRAIN if holdout else EVAL))
    sizes = torch.bincount(cell[eval_pool], minlength=c_ * a_)
    held = "all rows (no split column)" if holdout else "the eval split"
    if int(sizes.min()) == 0:
        y, b = divmod(int(sizes.argmin()), a_)
        raise ValueError(f"{held} has no sample in cell {_cell(y, b, names)}, so no balanced eval split exists; "
                         f"samples per cell (y * A + b): {sizes.tolist()}")
    e = s.eval_per_group or (max(1, int(sizes.min()) // 5) if holdout else int(sizes.min()))
    if e > int(sizes.min()) - (1 if holdout else 0):
        y, b = divmod(int(sizes.argmin()), a_)
        raise ValueError(f"eval_per_group={e} but {held} holds only {int(sizes.min())} samples in cell "
                         f"{_cell(y, b, names)}{' (one must stay for training)' if holdout else ''}; "
                         f"lower eval_per_group")
    eval_rows = torch.cat([_top((eval_pool & (cell == g)).nonzero().squeeze(1), priority, e)
                           for g in range(c_ * a_)])
    in_eval = torch.zeros(n_rows, dtype=torch.bool)
    in_eval[eval_rows] = True
    train_pool = ok & (table.split == TRAIN) & ~in_eval
    avail = torch.bincount(cell[train_pool], minlength=c_ * a_).view(c_, a_)
    counts = _train_counts(avail, s, names)
    if counts is None:
        train_rows = _top(train_pool.nonzero().squeeze(1), priority, s.num_samples)
    else:
        train_rows = torch.cat([_top((train_pool & (cell == g)).nonzero().squeeze(1), priority, int(k))
                                for g, k in enumerate(counts.flatten())])
    return train_rows[priority[train_rows].argsort()], eval_rows[priority[eval_rows].argsort()]


