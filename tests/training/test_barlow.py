"""Barlow Twins on real photos: the loss, a tiny training run, export parity, and resume from cached views."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from simsearch import paths
from simsearch.encoders.preprocess import decode_side, to_input
from simsearch.encoders.registry import get_encoder
from simsearch.encoders.runtime import OnnxEncoder
from simsearch.indexer.images import load_rgb
from simsearch.training.barlow import BarlowConfig, barlow_loss, train_barlow


def test_barlow_loss_is_zero_for_identical_decorrelated_views_and_penalises_redundancy():
    torch.manual_seed(0)
    z = torch.randn(4096, 8)
    assert barlow_loss(z, z, 5e-3).item() == pytest.approx(0.0, abs=0.05)  # diagonal 1, off-diagonal ~0
    redundant = z[:, :1].repeat(1, 8)  # every dimension the same: off-diagonal correlations are 1
    assert barlow_loss(redundant, redundant, 5e-3).item() == pytest.approx(5e-3 * 56, rel=0.05)
    assert barlow_loss(z, torch.randn(4096, 8), 5e-3).item() == pytest.approx(8.0, rel=0.1)  # unrelated views


def test_tiny_barlow_run_lowers_the_loss_exports_and_resumes(classes, models_dir):
    cfg = BarlowConfig(name="tiny-bt", data=classes, dim=16, hidden=64, batch_size=32, epochs=5, patience=5,
                       holdout_per_class=2, lr=3e-3)
    card = train_barlow(cfg, models_dir)
    history = card.validation["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert card.method == "barlow" and card.details.dim == 16 and card.details.head["hidden"] == [64, 64]
    # a quarter of the 8 classes was left out of training, and the card says how it does on them
    unseen = card.validation["checks"]["unseen_classes"]
    assert len(unseen) == 2 and card.validation["checks"]["unseen"]["model"]["queries"] == 2 * 1
    assert card.details.calibration and not [p for p in card.details.calibration if Path(p).parent.name in unseen]

    spec = get_encoder("tiny-bt", models_dir)
    photos = sorted(classes.rglob("*.JPEG"))[::12][:4]
    batch = np.stack([to_input(load_rgb(p, decode_side(spec)), spec) for p in photos])
    from simsearch.training.heads import torch_encoder

    with torch.no_grad():
        want = torch_encoder(spec, models_dir)(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(OnnxEncoder(spec, models_dir=models_dir).embed(batch), want, atol=1e-3)

    # The augmented views' features are cached: a re-run (e.g. after an interruption) embeds nothing again.
    cached = sorted(paths.training_cache().rglob("views-*.npy"))
    assert cached
    stamps = [p.stat().st_mtime_ns for p in cached]
    train_barlow(cfg, models_dir)
    assert [p.stat().st_mtime_ns for p in cached] == stamps
