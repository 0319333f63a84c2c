"""Benchmark of --precision (issue 21): the CNN's speed and the features' and a head's P(dog) difference per
precision. Not a test: it prints a table (written up by hand in benchmarks/precision_bench.md).

On the demo data (01 --demo's generated photos), per backbone at its native size and per precision, alternating
the precisions round by round so other load on the machine hits each alike (the best round counts):
  c_cnn   the CNN alone on in-memory batches, images/s
  e2e     02's whole path (tf.data decode + resize, the CNN, the HDF5 file), images/s
  x/float32  those as ratios to float32
  feat_rel_l2   ||f - f_float32|| / ||f_float32|| over all labelled rows (features as 02 writes them)
  p_rel_l2, p_max   a head (the report's: Dropout + Dense, Adadelta 1.0, 10 epochs) trained on float32 features,
                    its P(dog) on this precision's test rows vs on float32's: relative L2 and the largest |diff|
  own_p_max   a head trained on this precision's features, fed float32 features (07 refuses that mix)

    python benchmarks/precision_bench.py                          # ResNet50, InceptionV3; 200 images, 2 rounds
    python benchmarks/precision_bench.py --precisions float32 float16 --batch-size 128 --images 800   # GPU box
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from extract_bench import cnn_alone, make_images  # noqa: E402

import helper  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=["ResNet50", "InceptionV3"], help="backbones, at native size")
    p.add_argument("--precisions", nargs="+", default=["float32", "bfloat16", "float16"],
                   choices=helper.PRECISIONS, help="precisions to time (float32, the reference, is always added)")
    p.add_argument("--images", type=int, default=200, help="labelled images of the demo set (plus a quarter test)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per precision")
    p.add_argument("--batch-size", type=int, default=32, help="batch size")
    p.add_argument("--weights", default="none", help="imagenet | none | folder")
    p.add_argument("--workdir", help="where to generate images (default: a temp folder)")
    return p.parse_args(argv)


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def head_p_dog(train_x: np.ndarray, labels: np.ndarray, test_xs: list[np.ndarray], seed: int = 2018) -> list:
    """The report's head trained on `train_x`, its P(dog) on each of `test_xs`."""
    config = helper.HeadConfig()
    model = helper.build_head({"f": train_x.shape[1]}, config.dropout, config.make_optimizer(), seed)
    helper.fit_arrays(model, train_x, labels, batch_size=16, epochs=config.epochs, verbose=0)
    return [np.asarray(model.predict(x, verbose=0)).ravel() for x in test_xs]


def main(args):
    import h5py
    import keras
    import pandas as pd
    import tensorflow as tf
    precisions = list(dict.fromkeys(["float32", *args.precisions]))
    root = Path(args.workdir or tempfile.mkdtemp(prefix="precision_bench_"))
    data = make_images(root, args.images)
    split = helper.read_split(data)
    parts = [len(split), len(helper.test_images(data)[0])]
    flags = sorted(set(helper.cpu_flags()) & {"avx512_bf16", "amx_bf16", "amx_tile", "avx512f"})
    print(f"{sum(parts)} images ({parts[0]} labelled), {os.cpu_count()} CPUs, CPU flags {flags}, "
          f"GPUs {helper.gpu_capabilities()}, load average before: {os.getloadavg()}, tensorflow {tf.__version__}, "
          f"--precision auto would pick {helper.resolve_precision('auto')}", flush=True)
    rows = []
    for name in args.models:
        bb = helper.get_backbone(name)
        best = {p: {"c_cnn": 0.0, "e2e": 0.0} for p in precisions}
        feats = {}
        for r in range(args.rounds):
            for precision in precisions:
                with helper.precision_policy(precision):
                    helper.set_seed(2018)  # the same random network in every precision
                    step = helper.make_extract_step(bb.build(args.weights, bb.size), bb.preprocess)
                    step(tf.zeros((args.batch_size, bb.size, bb.size, 3)))  # traced outside the timings
                    c = cnn_alone(step, bb.size, args.batch_size, parts, repeat=1)
                    out = root / f"{name}_{precision}.h5"
                    settings = helper.ExtractSettings(bb.name, bb.size, weights=args.weights, precision=precision)
                    secs, n = timed(helper.extract_to_file, step, (bb.width,), data, out, settings,
                                    args.batch_size)
                best[precision]["c_cnn"] = max(best[precision]["c_cnn"], c)
                best[precision]["e2e"] = max(best[precision]["e2e"], n / secs)
                print(f"  {name} round {r + 1} {precision}: CNN {c:.1f}, 02's path {n / secs:.1f} images/s, "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
                with h5py.File(out) as f:
                    feats[precision] = (f["labelled"][:], f["test"][:])
                keras.backend.clear_session()
        ref_train, ref_test = feats["float32"]
        labels = split.label.to_numpy(np.float32)
        p_ref, *p_others = head_p_dog(ref_train, labels, [ref_test] + [feats[p][1] for p in precisions])
        for precision, p in zip(precisions, p_others, strict=True):
            train, _ = feats[precision]
            own, own_on_f32 = head_p_dog(train, labels, [feats[precision][1], ref_test])
            rows.append({"backbone": name, "size": bb.size, "precision": precision, **best[precision],
                         "c/float32": best[precision]["c_cnn"] / best["float32"]["c_cnn"],
                         "e2e/float32": best[precision]["e2e"] / best["float32"]["e2e"],
                         "feat_rel_l2": float(np.linalg.norm(train - ref_train) / np.linalg.norm(ref_train)),
                         "p_rel_l2": float(np.linalg.norm(p - p_ref) / np.linalg.norm(p_ref)),
                         "p_max": float(np.abs(p - p_ref).max()),
                         "own_p_max": float(np.abs(own - own_on_f32).max())})
    table = pd.DataFrame(rows)
    print(f"\nimages/s, the best of {args.rounds} alternating rounds; batch {args.batch_size}, --weights "
          f"{args.weights}; load average after: {os.getloadavg()}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return table


if __name__ == "__main__":
    main(parse_args())
