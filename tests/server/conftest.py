"""Fixtures of the server's tests: a tiny CLIP encoder (a text tower), registered once per session."""

from __future__ import annotations

import pytest

from ..clip_models import add_tiny_clip

CLIP = "page-clip"  # a name of its own: the session's models dir is shared with other modules' tiny CLIPs


@pytest.fixture(scope="session")
def clip(models_dir):
    """The EncoderSpec of a tiny CLIP encoder (random towers, real tokenizer) registered in the session's models
    dir, so `simsearch index --encoder page-clip` and `serve` in a subprocess find it too."""
    return add_tiny_clip(models_dir, CLIP)
