"""`simsearch bench`: "find the pair" hit@k and same/different pair accuracy, for any registered encoder, and
zero-shot classification by text prompts for an encoder with a text tower (CLIP).

Embeddings come through the indexer (`Indexer.embed_files`) into an LMDB cache db keyed by content
hash and encoder weights, so a second run of the same benchmark embeds nothing. Every figure is
computed here from vectors with the plain-numpy metrics of `evaluation/metrics.py`; reporting
(tables, JSON, plots) lives in `benchmarks/report.py`.
"""

from __future__ import annotations

import logging
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from simsearch.devices import Device
from simsearch.encoders.registry import get_encoder
from simsearch.encoders.runtime import OnnxEncoder
from simsearch.encoders.spec import EncoderSpec, Preprocess
from simsearch.encoders.text import TextEncoder
from simsearch.errors import DatasetError, ModelError
from simsearch.evaluation import datasets, generalisation, metrics, zeroshot
from simsearch.indexer.cached import CachedEmbedder
from simsearch.indexer.pipeline import IndexerConfig
from simsearch.indexer.scan import item_path
from simsearch.indexer.store import Store
from simsearch.paths import embedding_cache, shared_data
from simsearch.retrieval.rerank import Reranker, get_reranker

log = logging.getLogger(__name__)

TASKS = ("pairs", "classes", "checks")  # the default tasks: any encoder
OPT_IN_TASKS = ("zeroshot",)  # asked for by name only: needs an encoder with a text tower
DEFAULT_KS = (1, 5, 10, 15, 25, 50, 100)

# The research's figures (../shared/DESIGN.md), shown beside ours. Different data: labelled so.
REFERENCE_HITS = {
    "label": "research (BT R50 + triplet; TLL, 325 pairs: other data)",
    "gallery": 325,
    "hit_rate": {1: 0.157, 5: 0.323, 10: 0.403, 15: 0.468, 25: 0.566, 50: 0.683, 100: 0.825},
}
REFERENCE_PAIRS = [
    {"label": "research: MatchNet", "balanced_accuracy": 0.6087, "all_pairs_accuracy": 0.9428,
     "all_pairs": 12_115_503},
    {"label": "research: BEiT", "balanced_accuracy": 0.89, "all_pairs_accuracy": 0.8914,
     "all_pairs": 12_115_503, "confusion": {"tn": 10_759_967, "fp": 1_297_362, "fn": 18_257, "tp": 39_917}},
]

ProgressFn = Callable[[str, int, int], None]  # (stage label, done, total)


@dataclass(frozen=True)
class BenchConfig:
    data: Path
    split: str = "val"
    tasks: tuple[str, ...] = TASKS
    ks: tuple[int, ...] = DEFAULT_KS
    seed: int = 0
    # Share of val of a pair folder or of every class of <class>/<image> folders, split with `seed`;
    # None: the layout's default (datasets.DEFAULT_VAL_FRACTION). Tiny ImageNet keeps its own split.
    val_fraction: float | None = None
    balanced_pairs: int = 50_000
    all_pairs_per_class: int = 25  # Tiny ImageNet val: 25 x 200 = 5,000 images, 12,497,500 pairs
    threshold_pairs: int = 50_000  # balanced pairs of the train split the cosine threshold is chosen on
    threshold_per_class: int = 20  # train images per class those pairs are drawn from
    all_pairs_block: int = 1024
    n_boot: int = 1000
    batch_size: int = 32
    device: Device = Device.auto
    models_dir: Path | None = None
    preprocess: Preprocess | None = None  # every encoder under this policy (None: each its own)
    cache_db: Path | None = None  # None: paths.embedding_cache()
    rerankers: tuple[str, ...] = ()
    rerank_depth: int = 100  # candidates of the vector search each reranker reorders
    # A slow reranker (a CPU transformer) is measured on the largest part that fits in this budget, stated in
    # the results: the largest class-balanced subset for all pairs, as many whole pair sets for reranked hit@k.
    reranker_minutes: float = 20.0
    # zeroshot: prompts per class ({name}: its name); several are averaged per class, as CLIP does
    zeroshot_templates: tuple[str, ...] = zeroshot.DEFAULT_TEMPLATES
    zeroshot_ks: tuple[int, ...] = (1, 5)  # top-k accuracies


@dataclass
class EncoderResult:
    encoder: str
    key: str  # EncoderSpec.key: the exact weights, precision and policy measured
    dim: int
    preprocess: str
    seconds: dict[str, float] = field(default_factory=dict)
    embedded: int = 0  # images embedded in this run (0 when everything came from the cache)
    hits: dict | None = None
    pairs: dict | None = None
    checks: dict | None = None  # a trained encoder against its base (evaluation/generalisation.py)
    zeroshot: dict | None = None  # top-k accuracy of classification by text prompts (evaluation/zeroshot.py)


class Embedder:
    """Vectors of benchmark images for one encoder (the shared cache), with a progress label per set."""

    def __init__(self, spec: EncoderSpec, store: Store, config: BenchConfig, progress: ProgressFn | None):
        self.spec = spec
        self.cached = CachedEmbedder(OnnxEncoder(spec, config.device, config.models_dir), store,
                                     IndexerConfig(batch_size=config.batch_size))
        self.progress = progress

    @property
    def embedded(self) -> int:
        return self.cached.embedded

    def __call__(self, paths: list[Path], label: str) -> np.ndarray:
        """(len(paths), dim) L2-normalised vectors."""
        on_progress = (lambda done, total: self.progress(f"{self.spec.name}: {label}", done, total)) if self.progress else None
        return self.cached(paths, on_progress)


def hit_at_k(ranks: np.ndarray, gallery: int, config: BenchConfig, ks: tuple[int, ...] | None = None) -> dict:
    """hit@k for k in ks (None: config.ks) with bootstrap intervals, from 0-based ranks in a gallery."""
    rows = metrics.hit_rates_with_ci(ranks, ks or config.ks, n_boot=config.n_boot, seed=config.seed)
    return {
        "queries": int(len(ranks)),
        "gallery": gallery,
        "mean_rank": float(ranks.mean() + 1),
        "rows": [{**asdict(r), "chance": min(1.0, r.k / gallery)} for r in rows],
    }


def pair_set_ranks(vectors: np.ndarray, sets: list[datasets.PairSet]) -> np.ndarray:
    """0-based rank of each left image's partner among the rights of its own set: (sets * C,)."""
    return np.concatenate([
        metrics.hit_ranks(vectors[s.left_idx], vectors[s.right_idx], np.arange(len(s.right_idx))) for s in sets
    ])


def train_threshold(score_pairs: Callable[[list[Path], np.ndarray, np.ndarray], np.ndarray], config: BenchConfig) -> dict:
    """The decision threshold for "same class", chosen on the train split (best balanced accuracy), then frozen.

    score_pairs(paths, i, j): the scores of pairs (paths[i], paths[j]) (cosine, or a reranker's P(same)). The
    train split comes from the same val_fraction and seed as the measured split, so the two never share an image.
    """
    try:
        train = datasets.load_class_dataset(config.data, "train", config.val_fraction, config.seed)
    except DatasetError as e:
        # e.g. --val-fraction 1 leaves a class folder no train images; say why train is needed at all
        raise DatasetError(f"{e}; the classes task chooses its threshold on the train split "
                           f"(--task pairs needs none)") from None
    subset = datasets.class_balanced_subset(train.labels, config.threshold_per_class, config.seed)
    i, j, same = datasets.balanced_pairs(train.labels[subset], config.threshold_pairs, config.seed)
    scores = score_pairs([train.paths[k] for k in subset], i, j)
    threshold = metrics.best_threshold(scores, same)
    train_cm = metrics.confusion(scores, same, threshold)
    return {"threshold": float(threshold), "chosen_on": f"train: {len(subset)} images, {len(i)} balanced pairs",
            "train_balanced_accuracy": train_cm.balanced_accuracy}


def pair_accuracy(vectors: np.ndarray, labels: np.ndarray, threshold: float, config: BenchConfig) -> dict:
    """Balanced-set and all-pairs same/different figures at a frozen threshold."""
    i, j, same = datasets.balanced_pairs(labels, config.balanced_pairs, config.seed)
    scores = np.einsum("nd,nd->n", vectors[i], vectors[j])  # cosine of each pair
    fpr, tpr, _ = metrics.roc_curve(scores, same)
    balanced = {"pairs": int(len(i)), **metrics.confusion(scores, same, threshold).to_dict(),
                "roc_auc": metrics.roc_auc(scores, same), "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()}}

    subset = datasets.class_balanced_subset(labels, config.all_pairs_per_class, config.seed)
    t = time.perf_counter()
    tracemalloc.start()
    hist = metrics.all_pairs(vectors[subset], labels[subset], threshold, block=config.all_pairs_block)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    fpr, tpr, _ = hist.roc_curve()
    n = len(subset)
    everything = {"images": n, "per_class": config.all_pairs_per_class, "pairs": n * (n - 1) // 2,
                  **hist.confusion.to_dict(), "roc_auc": hist.auc(), "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
                  "seconds": time.perf_counter() - t, "peak_memory_bytes": int(peak), "block": config.all_pairs_block}
    return {"balanced": balanced, "all_pairs": everything}


def zero_shot(vectors: np.ndarray, ds: datasets.LabeledImages, spec: EncoderSpec, config: BenchConfig) -> dict:
    """Top-k accuracy of classifying the split's images (vectors (N, dim)) by their nearest class prompt."""
    names = zeroshot.class_names(config.data, ds.classes)
    classes = zeroshot.class_vectors(names, config.zeroshot_templates, TextEncoder(spec, config.device).embed)
    ranks = zeroshot.class_ranks(vectors, ds.labels, classes)
    # "queries" are the images, the "gallery" the classes
    return {**hit_at_k(ranks, len(names), config, config.zeroshot_ks),
            "templates": list(config.zeroshot_templates), "class_names": names}


def bench_spec(name: str, config: BenchConfig) -> EncoderSpec:
    """The encoder `name` as the bench measures it: under config.preprocess when one is given."""
    return get_encoder(name, config.models_dir).with_preprocess(config.preprocess)


def run_encoder(name: str, config: BenchConfig, store: Store, progress: ProgressFn | None = None) -> EncoderResult:
    spec = bench_spec(name, config)
    embed = Embedder(spec, store, config, progress)
    result = EncoderResult(encoder=spec.name, key=spec.key, dim=spec.dim, preprocess=spec.preprocess.value)
    layout = datasets.detect_layout(config.data)
    t = time.perf_counter()
    if layout == "pairs":
        if "classes" in config.tasks or "zeroshot" in config.tasks:
            raise DatasetError(f"{config.data}: a pair folder has no classes; use --task pairs")
        pairs = datasets.load_pair_folder(config.data, config.split, config.val_fraction, config.seed)
        left, right = embed(pairs.left, f"{config.split} left"), embed(pairs.right, f"{config.split} right")
        result.seconds["embed"] = time.perf_counter() - t
        t = time.perf_counter()
        ranks = metrics.hit_ranks(left, right, np.arange(len(pairs.right)))
        result.hits = {**hit_at_k(ranks, len(pairs.right), config), "sets": 1}
        result.seconds["hits"] = time.perf_counter() - t
    else:
        ds = datasets.load_class_dataset(config.data, config.split, config.val_fraction, config.seed)
        def cosines(paths: list[Path], i: np.ndarray, j: np.ndarray) -> np.ndarray:
            vecs = embed(paths, "train subset (threshold)")
            return np.einsum("nd,nd->n", vecs[i], vecs[j])

        # the threshold first: a split without train images fails before the measured split is embedded
        threshold = train_threshold(cosines, config) if "classes" in config.tasks else None
        vectors = embed(ds.paths, config.split)
        result.seconds["embed"] = time.perf_counter() - t
        if "pairs" in config.tasks:
            t = time.perf_counter()
            sets = datasets.make_pair_sets(ds.labels, config.seed)
            if not sets:
                raise DatasetError(f"{config.data} ({config.split}): every class needs 2 images to make pair sets")
            result.hits = {**hit_at_k(pair_set_ranks(vectors, sets), len(sets[0].right_idx), config), "sets": len(sets)}
            result.seconds["hits"] = time.perf_counter() - t
        if threshold is not None:
            t = time.perf_counter()
            result.pairs = {**threshold, **pair_accuracy(vectors, ds.labels, threshold["threshold"], config)}
            result.seconds["pairs"] = time.perf_counter() - t
        if "zeroshot" in config.tasks:
            t = time.perf_counter()
            result.zeroshot = zero_shot(vectors, ds, spec, config)
            result.seconds["zeroshot"] = time.perf_counter() - t
    result.embedded = embed.embedded
    return result


def rerank_set(vectors: np.ndarray, reps: np.ndarray, s: datasets.PairSet, reranker: Reranker,
               depth: int) -> tuple[np.ndarray, np.ndarray]:
    """One pair set as `simsearch query --rerank` answers it: each left image's top `depth` rights by cosine,
    reordered by `Reranker.rerank` (the code `Searcher.rerank` runs). vectors (N, dim) and reps (N, ...) are
    the encoder's vectors and the reranker's representations of every image of the split.

    -> (C,) each left's partner's rank in the vector search (the partner of left q is right q), and
    (C, min(depth, C)) each left's reranked candidates, best first, as indices into the set's rights.
    """
    c = metrics.pair_set_candidates(vectors[s.left_idx], vectors[s.right_idx], depth)
    rights = reps[s.right_idx]  # (C, ...)
    reranked = [c.top[q][reranker.rerank(reps[left], rights[c.top[q]], c.cosines[q])[0]]
                for q, left in enumerate(s.left_idx)]
    return c.rank, np.stack(reranked)


def rerank_ranks(vectors: np.ndarray, reps: np.ndarray, sets: list[datasets.PairSet], reranker: Reranker,
                 depth: int, budget_seconds: float = float("inf"),
                 on_progress=None) -> tuple[np.ndarray, np.ndarray, int]:
    """Partner ranks before and after reranking the top `depth` of each query's vector ranking: (Q,), (Q,),
    and the number of pair sets measured: whole sets, as many as fit in budget_seconds (at least one).

    A partner outside the top `depth` keeps its vector rank (the reranker never sees it).
    """
    before, after = [], []
    t0, n_sets = time.perf_counter(), 0
    for s in sets:
        if n_sets and (time.perf_counter() - t0) / n_sets * (n_sets + 1) > budget_seconds:
            break  # the next set would overrun the budget
        n_sets += 1
        ranks, reranked = rerank_set(vectors, reps, s, reranker, depth)
        for q, rank in enumerate(ranks.tolist()):
            before.append(rank)
            hit = np.flatnonzero(reranked[q] == q)
            after.append(int(hit[0]) if hit.size else rank)
        if on_progress:
            on_progress(n_sets, len(sets))
    return np.asarray(before), np.asarray(after), n_sets


def run_reranker(name: str, search_encoder: str, config: BenchConfig, embed_for,
                 progress: ProgressFn | None = None) -> dict:
    """One reranker: pair accuracy (P(same) at a threshold chosen on train, as for the encoders' cosine) and hit@k
    after reranking the encoder's top `rerank_depth`."""
    reranker = Reranker(get_reranker(name, config.models_dir), config.device)
    if datasets.detect_layout(config.data) == "pairs":
        raise DatasetError(f"{config.data}: rerankers are benchmarked on a class dataset")
    ds = datasets.load_class_dataset(config.data, config.split, config.val_fraction, config.seed)
    t = time.perf_counter()
    def stage(label: str):
        return (lambda done, total: progress(f"{name}: {label}", done, total)) if progress else None

    # every image's representation once (the encoder's cached embeddings or its pixels), reused in every pair
    reps = reranker.represent_images(ds.paths, lambda: embed_for(reranker.spec.encoder)(ds.paths, "reranker input"),
                                     on_progress=stage("tower of every image"))
    vectors = embed_for(search_encoder)(ds.paths, config.split)
    entry = {"encoder": f"{search_encoder} + {name}@{config.rerank_depth}", "kind": "reranker", "reranker": name,
             "key": name, "card": reranker.spec.card.onnx_sha256, "embedded": 0,
             "seconds": {"inputs": time.perf_counter() - t}, "hits": None, "pairs": None}
    if "pairs" in config.tasks:
        t = time.perf_counter()
        sets = datasets.make_pair_sets(ds.labels, config.seed)
        before, after, n_sets = rerank_ranks(vectors, reps, sets, reranker, config.rerank_depth,
                                             60 * config.reranker_minutes,
                                             stage(f"reranking the top {config.rerank_depth} (pair sets)"))
        gallery = len(sets[0].right_idx)
        # "before" is the encoder alone on the same queries, so the two are paired.
        entry["hits"] = {**hit_at_k(after, gallery, config), "sets": n_sets, "sets_available": len(sets),
                         "before": hit_at_k(before, gallery, config)}
        entry["seconds"]["hits"] = time.perf_counter() - t
        entry["latency_per_query_ms"] = 1e3 * entry["seconds"]["hits"] / len(after)
    if "classes" in config.tasks:
        def probabilities(paths: list[Path], i: np.ndarray, j: np.ndarray) -> np.ndarray:
            train_reps = reranker.represent_images(
                paths, lambda: embed_for(reranker.spec.encoder)(paths, "train subset (threshold)"))
            return reranker.score(train_reps[i], train_reps[j])

        # A reranker trained listwise ranks well but its P(same) is not calibrated at 0.5: its threshold is chosen
        # on train like the cosine's.
        threshold = train_threshold(probabilities, config)
        t = time.perf_counter()
        i, j, same = datasets.balanced_pairs(ds.labels, config.balanced_pairs, config.seed)
        probs = reranker.score(reps[i], reps[j])
        per_second = len(i) / (time.perf_counter() - t)
        fpr, tpr, _ = metrics.roc_curve(probs, same)
        balanced = {"pairs": int(len(i)), **metrics.confusion(probs, same, threshold["threshold"]).to_dict(),
                    "roc_auc": metrics.roc_auc(probs, same), "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
                    "pairs_per_second": per_second}
        per_class = config.all_pairs_per_class
        n_classes = len(np.unique(ds.labels))
        budget = per_second * 60 * config.reranker_minutes
        while per_class > 2 and (per_class * n_classes) ** 2 / 2 > budget:
            per_class -= 1
        subset = datasets.class_balanced_subset(ds.labels, per_class, config.seed)
        t = time.perf_counter()
        tracemalloc.start()
        bs = reps[subset]  # (n, ...) representations of the subset, gathered once
        hist = metrics.all_pairs_scored(len(subset), ds.labels[subset],
                                        lambda r, c: reranker.score_block(bs[r], bs[c]), threshold["threshold"],
                                        block=16, bins_range=(0.0, 1.0), on_progress=stage("all pairs (rows)"))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        fpr, tpr, _ = hist.roc_curve()
        n = len(subset)
        entry["pairs"] = {**threshold, "balanced": balanced,
                          "all_pairs": {"images": n, "per_class": per_class, "pairs": n * (n - 1) // 2,
                                        **hist.confusion.to_dict(), "roc_auc": hist.auc(),
                                        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
                                        "seconds": time.perf_counter() - t, "peak_memory_bytes": int(peak),
                                        "block": 16, "reduced_from_per_class": config.all_pairs_per_class}}
    return entry


def run_checks(spec: EncoderSpec, config: BenchConfig, embed_for) -> dict | None:
    """A trained encoder against its base on what its card says it was trained on: in-domain, unseen classes
    (the ones its training left out), near-duplicates; None for a built-in encoder or when its training data
    is not here (logged)."""
    from simsearch.encoders.cards import Card

    if not spec.trained:
        return None
    card = Card.load(Path(spec.card), "encoder")
    data = Path(card.data)
    if not data.is_dir():
        log.warning("%s: no checks against its base: its training data %s is not here", spec.name, data)
        return None
    unseen = card.validation.get("checks", {}).get("unseen_classes", [])
    return {"data": str(data),
            **generalisation.against_base(data, card.split, unseen, lambda paths: embed_for(spec.name)(paths, "checks"),
                                          lambda paths: embed_for(card.base)(paths, "checks (base)"),
                                          shared_data() / "imagenet-samples")}


def run(config: BenchConfig, encoders: list[str], progress: ProgressFn | None = None) -> dict:
    """Every figure for every encoder, with the exact protocol, as one JSON-ready dict."""
    unknown = [t for t in config.tasks if t not in TASKS + OPT_IN_TASKS]
    if unknown:
        raise DatasetError(f"unknown task {unknown[0]!r} (tasks: {', '.join(TASKS + OPT_IN_TASKS)})")
    for name in encoders:  # fail on a typo, or on an encoder that cannot do a task, before any work
        spec = get_encoder(name, config.models_dir)
        if "zeroshot" in config.tasks and not spec.has_text:
            raise ModelError(f"encoder {name} has no text tower: --task zeroshot needs a CLIP encoder (docs/clip.md)")
    for name in config.rerankers:
        get_reranker(name, config.models_dir)
    t0 = time.perf_counter()
    with Store(config.cache_db or embedding_cache(), create=True) as store:
        embedders: dict[str, Embedder] = {}

        def embed_for(name: str) -> Embedder:
            if name not in embedders:
                embedders[name] = Embedder(bench_spec(name, config), store, config, progress)
            return embedders[name]

        results = []
        for name in encoders:
            result = run_encoder(name, config, store, progress)
            if "checks" in config.tasks:
                result.checks = run_checks(bench_spec(name, config), config, embed_for)
            results.append(asdict(result))

        results += [run_reranker(name, encoders[0], config, embed_for, progress) for name in config.rerankers]
    return {
        "protocol": protocol(config),
        "encoders": results,
        "reference": {"hits": REFERENCE_HITS, "pairs": REFERENCE_PAIRS},
        "wall_seconds": time.perf_counter() - t0,
    }


def protocol(config: BenchConfig) -> dict:
    from simsearch import __version__

    layout = datasets.detect_layout(config.data)
    out = {
        "dataset": item_path(config.data), "layout": layout, "split": config.split,
        "tasks": list(config.tasks), "seed": config.seed, "ks": list(config.ks), "bootstrap": config.n_boot,
        "simsearch": __version__, "git_commit": _git_commit(),
    }
    if layout == "pairs":
        out["pair_sets"] = "each left image ranked against all right images of the split"
        out["split_manifest"] = datasets.load_pair_folder(config.data, config.split, config.val_fraction,
                                                          config.seed).split_manifest()
    else:
        if layout == "classes":
            out["val_fraction"] = datasets.val_fraction_of(layout, config.val_fraction)
        out["pair_sets"] = ("per class, the split's images shuffled with the seed; set s pairs image 2s (left) "
                            "with 2s+1 (right) of every class; each left ranked against its set's rights")
        out["balanced_pairs"] = config.balanced_pairs
        out["all_pairs_per_class"] = config.all_pairs_per_class
        out["threshold"] = (f"cosine threshold with best balanced accuracy on {config.threshold_pairs} balanced pairs "
                            f"of {config.threshold_per_class} train images per class, then frozen")
        if "zeroshot" in config.tasks:
            out["zeroshot"] = (f"each image of the split ranks every class by the cosine of its vector to the class's "
                               f"text vector (the mean of its prompts {list(config.zeroshot_templates)}, renormalised); "
                               f"class names: the first synonym in {zeroshot.WORDS_FILE} where the dataset has one, "
                               f"else the folder name with _ and - as spaces; top-k: true class ranked < k")
    return out


def _git_commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
