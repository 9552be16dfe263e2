"""Why two images match: a heatmap per image of the regions that drove their cosine similarity. No torch here.

Two methods:

decomposition  exact, for an encoder whose embedding is the L2-normalised global average of a feature map (the
    built-in EfficientNet-Lite encoders, fp32 and int8: encoders/export.py `build_embedding_model` is
    F.normalize(features(x).mean((2, 3)))). With F_a (C, N_a) and F_b (C, N_b) the two maps over their positions,
    g = the mean over positions and e = g / |g| the embedding (Stylianou, Souvenir & Pless, "Visualizing Deep
    Similarity Networks", WACV 2019):

        cos(e_a, e_b) = sum_{i,j} <F_a[:, i], F_b[:, j]> / (N_a N_b |g_a| |g_b|)

    Summing over B's positions gives A's map, A_i = <F_a[:, i], g_b> / (N_a |g_a| |g_b|), and B's likewise: each
    map sums to the cosine. The feature map is the encoder's own ONNX graph's: the input of its global average is
    exposed as a second output, `features`, in a copy cached beside the encoder's file (derived once with `onnx`:
    the encoder's file and its vectors' key are untouched). Same graph, same arithmetic: the int8 variants'
    average is taken in float over their dequantised map, so they decompose exactly too. Every run checks that
    L2norm(mean(features)) is the embedding the same run returned.

occlusion  black-box, for any encoder (a trained head after the pooling breaks the decomposition): a grey square
    slides over one image, the masked copies are embedded in batches, and each pixel is credited with the mean
    drop in similarity to the other image of the masks that hid it (the idea of SBSM, similarity-based saliency
    maps). An estimate, not a decomposition: its values are drops in cosine and do not sum to the score.

Heatmaps are in the encoder's input frame (S x S, the image as the encoder saw it under its preprocessing policy).
"""

from __future__ import annotations

import functools
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simsearch.devices import Device
from simsearch.encoders.export import ensure_onnx
from simsearch.encoders.preprocess import decode_side, fit, to_input
from simsearch.encoders.runtime import OnnxEncoder, ort_session
from simsearch.encoders.spec import EncoderSpec
from simsearch.errors import ModelError, SimsearchError
from simsearch.indexer.images import load_rgb
from simsearch.atomic import write_atomic

log = logging.getLogger(__name__)

METHODS = ("auto", "decomposition", "occlusion")
FEATURES = "features"  # the second output of the derived model: (B, C, h, w)
# L2norm(mean(features)) must give the embedding the same run returned to this (float32 rounding is ~1e-7).
EXACT_TOLERANCE = 1e-5
# Occlusion: a square of a quarter of the input side, moved by half its side (7 x 7 = 49 masks at 224 px), filled
# with 0 in the normalised input: the normalisation mean, the grey the `pad` policy letterboxes with.
MASK_FRACTION = 0.25
MASK_STRIDE = 0.5  # of the mask side
OCCLUSION_BATCH = 32  # masked copies embedded per run: bounded memory (32 x 3 x 224 x 224 float32 = 19 MB)


@dataclass(frozen=True)
class Explanation:
    method: str  # "decomposition" (exact, GAP feature maps) | "occlusion" (black-box, SBSM-style)
    score: float  # cosine of the two embeddings
    grid_a: np.ndarray  # (S, S) float32 heatmap over image A's encoder input frame (224 x 224 for lite0)
    grid_b: np.ndarray  # (S, S) float32 heatmap over image B
    spec: EncoderSpec  # the encoder explained: render_png frames the images as it saw them

    def to_dict(self) -> dict:
        """JSON-able. Decomposition: each grid sums to the score (per-pixel shares of it); occlusion: per-pixel
        mean drop in cosine when that pixel is hidden."""
        return {"method": self.method, "score": self.score, "exact": self.method == "decomposition",
                "encoder": self.spec.name, "preprocess": self.spec.preprocess.value,
                "image_size": self.spec.image_size, "grid_shape": list(self.grid_a.shape),
                "grid_a": _json_grid(self.grid_a), "grid_b": _json_grid(self.grid_b)}


def _json_grid(grid: np.ndarray) -> list:
    """Nested lists rounded to 6 significant digits of the grid's largest magnitude (shortest float reprs: ~1.3 MB
    of JSON for two 224 x 224 grids instead of ~2.3)."""
    top = float(np.abs(grid).max())
    decimals = 6 - int(np.floor(np.log10(top))) if top > 0 else 0
    return np.round(grid.astype(np.float64), decimals).tolist()


def explain_pair(encoder: OnnxEncoder, a: str | Path, b: str | Path, *, method: str = "auto",
                 models_dir: Path | None = None) -> Explanation:
    """Heatmaps of the regions of `a` and `b` that drove their cosine under `encoder`.

    method "auto": decomposition where it is exact for `encoder` (its embedding is the normalised average of a
    feature map), else occlusion. ImageLoadError names an unreadable image; SimsearchError for the rest.
    """
    if method not in METHODS:
        raise SimsearchError(f"unknown explanation method {method!r} (one of {', '.join(METHODS)})")
    spec = encoder.spec
    xa, xb = (to_input(load_rgb(p, decode_side(spec)), spec) for p in (a, b))  # (3, S, S) each, as a query is made
    features = None if method == "occlusion" else features_model(spec, models_dir)
    if features is not None:
        return _decompose(encoder, features, xa, xb)
    if method == "decomposition":
        raise SimsearchError(f"{spec.name}: its embedding is not the normalised average of a feature map (a trained "
                             "head follows the pooling), so it has no exact decomposition: use the occlusion method")
    return _occlude(encoder, xa, xb)


# -- decomposition ------------------------------------------------------------------------------------------------

def features_model(spec: EncoderSpec, models_dir: Path | None = None) -> Path | None:
    """The encoder's ONNX model with the feature map it averages as a second output `features` (B, C, h, w),
    cached beside the encoder's file; None when its embedding is not the normalised average of a feature map."""
    source = ensure_onnx(spec, models_dir)
    path = source.with_name(f"{source.stem}.{FEATURES}.onnx")
    if path.is_file():
        return path
    import onnx  # once per machine and encoder: the derived file is cached

    model = onnx.load(str(source))
    feature_map = _averaged_map(model.graph)
    if feature_map is None:
        return None
    graph = model.graph
    graph.node.append(onnx.helper.make_node("Identity", [feature_map], [FEATURES]))
    graph.output.append(onnx.helper.make_tensor_value_info(FEATURES, onnx.TensorProto.FLOAT, None))
    log.info("exposing the feature map of %s for explanations (once per machine) -> %s", spec.name, path)
    try:
        write_atomic(path, model.SerializeToString())
    except OSError as e:
        raise ModelError(f"{path}: cannot write the feature-map model beside the encoder's ({e.strerror}): "
                         "pass a writable --models-dir") from None
    return path


def _averaged_map(graph) -> str | None:
    """The tensor X (B, C, h, w) when the graph's first output is X.mean((2, 3)) / |X.mean((2, 3))|, as
    F.normalize(pooled) exports: Div(m, Expand(Clip(ReduceL2(m)))) with m = ReduceMean(X, axes=[2, 3], keepdims=0)."""
    from onnx import numpy_helper

    producer = {t: node for node in graph.node for t in node.output}
    constants = {t.name: t for t in graph.initializer}
    div = producer.get(graph.output[0].name)
    if div is None or div.op_type != "Div":
        return None
    mean = producer.get(div.input[0])
    if mean is None or mean.op_type != "ReduceMean" or len(mean.input) < 2 or mean.input[1] not in constants:
        return None
    keepdims = next((a.i for a in mean.attribute if a.name == "keepdims"), 1)
    if keepdims or sorted(numpy_helper.to_array(constants[mean.input[1]]).tolist()) != [2, 3]:
        return None
    # The divisor must be the norm of that same mean: walk back from it to a ReduceL2 of m.
    todo, seen = [div.input[1]], set()
    while todo:
        tensor = todo.pop()
        node = producer.get(tensor)
        if node is None or tensor in seen:
            continue
        seen.add(tensor)
        if node.op_type == "ReduceL2" and node.input[0] == div.input[0]:
            return mean.input[0]
        todo += [t for t in node.input if t]
    return None


@functools.lru_cache(maxsize=4)
def _session(path: Path, device: str):
    """One ONNX Runtime session per derived model and device, kept for the next explanation (a server's)."""
    return ort_session(path, Device(device))[0]


def _decompose(encoder: OnnxEncoder, path: Path, xa: np.ndarray, xb: np.ndarray) -> Explanation:
    spec = encoder.spec
    session = _session(path, encoder.device)
    embedding = session.get_outputs()[0].name
    embedded, maps = session.run([embedding, FEATURES], {session.get_inputs()[0].name: np.stack([xa, xb])})
    # embedded (2, dim) L2-normalised; maps (2, C, h, w)
    n, c, h, w = maps.shape
    flat = maps.reshape(n, c, h * w).astype(np.float64)  # (2, C, N)
    g = flat.mean(axis=2)  # (2, C)
    norms = np.linalg.norm(g, axis=1)  # (2,)
    off = float(np.abs(g / norms[:, None] - embedded).max())
    if off > EXACT_TOLERANCE:  # the graph matched the pattern but computes something else
        raise SimsearchError(f"{spec.name}: the normalised average of its feature map is {off:.2g} away from its "
                             "embedding: no exact decomposition (use the occlusion method)")
    # A_i = <F_a[:, i], g_b> / (N |g_a| |g_b|): (N,) per image, each summing to g_a . g_b / (|g_a| |g_b|)
    cells_a = (flat[0].T @ g[1]) / (h * w * norms[0] * norms[1])
    cells_b = (flat[1].T @ g[0]) / (h * w * norms[0] * norms[1])
    score = float(embedded[0].astype(np.float64) @ embedded[1])
    s = spec.image_size
    return Explanation("decomposition", score, _spread(cells_a.reshape(h, w), s), _spread(cells_b.reshape(h, w), s),
                       spec)


def _spread(cells: np.ndarray, size: int) -> np.ndarray:
    """(h, w) contributions of feature-map cells -> (size, size) float32 per-pixel shares with the same total."""
    return (_interpolation(size, cells.shape[0]) @ cells @ _interpolation(size, cells.shape[1]).T).astype(np.float32)


def _interpolation(size: int, n: int) -> np.ndarray:
    """(size, n): bilinear from n cells to size pixels (half-pixel centres, clamped at the borders), each cell's
    column normalised to sum 1 so a cell's contribution is spread over the pixels, not scaled. For an integer
    ratio (224 / 7) every column already sums to the ratio: this is plain bilinear upsampling divided by it."""
    x = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    m = np.zeros((size, n))
    np.add.at(m, (np.arange(size), lo), 1 - (x - lo))
    np.add.at(m, (np.arange(size), hi), x - lo)
    return m / m.sum(axis=0)


# -- occlusion ----------------------------------------------------------------------------------------------------

def _mask_boxes(size: int) -> list[tuple[int, int]]:
    """Top-left corners of the masks: a grid whose last row and column touch the far borders."""
    side = max(1, round(size * MASK_FRACTION))
    steps = int(np.ceil((size - side) / max(1, round(side * MASK_STRIDE)))) + 1
    starts = np.unique(np.linspace(0, size - side, steps).round().astype(int))
    return [(int(y), int(x)) for y in starts for x in starts]


def _occlude(encoder: OnnxEncoder, xa: np.ndarray, xb: np.ndarray) -> Explanation:
    s = encoder.spec.image_size
    side = max(1, round(s * MASK_FRACTION))
    boxes = _mask_boxes(s)
    e = encoder.embed(np.stack([xa, xb]))  # (2, dim)
    score = float(e[0].astype(np.float64) @ e[1])
    # Masked copies of A (compared with B), then of B (compared with A): (2K,) similarities, OCCLUSION_BATCH a run.
    jobs = [(x, other) for x, other in ((xa, e[1]), (xb, e[0])) for _ in boxes]
    sims = np.empty(len(jobs))
    for start in range(0, len(jobs), OCCLUSION_BATCH):
        batch = np.stack([x for x, _ in jobs[start:start + OCCLUSION_BATCH]])  # (B, 3, S, S)
        for k in range(len(batch)):
            y, x0 = boxes[(start + k) % len(boxes)]
            batch[k, :, y:y + side, x0:x0 + side] = 0.0
        targets = np.stack([t for _, t in jobs[start:start + OCCLUSION_BATCH]])  # (B, dim)
        sims[start:start + len(batch)] = np.einsum("bd,bd->b", encoder.embed(batch), targets)
    drops = score - sims  # (2K,): how much hiding each square lowered the similarity
    grids = []
    for drop in (drops[:len(boxes)], drops[len(boxes):]):
        total, count = np.zeros((s, s)), np.zeros((s, s))
        for d, (y, x0) in zip(drop, boxes):
            total[y:y + side, x0:x0 + side] += d
            count[y:y + side, x0:x0 + side] += 1
        grids.append((total / count).astype(np.float32))
    return Explanation("occlusion", score, grids[0], grids[1], encoder.spec)


# -- rendering ----------------------------------------------------------------------------------------------------

def render_png(expl: Explanation, a: str | Path, b: str | Path, names: tuple[str, str] | None = None) -> bytes:
    """Both images as the encoder saw them, side by side, each with its heatmap overlaid; the score, the method and
    the encoder written above. Colours run from 0 to each map's maximum (negative occlusion drops show as 0).
    names: the images' titles (default: their file names; a server passes an upload's own name, not its temp file's)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    spec = expl.spec
    fig = Figure(figsize=(9, 5.0), dpi=100)
    FigureCanvasAgg(fig)
    names = names or (Path(a).name, Path(b).name)
    for ax, path, name, grid in zip(fig.subplots(1, 2), (a, b), names, (expl.grid_a, expl.grid_b)):
        seen = fit(load_rgb(path, decode_side(spec)), spec)
        ax.imshow(seen)
        ax.imshow(grid, cmap="jet", alpha=0.45, vmin=0.0, vmax=max(float(grid.max()), 1e-12),
                  extent=(0, seen.width, seen.height, 0), interpolation="bilinear")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    how = ("decomposition: exact, each map sums to the score" if expl.method == "decomposition"
           else "occlusion: black-box, drop in score when a region is hidden")
    fig.suptitle(f"score {expl.score:.4f}  ·  {how}  ·  {spec.name}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
