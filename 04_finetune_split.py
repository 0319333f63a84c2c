"""Step 4: split-block fine-tuning: ResNet50's last block plus a new head, trained on cached feature maps.

The report could only make fine-tuning work by cutting ResNet50 before its last block (conv5_block2_out):
step 1 runs every image once through the network up to the cut and caches the 7x7x2048 maps in
data/features/ResNet50_conv5_block2_out_maps.h5 (float16); step 2 trains the last block + GlobalAveragePool
+ Dropout + Dense on the maps with SGD(lr 0.001, momentum 0.9) and early stopping. The block's BatchNorm
layers keep their ImageNet statistics: Keras 2.1 updated them, which is why the report's fine-tuning failed.
--init picks the report's variants (random head, model A = 03's head weights, model B = 5 head-only epochs
first); --mode full fine-tunes end to end from augmented images instead (for a GPU box).
Writes model/finetune/<name>.keras (the best epoch's weights), results.csv against 03's baseline (val_loss of
the saved model, the epoch and phase it comes from), val_loss.png and TensorBoard runs under
model/logs/finetune/<name>/.
"""

import contextlib
import functools
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

import helper
from helper import CatDogError, log

INITS = ("random", "baseline", "warmup")


def parse_args(argv=None):
    p = helper.base_parser(__doc__.splitlines()[0], cnn=True)
    splittable = [n for n, b in helper.BACKBONES.items() if b.split_layer]
    p.add_argument("--model", default="ResNet50", choices=splittable, help="backbone to fine-tune")
    p.add_argument("--split-layer", help="layer to cut after (default: the registry's; ResNet50: conv5_block2_out, "
                                         "the report's cut before the last block)")
    p.add_argument("--mode", default="split", choices=["split", "full"],
                   help="split: train the block on cached maps (the report's); full: end to end from augmented "
                        "images, the rest of the network frozen (slow without a GPU)")
    p.add_argument("--init", default="warmup", choices=[*INITS, "all"],
                   help="random: new head; baseline: start the Dense from 03's head (model A); warmup: train the "
                        "head alone first, then the block too (model B); all: the three, compared")
    p.add_argument("--warmup-epochs", type=helper.NONNEGATIVE_INT, default=5, help="head-only epochs of --init warmup")
    helper.head_args(p, epochs=50, optimizer="sgd", sgd_lr=0.001)  # sgd is the report's working choice here
    p.add_argument("--patience", type=helper.POSITIVE_INT, default=4,
                   help="early-stopping patience on val_loss (the best epoch's weights are kept)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                   help="maps cache precision (25k ResNet50 maps: 4.7 GB in float16, 9.3 GB in float32)")
    p.add_argument("--extract-batch-size", type=helper.POSITIVE_INT, default=64,
                   help="images per batch when caching maps")
    p.add_argument("--interpolation", default="bilinear", choices=helper.INTERPOLATIONS, help="resize method")
    p.add_argument("--decoder", default="pil", choices=helper.DECODERS, help="image decoder (see 02)")
    helper.precision_args(p, "the backbone, for the maps cache and the training (bfloat16 needs no loss scaling; "
                             "float16 gets Keras's)")
    p.add_argument("--load", default="auto", choices=["auto", "ram", "stream"],
                   help="maps in RAM, streamed from HDF5, or auto: RAM if they fit in half the available memory")
    p.add_argument("--force", action="store_true", help="recompute the maps cache even if it is complete")
    return helper.parse_head_args(p, argv)


# ----------------------------------------------------------------------------- the split model

def split_model(model, layer_name: str):
    """(extractor, tail): images -> `layer_name`'s output, and that output -> the model's output.

    Both are views over the same layer objects, so the tail trains the full model's own weights.
    A cut inside a block (a later layer also reading a tensor from before the cut) is refused.
    """
    import keras
    try:
        cut = model.get_layer(layer_name)
    except ValueError as e:
        raise CatDogError(f"{model.name} has no layer {layer_name!r}") from e
    # Walk the graph from the cut (Keras has no public API for a layer's consumers).
    members = set(map(id, model.layers))
    after, stack = {}, [cut]  # layers downstream of the cut, by id
    while stack:
        for node in stack.pop()._outbound_nodes:
            op = node.operation
            if id(op) in members and id(op) not in after:
                after[id(op)] = op
                stack.append(op)
    # The pooling (and ConvNeXt's LayerNorm of the pooled vector, named after it) is no block to fine-tune.
    if not any(layer.weights for layer in after.values() if not layer.name.startswith(helper.POOL_LAYER)):
        raise CatDogError(f"cannot cut {model.name} at {layer_name}: nothing comes after it to fine-tune; "
                          f"choose a block output before the last block (ResNet50: conv5_block2_out)")
    for layer in after.values():
        for t in layer._inbound_nodes[0].input_tensors:
            src = t._keras_history.operation
            if src is not cut and id(src) not in after:
                raise CatDogError(f"cannot cut {model.name} at {layer_name}: {layer.name} after the cut also reads "
                                  f"{src.name} from before it (the cut is inside a block); cut at a block output")
    extractor = keras.Model(model.input, cut.output, name=f"{model.name}_to_{layer_name}")
    tail = keras.Model(cut.output, model.output, name=f"{model.name}_from_{layer_name}")
    return extractor, tail


def split_layer_name(bb: helper.Backbone, model) -> str:
    """The registry's split layer for `bb`, by its name in this model instance (Keras numbers Add layers per
    session, so Xception's "Add:last" is found by type)."""
    if bb.split_layer == "Add:last":
        import keras
        return [layer.name for layer in model.layers if isinstance(layer, keras.layers.Add)][-1]
    return bb.split_layer


def maps_name(backbone: str, layer: str) -> str:
    """The feature-cache name of a backbone's maps at its split layer: data/features/<name>.h5."""
    return f"{backbone}_{layer}_maps"


# The end-to-end training pieces live in catdog/finetune.py (09 trains its student with them); their names here
# are those this step has always had.
all_layers, freeze_batchnorm, augmentation = helper.all_layers, helper.freeze_batchnorm, helper.augmentation
set_block_trainable, classifier = helper.set_block_trainable, helper.classifier


# ----------------------------------------------------------------------------- the maps cache

def cache_maps(extractor, settings: helper.ExtractSettings, split: pd.DataFrame, args) -> tuple[str, Path]:
    """Step 1: the extractor's output for every train2 and test image, in data/features/<maps name>.h5."""
    name = maps_name(settings.backbone, settings.split_layer)
    path = helper.feature_path(args.data_dir, name)
    reason = "forced" if args.force else helper.stale_reason(path, settings, split,
                                                             helper.laid_out_test_ids(args.data_dir))
    if not reason:
        log.info(f"{path} is complete with these settings: reused (--force recomputes)")
        return name, path
    log.info(f"{name}: {reason}; caching {extractor.output_shape[1:]} maps at {settings.image_size} px")
    bb = helper.get_backbone(settings.backbone)
    step = helper.make_extract_step(extractor, bb.preprocess)
    start = time.perf_counter()
    n = helper.extract_to_file(step, tuple(extractor.output_shape[1:]), args.data_dir, path, settings,
                               args.extract_batch_size)
    log.info(f"wrote {path}: {n} images in {time.perf_counter() - start:.0f} s, "
             f"{path.stat().st_size / 2**20:,.1f} MiB")
    return name, path


def available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux MemAvailable, else free pages)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            line = next(row for row in f if row.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class MapRows:
    """Rows of one part of a maps file, read from RAM or, when `in_ram` is False, from HDF5 on demand.

    The HDF5 file is opened lazily (at the first read) so the object can be built cheaply and pickled;
    close() (or a `with` block) closes it.
    """

    def __init__(self, path: Path, part: str = "labelled", in_ram: bool = False):
        import h5py
        self.path, self.part, self.in_ram = Path(path), part, in_ram
        with h5py.File(self.path, "r") as f:
            ds = helper.dataset(f, part)
            self.shape, self.dtype = ds.shape, ds.dtype
            self.array = ds[:] if in_ram else None
        self._file = self._ds = None
        self.read_seconds = 0.0

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The maps of `rows` (ascending indices), in that order."""
        start = time.perf_counter()
        if self.in_ram:
            out = self.array[rows]
        else:
            if self._ds is None:
                import h5py
                self._file = h5py.File(self.path, "r")
                self._ds = helper.dataset(self._file, self.part)
            # Single-row reads over sorted rows: h5py's fancy indexing on the same rows is ~10-30x slower.
            out = np.empty((len(rows), *self.shape[1:]), self.dtype)
            for j, i in enumerate(rows):
                self._ds.read_direct(out, np.s_[int(i)], np.s_[j])
        self.read_seconds += time.perf_counter() - start
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = self._ds = None

    def __enter__(self) -> "MapRows":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_ds": None}


@functools.cache
def _map_batches_class():
    import keras

    class MapBatches(keras.utils.PyDataset):
        """Batches of (maps, labels) over `rows` of a MapRows; a new seeded permutation each epoch when shuffled.

        The permutation depends only on (seed, epoch), with the epoch set by EpochOrder, so every --init
        variant sees the same batches in the same epochs. Each batch's rows are sorted (order inside a batch does not
        change a gradient step), so the in-RAM and streaming sources give identical batches and HDF5 reads go
        forward.
        """

        def __init__(self, source: MapRows, rows: np.ndarray, labels: np.ndarray, batch_size: int,
                     shuffle: bool, seed: int):
            super().__init__()
            self.source, self.rows, self.labels = source, np.asarray(rows), np.asarray(labels, np.float32)
            self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
            self.epoch = 0
            self.order = self._order()

        def _order(self) -> np.ndarray:
            if not self.shuffle:
                return np.arange(len(self.rows))
            return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.rows))

        def __len__(self) -> int:
            return math.ceil(len(self.rows) / self.batch_size)

        def __getitem__(self, k: int):
            pick = np.sort(self.order[k * self.batch_size:(k + 1) * self.batch_size])
            # float16 maps go to the model as they are: its input layer casts them, faster than numpy would.
            return self.source.read(self.rows[pick]), self.labels[pick]

        def set_epoch(self, epoch: int) -> None:
            """Use training epoch `epoch`'s order (EpochOrder calls it as each epoch begins). Counting
            on_epoch_end calls would not do: Keras also makes them when it peeks at batches for their shape."""
            self.epoch = epoch
            self.order = self._order()

    class EpochOrder(keras.callbacks.Callback):
        """Tells the training batches which epoch (as Keras numbers them, across fit calls) is starting."""

        def __init__(self, batches: MapBatches):
            super().__init__()
            self.batches = batches

        def on_epoch_begin(self, epoch, logs=None):
            self.batches.set_epoch(epoch)

    return MapBatches, EpochOrder


def map_batches(source: MapRows, rows: np.ndarray, labels: np.ndarray, batch_size: int, shuffle: bool, seed: int):
    """A keras.utils.PyDataset of (maps, labels) batches; see MapBatches."""
    return _map_batches_class()[0](source, rows, labels, batch_size, shuffle, seed)


def epoch_order(batches):
    """The callback that keeps `batches`' order on the training epoch: MapBatches' order depends only on
    (seed, epoch), so every --init variant sees the same batches in the same epochs."""
    return _map_batches_class()[1](batches)


def open_maps(path: Path, args) -> MapRows:
    """The cached training maps, in RAM or streamed (see --load)."""
    import h5py
    with h5py.File(path, "r") as f:
        maps = helper.dataset(f, "labelled")
        need = maps.size * maps.dtype.itemsize
    avail = available_memory()
    in_ram = args.load == "ram" or (args.load == "auto" and need <= avail / 2)
    log.info(f"train maps: {need / 2**20:,.1f} MiB, {avail / 2**20:,.0f} MiB available: "
             + ("loading them into RAM" if in_ram else f"streaming them from {path}"))
    return MapRows(path, "labelled", in_ram)


def map_data(source: MapRows, split: pd.DataFrame, args):
    """Fresh training (seeded shuffle) and validation batches over the cached maps."""
    valid = (split.subset == "valid").to_numpy()
    labels = split.label.to_numpy(np.float32)
    rows = {"train": np.flatnonzero(~valid), "valid": np.flatnonzero(valid)}
    train = map_batches(source, rows["train"], labels[rows["train"]], args.batch_size, True, args.seed)
    val = map_batches(source, rows["valid"], labels[rows["valid"]], args.batch_size, False, args.seed)
    return train, val


# ----------------------------------------------------------------------------- --mode full

def image_data(split: pd.DataFrame, settings: helper.ExtractSettings, args):
    """Fresh augmented, reshuffled training images and untouched validation images (seed first for the
    same order and augmentations in every variant)."""
    paths = np.asarray(helper.train_image_paths(args.data_dir, split))
    valid = (split.subset == "valid").to_numpy()
    labels = split.label.to_numpy(np.float32)
    return helper.image_data(paths[~valid], labels[~valid], paths[valid], labels[valid], settings, args.batch_size,
                             args.seed)


# ----------------------------------------------------------------------------- training

# The settings that decide what a backbone computes from an image: 03's head must have been trained on
# features made with the same ones for --init baseline to start from it. Not the precision: a head is only a start
# there (or a comparison), and bfloat16 moves features by under 1% (benchmarks/precision_bench.md).
NETWORK_SETTINGS = ("backbone", "image_size", "interpolation", "decoder", "jpeg_draft", "weights", "seed", "pooling")


def baseline_head(model_dir: Path, settings: helper.ExtractSettings):
    """03's trained Dense weights for this backbone (model A starts from them), refused if the head was trained
    on features made another way than these maps."""
    path = model_dir / helper.SINGLE_DIR / f"{settings.backbone}.keras"
    if not path.is_file():
        raise CatDogError(f"--init baseline needs 03's head {path}: run 03_train_single.py --models "
                          f"{settings.backbone} first")
    head, meta = helper.load_model(path)
    helper.check_same_settings(meta["feature_attrs"][0], settings.attrs(), f"--init baseline: {path}",
                               "this run", "run 04 with the head's settings, or retrain 03 with these",
                               NETWORK_SETTINGS)
    return head.get_layer(helper.PREDICTION_LAYER).get_weights()


def main(args):
    args.precision = helper.resolve_precision(args.precision)  # resolved, so the sidecar's args hold what was used
    # Every layer built in the policy: the backbone (maps and the fine-tuned block) and the head.
    with helper.precision_policy(args.precision):
        return finetune(args)


def finetune(args):
    bb = helper.get_backbone(args.model)
    split = helper.read_split(args.data_dir)
    model_dir = Path(args.model_dir)
    args.image_size = args.image_size or bb.size  # resolved, so the sidecar's args hold what was used
    helper.set_seed(args.seed)  # --weights none: the same random network as 02 built
    full = bb.build(args.weights, args.image_size)  # to the pooled features: 03's head fits the tail's output
    args.split_layer = args.split_layer or split_layer_name(bb, full)
    extractor, tail = split_model(full, args.split_layer)
    settings = helper.ExtractSettings(backbone=bb.name, image_size=args.image_size, interpolation=args.interpolation,
                                      decoder=args.decoder, weights=args.weights, seed=args.seed,
                                      split_layer=args.split_layer, dtype=args.dtype, precision=args.precision)
    inits = list(INITS) if args.init == "all" else [args.init]
    head_weights = baseline_head(model_dir, settings) if "baseline" in inits else None
    with contextlib.ExitStack() as stack:
        if args.mode == "split":
            maps, path = cache_maps(extractor, settings, split, args)
            source = stack.enter_context(open_maps(path, args))
            base, input_shape, input_name = tail, tail.input_shape[1:], "maps"
            meta = {"features": [maps], "feature_attrs": [helper.feature_file_state(path)]}
        else:
            source = None
            base, input_shape, input_name = full, (settings.image_size,) * 2 + (3,), "image"
            meta = {"kind": helper.FINETUNE_FULL, "features": [], "feature_attrs": [settings.attrs()]}
        meta["backbone"] = bb.name
        config = helper.HeadConfig.of(vars(args))
        # The split's sha256 in every sidecar: 07 --blend refuses models of other splits.
        out = helper.Output(model_dir, helper.FINETUNE_DIR, vars(args), helper.split_fingerprint(args.data_dir))
        meta = out.sidecar(config, **meta)
        baseline = baseline_row(model_dir, settings, out.folder)
        initial = base.get_weights()  # every variant starts from the same pretrained block
        for init in inits:
            name = f"{bb.name}_{'full_' if args.mode == 'full' else ''}{init}"
            name += "" if args.optimizer == "sgd" else f"_{args.optimizer}"
            base.set_weights(initial)
            # A fresh, seeded batch source per variant: each sees the same batches in the same epochs.
            train, val = map_data(source, split, args) if source else image_data(split, settings, args)
            helper.set_seed(args.seed)
            model = classifier(base, input_shape, input_name, args.dropout, name)
            if init == "baseline":
                model.get_layer(helper.PREDICTION_LAYER).set_weights(head_weights)
            read0, start = source.read_seconds if source else 0.0, time.perf_counter()
            # tf.data (--mode full) reshuffles per iteration from its seed by itself; the maps batches need telling.
            order = [epoch_order(train)] if hasattr(train, "set_epoch") else []
            hist, saved_epoch = helper.fit_phases(model, base, tail.layers, train, val, config, out.log_dir(name),
                                                  args.warmup_epochs if init == "warmup" else 0, args.patience,
                                                  callbacks=order)
            read_share = (source.read_seconds - read0) / (time.perf_counter() - start) if source else float("nan")
            if source:
                log.info(f"reading maps from {'RAM' if source.in_ram else 'HDF5'}: {100 * read_share:.1f}% "
                         f"of the training time")
            row = helper.save_run(name, model, hist, val, out.folder, {**meta, "init": init}, saved_epoch)
            row.update(init=init, saved_phase=hist.phase[hist.epoch == saved_epoch].iloc[0], read_share=read_share)
            if baseline:
                row["vs_baseline"] = row["val_loss"] - baseline["val_loss"]  # both: the saved models' val_loss
            # Each row right after its model is saved, so results.csv always describes the models on disk.
            results = helper.write_results([row] + ([baseline] if baseline else []), out.folder,
                                           f"{bb.name} fine-tuning ({args.mode}): val_loss by epoch",
                                           baseline=baseline and baseline["model"], show=init == inits[-1])
    return results


def baseline_row(model_dir: Path, settings: helper.ExtractSettings, out_dir: Path) -> dict | None:
    """03's head for this backbone as a row of the comparison (the report's blue curve), if it was trained on
    features made the way these maps are."""
    single = model_dir / helper.SINGLE_DIR
    results, hist = single / helper.RESULTS_CSV, single / f"{settings.backbone}.history.csv"
    sidecar = single / f"{settings.backbone}.json"
    if not (results.is_file() and hist.is_file() and sidecar.is_file()):
        log.info(f"no 03 result for {settings.backbone}: the comparison has no baseline (run 03_train_single.py)")
        return None
    try:
        trained = helper.read_sidecar(sidecar.with_suffix(".keras"))["feature_attrs"][0]
    except CatDogError as e:  # the comparison is optional: a broken 03 sidecar only drops it
        log.info(f"no baseline: {e}")
        return None
    changed = helper.setting_changes(trained, settings.attrs(), NETWORK_SETTINGS)
    df = pd.read_csv(results)
    df = df[df.model == settings.backbone]
    if changed or df.empty:
        log.info(f"03's {settings.backbone} head is not comparable (features made with other "
                 f"{', '.join(changed)}): no baseline" if changed else f"no 03 row for {settings.backbone}")
        return None
    name = f"baseline_{settings.backbone}"
    helper.write_csv(pd.read_csv(hist), out_dir / f"{name}.history.csv")
    return {**df.iloc[0].to_dict(), "model": name, "init": "03 head"}


if __name__ == "__main__":
    helper.run_cli(main, parse_args())
