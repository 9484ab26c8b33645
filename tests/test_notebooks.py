"""The tutorials (tutorials/*.ipynb) run top to bottom, and their committed outputs show what they teach.

Each notebook is executed in a fresh kernel in fast mode (INVDIFF_FAST=1: the notebooks shrink their data,
models and step counts; the pictures are not meant to look like anything), so the whole file takes about
two minutes on 2 CPU cores. Any error in any cell fails the test. The committed notebooks hold the outputs of
the normal mode (`python tutorials/build_notebooks.py --execute`); those must contain a figure, no error, come
from the committed library (its hash in the notebook's metadata), and stay small enough to read on GitHub.
"""
import hashlib
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")   # provides the "python3" kernel, run with this interpreter

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
REQUIRES = {"06_pretrained_weights.ipynb": ["diffusers"]}   # builds a stand-in diffusers checkpoint
CELL_TIMEOUT_S = 300
MAX_BYTES = 1_000_000


def outputs(nb):
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]


def test_every_tutorial_is_here():
    names = [p.name for p in NOTEBOOKS]
    assert len(names) == 6 and [n[:2] for n in names] == ["01", "02", "03", "04", "05", "06"], names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_outputs_show_a_figure_and_no_error(path):
    nb = nbformat.read(path, as_version=4)
    outs = outputs(nb)
    errors = [f"{o.ename}: {o.evalue}" for o in outs if o.output_type == "error"]
    assert not errors, f"{path.name} was committed with errors in its outputs: {errors}"
    assert any("image/png" in o.get("data", {}) for o in outs), (
        f"{path.name} has no figure in its committed outputs; execute it with "
        f"python tutorials/build_notebooks.py --execute {path.name[:2]}")
    size = path.stat().st_size
    assert size < MAX_BYTES, f"{path.name} is {size / 1e6:.2f} MB; keep it under 1 MB (lower the figures' dpi)"


def library_sha256() -> str:
    """The hash build_notebooks.py records when it executes a notebook (metadata invdiff_min.library_sha256)."""
    h = hashlib.sha256()
    root = TUTORIALS.parent
    for f in sorted((root / "invdiff_min").rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_outputs_come_from_the_committed_library(path):
    """A library change means executing the notebooks again: their outputs must be what this code prints."""
    recorded = nbformat.read(path, as_version=4).metadata.get("invdiff_min", {}).get("library_sha256")
    assert recorded == library_sha256(), (
        f"{path.name} was executed with another version of invdiff_min; run "
        f"OMP_NUM_THREADS=1 python tutorials/build_notebooks.py --execute {path.name[:2]}")


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory):
    """One temp folder for the whole session: tutorials 2-5 cache their base model there (no stale cache
    from another run, nothing left outside pytest's temp folders)."""
    return tmp_path_factory.mktemp("tutorials")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_tutorial_runs_top_to_bottom_in_fast_mode(path, shared_tmp, monkeypatch):
    for module in REQUIRES.get(path.name, []):
        pytest.importorskip(module)
    monkeypatch.setenv("INVDIFF_FAST", "1")          # the kernel inherits this process's environment
    monkeypatch.setenv("TMPDIR", str(shared_tmp))    # tempfile.gettempdir() in the kernel
    monkeypatch.delenv("INVDIFF_PRETRAINED", raising=False)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(TUTORIALS)}})
    client.execute()                                  # raises CellExecutionError, naming the cell, on any error
    errors = [f"{o.ename}: {o.evalue}" for o in outputs(nb) if o.output_type == "error"]
    assert not errors, errors
