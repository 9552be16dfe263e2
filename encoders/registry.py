"""The one encoder registry: the built-in encoders (spec.BUILTIN), then those trained into the models dir, then the
CLIP encoders added to it (encoders/clip.py), each followed by its int8 variant `<name>-int8`.

A spec says which it is (`EncoderSpec.trained`, `EncoderSpec.precision`); names are unique across all.
"""

from __future__ import annotations

from pathlib import Path

from simsearch.encoders.clip import clip_specs
from simsearch.encoders.quantize import DYNAMIC_TAG, QuantSettings, int8_faster_here
from simsearch.encoders.spec import BUILTIN, INT8_SUFFIX, EncoderSpec
from simsearch.encoders.trained import trained_specs
from simsearch.errors import UnknownNameError

DEFAULT_BASE = "efficientnet-lite0"  # the fp32 encoder training starts from, and the default's fp32 side


def default_encoder() -> str:
    """The encoder `index` and `bench` use when none is named: efficientnet-lite0's int8 variant where this CPU runs
    int8 faster than fp32, else efficientnet-lite0 itself. Its quality holds (docs/encoders.md, "The default encoder":
    Tiny ImageNet val hit@1 20.8 vs 21.2, hit@10 54.5 vs 54.8, pair ROC AUC 0.856 vs 0.858)."""
    return DEFAULT_BASE + INT8_SUFFIX if int8_faster_here() else DEFAULT_BASE


def list_encoders(models_dir: Path | None = None) -> list[EncoderSpec]:
    """The built-in encoders, then those trained into `models_dir` (None: the default models dir), then its CLIP
    encoders, each followed by its int8 variant."""
    static, dynamic = QuantSettings().tag(), DYNAMIC_TAG
    return [v for spec in (*BUILTIN, *trained_specs(models_dir), *clip_specs(models_dir))
            for v in (spec, spec.int8(dynamic if spec.clip else static))]


def is_builtin(name: str) -> bool:
    return any(s.name == name for s in BUILTIN)


def get_encoder(name: str, models_dir: Path | None = None) -> EncoderSpec:
    """models_dir: where trained encoders are looked up (None: the default models dir)."""
    specs = list_encoders(models_dir)
    for spec in specs:
        if spec.name == name:
            return spec
    valid = ", ".join(s.name for s in specs)
    raise UnknownNameError(f"unknown encoder {name!r}; registered encoders: {valid}")
