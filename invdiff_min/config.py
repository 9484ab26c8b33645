"""Every setting of a run, as dataclasses with commented fields, and the presets `tiny`, `cpu`, `gpu`.

The whole `RunConfig` is saved into every checkpoint as JSON, so `sample.py --ckpt run/` rebuilds the
models from the checkpoint alone. InvDiff's stages (per-sample losses, group inference, guidance head) have
their settings here too, with the official code's values named next to our defaults.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass

from .amp import PRECISIONS
from .data import DataConfig
from .scheduler import BETA_SCHEDULES, DDPMScheduler
from .unet import UNetConfig


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"          # "linear" (Ho et al.) or "squaredcos_cap_v2" (cosine)
    variance_type: str = "fixed_small"     # DDPM sampler variance: "fixed_small" or "fixed_large"
    clip_sample: bool = True               # clip x0_hat to [-1, 1] while sampling

    def scheduler_kwargs(self) -> dict:
        return asdict(self)


@dataclass
class TrainConfig:
    """Stage A: the biased base model."""
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.995               # EMA of the weights; sampling uses the EMA weights
    p_uncond: float = 0.1                  # per-sample label dropout for classifier-free guidance
    checkpoint_every: int = 500
    init_from: str | None = None           # start from a converted checkpoint folder (python -m invdiff_min.convert)
    precision: str = "auto"                # network calls of every stage: auto (bf16 on CUDA and on CPUs with
    #                                        native bf16, else fp32), bf16, fp16 (CUDA, + GradScaler) or fp32 (exact)
    channels_last: bool = False            # channels_last memory layout (CUDA convolutions)
    compile: bool = False                  # torch.compile the networks being trained
    seed: int = 0


@dataclass
class LossConfig:
    """Stage B, part 1: per-sample denoising losses of the frozen base model."""
    num_draws: int = 8                     # M (t, eps) draws averaged per sample; official code: 1. 8 (was 16):
    #                                        the same groups on data seeds 1, 2 (NMI 1.000), half the time
    t_window: tuple[int, int] | None = None  # t drawn from [lo, hi); None = chosen label-free (`auto_t_window`)
    reference: str = "null"                # "null": loss under y / loss under the null label; "none": plain loss
    normalize_per_t: bool = True           # divide each loss by the mean loss at its t; official code: False
    target: str = "eps"                    # "eps" (the paper) or "x0" (what the official code compares with)
    batch_size: int = 500
    auto_window_draws: int = 2             # auto t window: draws per candidate window (was 4; same window)
    auto_window_samples: int = 400         # auto t window: samples it is estimated on
    profile_draws: int = 4                 # more than 2 classes: draws of the label profile P (groups.label_profile)
    #                                        that splits each class's high-loss group by attribute value; 0 = off
    seed: int = 0


@dataclass
class GroupConfig:
    """Stage B, part 2: bias-annotation inference, the paper's "maximize L_e" over the assignment W: the
    groups that spread the group risks R_g most (its variance term)."""
    method: str = "class_topk"             # "class_topk" (our default: per-class high-loss group), "class_margin"
    #                                        (the samples another label explains better, split by it),
    #                                        "class_label_topk" (each class split by that label, then the top
    #                                        losses of each part) or "official"
    top_fraction: float = 0.05             # class_topk: share of each class put in its high-loss group
    min_subgroup: float = 0.2              # class_topk with > 2 classes, and class_margin: least share of a
    #                                        high-loss group a sub-group needs (smaller ones join the others)
    num_groups: int = 8                    # official: G (8 or 16 in the released scripts)
    steps: int = 500                       # official: Adam steps on W
    lr: float = 0.01                       # official: Adam learning rate
    w_nz: float = 0.0                      # official: weight of the -min_{i,g} W_ig l_i term (0, 3, 5)
    within_class: bool = False             # official: normalise losses within each class first
    restarts: int = 1                      # official: keep the best of this many random initialisations
    hard: bool = False                     # official: replace soft rows by one-hot argmax
    seed: int = 0


@dataclass
class HeadConfig:
    """Stage C: the invariant guidance head G_psi and its training with L_e."""
    block_out_channels: tuple[int, ...] = (16, 24, 32)  # a small UNet from the same blocks (~21% of the cpu base)
    many_classes_width: int = 2            # more than 2 classes: block_out_channels times this (fit_to_data), chosen
    #                                        on data seed 1 (docs/results/kvalued/rule_recipe.md: the 16/24/32 head
    #                                        left a class stuck even with oracle groups); 1 = the width as given
    layers_per_block: int = 1
    attention_levels: tuple[bool, ...] = (False, False, False)
    norm_num_groups: int = 8
    mode: str = "additive"                 # "additive": eps_theta + w G (ours); "mix": r G + (1-r) eps_theta (official)
    mix_ratio: float = 0.5                 # official mix r (only for mode="mix")
    lam: float = 1.0                       # lambda of L_e = mean_g R_g + lambda Var_g R_g
    batch_sampling: str = "balanced"       # "balanced" over groups (ours) or "uniform" (official)
    paired_draws: bool = True              # balanced batches: groups share their (t, eps) draws slot by slot
    large_t_share: float = 0.0             # this share of the head's t draws from the upper half U{T/2..T-1}, the
    #                                        rest U{0..T-1} (0: the paper's uniform t, exactly)
    condition: str = "class"               # "class": G_psi(x, t, Phi(y)) (the paper); "class_group": Phi(y) +
    #                                        Phi'(g) with g the sample's inferred sub-group; at sampling each class's
    #                                        sub-groups in equal numbers (guidance.py; an option for K > 2 values)
    ema_decay: float = 0.995               # EMA of the head's weights, used for sampling (0 = no EMA)
    steps: int = 4500                      # chosen on data seeds 1, 2 (docs/tuning_head_steps.json); 1,500 left
    #                                        the head weak at w = 1, so w = 3 was needed and cost fidelity
    batch_size: int = 64
    lr: float = 1e-3
    lr_schedule: str = "constant"          # "constant", or "cosine": linear warm-up, then cosine decay to 10% of
    warmup_steps: int = 100                # lr (the base's schedule; cosine only). Shorter cosine recipes were
    #                                        tried on data seeds 1, 2 (docs/results/shapes/fast_recipe_*): 1,000
    #                                        steps at 5e-3 cut Bias by 86-95% but lost 5-8 points of fidelity
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    seed: int = 0


@dataclass
class EvalConfig:
    """How the summary judges a model: samples per class, sampler, strengths swept."""
    n_per_class: int = 200
    sampler: str = "ddpm"                  # DDPM-100 at w = 1.5: chosen on data seeds 1, 2 with the default recipe
    num_steps: int = 100                   # (docs/results/shapes/sampler_rule.md); DDIM-25 at w = 2 cut less
    guidance_scale: float = 1.0            # classifier-free guidance scale (1 = plain conditional)
    guidance_t_max: int | None = None      # class guidance only at t < this (a guidance interval; None: every t)
    head_outside_cfg: bool = False         # the head's push w G_psi outside the class guidance (guidance.py)
    strength: float = 1.5                  # InvDiff guidance strength w of the summary (with the sampler above)
    seed: int = 1234
    judge_steps: int = 400                 # training steps of the class/attribute classifiers (real datasets)


@dataclass
class RunConfig:
    preset: str = "cpu"
    data: DataConfig = field(default_factory=DataConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    groups: GroupConfig = field(default_factory=GroupConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return _from_dict(cls, d)


def _from_dict(cls, d: dict, where: str = ""):
    """Rebuild a (nested) dataclass from a dict (parsed JSON), refusing unknown keys and values of the wrong
    type with a message naming the field (`where` is the section's dotted path)."""
    if not isinstance(d, dict):
        raise ValueError(f"{where or cls.__name__} must be an object of settings, got {json.dumps(d)[:60]}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {where or cls.__name__} fields {unknown}; known: {sorted(known)}")
    hints, kwargs = typing.get_type_hints(cls), {}
    for name, value in d.items():
        path = f"{where}.{name}" if where else name
        if is_dataclass(hints[name]):
            kwargs[name] = _from_dict(hints[name], value, path)
        else:
            kwargs[name] = _fit(value, hints[name], path)
    return cls(**kwargs)


def add_sampling_flags(parser) -> None:
    """A script's flags over the run's classifier-free guidance of every model it samples (None: the run's);
    apply them with `with_eval`."""
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance scale s of every model sampled: 1 = plain conditional, "
                             "0 = the null-label model (plus the head's push when it is outside), > 1 stronger "
                             "(default: the run's eval.guidance_scale; 1 for a checkpoint outside a run)")
    parser.add_argument("--guidance-t-max", type=int, default=None,
                        help="class guidance only at timesteps t below this, a guidance interval (default: the "
                             "run's eval.guidance_t_max; every t)")
    parser.add_argument("--head-outside-cfg", action=argparse.BooleanOptionalAction, default=None,
                        help="add the head's push w G_psi outside the class guidance instead of inside its "
                             "conditional branch (default: the run's eval.head_outside_cfg; off)")


def with_eval(cfg: RunConfig, **values) -> RunConfig:
    """Set a script's sampling flags on `cfg` in place (eval fields; None keeps the run's), e.g. guidance_scale=3,
    then check the whole config (a ValueError names the flags); returns `cfg`."""
    flags = {name: "--" + name.replace("_", "-") for name, value in values.items() if value is not None}
    for name, flag in flags.items():
        setattr(cfg.eval, name, _fit(values[name], typing.get_type_hints(EvalConfig)[name], flag))
    try:
        check_config(cfg)
    except ValueError as e:
        raise ValueError(f"{e} (from {' / '.join(flags.values())})" if flags else str(e)) from None
    return cfg


def apply_overrides(cfg: RunConfig, items: list[str]) -> RunConfig:
    """`--set SECTION.FIELD=VALUE` for any field of the config, e.g. head.lam=2, losses.num_draws=16,
    losses.t_window=[500,800], head.block_out_channels=[16,32]. VALUE is read as JSON when it parses (numbers,
    lists, true/false, null), else as a string; it must fit the field's type. Unknown names and wrong types
    are refused with the list of what exists."""
    for item in items:
        path, sep, text = item.partition("=")
        if not sep or not path:
            raise ValueError(f"--set takes SECTION.FIELD=VALUE (e.g. head.lam=2), got {item!r}")
        *sections, name = path.strip().split(".")
        target = cfg
        for section in sections:
            if not is_dataclass(target) or section not in {f.name for f in fields(target)}:
                known = sorted(f.name for f in fields(target)) if is_dataclass(target) else []
                raise ValueError(f"--set {path}: no config section {section!r}; sections: {', '.join(known)}")
            target = getattr(target, section)
        if not is_dataclass(target) or name not in {f.name for f in fields(target)}:
            known = sorted(f.name for f in fields(target)) if is_dataclass(target) else []
            raise ValueError(f"--set {path}: no field {name!r} in {'.'.join(sections) or 'the config'}; fields: "
                             f"{', '.join(known)}")
        hint = typing.get_type_hints(type(target))[name]
        if is_dataclass(hint):
            raise ValueError(f"--set {path}: {name} is a section; set one of its fields, e.g. {path}.FIELD=VALUE")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        setattr(target, name, _fit(value, hint, f"--set {path}"))
    return cfg


def _fit(value, hint, where: str):
    """`value` (parsed JSON) as the type `hint` of a config field, or a ValueError naming both."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    for option in options:
        origin = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return None
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool) and \
                math.isfinite(value):
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if origin is dict and isinstance(value, dict):
            return value
        if origin is tuple and isinstance(value, (list, tuple)):
            args = typing.get_args(option)
            inner = args[0] if len(args) == 2 and args[1] is Ellipsis else None
            if inner is None and len(args) != len(value):
                continue
            return tuple(_fit(v, inner or a, where) for v, a in zip(value, args if inner is None else value))
    raise ValueError(f"{where} must be {' or '.join(_kind(o) for o in options)}, got {json.dumps(value)}")


def _kind(hint) -> str:
    """A config field's type in words, for error messages."""
    origin, args = typing.get_origin(hint) or hint, typing.get_args(hint)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object",
            tuple: "a list", type(None): "null"}.get(origin, str(hint))


# ----- the numbers a run may be given, checked once the config is assembled (flags, --set, presets) -------
MAX_STEPS = 10_000_000                     # beyond any run this project is meant for; catches 1e12 typos
MAX_SIDE = 512                             # activations grow with the square of the side: 512 already needs GBs
MAX_SAMPLES = 10_000_000
MAX_WIDTH = 4096                           # channels per level: weights grow with its square
GROUP_METHODS = ("class_topk", "class_margin", "class_label_topk", "official")
HEAD_CONDITIONS = ("class", "class_group")   # what Phi of the guidance head reads (HeadConfig.condition)
PROFILE_METHODS = ("class_margin", "class_label_topk")   # group methods that read the label profile
CHOICES = {  # "section.field": the words it may hold (each read where the run uses it, often after training)
    "groups.method": GROUP_METHODS, "head.condition": HEAD_CONDITIONS, "head.lr_schedule": ("constant", "cosine"),
    "head.mode": ("additive", "mix"), "head.batch_sampling": ("balanced", "uniform"),
    "losses.target": ("eps", "x0"), "losses.reference": ("null", "none"), "eval.sampler": ("ddim", "ddpm"),
    "train.precision": tuple(PRECISIONS), "diffusion.beta_schedule": BETA_SCHEDULES,
    "diffusion.variance_type": DDPMScheduler.VARIANCE_TYPES,
}
FLAG = {"train.steps": "--steps", "head.steps": "--head-steps", "train.lr": "--lr", "head.lr": "--head-lr",
        "data.resolution": "--resolution", "data.num_samples": "--num-samples", "data.seed": "--data-seed",
        "data.aligned_fraction": "--aligned-fraction", "train.seed": "--seed"}
RANGES = {  # "section.field": (low, high, why); ints unless the default is a float
    "train.steps": (1, MAX_STEPS, "training steps"), "head.steps": (1, MAX_STEPS, "training steps"),
    "train.warmup_steps": (0, MAX_STEPS, "warm-up steps"), "head.warmup_steps": (0, MAX_STEPS, "warm-up steps"),
    "train.batch_size": (1, 65_536, "images per step"), "head.batch_size": (1, 65_536, "images per step"),
    "losses.batch_size": (1, 65_536, "images per network call"), "losses.num_draws": (1, 10_000, "draws M"),
    "train.checkpoint_every": (1, MAX_STEPS, "steps"), "head.checkpoint_every": (1, MAX_STEPS, "steps"),
    "train.lr": (1e-12, 1.0, "a learning rate"), "head.lr": (1e-12, 1.0, "a learning rate"),
    "train.ema_decay": (0.0, 0.99999, "an EMA decay; 1 would never move the EMA off its start"),
    "head.ema_decay": (0.0, 0.99999, "an EMA decay; 1 would never move the EMA off its start"),
    "train.p_uncond": (0.0, 1.0, "a probability"), "head.lam": (0.0, 1e6, "lambda of L_e"),
    "groups.top_fraction": (1e-6, 0.999999, "a share of each class"), "groups.num_groups": (1, 100_000, "groups"),
    "losses.profile_draws": (0, 10_000, "draws of the label profile (0 = off)"),
    "groups.min_subgroup": (0.0, 1.0, "a share of a high-loss group"),
    "head.many_classes_width": (1, 16, "a whole multiple of the head's channels"),
    "unet.layers_per_block": (1, 64, "ResNet blocks per level"), "head.layers_per_block": (1, 64, "ResNet blocks"),
    "head.large_t_share": (0.0, 1.0, "a share of the head's t draws"),
    "data.resolution": (8, MAX_SIDE, "the image side; memory grows with its square"),
    "data.num_samples": (2, MAX_SAMPLES, "training images"),
    "eval.n_per_class": (1, 100_000, "samples per class"),
    "eval.num_steps": (1, 100_000, "sampling steps"), "eval.strength": (0.0, 20.0, "the guidance strength w"),
    "eval.guidance_scale": (0.0, 50.0, "the CFG scale"), "data.aligned_fraction": (0.0, 1.0, "a share"),
    "eval.guidance_t_max": (0, 100_000, "a timestep: class guidance at t below it"),
    **{f"{s}.seed": (0, 2**31 - 1, "a seed") for s in ("data", "train", "losses", "groups", "head", "eval")},
    "data.eval_per_group": (0, MAX_SAMPLES, "held-out images per cell (0: the dataset's own split)"),
    "unet.dropout": (0.0, 0.999, "a dropout probability"), "unet.norm_eps": (1e-12, 1.0, "GroupNorm's epsilon"),
    "unet.attention_head_dim": (1, 65_536, "channels per attention head"),
    "unet.time_embed_dim": (1, 65_536, "the time embedding's width"),
    "diffusion.num_train_timesteps": (2, 100_000, "the training timesteps T"),
    "diffusion.beta_start": (1e-12, 0.999, "a noise variance beta"),
    "diffusion.beta_end": (1e-12, 0.999, "a noise variance beta"),
    "train.weight_decay": (0.0, 10.0, "AdamW's weight decay"),
    # clip_grad_norm_ takes any bound, but 0 zeroes every gradient and a negative bound
    # flips their sign (gradient ascent); both train silently, so a positive bound is required
    "train.grad_clip": (1e-6, 1e12, "a positive gradient-norm bound"),
    "head.grad_clip": (1e-6, 1e12, "a positive gradient-norm bound"),
    "losses.auto_window_draws": (1, 10_000, "draws per t of the window search"),
    "losses.auto_window_samples": (1, MAX_SAMPLES, "images of the window search"),
    "groups.steps": (1, MAX_STEPS, "the grouper's steps"), "groups.lr": (1e-12, 100.0, "the grouper's learning rate"),
    "groups.w_nz": (0.0, 1e6, "the weight of the grouper's min term"), "groups.restarts": (1, 1_000, "restarts"),
    "head.mix_ratio": (0.0, 1.0, "a share"), "eval.judge_steps": (1, MAX_STEPS, "the judges' training steps"),
}


def check_strengths(values, flag: str) -> None:
    """Refuse a guidance strength w outside eval.strength's range (NaN and infinities too), naming the flag."""
    low, high, why = RANGES["eval.strength"]
    bad = [w for w in values if not (isinstance(w, (int, float)) and math.isfinite(w) and low <= w <= high)]
    if bad:
        raise ValueError(f"{flag} must be a number in [{low:g}, {high:g}] ({why}), got {bad[0]!r}")


def check_config(cfg: RunConfig) -> None:
    """Refuse a number no run can use, naming the field (and its flag) and the range with its reason; a word
    that is not one of the field's choices; and the combinations that cannot work (an image side the UNet
    cannot halve, a t window outside [0, T), a width GroupNorm cannot split)."""
    for key, (low, high, why) in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None:
            continue
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric or not math.isfinite(value) or not low <= value <= high:
            where = f"{key}" + (f" ({FLAG[key]})" if key in FLAG else "")
            span = f"{low:,}, {high:,}" if isinstance(low, int) and isinstance(high, int) else f"{low:g}, {high:g}"
            raise ValueError(f"{where} must be a number in [{span}] ({why}), got {value!r}")
    # the base UNet as configured, and the head's as InvariantGuidance.small builds it (the base's sinusoid), now
    head = dict(block_out_channels=cfg.head.block_out_channels, attention_levels=cfg.head.attention_levels,
                norm_num_groups=cfg.head.norm_num_groups,
                freq_shift=cfg.unet.freq_shift if cfg.head.mode == "additive" else 0)   # "mix": a copy of the base
    for name, net in (("unet", asdict(cfg.unet)), ("head", head)):
        try:
            UNetConfig(**net)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}: {e}") from None
        if max(net["block_out_channels"]) > MAX_WIDTH:
            raise ValueError(f"{name}.block_out_channels {list(net['block_out_channels'])}: each width must be at "
                             f"most {MAX_WIDTH:,} channels (memory grows with its square)")
    nets = [("the UNet", cfg.unet.block_out_channels)]
    if cfg.head.mode == "additive":                              # "mix": the head is a copy of the base UNet
        nets.append(("the head (head.block_out_channels)", cfg.head.block_out_channels))
    for name, channels in nets:
        if cfg.data.resolution % 2 ** (len(channels) - 1):
            raise ValueError(f"data.resolution (--resolution) {cfg.data.resolution} must be a multiple of "
                             f"{2 ** (len(channels) - 1)}: {name} halves the image {len(channels) - 1} times")
    T = cfg.diffusion.num_train_timesteps
    window = cfg.losses.t_window
    if window is not None and not (len(window) == 2 and 0 <= window[0] < window[1] <= T):
        raise ValueError(f"losses.t_window must be [lo, hi) with 0 <= lo < hi <= {T}, got {list(window)}")
    for key, words in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in words:
            raise ValueError(f"{key} must be one of {', '.join(words)}, got {value!r}")
    if cfg.groups.method in PROFILE_METHODS and cfg.losses.profile_draws == 0:
        raise ValueError(f"groups.method {cfg.groups.method!r} reads the label profile: set losses.profile_draws "
                         f"above 0")
    if cfg.eval.guidance_t_max is not None and cfg.eval.guidance_t_max > T:
        raise ValueError(f"eval.guidance_t_max must be at most the {T} training timesteps (class guidance at t below "
                         f"it; leave it unset for every t), got {cfg.eval.guidance_t_max}")
    if cfg.eval.head_outside_cfg and cfg.head.mode != "additive":
        raise ValueError("eval.head_outside_cfg needs head.mode 'additive' (the 'mix' mode has no separate push)")
    if cfg.eval.num_steps > T:
        raise ValueError(f"eval.num_steps must be at most the {T} training timesteps, got {cfg.eval.num_steps}")


def fit_to_data(cfg: RunConfig, num_classes: int, resolution: int, channels: int | None = None) -> RunConfig:
    """What only the data decides, made concrete before the config is saved: the UNet's classes and side, and
    for more than two classes the head widened by head.many_classes_width (then recorded as 1, so fitting
    again, or rebuilding from the saved config, changes nothing). UNet channels other than the images'
    `channels`, and fewer evaluation samples than the quality measures need, are refused."""
    if channels is not None and (cfg.unet.in_channels, cfg.unet.out_channels) != (channels, channels):
        raise ValueError(f"unet.in_channels / unet.out_channels are {cfg.unet.in_channels} / "
                         f"{cfg.unet.out_channels}, but the images of {cfg.data.name} have {channels} channels: "
                         f"leave both at {channels}")
    if cfg.eval.n_per_class * num_classes < 4:
        raise ValueError(f"eval.n_per_class {cfg.eval.n_per_class} gives {cfg.eval.n_per_class * num_classes} "
                         f"samples in all, and the quality measures need 4: set eval.n_per_class to "
                         f"{-(-4 // num_classes)} or more (100 or more for numbers worth reading)")
    cfg.unet.num_classes, cfg.unet.sample_size = num_classes, resolution
    if num_classes > 2 and cfg.head.many_classes_width != 1:
        cfg.head.block_out_channels = tuple(c * cfg.head.many_classes_width for c in cfg.head.block_out_channels)
        cfg.head.many_classes_width = 1
    return cfg


def _tiny() -> RunConfig:
    """CI-sized: every stage runs in seconds; the images are not meant to look like anything."""
    return RunConfig(
        preset="tiny",
        data=DataConfig(resolution=16, num_samples=256, eval_per_group=16),
        unet=UNetConfig(sample_size=16, block_out_channels=(16, 32), attention_levels=(False, True),
                        layers_per_block=1, norm_num_groups=8, num_classes=2),
        train=TrainConfig(steps=30, batch_size=16, warmup_steps=5, checkpoint_every=15),
        losses=LossConfig(num_draws=2, batch_size=256, auto_window_draws=2, auto_window_samples=128),
        groups=GroupConfig(top_fraction=0.1, steps=50),
        head=HeadConfig(block_out_channels=(8, 16), attention_levels=(False, False), norm_num_groups=4, steps=20,
                        lr_schedule="cosine", warmup_steps=5, batch_size=16, checkpoint_every=10),
        eval=EvalConfig(n_per_class=4, sampler="ddim", num_steps=5, strength=2.0, judge_steps=40),
    )


def _cpu() -> RunConfig:
    """The default: recognisable, clearly biased samples on 2 CPU cores in about 10 minutes for the base."""
    return RunConfig(
        preset="cpu",
        data=DataConfig(resolution=16, num_samples=4000),
        unet=UNetConfig(sample_size=16, block_out_channels=(32, 64, 64), attention_levels=(False, False, False),
                        mid_attention=False, layers_per_block=1, norm_num_groups=16, num_classes=2),
        train=TrainConfig(steps=2000, batch_size=64),
        head=HeadConfig(),
    )


def _gpu() -> RunConfig:
    """For CUDA: 32x32, larger model and budget."""
    return RunConfig(
        preset="gpu",
        data=DataConfig(resolution=32, num_samples=20000, eval_per_group=500),
        unet=UNetConfig(sample_size=32, block_out_channels=(128, 256, 256), attention_levels=(False, True, False),
                        layers_per_block=2, num_classes=2, dropout=0.1),
        train=TrainConfig(steps=20000, batch_size=128, lr=2e-4, warmup_steps=500, ema_decay=0.9995,
                          checkpoint_every=2000),
        losses=LossConfig(num_draws=32, batch_size=1000),
        head=HeadConfig(block_out_channels=(64, 128), attention_levels=(False, False), layers_per_block=2,
                        norm_num_groups=32, steps=5000, batch_size=128, lr=2e-4),
        eval=EvalConfig(n_per_class=500, sampler="ddim", num_steps=50, strength=2.0),   # not part of the rule above
    )


PRESETS = {"tiny": _tiny, "cpu": _cpu, "gpu": _gpu}


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name]())


def pick_device(name: str = "auto"):
    """--device: "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:1", ... with a clear error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for CUDA but torch.cuda.is_available() is False; use --device cpu")
    return device
