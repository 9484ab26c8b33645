"""Nothing lost, nothing silently wrong, nothing hangs: the command line under hostile input.

Each test names a way the project could lose a run or a dataset, keep a half-written stage, or fail late or with
a traceback; the command must refuse at once with one line (`error: ...`) that names the problem and the fix,
before anything is written, moved or deleted. The data loaders' own attacks are in test_data_safety.py, the
checkpoint files' in test_integrity.py.
"""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import fails_with, run_script
from invdiff_min import pipeline


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes: equal snapshots mean nothing was touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny run that has finished its base stage."""
    out = tmp_path_factory.mktemp("rel") / "run"
    assert run_script("train.py", ["--preset", "tiny", "--out", out, "--stage", "base", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rel") / "full"
    assert run_script("train.py", ["--preset", "tiny", "--out", out, "--no-progress"]) == 0
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name))


def image_folder(root: Path, per_cell: int = 6) -> Path:
    """A small `folder` dataset: 2 classes x 2 bias values, solid colours, a metadata.csv."""
    from PIL import Image
    root.mkdir(parents=True)
    rows = ["file,y,bias"]
    for y in range(2):
        for b in range(2):
            for k in range(per_cell * (3 if b == y else 1)):
                name = f"{y}{b}_{k}.png"
                Image.new("RGB", (8, 8), (40 + 150 * b, 60 + 100 * y, 9 * k % 250)).save(root / name)
                rows.append(f"{name},{y},{b}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


# ----- data loss ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config_text,message", [
    ('{"_class_name": "UNet2DModel"}', "holds a config.json that is not a run's of invdiff-min"),
    ("{not json", "is not valid JSON"),
])
def test_a_folder_with_another_program_s_config_json_is_never_replaced(tmp_path, config_text, message):
    mine = tmp_path / "project"
    (mine / "sub").mkdir(parents=True)
    (mine / "config.json").write_text(config_text)
    (mine / "sub" / "notes.txt").write_text("precious")
    for flags in ([], ["--overwrite"], ["--resume"]):
        fails_with("train.py", ["--preset", "tiny", "--out", mine, *flags], str(mine), message, "nothing in" if
                   "JSON" in message else "nothing there is touched")
    assert (mine / "sub" / "notes.txt").read_text() == "precious" and sorted(os.listdir(mine)) == ["config.json", "sub"]


def test_an_out_folder_under_a_file_is_refused_before_the_data_is_read(base_run, tmp_path):
    under = base_run / "config.json" / "sub"
    fails_with("train.py", ["--preset", "tiny", "--out", under], "which is a file, not a folder")
    fails_with("sample.py", ["--ckpt", base_run, "--out", under], "which is a file, not a folder")


def test_png_names_stay_inside_their_folder():
    from invdiff_min.inference import png_names
    names = png_names(torch.tensor([0, 1, 2, -1]), ["../../escaped", "sub/dir", ".."])
    assert names == ["_.._escaped_0000.png", "sub_dir_0001.png", "class2_0002.png", "image_0003.png"]
    assert all(len(Path(n).parts) == 1 for n in names)


def test_overwrite_with_a_mistyped_base_checkpoint_leaves_the_run_untouched(base_run, tmp_path):
    run = copy_of(base_run, tmp_path)
    before = snapshot(run)
    fails_with("train.py", ["--preset", "tiny", "--out", run, "--overwrite", "--base", tmp_path / "typo"], "typo")
    assert snapshot(run) == before


def test_overwrite_of_a_later_stage_alone_is_refused_before_anything_moves(base_run, tmp_path):
    run = copy_of(base_run, tmp_path)
    before = snapshot(run)
    fails_with("train.py", ["--preset", "tiny", "--out", run, "--overwrite", "--stage", "head"],
               "--stage head needs", "--overwrite would start")
    assert snapshot(run) == before and not (tmp_path / f".{run.name}.replaced").exists()


@pytest.mark.parametrize("where", ["is", "holds", "lies inside"])
def test_an_out_folder_that_is_holds_or_lies_inside_the_data_root_is_refused(where, tmp_path):
    data = image_folder(tmp_path / "parent" / "data")
    out = {"is": data, "holds": data.parent, "lies inside": data / "run"}[where]
    before = snapshot(tmp_path)
    fails_with("train.py", ["--preset", "tiny", "--dataset", "folder", "--data-root", data, "--out", out,
                            "--overwrite"], f"{where} the data root")
    assert snapshot(tmp_path) == before


def test_a_data_root_given_with_a_tilde_is_guarded_too(tmp_path, monkeypatch):
    image_folder(tmp_path / "data")
    monkeypatch.setenv("HOME", str(tmp_path))                 # ~/data is tmp_path/data
    before = snapshot(tmp_path)
    fails_with("train.py", ["--preset", "tiny", "--dataset", "folder", "--data-root", "~/data", "--out",
                            tmp_path / "data" / "run"], "lies inside the data root ~/data")
    assert snapshot(tmp_path) == before


def test_a_folder_that_is_not_a_run_is_never_written_into_or_replaced(tmp_path):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("precious")
    for flags in ([], ["--overwrite"]):
        fails_with("train.py", ["--preset", "tiny", "--out", mine, *flags], "not a run of invdiff-min")
    assert snapshot(mine) == {"chapter1.tex": b"precious"}


def test_overwrite_keeps_the_old_run_aside_until_the_new_run_has_finished_a_stage(base_run, tmp_path, monkeypatch):
    run = copy_of(base_run, tmp_path)
    before = snapshot(run)
    aside = tmp_path / f".{run.name}.replaced"
    real = pipeline.training_loss
    monkeypatch.setattr(pipeline, "training_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    fails_with("train.py", ["--preset", "tiny", "--out", run, "--overwrite", "--stage", "base"], "non-finite loss")
    assert snapshot(aside) == before                              # the old run survives the failed command
    fails_with("train.py", ["--preset", "tiny", "--out", run, "--overwrite"], f"mv {aside}")   # and is not lost
    monkeypatch.undo()
    shutil.rmtree(run)
    aside.rename(run)                                             # restored as the message says
    assert snapshot(run) == before
    assert run_script("train.py", ["--preset", "tiny", "--out", run, "--overwrite", "--stage", "base", "--seed",
                                   "3", "--no-progress"]) == 0
    assert not aside.exists()                                     # the new run has a stage: the old one is gone
    assert json.loads((run / "config.json").read_text())["config"]["train"]["seed"] == 3


# ----- stages written as sets -------------------------------------------------------------------------------
@pytest.mark.parametrize("weights,says", [
    (lambda w: torch.nn.functional.one_hot(w.argmax(1).clamp(max=2), 3).float(), "holds 3 groups, but"),
    (lambda w: w * 2, "not rows of non-negative numbers summing to 1"),
    (None, "lacks the tensors weights and index"),
])
def test_groups_of_the_wrong_shape_or_content_are_refused_naming_the_file(full_run, tmp_path, weights, says):
    from invdiff_min.checkpoint import load_tensors, save_tensors
    run = copy_of(full_run, tmp_path)
    saved = load_tensors(run / "groups.safetensors")
    bad = {"loss": saved["weights"][:, 0]} if weights is None else {"weights": weights(saved["weights"]),
                                                                     "index": saved["index"]}
    save_tensors(run / "groups.safetensors", bad)                # a valid file with the wrong content
    shutil.rmtree(run / "invdiff")
    fails_with("train.py", ["--preset", "tiny", "--out", run, "--resume", "--no-progress"],
               str(run / "groups.safetensors"), says, "--resume (the groups stage runs again)")
    (run / "groups.safetensors").unlink()                        # the fix the message gives
    assert run_script("train.py", ["--preset", "tiny", "--out", run, "--resume", "--no-progress"]) == 0


@pytest.mark.parametrize("lost", ["groups_hist.png", "groups.json", "losses.safetensors"])
def test_a_stage_killed_between_its_files_is_completed_on_resume(full_run, tmp_path, lost):
    run = copy_of(full_run, tmp_path)
    (run / lost).unlink()
    stage = "losses" if lost.startswith("losses") else "groups"
    assert run_script("train.py", ["--preset", "tiny", "--out", run, "--resume", "--stage", stage,
                                   "--no-progress"]) == 0
    assert (run / lost).is_file()


def test_groups_inferred_from_other_losses_are_inferred_again(full_run, tmp_path):
    from invdiff_min.checkpoint import load_tensors, save_tensors
    run = copy_of(full_run, tmp_path)
    saved = load_tensors(run / "losses.safetensors")
    save_tensors(run / "losses.safetensors", {"loss": saved["loss"].flip(0), "index": saved["index"]},
                 {"t_window": "[400, 700]"})                           # the losses changed, the groups did not
    before = (run / "groups.json").read_text()
    assert run_script("train.py", ["--preset", "tiny", "--out", run, "--resume", "--stage", "groups",
                                   "--no-progress"]) == 0
    assert (run / "groups.json").read_text() != before


# ----- refused at once, with one line ---------------------------------------------------------------------
@pytest.mark.parametrize("flags,message", [
    (["--steps", "1000000000000"], "train.steps (--steps) must be a number in [1, 10,000,000]"),
    (["--resolution", "100000"], "memory grows with its square"),
    (["--resolution", "18", "--set", "unet.block_out_channels=[16,32,32]", "--set",
      "unet.attention_levels=[false,false,false]"], "must be a multiple of 4"),
    (["--resolution", "18", "--set", "head.block_out_channels=[8,16,16]", "--set",
      "head.attention_levels=[false,false,false]"], "must be a multiple of 4: the head (head.block_out_channels)"),
    (["--seed", "99999999999999999999"], "(--seed) must be a number in [0, 2,147,483,647]"),
    (["--set", "head.lam=-1"], "head.lam must be a number in [0, 1e+06]"),
    (["--set", "head.lamda=2"], "no field 'lamda' in head; fields: "),
    (["--set", "losses.num_draws=many"], "--set losses.num_draws must be an integer, got \"many\""),
    (["--set", "losses.t_window=[900,1200]"], "losses.t_window must be [lo, hi) with 0 <= lo < hi <= 1000"),
    (["--set", "eval.guidance_t_max=1001"], "eval.guidance_t_max must be at most the 1000 training timesteps"),
    (["--set", "eval.guidance_t_max=-5"], "eval.guidance_t_max must be a number in [0, 100,000]"),
    (["--set", "eval.head_outside_cfg=true", "--set", "head.mode=mix"], "eval.head_outside_cfg needs head.mode"),
    (["--set", "head.ema_decay=1.0"], "head.ema_decay must be a number in [0, 0.99999]"),
    (["--set", "eval.n_per_class=1"], "eval.n_per_class 1 gives 2 samples in all, and the quality measures need 4"),
    (["--set", "unet.downsample_padding=7"], "unet: UNet setting downsample_padding must be 0"),
    (["--set", "unet.freq_shift=5"], "head: UNet setting freq_shift must be in [0, 4)"),
    (["--set", "unet.block_out_channels=[1000000,1000000]", "--set", "unet.norm_num_groups=1"],
     "each width must be at most 4,096 channels"),
    (["--set", "unet.in_channels=1"], "but the images of shapes have 3 channels: leave both at 3"),
])
def test_numbers_no_run_can_use_are_refused_before_any_work(flags, message, tmp_path):
    fails_with("train.py", ["--preset", "tiny", "--out", tmp_path / "x", *flags], message)
    assert not (tmp_path / "x").exists()


def test_a_small_folder_dataset_is_refused_before_training_not_at_the_evaluation(tmp_path):
    data = image_folder(tmp_path / "data", per_cell=4)
    fails_with("train.py", ["--preset", "tiny", "--dataset", "folder", "--data-root", data, "--out", tmp_path / "x",
                            "--set", "data.eval_per_group=1"], "--set data.eval_per_group=N", "at least 10")
    assert not (tmp_path / "x").exists()


def test_a_run_config_of_the_wrong_kind_is_named_by_every_script(base_run, tmp_path):
    run = copy_of(base_run, tmp_path)
    (run / "config.json").write_text("[1, 2, 3]")
    fails_with("train.py", ["--preset", "tiny", "--out", run, "--resume"], "config.json", "holds a JSON list")
    fails_with("sample.py", ["--ckpt", run, "--out", tmp_path / "s"], "config.json", "holds a JSON list")
    (run / "config.json").write_text("{not json")
    fails_with("sample.py", ["--ckpt", run, "--out", tmp_path / "s"], "config.json", "not valid JSON")


def test_sample_refuses_an_out_that_is_a_file_before_sampling(base_run, tmp_path):
    (tmp_path / "taken").write_text("mine")
    fails_with("sample.py", ["--ckpt", base_run, "--out", tmp_path / "taken"], "is a file")
    assert (tmp_path / "taken").read_text() == "mine"


def test_invdiff_debug_shows_the_traceback_at_every_entry_point(base_run, tmp_path, monkeypatch):
    from invdiff_min import convert, export
    fails_with("sample.py", ["--ckpt", tmp_path / "nowhere", "--out", tmp_path / "s"], "nowhere")
    monkeypatch.setenv("INVDIFF_DEBUG", "1")
    with pytest.raises(ValueError, match="nowhere"):               # the exception itself, not SystemExit
        run_script("sample.py", ["--ckpt", tmp_path / "nowhere", "--out", tmp_path / "s"])
    with pytest.raises(ValueError, match="unknown preset"):
        run_script("train.py", ["--preset", "huge", "--out", tmp_path / "x"])
    with pytest.raises(FileNotFoundError):
        convert.main([str(tmp_path / "nowhere"), str(tmp_path / "c")])
    with pytest.raises(ValueError):
        export.main([str(tmp_path / "nowhere"), str(tmp_path / "e")])


def test_set_reaches_any_config_field_and_the_run_records_it(tmp_path):
    out = tmp_path / "run"
    assert run_script("train.py", ["--preset", "tiny", "--out", out, "--stage", "base", "--no-progress",
                                   "--set", "train.steps=2", "--set", "head.lam=2.5",
                                   "--set", "losses.t_window=[500,800]", "--set", "head.block_out_channels=[8,16]",
                                   "--set", "groups.method=official"]) == 0
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["train"]["steps"] == 2 and cfg["head"]["lam"] == 2.5 and cfg["losses"]["t_window"] == [500, 800]
    assert cfg["head"]["block_out_channels"] == [8, 16] and cfg["groups"]["method"] == "official"


def test_resume_on_other_data_is_refused_naming_what_differs(tmp_path):
    """An edited label in metadata.csv, or an image taken out, would otherwise resume silently on other data."""
    data = image_folder(tmp_path / "data", per_cell=8)
    run = tmp_path / "run"
    args = ["--preset", "tiny", "--dataset", "folder", "--data-root", data, "--out", run, "--stage", "base",
            "--steps", "2", "--no-progress", "--set", "data.eval_per_group=2"]
    assert run_script("train.py", args) == 0
    recorded = json.loads((run / "config.json").read_text())["data"]
    assert set(recorded) == {"image shape", "training samples", "training labels", "evaluation samples",
                             "evaluation labels"}, recorded
    before = snapshot(run)
    csv = data / "metadata.csv"
    rows = csv.read_text().splitlines()
    for i in (1, len(rows) - 1):                             # the first image, then the last, changes class
        name, y, b = rows[i].split(",")
        edited = rows[:i] + [f"{name},{1 - int(y)},{b}"] + rows[i + 1:]
        csv.write_text("\n".join(edited) + "\n")
        fails_with("train.py", [*args, "--resume"], str(run), "was made from other data", "labels",
                   str(data), "--out NEW_FOLDER")
    csv.write_text("\n".join(rows[:-1]) + "\n")              # an image taken out
    fails_with("train.py", [*args, "--resume"], "was made from other data", "samples")
    assert snapshot(run) == before
    csv.write_text("\n".join(rows) + "\n")                   # the data it was made from: resumes
    assert run_script("train.py", [*args, "--resume"]) == 0


def test_a_base_checkpoint_that_does_not_say_its_classes_is_named(base_run, tmp_path):
    run = copy_of(base_run, tmp_path)
    state_file = sorted((run / "base").glob("ckpt-*"))[-1] / "state.json"
    state = json.loads(state_file.read_text())
    del state["state_sha256"]                                # a deliberate edit (checkpoint.read_state)
    for config, message in ((["not", "an", "object"], "config.unet.num_classes"),
                            ({"unet": {"sample_size": 16}}, "config.unet.num_classes"),
                            ({**state["config"], "unet": {**state["config"]["unet"], "num_classes": None}},
                             "unconditional")):
        state_file.write_text(json.dumps({**state, "config": config}))
        text = fails_with("train.py", ["--preset", "tiny", "--out", tmp_path / "new", "--base", run / "base"],
                          str(state_file.parent), message)
        assert not (tmp_path / "new").exists()
    assert "--init-from" in text                             # the unconditional model's way in


def test_the_python_api_never_writes_a_run_into_the_data_root(tmp_path):
    import torch

    from invdiff_min.config import get_preset
    from invdiff_min.data import load_splits
    data = image_folder(tmp_path / "data", per_cell=12)
    cfg = get_preset("tiny")
    cfg.data.name, cfg.data.data_root, cfg.data.eval_per_group, cfg.data.num_samples = "folder", str(data), 2, None
    splits = load_splits(cfg.data)                                   # (its decode cache goes into the root)
    before = sorted(p.name for p in data.iterdir())
    with pytest.raises(ValueError, match="lies inside the data root"):
        pipeline.run(cfg, splits, data / "run", torch.device("cpu"), "base", progress=False)
    assert sorted(p.name for p in data.iterdir()) == before


def test_the_python_api_resumes_a_folder_only_as_it_was_made(tmp_path):
    """pipeline.run from Python checks the folder's config.json as train.py --resume does: another config or
    other data would otherwise resume its checkpoints silently; a new learning rate is taken and recorded."""
    import torch

    from invdiff_min.config import get_preset
    from invdiff_min.data import load_splits
    from invdiff_min.runs import RunFolderError

    cfg, folder, cpu = get_preset("tiny"), tmp_path / "run", torch.device("cpu")
    cfg.train.steps = 2
    splits = load_splits(cfg.data)
    pipeline.run(cfg, splits, folder, cpu, "base", progress=False)
    record = json.loads((folder / "config.json").read_text())
    assert record["command"] == ["invdiff_min.pipeline.run"] and record["config"]["train"]["steps"] == 2
    assert record["config"]["train"]["precision"] in ("fp32", "bf16") and "data" in record   # as train.py records
    cfg.train.steps = 3
    with pytest.raises(RunFolderError, match="different config .*train.steps differ from .*config.json.*another run"):
        pipeline.run(cfg, splits, folder, cpu, "base", progress=False)
    cfg.train.steps, edited = 2, load_splits(cfg.data)
    edited.train.bias[0] = 1 - edited.train.bias[0]                      # one attribute label edited
    with pytest.raises(RunFolderError, match="other data.*training labels"):
        pipeline.run(cfg, edited, folder, cpu, "base", progress=False)
    cfg.train.lr = 5e-4
    pipeline.run(cfg, splits, folder, cpu, "base", progress=False)
    assert json.loads((folder / "config.json").read_text())["config"]["train"]["lr"] == 5e-4
