"""Learned whitening: a linear projection of a frozen encoder's embeddings, fitted in closed form from
matched images (Mikolajczyk & Matas 2007; Radenović, Tolias & Chum 2018, "Fine-tuning CNN image
retrieval with no human annotation", section 3.3), optionally blended with the base embedding.

    S   = the within-group scatter of the training embeddings (a group: a class, or a matched pair),
          shrunk towards a multiple of the identity (shrink: 0 = none, 1 = plain PCA whitening)
    P1  = S^(-1/2)                 makes matching images' differences isotropic
    P   = the top `dim` principal directions of P1 (x - mean), then P1: (dim, d)
    e   = L2norm(P (x - mean))     the embedding, (dim,)
    with blend w < 1: L2norm([sqrt(1 - w) x, sqrt(w) e]), whose cosine is (1 - w) cos_base + w cos_e

Why this rather than a trained head: it has no epochs to over-fit in and no learning rate, fits 15,000
embeddings in seconds, and in the measurements behind the defaults (docs/training.md, "Training your own
encoder") it beat the triplet head in-domain while *raising* hit@1 on classes it never saw, where the
triplet head lost 6 points; with 900 pairs it gains where the head fell below its base.

The settings (shrink, dim, blend) are chosen on held-out parts of the training data only: held-out
images of the training classes (or 10% of the pairs) and, for a class dataset, a seeded share of the
training classes left out of the fit (`tune_classes`), whose hit@1 may not fall more than a point below
the base's. The chosen settings are then refitted on all the training data.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from simsearch.encoders.cards import Card
from simsearch.training.configs import WhiteningConfig
from simsearch.training.features import FeatureSet, validation_ranks

log = logging.getLogger(__name__)


def within_group_scatter(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(d, d): sum over groups of (x_i - group mean)(x_i - group mean)^T, over N. x (N, d), y (N,) group labels."""
    _, inverse = np.unique(y, return_inverse=True)
    means = np.zeros((inverse.max() + 1, x.shape[1]))
    np.add.at(means, inverse, x)
    means /= np.bincount(inverse)[:, None]
    centred = x - means[inverse]  # (N, d)
    return centred.T @ centred / len(x)


def whitening_basis(x: np.ndarray, y: np.ndarray, shrink: float) -> tuple[np.ndarray, np.ndarray]:
    """(P (d, d) whose first k rows are the projection to k dims, mean (d,)) from embeddings x (N, d) with
    group labels y (N,)."""
    x = x.astype(np.float64)
    mean = x.mean(0)
    s = within_group_scatter(x, y)
    d = s.shape[0]
    s = (1 - shrink) * s + shrink * np.trace(s) / d * np.eye(d)
    w, v = np.linalg.eigh(s)
    p1 = (v / np.sqrt(np.maximum(w, 1e-12 * w.max()))) @ v.T  # S^(-1/2), (d, d)
    z = (x - mean) @ p1.T
    w2, v2 = np.linalg.eigh(z.T @ z / len(z))
    return v2[:, np.argsort(-w2)].T @ p1, mean


def project(x: np.ndarray, p: np.ndarray, mean: np.ndarray, blend: float) -> np.ndarray:
    """The embedding of base embeddings x (N, d): (N, dim), or (N, d + dim) blended."""
    e = (x - mean) @ p.T
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    if blend < 1:
        e = np.concatenate([np.sqrt(1 - blend) * x, np.sqrt(blend) * e], axis=1)
    return e.astype(np.float32)


def tune_split(train: FeatureSet, share: float, seed: int) -> tuple[FeatureSet, FeatureSet | None]:
    """(what the settings are fitted on, the training classes left out to check them on; None for pairs)."""
    if train.kind == "pairs" or share <= 0:
        return train, None
    classes = np.unique(train.y)
    n = min(len(classes) - 2, max(1, round(len(classes) * share)))
    if n < 1:  # two classes: none to spare
        return train, None
    left_out = np.isin(train.y, np.random.default_rng(seed + 1).permutation(classes)[:n])
    return train.subset(~left_out), train.subset(left_out)


def hits(ranks: np.ndarray) -> tuple[float, float]:
    return float(np.mean(ranks < 1)), float(np.mean(ranks < 10))


def choose(fit: FeatureSet, seen: FeatureSet, unseen: FeatureSet | None, cfg: WhiteningConfig) -> tuple[dict, list[dict]]:
    """The best settings on held-out data, and a row per setting tried (the card's history)."""
    base_unseen = hits(validation_ranks(lambda x: x, unseen, cfg.seed))[0] if unseen is not None else None
    rows = []
    for shrink in cfg.shrink:
        basis, mean = whitening_basis(fit.x, fit.y, shrink)
        for dim in sorted({min(d, fit.x.shape[1]) for d in cfg.dim}):
            for blend in cfg.blend:
                embed = lambda x: project(x, basis[:dim], mean, blend)  # noqa: E731
                h1, h10 = hits(validation_ranks(embed, seen, cfg.seed))
                row = {"epoch": len(rows) + 1, "shrink": shrink, "dim": dim, "blend": blend, "hit1": h1, "hit10": h10,
                       "score": h1 + h10}
                if unseen is not None:
                    u1, u10 = hits(validation_ranks(embed, unseen, cfg.seed))
                    # A setting that forgets the classes it was not fitted on is never chosen.
                    row.update(unseen_hit1=u1, unseen_hit10=u10, base_unseen_hit1=base_unseen,
                               eligible=u1 >= base_unseen - cfg.unseen_tolerance)
                rows.append(row)
    eligible = [r for r in rows if r.get("eligible", True)] or rows
    return max(eligible, key=lambda r: r["score"]), rows


def train_whitening(cfg: WhiteningConfig, models_dir: Path | None = None, on_progress=None) -> Card:
    """Choose the settings on held-out data, refit on all the training data, export and register."""
    import torch

    from simsearch.training.encoder_training import check_name, export_head
    from simsearch.training.features import train_and_holdout
    from simsearch.training.heads import build_head
    from simsearch.training.loop import Budget, FitResult

    check_name(cfg.name)
    budget = Budget(cfg.max_minutes)
    prepared = train_and_holdout(cfg, models_dir, on_progress)
    base, train, seen = prepared.base, prepared.train, prepared.val
    fit, unseen = tune_split(train, cfg.tune_classes, cfg.seed)
    best, rows = choose(fit, seen, unseen, cfg)
    log.info("whitening: shrink %g, %d dims, blend %g chosen (held-out hit@1 %.3f, hit@10 %.3f)", best["shrink"],
             best["dim"], best["blend"], best["hit1"], best["hit10"])
    everything = FeatureSet(np.concatenate([train.x, seen.x]), np.concatenate([train.y, seen.y]), train.kind)
    basis, mean = whitening_basis(everything.x, everything.y, best["shrink"])
    p = basis[:best["dim"]]  # (dim, d)

    head_arch = {"in": base.dim, "hidden": [], "out": best["dim"], **({"blend": best["blend"]} if best["blend"] < 1 else {})}
    head = build_head(head_arch)
    linear = (head.project if best["blend"] < 1 else head)[0]  # the one Linear
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(p))
        linear.bias.copy_(torch.from_numpy(-p @ mean))
    held_out = (f"{len(seen.y)} held-out images of the {cfg.split} split ({seen.kind})"
                + (f" and {len(np.unique(unseen.y))} training classes left out of the fit" if unseen is not None else ""))
    result = FitResult(best, rows, f"closed form: {len(rows)} settings compared on held-out data, the best refitted "
                                   f"on all {len(everything.y)} training images")
    return export_head(cfg, "whitening", prepared, head_arch, head.eval(), result, held_out, budget, models_dir,
                       on_progress)
