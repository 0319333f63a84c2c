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
# What a test entry stands for when its name is not Kaggle's (`7.JPG`, `7.jpeg`): 07 still owes Kaggle its id.
_TEST_LIKE = re.compile(r"^(\d+)\.jpe?g$", re.IGNORECASE)
TEST_ID_MAX = int(np.iinfo(np.int64).max)  # Kaggle's ids are 1..12500; beyond int64 no array could hold one


def parse_train_name(name: str) -> tuple[int, int] | None:
    """`cat.123.jpg` -> (0, 123), `dog.45.jpg` -> (1, 45); None if not a Kaggle training name."""
    m = _TRAIN_NAME.match(name)
    return (CLASSES.index(m.group(1)), int(m.group(2))) if m else None


def parse_test_name(name: str) -> int | None:
    """`123.jpg` -> 123; None if not a Kaggle test name (also for id 0 and ids beyond int64)."""
    m = _TEST_NAME.match(name)
    return int(m.group(1)) if m and 1 <= int(m.group(1)) <= TEST_ID_MAX else None


def test_entry_id(name: str) -> int | None:
    """The test id an entry of test/ stands for, even under a name 01 cannot use (`7.JPG`, `7.jpeg`); None when
    its name holds no possible id (`notes.txt`, `0.jpg`)."""
    m = _TEST_LIKE.match(name)
    return int(m.group(1)) if m and 1 <= int(m.group(1)) <= TEST_ID_MAX else None


def test_name_problem(name: str) -> str:
    """Why a test entry's name is not one 01 can use: what Kaggle's would be, or why it holds no id."""
    m = _TEST_LIKE.match(name)
    if m and int(m.group(1)) == 0:
        return "test id 0 is not a Kaggle id (they start at 1): rename it N.jpg with its id"
    if m and int(m.group(1)) > TEST_ID_MAX:
        return f"test id {m.group(1)} is beyond any Kaggle id (at most {TEST_ID_MAX}): rename it N.jpg with its id"
    if m:
        return f"not Kaggle's name for test id {int(m.group(1))}: rename it {int(m.group(1))}.jpg"
    return "name does not match Kaggle's pattern N.jpg (N: the test id, from 1)"


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



def unusable_test_entries(data_dir: str | Path) -> list[tuple[str, int | None, str]]:
    """(name, test id or None, problem) of every entry of test/ that 01 saw and could not use, from split.json:
    a submission still owes Kaggle a row for each that has an id."""
    meta = None
    with contextlib.suppress(OSError, ValueError):
        meta = json.loads((Path(data_dir) / SPLIT_META).read_text())
    entries = meta.get("test_unusable", []) if isinstance(meta, dict) else []
    try:
        return [(str(n), None if i is None else int(i), str(why)) for n, i, why in entries]
    except (TypeError, ValueError):
        raise CatDogError(f"{Path(data_dir) / SPLIT_META} is not one 01_reorganize_data.py wrote: rerun it") from None


def split_fingerprint(data_dir: str | Path) -> str:
    """sha256 of split.csv: models trained on another split (or other rows) are not judged together."""
    path = Path(data_dir) / SPLIT_CSV
    if not path.is_file():
        raise CatDogError(f"{path} not found: run 01_reorganize_data.py first")
    return file_sha256(path)


def _units(labels: np.ndarray, groups: np.ndarray | None, rows: np.ndarray) -> list[np.ndarray]:
    """`rows` as the units a split or fold keeps together: one per duplicate group (`groups`: each row's group,
    -1 for none), one per other row; in the order of their first row."""
    units: dict = {}
    for r in rows:
        g = groups[r] if groups is not None else -1
        units.setdefault(("g", int(g)) if g >= 0 else ("r", int(r)), []).append(r)
    return [np.asarray(u) for u in units.values()]


def _unit_label(labels: np.ndarray, unit: np.ndarray) -> int:
    """A unit's class for stratifying: its rows' majority label, on a tie its first row's."""
    counts = np.bincount(labels[unit])
    return int(labels[unit[0]]) if (counts == counts.max()).sum() > 1 else int(counts.argmax())


def _class_units(labels: np.ndarray, rows: np.ndarray, groups: np.ndarray | None) -> dict[int, list[np.ndarray]]:
    out: dict[int, list[np.ndarray]] = {int(c): [] for c in np.unique(labels[rows])}
    for unit in _units(labels, groups, rows):
        out[_unit_label(labels, unit)].append(unit)
    return out


def stratified_split(labels: Sequence[int], valid_frac: float, seed: int, groups: np.ndarray | None = None
                     ) -> np.ndarray:
    """Boolean mask of validation rows: the same fraction of each class, fixed by `seed`.

    Depends only on the row order and the labels, so it is stable across runs and machines. `groups` (each row's
    duplicate group, -1 for none; duplicates.group_ids) keeps each group on one side: groups are drawn like rows,
    in a seeded order, each taken into valid while it fits the class's share; without groups (or with none of two
    rows) the mask is exactly the one without `groups`.
    """
    if not 0 < valid_frac < 1:
        raise CatDogError(f"--valid-frac must be between 0 and 1, got {valid_frac}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    valid = np.zeros(len(labels), dtype=bool)
    if groups is not None:
        # Singleton units drawn by rng.permutation(len) in row order are the rows rng.permutation(rows) gives.
        for _, units in _class_units(labels.astype(int), np.arange(len(labels)), np.asarray(groups)).items():
            n_valid, taken = int(round(sum(len(u) for u in units) * valid_frac)), 0
            for k in rng.permutation(len(units)):
                if taken + len(units[k]) <= n_valid:
                    valid[units[k]], taken = True, taken + len(units[k])
        return valid
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        n_valid = int(round(len(rows) * valid_frac))
        valid[rng.permutation(rows)[:n_valid]] = True
    return valid


def fold_assignment(labels: np.ndarray, folds: int, seed: int, held_out: np.ndarray | None = None,
                    groups: np.ndarray | None = None) -> np.ndarray:
    """Each row's fold (0..folds-1): stratified (each class dealt round the folds in a seeded order), the same
    for every model with the same seed; -1 for rows outside `held_out` (extra data: always trained on). `groups`
    (duplicates.group_ids) deals each duplicate group whole, to the fold of the class with the fewest rows so far
    (the first on a tie: for single rows that is the plain deal, so without groups the folds are the same)."""
    labels = np.asarray(labels).astype(int)
    held_out = np.ones(len(labels), bool) if held_out is None else np.asarray(held_out, bool)
    fold = np.full(len(labels), -1)
    rng = np.random.default_rng(seed)
    if groups is not None:
        for c, units in _class_units(labels, np.flatnonzero(held_out), np.asarray(groups)).items():
            n = sum(len(u) for u in units)
            if n < folds or len(units) < folds:
                raise CatDogError(f"--folds {folds} needs at least {folds} labelled images (duplicate groups count "
                                  f"once) of each class; {CLASSES[c]} has {len(units)}: use fewer folds")
            counts = np.zeros(folds, int)
            for k in rng.permutation(len(units)):
                f = int(np.argmin(counts))
                fold[units[k]], counts[f] = f, counts[f] + len(units[k])
        return fold
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

