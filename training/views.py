"""Augmented views of training images through a frozen encoder, computed once and cached on disk.

Barlow Twins trains on two augmented views of every image; triplet fine-tuning can add the same views
as extra samples of their class (`--views`; off by default, it measured worse). Both run the frozen
encoder on the views once, so the cache is keyed by encoder weights, seed and image list, and written
per chunk: an interrupted run resumes where it stopped, and a second trainer reuses it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from simsearch.devices import Device
from simsearch.encoders.spec import EncoderSpec
from simsearch.paths import training_cache


def augmentations(size: int):
    """The Barlow Twins views (paper, appendix): two pipelines differing in blur and solarisation rates.

    (B, 3, S, S) in [0, 1] -> (B, 3, S, S) in [0, 1].
    """
    import kornia.augmentation as K

    def view(blur_p: float, solarize_p: float):
        return K.AugmentationSequential(
            K.RandomResizedCrop((size, size), scale=(0.2, 1.0)),  # 0.08 in the paper; these images are 64 px
            K.RandomHorizontalFlip(),
            K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),
            K.RandomGrayscale(p=0.2),
            K.RandomGaussianBlur((23, 23), (0.1, 2.0), p=blur_p),
            K.RandomSolarize(thresholds=0.0, additions=0.0, p=solarize_p),
        )

    return view(1.0, 0.0), view(0.1, 0.2)


def view_features(spec: EncoderSpec, paths: list[Path], models_dir: Path | None, device: Device, seed: int,
                  on_progress=None, chunk: int = 1024) -> np.ndarray:
    """(2, N, dim) embeddings of two augmented views per image, cached per chunk of images."""
    import torch

    from simsearch.encoders.preprocess import decode_side, to_input
    from simsearch.encoders.runtime import OnnxEncoder
    from simsearch.indexer.images import load_rgb

    key = hashlib.sha256(f"{spec.key}|{seed}|{'|'.join(map(str, paths))}".encode()).hexdigest()[:16]
    cache = training_cache() / f"views-{key}"
    encoder = OnnxEncoder(spec, device, models_dir)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    aug1, aug2 = augmentations(spec.image_size)
    cache.mkdir(parents=True, exist_ok=True)
    parts = []
    for c0 in range(0, len(paths), chunk):
        part = cache / f"views-{c0:07d}.npy"
        if not part.is_file():
            torch.manual_seed(seed + c0)  # the same views whether or not the run was interrupted
            out = np.empty((2, min(chunk, len(paths) - c0), spec.dim), dtype=np.float32)
            for b0 in range(0, out.shape[1], 64):
                batch = paths[c0 + b0:c0 + b0 + 64]
                x = torch.from_numpy(np.stack([to_input(load_rgb(p, decode_side(spec)), spec) for p in batch]))
                pixels = (x * std + mean) / 255.0  # (B, 3, S, S) back to [0, 1] for kornia
                for v, aug in enumerate((aug1, aug2)):
                    with torch.no_grad():
                        seen = (aug(pixels).clamp(0, 1) * 255.0 - mean) / std
                    out[v, b0:b0 + len(batch)] = encoder.embed(seen.numpy())
                if on_progress:
                    on_progress("embedding augmented views", c0 + b0 + len(batch), len(paths))
            np.save(part.with_suffix(".tmp.npy"), out)
            part.with_suffix(".tmp.npy").replace(part)  # a killed run never leaves half a chunk
        parts.append(np.load(part))
    return np.concatenate(parts, axis=1)
