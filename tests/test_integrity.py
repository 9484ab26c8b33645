"""Damaged checkpoints are refused with one line that names the file, the problem and the fix; nothing damaged
loads silently (a flipped bit, a truncated file, malformed or hand-edited JSON, NaN weights), and files
written before the checks still load."""
import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_diffusers_unet
from invdiff_min.checkpoint import (CheckpointError, list_checkpoints, load_state_into, load_tensors, load_unet,
                                    read_json, save_checkpoint, save_tensors)
from invdiff_min.config import get_preset
from invdiff_min.convert import ConversionError, convert, main
from invdiff_min.unet import UNet


def tiny_weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return UNet(get_preset("tiny").unet).state_dict()


def two_checkpoints(stage):
    """ckpt-0000002 and ckpt-0000004 of the tiny preset, as train.py writes them (model, EMA, the run config)."""
    config = get_preset("tiny").to_dict()
    for step in (2, 4):
        weights = tiny_weights(step)
        save_checkpoint(stage, step, {"model": weights, "ema": weights}, {"config": config})
    return list_checkpoints(stage)


def flip_bit(path, offset: int = -1, bit: int = 0):
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def refused(call, *patterns):
    """call() raises a one-line CheckpointError whose message contains every pattern (plain substrings)."""
    with pytest.raises(CheckpointError) as info:
        call()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for p in patterns:
        assert str(p) in msg, f"{p!r} not in {msg!r}"
    return msg


def edit_state(ckpt, edit):
    path = ckpt / "state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state, indent=2))


def test_a_flipped_bit_in_a_checkpoint_weight_file_is_refused_with_the_fallback(tmp_path):
    old, new = two_checkpoints(tmp_path / "base")
    flip_bit(new / "ema.safetensors")
    for call in (lambda: load_unet(tmp_path / "base"), lambda: load_tensors(new / "ema.safetensors")):
        refused(call, new / "ema.safetensors", "sha256", f"delete {new} to fall back", old.name)
    load_tensors(new / "model.safetensors")                  # the undamaged file of that checkpoint still loads
    flip_bit(old / "model.safetensors", offset=-5)
    msg = refused(lambda: load_unet(old, weights="model"), old / "model.safetensors", f"delete {old}")
    assert "no earlier checkpoint" in msg


def test_a_flipped_bit_in_a_standalone_tensor_file_is_refused(tmp_path):
    path = tmp_path / "run" / "losses.safetensors"
    save_tensors(path, {"loss": torch.rand(50), "index": torch.arange(50)}, {"t_window": [100, 400]})
    assert torch.equal(load_tensors(path)["index"], torch.arange(50))
    flip_bit(path)
    refused(lambda: load_tensors(path), path, "fingerprint", "re-run the command that wrote it")


def test_truncated_safetensors_files_are_one_line_errors_naming_them(tmp_path):
    path = tmp_path / "groups.safetensors"
    save_tensors(path, {"weights": torch.rand(20, 2)})
    path.write_bytes(path.read_bytes()[:-7])
    refused(lambda: load_tensors(path), path, "truncated or corrupt")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    refused(lambda: load_tensors(tmp_path / "empty.safetensors"), tmp_path / "empty.safetensors", "truncated")

    old, new = two_checkpoints(tmp_path / "base")
    model = new / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    refused(lambda: load_unet(new, weights="model"), model, f"delete {new} to fall back to {old.name}")
    edit_state(new, lambda s: [s.pop("checksums"), s.pop("state_sha256")])   # as written before checksums
    refused(lambda: load_unet(new, weights="model"), model, "truncated or corrupt", f"delete {new}")


@pytest.mark.parametrize("content", [b'{"step": 4, "config": {', b"\xff\xfe\x00garbage", b"[1, 2, 3]"],
                         ids=["cut-short", "not-utf8", "a-list"])
def test_malformed_state_json_is_a_one_line_error_naming_it(content, tmp_path):
    old, new = two_checkpoints(tmp_path / "base")
    (new / "state.json").write_bytes(content)
    for call in (lambda: load_unet(tmp_path / "base"), lambda: load_tensors(new / "ema.safetensors")):
        refused(call, new / "state.json", f"delete {new} to fall back to {old.name}")
    (tmp_path / "config.json").write_bytes(content[:-1])
    if content != b"[1, 2, 3]":
        refused(lambda: read_json(tmp_path / "config.json"), tmp_path / "config.json", "not")


def test_nan_weights_are_refused_at_load_naming_the_file_and_tensor(tmp_path):
    weights = tiny_weights(0)
    ema = {**weights, "conv_out.bias": torch.tensor([0.0, math.nan, 0.0])}
    config = get_preset("tiny").to_dict()
    save_checkpoint(tmp_path / "base", 2, {"model": weights}, {"config": config})
    ckpt = save_checkpoint(tmp_path / "base", 4, {"model": weights, "ema": ema}, {"config": config})
    refused(lambda: load_unet(ckpt), ckpt / "ema.safetensors", "NaN or Inf", "conv_out.bias",
            f"delete {ckpt} to fall back to ckpt-0000002")
    load_unet(ckpt, weights="model")                          # the finite raw weights beside them load
    model = UNet(get_preset("tiny").unet)
    refused(lambda: load_state_into(model, {**weights, "conv_in.weight": weights["conv_in.weight"] / 0},
                                    "my weights"), "my weights", "conv_in.weight")


def test_hand_edited_resolution_in_state_json_is_refused(tmp_path):
    _, ckpt = two_checkpoints(tmp_path / "base")
    edit_state(ckpt, lambda s: s["config"]["data"].update(resolution=32))
    refused(lambda: load_unet(ckpt), ckpt / "state.json", "changed after it was written", "undo the edit")
    edit_state(ckpt, lambda s: s.pop("state_sha256"))        # a deliberate edit, or a checkpoint older than the hash
    refused(lambda: load_unet(ckpt), ckpt / "state.json", "config.data.resolution=32 differs from "
                                                          "config.unet.sample_size=16")
    edit_state(ckpt, lambda s: s["config"]["data"].update(resolution=17))
    refused(lambda: load_unet(ckpt), "config.data.resolution=17 is not a positive multiple", "factor 2")
    edit_state(ckpt, lambda s: s["config"]["data"].update(resolution=16))
    load_unet(ckpt)                                           # undone: loads again
    edit_state(ckpt, lambda s: s["config"]["unet"].update(layers_per_block="1"))   # an edit of the wrong kind
    refused(lambda: load_unet(ckpt), ckpt / "state.json", "layers_per_block must be a whole number, got '1'")


def test_checkpoints_record_every_file_sha256_and_old_ones_without_still_load(tmp_path):
    _, ckpt = two_checkpoints(tmp_path / "base")
    state = json.loads((ckpt / "state.json").read_text())
    assert state["checksums"] == {f: hashlib.sha256((ckpt / f).read_bytes()).hexdigest()
                                  for f in ("model.safetensors", "ema.safetensors")}
    expected = load_unet(ckpt)[0].state_dict()
    edit_state(ckpt, lambda s: [s.pop("checksums"), s.pop("state_sha256")])
    reloaded = load_unet(ckpt)[0].state_dict()
    assert all(torch.equal(expected[k], reloaded[k]) for k in expected)
    save_file({"loss": torch.ones(3)}, str(tmp_path / "losses.safetensors"))    # no fingerprint in its header
    assert torch.equal(load_tensors(tmp_path / "losses.safetensors")["loss"], torch.ones(3))


# ----- the converter ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A small diffusers UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors)."""
    model = tiny_diffusers_unet()
    folder = tmp_path_factory.mktemp("pretrained")
    model.save_pretrained(folder)
    return folder


def copy_of(folder, to):
    to.mkdir()
    for f in folder.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


def test_converter_refuses_non_finite_source_weights(pretrained, tmp_path):
    src = copy_of(pretrained, tmp_path / "src")
    weights = src / "diffusion_pytorch_model.safetensors"
    sd = load_tensors(weights)
    sd["mid_block.resnets.0.conv1.weight"][0, 0, 0, 0] = math.inf
    save_file(sd, str(weights))
    with pytest.raises(SystemExit) as exit_:
        main([str(src), str(tmp_path / "out")])
    msg = str(exit_.value)
    assert msg.startswith("error: ") and "\n" not in msg
    assert str(weights) in msg and "NaN or Inf" in msg and "mid_block.resnets.0.conv1.weight" in msg
    assert not list_checkpoints(tmp_path / "out")
    torch.save({"conv_in.weight": torch.full((4, 3, 3, 3), math.nan)}, tmp_path / "model.ckpt")
    with pytest.raises(ConversionError, match=r"model\.ckpt: 1 of its 1 weight tensors hold NaN or Inf"):
        convert(tmp_path / "model.ckpt")


@pytest.mark.parametrize("damage,named,problem", [
    ("config-not-json", "config.json", "not valid JSON"),
    ("config-a-list", "config.json", "not a config object"),
    ("config-of-a-run", "config.json", "invdiff-min run config"),
    ("weights-truncated", "diffusion_pytorch_model.safetensors", "truncated or corrupt"),
])
def test_converter_errors_name_the_damaged_file(pretrained, damage, named, problem, tmp_path):
    src = copy_of(pretrained, tmp_path / "src")
    if damage == "config-not-json":
        (src / "config.json").write_text('{"sample_size": 16,')
    elif damage == "config-a-list":
        (src / "config.json").write_text("[16, 32]")
    elif damage == "config-of-a-run":
        (src / "config.json").write_text(json.dumps({"config": get_preset("tiny").to_dict(), "command": []}))
    else:
        weights = src / named
        weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(SystemExit) as exit_:
        main([str(src), str(tmp_path / "out")])
    msg = str(exit_.value)
    assert msg.startswith("error: ") and "\n" not in msg
    assert str(src / named) in msg and problem in msg, msg
