"""Step 6: HyperOpt TPE search over the merged head's SGD learning rate, decay, momentum and dropout.

The report's code shape: data() and model() functions, its hyper_params space, kopt's CompileFN as the
objective, Trials and fmin(algo=tpe.suggest). Validation uses split.csv's valid rows, like every other
step, so the searched val_loss compares with 03 and 05. Trials are saved after each one under
model/hyperopt/, so a rerun (with a larger --max-evals) continues where the last one stopped.
Writes trials.csv, val_loss_by_trial.png, best.keras (07 submits it by default) and TensorBoard runs.
"""

import functools
import pickle
import shutil
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


def plot_trials(df: pd.DataFrame, path: Path) -> None:
    plt = helper._pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(df.trial, df.val_loss, "o", alpha=0.6, label="trial")
    ax.plot(df.trial, df.val_loss.cummin(), "-", label="best so far")
    best = df.loc[df.val_loss.idxmin()]
    ax.plot([best.trial], [best.val_loss], "r*", markersize=15, label=f"best: {best.val_loss:.5f}")
    ax.set(xlabel="trial", ylabel="val_loss", title="HyperOpt TPE: val_loss by trial", yscale="log")
    ax.legend()
    helper.save_figure(fig, path)


def main(args):
    from hyperopt import fmin, tpe

    if len(set(args.models)) < 2:
        raise CatDogError("--models needs at least two different backbones to merge")
    out_dir = Path(args.model_dir) / "hyperopt"
    kopt = helper.import_kopt(out_dir / "kopt")
    space = hyper_params(args.models, args.epochs, args.batch_size, args.patience, args.seed)
    data = make_data_fn(str(args.data_dir))
    data(tuple(args.models))  # fail early, with a clear message, on missing features
    objective = kopt.CompileFN("merge", "+".join(args.models), data_fn=data, model_fn=model,
                               loss_metric="loss", loss_metric_mode="min",
                               valid_split=None,  # validate on data()'s second part: split.csv's valid rows
                               use_tensorboard=True, save_model="best", save_dir=str(out_dir))
    trials_path = out_dir / "trials.pkl"
    trials = load_trials(trials_path)
    if len(trials.trials):
        log.info(f"resuming: {len(trials.trials)} finished trials in {trials_path}")
    while len(trials.trials) < args.max_evals:
        start = time.perf_counter()
        # One trial per fmin call, each seeded by its number: reproducible, and saved as soon as it ends.
        fmin(objective, space, algo=tpe.suggest, trials=trials, max_evals=len(trials.trials) + 1,
             rstate=np.random.default_rng(args.seed + len(trials.trials)), show_progressbar=False)
        save_trials(trials, trials_path)
        r = trials.trials[-1]["result"]
        log.info(f"trial {len(trials.trials)}/{args.max_evals}: val_loss {r['loss']:.5f} "
                 f"({time.perf_counter() - start:.0f} s)")
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
