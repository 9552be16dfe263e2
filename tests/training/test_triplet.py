"""Triplet fine-tuning end to end on real Tiny ImageNet photos: train, export, register, index, query."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from simsearch.cli import app
from simsearch.encoders.preprocess import resize_side, to_input
from simsearch.encoders.registry import get_encoder, list_encoders
from simsearch.encoders.runtime import OnnxEncoder
from simsearch.errors import SimsearchError
from simsearch.indexer.images import load_rgb
from simsearch.training.loop import TrainingStopped, check_collapse
from simsearch.training.triplet import TripletConfig, check_triplet_loss, train_triplet

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(classes, models_dir):
    cfg = TripletConfig(name="tiny-triplet", data=classes, split="train", dim=16, hidden=64, batch_size=32,
                        epochs=6, patience=6, holdout_per_class=2, lr=3e-3)
    return train_triplet(cfg, models_dir)


def test_training_lowers_the_loss_and_writes_a_card(trained):
    history = trained.validation["history"]
    assert len(history) >= 3
    assert history[-1]["loss"] < history[0]["loss"]
    assert trained.base == "efficientnet-lite0" and trained.dim == 16 and len(trained.onnx_sha256) == 64
    assert trained.validation["best"]["hit10"] > 0
    assert trained.hyper_parameters["margin"] == 0.1


def test_trained_encoder_is_registered_and_matches_torch_on_real_images(trained, models_dir, classes):
    import torch

    from simsearch.training.heads import torch_encoder

    spec = get_encoder("tiny-triplet", models_dir)
    assert spec.dim == 16 and spec.image_size == 224 and spec.onnx_file
    assert "tiny-triplet" in [s.name for s in list_encoders(models_dir)]
    photos = sorted(classes.rglob("*.JPEG"))[::12][:6]
    batch = np.stack([to_input(load_rgb(p, resize_side(spec)), spec) for p in photos])
    got = OnnxEncoder(spec, models_dir=models_dir).embed(batch)
    model = torch_encoder(spec, models_dir)
    assert not model.training
    with torch.no_grad():
        want = model(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-4)


def test_trained_encoder_indexes_and_queries_through_the_cli(trained, classes, tmp_path):
    db = str(tmp_path / "db")
    result = runner.invoke(app, ["index", str(classes), "--db", db, "--encoder", "tiny-triplet"])
    assert result.exit_code == 0, result.output
    query = sorted(classes.rglob("*.JPEG"))[0]
    result = runner.invoke(app, ["query", str(query), "--db", db, "--encoder", "tiny-triplet", "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert '"path": "%s"' % query in result.stdout  # an indexed photo finds itself
    listing = runner.invoke(app, ["encoders"])
    assert "tiny-triplet" in listing.output and "trained:" in listing.output  # name and card summary


def test_guards_stop_collapse_stuck_and_empty_training():
    with pytest.raises(TrainingStopped, match="collapsing"):
        check_collapse(0.95, 0.3, 0.9)
    with pytest.raises(TrainingStopped, match="collapsing"):
        check_collapse(0.99, 0.92, 0.9)  # started narrow, got narrower
    check_collapse(0.95, 0.93, 0.9)  # started narrow and stayed there: not a collapse
    with pytest.raises(TrainingStopped, match="no semi-hard triplets"):
        check_triplet_loss([{"loss": 0.0, "triplets": 0}], 0.2)
    with pytest.raises(TrainingStopped, match="stuck at the margin"):
        check_triplet_loss([{"loss": v, "triplets": 9} for v in (0.2, 0.2001, 0.1999)], 0.2)
    check_triplet_loss([{"loss": v, "triplets": 9} for v in (0.2, 0.15, 0.1)], 0.2)  # healthy


def test_a_built_in_name_is_refused(classes, models_dir):
    with pytest.raises(SimsearchError, match="built-in encoder"):
        train_triplet(TripletConfig(name="efficientnet-lite0", data=classes), models_dir)


def test_an_interrupted_run_resumes_from_its_checkpoint(classes, models_dir, monkeypatch):
    from simsearch.training import loop

    common = dict(data=classes, dim=16, hidden=64, batch_size=32, patience=9, holdout_per_class=2, lr=3e-3)
    straight = train_triplet(TripletConfig(name="straight", epochs=4, **common), models_dir)

    class Killed(Exception):
        pass

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(loop, "export_and_install", killed)  # the run dies after epoch 2, before export
    with pytest.raises(Killed):
        train_triplet(TripletConfig(name="resumed", epochs=2, **common), models_dir)
    ckpt = loop.checkpoint_path(models_dir, TripletConfig(name="resumed", epochs=4, **common))
    assert ckpt.is_file()
    monkeypatch.undo()
    resumed = train_triplet(TripletConfig(name="resumed", epochs=4, **common), models_dir)
    losses = [[h["loss"] for h in c.validation["history"]] for c in (straight, resumed)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)  # epochs 3-4 continue exactly where 2 stopped
    assert not ckpt.exists()  # a finished run leaves no checkpoint


def test_the_budget_counts_from_the_command_start_and_keeps_time_for_the_export():
    import time

    from simsearch.training.loop import Budget

    assert not Budget(20).over()
    assert Budget(20, started=time.perf_counter() - 19.5 * 60).over()  # 30 s left: less than the export reserve
    assert not Budget(20, started=time.perf_counter() - 18 * 60).over()
