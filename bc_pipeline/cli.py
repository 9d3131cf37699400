"""The command-line programs: ``bc-predict``, ``bc-fetch-bloodmnist`` and ``bc-instance``.

``bc-predict`` classifies a folder of images or an .npz with a saved model and write a CSV.

    bc-predict MODEL INPUT [-o predictions.csv] [--batch-size 256] [--image-size 96] [--framing auto|ZOOM]

MODEL is a trained-model artifact folder, a submission folder or a ``.keras`` file; INPUT is a
folder of images (searched recursively) or an ``.npz``. Expected problems (a missing path, an
unreadable file, no images) end with ``bc-predict: error: ...`` and exit status 2, not a traceback:
the user is someone with images, not someone debugging the package. ``--framing auto`` zooms the
whole input to the scale at which the model tells its cells apart best (evaluation.framing: for
another lab's cells, framed wider or tighter than the training set's; the input should hold several
classes and at least 20 images; it costs nine extra passes over the images).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

PROG = "bc-predict"
MAX_LISTED_SKIPS = 10


def main(argv: list[str] | None = None) -> int:
    """Run the program on ``argv`` (``sys.argv[1:]`` when None) and return the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # usage errors and --help: keep "returns a status" for callers
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        lines = predict_to_csv(args.model, args.input, args.output, args.batch_size, args.image_size, args.framing)
    except (OSError, ValueError) as error:  # ImageSourceError is a ValueError
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Classify blood-cell images with a saved model and write one CSV row per image.",
    )
    parser.add_argument("model", type=Path, help="trained-model folder, submission folder or .keras file")
    parser.add_argument("input", type=Path, help="folder of images (recursive) or .npz file")
    parser.add_argument("-o", "--output", type=Path, default=Path("predictions.csv"), help="CSV to write")
    parser.add_argument("--batch-size", type=_at_least(1), default=256, help="images per prediction batch")
    parser.add_argument("--image-size", type=_at_least(8), default=96, help="square size images are read at")
    parser.add_argument("--framing", type=_framing, default=1.0,
                        help="zoom every image by this factor, or 'auto': the zoom at which the model tells the "
                             "input's cells apart best (another lab's framing; default 1, as given)")  # fmt: skip
    return parser


def _framing(text: str) -> float | str:
    """``auto`` or a positive zoom factor, for ``--framing``."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'auto' nor a number") from None
    if not 0.25 <= value <= 4:
        raise argparse.ArgumentTypeError(f"zoom must lie in 0.25..4, got {value:g}")
    return value


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type for whole numbers >= minimum, so bad values get a usage error, not a crash."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def predict_to_csv(
    model_path: Path, input_path: Path, output: Path, batch_size: int, image_size: int, framing: float | str = 1.0
) -> list[str]:
    """Classify, write the CSV atomically, and return the summary lines to print."""
    from bc_pipeline.core.storage import write_atomic
    from bc_pipeline.evaluation.predict import load_classifier, locate_model, predict_frame, read_new_images, stored_temperature

    model_file = locate_model(model_path)  # a wrong model path fails before a large folder is read
    new = read_new_images(input_path, image_size=image_size)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter is noise here
    model, class_names = load_classifier(model_path)
    temperature = stored_temperature(model_file.parent)
    images, framing_line = _frame(model, new.images, framing, batch_size)
    frame = predict_frame(model, images, new.sources, class_names, batch_size=batch_size, temperature=temperature)
    write_atomic(output, lambda tmp: frame.to_csv(tmp, index=False))
    lines = [*_summary(input_path, output, frame, new.skipped), f"probabilities calibrated with temperature {temperature:.3f}"]
    return lines + ([framing_line] if framing_line else [])


def _frame(model: Any, images: np.ndarray, framing: float | str, batch_size: int) -> tuple[np.ndarray, str]:
    """The images at the zoom ``--framing`` asks for, and a line saying which (none when left as given)."""
    from bc_pipeline.evaluation.framing import apply_framing
    from bc_pipeline.models.inference import predict_proba

    if framing == 1.0:
        return images, ""
    framed, zoom, reason = apply_framing(lambda batch: predict_proba(model, batch, batch_size=batch_size), images, framing)
    return framed, f"framing: zoom {zoom:g}x ({reason if framing == 'auto' else '--framing'})"


def _summary(input_path: Path, output: Path, frame: pd.DataFrame, skipped: list[tuple[str, str]]) -> list[str]:
    lines = [f"{PROG}: classified {len(frame)} images from {input_path} ({len(skipped)} skipped)"]
    for source, reason in skipped[:MAX_LISTED_SKIPS]:
        lines.append(f"  skipped {source}: {reason}")
    if len(skipped) > MAX_LISTED_SKIPS:
        reasons = Counter(reason for _, reason in skipped[MAX_LISTED_SKIPS:])
        lines.append(f"  ... and {len(skipped) - MAX_LISTED_SKIPS} more: {dict(reasons)}")
    counts = frame["predicted_class"].value_counts()
    lines.append("predicted classes: " + ", ".join(f"{name} {count}" for name, count in counts.items()))
    lines.append(f"wrote {output.resolve()}")
    return lines



def fetch_bloodmnist_main(argv: list[str] | None = None) -> int:
    """``bc-fetch-bloodmnist [DEST]``: fetch the default dataset (default: ``<data dir>/raw/``); 1 on failure."""
    from bc_pipeline.defs.resources import default_data_dir
    from bc_pipeline.ingest.bloodmnist import BLOODMNIST_FILENAME, FetchError, fetch_bloodmnist

    args = sys.argv[1:] if argv is None else argv
    dest = Path(args[0]) if args else default_data_dir() / "raw" / BLOODMNIST_FILENAME
    try:
        fetch_bloodmnist(dest)
    except FetchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0

def instance_main(argv: list[str] | None = None) -> int:
    """``bc-instance``: write the Dagster instance, end runs whose process is gone, free a run's slots.

        bc-instance init [--storage sqlite|postgres] [--replace]   # $DAGSTER_HOME/dagster.yaml
        bc-instance release                                        # what bc_pipeline.run does at start
        bc-instance free-slots RUN_ID                              # by hand, for one run
    """
    parser = argparse.ArgumentParser(prog="bc-instance", description=instance_main.__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="write $DAGSTER_HOME/dagster.yaml (kept if present)")
    init.add_argument("--storage", choices=["sqlite", "postgres"], default=None, help="default: BC_DAGSTER_STORAGE or sqlite")
    init.add_argument("--replace", action="store_true", help="overwrite an existing dagster.yaml")
    commands.add_parser("release", help="mark this host's runs whose process is gone failed and free their pool slots")
    free = commands.add_parser("free-slots", help="free the pool slots one run holds (a run id or its first 8 characters)")
    free.add_argument("run_id")
    args = parser.parse_args(argv)
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        print("bc-instance: error: DAGSTER_HOME is not set (the Makefile sets it to $BC_DATA_DIR/dagster_home)", file=sys.stderr)
        return 2
    if args.command == "init":
        from bc_pipeline.dagster_utils.instance import write_instance
        from bc_pipeline.defs.resources import instance_storage

        storage = args.storage or instance_storage()
        print(f"bc-instance: {write_instance(Path(home), storage, replace=args.replace)} ({storage})")
        return 0
    return _instance_slots(args)


def _instance_slots(args: argparse.Namespace) -> int:
    import dagster as dg

    from bc_pipeline.dagster_utils.runs import free_slots, release_dead_runs

    with dg.DagsterInstance.get() as instance:
        if args.command == "release":
            released = release_dead_runs(instance)
            for item in released:
                print(f"bc-instance: {item.describe()}")
            print(f"bc-instance: {len(released)} run(s) released")
            return 0
        runs = [r for r in instance.get_runs() if r.run_id.startswith(args.run_id)]
        if len(runs) != 1:
            print(f"bc-instance: error: {len(runs)} runs match {args.run_id!r}; give more of the run id", file=sys.stderr)
            return 2
        print(f"bc-instance: freed {free_slots(instance, runs[0].run_id)} pool slot(s) of run {runs[0].run_id}")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
