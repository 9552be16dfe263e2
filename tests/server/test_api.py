"""The HTTP API through FastAPI's TestClient: the real app over a real db (ONNX Runtime, FAISS, LMDB) of real photos,
every answer checked against the library (Searcher, Store) or a brute-force numpy reference."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from simsearch.indexer.pipeline import Indexer
from simsearch.indexer.store import Store
from simsearch.retrieval.backend import refresh
from simsearch.retrieval.search import Searcher
from simsearch.retrieval.views import db_info
from simsearch.server.app import MULTIPART_SLACK, ServerConfig, create_app, is_loopback

from ..conftest import copy_samples

N = 24  # the first 24 imagenet-samples photos: the tench is the first, the goldfish the second


def build_db(root: Path, encoder) -> Path:
    copy_samples(root / "imgs", N)
    with Store(root / "db", create=True) as store:
        Indexer(encoder, store).run(root / "imgs")
        refresh(store, encoder.spec.name)
    return root / "db"


@pytest.fixture(scope="module")
def db(tmp_path_factory, encoder) -> Path:
    return build_db(tmp_path_factory.mktemp("api"), encoder)


@pytest.fixture(scope="module")
def client(db, models_dir):
    with TestClient(create_app(ServerConfig(db=db, models_dir=models_dir))) as c:
        yield c


@pytest.fixture(scope="module")
def store(client) -> Store:
    """The server's own read-only store (py-lmdb refuses a second open of one db in a process)."""
    return client.app.state.library.store


@pytest.fixture(scope="module")
def items(store) -> dict[str, int]:
    """file name -> item id, from the store."""
    return {Path(p).name: rec.id for p, rec in store.iter_items()}


def upload(path: Path, name: str | None = None) -> dict:
    return {"image": (name or path.name, path.read_bytes(), "image/jpeg")}


def test_health_and_info_are_the_stores(client, db, store, encoder):
    generation = store.generation
    assert client.get("/api/health").json() == {"status": "ok", "generation": generation, "items": N}
    info = client.get("/api/info").json()
    assert info["db"] == str(db.absolute()) and info["items"] == N and info["generation"] == generation
    assert info["default_encoder"] == encoder.spec.name and info["max_upload_bytes"] == 20 << 20
    (name, enc), = info["encoders"].items()
    assert name == encoder.spec.name and enc["dim"] == 1280 and enc["vectors_in_index"] == N
    assert enc["index_type"] == "flat" and enc["index_up_to_date"] is True
    assert enc["text"] is False  # no text tower: the page shows no search box for words
    # the one view of the db's info (retrieval.views.db_info, index files not read), with `text` per encoder
    ref = db_info(store, verify=False)
    ref["encoders"] = {n: {**e, "text": False} for n, e in ref["encoders"].items()}
    assert {k: v for k, v in info.items() if k != "max_upload_bytes"} == ref


def test_similar_is_the_item_itself_then_brute_force_order(client, store, items, encoder):
    goldfish = items["n01443537_goldfish.JPEG"]
    doc = client.get(f"/api/items/{goldfish}/similar", params={"k": 5}).json()
    assert doc["query_id"] == goldfish and doc["k"] == 5 and doc["encoder"] == encoder.spec.name
    hits = doc["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert hits[0]["id"] == goldfish and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert hits[0]["path"].endswith("n01443537_goldfish.JPEG")
    # brute force over every stored vector
    spec = encoder.spec
    ids = np.array(sorted(items.values()))
    vectors = store.vectors_of_ids(spec.key, list(ids), spec.dim)  # (N, dim)
    query = store.vectors_of_ids(spec.key, [goldfish], spec.dim)[0]
    scores = vectors @ query
    order = np.argsort(-scores, kind="stable")[:5]
    assert [h["id"] for h in hits] == list(ids[order])
    np.testing.assert_allclose([h["score"] for h in hits], scores[order], atol=1e-5)
    assert any(h["path"].endswith("n01440764_tench.JPEG") for h in hits[1:4])  # the fish look alike


def test_query_by_upload_equals_the_library(client, db, store, items, encoder):
    photo = db.parent / "imgs" / "n01443537_goldfish.JPEG"
    doc = client.post("/api/query", files=upload(photo), params={"k": 6}).json()
    hits = doc["hits"]
    assert doc["k"] == 6 and len(hits) == 6 and doc["reranker"] is None
    assert hits[0]["id"] == items[photo.name] and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert set(doc["seconds"]) >= {"load+embed", "search"}
    (ref,) = Searcher.open(store, encoder).query([photo], 6)  # a searcher of its own over the same store
    assert [h["id"] for h in hits] == [h.id for h in ref.hits]
    assert [h["path"] for h in hits] == [h.path for h in ref.hits]
    np.testing.assert_allclose([h["score"] for h in hits], [h.score for h in ref.hits], atol=1e-6)


def test_k_larger_than_the_db_returns_all(client, items):
    doc = client.get(f"/api/items/{items['n01440764_tench.JPEG']}/similar", params={"k": 1000}).json()
    assert doc["k"] == N and len(doc["hits"]) == N and len({h["id"] for h in doc["hits"]}) == N


def test_items_pages_and_filter_match_the_store(client, store):
    listed = [{"id": rec.id, "path": p} for p, rec in store.iter_items()]
    pages, offset = [], 0
    while True:
        doc = client.get("/api/items", params={"offset": offset, "limit": 7}).json()
        assert doc["total"] == N and doc["offset"] == offset and doc["limit"] == 7
        if not doc["items"]:
            break
        pages += doc["items"]
        offset += 7
    assert pages == listed
    doc = client.get("/api/items", params={"q": "GOLD", "limit": 50}).json()
    expected = [i for i in listed if "gold" in i["path"].lower()]
    assert doc["items"] == expected and doc["total"] == len(expected) >= 1  # goldfish (and goldfinch if among them)
    assert client.get("/api/items", params={"q": "no-such-name"}).json() == {"total": 0, "offset": 0, "limit": 50,
                                                                             "items": []}


def test_item_details_are_the_files(client, db, items):
    photo = db.parent / "imgs" / "n01443537_goldfish.JPEG"
    doc = client.get(f"/api/items/{items[photo.name]}").json()
    with Image.open(photo) as im:
        size = im.size
    assert doc["id"] == items[photo.name] and doc["path"] == str(photo) and doc["bytes"] == photo.stat().st_size
    assert (doc["width"], doc["height"]) == size and doc["exists"] is True and len(doc["sha256"]) == 64
    r = client.get(f"/api/items/{items[photo.name]}/image")
    assert r.status_code == 200 and r.content == photo.read_bytes()


def test_thumbnail_is_a_small_jpeg_made_once(client, db, items):
    photo = db.parent / "imgs" / "n01440764_tench.JPEG"
    r = client.get(f"/api/items/{items[photo.name]}/thumbnail")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(r.content))
    with Image.open(photo) as im:
        w, h = im.size
    assert thumb.format == "JPEG" and max(thumb.size) == 256  # the photo is larger than 256 px
    assert thumb.size[0] / thumb.size[1] == pytest.approx(w / h, rel=0.02)
    (cached,) = (db / "thumbnails").glob("*.jpg")
    assert cached.read_bytes() == r.content
    before = cached.stat()
    again = client.get(f"/api/items/{items[photo.name]}/thumbnail")
    after = cached.stat()
    assert again.content == r.content
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # served, not rewritten
    assert not list((db / "thumbnails").glob("*.tmp"))


@pytest.mark.parametrize("url, status, words", [
    ("/api/items/999999", 404, "no item with id 999999"),
    ("/api/items/999999/similar", 404, "no item with id 999999"),
    ("/api/items/999999/thumbnail", 404, "no item"),
    ("/api/items/999999/image", 404, "no item"),
    ("/api/items/-1", 422, "greater than or equal to 0"),
    ("/api/items/99999999999999999999999/image", 422, "less than or equal to"),
    ("/api/items/abc/similar", 422, "valid integer"),
    ("/api/items/0/similar?k=0", 422, "k: Input should be greater than or equal to 1"),
    ("/api/items/0/similar?encoder=nope", 404, "no vectors of encoder 'nope'"),
    ("/api/items/0/similar?encoder=efficientnet-lite2", 404, "no vectors of encoder 'efficientnet-lite2'"),
    ("/api/query?rerank=nope", 405, "Method Not Allowed"),
    ("/api/dupes?encoder=nope", 404, "no vectors of encoder 'nope'"),
    ("/api/items?limit=0", 422, "limit"),
])
def test_errors_are_one_line_json(client, url, status, words):
    r = client.get(url)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and words in detail


def _png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose header says width x height (a decompression bomb's header, CRC fixed)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


def test_bad_uploads_are_4xx_with_the_reason(client, db):
    photo = (db.parent / "imgs" / "n01443537_goldfish.JPEG").read_bytes()
    cases = {
        "not an image": (b"%PDF-1.4 this is not an image at all", "not an image"),
        "truncated": (photo[: len(photo) // 3], "corrupt or truncated"),
        "bomb": (_png_claiming(40_000, 40_000), "too many pixels"),
        "empty": (b"", "upload.jpg"),
    }
    for name, (data, words) in cases.items():
        r = client.post("/api/query", files={"image": ("upload.jpg", data, "image/jpeg")})
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        detail = r.json()["detail"]
        assert words in detail and "\n" not in detail, (name, detail)
        assert "simsearch-upload-" not in detail  # the client's file name, not the server's temp file
    r = client.post("/api/query", data={"other": "x"})
    assert r.status_code == 422 and "image" in r.json()["detail"]


def test_upload_size_is_capped(db, models_dir, tmp_path):
    photo = db.parent / "imgs" / "n01443537_goldfish.JPEG"  # 37 KB
    limit = 50_000
    copy = Path(shutil.copytree(db, tmp_path / "db"))  # one process opens a db once: this app gets a copy
    refused = "upload larger than the server's limit of 50,000 bytes (--max-upload)"
    with TestClient(create_app(ServerConfig(db=copy, models_dir=models_dir, max_upload_bytes=limit))) as c:
        assert c.post("/api/query", files=upload(photo)).status_code == 200
        # over the limit, the body within the multipart slack: refused after parsing, by the file's size
        r = c.post("/api/query", files={"image": ("big.jpg", b"\xff" * (limit + 1000), "image/jpeg")})
        assert r.status_code == 413 and "50,000" in r.json()["detail"]
        # far over: refused by the request's Content-Length before the body is read
        r = c.post("/api/query", files={"image": ("big.jpg", b"\xff" * (limit + MULTIPART_SLACK + 1), "image/jpeg")})
        assert r.status_code == 413 and r.json()["detail"] == refused

        # no Content-Length (chunked): cut off as soon as the body passes the limit
        def chunks():
            yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.jpg\"\r\n\r\n"
            for _ in range(100):
                yield b"\0" * 10_000

        r = c.post("/api/query", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert r.status_code == 413 and r.json()["detail"] == refused
        assert c.get("/api/health").status_code == 200


def test_openapi_lists_the_routes(client):
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) == {
        "/api/health", "/api/info", "/api/query", "/api/items", "/api/items/{item_id}", "/api/items/{item_id}/similar",
        "/api/items/{item_id}/thumbnail", "/api/items/{item_id}/image", "/api/explain", "/api/dupes", "/api/dupes/move",
        "/api/search"}
    assert set(schema["paths"]["/api/explain"]) == {"get", "post"}
    hit = schema["components"]["schemas"]["HitOut"]["properties"]
    assert set(hit) == {"rank", "id", "path", "path_bytes", "score", "rerank_score"}


def test_the_web_page_and_its_files(client):
    page = Path(__file__).resolve().parents[2] / "server" / "static" / "index.html"
    r = client.get("/")
    if page.is_file():
        assert r.status_code == 200 and r.text == page.read_text()
    else:
        assert r.status_code == 404 and "not installed" in r.json()["detail"]
    assert client.get("/static/no-such-file.js").status_code == 404


def test_loopback_addresses():
    assert all(map(is_loopback, ["127.0.0.1", "127.5.5.5", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.10", "example.org"]))


_NO_TORCH = """
import sys
from pathlib import Path
from fastapi.testclient import TestClient
from simsearch.server.app import ServerConfig, create_app
with TestClient(create_app(ServerConfig(db=Path(sys.argv[1])))) as c:
    photo = Path(sys.argv[2])
    r = c.post("/api/query", files={"image": (photo.name, photo.read_bytes(), "image/jpeg")})
    assert r.status_code == 200 and r.json()["hits"], r.text
    assert c.get("/api/items/0/similar").status_code == 200
    assert c.get("/api/items/0/thumbnail").status_code == 200
    assert c.get("/api/explain", params={"a": 0, "b": 1}).status_code == 200
    assert c.get("/api/dupes").status_code == 200
print("torch" in sys.modules)
"""


def test_the_server_never_imports_torch(db):
    photo = db.parent / "imgs" / "n01443537_goldfish.JPEG"
    out = subprocess.run([sys.executable, "-c", _NO_TORCH, str(db), str(photo)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_explain_by_ids_is_the_library_explanation(client, db, items, encoder):
    from simsearch.retrieval.explain import explain_pair

    a, b = db.parent / "imgs" / "n01443537_goldfish.JPEG", db.parent / "imgs" / "n01440764_tench.JPEG"
    r = client.get("/api/explain", params={"a": items[a.name], "b": items[b.name]})
    assert r.status_code == 200, r.text
    doc = r.json()
    ref = explain_pair(encoder, a, b).to_dict()
    assert doc["method"] == ref["method"] == "decomposition" and doc["grid_shape"] == ref["grid_shape"]
    assert doc["score"] == pytest.approx(ref["score"], abs=1e-5)
    np.testing.assert_allclose(doc["grid_a"], ref["grid_a"], atol=1e-6)
    np.testing.assert_allclose(np.sum(doc["grid_b"]), doc["score"], atol=1e-3)  # the exact split sums to the cosine
    png = client.get("/api/explain", params={"a": items[a.name], "b": items[b.name], "format": "png"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).format == "PNG"
    occlusion = client.get("/api/explain", params={"a": items[a.name], "b": items[b.name], "method": "occlusion"})
    assert occlusion.status_code == 200 and occlusion.json()["method"] == "occlusion"


def test_explain_an_upload_against_an_item(client, db, items):
    a, b = db.parent / "imgs" / "n01443537_goldfish.JPEG", db.parent / "imgs" / "n01440764_tench.JPEG"
    by_ids = client.get("/api/explain", params={"a": items[a.name], "b": items[b.name]}).json()
    r = client.post("/api/explain", params={"b": items[b.name]}, files=upload(a))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["score"] == pytest.approx(by_ids["score"], abs=1e-5)
    np.testing.assert_allclose(doc["grid_b"], by_ids["grid_b"], atol=1e-6)
    r = client.post("/api/explain", params={"b": items[b.name], "format": "png"}, files=upload(a))
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
    bad = client.post("/api/explain", params={"b": items[b.name]}, files={"image": ("x.png", b"junk", "image/png")})
    assert bad.status_code == 422 and bad.json()["detail"].startswith("x.png: not an image")
    assert client.get("/api/explain", params={"a": 999999, "b": items[b.name]}).status_code == 404


def test_dupes_are_the_library_groups(client, store, encoder):
    from simsearch.retrieval.dupes import DEFAULT_THRESHOLD, find_duplicates

    doc = client.get("/api/dupes").json()
    assert doc["threshold"] == DEFAULT_THRESHOLD and doc["encoder"] == encoder.spec.name
    assert len(doc["groups"]) == len(find_duplicates(store, encoder.spec.name))
    # a low threshold groups photos that are merely alike (the fish): the same groups as the library's
    doc = client.get("/api/dupes", params={"threshold": 0.5}).json()
    ref = find_duplicates(store, encoder.spec.name, 0.5)
    assert doc["threshold"] == 0.5 and len(doc["groups"]) == len(ref) >= 1
    for got, want in zip(doc["groups"], ref):
        assert got["keeper"]["id"] == want.keeper.id and [o["id"] for o in got["others"]] == [o.id for o in want.others]
        assert got["min_score"] == pytest.approx(want.min_score, abs=1e-6)
        assert got["keeper"]["width"] > 0 and got["keeper"]["bytes"] > 0
    assert client.get("/api/dupes", params={"threshold": 1.5}).status_code == 422


def test_a_name_that_is_not_utf8_is_shown_with_its_bytes():
    from simsearch.indexer.scan import shown_path

    raw = "caf\udce9.jpg"  # b"caf\xe9.jpg" as os.fsdecode gives it
    assert shown_path(raw) == "caf\\xe9.jpg" and shown_path("café.jpg") == "café.jpg"
