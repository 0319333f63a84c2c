"""Benchmark of 08_export_model.py's exports: size, latency and agreement. Not a test: it prints a table.

For the demo's merged model (the report's head on ResNet50 at 224 + InceptionV3 at 299 + Xception at 299, native
sizes, --weights none: the seeded random backbones 02 builds) composed by 08's pixel_model() into one model from
299 x 299 RGB uint8 pixels to P(dog), it measures per format (the Keras .keras model, the TF SavedModel, and the
TFLite model at each quantisation: none, float16, dynamic):
  file MiB       the file's size (SavedModel: the folder's total)
  ms/image       median latency at batch 1 over the images, after one warm-up call, with 2 CPU threads
                 (TensorFlow: 2 intra-op and 1 inter-op threads; LiteRT: num_threads=2); the formats are timed
                 in alternation, image by image, so that other load on the machine hits them alike
  images/s       1000 / ms/image
  max |dP|       the largest difference of its P(dog) from the Keras model's, over the same images
  CPU s/s        this process's CPU seconds per wall second while that format was timed (near 2 when its
                 threads had their cores; lower when the machine was busy, or the runtime used fewer threads)
  export s       seconds to write the file (TFLite: to convert the SavedModel) and load it for timing
The images are 01's demo images (train/), loaded as predict.py loads a photo (Pillow, bilinear, to 299 x 299).

    python benchmarks/export_bench.py                                  # 100 images, all three quantisations
    python benchmarks/export_bench.py --images 20 --quantize dynamic   # a quicker look
"""

import argparse
import importlib
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import helper  # noqa: E402

BACKBONES = {"ResNet50": 224, "InceptionV3": 299, "Xception": 299}  # the report's merge, each at its native size
THREADS = 2
QUANTIZE = ["none", "float16", "dynamic"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=helper.HelpFormatter)
    p.add_argument("--images", type=helper.POSITIVE_INT, default=100,
                   help="demo images to time and compare on (01's demo makes ceil(N/2) per class)")
    p.add_argument("--workdir", help="where the demo images and the exported files go (default: a temp folder, "
                                     "removed at the end)")
    p.add_argument("--quantize", nargs="+", choices=QUANTIZE, default=QUANTIZE,
                   help="TFLite quantisations to convert, time and compare")
    p.add_argument("--seed", type=helper.SEED, default=helper.DEFAULT_SEED, help="seed of the head's initial weights")
    return p.parse_args(argv)


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def time_alternately(runners: dict, images: np.ndarray) -> dict:
    """Per format: (median ms per image at batch 1, CPU seconds per wall second while timed, P(dog) of each
    image). One warm-up call each, then image by image every format in turn, so that load from other processes
    on the machine hits all formats alike."""
    for call in runners.values():
        call(images[:1])
    times = {fmt: [] for fmt in runners}
    cpu = dict.fromkeys(runners, 0.0)
    probs = {fmt: [] for fmt in runners}
    for x in images:
        for fmt, call in runners.items():
            wall, proc = time.perf_counter(), time.process_time()
            p = call(x[None])
            times[fmt].append(time.perf_counter() - wall)
            cpu[fmt] += time.process_time() - proc
            probs[fmt].append(p)
    return {fmt: (1000 * float(np.median(times[fmt])), cpu[fmt] / sum(times[fmt]), np.array(probs[fmt], np.float64))
            for fmt in runners}


def demo_model(seed: int):
    """(the report's merged head, untrained, and a sidecar-like meta for it, as 05 writes)."""
    head = helper.build_head({name: 2048 for name in BACKBONES}, 0.5, helper.make_optimizer("adadelta", 1.0), seed)
    meta = {"kind": "merge", "features": list(BACKBONES),
            "feature_attrs": [helper.ExtractSettings(name, size, weights="none").attrs()
                              for name, size in BACKBONES.items()]}
    return head, meta


def spread_head(head, pixels, images: np.ndarray, target_std: float = 2.0) -> np.ndarray:
    """Give the head a kernel that spreads P(dog) over the images, and return their features.

    A random head on random-weight backbones' features gives a nearly constant P(dog), on which differences
    between formats would say little. So the kernel becomes the features' first principal direction over these
    images, scaled so that the logits have a standard deviation of `target_std` (a spread of a few units), and
    the bias centres them on 0 (P = 0.5). Finding that direction needs the features, i.e. the composed model, so
    the new weights are set on the head's "prediction" layer and copied into the pixel model's "logit" layer,
    exactly as pixel_model() copies them when it builds.
    """
    import keras
    features = keras.Model(pixels.input, pixels.get_layer("concat").output)
    f = np.concatenate([np.asarray(features(images[i:i + 10], training=False)) for i in range(0, len(images), 10)])
    centred = f - f.mean(axis=0)
    direction = np.linalg.svd(centred, full_matrices=False)[2][0] if len(f) > 1 else np.ones(f.shape[1])
    spread = np.std(centred @ direction)
    kernel = direction * (target_std / spread if spread > 0 else 1.0)
    bias = -float(f.mean(axis=0) @ kernel)
    weights = [kernel[:, None].astype(np.float32), np.array([bias], np.float32)]
    head.get_layer("prediction").set_weights(weights)
    pixels.get_layer("logit").set_weights(head.get_layer("prediction").get_weights())
    return f


def keras_runner(model, size: int):
    """The Keras model through one traced tf.function with a fixed input signature, as predict.py runs it."""
    import tensorflow as tf
    spec = tf.TensorSpec((None, size, size, 3), tf.uint8)
    fn = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    return lambda x: float(np.asarray(fn(x)).ravel()[0])


def saved_model_runner(path: Path):
    """The SavedModel loaded back with tf.saved_model.load, called through its `serve` endpoint."""
    import tensorflow as tf
    loaded = tf.saved_model.load(str(path))
    return lambda x: float(np.asarray(loaded.serve(tf.constant(x))).ravel()[0])


def tflite_runner(path: Path):
    """The TFLite model in LiteRT's interpreter with 2 threads, as predict.py runs it."""
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_path=str(path), num_threads=THREADS)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]

    def run(x):
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        return float(interpreter.get_tensor(out["index"]).ravel()[0])
    return run


def main(args):
    import tensorflow as tf
    # Before any TensorFlow work: the thread pools are made once, on first use.
    tf.config.threading.set_intra_op_parallelism_threads(THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras
    export = importlib.import_module("08_export_model")  # repo root on sys.path

    tmp = None if args.workdir else tempfile.mkdtemp(prefix="export_bench_")
    root = Path(args.workdir or tmp)
    try:
        data = helper.make_demo_dataset(root / "demo", max(2, math.ceil(args.images / 2)))
        paths = sorted((data / "train").glob("*.jpg"))[:args.images]

        start = time.perf_counter()
        head, meta = demo_model(args.seed)
        pixels, size, settings = export.pixel_model(head, meta, Path("bench"), None)
        build_s = time.perf_counter() - start
        images = np.stack([helper.load_pixels(p, size, settings[0].interpolation) for p in paths])
        feats = spread_head(head, pixels, images)
        print(f"{len(images)} demo images at {size}x{size}; model {pixels.count_params() / 1e6:.1f} M parameters "
              f"(built in {build_s:.0f} s); features: mean {feats.mean():.3g}, mean per-feature std over the "
              f"images {feats.std(axis=0).mean():.3g}; {os.cpu_count()} CPUs, GPUs: "
              f"{len(tf.config.list_physical_devices('GPU'))}, tensorflow {tf.__version__}, keras "
              f"{keras.__version__}; {THREADS} threads", flush=True)

        out = root / "export"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        rows, runners = {}, {}

        def exported(fmt: str, start: float, mib: float, runner) -> None:
            rows[fmt] = {"format": fmt, "file MiB": mib, "export s": time.perf_counter() - start, "note": ""}
            runners[fmt] = runner
            print(f"{fmt}: {mib:.1f} MiB in {rows[fmt]['export s']:.0f} s", flush=True)

        start = time.perf_counter()
        pixels.save(out / "catdog.keras")
        exported("Keras (.keras)", start, (out / "catdog.keras").stat().st_size / 2**20, keras_runner(pixels, size))
        saved = out / "saved_model"
        start = time.perf_counter()
        pixels.export(str(saved), verbose=False)
        exported("SavedModel", start, folder_size(saved) / 2**20, saved_model_runner(saved))
        for q in args.quantize:
            fmt = f"TFLite ({q})"
            start = time.perf_counter()
            try:
                flat = export.to_tflite(saved, q)
            except Exception as e:  # a conversion failure is a result: reported in the table, the others still run
                message = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                rows[fmt] = {"format": fmt, "note": f"conversion failed: {message}"}
                print(f"{fmt}: conversion failed: {message}", flush=True)
                continue
            path = out / f"catdog_{q}.tflite"
            path.write_bytes(flat)
            exported(fmt, start, len(flat) / 2**20, tflite_runner(path))

        print(f"timing {len(runners)} formats on {len(images)} images in alternation (load average "
              f"{os.getloadavg()[0]:.2f})", flush=True)
        timed = time_alternately(runners, images)
        reference = timed["Keras (.keras)"][2]
        print(f"Keras P(dog) over the images: min {reference.min():.3f}, median {np.median(reference):.3f}, "
              f"max {reference.max():.3f}; load average {os.getloadavg()[0]:.2f}", flush=True)
        for fmt, (ms, cpu, probs) in timed.items():
            rows[fmt].update({"ms/image": ms, "images/s": 1000 / ms, "max |dP| vs Keras":
                              float(np.abs(probs - reference).max()), "CPU s/s": cpu})
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    import pandas as pd
    columns = ["format", "file MiB", "ms/image", "images/s", "max |dP| vs Keras", "CPU s/s", "export s", "note"]
    table = pd.DataFrame(list(rows.values())).reindex(columns=columns)
    print(f"\nbatch 1, {THREADS} CPU threads, median over {len(images)} images after a warm-up call, formats timed in "
          f"alternation; max |dP|: largest difference of P(dog) from the Keras model's on the same images; CPU s/s: "
          f"this process's CPU seconds per second while timed (about {THREADS} when it had its threads' cores); "
          f"export s: time to write the file (TFLite: conversion from the SavedModel) and load it")
    formats = {"file MiB": ".1f", "ms/image": ".1f", "images/s": ".2f", "max |dP| vs Keras": ".2e", "CPU s/s": ".2f",
               "export s": ".0f"}
    print(table.to_string(index=False, formatters={c: (lambda v, f=f: "-" if pd.isna(v) else format(v, f))
                                                   for c, f in formats.items()}))
    return table


if __name__ == "__main__":
    main(parse_args())
