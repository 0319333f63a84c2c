"""Benchmark of feature extraction (issue: 02_extract_features.py). Not a test: it prints a table.

On one set of generated JPEGs (300-500 px, laid out by 01) it measures, per backbone and size:
  a  decode-only images/s of the report's way: Keras's legacy ImageDataGenerator.flow_from_directory
  b  decode-only images/s of our tf.data pipeline (default Pillow decoder; also --decoder tf, --jpeg-draft)
  b_e2e  our whole extraction (02's code path: pipeline + CNN + HDF5) images/s
  c  the CNN alone on batches already in memory, images/s
and, in child processes, peak RSS of a whole extraction of N and 4N images (memory must stay flat).

    python benchmarks/extract_bench.py                       # ResNet50 and InceptionV3, 200 images
    python benchmarks/extract_bench.py --images 400 --batch-size 128 --precision float16   # on a GPU box
Precisions side by side (float32, bfloat16, float16, as ratios): benchmarks/precision_bench.py.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import helper  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=["ResNet50", "InceptionV3"], help="backbones to time")
    p.add_argument("--images", type=int, default=200, help="images (N) in the timed set")
    p.add_argument("--batch-size", type=int, default=64, help="batch size")
    p.add_argument("--weights", default="none", help="imagenet | none | folder")
    p.add_argument("--precision", default="float32", choices=helper.PRECISION_CHOICES,
                   help="the CNN's compute, as 02 --precision")
    p.add_argument("--mixed-precision", dest="precision", action="store_const", const="float16",
                   help="the same as --precision float16")
    p.add_argument("--rss-size", type=int, default=96, help="image size for the N vs 4N memory runs")
    p.add_argument("--workdir", help="where to generate images (default: a temp folder)")
    p.add_argument("--rss-child", nargs=2, metavar=("DATA", "SIZE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_images(root: Path, n: int, seed: int = 0) -> Path:
    """n labelled + n/4 test JPEGs in Kaggle's layout, organized by 01 (train2/, test2/, split.csv)."""
    data = root / f"data_{n}"
    if not (data / helper.SPLIT_CSV).is_file():
        helper.make_demo_dataset(data, n // 2, seed)  # repo root on sys.path
        script = Path(__file__).resolve().parents[1] / "01_reorganize_data.py"
        subprocess.run([sys.executable, str(script), "--data-dir", str(data)], check=True, capture_output=True)
    return data


def rate(n: int, fn, repeat: int = 1) -> float:
    """Images per second of the fastest of `repeat` runs (the least disturbed by other load)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def legacy_decode(data: Path, bb: helper.Backbone, size: int, batch: int) -> float:
    """The report's input path: flow_from_directory with the backbone's preprocess_input."""
    import tensorflow as tf
    gen = tf.keras.preprocessing.image.ImageDataGenerator(preprocessing_function=bb.preprocess)
    flow = gen.flow_from_directory(str(data / helper.TRAIN2), target_size=(size, size), batch_size=batch,
                                   class_mode=None, shuffle=False)
    return rate(flow.samples, lambda: [flow[i] for i in range(len(flow))], repeat=3)


def our_decode(paths, bb: helper.Backbone, size: int, batch: int, draft: bool = False,
               interpolation: str = "bilinear", decoder: str = "pil", preprocess: bool = False) -> float:
    """02's input pipeline: read + decode + resize in tf.data. 02 runs preprocess_input inside the CNN step
    (on the GPU when there is one); `preprocess` moves it into the pipeline, as the legacy path has it."""
    def run():
        for _ in helper.image_dataset(paths, size, batch, interpolation, jpeg_draft=draft, decoder=decoder,
                                      preprocess=bb.preprocess if preprocess else None):
            pass
    run()  # warm up: the first pass builds the graph and starts the thread pools
    return rate(len(paths), run, repeat=3)


def cnn_alone(step, size: int, batch: int, parts: list[int], repeat: int = 3) -> float:
    """The CNN step alone on batches already in memory, in the same sizes as the extraction's batches
    (each part's full batches and its smaller last one), so the two rates compare like for like."""
    import tensorflow as tf
    sizes = [min(batch, n - s) for n in parts for s in range(0, n, batch)]
    xs = {b: tf.random.uniform((b, size, size, 3), 0, 255) for b in set(sizes)}
    return rate(sum(sizes), lambda: [step(xs[b]).numpy() for b in sizes], repeat=repeat)


def extract(step, bb, data: Path, size: int, batch: int, out: Path, draft: bool = False, repeat: int = 1) -> float:
    """02's code path, with a step already traced so tracing is not timed."""
    settings = helper.ExtractSettings(bb.name, size, jpeg_draft=draft)
    n = len(helper.read_split(data)) + len(helper.test_images(data)[0])
    return rate(n, lambda: helper.extract_to_file(step, (bb.width,), data, out, settings, batch), repeat=repeat)


def cnn_vs_extract(step, bb, data: Path, size: int, batch: int, out: Path, rounds: int = 3) -> tuple[float, float]:
    """(c, b_e2e): the CNN alone and the whole extraction, timed in alternation so that load from other
    processes on the machine hits both alike; the best of `rounds` of each."""
    parts = [len(helper.read_split(data)), len(helper.test_images(data)[0])]
    c = e2e = 0.0
    for _ in range(rounds):
        c = max(c, cnn_alone(step, size, batch, parts, repeat=1))
        e2e = max(e2e, extract(step, bb, data, size, batch, out))
    return c, e2e


def rss_child(data: str, size: str) -> None:
    """Run one whole extraction and print the peak RSS in MB (ru_maxrss is KB on Linux)."""
    import resource
    bb = helper.BACKBONES["ResNet50"]
    step = helper.make_extract_step(bb.build("none", int(size)), bb.preprocess)
    with tempfile.TemporaryDirectory() as tmp:
        helper.extract_to_file(step, (bb.width,), data, Path(tmp) / "f.h5", helper.ExtractSettings(bb.name, int(size)),
                               64)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def peak_rss(data: Path, size: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--rss-child", str(data), str(size)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]


def main(args):
    import keras
    import pandas as pd
    import tensorflow as tf
    root = Path(args.workdir or tempfile.mkdtemp(prefix="extract_bench_"))
    data = make_images(root, args.images)
    data4 = make_images(root, 4 * args.images, seed=1)
    # Decode rates over the 4N set: passes of a second or more, so thread start-up and noise weigh less.
    paths = helper.train_image_paths(data4, helper.read_split(data4))
    kb = np.mean([os.path.getsize(p) for p in paths]) / 1024
    print(f"{len(paths)} labelled images, mean {kb:.0f} KB, {os.cpu_count()} CPUs, "
          f"GPUs: {len(tf.config.list_physical_devices('GPU'))}, tensorflow {tf.__version__}")
    precision = helper.resolve_precision(args.precision)
    rows = []
    for name in args.models:
        bb = helper.get_backbone(name)
        for size in sorted({bb.size, 224, 299}):
            a = legacy_decode(data4, bb, size, args.batch_size)
            b = our_decode(paths, bb, size, args.batch_size)
            b_pre = our_decode(paths, bb, size, args.batch_size, preprocess=True)
            b_tf = our_decode(paths, bb, size, args.batch_size, decoder="tf")
            b_draft = our_decode(paths, bb, size, args.batch_size, draft=True)
            b_near = our_decode(paths, bb, size, args.batch_size, interpolation="nearest")
            row = {"backbone": name, "size": size, "a_legacy": a, "b_tfdata": b, "b/a": b / a,
                   "b_pre/a": b_pre / a, "b_tf/a": b_tf / a, "b_draft/a": b_draft / a, "b_nearest/a": b_near / a}
            if size == bb.size:  # the CNN at its native size: is decode hidden behind it?
                keras.config.set_dtype_policy(helper.KERAS_POLICY[precision])  # clear_session() resets it
                model = bb.build(args.weights, size)
                step = helper.make_extract_step(model, bb.preprocess)
                step(tf.zeros((args.batch_size, size, size, 3)))  # trace once, outside the timings
                with tempfile.TemporaryDirectory() as tmp:
                    row["c_cnn"], row["b_e2e"] = cnn_vs_extract(step, bb, data, size, args.batch_size,
                                                                Path(tmp) / "f.h5")
                    row["b_e2e/c"] = row["b_e2e"] / row["c_cnn"]
                    # Effect of --jpeg-draft on the features themselves.
                    extract(step, bb, data, size, args.batch_size, Path(tmp) / "d.h5", draft=True)
                    import h5py
                    with h5py.File(Path(tmp) / "f.h5") as f, h5py.File(Path(tmp) / "d.h5") as g:
                        x, y = f["labelled"][:], g["labelled"][:]
                    rel = np.linalg.norm(x - y, axis=1) / np.maximum(np.linalg.norm(x, axis=1), 1e-12)
                    row["draft_feat_rel_diff"] = float(rel.mean())
                    row["draft_rows_changed"] = float((rel > 0).mean())
                keras.backend.clear_session()
            rows.append(row)
            print(pd.DataFrame([row]).to_string(index=False, float_format=lambda v: f"{v:.2f}"), flush=True)
    keras.config.set_dtype_policy("float32")
    table = pd.DataFrame(rows)
    print("\nimages/s (a: legacy ImageDataGenerator decode + nearest resize + preprocess_input; b: 02's tf.data "
          "input pipeline, Pillow decode + antialiased bilinear, preprocess in the CNN step; b_pre: b with "
          "preprocess_input in the pipeline; b_tf, b_draft, b_nearest: b with --decoder tf / --jpeg-draft / "
          "--interpolation nearest; "
          "b_e2e: our extraction with the CNN; c: the CNN alone on in-memory batches)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    r1, r4 = peak_rss(data, args.rss_size), peak_rss(data4, args.rss_size)
    print(f"\npeak RSS, ResNet50 at {args.rss_size} px: N={args.images}: {r1:.0f} MB, 4N={4 * args.images}: "
          f"{r4:.0f} MB ({100 * (r4 / r1 - 1):+.1f}%)")
    return table


if __name__ == "__main__":
    a = parse_args()
    if a.rss_child:
        rss_child(*a.rss_child)
    else:
        main(a)
