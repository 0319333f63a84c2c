"""Benchmark of 06_hyperopt_merge.py: trials/minute, sequential vs --spark. Not a test: it prints a table.

Writes random features shaped like the real ones (20,000 rows x ResNet50 + InceptionV3 + Xception, 2048
each, float32) with a split.csv, then runs 06's main() for the same trials, first one at a time, then on
Spark (local[2] by default). Patience equals --epochs, so every trial trains exactly --epochs epochs.

    python benchmarks/hyperopt_bench.py                          # 10 trials x 20 epochs
    python benchmarks/hyperopt_bench.py --spark local[4] --parallelism 4
"""

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import helper  # noqa: E402

MODELS = ["ResNet50", "InceptionV3", "Xception"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", type=int, default=20000, help="labelled rows (80%% train, 20%% valid)")
    p.add_argument("--trials", type=int, default=10, help="trials per run")
    p.add_argument("--epochs", type=int, default=20, help="epochs per trial")
    p.add_argument("--spark", default="local[2]", help="Spark master for the parallel run ('' to skip it)")
    p.add_argument("--parallelism", type=int, default=2, help="trials at once on Spark")
    p.add_argument("--workdir", help="where to write the features (default: a temp folder)")
    return p.parse_args(argv)


def fake_features(data_dir: Path, rows: int) -> None:
    """split.csv and three feature files of random float32 rows (labels carry a little signal)."""
    rng = np.random.default_rng(0)
    labels = np.arange(rows) % 2
    names = [f"{helper.CLASSES[y]}.{i}.jpg" for i, y in enumerate(labels)]
    valid = helper.stratified_split(labels, 0.2, 0)
    data_dir.mkdir(parents=True, exist_ok=True)
    helper.write_csv(pd.DataFrame({"filename": names, "label": labels,
                                   "subset": np.where(valid, "valid", "train")}), data_dir / helper.SPLIT_CSV)
    # The record 01 writes beside it: read_split refuses a split.csv without it.
    helper.write_json({"split_sha256": helper.file_sha256(data_dir / helper.SPLIT_CSV)}, data_dir / helper.SPLIT_META)
    test = data_dir / helper.TEST2
    test.mkdir(parents=True, exist_ok=True)
    (test / "1.jpg").write_bytes(b"")  # the one test row the feature files hold
    for name in MODELS:
        attrs = helper.ExtractSettings(name, 224).attrs()
        with helper.FeatureWriter(helper.feature_path(data_dir, name), names, labels, [1], (2048,), "float32",
                                  attrs) as w:
            for s in range(0, rows, 2000):
                x = rng.standard_normal((min(2000, rows - s), 2048), np.float32)
                x[:, :8] += labels[s:s + len(x), None]  # a weak signal, so training is not pure noise
                w.append("labelled", x)
            w.append("test", np.zeros((1, 2048), np.float32))
            w.commit()


def run_06(data_dir: Path, model_dir: Path, args, spark: str | None) -> float:
    spec = importlib.util.spec_from_file_location("hyperopt_06", ROOT / "06_hyperopt_merge.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    argv = ["--data-dir", str(data_dir), "--model-dir", str(model_dir), "--max-evals", str(args.trials),
            "--epochs", str(args.epochs), "--patience", str(args.epochs), "--models", *MODELS]
    if spark:
        argv += ["--spark", spark, "--parallelism", str(args.parallelism)]
    start = time.perf_counter()
    module.main(module.parse_args(argv))
    return time.perf_counter() - start


def main(args):
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        data_dir = Path(tmp) / "data"
        fake_features(data_dir, args.rows)
        print(f"features: {args.rows} rows x 3 x 2048 float32 "
              f"({sum(helper.feature_path(data_dir, m).stat().st_size for m in MODELS) / 2**20:.0f} MiB)")
        rows = [("sequential", run_06(data_dir, Path(tmp) / "seq", args, None))]
        if args.spark:
            rows.append((f"spark {args.spark} x{args.parallelism}", run_06(data_dir, Path(tmp) / "spark", args,
                                                                            args.spark)))
    print(f"\n{args.trials} trials x {args.epochs} epochs, {os.cpu_count()} cores")
    print(f"{'run':24} {'seconds':>8} {'trials/min':>11}")
    for name, secs in rows:
        print(f"{name:24} {secs:8.0f} {60 * args.trials / secs:11.2f}")


if __name__ == "__main__":
    main(parse_args())
