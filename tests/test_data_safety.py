"""Hostile or careless metadata for the loaders that read from disk (invdiff_min/data/): every bad input is a
one-line error naming the file, the line and the fix, or a warning when the data can still be used as meant;
nothing is read from outside the root, nothing is silently wrong, nothing hangs."""
import os
import re
import threading
import warnings

import pytest
import torch
from PIL import Image

from invdiff_min.data import (DataConfig, DatasetFormatError, DatasetLayoutError, DatasetWarning, load_folder,
                              load_splits, load_waterbirds)
from invdiff_min.data import images as image_data

torch.set_num_threads(1)


def make_folder(root, extra=(), header="file,y,bias,split"):
    """A valid folder dataset: 2 classes x 2 attribute values, 2 train rows and 1 eval row per cell, images 0-11
    in solid colours, rows at lines 2-13; `extra` rows follow from line 14 (their images written if absent)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [f"{i}.png,{y},{b},{s}" for i, (y, b, s) in
            enumerate((y, b, s) for y in (0, 1) for b in (0, 1) for s in ("train", "train", "eval"))]
    for i in range(len(rows)):
        Image.new("RGB", (8, 8), (20 * i, 100, 200)).save(root / f"{i}.png")
    (root / "metadata.csv").write_text("\n".join([header, *rows, *extra]) + "\n")
    return root


def load_within(seconds, fn, *args, **kwargs):
    """fn(*args, **kwargs) in a thread: (result or exception, warnings); a test fails, never hangs, if it blocks."""
    out = {}

    def run():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out["result"] = fn(*args, **kwargs)
            except Exception as e:      # handed to the test
                out["result"] = e
        out["warnings"] = [str(w.message) for w in caught]
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return out, thread.is_alive()


# ----- 1. paths stay inside the root ---------------------------------------------------------------------
def test_image_paths_leading_outside_the_root_are_refused_unless_allowed(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "secret.png")
    root = tmp_path / "data"
    for path in ("../secret.png", str(tmp_path / "secret.png"), "sub/../../secret.png"):
        make_folder(root, [f"{path},0,0,train"])
        with pytest.raises(DatasetFormatError, match=rf"metadata.csv:14: the image path {re.escape(repr(path))} leads "
                                                     r"outside the dataset root.*allow_outside_root=true") as e:
            load_folder(root, 8, cache=False)
        assert "\n" not in str(e.value)
    (root / "link.png").symlink_to(tmp_path / "secret.png")       # inside by its text, outside once resolved
    make_folder(root, ["link.png,0,0,train"])
    with pytest.raises(DatasetFormatError, match=r"metadata.csv:14: the image path 'link.png' resolves to .*secret.png"
                                                 r", outside the dataset root .*allow_outside_root=True"):
        load_folder(root, 8, cache=False)
    with pytest.raises(DatasetFormatError, match="outside the dataset root"):   # a cached load checks it too
        load_folder(root, 8)
    train, _ = load_folder(root, 8, cache=False, allow_outside_root=True)          # the explicit opt-in
    assert 12 in train.index.tolist()
    splits = load_splits(DataConfig(name="folder", data_root=str(root), resolution=8, num_samples=None,
                                    aligned_fraction=None, eval_per_group=None,
                                    options={"allow_outside_root": True, "cache": False}))   # --data-option ...=true
    assert 12 in splits.train.index.tolist()
    (tmp_path / "wb").mkdir()                                                   # the same rule in every layout
    (tmp_path / "wb" / "metadata.csv").write_text("img_filename,y,split,place\n../secret.png,0,0,0\n")
    with pytest.raises(DatasetFormatError, match="metadata.csv:2: the image path '../secret.png' leads outside"):
        load_waterbirds(tmp_path / "wb", cache=False)


# ----- 2. duplicate rows ---------------------------------------------------------------------------------
def test_duplicate_rows_are_dropped_with_a_warning_and_never_split_across_train_and_eval(tmp_path):
    root = make_folder(tmp_path, ["./0.png,0,0,eval", "1.png,0,0,eval"])   # rows 0 and 1 are train rows
    with pytest.warns(DatasetWarning, match=r"dropped 2 duplicate row\(s\).*no image is in both train and eval: "
                                            r".*metadata.csv:14 repeats line 2 \(0.png\); .*metadata.csv:15 repeats "
                                            r"line 3 \(1.png\)"):
        train, ev = load_folder(root, 8, cache=False)
    assert not {12, 13} & set(train.index.tolist() + ev.index.tolist())     # the repeats are gone
    assert {0, 1} <= set(train.index.tolist()) and not {0, 1} & set(ev.index.tolist())
    make_folder(root, ["0.png,1,0,eval"])                                    # the same image, another class
    with pytest.raises(DatasetFormatError, match=r"metadata.csv:2 and .*metadata.csv:14 list the same image '0.png' "
                                                 r"with different y \(0 vs 1\)"):
        load_folder(root, 8, cache=False)


# ----- 3. numeric labels ---------------------------------------------------------------------------------
def test_numeric_labels_are_compared_by_value_and_mixed_columns_are_refused(tmp_path):
    root = make_folder(tmp_path)
    text = (root / "metadata.csv").read_text().splitlines()
    spellings = {0: ["0", "0.0", "00", " 0", "-0", "0e0"], 1: ["1", "1.0", "01", " 1 ", "+1", "1.000"]}
    rows = [f"{f},{spellings[int(y)][i % 6]},{b},{s}" for i, (f, y, b, s) in enumerate(r.split(",") for r in text[1:])]
    (root / "metadata.csv").write_text("\n".join([text[0], *rows]) + "\n")
    train, ev = load_folder(root, 8, cache=False)
    assert train.class_names == ("0", "1") and train.num_classes == 2
    assert torch.equal(train.labels, (train.index >= 6).long()) and torch.bincount(ev.group).tolist() == [1] * 4
    (root / "metadata.csv").write_text("\n".join([text[0], *text[1:12], "11.png,one,1,eval"]) + "\n")
    with pytest.raises(DatasetFormatError, match="column 'y' mixes numbers and words: line 2 holds '0', line 13 "
                                                 "holds 'one'; use numbers in every row or names in every row"):
        load_folder(root, 8, cache=False)


# ----- 4. at least two classes and two attribute values --------------------------------------------------
def test_one_class_or_one_attribute_value_is_refused_before_and_after_the_selection(tmp_path):
    root = make_folder(tmp_path)
    text = (root / "metadata.csv").read_text().splitlines()
    for column, what in ((1, "1 class \\(cat\\) in 'y'"), (2, "1 attribute value \\(cat\\) in 'bias'")):
        rows = [",".join("cat" if k == column else v for k, v in enumerate(r.split(","))) for r in text[1:]]
        (root / "metadata.csv").write_text("\n".join([text[0], *rows]) + "\n")
        with pytest.raises(DatasetFormatError, match=f"metadata.csv: the rows used hold {what}; at least two are "
                                                     f"needed"):
            load_folder(root, 8, cache=False)
    rows = [r.replace("train", "eval") if r.startswith(("6.", "7.", "9.", "10.")) else r for r in text[1:]]
    (root / "metadata.csv").write_text("\n".join([text[0], *rows]) + "\n")    # class 1 only in eval
    with pytest.raises(ValueError, match=r"the training split holds no sample of class y=1 \(1\); .* per class: "
                                         r"\[4, 0\]"):
        load_folder(root, 8, cache=False)


# ----- 5. the cache sees changed images ------------------------------------------------------------------
def test_a_replaced_image_invalidates_the_cache(tmp_path, monkeypatch):
    root = make_folder(tmp_path)
    first, _ = load_folder(root, 8)
    Image.new("RGB", (8, 8), (255, 255, 255)).save(root / "0.png")          # repaired in place, same name
    st = os.stat(root / "0.png")
    os.utime(root / "0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # even on a coarse clock
    second, _ = load_folder(root, 8)
    row = second.index.tolist().index(0)
    assert torch.allclose(second.images[row], torch.ones(3, 8, 8)) and not torch.equal(first.images, second.images)

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was opened although the cache holds them")
    monkeypatch.setattr(Image, "open", no_decoding)                          # unchanged images: the cache is used
    assert torch.equal(load_folder(root, 8)[0].images, second.images)
    assert len(list((root / image_data.CACHE_DIRNAME).glob("*.safetensors"))) == 1   # rebuilt in place


# ----- 6. special files never block ----------------------------------------------------------------------
def test_a_fifo_named_as_an_image_is_skipped_and_as_metadata_refused_without_blocking(tmp_path):
    root = make_folder(tmp_path / "data", ["fifo.png,0,0,train", "folder.png,0,0,train"])
    os.mkfifo(root / "fifo.png")
    (root / "folder.png").mkdir()
    out, blocked = load_within(30, load_folder, root, 8, cache=False)
    if blocked:                       # let the stuck open() return, then fail
        os.close(os.open(root / "fifo.png", os.O_WRONLY | os.O_NONBLOCK))
    assert not blocked, "loading a folder with a FIFO named as an image blocked"
    train, _ = out["result"]
    assert len(train) == 8 and not {12, 13} & set(train.index.tolist())
    assert any("skipped 2 unreadable image(s)" in w and "fifo.png (not a regular file (FIFO))" in w and
               "folder.png (not a regular file (folder))" in w for w in out["warnings"])
    meta = tmp_path / "fifo_meta"
    meta.mkdir()
    os.mkfifo(meta / "metadata.csv")
    out, blocked = load_within(30, load_folder, meta, 8, cache=False)
    if blocked:
        os.close(os.open(meta / "metadata.csv", os.O_WRONLY | os.O_NONBLOCK))
    assert not blocked, "a FIFO named metadata.csv blocked the load"
    assert isinstance(out["result"], DatasetLayoutError)
    assert re.search(r"metadata.csv is not a regular file \(FIFO\)", str(out["result"]))


# ----- 7. unknown loader options -------------------------------------------------------------------------
def test_an_unknown_loader_option_is_a_value_error_listing_the_known_ones(tmp_path):
    root = make_folder(tmp_path)
    cfg = DataConfig(name="folder", data_root=str(root), options={"colour": "red"})
    with pytest.raises(ValueError, match="unknown option 'colour' for dataset 'folder'; it takes file_column, "
                                         "class_column, bias_column, split_column, group_sizes, cache, "
                                         "allow_outside_root"):
        load_splits(cfg)
    with pytest.raises(ValueError, match="unknown option 'colour' for dataset 'shapes'; it takes no options"):
        load_splits(DataConfig(options={"colour": "red"}))
    with pytest.raises(ValueError, match="seed is a DataConfig field .* --data-seed"):
        load_splits(DataConfig(name="folder", data_root=str(root), options={"seed": 3}))


# ----- 8. option words and text encodings ----------------------------------------------------------------
def test_cache_words_switch_the_cache_and_other_values_are_refused(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)                              # a folder named "False" would land here
    for word in ("False", "no", "0"):                        # as --data-option cache=WORD gives them
        load_folder(root, 8, cache=word)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"] and not (root / image_data.CACHE_DIRNAME).exists()
    load_folder(root, 8, cache="yes")
    assert (root / image_data.CACHE_DIRNAME).is_dir()
    with pytest.raises(ValueError, match="the data option cache must be true, false or a folder, got 2.5"):
        load_folder(root, 8, cache=2.5)
    with pytest.raises(ValueError, match=r"group_sizes must be non-negative with a positive sum, got \[nan"):
        load_folder(root, 8, group_sizes=[float("nan"), 1, 1, 1])


def test_metadata_in_another_encoding_or_with_a_giant_field_names_the_file(tmp_path):
    root = make_folder(tmp_path / "latin", ["caf\xe9.png,0,0,train"])
    (root / "metadata.csv").write_bytes((root / "metadata.csv").read_text().encode("latin-1"))
    with pytest.raises(DatasetFormatError, match=r"latin/metadata.csv: not UTF-8 text \(byte \d+: .*save it as UTF-8"):
        load_folder(root, 8, cache=False)
    root = make_folder(tmp_path / "giant", ["x" * 200_000 + ".png,0,0,train"])
    with pytest.raises(DatasetFormatError, match="giant/metadata.csv: not readable as CSV .*field larger"):
        load_folder(root, 8, cache=False)
