"""Pseudo-labels (03/05 --pseudo FILE --pseudo-min P): confident test predictions of an earlier round as extra
training rows, the predicted P(dog) as a soft target (--pseudo-hard: 0/1). They only ever train: never a valid
row, never an out-of-fold row.

K-fold honesty: fold k's out-of-fold figure is honest only if its pseudo-labels come from a model that never
trained on fold k's rows. A submission (or a K-fold folder's test.csv, the mean of every fold model) learnt from
every row, so with --folds only a K-fold folder of the same folds is taken: its test_folds.csv holds each fold
model's own test predictions, and fold k of this run trains on fold k's column. "The same folds" is checked by
the folds' fingerprint (every labelled file and its fold) that kfold.json records.

Used by: 03 and 05 (load_pseudo), heads.py (Pseudo.rows when training).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .common import KFOLD_SUMMARY, TEST_CSV, TEST_FOLDS_CSV, CatDogError, log
from .files import file_sha256


def fold_fingerprint(files: Sequence[str], fold: np.ndarray) -> str:
    """sha256 of every labelled file with its fold: two K-fold runs with equal fingerprints held out the same rows."""
    text = "\n".join(f"{f},{int(k)}" for f, k in zip(files, fold, strict=True))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Pseudo:
    """The pseudo-labels of one --pseudo FILE: `probs` holds P(dog) of each test row (feats.test order; NaN for
    rows FILE lacks), one row for every fold of a K-fold source, else a single row."""
    source: str
    sha256: str
    min_p: float
    hard: bool
    probs: np.ndarray

    def rows(self, fold: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The test rows to train on (fold `fold`'s pseudo-labels with --folds) and their targets."""
        p = self.probs[0 if fold is None else fold]
        pick = np.flatnonzero((p >= self.min_p) | (p <= 1 - self.min_p))
        target = p[pick] if not self.hard else (p[pick] >= 0.5).astype(np.float64)
        return pick, target.astype(np.float32)

    def refuse_outputs(self, outputs: Sequence[Path]) -> None:
        """Refuse a run that would overwrite its own --pseudo FILE (a K-fold folder it retrains, a submission)."""
        source = Path(self.source).resolve()
        for out in outputs:
            if source == Path(out).resolve() or source.is_relative_to(Path(out).resolve()):
                raise CatDogError(f"--pseudo {self.source}: this run would overwrite it with {out}: give the second "
                                  f"round another --model-dir (or --submissions-dir), or copy FILE first")

    def record(self, rows: int | list[int]) -> dict:
        """What sidecars and kfold.json record."""
        return {"source": self.source, "sha256": self.sha256, "min": self.min_p, "hard": self.hard, "rows": rows}


def _read_predictions(path: Path, columns: Sequence[str], what: str) -> pd.DataFrame:
    try:
        df = pd.read_csv(path)
        df = df[["id", *columns]]
        df["id"] = df["id"].astype(np.int64)
        values = df[list(columns)].to_numpy(np.float64)
    except (OSError, ValueError, KeyError, TypeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise CatDogError(f"--pseudo {path}: not {what} ({type(e).__name__}: {str(e)[:100]})") from None
    if np.isnan(values).any() or (values < 0).any() or (values > 1).any():
        raise CatDogError(f"--pseudo {path}: predictions must be probabilities in [0, 1], without gaps")
    return df


def load_pseudo(given: str, min_p: float, hard: bool, test_ids: np.ndarray, folds: int | None = None,
                fold_sha256: str | None = None) -> Pseudo:
    """--pseudo FILE: a submission CSV (id,label) or a K-fold folder's test.csv (id,prediction), or for --folds K
    a K-fold folder of the same folds (`fold_sha256`: this run's fold_fingerprint), whose test_folds.csv is read."""
    path = Path(given)
    folder = path if path.is_dir() else None
    if folds:
        if folder is None or not (folder / KFOLD_SUMMARY).is_file():
            hint = f" (give its folder {path.parent})" if (path.parent / KFOLD_SUMMARY).is_file() else ""
            raise CatDogError(
                f"--pseudo {given} with --folds {folds}: its predictions come from models that trained on every "
                f"fold's rows, so fold k's pseudo-labels would carry fold k's labels into its out-of-fold figure; "
                f"give a K-fold folder{hint} trained with --folds {folds} and --seed as now on this split (03/05 "
                f"--folds {folds} first): its {TEST_FOLDS_CSV} holds each fold model's own test predictions")
        try:
            summary = json.loads((folder / KFOLD_SUMMARY).read_text())
        except (OSError, ValueError):
            summary = None
        if not isinstance(summary, dict) or summary.get("fold_sha256") != fold_sha256 or summary.get("folds") != folds:
            raise CatDogError(f"--pseudo {given}: it was not trained on this run's {folds} folds (other --folds, "
                              f"--seed, split or duplicate groups, or a run from before {TEST_FOLDS_CSV}), so its "
                              f"fold models may have trained on rows this run's folds hold out: retrain it with "
                              f"--folds {folds} and this --seed first")
        path = folder / TEST_FOLDS_CSV
        columns = [f"fold{k + 1}" for k in range(folds)]
        df = _read_predictions(path, columns, f"a {TEST_FOLDS_CSV} of 03/05 --folds {folds}")
    else:
        if folder is not None:
            path = folder / TEST_CSV
        columns = ["label"]
        try:
            header = pd.read_csv(path, nrows=0).columns
            columns = ["prediction"] if "prediction" in header and "label" not in header else columns
        except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
            pass  # _read_predictions says what is wrong with it
        df = _read_predictions(path, columns, "a submission CSV (id,label) or a K-fold folder's test.csv")
        if folder is not None:
            log.warning(f"--pseudo {given}: its fold models trained on split.csv's valid rows too, so what they "
                        f"learnt of those rows reaches this head through the pseudo-labels: val_loss may flatter it")
    unknown = set(df.id.tolist()) - set(np.asarray(test_ids).tolist())
    if unknown or df.id.duplicated().any():
        raise CatDogError(f"--pseudo {path}: its ids are not this data dir's test images (e.g. "
                          f"{sorted(unknown)[:3] or df.id[df.id.duplicated()].tolist()[:3]}): give predictions of "
                          f"this data dir's test set")
    table = df.set_index("id").reindex(np.asarray(test_ids))
    probs = table[columns].to_numpy(np.float64).T
    return Pseudo(str(path), file_sha256(path), min_p, hard, probs)


def pseudo_for(data_dir: str | Path, given: str, min_p: float, hard: bool, folds: int | None, seed: int,
               groups: np.ndarray | None = None) -> Pseudo:
    """03/05's --pseudo: load_pseudo against this data dir's test images and, with --folds, the folds train_kfold
    will deal (split.csv's Kaggle rows, `seed`, `groups`)."""
    from .data import fold_assignment, kaggle_rows, laid_out_test_ids, read_split
    fold_sha256 = None
    if folds:
        split = read_split(data_dir)
        fold = fold_assignment(split.label.to_numpy(), folds, seed, kaggle_rows(data_dir), groups)
        fold_sha256 = fold_fingerprint(split.filename.to_numpy(), fold)
    return load_pseudo(given, min_p, hard, laid_out_test_ids(data_dir), folds, fold_sha256)
