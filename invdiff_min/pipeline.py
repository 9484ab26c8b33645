"""InvDiff end to end: the four stages as functions that take and return objects, and `run`, which strings them
together over a run folder (each stage resumes from, or skips to, what the folder already holds).

    A. train_base       the class-conditional DDPM eps_theta on the biased data (L_simple)       -> UNet
    B. compute_losses   per-sample denoising losses l_i of the frozen base                      -> PerSampleLosses
       infer_groups     bias-annotation inference: groups W from those losses                   -> Groups
    C. train_head       the invariant guidance head G_psi, trained with L_e over the groups      -> InvariantGuidance
    D. evaluate         sample base and guided model with the same seeds, judge Bias and quality -> summary dict

The stage letters are the ones of README, the tutorials and every file here. Under torchrun each process runs the
same code: every random draw is made for the global batch (the same numbers one process would draw) and each
rank computes its slice (`distributed.py`); rank 0 alone prints and writes files.
"""
from __future__ import annotations

import copy
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import amp
from . import distributed as dist
from .checkpoint import (CheckpointError, fingerprint, list_checkpoints, load_state_into, load_tensors, load_unet,
                         read_state, resolve_checkpoint)
from .checkpoint import read_json_object, save_tensors, write_json
from .config import PROFILE_METHODS, DiffusionConfig, RunConfig, fit_to_data
from .data import BiasedDataset, DataSplits, from_model_range, to_model_range
from .diffusion import denoising_loss, lr_at, make_sampler, sample, training_loss, update_ema
from .evaluate import SampleSettings, make_judge, sample_and_judge
from .groups import (auto_t_window, check_group_index, class_label_topk_groups, class_margin_groups, class_topk_groups,
                     condition_groups, group_report, label_profile, loss_draws, normalize_by_t, official_groups,
                     oracle_groups, per_sample_losses, uniform_groups)
from .guidance import GroupBatchSampler, GuidedModel, InvariantGuidance, head_size, head_timesteps, invariant_loss
from .guidance import load_head
from .metrics import attribute_shares, auroc, bias_score, minority_share
from .plots import save_grid, save_loss_curve, save_loss_histogram
from .progress import progress_bar
from .runs import (GROUPS_FILES, LOSSES_FILES, MetricsLog, check_same_run, complete, discard_replaced, related,
                   resume_stage, save_stage)
from .scheduler import DDPMScheduler
from .unet import UNet, UNetConfig, count_parameters
from .version import __version__

HEADS = ("invdiff", "oracle", "uniform")      # inferred groups; hidden (y, b) cells (upper bound); one group


class TrainingDiverged(RuntimeError):
    """A non-finite loss; the message names the step, the kept checkpoint and the command to resume with."""


def step_generator(seed: int, step: int) -> torch.Generator:
    """The randomness of one training step depends only on (seed, step), so a resumed run repeats exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _check_finite(loss: float, what: str, step: int, stage_dir: Path, flag: str, lr: float) -> None:
    if not math.isfinite(loss):
        raise TrainingDiverged(f"non-finite {what} {loss} at {stage_dir.name} step {step}; the last good "
                               f"checkpoint is kept in {stage_dir}. Resume it with a lower rate: --resume {flag} "
                               f"{lr / 2:g} (now {lr})")


def sync_every(device: torch.device) -> int:
    """How often a training loop reads its loss on the host (StepRecorder): every step on the CPU."""
    return 1 if device.type == "cpu" else 25


@dataclass
class StepRecorder:
    """What both training loops do once their loss is computed: take the optimiser step, update the EMA, record
    the loss (history, progress, metrics.jsonl), refuse a non-finite loss, and checkpoint every `every` steps
    (rank 0 writes, the others wait).
    The losses are read on the host every `sync_every` steps and before every checkpoint, not every step: a read
    waits for the device, which on CUDA would keep the host from queueing the next steps (1 on the CPU, where
    nothing runs ahead). A non-finite loss therefore stops training at the next read, before any checkpoint
    could save weights it has touched, and the message names the step it happened at."""
    model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    grad_clip: float
    ema_decay: float
    stage_dir: Path
    history: torch.Tensor
    every: int
    lr_flag: str                               # the flag that lowers this stage's learning rate on --resume
    lr: float                                  # the configured rate (the message suggests half of it)
    what: str                                  # the loss's name in messages and on the progress bar
    bar: object = None
    log: MetricsLog | None = None
    sync_every: int = 1
    pending: list = field(default_factory=list)   # (step, loss on the device, lr, wall time) not yet read

    def step(self, step: int, loss: torch.Tensor, logged: torch.Tensor, save) -> None:
        """`loss` is backpropagated, `logged` (the global batch's) is checked and recorded; `save()` writes
        the checkpoint of step + 1."""
        lr = self.opt.param_groups[0]["lr"]                          # this step's rate (schedule included)
        amp.optimizer_step(loss, self.opt, self.model.parameters(), self.grad_clip, self.scaler)
        update_ema(self.ema, self.model, self.ema_decay)            # identical weights -> identical EMA
        self.pending.append((step, logged.detach(), lr, time.time()))
        checkpoint = (step + 1) % self.every == 0 or step + 1 == len(self.history)
        if checkpoint or (step + 1) % self.sync_every == 0:
            self.read_losses()
        if checkpoint:
            if dist.is_main():
                save()
                self.log.flush()
            dist.barrier()                                           # the others wait until it is on disk

    def read_losses(self) -> None:
        """One host read of the pending losses: check, record, show."""
        values = torch.stack([v for _, v, _, _ in self.pending]).float().cpu().tolist()
        for (step, _, lr, when), value in zip(self.pending, values):
            _check_finite(value, self.what, step, self.stage_dir, self.lr_flag, self.lr)
            self.history[step] = value
            if self.log:
                self.log.add(step + 1, when, loss=value, lr=lr)
        last = self.pending[-1][0]
        self.pending.clear()
        self.bar.set_postfix(**{self.what.split()[0]: f"{self.history[max(0, last - 49):last + 1].mean():.4f}"})


# ----- A. the biased base model ---------------------------------------------------------------------------
def train_base(cfg: RunConfig, data: BiasedDataset, device: torch.device, stage_dir: Path, progress: bool = True,
               fault_hook=None) -> tuple[UNet, Path]:
    """Train eps_theta with L_simple (Ho et al. eq. 14) and per-sample label dropout, keep an EMA of its
    weights, checkpoint every `train.checkpoint_every` steps into `stage_dir` and resume from the newest.
    Returns (the EMA model, in eval mode, the final checkpoint folder)."""
    train = cfg.train
    torch.manual_seed(train.seed)                                    # the initial weights
    model = UNet(cfg.unet).to(device)
    if train.init_from:
        init_from_converted(model, train.init_from)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay,
                            fused=device.type == "cuda")                 # one kernel per step on CUDA
    scheduler = DDPMScheduler(**cfg.diffusion.scheduler_kwargs()).to(device)
    history = torch.zeros(train.steps)
    start, _ = resume_stage(stage_dir, {"model": model, "ema": ema}, opt, history)
    if 0 < start < train.steps:
        dist.print0(f"[base] resuming at step {start} from {list_checkpoints(stage_dir)[-1]}")
    scaler = amp.grad_scaler(device, train.precision)
    # under torchrun: DDP, which averages the gradients over processes; channels_last / compile on request
    net = amp.prepare(dist.data_parallel(model, device), train.channels_last, train.compile)
    rows = dist.my_slice(train.batch_size)                           # this process's share of each batch
    images = data.images.to(device)                                  # once, not a copy per step (CUDA)
    if start < train.steps:
        dist.print0(f"[base] UNet with {count_parameters(model):,} parameters, {len(data)} images, device {device}"
                    + (f", {dist.world_size()} processes" if dist.world_size() > 1 else ""))
    recorder = StepRecorder(model, ema, opt, scaler, train.grad_clip, train.ema_decay, stage_dir, history,
                            train.checkpoint_every, "--lr", train.lr, "loss",
                            progress_bar("A. base model", start, train.steps, progress and dist.is_main()),
                            MetricsLog(stage_dir, start) if dist.is_main() else None, sync_every(device))
    for step in recorder.bar:
        g = step_generator(train.seed, step)
        # dropout masks: one stream per process (under torchrun), the same as ever in one process
        torch.manual_seed((train.seed * 1_000_003 + step) * dist.world_size() + dist.rank())
        idx = torch.randint(0, len(data), (train.batch_size,), generator=g)    # the global batch, on every rank
        x0 = to_model_range(images[idx.to(device)])                  # (B, 3, H, W) in [-1, 1]
        y = data.labels[idx].to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, train.lr, train.warmup_steps, train.steps)
        if train.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        with amp.autocast(device, train.precision):
            loss = training_loss(net, scheduler, x0, y, g, train.p_uncond, model.null_label, rows)  # this rank's
        recorder.step(step, loss, dist.mean(loss.detach()),           # the global batch's loss, on every rank
                      lambda: save_stage(stage_dir, step + 1, {"model": model, "ema": ema}, opt, history,
                                         {"config": cfg.to_dict()}, fault_hook))
    dist.check_replicas("base", model, ema)
    final = list_checkpoints(stage_dir)[-1]
    if start < train.steps and dist.is_main():
        save_loss_curve(stage_dir / "loss.png", history, f"base model L_simple ({cfg.preset} preset)")
        save_base_samples(stage_dir / "samples.png", ema.eval(), cfg, data.class_names, device)
    return ema.eval(), final


def save_base_samples(path: Path, model: UNet, cfg: RunConfig, class_names, device) -> None:
    """8 DDIM-25 samples per class, one class per row (the base stage's picture)."""
    k = cfg.unet.num_classes
    with amp.autocast(device, cfg.train.precision):
        grid = sample(model, make_sampler("ddim", cfg.diffusion.scheduler_kwargs()).to(device),
                      (8 * k, cfg.unet.in_channels, cfg.data.resolution, cfg.data.resolution),
                      torch.arange(k).repeat_interleave(8), num_steps=25, generator=torch.Generator().manual_seed(0),
                      device=device)
    save_grid(path, from_model_range(grid), nrow=8, row_labels=list(class_names),
              title="base model samples (DDIM 25), one class per row")


def init_from_converted(model: UNet, path: str) -> None:
    """Copy converted (usually unconditional) pretrained weights into `model`; a class embedding the source
    lacks starts at zero, so the conditional model begins exactly as the pretrained unconditional one."""
    pretrained, _, ckpt = load_unet(path, "cpu", weights="model")
    weights = pretrained.state_dict()
    if model.class_embedding is not None and "class_embedding.weight" not in weights:
        weights["class_embedding.weight"] = torch.zeros_like(model.class_embedding.weight)
    load_state_into(model, weights, f"{ckpt}/model.safetensors (--init-from)")
    dist.print0(f"[base] initialised from {ckpt}")


def apply_init_from(cfg: RunConfig, path: str) -> None:
    """Take the architecture and noise schedule of a converted checkpoint; the built-in data at its resolution."""
    _, state, _ = load_unet(path, "cpu", weights="model")
    converted = state["config"]
    cfg.unet = UNetConfig.from_dict(converted["unet"], num_classes=cfg.unet.num_classes)
    cfg.diffusion = DiffusionConfig(**converted["diffusion"])
    cfg.data.resolution = cfg.unet.sample_size
    cfg.train.init_from = str(path)


def check_base_fits(path: str | Path, cfg: RunConfig, flag: str) -> None:
    """Refuse a --base / --init-from checkpoint made for other data: its classes or image side differ from the
    data's (cfg after fit_to_data). Reads state.json only, before the run folder is touched."""
    ckpt = resolve_checkpoint(path)
    config = read_state(ckpt).get("config")
    unet = config.get("unet") if isinstance(config, dict) else None
    if not isinstance(unet, dict) or "num_classes" not in unet:
        raise CheckpointError(f"{ckpt / 'state.json'} does not say which classes the model was made for (no "
                              f"config.unet.num_classes); restore the checkpoint, or pass one written by train.py "
                              f"or convert.py")
    classes = unet["num_classes"]
    if classes is None and flag == "--base":
        raise CheckpointError(f"--base {ckpt} is an unconditional model (no class embedding), but the base must be "
                              f"class-conditional; pass it as --init-from to fine-tune it on this data's classes")
    if classes is None:                                  # --init-from: an unconditional model gains its embedding
        classes = cfg.unet.num_classes
    for have, want, what in ((classes, cfg.unet.num_classes, "classes"),
                             (unet.get("sample_size"), cfg.unet.sample_size, "an image side of")):
        if have != want:
            raise CheckpointError(f"{flag} {ckpt} was made for {what} {have}, but the data has {want}; pass a "
                                  f"checkpoint trained on this dataset at this --resolution")


# ----- B. per-sample losses and group inference ------------------------------------------------------------
@dataclass
class PerSampleLosses:
    """l_i of every training sample, keyed by the dataset's sample index, and how they were made."""
    loss: torch.Tensor                         # (N,) float32
    index: torch.Tensor                        # (N,) the dataset's sample index of each row
    t_window: tuple[int, int]
    info: dict = field(default_factory=dict)   # settings, the label-free window scores, AUCs (evaluation only)
    official: torch.Tensor | None = None       # --compare: the official recipe's losses (1 draw, t uniform, x0)
    profile: torch.Tensor | None = None        # (N, K) label profile P, more than 2 classes (groups.label_profile)


def sharded_per_sample_losses(model, scheduler, images, labels, num_draws: int, t_window: tuple[int, int],
                              normalize_per_t: bool = True, target: str = "eps", batch_size: int = 500,
                              seed: int = 0, device="cpu", progress: bool = False,
                              reference: str = "none") -> torch.Tensor:
    """groups.per_sample_losses with its batches shared out over the processes (torchrun) and gathered on all:
    every rank makes every (t, eps) draw (cheap, CPU) so each batch sees exactly the draws it sees in one
    process, runs the network on its own batches only, and the results equal one process's."""
    if dist.world_size() == 1:
        return per_sample_losses(model, scheduler, images, labels, num_draws, t_window, normalize_per_t, target,
                                 batch_size, seed, device, progress, reference)
    losses, ts = loss_draws(dist.RoundRobinCalls(model), scheduler, images, labels, num_draws, t_window, target,
                            batch_size, seed, device, progress and dist.is_main(), reference)   # (N, M) each
    losses = dist.gather_round_robin(losses, batch_size)
    return (normalize_by_t(losses, ts) if normalize_per_t else losses).mean(1)


def compute_losses(cfg: RunConfig, data: BiasedDataset, base: UNet, device: torch.device, progress: bool = True,
                   compare: bool = False) -> PerSampleLosses:
    """l_i for every training sample under the frozen base (groups.py): M draws of (t, eps) in a t window
    chosen without bias labels, per-t normalised, as the ratio to the null-label loss (the defaults). The AUCs
    in `info` read the hidden labels and are for evaluation only."""
    settings = cfg.losses
    scheduler = DDPMScheduler(**cfg.diffusion.scheduler_kwargs()).to(device)
    info: dict = {"num_draws": settings.num_draws, "reference": settings.reference,
                  "normalize_per_t": settings.normalize_per_t, "target": settings.target}
    window = tuple(settings.t_window) if settings.t_window else None
    if window is None:  # the label-free choice of the t window, on a subset, done whole by every rank
        with amp.autocast(device, cfg.train.precision):
            window, scores = auto_t_window(base, scheduler, data.images, data.labels,
                                           num_draws=settings.auto_window_draws,
                                           max_samples=settings.auto_window_samples, batch_size=settings.batch_size,
                                           seed=settings.seed + 10_000, device=device,
                                           progress=progress and dist.is_main())
        info["t_window_label_effect"] = {f"{lo}-{hi}": round(v, 4) for (lo, hi), v in scores.items()}
        dist.print0(f"[losses] t window chosen without bias labels: [{window[0]}, {window[1]}) "
                    f"(label effect E|log l(y)/l(null)| = {scores[window]:.3f})")
    info["t_window"] = list(window)

    def losses_with(num_draws, t_window, normalize, target, reference, show=False):
        with amp.autocast(device, cfg.train.precision):
            return sharded_per_sample_losses(base, scheduler, data.images, data.labels, num_draws, t_window,
                                             normalize, target, settings.batch_size, settings.seed, device, show,
                                             reference)

    losses = losses_with(settings.num_draws, window, settings.normalize_per_t, settings.target, settings.reference,
                         progress)
    result = PerSampleLosses(losses, data.index, window, info)
    info.update(loss_aucs(losses, data))                             # evaluation only (hidden labels)
    if settings.profile_draws > 0 and (data.num_classes > 2 or cfg.groups.method in PROFILE_METHODS):
        # (K + 1) network calls per draw: for K = 3 and 4 draws about as long as the losses above (8 draws x 2);
        # every rank computes it whole
        with amp.autocast(device, cfg.train.precision):
            result.profile = label_profile(base, scheduler, data.images, data.num_classes, settings.profile_draws,
                                           window, settings.batch_size, settings.seed + 20_000, device,
                                           progress and dist.is_main())
        info["profile_draws"] = settings.profile_draws
    if compare and settings.reference != "none":                     # the paper's plain loss, same window and draws
        plain = losses_with(settings.num_draws, window, True, settings.target, "none")
        info.update({f"plain_loss_{k}": v for k, v in loss_aucs(plain, data).items()})
    if compare:                                                      # the official recipe: 1 draw, t ~ U, vs x0
        everything = (0, scheduler.num_train_timesteps)
        result.official = losses_with(1, everything, False, "x0", "none")
        info["official_auc"] = auroc(result.official, data.conflicting)
        info["official_eps_target_auc"] = auroc(losses_with(1, everything, False, "eps", "none"), data.conflicting)
    return result


def loss_aucs(losses: torch.Tensor, data: BiasedDataset) -> dict:
    """Evaluation only (hidden labels): how well l_i ranks the bias-conflicting samples, overall and per class."""
    return {"auc": auroc(losses, data.conflicting),
            "auc_per_class": [auroc(losses[data.labels == c], data.conflicting[data.labels == c])
                              for c in range(data.num_classes)]}


@dataclass
class Groups:
    """The group assignment W (N, G) of the training samples (rows on the simplex), keyed by sample index."""
    assignments: torch.Tensor
    index: torch.Tensor
    method: str
    report: dict = field(default_factory=dict)   # sizes, risks; with the hidden labels, how well they recover them


def infer_groups(cfg: RunConfig, data: BiasedDataset, losses: PerSampleLosses) -> Groups:
    """Bias-annotation inference (the paper's "maximise L_e" step over W, Fig. 1): the per-class top-k groups
    (our default, the exact maximiser of the spread of R_g under a size constraint) or the official grouper."""
    check_group_index(losses.index, data.index, "the per-sample losses")
    settings = cfg.groups
    profile = losses.profile
    if profile is not None and profile.shape != (len(data.index), data.num_classes):
        raise ValueError(f"the label profile in losses.safetensors is {tuple(profile.shape)}, not (samples, classes) = "
                         f"{(len(data.index), data.num_classes)}: it was computed for other data; rerun --stage losses")
    if settings.method == "class_topk":
        w = class_topk_groups(losses.loss, data.labels, data.num_classes, settings.top_fraction, profile,
                              settings.min_subgroup)
    elif settings.method in PROFILE_METHODS:
        if profile is None:
            raise ValueError(f"groups.method {settings.method!r} needs the label profile, which losses.safetensors "
                             f"lacks: rerun --stage losses with losses.profile_draws above 0")
        w = class_margin_groups(data.labels, profile, settings.min_subgroup) if settings.method == "class_margin" \
            else class_label_topk_groups(losses.loss, data.labels, profile, settings.top_fraction)
    elif settings.method == "official":
        w = official_groups(losses.loss, settings.num_groups, settings.steps, settings.lr, settings.w_nz,
                            settings.restarts, settings.seed, data.labels if settings.within_class else None,
                            settings.hard)
    else:
        raise ValueError(f"unknown group method {settings.method!r}; use 'class_topk', 'class_margin', "
                         f"'class_label_topk' or 'official'")
    report = group_report(w, losses.loss, data.labels, data.conflicting, data.group)
    return Groups(w, data.index, settings.method, report.to_dict())


def group_assignments(name: str, data: BiasedDataset, inferred: Groups | None = None) -> torch.Tensor:
    """The W a head is trained with: inferred groups (invdiff), the hidden cells (oracle), or one group."""
    if name == "invdiff":
        if inferred is None:
            raise ValueError("the invdiff head needs inferred groups: run the groups stage first")
        check_group_index(inferred.index, data.index, "the inferred groups")
        return inferred.assignments
    if name == "oracle":
        return oracle_groups(data.labels, data.bias, data.num_attributes)   # reads hidden labels: the upper bound
    if name == "uniform":
        return uniform_groups(len(data))
    raise ValueError(f"unknown head {name!r}; choose one of {', '.join(HEADS)}")


# ----- C. the invariant guidance head ----------------------------------------------------------------------
def build_head(cfg: RunConfig, base: UNet, group_class: list[int] | None = None) -> InvariantGuidance:
    """G_psi: a small UNet with its own Phi(y) (ours), or the official code's full copy of the base ("mix");
    told the sub-group too (Phi'(g)) when `group_class` lists each sub-group's class."""
    head = cfg.head
    if head.mode == "mix":
        return InvariantGuidance.copy_of(base, group_class)
    return InvariantGuidance.small(base.config, head.block_out_channels, head.layers_per_block, head.attention_levels,
                                   head.norm_num_groups, group_class)


def train_head(cfg: RunConfig, data: BiasedDataset, base: UNet, assignments: torch.Tensor, device: torch.device,
               stage_dir: Path, base_source: str = "", progress: bool = True,
               fault_hook=None) -> tuple[InvariantGuidance, Path]:
    """Train G_psi with L_e over the groups `assignments` W (N, G); the base stays frozen and is not saved again.
    Returns (the EMA head in eval mode, the final checkpoint folder)."""
    settings, train = cfg.head, cfg.train                           # train: precision, layout and compile
    base_id = fingerprint(base.state_dict())
    labels, told = data.labels, {}                                  # what the head is told: the class,
    if settings.condition == "class_group":                         # or each sample's sub-group (its labels)
        labels, group_class = condition_groups(assignments, data.labels)
        told = {"head_groups": group_class.tolist(),                # each sub-group's class, and who is in it
                "head_group_members": fingerprint({"sub_group": labels})}
    head_groups = told.get("head_groups")
    torch.manual_seed(settings.seed)                                # the head's initial weights
    head = build_head(cfg, base, head_groups).to(device)
    head_ema = copy.deepcopy(head).requires_grad_(False)    # samples; deviation: official samples raw weights
    opt = torch.optim.AdamW(head.parameters(), lr=settings.lr, fused=device.type == "cuda")
    scheduler = DDPMScheduler(**cfg.diffusion.scheduler_kwargs()).to(device)
    batches = GroupBatchSampler(assignments, settings.batch_size, settings.batch_sampling)
    history = torch.zeros(settings.steps)
    modules = {"head": head, "head_ema": head_ema}
    groups_id = fingerprint({"weights": assignments})              # a head trained on other groups is refused
    start, _ = resume_stage(stage_dir, modules, opt, history,
                            expect={"base_fingerprint": base_id, "head_groups": head_groups,
                                    "head_group_members": told.get("head_group_members")},
                            recorded={"groups_fingerprint": groups_id})
    name = stage_dir.name
    if 0 < start < settings.steps:
        dist.print0(f"[{name}] resuming at step {start}")
    scaler = amp.grad_scaler(device, train.precision)
    # under torchrun: DDP around the head (the base is frozen), which averages the head's gradients
    model = GuidedModel(base, amp.prepare(dist.data_parallel(head, device), train.channels_last, train.compile),
                        strength=1.0, mode=settings.mode, mix_ratio=settings.mix_ratio,
                        group_class=None if head_groups is None else head.group_class)
    if start < settings.steps:
        size = head_size(head, base)
        dist.print0(f"[{name}] head G_psi with {size.head:,} parameters ({size.ratio:.0%} of the base), "
                    f"{assignments.shape[1]} groups, {settings.batch_sampling} batches, lambda {settings.lam}")
    recorder = StepRecorder(head, head_ema, opt, scaler, settings.grad_clip, settings.ema_decay, stage_dir, history,
                            settings.checkpoint_every, "--head-lr", settings.lr, f"L_e (lambda {settings.lam})",
                            progress_bar(f"C. head ({name})", start, settings.steps, progress and dist.is_main()),
                            MetricsLog(stage_dir, start) if dist.is_main() else None, sync_every(device))
    images = data.images.to(device)                                  # once, not a copy per step (CUDA)
    state = {"config": cfg.to_dict(), "base_checkpoint": base_source, "base_fingerprint": base_id, "groups": name,
             "groups_fingerprint": groups_id, "head_net": head.net.config.to_dict(), **told}
    for step in recorder.bar:
        g = step_generator(settings.seed + 7, step)
        idx, slots = batches.sample(g)                               # the global batch, same on every rank
        # paired draws (deviation: not in the paper): the j-th sample of every group gets the j-th (t, eps), so
        # the spread of the group risks R_g reflects the groups, not which t each drew (else mostly noise)
        n_draws = int(slots.max()) + 1 if settings.paired_draws else len(idx)
        draw = slots if settings.paired_draws else torch.arange(len(idx))
        t = head_timesteps(n_draws, scheduler.num_train_timesteps, settings.large_t_share, g)[draw]
        eps = torch.randn((n_draws, *data.images.shape[1:]), generator=g)[draw]
        rows = dist.my_slice(len(idx))                               # this rank's samples
        x0 = to_model_range(images[idx[rows].to(device)])
        y, t, eps = labels[idx[rows]].to(device), t[rows].to(device), eps[rows].to(device)   # y: class or sub-group
        w = assignments[idx].to(device)                              # (B, G): the whole global batch
        for group in opt.param_groups:                               # (a resumed run may lower it: --head-lr)
            group["lr"] = head_lr(settings, step)
        with amp.autocast(device, train.precision):
            losses = denoising_loss(model, scheduler, x0, y, t, eps)  # l_i of eps_theta + G_psi, this rank's
        # L_e is not a mean over samples, so it does not split over processes: every rank computes it over the
        # global batch from the l_i of all ranks (all_gather_cat, with autograd). Its gradient is exact: every
        # rank backpropagates the same L_e, the gather's backward hands each rank the sum over the W ranks of
        # dL_e/dl_i (W dL_e/dl_i) for its own samples, and DDP's average over ranks divides by W again.
        loss, _ = invariant_loss(dist.all_gather_cat(losses), w, settings.lam)   # L_e, the same on every rank
        recorder.step(step, loss, loss, lambda: save_stage(stage_dir, step + 1, modules, opt, history, state,
                                                            fault_hook))
    dist.check_replicas(name, head, head_ema)
    if start < settings.steps and dist.is_main():
        save_loss_curve(stage_dir / "loss.png", history, f"L_e of the guidance head ({name})")
    return head_ema.eval(), list_checkpoints(stage_dir)[-1]


def head_lr(settings, step: int) -> float:
    """The head's learning rate at `step`: constant, or warm-up then cosine decay (HeadConfig.lr_schedule)."""
    if settings.lr_schedule == "constant":
        return settings.lr
    if settings.lr_schedule == "cosine":
        return lr_at(step, settings.lr, settings.warmup_steps, settings.steps)
    raise ValueError(f"head.lr_schedule must be 'constant' or 'cosine', got {settings.lr_schedule!r}")


# ----- D. evaluation ---------------------------------------------------------------------------------------
def sample_settings(cfg: RunConfig, device, **overrides) -> SampleSettings:
    """How a run's models are sampled for judging (its eval settings), with any field overridden."""
    settings = cfg.eval
    return SampleSettings(**{**dict(diffusion_kwargs=cfg.diffusion.scheduler_kwargs(),
                                    n_per_class=settings.n_per_class, num_classes=cfg.unet.num_classes,
                                    image_shape=(cfg.unet.in_channels, cfg.data.resolution, cfg.data.resolution),
                                    sampler=settings.sampler, num_steps=settings.num_steps,
                                    guidance_scale=settings.guidance_scale, guidance_t_max=settings.guidance_t_max,
                                    seed=settings.seed, device=device,
                                    precision=cfg.train.precision),
                             **overrides})


def evaluate(cfg: RunConfig, splits: DataSplits, base: UNet, heads: dict[str, InvariantGuidance],
             device: torch.device, judge_folder: Path | None = None,
             strengths: tuple[float, ...] = ()) -> tuple[dict, dict[str, torch.Tensor]]:
    """Sample the base and every head at the summary's strength w (and at `strengths`, a sweep) with the same
    seeds and judge them. Returns (summary, {model: its images at w})."""
    settings = cfg.eval
    judge = make_judge(splits, judge_folder, device, settings.judge_steps)
    how = sample_settings(cfg, device)
    data = splits.train
    summary: dict = {"preset": cfg.preset, "dataset": cfg.data.name, "data_seed": cfg.data.seed,
                     "strength": settings.strength, "sampler": f"{settings.sampler}-{settings.num_steps}",
                     "n_per_class": settings.n_per_class, "judged_by": judge.how,
                     "training_data": {"bias": bias_score(data.bias, data.labels, data.num_attributes),
                                       "minority_share": minority_share(data.bias, data.labels, data.num_classes),
                                       "attribute_share": attribute_shares(data.bias, data.labels,
                                                                           data.num_attributes),
                                       "fidelity": 1.0, "n": len(data)}}
    images, _, summary["base"] = sample_and_judge(base, None, 0.0, judge, how)
    grids = {"base": images}
    sweep: dict = {}
    for name, head in heads.items():
        for w in sorted(set(strengths) | {settings.strength}):
            if w == 0.0:
                continue
            images, _, sweep.setdefault(name, {})[str(w)] = sample_and_judge(base, head, w, judge, how, cfg.head.mode,
                                                                            cfg.head.mix_ratio,
                                                                            settings.head_outside_cfg)
            if w == settings.strength:
                summary[name], grids[name] = sweep[name][str(w)], images
    summary["sweep"] = {name: {"0.0": summary["base"], **s} for name, s in sweep.items()}
    return summary, grids


def save_comparison(path: Path, grids: dict[str, torch.Tensor], cfg: RunConfig, class_names) -> None:
    """Up to 8 samples per class of every model, same seeds, one row per (model, class)."""
    settings = cfg.eval
    k = min(8, settings.n_per_class)
    pick = torch.cat([torch.arange(k) + c * settings.n_per_class for c in range(cfg.unet.num_classes)])
    save_grid(path, torch.cat([img[pick] for img in grids.values()]), nrow=k,
              row_labels=[f"{n}: {class_names[c]}" for n in grids for c in range(cfg.unet.num_classes)],
              title=f"same seeds, w = {settings.strength} ({settings.sampler}-{settings.num_steps})")


def summary_table(summary: dict) -> str:
    """The summary as a few lines of text (what train.py prints at the end)."""
    shares_of = summary["base"].get("attribute_share", [[0, 0]])
    many = len(shares_of[0]) > 2         # K > 2 values: each value's share per class, "a/b/c" (balanced: 1/K each)
    models = [name for name in ("training_data", "base", *HEADS) if name in summary]
    if many:
        shares = {m: ", ".join("/".join(f"{v:.2f}" for v in row) for row in summary[m]["attribute_share"])
                  for m in models}
    else:
        shares = {m: ", ".join(f"{v:.3f}" for v in summary[m]["minority_share"]) for m in models}
    title = "value shares per class" if many else "minority share per class"
    width = max(28, *(len(text) + 2 for text in [title, *shares.values()]))   # K = 4 strings are longer
    lines = [f"bias of generated images ({summary['sampler']}, {summary['n_per_class']} per class, "
             f"w = {summary['strength']}):",
             f"  {'model':<14}{'Bias':>7}{title:>{width}}{'fidelity':>10}{'FD':>9}"]
    for name in models:
        r = summary[name]
        fd = f"{r['fd']:>9.3f}" if "fd" in r else ""
        lines.append(f"  {name:<14}{r['bias']:>7.3f}{shares[name]:>{width}}{r['fidelity']:>10.3f}{fd}")
    if "quality" in summary.get("judged_by", {}):
        lines.append(f"  FD: quality distance to the balanced real set, {summary['judged_by']['quality']}")
    return "\n".join(lines)


# ----- the run folder: every stage in turn -----------------------------------------------------------------
def run_record(command: list[str], device, splits: DataSplits) -> dict:
    """What config.json records beside the config: the command, the versions, the device, the class names and
    the data's fingerprint (a --resume on other data is refused: runs.check_same_run)."""
    return {"command": list(command), "torch": torch.__version__, "invdiff_min": __version__,
            "python": platform.python_version(), "platform": platform.platform(), "device": str(device),
            "class_names": list(splits.train.class_names), "data": data_fingerprint(splits)}


def data_fingerprint(splits: DataSplits) -> dict:
    """Which data a run was made from: the image shape and, for each split, short hashes of its sample index
    (in loaded order: batches are drawn by position) and of its class and attribute labels. Pixels are left
    out on purpose: JPEG and PNG decoders may differ by a unit between machines, and a run must resume on
    another machine; an edited label, an added or removed image all show here."""
    record = {"image shape": list(splits.train.images.shape[1:])}
    for name, part in (("training", splits.train), ("evaluation", splits.eval)):
        record[f"{name} samples"] = fingerprint({"index": part.index})
        record[f"{name} labels"] = fingerprint({"class": part.labels, "attribute": part.bias})
    return record


def run(cfg: RunConfig, splits: DataSplits, run_dir: Path, device: torch.device, stage: str = "all",
        heads: tuple[str, ...] = ("invdiff",), base_path: str | Path | None = None, compare: bool = False,
        progress: bool = True, replaced: Path | None = None) -> dict | None:
    """Run `stage` ("all" or one of runs.STAGES) of the pipeline in `run_dir`: each stage starts, resumes from
    its newest checkpoint, or is skipped when its outputs are complete. `base_path`: use that base checkpoint
    instead of training one. `replaced`: the old run --overwrite moved aside, deleted after the first stage.
    Returns the summary of the eval stage (rank 0), else None. `cfg` is first fitted to the data in place
    (classes, side, head width: config.fit_to_data; precision "auto" made concrete), as train.py does before
    saving it. A folder with a config.json continues only with that config (learning rates and precision
    excepted) and the same data (runs.check_same_run); a new folder gets one."""
    data = splits.train
    root = cfg.data.data_root                            # as train.py refuses --out there (runs.check_run_folder)
    if root is not None and (how := related(run_dir, Path(root))):
        raise ValueError(f"run_dir {run_dir} {how} the data root {root}; pass a run_dir outside the dataset folder")
    fit_to_data(cfg, data.num_classes, cfg.data.resolution, data.images.shape[1])
    cfg.train.precision, _ = amp.resolve(cfg.train.precision, device)   # "auto" made concrete, as train.py does
    t0 = time.time()
    # a folder continues only as it was made (train.py has checked already; from Python this is the check):
    # another config or other data would resume its checkpoints, losses and groups silently
    saved, changed, recorded = run_dir / "config.json", None, False
    record = run_record(["invdiff_min.pipeline.run"], device, splits)
    if saved.is_file():
        changed, kept = check_same_run(run_dir, cfg.to_dict(), record["data"], f"pass the config it was made "
                                       f"with (RunConfig.from_dict of the 'config' in {saved})", "use another run_dir")
        recorded = "data" in kept
        if changed:
            dist.print0(f"[resume] continuing with the new {', '.join(changed)}")
    if (changed or not recorded) and dist.is_main():   # a new folder, a new learning rate or precision, a record
        run_dir.mkdir(parents=True, exist_ok=True)      # without the data's fingerprint: written afresh
        write_json(saved, {"config": cfg.to_dict(), **record})
    dist.barrier()

    def wanted(name: str) -> bool:
        return stage in ("all", name)

    def stage_done() -> None:
        nonlocal replaced
        if dist.is_main():
            discard_replaced(replaced)
        replaced = None

    if base_path is not None:
        base, _, base_ckpt = load_unet(base_path, device)
    elif wanted("base"):
        base, base_ckpt = train_base(cfg, data, device, run_dir / "base", progress)
        dist.print0(f"[base] {base_ckpt}  (loss curve {run_dir / 'base/loss.png'}, samples "
                    f"{run_dir / 'base/samples.png'})")
        stage_done()
    else:
        base, _, base_ckpt = load_unet(run_dir, device)
    if stage == "base":
        return None
    base_id = fingerprint(base.state_dict())
    if complete(run_dir, LOSSES_FILES):                              # kept losses came from this base, or refused
        check_losses_base(run_dir, base_id)
    if wanted("losses") and not complete(run_dir, LOSSES_FILES):
        losses = compute_losses(cfg, data, base, device, progress, compare)
        if dist.is_main():
            save_losses(run_dir, losses, base_ckpt, base_id)
        dist.barrier()
        stage_done()
    if wanted("groups") and not groups_current(run_dir):             # cheap: rank 0 alone, the others wait
        if dist.is_main():
            losses = load_losses(run_dir)
            save_groups(run_dir, infer_groups(cfg, data, losses), data, losses.loss)
        dist.barrier()
        stage_done()
    if wanted("head"):
        groups = load_groups(run_dir) if "invdiff" in heads else None
        for name in heads:
            _, ckpt = train_head(cfg, data, base, group_assignments(name, data, groups), device, run_dir / name,
                                 str(base_ckpt), progress)
            dist.print0(f"[{name}] {ckpt}")
        stage_done()
    summary = None
    if wanted("eval") and dist.is_main():                            # sampling and judging: rank 0 alone
        trained = {h: load_head(run_dir / h, base, device)[0] for h in HEADS if list_checkpoints(run_dir / h)}
        sweep = (1.0, 2.0, 3.0) if compare else ()                   # the default run judges w alone
        summary, grids = evaluate(cfg, splits, base, trained, device, run_dir / "judges", sweep)
        write_json(run_dir / "summary.json", summary)
        save_comparison(run_dir / "samples.png", grids, cfg, data.class_names)
        stage_done()
    dist.print0(f"done in {time.time() - t0:.0f} s; run folder {run_dir}")
    return summary


def save_losses(run_dir: Path, losses: PerSampleLosses, base_ckpt: Path, base_id: str) -> None:
    """losses.json, then losses.safetensors (the set is complete when both exist); the official recipe's beside."""
    if losses.official is not None:
        save_tensors(run_dir / "losses_official.safetensors", {"loss": losses.official, "index": losses.index})
    write_json(run_dir / "losses.json", {"base_checkpoint": str(base_ckpt), "base_fingerprint": base_id,
                                         **losses.info})
    profile = {} if losses.profile is None else {"profile": losses.profile}
    save_tensors(run_dir / "losses.safetensors", {"loss": losses.loss, "index": losses.index, **profile},
                 {"t_window": list(losses.t_window)})
    print(f"[losses] {run_dir / 'losses.safetensors'}: AUC for the hidden minority {losses.info['auc']:.3f} "
          f"(evaluation only)")


def check_losses_base(run_dir: Path, base_id: str) -> None:
    """Refuse per-sample losses computed with another base model (a --resume with another --base): its groups
    and the head trained on this base would not belong together. Runs saved before the fingerprint pass."""
    saved = read_json_object(run_dir / "losses.json").get("base_fingerprint", base_id)
    if saved != base_id:
        raise CheckpointError(f"{run_dir / 'losses.json'}: the per-sample losses there were computed with a different "
                              f"base model; resume with the base they came from, or start a new --out")


def load_losses(run_dir: Path) -> PerSampleLosses:
    info = read_json_object(run_dir / "losses.json")
    window = info.get("t_window")
    if not (isinstance(window, list) and len(window) == 2 and all(type(t) is int for t in window)):
        raise CheckpointError(f"{run_dir / 'losses.json'}: t_window must be a list [lo, hi) of two timesteps, got "
                              f"{window!r}; restore the file, or run --stage losses again in a new --out")
    saved = load_tensors(run_dir / "losses.safetensors")
    if "loss" not in saved or "index" not in saved:
        raise CheckpointError(f"{run_dir / 'losses.safetensors'} lacks the tensors loss and index; run --stage "
                              f"losses again in a new --out")
    loss, index = saved["loss"], saved["index"]
    if loss.ndim != 1 or loss.shape != index.shape or not loss.is_floating_point() or not bool(loss.isfinite().all()):
        raise CheckpointError(f"{run_dir / 'losses.safetensors'} holds loss {tuple(loss.shape)} and index "
                              f"{tuple(index.shape)}, not one finite loss per sample; run --stage losses again in a "
                              f"new --out")
    return PerSampleLosses(saved["loss"], saved["index"], tuple(window), info, profile=saved.get("profile"))


def save_groups(run_dir: Path, groups: Groups, data: BiasedDataset, losses: torch.Tensor) -> None:
    """groups.json and groups_hist.png, then groups.safetensors (the set is complete when all three exist)."""
    write_json(run_dir / "groups.json", {"method": groups.method, "losses_fingerprint": fingerprint({"l": losses}),
                                         **groups.report})
    save_loss_histogram(run_dir / "groups_hist.png", losses, data.group,
                        [f"{data.class_names[c]} / {data.attribute_names[b]}" for c in range(data.num_classes)
                         for b in range(data.num_attributes)],
                        title="per-sample loss of the base model, by hidden (class, attribute)")
    save_tensors(run_dir / "groups.safetensors", {"weights": groups.assignments, "index": groups.index},
                 {"method": groups.method})
    r = groups.report
    print(f"[groups] {run_dir / 'groups.safetensors'}: sizes {[round(s) for s in r['sizes']]}, minority share per "
          f"group {[round(m, 2) for m in r['minority_share']]}, NMI {r['nmi']:.3f} (evaluation only)")


def groups_current(run_dir: Path) -> bool:
    """The groups' files are complete and were inferred from the losses now in the run folder."""
    if not complete(run_dir, GROUPS_FILES):
        return False
    made_from = read_json_object(run_dir / "groups.json").get("losses_fingerprint")
    return made_from == fingerprint({"l": load_losses(run_dir).loss})


def load_groups(run_dir: Path) -> Groups:
    """groups.safetensors and groups.json, checked: W (N, G) of non-negative rows summing to 1, one row per sample
    index, G the number of groups groups.json reports."""
    path = run_dir / "groups.safetensors"
    saved = load_tensors(path)
    info = read_json_object(run_dir / "groups.json")
    w, index = saved.get("weights"), saved.get("index")
    sizes = info.get("sizes")
    problem = None
    if w is None or index is None:
        problem = f"lacks the tensors weights and index (it holds {', '.join(sorted(saved)) or 'nothing'})"
    elif w.ndim != 2 or index.ndim != 1 or len(w) != len(index) or index.dtype != torch.int64:
        problem = f"holds weights {tuple(w.shape)} and index {tuple(index.shape)}, not (N, G) and (N,) integers"
    elif not w.is_floating_point() or not bool(torch.isfinite(w).all() & (w >= 0).all()) or not torch.allclose(
            w.sum(1).double(), torch.ones(len(w), dtype=torch.float64), atol=1e-4):
        problem = "holds weights that are not rows of non-negative numbers summing to 1"
    elif isinstance(sizes, list) and len(sizes) != w.shape[1]:
        problem = f"holds {w.shape[1]} groups, but {run_dir / 'groups.json'} reports {len(sizes)}"
    if problem:
        raise CheckpointError(f"{path} {problem}; delete groups.safetensors and run train.py --out {run_dir} --resume "
                              f"(the groups stage runs again)")
    return Groups(w, index, info.get("method", "?"), info)
