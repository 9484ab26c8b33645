"""Pretrained DDPM weights in: a diffusers `UNet2DModel` folder or an original-DDPM state dict -> our `UNet`.

Two source formats:
  * diffusers: a folder with `config.json` (a `UNet2DModel` config) and `diffusion_pytorch_model.safetensors`
    (or `.bin`), e.g. google/ddpm-cifar10-32; a pipeline folder with `unet/` and `scheduler/` works too.
    Our module names are diffusers' (see `unet.py`), so the only renaming is the legacy attention names
    (`query/key/value/proj_attn` -> `to_q/to_k/to_v/to_out.0`).
  * original DDPM: the PyTorch port of Ho et al.'s TF checkpoints (pesser/pytorch_diffusion `model-*.ckpt`),
    keys like `down.0.block.0.conv1.weight`, renamed by the table `ORIGINAL_DDPM_BLOCKS` / `ORIGINAL_DDPM_LAYERS`.

Nothing is unpickled: `.bin` / `.ckpt` files are read with `torch.load(weights_only=True)`, which only admits
tensors and plain containers. Weights holding NaN or Inf are refused before anything is built, so no checkpoint
is ever written from them. Every path ends in `load_state_into` (strict `load_state_dict`) and the command
below ends in a numeric check of the written checkpoint (which also verifies its checksums):

    python -m invdiff_min.convert path/to/ddpm-cifar10-32 runs/cifar10-converted
"""
from __future__ import annotations

import argparse
import json
from pickle import UnpicklingError  # the error torch.load(weights_only=True) raises
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from einops import rearrange
from safetensors import SafetensorError
from safetensors.torch import load_file

from .checkpoint import list_checkpoints, load_state_into, load_unet, non_finite, save_checkpoint
from .errors import exit_on_error
from .scheduler import BETA_SCHEDULES, DDPMScheduler
from .unet import UNet, UNetConfig

DIFFUSERS = "diffusers"
ORIGINAL_DDPM = "original-DDPM"

# Ho et al.'s schedule, used when a source carries no scheduler config (the original DDPM never does).
HO_ET_AL_DIFFUSION = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                      "variance_type": "fixed_large", "clip_sample": True}


class ConversionError(ValueError):
    """A source this converter cannot read or does not support; the message says what to do instead."""


@dataclass
class Source:
    """What a source holds, in our terms: the UNet config, the weights under our names, and the schedule."""
    path: Path
    format: str                                  # DIFFUSERS or ORIGINAL_DDPM
    config: UNetConfig
    state_dict: dict[str, torch.Tensor]          # our module names
    weights: str                                 # which weights were taken (EMA or raw), for the user
    diffusion: dict = field(default_factory=lambda: dict(HO_ET_AL_DIFFUSION))
    diffusion_from: str = "Ho et al.'s defaults (the source has no scheduler config)"


# ----- reading tensors without unpickling ----------------------------------------------------------------
def read_tensor_file(path: Path):
    """A .safetensors file, or a torch file read with `weights_only=True` (tensors and plain containers only:
    a file holding any other Python object is refused before anything in it runs)."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConversionError(f"could not read {path} as a safetensors file ({why}); it is truncated or "
                                  f"corrupt: download it again") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except UnpicklingError as e:   # torch's message names the object, e.g. "GLOBAL io.open"
        m = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed global|$)", str(e), re.M)
        what = m[1] if m else "an object torch's weights-only loader does not admit"
        raise ConversionError(
            f"refusing to unpickle {path}: it holds Python objects other than tensors ({what}), and loading them "
            f"could run arbitrary code. If you trust the file, re-save just its tensors in a separate environment "
            f"(safetensors.torch.save_file(state_dict, 'weights.safetensors')) and convert that") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise ConversionError(f"could not read {path} as a torch tensor file ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); is it complete?") from None


def read_config(path: Path) -> dict:
    """A source's JSON config file as a dict; a file that is not a JSON object is refused by name."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({e}); download it again or repair it") from None
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path} holds a JSON {type(cfg).__name__}, not a config object; pass the folder of "
                              f"a diffusers model, whose config.json is an object of settings")
    return cfg


def refuse_non_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """No checkpoint is written from weights holding NaN or Inf: they would only ever sample NaN."""
    bad = non_finite(tensors)
    if bad:
        raise ConversionError(f"{path}: {len(bad)} of its {len(tensors)} weight tensors hold NaN or Inf "
                              f"({', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}); the file is damaged or the "
                              f"model had diverged when it was saved: download it again or convert another "
                              f"checkpoint")


# Where training checkpoints keep their weights, in order of preference: EMA first, since the EMA weights
# are the ones Ho et al. (and everyone since) sample with.
WEIGHT_CONTAINERS = ("ema", "ema_state_dict", "ema_model", "state_dict", "model", "model_state_dict")
EMA_KEY_PREFIXES = ("ema.", "ema_model.")           # EMA copy stored beside the raw weights in one flat dict
WRAPPER_KEY_PREFIXES = ("module.", "model.")        # DataParallel / wrapper prefix on every key


def select_weights(obj, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The flat {name: tensor} dict to convert from a loaded checkpoint, EMA weights preferred, and a phrase
    saying which weights those are."""
    trail, is_ema = [], False
    while isinstance(obj, dict) and any(isinstance(v, dict) for v in obj.values()):
        name = next((n for n in WEIGHT_CONTAINERS if isinstance(obj.get(n), dict)), None)
        if name is None:
            raise ConversionError(f"{path} is a dict of dicts without weights under any of {WEIGHT_CONTAINERS} "
                                  f"(top-level keys: {sorted(map(str, obj))[:10]}); save the model's state_dict alone")
        trail.append(f"sub-dict {name!r}")
        is_ema |= name.startswith("ema")
        obj = obj[name]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict; save the model's "
                              f"state_dict (a dict of tensors) alone")
    tensors = {str(k): v for k, v in obj.items() if torch.is_tensor(v)}
    if not tensors:
        raise ConversionError(f"{path} holds no tensors")
    for prefix in EMA_KEY_PREFIXES:
        if any(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            trail.append(f"keys prefixed {prefix!r}")
            is_ema = True
            break
    for prefix in WRAPPER_KEY_PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    where = ", ".join(trail) or "top level"
    if is_ema:
        return tensors, f"EMA weights ({where})"
    return tensors, (f"the file's weights ({where}); no separate EMA copy in it (pesser ships the EMA weights as "
                     f"their own file, ema_diffusion_*_model/model-*.ckpt)")


def squeeze_1x1(w: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv kernel used as a per-pixel linear map -> nn.Linear weight: (C_out, C_in, 1, 1) -> (C_out, C_in)."""
    return rearrange(w, "o i 1 1 -> o i") if w.ndim == 4 else w


def mismatch_label(src: Path, fmt: str) -> str:
    return f"weights from {src} (read as the {fmt} format, renamed to our module names)"


# ----- format (a): diffusers UNet2DModel -----------------------------------------------------------------
# Legacy diffusers attention names (before diffusers 0.14) -> today's, inside `...attentions.{j}.`
DIFFUSERS_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

# UNet2DModel settings our UNet implements one way only: setting -> the value we support (also diffusers'
# default, so a config that omits the setting is fine).
DIFFUSERS_FIXED = {
    "center_input_sample": False,          # True maps x -> 2x - 1 inside the model
    "time_embedding_type": "positional",   # "fourier" / "learned": another timestep embedding (score-SDE)
    "mid_block_type": "UNetMidBlock2D",    # None: no mid block
    "mid_block_scale_factor": 1,           # rescales the mid block's residuals
    "downsample_type": "conv",             # "resnet": BigGAN-style resampling blocks
    "upsample_type": "conv",
    "act_fn": "silu",
    "resnet_time_scale_shift": "default",  # "scale_shift": AdaGN (Dhariwal & Nichol), another ResNet block
    "class_embed_type": None,              # "timestep" / "identity": labels embedded another way
}

# UNet2DModel setting -> our UNetConfig field, with diffusers' default for a config that omits it.
DIFFUSERS_TO_OURS = [
    ("in_channels", "in_channels", 3),
    ("out_channels", "out_channels", 3),
    ("block_out_channels", "block_out_channels", (224, 448, 672, 896)),
    ("layers_per_block", "layers_per_block", 2),
    ("attention_head_dim", "attention_head_dim", 8),     # null: one head of all channels (diffusers: heads = C // dim)
    ("add_attention", "mid_attention", True),
    ("dropout", "dropout", 0.0),
    ("norm_num_groups", "norm_num_groups", 32),
    ("norm_eps", "norm_eps", 1e-5),
    ("downsample_padding", "downsample_padding", 1),
    ("flip_sin_to_cos", "flip_sin_to_cos", True),
    ("freq_shift", "freq_shift", 0),
    ("time_embedding_dim", "time_embed_dim", None),
]
# Read separately below: sample_size, down/up_block_types (-> attention_levels), num_class_embeds
# (-> num_classes), attn_norm_num_groups (checked). num_train_timesteps only matters for "learned" embeddings.
DIFFUSERS_OTHER = {"sample_size", "down_block_types", "up_block_types", "num_class_embeds",
                   "attn_norm_num_groups", "num_train_timesteps"}
DOWN_BLOCKS = {"DownBlock2D": False, "AttnDownBlock2D": True}    # block type -> has attention
UP_BLOCKS = {"UpBlock2D": False, "AttnUpBlock2D": True}


def unet_config_from_diffusers(cfg: dict, where: Path) -> UNetConfig:
    """Our UNetConfig from a diffusers UNet2DModel config.json; anything we do not implement is refused."""
    def refuse(what: str) -> ConversionError:
        return ConversionError(f"{where}: {what}; invdiff-min's UNet implements the DDPM UNet of Ho et al. "
                               f"(DownBlock2D/AttnDownBlock2D, positional timesteps, additive time embedding)")

    if "_class_name" not in cfg and isinstance(cfg.get("config"), dict) and "unet" in cfg["config"]:
        raise ConversionError(f"{where} is an invdiff-min run config, not a diffusers UNet2DModel config: "
                              f"invdiff-min runs need no conversion; use the run folder directly "
                              f"(sample.py --ckpt {where.parent}, train.py --init-from {where.parent})")
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise refuse(f"_class_name is {cfg['_class_name']!r}, only UNet2DModel can be converted")
    known = {k for k, *_ in DIFFUSERS_TO_OURS} | set(DIFFUSERS_FIXED) | DIFFUSERS_OTHER
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in known)
    if unknown:
        raise refuse(f"unknown UNet2DModel settings {unknown} (this converter knows those of diffusers 0.42)")
    for key, supported in DIFFUSERS_FIXED.items():
        if cfg.get(key, supported) != supported:
            raise refuse(f"{key}={cfg[key]!r} is not supported (only {supported!r})")

    ours = {field_: cfg.get(key, default) for key, field_, default in DIFFUSERS_TO_OURS}
    ours["block_out_channels"] = tuple(ours["block_out_channels"])
    if ours["norm_num_groups"] is None:
        raise refuse("norm_num_groups=null is not supported; give the GroupNorm group count")
    attn_groups = cfg.get("attn_norm_num_groups")
    if attn_groups is not None and attn_groups != ours["norm_num_groups"]:
        raise refuse(f"attn_norm_num_groups={attn_groups} differs from norm_num_groups={ours['norm_num_groups']}; "
                     f"our attention uses the same GroupNorm as the ResNets")

    down = list(cfg.get("down_block_types", ("DownBlock2D",) + ("AttnDownBlock2D",) * 3))
    up = list(cfg.get("up_block_types", ("AttnUpBlock2D",) * 3 + ("UpBlock2D",)))
    bad = [b for b in down if b not in DOWN_BLOCKS] + [b for b in up if b not in UP_BLOCKS]
    if bad:
        raise refuse(f"block types {bad} are not supported (only {list(DOWN_BLOCKS)} and {list(UP_BLOCKS)})")
    levels = len(ours["block_out_channels"])
    if len(down) != levels or len(up) != levels:
        raise refuse(f"{len(down)} down and {len(up)} up block types for {levels} block_out_channels")
    attention_levels = tuple(DOWN_BLOCKS[b] for b in down)
    if tuple(UP_BLOCKS[b] for b in reversed(up)) != attention_levels:
        raise refuse(f"up_block_types {up} do not mirror down_block_types {down}; our UNet puts attention at the "
                     f"same levels on the way down and up")

    size = cfg.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise refuse(f"sample_size={size} is not square; our configs hold one image side")
        size = size[0]
    if size is None:
        raise refuse("sample_size is missing; add the image side the model was trained at to config.json")
    factor = 2 ** (levels - 1)
    if not isinstance(size, int) or size <= 0 or size % factor:
        raise ConversionError(f"{where}: sample_size={size!r} is not a positive multiple of {factor}, the "
                              f"downsampling factor of its {levels} levels; give the image side the model was "
                              f"trained at")

    num_class_embeds = cfg.get("num_class_embeds")
    if num_class_embeds is not None and num_class_embeds < 2:
        raise refuse(f"num_class_embeds={num_class_embeds}: a class-conditional model needs at least 2 rows "
                     f"(our last row is the null label)")
    # diffusers' class table has num_class_embeds rows; ours has num_classes + 1, the last being the null label
    num_classes = None if num_class_embeds is None else num_class_embeds - 1
    try:
        return UNetConfig(sample_size=size, attention_levels=attention_levels, num_classes=num_classes, **ours)
    except (TypeError, ValueError) as e:                          # a value of the wrong kind or out of range
        raise ConversionError(f"{where}: {e}; fix that value in the file") from None


def rename_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers keys are already ours except the legacy attention names; those are renamed."""
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)", key)
        if m:
            key = f"{m[1]}.{DIFFUSERS_LEGACY_ATTENTION[m[2]]}.{m[3]}"
            value = squeeze_1x1(value)
        out[key] = value
    return out


def find_diffusers_unet(folder: Path) -> Path:
    """The folder holding the UNet's config.json: `folder` itself (a bare UNet folder) or `folder/unet`
    (a pipeline folder)."""
    for candidate in (folder, folder / "unet"):
        if (candidate / "config.json").is_file():
            return candidate
    raise ConversionError(f"{folder} has no config.json (nor unet/config.json): pass a diffusers UNet2DModel "
                          f"folder or pipeline folder, or an original-DDPM state-dict file")


def find_scheduler_config(src: Path, unet_dir: Path) -> Path | None:
    for candidate in (unet_dir / "scheduler_config.json", src / "scheduler" / "scheduler_config.json",
                      unet_dir.parent / "scheduler" / "scheduler_config.json"):
        if candidate.is_file():
            return candidate
    return None


# scheduler settings our DDPMScheduler implements one way only: setting -> the value we support
SCHEDULER_FIXED = {"prediction_type": "epsilon", "trained_betas": None, "thresholding": False,
                   "clip_sample_range": 1.0, "rescale_betas_zero_snr": False}


def diffusion_from_scheduler_config(cfg: dict, where: Path) -> dict:
    """Our DiffusionConfig fields from a diffusers scheduler_config.json (missing ones: Ho et al.'s values).
    Sampling-time choices (timestep_spacing, steps_offset) are left to the sampler."""
    for key, supported in SCHEDULER_FIXED.items():
        if cfg.get(key, supported) != supported:
            raise ConversionError(f"{where}: {key}={cfg[key]!r} is not supported by invdiff-min's schedulers "
                                  f"(only {supported!r})")
    out = {k: cfg.get(k, default) for k, default in HO_ET_AL_DIFFUSION.items()}
    if out["beta_schedule"] not in BETA_SCHEDULES:
        raise ConversionError(f"{where}: beta_schedule={out['beta_schedule']!r} is not one of {BETA_SCHEDULES}")
    if out["variance_type"] not in DDPMScheduler.VARIANCE_TYPES:
        raise ConversionError(f"{where}: variance_type={out['variance_type']!r} is not one of "
                              f"{DDPMScheduler.VARIANCE_TYPES} (a learned variance needs 2x output channels)")
    try:                                                          # the kinds and ranges the schedulers accept
        DDPMScheduler(**out)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: {e}; fix that value in the file") from None
    return out


def read_diffusers(folder: Path) -> Source:
    unet_dir = find_diffusers_unet(folder)
    try:
        config = unet_config_from_diffusers(read_config(unet_dir / "config.json"), unet_dir / "config.json")
    except TypeError as e:                                        # e.g. a number where a list belongs
        raise ConversionError(f"{unet_dir / 'config.json'}: a setting of the wrong kind ({e}); fix it in the "
                              f"file") from None
    weights_file = next((unet_dir / f"diffusion_pytorch_model.{ext}" for ext in ("safetensors", "bin")
                         if (unet_dir / f"diffusion_pytorch_model.{ext}").is_file()), None)
    if weights_file is None:
        found = sorted(p.name for p in unet_dir.iterdir())
        raise ConversionError(f"{unet_dir} has no diffusion_pytorch_model.safetensors or .bin (found {found}); "
                              f"download the weights file next to config.json")
    raw = read_tensor_file(weights_file)
    if not isinstance(raw, dict) or not all(torch.is_tensor(v) for v in raw.values()):
        raise ConversionError(f"{weights_file} is not a flat state dict of tensors")
    refuse_non_finite(raw, weights_file)
    source = Source(folder, DIFFUSERS, config, rename_diffusers(raw), f"the weights in {weights_file.name}")
    sched = find_scheduler_config(folder, unet_dir)
    if sched is not None:
        source.diffusion = diffusion_from_scheduler_config(read_config(sched), sched)
        source.diffusion_from = str(sched)
    return source


# ----- format (b): original DDPM (pesser/pytorch_diffusion) ----------------------------------------------
# Where each block lives: original-DDPM key prefix -> our module path. `{up}` is levels - 1 - i: the original
# keeps its up list in resolution order (up.0 is the full-resolution level), ours in execution order
# (up_blocks.0 is the lowest resolution), so up.{i} is our up_blocks.{levels - 1 - i}.
ORIGINAL_DDPM_BLOCKS = [tuple(row.split()) for row in r"""
    temb\.dense\.0                 time_embedding.linear_1
    temb\.dense\.1                 time_embedding.linear_2
    conv_in                        conv_in
    down\.(\d+)\.block\.(\d+)      down_blocks.\1.resnets.\2
    down\.(\d+)\.attn\.(\d+)       down_blocks.\1.attentions.\2
    down\.(\d+)\.downsample\.conv  down_blocks.\1.downsamplers.0.conv
    mid\.block_1                   mid_block.resnets.0
    mid\.attn_1                    mid_block.attentions.0
    mid\.block_2                   mid_block.resnets.1
    up\.(\d+)\.block\.(\d+)        up_blocks.{up}.resnets.\2
    up\.(\d+)\.attn\.(\d+)         up_blocks.{up}.attentions.\2
    up\.(\d+)\.upsample\.conv      up_blocks.{up}.upsamplers.0.conv
    norm_out                       conv_norm_out
    conv_out                       conv_out
""".strip().splitlines()]
# Layer names inside a block: original -> ours (norm1, conv1, norm2, conv2 are the same).
ORIGINAL_DDPM_LAYERS = {
    "temb_proj": "time_emb_proj",        # ResNet: time embedding projection
    "nin_shortcut": "conv_shortcut",     # ResNet: 1x1 conv on the skip when channels change
    "norm": "group_norm",                # attention: GroupNorm before q, k, v
    "q": "to_q", "k": "to_k", "v": "to_v",
    "proj_out": "to_out.0",
}
# Tensors whose layout changes: the attention projections are 1x1 convs there, nn.Linear here.
ORIGINAL_DDPM_1X1_TO_LINEAR = {"to_q", "to_k", "to_v", "to_out.0"}


def rename_original_ddpm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original-DDPM keys -> our keys by the tables above; a key no rule matches is kept as it is, so the
    strict load reports it as unexpected."""
    levels = len({m[1] for k in sd if (m := re.match(r"down\.(\d+)\.", k))})
    out = {}
    for key, value in sd.items():
        for pattern, target in ORIGINAL_DDPM_BLOCKS:
            m = re.fullmatch(pattern + r"\.(.+)", key)
            if m is None:
                continue
            if "{up}" in target:                                          # up.{i} -> up_blocks.{levels-1-i}
                target = target.replace("{up}", str(levels - 1 - int(m[1])))
            block = m.expand(target)
            layer, _, param = m[m.re.groups].rpartition(".")          # e.g. "q", "weight"
            layer = ORIGINAL_DDPM_LAYERS.get(layer, layer)
            if layer in ORIGINAL_DDPM_1X1_TO_LINEAR and param == "weight":
                value = squeeze_1x1(value)                                # (C, C, 1, 1) -> (C, C)
            key = ".".join(p for p in (block, layer, param) if p)
            break
        out[key] = value
    return out


def original_ddpm_config(resolution: int, ch: int = 128, ch_mult: tuple[int, ...] = (1, 2, 2, 2),
                         num_res_blocks: int = 2, attn_resolutions: tuple[int, ...] = (16,), dropout: float = 0.0,
                         in_channels: int = 3, out_ch: int = 3) -> UNetConfig:
    """Our UNetConfig for pesser's `Model(ch, ch_mult, num_res_blocks, attn_resolutions, dropout, resolution)`:
    GroupNorm(32, eps 1e-6), TF-style asymmetric downsampling pad, [sin, cos] sinusoid with freq_shift 1,
    single-head attention at the levels whose resolution is in attn_resolutions."""
    return UNetConfig(sample_size=resolution, in_channels=in_channels, out_channels=out_ch,
                      block_out_channels=tuple(ch * m for m in ch_mult), layers_per_block=num_res_blocks,
                      attention_levels=tuple(resolution // 2**i in attn_resolutions for i in range(len(ch_mult))),
                      mid_attention=True, attention_head_dim=None, dropout=dropout, norm_num_groups=32,
                      norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, num_classes=None)


# The two configurations Ho et al. released (pesser/pytorch_diffusion's cifar10_cfg and lsun_cfg).
ORIGINAL_DDPM_PRESETS = {
    "cifar10-32": original_ddpm_config(32, ch_mult=(1, 2, 2, 2), dropout=0.1),
    "celebahq-lsun-256": original_ddpm_config(256, ch_mult=(1, 1, 2, 2, 4, 4), dropout=0.0),
}


def expected_shapes(config: UNetConfig) -> dict[str, tuple[int, ...]]:
    """Our state dict's shapes for a config, from a model built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = UNet(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def infer_original_ddpm_config(sd: dict[str, torch.Tensor], path: Path) -> tuple[str, UNetConfig]:
    """The preset whose every key and shape the (renamed) weights fit; refuse a file that fits neither."""
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    report = []
    for name, config in ORIGINAL_DDPM_PRESETS.items():
        want = expected_shapes(config)
        if want == shapes:
            return name, config
        missing, unexpected = set(want) - set(shapes), set(shapes) - set(want)
        mis_shaped = [k for k in set(want) & set(shapes) if want[k] != shapes[k]]
        report.append(f"{name} (channels {config.block_out_channels}): {len(missing)} missing, "
                      f"{len(unexpected)} unexpected, {len(mis_shaped)} mis-shaped keys")
    levels = len({k.split(".")[1] for k in sd if k.startswith("down_blocks.")})
    conv_in = shapes.get("conv_in.weight")
    raise ConversionError(f"{path}: the {ORIGINAL_DDPM} weights ({levels} levels, conv_in {conv_in}) fit neither "
                          f"known configuration: {'; '.join(report)}. For another layout pass its config: "
                          f"convert(path, config=original_ddpm_config(resolution, ch, ch_mult, ...))")


def read_original_ddpm(path: Path, config: UNetConfig | None = None) -> Source:
    tensors, weights = select_weights(read_tensor_file(path), path)
    refuse_non_finite(tensors, path)
    if "time_embedding.linear_1.weight" in tensors:
        raise ConversionError(f"{path} holds diffusers-named weights; pass the folder that holds it with its "
                              f"config.json instead")
    sd = rename_original_ddpm(tensors)
    if config is None:
        _, config = infer_original_ddpm_config(sd, path)
    return Source(path, ORIGINAL_DDPM, config, sd, weights)


# ----- entry points --------------------------------------------------------------------------------------
def read_source(src: str | Path, config: UNetConfig | None = None) -> Source:
    """Read a diffusers folder or an original-DDPM state-dict file into our names (nothing built yet).
    `config` overrides the inferred original-DDPM configuration (diffusers folders carry their own)."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist; pass a diffusers folder (with config.json) or an "
                                f"original-DDPM state-dict file (.ckpt, .pt, .pth, .bin or .safetensors)")
    if src.is_dir():
        return read_diffusers(src)
    if not src.is_file():                    # a FIFO would block torch.load forever
        raise ConversionError(f"{src} is not a regular file or a folder; pass a diffusers folder or a "
                              f"state-dict file")
    return read_original_ddpm(src, config)


def build(source: Source) -> UNet:
    """Our UNet with the source's weights loaded strictly, in eval mode."""
    model = UNet(source.config)
    load_state_into(model, source.state_dict, mismatch_label(source.path, source.format))
    return model.eval()


def convert(src: str | Path, config: UNetConfig | None = None) -> UNet:
    """Our UNet (eval mode, CPU, float32) from a diffusers folder or an original-DDPM state-dict file:
    `model(x, t)` (or `model(x, t, y)` when class-conditional) predicts the noise eps_theta(x_t, t[, y])."""
    return build(read_source(src, config))


def check_input(config: UNetConfig, generator: torch.Generator):
    """A random (x, t, y) batch any model of this config accepts: side 32 rounded to the downsampling factor."""
    f = config.downsample_factor
    side = max(f, 32 // f * f)
    x = torch.randn(2, config.in_channels, side, side, generator=generator)
    t = torch.randint(0, 1000, (2,), generator=generator)
    y = None if config.num_classes is None else torch.randint(0, config.num_classes + 1, (2,), generator=generator)
    return x, t, y


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert pretrained DDPM weights (a diffusers UNet2DModel or "
                                                 "pipeline folder, or an original-DDPM .ckpt) into an "
                                                 "invdiff-min checkpoint folder.")
    parser.add_argument("src", help="diffusers folder (config.json + diffusion_pytorch_model.*) or original-DDPM file")
    parser.add_argument("out", help="new folder to write the checkpoint into (e.g. runs/cifar10-converted)")
    args = parser.parse_args(argv)
    with exit_on_error():                  # ConversionError, CheckpointError, OSError: one line `error: ...`
        write_converted(args.src, Path(args.out))


def write_converted(src: str | Path, out: Path) -> Path:
    """Convert `src` into a new checkpoint folder `out` (ckpt-0000000) and check that the written checkpoint,
    rebuilt from its files alone, computes what the converted model does. Returns the checkpoint folder."""
    if list_checkpoints(out):
        raise ConversionError(f"{out} already holds checkpoints ({list_checkpoints(out)[-1].name}); "
                              f"pass a new folder or delete that one first")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out} is a file; pass a new folder to write the checkpoint into")
    if out.is_dir() and any(out.iterdir()):  # e.g. a run folder, whose base the checkpoint would shadow
        held = ", ".join(sorted(p.name for p in out.iterdir())[:5])
        raise ConversionError(f"{out} is not empty (it holds {held}); pass a new or empty folder, nothing there "
                              f"is touched")
    source = read_source(src)
    model = build(source)
    state = {"config": {"preset": "converted", "unet": source.config.to_dict(), "diffusion": source.diffusion,
                        "source": str(src), "format": source.format},
             "weights_used": source.weights}
    ckpt = save_checkpoint(out, 0, {"model": model.state_dict()}, state)
    print(f"wrote {ckpt} from {src} ({source.format} format, {source.weights}); schedule from {source.diffusion_from}")
    try:
        reloaded, _, _ = load_unet(out, weights="model")
    except ValueError as e:   # CheckpointError: the file just written does not read back
        raise ConversionError(f"the checkpoint just written does not load: {e}") from None
    x, t, y = check_input(source.config, torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (reloaded(x, t, y) - model(x, t, y)).abs().max().item()
    if not diff <= 1e-6:
        raise ConversionError(f"the checkpoint in {ckpt} does not reproduce the converted model (max abs diff "
                              f"{diff:.3g}); delete it and report the bug")
    print(f"check: reloaded checkpoint matches the converted model (max abs diff {diff:.1g} on a random "
          f"{tuple(x.shape)} batch)")
    return ckpt


if __name__ == "__main__":
    main()
