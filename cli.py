"""The `simsearch` command: a thin typer layer that parses, calls the library, and renders.

Results go to stdout, progress and logs to stderr. A SimsearchError (a user mistake or bad input)
becomes one line on stderr and exit code 1, never a traceback. Library modules are imported inside
the commands so `simsearch --help` and `simsearch query` stay fast (and the latter free of torch).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import sys
import time
import typing
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from simsearch.devices import Device
from simsearch.encoders.spec import Preprocess
from simsearch.errors import SimsearchError
from simsearch.retrieval.backend import BACKENDS
from simsearch.training.configs import BarlowConfig, BeitPairConfig, MatchNetConfig, TripletConfig, WhiteningConfig

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
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="debug logs and time per stage.")]
# Benchmark and training commands
DataOption = Annotated[Optional[Path], typer.Option(
    "--data", help="class dataset or pair folder (left/ <-> right/); default: $SIMSEARCH_DATA, else "
                   "tiny-imagenet-200 in the shared/data folder beside a checkout of simsearch.")]
TrainDataOption = Annotated[Optional[Path], typer.Option(
    "--data", help="your images: a class dataset (<class>/<image> folders or the Tiny ImageNet layout) or a pair "
                   "folder (left/ <-> right/); default: $SIMSEARCH_DATA.")]


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is when a record is emitted: a caller that swaps stderr for a while (a test
    runner, a notebook) and closes its stand-in never leaves logging writing to a closed file."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _setup_logging() -> None:
    if err.is_terminal:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=err, show_path=False, show_time=False)
    else:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("simsearch").setLevel(logging.INFO)


@app.callback()
def _main():
    _setup_logging()


def _verbose(on: bool) -> None:
    if on:
        logging.getLogger("simsearch").setLevel(logging.DEBUG)


def shown(text: object) -> str:
    """A user string as it may be printed: rich markup escaped (`holiday [edited].jpg`), and the bytes
    of a file name that is not valid UTF-8 (surrogate escapes) shown as `\\xe9`."""
    from simsearch.indexer.scan import shown_path

    return escape(shown_path(str(text)))


def user_errors(fn):
    """Turn SimsearchError into a one-line message and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import lmdb

        try:
            return fn(*args, **kwargs)
        except SimsearchError as e:
            err.print(f"[red]error:[/red] {shown(e)}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except lmdb.Error as e:  # damage LMDB reports only on a read deep in the store
            err.print(f"[red]error:[/red] the db's LMDB store is damaged ({shown(e)}): see `simsearch check`",
                      highlight=False, soft_wrap=True)
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

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
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

    def stage(self, label: str, done: int, total: int) -> None:
        """Progress of a multi-stage job: a new label starts a new bar (or log prefix)."""
        if label != self.label:
            self.label, self.task = label, None
        self(done, total)


EncoderOption = Annotated[Optional[str], typer.Option(
    help="encoder name (see `simsearch encoders`); default: efficientnet-lite0-int8 where this CPU runs int8 faster "
         "(x86 with AVX2 or VNNI, ARM with dot product), else efficientnet-lite0.")]

PreprocessOption = Annotated[Optional[Preprocess], typer.Option(
    help="how an image becomes the encoder's square input: resize (the whole image, stretched), pad (the whole "
         "image, letterboxed), crop (the centre); default: the encoder's own (`simsearch encoders`).")]

NoWaitOption = Annotated[bool, typer.Option(
    "--no-wait", help="fail at once if another simsearch is writing to the db (default: wait for it).")]


@app.command()
@user_errors
def index(
    folder: Annotated[Path, typer.Argument(help="folder of images (searched recursively).")],
    db: DbOption = DEFAULT_DB,
    encoder: EncoderOption = None,
    preprocess: PreprocessOption = None,
    batch_size: Annotated[int, typer.Option(min=1, help="images per encoder batch.")] = 32,
    workers: Annotated[int, typer.Option(min=0, help="decode threads (0 = one per core).")] = 0,
    index_kind: Annotated[str, typer.Option(
        "--index", help="FAISS index: auto (chosen by collection size and --max-index-memory: see docs/scale.md), flat, "
                        "ivf, sq8, ivfpq, hnsw.")] = "auto",
    max_index_memory: Annotated[Optional[str], typer.Option(
        help="RAM the index may take, e.g. 8G (default: half of this machine's RAM); auto picks the most accurate "
             "index that fits.")] = None,
    recall: Annotated[Optional[float], typer.Option(
        min=0.01, max=1.0, help="recall@10 the search parameters are tuned to at build time, against exact search "
                                "(default: the db's, else 0.95).")] = None,
    backend: Annotated[Optional[str], typer.Option(
        help=f"where the vectors are searched ({', '.join(BACKENDS)}): faiss (an index file in the db) or milvus (a "
             "collection the stored vectors are mirrored to); default: the one the db uses, else faiss.")] = None,
    uri: Annotated[Optional[str], typer.Option(
        "--uri", "--milvus-uri",
        help="where a backend outside the db keeps its index, e.g. a Milvus server (http://host:19530) or Milvus "
             "Lite file (*.db); implies that backend; default: the one the db records, else <db>/milvus.db.")] = None,
    rebuild: Annotated[bool, typer.Option(
        help="move the db's files aside (kept in <db>/broken-<time>/) and index from scratch: the way out of a "
             "damaged db.")] = False,
    no_wait: NoWaitOption = False,
    device: DeviceOption = Device.auto,
    models_dir: ModelsDirOption = None,
    verbose: VerboseOption = False,
):
    """Index (or update) a folder: embed only new or changed images, drop deleted ones."""
    _verbose(verbose)
    from simsearch.encoders.registry import default_encoder, get_encoder
    from simsearch.encoders.runtime import OnnxEncoder
    from simsearch.indexer.pipeline import Indexer, IndexerConfig
    from simsearch.indexer.store import Store
    from simsearch.retrieval.backend import RefreshConfig, chosen_backend, get_backend, refresh
    from simsearch.retrieval.index_plan import KINDS, IndexConfig, parse_bytes

    backend = chosen_backend(backend, uri)
    if backend:
        get_backend(backend).validate(RefreshConfig(uri=uri))  # before any work
    if not folder.exists():
        raise SimsearchError(f"{folder}: no such file or folder{_items_left_under(db, folder)}")
    config = IndexerConfig(batch_size=batch_size, workers=workers)
    if index_kind not in KINDS:  # fails before any work
        raise SimsearchError(f"unknown index kind {index_kind!r} (available: {', '.join(KINDS)})")
    refresh_config = RefreshConfig(IndexConfig(kind=index_kind, recall=recall, max_memory=parse_bytes(max_index_memory)
                                               if max_index_memory else 0), uri)
    spec = get_encoder(encoder or default_encoder(), models_dir).with_preprocess(preprocess)
    enc = OnnxEncoder(spec, device, models_dir)
    with Store(db, create=True, wait=not no_wait, rebuild=rebuild) as store:
        if store.moved_to:
            err.print(f"moved the old db files to {shown(store.moved_to)}", highlight=False)
        with _ProgressReporter(f"indexing with {spec.name}") as progress:
            report = Indexer(enc, store, config).run(folder, progress)
        t = time.perf_counter()
        with _ProgressReporter("index") as progress:
            outcome = refresh(store, spec.name, refresh_config, progress.stage, backend)
        report.seconds["index"] = time.perf_counter() - t
        report.wall += report.seconds["index"]
    _print_index_report(report, outcome, verbose)


def _items_left_under(db: Path, folder: Path) -> str:
    """For a folder that is gone: how many items the db still holds under it, and how to drop them."""
    from simsearch.indexer.scan import item_path
    from simsearch.indexer.store import Store

    try:
        with Store(db, readonly=True) as store:
            n = sum(1 for _ in store.iter_items(under=item_path(folder)))
    except SimsearchError:
        return ""
    return f"; the db still holds {n} items under it: `simsearch prune {shown(folder)}` drops them" if n else ""


def _print_index_report(report, index_outcome, verbose: bool) -> None:
    """index_outcome: the RefreshOutcome of the encoder's index."""
    if report.embedded == 0 and report.reused == 0 and report.removed == 0:
        summary = f"nothing to embed: {report.unchanged} unchanged"
    else:
        summary = (f"embedded {report.embedded} ({report.images_per_second:.1f} img/s), "
                   f"reused {report.reused}, unchanged {report.unchanged}, removed {report.removed}")
    extra = "".join(f", ignored {n} {why}" for why, n in sorted(report.ignored.items()))
    if report.not_checked:
        extra += f", {report.not_checked} not checked (their folder could not be read: kept)"
    rebuilt = ""
    if index_outcome.action == "rebuilt" and not report.embedded:
        rebuilt = f"; the index was rebuilt from the stored vectors ({index_outcome.reason})"
    elif verbose:
        rebuilt = f"; index {index_outcome}"
    err.print(f"[green]done[/green] in {report.wall:.1f}s: {summary}, skipped {len(report.skipped)}{extra}; "
              f"{report.total_items} items in the db{rebuilt}", highlight=False, soft_wrap=True)
    for path, reason in report.skipped:
        err.print(f"  [yellow]skipped[/yellow] {shown(reason)}", highlight=False, soft_wrap=True)
    if verbose:
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in report.seconds.items())
        err.print(f"time per stage: {stages} (read+decode summed over worker threads)", highlight=False)


@app.command()
@user_errors
def query(
    images: Annotated[Optional[list[Path]], typer.Argument(
        help="query image(s); a folder queries every image in it. Optional with --text.")] = None,
    text: Annotated[Optional[list[str]], typer.Option(
        "--text", "-t", help="words to search for (a CLIP encoder); repeatable, 'W:' weights a term (\"2:red car\"), "
                             "and 'A + B - C' combines terms (an existing file is an image). With --text or --minus, "
                             "all the terms and images form one query.")] = None,
    minus: Annotated[Optional[list[str]], typer.Option(
        help="subtract this from the query: an existing file is an image, anything else words; repeatable, "
             "'W:' weights it.")] = None,
    min_score: Annotated[Optional[float], typer.Option(
        min=-1.0, max=1.0, help="only hits whose cosine to the query is at least this.")] = None,
    under: Annotated[Optional[str], typer.Option(
        help="only items in this folder, or whose path matches this glob ('*' within a folder, '**/' any folders).")
    ] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="number of results.")] = 10,
    db: DbOption = DEFAULT_DB,
    encoder: Annotated[Optional[str], typer.Option(help="encoder (default: the db's first).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document on stdout.")] = False,
    rerank: Annotated[Optional[str], typer.Option(help="reorder the top candidates with this reranker.")] = None,
    rerank_depth: Annotated[int, typer.Option(min=1, help="candidates the reranker sees.")] = 100,
    backend: Annotated[Optional[str], typer.Option(
        help=f"the backend the db's index is in ({', '.join(BACKENDS)}; default: read from the db; one that "
             "differs is an error).")] = None,
    uri: Annotated[Optional[str], typer.Option(
        "--uri", "--milvus-uri",
        help="search the index at this URI (a Milvus server or Milvus Lite file) instead of the one the db "
             "records.")] = None,
    device: DeviceOption = Device.auto,
    models_dir: ModelsDirOption = None,
    verbose: VerboseOption = False,
):
    """Find the k images in the db most similar to each query image, or to one query of words and images.

    Without --text/--minus each image is its own query; one that cannot be read gets its error line (an
    `error` field in --json) while the others answer, and the exit code is then 1.
    """
    _verbose(verbose)
    from simsearch.indexer.scan import scan
    from simsearch.retrieval.query import Query, Term, parse_terms
    from simsearch.retrieval.search import Searcher
    from simsearch.retrieval.views import hit_view, path_fields, term_view

    if k < 1:
        raise SimsearchError(f"-k must be at least 1 (got {k})")
    combined = bool(text or minus)
    if not images and not combined:
        raise SimsearchError("give query images, or words with --text")
    paths: list[str] = []  # each its own query, or (combined) one image term each
    terms: list[Term] = []
    for p in images or []:
        if p.is_dir():
            found = [f.path for f in scan(p).files]
            if not found:
                raise SimsearchError(f"{p}: a folder with no images in it")
        elif p.exists():
            found = [str(p)]
        elif combined and len(ts := parse_terms(str(p), os.path.isfile)) == 1 and ts[0].kind == "image":
            found = []
            terms += ts  # a weighted image: "2:./pool.jpg"
        else:
            raise SimsearchError(f"{p}: no such file")
        paths += found
        terms += [Term("image", f) for f in found]
    for t in text or []:
        terms += parse_terms(t, os.path.isfile)
    for m in minus or []:
        terms += [Term(t.kind, t.value, -t.weight) for t in parse_terms(m, os.path.isfile)]
    reranker = None
    if rerank:
        from simsearch.retrieval.rerank import Reranker, get_reranker

        reranker = Reranker(get_reranker(rerank, models_dir), device)
    with Searcher.open(db, encoder, device, models_dir, backend, uri) as searcher:
        if combined:
            results = [searcher.search(Query(tuple(terms), min_score, under), k, reranker, rerank_depth)]
        else:
            results = searcher.query(paths, k, reranker, rerank_depth, min_score, under)
        name = searcher.encoder.spec.name
        effective_k = min(k, searcher.index.ntotal)
    filtered = min_score is not None or bool(under)
    if as_json:
        doc = {
            "encoder": name,
            "reranker": rerank,
            "rerank_depth": rerank_depth if rerank else None,
            "k": effective_k,
            "k_requested": k,
            **({"terms": [term_view(t) for t in terms]} if combined else {}),
            "min_score": min_score,
            "under": under,
            "results": [
                {**path_fields(r.query, "query"), **({"error": r.error} if r.error else {}),
                 "hits": [hit_view(h) for h in r.hits], "seconds": r.seconds}
                for r in results
            ],
        }
        print(json.dumps(doc, indent=2))
    else:
        filters = (f", score >= {min_score:g}" if min_score is not None else "") + (f", under {under}" if under else "")
        for r in results:
            if r.error:
                err.print(f"[red]error:[/red] {shown(r.error)}", highlight=False, soft_wrap=True)
                continue
            by = f", reranked by {rerank} from the top {rerank_depth}" if rerank else ""
            table = Table(title=f"{shown(r.query)}  ({name}{by}{shown(filters)})", title_justify="left")
            table.add_column("rank", justify="right")
            if rerank:
                table.add_column("P(same)", justify="right")
            table.add_column("score", justify="right")
            table.add_column("path", overflow="fold")
            for h in r.hits:
                table.add_row(str(h.rank), *([f"{h.rerank_score:.4f}"] if rerank else []), f"{h.score:.4f}", shown(h.path))
            out.print(table)
            if verbose or rerank:
                err.print(", ".join(f"{s} {v * 1000:.1f} ms" for s, v in r.seconds.items()), highlight=False)
            if filtered and len(r.hits) < effective_k:
                err.print(f"only {len(r.hits)} images pass the filters ({shown(filters[2:])})", highlight=False)
        if k > effective_k:
            err.print(f"the db holds {effective_k} images for {name}: showing all of them", highlight=False)
    if any(r.error for r in results):
        raise typer.Exit(1)


@app.command()
@user_errors
def info(db: DbOption = DEFAULT_DB, as_json: Annotated[bool, typer.Option("--json")] = False):
    """What the db holds: items, encoders, dimensions, index types, size on disk; a damaged index file is named."""
    from simsearch.indexer.store import Store
    from simsearch.retrieval.views import db_info

    with Store(db, readonly=True) as store:
        doc = db_info(store, verify=True)
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    busy = " [yellow](an `index` is writing to it now)[/yellow]" if doc["writer_active"] else ""
    out.print(f"db [bold]{shown(doc['db'])}[/bold] (schema {doc['schema_version']}): {doc['items']} items, "
              f"{doc['size_on_disk_bytes'] / 2**20:.1f} MiB on disk{busy}", highlight=False)
    table = Table("dim", "preprocess", "metric", "index", "vectors", "up to date")
    table.columns.insert(0, Column("encoder", no_wrap=True))
    for name, e in doc["encoders"].items():
        default = " (default)" if name == doc["default_encoder"] else ""
        state = "yes" if e["index_up_to_date"] else "no: re-run index"
        table.add_row(shown(name + default), str(e["dim"]), e["preprocess"], e["metric"], shown(e["index"]),
                      str(e["vectors_in_index"]),
                      f"[red]{shown(e['index_problem'])}[/red]: run `simsearch check --repair`" if e["index_problem"]
                      else state)
    out.print(table)


@app.command()
@user_errors
def check(
    db: DbOption = DEFAULT_DB,
    repair: Annotated[bool, typer.Option(
        help="rebuild every missing, damaged or stale index from the stored vectors (nothing is embedded).")] = False,
    no_wait: NoWaitOption = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
):
    """Verify a db end to end (manifest, LMDB store, every index file against it); exit 1 if anything is damaged."""
    from simsearch.retrieval.check import check_db, repair_db

    repaired = [f"the index of {name}: {outcome} ({outcome.count} vectors)"
                for name, outcome in (repair_db(db, wait=not no_wait) if repair else [])]
    findings, facts = check_db(db)
    errors = [f for f in findings if f.level == "error"]
    if as_json:
        print(json.dumps({"db": str(db), "ok": not errors, "repaired": repaired, "facts": facts,
                          "findings": [{"level": f.level, "message": f.message} for f in findings]}, indent=2))
    else:
        for line in repaired:
            err.print(f"[green]repaired[/green] {shown(line)}", highlight=False, soft_wrap=True)
        for f in findings:
            colour = "red" if f.level == "error" else "yellow"
            err.print(f"[{colour}]{f.level}:[/{colour}] {shown(f.message)}", highlight=False, soft_wrap=True)
        if not errors:
            indexes = ", ".join(f"{n}: {i['vectors']} vectors" for n, i in facts.get("indexes", {}).items())
            err.print(f"[green]ok[/green]: {facts.get('items', 0)} items{'; ' + indexes if indexes else ''}",
                      highlight=False)
    if errors:
        raise typer.Exit(1)


@app.command()
@user_errors
def compact(db: DbOption = DEFAULT_DB, no_wait: NoWaitOption = False):
    """Fold the delta segments that updates wrote beside each index into it now (`index` does once they pass a
    size; see docs/scale.md); changes not yet indexed are applied first."""
    from simsearch.retrieval.check import compact_db

    for name, outcome in compact_db(db, wait=not no_wait):
        err.print(f"the index of {shown(name)}: {shown(outcome)} ({outcome.count} vectors)", highlight=False)


@app.command()
@user_errors
def prune(
    folder: Annotated[Optional[Path], typer.Argument(help="only items under this folder (default: all).")] = None,
    db: DbOption = DEFAULT_DB,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would be dropped; change nothing.")] = False,
    no_wait: NoWaitOption = False,
):
    """Drop items whose files no longer exist (a moved or deleted folder), then refresh the indexes."""
    from simsearch.indexer.scan import item_path, missing_items
    from simsearch.indexer.store import Store
    from simsearch.retrieval.backend import refresh

    under = item_path(folder) if folder else None
    with Store(db, wait=not no_wait) as store:
        gone = missing_items(p for p, _ in store.iter_items(under=under))
        for path in gone:
            out.print(shown(path), highlight=False, soft_wrap=True)
        if dry_run:
            err.print(f"{len(gone)} items would be dropped (dry run: nothing changed)", highlight=False)
            return
        removed = store.remove_items(gone)
        for name, entry in store.manifest.encoders.items():
            if entry.has_index:
                refresh(store, name)
        err.print(f"[green]dropped[/green] {removed} items; {store.item_count()} items in the db", highlight=False)


@app.command()
@user_errors
def dupes(
    db: DbOption = DEFAULT_DB,
    encoder: Annotated[Optional[str], typer.Option(help="encoder (default: the db's first).")] = None,
    similar: Annotated[bool, typer.Option(
        "--similar", help="also group images that are only similar (cosine >= --threshold; bursts, retakes), "
                          "not verified as copies.")] = False,
    threshold: Annotated[Optional[float], typer.Option(
        help="the similar tier's cosine (default: the calibrated one, see docs/explain-dupes.md; it fits the "
             "built-in encoders); implies --similar.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document on stdout.")] = False,
    csv_file: Annotated[Optional[str], typer.Option(
        "--csv", metavar="FILE", help="also write one CSV row per image (group, tier, role, id, path, width, height, "
                                      "bytes, score, min_score) to FILE; `--csv -` writes only the CSV, to stdout.")] = None,
    verbose: VerboseOption = False,
):
    """Groups of duplicate images in the db: exact copies and verified edited copies (crops, frames, thumbnails,
    recompressions, mirrors, grey...), with --similar also look-alikes; each group with a suggested keeper (the most
    content pixels, then the largest file). Nothing is deleted or moved."""
    _verbose(verbose)
    from simsearch.indexer.store import Store
    from simsearch.retrieval.dupes import find_duplicates
    from simsearch.retrieval.views import dupes_view

    similar = similar or threshold is not None
    try:  # open for writing when no one else is, so the verification's features are cached in the db
        store = Store(db, wait=False)
    except (SimsearchError, OSError):  # busy, or a db the user may read but not write: nothing is cached
        store = Store(db, readonly=True)
    with store:
        name = store.manifest.encoder_name(encoder, store.root)
        with _ProgressReporter("finding duplicates") as progress:
            groups = find_duplicates(store, name, threshold, similar=similar, on_progress=progress.stage)
    view = dupes_view(groups, name, threshold, similar)
    threshold, totals = view["threshold"], view["totals"]
    if csv_file is not None:
        _write_dupes_csv(groups, csv_file)
        if csv_file == "-":
            return
    if as_json:
        print(json.dumps({"db": str(db), **view}, indent=2))
        return
    for i, g in enumerate(groups, 1):
        table = Table(title=f"group {i}: {1 + len(g.others)} images, {g.tier}, weakest link {g.min_score:.4f}",
                      title_justify="left")
        table.add_column("", no_wrap=True)
        table.add_column("tier", no_wrap=True)
        table.add_column("score", justify="right")
        table.add_column("pixels", justify="right", no_wrap=True)
        table.add_column("bytes", justify="right")
        table.add_column("path", overflow="fold")
        for it, role in [(g.keeper, "[green]keep[/green]"), *((o, "") for o in g.others)]:
            size = f"{it.width}x{it.height}" if it.width else "[yellow]unreadable[/yellow]"
            table.add_row(role, "" if it.tier == "keeper" else it.tier, f"{it.score:.4f}", size, f"{it.bytes:,}",
                          shown(it.path))
        out.print(table)
    tiers = ", ".join(f"{n} {t}" for t, n in totals["by_tier"].items() if n or t != "similar" or similar)
    scope = f"with similar images at cosine >= {threshold:g}" if similar else "exact and edited copies"
    out.print(f"{totals['groups']} groups of duplicates ({tiers}; {scope}, {name}): {totals['removable_images']} "
              f"images could be removed, {totals['reclaimable_bytes'] / 2**20:,.1f} MiB; nothing was deleted",
              highlight=False, soft_wrap=True)


def _write_dupes_csv(groups, dest: str) -> None:
    """One row per image, keeper first in each group; `-` is stdout. Paths keep their exact bytes in a file."""
    import csv

    from simsearch.indexer.scan import shown_path

    try:
        stream = sys.stdout if dest == "-" else open(dest, "w", newline="", encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise SimsearchError(f"--csv {dest}: cannot write ({e.strerror})") from None
    try:
        writer = csv.writer(stream)
        writer.writerow(["group", "tier", "role", "id", "path", "width", "height", "bytes", "score", "min_score"])
        for i, g in enumerate(groups, 1):
            for it, role in [(g.keeper, "keeper"), *((o, "other") for o in g.others)]:
                path = it.path if stream is not sys.stdout else shown_path(it.path)
                writer.writerow([i, it.tier if role == "other" else g.tier, role, it.id, path, it.width, it.height,
                                 it.bytes, f"{it.score:.6f}", f"{g.min_score:.6f}"])
    finally:
        if stream is not sys.stdout:
            stream.close()


@app.command()
@user_errors
def bench(
    data: DataOption = None,
    split: Annotated[str, typer.Option(help="split to measure: val or train.")] = "val",
    encoder: Annotated[Optional[str], typer.Option(
        help="encoder name(s), comma-separated; default: as for `index`.")] = None,
    preprocess: PreprocessOption = None,
    reranker: Annotated[Optional[str], typer.Option(
        help="reranker name(s), comma-separated: each reorders the first encoder's top --rerank-depth.")] = None,
    rerank_depth: Annotated[int, typer.Option(min=1)] = 100,
    reranker_minutes: Annotated[float, typer.Option(
        min=0.1, help="per reranker, for reranked hit@k and for all pairs each: a slower one is measured on the "
                      "largest part that fits (stated in the results).")] = 20.0,
    task: Annotated[Optional[str], typer.Option(
        help="pairs (find the pair, hit@k), classes (same/different accuracy), checks (each trained encoder against "
             "its base: in-domain, unseen classes, near-duplicates), zeroshot (classification by text prompts: CLIP "
             "encoders); default: the first three, or pairs for a pair folder.")]
    = None,
    ks: Annotated[str, typer.Option(help="k values for hit@k.")] = "1,5,10,15,25,50,100",
    seed: Annotated[int, typer.Option(help="seed of splits, pair sets and sampled pairs.")] = 0,
    val_fraction: Annotated[Optional[float], typer.Option(
        min=0.0, max=1.0, help="share in val, split with --seed: of a pair folder's pairs (default 325/1225), of every "
                               "class of <class>/<image> folders (default 0.2); Tiny ImageNet keeps its own split.")] = None,
    balanced_pairs: Annotated[int, typer.Option(min=2, help="size of the balanced same/different set.")] = 50_000,
    all_pairs_per_class: Annotated[int, typer.Option(min=2, help="images per class in the all-pairs subset.")] = 25,
    out_dir: Annotated[Path, typer.Option("--out", help="folder for bench.json and the PNG plots.")] = Path("results/bench"),
    cache_db: Annotated[Optional[Path], typer.Option(help="embedding cache db (default: beside the models dir).")] = None,
    device: DeviceOption = Device.auto,
    models_dir: ModelsDirOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logs.")] = False,
):
    """Measure encoders: hit@k on "find the pair" sets and same/different pair accuracy; JSON + PNG plots."""
    _verbose(verbose)
    from simsearch.benchmarks import harness, report
    from simsearch.encoders.registry import default_encoder
    from simsearch.evaluation.datasets import detect_layout
    from simsearch.paths import benchmark_data_dir

    data = benchmark_data_dir() if data is None else data  # a benchmark may default to the shared data
    if not data.is_dir():
        raise SimsearchError(f"{data}: no such folder")
    try:
        k_values = tuple(sorted({int(k) for k in ks.split(",")}))
    except ValueError:
        raise SimsearchError(f"--ks must be comma-separated integers (got {ks!r})") from None
    if not k_values or k_values[0] < 1:
        raise SimsearchError(f"--ks must be positive (got {ks!r})")
    tasks = tuple(task.split(",")) if task else (("pairs",) if detect_layout(data) == "pairs" else harness.TASKS)
    config = harness.BenchConfig(data=data, split=split, tasks=tasks, ks=k_values, seed=seed, val_fraction=val_fraction,
                                 balanced_pairs=balanced_pairs, all_pairs_per_class=all_pairs_per_class,
                                 device=device, models_dir=models_dir, cache_db=cache_db, preprocess=preprocess,
                                 rerankers=tuple(r.strip() for r in (reranker or "").split(",") if r.strip()),
                                 rerank_depth=rerank_depth, reranker_minutes=reranker_minutes)
    with _ProgressReporter("bench") as progress:
        names = [e.strip() for e in (encoder or default_encoder()).split(",") if e.strip()]
        result = harness.run(config, names, progress.stage)
    wide = out if out.is_terminal else Console(width=170)  # a pipe or a CI log is not 80 columns of screen
    for table in (report.hits_table(result), report.pairs_table(result), report.checks_table(result),
                  report.zeroshot_table(result)):
        if table is not None:
            wide.print(table)
    json_path = report.write_json(result, out_dir)
    plots = report.write_plots(result, out_dir)
    for e in result["encoders"]:
        ap = (e["pairs"] or {}).get("all_pairs")
        if ap:
            err.print(f"{e['encoder']}: all {ap['pairs']:,} pairs ({ap['per_class']} images per class) in "
                      f"{ap['seconds']:.1f}s, peak {ap['peak_memory_bytes'] / 2**20:.0f} MiB", highlight=False)
        if e.get("latency_per_query_ms"):
            err.print(f"{e['encoder']}: reranking adds {e['latency_per_query_ms']:.2f} ms per query "
                      f"(depth {rerank_depth})", highlight=False)
    err.print(f"wrote {json_path} and {len(plots)} plots in {result['wall_seconds']:.1f}s "
              f"(embedded {sum(e['embedded'] for e in result['encoders'])} images)", highlight=False)


encoders_app = typer.Typer(help="The registered encoders; `encoders add` registers a CLIP encoder (image + text).")
app.add_typer(encoders_app, name="encoders")


@encoders_app.callback(invoke_without_command=True)
def encoders(ctx: typer.Context, models_dir: ModelsDirOption = None):
    """The registered encoders: dimension, input (size, preprocessing policy), text tower, source of the weights."""
    if ctx.invoked_subcommand is not None:
        return
    from simsearch.encoders.cards import Card
    from simsearch.encoders.export import is_cached
    from simsearch.encoders.registry import list_encoders

    table = Table("dim", "text", "source", "ONNX cached")
    table.columns.insert(0, Column("name", no_wrap=True))
    table.columns.insert(2, Column("input", no_wrap=True))
    for spec in list_encoders(models_dir):
        if spec.precision.value == "int8":
            source = f"int8, quantised from {spec.fp32().name} (settings {spec.quant_tag})"
        else:
            source = Card.load(Path(spec.card), "encoder").summary() if spec.trained else spec.source
        table.add_row(spec.name, str(spec.dim), f"{spec.image_size} px {spec.preprocess.value}",
                      "yes" if spec.has_text else "", shown(source), "yes" if is_cached(spec, models_dir) else "on first use")
    out.print(table)


@encoders_app.command("add")
@user_errors
def encoders_add(
    name: Annotated[str, typer.Argument(help="the name to register it under (letters, digits, '.', '_', '-').")],
    open_clip: Annotated[Optional[str], typer.Option(
        "--open-clip", metavar="MODEL",
        help="an open_clip model (any name in open_clip.list_models(), e.g. ViT-B-32, or a model config .json).")] = None,
    pretrained: Annotated[Optional[str], typer.Option(
        help="open_clip pretrained tag, e.g. laion2b_s34b_b79k (open_clip downloads the weights).")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="a local weights file for --open-clip.")] = None,
    onnx: Annotated[Optional[Path], typer.Option(
        "--onnx", metavar="DIR", help="a ready ONNX export in Immich's layout (config.json, visual/, textual/); no "
                                      "torch needed.")] = None,
    python: Annotated[Optional[str], typer.Option(
        envvar="SIMSEARCH_CLIP_PYTHON",
        help="the Python that has open_clip_torch, for --open-clip (default: this one).")] = None,
    random_weights: Annotated[bool, typer.Option(
        help="--open-clip without weights: an untrained model, for speed measurements and tests only.")] = False,
    replace: Annotated[bool, typer.Option(help="replace an encoder of that name added before.")] = False,
    models_dir: ModelsDirOption = None,
    verbose: VerboseOption = False,
):
    """Register a CLIP encoder: its image tower and text tower exported to ONNX, its tokenizer and preprocessing.

    Then `simsearch index FOLDER --encoder NAME` and `simsearch query --text "..." --encoder NAME`.
    """
    _verbose(verbose)
    from simsearch.encoders.clip import add_clip_folder, export_open_clip

    if (open_clip is None) == (onnx is None):
        raise SimsearchError("give --open-clip MODEL or --onnx DIR (one of them)")
    if onnx is not None:
        if pretrained or checkpoint or random_weights:
            raise SimsearchError("--pretrained, --checkpoint and --random-weights go with --open-clip, not --onnx")
        spec = add_clip_folder(name, onnx, models_dir, replace=replace)
    else:
        spec = export_open_clip(name, open_clip, pretrained or "", checkpoint, python, models_dir, replace=replace,
                                random_weights=random_weights)
    out.print(f"added [bold]{shown(spec.name)}[/bold]: {spec.dim}-d, {spec.image_size} px {spec.preprocess.value}, "
              f"image and text towers ({shown(spec.source)}); its int8 image tower: {shown(spec.name)}-int8",
              highlight=False, soft_wrap=True)


train_app = typer.Typer(help="Train encoders and rerankers on your own images (torch; served by ONNX Runtime).",
                        no_args_is_help=True)
app.add_typer(train_app, name="train")

# The options every `train` command has: (annotation, default); a str default names the config field it comes from.
_TRAIN_SHARED = {
    "data": (TrainDataOption, None),
    "check_photos": (Annotated[Optional[Path], typer.Option(
        help="a folder of generic photos for the card's near-duplicate check against the base (each against an "
             "edited copy); default: none, the check is skipped and the card says so.")], None),
    "split": (Annotated[str, typer.Option(help="split to train on.")], "split"),
    "epochs": (Annotated[int, typer.Option(min=1, help="at most this many epochs (patience may stop sooner).")], "epochs"),
    "lr": (Annotated[float, typer.Option(min=0.0, help="learning rate.")], "lr"),
    "max_minutes": (Annotated[float, typer.Option(
        min=0.1, help="time budget of the whole command; the best epoch so far is kept.")], "max_minutes"),
    "seed": (Annotated[int, typer.Option(help="seed of every random choice.")], "seed"),
    "device": (DeviceOption, "device"),
    "models_dir": (ModelsDirOption, None),
    "verbose": (VerboseOption, False),
}


def _training_command(name: str, config_cls, what: str):
    """Register `simsearch train NAME`: the function's own options, then the shared ones, every default taken
    from `config_cls`. The function gets the shared values as `run` (config fields; data resolved) and returns
    (trainer function, config); running it with a progress display and printing its card is the same for all."""

    def register(fn):
        hints = typing.get_type_hints(fn, include_extras=True)  # this module's string annotations, resolved
        own = [p.replace(annotation=hints[p.name]) for p in inspect.signature(fn).parameters.values() if p.name != "run"]
        shared = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                    default=getattr(config_cls, default) if isinstance(default, str) else default)
                  for n, (annotation, default) in _TRAIN_SHARED.items()]

        @functools.wraps(fn)
        def command(**options):
            run = {n: options.pop(n) for n in _TRAIN_SHARED}
            _verbose(run.pop("verbose"))
            models_dir = run.pop("models_dir")
            run["data"] = _data(run["data"])
            for folder in (run["data"], run["check_photos"]):
                if folder is not None and not folder.is_dir():
                    raise SimsearchError(f"{folder}: no such folder")
            train, cfg = fn(**options, run=run)
            with _ProgressReporter(name) as progress:
                card = train(cfg, models_dir, progress.stage)
            err.print(f"[green]trained[/green] {what} {shown(card.name)}: {shown(card.summary())}", highlight=False,
                      soft_wrap=True)

        command.__signature__ = inspect.Signature(own + shared)
        command.__annotations__ = {p.name: p.annotation for p in own + shared}
        return train_app.command(name)(user_errors(command))

    return register


def _data(data: Path | None) -> Path:
    """--data, or the default dataset when it is not given."""
    from simsearch.paths import default_data_dir

    return default_data_dir() if data is None else data


EncoderName = Annotated[str, typer.Option(help="name of the new encoder (use it with --encoder everywhere).")]
UnseenOption = Annotated[float, typer.Option(
    min=0.0, max=0.9, help="share of a class dataset's classes left out of training (seeded), so the model card shows "
                           "how it does on classes it never saw; 0 trains on every class.")]
RerankerName = Annotated[str, typer.Option(help="name of the new reranker (use it with --rerank / --reranker).")]


@_training_command("barlow", BarlowConfig, "encoder")
def train_barlow(
    name: EncoderName,
    base: Annotated[str, typer.Option("--from", help="encoder to start from.")] = BarlowConfig.base,
    preprocess: PreprocessOption = BarlowConfig.preprocess,
    dim: Annotated[int, typer.Option(min=2, help="projector output width = embedding width.")] = BarlowConfig.dim,
    max_images: Annotated[int, typer.Option(
        min=0, help="train on at most this many images (0 = all).")] = BarlowConfig.max_images,
    unseen_classes: UnseenOption = BarlowConfig.unseen_classes,
    run: dict = None,
):
    """Self-supervised Barlow Twins (projector on a frozen encoder) on your images."""
    from simsearch.training.barlow import train_barlow

    return train_barlow, BarlowConfig(name=name, base=base, preprocess=preprocess, dim=dim, max_images=max_images,
                                      unseen_classes=unseen_classes, **run)


@_training_command("triplet", TripletConfig, "encoder")
def train_triplet(
    name: EncoderName,
    base: Annotated[str, typer.Option("--from", help="encoder to start from (built-in or trained).")] = TripletConfig.base,
    preprocess: PreprocessOption = TripletConfig.preprocess,
    dim: Annotated[int, typer.Option(min=2, help="embedding width.")] = TripletConfig.dim,
    margin: Annotated[float, typer.Option(min=0.0, help="triplet loss margin.")] = TripletConfig.margin,
    views: Annotated[bool, typer.Option(
        help="add two augmented views of every training image (cached, shared with `train barlow`).")]
    = TripletConfig.views,
    unseen_classes: UnseenOption = TripletConfig.unseen_classes,
    run: dict = None,
):
    """Fine-tune an encoder with triplet loss on matched pairs or same-class images."""
    from simsearch.training.triplet import train_triplet

    return train_triplet, TripletConfig(name=name, base=base, preprocess=preprocess, dim=dim, margin=margin, views=views,
                                        unseen_classes=unseen_classes, **run)


def _grid(text: str, kind: type, what: str) -> tuple:
    """"0.1,0.3" -> (0.1, 0.3): the values a grid option compares."""
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values:
        raise SimsearchError(f"--{what}: expected comma-separated numbers, got {text!r}")
    return values


@_training_command("whitening", WhiteningConfig, "encoder")
def train_whitening(
    name: EncoderName,
    base: Annotated[str, typer.Option("--from", help="encoder to start from (built-in or trained).")]
    = WhiteningConfig.base,
    preprocess: PreprocessOption = WhiteningConfig.preprocess,
    dim: Annotated[str, typer.Option(help="embedding widths to compare (comma-separated).")]
    = ",".join(map(str, WhiteningConfig.dim)),
    shrink: Annotated[str, typer.Option(help="shrinkage values to compare (0 = none, 1 = PCA whitening).")]
    = ",".join(map(str, WhiteningConfig.shrink)),
    blend: Annotated[str, typer.Option(
        help="weights of the projection against the base embedding to compare (1 = the projection alone).")]
    = ",".join(map(str, WhiteningConfig.blend)),
    unseen_classes: UnseenOption = WhiteningConfig.unseen_classes,
    run: dict = None,
):
    """Learned whitening of an encoder from matched pairs or same-class images: closed form, settings chosen on
    held-out data (--epochs and --lr do not apply)."""
    from simsearch.training.whitening import train_whitening

    dims, shrinks, blends = _grid(dim, int, "dim"), _grid(shrink, float, "shrink"), _grid(blend, float, "blend")
    if min(dims) < 1 or not all(0 <= v <= 1 for v in shrinks) or not all(0 < v <= 1 for v in blends):
        raise SimsearchError("--dim must be >= 1, --shrink in [0, 1] and --blend in (0, 1]")
    return train_whitening, WhiteningConfig(name=name, base=base, preprocess=preprocess, dim=dims, shrink=shrinks,
                                            blend=blends, unseen_classes=unseen_classes, **run)


@_training_command("matchnet", MatchNetConfig, "reranker")
def train_matchnet(
    name: RerankerName,
    tower: Annotated[str, typer.Option(
        help="pretrained (encoder embeddings) or scratch (64x64 conv net).")] = MatchNetConfig.tower,
    encoder: Annotated[str, typer.Option(
        help="tower pretrained: the encoder whose embeddings it reads.")] = MatchNetConfig.encoder,
    pairs_per_epoch: Annotated[int, typer.Option(
        min=32, help="balanced training pairs drawn per epoch.")] = MatchNetConfig.pairs_per_epoch,
    hard_negatives: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="tower pretrained: share of pairs that are (image, one of its 50 nearest neighbours), "
                               "what a reranker meets at query time; 0 = the research's random pairs.")]
    = MatchNetConfig.hard_fraction,
    listwise: Annotated[Optional[bool], typer.Option(
        "--listwise/--no-listwise",
        help="train for reranking: pair sets of the training images, each query against its top --depth candidates "
             "by the encoder (softmax cross-entropy), the epoch and the vector score's weight chosen by held-out "
             "reranked hit@k; default: on for the pretrained tower.")] = MatchNetConfig.listwise,
    depth: Annotated[int, typer.Option(min=2, help="--listwise: candidates per query, as `query --rerank-depth`.")]
    = MatchNetConfig.depth,
    run: dict = None,
):
    """Train a MatchNet same/different pair classifier, used as a reranker."""
    from simsearch.training.matchnet import train_matchnet

    return train_matchnet, MatchNetConfig(name=name, tower=tower, encoder=encoder, pairs_per_epoch=pairs_per_epoch,
                                          hard_fraction=hard_negatives, listwise=listwise, depth=depth,
                                          **run)


@_training_command("beit", BeitPairConfig, "reranker")
def train_beit(
    name: RerankerName,
    weights: Annotated[Optional[Path], typer.Option(
        help="your own BEiT checkpoint (transformers folder with config.json) to fine-tune on pixel patches; "
             "default: a small BEiT on the frozen EfficientNet-Lite trunk's tokens.")] = BeitPairConfig.weights,
    encoder: Annotated[str, typer.Option(
        help="without --weights: the encoder whose trunk makes the tokens.")] = BeitPairConfig.encoder,
    image_size: Annotated[int, typer.Option(
        min=32, help="without --weights: trunk input side (S/32 tokens a side).")] = BeitPairConfig.image_size,
    pairs_per_epoch: Annotated[int, typer.Option(
        min=64, help="balanced training pairs drawn per epoch.")] = BeitPairConfig.pairs_per_epoch,
    run: dict = None,
):
    """Train a BEiT pair classifier (sees both images, outputs P(same)), used as a reranker."""
    if weights is not None and not weights.exists():
        raise SimsearchError(f"{weights}: no such file or folder")
    from simsearch.training.beit_pair import train_beit

    return train_beit, BeitPairConfig(name=name, encoder=encoder, weights=weights, image_size=image_size,
                                      pairs_per_epoch=pairs_per_epoch, **run)


@app.command()
@user_errors
def serve(
    db: DbOption = DEFAULT_DB,
    host: Annotated[str, typer.Option(
        help="address to listen on; the default answers this machine only (the API has no authentication).")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="port (0: any free one, printed).")] = 8000,
    max_upload: Annotated[str, typer.Option(help="largest image a client may upload, e.g. 20M.")] = "20M",
    workers: Annotated[int, typer.Option(
        min=1, max=256, help="server processes on the one port: more answer more requests at once on more cores; "
                             "each holds its own model (docs/serving.md).")] = 1,
    device: DeviceOption = Device.auto,
    models_dir: ModelsDirOption = None,
    verbose: VerboseOption = False,
):
    """Serve the HTTP API (OpenAPI schema at /docs) and the web page; read-only over the db, follows a running `index`."""
    _verbose(verbose)
    # FAISS's OpenMP threads busy-wait after each search by default: a server's searches are single queries from
    # many threads, and on a busy machine the spinning starves them (a 0.1 ms search took 16 ms on a loaded 2-core AMD EPYC). Read by the
    # OpenMP runtime when it loads, i.e. before the server module imports FAISS.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from simsearch.retrieval.index_plan import parse_bytes
    from simsearch.server.app import ServerConfig, create_app, is_loopback, listen, run
    from simsearch.server.workers import Workers

    config = ServerConfig(db=db, models_dir=models_dir, device=device, max_upload_bytes=parse_bytes(max_upload))
    application = create_app(config) if workers == 1 else None
    sock = listen(host, port)
    if not is_loopback(host):
        err.print(f"[yellow]warning:[/yellow] listening on {shown(host)}: other machines can reach this API, which "
                  "has no authentication", highlight=False)
    bound = sock.getsockname()[1]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{bound}"

    def serving() -> None:
        processes = f" in {workers} processes" if workers > 1 else ""
        err.print(f"serving {shown(db)} on {url}{processes} (API docs: {url}/docs); Ctrl-C stops", highlight=False,
                  soft_wrap=True)

    if application is None:
        Workers(config, sock, workers, functools.partial(_worker_logging, verbose)).serve(serving)
        return
    serving()
    run(application, sock)


def _worker_logging(verbose: bool) -> None:
    """Logging in a `serve --workers` process (spawned: it starts with none of this one's)."""
    _setup_logging()
    _verbose(verbose)


@app.command()
def rerankers(models_dir: ModelsDirOption = None):
    """The trained rerankers (for `query --rerank`): what they read, and held-out hit@k before and after reranking."""
    from simsearch.retrieval.rerank import list_rerankers

    table = Table("held-out hit@1 %", "held-out hit@10 %", "summary")
    table.columns.insert(0, Column("name", no_wrap=True))
    for spec in list_rerankers(models_dir):
        best = spec.card.validation["best"]
        if spec.held_out_gain() is None:
            cells = ("not measured", "not measured")
        else:
            cells = tuple(f"{100 * best[k + '_before']:.1f} -> {100 * best[k]:.1f}"
                          + ("" if best[k] > best[k + "_before"] else " [yellow](no gain)[/yellow]") for k in ("hit1", "hit10"))
        table.add_row(spec.name, *cells, shown(spec.card.summary()))
    out.print(table)


@app.command()
@user_errors
def explain(
    a: Annotated[Path, typer.Argument(help="first image.")],
    b: Annotated[Path, typer.Argument(help="second image.")],
    encoder: Annotated[Optional[str], typer.Option(
        help="encoder (default: the db's at --db when there is one, else as for `index`).")] = None,
    method: Annotated[Literal["auto", "decomposition", "occlusion"], typer.Option(
        help="decomposition: exact, the heatmaps sum to the score (the built-in encoders); occlusion: black-box, "
             "any encoder; auto: decomposition where it is exact.")] = "auto",
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="PNG of both images with their heatmaps (default: explain.png; with --json: only "
                               "when given).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the explanation with both grids as JSON on stdout.")] = False,
    db: DbOption = DEFAULT_DB,
    device: DeviceOption = Device.auto,
    models_dir: ModelsDirOption = None,
):
    """Why two images match: a heatmap per image of the regions that drove their similarity score."""
    from simsearch.encoders.registry import default_encoder, get_encoder
    from simsearch.encoders.runtime import OnnxEncoder
    from simsearch.errors import DbNotFoundError
    from simsearch.indexer.store import Store
    from simsearch.retrieval.explain import explain_pair, render_png

    try:
        with Store(db, readonly=True) as store:
            manifest = store.manifest
    except DbNotFoundError:  # no db there: the machine's default encoder under its own policy
        manifest = None
    name = encoder or (manifest and manifest.default_encoder) or default_encoder()
    spec = get_encoder(name, models_dir)
    if manifest and name in manifest.encoders:  # explained as the db's vectors were made
        spec = spec.with_preprocess(manifest.encoders[name].preprocess)
    expl = explain_pair(OnnxEncoder(spec, device, models_dir), a, b, method=method, models_dir=models_dir)
    target = output or (None if as_json else Path("explain.png"))
    if target is not None:
        try:
            target.write_bytes(render_png(expl, a, b))
        except OSError as e:
            raise SimsearchError(f"{target}: cannot write ({e.strerror})") from None
    if as_json:
        print(json.dumps({"a": str(a), "b": str(b), **expl.to_dict(), "png": str(target) if target else None}))
        return
    how = "exact: each heatmap sums to the score" if expl.method == "decomposition" else "black-box occlusion"
    out.print(f"score {expl.score:.4f} ({spec.name})\nmethod {expl.method} ({how})\nwrote {shown(target)}",
              highlight=False, soft_wrap=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
