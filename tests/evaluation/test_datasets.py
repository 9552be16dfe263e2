"""Dataset layouts, seeded splits, pair sets and sampled pairs."""

import numpy as np
import pytest
from PIL import Image

from simsearch.errors import DatasetError
from simsearch.evaluation import datasets

from ..conftest import TINY


def write_jpeg(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, value, value)).save(path)


def test_pair_sets_are_deterministic_disjoint_and_one_pair_per_class():
    labels = np.repeat(np.arange(7), [4, 5, 6, 4, 9, 4, 5])
    sets = datasets.make_pair_sets(labels, seed=0)
    assert len(sets) == 2  # the smallest class has 4 images
    used = np.concatenate([np.r_[s.left_idx, s.right_idx] for s in sets])
    assert len(used) == len(set(used.tolist()))  # disjoint within and between sets
    for s in sets:
        np.testing.assert_array_equal(labels[s.left_idx], np.arange(7))
        np.testing.assert_array_equal(labels[s.right_idx], np.arange(7))
    again = datasets.make_pair_sets(labels, seed=0)
    assert all((a.left_idx == b.left_idx).all() and (a.right_idx == b.right_idx).all() for a, b in zip(sets, again))
    other = datasets.make_pair_sets(labels, seed=1)
    assert any((a.left_idx != b.left_idx).any() for a, b in zip(sets, other))


def test_balanced_pairs():
    labels = np.repeat(np.arange(10), 5)
    i, j, same = datasets.balanced_pairs(labels, 1001, seed=0)
    assert len(i) == 1001 and same.sum() == 500
    np.testing.assert_array_equal(labels[i] == labels[j], same)
    assert not np.any(i == j)
    i2, j2, _ = datasets.balanced_pairs(labels, 1001, seed=0)
    assert (i == i2).all() and (j == j2).all()


def test_class_balanced_subset():
    labels = np.repeat(np.arange(4), [10, 3, 10, 10])
    idx = datasets.class_balanced_subset(labels, 5, seed=0)
    assert np.bincount(labels[idx]).tolist() == [5, 3, 5, 5] and (np.diff(idx) > 0).all()


def test_class_folder_split_is_seeded_and_complete(tmp_path):
    for c in ("cat", "dog"):
        for k in range(10):
            write_jpeg(tmp_path / c / f"{k}.jpg", k)
    (tmp_path / "notes.txt").write_text("ignored")
    assert datasets.detect_layout(tmp_path) == "classes"
    train = datasets.load_class_dataset(tmp_path, "train")
    val = datasets.load_class_dataset(tmp_path, "val")
    assert (len(train.paths), len(val.paths)) == (16, 4) and train.classes == ["cat", "dog"]
    assert not set(train.paths) & set(val.paths)
    assert datasets.load_class_dataset(tmp_path, "val").paths == val.paths
    assert datasets.load_class_dataset(tmp_path, "val", seed=1).paths != val.paths


def test_class_folder_split_honours_val_fraction_and_seed(tmp_path):
    for c in ("cat", "dog", "owl"):
        for k in range(10):
            write_jpeg(tmp_path / c / f"{k}.jpg", k)
    every = datasets.load_class_dataset(tmp_path, "val", val_fraction=1, seed=4)
    assert len(every.paths) == 30
    assert len(datasets.make_pair_sets(every.labels, seed=4)) == 5  # 10 images a class -> 5 left/right pairs
    with pytest.raises(DatasetError, match="no images in split 'train' with val fraction 1"):
        datasets.load_class_dataset(tmp_path, "train", val_fraction=1)

    def split(seed):
        val = datasets.load_class_dataset(tmp_path, "val", val_fraction=0.5, seed=seed)
        train = datasets.load_class_dataset(tmp_path, "train", val_fraction=0.5, seed=seed)
        assert np.bincount(val.labels).tolist() == [5, 5, 5] and not set(val.paths) & set(train.paths)
        return val.paths

    assert split(1) == split(1) and split(1) != split(2)
    with pytest.raises(DatasetError, match="between 0 and 1"):
        datasets.load_class_dataset(tmp_path, "val", val_fraction=1.5)


def test_pair_folder_split(tmp_path):
    for k in range(1225):
        (tmp_path / "left").mkdir(exist_ok=True)
        (tmp_path / "right").mkdir(exist_ok=True)
        (tmp_path / "left" / f"{k:04d}.jpg").touch()
        (tmp_path / "right" / f"{k:04d}.png").touch()
    (tmp_path / "left" / "lonely.jpg").touch()
    assert datasets.detect_layout(tmp_path) == "pairs"
    val = datasets.load_pair_folder(tmp_path, "val")
    train = datasets.load_pair_folder(tmp_path, "train")
    assert (len(val.names), len(train.names)) == (325, 900)
    assert not set(val.names) & set(train.names)
    assert all(l.stem == r.stem for l, r in zip(val.left, val.right))
    assert val.split_manifest()["val"] == val.names
    with pytest.raises(DatasetError, match="between 0 and 1"):
        datasets.load_pair_folder(tmp_path, "val", val_fraction=-0.1)


def test_bad_datasets_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="not a dataset"):
        datasets.detect_layout(tmp_path)
    with pytest.raises(DatasetError, match="no such folder"):
        datasets.detect_layout(tmp_path / "missing")
    with pytest.raises(DatasetError, match="unknown split"):
        datasets.load_class_dataset(tmp_path, "test")


def test_tiny_imagenet_val_gives_25_sets_of_200_pairs():
    if not (TINY / "wnids.txt").is_file():
        pytest.skip(f"shared data missing: {TINY}")
    val = datasets.load_class_dataset(TINY, "val")
    assert len(val.paths) == 10_000 and len(val.classes) == 200
    assert np.bincount(val.labels).tolist() == [50] * 200
    sets = datasets.make_pair_sets(val.labels, seed=0)
    assert len(sets) == 25 and all(len(s.left_idx) == 200 for s in sets)
    train = datasets.load_class_dataset(TINY, "train")
    assert len(train.paths) == 20_000
