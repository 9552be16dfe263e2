"""The CLI end to end through typer's CliRunner, on real photos, with the real ONNX model and FAISS."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from simsearch.cli import app
from simsearch.encoders.registry import default_encoder
from simsearch.indexer.store import MANIFEST

from .conftest import SAMPLES, copy_samples

DEFAULT = default_encoder()  # what a command uses when no --encoder is given (int8 where it is faster)
runner = CliRunner()


@pytest.fixture(scope="module")
def db(tmp_path_factory, models_dir):
    """A db of 40 photos including the goldfish (n01443537) and the tench (n01440764)."""
    root = tmp_path_factory.mktemp("cli")
    copy_samples(root / "imgs", 40)
    result = runner.invoke(app, ["index", str(root / "imgs"), "--db", str(root / "db")])
    assert result.exit_code == 0, result.output
    return root


def test_index_summary_and_rerun_embeds_nothing(db):
    result = runner.invoke(app, ["index", str(db / "imgs"), "--db", str(db / "db")])
    assert result.exit_code == 0
    assert "nothing to embed: 40 unchanged" in result.output


def test_query_goldfish_finds_itself_then_the_tench(db):
    goldfish = db / "imgs" / "n01443537_goldfish.JPEG"
    result = runner.invoke(app, ["query", str(goldfish), "-k", "5", "--db", str(db / "db"), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    hits = doc["results"][0]["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert hits[0]["path"] == str(goldfish) and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert any("n01440764_tench" in h["path"] for h in hits[1:4])
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))


def test_query_table(db):
    result = runner.invoke(app, ["query", str(db / "imgs" / "n01443537_goldfish.JPEG"), "-k", "3", "--db", str(db / "db")])
    assert result.exit_code == 0
    assert "rank" in result.stdout and "1.0000" in result.stdout and "tench" in result.stdout


def test_info_and_encoders(db):
    result = runner.invoke(app, ["info", "--db", str(db / "db"), "--json"])
    doc = json.loads(result.stdout)
    assert doc["items"] == 40 and doc["default_encoder"] == DEFAULT
    enc = doc["encoders"][DEFAULT]
    assert enc == {**enc, "dim": 1280, "index_type": "flat", "vectors_in_index": 40, "index_up_to_date": True}
    assert doc["size_on_disk_bytes"] > 40 * 1280 * 4
    result = runner.invoke(app, ["encoders"])
    assert result.exit_code == 0 and "efficientnet-lite2" in result.output and "260 px" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["query", "{img}", "--db", "{tmp}/nodb"], "no simsearch db"),
        (["query", "{tmp}/missing.jpg", "--db", "{db}"], "no such file"),
        (["query", "{img}", "-k", "0", "--db", "{db}"], "at least 1"),
        (["query", "{img}", "--db", "{db}", "--encoder", "nope"], "unknown encoder 'nope'"),
        (["query", "{img}", "--db", "{db}", "--encoder", "efficientnet-lite2"], "no vectors of encoder"),
        (["index", "{tmp}/nofolder", "--db", "{db}"], "no such file or folder"),
        (["index", "{tmp}", "--db", "{db}", "--encoder", "nope"], "unknown encoder"),
        (["index", "{tmp}", "--db", "{db}", "--index", "annoy"], "unknown index kind 'annoy'"),
        (["index", "{tmp}", "--db", "{db}", "--max-index-memory", "lots"], "not a memory size"),
        (["info", "--db", "{tmp}/nodb"], "no simsearch db"),
    ],
)
def test_user_mistakes_give_one_line_and_nonzero_exit(db, tmp_path, args, message):
    fmt = {"img": str(db / "imgs" / "n01443537_goldfish.JPEG"), "tmp": str(tmp_path), "db": str(db / "db")}
    result = runner.invoke(app, [a.format(**fmt) for a in args])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert result.output.strip().startswith("error:")


def test_query_with_a_corrupt_image_is_a_clear_error(db, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    result = runner.invoke(app, ["query", str(bad), "--db", str(db / "db")])
    assert result.exit_code == 1 and "not an image" in result.output and str(bad) in result.output


def test_changing_the_index_kind_rebuilds_without_embedding(tmp_path, db):
    copy = tmp_path / "db"
    subprocess.run(["cp", "-r", str(db / "db"), str(copy)], check=True)
    result = runner.invoke(app, ["index", str(db / "imgs"), "--db", str(copy), "--index", "ivf"])
    assert result.exit_code == 0 and "nothing to embed" in result.output
    info = json.loads(runner.invoke(app, ["info", "--db", str(copy), "--json"]).stdout)
    enc = info["encoders"][DEFAULT]
    assert (enc["index_type"], enc["index_params"]) == ("ivf", {"nlist": 1, "nprobe": 1})  # 40 vectors: one list
    assert enc["recall_at_10"] == 1.0 and enc["recall_target"] == 0.95
    goldfish = db / "imgs" / "n01443537_goldfish.JPEG"
    doc = json.loads(runner.invoke(app, ["query", str(goldfish), "-k", "3", "--db", str(copy), "--json"]).stdout)
    assert doc["results"][0]["hits"][0]["path"] == str(goldfish)


def test_newer_schema_is_refused(tmp_path, db):
    copy = tmp_path / "db"
    subprocess.run(["cp", "-r", str(db / "db"), str(copy)], check=True)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["schema_version"] = 99
    (copy / MANIFEST).write_text(json.dumps(manifest))
    result = runner.invoke(app, ["query", str(db / "imgs" / "n01443537_goldfish.JPEG"), "--db", str(copy)])
    assert result.exit_code == 1 and "newer simsearch (schema 99" in result.output


def test_query_process_does_not_import_torch(db):
    code = (
        "import sys\n"
        "from simsearch.cli import main\n"
        f"sys.argv = ['simsearch', 'query', {str(SAMPLES / 'n01443537_goldfish.JPEG')!r}, '-k', '3', '--db', {str(db / 'db')!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'onnx', 'onnxscript'})\n"
        "assert not heavy, heavy\n"
        "assert 'onnxruntime' in sys.modules and 'faiss' in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "goldfish" in proc.stdout
