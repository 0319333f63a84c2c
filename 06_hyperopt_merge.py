"""Step 6: HyperOpt TPE search over the merged head's SGD learning rate, decay, momentum and dropout.

The report's code shape: data() and model() functions, its hyper_params space, kopt's CompileFN as the
objective, Trials and fmin(algo=tpe.suggest). Validation uses split.csv's valid rows, like every other
step, so the searched val_loss compares with 03 and 05. After each trial, trials.csv, the plot, best.keras
(07 submits it by default) with its sidecar best.json and, last, trials.json (hyperopt's trial documents: data,
never code) are saved under model/hyperopt/, so they always agree and a rerun (with a larger --max-evals) continues
where the last one stopped. A search is bound to its backbones, space, training settings, feature files and data
(split.csv and the test images; search.json): a different request is refused rather than mixed in. --spark runs
several trials at once with hyperopt's SparkTrials.
"""

import contextlib
import functools
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import helper
from helper import CatDogError, log

# ----------------------------------------------------------------------------- kopt compatibility
# kopt 0.1.0 (the report's HyperOpt wrapper) was written for Keras 2 and PyYAML 5. import_kopt() patches
# the three places where it breaks on Keras 3 / PyYAML 6; tests/test_hyperopt.py runs CompileFN end to
# end so an upgrade that breaks it fails CI.
#  1. kopt.config reads ~/.kopt/config.yaml with yaml.load() and no Loader, which PyYAML 6 rejects on the
#     second import. It is imported with a safe default Loader, and with HOME pointed at `config_dir`
#     so the file lands under --model-dir, not in the user's home folder.
#  2. kopt.hyopt.eval_model zips model.metrics_names (Keras 3: ['loss', 'compile_metrics']) with
#     evaluate()'s values, mislabelling metrics: replaced by evaluate(return_dict=True).
#  3. CompileFN checkpoints to '<uuid>.h5', which Keras 3 writes in its legacy HDF5 format: the path
#     is rewritten to '<uuid>.keras'.

def kopt_eval_model(model, test, add_eval_metrics={}):  # noqa: B006 - kopt's own signature
    """kopt's eval_model with metrics named by Keras itself."""
    metrics = {k: float(v) for k, v in
               model.evaluate(test[0], test[1], verbose=0, batch_size=len(test[1]), return_dict=True).items()}
    if add_eval_metrics:  # a second pass over the validation set only when extra metrics need predictions
        y_pred = model.predict(test[0], verbose=0)
        metrics.update({k: fn(test[1], y_pred) for k, fn in add_eval_metrics.items() if k not in metrics})
    return metrics


def import_kopt(config_dir: str | Path):
    """kopt, imported and patched for Keras 3 and PyYAML 6 (see above); returns the module."""
    import keras
    import yaml

    config_dir = Path(config_dir)
    config_dir.mkdir(parents=True, exist_ok=True)
    if "kopt" not in sys.modules:
        real_load, home = yaml.load, os.environ.get("HOME")
        yaml.load = functools.partial(real_load, Loader=yaml.SafeLoader)
        os.environ["HOME"] = str(config_dir)
        try:
            import kopt
        finally:
            yaml.load = real_load
            if home is None:
                os.environ.pop("HOME", None)
            else:
                os.environ["HOME"] = home
    import kopt
    import kopt.hyopt

    class KerasCheckpoint(keras.callbacks.ModelCheckpoint):
        def __init__(self, filepath, *args, **kwargs):
            super().__init__(re.sub(r"\.h5$", ".keras", filepath), *args, **kwargs)

    kopt.hyopt.eval_model = kopt_eval_model
    kopt.hyopt.ModelCheckpoint = KerasCheckpoint
    kopt.config.set_save_dir(str(config_dir))
    return kopt


# ----------------------------------------------------------------------------- the search

def parse_args(argv=None):
    p = helper.base_parser(__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["ResNet50", "InceptionV3", "Xception"],
                   choices=list(helper.BACKBONES), metavar="MODEL", help="backbones whose features are merged")
    p.add_argument("--max-evals", type=helper.POSITIVE_INT, default=100,
                   help="trials in total, counting those already saved")
    p.add_argument("--epochs", type=helper.POSITIVE_INT, default=200, help="most epochs per trial")
    p.add_argument("--patience", type=helper.POSITIVE_INT, default=8, help="early stopping patience on val_loss")
    p.add_argument("--batch-size", type=helper.POSITIVE_INT, default=128, help="rows per training batch")
    helper.views_arg(p)
    p.add_argument("--spark", nargs="?", const="local[*]", metavar="MASTER",
                   help="run trials in parallel with hyperopt's SparkTrials on this Spark master (default "
                        "local[*]; e.g. spark://host:7077). Needs pip install -r requirements-spark.txt and Java 17+; "
                        "--data-dir and --model-dir must be paths every worker can read and write")
    p.add_argument("--parallelism", type=helper.POSITIVE_INT,
                   help="--spark: trials run at once (default: Spark's default parallelism)")
    p.add_argument("--trust-pickle", action="store_true",
                   help=f"read the {LEGACY_TRIALS} of an older catdog once and convert it to {TRIALS_JSON}: a pickle "
                        "can run any code when read, so only for a model dir you made yourself")
    args = p.parse_args(argv)
    args.models = list(dict.fromkeys(args.models))
    if len(args.models) < 2:
        p.error("--models needs at least two different backbones to merge")
    return args


# The report's space, as data: hyper_params() builds it and search.json records it.
SPACE = {"lr": ("loguniform", 0.001, 0.01), "decay": ("uniform", 0.0005, 0.05),
         "momentum": ("choice", [0.5, 0.8, 0.9]), "dropout": ("choice", [0.1, 0.2, 0.3, 0.5])}
LABELS = {"lr": "m_lr", "decay": "m_decay", "momentum": "m_mom", "dropout": "m_do"}  # the report's hp labels


def hyper_params(models, epochs: int, batch_size: int, patience: int, seed: int, views: int = 1) -> dict:
    """The report's search space; the seed (and --views) are fixed values passed through to model() (data())."""
    from hyperopt import hp
    build = {"loguniform": lambda label, lo, hi: hp.loguniform(label, np.log(lo), np.log(hi)),
             "uniform": hp.uniform, "choice": hp.choice}
    return {
        # Only with views: the report's searches keep their data() call, hence their trial names.
        "data": {"model_name": tuple(models), **({"views": views, "view_seed": seed} if views > 1 else {})},
        "model": {**{k: build[kind](LABELS[k], *values) for k, (kind, *values) in SPACE.items()}, "seed": seed},
        "fit": {"batch_size": batch_size, "epochs": epochs, "patience": patience},
    }


def make_data_fn(data_dir: str):
    """The report's data(model_name), reading `data_dir`. (kopt names each trial's TensorBoard folder after
    the parameters, so a path with slashes cannot be one of them.)"""
    @functools.lru_cache(maxsize=2)
    def data(model_name, views=1, view_seed=helper.DEFAULT_SEED):
        """((train inputs, labels), (valid inputs, labels)) from split.csv; loaded once per process. With views,
        the train inputs carry the epoch -> inputs sampler of their views (see ViewInputs)."""
        parts = ("labelled", "labelled_views") if views > 1 else ("labelled",)
        feats = helper.load_features(list(model_name), data_dir, parts=parts, views=views if views > 1 else None)
        (xtr, ytr), valid = feats.subset("train"), feats.subset("valid")
        if views > 1:
            xtr = ViewInputs(xtr, helper.view_sampler(feats.labelled_views, np.flatnonzero(~feats.valid), view_seed))
        return (xtr, ytr), valid
    return data


class ViewInputs(list):
    """The plain training inputs (model() reads their shapes), carrying `epoch_inputs`: the epoch -> inputs
    sampler of their augmented views, which the head's fit trains on instead (06 --views)."""

    def __init__(self, inputs, epoch_inputs):
        super().__init__(inputs)
        self.epoch_inputs = epoch_inputs


def make_objective(kopt, data_dir: str, models, out_dir: str, model_fn):
    """kopt's CompileFN over the report's data() and model(), validated on split.csv's valid rows. With
    save_model='best' kopt reloads the best epoch's checkpoint before evaluating it, so a trial's val_loss is
    that of its saved model."""
    return kopt.CompileFN("merge", "+".join(models), data_fn=make_data_fn(data_dir), model_fn=model_fn,
                          loss_metric="loss", loss_metric_mode="min",
                          valid_split=None,  # validate on data()'s second part: split.csv's valid rows
                          use_tensorboard=True, save_model="best", save_dir=out_dir)


def model(train_data, lr=0.001, decay=0.0, momentum=0.9, dropout=0.5, seed=helper.DEFAULT_SEED):
    """The merged head with SGD; Keras 2's `decay` is an InverseTimeDecay schedule (see make_optimizer).
    build_head seeds first: every trial starts from the same weights, only the settings differ."""
    names = [f"in{i}" for i in range(len(train_data[0]))]
    dims = {n: x.shape[1] for n, x in zip(names, train_data[0], strict=True)}
    config = helper.HeadConfig(optimizer="sgd", lr=lr, decay=decay, momentum=momentum, dropout=dropout, seed=seed)
    head = helper.build_head(dims, config.dropout, config.make_optimizer(), config.seed)
    # kopt's CompileFN trains by calling head.fit itself (arrays, batch_size, epochs, validation_data, verbose=2,
    # callbacks History, EarlyStopping, TensorBoard, ModelCheckpoint). This instance attribute sends that call
    # to helper.fit_arrays: Keras's results, in about half the time (benchmarks/heads_bench.md), with kopt
    # unchanged. It is not saved with the model.
    head.fit = fast_fit_method(head)
    sampler = getattr(train_data[0], "epoch_inputs", None)
    if sampler is not None:  # --views: each epoch, each row one of its views (validation: the plain rows)
        head.fit = functools.partial(fit_on_views, head.fit, sampler)
    return head


def fit_on_views(fit, epoch_inputs, x=None, *args, **kwargs):
    """kopt passes data()'s train inputs as x: train on their views instead."""
    return fit(epoch_inputs, *args, **kwargs)


# Keras fit's arguments that fit_arrays does not take, with the defaults fast_fit_method accepts for them.
KERAS_FIT_DEFAULTS = {"validation_split": 0.0, "class_weight": None, "sample_weight": None, "steps_per_epoch": None,
                      "validation_steps": None, "validation_freq": 1}


def fast_fit_method(model):
    """A stand-in for `model.fit`, for code that calls it itself (kopt's CompileFN): what fit_arrays can run
    (arrays to train and validate on, none of KERAS_FIT_DEFAULTS' arguments changed) it runs, anything else goes to
    Keras's own fit."""
    keras_fit = model.fit

    def arrays(a) -> bool:
        return isinstance(a, np.ndarray) or (isinstance(a, (list, tuple)) and len(a) > 0
                                             and all(isinstance(b, np.ndarray) for b in a))

    def fit(x=None, y=None, batch_size=None, epochs=1, verbose="auto", callbacks=None, validation_data=None,
            shuffle=True, initial_epoch=0, validation_batch_size=None, **others):
        mine = dict(batch_size=batch_size, epochs=epochs, verbose=verbose, callbacks=callbacks,
                    validation_data=validation_data, shuffle=shuffle, initial_epoch=initial_epoch,
                    validation_batch_size=validation_batch_size)
        plain = all(k in KERAS_FIT_DEFAULTS and (v is None if KERAS_FIT_DEFAULTS[k] is None else
                                                 isinstance(v, (int, float)) and v == KERAS_FIT_DEFAULTS[k])
                    for k, v in others.items())
        valid_ok = validation_data is None or (isinstance(validation_data, (list, tuple)) and len(validation_data) == 2
                                               and arrays(validation_data[0])
                                               and isinstance(validation_data[1], np.ndarray))
        inputs_ok = callable(x) or arrays(x)  # a callable: epoch -> inputs (06 --views)
        if plain and valid_ok and inputs_ok and isinstance(y, np.ndarray) and isinstance(shuffle, bool):
            return helper.fit_arrays(model, x, y, **mine)
        return keras_fit(x, y, **mine, **others)

    return fit



# ----------------------------------------------------------------------------- saved state

def binding(args, feats: helper.Features) -> dict:
    """What a search is bound to: its backbones, space, per-trial training settings, feature files and data (split.csv
    and the test images). Trials made under another binding cannot be continued (their best model would not match,
    or their val_losses were measured on other rows)."""
    # Through JSON and back: the form it is compared with when read from search.json.
    # The plain rows' settings only (a file that gained views still holds the rows the trials were trained on);
    # views only when searched with them, so the report's searches keep their binding.
    features = [{k: v for k, v in helper.ExtractSettings.of(a).attrs().items() if k in helper.ROW_SETTINGS}
                for a in feats.attrs]
    test_ids = "\n".join(map(str, helper.laid_out_test_ids(args.data_dir).tolist()))
    return json.loads(json.dumps({"models": args.models, "space": SPACE, "epochs": args.epochs,
                                  "patience": args.patience, "batch_size": args.batch_size, "seed": args.seed,
                                  "features": features, **({"views": args.views} if args.views > 1 else {}),
                                  "split_sha256": helper.split_fingerprint(args.data_dir),
                                  "test_ids_sha256": hashlib.sha256(test_ids.encode()).hexdigest()}))


DATA_KEYS = ("split_sha256", "test_ids_sha256")  # the data a search is bound to (search.json of older releases: none)


def check_binding(out_dir: Path, wanted: dict, has_trials: bool) -> None:
    """Refuse to continue trials made for another request or on other data; record the binding of a new search."""
    path = out_dir / "search.json"
    try:
        stored = json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        stored = None
    saved = stored
    if has_trials and isinstance(saved, dict) and not any(k in saved for k in DATA_KEYS):
        log.warning(f"{path} (of an older catdog) does not record the data its trials were made on: they are taken "
                    f"to be today's {helper.SPLIT_CSV} and test images, which is only right if 01 was not rerun since")
        saved = {**saved, **{k: wanted[k] for k in DATA_KEYS}}
    if has_trials and saved != wanted:
        if not isinstance(saved, dict):
            what = f"has no readable {path.name} saying what its trials were made for"
        elif any(saved.get(k) != wanted[k] for k in DATA_KEYS):
            changed = " and ".join(w for k, w in zip(DATA_KEYS, (helper.SPLIT_CSV, "the test images"), strict=True)
                                   if saved.get(k) != wanted[k])
            what = (f"holds trials made on other data ({changed} changed since: 01 was rerun, or this is another "
                    f"--data-dir), whose val_losses were measured on other valid rows")
        else:
            what = "holds trials made with other " + "; ".join(
                f"{k} ({str(saved.get(k))[:120]}, now {str(wanted[k])[:120]})" for k in wanted
                if saved.get(k) != wanted[k])
        raise CatDogError(f"{out_dir} {what}: use another --model-dir for this search, or move {out_dir} away to "
                          f"start over")
    if stored != wanted:
        helper.write_json(wanted, path)


# The search's record: hyperopt's trial documents as JSON (helper.to_plain: datetimes tagged, numpy values as plain
# numbers; the trials' file paths relative to model/hyperopt/). An older catdog pickled the Trials, which runs code
# when read.
TRIALS_JSON, LEGACY_TRIALS = "trials.json", "trials.pkl"
TRIALS_FORMAT = "catdog-hyperopt-trials"
def trial_paths(doc: dict, out_dir: Path, source: Path, relative: bool) -> dict:
    """The trial document with its result's file paths (kopt's model and results) relative to `out_dir` (for
    trials.json), or absolute (as kopt wrote them), each refused if it leads out of `out_dir`."""
    paths = (doc.get("result") or {}).get("path")
    if not isinstance(paths, dict):
        return doc
    fixed = {}
    for k, v in paths.items():
        if isinstance(v, str) and v:
            p = helper.inside(v, out_dir, source)
            v = str(p.relative_to(out_dir.resolve())) if relative else str(p)
        fixed[k] = v
    return {**doc, "result": {**doc["result"], "path": fixed}}


def write_trials(trials, out_dir: Path) -> None:
    docs = [trial_paths(helper.to_plain(dict(t)), out_dir, out_dir / TRIALS_JSON, relative=True) for t in trials.trials]
    with helper.atomic_path(out_dir / TRIALS_JSON) as tmp:
        tmp.write_text(json.dumps({"format": TRIALS_FORMAT, "trials": docs}) + "\n")


def load_trials(out_dir: Path, trust_pickle: bool = False):
    """The saved Trials (a new one when there is no record), refused with a message when unreadable. An older
    catdog's trials.pkl is read only with `trust_pickle` (the next save converts it to trials.json)."""
    from hyperopt import Trials
    path, legacy = out_dir / TRIALS_JSON, out_dir / LEGACY_TRIALS
    if path.is_file():
        try:
            record = json.loads(path.read_text(), object_hook=helper.from_plain)
        except (ValueError, UnicodeDecodeError) as e:
            raise CatDogError(f"{path} is not a readable trials file ({type(e).__name__}): move {out_dir} away "
                              f"to start the search over") from e
        if not (isinstance(record, dict) and record.get("format") == TRIALS_FORMAT
                and isinstance(record.get("trials"), list) and all(isinstance(t, dict) for t in record["trials"])):
            raise CatDogError(f"{path} holds a {type(record).__name__} that is not catdog's record of hyperopt trials: "
                              f"move {out_dir} away to start the search over")
        docs, source = record["trials"], path
    elif legacy.is_file():
        if not trust_pickle:
            raise CatDogError(f"{legacy} is a pickle (an older catdog's record of the search), and reading a pickle "
                              f"can run any code in it: if you made {out_dir} yourself, rerun with --trust-pickle "
                              f"once to convert it to {TRIALS_JSON}; if it came from elsewhere, move {out_dir} away "
                              f"to start the search over")
        try:
            with open(legacy, "rb") as f:
                trials = pickle.load(f)  # noqa: S301 - the user vouched for this file (--trust-pickle)
        except Exception as e:  # truncated, empty or foreign pickles raise many types
            raise CatDogError(f"{legacy} is not a readable trials file ({type(e).__name__}): move {out_dir} away "
                              f"to start the search over") from e
        if not isinstance(trials, Trials):
            raise CatDogError(f"{legacy} holds a {type(trials).__name__}, not hyperopt Trials: move {out_dir} away "
                              f"to start the search over")
        try:
            docs = [helper.to_plain(dict(t)) for t in trials.trials]
        except TypeError as e:
            raise CatDogError(f"{legacy} holds trials with {e}, which {TRIALS_JSON} cannot keep: move {out_dir} "
                              f"away to start the search over") from e
        source = legacy
        log.info(f"read {legacy} (--trust-pickle): it is converted to {TRIALS_JSON}, which later runs read")
    else:
        return Trials()
    # A trial that was running when the last run stopped has no result: dropped, it will be redone.
    finished = Trials()
    try:
        ok = [trial_paths(t, out_dir, source, relative=False) for t in docs
              if isinstance(t.get("result"), dict) and t["result"].get("status") == "ok"]
        finished.insert_trial_docs(ok)
        finished.refresh()
    except (AssertionError, KeyError, TypeError, ValueError, AttributeError) as e:  # hyperopt checks each document
        raise CatDogError(f"{source} holds a trial hyperopt cannot read ({type(e).__name__}: {str(e)[:120]}): move "
                          f"{out_dir} away to start the search over") from e
    return finished


@contextlib.contextmanager
def no_interrupt():
    """Hold Ctrl-C until the block ends, so the files a trial updates are written all or none."""
    caught = []
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    except ValueError:  # not the main thread: signals cannot be caught here anyway
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


def trials_table(trials, space) -> pd.DataFrame:
    """One row per finished trial: the chosen values (not hp.choice indices) and what they scored."""
    from hyperopt import space_eval
    rows = []
    for t in trials.trials:
        r = t["result"]
        if r.get("status") != "ok":
            continue
        vals = {k: v[0] for k, v in t["misc"]["vals"].items() if v}
        params = space_eval(space, vals)["model"]
        rows.append({"trial": t["tid"], **{k: params[k] for k in SPACE},
                     "val_loss": r["eval"]["loss"], "val_acc": r["eval"].get("accuracy", np.nan),
                     "epochs": len(r["history"]["loss"]["epoch"]),
                     # kopt saves the best epoch's model (save_model='best'): 05 --params retrains that long
                     "best_epoch": int(np.argmin(r["history"]["loss"]["val_loss"])) + 1,
                     "seconds": r["time"]["duration"]["total"],
                     "model_path": str(Path(r["path"]["model"]).with_suffix(".keras"))})
    return pd.DataFrame(rows)


def save_search(trials, space, out_dir: Path, args, feats: helper.Features) -> pd.DataFrame:
    """trials.csv, the plot, best.keras and best.json from `trials`, then trials.json last: the files always
    describe the same finished trials (a kill between two writes is repaired by the next save)."""
    table = trials_table(trials, space)
    if table.empty:
        return table
    best = table.loc[table.val_loss.idxmin()]
    if not Path(best.model_path).is_file():
        raise CatDogError(f"{best.model_path}, the model of trial {best.trial} (the best), is gone: move "
                          f"{out_dir} away to start the search over")
    with no_interrupt():
        helper.write_csv(table.drop(columns="model_path"), out_dir / "trials.csv")
        plot_trials(table, out_dir / "val_loss_by_trial.png")
        sidecar = {"kind": "hyperopt", "features": feats.names, "feature_attrs": feats.attrs, "seed": args.seed,
                   "split_sha256": helper.split_fingerprint(args.data_dir),
                   "trial": int(best.trial), "epochs": int(best.epochs), "best_epoch": int(best.best_epoch),
                   **{k: float(best[k]) for k in (*SPACE, "val_loss", "val_acc")}, **helper.versions()}
        with helper.atomic_path(out_dir / "best.keras", suffix=".keras") as tmp:
            shutil.copyfile(best.model_path, tmp)
            helper.write_sidecar(tmp, {**sidecar, "args": vars(args)}, out_dir / "best.json")
        write_trials(trials, out_dir)
    return table


def plot_trials(df: pd.DataFrame, path: Path) -> None:
    plt = helper.pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(df.trial, df.val_loss, "o", alpha=0.6, label="trial")
    ax.plot(df.trial, df.val_loss.cummin(), "-", label="best so far")
    best = df.loc[df.val_loss.idxmin()]
    ax.plot([best.trial], [best.val_loss], "r*", markersize=15, label=f"best: {best.val_loss:.5f}")
    ax.set(xlabel="trial", ylabel="val_loss", title="HyperOpt TPE: val_loss by trial", yscale="log")
    ax.legend()
    helper.save_figure(fig, path)


# ----------------------------------------------------------------------------- running trials

def search(objective, space, trials, args, save):
    """One trial per fmin call, each seeded by its number: reproducible, and saved as soon as it ends."""
    from hyperopt import fmin, tpe
    while len(trials.trials) < args.max_evals:
        start = time.perf_counter()
        fmin(objective, space, algo=tpe.suggest, trials=trials, max_evals=len(trials.trials) + 1,
             rstate=np.random.default_rng(args.seed + len(trials.trials)), show_progressbar=False)
        save(trials)
        r = trials.trials[-1]["result"]
        log.info(f"trial {len(trials.trials)}/{args.max_evals}: val_loss {r['loss']:.5f} "
                 f"({time.perf_counter() - start:.0f} s)")
    return trials


class ByValue:
    """A function that travels to Spark's workers pickled by value by the cloudpickle package: this script is not
    importable there. Spark pickles it as a call of cloudpickle.loads on those bytes (its __reduce__)."""

    def __init__(self, fn):
        import cloudpickle
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
        self.fn, self.payload = fn, cloudpickle.dumps(fn)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __reduce__(self):
        import cloudpickle
        return cloudpickle.loads, (self.payload,)


def ship_package(spark, folder: Path) -> None:
    """Make helper and the catdog package importable on Spark's workers: one zip of both, added to the session."""
    import zipfile
    root = Path(helper.__file__).resolve().parent
    with helper.atomic_path(folder / "catdog.zip", suffix=".zip") as tmp, zipfile.ZipFile(tmp, "w") as z:
        z.write(root / "helper.py", "helper.py")
        for path in sorted((root / "catdog").glob("*.py")):
            z.write(path, f"catdog/{path.name}")
    spark.sparkContext.addPyFile(str(folder / "catdog.zip"))


def start_spark(master: str, folder: Path):
    """A Spark session whose workers can import helper and the catdog package (shipped as a zip from `folder`)."""
    try:
        import pyspark  # noqa: F401  (first: pyspark.sql may be imported already while pyspark is missing)
        from pyspark.sql import SparkSession
    except ImportError as e:
        raise CatDogError("--spark needs pyspark: pip install -r requirements-spark.txt (Spark also needs "
                          "Java 17 or later)") from e
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # local workers run this Python (a cluster sets its own)
    try:
        spark = SparkSession.builder.master(master).appName("catdog-hyperopt").getOrCreate()
    except Exception as e:  # pyspark raises bare Exception/RuntimeError when the JVM cannot start
        raise CatDogError(f"could not start Spark on {master} ({e}); Spark needs Java 17 or later on PATH or "
                          f"JAVA_HOME") from e
    spark.sparkContext.setLogLevel("ERROR")
    ship_package(spark, folder)
    return spark


def spark_objective(data_dir: str, models, out_dir: str, model_fn):
    """The objective shipped to Spark workers: each trial imports and patches kopt in its worker before building
    CompileFN (unpickling a ready CompileFN would import kopt unpatched)."""
    def run_trial(params):
        kopt = import_kopt(Path(out_dir) / "kopt")
        return make_objective(kopt, data_dir, models, out_dir, model_fn)(params)
    return ByValue(run_trial)


def search_spark(objective, space, trials, args, save):
    """Rounds of `parallelism` trials on Spark, saved after each round (Ctrl-C loses at most the running round)."""
    from hyperopt import SparkTrials, Trials, fmin, tpe
    spark = start_spark(args.spark, Path(args.model_dir).resolve() / helper.HYPEROPT_DIR / "kopt")
    try:
        while len(trials.trials) < args.max_evals:
            start, done = time.perf_counter(), len(trials.trials)
            spark_trials = SparkTrials(parallelism=args.parallelism, spark_session=spark)
            spark_trials.insert_trial_docs([dict(t) for t in trials.trials])
            spark_trials.refresh()
            target = min(args.max_evals, done + spark_trials.parallelism)
            fmin(objective, space, algo=tpe.suggest, trials=spark_trials, max_evals=target,
                 rstate=np.random.default_rng(args.seed + done), show_progressbar=False)
            failed = [t for t in spark_trials.trials[done:] if t["result"].get("status") != "ok"]
            for t in failed:
                log.warning(f"trial {t['tid'] + 1} failed on Spark: {t['misc'].get('error')}")
            if len(failed) == len(spark_trials.trials) - done:
                raise CatDogError(f"every trial of this round failed on {args.spark} (see above); check that "
                                  f"workers can import tensorflow, keras and kopt and read {args.data_dir}")
            trials = Trials()  # a SparkTrials holds the session and cannot be pickled
            trials.insert_trial_docs([dict(t) for t in spark_trials.trials if t["result"].get("status") == "ok"])
            trials.refresh()
            save(trials)
            best = min(t["result"]["loss"] for t in trials.trials)
            log.info(f"trials {done + 1}-{len(trials.trials)}/{args.max_evals} on {args.spark} "
                     f"({spark_trials.parallelism} at once): best val_loss so far {best:.5f} "
                     f"({time.perf_counter() - start:.0f} s)")
    finally:
        spark.stop()
    return trials


def main(args):
    # Absolute paths: Spark workers run elsewhere, and kopt stores each trial's model path.
    data_dir, out_dir = str(Path(args.data_dir).resolve()), Path(args.model_dir).resolve() / helper.HYPEROPT_DIR
    feats = helper.load_features(args.models, data_dir, parts=())  # fail early, with a clear message
    kopt = import_kopt(out_dir / "kopt")
    if args.views > 1:
        helper.check_views(args.models, data_dir, args.views)
    space = hyper_params(args.models, args.epochs, args.batch_size, args.patience, args.seed, args.views)
    trials_path = out_dir / TRIALS_JSON
    trials = load_trials(out_dir, args.trust_pickle)
    check_binding(out_dir, binding(args, feats), has_trials=len(trials.trials) > 0)
    if len(trials.trials):
        log.info(f"resuming: {len(trials.trials)} finished trials in {trials_path}")
        save_search(trials, space, out_dir, args, feats)  # repairs files a kill left behind the trials

    def save(t):
        return save_search(t, space, out_dir, args, feats)

    if args.spark:
        trials = search_spark(spark_objective(data_dir, args.models, str(out_dir), model), space, trials, args, save)
    else:
        trials = search(make_objective(kopt, data_dir, args.models, str(out_dir), model), space, trials, args, save)
    table = save_search(trials, space, out_dir, args, feats)
    if table.empty:
        raise CatDogError(f"no finished trials in {trials_path}: raise --max-evals")
    best = table.loc[table.val_loss.idxmin()]
    log.info(f"\nbest of {len(table)} trials (saved as {out_dir / 'best.keras'}):\n"
             + pd.DataFrame({"hyperparameter": ["learning rate", "decay", "momentum", "dropout rate", "val_loss",
                                                "val_acc", "epochs"],
                             "value": [f"{best.lr:.4f}", f"{best.decay:.4f}", best.momentum, best.dropout,
                                       f"{best.val_loss:.5f}", f"{best.val_acc:.4f}", best.epochs]}
                            ).to_string(index=False))
    return table


if __name__ == "__main__":
    helper.run_cli(main, parse_args())
