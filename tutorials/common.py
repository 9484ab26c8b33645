"""What the tutorial notebooks share: the checkout's library on the path, fast mode, plot settings, and the small
run that tutorials 2-6 train once and share.

    from common import FAST, TutorialRun, show_rows
    run = TutorialRun.start()          # its config, run folder, data (built once) and device
    show_rows(rows, names, height)     # image rows, 8 per row, one name each (the grids of 02, 05, 06)

The run lives in the temp folder under a key made of its config and the library's source, so a changed library
never reuses a stale model. INVDIFF_FAST=1 (the tests' fast mode) shrinks data, models and step counts; the
pictures are then not meant to look like anything.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))                   # the checkout's invdiff_min, whether installed or not

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from invdiff_min import pipeline  # noqa: E402
from invdiff_min.config import RunConfig, get_preset, pick_device  # noqa: E402
from invdiff_min.data import DataSplits, load_splits  # noqa: E402
from invdiff_min.plots import image_grid  # noqa: E402
from invdiff_min.unet import UNet, UNetConfig  # noqa: E402

FAST = os.environ.get("INVDIFF_FAST") == "1"
plt.rcParams.update({"figure.dpi": 70, "font.size": 9})   # small PNGs keep the notebooks small


def tutorial_config() -> RunConfig:
    """A smaller, shorter cousin of the `cpu` preset (minutes on one CPU core); `tiny` in fast mode."""
    if FAST:
        cfg = get_preset("tiny")
        cfg.losses.t_window = (400, 700)            # skip the label-free search for the t window (tutorial 4)
        return cfg
    cfg = get_preset("cpu")
    cfg.data.num_samples = 2000                     # 1,900 bias-aligned, 100 bias-conflicting images
    cfg.unet = UNetConfig(sample_size=16, block_out_channels=(16, 32, 32), attention_levels=(False, False, False),
                          mid_attention=False, layers_per_block=1, norm_num_groups=8, num_classes=2)
    cfg.train.steps, cfg.train.batch_size, cfg.train.checkpoint_every = 2000, 32, 500
    cfg.train.warmup_steps, cfg.train.ema_decay = 50, 0.99
    cfg.losses.num_draws, cfg.losses.auto_window_draws, cfg.losses.auto_window_samples = 8, 2, 200
    # the head: the library's default (HeadConfig: its size, 4,500 steps at a constant 1e-3), so that tutorial 5
    # shows what the default head does
    cfg.train.precision = "fp32"                    # the exact path on every CPU: the printed numbers come from it
    # sampling: DDIM-20 at w = 2 keeps the notebooks short; the library's default (EvalConfig) is DDPM-100 at
    # w = 1.5: DDPM-100 carries the head's push further than DDIM (docs/results/shapes/sampler_rule.md)
    cfg.eval.n_per_class, cfg.eval.sampler, cfg.eval.num_steps, cfg.eval.strength = 100, "ddim", 20, 2.0
    return cfg


def run_folder(cfg: RunConfig) -> Path:
    """Where the tutorials keep their run: the temp folder, keyed by the config and the library's code."""
    key = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    for source in sorted((ROOT / "invdiff_min").rglob("*.py")):
        key.update(source.read_bytes())
    return Path(tempfile.gettempdir()) / "invdiff-tutorials" / key.hexdigest()[:12]


@dataclass
class TutorialRun:
    """The run shared by tutorials 2-6."""
    cfg: RunConfig
    run_dir: Path
    splits: DataSplits                              # splits.train (biased), splits.eval (balanced)
    device: torch.device

    @classmethod
    def start(cls) -> "TutorialRun":
        cfg = tutorial_config()
        run = cls(cfg, run_folder(cfg), load_splits(cfg.data), pick_device("auto"))
        print(f"run folder {run.run_dir} (shared by tutorials 2-6), device {run.device}")
        return run

    def base_model(self) -> tuple[UNet, Path]:
        """Tutorial 2's base model (stage A): trained into the run folder once, read from it afterwards.
        Returns (the EMA model, its checkpoint folder)."""
        return pipeline.train_base(self.cfg, self.splits.train, self.device, self.run_dir / "base", progress=False)


def show_rows(rows: list[torch.Tensor], names: list[str], height: float) -> None:
    """Rows of 8 images in [0, 1] ((8, C, H, W) each) as one grid, each row labelled by its name."""
    grid = image_grid(torch.cat(rows), nrow=8)
    fig, ax = plt.subplots(figsize=(6, height))
    ax.imshow(grid.numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([(i + 0.5) * grid.shape[0] / len(names) for i in range(len(names))], names)
    plt.show()
