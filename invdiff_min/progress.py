"""Progress that suits where it goes: a live tqdm bar on a terminal, a line at every tenth of the work when the
output is a file or a pipe (`python train.py > run.log`), or nothing."""
from __future__ import annotations

import sys
import time


class PlainProgress:
    """What a progress bar prints when its output is a file or a pipe (`train.py > run.log`): a line at every
    tenth of the work instead of thousands of carriage-return updates. Iterates like tqdm(range(start, total))."""

    def __init__(self, desc: str, start: int, total: int):
        self.desc, self.start, self.total, self.postfix = desc, start, total, ""
        self.every, self.t0 = max(1, total // 10), time.time()

    def __iter__(self):
        for step in range(self.start, self.total):
            yield step
            if (step + 1) % self.every == 0 or step + 1 == self.total:
                print(f"{self.desc}: {step + 1}/{self.total} ({time.time() - self.t0:.0f} s){self.postfix}",
                      flush=True)

    def set_postfix(self, **values) -> None:
        self.postfix = "".join(f", {k} {v}" for k, v in values.items())


def progress_bar(desc: str, start: int, total: int, show: bool):
    """A live tqdm bar on a terminal, `PlainProgress` lines otherwise, or silence (show=False)."""
    if show and sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(range(start, total), desc=desc, initial=start, total=total)
    return PlainProgress(desc, start, total) if show else _Silent(range(start, total))


class _Silent(list):
    """The steps, with nothing printed."""

    def set_postfix(self, **values) -> None:
        pass
