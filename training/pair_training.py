"""What every pair-classifier reranker shares: balanced-pair epochs, held-out validation, export.

A reranker is a `tower` (one image's input -> its representation) and a `metric` network (two
representations -> logit of P(same)). Training draws fresh balanced same/different pairs of the train
split every epoch (optionally part of them from each image's nearest neighbours, or a listwise
objective over them) and validates on pairs of held-out images; the loop (training/loop.py) keeps the
epoch with the best held-out balanced accuracy, stops on patience or the time budget, checkpoints
and resumes. Imports torch: training only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from simsearch.devices import torch_device
from simsearch.encoders.cards import METRIC, TOWER, WEIGHTS, Card, RerankerDetails
from simsearch.paths import rerankers_dir
from simsearch.training.loop import Budget, EpochPlan, LoopConfig, Trainer, checkpoint_path, fit, publish

log = logging.getLogger(__name__)

BatchOf = Callable[[np.ndarray], torch.Tensor]  # image indices (n,) -> tower inputs (n, ...)


@dataclass(frozen=True)
class PairFitConfig:
    """What a reranker's epochs are made of (the loop's own settings, epochs and patience, are in LoopConfig)."""

    lr: float
    batch_size: int
    pairs_per_epoch: int
    seed: int
    weight_decay: float = 0.0
    val_pairs: int = 10_000
    hard_fraction: float = 0.0  # share of each epoch's pairs drawn as (image, one of its nearest neighbours)
    listwise: bool = False  # train on each image's nearest neighbours + a positive, softmax over them

    @classmethod
    def of(cls, trainer_config) -> PairFitConfig:
        """The settings, read off a reranker's config (MatchNetConfig, BeitPairConfig) by field name."""
        return cls(**{f.name: getattr(trainer_config, f.name) for f in fields(cls) if hasattr(trainer_config, f.name)})


def holdout_split(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of training images and of held-out images (per_class of every class)."""
    from simsearch.training.features import FeatureSet, holdout_mask

    held = holdout_mask(FeatureSet(np.empty((len(labels), 0)), labels, "classes"), per_class, seed)
    return np.flatnonzero(~held), np.flatnonzero(held)


def nearest_neighbours(x: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """(N, k) indices of each row's k nearest other rows by cosine (x L2-normalised), in blocks of rows."""
    out = np.empty((len(x), k), np.int64)
    for s in range(0, len(x), block):
        sims = x[s:s + block] @ x.T  # (b, N)
        sims[np.arange(len(sims)), np.arange(s, s + len(sims))] = -np.inf  # not itself
        out[s:s + len(sims)] = np.argpartition(-sims, k, axis=1)[:, :k]
    return out


def hard_pairs(neighbours: np.ndarray, labels: np.ndarray, n: int, seed: int):
    """n pairs (i, one of i's nearest neighbours), labelled by class: the candidates a reranker sees at query
    time are a query's nearest neighbours, not random images, so it must learn to tell those apart."""
    rng = np.random.default_rng(seed)
    i = rng.integers(0, len(neighbours), n)
    j = neighbours[i, rng.integers(0, neighbours.shape[1], n)]
    return i, j, labels[i] == labels[j]


def listwise_loss(tower: nn.Module, metric: nn.Module, batch_of: BatchOf, train_idx: np.ndarray, labels: np.ndarray,
                  queries: np.ndarray, neighbours: np.ndarray, rng: np.random.Generator, device: str) -> torch.Tensor:
    """What reranking asks for: among a query's nearest neighbours, one same-class image and as many random
    images, put the same-class ones first. Cross-entropy of the softmax over the candidates' logits against
    a uniform distribution on the same-class candidates. queries: (Q,) train-local indices; labels: train-local.

    The random images matter: with near neighbours as the only negatives, "the least similar candidate"
    would give the positive away (measured: a model trained so reranked at chance level).
    """
    same_class = [np.flatnonzero(labels == labels[q]) for q in queries]
    pos = np.array([rng.choice(c[c != q]) for q, c in zip(queries, same_class)])
    k = neighbours.shape[1]
    far = rng.integers(0, len(labels), (len(queries), k))
    cands = np.concatenate([pos[:, None], neighbours[queries], far], axis=1)  # (Q, 1 + 2k)
    target = torch.from_numpy((labels[cands] == labels[queries][:, None]).astype(np.float32)).to(device)
    target = target / target.sum(1, keepdim=True)
    a = tower(batch_of(train_idx[queries]).to(device))  # (Q, d)
    b = tower(batch_of(train_idx[cands.ravel()]).to(device))  # (Q * (1 + 2k), d)
    logits = metric.logits(a.repeat_interleave(cands.shape[1], 0), b).view(cands.shape)  # (Q, 1 + 2k)
    return -(target * torch.log_softmax(logits, 1)).sum(1).mean()


def predict(tower: nn.Module, metric: nn.Module, batch_of: BatchOf, n: int, i: np.ndarray, j: np.ndarray,
            block: int = 512) -> np.ndarray:
    """P(same) of pairs (i[p], j[p]) of n images: the tower runs once per image, the metric once per pair."""
    tower.eval()
    metric.eval()
    device = next(metric.parameters()).device
    with torch.no_grad():
        reps = torch.cat([tower(batch_of(np.arange(s, min(s + block, n))).to(device)) for s in range(0, n, block)])
        return torch.cat([torch.sigmoid(metric.logits(reps[i[s:s + block]], reps[j[s:s + block]]))
                          for s in range(0, len(i), block)]).cpu().numpy()


def evaluate(tower: nn.Module, metric: nn.Module, batch_of: BatchOf, labels: np.ndarray, n_pairs: int,
             seed: int) -> dict:
    from simsearch.evaluation import datasets, metrics

    i, j, same = datasets.balanced_pairs(labels, n_pairs, seed)
    p = predict(tower, metric, batch_of, len(labels), i, j)
    return {"balanced_accuracy": metrics.confusion(p, same, 0.5).balanced_accuracy, "roc_auc": metrics.roc_auc(p, same)}


def pair_trainer(tower: nn.Module, metric: nn.Module, batch_of: BatchOf, labels: np.ndarray, train_idx: np.ndarray,
                 val_idx: np.ndarray, cfg: PairFitConfig, device: str, neighbours: np.ndarray | None = None) -> Trainer:
    """The loop's view of tower + metric: BCE on labelled pairs (or cfg.listwise), validated on held-out pairs.

    device: where torch trains ("cuda" or "cpu", from devices.torch_device).
    neighbours: (len(train_idx), k) nearest neighbours among the training images (indices into train_idx),
    for cfg.hard_fraction of the pairs or for cfg.listwise.
    """
    from simsearch.evaluation import datasets

    module = nn.ModuleDict({"tower": tower, "metric": metric}).to(device)
    params = [p for p in (*tower.parameters(), *metric.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    bce = nn.BCEWithLogitsLoss()

    def plan(epoch: int) -> EpochPlan:
        rng = np.random.default_rng(cfg.seed + epoch)
        if cfg.listwise:  # batches of queries, each against its neighbours and a positive
            queries = rng.permutation(len(train_idx))[: max(1, cfg.pairs_per_epoch // (1 + 2 * neighbours.shape[1]))]

            def listwise_step(step: int):
                sel = queries[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                return listwise_loss(tower, metric, batch_of, train_idx, labels[train_idx], sel, neighbours, rng,
                                     device), {}

            return EpochPlan(max(1, len(queries) // cfg.batch_size), listwise_step)
        # batches of labelled pairs
        n_hard = int(cfg.pairs_per_epoch * cfg.hard_fraction) if neighbours is not None else 0
        i, j, same = datasets.balanced_pairs(labels[train_idx], cfg.pairs_per_epoch - n_hard, cfg.seed + 1 + epoch)
        if n_hard:
            hi, hj, hs = hard_pairs(neighbours, labels[train_idx], n_hard, cfg.seed + 1 + epoch)
            i, j, same = np.r_[i, hi], np.r_[j, hj], np.r_[same, hs]
        order = rng.permutation(len(i))

        def pair_step(step: int):
            sel = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            a = tower(batch_of(train_idx[i[sel]]).to(device))  # (B, ...) one representation per image
            b = tower(batch_of(train_idx[j[sel]]).to(device))
            return bce(metric.logits(a, b), torch.from_numpy(same[sel].astype(np.float32)).to(device)), {}

        return EpochPlan(len(order) // cfg.batch_size, pair_step)

    def validate() -> tuple[dict, float]:
        scores = evaluate(tower, metric, lambda idx: batch_of(val_idx[idx]), labels[val_idx], cfg.val_pairs, cfg.seed)
        return scores, scores["balanced_accuracy"]

    return Trainer(module, opt, plan, validate, "held-out balanced accuracy")


def train_reranker(cfg, method: str, base: str, details: RerankerDetails, tower: nn.Module, metric: nn.Module,
                   export_tower: nn.Module, tower_shape: tuple[int, ...], batch_of: BatchOf, labels: np.ndarray,
                   train_idx: np.ndarray, val_idx: np.ndarray, budget: Budget, models_dir: Path | None,
                   on_progress=None, neighbours: np.ndarray | None = None) -> Card:
    """Run the loop on tower + metric; export the best epoch and register it under cfg.name.

    cfg: the trainer's config (MatchNetConfig, BeitPairConfig); details: its card's reranker fields, the
    representation left to be read off the tower here. export_tower: what runs at query time in front of
    the metric network (the trained tower, or a frozen trunk followed by it); tower_shape: one image's
    input to it, batch 1 (its output's shape is the metric network's input).
    """
    loop_cfg = PairFitConfig.of(cfg)
    trainer = pair_trainer(tower, metric, batch_of, labels, train_idx, val_idx, loop_cfg,
                           torch_device(cfg.device, torch.cuda.is_available()), neighbours)
    ckpt = checkpoint_path(cfg)
    result = fit(trainer, LoopConfig(cfg.epochs, cfg.patience, budget, cfg.seed), ckpt, on_progress)
    # eval(): dropout off and BatchNorm on running statistics, or the export bakes in batch statistics.
    export_tower.eval()
    with torch.no_grad():
        rep_shape = tuple(export_tower(torch.zeros(tower_shape)).shape)  # (1, ...) one image's representation

    def write_files(folder: Path) -> None:
        from simsearch.encoders.export import export_module

        export_module(export_tower, tower_shape, folder / TOWER)
        export_module(_Probability(metric).eval(), rep_shape, folder / METRIC, n_inputs=2)
        torch.save({"tower": tower.state_dict(), "metric": metric.state_dict()}, folder / WEIGHTS)  # to fine-tune further

    return publish(cfg, method, base, replace(details, representation=rep_shape[1:]), result,
                   f"{len(val_idx)} held-out images, {loop_cfg.val_pairs:,} balanced pairs", budget,
                   rerankers_dir(models_dir), write_files, ckpt)


class _Probability(nn.Module):
    """The metric network as exported: P(same), not logits."""

    def __init__(self, metric: nn.Module):
        super().__init__()
        self.metric = metric

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.metric.logits(a, b))
