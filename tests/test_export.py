"""The export: a run folder written as diffusers folders computes, in diffusers, what the run computes here.

Runs are made by hand from small random-weight models (save_checkpoint, as train.py writes them); diffusers is
the test-only reader, as in test_convert.py.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from invdiff_min.checkpoint import fingerprint, save_checkpoint, write_json
from invdiff_min.config import DiffusionConfig, get_preset
from invdiff_min.convert import convert, read_source
from invdiff_min.diffusion import cfg_eps
from invdiff_min.export import export_run, main
from invdiff_min.guidance import GuidedModel, InvariantGuidance
from invdiff_min.scheduler import DDPMScheduler
from invdiff_min.unet import UNet, UNetConfig

diffusers = pytest.importorskip("diffusers")

REPO = Path(__file__).resolve().parents[1]
# class-conditional (2 classes + null), multi-head attention, original-DDPM sinusoid, norm eps and padding:
# settings away from diffusers' defaults, so a dropped or swapped config entry shows in the outputs
BASE = UNetConfig(sample_size=16, block_out_channels=(16, 32), attention_levels=(False, True), layers_per_block=1,
                  attention_head_dim=8, norm_num_groups=8, norm_eps=1e-6, downsample_padding=0,
                  flip_sin_to_cos=False, freq_shift=1, num_classes=2)
DIFFUSION = DiffusionConfig(beta_end=0.03, variance_type="fixed_large", clip_sample=False)
STRENGTH = 2.5
RTOL = 1e-5            # float32 rounding, relative to the output's scale (Upsample2D's fused CPU path: ~1e-6)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small CPU ops on shared cores: one thread (see test_convert.py), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomized(module, seed: int):
    """Random weights everywhere: norm scales and biases too, and the head's zero-initialised conv_out (zeros
    would hide a swapped norm, bias or a head that is never run)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
            elif not p.any():
                p.copy_(torch.randn_like(p) * 0.1)
    return module.eval()


def make_run(folder: Path, mode: str = "additive", seed: int = 0, group_class: list[int] | None = None,
             **sampling):
    """A run folder as train.py leaves it: base/ (raw and EMA weights), invdiff/ (the head, its EMA; told the
    sub-group when `group_class` lists their classes) and config.json; `sampling`: eval fields (guidance_scale=3).
    Returns (run, base EMA, base raw, head)."""
    cfg = get_preset("tiny")
    cfg.unet, cfg.diffusion, cfg.eval.strength, cfg.head.mode = BASE, DIFFUSION, STRENGTH, mode
    for name, value in sampling.items():
        setattr(cfg.eval, name, value)
    ema, raw = randomized(UNet(BASE), seed), randomized(UNet(BASE), seed + 1)
    h = cfg.head
    head = (InvariantGuidance.copy_of(ema, group_class) if mode == "mix" else
            InvariantGuidance.small(BASE, h.block_out_channels, h.layers_per_block, (False, True), h.norm_num_groups,
                                    group_class))
    randomized(head, seed + 2)
    save_checkpoint(folder / "base", 30, {"model": raw.state_dict(), "ema": ema.state_dict()},
                    {"config": cfg.to_dict()})
    save_checkpoint(folder / "invdiff", 20, {"head": head.state_dict(), "head_ema": head.state_dict()},
                    {"config": cfg.to_dict(), "base_fingerprint": fingerprint(ema.state_dict()), "groups": "invdiff",
                     "head_net": head.net.config.to_dict(), "head_groups": group_class})
    write_json(folder / "config.json", {"config": cfg.to_dict()})
    return folder, ema, raw, head


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run, base, raw, head = make_run(tmp_path_factory.mktemp("run") / "run")
    out = tmp_path_factory.mktemp("exports") / "tiny"
    manifest, check = export_run(run, out)
    return run, out, base, raw, head, manifest, check


def inputs(seed: int = 0):
    """Two images at an early and a late step, labels: both classes, a class beside the null label, null alone."""
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    return x, torch.tensor([3, 871]), [torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([2, 2])]


def relative_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return (ours - ref).abs().max().item() / max(1.0, ref.abs().max().item())


def load_diffusers_unet(folder: Path):
    """UNet2DModel.from_pretrained, with every weight in the file used and every model weight found."""
    model, info = diffusers.UNet2DModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info                    # missing, unexpected, mismatched keys, errors
    return model.eval()


def readme_snippet(out: Path, monkeypatch) -> dict:
    """Run the README's Python block (from OUT's parent, as its `folder = "NAME"` line assumes); its names."""
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S)[1]
    monkeypatch.chdir(out.parent)
    names = {}
    exec(compile(code, str(out / "README.md"), "exec"), names)
    return names


# ----- what diffusers reads --------------------------------------------------------------------------------
def test_export_writes_the_layout_and_diffusers_loads_every_folder(exported):
    run, out, *_, manifest, check = exported
    assert sorted(os.listdir(out)) == ["README.md", "guidance_head", "invdiff.json", "scheduler", "unet"]
    assert sorted(os.listdir(out / "unet")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]     # no temporary folder left
    assert load_diffusers_unet(out / "unet").config.num_class_embeds == 3
    assert load_diffusers_unet(out / "guidance_head").config.num_class_embeds == 3
    info = json.loads((out / "invdiff.json").read_text())
    assert info == manifest
    assert (info["mode"], info["strength"], info["null_label"], info["num_classes"]) == ("additive", STRENGTH, 2, 2)
    assert info["base_weights"] == "ema" and info["head"] == "invdiff" and max(check.values()) <= 1e-6

    scheduler = diffusers.DDPMScheduler.from_pretrained(out / "scheduler")
    for key, value in DIFFUSION.scheduler_kwargs().items():
        assert scheduler.config[key] == value, key
    assert scheduler.config.prediction_type == "epsilon"
    ours = DDPMScheduler(**DIFFUSION.scheduler_kwargs())
    assert torch.allclose(scheduler.alphas_cumprod, ours.alphas_cumprod, atol=1e-6)


def test_exported_base_matches_ours_with_class_labels_and_null(exported):
    _, out, base, *_ = exported
    ref = load_diffusers_unet(out / "unet")
    x, t, labels = inputs(0)
    with torch.no_grad():
        diffs = [relative_diff(base(x, t, y), ref(x, t, class_labels=y).sample) for y in labels]
        diffs.append(relative_diff(base(x, t), ref(x, t, class_labels=torch.tensor([2, 2])).sample))  # y=None: null
    print(f"base, ours vs diffusers: max relative diff {max(diffs):.2e}")
    assert max(diffs) < RTOL, diffs


def test_exported_head_matches_invariant_guidance_with_phi_as_class_embedding(exported):
    _, out, *_, head, _, _ = exported
    ref = load_diffusers_unet(out / "guidance_head")
    x, t, labels = inputs(1)
    with torch.no_grad():
        outputs = [(head(x, t, y), ref(x, t, class_labels=y).sample) for y in labels]
    diffs = [relative_diff(ours, theirs) for ours, theirs in outputs]
    print(f"head, ours vs diffusers: max relative diff {max(diffs):.2e}")
    assert max(diffs) < RTOL, diffs
    assert min(ours.abs().max().item() for ours, _ in outputs) > 0.1      # a head that really acts


def test_readme_snippet_in_diffusers_equals_the_guided_model(exported, monkeypatch):
    """The README's eps_theta + w G_psi, run in diffusers, is GuidedModel at the run's w; silent on null."""
    _, out, base, _, head, _, _ = exported
    names = readme_snippet(out, monkeypatch)
    assert names["w"] == STRENGTH and names["x"].shape == (2, 3, 16, 16) and names["x"].isfinite().all()
    guided = GuidedModel(base, head, STRENGTH)
    x, t, labels = inputs(2)
    with torch.no_grad():
        diffs = [relative_diff(guided(x, t, y), names["eps_hat"](x, t, y)) for y in labels]
        null = torch.tensor([2, 2])
        assert relative_diff(names["eps_hat"](x, t, null), base(x, t, null)) < RTOL     # no head on null
        assert relative_diff(guided(x, t, labels[0]), base(x, t, labels[0])) > 1e-2     # and a real one elsewhere
    print(f"guided eps_theta + w G, ours vs diffusers: max relative diff {max(diffs):.2e}")
    assert max(diffs) < RTOL, diffs


def test_mix_mode_head_exports_with_the_official_combination(tmp_path, monkeypatch):
    run, base, _, head = make_run(tmp_path / "run", mode="mix", seed=5)
    manifest, _ = export_run(run, tmp_path / "mix")
    assert manifest["mode"] == "mix" and manifest["mix_ratio"] == 0.5
    names = readme_snippet(tmp_path / "mix", monkeypatch)
    guided = GuidedModel(base, head, STRENGTH, mode="mix")
    x, t, labels = inputs(3)
    with torch.no_grad():
        diffs = [relative_diff(guided(x, t, y), names["eps_hat"](x, t, y)) for y in labels]
    print(f"mix mode, ours vs diffusers: max relative diff {max(diffs):.2e}")
    assert max(diffs) < RTOL, diffs


@pytest.mark.parametrize("mode", ["additive", "mix"])
def test_a_head_told_the_sub_group_exports_and_the_readme_draws_sub_groups(tmp_path, monkeypatch, mode):
    """Phi(class of g) + Phi'(g) becomes the head's one class table over its sub-groups; the README's eps_hat takes
    sub-group labels (the base reads their class) and equals GuidedModel; its sampling loop draws sub-groups."""
    run, base, _, head = make_run(tmp_path / "run", mode, seed=7, group_class=[0, 0, 1, 1, 1])
    manifest, check = export_run(run, tmp_path / "groups")
    assert manifest["head_groups"] == [0, 0, 1, 1, 1] and max(check.values()) <= 1e-6
    ref = load_diffusers_unet(tmp_path / "groups" / "guidance_head")
    names = readme_snippet(tmp_path / "groups", monkeypatch)
    assert names["x"].isfinite().all() and set(names["y"].tolist()) <= {0, 1, 2, 3, 4}
    assert torch.bincount(names["draw_groups"](torch.tensor([1] * 50))).tolist()[2:] in ([17, 17, 16], [17, 16, 17],
                                                                                          [16, 17, 17])
    lone = {int(names["draw_groups"](torch.tensor([1]), torch.Generator().manual_seed(s))) for s in range(40)}
    assert lone == {2, 3, 4}                         # one image at a time reaches every sub-group
    guided = GuidedModel(base, head, STRENGTH, mode=mode)
    x, t, _ = inputs(4)
    with torch.no_grad():
        for g in (torch.tensor([0, 4]), torch.tensor([1, 5]), torch.tensor([5, 5])):     # 5: the head's null
            assert relative_diff(head(x, t, g), ref(x, t, class_labels=g).sample) < RTOL
            assert relative_diff(guided(x, t, g), names["eps_hat"](x, t, g)) < RTOL
        assert relative_diff(head(x, t, torch.tensor([2, 3])), head(x, t, torch.tensor([3, 2]))) > 1e-3


@pytest.mark.parametrize("outside, group_class", [(False, None), (True, None), (True, [0, 0, 1, 1, 1]),
                                                  (False, [0, 1])])
def test_a_run_sampled_with_class_guidance_exports_it(tmp_path, monkeypatch, outside, group_class):
    """A run whose evaluation uses classifier-free guidance (scale, interval, the head inside or outside it):
    invdiff.json records it and the README's eps_cfg, in diffusers, is what our sampler calls at each step."""
    run, base, _, head = make_run(tmp_path / "run", seed=9, group_class=group_class, guidance_scale=3.0,
                                  guidance_t_max=500, head_outside_cfg=outside)
    manifest, _ = export_run(run, tmp_path / "out")
    assert (manifest["guidance_scale"], manifest["guidance_t_max"], manifest["head_outside_cfg"]) == (3.0, 500, outside)
    names = readme_snippet(tmp_path / "out", monkeypatch)
    assert names["x"].isfinite().all()
    guided = GuidedModel(base, head, STRENGTH, head_outside_cfg=outside)
    x, _, _ = inputs(6)
    labels = torch.tensor([0, 1]) if group_class is None else torch.tensor([1, len(group_class) - 1])
    null = torch.full((2,), guided.null_label)
    with torch.no_grad():
        for t, expected in ((3, cfg_eps(guided, x, torch.full((2,), 3), labels, null, 3.0)),
                            (871, guided(x, torch.full((2,), 871), labels))):       # t >= t_max: not guided
            assert relative_diff(expected, names["eps_cfg"](x, torch.tensor(t), labels)) < RTOL, t
        unguided = guided(x, torch.full((2,), 3), labels)
        assert relative_diff(unguided, names["eps_cfg"](x, torch.tensor(3), labels)) > 1e-2
    assert "classifier-free guidance at scale s = 3.0 at t < 500 only" in (tmp_path / "out" / "README.md").read_text()
    (run / "config.json").unlink()                  # without it, the head's saved config says the same
    again, _ = export_run(run, tmp_path / "again")
    assert (again["guidance_scale"], again["guidance_t_max"], again["head_outside_cfg"]) == (3.0, 500, outside)


def test_scale_0_with_the_head_outside_and_t_max_0_export_what_the_sampler_does(tmp_path, monkeypatch):
    run, base, _, head = make_run(tmp_path / "run", seed=12, guidance_scale=0.0, head_outside_cfg=True)
    export_run(run, tmp_path / "out")
    names = readme_snippet(tmp_path / "out", monkeypatch)
    x, t, y = inputs(8)[0], torch.tensor(871), torch.tensor([0, 1])
    with torch.no_grad():                            # s = 0, head outside: eps_theta(null) + w G_psi(y)
        expected = base(x, t.expand(2), torch.full((2,), 2)) + STRENGTH * head(x, t.expand(2), y)
        assert relative_diff(expected, names["eps_cfg"](x, t, y)) < RTOL
    run, *_ = make_run(tmp_path / "run0", seed=12, guidance_scale=3.0, guidance_t_max=0)
    export_run(run, tmp_path / "out0")               # guided at t < 0: never, so no eps_cfg
    assert "eps_cfg" not in (tmp_path / "out0" / "README.md").read_text()


def test_the_base_alone_of_a_guided_run_exports_its_class_guidance(tmp_path, monkeypatch):
    run, base, _, _ = make_run(tmp_path / "run", seed=11, guidance_scale=2.0)
    export_run(run, tmp_path / "out", head="none")
    names = readme_snippet(tmp_path / "out", monkeypatch)
    x, _, _ = inputs(7)
    y, t = torch.tensor([1, 0]), torch.full((2,), 871)
    with torch.no_grad():
        expected = cfg_eps(base, x, t, y, torch.full((2,), base.null_label), 2.0)
        assert relative_diff(expected, names["eps_cfg"](x, torch.tensor(871), y)) < RTOL


def test_a_run_sampled_plainly_exports_no_class_guidance(exported):
    manifest, out = exported[5], exported[1]
    assert (manifest["guidance_scale"], manifest["guidance_t_max"], manifest["head_outside_cfg"]) == (1.0, None, False)
    assert "eps_cfg" not in (out / "README.md").read_text()


# ----- back in: export -> convert ------------------------------------------------------------------------
def test_export_then_convert_gives_bit_identical_weights_config_and_schedule(exported):
    _, out, base, _, head, _, _ = exported
    source = read_source(out)                              # the export is a diffusers pipeline folder to convert.py
    assert source.config == BASE and source.diffusion == DIFFUSION.scheduler_kwargs()
    back = convert(out).state_dict()
    assert back.keys() == base.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in base.state_dict().items())
    head_back = convert(out / "guidance_head").state_dict()
    assert torch.equal(head_back.pop("class_embedding.weight"), head.phi.weight)
    assert head_back.keys() == head.net.state_dict().keys()
    assert all(torch.equal(head_back[k], v) for k, v in head.net.state_dict().items())


def test_raw_weights_export_the_raw_base_and_refuse_the_ema_trained_head(exported, tmp_path):
    run, _, _, raw, *_ = exported
    manifest, _ = export_run(run, tmp_path / "raw", weights="model", head="none")
    assert manifest["base_weights"] == "model" and manifest["guidance_head"] is None
    assert sorted(os.listdir(tmp_path / "raw")) == ["README.md", "invdiff.json", "scheduler", "unet"]
    assert all(torch.equal(convert(tmp_path / "raw").state_dict()[k], v) for k, v in raw.state_dict().items())
    assert "No guidance head" in (tmp_path / "raw" / "README.md").read_text()
    assert says(error_of([str(run), str(tmp_path / "raw-head"), "--weights", "model"]), "--weights ema", "--head none")
    assert not (tmp_path / "raw-head").exists()


# ----- refusals ------------------------------------------------------------------------------------------
def error_of(argv) -> str:
    """The message main(argv) exits with, checked to be one line 'error: ...' (no traceback)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert isinstance(exit_.value.code, str) and re.fullmatch(r"error: [^\n]+", exit_.value.code), exit_.value.code
    return exit_.value.code


def says(message: str, *parts: str) -> bool:
    return all(part in message for part in parts)


def test_bad_input_is_a_one_line_error_that_deletes_nothing(exported, tmp_path):
    run, out, *_ = exported
    assert says(error_of([str(tmp_path / "nowhere"), str(tmp_path / "a")]), "nowhere does not exist", "train.py")
    assert says(error_of([str(run), str(tmp_path / "a"), "--head", "oracle"]), "no trained head 'oracle'",
                "--compare", "--head none")
    for w in ("nan", "inf", "-1e9"):                        # written into invdiff.json as w: refused first
        assert says(error_of([str(run), str(tmp_path / "a"), f"--strength={w}"]), "--strength must be a number in "
                    "[0, 20]")
    assert not (tmp_path / "a").exists()
    mine = tmp_path / "mine"
    (mine / "unet").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    assert says(error_of([str(run), str(mine)]), "exists and is not empty", "--overwrite")
    assert says(error_of([str(run), str(mine), "--overwrite"]), "not one", "notes.txt", "nothing was deleted")
    (mine / "invdiff.json").write_text(json.dumps({"format": "invdiff-min diffusers export"}))
    assert says(error_of([str(run), str(mine), "--overwrite"]), "nothing was deleted")   # marked, holds notes.txt
    assert (mine / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_overwrite_replaces_an_earlier_export_and_a_failed_export_leaves_nothing(exported, tmp_path, monkeypatch):
    run, *_ = exported
    out = tmp_path / "out"
    out.mkdir()                                            # an empty folder is fine
    export_run(run, out, head="none")
    main([str(run), str(out), "--overwrite", "--strength", "1.5"])
    assert json.loads((out / "invdiff.json").read_text())["strength"] == 1.5 and (out / "guidance_head").is_dir()

    import invdiff_min.export as export

    def crash(*args):
        raise RuntimeError("disk full")
    monkeypatch.setattr(export, "readme_text", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        export_run(run, tmp_path / "new")
    with pytest.raises(RuntimeError, match="disk full"):
        export_run(run, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]     # no half export, no temporary folder
    assert json.loads((out / "invdiff.json").read_text())["strength"] == 1.5   # the earlier export is intact


def test_command_line_exports_and_checks(exported, tmp_path):
    run, *_ = exported
    result = subprocess.run([sys.executable, "-m", "invdiff_min.export", str(run), str(tmp_path / "cli")], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "check: the folders read back match" in result.stdout
    assert (tmp_path / "cli" / "guidance_head" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize("head_groups", [[0, 9], [[0, 1]], "0,1", [0, 0, 1]])
def test_a_head_checkpoint_whose_sub_groups_do_not_fit_is_a_one_line_error(tmp_path, head_groups):
    """head_groups in state.json that name no class of the base, or do not match the weights: refused, named."""
    from invdiff_min.checkpoint import CheckpointError, list_checkpoints
    from invdiff_min.guidance import load_head

    run, base, _, _ = make_run(tmp_path / "run", group_class=[0, 0, 1, 1, 1])
    state_file = list_checkpoints(run / "invdiff")[-1] / "state.json"
    state = json.loads(state_file.read_text())
    state["head_groups"] = head_groups
    state.pop("state_sha256")                        # a deliberate edit (else the integrity check answers first)
    state_file.write_text(json.dumps(state))
    with pytest.raises(CheckpointError) as e:
        load_head(run / "invdiff", base)
    message = str(e.value)                           # the classes are refused, a wrong count by the weights' shape
    assert "\n" not in message and str(state_file.parent) in message
    assert ("head_groups" in message) if head_groups != [0, 0, 1] else ("phi_group.weight" in message)
