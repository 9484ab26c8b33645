import runpy
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]            # the checkout (tests import ROOT from here)


def run_script(name: str, argv: list[str]) -> int:
    """Run train.py or sample.py in this process exactly as `python NAME ARGV...` would (runpy: the scripts are
    never imported). Returns 0 on success; a refused command raises its SystemExit('error: ...')."""
    saved = sys.argv
    sys.argv = [name, *map(str, argv)]
    try:
        runpy.run_path(str(ROOT / name), run_name="__main__")
    except SystemExit as e:
        if e.code in (0, None):
            return 0
        raise
    finally:
        sys.argv = saved
    return 0


def tiny_diffusers_unet():
    """A small diffusers UNet2DModel (two levels, attention at the second), seed 0: the stand-in pretrained model."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None)


def fails_with(script: str, argv, *messages) -> str:
    """`python script argv` must exit with one line, 'error: ...', naming every message; returns it."""
    with pytest.raises(SystemExit) as exit_:
        run_script(script, argv)
    text = exit_.value.code
    assert isinstance(text, str) and text.startswith("error: ") and "\n" not in text, text
    for m in messages:
        assert m in text, (m, text)
    return text


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
