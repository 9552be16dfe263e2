"""Training on a CLIP encoder: its image tower has no torch definition here, so a trained head's graph is appended to
the tower's ONNX graph (encoders/export.py: append_graph); a reranker reads its stored embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from simsearch.encoders.cards import HEAD, Card
from simsearch.encoders.preprocess import decode_side, to_input
from simsearch.encoders.registry import get_encoder
from simsearch.encoders.runtime import OnnxEncoder
from simsearch.indexer.images import load_rgb
from simsearch.training.configs import MatchNetConfig, WhiteningConfig
from simsearch.training.heads import HeadOnFeatures, build_head
from simsearch.training.matchnet import train_matchnet
from simsearch.training.whitening import train_whitening

from ..clip_models import add_tiny_clip


@pytest.fixture(scope="module")
def clip(models_dir):
    return add_tiny_clip(models_dir)


def test_whitening_from_a_clip_encoder_is_its_tower_then_the_head(clip, classes, models_dir):
    card = train_whitening(WhiteningConfig(name="clip-lw", base=clip.name, data=classes, holdout_per_class=2,
                                           dim=(8,), shrink=(0.3,), blend=(1.0,)), models_dir)
    spec = get_encoder("clip-lw", models_dir)
    assert card.base == clip.name and spec.trained and not spec.has_text  # its space is not the text tower's any more
    photos = sorted(classes.rglob("*.JPEG"))[::13][:5]
    batch = np.stack([to_input(load_rgb(p, decode_side(spec)), spec) for p in photos])  # (5, 3, 32, 32)
    head = build_head(card.details.head)
    head.load_state_dict(torch.load(Path(spec.card).parent / HEAD, weights_only=True))
    with torch.no_grad():
        want = HeadOnFeatures(head).eval()(torch.from_numpy(OnnxEncoder(clip).embed(batch))).numpy()  # (5, 8)
    np.testing.assert_allclose(OnnxEncoder(spec, models_dir=models_dir).embed(batch), want, atol=1e-5)
    assert not (Path(spec.card).parent / "head.onnx").exists()  # only the composed model is kept


def test_matchnet_reranker_on_a_clip_encoders_embeddings(clip, classes, models_dir):
    card = train_matchnet(MatchNetConfig(name="clip-mn", encoder=clip.name, data=classes, epochs=1, patience=1,
                                         holdout_per_class=2, batch_size=8), models_dir)
    assert card.base == clip.name and card.details.input == "encoder"
    assert card.details.representation[0] > 0
