"""Train InvDiff end to end on the built-in biased dataset or a real one (or any stage of it).

    A. base     a class-conditional DDPM eps_theta on the biased data (L_simple)         -> run/base/
    B. losses   per-sample denoising losses of the frozen base                          -> run/losses.safetensors
       groups   bias-annotation inference: soft groups W from those losses              -> run/groups.safetensors
    C. head     the invariant guidance head G_psi, trained with L_e over the groups     -> run/invdiff/
    D. eval     sample base and guided model, measure Bias and fidelity                 -> run/summary.json

    python train.py                              # default preset (cpu): the whole pipeline
    python train.py --preset tiny --out runs/tiny
    python train.py --stage base                 # one stage; later stages read the earlier outputs
    python train.py --resume                     # continue an interrupted run; finished stages are skipped
    python train.py --compare                    # also the oracle-group and uniform-weight reference heads
    python train.py --dataset cmnist             # Colored-MNIST-5k (pip install -e ".[cmnist]")
    python train.py --dataset waterbirds --data-root /data/waterbirds --resolution 32 --preset gpu
    torchrun --standalone --nproc_per_node 4 train.py --preset gpu    # data-parallel on 4 GPUs

Under torchrun (several processes) every process takes its slice of each global batch (the same batch one
process would draw), DistributedDataParallel averages the gradients, and rank 0 alone prints and writes files.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from invdiff_min import __version__
from invdiff_min import amp
from invdiff_min import distributed as dist
from invdiff_min.checkpoint import (CheckpointError, fingerprint, list_checkpoints, load_state_into, load_tensors,
                                    load_unet, optimizer_from_tensors, optimizer_to_tensors, read_json,
                                    resolve_checkpoint, save_checkpoint, save_tensors, write_json)
from invdiff_min.config import DiffusionConfig, RunConfig, get_preset, pick_device
from invdiff_min.data import from_model_range, make_dataset, to_model_range
from invdiff_min.diffusion import (drop_labels, lr_at, make_sampler, per_sample_mse, sample, training_loss,
                                   update_ema)
from invdiff_min.evaluate import generate, make_judge
from invdiff_min.groups import (auto_t_window, check_group_index, class_topk_groups, group_report, loss_draws,
                                normalize_by_t, official_groups, oracle_groups, per_sample_losses, uniform_groups)
from invdiff_min.guidance import (GroupBatchSampler, GuidedModel, InvariantGuidance, head_size, invariant_loss,
                                  load_head)
from invdiff_min.metrics import auroc, bias_score, minority_share
from invdiff_min.plots import save_grid, save_loss_curve, save_loss_histogram
from invdiff_min.scheduler import DDPMScheduler
from invdiff_min.unet import UNet, UNetConfig, count_parameters

STAGES = ("base", "losses", "groups", "head", "eval")


class TrainingDiverged(RuntimeError):
    pass


def step_generator(seed: int, step: int) -> torch.Generator:
    """The randomness of one training step depends only on (seed, step), so a resumed run repeats exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def say(*args) -> None:
    """print, on rank 0 only (under torchrun every process runs this script)."""
    if dist.is_main():
        print(*args)


def check_replicas(stage: str, *modules: torch.nn.Module) -> None:
    """Under torchrun every process must end a stage with the same weights (same averaged gradient, same
    optimizer step, same EMA update on each): compare their fingerprints, stop if one drifted."""
    if dist.world_size() == 1:
        return
    everyone = dist.all_gather_object([fingerprint(m.state_dict()) for m in modules])
    if any(f != everyone[0] for f in everyone):
        raise RuntimeError(f"[{stage}] the processes hold different weights after training (fingerprints per rank "
                           f"{everyone}); a non-deterministic step or a rank that skipped a step diverged them")
    say(f"[{stage}] the {len(everyone)} processes hold identical weights: fingerprints per rank {everyone}")


def base_loss(model, scheduler: DDPMScheduler, x0: torch.Tensor, y: torch.Tensor, g: torch.Generator,
              p_uncond: float, null_label: int) -> torch.Tensor:
    """L_simple of this process's slice of the global batch (x0, y) (diffusion.training_loss).

    One process: training_loss itself. Under torchrun: the draws (t, eps, label dropout) are made for the whole
    global batch from `g`, in training_loss's order, and sliced with the batch, so W processes see exactly the
    numbers one process sees; the mean over equal slices, averaged by DDP, is the mean over the global batch."""
    if dist.world_size() == 1:
        return training_loss(model, scheduler, x0, y, generator=g, p_uncond=p_uncond, null_label=null_label)
    b, s = x0.shape[0], dist.my_slice(x0.shape[0])
    t = torch.randint(0, scheduler.num_train_timesteps, (b,), generator=g)[s].to(x0.device)
    noise = torch.randn(x0.shape, generator=g)[s].to(x0.device)
    y = drop_labels(y.cpu(), p_uncond, null_label, generator=g)[s].to(x0.device)
    x0 = x0[s]
    x_t = scheduler.add_noise(x0, noise, t)
    return per_sample_mse(model(x_t, t, y), scheduler.training_target(x0, noise)).mean()


# ----- stage A: the biased base model ---------------------------------------------------------------------
def train_base(cfg: RunConfig, run_dir: Path, device: torch.device, progress: bool = True,
               fault_hook=None) -> Path:
    """Train eps_theta with L_simple and label dropout; EMA weights; checkpoints every `checkpoint_every`."""
    tc, stage_dir = cfg.train, run_dir / "base"
    data = make_dataset(cfg.data, "train")
    torch.manual_seed(tc.seed)                                       # the initial weights
    model = UNet(cfg.unet).to(device)
    if tc.init_from:
        init_from_converted(model, tc.init_from)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = DDPMScheduler(**cfg.diffusion.scheduler_kwargs()).to(device)
    history = torch.zeros(tc.steps)
    start = 0
    if ckpts := list_checkpoints(stage_dir):  # resume from the newest complete checkpoint
        state = read_json(ckpts[-1] / "state.json")
        load_state_into(model, load_tensors(ckpts[-1] / "model.safetensors"), f"{ckpts[-1]}/model.safetensors")
        load_state_into(ema, load_tensors(ckpts[-1] / "ema.safetensors"), f"{ckpts[-1]}/ema.safetensors")
        optimizer_from_tensors(opt, load_tensors(ckpts[-1] / "optimizer.safetensors"), state["optimizer"])
        start = state["step"]
        history[:start] = load_tensors(ckpts[-1] / "history.safetensors")["loss"][:start]
        if start >= tc.steps:
            return ckpts[-1]
        say(f"[base] resuming at step {start} from {ckpts[-1]}")
    scaler = amp.grad_scaler(device, tc.precision)
    # under torchrun: DDP, which averages the gradients over processes; channels_last / compile on request
    net = amp.prepare(dist.data_parallel(model, device), tc.channels_last, tc.compile)
    say(f"[base] UNet with {count_parameters(model):,} parameters, {len(data)} images, device {device}"
        + (f", {dist.world_size()} processes" if dist.world_size() > 1 else ""))
    bar = tqdm(range(start, tc.steps), desc="A. base model", disable=not progress or not dist.is_main(),
               initial=start, total=tc.steps)
    for step in bar:
        g = step_generator(tc.seed, step)
        # dropout masks: one stream per process (under torchrun), the same as ever in one process
        torch.manual_seed((tc.seed * 1_000_003 + step) * dist.world_size() + dist.rank())
        idx = torch.randint(0, len(data), (tc.batch_size,), generator=g)   # the global batch, same on every rank
        x0 = to_model_range(data.images[idx]).to(device)              # (B, 3, H, W) in [-1, 1]
        y = data.labels[idx].to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc.lr, tc.warmup_steps, tc.steps)
        if tc.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        with amp.autocast(device, tc.precision):
            loss = base_loss(net, scheduler, x0, y, g, tc.p_uncond, model.null_label)   # this rank's slice
        loss_all = dist.mean(loss.detach())                           # the global batch's loss, on every rank
        if not torch.isfinite(loss_all):
            raise TrainingDiverged(f"non-finite loss {loss_all.item()} at base step {step}; the last good checkpoint "
                                   f"is kept in {stage_dir}. Resume it with a lower rate: --resume --lr "
                                   f"{tc.lr / 2:g} (now {tc.lr})")
        amp.optimizer_step(loss, opt, model.parameters(), tc.grad_clip, scaler)
        update_ema(ema, model, tc.ema_decay)                          # identical weights -> identical EMA
        history[step] = loss_all.item()
        bar.set_postfix(loss=f"{history[max(0, step - 49):step + 1].mean():.4f}")
        if (step + 1) % tc.checkpoint_every == 0 or step + 1 == tc.steps:
            if dist.is_main():
                opt_tensors, opt_meta = optimizer_to_tensors(opt)
                save_checkpoint(stage_dir, step + 1,
                                {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt_tensors,
                                 "history": {"loss": history}},
                                {"config": cfg.to_dict(), "optimizer": opt_meta}, fault_hook=fault_hook)
            dist.barrier()                                            # the others wait until it is on disk
    check_replicas("base", model, ema)
    final = list_checkpoints(stage_dir)[-1]
    if not dist.is_main():
        return final
    save_loss_curve(stage_dir / "loss.png", history, f"base model L_simple ({cfg.preset} preset)")
    k = data.num_classes
    grid = sample(ema.eval(), make_sampler("ddim", cfg.diffusion.scheduler_kwargs()).to(device),
                  (8 * k, cfg.unet.in_channels, cfg.data.resolution, cfg.data.resolution),
                  torch.arange(k).repeat_interleave(8), num_steps=25, generator=torch.Generator().manual_seed(0),
                  device=device)
    save_grid(stage_dir / "samples.png", from_model_range(grid), nrow=8, row_labels=list(data.class_names),
              title="base model samples (DDIM 25), one class per row")
    return final


def init_from_converted(model: UNet, path: str) -> None:
    """Copy converted (usually unconditional) pretrained weights into `model`; a class embedding the source
    lacks starts at zero, so the conditional model begins exactly as the pretrained unconditional one."""
    pretrained, _, ckpt = load_unet(path, "cpu", weights="model")
    weights = pretrained.state_dict()
    if model.class_embedding is not None and "class_embedding.weight" not in weights:
        weights["class_embedding.weight"] = torch.zeros_like(model.class_embedding.weight)
    load_state_into(model, weights, f"{ckpt}/model.safetensors (--init-from)")
    say(f"[base] initialised from {ckpt}")


def apply_init_from(cfg: RunConfig, path: str) -> None:
    """Take the architecture and noise schedule of a converted checkpoint; the built-in data at its resolution."""
    _, state, _ = load_unet(path, "cpu", weights="model")
    conv = state["config"]
    cfg.unet = UNetConfig.from_dict(conv["unet"], num_classes=cfg.unet.num_classes)
    cfg.diffusion = DiffusionConfig(**conv["diffusion"])
    cfg.data.resolution = cfg.unet.sample_size
    cfg.train.init_from = str(path)


# ----- stage B: per-sample losses and group inference ---------------------------------------------------------
class EveryNthBatch:
    """The frozen base as groups.loss_draws sees it on rank r of W: the network for the batches r, r + W,
    r + 2W, ... of its loop, zeros (no work) for the others, whose losses another rank computes."""

    def __init__(self, model):
        self.model, self.null_label, self.calls = model, model.null_label, 0

    def __call__(self, x, t, y):
        mine = self.calls % dist.world_size() == dist.rank()
        self.calls += 1
        return self.model(x, t, y) if mine else torch.zeros_like(x)


def sharded_per_sample_losses(model, scheduler, images, labels, num_draws: int, t_window: tuple[int, int],
                              normalize_per_t: bool = True, target: str = "eps", batch_size: int = 500,
                              seed: int = 0, device="cpu", progress: bool = False,
                              reference: str = "none") -> torch.Tensor:
    """groups.per_sample_losses with its batches shared out over the processes (torchrun) and gathered on
    all: every rank makes every (t, eps) draw (cheap, CPU) so each batch sees exactly the draws it sees in
    one process, runs the network on its own batches only, and the results equal one process's."""
    if dist.world_size() == 1:
        return per_sample_losses(model, scheduler, images, labels, num_draws, t_window, normalize_per_t, target,
                                 batch_size, seed, device, progress, reference)
    losses, ts = loss_draws(EveryNthBatch(model), scheduler, images, labels, num_draws, t_window, target,
                            batch_size, seed, device, progress and dist.is_main(), reference)   # (N, M) each
    # loss_draws loops over draws m, then batches b: its call k = m * n_batches + b is done by rank k % W
    n = len(images)
    n_batches = (n + batch_size - 1) // batch_size
    call = torch.arange(num_draws)[None, :] * n_batches + (torch.arange(n) // batch_size)[:, None]   # (N, M)
    owner = call % dist.world_size()
    losses = torch.stack(dist.all_gather(losses)).gather(0, owner[None])[0]   # (W, N, M) -> (N, M)
    if normalize_per_t:
        losses = normalize_by_t(losses, ts)
    return losses.mean(1)


def compute_losses(cfg: RunConfig, run_dir: Path, base_ckpt: Path, device: torch.device, progress: bool = True,
                   compare: bool = False) -> Path:
    """l_i for every training sample under the frozen base (groups.py), keyed by sample index."""
    out = run_dir / "losses.safetensors"
    if out.exists():
        return out
    lc = cfg.losses
    base, _, _ = load_unet(base_ckpt, device)
    data = make_dataset(cfg.data, "train")
    scheduler = DDPMScheduler(**cfg.diffusion.scheduler_kwargs()).to(device)
    info: dict = {"base_checkpoint": str(base_ckpt), "num_draws": lc.num_draws, "reference": lc.reference,
                  "normalize_per_t": lc.normalize_per_t, "target": lc.target}
    window = tuple(lc.t_window) if lc.t_window else None
    if window is None:  # label-free choice of the t window
        # a subset, done whole by every rank (same result on each, no gather needed)
        window, scores = auto_t_window(base, scheduler, data.images, data.labels, num_draws=lc.auto_window_draws,
                                       max_samples=lc.auto_window_samples, batch_size=lc.batch_size,
                                       seed=lc.seed + 10_000, device=device, progress=progress and dist.is_main())
        info["t_window_label_effect"] = {f"{lo}-{hi}": round(v, 4) for (lo, hi), v in scores.items()}
        say(f"[losses] t window chosen without bias labels: [{window[0]}, {window[1]}) "
            f"(label effect E|log l(y)/l(null)| = {scores[window]:.3f})")
    info["t_window"] = list(window)
    losses = sharded_per_sample_losses(base, scheduler, data.images, data.labels, lc.num_draws, window,
                                       lc.normalize_per_t, lc.target, lc.batch_size, lc.seed, device, progress,
                                       lc.reference)
    # evaluation only (hidden labels): how well the loss ranks the bias-conflicting samples
    info["auc"] = auroc(losses, data.conflicting)
    classes = range(data.num_classes)
    info["auc_per_class"] = [auroc(losses[data.labels == c], data.conflicting[data.labels == c]) for c in classes]
    if compare and lc.reference != "none":  # the paper's plain loss, same window and draws
        plain = sharded_per_sample_losses(base, scheduler, data.images, data.labels, lc.num_draws, window, True,
                                          lc.target, lc.batch_size, lc.seed, device)
        info["plain_loss_auc"] = auroc(plain, data.conflicting)
        info["plain_loss_auc_per_class"] = [auroc(plain[data.labels == c], data.conflicting[data.labels == c])
                                            for c in classes]
    if compare:  # the official recipe: one draw, t ~ U{0..T-1}, raw loss against x0
        everything = (0, scheduler.num_train_timesteps)
        official = sharded_per_sample_losses(base, scheduler, data.images, data.labels, 1, everything, False, "x0",
                                             lc.batch_size, lc.seed, device)
        eps_one = sharded_per_sample_losses(base, scheduler, data.images, data.labels, 1, everything, False, "eps",
                                            lc.batch_size, lc.seed, device)
        info["official_auc"] = auroc(official, data.conflicting)
        info["official_eps_target_auc"] = auroc(eps_one, data.conflicting)
        if dist.is_main():
            save_tensors(run_dir / "losses_official.safetensors", {"loss": official, "index": data.index})
    if dist.is_main():
        save_tensors(out, {"loss": losses, "index": data.index}, {"t_window": list(window)})
        write_json(run_dir / "losses.json", info)
        print(f"[losses] {out}: AUC for the hidden minority {info['auc']:.3f} (evaluation only)")
    dist.barrier()
    return out


def infer_groups(cfg: RunConfig, run_dir: Path) -> Path:
    """Soft assignment W (groups.py) from the per-sample losses; a diagnostic JSON and histogram beside it.
    Cheap: under torchrun rank 0 does it and the others wait for the file."""
    out = run_dir / "groups.safetensors"
    if dist.is_main() and not out.exists():
        _infer_groups(cfg, run_dir, out)
    dist.barrier()
    return out


def _infer_groups(cfg: RunConfig, run_dir: Path, out: Path) -> None:
    gc = cfg.groups
    data = make_dataset(cfg.data, "train")
    saved = load_tensors(run_dir / "losses.safetensors")
    check_group_index(saved["index"], data.index, run_dir / "losses.safetensors")
    losses = saved["loss"]
    if gc.method == "class_topk":
        weights = class_topk_groups(losses, data.labels, data.num_classes, gc.top_fraction)
    elif gc.method == "official":
        weights = official_groups(losses, gc.num_groups, gc.steps, gc.lr, gc.w_nz, gc.restarts, gc.seed,
                                  data.labels if gc.within_class else None, gc.hard)
    else:
        raise ValueError(f"unknown group method {gc.method!r}; use 'class_topk' or 'official'")
    save_tensors(out, {"weights": weights, "index": data.index}, {"method": gc.method})
    report = group_report(weights, losses, data.labels, data.conflicting, data.group)
    write_json(run_dir / "groups.json", {"method": gc.method, **report.to_dict()})
    save_loss_histogram(run_dir / "groups_hist.png", losses, data.group,
                        [f"{data.class_names[c]} / {data.attribute_names[b]}" for c in range(data.num_classes)
                         for b in range(data.num_attributes)],
                        title="per-sample loss of the base model, by hidden (class, attribute)")
    print(f"[groups] {out}: sizes {[round(s) for s in report.sizes]}, minority share per group "
          f"{[round(m, 2) for m in report.minority_share]}, NMI {report.nmi:.3f} (evaluation only)")


# ----- stage C: the invariant guidance head --------------------------------------------------------------------
def train_head(cfg: RunConfig, run_dir: Path, name: str, weights: torch.Tensor, base_ckpt: Path,
               device: torch.device, progress: bool = True, fault_hook=None) -> Path:
    """Train G_psi with L_e over the groups `weights` (N, G); the base stays frozen and is not saved again."""
    hc, stage_dir = cfg.head, run_dir / name
    data = make_dataset(cfg.data, "train")
    base, _, _ = load_unet(base_ckpt, device)
    base_id = fingerprint(base.state_dict())
    torch.manual_seed(hc.seed)                                       # the head's initial weights
    head = (InvariantGuidance.copy_of(base) if hc.mode == "mix" else
            InvariantGuidance.small(base.config, hc.block_out_channels, hc.layers_per_block, hc.attention_levels,
                                    hc.norm_num_groups)).to(device)
    head_ema = copy.deepcopy(head).requires_grad_(False)             # the weights that sample (EMA)
    opt = torch.optim.AdamW(head.parameters(), lr=hc.lr)
    scheduler = DDPMScheduler(**cfg.diffusion.scheduler_kwargs()).to(device)
    batches = GroupBatchSampler(weights, hc.batch_size, hc.batch_sampling)
    history = torch.zeros(hc.steps)
    start = 0
    if ckpts := list_checkpoints(stage_dir):
        state = read_json(ckpts[-1] / "state.json")
        if state.get("base_fingerprint") != base_id:
            raise CheckpointError(f"{ckpts[-1]} was trained on another base model; use --overwrite to retrain")
        load_state_into(head, load_tensors(ckpts[-1] / "head.safetensors"), f"{ckpts[-1]}/head.safetensors")
        ema_file = ckpts[-1] / "head_ema.safetensors"   # heads saved before the EMA existed: start it here
        ema_state = load_tensors(ema_file) if ema_file.exists() else head.state_dict()
        load_state_into(head_ema, ema_state, str(ema_file))
        optimizer_from_tensors(opt, load_tensors(ckpts[-1] / "optimizer.safetensors"), state["optimizer"])
        for group in opt.param_groups:                   # a resumed run may lower the lr (--head-lr)
            group["lr"] = hc.lr
        start = state["step"]
        history[:start] = load_tensors(ckpts[-1] / "history.safetensors")["loss"][:start]
        if start >= hc.steps:
            return ckpts[-1]
        say(f"[{name}] resuming at step {start}")
    # under torchrun: DDP around the head (the base is frozen), which averages the head's gradients
    tc = cfg.train                                                  # precision, layout and compile settings
    scaler = amp.grad_scaler(device, tc.precision)
    model = GuidedModel(base, amp.prepare(dist.data_parallel(head, device), tc.channels_last, tc.compile),
                        strength=1.0, mode=hc.mode, mix_ratio=hc.mix_ratio)
    size = head_size(head, base)
    say(f"[{name}] head G_psi with {size.head:,} parameters ({size.ratio:.0%} of the base), "
        f"{weights.shape[1]} groups, {hc.batch_sampling} batches, lambda {hc.lam}")
    bar = tqdm(range(start, hc.steps), desc=f"C. head ({name})", disable=not progress or not dist.is_main(),
               initial=start, total=hc.steps)
    for step in bar:
        g = step_generator(hc.seed + 7, step)
        idx, slots = batches.sample(g)                                # the global batch, same on every rank
        # paired draws: the j-th sample of every group gets the j-th (t, eps), so the spread of the group risks
        # R_g reflects the groups, not which t each happened to draw (the variance term is otherwise mostly noise)
        n_draws = int(slots.max()) + 1 if hc.paired_draws else len(idx)
        draw = slots if hc.paired_draws else torch.arange(len(idx))
        t = torch.randint(0, scheduler.num_train_timesteps, (n_draws,), generator=g)[draw]
        eps = torch.randn((n_draws, *data.images.shape[1:]), generator=g)[draw]
        s = dist.my_slice(len(idx)) if dist.world_size() > 1 else slice(None)   # this rank's samples
        x0 = to_model_range(data.images[idx[s]]).to(device)
        y, t, eps = data.labels[idx[s]].to(device), t[s].to(device), eps[s].to(device)
        w = weights[idx].to(device)                                   # (B, G): the whole global batch
        with amp.autocast(device, tc.precision):
            eps_hat = model(scheduler.add_noise(x0, eps, t), t, y)     # eps_theta + G_psi
        # L_e is not a mean over samples, so it does not split over processes: every rank computes it over the
        # global batch, from the per-sample losses l_i of all ranks (all_gather_cat, with autograd). Its gradient
        # is then exact: every rank backpropagates the same L_e, so the backward of the gather hands each rank
        # the sum over the W ranks of dL_e/dl_i, i.e. W dL_e/dl_i, for its own samples i; DDP's average over
        # ranks divides by W, which leaves sum_i dL_e/dl_i dl_i/dpsi, the one-process gradient.
        losses = dist.all_gather_cat(per_sample_mse(eps_hat, eps))  # (B,) in global batch order
        loss, _ = invariant_loss(losses, w, hc.lam)                   # L_e, the same on every rank
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"non-finite L_e {loss.item()} at head step {step} ({name}); the last good "
                                   f"checkpoint is kept in {stage_dir}. Resume it with a lower rate: --resume "
                                   f"--head-lr {hc.lr / 2:g} (now {hc.lr}; lambda is {hc.lam})")
        amp.optimizer_step(loss, opt, head.parameters(), hc.grad_clip, scaler)
        update_ema(head_ema, head, hc.ema_decay)
        history[step] = loss.item()
        bar.set_postfix(L_e=f"{history[max(0, step - 49):step + 1].mean():.4f}")
        if (step + 1) % hc.checkpoint_every == 0 or step + 1 == hc.steps:
            if dist.is_main():
                opt_tensors, opt_meta = optimizer_to_tensors(opt)
                save_checkpoint(stage_dir, step + 1, {"head": head.state_dict(), "head_ema": head_ema.state_dict(),
                                                      "optimizer": opt_tensors,
                                                      "history": {"loss": history}},
                                {"config": cfg.to_dict(), "optimizer": opt_meta, "base_checkpoint": str(base_ckpt),
                                 "base_fingerprint": base_id, "groups": name,
                                 "head_net": head.net.config.to_dict()}, fault_hook=fault_hook)
            dist.barrier()                                            # the others wait until it is on disk
    check_replicas(name, head, head_ema)
    if dist.is_main():
        save_loss_curve(stage_dir / "loss.png", history, f"L_e of the guidance head ({name})")
    return list_checkpoints(stage_dir)[-1]


def head_weights(cfg: RunConfig, run_dir: Path, name: str) -> torch.Tensor:
    """The group weights each head is trained with: inferred (invdiff), hidden cells (oracle), or one group."""
    data = make_dataset(cfg.data, "train")
    if name == "invdiff":
        saved = load_tensors(run_dir / "groups.safetensors")
        check_group_index(saved["index"], data.index, run_dir / "groups.safetensors")
        return saved["weights"]
    if name == "oracle":
        return oracle_groups(data.labels, data.bias, data.num_attributes)   # reads hidden labels: the upper bound
    if name == "uniform":
        return uniform_groups(len(data))
    raise ValueError(name)


# ----- stage D: evaluation ----------------------------------------------------------------------------------
def evaluate_run(cfg: RunConfig, run_dir: Path, base_ckpt: Path, heads: list[str], device: torch.device,
                 strengths: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0)) -> dict:
    """Sample every model with the same seed, judge it, write summary.json and a comparison grid."""
    ec = cfg.eval
    base, _, _ = load_unet(base_ckpt, device)
    shape = (cfg.unet.in_channels, cfg.data.resolution, cfg.data.resolution)
    kw = dict(diffusion_kwargs=cfg.diffusion.scheduler_kwargs(), n_per_class=ec.n_per_class,
              num_classes=cfg.unet.num_classes, image_shape=shape, sampler=ec.sampler, num_steps=ec.num_steps,
              guidance_scale=ec.guidance_scale, seed=ec.seed, device=device)
    data = make_dataset(cfg.data, "train")
    judge = make_judge(cfg.data, run_dir / "judges", device, cfg.eval.judge_steps)
    summary: dict = {"preset": cfg.preset, "dataset": cfg.data.name, "data_seed": cfg.data.seed,
                     "strength": ec.strength, "sampler": f"{ec.sampler}-{ec.num_steps}",
                     "n_per_class": ec.n_per_class, "judged_by": judge.how,
                     "training_data": {"bias": bias_score(data.bias, data.labels, data.num_attributes),
                                       "minority_share": minority_share(data.bias, data.labels, data.num_classes),
                                       "fidelity": 1.0, "n": len(data)}}
    images, labels = generate(GuidedModel(base, None), **kw)
    summary["base"] = judge(images, labels)
    grids = {"base": images}
    sweep: dict = {}
    for name in heads:
        head, _ = load_head(run_dir / name, base, device)
        for w in sorted(set(strengths) | {ec.strength}):
            if w == 0.0:
                continue
            imgs, labs = generate(GuidedModel(base, head, w, cfg.head.mode, cfg.head.mix_ratio), **kw)
            sweep.setdefault(name, {})[str(w)] = judge(imgs, labs)
            if w == ec.strength:
                summary[name] = sweep[name][str(w)]
                grids[name] = imgs
    summary["sweep"] = {name: {"0.0": summary["base"], **s} for name, s in sweep.items()}
    write_json(run_dir / "summary.json", summary)
    k = min(8, ec.n_per_class)
    pick = torch.cat([torch.arange(k) + c * ec.n_per_class for c in range(cfg.unet.num_classes)])
    rows = [img[pick] for img in grids.values()]
    save_grid(run_dir / "samples.png", torch.cat(rows), nrow=k,
              row_labels=[f"{n}: {data.class_names[c]}" for n in grids for c in range(cfg.unet.num_classes)],
              title=f"same seeds, w = {ec.strength} ({ec.sampler}-{ec.num_steps})")
    return summary


def print_summary(summary: dict) -> None:
    print(f"\nbias of generated images ({summary['sampler']}, {summary['n_per_class']} per class, "
          f"w = {summary['strength']}):")
    print(f"  {'model':<14}{'Bias':>7}{'minority share per class':>28}{'fidelity':>10}{'FD':>9}")
    for name in ("training_data", "base", "invdiff", "oracle", "uniform"):
        if name in summary:
            r = summary[name]
            shares = ", ".join(f"{m:.3f}" for m in r["minority_share"])
            fd = f"{r['fd']:>9.3f}" if "fd" in r else ""
            print(f"  {name:<14}{r['bias']:>7.3f}{shares:>28}{r['fidelity']:>10.3f}{fd}")
    if "quality" in summary.get("judged_by", {}):
        print(f"  FD: quality distance to the balanced real set, {summary['judged_by']['quality']}")


# ----- the command line -------------------------------------------------------------------------------------
# real datasets: the data as distributed unless a ratio is asked for; cmnist has its own 95% ratio
DATASET_DEFAULTS = {"cmnist": dict(num_samples=None, eval_per_group=None),
                    **{name: dict(num_samples=None, eval_per_group=None, aligned_fraction=None)
                       for name in ("waterbirds", "celeba", "fairface", "folder")}}


def parse_option(text: str) -> tuple[str, object]:
    """KEY=VALUE of --data-option; VALUE is read as JSON when it parses (numbers, lists, true), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--data-option takes KEY=VALUE (e.g. target=Blond_Hair or digits=[0,1]), got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_config(args) -> RunConfig:
    cfg = get_preset(args.preset)
    if args.steps is not None:
        cfg.train.steps = args.steps
    if args.head_steps is not None:
        cfg.head.steps = args.head_steps
    for flag, value in (("--steps", args.steps), ("--head-steps", args.head_steps)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if args.precision:
        cfg.train.precision = args.precision
    cfg.train.channels_last = cfg.train.channels_last or args.channels_last
    cfg.train.compile = cfg.train.compile or args.compile
    for value, part, flag in ((args.lr, cfg.train, "--lr"), (args.head_lr, cfg.head, "--head-lr")):
        if value is not None:
            if not (math.isfinite(value) and 0 < value < 1):
                raise ValueError(f"{flag} must be a number in (0, 1), got {value}")
            part.lr = value
    if args.data_seed is not None:
        cfg.data.seed = args.data_seed
    if args.dataset != "shapes":
        if args.dataset not in DATASET_DEFAULTS:
            raise ValueError(f"unknown dataset {args.dataset!r}; choose shapes (built in), "
                             f"{', '.join(DATASET_DEFAULTS)}")
        cfg.data.name, cfg.data.data_root = args.dataset, args.data_root
        for key, value in DATASET_DEFAULTS[args.dataset].items():
            setattr(cfg.data, key, value)
        cfg.data.options = dict(parse_option(o) for o in args.data_option)
    elif args.data_root or args.data_option:
        raise ValueError("--data-root and --data-option belong to a real dataset; add --dataset NAME")
    for flag, key in (("resolution", "resolution"), ("num_samples", "num_samples"),
                      ("aligned_fraction", "aligned_fraction")):
        if getattr(args, flag) is not None:
            setattr(cfg.data, key, getattr(args, flag))
    if cfg.data.name != "shapes" or cfg.data.resolution != cfg.unet.sample_size:
        data = make_dataset(cfg.data, "train")
        cfg.unet.num_classes, cfg.unet.sample_size = data.num_classes, cfg.data.resolution
        say(f"[data] {cfg.data.name}: {len(data)} training images, {data.num_classes} classes "
            f"{list(data.class_names)}, {data.num_attributes} attribute values (hidden)")
    if args.seed is not None:
        for part in (cfg.train, cfg.losses, cfg.groups, cfg.head):
            part.seed = args.seed
    if args.init_from:
        apply_init_from(cfg, args.init_from)
    return cfg


# may change on --resume: learning rates (the way out of a diverged run) and how the same maths is computed
RESUMABLE_CHANGES = ("train.lr", "head.lr", "train.precision", "train.channels_last", "train.compile")


def config_changes(saved: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two config dicts."""
    out = []
    for key in sorted(set(saved) | set(new)):
        a, b = saved.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def prepare_run_dir(cfg: RunConfig, run_dir: Path, args, argv: list[str]) -> None:
    """Refuse to clobber another run; on --resume require the same config (learning rates excepted); record
    the config, the command line and the versions in config.json."""
    cfg_file = run_dir / "config.json"
    if cfg_file.exists():
        saved = read_json(cfg_file)["config"]
        if args.overwrite:
            shutil.rmtree(run_dir)
        elif not args.resume:
            raise SystemExit(f"error: run folder {run_dir} already exists; pass --resume to continue it, "
                             f"--overwrite to start again, or --out NEW_FOLDER")
        else:
            changed = config_changes(saved, json.loads(json.dumps(cfg.to_dict())))
            fixed = [c for c in changed if c not in RESUMABLE_CHANGES]
            if fixed:
                raise SystemExit(f"error: {run_dir} was made with a different config ({', '.join(fixed[:6])} "
                                 f"differ); resume with the same --preset and options, or use --out NEW_FOLDER")
            if changed:
                print(f"[resume] continuing with the new {', '.join(changed)}")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(cfg_file, {"config": cfg.to_dict(), "command": ["train.py", *argv], "torch": torch.__version__,
                          "invdiff_min": __version__, "python": platform.python_version(),
                          "platform": platform.platform(), "device": str(args.device)})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", help="tiny | cpu (default) | gpu")
    p.add_argument("--out", default=None, help="run folder (default runs/<preset>)")
    p.add_argument("--stage", default="all", choices=("all",) + STAGES, help="run one stage only")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--resume", action="store_true", help="continue the run in --out; finished stages are skipped")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run folder first")
    p.add_argument("--steps", type=int, default=None, help="override the base model's training steps")
    p.add_argument("--seed", type=int, default=None, help="training seed (all stages)")
    p.add_argument("--lr", type=float, default=None, help="base model learning rate (may change on --resume)")
    p.add_argument("--head-lr", type=float, default=None, help="guidance head learning rate (may change on --resume)")
    p.add_argument("--head-steps", type=int, default=None, help="override the guidance head's training steps")
    p.add_argument("--precision", default=None, choices=tuple(amp.PRECISIONS),
                   help="CUDA autocast: bf16 (default), fp16 with loss scaling, or fp32")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory layout (CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks being trained")
    p.add_argument("--data-seed", type=int, default=None, help="seed of the dataset (selection, colours)")
    p.add_argument("--dataset", default="shapes",
                   help="shapes (built in, default), cmnist, waterbirds, celeba, fairface or folder")
    p.add_argument("--data-root", default=None, help="folder of a real dataset (docs/datasets.md: layouts)")
    p.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE",
                   help="loader option, repeatable: target=Blond_Hair, bias=Male, digits=[0,1], "
                        "group_sizes=3:2:1:1:1:1:2:3, race_classes=invdiff4")
    p.add_argument("--resolution", type=int, default=None, help="image side (default: the preset's)")
    p.add_argument("--num-samples", type=int, default=None, help="training set size (default: preset / all)")
    p.add_argument("--aligned-fraction", type=float, default=None,
                   help="re-sample training to this share of bias-aligned samples")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--compare", action="store_true",
                   help="also train the oracle-group and uniform-weight heads and the official loss recipe")
    p.add_argument("--init-from", default=None,
                   help="start the base model from a converted checkpoint (python -m invdiff_min.convert SRC OUT)")
    p.add_argument("--base", default=None, help="use this base-model checkpoint folder instead of training one")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    try:
        device = dist.init(pick_device(args.device))   # under torchrun: join the others; cuda:LOCAL_RANK on CUDA
        if not dist.is_main():
            dist.barrier()                              # rank 0 first: a real dataset decodes and caches once
        cfg = build_config(args)
        if dist.is_main():
            dist.barrier()
    except (ValueError, CheckpointError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"error: {e}")
    try:
        return run_stages(args, argv, cfg, device)
    finally:
        dist.cleanup()


def run_stages(args, argv: list[str], cfg: RunConfig, device: torch.device) -> int:
    run_dir = Path(args.out or (f"runs/{cfg.preset}" if cfg.data.name == "shapes" else
                                f"runs/{cfg.data.name}-{cfg.preset}"))
    if dist.is_main():                                   # rank 0 prepares the run folder, the others wait
        prepare_run_dir(cfg, run_dir, args, argv)
    dist.barrier()
    progress = not args.no_progress
    heads = ["invdiff"] + (["oracle", "uniform"] if args.compare else [])
    t0 = time.time()
    try:
        base_ckpt = resolve_checkpoint(args.base) if args.base else None
        if args.stage in ("all", "base") and base_ckpt is None:
            base_ckpt = train_base(cfg, run_dir, device, progress=progress)
            say(f"[base] {base_ckpt}  (loss curve {run_dir / 'base/loss.png'}, "
                f"samples {run_dir / 'base/samples.png'})")
        if args.stage == "base":
            return 0
        base_ckpt = base_ckpt or resolve_checkpoint(run_dir, "base")
        if args.stage in ("all", "losses"):
            compute_losses(cfg, run_dir, base_ckpt, device, progress, compare=args.compare)
        if args.stage in ("all", "groups"):
            infer_groups(cfg, run_dir)
        if args.stage in ("all", "head"):
            for name in heads:
                ckpt = train_head(cfg, run_dir, name, head_weights(cfg, run_dir, name), base_ckpt, device, progress)
                say(f"[{name}] {ckpt}")
        if args.stage in ("all", "eval") and dist.is_main():    # sampling and judging: rank 0 alone
            trained = [h for h in ("invdiff", "oracle", "uniform") if list_checkpoints(run_dir / h)]
            summary = evaluate_run(cfg, run_dir, base_ckpt, trained, device)
            print_summary(summary)
            print(f"\nsummary {run_dir / 'summary.json'}, samples {run_dir / 'samples.png'}")
    except (TrainingDiverged, CheckpointError, FileNotFoundError, ValueError) as e:
        if os.environ.get("INVDIFF_DEBUG"):
            raise
        raise SystemExit(f"error: {e}")
    say(f"done in {time.time() - t0:.0f} s; run folder {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
