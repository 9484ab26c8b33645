"""Our UNet against diffusers' UNet2DModel of the identical configuration and batch, in one process.

    python benchmarks/unet_speed.py                       # the cpu preset's UNet, batch 64, 16x16
    python benchmarks/unet_speed.py --preset gpu --batch 32 --json out.json
    python benchmarks/unet_speed.py --profile             # + where a training step's CPU time goes, both models
    python benchmarks/unet_speed.py --channels-last       # both models and the input in channels_last

Times a training step (forward, backward, AdamW step) and a no-grad forward pass, alternating the two
models to share the machine's noise, after a warm-up; prints medians and the ratio diffusers / ours
(> 1 means ours is faster). Asserts nothing: a benchmark, not a test. diffusers is a test-only dependency.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def diffusers_twin(cfg):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=cfg.sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in cfg.attention_levels[::-1]),
        attention_head_dim=cfg.attention_head_dim, norm_num_groups=cfg.norm_num_groups, norm_eps=cfg.norm_eps,
        downsample_padding=cfg.downsample_padding, flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift,
        add_attention=cfg.mid_attention, num_class_embeds=cfg.num_classes + 1 if cfg.num_classes else None,
        dropout=cfg.dropout)


def main() -> None:
    from invdiff_min.config import get_preset
    from invdiff_min.unet import UNet, count_parameters

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="autocast the network calls (CUDA; the losses stay float32)")
    p.add_argument("--channels-last", action="store_true",
                   help="both models' weights and the input in channels_last memory format (a generic setting)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (a generic setting)")
    p.add_argument("--profile", action="store_true",
                   help="also profile training steps of both models (torch.profiler, CPU) and print the tables")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--top", type=int, default=15, help="ops per profile table")
    p.add_argument("--json", default=None, help="also write the table here")
    args = p.parse_args()

    cfg = get_preset(args.preset)
    device = torch.device(args.device)
    torch.manual_seed(0)
    ours = UNet(cfg.unet).to(device)
    ref = diffusers_twin(cfg.unet).to(device)
    ours.load_state_dict(ref.state_dict(), strict=True)       # same weights, so the same arithmetic
    res = cfg.data.resolution
    x = torch.randn(args.batch, cfg.unet.in_channels, res, res, device=device)
    if args.channels_last:
        ours, ref = ours.to(memory_format=torch.channels_last), ref.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    y = torch.randint(0, cfg.unet.num_classes or 1, (args.batch,), device=device) if cfg.unet.num_classes else None
    target = torch.randn_like(x)
    opts = {"ours": torch.optim.AdamW(ours.parameters(), 1e-4), "diffusers": torch.optim.AdamW(ref.parameters(), 1e-4)}
    from invdiff_min.amp import autocast

    def under_autocast(fn):
        def call():
            with autocast(device, args.precision):
                return fn().float()
        return call
    run_ours, run_ref = (torch.compile(ours), torch.compile(ref)) if args.compile else (ours, ref)
    calls = {"ours": under_autocast(lambda: run_ours(x, t, y)),
             "diffusers": under_autocast(lambda: run_ref(x, t, class_labels=y).sample)}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step(name):
        loss = (calls[name]() - target).pow(2).mean()
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()

    def forward(name):
        with torch.no_grad():
            calls[name]()

    times = {(kind, name): [] for kind in ("train_step", "forward") for name in calls}
    for kind, fn in (("train_step", train_step), ("forward", forward)):
        for i in range(args.warmup + args.repeats):
            for name in ("ours", "diffusers") if i % 2 == 0 else ("diffusers", "ours"):   # alternate the order
                sync()
                t0 = time.perf_counter()
                fn(name)
                sync()
                if i >= args.warmup:
                    times[(kind, name)].append(time.perf_counter() - t0)

    rows = []
    for kind in ("train_step", "forward"):
        ours_ms = statistics.median(times[(kind, "ours")]) * 1e3
        ref_ms = statistics.median(times[(kind, "diffusers")]) * 1e3
        rows.append({"what": kind, "ours_ms": round(ours_ms, 2), "diffusers_ms": round(ref_ms, 2),
                     "ratio_diffusers_over_ours": round(ref_ms / ours_ms, 3),
                     "ours_img_per_s": round(args.batch / ours_ms * 1e3, 1)})
    info = {"device": str(device), "threads": torch.get_num_threads(), "precision": args.precision,
            "batch": args.batch, "channels_last": args.channels_last, "compile": args.compile,
            "resolution": res, "preset": args.preset, "parameters": count_parameters(ours),
            "repeats": args.repeats, "torch": torch.__version__}
    if device.type == "cuda":
        info["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    print(f"{'':<12}{'ours ms':>10}{'diffusers ms':>14}{'diffusers/ours':>16}{'ours img/s':>12}")
    for r in rows:
        print(f"{r['what']:<12}{r['ours_ms']:>10.1f}{r['diffusers_ms']:>14.1f}{r['ratio_diffusers_over_ours']:>16.3f}"
              f"{r['ours_img_per_s']:>12.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=2)
    if args.profile:
        for name in ("ours", "diffusers"):
            print(f"\n{name}: {args.profile_steps} training steps, batch {args.batch}, {res}x{res}, "
                  f"{torch.get_num_threads()} thread(s), ms per step")
            print(profile_table(lambda: calls[name](), target, opts[name], args.profile_steps, args.top))


PHASES = ("forward+loss", "backward", "optimizer")


def profile_table(call, target, opt, steps: int, top: int) -> str:
    """Markdown tables: the step's phases (CPU total), then the `top` ops by self CPU time, per step."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function(PHASES[0]):
                loss = (call() - target).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            with record_function(PHASES[1]):
                loss.backward()
            with record_function(PHASES[2]):
                opt.step()
    events = prof.key_averages()
    phases = {e.key: e.cpu_time_total / 1e3 / steps for e in events if e.key in PHASES}
    step = sum(phases.values())
    lines = ["| phase | ms/step | % |", "|---|---:|---:|"]
    lines += [f"| {k} | {phases.get(k, 0.0):.1f} | {100 * phases.get(k, 0.0) / step:.1f} |" for k in PHASES]
    lines += [f"| step | {step:.1f} | 100 |", "",
              "| op (self CPU) | ms/step | % of step | calls/step |", "|---|---:|---:|---:|"]
    ops = sorted((e for e in events if e.key not in PHASES), key=lambda e: e.self_cpu_time_total, reverse=True)
    for e in ops[:top]:
        ms = e.self_cpu_time_total / 1e3 / steps
        lines.append(f"| {e.key} | {ms:.1f} | {100 * ms / step:.1f} | {e.count // steps} |")
    rest = sum(e.self_cpu_time_total for e in ops[top:]) / 1e3 / steps
    lines.append(f"| (all other ops) | {rest:.1f} | {100 * rest / step:.1f} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
