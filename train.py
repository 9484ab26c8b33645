"""Train InvDiff end to end on the built-in biased dataset (or any stage of it).

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
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from invdiff_min import __version__
from invdiff_min.checkpoint import (CheckpointError, list_checkpoints, load_state_into, load_tensors,
                                    optimizer_from_tensors, optimizer_to_tensors, read_json, save_checkpoint,
                                    write_json)
from invdiff_min.config import RunConfig, get_preset
from invdiff_min.data import CLASS_NAMES, from_model_range, make_dataset, to_model_range
from invdiff_min.diffusion import lr_at, make_sampler, sample, training_loss, update_ema
from invdiff_min.plots import save_grid, save_loss_curve
from invdiff_min.scheduler import DDPMScheduler
from invdiff_min.unet import UNet, count_parameters

STAGES = ("base", "losses", "groups", "head", "eval")


class TrainingDiverged(RuntimeError):
    pass


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for CUDA but torch.cuda.is_available() is False; use --device cpu")
    return torch.device(name)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The randomness of one training step depends only on (seed, step), so a resumed run repeats exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


# ----- stage A: the biased base model ---------------------------------------------------------------------
def train_base(cfg: RunConfig, run_dir: Path, device: torch.device, progress: bool = True,
               fault_hook=None) -> Path:
    """Train eps_theta with L_simple and label dropout; EMA weights; checkpoints every `checkpoint_every`."""
    tc, stage_dir = cfg.train, run_dir / "base"
    data = make_dataset(cfg.data, "train")
    model = UNet(cfg.unet).to(device)
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
        print(f"[base] resuming at step {start} from {ckpts[-1]}")
    print(f"[base] UNet with {count_parameters(model):,} parameters, {len(data)} images, device {device}")
    use_amp = device.type == "cuda"
    bar = tqdm(range(start, tc.steps), desc="A. base model", disable=not progress, initial=start, total=tc.steps)
    for step in bar:
        g = step_generator(tc.seed, step)
        torch.manual_seed(tc.seed * 1_000_003 + step)               # dropout
        idx = torch.randint(0, len(data), (tc.batch_size,), generator=g)
        x0 = to_model_range(data.images[idx]).to(device)              # (B, 3, H, W) in [-1, 1]
        y = data.labels[idx].to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc.lr, tc.warmup_steps, tc.steps)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = training_loss(model, scheduler, x0, y, generator=g, p_uncond=tc.p_uncond,
                                 null_label=model.null_label)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"non-finite loss {loss.item()} at base step {step}; the last good checkpoint is "
                                   f"kept in {stage_dir}. Try a lower --lr (now {tc.lr}) or stronger grad clipping, "
                                   f"then --resume")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        update_ema(ema, model, tc.ema_decay)
        history[step] = loss.item()
        bar.set_postfix(loss=f"{history[max(0, step - 49):step + 1].mean():.4f}")
        if (step + 1) % tc.checkpoint_every == 0 or step + 1 == tc.steps:
            opt_tensors, opt_meta = optimizer_to_tensors(opt)
            save_checkpoint(stage_dir, step + 1,
                            {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt_tensors,
                             "history": {"loss": history}},
                            {"config": cfg.to_dict(), "optimizer": opt_meta}, fault_hook=fault_hook)
    final = list_checkpoints(stage_dir)[-1]
    save_loss_curve(stage_dir / "loss.png", history, f"base model L_simple ({cfg.preset} preset)")
    grid = sample(ema.eval(), make_sampler("ddim", cfg.diffusion.scheduler_kwargs()).to(device),
                  (16, cfg.unet.in_channels, cfg.data.resolution, cfg.data.resolution),
                  torch.arange(2).repeat_interleave(8), num_steps=25, generator=torch.Generator().manual_seed(0),
                  device=device)
    save_grid(stage_dir / "samples.png", from_model_range(grid), nrow=8, row_labels=list(CLASS_NAMES),
              title="base model samples (DDIM 25), one class per row")
    return final


# ----- the command line -------------------------------------------------------------------------------------
def build_config(args) -> RunConfig:
    cfg = get_preset(args.preset)
    if args.steps is not None:
        cfg.train.steps = args.steps
    if args.data_seed is not None:
        cfg.data.seed = args.data_seed
    if args.seed is not None:
        for part in (cfg.train, cfg.losses, cfg.groups, cfg.head):
            part.seed = args.seed
    return cfg


def prepare_run_dir(cfg: RunConfig, run_dir: Path, args) -> None:
    """Refuse to clobber another run; on --resume require the same config."""
    cfg_file = run_dir / "config.json"
    if cfg_file.exists():
        saved = read_json(cfg_file)["config"]
        if args.overwrite:
            import shutil
            shutil.rmtree(run_dir)
        elif not args.resume:
            raise SystemExit(f"error: run folder {run_dir} already exists; pass --resume to continue it, "
                             f"--overwrite to start again, or --out NEW_FOLDER")
        elif saved != RunConfig.from_dict(saved).to_dict() or saved != cfg.to_dict():
            raise SystemExit(f"error: {run_dir} was made with a different config (preset {saved.get('preset')!r}); "
                             f"resume with the same --preset and options, or use --out NEW_FOLDER")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(cfg_file, {"config": cfg.to_dict(), "command": sys.argv, "torch": torch.__version__,
                          "invdiff_min": __version__})


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
    p.add_argument("--data-seed", type=int, default=None, help="seed of the built-in dataset")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        cfg = build_config(args)
        device = pick_device(args.device)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    run_dir = Path(args.out or f"runs/{cfg.preset}")
    prepare_run_dir(cfg, run_dir, args)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    try:
        if args.stage in ("all", "base"):
            ckpt = train_base(cfg, run_dir, device, progress=not args.no_progress)
            print(f"[base] {ckpt}  (loss curve {run_dir / 'base/loss.png'}, samples {run_dir / 'base/samples.png'})")
    except (TrainingDiverged, CheckpointError) as e:
        raise SystemExit(f"error: {e}")
    print(f"done in {time.time() - t0:.0f} s; run folder {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
