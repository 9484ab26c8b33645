"""The Python API: a trained run (or a converted checkpoint) as one object that samples the way diffusers'
pipelines are called, and judges what it sampled.

    from invdiff_min import InvDiffPipeline
    pipe = InvDiffPipeline.from_pretrained("runs/cpu")                 # base + the invdiff head, the run's w
    out = pipe(class_labels=[0, 0, 1, 1], generator=torch.Generator().manual_seed(0))
    out.images                                                          # (4, 3, H, W) in [0, 1]
    pipe(class_labels=[1] * 8, strength=0.0, output_type="pil").images  # the base model alone, PIL images
    pipe.evaluate(out.images, out.labels)                               # Bias, fidelity, ... (the run's judge)

Conventions (as everywhere in this project): `strength` is InvDiff's w (eps_theta + w G_psi; 0 = the base
model, 1 = as trained); `guidance_scale` is classifier-free guidance's s (1 = plain conditional, 0 =
unconditional), applied at t < `guidance_t_max` (None: every step). Unset sampler, step count, strength and
class guidance follow the run's evaluation settings, so a plain call samples the way the run's summary was
measured (`head_outside_cfg` too: the head's push outside the class guidance, guidance.py).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from . import amp
from .checkpoint import CheckpointError, list_checkpoints, load_unet, read_json_object
from .config import EvalConfig
from .data import from_model_range
from .diffusion import make_sampler, sample
from .guidance import GuidedModel, InvariantGuidance, load_head
from .runs import read_run_config
from .scheduler import DDPMScheduler
from .unet import UNet

OUTPUT_TYPES = ("pt", "np", "pil")


@dataclass
class InvDiffOutput:
    """What a call returns: `images` in the requested type ("pt": a (N, C, H, W) tensor in [0, 1]; "np": an
    (N, H, W, C) float array in [0, 1]; "pil": a list of PIL images) and the class of each (-1: unconditional)."""
    images: object
    labels: torch.Tensor


def find_run_dir(path: Path) -> Path | None:
    """The run folder above a checkpoint (the one holding a run's config.json), if any. A config.json without
    a "config" object is another program's (a diffusers model folder's, say), not a run's."""
    for p in [path, *path.parents]:
        if (p / "config.json").is_file() and _holds_run_config(p / "config.json"):
            return p
    return None


def _holds_run_config(path: Path) -> bool:
    try:
        return isinstance(read_json_object(path).get("config"), dict)
    except CheckpointError:
        return True                              # a damaged run config: read_run_config names the file


class InvDiffPipeline:
    """A base model eps_theta, optionally a guidance head G_psi, and how to sample them (module docstring)."""

    def __init__(self, base: UNet, head: InvariantGuidance | None, diffusion: dict, *, strength: float = 1.0,
                 mode: str = "additive", mix_ratio: float = 0.5, sampler: str = "ddim", num_inference_steps: int = 50,
                 config: dict | None = None, run_dir: Path | None = None, class_names: list[str] | None = None,
                 precision: str = "auto", guidance_scale: float = 1.0, guidance_t_max: int | None = None,
                 head_outside_cfg: bool = False):
        amp.check_precision(precision)
        self.base, self.head, self.diffusion = base, head, dict(diffusion)
        self.precision = precision                 # network calls while sampling (amp.py); "fp32" is exact
        self.class_names = class_names or [f"class{c}" for c in range(base.config.num_classes or 0)]
        self.strength, self.mode, self.mix_ratio = strength, mode, mix_ratio
        self.sampler, self.num_inference_steps = sampler, num_inference_steps
        self.guidance_scale, self.guidance_t_max = guidance_scale, guidance_t_max
        self.head_outside_cfg = head_outside_cfg
        self.config, self.run_dir = config or {}, run_dir
        self._judge = None

    @property
    def device(self) -> torch.device:
        return self.base.conv_in.weight.device

    @property
    def num_classes(self) -> int:
        return self.base.config.num_classes or 0

    @classmethod
    def from_pretrained(cls, path: str | Path, head: str | None = "invdiff", weights: str = "ema",
                        device: str | torch.device = "cpu") -> "InvDiffPipeline":
        """Load a run folder made by train.py (its base model and the named head: invdiff, oracle, uniform, or
        None for the base alone), a stage or checkpoint folder, or a converted checkpoint. Every file is checked
        as it is read (checkpoint.py); a head trained on another base is refused."""
        path = Path(path)
        if weights not in ("ema", "model"):
            raise ValueError(f"weights must be 'ema' (the EMA, the default) or 'model' (the raw weights), got "
                             f"{weights!r}")
        base, state, ckpt = load_unet(path, device, weights=weights)
        run_dir = find_run_dir(path)
        config = state.get("config", {})
        try:                                       # the noise schedule, checked as the schedulers check it
            DDPMScheduler(**config["diffusion"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"config.diffusion in {ckpt / 'state.json'} is missing or wrong ({e}); restore the "
                                  f"file, or convert the weights again (python -m invdiff_min.convert)") from None
        run_cfg, record = read_run_config(run_dir) if run_dir else (None, {})
        run_eval = run_cfg.eval if run_cfg else EvalConfig(strength=1.0, sampler="ddim", num_steps=50)  # bare
        trained = None
        if head is not None and run_dir is not None and list_checkpoints(run_dir / head):
            trained, _ = load_head(run_dir / head, base, device)
        elif head not in (None, "invdiff"):
            how = "train it with python train.py --compare, or " if head in ("oracle", "uniform") else ""
            raise CheckpointError(f"no trained head {head!r} under {run_dir or path}; {how}pass head=None "
                                  f"(sample.py: --head none) for the base model alone")
        head_cfg = config.get("head", {})
        return cls(base, trained, config["diffusion"], strength=run_eval.strength,
                   mode=head_cfg.get("mode", "additive"), mix_ratio=head_cfg.get("mix_ratio", 0.5),
                   sampler=run_eval.sampler, num_inference_steps=run_eval.num_steps,
                   config=config, run_dir=run_dir, class_names=record.get("class_names"),
                   guidance_scale=run_eval.guidance_scale, guidance_t_max=run_eval.guidance_t_max,
                   head_outside_cfg=run_eval.head_outside_cfg)

    def model(self, strength: float | None = None) -> GuidedModel:
        """eps_theta + w G_psi as one callable (w = 0 or no head: the base model alone). A head told the
        sub-group takes sub-group labels: draw them with `.labels_for(class_labels, generator)`."""
        w = self.strength if strength is None else float(strength)
        return GuidedModel(self.base, self.head if w else None, w, self.mode, self.mix_ratio,
                           head_outside_cfg=self.head_outside_cfg and bool(w))

    @torch.no_grad()
    def __call__(self, class_labels=None, num_images: int | None = None, strength: float | None = None,
                 guidance_scale: float | None = None, sampler: str | None = None,
                 num_inference_steps: int | None = None, eta: float = 0.0, generator: torch.Generator | None = None,
                 output_type: str = "pt", batch_size: int = 500, guidance_t_max: int | None = None) -> InvDiffOutput:
        """Sample one image per entry of `class_labels` (a class-conditional model), or `num_images` images of an
        unconditional one. Noise comes from `generator` (CPU), so a seed gives the same images on any device."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if self.num_classes:
            if class_labels is None:
                raise ValueError(f"this model is class-conditional: pass class_labels, e.g. [0, 1] (classes "
                                 f"0..{self.num_classes - 1})")
            try:
                labels = torch.as_tensor(class_labels).reshape(-1)
            except (TypeError, ValueError, RuntimeError):
                labels = None
            if labels is None or labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
                raise ValueError(f"class_labels must be whole numbers 0..{self.num_classes - 1} (a list or an "
                                 f"integer tensor), got {class_labels!r}"[:300])
            labels = labels.long()
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(f"class_labels must lie in 0..{self.num_classes - 1}, got {labels.tolist()}")
        else:
            if class_labels is not None or not num_images or num_images < 1:
                raise ValueError("this model is unconditional: pass num_images=N (and no class_labels)")
            labels = torch.full((num_images,), -1)
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        for name, value in (("strength", strength), ("guidance_scale", guidance_scale)):   # any sign: w = -2 pushes
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):   # the other way
                raise ValueError(f"{name} must be a finite number (None: the run's), got {value!r}")
        scheduler = make_sampler(sampler or self.sampler, self.diffusion).to(self.device)
        steps = self.num_inference_steps if num_inference_steps is None else num_inference_steps   # 0 is refused
        side, channels = self.config.get("data", {}).get("resolution", self.base.config.sample_size), \
            self.base.config.in_channels
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        t_max = self.guidance_t_max if guidance_t_max is None else guidance_t_max
        model = self.model(strength)
        model_labels = labels
        if self.num_classes:             # a head told the sub-group: one of its class's sub-groups per image
            model_labels = model.labels_for(labels, follower(generator))
        out = []
        for start in range(0, len(labels), batch_size):
            y = model_labels[start:start + batch_size]
            with amp.autocast(self.device, self.precision):
                x = sample(model, scheduler, (len(y), channels, side, side), y if self.num_classes else None,
                           steps, guidance_scale=scale, null_label=model.null_label, eta=eta,
                           generator=generator, device=self.device, guidance_t_max=t_max)
            out.append(from_model_range(x).cpu())
        images = torch.cat(out) if out else torch.zeros(0, channels, side, side)
        return InvDiffOutput(convert_images(images, output_type), labels)

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """Bias, minority and attribute shares, fidelity and quality distances of `images` (N, C, H, W) in [0, 1]
        requested as `labels`, judged by the run's judge (`judge()`)."""
        return self.judge()(images, labels)

    def judge(self):
        """The run's judge (evaluate.Judge): its dataset's exact readers or small CNNs cached in RUN/judges; built
        on first use."""
        if self._judge is None:
            if self.run_dir is None or "data" not in self.config:
                raise ValueError("evaluate needs a model inside a train.py run folder (it judges by the run's data)")
            from .config import RunConfig
            from .data import load_splits
            from .evaluate import make_judge

            cfg = RunConfig.from_dict(self.config)
            self._judge = make_judge(load_splits(cfg.data), self.run_dir / "judges", self.device,
                                     cfg.eval.judge_steps)
        return self._judge


def follower(generator: torch.Generator | None) -> torch.Generator | None:
    """A CPU generator seeded from `generator`'s current state, which it leaves as it is: draws made from it (the
    sub-groups) change from call to call as `generator` is used, and leave its noise the same as for any model."""
    if generator is None:
        return None
    digest = hashlib.sha256(generator.get_state().cpu().numpy().tobytes()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def convert_images(images: torch.Tensor, output_type: str):
    """(N, C, H, W) in [0, 1] as "pt" (itself), "np" ((N, H, W, C) float32 array) or "pil" (list of RGB images)."""
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return array
    from PIL import Image
    return [Image.fromarray((a * 255).round().clip(0, 255).astype("uint8")) for a in array]


def png_names(labels: torch.Tensor, class_names: list[str] | None = None) -> list[str]:
    """The file names `save_png_folder` gives, CLASS_INDEX.png (e.g. disc_0007.png; 'image' for unconditional
    samples). A class name (from a dataset's metadata.csv, say) is made a plain file name first: characters other
    than letters, digits, '-', '_' and '.' become '_' and leading dots go, so no name reaches outside the folder."""
    def safe(name: str, label: int) -> str:
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lstrip(".") or f"class{label}"
    return [f"{'image' if y < 0 else safe(class_names[y], y) if class_names else f'class{y}'}_{i:04d}.png"
            for i, y in enumerate(labels.tolist())]


def save_png_folder(folder: str | Path, images: torch.Tensor, labels: torch.Tensor,
                    class_names: list[str] | None = None) -> list[Path]:
    """One PNG per image, named by `png_names`, for quality tools that read folders. Returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in png_names(labels, class_names)]
    for image, path in zip(convert_images(images, "pil"), paths):
        image.save(path)
    return paths
