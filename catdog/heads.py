"""Heads: the report's classifier on cached features (one Input per backbone -> Concatenate -> Dropout ->
Dense(1, sigmoid)), how it is configured (HeadConfig) and trained, and the results tables.

The verbs: `fit` runs a compiled model's epochs and returns its history (arrays through epochs.fit_arrays, the
whole-epoch loop); `save_run` judges a fitted model on its held-out rows and saves it with its sidecar, history
and results row; `train_head` is build + fit + save_run on split.csv's split, `train_kfold` the same for each
fold of a K-fold. 04 fits its block in phases with `fit` and saves with `save_run`.

Used by: 03 and 05 (train_head, train_kfold), 04 (fit, save_run, write_results), 06 (build_head, view_sampler).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .common import (
    DEFAULT_SEED,
    KFOLD_SUMMARY,
    LOGS_DIR,
    OOF_CSV,
    PREDICT_BATCH,
    PREDICTION_LAYER,
    RESULTS_CSV,
    TEST_CSV,
    TEST_FOLDS_CSV,
    CatDogError,
    log,
    set_seed,
    versions,
)
from .data import fold_assignment
from .epochs import fit_arrays
from .features import Features, model_inputs
from .files import write_csv, write_json
from .models import log_loss, save_model
from .plots import plot_curves
from .pseudo import Pseudo, fold_fingerprint


@dataclass(frozen=True)
class HeadConfig:
    """How a head is built and trained; the defaults are 03's (the report's): Adadelta(1.0), dropout 0.5, 10 epochs,
    batch 128. `views` > 1 trains each epoch on one augmented view per row (02 --views)."""
    optimizer: str = "adadelta"
    lr: float = 1.0
    rho: float = 0.95
    momentum: float = 0.9
    decay: float = 0.0
    dropout: float = 0.5
    epochs: int = 10
    batch_size: int = 128
    views: int = 1
    seed: int = DEFAULT_SEED

    @classmethod
    def of(cls, flags: Mapping) -> HeadConfig:
        """The config in a step's flag values (vars(args)): the fields they name, the defaults for the rest."""
        return cls(**{f.name: flags[f.name] for f in dataclasses.fields(cls) if f.name in flags})

    def attrs(self) -> dict:
        return dataclasses.asdict(self)

    def make_optimizer(self):
        return make_optimizer(self.optimizer, self.lr, self.momentum, self.decay, self.rho)

    def feature_parts(self) -> dict:
        """load_features' `parts` and `views` for a head trained with this config."""
        if self.views > 1:
            return {"parts": ("labelled", "test", "labelled_views"), "views": self.views}
        return {"parts": ("labelled", "test")}


@dataclass(frozen=True)
class Output:
    """Where a step's trained models go, and what their sidecars record besides the config."""
    model_dir: Path
    step: str          # SINGLE_DIR, MERGE_DIR or FINETUNE_DIR: the folder under model_dir, and the sidecar's kind
    flags: dict        # vars(args): every flag of the run, defaults resolved, so it can be rerun
    split_sha256: str  # split.csv's: models of other splits are not judged together

    @property
    def folder(self) -> Path:
        return Path(self.model_dir) / self.step

    def log_dir(self, *names: str) -> Path:
        """The TensorBoard folder of a run (and fold) of this step."""
        return Path(self.model_dir, LOGS_DIR, self.step, *names)

    def sidecar(self, config, **entries) -> dict:
        """The sidecar entries every model of this run shares: its kind, split, flags, config and seed."""
        return {"kind": self.step, "split_sha256": self.split_sha256, "args": self.flags, "config": config.attrs(),
                "seed": config.seed, **entries}


def make_optimizer(name: str, learning_rate: float, momentum: float = 0.0, decay: float = 0.0,
                   rho: float = 0.95):
    """Adadelta or SGD; SGD's Keras 2 `decay` becomes InverseTimeDecay(lr, 1, decay) as Keras 2 computed it."""
    import keras
    if name == "adadelta":
        # Keras 2's Adadelta defaults: lr 1.0 (Keras 3 changed it to 0.001), rho 0.95, epsilon 1e-7.
        return keras.optimizers.Adadelta(learning_rate=learning_rate, rho=rho, epsilon=1e-7)
    if name == "sgd":
        lr = learning_rate
        if decay:
            lr = keras.optimizers.schedules.InverseTimeDecay(learning_rate, decay_steps=1, decay_rate=decay)
        return keras.optimizers.SGD(learning_rate=lr, momentum=momentum)
    raise CatDogError(f"unknown optimizer {name!r}: use adadelta or sgd")


def build_head(input_dims: dict[str, int], dropout: float, optimizer, seed: int):
    """The report's head: one Input per backbone -> Concatenate (if several) -> Dropout -> Dense(1, sigmoid).
    Seeded first, so the same seed builds the same initial weights and dropout masks in any process."""
    import keras
    set_seed(seed)
    inputs = [keras.Input((dim,), name=name) for name, dim in input_dims.items()]
    x = inputs[0] if len(inputs) == 1 else keras.layers.Concatenate(name="concat")(inputs)
    x = keras.layers.Dropout(dropout)(x)
    out = keras.layers.Dense(1, activation="sigmoid", name=PREDICTION_LAYER)(x)
    # Keras scope names may not contain '+', so "ResNet50+Xception" is named "head_ResNet50_Xception".
    model = keras.Model(inputs if len(inputs) > 1 else inputs[0], out, name="head_" + "_".join(input_dims))
    model.compile(optimizer=optimizer, loss="binary_crossentropy", metrics=["accuracy"])
    return model


def view_sampler(views: list[np.ndarray], rows: np.ndarray, seed: int) -> Callable[[int], object]:
    """Epoch -> the training inputs of that epoch: row `rows[i]` of a view drawn for it from (seed, epoch), the
    same view in every backbone's features (they hold the same transformations). Only one epoch's float32
    inputs exist at a time beside the float16 views."""
    def inputs(epoch: int):
        pick = np.random.default_rng([seed, epoch]).integers(len(views[0]), size=len(rows))
        return model_inputs([v[pick, rows].astype(np.float32) for v in views])
    return inputs


def tensorboard(log_dir: Path):
    """A TensorBoard callback writing to an emptied `log_dir` (a rerun would otherwise draw two curves)."""
    import keras
    shutil.rmtree(log_dir, ignore_errors=True)
    return keras.callbacks.TensorBoard(str(log_dir))


def fit(model, train, valid, epochs: int, callbacks: Sequence, batch_size: int | None = None,
        initial_epoch: int = 0) -> pd.DataFrame:
    """Train `model` and return its history with a 1-based `epoch` column. `train`: (inputs, labels) arrays, the
    inputs possibly a callable giving each epoch's (see fit_arrays), trained by fit_arrays (Keras's fit, faster);
    or a dataset that batches and shuffles itself, trained by Keras's fit."""
    if isinstance(train, tuple):
        x, y = train
        hist = fit_arrays(model, x, y, batch_size=batch_size, epochs=epochs, verbose=2, callbacks=list(callbacks),
                          validation_data=valid, initial_epoch=initial_epoch)
    else:
        hist = model.fit(train, validation_data=valid, epochs=epochs, initial_epoch=initial_epoch, shuffle=False,
                         verbose=2, callbacks=list(callbacks))
    df = pd.DataFrame(hist.history)
    df.insert(0, "epoch", np.arange(initial_epoch + 1, initial_epoch + len(df) + 1))
    return df


def _with_rows(inputs, extra: list[np.ndarray]):
    """Training inputs (model_inputs' form) with the rows `extra` (one array per backbone) appended."""
    xs = inputs if isinstance(inputs, list) else [inputs]
    return model_inputs([np.concatenate([x, e.astype(x.dtype)]) for x, e in zip(xs, extra, strict=True)])


def _fit_and_save(name: str, feats: Features, config: HeadConfig, trained: np.ndarray, held: np.ndarray,
                  folder: Path, log_dir: Path, meta: dict, pseudo: tuple[np.ndarray, np.ndarray] | None = None):
    """The report's head on `feats` (one input per backbone), built with config.seed, trained on the labelled rows
    `trained` (each epoch one of their views with config.views) and judged on the rows `held`, then saved by
    save_run as <folder>/<name>.keras with `meta`. `pseudo`: (test rows, targets) trained on too (their plain
    features), never judged. Returns (model, results row)."""
    dims = {n: x.shape[1] for n, x in zip(feats.names, feats.labelled, strict=True)}
    model = build_head(dims, config.dropout, config.make_optimizer(), config.seed)
    valid = (model_inputs([x[held] for x in feats.labelled]), feats.labels[held])
    xtr = (view_sampler(feats.labelled_views, trained, config.seed) if config.views > 1
           else model_inputs([x[trained] for x in feats.labelled]))
    ytr = feats.labels[trained]
    if pseudo is not None and len(pseudo[0]):
        extra = [x[pseudo[0]] for x in feats.test]
        xtr = (lambda epoch, views=xtr: _with_rows(views(epoch), extra)) if callable(xtr) else _with_rows(xtr, extra)
        ytr = np.concatenate([ytr.astype(np.float32), pseudo[1]])  # soft targets: binary_crossentropy takes them
    hist = fit(model, (xtr, ytr), valid, config.epochs, [tensorboard(log_dir)], config.batch_size)
    return model, save_run(name, model, hist, valid, folder, meta)


def train_head(name: str, feats: Features, config: HeadConfig, out: Output, pseudo: Pseudo | None = None):
    """03's and 05's run: the report's head trained on split.csv's train rows (and `pseudo`'s confident test rows),
    judged on its valid rows, saved as <model_dir>/<step>/<name>.keras with its sidecar and history. Returns
    (model, results row)."""
    meta = out.sidecar(config, features=feats.names, feature_attrs=feats.attrs)
    rows = pseudo.rows() if pseudo else None
    if pseudo:
        meta["pseudo"] = pseudo.record(len(rows[0]))
        log.info(f"{name}: {len(rows[0])} pseudo-labelled test rows from {pseudo.source} join the training rows")
    model, row = _fit_and_save(name, feats, config, np.flatnonzero(~feats.valid), np.flatnonzero(feats.valid),
                               out.folder, out.log_dir(name), meta, rows)
    return model, {**row, "pseudo_rows": len(rows[0])} if pseudo else row


def kfold_name(name: str, folds: int) -> str:
    """The results row and folder of a K-fold run: `ResNet50_k5`."""
    return f"{name}_k{folds}"


def train_kfold(name: str, feats: Features, config: HeadConfig, out: Output, folds: int, held_out: np.ndarray,
                groups: np.ndarray | None = None, pseudo: Pseudo | None = None) -> tuple[dict, np.ndarray]:
    """03's and 05's --folds: one head per fold of the rows `held_out` may hold out (Kaggle's; extra data always
    trains), each judged on its held-out fold, under <model_dir>/<step>/<name>_k<K>/: fold<k>.keras (+ sidecar,
    history), oof.csv (filename, label, fold, prediction of the fold's model), test.csv (id, mean of the fold
    models), test_folds.csv (id, each fold model's own), kfold.json. `groups` (duplicates.group_ids) keeps each
    duplicate group in one fold; `pseudo` (load_pseudo of a K-fold folder of the same folds) adds fold k's own
    pseudo-labels to fold k's training rows. Returns the results row (val_loss is the out-of-fold log loss, oof_std
    its spread over the folds) and the test predictions."""
    kname = kfold_name(name, folds)
    out_dir = out.folder / kname
    fold = fold_assignment(feats.labels, folds, config.seed, held_out, groups)
    fold_sha256 = fold_fingerprint(feats.files, fold)
    if pseudo is not None and pseudo.probs.shape[0] != folds:
        raise CatDogError(f"--pseudo {pseudo.source}: one column of pseudo-labels per fold is needed with --folds")
    (out_dir / KFOLD_SUMMARY).unlink(missing_ok=True)  # until the new one is written, the folder is unfinished
    oof, test, fold_rows = np.full(len(fold), np.nan), np.zeros(len(feats.test_ids)), []
    n_groups = 0 if groups is None else len(set(np.asarray(groups)[np.asarray(groups) >= 0].tolist()))
    meta = out.sidecar(config, features=feats.names, feature_attrs=feats.attrs, folds=folds, fold_sha256=fold_sha256,
                       duplicate_groups=n_groups)
    per_fold, pseudo_rows = {}, []
    for k in range(folds):
        held, trained = np.flatnonzero(fold == k), np.flatnonzero(fold != k)
        rows = pseudo.rows(k) if pseudo else None
        pseudo_rows.append(len(rows[0]) if rows else 0)
        log.info(f"{kname}: fold {k + 1}/{folds}: training on {len(trained)} rows"
                 + (f" and {pseudo_rows[-1]} pseudo-labelled test rows" if pseudo else "")
                 + f", validating on {len(held)}")
        fold_meta = {**meta, "fold": k + 1, **({"pseudo": pseudo.record(pseudo_rows[-1])} if pseudo else {})}
        model, row = _fit_and_save(f"fold{k + 1}", feats, dataclasses.replace(config, seed=config.seed + k), trained,
                                   held, out_dir, out.log_dir(kname, f"fold{k + 1}"), fold_meta, rows)
        oof[held] = np.asarray(model.predict(model_inputs([x[held] for x in feats.labelled]),
                                             batch_size=PREDICT_BATCH, verbose=0)).ravel()
        per_fold[f"fold{k + 1}"] = feats.predict(model, "test")
        test += per_fold[f"fold{k + 1}"] / folds
        fold_rows.append(row["val_loss"])
    rows = fold >= 0
    oof_table = pd.DataFrame({"filename": feats.files[rows], "label": feats.labels[rows].astype(int),
                              "fold": fold[rows] + 1, "prediction": oof[rows]})
    oof_loss = log_loss(oof_table.label, oof_table.prediction)  # as 07 judges it
    write_csv(oof_table, out_dir / OOF_CSV)
    write_csv(pd.DataFrame({"id": feats.test_ids, "prediction": test}), out_dir / TEST_CSV)
    write_csv(pd.DataFrame({"id": feats.test_ids, **per_fold}), out_dir / TEST_FOLDS_CSV)
    if pseudo:
        meta["pseudo"] = pseudo.record(pseudo_rows)
    summary = {**meta, "model": kname, "oof_log_loss": oof_loss, "fold_val_loss": fold_rows, **versions()}
    write_json(summary, out_dir / KFOLD_SUMMARY)  # last: a folder without it is an unfinished run
    log.info(f"{kname}: out-of-fold log loss {oof_loss:.5f} over {len(oof_table)} rows (folds: "
             + ", ".join(f"{v:.5f}" for v in fold_rows) + f"); wrote {out_dir}/")
    row = {"model": kname, "val_loss": oof_loss, "oof_log_loss": oof_loss, "oof_std": float(np.std(fold_rows)),
           "folds": folds, "epochs": config.epochs, "seed": config.seed}
    return ({**row, "pseudo_rows": float(np.mean(pseudo_rows))} if pseudo else row), test


def save_run(name: str, model, history: pd.DataFrame, valid, out_dir: Path, meta: dict,
             saved_epoch: int | None = None) -> dict:
    """Evaluate the trained model on the valid rows, then save it, its sidecar (`meta`, which holds the run's
    `seed`) and its history; returns the results row, which describes exactly the saved model (whose weights are
    `saved_epoch`'s, default the last epoch's). Nothing is written for a run that diverged."""
    x, y = valid if isinstance(valid, tuple) else (valid, None)
    scores = model.evaluate(x, y, verbose=0, return_dict=True)
    if not all(math.isfinite(v) for v in scores.values()):
        raise CatDogError(f"{name}: training diverged (val_loss {scores['loss']}); nothing was saved: "
                          f"lower --lr")
    saved_epoch = saved_epoch or int(history.epoch.iloc[-1])
    best = int(history.val_loss.idxmin())
    row = {"model": name, "val_loss": scores["loss"], "val_acc": scores["accuracy"], "saved_epoch": saved_epoch,
           "best_epoch": int(history.epoch[best]), "best_val_loss": float(history.val_loss[best]),
           "epochs": len(history), "seed": meta["seed"]}
    save_model(model, out_dir / f"{name}.keras", {**meta, "val_loss": row["val_loss"], "val_acc": row["val_acc"],
                                                  "saved_epoch": saved_epoch})
    write_csv(history, out_dir / f"{name}.history.csv")
    log.info(f"{name}: val_loss {row['val_loss']:.5f}, val_acc {row['val_acc']:.4f} of the saved model "
             f"(epoch {saved_epoch}; best epoch {row['best_epoch']}: {row['best_val_loss']:.5f})")
    return row


def write_results(rows: list[dict], out_dir: Path, title: str, baseline: str | None = None,
                  show: bool = True) -> pd.DataFrame:
    """Merge `rows` into `out_dir/results.csv` (a rerun of one model replaces its row), print it (`show`),
    and plot every listed model's val_loss curve into `out_dir/val_loss.png`."""
    path = out_dir / RESULTS_CSV
    new = pd.DataFrame(rows)
    with contextlib.suppress(FileNotFoundError, pd.errors.ParserError, pd.errors.EmptyDataError):
        old = pd.read_csv(path)
        if "model" in old.columns:
            new = pd.concat([old[~old.model.isin(new.model)], new], ignore_index=True)
    write_csv(new, path)
    if show:
        log.info(f"\n{title}\n" + new.to_string(index=False, float_format=lambda v: f"{v:.5f}"))
    histories = {m: pd.read_csv(out_dir / f"{m}.history.csv") for m in new.model
                 if (out_dir / f"{m}.history.csv").is_file()}
    saved = dict(zip(new.model, new.get("saved_epoch", pd.Series(dtype=float)), strict=False))
    plot_curves(histories, out_dir / "val_loss.png", title=title,
                baseline=baseline if baseline in histories else None, marks=saved)
    return new
