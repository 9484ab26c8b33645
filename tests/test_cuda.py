"""CUDA checks: skipped without a GPU (CI has none); `benchmarks/gpu_check.sh` runs them on a GPU machine."""
import pytest
import torch

from conftest import run_script
from invdiff_min.amp import autocast, grad_scaler, optimizer_step
from invdiff_min.config import get_preset
from invdiff_min.unet import UNet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_unet_under_bf16_autocast_matches_float32_on_the_cpu():
    cfg = get_preset("cpu").unet
    torch.manual_seed(0)
    model = UNet(cfg).eval()
    x, t, y = torch.randn(8, 3, 16, 16), torch.randint(0, 1000, (8,)), torch.randint(0, 2, (8,))
    with torch.no_grad():
        ref = model(x, t, y)
        gpu = model.cuda()
        with autocast(torch.device("cuda"), "bf16"):
            out = gpu(x.cuda(), t.cuda(), y.cuda()).float().cpu()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()        # bf16 keeps ~3 significant digits


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_one_training_step_in_each_precision_is_finite_and_moves_the_weights(precision):
    device = torch.device("cuda")
    model = UNet(get_preset("tiny").unet).to(device)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    x, t, y = torch.randn(4, 3, 16, 16, device=device), torch.randint(0, 1000, (4,), device=device), \
        torch.randint(0, 2, (4,), device=device)
    with autocast(device, precision):
        loss = (model(x, t, y).float() - x).pow(2).mean()
    optimizer_step(loss, opt, model.parameters(), 1.0, grad_scaler(device, precision))
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_whole_tiny_pipeline_on_cuda_with_label_dropout(tmp_path):
    argv = ["--preset", "tiny", "--device", "cuda", "--out", str(tmp_path / "run"), "--no-progress",
            "--channels-last"]
    assert run_script("train.py", argv) == 0
    assert (tmp_path / "run" / "summary.json").is_file()
