"""The scripts end to end on the tiny preset: resume after a crash, the whole pipeline, sample.py, errors."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import run_script, tiny_diffusers_unet
from invdiff_min import amp, pipeline
from invdiff_min.checkpoint import list_checkpoints, load_tensors, load_unet
from invdiff_min.config import RunConfig, fit_to_data, get_preset
from invdiff_min.data import make_dataset
from invdiff_min.diffusion import lr_at
from invdiff_min.guidance import load_head

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


class Crash(Exception):
    pass


def test_base_training_resumes_bit_identically_after_a_crash_during_a_checkpoint_write(tmp_path):
    cfg = get_preset("tiny")
    cfg.train.steps, cfg.train.checkpoint_every = 12, 4
    cpu = torch.device("cpu")
    data = make_dataset(cfg.data)
    _, full = pipeline.train_base(cfg, data, cpu, tmp_path / "full" / "base", progress=False)

    writes = []

    def crash_in_second_file_of_third_checkpoint(name):
        writes.append(name)
        if len(writes) == 2 * 4 + 2:          # checkpoints hold 4 files; crash inside the third one
            raise Crash()

    with pytest.raises(Crash):
        pipeline.train_base(cfg, data, cpu, tmp_path / "cut" / "base", progress=False,
                            fault_hook=crash_in_second_file_of_third_checkpoint)
    left = list_checkpoints(tmp_path / "cut" / "base")
    assert [p.name for p in left] == ["ckpt-0000004", "ckpt-0000008"]          # no half-written ckpt-12
    assert not list((tmp_path / "cut" / "base").glob(".tmp-*"))
    _, resumed = pipeline.train_base(cfg, data, cpu, tmp_path / "cut" / "base", progress=False)
    for name in ("model", "ema", "optimizer", "history"):
        a, b = load_tensors(full / f"{name}.safetensors"), load_tensors(resumed / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_whole_pipeline_and_sampling_on_the_tiny_preset(tmp_path):
    out = tmp_path / "run"
    r = run("train.py", "--preset", "tiny", "--out", str(out), "--compare", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for name in ("base", "invdiff", "oracle", "uniform"):
        assert set(summary[name]) >= {"bias", "minority_share", "fidelity"}
        assert len(summary[name]["minority_share"]) == 2 and 0 <= summary[name]["bias"] <= 1
    for f in ("losses.safetensors", "losses.json", "groups.safetensors", "groups.json", "groups_hist.png",
              "samples.png", "base/loss.png", "base/samples.png", "invdiff/loss.png"):
        assert (out / f).is_file(), f
    losses = json.loads((out / "losses.json").read_text())
    assert 0 <= losses["auc"] <= 1 and 0 <= losses["official_auc"] <= 1
    # "auto" precision is recorded as what it resolved to; the head's rate warms up, then decays by cosine
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["train"]["precision"] == amp.resolve("auto", "cpu")[0]
    head = config["head"]
    logged = [json.loads(line)["lr"] for line in (out / "invdiff" / "metrics.jsonl").read_text().splitlines()]
    assert head["lr_schedule"] == "cosine"                         # the tiny preset's (the default is constant)
    assert logged == pytest.approx([lr_at(s, head["lr"], head["warmup_steps"], head["steps"])
                                    for s in range(head["steps"])])
    assert logged[0] < logged[head["warmup_steps"] - 1] and logged[-1] < 0.2 * head["lr"]

    # the stage times read off the run folder: every stage, in order, adding up to the total
    r = run("benchmarks/stage_times.py", str(out), "--json", str(tmp_path / "times.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    times = json.loads((tmp_path / "times.json").read_text())
    assert list(times["stages"]) == ["A. base", "B. losses", "B. groups", "C. head invdiff", "C. head oracle",
                                     "C. head uniform", "D. eval"]
    assert times["stages"]["A. base"]["seconds_per_step"] > 0 and all(
        row["seconds"] >= 0 for row in times["stages"].values())
    assert sum(row["seconds"] for row in times["stages"].values()) == pytest.approx(times["total_seconds"], abs=0.5)

    # per-cell risks on the same draws: every cell of the training data, the base and each head at each w
    r = run("benchmarks/cell_risks.py", "--run", str(out), "--heads", str(out / "oracle"), "--strengths", "0", "1",
            "--per-cell", "8", "--draws", "2", "--json", str(tmp_path / "risks.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    risks = json.loads((tmp_path / "risks.json").read_text())
    assert list(risks["models"]) == ["base", "oracle w=0", "oracle w=1"]
    assert set(risks["models"]["base"]) == {"0,0", "0,1", "1,0", "1,1"}
    assert risks["models"]["oracle w=0"] == risks["models"]["base"]            # w = 0 is the base, same draws
    assert risks["models"]["oracle w=1"] != risks["models"]["base"]
    # fidelity per (class, value) cell: every sample in one cell, and mix recomputed here from the two tables
    def cell_fidelity(strength, name, *extra):
        r = run("benchmarks/cell_fidelity.py", "--run", str(out), "--heads", str(out / "oracle"), "--strength",
                strength, "--n-per-class", "4", "--json", str(tmp_path / name), *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        models = json.loads((tmp_path / name).read_text())["models"]
        return models["base"], models[str(out / "oracle")]

    base, head = cell_fidelity("1", "cells.json")
    for table in (base, head):
        assert [sum(row) for row in table["count"]] == [4, 4] and len(table["count"][0]) == 3   # K values + "?"
        assert all(ok <= n for rows in zip(table["count"], table["correct"]) for n, ok in zip(*rows))
        assert sum(map(sum, table["correct"])) / 8 == pytest.approx(table["fidelity"])
    seen = [(y, b) for y in range(2) for b in range(3) if base["count"][y][b]]
    inside = sum(head["count"][y][b] for y, b in seen)
    if inside:
        assert head["mix"] == pytest.approx(sum(head["count"][y][b] * base["correct"][y][b] / base["count"][y][b]
                                                for y, b in seen) / inside)
        assert head["fidelity_covered"] == pytest.approx(sum(head["correct"][y][b] for y, b in seen) / inside)
    assert head["covered"] == pytest.approx(inside / 8)
    base, same = cell_fidelity("0", "cells0.json")                 # w = 0 is the base: same cells, mix = fidelity
    assert same["count"] == base["count"] and same["mix"] == pytest.approx(same["fidelity"])
    base, same = cell_fidelity("0", "cells_cfg.json", "--guidance-scale", "2")   # CFG on the class, base included
    assert same["count"] == base["count"]
    assert json.loads((tmp_path / "cells_cfg.json").read_text())["guidance_scale"] == 2
    # class guidance below t = 0 is no class guidance: the head's push outside it gives the plain cells of w = 1
    base, head = cell_fidelity("1", "cells1.json")
    same_base, same_head = cell_fidelity("1", "cells_t0.json", "--guidance-scale", "3", "--guidance-t-max", "0",
                                         "--head-outside-cfg")
    assert (same_base, same_head) == (base, head)
    recorded = json.loads((tmp_path / "cells_t0.json").read_text())
    assert recorded["guidance_t_max"] == 0 and recorded["head_outside_cfg"] is True
    for bad, says in ((["--heads", str(tmp_path / "nothing")], "nothing"), (["--heads", "base"], "base"),
                      (["--json", str(tmp_path / "no" / "cells.json")], "in an existing folder"),
                      (["--guidance-scale", "-1"], "--guidance-scale"),
                      (["--guidance-t-max", "1001"], "eval.guidance_t_max must be at most")):
        r = run("benchmarks/cell_fidelity.py", "--run", str(out), *bad)
        assert r.returncode != 0 and says in r.stderr and "Traceback" not in r.stderr
    # a benchmark recipe needs a folder of its own; a folder that is not a run and a bad flag are one line
    for bad, says in ((["--run", str(out), "--variants", "oracle", "--set", "head.lam=3"], "--tag"),
                      (["--run", str(tmp_path)], "has no config.json"),
                      (["--run", str(out), "--guidance-t-max", "1001"], "(from --guidance-t-max)"),
                      (["--run", str(out), "--strengths", "nan"], "--strengths must be a number in [0, 20]"),
                      (["--run", str(out), "--head-steps", "-3"], "--head-steps must be at least 1"),
                      (["--run", str(out), "--json", str(tmp_path / "no" / "d.json")], "does not exist"),
                      (["--run", str(out), "--json", str(tmp_path)], "it is not a regular file"),
                      (["--run", str(out), "--n-per-class", "1"], "the quality measures need 4")):
        r = run("benchmarks/debias.py", *bad)
        assert r.returncode != 0 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    # an error found late (a run's settings without its base model) is one line in cell_risks.py too
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(out / "config.json", lone)
    r = run("benchmarks/cell_risks.py", "--run", str(lone))
    assert r.returncode != 0 and "no complete checkpoint" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # groups.* settings regroup the variants grouped from the run's losses, and are refused for the others
    r = run("benchmarks/debias.py", "--run", str(out), "--variants", "invdiff", "--set", "groups.top_fraction=0.3",
            "--tag", "_tf")
    assert r.returncode != 0 and "groups.*" in r.stderr and "Traceback" not in r.stderr
    r = run("benchmarks/debias.py", "--run", str(out), "--variants", "invdiff_unsplit", "--strengths", "1", "--set",
            "groups.top_fraction=0.3", "--tag", "_tf", "--json", str(tmp_path / "tf.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    sizes = json.loads((tmp_path / "tf.json").read_text())["groups"]["unsplit"]["sizes"]   # rest, high; per class
    assert [sizes[1], sizes[3]] == [round(0.3 * (sizes[0] + sizes[1])), round(0.3 * (sizes[2] + sizes[3]))]
    # a longer head than the run's trains in bench/: the run's own head is never trained further
    own = [p.name for p in list_checkpoints(out / "invdiff")]
    for seed in ("0", "1"):                               # two processes' reports, merged: both head seeds
        r = run("benchmarks/debias.py", "--run", str(out), "--variants", "invdiff", "--seeds", seed, "--strengths",
                "1", "--n-per-class", "2", "--head-steps", "22", "--json", str(tmp_path / f"s{seed}.json"))
        assert r.returncode == 0, r.stderr[-3000:]
    assert [p.name for p in list_checkpoints(out / "invdiff")] == own
    assert list_checkpoints(out / "bench" / "invdiff-s0")[-1].name == "ckpt-0000022"
    r = run("benchmarks/debias.py", "--merge", str(tmp_path / "s0.json"), str(tmp_path / "s1.json"), "--json",
            str(tmp_path / "merged.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(json.loads((tmp_path / "merged.json").read_text())["models"]["invdiff"]["1.0"]) == 2
    (tmp_path / "other.json").write_text("{}")
    for bad, says in (([str(tmp_path / "other.json")], "is not a report of this script"),
                      ([str(tmp_path / "s0.json")] * 2, "names a report twice")):
        r = run("benchmarks/debias.py", "--merge", *bad)
        assert r.returncode != 0 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    # a benchmark head from before heads recorded their groups (e.g. of the earlier official grouper) is refused
    old = shutil.copytree(out / "bench" / "invdiff-s0", out / "bench" / "official_groups-s0")
    state_file = list_checkpoints(old)[-1] / "state.json"
    state = json.loads(state_file.read_text())
    del state["groups_fingerprint"], state["state_sha256"]           # as such a head was written
    state_file.write_text(json.dumps(state))
    r = run("benchmarks/debias.py", "--run", str(out), "--variants", "official_groups", "--seeds", "0", "--strengths",
            "1", "--n-per-class", "2", "--head-steps", "22")
    assert r.returncode != 0 and "from before heads recorded their groups" in r.stderr, r.stderr[-2000:]
    shutil.rmtree(old)

    # a second run of the same command refuses to clobber; --resume skips every finished stage
    r = run("train.py", "--preset", "tiny", "--out", str(out), "--compare", "--no-progress")
    assert r.returncode != 0 and "--resume" in r.stderr and "Traceback" not in r.stderr
    r = run("train.py", "--preset", "tiny", "--out", str(out), "--compare", "--no-progress", "--resume",
            "--stage", "head")
    assert r.returncode == 0 and "resuming" not in r.stdout

    # sample.py: the documented output format, and w = 0 is exactly the base model
    r = run("sample.py", "--ckpt", str(out), "--n-per-class", "3", "--out", str(tmp_path / "s1"), "--steps", "4",
            "--strength", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    s1 = load_file(str(tmp_path / "s1" / "samples.safetensors"))
    assert s1["images"].shape == (6, 3, 16, 16) and s1["labels"].tolist() == [0, 0, 0, 1, 1, 1]
    assert 0 <= float(s1["images"].min()) and float(s1["images"].max()) <= 1
    assert (tmp_path / "s1" / "grid.png").is_file()
    r = run("sample.py", "--ckpt", str(out / "base"), "--head", "none", "--n-per-class", "3",
            "--out", str(tmp_path / "s2"), "--steps", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.equal(s1["images"], load_file(str(tmp_path / "s2" / "samples.safetensors"))["images"])
    r = run("sample.py", "--ckpt", str(out), "--n-per-class", "3", "--out", str(tmp_path / "s3"), "--steps", "4",
            "--strength", "2", "--sampler", "ddpm", "--guidance-scale", "2", "--evaluate")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "s3" / "metrics.json").read_text())
    assert set(metrics) >= {"bias", "minority_share", "fidelity", "fd", "base", "sweep"}
    assert set(metrics["sweep"]) == {"0.0", "1.0", "2.0", "3.0"} and metrics["strength"] == 2.0
    assert metrics["sweep"]["0.0"] == metrics["base"] and (tmp_path / "s3" / "report.png").is_file()
    # no --strength / --sampler / --steps: the run's evaluation settings (the w its summary reports)
    r = run("sample.py", "--ckpt", str(out), "--n-per-class", "2", "--out", str(tmp_path / "s4"))
    assert r.returncode == 0, r.stderr[-3000:]
    with safe_open(str(tmp_path / "s4" / "samples.safetensors"), "pt") as f:
        meta = f.metadata()
    tiny = get_preset("tiny").eval
    assert meta["sampler"] == f"{tiny.sampler}-{tiny.num_steps}" and f"w = {tiny.strength}" in meta["head"]
    # the head outside class guidance that never acts (t_max = 0) is the plain guided model; then at every t it
    # is not, and the choice is recorded
    drawn = {}
    for name, extra in (("plain", []), ("t0", ["--guidance-scale", "3", "--guidance-t-max", "0", "--head-outside-cfg"]),
                        ("all", ["--guidance-scale", "3", "--head-outside-cfg"])):
        r = run("sample.py", "--ckpt", str(out), "--n-per-class", "2", "--out", str(tmp_path / name), "--steps", "4",
                "--strength", "2", *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        drawn[name] = load_file(str(tmp_path / name / "samples.safetensors"))["images"]
    assert torch.equal(drawn["plain"], drawn["t0"]) and not torch.equal(drawn["plain"], drawn["all"])
    with safe_open(str(tmp_path / "all" / "samples.safetensors"), "pt") as f:
        assert f.metadata()["head_outside_cfg"] == "True" and f.metadata()["guidance_scale"] == "3.0"
    r = run("sample.py", "--ckpt", str(out), "--out", str(tmp_path / "bad"), "--guidance-t-max", "5000")
    assert r.returncode != 0 and "--guidance-t-max must be a timestep in [0, 1000]" in r.stderr


@pytest.mark.parametrize("args,message", [
    (["train.py", "--preset", "huge"], "unknown preset"),
    (["sample.py", "--ckpt", "/nonexistent/run"], "does not exist"),
    (["sample.py", "--ckpt", ".", "--n-per-class", "0"], "--n-per-class"),
])
def test_bad_command_lines_give_one_line_errors(args, message, tmp_path):
    r = run(*args, "--out", str(tmp_path / "x"))
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr


def test_init_from_converted_weights_starts_exactly_at_the_pretrained_model(tmp_path):
    ref = tiny_diffusers_unet()
    ref.save_pretrained(tmp_path / "pretrained")
    r = run("-m", "invdiff_min.convert", str(tmp_path / "pretrained"), str(tmp_path / "converted"))
    assert r.returncode == 0, r.stderr[-2000:]

    cfg = get_preset("tiny")
    pipeline.apply_init_from(cfg, str(tmp_path / "converted"))
    assert cfg.unet.num_classes == 2 and cfg.unet.block_out_channels == (16, 32) and cfg.data.resolution == 16
    from invdiff_min.unet import UNet
    model = UNet(cfg.unet)
    pipeline.init_from_converted(model, str(tmp_path / "converted"))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        expected = ref(x, t).sample
        assert (model(x, t, torch.tensor([0, 1])) - expected).abs().max() < 1e-5   # zero label embedding

    r = run("train.py", "--preset", "tiny", "--init-from", str(tmp_path / "converted"), "--stage", "base",
            "--steps", "3", "--out", str(tmp_path / "run"), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "initialised from" in r.stdout
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["train"]["init_from"]


def write_folder_dataset(root: Path, classes=3, attributes=2, per_cell=12, side=20):
    """A labelled image folder (the generic `folder` layout): class = a bright square's position, attribute =
    background colour; 90% of class c drawn on attribute c % attributes, the rest spread evenly."""
    from PIL import Image
    root.mkdir(parents=True)
    rows, g = ["file,y,bias,split"], torch.Generator().manual_seed(0)
    colours = [(30, 120, 30), (30, 30, 160), (150, 120, 40)]
    n = 0
    for y in range(classes):
        for b in range(attributes):
            count = per_cell * (4 if b == y % attributes else 1)
            for k in range(count):
                img = torch.tensor(colours[b]).view(3, 1, 1).expand(3, side, side).clone()
                img += torch.randint(0, 20, (3, side, side), generator=g)
                x0 = 2 + 6 * y
                img[:, 6:12, x0:x0 + 5] = 240
                split = "eval" if k < per_cell // 3 else "train"
                Image.fromarray(img.clamp(0, 255).byte().permute(1, 2, 0).numpy()).save(root / f"{n}.png")
                rows.append(f"{n}.png,{y},{b},{split}")
                n += 1
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")


def test_whole_pipeline_on_a_real_dataset_folder_with_three_classes(tmp_path):
    """--dataset folder: the class count comes from the data, evaluation trains and caches its judges."""
    write_folder_dataset(tmp_path / "data")
    out = tmp_path / "run"
    r = run("train.py", "--preset", "tiny", "--dataset", "folder", "--data-root", str(tmp_path / "data"),
            "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3 classes" in r.stdout and "held-out accuracy" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "folder" and len(summary["invdiff"]["minority_share"]) == 3
    assert set(summary["judged_by"]) == {"class", "attribute", "quality"}
    assert all(k in summary["invdiff"] for k in ("fd", "kid", "precision", "recall", "attribute_share"))
    assert (out / "judges" / "class.safetensors").is_file() and (out / "judges" / "attribute.json").is_file()
    saved = json.loads((out / "config.json").read_text())["config"]
    assert saved["unet"]["num_classes"] == 3 and saved["data"]["data_root"] == str(tmp_path / "data")
    r = run("sample.py", "--ckpt", str(out), "--n-per-class", "2", "--out", str(tmp_path / "s"), "--steps", "3",
            "--evaluate")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert metrics["n"] == 6 and "retrained" not in r.stdout


@pytest.mark.parametrize("args,message", [
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--dataset", "waterbirds", "--data-root", "/nonexistent/wb"], "/nonexistent/wb"),
    (["--dataset", "waterbirds"], "--data-root"),
    (["--data-root", "/tmp"], "--dataset"),
    (["--dataset", "folder", "--data-root", "/tmp", "--data-option", "noequals"], "KEY=VALUE"),
])
def test_bad_dataset_arguments_give_one_line_errors(args, message, tmp_path):
    with pytest.raises(SystemExit) as exit_:                  # main() exits with the message: status 1, no traceback
        run_script("train.py", ["--preset", "tiny", *args, "--out", str(tmp_path / "x")])
    assert isinstance(exit_.value.code, str) and exit_.value.code.startswith("error: ")
    assert message in exit_.value.code and "\n" not in exit_.value.code
    assert not (tmp_path / "x").exists()                      # nothing written for a refused command


def test_whole_pipeline_on_the_built_in_k3_benchmark(tmp_path):
    """--dataset shapes3: the label profile is computed, each class's high-loss group is split by it (K groups
    per class), and the report gives each value's share per class."""
    from invdiff_min.checkpoint import load_tensors

    out = tmp_path / "run"
    r = run("train.py", "--preset", "tiny", "--dataset", "shapes3", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "value shares per class" in r.stdout and "3 attribute values" in r.stdout
    losses = load_tensors(out / "losses.safetensors")
    assert losses["profile"].shape == (len(losses["loss"]), 3)
    weights = load_tensors(out / "groups.safetensors")["weights"]
    assert weights.shape == (len(losses["loss"]), 9) and torch.equal(weights.sum(1), torch.ones(len(weights)))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "shapes3" and summary["data_seed"] == 0
    assert summary["training_data"]["attribute_share"][0] == pytest.approx([0.9, 0.05, 0.05], abs=0.01)
    assert len(summary["invdiff"]["attribute_share"]) == 3 and len(summary["invdiff"]["attribute_share"][0]) == 3
    saved = json.loads((out / "config.json").read_text())["config"]
    assert saved["data"]["aligned_fraction"] == 0.9 and saved["unet"]["num_classes"] == 3
    # more than two classes: the head twice as wide as the tiny preset's (8, 16), recorded as applied
    assert saved["head"]["block_out_channels"] == [16, 32] and saved["head"]["many_classes_width"] == 1
    base, _, _ = load_unet(out, "cpu")
    head, _ = load_head(out / "invdiff", base)
    assert head.net.config.block_out_channels == (16, 32)


def test_the_head_is_widened_for_more_than_two_classes_only_and_once():
    cfg = get_preset("cpu")
    assert fit_to_data(cfg, 2, 16).head.block_out_channels == (16, 24, 32)          # two classes: as tuned
    wide = fit_to_data(get_preset("cpu"), 4, 16)
    assert wide.head.block_out_channels == (32, 48, 64) and wide.unet.num_classes == 4
    again = fit_to_data(RunConfig.from_dict(wide.to_dict()), 4, 16)                  # a saved config stays as it is
    assert again.head.block_out_channels == (32, 48, 64)


def test_pipeline_run_fits_a_preset_config_to_k_valued_data(tmp_path):
    """From Python: a preset's two classes are not left to meet three (label 2 would read as the null label)."""
    from invdiff_min.data import load_splits

    cfg = get_preset("tiny")
    cfg.data.name, cfg.train.steps = "shapes3", 1
    pipeline.run(cfg, load_splits(cfg.data), tmp_path / "run", torch.device("cpu"), "base", progress=False)
    assert cfg.unet.num_classes == 3 and cfg.head.block_out_channels == (16, 32)
    base, _, _ = load_unet(tmp_path / "run", "cpu")
    assert base.class_embedding.weight.shape[0] == 4                                # 3 classes + the null label


def test_an_explicit_head_width_is_taken_as_given_for_more_than_two_classes(tmp_path):
    out = tmp_path / "run"
    r = run("train.py", "--preset", "tiny", "--dataset", "shapes4", "--stage", "base", "--steps", "1",
            "--set", "head.block_out_channels=[8,12]", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    saved = json.loads((out / "config.json").read_text())["config"]
    assert saved["head"]["block_out_channels"] == [8, 12] and saved["unet"]["num_classes"] == 4


def test_group_inference_refuses_a_profile_of_other_data_and_margin_groups_without_one():
    cfg = get_preset("tiny")
    cfg.data.name, cfg.unet.num_classes = "shapes3", 3
    data = make_dataset(cfg.data, "train")
    n = len(data.index)
    losses = pipeline.PerSampleLosses(torch.rand(n), data.index, (400, 700), {}, profile=torch.randn(n, 2))
    with pytest.raises(ValueError, match="label profile in losses.safetensors is .* rerun --stage losses"):
        pipeline.infer_groups(cfg, data, losses)
    losses.profile = None
    cfg.groups.method = "class_margin"
    with pytest.raises(ValueError, match="needs the label profile.*profile_draws above 0"):
        pipeline.infer_groups(cfg, data, losses)
    losses.profile = torch.randn(n, 3)
    groups = pipeline.infer_groups(cfg, data, losses)
    assert groups.assignments.shape == (n, 9) and groups.method == "class_margin"
    cfg.groups.method = "class_label_topk"
    groups = pipeline.infer_groups(cfg, data, losses)
    assert groups.assignments.shape == (n, 9) and groups.method == "class_label_topk"
    assert groups.assignments[:, 1::3].sum() > 0 and groups.assignments[:, 2::3].sum() > 0   # both sub-groups
    losses.profile = None
    with pytest.raises(ValueError, match="'class_label_topk' needs the label profile"):
        pipeline.infer_groups(cfg, data, losses)


def test_label_topk_groups_with_two_classes_compute_the_profile_and_equal_the_default(tmp_path):
    """groups.method="class_label_topk" on two-valued data: the losses stage computes the label profile it reads
    (a method of its own, not only K > 2), and the groups are exactly class_topk's."""
    from invdiff_min.data import load_splits
    from invdiff_min.groups import class_topk_groups

    cfg = get_preset("tiny")
    cfg.train.steps, cfg.groups.method = 1, "class_label_topk"
    splits = load_splits(cfg.data)
    for stage in ("base", "losses", "groups"):
        pipeline.run(cfg, splits, tmp_path / "run", torch.device("cpu"), stage, progress=False)
    losses = pipeline.load_losses(tmp_path / "run")
    assert losses.profile is not None and losses.profile.shape == (len(losses.loss), 2)
    groups = pipeline.load_groups(tmp_path / "run")
    assert groups.method == "class_label_topk"
    data = splits.train
    assert torch.equal(groups.assignments, class_topk_groups(losses.loss, data.labels, 2, cfg.groups.top_fraction))


def test_summary_table_keeps_columns_apart_for_four_values():
    shares = [[0.25, 0.25, 0.25, 0.25]] * 4
    row = {"bias": 0.123, "fidelity": 0.9, "attribute_share": shares, "minority_share": [0.5] * 4}
    table = pipeline.summary_table({"base": row, "invdiff": row, "sampler": "ddim", "n_per_class": 4,
                                    "strength": 2.0})
    for line in table.splitlines()[2:]:
        assert "0.123 " in line and " 0.25/0.25/0.25/0.25, 0.25" in line and line.endswith("0.900")


def test_a_head_told_the_sub_group_trains_saves_loads_and_samples(tmp_path):
    """head.condition="class_group" on the K = 3 benchmark: the head is told each sample's (class, group) pair,
    records their classes in its checkpoint, loads back identical, and samples each class through its own
    sub-groups in the evaluation and the Python API (images judged as the requested class labels)."""
    from invdiff_min import InvDiffPipeline
    from invdiff_min.data import load_splits
    from invdiff_min.groups import condition_groups

    r = run("train.py", "--preset", "tiny", "--dataset", "shapes3", "--steps", "2", "--head-steps", "3", "--set",
            "head.condition=class_group", "--out", str(tmp_path / "run"), "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = RunConfig.from_dict(json.loads((tmp_path / "run" / "config.json").read_text())["config"])
    splits = load_splits(cfg.data)
    groups = pipeline.load_groups(tmp_path / "run")
    _, group_class = condition_groups(groups.assignments, splits.train.labels)
    assert len(group_class) > 3 and sorted(set(group_class.tolist())) == [0, 1, 2]
    base, _, _ = load_unet(tmp_path / "run", "cpu")
    head, state = load_head(tmp_path / "run" / "invdiff", base)
    assert state["head_groups"] == group_class.tolist() and torch.equal(head.group_class, group_class)
    assert head.phi_group.weight.abs().sum() > 0                       # Phi'(g) was trained
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["invdiff"]["n"] == 3 * cfg.eval.n_per_class
    pipe = InvDiffPipeline.from_pretrained(tmp_path / "run")
    out = pipe(class_labels=[0, 1, 2, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    again = pipe(class_labels=[0, 1, 2, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert out.labels.tolist() == [0, 1, 2, 2] and torch.equal(out.images, again.images)
    base_only = pipe(class_labels=[0, 1, 2, 2], num_inference_steps=3, strength=0.0,
                     generator=torch.Generator().manual_seed(0))
    assert not torch.equal(out.images, base_only.images)
