"""Kaggle's data as the steps see it: image names and lists of them, split.csv (the one split every step trains and
validates on), the test images 01 laid out, and the K-fold assignment of the labelled rows.

Used by: 01 (names, name lists, the split), 02-08 (split.csv, test ids), 03/05/07 (folds).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .common import CLASSES, SPLIT_CSV, SPLIT_META, TEST2, TRAIN2, CatDogError
from .files import file_sha256, plain_name, read_json

_TRAIN_NAME = re.compile(r"^(cat|dog)\.(\d+)\.jpg$")
_TEST_NAME = re.compile(r"^(\d+)\.jpg$")


def parse_train_name(name: str) -> tuple[int, int] | None:
    """`cat.123.jpg` -> (0, 123), `dog.45.jpg` -> (1, 45); None if not a Kaggle training name."""
    m = _TRAIN_NAME.match(name)
    return (CLASSES.index(m.group(1)), int(m.group(2))) if m else None


def parse_test_name(name: str) -> int | None:
    """`123.jpg` -> 123; None if not a Kaggle test name."""
    m = _TEST_NAME.match(name)
    return int(m.group(1)) if m else None


def read_name_list(path: str | Path) -> list[str]:
    """Image names, one per line, as split.csv names them; `#` starts a comment (01 --exclude's lists, 07's
    suspects.txt). A line that is a path, not a name, is refused with its line."""
    path = Path(path)
    fix = "give a text file with one image name per line"
    if path.is_dir():
        raise CatDogError(f"{path} is a folder, not a file: {fix} (such as data/exclude_report.txt, or the "
                          "suspects.txt of 07 --analyze)")
    if not path.is_file():
        raise CatDogError(f"{path}: " + ("not a regular file" if path.exists() else "no such file") + f" ({fix})")
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise CatDogError(f"{path}: not a text file (byte {e.start} is not UTF-8); {fix}") from None
    names = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(plain_name(line, f"{path}, line {number}",
                                    "give each image by its file name alone, as split.csv names it (cat.1.jpg)"))
    return names


# ==================== Splitting =====================================================================================

SPLIT_COLUMNS = ("filename", "label", "subset", "source")
# Where a labelled image comes from: Kaggle's train/, or the Oxford-IIIT Pet images of 01 --extra-data.
SOURCES = ("kaggle", "oxford-pets")


def read_split(data_dir: str | Path) -> pd.DataFrame:
    """split.csv (filename, label, subset, source): the one split every step trains and validates on.

    It must be the file 01 wrote: its sha256 is the one split.json records (a split.csv edited or replaced since is
    refused), and each name is a plain file name (a path would lead out of train2/). A split.csv of an older 01,
    without `source`, holds Kaggle's images only and reads as such.
    """
    path, meta_path = Path(data_dir) / SPLIT_CSV, Path(data_dir) / SPLIT_META
    if not path.is_file():
        raise CatDogError(f"{path} not found: run 01_reorganize_data.py first")
    recorded = (read_json(meta_path) or {}).get("split_sha256")
    if not recorded:
        raise CatDogError(f"{path} comes without its record in {meta_path} (01 writes the two together): rerun "
                          "01_reorganize_data.py")
    if file_sha256(path) != recorded:
        raise CatDogError(f"{path} is not the split 01 wrote (edited or replaced since: its sha256 is not the one "
                          f"{meta_path} records): rerun 01_reorganize_data.py (its --exclude leaves images out)")
    garbage = CatDogError(f"{path} is not a split file made by 01_reorganize_data.py: rerun it")
    try:  # keep_default_na: an image may be named NA
        df = pd.read_csv(path, dtype={"filename": str, "label": int, "subset": str, "source": str},
                         keep_default_na=False)
    except ValueError:  # empty, not UTF-8, or text where a label belongs
        raise garbage from None
    if tuple(df.columns) == SPLIT_COLUMNS[:3]:
        df["source"] = SOURCES[0]
    if (tuple(df.columns) != SPLIT_COLUMNS or df.empty or not df.label.isin(range(len(CLASSES))).all()
            or not df.subset.isin(("train", "valid")).all() or not df.source.isin(SOURCES).all()):
        raise garbage
    for row, name in enumerate(df.filename, start=2):  # line 1 is the header
        plain_name(name, f"{path}, line {row}", "split.csv names each image by its file name alone; rerun "
                   "01_reorganize_data.py")
    return df


def train_image_paths(data_dir: str | Path, split: pd.DataFrame) -> list[str]:
    """Paths of the labelled images under train2/, in split.csv order."""
    root = Path(data_dir) / TRAIN2
    return [str(root / CLASSES[lab] / name) for name, lab in zip(split.filename, split.label, strict=True)]


def test_images(data_dir: str | Path) -> tuple[np.ndarray, list[str]]:
    """Test ids ascending numerically (`10.jpg` after `9.jpg`) and their paths under test2/test, by the files'
    own names (`01.jpg` is id 1 too, so a name is never rebuilt from its id)."""
    root = Path(data_dir) / TEST2
    if not root.is_dir():
        raise CatDogError(f"{root} not found: run 01_reorganize_data.py first")
    found = sorted((i, p.name) for p in root.iterdir() if (i := parse_test_name(p.name)) is not None)
    for (i, a), (j, b) in itertools.pairwise(found):
        if i == j:
            raise CatDogError(f"{root / a} and {root / b} are both test id {i}: rerun 01_reorganize_data.py")
    return np.asarray([i for i, _ in found], dtype=np.int64), [str(root / name) for _, name in found]



def laid_out_test_ids(data_dir: str | Path) -> np.ndarray:
    """The ids of the test images 01 laid out in test2/, checked against the test list 01 recorded in
    split.json: the set every feature file and every submission must cover exactly."""
    ids, paths = test_images(data_dir)
    meta_path = Path(data_dir) / SPLIT_META
    recorded = None
    with contextlib.suppress(OSError, ValueError, AttributeError):  # no readable record: 01 rebuilds it
        recorded = json.loads(meta_path.read_text()).get("test_sha256")
    names = "\n".join(Path(p).name for p in paths)
    if recorded and hashlib.sha256(names.encode()).hexdigest() != recorded:
        raise CatDogError(f"{Path(data_dir) / TEST2} no longer holds the {len(ids)} test images 01 laid out "
                          f"(see {meta_path}): rerun 01_reorganize_data.py, then 02")
    return ids



def split_fingerprint(data_dir: str | Path) -> str:
    """sha256 of split.csv: models trained on another split (or other rows) are not judged together."""
    path = Path(data_dir) / SPLIT_CSV
    if not path.is_file():
        raise CatDogError(f"{path} not found: run 01_reorganize_data.py first")
    return file_sha256(path)


def stratified_split(labels: Sequence[int], valid_frac: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows: the same fraction of each class, fixed by `seed`.

    Depends only on the row order and the labels, so it is stable across runs and machines.
    """
    if not 0 < valid_frac < 1:
        raise CatDogError(f"--valid-frac must be between 0 and 1, got {valid_frac}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    valid = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        n_valid = int(round(len(rows) * valid_frac))
        valid[rng.permutation(rows)[:n_valid]] = True
    return valid


def fold_assignment(labels: np.ndarray, folds: int, seed: int, held_out: np.ndarray | None = None) -> np.ndarray:
    """Each row's fold (0..folds-1): stratified (each class dealt round the folds in a seeded order), the same
    for every model with the same seed; -1 for rows outside `held_out` (extra data: always trained on)."""
    labels = np.asarray(labels).astype(int)
    held_out = np.ones(len(labels), bool) if held_out is None else np.asarray(held_out, bool)
    fold = np.full(len(labels), -1)
    rng = np.random.default_rng(seed)
    for c in np.unique(labels[held_out]):
        rows = rng.permutation(np.flatnonzero((labels == c) & held_out))
        if len(rows) < folds:
            raise CatDogError(f"--folds {folds} needs at least {folds} labelled images of each class; "
                              f"{CLASSES[c]} has {len(rows)}: use fewer folds")
        fold[rows] = np.arange(len(rows)) % folds
    return fold


def kaggle_rows(data_dir: str | Path) -> np.ndarray:
    """Mask of split.csv's rows from Kaggle's own training set (not 01 --extra-data's), the rows folds hold out."""
    split = read_split(data_dir)
    return (split["source"] == "kaggle").to_numpy() if "source" in split else np.ones(len(split), bool)

