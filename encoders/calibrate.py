"""Maintainers only: measure the built-in encoders' int8 calibrations, which the package ships.

    python -m simsearch.encoders.calibrate ../shared/data/imagenet-samples

For each built-in encoder and each policy, this quantises its int8 variant on a seeded sample of the photos
(QuantSettings: 64 photos, seed 0) and writes what the calibration measured (each activation tensor's range) to
encoders/calibrations/<int8 file name>.json. From those files every machine builds the same int8 model, with no
photos (export.ensure_int8). Run it again when the weights, the quantisation settings or the policies change,
and commit the files: tests/encoders/test_calibrate.py checks that they are there and still build the same file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from simsearch.atomic import atomic_path
from simsearch.encoders.export import (
    CALIBRATIONS,
    calibration_batches,
    calibration_file,
    ensure_onnx,
    int8_path,
    photos_in,
)
from simsearch.encoders.quantize import QuantSettings, pick_calibration, quantize_onnx
from simsearch.encoders.spec import BUILTIN, Preprocess
from simsearch.errors import ModelError

log = logging.getLogger("simsearch.encoders.calibrate")  # also when run as __main__


def measure_builtins(photos: Path, out: Path = CALIBRATIONS, models_dir: Path | None = None) -> list[Path]:
    """Write the calibration of every built-in int8 variant (each policy), measured on a seeded sample of the
    photos under `photos`, into `out`; the int8 models land in the models cache as a by-product. The files written."""
    settings = QuantSettings()
    files = photos_in(photos)
    if len(files) < settings.calibration_images:
        raise ModelError(f"the built-ins' int8 variants are calibrated on {settings.calibration_images} photos, and "
                         f"{photos} has {len(files)}")
    chosen = pick_calibration(files, settings)
    written = []
    for base in BUILTIN:
        for policy in Preprocess:
            spec = base.int8(settings.tag()).with_preprocess(policy)
            fp32 = ensure_onnx(spec.fp32(), models_dir)
            calibration = quantize_onnx(fp32, int8_path(spec, models_dir), calibration_batches(spec, chosen), settings)
            doc = {
                "encoder": spec.name,
                "preprocess": policy.value,
                "settings": dataclasses.asdict(settings),
                "photos": sorted(str(p.relative_to(photos)) for p in chosen),
                **calibration.to_json(),
            }
            target = Path(out) / calibration_file(spec).name
            with atomic_path(target, mode=0o644) as tmp:  # package data: readable by all
                tmp.write_text(json.dumps(doc, indent=1) + "\n")
            log.info("%s (%s): %d tensor ranges -> %s", spec.name, policy.value, len(calibration.ranges), target)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m simsearch.encoders.calibrate", description=__doc__.split("\n")[0])
    parser.add_argument("photos", type=Path, help="the calibration photos (the project's: ../shared/data/imagenet-samples)")
    parser.add_argument("--out", type=Path, default=CALIBRATIONS, help="folder for the JSON files (default: the package's)")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    ours = logging.getLogger("simsearch")  # not the exporter's and quantiser's chatter on the root logger
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
    measure_builtins(args.photos, args.out)


if __name__ == "__main__":
    main()
