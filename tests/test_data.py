"""The built-in biased dataset and its exact readers."""
import pytest
import torch

from invdiff_min.data import DataConfig, make_dataset, read_background, read_shape


@pytest.mark.parametrize("res", [16, 32, 64])
def test_readers_are_exact_on_real_samples(res):
    for split in ("train", "eval"):
        d = make_dataset(DataConfig(resolution=res, num_samples=1000, eval_per_group=100), split)
        assert d.images.shape == (len(d), 3, res, res)
        assert 0 <= float(d.images.min()) and float(d.images.max()) <= 1
        assert torch.equal(read_background(d.images), d.bias)
        assert torch.equal(read_shape(d.images), d.labels)


def test_bias_ratio_and_balanced_eval_split():
    cfg = DataConfig(num_samples=2000, aligned_fraction=0.9)
    train = make_dataset(cfg, "train")
    assert float((train.bias == train.labels).float().mean()) == pytest.approx(0.9)
    for c in (0, 1):   # the ratio holds within each class
        assert float((train.bias[train.labels == c] == c).float().mean()) == pytest.approx(0.9)
    ev = make_dataset(cfg, "eval")
    assert torch.bincount(ev.group).tolist() == [cfg.eval_per_group] * 4
    assert torch.equal(train.index, torch.arange(2000))


def test_dataset_is_deterministic_given_the_seed():
    a, b = make_dataset(DataConfig(num_samples=64)), make_dataset(DataConfig(num_samples=64))
    c = make_dataset(DataConfig(num_samples=64, seed=1))
    assert torch.equal(a.images, b.images) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.images, c.images)


def test_bad_dataset_settings_are_refused():
    with pytest.raises(ValueError, match="multiple of 4"):
        make_dataset(DataConfig(resolution=10))
    with pytest.raises(ValueError, match="aligned_fraction"):
        make_dataset(DataConfig(aligned_fraction=1.5))
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        make_dataset(DataConfig(name="imagenet"))
    with pytest.raises(ValueError, match="needs a root folder"):
        make_dataset(DataConfig(name="waterbirds"))
    with pytest.raises(ValueError, match="unknown split"):
        make_dataset(DataConfig(), "test")
    with pytest.raises(ValueError, match="RGB"):
        read_background(torch.zeros(2, 1, 8, 8))


@pytest.mark.parametrize("k", [3, 4])
def test_k_valued_benchmarks_read_exactly_and_spread_the_minority_evenly(k):
    from invdiff_min.data import load_splits

    cfg = DataConfig(name=f"shapes{k}", num_samples=1200, aligned_fraction=0.9, eval_per_group=20)
    splits = load_splits(cfg)
    train, ev = splits.train, splits.eval
    assert train.num_classes == train.num_attributes == k and len(train.class_names) == k
    for d in (train, ev):
        assert torch.equal(read_background(d.images, k), d.bias)
        assert torch.equal(read_shape(d.images, k), d.labels)
        assert torch.equal(splits.spec.read_class(d.images, k), d.labels)
    per_class = 1200 // k
    conflicting = round(0.1 * per_class)
    for c in range(k):   # round(0.1 n) conflicting samples per class, spread evenly over the other values
        counts = torch.bincount(train.bias[train.labels == c], minlength=k)
        assert int(counts[c]) == per_class - conflicting
        others = [int(counts[j]) for j in range(k) if j != c]
        assert sum(others) == conflicting and max(others) - min(others) <= 1
    assert torch.bincount(ev.group).tolist() == [20] * (k * k)


def test_k_valued_benchmark_defaults():
    from invdiff_min.data import get_spec

    assert get_spec("shapes3").defaults == {"aligned_fraction": 0.9}
    with pytest.raises(ValueError, match="2, 3 or 4"):
        from invdiff_min.data.shapes import make_split
        make_split(DataConfig(), "train", k=5)


def test_k_valued_reader_calls_a_background_that_is_none_of_the_values_unreadable():
    from invdiff_min.data.shapes import BACKGROUND_RGB, NONE_OF_THE_VALUES

    water, sand = BACKGROUND_RGB[1], BACKGROUND_RGB[2]
    colours = torch.stack([water, (water + sand) / 2, torch.tensor([0.5, 0.5, 0.5]),
                           water + torch.tensor([0.0, 0.0, NONE_OF_THE_VALUES - 0.01])])
    images = colours[:, :, None, None].expand(4, 3, 8, 8).clamp(0, 1)
    assert read_background(images, 3).tolist() == [1, -1, -1, 1]
    assert read_background(images, 4).tolist() == [1, -1, -1, 1]
    assert read_background(images, 2).tolist() == [1, 1, 0, 1]     # K = 2 reads blue against green, as always
