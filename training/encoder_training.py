"""What every encoder-head trainer (triplet, Barlow Twins) shares: held-out validation, the collapse guard, export.

A head trains on cached base-encoder features (training/features.py); after every epoch it is
validated on held-out pair sets (hit@1 and hit@10, kept by their sum) and the mean pairwise cosine of
the held-out embeddings is checked for collapse. The best epoch is exported with its base encoder as
one ONNX model and registered as a trained encoder. Imports torch: training only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from simsearch.encoders.cards import HEAD, MODEL, Card, EncoderDetails
from simsearch.encoders.registry import is_builtin
from simsearch.encoders.trained import check_model_name
from simsearch.errors import SimsearchError
from simsearch.paths import trained_dir
from simsearch.training.features import FeatureSet, TrainingData, validation_ranks
from simsearch.training.heads import HeadOnFeatures
from simsearch.training.loop import (
    Budget,
    EpochPlan,
    FitResult,
    LoopConfig,
    Trainer,
    TrainingStopped,
    checkpoint_path,
    fit,
    no_guard,
    publish,
)

log = logging.getLogger(__name__)


def check_name(name: str) -> None:
    check_model_name(name)
    if is_builtin(name):
        raise SimsearchError(f"{name!r} is a built-in encoder; choose another --name")


def check_collapse(spread: float, initial_spread: float, limit: float) -> None:
    """spread: mean pairwise cosine of held-out embeddings now; initial_spread: the same before training."""
    limit = max(limit, initial_spread + 0.05)  # an untrained head may already be narrow
    if spread > limit:
        raise TrainingStopped(f"embeddings collapsing (mean pairwise cosine {spread:.3f} > {limit:.3f})")


def head_trainer(model: HeadOnFeatures, optimizer: torch.optim.Optimizer, plan: Callable[[int], EpochPlan],
                 val: FeatureSet, seed: int, collapse_cosine: float,
                 guard: Callable[[list[dict]], None] = no_guard) -> Trainer:
    """The loop's view of a head trainer: validated on val's pair sets, guarded against collapse, then `guard`."""
    device = next(model.parameters()).device  # the trainer put the model where it trains

    def embed(feats: np.ndarray) -> np.ndarray:
        model.eval()
        with torch.no_grad():
            return model(torch.from_numpy(feats).to(device)).cpu().numpy()  # (N, in) -> (N, out)

    def mean_cosine() -> float:
        e = embed(val.x[:1000])  # (n, out)
        return float((e @ e.T).mean())

    # Measured on the freshly initialised head, which a resumed run rebuilds identically (seeded).
    initial_spread = mean_cosine()

    def validate() -> tuple[dict, float]:
        ranks = validation_ranks(embed, val, seed)
        scores = {"mean_cosine": mean_cosine(), "hit1": float(np.mean(ranks < 1)), "hit10": float(np.mean(ranks < 10))}
        # Kept by hit@1 + hit@10: on ~1,000 held-out queries hit@10 alone peaks early and noisily while
        # hit@1 still climbs (measured with triplet: epoch 7 24%/62% vs epoch 13 27%/62%).
        return scores, scores["hit1"] + scores["hit10"]

    def guards(history: list[dict]) -> None:
        check_collapse(history[-1]["mean_cosine"], initial_spread, collapse_cosine)
        guard(history)

    return Trainer(model, optimizer, plan, validate, "held-out hit@1 + hit@10", guards)


def train_head(cfg, method: str, data: TrainingData, head_arch: dict, trainer: Trainer, held_out: str, budget: Budget,
               models_dir: Path | None, train_paths: list[Path], on_progress=None) -> Card:
    """Run the loop, then export the best epoch's head (`export_head`).

    train_paths: the images it trained on; a seeded sample of them is what its int8 variant is calibrated on.
    """
    ckpt = checkpoint_path(cfg)
    result = fit(trainer, LoopConfig(cfg.epochs, cfg.patience, budget, cfg.seed), ckpt, on_progress)
    return export_head(cfg, method, data, head_arch, trainer.module.head, result, held_out, budget, models_dir,
                       on_progress, train_paths, ckpt)


def generalisation_checks(cfg, data: TrainingData, head: torch.nn.Module, models_dir: Path | None,
                          on_progress=None) -> dict:
    """The trained encoder against its base on the other split: in-domain, unseen classes, near-duplicates
    (evaluation/generalisation.py), through the base's cached features and the head in torch."""
    from simsearch.evaluation import generalisation
    from simsearch.training.features import base_features

    module = HeadOnFeatures(head).eval()
    last: dict[tuple, np.ndarray] = {}  # each check asks for the base's vectors of its images twice: read them once

    def embed_base(paths: list[Path]) -> np.ndarray:
        key = tuple(paths)
        if key not in last:
            last.clear()
            last[key] = base_features(data.base, paths, models_dir, cfg.device,
                                      on_progress and (lambda d, t: on_progress("embedding the checks' images", d, t)))
        return last[key]

    def embed(paths: list[Path]) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(embed_base(paths))).numpy()  # (N, in) -> (N, dim)

    return generalisation.against_base(cfg.data, cfg.split, data.unseen_classes, embed, embed_base, cfg.check_photos)


def export_head(cfg, method: str, data: TrainingData, head_arch: dict, head: torch.nn.Module, result: FitResult,
                held_out: str, budget: Budget, models_dir: Path | None, on_progress=None,
                train_paths: list[Path] | None = None, checkpoint: Path | None = None) -> Card:
    """Check the head against its base, export base + head as one ONNX model (eval mode), register it under cfg.name.

    train_paths: what its int8 variant is calibrated on (default: every training image).
    """
    from simsearch.encoders.export import append_graph, export_module
    from simsearch.encoders.quantize import pick_calibration
    from simsearch.training.heads import StackedEncoder, head_dim, torch_encoder

    base = data.base
    head = head.cpu().eval()  # eval: BatchNorm must use running statistics in the checks and the export
    checks = generalisation_checks(cfg, data, head, models_dir, on_progress)

    def write_files(folder: Path) -> None:
        if base.clip:  # no torch definition of a CLIP tower here: the head's graph is appended to the base's
            export_module(HeadOnFeatures(head).eval(), (2, base.dim), folder / "head.onnx")
            append_graph(Path(base.onnx_file), folder / "head.onnx", folder / MODEL)
            (folder / "head.onnx").unlink()
        else:
            full = StackedEncoder(torch_encoder(base, models_dir), head).eval()  # (B, 3, S, S) -> (B, dim)
            export_module(full, (1, 3, base.image_size, base.image_size), folder / MODEL)
        torch.save(head.state_dict(), folder / HEAD)

    calibration = tuple(str(Path(p).resolve()) for p in pick_calibration(train_paths or data.train.paths))
    details = EncoderDetails(base_key=base.key, dim=head_dim(head_arch), image_size=base.image_size, mean=base.mean,
                             std=base.std, crop_fraction=base.crop_fraction, head=head_arch,
                             preprocess=base.preprocess.value, calibration=calibration)
    return publish(cfg, method, base.name, details, result, held_out, budget, trained_dir(models_dir), write_files,
                   checkpoint, checks)
