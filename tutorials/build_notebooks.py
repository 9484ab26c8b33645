"""Write the tutorial notebooks (tutorials/NN_*.ipynb) from their sources, and optionally execute them.

    python tutorials/build_notebooks.py                 # write every notebook (outputs kept where no code changed)
    python tutorials/build_notebooks.py --execute       # write and execute them (normal mode): the committed outputs
    python tutorials/build_notebooks.py --execute 04    # only the notebooks whose name contains "04"

The sources are tutorials/NN_*.py in the percent format of jupytext: `# %%` starts a code cell and
`# %% [markdown]` a markdown cell whose lines are comments. Edit them, not the .ipynb files: they are plain
Python a reviewer can diff and a linter can read, and what the notebooks share lives in tutorials/common.py.
Execute with OMP_NUM_THREADS=1; the metadata of each executed notebook records the hash of the library it was
executed with (invdiff_min.library_sha256), so tests/test_notebooks.py can tell when outputs are stale, and
tests/test_notebooks.py also runs them in fast mode (INVDIFF_FAST=1).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
CELL_TIMEOUT_S = 4 * 3600                 # tutorial 5 trains four default heads in one cell (about 35 min here)


def parse_percent(text: str) -> list:
    """The cells of a percent-format source: `# %%` (code) and `# %% [markdown]` (markdown, lines commented)."""
    cells, kind, lines = [], None, []

    def close():
        body = "\n".join(lines).strip("\n")
        if kind == "markdown":
            cells.append(new_markdown_cell("\n".join(line[2:] if line.startswith("# ") else line.lstrip("#")
                                                      for line in body.splitlines())))
        elif kind == "code":
            cells.append(new_code_cell(body))

    for line in text.splitlines():
        if line.startswith("# %%"):
            close()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        else:
            lines.append(line)
    close()
    return cells


def build(source: Path) -> nbformat.NotebookNode:
    nb = new_notebook(cells=parse_percent(source.read_text()))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["jupytext"] = {"formats": "ipynb,py:percent"}          # paired with its source
    return nb


def library_sha256() -> str:
    """The hash of the library a notebook was executed with (metadata invdiff_min.library_sha256): a notebook
    whose hash differs from the checkout's was executed with other code and must be executed again."""
    h = hashlib.sha256()
    for f in sorted(Path("invdiff_min").rglob("*.py")):
        h.update(f.as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def keep_outputs(nb: nbformat.NotebookNode, path: Path) -> str:
    """Copy the outputs of the notebook at `path` into `nb` when their code cells are the same, so that
    editing the prose needs no re-execution. Returns what happened, for the log."""
    if not path.exists():
        return "no outputs (run with --execute)"
    old = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    new = [c for c in nb.cells if c.cell_type == "code"]
    if not any(c.outputs for c in old):
        return "no outputs yet (run with --execute)"
    if [c.source for c in old] != [c.source for c in new]:
        return "code changed: outputs dropped, run with --execute"
    for cell, before in zip(new, old):
        cell.outputs, cell.execution_count = before.outputs, before.execution_count
    executed_with = nbformat.read(path, as_version=4).metadata.get("invdiff_min", {})
    nb.metadata["invdiff_min"] = executed_with
    return "outputs kept" + ("" if executed_with.get("library_sha256") == library_sha256() else
                             ", but executed with another library: run with --execute")


def execute(nb: nbformat.NotebookNode) -> float:
    from nbclient import NotebookClient

    t0 = time.time()
    library = library_sha256()
    NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(HERE)}}).execute()
    if library_sha256() != library:
        raise SystemExit("error: the library changed while the notebook was executing; execute it again")
    nb.metadata["invdiff_min"] = {"library_sha256": library, "executed_in_s": round(time.time() - t0)}
    return time.time() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--execute", action="store_true", help="execute the notebooks (normal mode) and keep outputs")
    p.add_argument("only", nargs="*", help="substrings of the notebook names to build (default: all)")
    args = p.parse_args(argv)
    if args.execute and os.environ.get("INVDIFF_FAST") == "1":
        raise SystemExit("error: unset INVDIFF_FAST: the committed outputs come from the normal mode")
    os.chdir(HERE.parent)                            # library_sha256 hashes invdiff_min/ relative to the checkout
    for source in sorted(HERE.glob("[0-9][0-9]_*.py")):
        name = source.with_suffix(".ipynb").name
        if args.only and not any(s in name for s in args.only):
            continue
        nb = build(source)
        path = HERE / name
        if args.execute:
            msg = f", executed in {execute(nb):.0f} s"
        else:
            msg = f", {keep_outputs(nb, path)}"
        nbformat.validate(nb)
        nbformat.write(nb, path)
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB{msg})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
