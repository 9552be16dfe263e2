"""Schemathesis hooks (loaded by the `st` run of test_openapi.py through SCHEMATHESIS_HOOKS): real image files for
the upload fields. The OpenAPI document says an upload's part is `image/*`, which JSON Schema cannot check, so
without these Schemathesis sends random bytes, and each schema-valid upload is (rightly) a 422 "not an image"."""

from __future__ import annotations

import io

import schemathesis
from hypothesis import strategies as st
from PIL import Image


def _encoded(fmt: str, width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, fmt)
    return buffer.getvalue()


def _images(fmt: str) -> st.SearchStrategy[bytes]:
    side = st.integers(min_value=1, max_value=96)
    return st.builds(_encoded, st.just(fmt), side, side, st.tuples(*[st.integers(0, 255)] * 3))


schemathesis.openapi.media_type("image/jpeg", _images("JPEG"))
schemathesis.openapi.media_type("image/png", _images("PNG"))
