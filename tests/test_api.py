"""The Python API (invdiff_min.InvDiffPipeline): README's example runs as written, the API samples exactly what
the evaluation and sample.py sample, and a training stage logs metrics.jsonl that a resume keeps consistent."""
import json
import re
import shutil

import pytest
import torch

from conftest import ROOT, run_script
from invdiff_min import InvDiffPipeline
from invdiff_min.checkpoint import CheckpointError
from invdiff_min.evaluate import generate
from invdiff_min.guidance import GuidedModel


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A folder holding runs/tiny, made by the command README gives."""
    home = tmp_path_factory.mktemp("api")
    assert run_script("train.py", ["--preset", "tiny", "--out", home / "runs" / "tiny", "--no-progress"]) == 0
    return home


def test_the_readme_example_runs_as_written(runs, monkeypatch, capsys):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- api-example.*?-->\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(runs)
    exec(compile(block, "README.md (api example)", "exec"), {})
    printed = capsys.readouterr().out
    assert "torch.Size([4, 3, 16, 16]) [0, 0, 1, 1]" in printed


def test_the_api_samples_what_the_evaluation_samples(runs):
    pipe = InvDiffPipeline.from_pretrained(runs / "runs" / "tiny")
    labels = torch.arange(2).repeat_interleave(3)
    out = pipe(class_labels=labels, strength=2.0, generator=torch.Generator().manual_seed(5))
    expected, _ = generate(GuidedModel(pipe.base, pipe.head, 2.0), pipe.diffusion, 3, 2, (3, 16, 16),
                           pipe.sampler, pipe.num_inference_steps, seed=5, precision=pipe.precision)
    assert torch.equal(out.images, expected) and out.labels.tolist() == labels.tolist()
    np_images = pipe(class_labels=[1], output_type="np", generator=torch.Generator().manual_seed(0)).images
    pil = pipe(class_labels=[1], output_type="pil", generator=torch.Generator().manual_seed(0)).images
    assert np_images.shape == (1, 16, 16, 3) and pil[0].size == (16, 16)
    assert pipe.class_names == ["disc", "square"]
    with pytest.raises(ValueError, match="class_labels must lie in 0..1"):
        pipe(class_labels=[2])
    with pytest.raises(ValueError, match="output_type"):
        pipe(class_labels=[0], output_type="jpg")
    with pytest.raises(ValueError, match="num_inference_steps must be an integer in"):
        pipe(class_labels=[0], num_inference_steps=0)            # refused, not replaced by the default
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        pipe(class_labels=[0], batch_size=0)


@pytest.mark.parametrize("field, value, says", [
    ("guidance_scale", "3", 'eval.guidance_scale must be a number, got "3"'),
    ("head_outside_cfg", "false", "eval.head_outside_cfg must be true or"),
    ("guidance_t_max", 5000, "eval.guidance_t_max must be at most"),
    ("sampler", "ddmp", "eval.sampler must be one of ddim, ddpm"),
    ("unet", {"norm_num_groups": 0}, "norm_num_groups 0 must be whole numbers")])
def test_a_hand_edited_run_config_is_refused_naming_the_file_and_field(runs, tmp_path, field, value, says):
    """A run's sampling settings are read checked: a string where a number goes is not silently used."""
    run = tmp_path / "run"
    shutil.copytree(runs / "runs" / "tiny", run)
    record = json.loads((run / "config.json").read_text())
    if field == "unet":
        record["config"]["unet"].update(value)
    else:
        record["config"]["eval"][field] = value
    (run / "config.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError) as e:
        InvDiffPipeline.from_pretrained(run)
    assert str(run / "config.json") in str(e.value) and says in str(e.value) and "\n" not in str(e.value)


def test_a_checkpoint_under_another_program_s_config_json_loads_as_a_bare_checkpoint(runs, tmp_path):
    """A config.json without a "config" object (a diffusers model folder's, say) does not make a run folder."""
    folder = tmp_path / "diffusers_model"
    shutil.copytree(runs / "runs" / "tiny" / "base", folder / "ours")
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 16}))
    pipe = InvDiffPipeline.from_pretrained(folder / "ours")
    assert pipe.run_dir is None and pipe.head is None and pipe.strength == 1.0
    assert (pipe.sampler, pipe.num_inference_steps) == ("ddim", 50)     # a bare checkpoint: DDIM-50 (sample.py -h)


def test_stages_log_metrics_jsonl_consistent_with_the_checkpoint(runs):
    lines = [json.loads(s) for s in (runs / "runs" / "tiny" / "base" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines] == list(range(1, 31))
    assert all({"loss", "lr", "seconds"} <= set(e) for e in lines)
    head = (runs / "runs" / "tiny" / "invdiff" / "metrics.jsonl").read_text().splitlines()
    assert len(head) == 20


def test_progress_to_a_file_is_a_few_plain_lines(tmp_path):
    import subprocess
    import sys
    log = tmp_path / "run.log"
    with open(log, "w") as f:                        # stdout and stderr a file, as in `train.py > run.log 2>&1`
        r = subprocess.run([sys.executable, "train.py", "--preset", "tiny", "--out", str(tmp_path / "r"),
                            "--stage", "base"], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert r.returncode == 0 and "\r" not in text, text[-2000:]
    assert len([s for s in text.splitlines() if s.startswith("A. base model:")]) == 10


@pytest.mark.parametrize("edit,says", [({"clip_sample": "false"}, "clip_sample must be true or false"),
                                       ({"num_train_timesteps": "1000"}, "num_train_timesteps must be an integer")])
def test_a_hand_edited_noise_schedule_of_the_wrong_kind_is_refused_naming_the_file(runs, tmp_path, edit, says):
    base = shutil.copytree(runs / "runs" / "tiny" / "base", tmp_path / "base")
    ckpt = sorted(base.glob("ckpt-*"))[-1]
    state = json.loads((ckpt / "state.json").read_text())
    state["config"]["diffusion"].update(edit)
    state.pop("state_sha256")                        # a deliberate edit (else the integrity check answers first)
    (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=says) as e:
        InvDiffPipeline.from_pretrained(ckpt)
    assert str(ckpt / "state.json") in str(e.value)


def test_the_api_refuses_what_would_sample_nan_or_truncate_labels(runs):
    pipe = InvDiffPipeline.from_pretrained(runs / "runs" / "tiny")
    for bad in ({"strength": float("nan")}, {"guidance_scale": float("inf")}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a finite number"):
            pipe(class_labels=[0, 1], num_inference_steps=2, **bad)
    for labels in ([0.7, 1.9], [True, False], ["disc"]):
        with pytest.raises(ValueError, match="class_labels must be whole numbers"):
            pipe(class_labels=labels, num_inference_steps=2)
    with pytest.raises(ValueError, match="weights must be 'ema'"):
        InvDiffPipeline.from_pretrained(runs / "runs" / "tiny", weights="bogus")


def test_json_nested_too_deeply_or_a_pipe_is_one_error_naming_the_file(tmp_path):
    import os

    from invdiff_min.checkpoint import read_json
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        read_json(deep)
    os.mkfifo(tmp_path / "pipe.json")                      # reading it would block for ever
    with pytest.raises(CheckpointError, match="is not a regular file"):
        read_json(tmp_path / "pipe.json")
