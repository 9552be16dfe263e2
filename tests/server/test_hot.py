"""The hot routes (server/hot.py): a plain "similar" or "query" request is answered outside FastAPI, and its answer is
the route's byte for byte; anything else goes on to FastAPI. Each request is sent twice through the real app over a
real db: as it is, and with a field FastAPI ignores (`x=1`), which the hot path declines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from typer.testing import CliRunner

from simsearch.benchmarks.load import multipart
from simsearch.cli import app
from simsearch.server import hot
from simsearch.server.app import ServerConfig, create_app

from ..conftest import copy_samples
from .test_api import build_db

CAP = 400_000  # bytes: above every photo uploaded here, below the junk that must get the 413


@pytest.fixture(scope="module")
def site(tmp_path_factory, encoder, models_dir):
    db = build_db(tmp_path_factory.mktemp("hot"), encoder)
    with TestClient(create_app(ServerConfig(db=db, models_dir=models_dir, max_upload_bytes=CAP))) as client:
        client.get("/api/health")  # builds the middleware stack
        yield db, client


@pytest.fixture
def taken(site, monkeypatch) -> list[str]:
    """The paths of the requests the hot path answered (HotRoutes.answer wrapped to note them)."""
    _, client = site
    node = client.app.middleware_stack
    while not isinstance(node, hot.HotRoutes):
        node = node.app
    seen: list[str] = []
    answer = node.answer

    async def noted(scope, *args, **kwargs):
        seen.append(scope["path"])
        return await answer(scope, *args, **kwargs)

    monkeypatch.setattr(node, "answer", noted)
    return seen


def photo(db: Path, name: str = "n01443537_goldfish.JPEG") -> bytes:
    return (db.parent / "imgs" / name).read_bytes()


def both_ways(client: TestClient, taken: list[str], method: str, url: str, **kwargs) -> tuple:
    """(hot answer, FastAPI's answer) to the same request; the first must be taken, the second not."""
    before = len(taken)
    fast = client.request(method, url, **kwargs)
    assert len(taken) == before + 1, url
    slow = client.request(method, url + ("&" if "?" in url else "?") + "x=1", **kwargs)
    assert len(taken) == before + 1, url
    return fast, slow


def same_answer(fast, slow, drop: tuple[str, ...] = ()) -> dict:
    assert fast.status_code == slow.status_code
    assert fast.headers["content-type"] == slow.headers["content-type"]
    if not drop:
        assert fast.content == slow.content
    a, b = fast.json(), slow.json()
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}
    return a


def test_similar_is_the_routes_answer(site, taken):
    db, client = site
    encoder = client.get("/api/info").json()["default_encoder"]
    for url in ("/api/items/1/similar", "/api/items/1/similar?k=5", "/api/items/0/similar?k=1000",
                f"/api/items/7/similar?encoder={encoder}&k=3", f"/api/items/7/similar?k=3&encoder={encoder}"):
        doc = same_answer(*both_ways(client, taken, "GET", url))
        assert doc["hits"] and doc["hits"][0]["id"] == doc["query_id"]
    # an id the db does not hold: the library's error, as the route sends it
    fast, slow = both_ways(client, taken, "GET", "/api/items/999999/similar?k=2")
    assert same_answer(fast, slow) == {"detail": "no item with id 999999 in the db"} and fast.status_code == 404


@pytest.mark.parametrize("url", [
    "/api/items/01/similar", "/api/items/1/similar?k=010", "/api/items/1/similar?k=0", "/api/items/1/similar?k=1001",
    "/api/items/1/similar?k=3&k=4", "/api/items/1/similar?k=%33", "/api/items/1/similar?k=+3",
    "/api/items/1/similar?encoder=", "/api/items/1/similar?encoder=nope", "/api/items/1/similar?K=3",
    "/api/items/9223372036854775808/similar", "/api/items/1/similar/", "/api/items/-1/similar"])
def test_anything_else_is_fastapis(site, taken, url):
    """Requests not in the plain form reach FastAPI, which coerces, refuses or answers them as before."""
    _, client = site
    r = client.get(url, follow_redirects=False)
    assert taken == [] and r.status_code in (200, 307, 404, 422), (url, r.status_code)


def test_an_upload_is_the_routes_answer(site, taken):
    db, client = site
    for name, data in (("goldfish.jpg", photo(db)), ("göldfish fünf.jpg", photo(db)),
                       ("tench.JPEG", photo(db, "n01440764_tench.JPEG"))):
        body, headers = multipart("image", name, data)
        for url in ("/api/query", "/api/query?k=4"):
            doc = same_answer(*both_ways(client, taken, "POST", url, content=body, headers=headers), drop=("seconds",))
            assert doc["terms"] == [{"kind": "image", "value": name, "weight": 1.0}]
            assert doc["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)  # the photo itself, indexed
    # refused uploads: not an image (422, named by the client's file name) and over the cap (413)
    for data, status, words in ((b"not an image", 422, "junk.png"), (b"\xff" * (CAP + 1000), 413, "larger than")):
        body, headers = multipart("image", "junk.png", data)
        fast, slow = both_ways(client, taken, "POST", "/api/query", content=body, headers=headers)
        assert fast.status_code == status and words in same_answer(fast, slow)["detail"]


def test_an_upload_of_another_shape_is_read_once_and_handed_on(site, taken):
    """A body the hot path reads but does not take (two parts) reaches FastAPI whole."""
    db, client = site
    plain, headers = multipart("image", "goldfish.jpg", photo(db))
    boundary = headers["Content-Type"].split("boundary=")[1].encode()
    two_parts = plain.replace(b"--" + boundary + b"--", b"--" + boundary + b'\r\nContent-Disposition: form-data; '
                              b'name="note"\r\n\r\nhello\r\n--' + boundary + b"--")
    r = client.post("/api/query?k=3", content=two_parts, headers=headers)
    assert taken == [] and r.status_code == 200
    assert r.json()["hits"] == client.post("/api/query?k=3", content=plain, headers=headers).json()["hits"]
    assert taken == ["/api/query"]


BOUNDARY = b"b0und"
PART = b'Content-Disposition: form-data; name="image"; filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\nDATA'


@pytest.mark.parametrize("body, expected", [
    (b"--b0und\r\n" + PART + b"\r\n--b0und--\r\n", ("a.jpg", b"DATA")),
    (b"--b0und\r\n" + PART + b"\r\n--b0und--", ("a.jpg", b"DATA")),
    (b'--b0und\r\ncontent-disposition: form-data; name="image"; filename="\xc3\xa9.jpg"\r\n\r\n\r\n--b0und--',
     ("\u00e9.jpg", b"")),
    (b'--b0und\r\nContent-Disposition: form-data; name="image"; filename="\xe9.jpg"\r\n\r\nx\r\n--b0und--',
     ("\u00e9.jpg", b"x")),  # not UTF-8: Latin-1, as Starlette decodes it
    (b"preamble\r\n--b0und\r\n" + PART + b"\r\n--b0und--", None),
    (b"--b0und\r\n" + PART + b"\r\n--b0und\r\n" + PART + b"\r\n--b0und--", None),
    (b"--b0und\r\n" + PART.replace(b'name="image"', b'name="photo"') + b"\r\n--b0und--", None),
    (b"--b0und\r\n" + PART.replace(b'name="image"', b'NAME="image"') + b"\r\n--b0und--", None),
    (b"--b0und\r\n" + PART.replace(b'"a.jpg"', b'"a\\".jpg"') + b"\r\n--b0und--", None),
    (b"--b0und\r\n" + PART.replace(b'"a.jpg"', b'"C:\\\\a.jpg"') + b"\r\n--b0und--", None),
    (b"--b0und\r\n" + PART.replace(b'filename="a.jpg"', b"filename*=UTF-8''a.jpg") + b"\r\n--b0und--", None),
    (b"--b0und\r\n" + PART.replace(b"Content-Type: image/jpeg", b"X-Other: 1") + b"\r\n--b0und--", None),
    (b"--b0und\r\n" + PART + b"\r\n--b0und--\r\nepilogue", None),
    (b"--b0und\r\n" + PART + b"\r\n--b0und", None),
])
def test_single_image_takes_one_plain_part_only(body, expected):
    assert hot.single_image(body, BOUNDARY) == expected


@pytest.mark.parametrize("query, expected", [
    (b"", (10, None)), (b"k=7", (7, None)), (b"k=1000&encoder=a.b-c_d", (1000, "a.b-c_d")),
    (b"encoder=x&k=1", (1, "x")), (b"k=1001", None), (b"k=07", None), (b"k=", None), (b"k=3&k=3", None),
    (b"encoder=", None), (b"encoder=a%20b", None), (b"k=3&x=1", None), (b"k=3&", None), (b"k", None),
    (b"rerank=m", None), (b"text=dog", None)])
def test_plain_fields(query, expected):
    assert hot.plain_fields(query) == expected


@pytest.mark.parametrize("value, expected", [
    (b"multipart/form-data; boundary=abc", b"abc"),
    (b"Multipart/Form-Data; boundary=a'()+_,./:=?-z", b"a'()+_,./:=?-z"),
    (b"multipart/form-data; boundary=abc; charset=latin-1", None), (b'multipart/form-data; boundary="abc"', None),
    (b"multipart/form-data; Boundary=abc", None), (b"application/octet-stream", None)])
def test_boundary_of(value, expected):
    assert hot.boundary_of([(b"host", b"x"), (b"content-type", value)]) == expected
    assert hot.boundary_of([(b"content-type", value), (b"content-type", value)]) is None


def test_a_refresh_to_follow_is_left_to_fastapi(site, taken):
    """Library.ready: while the db differs from what the server last followed, nothing is answered on the event loop
    (the route follows the writer first)."""
    db, client = site
    lib = client.app.state.library
    assert lib.ready(None) == (lib.searcher(None), True)  # a FAISS index: searched in this process
    seen = lib._seen
    lib._seen = (seen[0] - 1, seen[1])  # as if a writer had published since
    try:
        assert lib.ready(None) is None
        r = client.get("/api/items/1/similar?k=2")
        assert r.status_code == 200 and taken == []
        assert lib._seen == seen  # the route followed the db
        client.get("/api/items/1/similar?k=2")
        assert taken == ["/api/items/1/similar"]
    finally:
        lib._seen = seen
    assert json.loads(client.get("/api/health").content)["status"] == "ok"


def test_an_index_another_process_serves_is_searched_off_the_event_loop(tmp_path, models_dir, monkeypatch):
    """Milvus (here Milvus Lite, a process serving <db>/milvus.db): the loop never waits on it; the answers are the
    route's all the same."""
    pytest.importorskip("milvus_lite", reason="the milvus extra is not installed")
    copy_samples(tmp_path / "imgs", 6)
    result = CliRunner().invoke(app, ["index", str(tmp_path / "imgs"), "--db", str(tmp_path / "db"), "--backend",
                                      "milvus"])
    assert result.exit_code == 0, result.output
    with TestClient(create_app(ServerConfig(db=tmp_path / "db", models_dir=models_dir))) as client:
        client.get("/api/health")
        lib = client.app.state.library
        assert lib.ready(None) == (lib.searcher(None), False)
        node = client.app.middleware_stack
        while not isinstance(node, hot.HotRoutes):
            node = node.app
        threads: list[bool] = []
        answer = node.answer

        async def noted(*args, thread=False, **kwargs):
            threads.append(thread)
            return await answer(*args, thread=thread, **kwargs)

        monkeypatch.setattr(node, "answer", noted)
        fast, slow = client.get("/api/items/2/similar?k=3"), client.get("/api/items/2/similar?k=3&x=1")
        assert threads == [True] and same_answer(fast, slow)["hits"][0]["id"] == 2
