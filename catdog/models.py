"""Saved models and what travels with them: the sidecar beside every model (every flag, the config, the feature
files' settings, the split), loading with clear messages, predictions of a saved model fed as it was trained, and
the submission: Kaggle's log loss, the checks Kaggle would make, the clipped id,label CSV.

Used by: 03-06 (saving), 04 (03's heads), 07 (choosing, predicting, submitting), 08 and predict.py (loading).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .backbones import get_backbone
from .common import (
    CLIP,
    FINETUNE_FULL,
    HYPEROPT_BEST,
    KFOLD_SUMMARY,
    LOG_EPS,
    MERGE_DIR,
    OOF_CSV,
    RESULTS_CSV,
    SIDECAR_KINDS,
    SINGLE_DIR,
    SPLIT_CSV,
    STUDENT_DIR,
    TEST_CSV,
    CatDogError,
    log,
    versions,
)
from .data import split_fingerprint
from .features import ExtractSettings, Features, check_same_settings, image_parts, load_features, rebuild_command
from .files import atomic_path, file_sha256, write_csv, write_json
from .images import image_dataset


def save_model(model, path: str | Path, meta: dict) -> None:
    """Save `<path>.keras` and its `<path>.json` sidecar: the run's whole configuration (`args`: every flag
    with its resolved default), the feature files' settings, the seed and library versions, so that any
    result can be rerun from its sidecar alone."""
    path = Path(path)
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)
        write_sidecar(tmp, {**meta, **versions()}, path.with_suffix(".json"))
    log.info(f"saved {path} and its sidecar {path.with_suffix('.json').name}")


# The sidecar's record of its model file: a kill between writing the sidecar and renaming the model into place
# (or a model copied over by hand) leaves a sidecar that describes another model, which readers then refuse.
MODEL_SHA256 = "model_sha256"


def write_sidecar(model_file: str | Path, meta: dict, sidecar: str | Path) -> None:
    """Write the sidecar of the complete model file `model_file` (still under its temp name: rename it into place
    after this), recording its sha256."""
    write_json({**meta, MODEL_SHA256: file_sha256(model_file)}, sidecar)


# What a sidecar must hold, by kind, for 04 and 07 to feed its model as it was trained.
SIDECAR_KEYS = {kind: ("features", "feature_attrs", "seed") for kind in SIDECAR_KINDS}
SIDECAR_KEYS[FINETUNE_FULL] = SIDECAR_KEYS[STUDENT_DIR] = ("backbone", "feature_attrs", "seed")
# Models that read the images themselves (one backbone end to end), not feature files.
IMAGE_KINDS = (FINETUNE_FULL, STUDENT_DIR)


def load_model(path: str | Path):
    """A saved model and its sidecar metadata, with a clear message for anything missing or broken."""
    path = Path(path)
    if path.suffix == ".keras" and not path.is_file():
        raise CatDogError(f"{path} not found: train the model first, or check --model")
    meta = read_sidecar(path)  # the cheap checks first
    return load_keras(path), meta


def read_sidecar(path: str | Path) -> dict:
    """The sidecar of the saved model `path` (`<name>.json` beside `<name>.keras`), checked to hold what its
    kind needs and to describe this very model file, with a clear message for anything missing or broken."""
    path = Path(path)
    if path.is_dir():
        raise CatDogError(folder_problem(path))
    if path.suffix != ".keras":
        raise CatDogError(f"{path} is not a .keras model: give one that 03-06 saved (model/<step>/<name>.keras)")
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise CatDogError(f"{meta_path} not found: train the model first, or check --model")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CatDogError(f"{meta_path} is not a valid sidecar (not JSON: {e}): retrain {path.name}") from e
    if not isinstance(meta, dict) or meta.get("kind") not in SIDECAR_KEYS:
        raise CatDogError(f"{meta_path} is not a catdog sidecar (no known 'kind'): retrain {path.name}")
    missing = [k for k in SIDECAR_KEYS[meta["kind"]] if k not in meta]
    if missing:
        raise CatDogError(f"{meta_path} lacks {', '.join(missing)}: retrain {path.name}")
    names = meta.get("features", [])
    for name in names if isinstance(names, list) else [names]:
        # A feature name becomes a path under the data dir's features/: a name with a path in it would lead out.
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", "..") or "\\" in name:
            raise CatDogError(f"{meta_path} names the feature file {name!r}, which is not a file name in a data "
                              f"dir's features/ folder: not a sidecar catdog wrote; retrain {path.name}")
    recorded = meta.get(MODEL_SHA256)  # sidecars of older releases do not record it: read as they are
    # A model that is no complete .keras zip is named as such by load_keras (truncated), not as another model.
    if recorded is not None and zipfile.is_zipfile(path) and file_sha256(path) != recorded:
        raise CatDogError(f"the sidecar {meta_path} describes another model than {path} (the model file is not the "
                          f"one it recorded: a run was killed between saving the two, or one was replaced): retrain "
                          f"{path.name}, or rerun the step that saved it")
    return meta


def folder_problem(path: Path) -> str:
    """What a folder given where a .keras model belongs is, and what to do."""
    folds = sorted(p.name for p in path.glob("fold*.keras"))
    if (path / KFOLD_SUMMARY).is_file():
        return (f"{path} is a K-fold folder (the mean of its {len(folds)} fold models), not one .keras model: 07 "
                f"takes it whole (--model or --blend); where one model is needed (08 exports one), give one of its "
                f"fold models, e.g. {path / (folds[0] if folds else 'fold1.keras')}, or a model trained on the "
                f"whole split (03 or 05 without --folds)")
    if folds:
        return (f"{path} is an unfinished K-fold run (no {KFOLD_SUMMARY}: it was interrupted, or is still running): "
                f"rerun 03 or 05 with --folds to finish it, or give a .keras model")
    return f"{path} is a folder, not a .keras model: give one that 03-06 saved (model/<step>/<name>.keras)"


def load_keras(path: str | Path):
    """A saved .keras model, with a clear message for a broken file."""
    import keras
    path = Path(path)
    if path.is_dir():
        raise CatDogError(folder_problem(path))
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):  # Keras would call it "File not found"
        size = path.stat().st_size
        raise CatDogError(f"{path} is not a readable Keras model ("
                          + ("empty: 0 bytes" if size == 0 else f"{size:,} bytes, not a complete .keras zip")
                          + "): it may be truncated; retrain it")
    try:
        return keras.models.load_model(path)
    except Exception as e:  # Keras raises ValueError, OSError, zipfile errors... for a broken file
        if "safe_mode" in str(e):  # a Lambda layer (or another deserialised function): Python code in the file
            raise CatDogError(f"{path} holds Python code (a Lambda layer), which Keras's safe mode refuses to run: "
                              f"loading it could run anything. catdog's steps never save such a layer, so this model "
                              f"was made elsewhere: retrain it with 03-06") from e
        raise CatDogError(f"{path} is not a readable Keras model ({type(e).__name__}: {str(e)[:200]}): it may be "
                          f"truncated; retrain it") from e


def check_split(model_path: str | Path, meta: dict, data_dir: str | Path) -> None:
    """Refuse to judge a model (val loss, --analyze, suspects, TTA comparison, 08's agreement check) on the valid
    rows of a split.csv other than the one it was trained on: its train rows would be judged as if unseen."""
    recorded = meta.get("split_sha256")
    if recorded is None:  # saved before sidecars recorded it
        log.warning(f"{model_path}'s sidecar does not record its split: it is judged on the valid rows of today's "
                    f"{SPLIT_CSV}, which is only honest if 01 was not rerun since it was trained")
        return
    if recorded != split_fingerprint(data_dir):
        raise CatDogError(f"{model_path} was trained on another split than {Path(data_dir) / SPLIT_CSV} (01 was rerun "
                          f"since, or this is another --data-dir): judged on today's valid rows it would be judged on "
                          f"rows it trained on. Retrain it on this split (rerun the step that saved it), or give the "
                          f"--data-dir it was trained with")


def check_trained_on(model_path: str | Path, meta: dict, feats: Features) -> None:
    """Refuse to feed a saved model features made with other settings than those it was trained on
    (e.g. 02 rerun at another --image-size), naming both."""
    if len(meta["feature_attrs"]) != len(feats.names):
        raise CatDogError(f"{model_path}: its sidecar does not record how its features {meta['features']} "
                          f"were made: retrain it")
    for name, trained, now, path in zip(feats.names, meta["feature_attrs"], feats.attrs, feats.paths, strict=True):
        check_same_settings(trained, now, f"{model_path} ({name})", str(path),
                            f"rerun {rebuild_command(name, trained)}, or retrain the model")


def predict_images(model, paths: Sequence[str], meta: dict, batch_size: int = 64, mirror: bool = False
                   ) -> np.ndarray:
    """Dog probabilities of images (or of their mirror images) for a model trained end to end (04 --mode full,
    09's students), fed as it was trained."""
    st = ExtractSettings.of(meta["feature_attrs"][0])
    preprocess = get_backbone(st.backbone).preprocess
    if mirror:  # flipping the resized image equals resizing the flipped one (the filters are symmetric)
        def preprocess(x, plain=preprocess):
            return plain(x[:, :, ::-1, :])
    ds = image_dataset(paths, st.image_size, batch_size, st.interpolation, decoder=st.decoder, preprocess=preprocess)
    return np.asarray(model.predict(ds, verbose=0)).ravel()


def predict_saved(model, meta: dict, model_path: Path, data_dir: Path, parts: tuple[str, ...], views: bool = False
                  ) -> tuple[Features, dict]:
    """The rows (labels, files, test ids) and the model's dog probabilities for each of `parts`
    ('labelled', 'test'): 07's predictions, which 08 compares its export with. With `views`, also
    '<part>_views': (V, rows) probabilities of each view, for test-time augmentation.

    Heads read their feature files, after checking they were made the way the model was trained (and, for
    views, that they hold some); a split fine-tuned model streams its maps file (too big for RAM); a model
    trained end to end (04 --mode full, 09's students) reads the images themselves, and its views are the image
    and its mirror.
    """
    if meta.get("kind") in IMAGE_KINDS:
        split, paths, ids = image_parts(data_dir)
        feats = Features([], [], split.label.to_numpy(np.float32), split.filename.to_numpy(str),
                         (split.subset == "valid").to_numpy(), [], ids, [], [])
        probs = {part: predict_images(model, paths[part], meta) for part in parts}
        if views:
            probs |= {f"{part}_views": np.stack([probs[part], predict_images(model, paths[part], meta, mirror=True)])
                      for part in parts}
        return feats, probs
    streamed = any(name.endswith("_maps") for name in meta["features"])
    if streamed and views:
        raise CatDogError(f"{model_path} reads a maps file, which holds no augmented views: drop --tta, or "
                          f"fine-tune with 04 --mode full (its test-time views are the mirrored images)")
    wanted = () if streamed else parts + (tuple(f"{p}_views" for p in parts) if views else ())
    feats = load_features(meta["features"], data_dir, parts=wanted)
    check_trained_on(model_path, meta, feats)
    return feats, {part: feats.predict(model, part) for part in (wanted or parts)}



def read_kfold(path: Path, fingerprint: str, test_ids: np.ndarray) -> tuple[dict, pd.DataFrame, np.ndarray]:
    """A K-fold run's folder (03/05 --folds): its kfold.json, oof.csv (filename, label, fold, prediction: each row
    predicted by the fold model that did not train on it) and test.csv reindexed to `test_ids`, refused unless it
    is complete, of split.csv's split (`fingerprint`) and covers the test images."""
    path = Path(path)
    try:
        summary = json.loads((path / KFOLD_SUMMARY).read_text())
        oof, test = pd.read_csv(path / OOF_CSV), pd.read_csv(path / TEST_CSV)
        oof, test = oof[["filename", "label", "fold", "prediction"]], test[["id", "prediction"]]
    except (OSError, ValueError, KeyError, pd.errors.ParserError) as e:  # missing, garbled or foreign files
        raise CatDogError(f"{path} is not a complete K-fold run ({type(e).__name__}: {str(e)[:120]}): rerun 03 or "
                          f"05 with --folds") from e
    if not isinstance(summary, dict) or summary.get("split_sha256") != fingerprint:
        raise CatDogError(f"{path} was trained on another split ({SPLIT_CSV} changed since: 01 was rerun): "
                          f"retrain it with --folds, or leave it out of --blend")
    if set(test.id) != set(np.asarray(test_ids).tolist()):
        raise CatDogError(f"{path / TEST_CSV} does not cover the test images on disk: retrain it")
    return summary, oof, test.set_index("id").prediction.reindex(test_ids).to_numpy()


def check_model_dir(model_dir: Path) -> None:
    """Refuse a --model-dir that is a file, saying what to give instead."""
    if model_dir.exists() and not model_dir.is_dir():
        raise CatDogError(f"--model-dir {model_dir} is a file, not a folder: give the folder that 03, 05 or 06 "
                          f"saved their models in (default: model)")




def pick_model(model_dir: Path) -> tuple[Path, str]:
    """The model to submit and why it was chosen."""
    check_model_dir(model_dir)
    best = model_dir / HYPEROPT_BEST
    if best.is_file():
        return best, "hyperopt's best model (the report's final step)"
    for step, what in ((MERGE_DIR, "merged model"), (SINGLE_DIR, "single-backbone head")):
        results = model_dir / step / RESULTS_CSV
        if results.is_file():
            df = pd.read_csv(results)
            df = df[[not str(m).startswith(".") and (model_dir / step / f"{m}.keras").is_file() for m in df.model]]
            if len(df):
                row = df.loc[df.val_loss.idxmin()]
                return (model_dir / step / f"{row.model}.keras",
                        f"the {what} with the lowest val_loss in {results} ({row.val_loss:.5f})")
    raise CatDogError(f"no trained model under {model_dir}/: run 03 or 05 first, or pass --model")



def log_loss(y_true: np.ndarray, y_prob: np.ndarray, clip: tuple[float, float] | None = None) -> float:
    """Kaggle's binary log loss; with `clip`, predictions are first clipped as in the submission.

    Without `clip` it guards log(0) the way sklearn does (float64 machine epsilon).
    """
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    lo, hi = clip if clip else (LOG_EPS, 1 - LOG_EPS)
    p = np.clip(p, lo, hi)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def validate_submission(df: pd.DataFrame, expected_ids: Sequence[int], clip: tuple[float, float]) -> None:
    """Refuse a submission Kaggle would reject or score badly: wrong header, ids other than `expected_ids`
    (the test images on disk), NaN, out of clip range."""
    if list(df.columns) != ["id", "label"]:
        raise CatDogError(f"submission refused: header is {','.join(map(str, df.columns))}, not id,label")
    problems, expected = [], np.asarray(expected_ids)
    ids = pd.to_numeric(df["id"], errors="coerce").to_numpy()
    if len(df) != len(expected):
        problems.append(f"{len(df)} rows for {len(expected)} test images")
    if pd.Series(ids).duplicated().any():
        problems.append(f"duplicate ids, e.g. {pd.Series(ids)[pd.Series(ids).duplicated()].iloc[0]}")
    missing, extra = set(expected.tolist()) - set(ids.tolist()), set(ids.tolist()) - set(expected.tolist())
    if missing or extra:
        problems.append(f"ids are not exactly the test image ids (missing {sorted(missing)[:3]}, "
                        f"not test images: {sorted(extra)[:3]})")
    elif not np.array_equal(ids, np.sort(ids)):
        problems.append("ids are not in ascending order")
    labels = pd.to_numeric(df["label"], errors="coerce").to_numpy(dtype=float)
    if np.isnan(labels).any():
        problems.append(f"{int(np.isnan(labels).sum())} missing or non-numeric labels")
    elif ((labels < clip[0] - 1e-12) | (labels > clip[1] + 1e-12)).any():
        problems.append(f"labels outside [{clip[0]}, {clip[1]}]")
    if problems:
        raise CatDogError("submission refused: " + "; ".join(problems))


def write_submission(ids: Sequence[int], probs: np.ndarray, path: str | Path, expected_ids: Sequence[int],
                     clip: tuple[float, float] = CLIP, against: str = "the test images on disk") -> pd.DataFrame:
    """Clip dog probabilities to `clip` (a confident mistake costs far more log loss than it saves),
    sort by id, check against `expected_ids` (laid_out_test_ids: the test images on disk; 07: also the test
    entries 01 saw but could not use, `against` says which) and write `id,label` atomically."""
    if not 0 <= clip[0] < clip[1] <= 1:
        raise CatDogError(f"clip range must satisfy 0 <= low < high <= 1, got {clip}")
    if len(ids) != len(probs):
        raise CatDogError(f"submission refused: {len(probs)} predictions for {len(ids)} test ids")
    df = pd.DataFrame({"id": np.asarray(ids, dtype=np.int64), "label": np.clip(np.asarray(probs, float), *clip)})
    df = df.sort_values("id", kind="stable").reset_index(drop=True)
    validate_submission(df, expected_ids, clip)
    write_csv(df, path)
    log.info(f"wrote {path} ({len(df)} rows, checked against {against})")
    return df

