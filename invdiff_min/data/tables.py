"""Metadata tables and the selection of samples, shared by the loaders that read from disk.

A loader reads its metadata files into a `MetadataTable` (one row per image, before any image is decoded);
`check_table` confines its paths to the root, drops duplicate rows and refuses data with one class or one
attribute value; `select_rows` then picks the training rows (optionally re-sampled to a bias ratio or to cell
sizes, `Sampling`) and a balanced eval split, deterministically given the seed. Every helper raises a one-line
`DatasetLayoutError` / `DatasetFormatError` naming the file (and line), what it expected and what it found.
"""
from __future__ import annotations

import csv
import math
import os
import posixpath
import re
import stat
import warnings
from bisect import bisect_right
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path

import torch

from .core import DatasetFormatError, DatasetLayoutError, DatasetWarning

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
    lines: list[int] | None = None   # line of each row in its metadata file, for errors (None: row + 2)
    sources: tuple = ()              # ((metadata file, first row), ...) in row order, for errors
    columns: tuple = ("class", "bias")   # the metadata's names for y and b, for errors

    def where(self, r: int) -> str:
        """'FILE:LINE' of row r."""
        if not self.sources:
            return f"row {r}"
        i = bisect_right([first for _, first in self.sources], r) - 1
        return f"{self.sources[i][0]}:{self.lines[r] if self.lines else r - self.sources[i][1] + 2}"


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
    if not all(math.isfinite(s) and s >= 0 for s in out) or sum(out) <= 0:
        raise ValueError(f"group_sizes must be non-negative with a positive sum, got {out}")
    return out


def require_dir(path, what: str, layout: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DatasetLayoutError(f"{what} not found: expected the folder {path}{found_near(path)}. {layout}")
    return path


def require_file(path: Path, layout: str) -> Path:
    """A metadata file; a FIFO, device, socket or folder in its place is refused (reading it could block)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        raise DatasetLayoutError(f"missing file {path}{found_near(path)}. {layout}") from None
    if not stat.S_ISREG(mode):
        raise DatasetLayoutError(f"{path} is not a regular file ({file_kind(mode)}); put the metadata file "
                                 f"itself there. {layout}")
    return path


def file_kind(mode: int) -> str:
    """'folder', 'FIFO', ... for the st_mode of something that is not a regular file."""
    kinds = ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
             (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))
    return next((name for test, name in kinds if test(mode)), "special file")


def found_near(path: Path) -> str:
    """' (ROOT holds: a, b, ...)' for the nearest existing parent, to show what is there instead."""
    parent = path.parent
    if not parent.is_dir():
        return ""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in parent.iterdir() if not p.name.startswith("."))
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} entries)" if len(names) > 8 else "")
    return f" ({parent} holds: {shown or 'nothing'})"


def read_csv(path: Path, required: list[str], layout: str) -> tuple[list[dict], list[int]]:
    """Rows of a CSV file with a header, as dicts, and the line each row ends on; refuses a file lacking a
    required column, a row with more or fewer fields than the header, and a file that is not UTF-8 CSV."""
    try:
        return _read_csv(path, required, layout)
    except UnicodeDecodeError as e:
        raise DatasetFormatError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8 "
                                 f"CSV") from None
    except csv.Error as e:                      # e.g. a field over the csv module's 131,072 characters
        raise DatasetFormatError(f"{path}: not readable as CSV ({e}). {layout}") from None


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file; a file in another encoding is a one-line error naming it."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DatasetFormatError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None


def _read_csv(path: Path, required: list[str], layout: str) -> tuple[list[dict], list[int]]:
    with open(path, newline="", encoding="utf-8-sig") as f:     # utf-8-sig: tolerate a byte-order mark
        reader = csv.DictReader(f)
        found = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in dict.fromkeys(required) if c not in found]
        if missing:
            raise DatasetFormatError(f"{path}: missing column(s) {', '.join(missing)}; found "
                                     f"{', '.join(found) or 'no header'}. {layout}")
        reader.fieldnames = found
        rows, lines = [], []
        for row in reader:
            if None in row.values():
                raise DatasetFormatError(f"{path}:{reader.line_num}: fewer fields than the header ({len(found)})")
            if None in row:    # DictReader keeps the surplus under the key None: a comma in an unquoted value?
                raise DatasetFormatError(f"{path}:{reader.line_num}: more fields than the header ({len(found)}); "
                                         f"quote values that hold a comma")
            rows.append(row)
            lines.append(reader.line_num)
    if not rows:
        raise DatasetFormatError(f"{path} has a header but no rows; add one row per image (docs/datasets.md)")
    return rows, lines


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d{1,3})?", re.ASCII)


def parse_number(text: str) -> Decimal | None:
    """The exact value of a plain decimal number ('1', '1.0', '01', '-2', '2.5', '1e3'), else None: words, and
    also 'nan', 'inf' and '1_000', which float() would take."""
    return Decimal(text) if _NUMBER.fullmatch(text) else None


def number_name(value: Decimal) -> str:
    """The canonical text of a number: '1' for 1, 1.0, 01 and 1e0; '2.5' for 2.50; '0' for -0. Exact: no
    rounding to a context precision, no int/str digit limit."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _line(lines: list[int] | None, i: int) -> int:
    return lines[i] if lines else i + 2       # without recorded lines: a header, then one row a line


def read_ints(rows: list[dict], column: str, path: Path, allowed: set[int],
              lines: list[int] | None = None) -> torch.Tensor:
    """An integer column, strictly: '1' and '1.0' are 1; '1.5', 'one' or a value outside `allowed` is refused
    with its line."""
    parsed = {v: parse_number(v.strip()) for v in {r[column] for r in rows}}
    ok = {v: int(n) for v, n in parsed.items() if n is not None and n == n.to_integral_value() and int(n) in allowed}
    if len(ok) < len(parsed):
        i = next(i for i, r in enumerate(rows) if r[column] not in ok)
        raise DatasetFormatError(f"{path}:{_line(lines, i)}: column {column!r} holds {rows[i][column]!r}; expected "
                                 f"one of the integers {sorted(allowed)}")
    return torch.tensor([ok[r[column]] for r in rows], dtype=torch.long)


def read_mapped(rows: list[dict], column: str, mapping: dict, path: Path) -> list[int]:
    odd = sorted({r[column] for r in rows} - set(mapping))
    if odd:
        raise DatasetFormatError(f"{path}: column {column!r} holds unknown values {', '.join(map(repr, odd[:5]))}; "
                                 f"expected {', '.join(mapping)}")
    return [mapping[r[column]] for r in rows]


def index_values(values: list[str], column: str, path: Path,
                 lines: list[int] | None = None) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Map the values of a column to 0..K-1 in sorted order. A column of numbers only is compared by value
    (1, 1.0, 01 and " 1" are one class, named "1"; 2.5 is "2.5"); a column of words only, as text; a column
    that mixes numbers and words is refused, naming one of each and its line."""
    values = [v.strip() for v in values]
    first: dict[str, int] = {}                                           # distinct value -> its first row
    for i, v in enumerate(values):
        first.setdefault(v, i)
    if "" in first:
        raise DatasetFormatError(f"{path}:{_line(lines, first[''])}: column {column!r} is empty")
    numbers = {v: parse_number(v) for v in first}
    words = [v for v, n in numbers.items() if n is None]
    if words and len(words) < len(numbers):
        number, word = next(v for v, n in numbers.items() if n is not None), words[0]
        raise DatasetFormatError(f"{path}: column {column!r} mixes numbers and words: line "
                                 f"{_line(lines, first[number])} holds {number!r}, line {_line(lines, first[word])} "
                                 f"holds {word!r}; use numbers in every row or names in every row")
    if words:
        names = sorted(first)
        lookup = {v: i for i, v in enumerate(names)}
    else:
        order = sorted(set(numbers.values()))
        rank = {n: i for i, n in enumerate(order)}
        names = [number_name(n) for n in order]
        lookup = {v: rank[n] for v, n in numbers.items()}
    return torch.tensor([lookup[v] for v in values], dtype=torch.long), tuple(names)


YES_NO = ("true", "1", "yes", "false", "0", "no")


def flag(value, name: str) -> bool:
    """A yes/no option as given in Python (True) or on the command line (true, 1, yes)."""
    text = str(value).strip().lower()
    if isinstance(value, (bool, int, str)) and text in YES_NO:
        return text in ("true", "1", "yes")
    raise ValueError(f"{name} must be true or false, got {value!r}")


# ----- table checks: paths inside the root, no duplicates, at least two classes and attribute values ----
def check_table(table: MetadataTable, allow_outside_root: bool) -> MetadataTable:
    """The table with normalised paths and duplicate rows (the same image again) set to UNUSED, keeping the
    first: no image can be in both train and eval. Refuses a path outside the root (unless allowed), an empty
    one, duplicates whose labels disagree, and data with fewer than two classes or attribute values."""
    files = [posixpath.normpath(f) for f in table.files]              # 'imgs/./a.png' -> 'imgs/a.png'
    for r, norm in enumerate(files):   # outside by its text; a symlink out is caught when opened (images.py)
        if norm == ".":
            raise DatasetFormatError(f"{table.where(r)}: empty image path {table.files[r]!r}; name an image file")
        if not allow_outside_root and (norm == ".." or norm.startswith(("/", "../"))):
            raise DatasetFormatError(f"{table.where(r)}: the image path {table.files[r]!r} leads outside the dataset "
                                     f"root; {OUTSIDE_ROOT_FIX}")
    first_of = dict(zip(reversed(files), range(len(files) - 1, -1, -1)))   # image -> its first row
    dropped = [(r, first_of[f]) for r, f in enumerate(files) if first_of[f] != r] if len(first_of) < len(files) else []
    split = table.split.clone()
    for r, first in dropped:
        for what, names, values in ((table.columns[0], table.class_names, table.labels),
                                    (table.columns[1], table.attribute_names, table.bias)):
            if values[first] != values[r]:
                raise DatasetFormatError(f"{table.where(first)} and {table.where(r)} list the same image "
                                         f"{files[r]!r} with different {what} ({names[int(values[first])]} vs "
                                         f"{names[int(values[r])]}); correct or remove one of the rows")
        split[r] = UNUSED
    if dropped:
        def repeats(r: int, first: int) -> str:      # "m.csv:14 repeats line 2 (a.png)"; another file in full
            here, there = table.where(r).rsplit(":", 1), table.where(first).rsplit(":", 1)
            return f"{':'.join(here)} repeats {'line ' + there[-1] if here[0] == there[0] else ':'.join(there)} " \
                   f"({files[r]})"
        shown = "; ".join(repeats(r, first) for r, first in dropped[:3])
        warnings.warn(f"dropped {len(dropped)} duplicate row(s) listing an image already listed, keeping each "
                      f"image's first row so that no image is in both train and eval: {shown}"
                      f"{f'; +{len(dropped) - 3} more' if len(dropped) > 3 else ''}", DatasetWarning, stacklevel=3)
    used = split != UNUSED
    sources = ", ".join(str(path) for path, _ in table.sources) or "the metadata"
    for what, names, values, why in (
            ("class", table.class_names, table.labels, "InvDiff debiases a class-conditional model: one class "
             "gives nothing to condition on"),
            ("attribute value", table.attribute_names, table.bias, "Bias is measured across the attribute's "
             "values: one value gives Bias 1.000 whatever the model does")):
        present = [names[v] for v in values[used].unique().tolist()]
        if len(present) < 2:
            column = table.columns[0] if what == "class" else table.columns[1]
            raise DatasetFormatError(f"{sources}: the rows used hold {len(present)} {what}"
                                     f"{f' ({present[0]})' if present else ''} in {column!r}; at least two are "
                                     f"needed ({why})")
    return replace(table, files=files, split=split)


OUTSIDE_ROOT_FIX = ("paths must stay inside the root (symlinks included); move the images under the root, or "
                    "allow it with allow_outside_root=True (--data-option allow_outside_root=true)")


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


def select_rows(table: MetadataTable, s: Sampling, holdout: bool,
                bad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        source = f" of {', '.join(str(f) for f, _ in table.sources)}" if table.sources else ""
        raise ValueError(f"{held}{source} has no sample in cell {_cell(y, b, names)}, so no balanced eval split "
                         f"exists; samples per cell (y * A + b): {sizes.tolist()}; add images of that cell (every "
                         f"class needs every attribute value)")
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
    per_class = torch.bincount(table.labels[train_rows], minlength=c_)
    if int(per_class.min()) == 0:
        y = int(per_class.argmin())
        raise ValueError(f"the training split holds no sample of class y={y} ({table.class_names[y]}); the "
                         f"class-conditional model would never see it. Training samples per class: "
                         f"{per_class.tolist()}; check the split column or the re-sampling options")
    return train_rows[priority[train_rows].argsort()], eval_rows[priority[eval_rows].argsort()]


