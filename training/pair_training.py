"""What every reranker's training shares: its epochs, held-out validation, export.

A reranker is a `tower` (one image's input -> its representation) and a `metric` network (two
representations -> logit of P(same)). Two ways to train it:
  listwise      what reranking does: every epoch the training images are drawn into pair sets, each
                query's top `depth` candidates by the encoder are scored, softmax cross-entropy with the
                partner as the target; validated by held-out *reranked* hit@1 + hit@10, fused with the
                vector score at the weight that does best (`candidate_lists`, `reranked_hits`)
  pairs         a pair classifier: fresh balanced same/different pairs of the train split every epoch
                (optionally part of them from each image's nearest neighbours), BCE, validated by held-out
                balanced accuracy
The loop (training/loop.py) keeps the best epoch, stops on patience or the time budget, checkpoints
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
from simsearch.evaluation import datasets, metrics
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
    listwise: bool = False  # train on each query's top `depth` candidates (candidate_lists), softmax over them
    depth: int = 100
    class_loss: float = 0.0  # weight of the classifier's cross-entropy (pair_trainer's classifier)

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


def candidate_lists(vectors: np.ndarray, labels: np.ndarray, depth: int, seed: int) -> tuple[np.ndarray, ...]:
    """What a reranker sees at query time, simulated on labelled images: pair sets (`datasets.make_pair_sets`: one
    image of every class on the left, its partner, of the same class, on the right) and each left image's top
    `depth` rights by the encoder's cosine (vectors: (N, d) L2-normalised, labels (N,)).

    -> queries (Q,), candidates (Q, D) (indices into vectors), their cosines (Q, D), the partner's column in
    its row (Q,) or -1 where the vector search missed it, and the partner's rank in the vector search (Q,).
    """
    queries, cands, cosines, partner, rank = [], [], [], [], []
    for s in datasets.make_pair_sets(labels, seed):
        c = metrics.pair_set_candidates(vectors[s.left_idx], vectors[s.right_idx], depth)
        queries.append(s.left_idx)
        cands.append(s.right_idx[c.top])
        cosines.append(c.cosines)
        partner.append(c.partner_column)
        rank.append(c.rank)
    return tuple(np.concatenate(v) for v in (queries, cands, cosines, partner, rank))


def reranked_hits(logits: np.ndarray, cosines: np.ndarray, partner: np.ndarray, rank: np.ndarray,
                  weights: tuple[float, ...]) -> dict:
    """Held-out hit@1 and hit@10 of the vector search alone and after reranking at the best of `weights` (the
    vector score's weight in `fuse`). logits, cosines (Q, D); partner, rank (Q,) as `candidate_lists` gives them:
    a partner the vector search missed keeps its rank."""
    from simsearch.retrieval.rerank import fuse

    out = {"hit1_before": float(np.mean(rank < 1)), "hit10_before": float(np.mean(rank < 10))}
    found = partner >= 0
    best = None
    for w in weights:
        fused = fuse(logits[found], cosines[found], w)  # (F, D)
        mine = np.take_along_axis(fused, partner[found][:, None], 1)
        after = rank.copy()
        after[found] = (fused > mine).sum(1)  # ties go to the partner: with floats they do not happen
        hits = {"hit1": float(np.mean(after < 1)), "hit10": float(np.mean(after < 10)), "fusion_weight": w}
        if best is None or hits["hit1"] + hits["hit10"] > best["hit1"] + best["hit10"]:
            best = hits
    return {**out, **best}


FUSION_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # 1: the vector search's own order


def pair_logits(tower: nn.Module, metric: nn.Module, batch_of: BatchOf, n: int, i: np.ndarray, j: np.ndarray,
                block: int = 4096) -> np.ndarray:
    """Logits of P(same) of pairs (i[p], j[p]) of n images: the tower runs once per image, the metric once per pair."""
    tower.eval()
    metric.eval()
    device = next(metric.parameters()).device
    with torch.no_grad():
        reps = torch.cat([tower(batch_of(np.arange(s, min(s + 512, n))).to(device)) for s in range(0, n, 512)])
        return torch.cat([metric.logits(reps[i[s:s + block]], reps[j[s:s + block]])
                          for s in range(0, len(i), block)]).cpu().numpy()


def predict(tower: nn.Module, metric: nn.Module, batch_of: BatchOf, n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """P(same) of pairs (i[p], j[p]) of n images."""
    return 1 / (1 + np.exp(-pair_logits(tower, metric, batch_of, n, i, j)))


def evaluate(tower: nn.Module, metric: nn.Module, batch_of: BatchOf, labels: np.ndarray, n_pairs: int,
             seed: int) -> dict:
    i, j, same = datasets.balanced_pairs(labels, n_pairs, seed)
    p = predict(tower, metric, batch_of, len(labels), i, j)
    return {"balanced_accuracy": metrics.confusion(p, same, 0.5).balanced_accuracy, "roc_auc": metrics.roc_auc(p, same)}


def pair_trainer(tower: nn.Module, metric: nn.Module, batch_of: BatchOf, labels: np.ndarray, train_idx: np.ndarray,
                 val_idx: np.ndarray, cfg: PairFitConfig, device: str, neighbours: np.ndarray | None = None,
                 classifier: nn.Module | None = None, vectors: np.ndarray | None = None) -> Trainer:
    """The loop's view of tower + metric: BCE on labelled pairs (or cfg.listwise), validated on held-out pairs.

    device: where torch trains ("cuda" or "cpu", from devices.torch_device).
    neighbours: (len(train_idx), k) nearest neighbours among the training images (indices into train_idx),
    for cfg.hard_fraction of the pairs.
    vectors: (len(labels), d) the search encoder's embeddings of every image, for cfg.listwise: trained on each
    query's top cfg.depth candidates (softmax cross-entropy, the partner the target), validated by reranked hit@k.
    classifier: representation -> class logits, trained alongside with weight cfg.class_loss, never exported.
    """
    parts = {"tower": tower, "metric": metric, **({"classifier": classifier} if classifier is not None else {})}
    module = nn.ModuleDict(parts).to(device)
    params = [p for p in module.parameters() if p.requires_grad]
    cross_entropy = nn.CrossEntropyLoss()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    bce = nn.BCEWithLogitsLoss()

    def plan(epoch: int) -> EpochPlan:
        rng = np.random.default_rng(cfg.seed + epoch)
        if cfg.listwise:  # batches of queries, each against its top `depth` candidates of a simulated pair set
            q, c, _, partner, _ = candidate_lists(vectors[train_idx], labels[train_idx], cfg.depth, cfg.seed + 1 + epoch)
            keep = rng.permutation(np.flatnonzero(partner >= 0))  # a partner the vector search missed: nothing to learn

            def listwise_step(step: int):
                sel = keep[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                a = tower(batch_of(train_idx[q[sel]]).to(device))  # (Q, r)
                b = tower(batch_of(train_idx[c[sel].ravel()]).to(device))  # (Q * D, r)
                logits = metric.logits(a.repeat_interleave(c.shape[1], 0), b).view(len(sel), c.shape[1])  # (Q, D)
                return cross_entropy(logits, torch.from_numpy(partner[sel]).to(device)), {}

            return EpochPlan(max(1, len(keep) // cfg.batch_size), listwise_step)
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
            loss = bce(metric.logits(a, b), torch.from_numpy(same[sel].astype(np.float32)).to(device))
            if classifier is not None:
                for rep, side in ((a, i), (b, j)):
                    classes = torch.from_numpy(labels[train_idx[side[sel]]]).to(device)
                    loss = loss + cfg.class_loss / 2 * cross_entropy(classifier(rep), classes)
            return loss, {}

        return EpochPlan(len(order) // cfg.batch_size, pair_step)

    def validate() -> tuple[dict, float]:
        val_batches = lambda idx: batch_of(val_idx[idx])  # noqa: E731
        scores = evaluate(tower, metric, val_batches, labels[val_idx], cfg.val_pairs, cfg.seed)
        if not cfg.listwise:
            return scores, scores["balanced_accuracy"]
        # Chosen for what it is for: held-out hit@k after reranking the vector search's top `depth`, fused.
        q, c, cosines, partner, rank = candidate_lists(vectors[val_idx], labels[val_idx], cfg.depth, cfg.seed)
        logits = pair_logits(tower, metric, val_batches, len(val_idx), np.repeat(q, c.shape[1]), c.ravel())
        scores.update(reranked_hits(logits.reshape(c.shape), cosines, partner, rank, FUSION_WEIGHTS))
        return scores, scores["hit1"] + scores["hit10"]

    return Trainer(module, opt, plan, validate,
                   "held-out reranked hit@1 + hit@10" if cfg.listwise else "held-out balanced accuracy")


def train_reranker(cfg, method: str, base: str, details: RerankerDetails, tower: nn.Module, metric: nn.Module,
                   export_tower: nn.Module, tower_shape: tuple[int, ...], batch_of: BatchOf, labels: np.ndarray,
                   train_idx: np.ndarray, val_idx: np.ndarray, budget: Budget, models_dir: Path | None,
                   on_progress=None, neighbours: np.ndarray | None = None, classifier: nn.Module | None = None,
                   vectors: np.ndarray | None = None) -> Card:
    """Run the loop on tower + metric; export the best epoch and register it under cfg.name.

    cfg: the trainer's config (MatchNetConfig, BeitPairConfig); details: its card's reranker fields, the
    representation left to be read off the tower here. export_tower: what runs at query time in front of
    the metric network (the trained tower, or a frozen trunk followed by it); tower_shape: one image's
    input to it, batch 1 (its output's shape is the metric network's input). neighbours, classifier, vectors:
    as `pair_trainer` takes them.
    """
    loop_cfg = PairFitConfig.of(cfg)
    trainer = pair_trainer(tower, metric, batch_of, labels, train_idx, val_idx, loop_cfg,
                           torch_device(cfg.device, torch.cuda.is_available()), neighbours, classifier, vectors)
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

    held_out = f"{len(val_idx)} held-out images: {loop_cfg.val_pairs:,} balanced pairs"
    details = replace(details, representation=rep_shape[1:])
    if loop_cfg.listwise:
        held_out += f", and their pair sets reranked at depth {loop_cfg.depth}"
        details = replace(details, depth=loop_cfg.depth, fusion_weight=result.best["fusion_weight"])
    return publish(cfg, method, base, details, result, held_out, budget, rerankers_dir(models_dir), write_files, ckpt)


class _Probability(nn.Module):
    """The metric network as exported: P(same), not logits."""

    def __init__(self, metric: nn.Module):
        super().__init__()
        self.metric = metric

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.metric.logits(a, b))
