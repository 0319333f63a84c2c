"""Step 6: HyperOpt TPE search over the merged head's SGD learning rate, decay, momentum and dropout.

The report's code shape: data() and model() functions, its hyper_params space, kopt's CompileFN as the
objective, Trials and fmin(algo=tpe.suggest). Validation uses split.csv's valid rows, like every other
step, so the searched val_loss compares with 03 and 05. Trials are saved after each one under
model/hyperopt/, so a rerun (with a larger --max-evals) continues where the last one stopped.
Writes trials.csv, val_loss_by_trial.png, best.keras (07 submits it by default) and TensorBoard runs.
--spark runs several trials at once with hyperopt's SparkTrials (local cores or a cluster).
"""

import functools
import os
import pickle
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import helper
from helper import CatDogError, log


def parse_args(argv=None):
    p = helper.base_parser(__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["ResNet50", "InceptionV3", "Xception"],
                   choices=list(helper.BACKBONES), metavar="MODEL", help="backbones whose features are merged")
    p.add_argument("--max-evals", type=int, default=100, help="trials in total, counting those already saved")
    p.add_argument("--epochs", type=int, default=200, help="most epochs per trial")
    p.add_argument("--patience", type=int, default=8, help="early stopping patience on val_loss")
    p.add_argument("--batch-size", type=int, default=128, help="rows per training batch")
    p.add_argument("--spark", nargs="?", const="local[*]", metavar="MASTER",
                   help="run trials in parallel with hyperopt's SparkTrials on this Spark master (default "
                        "local[*]; e.g. spark://host:7077). Needs pip install -r requirements-spark.txt and Java 17+; "
                        "--data-dir and --model-dir must be paths every worker can read and write")
    p.add_argument("--parallelism", type=int,
                   help="--spark: trials run at once (default: Spark's default parallelism)")
    return p.parse_args(argv)


def hyper_params(models, epochs: int, batch_size: int, patience: int, seed: int) -> dict:
    """The report's search space; the seed is a fixed value passed through to model()."""
    from hyperopt import hp
    return {
        "data": {"model_name": tuple(models)},
        "model": {
            "lr": hp.loguniform("m_lr", np.log(0.001), np.log(0.01)),
            "decay": hp.uniform("m_decay", 0.0005, 0.05),
            "momentum": hp.choice("m_mom", [0.5, 0.8, 0.9]),
            "dropout": hp.choice("m_do", [0.1, 0.2, 0.3, 0.5]),
            "seed": seed,
        },
        "fit": {"batch_size": batch_size, "epochs": epochs, "patience": patience},
    }


def make_data_fn(data_dir: str):
    """The report's data(model_name), reading `data_dir`. (kopt names each trial's TensorBoard folder after
    the parameters, so a path with slashes cannot be one of them.)"""
    @functools.lru_cache(maxsize=2)
    def data(model_name):
        """((train inputs, labels), (valid inputs, labels)) from split.csv; loaded once per process."""
        feats = helper.load_features(list(model_name), data_dir, parts=("train",))
        return feats.part("train"), feats.part("valid")
    return data


def make_objective(kopt, data_dir: str, models, out_dir: str, model_fn):
    """kopt's CompileFN over the report's data() and model(), validated on split.csv's valid rows."""
    return kopt.CompileFN("merge", "+".join(models), data_fn=make_data_fn(data_dir), model_fn=model_fn,
                          loss_metric="loss", loss_metric_mode="min",
                          valid_split=None,  # validate on data()'s second part: split.csv's valid rows
                          use_tensorboard=True, save_model="best", save_dir=out_dir)


def model(train_data, lr=0.001, decay=0.0, momentum=0.9, dropout=0.5, seed=helper.DEFAULT_SEED):
    """The merged head with SGD; Keras 2's `decay` is an InverseTimeDecay schedule (see make_optimizer)."""
    import keras
    keras.utils.set_random_seed(seed)  # every trial starts from the same weights: only the settings differ
    names = [f"in{i}" for i in range(len(train_data[0]))]
    dims = {n: x.shape[1] for n, x in zip(names, train_data[0], strict=True)}
    return helper.build_head(dims, dropout, helper.make_optimizer("sgd", lr, momentum, decay))


def load_trials(path: Path):
    from hyperopt import Trials
    if not path.is_file():
        return Trials()
    with open(path, "rb") as f:
        trials = pickle.load(f)
    # A trial that was running when the last run stopped has no result: drop it, it will be redone.
    trials._dynamic_trials = [t for t in trials._dynamic_trials if t["result"].get("status") == "ok"]
    trials.refresh()
    return trials


def save_trials(trials, path: Path) -> None:
    with helper.atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(trials, f)


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
        rows.append({"trial": t["tid"], "lr": params["lr"], "decay": params["decay"],
                     "momentum": params["momentum"], "dropout": params["dropout"],
                     "val_loss": r["eval"]["loss"], "val_acc": r["eval"].get("accuracy", np.nan),
                     "epochs": len(r["history"]["loss"]["epoch"]), "seconds": r["time"]["duration"]["total"],
                     "model_path": str(Path(r["path"]["model"]).with_suffix(".keras"))})
    return pd.DataFrame(rows)


def search(objective, space, trials, args, trials_path: Path):
    """One trial per fmin call, each seeded by its number: reproducible, and saved as soon as it ends."""
    from hyperopt import fmin, tpe
    while len(trials.trials) < args.max_evals:
        start = time.perf_counter()
        fmin(objective, space, algo=tpe.suggest, trials=trials, max_evals=len(trials.trials) + 1,
             rstate=np.random.default_rng(args.seed + len(trials.trials)), show_progressbar=False)
        save_trials(trials, trials_path)
        r = trials.trials[-1]["result"]
        log.info(f"trial {len(trials.trials)}/{args.max_evals}: val_loss {r['loss']:.5f} "
                 f"({time.perf_counter() - start:.0f} s)")
    return trials


def start_spark(master: str):
    """A Spark session whose workers can unpickle this script's functions and import helper."""
    try:
        from pyspark import cloudpickle
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
    spark.sparkContext.addPyFile(str(Path(helper.__file__).resolve()))
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # this script is not importable on workers
    return spark


def spark_objective(data_dir: str, models, out_dir: str, model_fn):
    """The objective shipped to Spark workers: each trial imports and patches kopt in its worker before building
    CompileFN (unpickling a ready CompileFN would import kopt unpatched)."""
    def run_trial(params):
        kopt = helper.import_kopt(Path(out_dir) / "kopt")
        return make_objective(kopt, data_dir, models, out_dir, model_fn)(params)
    return run_trial


def search_spark(objective, space, trials, args, trials_path: Path):
    """Rounds of `parallelism` trials on Spark, saved after each round (Ctrl-C loses at most the running round)."""
    from hyperopt import SparkTrials, Trials, fmin, tpe
    spark = start_spark(args.spark)
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
            save_trials(trials, trials_path)
            best = min(t["result"]["loss"] for t in trials.trials)
            log.info(f"trials {done + 1}-{len(trials.trials)}/{args.max_evals} on {args.spark} "
                     f"({spark_trials.parallelism} at once): best val_loss so far {best:.5f} "
                     f"({time.perf_counter() - start:.0f} s)")
    finally:
        spark.stop()
    return trials


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


def main(args):
    if len(set(args.models)) < 2:
        raise CatDogError("--models needs at least two different backbones to merge")
    # Absolute paths: Spark workers run elsewhere, and kopt stores each trial's model path.
    data_dir, out_dir = str(Path(args.data_dir).resolve()), Path(args.model_dir).resolve() / "hyperopt"
    kopt = helper.import_kopt(out_dir / "kopt")
    space = hyper_params(args.models, args.epochs, args.batch_size, args.patience, args.seed)
    helper.load_features(args.models, data_dir, parts=())  # fail early, with a clear message, on missing features
    trials_path = out_dir / "trials.pkl"
    trials = load_trials(trials_path)
    if len(trials.trials):
        log.info(f"resuming: {len(trials.trials)} finished trials in {trials_path}")
    if args.spark:
        trials = search_spark(spark_objective(data_dir, args.models, str(out_dir), model), space, trials, args,
                              trials_path)
    else:
        trials = search(make_objective(kopt, data_dir, args.models, str(out_dir), model), space, trials, args,
                        trials_path)
    table = trials_table(trials, space)
    if table.empty:
        raise CatDogError(f"no finished trials in {trials_path}: raise --max-evals")
    helper.write_csv(table.drop(columns="model_path"), out_dir / "trials.csv")
    plot_trials(table, out_dir / "val_loss_by_trial.png")
    best = table.loc[table.val_loss.idxmin()]
    with helper.atomic_path(out_dir / "best.keras", suffix=".keras") as tmp:
        shutil.copyfile(best.model_path, tmp)
    helper.write_json({"features": list(args.models), "kind": "hyperopt", "seed": args.seed, "trial": int(best.trial),
                       **{k: float(best[k]) for k in ("lr", "decay", "momentum", "dropout", "val_loss", "val_acc")},
                       **helper.versions()}, out_dir / "best.json")
    log.info(f"\nbest of {len(table)} trials (saved as {out_dir / 'best.keras'}):\n"
             + pd.DataFrame({"hyperparameter": ["learning rate", "decay", "momentum", "dropout rate", "val_loss",
                                                "val_acc", "epochs"],
                             "value": [f"{best.lr:.4f}", f"{best.decay:.4f}", best.momentum, best.dropout,
                                       f"{best.val_loss:.5f}", f"{best.val_acc:.4f}", best.epochs]}
                            ).to_string(index=False))
    return table


if __name__ == "__main__":
    helper.run_cli(main, parse_args())
