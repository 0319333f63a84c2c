"""Step 4: split-block fine-tuning: ResNet50's last block plus a new head, trained on cached feature maps.

The report could only make fine-tuning work by cutting ResNet50 before its last block (conv5_block2_out):
step 1 runs every image once through the network up to the cut and caches the 7x7x2048 maps in
data/features/ResNet50_conv5_block2_out_maps.h5 (float16); step 2 trains the last block + GlobalAveragePool
+ Dropout + Dense on the maps with SGD(lr 0.001, momentum 0.9) and early stopping. The block's BatchNorm
layers keep their ImageNet statistics: Keras 2.1 updated them, which is why the report's fine-tuning failed.
--init picks the report's variants (random head, model A = 03's head weights, model B = 5 head-only epochs
first); --mode full fine-tunes end to end from augmented images instead (for a GPU box).
Writes model/finetune/<name>.keras, results.csv against 03's baseline, val_loss.png and TensorBoard runs
under model/logs/finetune/<name>/.
"""

import shutil
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
    p.add_argument("--warmup-epochs", type=int, default=5, help="head-only epochs of --init warmup")
    p.add_argument("--epochs", type=int, default=50, help="most epochs in all (early stopping usually ends sooner)")
    p.add_argument("--patience", type=int, default=4, help="early-stopping patience on val_loss (best weights kept)")
    p.add_argument("--batch-size", type=int, default=128, help="rows per training batch")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adadelta"],
                   help="sgd is the report's working choice; adadelta its first attempt")
    p.add_argument("--lr", type=float, help="learning rate (default 0.001 for sgd, 1.0 for adadelta: Keras 2's)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--dropout", type=float, default=0.5, help="dropout rate before the Dense layer")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                   help="maps cache precision (25k ResNet50 maps: 4.7 GB in float16, 9.3 GB in float32)")
    p.add_argument("--extract-batch-size", type=int, default=64, help="images per batch when caching maps")
    p.add_argument("--interpolation", default="bilinear", choices=helper.INTERPOLATIONS, help="resize method")
    p.add_argument("--decoder", default="pil", choices=helper.DECODERS, help="image decoder (see 02)")
    p.add_argument("--load", default="auto", choices=["auto", "ram", "stream"],
                   help="maps in RAM, streamed from HDF5, or auto: RAM if they fit in half the available memory")
    p.add_argument("--force", action="store_true", help="recompute the maps cache even if it is complete")
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 0.001 if args.optimizer == "sgd" else 1.0
    return args


def cache_maps(extractor, bb, layer, settings, split: pd.DataFrame, args) -> tuple[str, Path]:
    """Step 1: the extractor's output for every train2 and test image, in data/features/<maps name>.h5."""
    name = helper.maps_name(bb.name, layer)
    path = helper.feature_path(args.data_dir, name)
    attrs = {"backbone": bb.name, "split_layer": layer, "dtype": args.dtype}
    reason = "forced" if args.force else helper.stale_reason(path, settings, split, attrs)
    if not reason:
        log.info(f"{path} is complete with these settings: reused (--force recomputes)")
        return name, path
    log.info(f"{name}: {reason}; caching {extractor.output_shape[1:]} maps at {settings.image_size} px")
    step = helper.make_extract_step(extractor, bb.preprocess)
    start = time.perf_counter()
    n = helper.extract_to_file(step, tuple(extractor.output_shape[1:]), args.data_dir, path, settings, attrs,
                               dtype=args.dtype)
    log.info(f"wrote {path}: {n} images in {time.perf_counter() - start:.0f} s, "
             f"{path.stat().st_size / 2**20:,.1f} MiB")
    return name, path


def map_data(path: Path, split: pd.DataFrame, args):
    """Training and validation batches over the cached maps, in RAM or streamed (see --load)."""
    import h5py
    with h5py.File(path, "r") as f:
        need = f["train"].size * f["train"].dtype.itemsize
    avail = helper.available_memory()
    in_ram = args.load == "ram" or (args.load == "auto" and need <= avail / 2)
    log.info(f"train maps: {need / 2**20:,.1f} MiB, {avail / 2**20:,.0f} MiB available: "
             + ("loading them into RAM" if in_ram else f"streaming them from {path}"))
    source = helper.MapRows(path, "train", in_ram)
    valid = (split.subset == "valid").to_numpy()
    labels = split.label.to_numpy(np.float32)
    rows = {"train": np.flatnonzero(~valid), "valid": np.flatnonzero(valid)}
    train = helper.map_batches(source, rows["train"], labels[rows["train"]], args.batch_size, True, args.seed)
    val = helper.map_batches(source, rows["valid"], labels[rows["valid"]], args.batch_size, False, args.seed)
    return source, train, val


def image_data(bb, split: pd.DataFrame, settings, args):
    """--mode full: augmented, reshuffled training images and untouched validation images."""
    paths = np.asarray(helper.train_image_paths(args.data_dir, split))
    valid = (split.subset == "valid").to_numpy()
    labels = split.label.to_numpy(np.float32)
    common = {"size": settings.image_size, "batch_size": args.batch_size, "interpolation": settings.interpolation,
              "decoder": settings.decoder, "preprocess": bb.preprocess}
    train = helper.image_dataset(paths[~valid], labels=labels[~valid], shuffle_seed=args.seed,
                                 augment=helper.augmentation(args.seed), **common)
    val = helper.image_dataset(paths[valid], labels=labels[valid], **common)
    return train, val


def classifier(base, input_shape, input_name: str, dropout: float, name: str):
    """base (the tail, or the whole backbone in --mode full) -> GlobalAveragePool -> Dropout -> Dense(1, sigmoid)."""
    import keras
    inp = keras.Input(input_shape, name=input_name)
    x = base(inp)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dropout(dropout)(x)
    out = keras.layers.Dense(1, activation="sigmoid", name="prediction")(x)
    return keras.Model(inp, out, name=name)


def baseline_head(model_dir: Path, backbone: str):
    """03's trained Dense weights for this backbone (model A starts from them) and its sidecar."""
    path = model_dir / "single" / f"{backbone}.keras"
    if not path.is_file():
        raise CatDogError(f"--init baseline needs 03's head {path}: run 03_train_single.py --models {backbone} first")
    head, meta = helper.load_model(path)
    return head.get_layer("prediction").get_weights(), meta


def fit(model, base, block, train, val, args, log_dir: Path, init: str, source=None) -> tuple[pd.DataFrame, float]:
    """The report's schedule: (warmup: head alone first), then block + head with early stopping.

    Returns the history and the share of the training time spent reading maps (NaN without maps)."""
    import keras
    shutil.rmtree(log_dir, ignore_errors=True)
    tensorboard = keras.callbacks.TensorBoard(str(log_dir))
    warmup = min(args.warmup_epochs, args.epochs - 1) if init == "warmup" else 0
    if init == "warmup" and warmup < args.warmup_epochs:
        log.info(f"warmup shortened to {warmup} epoch(s) to fit --epochs {args.epochs}")
    histories, start = [], time.perf_counter()
    read0 = source.read_seconds if source else 0.0
    for phase, (first, last) in enumerate([(0, warmup), (warmup, args.epochs)]):
        if last <= first:
            continue
        train_block = phase == 1
        helper.set_block_trainable(model, base, block, train_block)  # BatchNorm frozen last, every time
        # A fresh optimizer per phase, as the report's two compile() calls had.
        model.compile(helper.make_optimizer(args.optimizer, args.lr, args.momentum), "binary_crossentropy",
                      metrics=["accuracy"])
        callbacks = [tensorboard]
        if train_block:
            callbacks.append(keras.callbacks.EarlyStopping("val_loss", patience=args.patience,
                                                           restore_best_weights=True, verbose=1))
        log.info(f"{model.name}: epochs {first + 1}-{last}, " + ("block + head" if train_block else "head only")
                 + f", {sum(int(np.prod(w.shape)) for w in model.trainable_weights):,} trainable weights")
        # The data shuffles itself (a seeded order per epoch), so fit must not.
        h = model.fit(train, validation_data=val, initial_epoch=first, epochs=last, shuffle=False, verbose=2,
                      callbacks=callbacks)
        histories.append(pd.DataFrame(h.history))
    hist = pd.concat(histories, ignore_index=True)
    hist.insert(0, "epoch", np.arange(1, len(hist) + 1))
    hist.insert(1, "phase", ["head"] * warmup + ["block"] * (len(hist) - warmup))
    if source is None:
        return hist, float("nan")
    secs, read = time.perf_counter() - start, source.read_seconds - read0
    where = "RAM" if source.in_ram else "HDF5"
    log.info(f"reading maps from {where}: {read:.1f} s of {secs:.1f} s training ({100 * read / secs:.1f}%)")
    return hist, read / secs


def main(args):
    import keras

    bb = helper.get_backbone(args.model)
    split = helper.read_split(args.data_dir)
    if not (split.subset == "valid").any():
        raise CatDogError("split.csv has no valid rows: rerun 01 with a --valid-frac above 0")
    settings = helper.ExtractSettings(args.image_size or bb.size, args.extract_batch_size, args.interpolation,
                                      False, args.weights, args.seed, args.decoder)
    inits = list(INITS) if args.init == "all" else [args.init]
    head_weights, head_meta = baseline_head(Path(args.model_dir), bb.name) if "baseline" in inits else (None, None)
    keras.utils.set_random_seed(args.seed)  # --weights none: the same random network as 02 built
    full = bb.build(args.weights, settings.image_size, pooling=None)
    layer = args.split_layer or bb.split_layer_name(full)
    extractor, tail = helper.split_model(full, layer)
    meta = {"backbone": bb.name, "split_layer": layer, "image_size": settings.image_size,
            "interpolation": settings.interpolation, "decoder": settings.decoder, "weights": args.weights,
            "optimizer": args.optimizer, "lr": args.lr, "momentum": args.momentum, "dropout": args.dropout,
            "patience": args.patience}
    source = None
    if args.mode == "split":
        maps, path = cache_maps(extractor, bb, layer, settings, split, args)
        source, train, val = map_data(path, split, args)
        base, input_shape, input_name, features = tail, tail.input_shape[1:], "maps", [maps]
        meta.update(kind="finetune", feature_attrs=[helper.feature_file_state(path)])
    else:
        train, val = image_data(bb, split, settings, args)
        base, input_shape, input_name, features = full, (settings.image_size,) * 2 + (3,), "image", []
        meta.update(kind="finetune_full")
    if head_meta and head_meta.get("feature_attrs"):
        a = head_meta["feature_attrs"][0]
        if (a.get("image_size"), a.get("weights")) != (settings.image_size, args.weights):
            log.warning(f"03's {bb.name} head was trained on features at {a.get('image_size')} px with weights "
                        f"{a.get('weights')}, not {settings.image_size} px / {args.weights}: model A starts off")
    initial = base.get_weights()  # every variant starts from the same pretrained block
    out_dir, rows = Path(args.model_dir) / "finetune", []
    for init in inits:
        name = f"{bb.name}_{'full_' if args.mode == 'full' else ''}{init}"
        name += "" if args.optimizer == "sgd" else f"_{args.optimizer}"
        base.set_weights(initial)
        keras.utils.set_random_seed(args.seed)
        model = classifier(base, input_shape, input_name, args.dropout, name)
        if init == "baseline":
            model.get_layer("prediction").set_weights(head_weights)
        log_dir = Path(args.model_dir) / "logs" / "finetune" / name
        hist, read_share = fit(model, base, tail.layers, train, val, args, log_dir, init, source)
        helper.write_csv(hist, out_dir / f"{name}.history.csv")
        helper.save_model(model, out_dir / f"{name}.keras", {**meta, "features": features, "init": init,
                                                              "seed": args.seed, "epochs": len(hist)})
        row = helper.summarize(name, hist, args.seed)
        # Early stopping restored the best epoch's weights: that is the model saved and the figure to compare.
        rows.append({**row, "init": init, "read_share": read_share})
    baseline = add_baseline(Path(args.model_dir), bb.name, out_dir, rows)
    return helper.write_results(rows, out_dir, f"{bb.name} fine-tuning ({args.mode}): val_loss by epoch",
                                baseline=baseline)


def add_baseline(model_dir: Path, backbone: str, out_dir: Path, rows: list[dict]) -> str | None:
    """Put 03's head for this backbone in the comparison (the report's blue curve), if it was trained."""
    results, hist = model_dir / "single" / "results.csv", model_dir / "single" / f"{backbone}.history.csv"
    if not (results.is_file() and hist.is_file()):
        log.info(f"no 03 result for {backbone}: the comparison has no baseline (run 03_train_single.py)")
        return None
    df = pd.read_csv(results)
    df = df[df.model == backbone]
    if df.empty:
        return None
    name = f"baseline_{backbone}"
    helper.write_csv(pd.read_csv(hist), out_dir / f"{name}.history.csv")
    base_row = {**df.iloc[0].to_dict(), "model": name, "init": "03 head"}
    for row in rows:
        row["best_vs_baseline"] = row["best_val_loss"] - base_row["best_val_loss"]
    rows.append(base_row)
    return name


if __name__ == "__main__":
    helper.run_cli(main, parse_args())
