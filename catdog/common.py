"""What every module and step shares: the user-error exception, the logger, and the names that more than one file
uses (folders, files, layer names, fixed numbers), each defined once here.

Used by: every module of the package and every step, through helper.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

# Silence TF's C++ start-up chatter before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

log = logging.getLogger("catdog")


class CatDogError(Exception):
    """A problem the user can fix; the CLI prints it as one line, without a traceback."""


DEFAULT_SEED = 2018
CLASSES = ("cat", "dog")  # label 0 = cat, 1 = dog, as Kaggle scores it

# --data-dir: what 01 writes, and 02 and 04 read.
SPLIT_CSV = "split.csv"
SPLIT_META = "split.json"
# 01's duplicate groups (03/05's folds and 07 --known-labels read them), and the labelled images of groups that
# hold a cat and a dog, for a person to review.
DUPLICATES_CSV, DUPLICATE_SUSPECTS = "duplicates.csv", "duplicates_suspects.txt"
TRAIN2 = "train2"
SPLITTED = "splitted"
TEST2 = Path("test2") / "test"
FEATURES = "features"
DATA_LOCK = ".catdog.lock"  # held by the run that writes the data dir's shared files (01), removed when it ends

# --model-dir: the folder of each step, and where later steps (04, 07, 08) read it.
SINGLE_DIR, FINETUNE_DIR, MERGE_DIR, HYPEROPT_DIR = "single", "finetune", "merge", "hyperopt"
STUDENT_DIR = "student"  # 09's distilled students (and their sidecars' kind)
LOGS_DIR, ANALYSIS_DIR, BLEND_DIR = "logs", "analysis", "blend"
HYPEROPT_BEST = Path(HYPEROPT_DIR) / "best.keras"
RESULTS_CSV = "results.csv"
# A K-fold run's folder: its summary (written last: a folder without it is unfinished), predictions, test mean.
KFOLD_SUMMARY, OOF_CSV, TEST_CSV = "kfold.json", "oof.csv", "test.csv"
# ...and each fold model's own test predictions (id, fold1..foldK): pseudo-labels for fold k from fold k's model.
TEST_FOLDS_CSV = "test_folds.csv"
# 08's export folder under --model-dir, and its files (07 and predict.py read them too).
EXPORT_DIR = "export"
EXPORT_KERAS, EXPORT_SAVED_MODEL, EXPORT_TFLITE, EXPORT_INFO = ("catdog.keras", "saved_model", "catdog.tflite",
                                                                "export.json")
EXPORT_TFLITE_INT8 = "catdog_int8.tflite"  # a student's full-integer TFLite (uint8 in), beside the float16 one

# A sidecar's `kind`: the step that trained the model (04 --mode full and 09's students: images, not features, in).
SIDECAR_KINDS = (SINGLE_DIR, MERGE_DIR, HYPEROPT_DIR, FINETUNE_DIR, STUDENT_DIR)
FINETUNE_FULL = "finetune_full"

# Layer names that later steps look up: the heads' Dense (04 starts from 03's, 08 copies it), the pooling.
PREDICTION_LAYER = "prediction"
POOL_LAYER = "avg_pool"

CLIP = (0.005, 0.995)  # the report's submission clip
# log(0) guards: Kaggle's log loss as sklearn computes it (float64 machine epsilon), and the logit's.
LOG_EPS = float(np.finfo(np.float64).eps)
LOGIT_EPS = 1e-7
SUSPECT_SHARE = 0.002  # 07 --analyze's suspects without --suspect-loss: the worst 0.2% of the judged rows
PREDICT_BATCH = 256    # rows per batch when predicting from feature rows


def versions() -> dict:
    """Library versions stored with every output."""
    import keras
    import tensorflow as tf
    return {"tensorflow": tf.__version__, "keras": keras.__version__}


PROGRESS_SECONDS = 30.0  # without a terminal: one plain progress line this often


def progress(it, desc: str, unit: str = "batch", total: int | None = None, disable: bool = False,
             leave: bool = False):
    """`it`, showing how far it got: the one place that decides how. On a terminal a tqdm bar; when stderr is not
    a terminal (a log file, CI, nohup) a bar's carriage-return frames would pile up in one line, so instead a
    plain line every PROGRESS_SECONDS, and one when done if any was written. `disable` shows nothing."""
    if disable:
        return it
    if sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(it, desc=desc, unit=unit, total=total, leave=leave, mininterval=1.0)
    return _plain_progress(it, desc, unit, total if total is not None else _length(it))


def _length(it) -> int | None:
    try:
        return len(it)
    except TypeError:
        return None


def _plain_progress(it, desc: str, unit: str, total: int | None):
    start = last = time.monotonic()
    done, wrote = 0, False
    of = f"/{total}" if total is not None else ""
    for item in it:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= PROGRESS_SECONDS:
            print(f"{desc}: {unit} {done}{of}, {now - start:.0f} s", file=sys.stderr, flush=True)
            last, wrote = now, True
    if wrote:
        print(f"{desc}: {unit} {done}{of}, done in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow. Call it before building any layer: Keras 3 draws each
    initializer's and Dropout's seed when a layer is created, so seeding after building is too late."""
    import keras
    keras.utils.set_random_seed(seed)
