"""The converter: diffusers and original-DDPM weights give our UNet diffusers' outputs, through a full sampling loop.

Every reference checkpoint is built here, from diffusers' `UNet2DModel` with random weights; nothing is downloaded.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from invdiff_min.checkpoint import CheckpointError, load_unet
from invdiff_min.convert import ConversionError, build, convert, main, original_ddpm_config, read_source
from invdiff_min.scheduler import DDPMScheduler
from invdiff_min.unet import count_parameters

diffusers = pytest.importorskip("diffusers")

REPO = Path(__file__).resolve().parents[1]

# google/ddpm-cifar10-32's UNet2DModel config (Ho et al.'s CIFAR-10 model)
CIFAR10 = dict(sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
               down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
               attention_head_dim=None, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
               norm_num_groups=32)
# the same style, small: what the original-DDPM format can hold (GroupNorm 32, one head)
SMALL_DDPM_STYLE = dict(CIFAR10, sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"))
SMALL_DDPM_STYLE_OURS = original_ddpm_config(16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))
# small, class-conditional (2 classes + the null row), multi-head attention, diffusers' own defaults otherwise
SMALL_CLASS_COND = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                        attention_head_dim=16, norm_num_groups=8, num_class_embeds=3)
ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These are small CPU ops: on shared cores several threads mostly wait on each other (measured here: the
    whole file 4x slower with two threads next to another job), so the file runs on one, then restores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def diffusers_unet(config: dict, seed: int):
    """A UNet2DModel with random weights everywhere: default init for matrices, random norm scales and biases
    (diffusers initialises those to 1 and 0, which would hide a swapped norm or bias)."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


def save_pipeline(folder: Path, model, safe: bool = True, beta_end: float = 0.02) -> Path:
    """A diffusers pipeline folder: unet/ (config.json + weights) and scheduler/ (scheduler_config.json)."""
    model.save_pretrained(folder / "unet", safe_serialization=safe)
    diffusers.DDPMScheduler(beta_end=beta_end, variance_type="fixed_large").save_pretrained(folder / "scheduler")
    return folder


@torch.no_grad()
def max_diff(ours, ref, x, t, y=None) -> float:
    kwargs = {} if y is None else {"class_labels": y}
    return (ours(x, t, y) - ref(x, t, **kwargs).sample).abs().max().item()


def to_original_ddpm(sd: dict, levels: int) -> dict:
    """A diffusers UNet2DModel state dict in the layout of pesser/pytorch_diffusion's `Model` (written here
    independently of convert.py, from pesser's model.py): up list in resolution order, 1x1-conv attention."""
    blocks = [(r"time_embedding\.linear_1\.", "temb.dense.0."), (r"time_embedding\.linear_2\.", "temb.dense.1."),
              (r"conv_norm_out\.", "norm_out."),
              (r"mid_block\.resnets\.0\.", "mid.block_1."), (r"mid_block\.attentions\.0\.", "mid.attn_1."),
              (r"mid_block\.resnets\.1\.", "mid.block_2."),
              (r"down_blocks\.(\d+)\.", r"down.\1."),
              (r"up_blocks\.(\d+)\.", lambda m: f"up.{levels - 1 - int(m[1])}."),
              (r"\.resnets\.", ".block."), (r"\.attentions\.", ".attn."),
              (r"\.downsamplers\.0\.", ".downsample."), (r"\.upsamplers\.0\.", ".upsample.")]
    layers = [(r"\.time_emb_proj\.", ".temb_proj."), (r"\.conv_shortcut\.", ".nin_shortcut."),
              (r"\.group_norm\.", ".norm."), (r"\.to_q\.", ".q."), (r"\.to_k\.", ".k."), (r"\.to_v\.", ".v."),
              (r"\.to_out\.0\.", ".proj_out.")]
    out = {}
    for key, value in sd.items():
        for pattern, repl in blocks + layers:
            key = re.sub(pattern, repl, key)
        if re.search(r"(attn\.\d+|attn_1)\.(q|k|v|proj_out)\.weight$", key):
            value = value[:, :, None, None]                     # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
        out[key] = value.clone()
    return out


# ----- google/ddpm-cifar10-32's configuration --------------------------------------------------------------
@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    """The diffusers CIFAR-10 model saved as a pipeline folder, and its outputs on a few inputs."""
    model = diffusers_unet(CIFAR10, seed=0)
    folder = save_pipeline(tmp_path_factory.mktemp("ddpm-cifar10-32"), model)
    g = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(2, 3, 32, 32, generator=g), torch.tensor(t)) for t in ([0, 999], [17, 500])]
    with torch.no_grad():
        outputs = [model(x, t).sample for x, t in inputs]
    return model, folder, inputs, outputs


def test_cifar10_diffusers_folder_converts_to_identical_outputs(cifar10):
    model, folder, inputs, outputs = cifar10
    assert count_parameters(model) == 35_746_307 and len(model.state_dict()) == 328
    source = read_source(folder)
    assert source.format == "diffusers" and source.diffusion["variance_type"] == "fixed_large"
    ours = convert(folder)
    assert not ours.training and count_parameters(ours) == 35_746_307 and len(ours.state_dict()) == 328
    with torch.no_grad():
        diffs = [(ours(x, t) - out).abs().max().item() for (x, t), out in zip(inputs, outputs)]
    print(f"cifar10 diffusers -> ours: max abs diff {max(diffs):.2e}")
    assert max(diffs) < ATOL, diffs


def test_cifar10_original_ddpm_ckpt_converts_to_identical_outputs(cifar10, tmp_path):
    model, _, inputs, outputs = cifar10
    path = tmp_path / "model-790000.ckpt"
    torch.save(to_original_ddpm(model.state_dict(), levels=4), path)
    source = read_source(path)                                 # configuration inferred from the shapes
    assert source.format == "original-DDPM"
    assert source.config == original_ddpm_config(32, ch_mult=(1, 2, 2, 2), dropout=0.1)
    ours = convert(path)
    with torch.no_grad():
        diffs = [(ours(x, t) - out).abs().max().item() for (x, t), out in zip(inputs, outputs)]
    print(f"cifar10 original-DDPM -> ours: max abs diff {max(diffs):.2e}")
    assert max(diffs) < ATOL, diffs


# ----- small configurations ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The small class-conditional diffusers model and its pipeline folder (safetensors)."""
    model = diffusers_unet(SMALL_CLASS_COND, seed=1)
    return model, save_pipeline(tmp_path_factory.mktemp("small"), model, beta_end=0.03)


def small_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 16, 16, generator=g), torch.tensor([3, 871])


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_small_class_conditional_model_converts_from_safetensors_and_bin(small, safe, tmp_path):
    model, _ = small
    folder = save_pipeline(tmp_path, model, safe=safe)
    assert (folder / "unet" / f"diffusion_pytorch_model.{'safetensors' if safe else 'bin'}").is_file()
    for src in (folder, folder / "unet"):                    # a pipeline folder and a bare UNet folder
        ours = convert(src)
        assert ours.config.num_classes == 2 and ours.config.attention_head_dim == 16
        x, t = small_inputs()
        assert max_diff(ours, model, x, t, torch.tensor([0, 1])) < ATOL
        assert max_diff(ours, model, x, t, torch.tensor([2, 1])) < ATOL
        with torch.no_grad():                                 # y=None is our null label, diffusers' last row
            null = ours(x, t) - model(x, t, class_labels=torch.tensor([2, 2])).sample
        assert null.abs().max().item() < ATOL


def test_legacy_diffusers_attention_names_convert_to_the_same_model(small, tmp_path):
    model, folder = small
    sd = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {re.sub(r"(attentions\.\d+)\.(to_q|to_k|to_v|to_out\.0)\.",
                      lambda m: f"{m[1]}.{legacy[m[2]]}.", k): v for k, v in sd.items()}
    assert sum(k.endswith(".query.weight") for k in renamed) == 4   # down level 1, up level 0 (x2), mid block
    (tmp_path / "config.json").write_text((folder / "unet" / "config.json").read_text())
    save_file(renamed, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    x, t = small_inputs(1)
    assert max_diff(convert(tmp_path), model, x, t, torch.tensor([1, 0])) < ATOL


def test_small_original_ddpm_file_prefers_ema_weights(tmp_path):
    ema, raw = diffusers_unet(SMALL_DDPM_STYLE, seed=2), diffusers_unet(SMALL_DDPM_STYLE, seed=3)
    ema_sd, raw_sd = to_original_ddpm(ema.state_dict(), 2), to_original_ddpm(raw.state_dict(), 2)
    x, t = small_inputs(2)
    layouts = {
        "sub-dicts": {"model": raw_sd, "ema": ema_sd, "step": torch.tensor(5)},
        "prefixed": {**raw_sd, **{f"ema.{k}": v for k, v in ema_sd.items()}},
        "dataparallel": {"state_dict": {f"module.{k}": v for k, v in ema_sd.items()}},
    }
    for name, obj in layouts.items():
        path = tmp_path / f"{name}.ckpt"
        torch.save(obj, path)
        source = read_source(path, config=SMALL_DDPM_STYLE_OURS)
        assert name == "dataparallel" or source.weights.startswith("EMA"), source.weights
        assert max_diff(build(source), ema, x, t) < ATOL, name
    torch.save(raw_sd, tmp_path / "raw.ckpt")
    assert "no separate EMA" in read_source(tmp_path / "raw.ckpt", config=SMALL_DDPM_STYLE_OURS).weights


# ----- sampling ----------------------------------------------------------------------------------------
def test_ddpm_sampling_loop_matches_diffusers_step_for_step(small):
    """Ho et al.'s sampler (linear betas, fixed_large variance, clipped x0) with the converted model against
    diffusers' DDPMPipeline loop, same initial and per-step noise. diffusers' schedule is replaced by ours
    (float64-computed; diffusers' float32 cumprod differs by ~1e-7), as in test_scheduler.py."""
    model, folder = small
    ours = convert(folder)
    sched = DDPMScheduler(variance_type="fixed_large", clip_sample=True)
    ref_sched = diffusers.DDPMScheduler(variance_type="fixed_large", clip_sample=True)
    ref_sched.betas, ref_sched.alphas = sched.betas.clone(), sched.alphas.clone()
    ref_sched.alphas_cumprod = sched.alphas_cumprod.clone()
    sched.set_timesteps(20)
    ref_sched.set_timesteps(20)
    assert sched.timesteps.tolist() == ref_sched.timesteps.tolist()
    y = torch.tensor([0, 1])
    x = ref_x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    diffs = []
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps.tolist()):
            x = sched.step(ours(x, t, y), t, x, generator=torch.Generator().manual_seed(100 + i))
            eps = model(ref_x, t, class_labels=y).sample
            ref_x = ref_sched.step(eps, t, ref_x, generator=torch.Generator().manual_seed(100 + i)).prev_sample
            diffs.append((x - ref_x).abs().max().item())
    print(f"20-step DDPM sampling, ours vs diffusers: max abs diff per step {max(diffs):.2e}, final {diffs[-1]:.2e}")
    assert max(diffs) < 1e-4, diffs
    assert x.abs().max() > 0.1                               # a real trajectory, not collapsed to zero


# ----- refusals ----------------------------------------------------------------------------------------
def test_mismatched_keys_are_listed_and_the_format_named(small, tmp_path):
    _, folder = small
    sd = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    sd.pop("conv_in.bias")
    sd["extra.weight"] = torch.zeros(1)
    (tmp_path / "config.json").write_text((folder / "unet" / "config.json").read_text())
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"diffusers format.*missing keys: conv_in\.bias.*unexpected keys: "
                                              r"extra\.weight"):
        convert(tmp_path)

    ddpm = to_original_ddpm(diffusers_unet(SMALL_DDPM_STYLE, seed=2).state_dict(), 2)
    ddpm.pop("mid.attn_1.q.bias")
    torch.save(ddpm, tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointError, match=r"original-DDPM format.*missing keys: mid_block\.attentions\.0\.to_q"):
        convert(tmp_path / "broken.ckpt", config=SMALL_DDPM_STYLE_OURS)
    with pytest.raises(ConversionError, match="fit neither known configuration.*cifar10-32.*celebahq-lsun-256"):
        convert(tmp_path / "broken.ckpt")                    # no config given, and it is neither preset


class WritesMarker:
    """Unpickling this calls open(marker, "w"): a stand-in for arbitrary code in a pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_objects_are_refused_without_running_them(small, tmp_path):
    _, folder = small
    marker = tmp_path / "marker"
    unet_dir = tmp_path / "unet"
    unet_dir.mkdir()
    (unet_dir / "config.json").write_text((folder / "unet" / "config.json").read_text())
    torch.save({"conv_in.weight": torch.zeros(1), "payload": WritesMarker(marker)},
               unet_dir / "diffusion_pytorch_model.bin")
    torch.save({"payload": WritesMarker(marker)}, tmp_path / "model.ckpt")
    for src in (unet_dir, tmp_path / "model.ckpt"):
        with pytest.raises(ConversionError, match="refusing to unpickle"):
            convert(src)
        assert not marker.exists()
    fn, args = WritesMarker(marker).__reduce__()   # the payload is armed: what unpickling would call writes it
    fn(*args)
    assert marker.exists()


@pytest.mark.parametrize("setting,named", [
    ({"time_embedding_type": "fourier"}, "time_embedding_type"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ({"center_input_sample": True}, "center_input_sample"),
    ({"downsample_type": "resnet"}, "downsample_type"),
    ({"upsample_type": "resnet"}, "upsample_type"),
    ({"attn_norm_num_groups": 16}, "attn_norm_num_groups"),
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D"]}, "do not mirror"),
    ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]}, "CrossAttnDownBlock2D"),
    ({"cross_attention_dim": 768}, "unknown UNet2DModel settings"),
])
def test_unsupported_diffusers_settings_are_refused_by_name(setting, named, tmp_path):
    config = {"_class_name": "UNet2DModel", **SMALL_CLASS_COND, **setting}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=named):
        convert(tmp_path)


@pytest.mark.parametrize("setting,named", [
    ({"norm_eps": "1e-5"}, "norm_eps must be a number, got '1e-5'"),
    ({"layers_per_block": 1.0}, "layers_per_block must be a whole number"),
    ({"downsample_padding": -1}, "downsample_padding must be 0 (the original DDPM's pad) or 1, got -1"),
    ({"block_out_channels": 32}, "a setting of the wrong kind"),
])
def test_diffusers_settings_of_the_wrong_kind_are_refused_naming_the_file(setting, named, tmp_path):
    config = {"_class_name": "UNet2DModel", **SMALL_CLASS_COND, **setting}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=re.escape(named)) as e:
        convert(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)


def test_bad_sources_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ConversionError, match="no config.json"):
        convert(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **SMALL_CLASS_COND}))
    with pytest.raises(ConversionError, match="no diffusion_pytorch_model.safetensors or .bin"):
        convert(tmp_path)
    with pytest.raises(SystemExit, match="^error: .*no diffusion_pytorch_model"):
        main([str(tmp_path), str(tmp_path / "out")])


# ----- the command -------------------------------------------------------------------------------------
def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "invdiff_min.convert", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_bad_input_is_a_one_line_error(tmp_path):
    """`main` is what `python -m invdiff_min.convert` runs; SystemExit(message) prints the message alone (no
    traceback) and exits with status 1."""
    with pytest.raises(SystemExit, match="^error: .*nowhere does not exist; pass a diffusers folder") as exit_:
        main([str(tmp_path / "nowhere"), str(tmp_path / "out")])
    assert "\n" not in str(exit_.value)
    with pytest.raises(SystemExit, match="^error: .*no config.json"):
        main([str(tmp_path), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    result = run_cli(tmp_path / "nowhere", tmp_path / "out")   # and the real command
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: ") and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_writes_a_checkpoint_that_load_unet_rebuilds(small, tmp_path):
    model, folder = small
    out = tmp_path / "converted"
    result = run_cli(folder / "unet", out)                    # a bare UNet folder; its scheduler is a sibling
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "check: reloaded checkpoint matches" in result.stdout
    reloaded, state, ckpt = load_unet(out, weights="model")
    assert ckpt.name == "ckpt-0000000" and state["step"] == 0
    config = state["config"]
    assert config["preset"] == "converted" and config["format"] == "diffusers"
    assert config["diffusion"] == {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.03,
                                   "beta_schedule": "linear", "variance_type": "fixed_large", "clip_sample": True}
    x, t = small_inputs(3)
    assert max_diff(reloaded, model, x, t, torch.tensor([1, 2])) < ATOL
    with pytest.raises(SystemExit, match="^error: .*already holds checkpoints"):
        main([str(folder), str(out)])
    run = tmp_path / "run"                                    # a run folder: a checkpoint there shadows run/base
    (run / "base").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"^error: .*run is not empty \(it holds base, config.json\)"):
        main([str(folder), str(run)])
    assert sorted(p.name for p in run.iterdir()) == ["base", "config.json"]
    fifo = tmp_path / "model.ckpt"
    os.mkfifo(fifo)                                           # torch.load would wait on it forever
    with pytest.raises(SystemExit, match="^error: .*model.ckpt is not a regular file or a folder"):
        main([str(fifo), str(tmp_path / "new")])
