"""Model cards: one versioned format for encoders and rerankers, cards of older simsearch migrated, newer refused.

The old cards below are what simsearch 0.1.0 wrote before card version 2 (a MatchNet reranker's
unversioned card.json and a triplet encoder's version 1 card), field for field; figures from real runs.
"""

from __future__ import annotations

import json
import logging

import pytest

from simsearch.encoders.cards import CARD, CARD_VERSION, MODEL, Card, EncoderDetails, RerankerDetails
from simsearch.encoders.registry import get_encoder, list_encoders
from simsearch.errors import ModelError, UnknownNameError
from simsearch.paths import rerankers_dir, trained_dir
from simsearch.retrieval.rerank import get_reranker, list_rerankers

HISTORY = [{"epoch": 1, "loss": 0.052, "triplets": 30844, "mean_cosine": 0.162, "hit1": 0.251, "hit10": 0.604,
            "seconds": 61.2, "score": 0.855},
           {"epoch": 2, "loss": 0.047, "triplets": 28011, "mean_cosine": 0.158, "hit1": 0.262, "hit10": 0.617,
            "seconds": 70.8, "score": 0.879}]

OLD_ENCODER_CARD = {  # card_version 1: every field the encoders' card had
    "name": "lite0-tin-triplet", "method": "triplet", "base": "efficientnet-lite0",
    "base_key": "efficientnet-lite0@579344248a93e230", "dim": 256, "image_size": 224, "mean": [127.0, 127.0, 127.0],
    "std": [128.0, 128.0, 128.0], "crop_fraction": 0.875, "head": {"in": 1280, "hidden": [1024], "out": 256},
    "data": "/work/shared/data/tiny-imagenet-200", "split": "train",
    "hyper_parameters": {"name": "lite0-tin-triplet", "base": "efficientnet-lite0", "margin": 0.1, "lr": 0.001,
                         "epochs": 30, "device": "auto"},
    "train_seconds": 288.4,
    "validation": {"held_out": "2000 images of the train split (classes)", "best": HISTORY[1], "history": HISTORY,
                   "stopped": "epochs done"},
    "onnx_sha256": "9f2c" * 16, "created": "2026-11-20T10:02:11+00:00", "simsearch_version": "0.1.0",
    "card_version": 1, "notes": [],
}

PAIR_ROW = {"epoch": 3, "loss": 0.412, "steps": 2000, "balanced_accuracy": 0.808, "roc_auc": 0.891, "seconds": 131.0}
OLD_RERANKER_CARD = {  # no card_version: every field a MatchNet reranker's card had
    "name": "matchnet-lite0", "arch": "matchnet", "input": "encoder", "image_size": 0,
    "data": "/work/shared/data/tiny-imagenet-200", "split": "train",
    "hyper_parameters": {"name": "matchnet-lite0", "tower": "pretrained", "lr": 0.001, "weights": "None"},
    "train_seconds": 131.9,
    "validation": {**PAIR_ROW, "held_out": "2000 held-out images, 10,000 balanced pairs",
                   "history": [{**PAIR_ROW, "epoch": 1, "balanced_accuracy": 0.79}, PAIR_ROW],
                   "stopped": "epochs done"},
    "created": "2026-11-21T08:40:00+00:00", "tower": "pretrained", "encoder": "efficientnet-lite0",
    "representation": [256], "onnx_sha256": {"tower.onnx": "a1" * 32, "metric.onnx": "b2" * 32},
}


def new_card(**changes) -> Card:
    fields = dict(kind="reranker", name="beit-tin", method="beit", base="efficientnet-lite0",
                  data="/data/tiny-imagenet-200", split="train", hyper_parameters={"lr": 3e-4, "weights": None},
                  validation={"held_out": "2000 held-out images", "history": [PAIR_ROW], "best": PAIR_ROW,
                              "stopped": "no better held-out balanced accuracy for 4 epochs"},
                  train_seconds=1374.2, created="2026-11-25T09:00:00+00:00", simsearch_version="0.1.0",
                  onnx_sha256={"tower.onnx": "c3" * 32, "metric.onnx": "d4" * 32},
                  details=RerankerDetails(input="pixels", image_size=160, representation=(128, 5, 5),
                                          source="efficientnet-lite0 trunk -> BEiT", trainable_parameters=412_033))
    return Card(**{**fields, **changes})


def test_a_card_round_trips_through_its_file(tmp_path):
    card = new_card()
    (tmp_path / CARD).write_text(card.to_json())
    assert Card.load(tmp_path / CARD) == card
    assert json.loads(card.to_json())["card_version"] == CARD_VERSION
    assert card.summary() == ("beit on 160px pixels (efficientnet-lite0 trunk -> BEiT), trained on tiny-imagenet-200 "
                              "(train) in 1374s: held-out balanced accuracy 0.808, ROC AUC 0.891 (epoch 3; no better "
                              "held-out balanced accuracy for 4 epochs)")


def test_an_old_reranker_card_is_migrated_and_served(tmp_path):
    card = Card.from_dict(json.loads(json.dumps(OLD_RERANKER_CARD)))
    assert card.kind == "reranker" and card.method == "matchnet" and card.base == "efficientnet-lite0"
    assert card.details == RerankerDetails(input="encoder", image_size=0, representation=(256,), tower="pretrained")
    assert card.validation["best"] == PAIR_ROW and len(card.validation["history"]) == 2
    assert card.validation["stopped"] == "epochs done" and card.onnx_sha256["tower.onnx"] == "a1" * 32
    assert card.simsearch_version == ""  # not recorded then
    assert "matchnet (pretrained tower) on efficientnet-lite0 embeddings" in card.summary()
    # in a registry: the reranker registry reads it as today's
    folder = rerankers_dir(tmp_path) / "matchnet-lite0"
    folder.mkdir(parents=True)
    (folder / CARD).write_text(json.dumps(OLD_RERANKER_CARD))
    spec = get_reranker("matchnet-lite0", tmp_path)
    assert (spec.input, spec.encoder, spec.image_size, spec.card) == ("encoder", "efficientnet-lite0", 0, card)
    assert Card.from_dict(json.loads(card.to_json())) == card  # and it is written back in today's format


def test_an_old_encoder_card_is_migrated_and_registered(tmp_path):
    card = Card.from_dict(json.loads(json.dumps(OLD_ENCODER_CARD)))
    assert card.kind == "encoder" and card.base == "efficientnet-lite0" and card.onnx_sha256 == {MODEL: "9f2c" * 16}
    assert card.details == EncoderDetails(base_key="efficientnet-lite0@579344248a93e230", dim=256, image_size=224,
                                          mean=(127.0,) * 3, std=(128.0,) * 3, crop_fraction=0.875,
                                          head={"in": 1280, "hidden": [1024], "out": 256})
    assert card.summary() == ("256-d triplet from efficientnet-lite0, trained on tiny-imagenet-200 (train) in 288s: "
                              "held-out hit@1 0.262, hit@10 0.617 (epoch 2; epochs done)")
    folder = trained_dir(tmp_path) / "lite0-tin-triplet"
    folder.mkdir(parents=True)
    (folder / CARD).write_text(json.dumps(OLD_ENCODER_CARD))
    (folder / MODEL).write_bytes(b"")  # the registry lists folders with a model; this test never runs it
    spec = get_encoder("lite0-tin-triplet", tmp_path)
    assert spec.trained and spec.dim == 256 and spec.weights_sha256 == "9f2c" * 16 and spec.card == str(folder / CARD)


def test_a_card_from_a_newer_simsearch_is_refused_with_a_clear_error(tmp_path, caplog):
    newer = {**json.loads(new_card().to_json()), "card_version": CARD_VERSION + 1, "field_of_the_future": 1}
    folder = rerankers_dir(tmp_path) / "future"
    folder.mkdir(parents=True)
    (folder / CARD).write_text(json.dumps(newer))
    with pytest.raises(ModelError, match=f"version {CARD_VERSION + 1} was written by a newer simsearch"):
        Card.load(folder / CARD)
    with pytest.raises(ModelError, match="newer simsearch"):  # by name: the reason, not "unknown reranker"
        get_reranker("future", tmp_path)
    with caplog.at_level(logging.WARNING):  # a listing leaves it out and says why
        assert list_rerankers(tmp_path) == []
    assert "newer simsearch" in caplog.text
    encoder = trained_dir(tmp_path) / "future-encoder"
    encoder.mkdir(parents=True)
    (encoder / CARD).write_text(json.dumps({**OLD_ENCODER_CARD, "card_version": CARD_VERSION + 1}))
    (encoder / MODEL).write_bytes(b"")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert "future-encoder" not in [s.name for s in list_encoders(tmp_path)]
    assert "newer simsearch" in caplog.text


@pytest.mark.parametrize("text, message", [
    ("{not json", "cannot read the model card"),
    (json.dumps({"card_version": CARD_VERSION, "kind": "encoder"}), "not a valid version"),
    (json.dumps({"name": "x", "method": "triplet"}), "not an unversioned reranker card"),
    (json.dumps({**OLD_RERANKER_CARD, "validation": {"held_out": "x"}}), "validation lacks epoch"),
    (json.dumps({k: v for k, v in OLD_ENCODER_CARD.items() if k != "head"}), "version 1 model card without"),
    (json.dumps({**OLD_RERANKER_CARD, "onnx_sha256": {"tower.onnx": "a1" * 32}}), "no sha256 of metric.onnx"),
])
def test_a_broken_card_is_a_model_error_naming_its_file(tmp_path, text, message):
    (tmp_path / CARD).write_text(text)
    with pytest.raises(ModelError, match=message) as e:
        Card.load(tmp_path / CARD)
    assert str(tmp_path / CARD) in str(e.value)


def test_a_registry_refuses_the_other_kind_of_card(tmp_path):
    folder = rerankers_dir(tmp_path) / "an-encoder"
    folder.mkdir(parents=True)
    (folder / CARD).write_text(json.dumps(OLD_ENCODER_CARD))
    with pytest.raises(ModelError, match="where a reranker was expected"):
        get_reranker("an-encoder", tmp_path)
    with pytest.raises(UnknownNameError, match="unknown reranker '../trained'"):  # names are folders of the registry
        get_reranker("../trained", tmp_path)
    with pytest.raises(ModelError, match="EncoderDetails instead of RerankerDetails"):
        new_card(details=Card.from_dict(OLD_ENCODER_CARD).details)


def test_a_version_3_card_reads_as_a_pair_classifier_and_version_4_shows_reranking_and_checks():
    v3 = {**json.loads(new_card().to_json()), "card_version": 3}
    del v3["details"]["depth"], v3["details"]["fusion_weight"]
    card = Card.from_dict(v3)
    assert (card.details.depth, card.details.fusion_weight, card.card_version) == (0, 0.0, CARD_VERSION)
    best = {**PAIR_ROW, "hit1_before": 0.214, "hit10_before": 0.536, "hit1": 0.296, "hit10": 0.667}
    reranker = new_card(validation={"held_out": "x", "history": [best], "best": best, "stopped": "epochs done"},
                        details=RerankerDetails(input="encoder", image_size=0, representation=(1536,), depth=100,
                                                fusion_weight=0.1))
    assert "reranking its top 100: hit@1 21.4 -> 29.6, hit@10 53.6 -> 66.7 (vector score weight 0.1)" in reranker.summary()
    checks = {"split": "val", "unseen_classes": ["n1"],
              **{name: {"model": {"hit1": m}, "base": {"hit1": b}} for name, m, b in
                 (("in_domain", 0.417, 0.247), ("unseen", 0.394, 0.344), ("near_dup", 0.997, 0.998))}}
    encoder = Card.from_dict(json.loads(json.dumps(OLD_ENCODER_CARD)))
    encoder = Card(**{**encoder.__dict__, "validation": {**encoder.validation, "checks": checks}})
    assert ("against efficientnet-lite0 on val: in-domain hit@1 41.7 (+17.0), unseen classes hit@1 39.4 (+5.0), "
            "near-duplicates hit@1 99.7 (-0.1)") in encoder.summary()
