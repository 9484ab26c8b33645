"""Stages C and D of InvDiff: the invariant guidance head G_psi, its objective L_e, and the guided model.

Where these sit in the paper (arXiv 2412.08480, Fig. 1): stage C is the "minimize L_e" step of the max-min
game, after "potential bias annotation inference" (stage B, groups.py) has maximised it over the groups; stage
D samples with the mean shift the trained G_psi adds to the reverse process. Official code:
src/train_text_to_image.py (L_e) and src/model/epsilon_with_delta.py (the guided model).

Guided noise prediction (ours, the paper's mean shift), with the base eps_theta frozen:
    eps_hat(x_t, t, y) = eps_theta(x_t, t, y) + w * G_psi(x_t, t, Phi(y))
w = 1 in training; at sampling w = 0 is exactly the base model and w > 1 extrapolates. G_psi is a small UNet
(same building blocks) whose output conv is zero-initialised, so training starts exactly at the base model.
Phi(y) is the head's own condition encoder (an embedding added to its time embedding). The head acts only on
real class labels: for the null label (the unconditional branch of classifier-free guidance) it adds nothing.

deviation (head.condition = "class_group", an option for attributes with K > 2 values): the head is also told the
inferred sub-group g of the sample, G_psi(x_t, t, Phi(y) + Phi'(g)), and at sampling each sample is given one of its
class's sub-groups, fixed over its chain: the samples of a class in one call take its sub-groups in equal numbers
(+-1), in random order (a stratified draw: independent draws add a share spread of about 0.03 at 200 per class).
The guided model's labels are then sub-groups (the base reads their class), so training and sampling pass them where
class labels go (docs/results/kvalued/rule_class_group.md).

Under classifier-free guidance with scale s (diffusion.py) the head sits inside the conditional branch by default,
    eps_hat = eps_theta(null) + s (eps_theta(y) + w G_psi - eps_theta(null)),
so its push is scaled by s. deviation (`head_outside_cfg`, an option for K > 2 values): the head's push stays outside
the class guidance,
    eps_hat = eps_theta(null) + s (eps_theta(y) - eps_theta(null)) + w G_psi,
so w means the same at every s; with class guidance only below a timestep (`guidance_t_max`) it keeps the balance
the head sets at large t and draws the class more clearly (docs/results/kvalued/rule_cfg.md, rules 11 and 14).

The official code's variant (`mode="mix"`): G is a full copy of the base UNet (initialised from it, output
conv zeroed) mixed as eps_hat = r G + (1 - r) eps_theta, r = 0.5; here r = w * mix_ratio, so w = 0 is again
the base model.

Debiasing objective (V-REx on the denoising loss over inferred groups), per minibatch:
    R_g = sum_i W_ig l_i / sum_i W_ig,      l_i = mean_pixels (eps_hat - eps)^2,
    L_e = mean_g R_g + lambda * Var_g R_g   over the groups present in the batch (sum_i W_ig > 0),
with Var the population variance (mean of squared deviations).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import CheckpointError, fingerprint, load_checkpoint, load_state_into, load_tensors
from .groups import group_risks
from .unet import UNet, UNetConfig, count_parameters


class InvariantGuidance(nn.Module):
    """G_psi(x_t, t, Phi(y)): a small UNet plus its own label embedding Phi.

    deviation (official code): its "lightweight" module is a full copy of the base UNet reading the base's own
    text embedding; here G_psi is a smaller UNet with its own Phi(y), as the paper describes (`copy_of` keeps
    the official variant): 21% of the cpu preset's base and 14% of the gpu preset's with 2 classes, 84% of the
    cpu base with more than 2 classes (head.many_classes_width doubles its widths)."""

    def __init__(self, net_config: UNetConfig, num_classes: int, group_class: list[int] | None = None):
        super().__init__()
        self.net = UNet(net_config)
        self.num_classes = num_classes
        temb = net_config.time_embed_dim or 4 * net_config.block_out_channels[0]
        self.phi = nn.Embedding(num_classes + 1, temb)          # Phi(y); row num_classes = null label
        nn.init.zeros_(self.net.conv_out.weight)                 # G_psi = 0 at initialisation
        nn.init.zeros_(self.net.conv_out.bias)
        self.phi_group = None                                    # Phi'(g) (head.condition = "class_group")
        if group_class is not None:
            group_class = torch.as_tensor(group_class, dtype=torch.long)
            valid = (group_class >= 0) & (group_class < num_classes)
            if group_class.ndim != 1 or len(group_class) == 0 or not bool(valid.all()):
                raise ValueError(f"group_class must list the class (0..{num_classes - 1}) of each sub-group, got "
                                 f"{group_class.tolist()}")
            self.register_buffer("group_class", group_class)    # (G,): the class of each sub-group
            self.register_buffer("label_class", label_classes(group_class, num_classes), persistent=False)
            self.phi_group = nn.Embedding(len(group_class) + 1, temb)    # row G: the null label
            nn.init.zeros_(self.phi_group.weight)                # starts as the class-conditioned head

    @classmethod
    def small(cls, base: UNetConfig, block_out_channels, layers_per_block, attention_levels, norm_num_groups,
              group_class: list[int] | None = None):
        """A head shaped like the base (channels, resolution, schedule embedding) but much smaller."""
        cfg = UNetConfig(sample_size=base.sample_size, in_channels=base.in_channels, out_channels=base.out_channels,
                         block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                         attention_levels=tuple(attention_levels), mid_attention=False,
                         norm_num_groups=norm_num_groups, norm_eps=base.norm_eps,
                         flip_sin_to_cos=base.flip_sin_to_cos, freq_shift=base.freq_shift, num_classes=None)
        return cls(cfg, base.num_classes, group_class)

    @classmethod
    def copy_of(cls, base: UNet, group_class: list[int] | None = None):
        """The official code's head: a full copy of the base UNet (weights included), output zeroed."""
        cfg = copy.deepcopy(base.config)
        num_classes = cfg.num_classes
        cfg.num_classes = None
        head = cls(cfg, num_classes, group_class)
        own = {k: v for k, v in base.state_dict().items() if not k.startswith("class_embedding")}
        missing = head.net.load_state_dict(own, strict=False)
        assert not missing.unexpected_keys
        with torch.no_grad():
            head.phi.weight.copy_(base.class_embedding.weight)
            head.net.conv_out.weight.zero_()
            head.net.conv_out.bias.zero_()
        return head

    @property
    def num_groups(self) -> int:
        """G, the sub-groups the head is told (0: a class-conditioned head)."""
        return 0 if self.phi_group is None else len(self.group_class)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y: class labels, or sub-group labels for a head told the sub-group (Phi(class of g) + Phi'(g))."""
        if self.phi_group is None:
            return self.net(x, t, cond_emb=self.phi(y))
        return self.net(x, t, cond_emb=self.phi(self.label_class[y]) + self.phi_group(y))


def label_classes(group_class: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The class each sub-group label reads, (G + 1,): group_class, then the null label G -> num_classes."""
    return torch.cat([group_class, group_class.new_tensor([num_classes])])


def draw_groups(y: torch.Tensor, group_class: torch.Tensor, num_classes: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Class labels y (B,) -> one sub-group of each sample's class (the null label -> G), (B,): the n samples of a
    class take its sub-groups in equal numbers (+-1; the extra ones, and a lone sample's, at random), in random
    order."""
    group_class, labels = group_class.cpu(), y.cpu()
    out = torch.full_like(labels, len(group_class))
    for c in labels.unique().tolist():
        if c == num_classes:
            continue
        own = (group_class == c).nonzero().squeeze(1)
        if len(own) == 0:
            raise ValueError(f"class {c} has no sub-group in this head (its groups cover classes "
                             f"{sorted(set(group_class.tolist()))}); sample the classes it was trained on")
        own = own[torch.randperm(len(own), generator=generator)]         # which sub-groups get the extra ones
        rows = (labels == c).nonzero().squeeze(1)
        out[rows] = own[torch.randperm(len(rows), generator=generator) % len(own)]      # stratified
    return out.to(y.device)


class GuidedModel(nn.Module):
    """eps_hat(x, t, y) from a frozen base and a head (module docstring); `strength` is w. With a head told the
    sub-group, y are sub-group labels (`labels_for` draws them from class labels) and the base reads their class."""

    def __init__(self, base: UNet, head: InvariantGuidance | None, strength: float = 1.0, mode: str = "additive",
                 mix_ratio: float = 0.5, group_class: torch.Tensor | None = None, head_outside_cfg: bool = False):
        super().__init__()
        if mode not in ("additive", "mix"):
            raise ValueError(f"mode must be 'additive' (ours) or 'mix' (official code), got {mode!r}")
        if head_outside_cfg and mode != "additive":
            raise ValueError("head_outside_cfg adds the head's push w G_psi outside the class guidance: it needs "
                             "mode='additive' (the 'mix' mode has no separate push)")
        self.base, self.head = base, head
        self.strength, self.mode, self.mix_ratio = float(strength), mode, float(mix_ratio)
        self.head_outside_cfg = bool(head_outside_cfg)
        self.base.requires_grad_(False).eval()
        # a head told the sub-group: this model's labels are sub-groups (G: the null), and label_class (G + 1,)
        # gives the class the base reads for each; `group_class` is passed when `head` is wrapped (DDP, compile)
        if head is not None and group_class is None and getattr(head, "phi_group", None) is not None:
            group_class = head.group_class
        self.group_class = None if head is None else group_class
        if self.group_class is not None:
            self.register_buffer("label_class", label_classes(self.group_class, base.config.num_classes),
                                 persistent=False)

    @property
    def null_label(self):
        return self.base.null_label if self.group_class is None else len(self.group_class)

    def labels_for(self, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The labels class labels y are sampled with: y itself, or, for a head told the sub-group, one sub-group
        of each sample's class, each class's sub-groups in equal numbers (deviation, module docstring); forward takes
        these labels."""
        if self.group_class is None:
            return y
        return draw_groups(y, self.group_class, self.base.config.num_classes, generator)

    def base_labels(self, y: torch.Tensor | None) -> torch.Tensor | None:
        """The class labels the base reads for this model's labels y (checked): y itself, or each sub-group's
        class."""
        if self.group_class is None or y is None:
            return y
        if y.numel() and (int(y.min()) < 0 or int(y.max()) > len(self.group_class)):
            raise ValueError(f"sub-group label out of range: got [{int(y.min())}, {int(y.max())}], valid are "
                             f"0..{len(self.group_class) - 1} and {len(self.group_class)} (the null label); "
                             f"draw them with labels_for(class labels)")
        return self.label_class[y.to(self.label_class.device)]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        y_class = y
        if self.group_class is not None and y is not None:    # sub-group labels (checked once, in sample)
            y_class = self.label_class[y]
        with torch.no_grad():                                 # the base only supplies eps_theta: no graph
            eps = self.base(x, t, y_class)
        if self.head is None or self.strength == 0.0 or y is None:
            return eps
        eps, g = eps.float(), self.head(x, t, y).float()      # the sum in float32 (bf16 autocast: 8-bit mantissa)
        cond = (y_class != self.base.null_label).to(g.dtype).view(-1, 1, 1, 1)   # no guidance on the null label
        if self.mode == "additive":   # deviation (official: r G + (1 - r) eps_theta, r = 0.5): starts at the base
            return eps + self.strength * cond * g                         # eps_theta + w G_psi
        r = self.strength * self.mix_ratio * cond
        return r * g + (1 - r) * eps

    def cfg_eps(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, null: torch.Tensor,
                scale: float) -> torch.Tensor:
        """Classifier-free guidance at scale s (diffusion.cfg_eps calls this), float32; y are this model's labels.
        Head inside (default): eps_u + s (eps_c - eps_u) over this model's two branches, rows [y; null].
        Head outside (`head_outside_cfg`): the base's branches combined, plus w G_psi on the conditional rows only."""
        both = torch.cat([x, x]), torch.cat([t, t])
        if not self.head_outside_cfg or self.head is None or self.strength == 0.0:
            eps_c, eps_u = self(*both, torch.cat([y, null])).float().chunk(2)
            return eps_u + scale * (eps_c - eps_u)
        y_class, null_class = (y, null) if self.group_class is None else (self.label_class[y], self.label_class[null])
        with torch.no_grad():
            eps_c, eps_u = self.base(*both, torch.cat([y_class, null_class])).float().chunk(2)
        cond = (y_class != self.base.null_label).float().view(-1, 1, 1, 1)   # no push on the null label
        return eps_u + scale * (eps_c - eps_u) + self.strength * cond * self.head(x, t, y).float()


def invariant_loss(losses: torch.Tensor, assignments: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """L_e = mean_g R_g + lam * Var_g R_g over the groups present in the batch (float32): the paper's debiasing
    objective, V-REx (Krueger et al. 2021) on the denoising loss.

    losses (B,) per-sample l_i; assignments (B, G) the soft group assignment W of the batch's samples.
    Returns (L_e, R) with R the risks of the present groups."""
    if losses.ndim != 1 or assignments.ndim != 2 or assignments.shape[0] != losses.shape[0]:
        raise ValueError(f"need losses (B,) and assignments (B, G), got {tuple(losses.shape)} and "
                         f"{tuple(assignments.shape)}")
    losses, assignments = losses.float(), assignments.float()
    present = assignments.sum(0) > 1e-8                            # groups with samples in this batch, (G,)
    risks = group_risks(assignments[:, present], losses)           # R_g = sum_i W_ig l_i / sum_i W_ig, (G_present,)
    variance = ((risks - risks.mean()) ** 2).mean()                # deviation: population variance (official: N-1)
    return risks.mean() + lam * variance, risks


def head_timesteps(n: int, num_train_timesteps: int, large_t_share: float, generator: torch.Generator) -> torch.Tensor:
    """The head's t draws, (n,): t ~ U{0..T-1}, each replaced with probability `large_t_share` by t ~ U{T/2..T-1}.

    deviation (paper: t uniform): with more than two attribute values the value a sample takes is settled at large
    t, where every group's eps loss is small and alike, so uniform t barely weighs it (docs/results/kvalued/
    rule_large_t.md). A share of 0 draws exactly the uniform t of before (no extra random numbers)."""
    t = torch.randint(0, num_train_timesteps, (n,), generator=generator)
    if large_t_share == 0:
        return t
    upper = torch.rand(n, generator=generator) < large_t_share
    t_upper = torch.randint(num_train_timesteps // 2, num_train_timesteps, (n,), generator=generator)
    return torch.where(upper, t_upper, t)


class GroupBatchSampler:
    """Minibatch indices for head training.

    uniform:  i ~ U{0..N-1} (the official way);
    balanced: each group g with sum_i W_ig > 0 gets B / G_present slots (remainder spread at random), filled
              by drawing i with probability W_ig / sum_j W_jg (soft groups are sampled by their weights).
              deviation: the official code draws uniform batches; with a 5% minority split over groups, each
              minority group then has ~1.6 samples per batch and L_e barely moves (INVDIFF.md, measured).
    `sample` also returns each sample's slot: its position within its group's block (balanced) or within the
    batch (uniform). Samples of different groups that share a slot can share one (t, eps) draw, so that
    R_g - R_g' compares groups on the same noise instead of on different t (a paired design, see
    pipeline.train_head).
    Randomness comes from the generator passed to `sample`, so a step's batch depends on (seed, step) only."""

    def __init__(self, assignments: torch.Tensor, batch_size: int, mode: str = "balanced"):
        if mode not in ("balanced", "uniform"):
            raise ValueError(f"batch sampling must be 'balanced' or 'uniform', got {mode!r}")
        self.assignments, self.batch_size, self.mode = assignments.float(), batch_size, mode   # W (N, G)
        self.groups = (self.assignments.sum(0) > 0).nonzero().squeeze(1)

    def sample(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (indices (B,), slots (B,))."""
        n, b = self.assignments.shape[0], self.batch_size
        if self.mode == "uniform":
            return torch.randint(0, n, (b,), generator=generator), torch.arange(b)
        k = len(self.groups)
        counts = torch.full((k,), b // k)
        counts[torch.randperm(k, generator=generator)[: b % k]] += 1
        idx = [torch.multinomial(self.assignments[:, g], int(c), replacement=True, generator=generator)
               for g, c in zip(self.groups.tolist(), counts.tolist()) if c > 0]
        return torch.cat(idx), torch.cat([torch.arange(int(c)) for c in counts.tolist() if c > 0])


@dataclass
class HeadSize:
    head: int
    base: int

    @property
    def ratio(self) -> float:
        return self.head / self.base


def head_size(head: nn.Module, base: nn.Module) -> HeadSize:
    return HeadSize(count_parameters(head), count_parameters(base))


def load_head(stage_dir, base: UNet, device="cpu") -> tuple[InvariantGuidance, dict]:
    """Rebuild a trained head (its EMA weights) from its newest checkpoint in `stage_dir` (e.g. runs/cpu/invdiff)
    and check, by fingerprint, that it was trained on this very base model."""
    from pathlib import Path

    stage_dir = Path(stage_dir)
    ckpt, state = load_checkpoint(stage_dir, stage=stage_dir.name)
    if "head_net" not in state:
        raise CheckpointError(f"{ckpt} holds no guidance head (no head_net in state.json); pass a head folder "
                              f"such as runs/cpu/invdiff")
    if state.get("base_fingerprint") != fingerprint(base.state_dict()):
        raise CheckpointError(f"the head in {ckpt} was trained on a different base model than the one loaded "
                              f"(fingerprint mismatch); use the base it was trained on: {state.get('base_checkpoint')}")
    net_cfg = UNetConfig.from_dict(state["head_net"])
    try:
        head = InvariantGuidance(net_cfg, base.config.num_classes, state.get("head_groups"))   # G's classes
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{ckpt / 'state.json'}: its head_groups do not fit this base ({e}); the checkpoint "
                              f"is damaged or from another run: train the head again (--stage head)") from None
    # the EMA of the head's weights is what samples (older runs without one: the raw weights)
    name = "head_ema.safetensors" if (ckpt / "head_ema.safetensors").exists() else "head.safetensors"
    load_state_into(head, load_tensors(ckpt / name), f"{ckpt / name}")
    return head.to(device).eval(), state
