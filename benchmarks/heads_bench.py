"""Benchmark of helper.fit_arrays against Keras's fit for the heads: seconds per epoch, and 06's trials per minute.
Not a test: it prints tables and writes them to a markdown file.

1. Per epoch: the report's merged head (ResNet50 + InceptionV3 + Xception: 3 x 2048 = 6,144 float32 features,
   Dropout 0.5, Dense(1, sigmoid)) on random features with a weak signal, 16,000 train and 4,000 valid rows (the
   report's split of 20,000), batch 128, trained by Keras's default fit (model.fit on the arrays) and by
   helper.fit_arrays (what 03, 05 and 06 use), each from the same seed, taking turns (--rounds), with Adadelta
   (03/05's) and SGD with decay (06's). Seconds per epoch are epoch begin -> epoch end (validation included),
   the median over every epoch but the first (which traces the functions; shown apart); CPU s/epoch counts
   this process's CPU time (every thread's) over the same spans, less sensitive than wall time to other load
   on the machine. The max abs diffs compare every run's history (loss and val_loss) and final weights with
   the first Keras run's (0: the same bits).
2. 06's trials per minute: 06_hyperopt_merge.py's main() on the same features (written as 02 writes them, with a
   split.csv), --trials trials of --trial-epochs epochs each (patience = epochs, so every trial runs them all),
   once with Keras's fit (06's heads without their `fit` attribute) and once as 06 runs them, on the same
   trials; max abs val_loss diff compares the two trials.csv.

    python benchmarks/heads_bench.py                           # 10 epochs x 2 rounds; 5 trials x 20 epochs
    python benchmarks/heads_bench.py --trials 0 --rounds 1     # a quicker look, per-epoch times only
"""

import argparse
import datetime
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from hyperopt_bench import MODELS, fake_features  # noqa: E402

import helper  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=helper.HelpFormatter)
    p.add_argument("--rows", type=helper.POSITIVE_INT, default=20000, help="labelled rows (80%% train, 20%% valid)")
    p.add_argument("--epochs", type=helper.POSITIVE_INT, default=10, help="epochs per fit in part 1 (at least 2)")
    p.add_argument("--rounds", type=helper.POSITIVE_INT, default=2,
                   help="part 1: fits per optimizer and trainer, taking turns")
    p.add_argument("--batch-size", type=helper.POSITIVE_INT, default=128, help="rows per training batch")
    p.add_argument("--trials", type=int, default=5, help="part 2: 06's trials per run (0 skips part 2)")
    p.add_argument("--trial-epochs", type=helper.POSITIVE_INT, default=20, help="part 2: epochs per trial")
    p.add_argument("--seed", type=int, default=helper.DEFAULT_SEED, help="seed of every head")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "heads_bench.md"), help="markdown file written")
    p.add_argument("--workdir", help="where the features go (default: a temp folder, removed at the end)")
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error("--epochs must be at least 2: the first epoch (tracing) is timed apart")
    return args


def epoch_timer():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        """Wall and CPU (this process, all threads) seconds from each epoch's begin to its end, validation
        included."""

        def __init__(self):
            super().__init__()
            self.seconds, self.cpu = [], []

        def on_epoch_begin(self, epoch, logs=None):
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.start)
            self.cpu.append(time.process_time() - self.cpu_start)

    return EpochTimer()


def train_once(trainer: str, optimizer: str, feats: helper.Features, args) -> dict:
    """One fit of the report's merged head; its epoch times, history and final weights."""
    dims = {n: x.shape[1] for n, x in zip(feats.names, feats.labelled, strict=True)}
    opt = (helper.make_optimizer("adadelta", 1.0) if optimizer == "adadelta"
           else helper.make_optimizer("sgd", 0.005, 0.9, 0.01))
    model = helper.build_head(dims, 0.5, opt, args.seed)
    (xtr, ytr), valid = feats.subset("train"), feats.subset("valid")
    timer = epoch_timer()
    fit = model.fit if trainer == "keras" else lambda *a, **k: helper.fit_arrays(model, *a, **k)
    start = time.perf_counter()
    hist = fit(xtr, ytr, batch_size=args.batch_size, epochs=args.epochs, validation_data=valid, verbose=0,
               callbacks=[timer])
    return {"seconds": timer.seconds, "cpu": timer.cpu, "wall": time.perf_counter() - start, "history": hist.history,
            "weights": [w.numpy() for w in model.weights]}


def per_epoch(feats: helper.Features, args) -> pd.DataFrame:
    rows = []
    for optimizer in ("adadelta", "sgd"):
        runs = {"keras": [], "fast": []}
        for r in range(args.rounds):
            for trainer in ("keras", "fast") if r % 2 == 0 else ("fast", "keras"):
                runs[trainer].append(train_once(trainer, optimizer, feats, args))
                print(f"{optimizer} round {r + 1} {trainer}: "
                      + " ".join(f"{s:.3f}" for s in runs[trainer][-1]["seconds"]), flush=True)
        ref = runs["keras"][0]
        diff = max(max(abs(a - b) for a, b in zip(ref["history"][k], run["history"][k], strict=True))
                   for run in runs["keras"] + runs["fast"] for k in ("loss", "val_loss"))
        wdiff = max(float(np.max(np.abs(a - b))) for run in runs["keras"] + runs["fast"]
                    for a, b in zip(ref["weights"], run["weights"], strict=True))
        median = {t: statistics.median(s for run in runs[t] for s in run["seconds"][1:]) for t in runs}
        cpu = {t: statistics.median(s for run in runs[t] for s in run["cpu"][1:]) for t in runs}
        for trainer, name in (("keras", "Keras fit (default)"), ("fast", "helper.fit_arrays")):
            rows.append({"optimizer": optimizer, "trainer": name, "s/epoch (median)": median[trainer],
                         "CPU s/epoch (median)": cpu[trainer],
                         "first epoch s": statistics.median(run["seconds"][0] for run in runs[trainer]),
                         "fit s": statistics.median(run["wall"] for run in runs[trainer]),
                         "speed-up": median["keras"] / median[trainer], "CPU speed-up": cpu["keras"] / cpu[trainer],
                         "max abs loss diff": diff, "max abs weight diff": wdiff})
    return pd.DataFrame(rows)


def run_06(data_dir: Path, model_dir: Path, args, keras_fit: bool) -> tuple[float, pd.DataFrame]:
    spec = importlib.util.spec_from_file_location(f"hyperopt_06_{keras_fit}", ROOT / "06_hyperopt_merge.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    if keras_fit:
        real = module.model

        def model(*a, **k):
            head = real(*a, **k)
            del head.fit  # Keras's own fit, as before fit_arrays
            return head

        module.model = model
    argv = ["--data-dir", str(data_dir), "--model-dir", str(model_dir), "--max-evals", str(args.trials),
            "--epochs", str(args.trial_epochs), "--patience", str(args.trial_epochs), "--seed", str(args.seed),
            "--batch-size", str(args.batch_size), "--models", *MODELS]
    start = time.perf_counter()
    table = module.main(module.parse_args(argv))
    return time.perf_counter() - start, table


def trials_per_minute(data_dir: Path, work: Path, args) -> pd.DataFrame:
    runs = {name: run_06(data_dir, work / name, args, keras_fit=name == "keras") for name in ("keras", "fast")}
    diff = float(np.max(np.abs(runs["keras"][1].val_loss.to_numpy() - runs["fast"][1].val_loss.to_numpy())))
    rows = []
    for name, label in (("keras", "06 with Keras fit (default)"), ("fast", "06 with helper.fit_arrays")):
        secs = runs[name][0]
        rows.append({"run": label, "trials": args.trials, "epochs/trial": args.trial_epochs, "seconds": secs,
                     "trials/min": 60 * args.trials / secs,
                     "speed-up": runs["keras"][0] / secs, "max abs val_loss diff": diff})
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.2e}" if 0 < abs(v) < 1e-3 else f"{v:.3f}"
        return str(v)
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "|".join("---" for _ in df.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def main(args):
    import keras
    import tensorflow as tf
    start, load = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        data_dir = Path(tmp) / "data"
        fake_features(data_dir, args.rows)
        feats = helper.load_features(MODELS, data_dir, parts=("labelled",))
        print(f"features: {args.rows} rows x {sum(x.shape[1] for x in feats.labelled)} float32, "
              f"{int((~feats.valid).sum())} train / {int(feats.valid.sum())} valid", flush=True)
        epochs = per_epoch(feats, args)
        del feats
        print("\n" + epochs.to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)
        trials = trials_per_minute(data_dir, Path(tmp), args) if args.trials else None
    if trials is not None:
        print("\n" + trials.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    devices = ", ".join(d.device_type for d in tf.config.list_physical_devices())
    text = [
        "# Heads benchmark (helper.fit_arrays against Keras's fit)", "",
        "What `benchmarks/heads_bench.py` measures is in its docstring. Written by the script.", "",
        f"- **Command:** `{' '.join(['python benchmarks/heads_bench.py', *sys.argv[1:]])}`",
        f"- **Date:** {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC "
        f"({time.perf_counter() - start:.0f} s wall)",
        f"- **Machine:** {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), devices: "
        f"{devices}; Python {platform.python_version()}, TensorFlow {tf.__version__}, Keras {keras.__version__}",
        f"- **Load average** (1 min) at the start {load[0]:.2f}, at the end {os.getloadavg()[0]:.2f}. Other load "
        f"on the machine slows Keras's fit more (one Python call and one tf.data batch per step) than fit_arrays "
        f"(one call per epoch): the runs take turns so that both see it alike, and CPU s/epoch counts work, not "
        f"waiting.",
        "", f"## Seconds per epoch ({args.rows} rows, batch {args.batch_size}, {args.epochs} epochs, "
            f"{args.rounds} round(s))", "", markdown(epochs), ""]
    if trials is not None:
        text += ["## 06: trials per minute", "", markdown(trials), ""]
    with helper.atomic_path(args.output) as tmp:
        tmp.write_text("\n".join(text))
    print(f"\nwritten: {args.output}")


if __name__ == "__main__":
    main(parse_args())
