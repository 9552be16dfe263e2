"""The dataset used when --data is not given: $SIMSEARCH_DATA; for `bench` only, else ../shared/data beside the
checkout (library code never defaults to the project's data)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simsearch import paths
from simsearch.cli import app
from simsearch.errors import DatasetError
from simsearch.evaluation import datasets

from .conftest import TINY


@pytest.fixture
def two_classes(tmp_path) -> Path:
    """<class>/<image>: 2 real Tiny ImageNet classes, 4 photos each."""
    if not (TINY / "wnids.txt").is_file():
        pytest.skip(f"shared data missing: {TINY}")
    root = tmp_path / "mine"
    for w in (TINY / "wnids.txt").read_text().split()[:2]:
        (root / w).mkdir(parents=True)
        for i in range(4):
            shutil.copy2(TINY / "train" / w / "images" / f"{w}_{i}.JPEG", root / w)
    return root


def test_bench_finds_the_shared_data_from_any_folder(tmp_path, monkeypatch):
    if not (TINY / "wnids.txt").is_file():
        pytest.skip(f"shared data missing: {TINY}")
    monkeypatch.delenv(paths.DATA_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # where the old relative default ../shared/data/... does not exist
    found = paths.benchmark_data_dir()
    assert found.resolve() == TINY.resolve() and found.is_absolute()
    assert datasets.detect_layout(found) == "tiny-imagenet"


def test_the_variable_wins_and_is_read_when_called(two_classes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(paths.DATA_ENV, "mine")  # set after import, relative to the current folder
    assert paths.default_data_dir() == paths.benchmark_data_dir() == two_classes.resolve()
    # an empty variable counts as unset
    assert paths.benchmark_data_dir({paths.DATA_ENV: ""}, shared=two_classes) == two_classes
    with pytest.raises(DatasetError, match="pass --data"):
        paths.default_data_dir({paths.DATA_ENV: ""})


def test_a_missing_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.DATA_ENV, str(tmp_path / "missing"))
    for default in (paths.default_data_dir, paths.benchmark_data_dir):
        with pytest.raises(DatasetError, match=re.escape(f"SIMSEARCH_DATA={tmp_path / 'missing'}: no such folder")):
            default()
    nowhere = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as e:
        paths.benchmark_data_dir({}, shared=nowhere)
    assert "SIMSEARCH_DATA" in str(e.value) and str(nowhere) in str(e.value) and "tiny-imagenet-200.zip" in str(e.value)


def test_training_never_defaults_to_the_shared_data(tmp_path, monkeypatch):
    """Even in a checkout with ../shared beside it, `train` without --data (or $SIMSEARCH_DATA) is an error."""
    from simsearch.training.configs import TrainingConfig

    monkeypatch.delenv(paths.DATA_ENV, raising=False)
    with pytest.raises(DatasetError, match="pass --data with a folder of your images"):
        TrainingConfig(name="x")
    result = CliRunner().invoke(app, ["train", "whitening", "--name", "x"])
    assert result.exit_code != 0 and "pass --data" in result.output, result.output


def test_bench_without_data_from_another_folder(two_classes, tmp_path, monkeypatch):
    """Needs cli.py to fall back on benchmark_data_dir() when --data is not given."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(paths.DATA_ENV, str(two_classes))
    result = CliRunner().invoke(app, ["bench", "--split", "val", "--task", "pairs", "--val-fraction", "1",
                                      "--ks", "1", "--out", "out", "--cache-db", "cache"])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert doc["protocol"]["dataset"] == str(two_classes.resolve()) and doc["encoders"][0]["hits"]["sets"] == 2
