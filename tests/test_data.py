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
