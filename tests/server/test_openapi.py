"""The OpenAPI document tells the truth: Schemathesis (an independent OpenAPI fuzzer) against `simsearch serve` on
loopback, over a small real db made with the default encoder and a tiny CLIP encoder (for words), finds nothing; and
the document itself declares every error status of a route with the one error body the server sends."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from simsearch.benchmarks.load import served
from simsearch.encoders.registry import default_encoder, get_encoder
from simsearch.encoders.runtime import OnnxEncoder
from simsearch.indexer.pipeline import Indexer
from simsearch.indexer.store import Store
from simsearch.retrieval.backend import refresh

from ..conftest import copy_samples

HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
CONFIG = Path(__file__).with_name("schemathesis.toml")  # what a query's 400 means to the positive-data check
ST = Path(sys.executable).with_name("st")  # the schemathesis CLI of this environment (the dev extra)


@pytest.fixture(scope="module")
def url(tmp_path_factory, models_dir, clip):
    root = tmp_path_factory.mktemp("openapi")
    copy_samples(root / "imgs", 6)
    with Store(root / "db", create=True) as store:
        for spec in (get_encoder(default_encoder(), models_dir), clip):  # the default encoder: the db's default
            encoder = OnnxEncoder(spec, models_dir=models_dir)
            Indexer(encoder, store).run(root / "imgs")
            refresh(store, encoder.spec.name)
    with served(root / "db", models_dir) as (base, _):
        yield base


def test_schemathesis_finds_nothing(url, tmp_path):
    """Every check (status codes, content types, response schemas, valid data accepted, invalid data rejected, the
    Allow header...) over every operation and the inferred links between them; seeded and bounded (~800 requests,
    ~15 s on 2 cores). Uploads are real images (the hooks): the document says the part is `image/*`."""
    cmd = [str(ST), "--config-file", str(CONFIG), "run", f"{url}/openapi.json", "--checks", "all", "--seed", "1",
           "--max-examples", "20", "--workers", "1", "--generation-database", "none", "--request-timeout", "60",
           "--no-color"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)})
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", out.stdout)
    assert generated and int(generated.group(1)) == int(generated.group(2)) >= 500, out.stdout[-3000:]
    assert "Tested: 12" in out.stdout  # every operation of the API but POST /api/dupes/move (schemathesis.toml)


def test_every_error_is_declared_with_the_body_it_is_sent_with(url):
    with urllib.request.urlopen(f"{url}/openapi.json", timeout=30) as res:
        doc = json.load(res)
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas  # FastAPI's default 422 body (`detail` an array) is never sent
    assert schemas["ErrorOut"] == {"properties": {"detail": {"type": "string", "title": "Detail",
                                                             "description": "what went wrong, on one line"}},
                                   "additionalProperties": False, "type": "object", "required": ["detail"],
                                   "title": "ErrorOut", "description": "Every error answer."}
    declared = {}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            errors = {int(s) for s in op["responses"] if int(s) >= 400}
            for status in errors:
                body = op["responses"][str(status)]["content"]["application/json"]["schema"]
                assert body == {"$ref": "#/components/schemas/ErrorOut"}, (method, path, status)
            declared[f"{method.upper()} {path}"] = errors
    uploads, by_item = {400, 404, 413, 422, 503}, {404, 422, 503}
    assert declared == {
        "GET /api/health": {503}, "GET /api/info": {503}, "POST /api/query": uploads,
        "GET /api/items/{item_id}/similar": by_item, "GET /api/items": {422, 503}, "GET /api/items/{item_id}": by_item,
        "GET /api/items/{item_id}/thumbnail": by_item, "GET /api/items/{item_id}/image": by_item,
        "GET /api/explain": {400, 404, 422, 503}, "POST /api/explain": uploads, "GET /api/dupes": {400, 404, 422, 503},
        "GET /api/search": {400, 404, 422, 503}, "POST /api/dupes/move": {400, 403, 422, 503}}
    for op in (doc["paths"]["/api/query"]["post"], doc["paths"]["/api/explain"]["post"]):
        assert op["requestBody"]["content"]["multipart/form-data"]["encoding"] == {"image": {"contentType": "image/*"}}


def test_a_method_not_allowed_names_every_method_of_the_path(url):
    request = urllib.request.Request(f"{url}/api/explain", method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 405 and e.value.headers["Allow"] == "GET, POST"
    assert e.value.read() == b'{"detail":"Method Not Allowed"}'
