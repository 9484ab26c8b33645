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
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


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
        self.block_out_channels = tuple(self.block_out_channels)
        self.attention_levels = tuple(bool(a) for a in self.attention_levels)
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ValueError(f"attention_levels has {len(self.attention_levels)} entries but block_out_channels has "
                             f"{len(self.block_out_channels)}: give one True/False per level")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every channel count; {bad} do not")

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


def _transposed_kernel(w: torch.Tensor) -> torch.Tensor:
    """The 3x3 kernel `w` (O, I, 3, 3) of a conv applied after a nearest x2 upsample, as the 4x4 kernel
    (I, O, 4, 4) of the equivalent stride-2 transposed conv on the low-res input. Along one axis, output row
    2m reads low-res rows m-1 (tap w0) and m (w1 + w2), output row 2m+1 reads m (w0 + w1) and m+1 (w2); a
    stride-2, padding-1 transposed conv places input row i at outputs 2i-1+k, so k = 0..3 carries
    [w2, w1 + w2, w0 + w1, w0]."""
    def fold(k: torch.Tensor, dim: int) -> torch.Tensor:
        t0, t1, t2 = k.unbind(dim)
        return torch.stack([t2, t1 + t2, t0 + t1, t0], dim)
    return fold(fold(w, 2), 3).transpose(0, 1)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv.

    On the CPU computed as one stride-2 transposed conv with summed 4x4 taps (`_transposed_kernel`), without
    materialising the upsampled image: 16 instead of 36 multiply-adds per output pixel and channel pair, and
    no interpolate op. Same function and weights; only the float rounding order differs (~1e-6 relative).
    Other devices (untimed) keep the plain path."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        if x.device.type != "cpu":
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return F.conv_transpose2d(x, _transposed_kernel(self.conv.weight), self.conv.bias, stride=2, padding=1)


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

    # ----- guard rails at the boundary: each error names the problem and the fix --------------------------
    def _runs_as(self, dtype: torch.dtype, device: torch.device) -> bool:
        """A tensor of `dtype` can meet the weights: same dtype, or autocast casts both (never float64)."""
        w = self.conv_in.weight.dtype
        return dtype == w or (torch.is_autocast_enabled(device.type) and torch.float64 not in (dtype, w))

    def _check_image(self, x) -> None:
        cfg, w = self.config, self.conv_in.weight
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"UNet expects x as a torch.Tensor (B, {cfg.in_channels}, H, W), got {type(x).__name__}; "
                            f"wrap it with torch.as_tensor(x)")
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"UNet expects images (B, {cfg.in_channels}, H, W), got shape {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"UNet expects a floating-point image in [-1, 1], got dtype {x.dtype}; pass a float "
                             f"tensor, e.g. x.float() / 127.5 - 1 for 0..255 pixels")
        if x.device != w.device:
            raise ValueError(f"x is on {x.device} but the UNet is on {w.device}; move one: x.to(model_device) or "
                             f"model.to(x.device)")
        if torch.is_autocast_enabled(x.device.type):
            ad = torch.get_autocast_dtype(x.device.type)
            if w.dtype not in (torch.float32, torch.float64, ad):
                raise ValueError(f"under torch.autocast(dtype={ad}) the UNet's weights must be float32 or {ad}, "
                                 f"got {w.dtype}; call model.float() or autocast with dtype={w.dtype}")
        if not self._runs_as(x.dtype, x.device):
            raise ValueError(f"x has dtype {x.dtype} but the UNet's weights are {w.dtype}; cast one to match "
                             f"(x.to({w.dtype}) or model.to({x.dtype})), or run under torch.autocast")
        f = cfg.downsample_factor
        if x.shape[2] % f or x.shape[3] % f or 0 in x.shape[2:]:
            raise ValueError(f"image side {tuple(x.shape[2:])} must be a positive size divisible by {f} "
                             f"(2 ** (levels - 1) for {len(cfg.block_out_channels)} levels): resize or pad the input")

    @staticmethod
    def _check_timesteps(t, b: int, device: torch.device) -> torch.Tensor:
        """t: a number or one per sample, finite and >= 0 (floats are fine: the sinusoid takes any time)."""
        try:
            t = torch.as_tensor(t, device=device)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"t must be a number or a ({b},) tensor of timesteps, got {type(t).__name__}") from None
        if t.dtype == torch.bool or t.dtype.is_complex:
            raise ValueError(f"timesteps must be real numbers (integers 0..T-1 from the scheduler), got dtype "
                             f"{t.dtype}; pass t.long()")
        if t.numel() and not bool(((t >= 0) & torch.isfinite(t)).all()):
            raise ValueError(f"timesteps must be finite and >= 0 (the scheduler's 0..T-1), got "
                             f"[{t.min().item()}, {t.max().item()}]")
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"need one timestep per sample or a scalar: got t of shape {tuple(t.shape)} for a "
                             f"batch of {b}")
        return t

    def _check_labels(self, y, b: int, device: torch.device) -> torch.Tensor:
        """y: one integer label per sample in 0..num_classes (num_classes is the null label)."""
        n = self.config.num_classes
        if self.class_embedding is None:
            raise ValueError("this UNet is unconditional (num_classes=None) but class labels were given; "
                             "pass y=None or build it with num_classes")
        try:
            y = torch.as_tensor(y, device=device)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"labels must be an integer tensor of shape ({b},), got {type(y).__name__}") from None
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool or y.shape != (b,):
            raise ValueError(f"labels must be an integer tensor of shape ({b},), got {y.dtype} {tuple(y.shape)}; "
                             f"pass y.long()")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) > n):
            raise ValueError(f"label out of range: got [{int(y.min())}, {int(y.max())}], valid are "
                             f"0..{n - 1} and {n} (the null label)")
        return y

    def _check_cond_emb(self, cond_emb, x: torch.Tensor) -> None:
        """cond_emb: (B, D) or (1, D), D the time-embedding width, a dtype that meets the weights."""
        b, d, w = x.shape[0], self.time_embedding.linear_2.out_features, self.conv_in.weight
        if (not isinstance(cond_emb, torch.Tensor) or cond_emb.ndim != 2 or cond_emb.shape[0] not in (1, b)
                or cond_emb.shape[1] != d):
            got = tuple(cond_emb.shape) if isinstance(cond_emb, torch.Tensor) else type(cond_emb).__name__
            raise ValueError(f"cond_emb must be a ({b}, {d}) tensor (one embedding per sample), got {got}")
        if (cond_emb.device != x.device or not cond_emb.dtype.is_floating_point
                or not self._runs_as(cond_emb.dtype, x.device)):
            raise ValueError(f"cond_emb must be a {w.dtype} tensor on {x.device} like the UNet, got "
                             f"{cond_emb.dtype} on {cond_emb.device}; pass cond_emb.to(x)")

    def forward(self, x: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor | None = None,
                cond_emb: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C_in, H, W), t (B,) or scalar, y (B,) labels or None; `cond_emb` (B, D) is an extra condition
        embedding added to the time embedding (the guidance head's Phi(y))."""
        self._check_image(x)
        t = self._check_timesteps(t, x.shape[0], x.device)
        if y is not None:
            y = self._check_labels(y, x.shape[0], x.device)
        if cond_emb is not None:
            self._check_cond_emb(cond_emb, x)
        cfg = self.config
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
