"""Benchmark of reading cached feature maps (issue: 04_finetune_split.py). Not a test: it prints a table.

Writes N random ResNet50-shaped maps (7x7x2048, float16) with 04's writer, then reads one shuffled epoch
of batches through 04's MapBatches, in RAM and streamed from HDF5, and times one training step of the
ResNet50 tail + head on a batch, so the read share of a step is plain.

    python benchmarks/maps_read_bench.py                 # 2,000 maps, batch 128
    python benchmarks/maps_read_bench.py --maps 25000    # the full Kaggle set: 4.7 GB
"""

import argparse
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import helper  # noqa: E402

finetune = importlib.import_module("04_finetune_split")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--maps", type=int, default=2000, help="maps in the file")
    p.add_argument("--batch-size", type=int, default=128, help="rows per batch")
    p.add_argument("--steps", type=int, default=3, help="training steps timed (the first, tracing, is dropped)")
    p.add_argument("--workdir", help="where to write the file (default: a temp folder)")
    return p.parse_args(argv)


def write_maps(path: Path, n: int, shape=(7, 7, 2048)) -> float:
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    with helper.FeatureWriter(path, [f"cat.{i}.jpg" for i in range(n)], np.arange(n) % 2, [1], shape, "float16",
                              {}) as w:
        for s in range(0, n, 256):
            w.append("labelled", rng.standard_normal((min(256, n - s), *shape), np.float32).astype(np.float16))
        w.append("test", np.zeros((1, *shape), np.float16))
        w.commit()
    return time.perf_counter() - start


def step_seconds(batch: np.ndarray, labels: np.ndarray, steps: int) -> float:
    import keras
    full = helper.BACKBONES["ResNet50"].build("none", 224, pooling=None)
    _, tail = finetune.split_model(full, "conv5_block2_out")
    inp = keras.Input(tail.input_shape[1:])
    x = keras.layers.GlobalAveragePooling2D()(tail(inp))
    model = keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(keras.layers.Dropout(0.5)(x)))
    finetune.set_block_trainable(model, tail, tail.layers, True)
    model.compile(helper.make_optimizer("sgd", 0.001, 0.9), "binary_crossentropy")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(batch, labels)
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:] or times))


def main(args):
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path = Path(tmp) / "maps.h5"
        secs = write_maps(path, args.maps)
        size = path.stat().st_size
        print(f"wrote {args.maps} maps: {size / 2**30:.2f} GiB in {secs:.1f} s ({size / 2**20 / secs:.0f} MB/s)")
        rows = np.arange(args.maps)
        labels = (rows % 2).astype(np.float32)
        table, batch = [], None
        for mode in ("ram", "stream"):
            start = time.perf_counter()
            source = finetune.MapRows(path, in_ram=mode == "ram")
            load = time.perf_counter() - start
            data = finetune.map_batches(source, rows, labels, args.batch_size, True, seed=0)
            start = time.perf_counter()
            for k in range(len(data)):
                batch, y = data[k]
            read = time.perf_counter() - start
            source.close()
            table.append((mode, load, 1000 * read / len(data), args.maps * batch[0].nbytes / read / 2**20))
        full_batch, y = data[0]
        step = step_seconds(full_batch, y, args.steps)
        print(f"\ntraining step (tail + head, batch {len(full_batch)}): {1000 * step:.0f} ms")
        print(f"{'mode':8} {'load s':>7} {'ms/batch':>9} {'MB/s':>7} {'share of step':>14}")
        for mode, load, ms, mbs in table:
            print(f"{mode:8} {load:7.2f} {ms:9.1f} {mbs:7.0f} {ms / (ms + 1000 * step):13.1%}")


if __name__ == "__main__":
    main(parse_args())
