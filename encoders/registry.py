"""The one encoder registry: the built-in encoders (spec.BUILTIN), then those trained into the models dir,
each followed by its int8 variant `<name>-int8`.

A spec says which it is (`EncoderSpec.trained`, `EncoderSpec.precision`); names are unique across all.
"""

from __future__ import annotations

from pathlib import Path

from simsearch.encoders.quantize import QuantSettings
from simsearch.encoders.spec import BUILTIN, EncoderSpec
from simsearch.encoders.trained import trained_specs
from simsearch.errors import UnknownNameError

DEFAULT_ENCODER = "efficientnet-lite0"


def list_encoders(models_dir: Path | None = None) -> list[EncoderSpec]:
    """The built-in encoders, then those trained into `models_dir` (None: the default models dir), each
    followed by its int8 variant."""
    tag = QuantSettings().tag()
    return [v for spec in (*BUILTIN, *trained_specs(models_dir)) for v in (spec, spec.int8(tag))]


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
