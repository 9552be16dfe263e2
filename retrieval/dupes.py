"""Groups of duplicate images over a whole db, in tiers: exact copies, verified edited copies, and (asked for)
images that are only similar. Never an N x N matrix.

    groups = find_duplicates(store, encoder)                     # exact + edited copies
    groups = find_duplicates(store, encoder, similar=True)       # + the similar tier (cosine >= threshold)

Two stages.

1. **Candidates** (`find_candidates`): pairs that may be copies, found two ways, both bounded per image.
   - The db's own index (retrieval/backend.py, any backend): every stored vector is a query, read in blocks; its
     `candidate_k` nearest neighbours at cosine >= `candidate_threshold` (a threshold set for recall, far below
     the similar tier's: a thumbnail or a framed screenshot of a photo scores as low as 0.3-0.5 with it).
   - The perceptual hashes stored at index time (indexer/phash.py): pairs whose whole-frame or content-box hashes,
     direct or mirrored, differ in at most `hash_bits` bits. Found by pigeonhole: a pair that close shares at
     least one of the four 16-bit quarters exactly when within 3 bits, and almost always when within 10, so only
     pairs that share a quarter are compared (buckets larger than MAX_BUCKET are skipped, and logged).
   Same content (sha256) or the same pixels (the hashes' pixel digest) makes an exact pair at once.
2. **Verification** (`verify_pairs`, retrieval/verify.py): each candidate pair is checked by local features
   (SIFT) and one affine map (RANSAC), with the pixels compared over the overlap after warping, or by the two
   whole frames' correlation; the first catches crops, frames, borders, captions, rotations, aspect changes and
   overlays, the second thumbnails, recompressions, colour filters and grey or mirrored copies. Only verified
   pairs join "edited" groups. Features are computed only for images in some candidate pair, in parallel, and
   cached in the db by content when the store is open for writing (a second run reads them back).

Groups are the connected components of the accepted pairs, joined tier by tier (exact, then edited, then
similar), so a group's tier is its weakest link and each member's tier is the weakest link on its best path to
the keeper. The keeper is the image verification found made from others the fewest times (net of the times others were found
made from it: a crop of it, it with a frame, border or caption added), then the one with the most pixels, then the
largest file: the original, not a screenshot of it. Nothing is deleted.

Memory: the index, one block of vectors, 8+32 bytes of ids and content per image, 40 bytes of hashes per image,
the candidate pairs (bounded by candidate_k per image plus the hash pairs) and the features of CACHE_IMAGES
images at most. Time at scale: the index pass (as before), the hash pass (numpy), and verification, which grows
with the candidate pairs, not with N x N.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from simsearch.devices import Device
from simsearch.encoders.registry import is_builtin
from simsearch.encoders.runtime import cpu_count
from simsearch.encoders.spec import INT8_SUFFIX
from simsearch.errors import ImageLoadError, SimsearchError
from simsearch.indexer.images import header_size, load_rgb
from simsearch.indexer.lock import writer_active
from simsearch.indexer.phash import DECODE_SIDE, Hashes, hamming, hashes_of, mirrored
from simsearch.indexer.store import Store
from simsearch.retrieval.backend import Progress, VectorIndex, open_index, require_vectors
from simsearch.retrieval.verify import Features, VerifyConfig, Verdict, features_of, verify

log = logging.getLogger(__name__)

# The similar tier's cosine, calibrated for the built-in encoders (`python -m simsearch.benchmarks dupes`, issue
# 15): on held-out imagenet-samples photos, the highest threshold whose groups reach precision and recall 0.95 on
# mild copies. It only groups what verification does not: bursts, retakes, photos merely alike.
DEFAULT_THRESHOLD = 0.86
# Candidates: chosen on the tune half of `python -m simsearch.benchmarks dupes` (docs/explain-dupes.md) as the
# cheapest setting whose verified groups meet every edit's recall target there.
CANDIDATE_THRESHOLD = 0.7
CANDIDATE_K = 4
HASH_BITS = 10
FIRST_K = 16  # neighbours asked per vector at first for the similar tier (the vector itself is one of them)
MAX_NEIGHBOURS = 4096  # a vector's neighbour list is not widened past this
MAX_BUCKET = 4096  # hash buckets larger than this are not searched (a flat colour's hash, shared by thousands)
BLOCK_BYTES = 16 << 20  # vectors searched per block: 16 MiB of float32
PAIR_CHUNK = 2048  # candidate pairs verified per chunk (their features loaded together)
CACHE_IMAGES = 2 * PAIR_CHUNK  # features kept in memory at most (a chunk's pairs name up to 2 x PAIR_CHUNK images)
FLOAT_SLACK = 1e-6
TIERS = ("exact", "edited", "similar")  # strongest first


@dataclass(frozen=True)
class DupesConfig:
    """What `find_duplicates` looks for, and how hard."""

    similar: bool = False  # add the similar tier: pairs at cosine >= threshold that verification did not confirm
    threshold: float | None = None  # the similar tier's cosine; None: DEFAULT_THRESHOLD
    candidate_threshold: float = CANDIDATE_THRESHOLD
    candidate_k: int = CANDIDATE_K
    hash_bits: int = HASH_BITS
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    workers: int = 0  # threads that decode, describe and verify; 0: one per core
    block: int | None = None  # vectors per index search (default: BLOCK_BYTES of them)


@dataclass(frozen=True)
class DupeItem:
    id: int
    path: str  # may hold surrogate escapes, as Hit.path
    width: int  # from the file's header; 0, 0 when the file is gone or unreadable
    height: int
    bytes: int  # the file's size when it was indexed
    score: float = 1.0  # cosine to the group's keeper (1.0 for the keeper)
    tier: str = "keeper"  # how it is a duplicate of the keeper: exact | edited | similar ("keeper" for the keeper)


@dataclass(frozen=True)
class DupeGroup:
    keeper: DupeItem  # most content pixels, then largest file size, then the lowest id
    others: list[DupeItem]  # strongest tier first, then by descending similarity to the keeper
    min_score: float  # the smallest cosine of a pair that joined the group
    tier: str = "similar"  # its weakest link: exact | edited | similar


@dataclass
class Candidates:
    """Stage 1's pairs (id arrays, lo < hi, each pair once), with what each needs."""

    exact: tuple[np.ndarray, np.ndarray]  # same content or same pixels: no verification needed
    pairs: tuple[np.ndarray, np.ndarray]  # to verify
    from_hash: np.ndarray  # (P,) bool: the pair was proposed by the hashes (else: by the index only)
    similar: tuple[np.ndarray, np.ndarray, np.ndarray]  # (a, b, cosine) at or above the similar threshold (if asked)
    items: int = 0  # images considered
    stats: dict = field(default_factory=dict)


def find_duplicates(store: Store, encoder: str, threshold: float | None = None, *, similar: bool | None = None,
                    config: DupesConfig = DupesConfig(), on_progress: Progress | None = None,
                    block: int | None = None) -> list[DupeGroup]:
    """Duplicate groups of the db's images (by `encoder`'s vectors and index), largest first, then by keeper path.

    threshold: the similar tier's cosine (None: DEFAULT_THRESHOLD, calibrated for the built-in EfficientNet-Lite
    encoders); similar: add that tier (None: when a threshold is given). `config` says the rest.
    """
    if threshold is not None:
        config = replace(config, threshold=float(threshold))
    if similar is None:
        similar = config.similar or threshold is not None
    config = replace(config, similar=similar, block=block or config.block)
    t0 = time.perf_counter()
    cands = find_candidates(store, encoder, config, on_progress)
    t1 = time.perf_counter()
    verdicts = verify_pairs(store, cands.pairs, config, on_progress)
    t2 = time.perf_counter()
    accepted = np.array([config.verify.accepts(v) for v in verdicts], dtype=bool)
    groups = group(store, encoder, cands, accepted, on_progress, [v.derived for v in verdicts])
    log.info("duplicates: candidates %.1f s (%s), verification %.1f s, groups %.1f s", t1 - t0,
             ", ".join(f"{k} {v:.1f} s" for k, v in cands.stats.get("seconds", {}).items()), t2 - t1,
             time.perf_counter() - t2)
    return groups


def _similar_threshold(config: DupesConfig, encoder: str) -> float:
    if config.threshold is None and config.similar and not is_builtin(encoder.removesuffix(INT8_SUFFIX)):
        log.warning("the default threshold %.2f was calibrated on the built-in encoders; %s's cosines are on another "
                    "scale (a CLIP model's especially): pass --threshold", DEFAULT_THRESHOLD, encoder)
    t = DEFAULT_THRESHOLD if config.threshold is None else float(config.threshold)
    if not 0.0 < t <= 1.0:
        raise SimsearchError(f"the threshold is a cosine in (0, 1] (got {t:g})")
    return t


# -- stage 1: candidates ---------------------------------------------------------------------------------------

def find_candidates(store: Store, encoder: str, config: DupesConfig = DupesConfig(),
                    on_progress: Progress | None = None) -> Candidates:
    """Exact pairs, pairs to verify (index neighbours and hash neighbours), and similar-tier pairs if asked."""
    sim_cut = _similar_threshold(config, encoder) - FLOAT_SLACK if config.similar else None
    if not 0.0 < config.candidate_threshold <= 1.0:
        raise SimsearchError(f"the candidate threshold is a cosine in (0, 1] (got {config.candidate_threshold:g})")
    # One pass of queries on the CPU: a GPU copy of the index would cost more to make than the one pass saves.
    clock = [time.perf_counter()]
    seconds = {}

    def lap(stage: str) -> None:
        clock.append(time.perf_counter())
        seconds[stage] = clock[-1] - clock[-2]

    index, entry = open_index(store, encoder, Device.cpu)
    try:
        require_vectors(index, encoder, store)
        if not entry.up_to_date(store.generation) and not writer_active(store.root):
            log.warning("the index of %s is older than the db: images added since are compared with the indexed "
                        "ones only; re-run `simsearch index` first for complete groups", encoder)
        rows = config.block or max(256, BLOCK_BYTES // (4 * entry.dim))
        near, sim, live = _neighbour_pairs(store, index, entry.key, entry.dim, config, sim_cut, rows, on_progress)
    finally:
        index.close()  # e.g. Milvus Lite serves one process per file
    lap("index")
    ids, content = _contents(store, live)
    hashes = _hashes(store, ids, content, on_progress)
    lap("hashes read")
    exact = _exact_pairs(ids, content, hashes[2])
    by_hash = _hash_pairs(ids, hashes, config.hash_bits)
    lap("hash pairs")
    near = _only_between(near, live)
    a = np.concatenate([near[0], by_hash[0]])
    b = np.concatenate([near[1], by_hash[1]])
    source = np.concatenate([np.zeros(len(near[0]), bool), np.ones(len(by_hash[0]), bool)])
    a, b, source = _unique_pairs(a, b, source)
    known = _pair_keys(*exact)
    keep = ~np.isin(_pair_keys(a, b), known)  # exact pairs need no verification
    stats = {"index_pairs": int(len(near[0])), "hash_pairs": int(len(by_hash[0])), "exact_pairs": int(len(exact[0])),
             "pairs_to_verify": int(keep.sum()), "seconds": seconds}
    log.info("%d images: %d exact pairs, %d candidate pairs to verify (%d from the index, %d from the hashes)",
             len(ids), stats["exact_pairs"], stats["pairs_to_verify"], stats["index_pairs"], stats["hash_pairs"])
    return Candidates(exact, (a[keep], b[keep]), source[keep], _only_between(sim, live) if sim else
                      (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)), len(ids), stats)


def _neighbour_pairs(store: Store, index: VectorIndex, key: str, dim: int, config: DupesConfig,
                     sim_cut: float | None, rows: int, on_progress: Progress | None):
    """((a, b) candidate pairs from the index, each once), (a, b, cosine) similar-tier pairs or None, and every id
    queried (N,)."""
    total, done = index.ntotal, 0  # read once: a Milvus collection counts on the server
    found, similar, queried = [], [], []
    widened = 0
    for ids, vecs in store.iter_vector_blocks(key, dim, rows):  # (n,), (n, dim)
        k = min(max(config.candidate_k + 1, FIRST_K if sim_cut is not None else 0), total)
        scores, nbrs = index.search(vecs, k)  # (n, k), (n, k), best first
        ok = (nbrs >= 0) & (nbrs != ids[:, None])
        rank = np.cumsum(ok, axis=1)  # a neighbour's place among the others (the vector itself left out)
        r, c = np.nonzero(ok & (scores >= config.candidate_threshold) & (rank <= config.candidate_k))
        found.append((ids[r], nbrs[r, c].astype(np.int64)))
        if sim_cut is not None:
            a, b, s, capped = _similar(index, total, ids, vecs, scores, nbrs, k, sim_cut)
            widened += capped
            similar.append((a, b, s))
        queried.append(ids)
        done += len(ids)
        if on_progress:
            on_progress("finding candidates", done, max(total, done))
    if widened:
        log.warning("%d images have over %d neighbours above the threshold %g: groups that large are joined through "
                    "them anyway, but raise the threshold for meaningful ones", widened, MAX_NEIGHBOURS, sim_cut)
    if not queried:
        raise SimsearchError(f"the db at {store.root} holds no vectors of this encoder: run `simsearch index FOLDER`")
    a, b = (np.concatenate(x) for x in zip(*found))
    a, b, _ = _unique_pairs(a, b, np.zeros(len(a), bool))
    sim = None
    if sim_cut is not None:
        sa, sb, ss = (np.concatenate(x) for x in zip(*similar))
        lo, hi = np.minimum(sa, sb), np.maximum(sa, sb)
        order = np.lexsort((-ss, hi, lo))  # each pair once: its best score (equal unless sq8 re-scored one side)
        lo, hi, ss = lo[order], hi[order], ss[order]
        first = np.ones(len(lo), dtype=bool)
        first[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
        sim = lo[first], hi[first], ss[first]
    return (a, b), sim, np.concatenate(queried)


def _similar(index: VectorIndex, ntotal: int, ids: np.ndarray, vecs: np.ndarray, scores: np.ndarray,
             nbrs: np.ndarray, k: int, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(query id, neighbour id, score) of every neighbour above the threshold for this block, widening k for the
    rows whose list is still above it at its end; and how many rows hit MAX_NEIGHBOURS."""
    a, b, s = [], [], []
    capped = 0
    while len(ids):
        keep = (scores >= threshold) & (nbrs >= 0) & (nbrs != ids[:, None])
        rows, cols = np.nonzero(keep)
        full = (scores[:, -1] >= threshold) & (nbrs[:, -1] >= 0) & (k < ntotal)
        if k >= MAX_NEIGHBOURS:
            capped += int(full.sum())
            full[:] = False
        rows, cols = rows[~full[rows]], cols[~full[rows]]  # rows searched again give their whole list next time
        a.append(ids[rows])
        b.append(nbrs[rows, cols])
        s.append(scores[rows, cols])
        ids, vecs, k = ids[full], vecs[full], min(k * 4, ntotal)
        if len(ids):
            scores, nbrs = index.search(vecs, k)
    cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.empty(0, dtype)  # noqa: E731
    return cat(a, np.int64), cat(b, np.int64), cat(s, np.float32), capped


def _only_between(pairs: tuple, live: np.ndarray) -> tuple:
    """The pairs whose two ids are both among `live` (ids removed since the index was built are not items)."""
    keep = np.isin(pairs[0], live) & np.isin(pairs[1], live)
    return tuple(x[keep] for x in pairs)


def _pair_keys(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One int per unordered pair of ids (ids < 2^31 in practice; wider ones still collide only with themselves
    in the low bits they share, which is harmless for set membership of small pair sets)."""
    lo, hi = np.minimum(a, b).astype(np.uint64), np.maximum(a, b).astype(np.uint64)
    return (lo << np.uint64(32)) | (hi & np.uint64(0xFFFFFFFF))


def _unique_pairs(a: np.ndarray, b: np.ndarray, flag: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lo, hi, any flag) of each unordered pair once, self-pairs dropped; sorted by (lo, hi)."""
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    keep = lo != hi
    lo, hi, flag = lo[keep], hi[keep], flag[keep]
    order = np.lexsort((~flag, hi, lo))  # a flagged copy of a pair first
    lo, hi, flag = lo[order], hi[order], flag[order]
    first = np.ones(len(lo), dtype=bool)
    first[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    return lo[first], hi[first], flag[first]


def _contents(store: Store, live: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids (N,) sorted, their content sha256 (N, 32) uint8) of the live items among `live`."""
    ids, shas = [], []
    for _, rec in store.iter_items():
        ids.append(rec.id)
        shas.append(bytes.fromhex(rec.sha256))
    ids_a = np.asarray(ids, dtype=np.int64)
    content = np.frombuffer(b"".join(shas), dtype=np.uint8).reshape(-1, 32)  # (N, 32): "S32" would drop trailing 0s
    keep = np.isin(ids_a, live)
    order = np.argsort(ids_a[keep])
    return ids_a[keep][order], content[keep][order]


def _hashes(store: Store, ids: np.ndarray, content: np.ndarray, on_progress: Progress | None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(full (N,), content-box (N,), pixel digest (N,)) uint64 hashes and the content share (N,) of every image.

    Images indexed before hashes existed are hashed now (their files decoded at a small scale), and the hashes are
    stored when the store is open for writing; an unreadable file gets no hash pairs."""
    n = len(ids)
    full, box, pixels = (np.zeros(n, np.uint64) for _ in range(3))
    share = np.ones(n, np.float32)
    has = np.zeros(n, bool)
    step = 65536
    for start in range(0, n, step):
        raws = store.get_hashes(c.tobytes().hex() for c in content[start:start + step])
        found = [j for j, raw in enumerate(raws) if raw is not None]
        if not found:
            continue
        # Hashes.to_bytes, parsed for the whole block at once: (full, content, pixels) <u8, box (4,) <f4
        rec = np.frombuffer(b"".join(raws[j][:40] for j in found), dtype=[("h", "<u8", 3), ("box", "<f4", 4)])
        at = start + np.asarray(found)
        full[at], box[at], pixels[at] = rec["h"][:, 0], rec["h"][:, 1], rec["h"][:, 2]
        share[at] = (rec["box"][:, 2] - rec["box"][:, 0]) * (rec["box"][:, 3] - rec["box"][:, 1])
        has[at] = True
    missing = np.flatnonzero(~has)
    if len(missing):
        log.warning("%d images have no perceptual hash (indexed by an older simsearch): hashing them now%s", len(missing),
                    "" if not store.readonly else " (not kept: the db is open read-only; `simsearch index` keeps them)")
        done = 0
        with ThreadPoolExecutor(cpu_count()) as pool:
            for start in range(0, len(missing), 256):
                part = missing[start:start + 256]
                paths = store.paths_of(ids[part].tolist())
                made = list(pool.map(_hash_file, paths))
                if not store.readonly:
                    store.put_hashes([(content[j].tobytes().hex(), h.to_bytes()) for j, h in zip(part, made) if h is not None])
                for j, h in zip(part, made):
                    if h is not None:
                        full[j], box[j], pixels[j], share[j], has[j] = h.full, h.content, h.pixels, h.content_share, True
                done += len(part)
                if on_progress:
                    on_progress("hashing images", done, len(missing))
    return full, box, pixels, np.where(has, share, np.float32(np.nan))


def _hash_file(path: str | None) -> Hashes | None:
    if path is None:
        return None
    try:
        return hashes_of(load_rgb(path, DECODE_SIDE))
    except ImageLoadError as e:
        log.info("no hash: %s", e)
        return None


def _exact_pairs(ids: np.ndarray, content: np.ndarray, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of the same content (sha256 (N, 32)), or of the same pixels (digests (N,), 0: none): each image linked
    to the first of its run."""
    a, b = [], []
    hashed = np.flatnonzero(pixels != 0)
    words = np.ascontiguousarray(content).view("<u8")  # (N, 4)
    for keys, where in ((words, np.arange(len(ids))), (pixels[hashed][:, None], hashed)):
        order = np.lexsort(keys.T[::-1])
        k = keys[order]
        same = np.flatnonzero(np.all(k[1:] == k[:-1], axis=1)) + 1  # positions equal to their predecessor
        if not len(same):
            continue
        starts = np.flatnonzero(np.r_[True, ~np.all(k[1:] == k[:-1], axis=1)])
        head = starts[np.searchsorted(starts, same, side="right") - 1]  # the run's first position
        a.append(ids[where[order[head]]])
        b.append(ids[where[order[same]]])
    if not a:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    lo, hi, _ = _unique_pairs(np.concatenate(a), np.concatenate(b), np.zeros(sum(map(len, a)), bool))
    return lo, hi


def _hash_pairs(ids: np.ndarray, hashes: tuple, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of images whose hashes (whole frame or content box, either side mirrored) differ in at most `bits`
    bits, among those that share a 16-bit quarter of a hash (pigeonhole: all pairs within 3 bits)."""
    full, box, _, share = hashes
    hashed = ~np.isnan(share)
    own = np.flatnonzero(hashed)
    # The table: each image's whole-frame hash, and its content-box hash where that differs.
    cut = own[box[own] != full[own]]
    table = np.concatenate([full[own], box[cut]])
    owner = np.concatenate([own, cut])
    # The probes: the same hashes and their mirrors (a mirrored copy's hash is the mirror of its original's).
    probe = np.concatenate([table, mirrored(table)])
    probe_owner = np.concatenate([owner, owner])
    found_a, found_b, skipped = [], [], 0
    for q in range(4):
        shift = np.uint64(16 * q)
        tkey = ((table >> shift) & np.uint64(0xFFFF)).astype(np.int64)
        order = np.argsort(tkey, kind="stable")
        count = np.bincount(tkey, minlength=1 << 16)  # the table's bucket of key k: order[first[k]:first[k] + count[k]]
        first = np.cumsum(count) - count
        pkey = ((probe >> shift) & np.uint64(0xFFFF)).astype(np.int64)
        lo, size = first[pkey], count[pkey]
        big = size > MAX_BUCKET
        skipped += int(big.sum())
        size = np.where(big, 0, size)
        for start in range(0, len(probe), 1 << 17):  # bounded memory: the pairs of 131,072 probes at a time
            sl = slice(start, start + (1 << 17))
            sz = size[sl]
            total = int(sz.sum())
            if not total:
                continue
            p = np.repeat(np.arange(start, start + len(sz)), sz)
            t = order[np.repeat(lo[sl] - (np.cumsum(sz) - sz), sz) + np.arange(total)]
            # each unordered pair once: from its lower owner (a mirrored probe too: d(m(a), b) == d(a, m(b)))
            keep = owner[t] > probe_owner[p]
            p, t = p[keep], t[keep]
            ok = hamming(table[t], probe[p]) <= bits
            found_a.append(probe_owner[p[ok]])
            found_b.append(owner[t[ok]])
    if skipped:
        log.warning("%d hash probes fell in buckets of over %d images (flat or blank images?) and were not compared",
                    skipped, MAX_BUCKET)
    if not found_a:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    a, b, _ = _unique_pairs(ids[np.concatenate(found_a)], ids[np.concatenate(found_b)],
                            np.zeros(sum(map(len, found_a)), bool))
    return a, b


# -- stage 2: verification -------------------------------------------------------------------------------------

def verify_pairs(store: Store, pairs: tuple[np.ndarray, np.ndarray], config: DupesConfig = DupesConfig(),
                 on_progress: Progress | None = None) -> list[Verdict]:
    """The verdict of each pair (retrieval/verify.py), in order. Features are read from the db's cache, or made
    (in parallel) and cached when the store is open for writing; at most CACHE_IMAGES are held at once."""
    a, b = pairs
    vc = config.verify
    workers = config.workers or cpu_count()
    cache: OrderedDict[int, Features | None] = OrderedDict()
    out: list[Verdict] = []
    made = reused = 0
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(a), PAIR_CHUNK):
            ca, cb = a[start:start + PAIR_CHUNK], b[start:start + PAIR_CHUNK]
            need = [int(i) for i in np.unique(np.concatenate([ca, cb])) if int(i) not in cache]
            if need:
                paths = store.paths_of(need)
                records = [store.get_item(p) if p is not None else None for p in paths]
                shas = [r.sha256 if r is not None else None for r in records]
                cached = store.get_features(vc.key, [s or "" for s in shas])
                todo = [(i, p, s) for i, p, s, raw in zip(need, paths, shas, cached) if raw is None]
                for i, raw in zip(need, cached):
                    if raw is not None:
                        cache[i] = Features.from_bytes(raw)
                        reused += 1
                fresh = list(pool.map(lambda t: features_of(t[1], vc) if t[1] else None, todo))
                made += len(todo)
                for (i, _, _), f in zip(todo, fresh):
                    cache[i] = f
                if not store.readonly:
                    store.put_features(vc.key, [(s, f.to_bytes()) for (_, _, s), f in zip(todo, fresh) if s and f])
            out += pool.map(lambda ab: _verdict(cache.get(ab[0]), cache.get(ab[1]), vc),
                            zip(ca.tolist(), cb.tolist()))
            while len(cache) > CACHE_IMAGES:
                cache.popitem(last=False)
            if on_progress:
                on_progress("verifying candidate pairs", min(start + PAIR_CHUNK, len(a)), len(a))
    log.info("verified %d pairs: features of %d images made, %d read from the db's cache", len(a), made, reused)
    return out


def _verdict(fa, fb, vc: VerifyConfig) -> Verdict:
    if fa is None or fb is None:
        return Verdict(0, False)  # a file gone or unreadable: not verifiable
    return verify(fa, fb, vc)


# -- groups ----------------------------------------------------------------------------------------------------

def group(store: Store, encoder: str, cands: Candidates, accepted: np.ndarray, on_progress: Progress | None = None,
          derived: list[int] | None = None) -> list[DupeGroup]:
    """The groups of the exact pairs, the accepted pairs and the similar pairs (if any), joined tier by tier.
    derived: per candidate pair, which side verification says was made from the other (Verdict.derived): such an
    image loses a vote to be the keeper, the other gains one."""
    entry = store.read_manifest().encoders[encoder]
    made: dict[int, int] = {}  # id -> times found made from another less times another was found made from it
    if derived is not None:
        for x, y, d, ok in zip(cands.pairs[0].tolist(), cands.pairs[1].tolist(), derived, accepted.tolist()):
            if ok and d:
                child, parent = (y, x) if d > 0 else (x, y)
                made[child] = made.get(child, 0) + 1
                made[parent] = made.get(parent, 0) - 1
    edges = [(cands.exact[0], cands.exact[1], 0), (cands.pairs[0][accepted], cands.pairs[1][accepted], 1),
             (cands.similar[0], cands.similar[1], 2)]
    a = np.concatenate([e[0] for e in edges]).astype(np.int64)
    b = np.concatenate([e[1] for e in edges]).astype(np.int64)
    tier = np.concatenate([np.full(len(e[0]), e[2], np.int8) for e in edges])
    # within the similar tier, strongest cosine first: the tree is then a maximum spanning tree, whose weakest
    # link is the group's min_score whichever pairs the index returned
    score = np.concatenate([np.ones(len(a) - len(cands.similar[2]), np.float32), cands.similar[2]])
    return _describe(store, entry.key, entry.dim, _components(a, b, tier, score), made, on_progress)


def _components(a: np.ndarray, b: np.ndarray, tier: np.ndarray, score: np.ndarray
                ) -> list[tuple[np.ndarray, list[tuple[int, int, int]]]]:
    """Connected components of the pairs, joined strongest tier first, then highest score (Kruskal): [(member ids
    (m,), the tree's edges (a, b, tier))]. The tree's path between two members has the best possible weakest tier."""
    if not len(a):
        return []
    nodes, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    ia, ib = inverse[: len(a)], inverse[len(a):]
    parent = list(range(len(nodes)))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    tree = []
    for e in np.lexsort((-score, tier)).tolist():
        ra, rb = root(int(ia[e])), root(int(ib[e]))
        if ra != rb:
            parent[rb] = ra
            tree.append((int(nodes[ia[e]]), int(nodes[ib[e]]), int(tier[e])))
    roots = np.array([root(x) for x in range(len(nodes))])
    by_root: dict[int, list] = {}
    for x, y, t in tree:
        by_root.setdefault(roots[np.searchsorted(nodes, x)], []).append((x, y, t))
    order = np.argsort(roots, kind="stable")
    bounds = np.flatnonzero(np.diff(roots[order])) + 1
    return [(nodes[part], by_root[int(roots[part[0]])]) for part in np.split(order, bounds)]


def _describe(store: Store, key: str, dim: int, groups: list, made: dict[int, int], on_progress: Progress | None
              ) -> list[DupeGroup]:
    """Paths, sizes and pixel counts of the grouped items (headers only), the keeper, tiers and cosines to it."""
    total, done = sum(len(m) for m, _ in groups), 0
    out = []
    for members, tree in groups:
        ids = members.tolist()
        paths = store.paths_of(ids)
        vectors = store.vectors_of_ids(key, ids, dim)  # (m, dim)
        records = [store.get_item(p) if p is not None else None for p in paths]
        items = []
        for i, path, record in zip(ids, paths, records):
            width, height = header_size(path) if path is not None else (0, 0)
            items.append(DupeItem(i, path or f"item {i}", width, height, record.size if record else 0))
        done += len(ids)
        if on_progress:
            on_progress("reading image headers", done, total)
        # The keeper: the fewest times found made from another member (a crop of it, it with a frame or a caption
        # added) less the times others were found made from it, then the most pixels, then the largest file.
        best = max(range(len(items)), key=lambda j: (-made.get(items[j].id, 0), items[j].width * items[j].height,
                                                     items[j].bytes, -items[j].id))
        tiers = _tiers_from(items[best].id, tree)
        pos = {i: j for j, i in enumerate(ids)}
        scores = vectors @ vectors[best]  # (m,)
        others = sorted((replace(it, score=float(scores[j]), tier=TIERS[tiers[it.id]])
                         for j, it in enumerate(items) if j != best),
                        key=lambda it: (TIERS.index(it.tier), -it.score, it.path))
        cosines = [float(vectors[pos[x]] @ vectors[pos[y]]) for x, y, _ in tree]
        out.append(DupeGroup(items[best], others, min(cosines), TIERS[max(t for *_, t in tree)]))
    out.sort(key=lambda g: (-len(g.others), g.keeper.path))
    return out


def _tiers_from(start: int, tree: list[tuple[int, int, int]]) -> dict[int, int]:
    """Each member's weakest tier on the tree path from `start`."""
    adj: dict[int, list[tuple[int, int]]] = {}
    for x, y, t in tree:
        adj.setdefault(x, []).append((y, t))
        adj.setdefault(y, []).append((x, t))
    worst, todo = {start: 0}, [start]
    while todo:
        x = todo.pop()
        for y, t in adj.get(x, ()):
            if y not in worst:
                worst[y] = max(worst[x], t)
                todo.append(y)
    return worst
