"""A BEiT pair classifier as a reranker: one transformer sees both images side by side and outputs P(same).

The two images' token grids (C, h, w) are laid side by side into one (C, h, 2w) canvas and fed to a
BEiT encoder (transformers' implementation: [CLS] token, relative position bias, layer scale); the
[CLS] output goes through a linear layer to the logit of P(same). Relative position bias lets a token
attend "w columns over", i.e. to the same place in the other image.

Where the tokens come from:
  default        the pretrained EfficientNet-Lite trunk (frozen): its (1280, S/32, S/32) feature map of
                 each image, projected to `token_dim` by a trained 1x1 conv; a small BEiT (trained
                 from scratch, since no pretrained BEiT weights come from a PyPI package) reads them.
  --weights DIR  a user's own BEiT checkpoint (transformers format, the folder `save_pretrained`
                 writes): tokens are its 16x16-pixel patches of the two images side by side, its
                 relative position bias interpolated to the wider canvas, the whole model fine-tuned.
Reranker layout (retrieval/rerank.py): tower.onnx = pixels in [0, 1] -> token grid (once per image),
metric.onnx = two token grids -> P(same) (once per pair). Imports torch and transformers: training only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from simsearch.devices import Device
from simsearch.encoders.cards import Card, RerankerDetails
from simsearch.errors import ModelError
from simsearch.training.configs import BeitPairConfig

log = logging.getLogger(__name__)


class PairBeit(nn.Module):
    """Two token grids (B, C, h, w), (B, C, h, w) -> (B, C, h, 2w) canvas -> BEiT -> [CLS] -> (B,) logit of P(same)."""

    def __init__(self, beit, interpolate: bool):
        super().__init__()
        self.beit = beit
        self.interpolate = interpolate  # the canvas is wider than the checkpoint's images: resample its biases
        self.classifier = nn.Linear(beit.config.hidden_size, 1)
        # Which image a token belongs to (relative positions alone cannot say: the last column of the
        # left image and the first of the right are neighbours). Added before the patch projection,
        # which is linear, so it is a per-image token embedding; zero at the start.
        self.segment = nn.Parameter(torch.zeros(2, beit.config.num_channels, 1, 1))

    def logits(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        canvas = torch.cat([a + self.segment[0], b + self.segment[1]], dim=3)  # (B, C, h, 2w)
        out = self.beit(pixel_values=canvas, interpolate_pos_encoding=self.interpolate)
        return self.classifier(out.last_hidden_state[:, 0]).squeeze(1)  # [CLS], layer-normed


class TrunkTokens(nn.Module):
    """Pixels (B, 3, S, S) in [0, 1] -> frozen EfficientNet-Lite feature map (B, 1280, S/32, S/32)."""

    def __init__(self, trunk: nn.Module, mean: tuple, std: tuple):
        super().__init__()
        self.trunk = trunk.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: BatchNorm keeps its ImageNet running statistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.features((x * 255.0 - self.mean) / self.std)


class Normalize(nn.Module):
    """Pixels (B, 3, S, S) in [0, 1] -> a BEiT checkpoint's input scaling."""

    def __init__(self, mean: tuple, std: tuple):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def small_beit(cfg: BeitPairConfig, grid: int):
    """A BEiT encoder for a (token_dim, grid, 2*grid) canvas of 1x1 'patches', randomly initialised."""
    from transformers import BeitConfig, BeitModel

    config = BeitConfig(
        image_size=(grid, 2 * grid), patch_size=1, num_channels=cfg.token_dim, hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, intermediate_size=cfg.mlp,
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
        use_relative_position_bias=True, layer_scale_init_value=cfg.layer_scale,
        # transformers' absolute position embeddings assume a square grid; PairBeit.segment does their job here.
        use_absolute_position_embeddings=False, use_mean_pooling=False,
    )
    return BeitModel(config, add_pooling_layer=False)


def load_checkpoint(folder: Path):
    """A user's BEiT (transformers format) and its pixel scaling; a clear error for anything else."""
    from transformers import BeitModel

    folder = Path(folder)
    if folder.is_file():  # config.json or the weights file itself: the checkpoint is its folder
        folder = folder.parent
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder}: not a BEiT checkpoint (expected the folder save_pretrained writes, with config.json)")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress display is the one on stderr
    try:
        beit = BeitModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{folder}: cannot load a BEiT checkpoint ({e})") from None
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # BEiT's image processor default
    proc = folder / "preprocessor_config.json"
    if proc.is_file():
        import json

        p = json.loads(proc.read_text())
        mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
    size = beit.config.image_size
    return beit, (size if isinstance(size, int) else size[0]), mean, std


def trunk_features(tokens: TrunkTokens, pixels_u8: np.ndarray, device: Device, on_progress=None,
                   block: int = 64) -> np.ndarray:
    """(N, 1280, h, w) float16 trunk features of every image, computed once (the trunk is frozen).

    Run through ONNX Runtime (~4x torch eager on 2 CPU cores): the trunk is exported once, to a temp file.
    """
    import tempfile

    from simsearch.encoders.export import export_module
    from simsearch.encoders.runtime import ort_session

    size = pixels_u8.shape[-1]
    with tempfile.TemporaryDirectory() as tmp:
        export_module(tokens.eval(), (1, 3, size, size), Path(tmp) / "trunk.onnx")
        session, _ = ort_session(Path(tmp) / "trunk.onnx", device)
    out = None
    for s in range(0, len(pixels_u8), block):
        x = pixels_u8[s:s + block].astype(np.float32) / 255.0
        f = session.run(None, {"input": x})[0]
        if out is None:
            out = np.empty((len(pixels_u8), *f.shape[1:]), np.float16)
        out[s:s + len(f)] = f
        if on_progress:
            on_progress("trunk features of training images", s + len(f), len(pixels_u8))
    return out


def train_beit(cfg: BeitPairConfig, models_dir: Path | None = None, on_progress=None) -> Card:
    """Train, keep the best epoch by held-out balanced accuracy, export tower + metric to ONNX, register."""
    from simsearch.encoders.trained import check_model_name
    from simsearch.evaluation import datasets
    from simsearch.training.loop import Budget
    from simsearch.training.matchnet import load_pixels, pixel_batches
    from simsearch.training.pair_training import holdout_split, train_reranker

    check_model_name(cfg.name)
    budget = Budget(cfg.max_minutes)  # the whole command: data preparation counts too
    ds = datasets.load_class_dataset(cfg.data, cfg.split)
    torch.manual_seed(cfg.seed)
    if cfg.weights is not None:
        beit, size, mean, std = load_checkpoint(cfg.weights)
        metric = PairBeit(beit, interpolate=True)
        tower = Normalize(mean, std)  # nothing to train before the transformer: pixels go straight in
        batch_of, export_tower, base = pixel_batches(load_pixels(ds.paths, size)), tower, ""
        source = f"BEiT checkpoint {cfg.weights}"
    else:
        from simsearch.encoders.efficientnet_lite import load_efficientnet_lite
        from simsearch.encoders.registry import get_encoder

        spec = get_encoder(cfg.encoder, models_dir)
        if spec.trained or not spec.arch.startswith("efficientnet-lite"):
            raise ModelError(f"BEiT tokens come from a built-in EfficientNet-Lite trunk, not {cfg.encoder!r}")
        size, base = cfg.image_size, cfg.encoder
        tokens = TrunkTokens(load_efficientnet_lite(spec.arch, str(spec.weights_path())), spec.mean, spec.std)
        feats = trunk_features(tokens, load_pixels(ds.paths, size), cfg.device, on_progress)  # (N, 1280, h, w) f16
        batch_of = lambda idx: torch.from_numpy(feats[idx].astype(np.float32))  # noqa: E731
        tower = nn.Conv2d(feats.shape[1], cfg.token_dim, 1)  # (B, 1280, h, w) -> (B, token_dim, h, w)
        metric = PairBeit(small_beit(cfg, feats.shape[2]), interpolate=False)
        export_tower = nn.Sequential(tokens, tower)
        source = f"{cfg.encoder} trunk (frozen, ImageNet) -> 1x1 conv -> BEiT trained from scratch"
    train_idx, val_idx = holdout_split(ds.labels, cfg.holdout_per_class, cfg.seed)
    n_params = sum(p.numel() for p in (*tower.parameters(), *metric.parameters()) if p.requires_grad)
    log.info("beit pair classifier (%s): %d training images, %d held out, %.2fM trainable parameters", source,
             len(train_idx), len(val_idx), n_params / 1e6)
    details = RerankerDetails(input="pixels", image_size=size, representation=(), source=source,
                              trainable_parameters=n_params)
    return train_reranker(cfg, "beit", base, details, tower, metric, export_tower, (1, 3, size, size), batch_of,
                          ds.labels, train_idx, val_idx, budget, models_dir, on_progress)
