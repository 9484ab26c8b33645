"""Bad input at the command line gives one line that names the problem and the fix (exit status 1, no
traceback); interrupted head training resumes exactly; the same seed gives the same bits."""
import json
import shutil

import pytest
import torch

from conftest import fails_with, run_script
from invdiff_min import pipeline
from invdiff_min.checkpoint import CheckpointError, list_checkpoints, load_tensors, load_unet, save_tensors
from invdiff_min.config import RunConfig
from invdiff_min.data import load_splits
from invdiff_min.runs import resume_stage, save_stage


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run: base, losses, groups, invdiff head, summary."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert run_script("train.py", ["--preset", "tiny", "--out", str(out), "--no-progress"]) == 0
    return out


def copy_run(run, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(run, dst)
    return dst


def test_existing_run_folder_is_never_overwritten_and_resume_needs_the_same_config(run, tmp_path):
    before = (run / "config.json").read_text()
    fails_with("train.py", ["--preset", "tiny", "--out", str(run)], "already exists", "--resume", "--overwrite")
    fails_with("train.py", ["--preset", "tiny", "--out", str(run), "--resume", "--steps", "7"],
               "different config", "--out NEW_FOLDER")
    assert (run / "config.json").read_text() == before


@pytest.mark.parametrize("argv,messages", [
    (["--preset", "huge"], ["unknown preset"]),
    (["--device", "tpu"], ["unknown --device 'tpu'", "cpu"]),
    (["--set", "groups.method=kmeans"], ["groups.method", "class_margin", "'kmeans'"]),
    (["--set", "groups.method=class_margin", "--set", "losses.profile_draws=0"], ["losses.profile_draws above 0"]),
    (["--set", "groups.method=class_label_topk", "--set", "losses.profile_draws=0"],
     ["'class_label_topk' reads the label profile", "losses.profile_draws above 0"]),
    (["--set", "head.condition=group"], ["head.condition must be one of class, class_group", "'group'"]),
    (["--set", "eval.sampler=ddmp"], ["eval.sampler must be one of ddim, ddpm", "'ddmp'"]),   # now, not after training
    (["--set", "losses.target=x_0"], ["losses.target must be one of eps, x0", "'x_0'"]),    # was read as x0
    (["--set", "unet.norm_num_groups=0"], ["norm_num_groups 0 must be whole numbers of at least 1"]),
    (["--set", "train.grad_clip=-1"], ["train.grad_clip must be a number in", "positive gradient-norm bound"]),
    (["--set", "head.grad_clip=0"], ["head.grad_clip must be a number in"]),   # was silent: no training at all
    (["--set", "groups.restarts=0"], ["groups.restarts must be a number in [1, 1,000]"]),
    (["--set", "unet.dropout=5"], ["unet.dropout must be a number in [0, 0.999]"]),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nonsense"], ["--device"]),
])
def test_train_refuses_unknown_names(argv, messages, tmp_path):
    fails_with("train.py", [*argv, "--out", str(tmp_path / "x")], *messages)
    assert not (tmp_path / "x").exists()


def test_a_base_checkpoint_with_a_missing_file_is_named(run, tmp_path):
    broken = copy_run(run, tmp_path)
    ckpt = list_checkpoints(broken / "base")[-1]
    (ckpt / "ema.safetensors").unlink()
    fails_with("sample.py", ["--ckpt", str(broken), "--out", str(tmp_path / "s")], "ema.safetensors")


def test_a_head_trained_on_another_base_is_refused(run, tmp_path):
    other = tmp_path / "other"
    assert run_script("train.py", ["--preset", "tiny", "--out", str(other), "--stage", "base", "--seed", "5",
                       "--no-progress"]) == 0
    mixed = copy_run(run, tmp_path)
    fails_with("train.py", ["--preset", "tiny", "--out", str(mixed), "--resume", "--stage", "eval", "--base",
                            str(other / "base")], "losses.json: the per-sample losses there were computed with a "
               "different base model")
    for name in ("losses.json", "losses.safetensors"):      # no losses kept: the head's own check refuses
        (mixed / name).unlink()
    fails_with("train.py", ["--preset", "tiny", "--out", str(mixed), "--resume", "--stage", "eval", "--base",
                            str(other / "base")], "different base model")


def test_a_base_made_for_other_data_is_refused_before_the_run_folder_is_touched(run, tmp_path):
    three = tmp_path / "three"                                # 3 classes against the built-in 2
    assert run_script("train.py", ["--preset", "tiny", "--dataset", "shapes3", "--out", str(three), "--stage",
                                   "base", "--steps", "1", "--no-progress"]) == 0
    fails_with("train.py", ["--preset", "tiny", "--out", str(tmp_path / "a"), "--base", str(three)], "--base",
               "was made for classes 3, but the data has 2")
    fails_with("train.py", ["--preset", "tiny", "--out", str(tmp_path / "b"), "--resolution", "32", "--base",
                            str(run)], "was made for an image side of 16, but the data has 32", "--resolution")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_overwrite_refuses_a_base_inside_the_run_it_would_replace(run, tmp_path):
    mine = copy_run(run, tmp_path)
    before = sorted(p.relative_to(mine) for p in mine.rglob("*"))
    fails_with("train.py", ["--preset", "tiny", "--out", str(mine), "--overwrite", "--base", str(mine / "base")],
               "lies inside", "--overwrite moves aside", "copy it out")
    fails_with("train.py", ["--preset", "tiny", "--out", str(mine), "--overwrite", "--set",
                            f"train.init_from={mine / 'base'}"], "lies inside")   # the same through --set
    assert sorted(p.relative_to(mine) for p in mine.rglob("*")) == before
    link = tmp_path / "link"                                  # --overwrite would move the link, not the run
    link.symlink_to(mine)
    fails_with("train.py", ["--preset", "tiny", "--out", str(link), "--overwrite"], "is a symbolic link",
               str(mine.resolve()))
    assert link.is_symlink() and sorted(p.relative_to(mine) for p in mine.rglob("*")) == before


def test_sample_keeps_two_runs_outputs_apart_and_overwrite_replaces_them(run, tmp_path):
    out, argv = tmp_path / "s", ["--ckpt", str(run), "--out", str(tmp_path / "s"), "--steps", "2"]
    assert run_script("sample.py", [*argv, "--n-per-class", "3", "--png"]) == 0
    assert len(list((out / "png").iterdir())) == 6
    fails_with("sample.py", [*argv, "--n-per-class", "1"], "already holds samples.safetensors, grid.png, png",
               "--overwrite to replace it")
    assert run_script("sample.py", [*argv, "--n-per-class", "1", "--overwrite"]) == 0
    assert not (out / "png").exists()                        # no leftover images of the earlier model
    assert load_tensors(out / "samples.safetensors")["images"].shape[0] == 2
    (out / "png").mkdir()
    (out / "png" / "notes.txt").write_text("keep me")
    fails_with("sample.py", [*argv, "--overwrite"], "png/notes.txt", "no sample.py run recorded", "sample.json")
    assert (out / "png" / "notes.txt").read_text() == "keep me"
    mine = tmp_path / "mine"                                 # a folder of the user's that merely has such names
    (mine / "png").mkdir(parents=True)
    (mine / "png" / "photo.png").write_bytes(b"mine")
    (mine / "metrics.json").write_text('{"my": 1}')
    fails_with("sample.py", [*argv, "--out", str(mine), "--overwrite"], "png/photo.png", "metrics.json")
    fails_with("sample.py", [*argv, "--out", str(mine)], "delete those files yourself", "no sample.json")
    assert (mine / "png" / "photo.png").read_bytes() == b"mine" and (mine / "metrics.json").is_file()
    fails_with("sample.py", [*argv, "--out", str(tmp_path / "t"), "--seed", str(2**70)], "--seed must be an integer")


def test_sample_evaluate_with_too_few_samples_is_refused_before_sampling(run, tmp_path):
    fails_with("sample.py", ["--ckpt", str(run), "--out", str(tmp_path / "s"), "--evaluate", "--n-per-class", "1"],
               "at least 4 samples", "--n-per-class 2")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("error,says", [
    (KeyboardInterrupt(), "interrupted (Ctrl-C)"),
    (RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"),
     "out of memory"),
])
def test_the_error_boundary_turns_ctrl_c_and_the_cpu_allocator_into_one_line(error, says):
    from invdiff_min.errors import exit_on_error
    with pytest.raises(SystemExit) as e:
        with exit_on_error():
            raise error
    assert e.value.code.startswith(f"error: {says}") and "\n" not in e.value.code
    with pytest.raises(RuntimeError, match="a bug"):          # any other RuntimeError keeps its traceback
        with exit_on_error():
            raise RuntimeError("a bug")


def test_sample_evaluate_reads_the_data_before_sampling(run, tmp_path, monkeypatch):
    from invdiff_min.inference import InvDiffPipeline

    def no_data(self):
        raise ValueError("dataset root not found")

    def no_sampling(self, *args, **kwargs):
        raise AssertionError("sampled before the data was read")
    monkeypatch.setattr(InvDiffPipeline, "judge", no_data)
    monkeypatch.setattr(InvDiffPipeline, "__call__", no_sampling)
    fails_with("sample.py", ["--ckpt", str(run), "--out", str(tmp_path / "s"), "--evaluate"], "dataset root not found")


@pytest.mark.parametrize("window", [5, None, [0, "9"]])
def test_a_hand_edited_losses_json_is_named(run, tmp_path, window):
    edited = copy_run(run, tmp_path)
    info = json.loads((edited / "losses.json").read_text())
    info["t_window"] = window
    (edited / "losses.json").write_text(json.dumps(info))
    fails_with("train.py", ["--preset", "tiny", "--out", str(edited), "--resume", "--stage", "groups"],
               "losses.json: t_window must be a list [lo, hi) of two timesteps", "--stage losses again")


def test_group_weights_of_other_samples_are_refused(run, tmp_path):
    mixed = copy_run(run, tmp_path)
    shutil.rmtree(mixed / "invdiff")
    saved = load_tensors(mixed / "groups.safetensors")
    save_tensors(mixed / "groups.safetensors", {"weights": saved["weights"], "index": saved["index"].flip(0)})
    fails_with("train.py", ["--preset", "tiny", "--out", str(mixed), "--resume", "--stage", "head"],
               "do not match the dataset", "--stage groups")


@pytest.mark.parametrize("flags,message", [
    (["--strength", "-1"], "--strength must be a number in [0, 20]"),
    (["--strength", "nan"], "--strength"),
    (["--guidance-scale", "100"], "--guidance-scale"),
    (["--eta", "1.5"], "--eta must be a number in [0, 1]"),
    (["--steps", "0"], "--steps must be in [1, 1000]"),
    (["--steps", "5000"], "--steps must be in [1, 1000]"),
    (["--n-per-class", "0"], "--n-per-class"),
    (["--batch-size", "0"], "--batch-size"),
    (["--head", "oracle"], "no trained head 'oracle'"),
])
def test_sample_refuses_out_of_range_numbers(run, tmp_path, flags, message):
    fails_with("sample.py", ["--ckpt", str(run), "--out", str(tmp_path / "s"), *flags], message)


def test_a_non_finite_loss_stops_training_keeps_the_last_good_checkpoint_and_resumes_at_a_lower_rate(
        tmp_path, monkeypatch):
    real = pipeline.training_loss
    calls = []

    def nan_at_step_16(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 17 else loss
    monkeypatch.setattr(pipeline, "training_loss", nan_at_step_16)
    out = tmp_path / "run"
    argv = ["--preset", "tiny", "--out", str(out), "--stage", "base", "--no-progress"]
    fails_with("train.py", argv, "non-finite loss nan at base step 16", "--resume --lr 0.0005")
    assert [p.name for p in list_checkpoints(out / "base")] == ["ckpt-0000015"]
    monkeypatch.undo()
    assert run_script("train.py", [*argv, "--resume", "--lr", "0.0005"]) == 0
    assert list_checkpoints(out / "base")[-1].name == "ckpt-0000030"
    assert json.loads((out / "config.json").read_text())["config"]["train"]["lr"] == 0.0005


@pytest.mark.parametrize("condition", ["class", "class_group"])
def test_head_training_killed_during_a_checkpoint_write_resumes_to_the_same_weights(run, tmp_path, condition):
    cfg = RunConfig.from_dict(json.loads((run / "config.json").read_text())["config"])
    cfg.head.steps, cfg.head.checkpoint_every, cfg.head.condition = 9, 3, condition
    data = load_splits(cfg.data).train
    base, _, _ = load_unet(run)
    weights = pipeline.group_assignments("invdiff", data, pipeline.load_groups(run))
    cpu = torch.device("cpu")
    _, full = pipeline.train_head(cfg, data, base, weights, cpu, tmp_path / "h_full", progress=False)
    writes = []

    def crash(name):
        writes.append(name)
        if len(writes) == 4 + 2:                   # head checkpoints hold 4 files: die inside the second one
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        pipeline.train_head(cfg, data, base, weights, cpu, tmp_path / "h_cut", progress=False, fault_hook=crash)
    assert [p.name for p in list_checkpoints(tmp_path / "h_cut")] == ["ckpt-0000003"]
    _, resumed = pipeline.train_head(cfg, data, base, weights, cpu, tmp_path / "h_cut", progress=False)
    for name in ("head", "head_ema", "optimizer", "history"):
        a, b = load_tensors(full / f"{name}.safetensors"), load_tensors(resumed / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_head_told_the_sub_group_does_not_resume_on_other_groups(run, tmp_path):
    """Sub-group labels mean nothing under other groups (e.g. inferred again with --stage groups): refused."""
    cfg = RunConfig.from_dict(json.loads((run / "config.json").read_text())["config"])
    cfg.head.steps, cfg.head.checkpoint_every, cfg.head.condition = 2, 2, "class_group"
    data = load_splits(cfg.data).train
    base, _, _ = load_unet(run)
    cpu = torch.device("cpu")
    pipeline.train_head(cfg, data, base, pipeline.group_assignments("invdiff", data, pipeline.load_groups(run)), cpu,
                        tmp_path / "h", progress=False)
    cfg.head.steps = 4
    with pytest.raises(CheckpointError, match="another head_group_members"):     # the same classes, other members
        pipeline.train_head(cfg, data, base, pipeline.group_assignments("oracle", data), cpu, tmp_path / "h",
                            progress=False)


def test_a_head_does_not_resume_on_other_groups_but_a_checkpoint_from_before_the_check_does(run, tmp_path):
    """A class-conditioned head trained on one group assignment W is refused on another (e.g. a benchmark's
    official-grouper head after the grouper changed); a checkpoint written before W was recorded still resumes."""
    cfg = RunConfig.from_dict(json.loads((run / "config.json").read_text())["config"])
    cfg.head.steps, cfg.head.checkpoint_every = 2, 2
    data = load_splits(cfg.data).train
    base, _, _ = load_unet(run)
    cpu = torch.device("cpu")
    inferred = pipeline.group_assignments("invdiff", data, pipeline.load_groups(run))
    pipeline.train_head(cfg, data, base, inferred, cpu, tmp_path / "h", progress=False)
    cfg.head.steps = 4
    with pytest.raises(CheckpointError, match="another groups_fingerprint"):
        pipeline.train_head(cfg, data, base, pipeline.group_assignments("oracle", data), cpu, tmp_path / "h",
                            progress=False)
    head = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(head.parameters())
    save_stage(tmp_path / "old", 1, {"head": head}, opt, torch.zeros(3), {"groups": "invdiff"})  # no fingerprint
    old = resume_stage(tmp_path / "old", {"head": head}, opt, torch.zeros(3), recorded={"groups_fingerprint": "x"})
    assert old[0] == 1
    save_stage(tmp_path / "new", 1, {"head": head}, opt, torch.zeros(3), {"groups_fingerprint": "y"})
    with pytest.raises(CheckpointError, match="another groups_fingerprint"):
        resume_stage(tmp_path / "new", {"head": head}, opt, torch.zeros(3), recorded={"groups_fingerprint": "x"})


def test_same_seed_gives_bit_identical_checkpoints_and_samples_and_the_run_records_its_provenance(run, tmp_path):
    again = tmp_path / "again"
    argv = ["--preset", "tiny", "--out", str(again), "--stage", "base", "--no-progress"]
    assert run_script("train.py", argv) == 0
    a, b = list_checkpoints(run / "base")[-1], list_checkpoints(again / "base")[-1]
    for name in ("model", "ema", "optimizer"):
        x, y = load_tensors(a / f"{name}.safetensors"), load_tensors(b / f"{name}.safetensors")
        assert all(torch.equal(x[k], y[k]) for k in x), name
    for out in ("s1", "s2"):
        assert run_script("sample.py", ["--ckpt", str(run), "--out", str(tmp_path / out), "--steps", "3",
                            "--n-per-class", "2"]) == 0
    s1, s2 = (load_tensors(tmp_path / o / "samples.safetensors")["images"] for o in ("s1", "s2"))
    assert torch.equal(s1, s2)
    record = json.loads((again / "config.json").read_text())
    assert record["torch"] == torch.__version__ and record["invdiff_min"]
    assert record["config"]["train"]["seed"] == 0 and record["command"] == ["train.py", *argv]
    assert record["python"] and record["platform"]
