"""POST /api/dupes/move on real copies in tmp_path: the real app over a real db (ONNX Runtime, FAISS, LMDB); the
groups come from GET /api/dupes; every file is accounted for on disk afterwards (moved, never deleted, never
overwritten), and the db is unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from simsearch.indexer.pipeline import Indexer
from simsearch.indexer.store import Store
from simsearch.retrieval.backend import refresh
from simsearch.server.app import ServerConfig, create_app

from ..conftest import sample_paths

LOOPBACK = ("127.0.0.1", 50000)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under root."""
    return {str(p.relative_to(root)): _digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def served(tmp_path, encoder, models_dir):
    """Photos a/ (4 originals), b/ and c/ (exact copies of the first under its own name); the db; a client from
    loopback. Yields (client, photos folder, first photo's name)."""
    photos = tmp_path / "photos"
    originals = sample_paths(4)
    (photos / "a").mkdir(parents=True)
    for p in originals:
        shutil.copy2(p, photos / "a" / p.name)
    for sub in "bc":
        (photos / sub).mkdir()
        shutil.copy2(originals[0], photos / sub / originals[0].name)
    with Store(tmp_path / "db", create=True) as store:
        Indexer(encoder, store).run(photos)
        refresh(store, encoder.spec.name)
    app = create_app(ServerConfig(db=tmp_path / "db", models_dir=models_dir))
    with TestClient(app, base_url="http://127.0.0.1:8000", client=LOOPBACK) as client:
        yield client, photos, originals[0].name


def _exact_group(client, name: str) -> dict:
    groups = client.get("/api/dupes").json()["groups"]
    (group,) = [g for g in groups if Path(g["keeper"]["path"]).name == name]
    assert group["tier"] == "exact" and len(group["others"]) == 2
    return group


def test_the_others_are_moved_with_suffixes_and_nothing_is_lost(served, tmp_path):
    client, photos, name = served
    group = _exact_group(client, name)
    before = _files(photos)
    db_before = _files(tmp_path / "db")
    dest = tmp_path / "out" / "dupes"  # not there yet: made
    dest.mkdir(parents=True)
    (dest / name).write_bytes(b"a file of the user's, already there")  # the name is taken: never overwritten
    others = [o["id"] for o in group["others"]]
    r = client.post("/api/dupes/move", json={"destination": str(dest), "groups": [
        {"keep": group["keeper"]["id"], "move": others}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["destination"] == str(dest.resolve()) and body["failed"] == []
    assert [m["id"] for m in body["moved"]] == others
    stem, ext = os.path.splitext(name)
    assert [Path(m["to"]).name for m in body["moved"]] == [f"{stem}-1{ext}", f"{stem}-2{ext}"]
    for m, o in zip(body["moved"], group["others"]):
        assert m["path"] == o["path"] and not Path(o["path"]).exists()
        assert _digest(Path(m["to"])) == before[str(Path(o["path"]).relative_to(photos))]
    assert Path(group["keeper"]["path"]).is_file()  # the keeper stays
    assert (dest / name).read_bytes() == b"a file of the user's, already there"
    # Every file is somewhere: the photos left plus the moved ones are the photos before.
    after = _files(photos)
    assert sorted([*after.values(), *(_digest(Path(m["to"])) for m in body["moved"])]) == sorted(before.values())
    assert len(after) == len(before) - 2
    # The db is not written: the next `simsearch index` sees the files gone.
    assert _files(tmp_path / "db") == db_before
    # Moved again: those items' files are gone now, reported one by one, nothing else touched.
    again = client.post("/api/dupes/move", json={"destination": str(dest), "groups": [
        {"keep": group["keeper"]["id"], "move": others}]}).json()
    assert again["moved"] == [] and [f["reason"] for f in again["failed"]] == ["its file is gone"] * 2


def test_refused_requests_move_nothing(served, tmp_path):
    client, photos, name = served
    group = _exact_group(client, name)
    keep, others = group["keeper"]["id"], [o["id"] for o in group["others"]]
    plan = [{"keep": keep, "move": others}]
    before = _files(photos)
    refused = [
        ("relative/folder", 400, "give an absolute folder path"),
        (str(tmp_path / "db"), 400, "inside the db"),
        (str(tmp_path / "db" / "sub"), 400, "inside the db"),
        (str(photos / "a" / name), 400, "cannot make the folder"),  # a file, not a folder
        (str(photos / "a" / name / "sub"), 400, "cannot make the folder"),
    ]
    for dest, status, text in refused:
        r = client.post("/api/dupes/move", json={"destination": dest, "groups": plan})
        assert r.status_code == status and text in r.json()["detail"], (dest, r.text)
    assert not (tmp_path / "db" / "sub").exists()
    dest = str(tmp_path / "out")
    r = client.post("/api/dupes/move", json={"destination": dest, "groups": [{"keep": keep, "move": [keep]}]})
    assert r.status_code == 400 and "a keeper is never moved" in r.json()["detail"]
    for body in ({"destination": dest}, {"destination": dest, "groups": []},
                 {"destination": dest, "groups": [{"keep": keep, "move": []}]},
                 {"destination": dest, "groups": plan, "path": str(photos / "a" / name)},
                 {"destination": dest, "groups": [{"keep": keep, "move": [str(photos / "a" / name)]}]}):
        assert client.post("/api/dupes/move", json=body).status_code == 422, body
    # From another machine (TestClient's default client is not loopback; no `with`: the app's lifespan is ours), at
    # a name that is not loopback (another site's name rebound to 127.0.0.1), from another site's page: 403. A
    # cross-site form can post only text/plain: not JSON, 422.
    r = TestClient(client.app, base_url="http://127.0.0.1:8000").post(
        "/api/dupes/move", json={"destination": dest, "groups": plan})
    assert r.status_code == 403 and "from this machine" in r.json()["detail"]
    for headers, text in (({"Host": "evil.example:8000"}, "at a loopback address"),
                          ({"Origin": "http://evil.example"}, "another origin"),
                          ({"Origin": "http://127.0.0.1:9999"}, "another origin")):
        r = client.post("/api/dupes/move", json={"destination": dest, "groups": plan}, headers=headers)
        assert r.status_code == 403 and text in r.json()["detail"], (headers, r.text)
    r = client.post("/api/dupes/move", json={"destination": dest, "groups": plan},
                    headers={"Origin": "http://127.0.0.1:8000"})  # the page's own origin: moved
    assert r.status_code == 200 and len(r.json()["moved"]) == 2
    for m in r.json()["moved"]:  # put back for the rest of the test
        os.rename(m["to"], m["path"])
    shutil.rmtree(dest)
    r = client.post("/api/dupes/move", content=json.dumps({"destination": dest, "groups": plan}),
                    headers={"Content-Type": "text/plain"})
    assert r.status_code == 422
    assert _files(photos) == before and not Path(dest).exists()

    # Per item: an id the db does not hold, a file changed since it was indexed, and a group whose keeper is gone
    # fail with their reasons; the rest moves.
    changed = Path(group["others"][0]["path"])
    changed.write_bytes(changed.read_bytes() + b"\0")
    items = {Path(p).relative_to(photos).as_posix(): i for p, i in
             ((it["path"], it["id"]) for it in client.get("/api/items?limit=100").json()["items"])}
    gone_keeper = items[f"a/{sample_paths(4)[1].name}"]
    orphan = items[f"a/{sample_paths(4)[2].name}"]
    os.rename(photos / "a" / sample_paths(4)[1].name, tmp_path / "elsewhere.jpg")
    r = client.post("/api/dupes/move", json={"destination": dest, "groups": [
        {"keep": keep, "move": [*others, 999_999]}, {"keep": gone_keeper, "move": [orphan]}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [m["id"] for m in body["moved"]] == [others[1]]
    assert {f["id"]: f["reason"] for f in body["failed"]} == {
        others[0]: "its file changed since it was indexed: run `simsearch index` and look again",
        999_999: "no item with id 999999 in the db",
        orphan: f"the group's keeper (item {gone_keeper}) is gone: its copies stay"}
    assert changed.is_file() and (photos / "a" / sample_paths(4)[2].name).is_file()
