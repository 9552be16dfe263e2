"""The checks every trained encoder is measured on: class splits, the near-duplicate folder, hit@k against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from simsearch.errors import DatasetError
from simsearch.evaluation import datasets, generalisation

from ..conftest import class_folder, copy_samples


def test_left_out_classes_are_a_seeded_share():
    classes = [f"c{i:02d}" for i in range(20)]
    out = generalisation.split_classes(classes, 0.25, seed=0)
    assert len(out) == 5 and set(out) <= set(classes) and out == sorted(out)
    assert out == generalisation.split_classes(classes, 0.25, seed=0) != generalisation.split_classes(classes, 0.25, 1)
    assert generalisation.split_classes(classes, 0.0, 0) == []
    assert len(generalisation.split_classes(classes[:3], 0.9, 0)) == 1  # never all but one
    with pytest.raises(DatasetError, match="too few"):
        generalisation.split_classes(classes[:2], 0.5, 0)


def test_near_duplicate_folder_is_made_once_and_pairs_each_photo_with_its_copy(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    copy_samples(photos, 6)
    folder = generalisation.near_dup_folder(photos, tmp_path / "cache", limit=4)
    pairs = datasets.load_pair_folder(folder, "val", 1.0)
    assert len(pairs.left) == 4 and [p.stem for p in pairs.left] == [p.stem for p in pairs.right]
    assert all(r.resolve().parent == photos.resolve() for r in pairs.right)
    stamp = (folder / "left" / pairs.left[0].name).stat().st_mtime_ns
    assert generalisation.near_dup_folder(photos, tmp_path / "cache", limit=4) == folder  # made once
    assert (folder / "left" / pairs.left[0].name).stat().st_mtime_ns == stamp
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no work folder left


def test_checks_split_the_classes_and_measure_against_brute_force(tmp_path):
    (tmp_path / "classes").mkdir()
    root = class_folder(tmp_path / "classes", 6, 10)
    ds = datasets.load_class_dataset(root, "val")
    unseen = [ds.classes[1], ds.classes[4]]
    photos = tmp_path / "photos"
    photos.mkdir()
    copy_samples(photos, 5)
    checks = {c.name: c for c in generalisation.build_checks(root, "val", unseen, photos, tmp_path / "cache")}
    assert list(checks) == ["in_domain", "unseen", "near_dup"]
    assert {p.parent.name for p in checks["unseen"].paths} == set(unseen)
    assert {p.parent.name for p in checks["in_domain"].paths} == set(ds.classes) - set(unseen)
    rng = np.random.default_rng(0)
    for check in checks.values():
        vectors = rng.normal(size=(len(check.paths), 8))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        got = generalisation.hits(check, vectors)
        ranks = []
        for s in check.sets:  # brute force: the partner's rank among the set's rights
            for q, (a, b) in enumerate(zip(s.left_idx, s.right_idx)):
                sims = vectors[s.right_idx] @ vectors[a]
                ranks.append(int((sims > sims[q]).sum()))
        assert got["hit1"] == np.mean(np.array(ranks) < 1) and got["queries"] == len(ranks)
    same = generalisation.compare(list(checks.values()), lambda p: np.eye(len(p)), lambda p: np.eye(len(p)))
    assert all(r["model"] == r["base"] for r in same.values())
    # no photos: the near-duplicate check is left out (and logged)
    assert [c.name for c in generalisation.build_checks(root, "val", [], None, tmp_path / "cache")] == ["in_domain"]
