"""Every benchmark behind one entry point: `python -m simsearch.benchmarks NAME --option value ...`.

Each command's options are its config dataclass's fields (their help from the field's metadata), the way
`simsearch train NAME` is built from the trainer configs; `--out` says where the JSON document goes. Only the
named benchmark's module is imported: `load` must set OMP_WAIT_POLICY before FAISS loads, and `ann` starts a
fresh process per method whose peak memory is reported. The quality benchmark is `simsearch bench`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import logging
import os
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

PROG = "python -m simsearch.benchmarks"
JSON_OUT = "json_out"  # the --out option's parameter: not a name a config field could have


@dataclass(frozen=True)
class Benchmark:
    module: str  # under simsearch.benchmarks
    config: str  # its config dataclass
    out: str | None  # default JSON path; None: the command writes its own files (no --out)
    width: int = 120  # columns the tables need (a narrower terminal or log would wrap them)
    run: str = "run"  # config -> result dict
    render: str = "render"  # result -> renderables
    env: tuple[tuple[str, str], ...] = ()  # set (unless already set) before the run
    aliases: tuple[str, ...] = ()  # hidden other names (the module's own spelling)
    summary: str | None = None  # the listing's line (default: the first paragraph of the module's docstring)


BENCHMARKS = {
    "speed": Benchmark("speed", "SpeedConfig", "results/speed.json"),
    "ann": Benchmark("ann", "AnnConfig", "results/ann.json", width=160),
    # As `simsearch serve` does, before FAISS (and its OpenMP runtime) loads: the in-process baseline gets the
    # server's footing (FAISS's idle OpenMP threads otherwise spin after each single-query search).
    "load": Benchmark("load", "LoadConfig", "results/load.json", width=150, env=(("OMP_WAIT_POLICY", "PASSIVE"),)),
    "dupes": Benchmark("dupes", "DupesConfig", "results/dupes.json", run="run_photos", render="render_photos",
                       summary="Duplicate groups: settings chosen on photos and 15 kinds of edited copies (one half), "
                               "recall and precision per edit on the other, beside imagededup's hashes."),
    "dupes-scale": Benchmark("dupes", "DupesScaleConfig", "results/dupes_scale.json", run="run_scale",
                             render="render_scale", aliases=("dupes_scale",),
                             summary="Duplicate groups at scale: time and memory of find_duplicates on "
                                     "synthetic vectors with planted copies (some real photo pairs), every one found."),
    "encoder-device": Benchmark("encoder_device", "DeviceConfig", "results/encoder_device.json", width=110,
                                aliases=("encoder_device",)),
    "clip": Benchmark("clip", "ClipConfig", "results/clip.json"),
    "index-update": Benchmark("index_update", "IndexUpdateConfig", "results/index_update.json", width=140,
                              aliases=("index_update",)),
    "pair-folders": Benchmark("pair_folders", "PairFoldersConfig", None, aliases=("pair_folders",),
                              summary="Build the quality benchmark's extra domains (low-data, ood, aspect) from the "
                                      "shared data, for `simsearch bench --data OUT`."),
}
ALIASES = {alias: name for name, b in BENCHMARKS.items() for alias in b.aliases}


def script_logging(spacer: str = " ") -> None:
    """How a benchmark logs: simsearch's progress at INFO, everything else's warnings, timestamped."""
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s{spacer}%(message)s", datefmt="%H:%M:%S")
    logging.getLogger("simsearch").setLevel(logging.INFO)


def _field_parameter(f: dataclasses.Field, hint) -> tuple[inspect.Parameter, typing.Callable]:
    """The command-line parameter of one config field, and how its value becomes the field's.

    A field without a default is an argument; a tuple is comma-separated text; a default made by a factory
    (a folder beside the checkout) is left to the config when the option is not given.
    """
    import typer

    help_text = f.metadata.get("help", "")
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else hint
    convert = _identity
    if typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        annotation, default, convert = str, ",".join(map(str, f.default)), functools.partial(_items, f.name, item)
    elif f.default_factory is not dataclasses.MISSING:
        annotation, default = Optional[base], None
    else:
        annotation, default = (Optional[base] if optional else base), f.default
    info = typer.Argument(help=help_text) if required else typer.Option(help=help_text)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[annotation, info],
                             default=inspect.Parameter.empty if required else default), convert


def _identity(value):
    return value


def _items(name: str, item: type, text: str) -> tuple:
    """"100000,1e6" -> (100000, 1000000); "" -> ()."""
    import typer

    parse = (lambda x: int(float(x))) if item is int else item
    try:
        return tuple(parse(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated {item.__name__} values, got {text!r}",
                                 param_hint=f"--{name.replace('_', '-')}") from None


def _register(app, name: str, bench: Benchmark) -> None:
    """`NAME` (and its hidden aliases): options from the config's fields, then --out; runs, shows, saves."""
    import typer
    from rich.console import Console

    from simsearch.benchmarks.common import json_default
    from simsearch.benchmarks.report import save_json
    from simsearch.errors import SimsearchError

    module = importlib.import_module(f"simsearch.benchmarks.{bench.module}")
    config_cls = getattr(module, bench.config)
    hints = typing.get_type_hints(config_cls, include_extras=True)
    fields = dataclasses.fields(config_cls)
    params, converts = [], {}
    for f in fields:
        param, converts[f.name] = _field_parameter(f, hints[f.name])
        params.append(param)
    if bench.out is not None:
        params.append(inspect.Parameter(JSON_OUT, inspect.Parameter.KEYWORD_ONLY, default=Path(bench.out), annotation=Annotated[
            Path, typer.Option("--out", help="where the JSON document goes.")]))

    def command(**options):
        out = options.pop(JSON_OUT, None)
        script_logging()
        for key, value in bench.env:
            os.environ.setdefault(key, value)
        values = {k: converts[k](v) for k, v in options.items() if v is not None or k not in _factory_fields(fields)}
        try:
            result = getattr(module, bench.run)(config_cls(**values))
        except SimsearchError as e:
            Console(stderr=True).print(f"error: {e}", highlight=False, markup=False)
            raise typer.Exit(1) from None
        if out is not None:
            console = Console(width=max(Console().width, bench.width))
            for renderable in getattr(module, bench.render)(result):
                console.print(renderable)
            Console(stderr=True).print(f"wrote {save_json(result, out, default=json_default)}", highlight=False)
        return result

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = bench.summary or (module.__doc__ or "").split("\n\n")[0]
    app.command(name)(command)
    for alias in bench.aliases:
        app.command(alias, hidden=True)(command)


def _factory_fields(fields) -> set[str]:
    return {f.name for f in fields if f.default_factory is not dataclasses.MISSING}


def app(names=tuple(BENCHMARKS)):
    """The typer app with the commands of `names` (all by default)."""
    import typer

    application = typer.Typer(name=PROG, no_args_is_help=True, add_completion=False, help=__doc__.split("\n\n")[0])

    @application.callback()
    def benchmarks():  # a group even when only one command is registered
        """Every benchmark behind one entry point (`simsearch bench` runs the quality benchmark)."""

    for name in names:
        _register(application, name, BENCHMARKS[name])
    return application


def main(argv: list[str] | None = None, standalone_mode: bool = True):
    argv = sys.argv[1:] if argv is None else list(argv)
    from simsearch.benchmarks.ann import WORKER

    if argv[:1] == [WORKER]:  # one method of `ann` in its own process: nothing else is loaded (peak RSS is reported)
        from simsearch.benchmarks.ann import worker

        script_logging("   ")
        worker(Path(argv[1]))
        return None
    name = ALIASES.get(argv[0], argv[0]) if argv else None
    return app((name,) if name in BENCHMARKS else tuple(BENCHMARKS))(argv, prog_name=PROG,
                                                                     standalone_mode=standalone_mode)


if __name__ == "__main__":
    main()
