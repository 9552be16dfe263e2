"""One rerank path: `simsearch bench --reranker` reorders a query's candidates with the code `simsearch query
--rerank` runs, for both kinds of reranker input (stored encoder embeddings, pixels). Tiny MatchNets trained
here on real Tiny ImageNet photos."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from simsearch.benchmarks import harness
from simsearch.evaluation import datasets
from simsearch.indexer.pipeline import Indexer
from simsearch.indexer.store import Store
from simsearch.retrieval.backend import refresh
from simsearch.retrieval.rerank import Reranker, get_reranker, pixels
from simsearch.retrieval.search import Searcher
from simsearch.training.matchnet import MatchNetConfig, train_matchnet


@pytest.fixture(scope="module", params=["pretrained", "scratch"])
def reranker(request, classes, models_dir) -> Reranker:
    """pretrained: a tower on efficientnet-lite0 embeddings (input "encoder"); scratch: on 64 px pixels."""
    name = f"path-{request.param}"
    train_matchnet(MatchNetConfig(name=name, tower=request.param, data=classes, pairs_per_epoch=640, epochs=1,
                                  holdout_per_class=2, lr=1e-3), models_dir)
    return Reranker(get_reranker(name, models_dir))


@pytest.fixture(scope="module")
def bench_inputs(reranker, classes, encoder, tmp_path_factory):
    """What `run_reranker` gives `rerank_set`: the train split, its pair sets, every image's vector and
    representation (through the bench's embedding cache)."""
    ds = datasets.load_class_dataset(classes, "train")
    with Store(tmp_path_factory.mktemp("bench") / "cache", create=True) as store:
        embed = harness.Embedder(encoder.spec, store, harness.BenchConfig(data=classes), None)
        vectors = embed(ds.paths, "train")
        assert reranker.spec.input == "pixels" or reranker.spec.encoder == encoder.spec.name
        reps = reranker.represent_images(ds.paths, lambda: embed(ds.paths, "reranker input"))
    return ds, datasets.make_pair_sets(ds.labels, seed=0), vectors, reps


@pytest.mark.parametrize("depth", [3, 8])  # fewer candidates than the set's 8 rights, and all of them
def test_the_bench_reranks_a_query_as_searcher_query_does(reranker, bench_inputs, encoder, tmp_path, depth):
    ds, sets, vectors, reps = bench_inputs
    s = sets[0]
    _, reranked = harness.rerank_set(vectors, reps, s, reranker, depth)  # (8, depth) indices into the rights
    # a db of exactly the set's right images: `query` searches the same gallery the bench ranks
    folder = tmp_path / "rights"
    folder.mkdir()
    for i in s.right_idx:
        shutil.copy2(ds.paths[i], folder / ds.paths[i].name)
    with Store(tmp_path / "db", create=True) as store:
        Indexer(encoder, store).run(folder)
        refresh(store, encoder.spec.name)
    lefts = [ds.paths[i] for i in s.left_idx]
    with Searcher.open(tmp_path / "db", encoder) as searcher:
        results = searcher.query(lefts, k=depth, reranker=reranker, depth=depth)
        plain = searcher.query(lefts, k=depth)
    for q, result in enumerate(results):
        assert [Path(h.path).name for h in result.hits] == [ds.paths[s.right_idx[j]].name for j in reranked[q]]
    # and the reranker does reorder: the comparison is not between two copies of the vector order
    assert any([h.path for h in r.hits] != [h.path for h in p.hits] for r, p in zip(results, plain))


def test_rerank_sorts_by_the_fused_score_then_vector_score(reranker, bench_inputs):
    from simsearch.retrieval.rerank import fuse, logit

    _, _, vectors, reps = bench_inputs
    query, cands = reps[0], reps[1:]
    vector_scores = vectors[1:] @ vectors[0]  # (N - 1,)
    order, probs = reranker.rerank(query, cands, vector_scores)
    np.testing.assert_array_equal(probs, reranker.score_block(reps[:1], cands)[0])  # every pair scored once
    # the card's weight: chosen on held-out data for the listwise one, 0 (P(same) alone) for the pair classifier
    weight = reranker.spec.fusion_weight
    fused = fuse(logit(probs), vector_scores, weight)
    assert order.tolist() == sorted(range(len(cands)), key=lambda i: (-fused[i], -vector_scores[i]))


def test_represent_images_reads_what_the_reranker_was_trained_on(reranker, classes):
    paths = sorted(classes.rglob("*.JPEG"))[:7]
    if reranker.spec.input == "encoder":
        # the caller's stored embeddings, and no image read: these files do not even exist
        emb = np.random.default_rng(0).normal(size=(7, 1280)).astype(np.float32)
        got = reranker.represent_images([p.with_name("gone.JPEG") for p in paths], lambda: emb)
        np.testing.assert_array_equal(got, reranker.represent(emb))
    else:
        seen = []  # decoded 3 at a time: memory bounded however many candidates
        got = reranker.represent_images(paths, lambda: pytest.fail("a pixel reranker reads no embedding"), block=3,
                                        on_progress=lambda done, total: seen.append((done, total)))
        assert seen == [(3, 7), (6, 7), (7, 7)]
        np.testing.assert_array_equal(got, reranker.represent(pixels(paths, reranker.spec.image_size)))
    # the bottleneck, after the embedding itself for the pretrained tower (the metric reads its cosine)
    assert got.shape == (7, 256 + (1280 if reranker.spec.input == "encoder" else 0))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads the open files from /proc")
def test_a_searcher_closes_its_store(classes, encoder, tmp_path):
    def open_db_files() -> list[str]:
        return [t for t in (os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                            if os.path.islink(f"/proc/self/fd/{fd}")) if t.startswith(str(tmp_path / "db"))]

    with Store(tmp_path / "db", create=True) as store:
        Indexer(encoder, store).run(next(classes.iterdir()))
        refresh(store, encoder.spec.name)
    with Searcher.open(tmp_path / "db", encoder) as searcher:
        assert open_db_files()  # the LMDB environment
    assert not open_db_files()
    searcher = Searcher.open(tmp_path / "db", encoder)
    searcher.close()
    assert not open_db_files()
