"""The command line: flag types with their ranges, the flags every step shares, and run_cli, which turns a user
error into one line and exit code 2. The only module that sees argparse: steps parse their flags here and build
the library's typed configs (HeadConfig, ExtractSettings) from them.

Used by: every step (01-08, predict.py).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable

from .common import CLIP, DEFAULT_SEED, CatDogError
from .precision import PRECISION_CHOICES


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's accepted range and default (not None: such flags' help says what happens without)."""

    def _get_help_string(self, action):
        text = action.help or ""
        accepted = getattr(action.type, "accepted", "")
        if accepted and accepted not in text:
            text += f" [{accepted}]"
        if action.default is None or action.default is argparse.SUPPRESS or "%(default)" in text:
            return text
        return text + " (default: %(default)s)"


def number(kind: type = int, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], int | float]:
    """An argparse `type=` that refuses what is not a finite `kind` within the range, so a bad value fails in
    argparse (with the range in the message and in -h) before any work starts."""
    bounds = ([f"{'>' if low_open else '>='} {low}"] if low is not None else []) + (
        [f"{'<' if high_open else '<='} {high}"] if high is not None else [])
    accepted = " ".join(["an integer" if kind is int else "a number", " and ".join(bounds)]).strip()

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {accepted}") from None
        if not (math.isfinite(value) and (low is None or (value > low if low_open else value >= low))
                and (high is None or (value < high if high_open else value <= high))):
            raise argparse.ArgumentTypeError(f"{text} is not {accepted}")
        return value

    convert.accepted, convert.__name__ = accepted, kind.__name__
    return convert


POSITIVE_INT = number(int, 1)
NONNEGATIVE_INT = number(int, 0)
POSITIVE = number(float, 0, low_open=True)
PROBABILITY = number(float, 0, 1)
DROPOUT = number(float, 0, 1, high_open=True)
SEED = number(int, 0, 2**32 - 1)  # what numpy's and TensorFlow's seeding accept


def base_parser(description: str, cnn: bool = False) -> argparse.ArgumentParser:
    """The flags every script shares; `cnn` adds --weights and --image-size."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument("--data-dir", default="data", help="folder with the Kaggle data and derived files")
    p.add_argument("--model-dir", default="model", help="folder for trained models, logs and results")
    p.add_argument("--seed", type=SEED, default=DEFAULT_SEED, help="the one seed behind every random choice")
    p.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    if cnn:
        p.add_argument("--weights", default="imagenet",
                       help="'imagenet' (downloaded to ~/.keras/models), 'none' (random init, for tests "
                            "and the demo), or a folder holding Keras *_notop.h5 files; for the foundation "
                            "encoders 'imagenet' means pretrained (their KerasHub preset, downloaded into the "
                            "kagglehub cache, KAGGLEHUB_CACHE) and a folder is a KerasHub preset folder")
        p.add_argument("--image-size", type=number(int, 32), default=None,
                       help="square input size for every backbone (default: each backbone's native size)")
    return p


def run_cli(main: Callable[[argparse.Namespace], object], args: argparse.Namespace, log_stream=None) -> None:
    """Run a script's main(): user errors become one line and exit code 2; a main() that returns an int (predict.py)
    exits with it. Logs go to stdout, or `log_stream` (predict.py keeps stdout for its results)."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s", stream=log_stream or sys.stdout)
    try:
        result = main(args)
    except CatDogError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished outputs are kept; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    if isinstance(result, int):
        sys.exit(result)



def precision_args(p: argparse.ArgumentParser, what: str = "the CNNs", mixed_precision: bool = False) -> None:
    """--precision for every step that runs a CNN; `mixed_precision` adds the earlier --mixed-precision (02's),
    which is --precision float16."""
    p.add_argument("--precision", default="float32", choices=PRECISION_CHOICES,
                   help=f"compute precision of {what}: float32 (the report's numbers); bfloat16 (1.6x faster on a "
                        f"CPU with AVX512_BF16 or AMX, features within about 1%%); float16 (for GPUs with tensor "
                        f"cores; slow on a CPU); auto: bfloat16 on such a CPU, float16 on a GPU of compute "
                        f"capability >= 7.0, else float32 (it logs what it picked and why)")
    if mixed_precision:
        p.add_argument("--mixed-precision", dest="precision", action="store_const", const="float16",
                       help="the same as --precision float16 (kept for earlier commands)")


def head_args(p: argparse.ArgumentParser, epochs: int, optimizer: str = "adadelta", sgd_lr: float = 0.01) -> None:
    """Training flags shared by 03, 04 and 05; defaults are the report's. --lr defaults by optimizer: read the
    flags with parse_head_args."""
    p.add_argument("--epochs", type=POSITIVE_INT, default=epochs, help="training epochs")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=128, help="rows per training batch")
    p.add_argument("--optimizer", default=optimizer, choices=["adadelta", "sgd"], help="optimizer")
    p.add_argument("--lr", type=POSITIVE,
                   help=f"learning rate (default: 1.0 for adadelta, Keras 2's default that the report used; "
                        f"{sgd_lr} for sgd)")
    p.add_argument("--rho", type=number(float, 0, 1, low_open=True, high_open=True), default=0.95,
                   help="Adadelta's decay rate rho")
    p.add_argument("--momentum", type=number(float, 0, 1, high_open=True), default=0.9, help="SGD momentum")
    p.add_argument("--decay", type=number(float, 0), default=0.0,
                   help="SGD's Keras 2 learning-rate decay: lr / (1 + decay * step)")
    p.add_argument("--dropout", type=DROPOUT, default=0.5, help="dropout rate before the Dense layer")
    p.set_defaults(sgd_lr=sgd_lr)


def parse_head_args(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse a parser with head_args and fill --lr's optimizer-dependent default, so that vars(args), which
    sidecars record, holds the value used."""
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 1.0 if args.optimizer == "adadelta" else args.sgd_lr
    del args.sgd_lr
    return args


def views_arg(p: argparse.ArgumentParser) -> None:
    """--views for the heads (03, 05, 06): train on feature files' augmented views."""
    p.add_argument("--views", type=POSITIVE_INT, default=1,
                   help="1: train on the plain features (the report); V > 1: each epoch each training row is "
                        "one of the first V views 02 --views wrote, drawn at random (seeded); validation always "
                        "uses the plain rows, so val_loss compares with the report's")


def kfold_args(p: argparse.ArgumentParser) -> None:
    """--folds (and its duplicate groups) and --pseudo, shared by the heads (03, 05)."""
    p.add_argument("--folds", type=number(int, 2),
                   help="train one head per fold of a stratified, seeded K-fold over every labelled Kaggle row "
                        "(train and valid) instead of the report's single split; writes <model>_k<K>/ with the "
                        "fold models, oof.csv (out-of-fold predictions) and test.csv (the folds' mean)")
    p.add_argument("--no-group-duplicates", action="store_true",
                   help="--folds: deal rows one by one, not each duplicate group of data/duplicates.csv to one fold "
                        "(by default the folds group them when 01 grouped its split)")
    p.add_argument("--pseudo", metavar="FILE",
                   help="also train on confident test predictions of an earlier round: a submission CSV or a K-fold "
                        "folder (its test.csv); with --folds only a K-fold folder of the same folds (its "
                        "test_folds.csv: fold k learns from fold k's own model). Never valid or out-of-fold rows")
    p.add_argument("--pseudo-min", type=number(float, 0.5, 1), default=0.95, metavar="P",
                   help="--pseudo: the test rows whose P(dog) is at least P or at most 1-P")
    p.add_argument("--pseudo-hard", action="store_true",
                   help="--pseudo: train on 0/1 targets, not the predicted probability (a soft target)")


def clip_args(p: argparse.ArgumentParser) -> None:
    """--clip-low/--clip-high, shared by every step that writes a submission; check with clip_range()."""
    p.add_argument("--clip-low", type=PROBABILITY, default=CLIP[0], help="lowest probability submitted")
    p.add_argument("--clip-high", type=PROBABILITY, default=CLIP[1], help="highest probability submitted")


def clip_range(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[float, float]:
    """The clip range, refused by argparse (before any work) unless low < high."""
    if not args.clip_low < args.clip_high:
        p.error(f"--clip-low ({args.clip_low}) must be below --clip-high ({args.clip_high})")
    return args.clip_low, args.clip_high
