"""Several processes, one model: the few `torch.distributed` helpers train.py needs for data-parallel training.

torchrun starts one process per GPU and tells each its place through environment variables: WORLD_SIZE
(processes in all), RANK (this one, 0 .. WORLD_SIZE - 1), LOCAL_RANK (its GPU on this machine) and
MASTER_ADDR / MASTER_PORT (where they meet). Every process holds the whole model, takes its slice of each
global batch, and DistributedDataParallel averages the gradients, so every process applies the same step.

Without torchrun (plain `python train.py`) nothing here does anything: world size 1, rank 0, every collective
a no-op, so a single process runs exactly as it always did.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def launched() -> bool:
    """True under torchrun with more than one process (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device, timeout_minutes: int = 60) -> torch.device:
    """Join the process group when launched by torchrun; returns this process's device.

    CUDA: cuda:LOCAL_RANK and the NCCL backend; CPU: the gloo backend. `timeout_minutes` bounds how long
    a process waits for the others (rank 0 alone writes samples between two collectives)."""
    if not launched() or dist.is_initialized():
        return device
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"torchrun started local rank {local_rank} but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s): use --nproc_per_node "
                             f"{torch.cuda.device_count()} (one process per GPU), or --device cpu for gloo on CPU")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_minutes))
    return device


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one process that prints, draws progress bars and writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process gets here (e.g. until rank 0 has written a file the others read)."""
    if dist.is_initialized():
        dist.barrier()


def my_slice(n: int) -> slice:
    """This rank's contiguous share of a global batch of `n`: rank r of W takes [r n / W, (r + 1) n / W)."""
    w, r = world_size(), rank()
    if n % w:
        raise ValueError(f"a batch of {n} does not split evenly over {w} processes; use a batch size divisible by "
                         f"the number of processes (nproc_per_node x nnodes), or another process count")
    return slice(r * n // w, (r + 1) * n // w)


def data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel(module) under torchrun (gradients averaged over the processes in backward);
    the module itself otherwise."""
    if not dist.is_initialized():
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def _on_backend_device(x: torch.Tensor) -> torch.Tensor:
    """NCCL moves CUDA tensors only; gloo takes CPU tensors."""
    if dist.get_backend() == "nccl":
        return x.to(torch.device("cuda", torch.cuda.current_device()))
    return x.cpu()


def all_gather(x: torch.Tensor) -> list[torch.Tensor]:
    """[x of rank 0, x of rank 1, ...] on every rank (same shapes on all ranks), on x's device; no autograd."""
    if not dist.is_initialized():
        return [x]
    src = _on_backend_device(x.contiguous())
    out = [torch.empty_like(src) for _ in range(world_size())]
    dist.all_gather(out, src)
    return [o.to(x.device) for o in out]


class _GatherCat(torch.autograd.Function):
    """y = cat(x of rank 0, x of rank 1, ...) along dim 0, differentiable. Every rank holds its own dL/dy;
    x_r enters L on every rank, so dL/dx_r = sum over ranks of their dL/dy[slice r]: an all-reduce (sum) of
    dL/dy, of which each rank keeps its own slice."""

    @staticmethod
    def forward(ctx, x):
        ctx.n = x.shape[0]
        return torch.cat(all_gather(x))

    @staticmethod
    def backward(ctx, grad):
        total = _on_backend_device(grad.contiguous().clone())
        dist.all_reduce(total)                                       # sum over ranks
        return total[rank() * ctx.n:(rank() + 1) * ctx.n].to(grad.device)


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """torch.cat of every rank's x (same shape on all) along dim 0, *with autograd*: the backward hands each
    rank the sum over ranks of the gradient that flows into its own slice. The identity in one process."""
    if not dist.is_initialized():
        return x
    return _GatherCat.apply(x)


def mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of a (detached) tensor over the ranks, e.g. the loss of the global batch for logging."""
    if not dist.is_initialized():
        return x
    y = _on_backend_device(x.detach().clone())
    dist.all_reduce(y)
    return (y / world_size()).to(x.device)


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] for small picklable objects (strings, numbers)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def print0(*args) -> None:
    """print, on rank 0 only (under torchrun every process runs the same code)."""
    if is_main():
        print(*args, flush=True)


def check_replicas(stage: str, *modules: torch.nn.Module) -> None:
    """Under torchrun every process must end a stage with the same weights (same averaged gradient, same
    optimizer step, same EMA update on each): compare their fingerprints, stop if one drifted."""
    if world_size() == 1:
        return
    from .checkpoint import fingerprint

    everyone = all_gather_object([fingerprint(m.state_dict()) for m in modules])
    if any(f != everyone[0] for f in everyone):
        raise RuntimeError(f"[{stage}] the processes hold different weights after training (fingerprints per rank "
                           f"{everyone}); a non-deterministic step or a rank that skipped a step diverged them")
    print0(f"[{stage}] the {len(everyone)} processes hold identical weights: fingerprints per rank {everyone}")


class RoundRobinCalls:
    """A model whose calls are shared out over the processes: rank r of W runs the network for its calls
    r, r + W, r + 2W, ... and returns zeros (no work) for the others, whose results another rank computes.
    `gather_round_robin` puts the pieces back together."""

    def __init__(self, model):
        self.model, self.null_label, self.calls = model, model.null_label, 0

    def __call__(self, x, t, y):
        mine = self.calls % world_size() == rank()
        self.calls += 1
        return self.model(x, t, y) if mine else torch.zeros_like(x)


def gather_round_robin(values: torch.Tensor, batch_size: int) -> torch.Tensor:
    """values (N, M): per-sample results of a loop over M draws, then over batches of `batch_size` samples, made
    through `RoundRobinCalls` (its call k = m * n_batches + b ran on rank k % W). Returns the (N, M) every rank
    would have computed alone, on every rank."""
    if world_size() == 1:
        return values
    n, num_draws = values.shape
    n_batches = (n + batch_size - 1) // batch_size
    call = torch.arange(num_draws)[None, :] * n_batches + (torch.arange(n) // batch_size)[:, None]   # (N, M)
    owner = call % world_size()
    return torch.stack(all_gather(values)).gather(0, owner[None])[0]          # (W, N, M) -> (N, M)
