"""The `simsearch` command: a thin typer layer that parses, calls the library, and renders.

Results go to stdout, progress and logs to stderr. A SimsearchError (a user mistake or bad input)
becomes one line on stderr and exit code 1, never a traceback. Library modules are imported inside
the commands so `simsearch --help` and `simsearch query` stay fast (and the latter free of torch).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Column, Table

from simsearch.devices import Device
from simsearch.errors import SimsearchError

app = typer.Typer(
    help="Image-similarity search: index a folder, find the images that look like this one.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)
log = logging.getLogger("simsearch")

DbOption = Annotated[Path, typer.Option("--db", envvar="SIMSEARCH_DB", help="db folder (embedded, no server).")]
DeviceOption = Annotated[Device, typer.Option("--device", help="auto | cpu | cuda (falls back to cpu with a warning).")]
ModelsDirOption = Annotated[
    Optional[Path], typer.Option("--models-dir", envvar="SIMSEARCH_MODELS_DIR", help="cache of ONNX models.")
]
DEFAULT_DB = Path(".simsearch")


def _setup_logging() -> None:
    if err.is_terminal:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=err, show_path=False, show_time=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("simsearch").setLevel(logging.INFO)


@app.callback()
def _main():
    _setup_logging()


def _verbose(on: bool) -> None:
    if on:
        logging.getLogger("simsearch").setLevel(logging.DEBUG)


def user_errors(fn):
    """Turn SimsearchError into a one-line message and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SimsearchError as e:
            err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


class _ProgressReporter:
    """A rich bar on a terminal; a log line every few seconds otherwise (CI logs, pipes)."""

    def __init__(self, label: str, every_seconds: float = 5.0):
        self.label = label
        self.every = every_seconds
        self.bar = None
        self.task = None
        self.last = 0.0
        if err.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                console=err, transient=True)

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()

    def __call__(self, done: int, total: int) -> None:
        if self.bar:
            if self.task is None:
                self.task = self.bar.add_task(self.label, total=total)
            self.bar.update(self.task, completed=done, total=total)
        elif time.monotonic() - self.last >= self.every or done == total:
            self.last = time.monotonic()
            log.info("%s: %d/%d", self.label, done, total)


@app.command()
@user_errors
def index(
    folder: Annotated[Path, typer.Argument(help="folder of images (searched recursively).")],
    db: DbOption = DEFAULT_DB,
    encoder: Annotated[str, typer.Option(help="encoder name (see `simsearch encoders`).")] = "efficientnet-lite0",
    batch_size: Annotated[int, typer.Option(min=1, help="images per encoder batch.")] = 32,
    workers: Annotated[int, typer.Option(min=0, help="decode threads (0 = one per core).")] = 0,
    index_kind: Annotated[str, typer.Option(
        "--index", help="FAISS index: auto (exact up to 10,000 vectors, IVF above), flat, ivf.")] = "auto",
    device: DeviceOption = Device.auto,
    models_dir: ModelsDirOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logs and time per stage.")] = False,
):
    """Index (or update) a folder: embed only new or changed images, drop deleted ones."""
    _verbose(verbose)
    from simsearch.encoders.runtime import OnnxEncoder
    from simsearch.encoders.spec import get_encoder
    from simsearch.indexer.pipeline import Indexer, IndexerConfig
    from simsearch.indexer.store import Store
    from simsearch.retrieval.faiss_index import IndexConfig

    if not folder.exists():
        raise SimsearchError(f"{folder}: no such file or folder")
    config = IndexerConfig(batch_size=batch_size, workers=workers, index=IndexConfig(kind=index_kind))
    config.index.resolve(0)  # an unknown kind fails before any work
    spec = get_encoder(encoder)
    enc = OnnxEncoder(spec, device, models_dir)
    with Store(db, create=True) as store, _ProgressReporter(f"indexing with {spec.name}") as progress:
        report = Indexer(enc, store, config).run(folder, progress)
    _print_index_report(report, verbose)


def _print_index_report(report, verbose: bool) -> None:
    if report.embedded == 0 and report.reused == 0 and report.removed == 0:
        summary = f"nothing to embed: {report.unchanged} unchanged"
    else:
        summary = (f"embedded {report.embedded} ({report.images_per_second:.1f} img/s), "
                   f"reused {report.reused}, unchanged {report.unchanged}, removed {report.removed}")
    err.print(f"[green]done[/green] in {report.wall:.1f}s: {summary}, skipped {len(report.skipped)}; "
              f"{report.total_items} items in the db", highlight=False)
    for path, reason in report.skipped:
        err.print(f"  [yellow]skipped[/yellow] {reason}", highlight=False, soft_wrap=True)
    if verbose:
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in report.seconds.items())
        err.print(f"time per stage: {stages} (read+decode summed over worker threads)", highlight=False)


@app.command()
@user_errors
def query(
    images: Annotated[list[Path], typer.Argument(help="query image(s).")],
    k: Annotated[int, typer.Option("-k", "--k", help="number of results.")] = 10,
    db: DbOption = DEFAULT_DB,
    encoder: Annotated[Optional[str], typer.Option(help="encoder (default: the db's first).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document on stdout.")] = False,
    device: DeviceOption = Device.auto,
    models_dir: ModelsDirOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logs and time per stage.")] = False,
):
    """Find the k images in the db most similar to each query image."""
    _verbose(verbose)
    from simsearch.retrieval.search import Searcher

    if k < 1:
        raise SimsearchError(f"-k must be at least 1 (got {k})")
    for p in images:
        if not p.is_file():
            raise SimsearchError(f"{p}: no such file")
    searcher = Searcher.open(db, encoder, device, models_dir)
    results = searcher.query(images, k)
    if as_json:
        doc = {
            "encoder": searcher.encoder.spec.name,
            "k": k,
            "results": [
                {"query": r.query, "hits": [{"rank": h.rank, "score": h.score, "path": h.path} for h in r.hits],
                 "seconds": r.seconds}
                for r in results
            ],
        }
        print(json.dumps(doc, indent=2))
        return
    for r in results:
        table = Table(title=f"{r.query}  ({searcher.encoder.spec.name})", title_justify="left")
        table.add_column("rank", justify="right")
        table.add_column("score", justify="right")
        table.add_column("path", overflow="fold")
        for h in r.hits:
            table.add_row(str(h.rank), f"{h.score:.4f}", h.path)
        out.print(table)
        if verbose:
            err.print(", ".join(f"{s} {v * 1000:.1f} ms" for s, v in r.seconds.items()), highlight=False)


@app.command()
@user_errors
def info(db: DbOption = DEFAULT_DB, as_json: Annotated[bool, typer.Option("--json")] = False):
    """What the db holds: items, encoders, dimensions, index types, size on disk."""
    from simsearch.indexer.store import Store

    with Store(db, readonly=True) as store:
        generation = store.generation
        doc = {
            "db": str(store.root.absolute()),
            "schema_version": store.manifest.schema_version,
            "items": store.item_count(),
            "default_encoder": store.manifest.default_encoder,
            "encoders": {
                name: {"dim": e.dim, "metric": e.metric, "index_type": e.index_type, "vectors_in_index": e.count,
                       "weights": e.key, "index_up_to_date": e.index_generation == generation}
                for name, e in store.manifest.encoders.items()
            },
            "size_on_disk_bytes": store.size_on_disk(),
        }
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    out.print(f"db [bold]{doc['db']}[/bold] (schema {doc['schema_version']}): {doc['items']} items, "
              f"{doc['size_on_disk_bytes'] / 2**20:.1f} MiB on disk", highlight=False)
    table = Table("dim", "metric", "index", "vectors", "up to date")
    table.columns.insert(0, Column("encoder", no_wrap=True))
    for name, e in doc["encoders"].items():
        default = " (default)" if name == doc["default_encoder"] else ""
        table.add_row(name + default, str(e["dim"]), e["metric"], e["index_type"], str(e["vectors_in_index"]),
                      "yes" if e["index_up_to_date"] else "no: re-run index")
    out.print(table)


@app.command()
def encoders(models_dir: ModelsDirOption = None):
    """The registered encoders: dimension, input size, source of the weights."""
    from simsearch.encoders.export import default_models_dir, onnx_path
    from simsearch.encoders.spec import list_encoders

    table = Table("dim", "input", "weights sha256", "source", "ONNX cached")
    table.columns.insert(0, Column("name", no_wrap=True))
    for spec in list_encoders():
        cached = onnx_path(spec, models_dir or default_models_dir()).is_file()
        table.add_row(spec.name, str(spec.dim), f"{spec.image_size} px", spec.weights_sha256[:12], spec.source,
                      "yes" if cached else "on first use")
    out.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
