"""The DDPM UNet of Ho et al. (2020), with diffusers' `UNet2DModel` module names.

    x (B, C, H, W) -> conv_in -> down_blocks (ResNet [+ attention] x L, then stride-2 conv)
                   -> mid_block (ResNet, attention, ResNet)
                   -> up_blocks (ResNet on [h, skip] [+ attention] x (L + 1), then nearest x2 + conv)
                   -> conv_norm_out, SiLU, conv_out -> eps_hat (B, C_out, H, W)

Every ResNet block reads the embedding emb = MLP(sinusoid(t)) + E[y] (E[y] only for a class-conditional
model; label `num_classes` is the "null" label of classifier-free guidance). Names follow diffusers
(`conv_in`, `time_embedding.linear_1`, `down_blocks.i.resnets.j.norm1`, `down_blocks.i.attentions.j.to_q`,
`mid_block`, `up_blocks`, `conv_norm_out`, `conv_out`, `class_embedding`) so converted weights load
strictly; see `convert.py`.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .fused import nearest_upsample_conv


WHOLE = ("sample_size", "in_channels", "out_channels", "layers_per_block", "norm_num_groups", "downsample_padding",
         "freq_shift")                                     # UNetConfig's integer settings
WHOLE_OR_NONE = ("attention_head_dim", "num_classes", "time_embed_dim")


def _is_bool(v) -> bool:
    return isinstance(v, bool) or (type(v).__module__ == "numpy" and type(v).__name__ in ("bool", "bool_"))


def _is_sequence(v) -> bool:
    return isinstance(v, (list, tuple)) or type(v).__name__ == "ndarray"


@dataclass
class UNetConfig:
    sample_size: int = 16                                   # image side the model is built for (informational)
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64, 128, 128)    # channels per resolution level
    layers_per_block: int = 2                               # ResNet blocks per down level (up levels have one more)
    attention_levels: tuple[bool, ...] = (False, True, False)  # self-attention after each ResNet at this level
    mid_attention: bool = True                              # attention between the two mid ResNets
    attention_head_dim: int | None = None                   # None: single-head attention (Ho et al.)
    dropout: float = 0.0
    norm_num_groups: int = 32                               # GroupNorm groups (must divide every channel count)
    norm_eps: float = 1e-5                                  # Ho et al. / google/ddpm-*: 1e-6
    downsample_padding: int = 1                             # 0: TF-style asymmetric pad, as in the original DDPM
    flip_sin_to_cos: bool = True                            # sinusoid order [cos, sin]; original DDPM: False
    freq_shift: int = 0                                     # sinusoid frequency shift; original DDPM: 1
    num_classes: int | None = None                          # None: unconditional; else labels 0..num_classes (null)
    time_embed_dim: int | None = None                       # default 4 * block_out_channels[0]

    def __post_init__(self):
        self._check_types()
        for name in WHOLE + WHOLE_OR_NONE:                       # numpy integers as plain ints (JSON-ready)
            if getattr(self, name) is not None:
                setattr(self, name, int(getattr(self, name)))
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.attention_levels = tuple(bool(a) for a in self.attention_levels)
        self.mid_attention, self.flip_sin_to_cos = bool(self.mid_attention), bool(self.flip_sin_to_cos)
        self.dropout, self.norm_eps = float(self.dropout), float(self.norm_eps)
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ValueError(f"attention_levels has {len(self.attention_levels)} entries but block_out_channels has "
                             f"{len(self.block_out_channels)}: give one True/False per level")
        if not self.block_out_channels or min(self.block_out_channels) < 1 or self.norm_num_groups < 1:
            raise ValueError(f"block_out_channels {list(self.block_out_channels)} and norm_num_groups "
                             f"{self.norm_num_groups} must be whole numbers of at least 1 (one entry per level)")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every channel count; {bad} do not")
        half = self.block_out_channels[0] // 2                    # timestep_embedding divides by half - freq_shift
        for name, ok, want in (
                ("in_channels", self.in_channels >= 1, "at least 1"),
                ("out_channels", self.out_channels >= 1, "at least 1"),
                ("layers_per_block", self.layers_per_block >= 1, "at least 1"),
                ("downsample_padding", self.downsample_padding in (0, 1), "0 (the original DDPM's pad) or 1"),
                ("freq_shift", 0 <= self.freq_shift < half, f"in [0, {half}), below half of block_out_channels[0] "
                                                            f"(the sinusoid divides by their difference)"),
                ("norm_eps", self.norm_eps > 0, "above 0"), ("dropout", 0 <= self.dropout < 1, "in [0, 1)")):
            if not ok:
                raise ValueError(f"UNet setting {name} must be {want}, got {getattr(self, name)}")

    def _check_types(self) -> None:
        """Refuse a value of the wrong kind (a hand-edited or foreign config: "1" for 1, "false" for false), which
        would otherwise fail deep inside the model or, for a bool, be read as true. NumPy numbers are accepted."""
        def whole(v) -> bool:
            return isinstance(v, numbers.Integral) and not _is_bool(v)
        kinds = {"a whole number": (whole, WHOLE),
                 "a whole number or null": (lambda v: v is None or whole(v), WHOLE_OR_NONE),
                 "a number": (lambda v: isinstance(v, numbers.Real) and not _is_bool(v), ("dropout", "norm_eps")),
                 "true or false": (_is_bool, ("mid_attention", "flip_sin_to_cos")),
                 "a list of whole numbers": (lambda v: _is_sequence(v) and all(map(whole, v)),
                                             ("block_out_channels",)),
                 "a list of true / false": (lambda v: _is_sequence(v) and all(map(_is_bool, v)),
                                            ("attention_levels",))}
        for kind, (ok, names) in kinds.items():
            bad = [n for n in names if not ok(getattr(self, n))]
            if bad:
                raise ValueError(f"UNet setting {bad[0]} must be {kind}, got {getattr(self, bad[0])!r}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "UNetConfig":
        """Inverse of `to_dict` after a JSON round trip (lists back to tuples)."""
        return cls(**{**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}, **overrides})


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al.), as diffusers' `get_timestep_embedding`:
    freq_k = exp(-ln(max_period) k / (dim/2 - freq_shift)), emb = [sin(t freq), cos(t freq)]  (B, dim)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    angles = t.float()[:, None] * torch.exp(exponent)[None, :]      # (B, dim/2)
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """The 2-layer MLP on the sinusoid: linear_1, SiLU, linear_2."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """h = conv1(SiLU(norm1(x))) + proj(SiLU(emb)); out = x' + conv2(dropout(SiLU(norm2(h))))."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float,
                 dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nonlinearity = nn.SiLU()
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x, emb):  # x (B, C_in, H, W), emb (B, D)
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = h + rearrange(self.time_emb_proj(self.nonlinearity(emb)), "b c -> b c 1 1")
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Self-attention over the H*W positions with a residual: x + to_out(softmax(q k^T / sqrt(d)) v)."""

    def __init__(self, channels: int, head_dim: int | None, groups: int, eps: float):
        super().__init__()
        head_dim = head_dim or channels
        if channels % head_dim:
            raise ValueError(f"attention_head_dim={head_dim} must divide the channel count {channels}")
        self.heads = channels // head_dim
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x):  # (B, C, H, W)
        b, c, h, w = x.shape
        tokens = rearrange(self.group_norm(x), "b c h w -> b (h w) c")
        q, k, v = (rearrange(proj(tokens), "b n (heads d) -> b heads n d", heads=self.heads)
                   for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)                # (B, heads, HW, d)
        out = self.to_out[0](rearrange(out, "b heads n d -> b n (heads d)"))
        return x + rearrange(out, "b (h w) c -> b c h w", h=h, w=w)


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv; padding 0 pads right/bottom by one first (the original TF DDPM)."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv. `fused` (the default) computes the same function as one stride-2
    transposed conv (`fused.nearest_upsample_conv`: 16 instead of 36 multiply-adds per output, no upsampled
    intermediate); False runs the two ops as written. Same weights either way, on every device."""

    def __init__(self, channels: int, fused: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.fused = fused

    def forward(self, x):
        if self.fused:
            return nearest_upsample_conv(x, self.conv)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock2D(nn.Module):
    """One encoder level: (ResNet [+ attention]) x layers, then optional downsampling; returns every output
    as a skip connection."""

    def __init__(self, in_ch, out_ch, temb, layers, attention, add_downsample, cfg: UNetConfig):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb, g, eps, cfg.dropout)
                                     for i in range(layers))
        if attention:
            self.attentions = nn.ModuleList(Attention(out_ch, cfg.attention_head_dim, g, eps) for _ in range(layers))
        else:
            self.attentions = None
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, cfg.downsample_padding)]) if add_downsample else None

    def forward(self, x, emb):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, emb)
            if self.attentions is not None:
                x = self.attentions[i](x)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock2D(nn.Module):
    """One decoder level: (ResNet on cat[x, skip] [+ attention]) x (layers + 1), then optional upsampling."""

    def __init__(self, in_ch, prev_out_ch, out_ch, temb, layers, attention, add_upsample, cfg: UNetConfig):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        resnets = []
        for i in range(layers):
            skip_ch = in_ch if i == layers - 1 else out_ch
            x_ch = prev_out_ch if i == 0 else out_ch
            resnets.append(ResnetBlock2D(x_ch + skip_ch, out_ch, temb, g, eps, cfg.dropout))
        self.resnets = nn.ModuleList(resnets)
        if attention:
            self.attentions = nn.ModuleList(Attention(out_ch, cfg.attention_head_dim, g, eps) for _ in range(layers))
        else:
            self.attentions = None
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if add_upsample else None

    def forward(self, x, skips, emb):
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), emb)
            if self.attentions is not None:
                x = self.attentions[i](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(nn.Module):
    """ResNet, attention, ResNet at the lowest resolution."""

    def __init__(self, ch, temb, cfg: UNetConfig):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(ResnetBlock2D(ch, ch, temb, g, eps, cfg.dropout) for _ in range(2))
        self.attentions = nn.ModuleList([Attention(ch, cfg.attention_head_dim, g, eps)]) if cfg.mid_attention else None

    def forward(self, x, emb):
        x = self.resnets[0](x, emb)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x, emb)


class UNet(nn.Module):
    """eps_theta(x_t, t[, y]): predicts the noise in x_t. `forward(x, t, y=None)` returns a (B, C_out, H, W)
    tensor; y = None on a class-conditional model means the null label (unconditional)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch = cfg.block_out_channels
        temb = cfg.time_embed_dim or 4 * ch[0]
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.class_embedding = nn.Embedding(cfg.num_classes + 1, temb) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)

        n = len(ch)
        self.down_blocks = nn.ModuleList(
            DownBlock2D(ch[max(i - 1, 0)], ch[i], temb, cfg.layers_per_block, cfg.attention_levels[i],
                        add_downsample=i < n - 1, cfg=cfg) for i in range(n))
        self.mid_block = UNetMidBlock2D(ch[-1], temb, cfg)
        rev, rev_attn = ch[::-1], cfg.attention_levels[::-1]
        self.up_blocks = nn.ModuleList(
            UpBlock2D(rev[min(i + 1, n - 1)], rev[max(i - 1, 0)], rev[i], temb, cfg.layers_per_block + 1, rev_attn[i],
                      add_upsample=i < n - 1, cfg=cfg) for i in range(n))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    @property
    def null_label(self) -> int | None:
        return self.config.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor | None = None,
                cond_emb: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C_in, H, W), t (B,) or scalar, y (B,) labels or None; `cond_emb` (B, D) is an extra condition
        embedding added to the time embedding (the guidance head's Phi(y)). Inputs are checked in full (values
        included) by `validate.check_unet_inputs` where they enter the library; here only shapes, with no host
        sync."""
        cfg, b = self.config, x.shape[0]
        assert x.ndim == 4 and x.shape[1] == cfg.in_channels, f"x must be (B, {cfg.in_channels}, H, W): {x.shape}"
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(b) if t.ndim == 0 else t                                                  # (B,)
        assert t.shape == (b,), f"t must be a scalar or one timestep per sample, got shape {tuple(t.shape)}"
        if y is not None:
            y = torch.as_tensor(y, device=x.device)
            assert y.shape == (b,) and self.class_embedding is not None, "y must be (B,) labels of a conditional UNet"
        emb = self.time_embedding(timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                                                     cfg.freq_shift).to(x.dtype))          # (B, D)
        if self.class_embedding is not None:
            if y is None:
                y = torch.full((x.shape[0],), cfg.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.class_embedding(y.long())
        if cond_emb is not None:
            emb = emb + cond_emb
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb)
            skips.extend(block_skips)
        h = self.mid_block(h, emb)
        for block in self.up_blocks:
            h = block(h, skips, emb)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
