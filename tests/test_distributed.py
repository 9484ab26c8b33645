"""Data-parallel training (torchrun, DistributedDataParallel, gloo on the CPU) against one process.

1. train.py under `torchrun --nproc_per_node 2` on the tiny preset: both ranks end every training stage with
   identical weights, equal to the checkpoint rank 0 alone wrote, and the sharded per-sample losses equal one
   process's bit for bit.
2. One optimiser step on 2 ranks, each with half of a fixed global batch (the same t, eps and label dropout
   as one process draws), equals one single-process step on the whole batch: for the base UNet (L_simple,
   gradients averaged by DDP) and for the guidance head (L_e over the global batch, per-sample losses
   gathered with autograd). The step is plain SGD without clipping, so the weights move by lr x gradient and
   any error in the gradient (a missing or doubled 1/W, a wrong slice, unpaired draws) shows in the weights;
   Adam's first step, lr * g / |g|, would hide a gradient's scale.
"""
import ast
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from invdiff_min import distributed, pipeline
from invdiff_min.checkpoint import fingerprint, list_checkpoints, load_tensors, load_unet
from invdiff_min.config import get_preset
from invdiff_min.data import make_dataset
from invdiff_min.guidance import InvariantGuidance
from invdiff_min.unet import UNet

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")

# Tolerance of "the same step": |w(2 ranks) - w(1 process)| <= STEP_RTOL * (largest weight change of the step)
# + 2 ulp of the largest weight. Two ranks sum their half-batch gradients in another order than one process
# sums the whole batch (and DDP averages the halves): float32 rounding of the gradients, ~1e-7 of the step;
# then w - lr g is rounded to float32, one ulp of w (1.2e-7 for a weight near 1) whatever the gradient.
# Measured: 1.2e-7 for both the base and the head. Any real error is far outside (a missing or doubled 1/W
# is half the step, a wrong slice or unpaired draw changes the step entirely).
STEP_RTOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def newest(stage_dir: Path) -> Path:
    return list_checkpoints(stage_dir)[-1]


# ----- 1. train.py under torchrun ---------------------------------------------------------------------------
def test_torchrun_two_ranks_hold_identical_weights_equal_to_rank0_checkpoint_and_one_process_losses(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                        "train.py", "--preset", "tiny", "--out", str(out), "--steps", "4", "--no-progress",
                        "--device", "cpu", "--set", "train.precision=fp32"],    # gloo on CPU, also on a 1-GPU machine
                       cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("[base] UNet with") == 1 and r.stdout.count("done in") == 1    # rank 0 alone prints

    # every rank's fingerprints of (weights, EMA) at the end of each stage, as distributed.check_replicas prints them
    found = dict(re.findall(r"\[(\w+)\] the 2 processes hold identical weights: fingerprints per rank (\[.*\])",
                            r.stdout))
    assert set(found) == {"base", "invdiff"}, r.stdout[-3000:]
    base_ckpt, head_ckpt = newest(out / "base"), newest(out / "invdiff")
    on_disk = {"base": [fingerprint(load_tensors(base_ckpt / f"{n}.safetensors")) for n in ("model", "ema")],
               "invdiff": [fingerprint(load_tensors(head_ckpt / f"{n}.safetensors")) for n in ("head", "head_ema")]}
    for stage, text in found.items():
        rank0, rank1 = ast.literal_eval(text)
        assert rank0 == rank1 == on_disk[stage], stage
    assert base_ckpt.name == "ckpt-0000004" and (out / "summary.json").is_file()   # eval ran, on rank 0

    cfg = get_preset("tiny")
    cfg.train.steps, cfg.train.precision = 4, "fp32"    # fp32 in both runs: the exact path
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                  # as in the workers, so the CPU kernels sum in the same order
    data = make_dataset(cfg.data)
    try:
        _, single_base = pipeline.train_base(cfg, data, CPU, tmp_path / "single" / "base", progress=False)
        base = load_unet(base_ckpt)[0]                    # the two-rank run's base, as its later stages saw it
        single_losses = pipeline.compute_losses(cfg, data, base, CPU, progress=False)
        single_groups = pipeline.infer_groups(cfg, data, single_losses)
        _, single_head = pipeline.train_head(cfg, data, base, single_groups.assignments, CPU,
                                             tmp_path / "single" / "invdiff", progress=False)
    finally:
        torch.set_num_threads(threads)
    # the loss of each global batch (history: the mean over both ranks' halves) is one process's, to float32
    # rounding (the same draws, sliced; the weights agree to rounding after each step; measured: ~1e-7 relative)
    two, one = (load_tensors(c / "history.safetensors")["loss"] for c in (base_ckpt, single_base))
    assert torch.allclose(two, one, rtol=1e-5, atol=0), (two, one)
    # the per-sample losses, computed batch by batch on both ranks and gathered, equal one process's exactly
    a = load_tensors(out / "losses.safetensors")
    assert torch.equal(a["index"], single_losses.index) and torch.equal(a["loss"], single_losses.loss)
    # so do the groups, and the head's L_e over each global batch (gathered from both ranks; 20 steps on the same
    # base and groups) is one process's to float32 rounding (measured: 1.2e-7 relative)
    assert torch.equal(load_tensors(out / "groups.safetensors")["weights"], single_groups.assignments)
    two, one = (load_tensors(c / "history.safetensors")["loss"] for c in (head_ckpt, single_head))
    assert len(two) == 20 and torch.allclose(two, one, rtol=1e-5, atol=0), (two, one)


# ----- 2. one step on 2 ranks == one step in one process -------------------------------------------------------
def sgd(params, lr, weight_decay=0.0, fused=False):
    """Stands in for AdamW (taking its arguments): the step is lr x gradient (see the module docstring)."""
    return torch.optim.SGD(params, lr=lr)


def one_step_config():
    cfg = get_preset("tiny")                  # global batch 16 (8 per rank), label dropout 0.1, 4 oracle groups
    cfg.train.steps, cfg.train.lr, cfg.train.grad_clip = 1, 0.5, 1e9
    cfg.head.steps, cfg.head.lr, cfg.head.grad_clip = 1, 0.5, 1e9
    cfg.train.precision = "fp32"              # the exact path: bf16 ("auto" on a CPU with native bf16) rounds
    return cfg                                # a half batch differently from the whole one


def one_step(run_dir: Path, base_ckpt: Path | None) -> Path:
    """The pipeline's own stage functions for one step (base, or head on `base_ckpt`); AdamW replaced by SGD."""
    cfg, adamw = one_step_config(), torch.optim.AdamW
    data = make_dataset(cfg.data)
    torch.optim.AdamW = sgd
    try:
        if base_ckpt is None:
            return pipeline.train_base(cfg, data, CPU, run_dir / "base", progress=False)[1]
        weights = pipeline.group_assignments("oracle", data)         # (N, 4): the hidden (class, attribute) cells
        return pipeline.train_head(cfg, data, load_unet(base_ckpt)[0], weights, CPU, run_dir / "oracle",
                                   progress=False)[1]
    finally:
        torch.optim.AdamW = adamw


def _two_rank_worker(rank: int, world: int, port: int, run_dir: Path, base_ckpt: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    ok = False
    try:
        one_step(run_dir, None)               # the base UNet: DDP, each rank on its half of the batch
        one_step(run_dir, base_ckpt)          # the head, on the single-process base (same fingerprint)
        ok = True
    finally:
        if ok:                                # leave together (CI once saw rank 1 abort when it left first);
            torch.distributed.barrier()       # not after an error: the other rank may never get here
        distributed.cleanup()


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def assert_same_step(two: dict, one: dict, init: dict) -> None:
    step = max_abs_diff(one, init)
    assert step > 1e-3                        # the step moved the weights
    ulp = torch.finfo(torch.float32).eps * max(float(w.abs().max()) for w in one.values())
    assert max_abs_diff(two, one) <= STEP_RTOL * step + 2 * ulp, (max_abs_diff(two, one), step, ulp)


def test_one_step_on_two_ranks_with_half_batches_equals_one_step_on_the_whole_batch(tmp_path):
    single_base = one_step(tmp_path / "single", None)
    single_head = one_step(tmp_path / "single", single_base)
    mp.spawn(_two_rank_worker, args=(2, free_port(), tmp_path / "ddp", single_base), nprocs=2, join=True)

    cfg = one_step_config()
    torch.manual_seed(cfg.train.seed)         # train_base's initial weights
    init = UNet(cfg.unet).state_dict()
    one = load_tensors(single_base / "model.safetensors")
    two = load_tensors(newest(tmp_path / "ddp" / "base") / "model.safetensors")
    assert_same_step(two, one, init)

    base = UNet(cfg.unet)
    torch.manual_seed(cfg.head.seed)          # train_head's initial head
    init = InvariantGuidance.small(base.config, cfg.head.block_out_channels, cfg.head.layers_per_block,
                                   cfg.head.attention_levels, cfg.head.norm_num_groups).state_dict()
    one = load_tensors(single_head / "head.safetensors")
    two = load_tensors(newest(tmp_path / "ddp" / "oracle") / "head.safetensors")
    assert_same_step(two, one, init)


def test_more_cuda_processes_than_gpus_is_a_clear_error(monkeypatch):
    """torchrun --nproc_per_node 2 on a 1-GPU machine: name the mismatch and the fix, not 'invalid device ordinal'
    from inside CUDA (seen on an H200 machine)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"local rank 1 .* 1 CUDA device\(s\): use --nproc_per_node 1 .* --device cpu"):
        distributed.init(torch.device("cuda"))
