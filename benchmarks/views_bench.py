"""Benchmark of augmented feature views (02 --views) and of heads trained on them (--views). Not a test.

1. Extraction: seconds per image of 02's whole path (decode + augment in tf.data, CNN, HDF5) for V = 1, 2, 4 views
   of one backbone on generated JPEGs (300-500 px). Target: V views cost <= V x 1.05 the time of one, i.e. the
   decode and augmentation of the extra views hide behind the CNN.
2. Heads: seconds per epoch of the report's merged head (ResNet50+InceptionV3+Xception, 3 x 2048 features) on
   synthetic rows, trained on the plain rows against trained on 4 float16 views (a view drawn per row each epoch).

    python benchmarks/views_bench.py                     # ResNet50 at 224 px, 200 images; heads 16,000 rows
    python benchmarks/views_bench.py --images 400 --out benchmarks/views_bench.md
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import helper  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="ResNet50", help="backbone to extract")
    p.add_argument("--image-size", type=int, default=224, help="input size")
    p.add_argument("--images", type=int, default=200, help="labelled images generated (plus a quarter as test)")
    p.add_argument("--views", type=int, nargs="+", default=[1, 2, 4], help="view counts to time")
    p.add_argument("--batch-size", type=int, default=64, help="extraction batch size")
    p.add_argument("--rows", type=int, default=16000, help="training rows of the head benchmark")
    p.add_argument("--epochs", type=int, default=4, help="head epochs timed (the first, with tracing, is dropped)")
    p.add_argument("--out", help="also write the tables to this markdown file")
    return p.parse_args(argv)


def make_images(root: Path, n: int) -> Path:
    data = root / "data"
    helper.make_demo_dataset(data, n // 2, 0)
    script = Path(__file__).resolve().parents[1] / "01_reorganize_data.py"
    subprocess.run([sys.executable, str(script), "--data-dir", str(data)], check=True, capture_output=True)
    return data


def extraction(args, data: Path, out: Path) -> pd.DataFrame:
    bb = helper.get_backbone(args.model)
    helper.set_seed(0)
    model = bb.build("none", args.image_size)
    step = helper.make_extract_step(model, bb.preprocess)
    n = len(helper.read_split(data)) + len(helper.test_images(data)[0])
    rows = []
    for views in args.views:
        settings = helper.ExtractSettings(bb.name, args.image_size, weights="none", views=views,
                                          views_dtype="float16" if views > 1 else "")
        best = float("inf")
        for _ in range(2):  # the faster of two runs: the least disturbed by other load
            start = time.perf_counter()
            helper.extract_to_file(step, (bb.width,), data, out, settings, args.batch_size)
            best = min(best, time.perf_counter() - start)
        rows.append({"views": views, "images": n, "seconds": best, "ms_per_image": 1000 * best / n,
                     "MB": out.stat().st_size / 2**20})
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    one = table.seconds[table.views == 1].iloc[0]
    table["time_vs_V_x_one"] = table.seconds / (table.views * one)
    return table


def heads(args) -> pd.DataFrame:
    import keras
    rng = np.random.default_rng(0)
    dims = {"ResNet50": 2048, "InceptionV3": 2048, "Xception": 2048}
    y = rng.integers(0, 2, args.rows).astype(np.float32)
    plain = [rng.normal(size=(args.rows, d)).astype(np.float32) for d in dims.values()]
    views = [np.stack([x.astype(np.float16)] + [(x + rng.normal(scale=0.1, size=x.shape)).astype(np.float16)
                                                for _ in range(3)]) for x in plain]
    valid = ([x[:4000] for x in plain], y[:4000])
    rows = []
    for what, x in (("plain rows", plain), ("4 views", helper.view_sampler(views, np.arange(args.rows), 0))):
        model = helper.build_head(dims, 0.5, helper.make_optimizer("adadelta", 1.0), 0)

        class Timer(keras.callbacks.Callback):
            times: list = []

            def on_epoch_begin(self, epoch, logs=None):
                self.start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                self.times.append(time.perf_counter() - self.start)

        timer = Timer()
        timer.times = []
        helper.fit(model, (x, y), valid, args.epochs, [timer], 128)
        rows.append({"training on": what, "rows": args.rows, "s_per_epoch": float(np.median(timer.times[1:]))})
        print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame) -> str:
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in df.itertuples(index=False)]
    return "\n".join("| " + " | ".join(r) + " |" for r in [list(df.columns), ["---"] * len(df.columns), *cells])


def main(args):
    with tempfile.TemporaryDirectory() as tmp:
        data = make_images(Path(tmp), args.images)
        ext = extraction(args, data, Path(tmp) / "f.h5")
    head = heads(args)
    text = (f"## Extraction: {args.model} at {args.image_size} px, weights none, batch {args.batch_size}, "
            f"{os.cpu_count()} CPUs\n\n{markdown(ext)}\n\n"
            f"## Merged head (3 x 2048 features, batch 128): seconds per epoch\n\n{markdown(head)}\n")
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)
    return ext, head


if __name__ == "__main__":
    main(parse_args())
