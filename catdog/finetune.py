"""Training a CNN end to end from images: the classifier on a backbone, frozen BatchNorm, the augmentation and the
tf.data pipeline of training and validation images, and the phased fit (head alone first, then the block too)
with early stopping on val_loss.

Used by: 04 (--mode full, and the phased fit and BatchNorm handling of --mode split) and 09 (the student).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .backbones import get_backbone
from .common import PREDICTION_LAYER, log, set_seed
from .features import ExtractSettings
from .heads import HeadConfig, fit, tensorboard
from .images import image_dataset


def all_layers(model):
    """Every layer inside `model`, those of nested models too, each before its own layers."""
    for layer in model.layers:
        yield layer
        if isinstance(getattr(layer, "layers", None), list):  # a nested Model or Sequential
            yield from all_layers(layer)


def freeze_batchnorm(model) -> int:
    """Run every BatchNormalization layer (nested ones too) in inference mode with fixed statistics.

    `trainable = False` is what Keras 3 honours during fit(); `training=False` in a functional graph is
    not (keras-team/keras#20285). Call it after any `trainable = True`, which would turn them back on.
    Returns how many layers were frozen.
    """
    import keras
    bns = [layer for layer in all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in bns:
        layer.trainable = False
    return len(bns)


def set_block_trainable(model, base, block, train_block: bool) -> None:
    """Only `block`'s layers of `base` train (when `train_block`), everything outside `base` (the head)
    trains, BatchNorm never does. Recompile the model afterwards."""
    model.trainable = True
    inside = set(map(id, block))
    for layer in all_layers(base):
        layer.trainable = train_block and id(layer) in inside
    freeze_batchnorm(model)


def classifier(base, input_shape, input_name: str, dropout: float, name: str):
    """base (04's tail, or a whole backbone), which ends in the backbone's pooled features as 02 extracts them
    (Keras's pooling, ConvNeXt's LayerNorm included) -> Dropout -> Dense(1, sigmoid)."""
    import keras
    inp = keras.Input(input_shape, name=input_name)
    x = base(inp)
    x = keras.layers.Dropout(dropout)(x)
    # float32 under a mixed policy too (as Keras's mixed-precision guide says): a stable sigmoid and loss.
    out = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name=PREDICTION_LAYER)(x)
    return keras.Model(inp, out, name=name)


def augmentation(seed: int):
    """Random flip, rotation, zoom, shift and shear as Keras preprocessing layers, for training images only.

    Ranges are those of Keras's own cats-vs-dogs example (rotation 40 degrees, 20% zoom/shift/shear).
    """
    import keras
    return keras.Sequential([
        keras.layers.RandomFlip("horizontal", seed=seed),
        keras.layers.RandomRotation(40 / 360, seed=seed + 1),
        keras.layers.RandomZoom(0.2, seed=seed + 2),
        keras.layers.RandomTranslation(0.2, 0.2, seed=seed + 3),
        keras.layers.RandomShear(0.2, 0.2, seed=seed + 4),
    ], name="augment")


def image_data(train_paths: Sequence[str], train_targets: np.ndarray, valid_paths: Sequence[str],
               valid_targets: np.ndarray, settings: ExtractSettings, batch_size: int, seed: int):
    """Fresh augmented, reshuffled training images and untouched validation images, fed as `settings` say (size,
    resize, decoder, the backbone's preprocess_input), with their targets (labels, or rows of several columns).
    Seeded first: the same order and augmentations in every run and variant."""
    set_seed(seed)
    common = {"size": settings.image_size, "batch_size": batch_size, "interpolation": settings.interpolation,
              "decoder": settings.decoder, "preprocess": get_backbone(settings.backbone).preprocess}
    train = image_dataset(train_paths, labels=train_targets, shuffle_seed=seed, augment=augmentation(seed), **common)
    val = image_dataset(valid_paths, labels=valid_targets, **common)
    return train, val


def fit_phases(model, base, block, train, val, config: HeadConfig, log_dir: Path, warmup_epochs: int, patience: int,
               loss="binary_crossentropy", metrics: Sequence = ("accuracy",), callbacks: Sequence = ()
               ) -> tuple[pd.DataFrame, int]:
    """The report's schedule: the head alone for `warmup_epochs` (at most all epochs but one), then block + head
    with early stopping on val_loss (its best epoch's weights restored), each phase with a fresh optimizer.

    Returns the history (with a `phase` column) and the epoch whose weights the model now holds."""
    import keras
    tb = tensorboard(log_dir)
    warmup = min(warmup_epochs, config.epochs - 1)
    if warmup < warmup_epochs:
        log.info(f"warmup shortened to {warmup} epoch(s) to fit --epochs {config.epochs}")
    stop = keras.callbacks.EarlyStopping("val_loss", patience=patience, restore_best_weights=True, verbose=1)
    histories = []
    for phase, first, last in (("head", 0, warmup), ("block", warmup, config.epochs)):
        if last <= first:
            continue
        set_block_trainable(model, base, block, phase == "block")  # BatchNorm frozen last, every time
        # A fresh optimizer per phase, as the report's two compile() calls had.
        model.compile(config.make_optimizer(), loss, metrics=list(metrics))
        log.info(f"{model.name}: epochs {first + 1}-{last}, " + ("block + head" if phase == "block" else "head only")
                 + f", {sum(int(np.prod(w.shape)) for w in model.trainable_weights):,} trainable weights")
        h = fit(model, train, val, last, [tb, *callbacks] + ([stop] if phase == "block" else []), initial_epoch=first)
        h.insert(1, "phase", phase)
        histories.append(h)
    # Early stopping restored its best epoch's weights (Keras passes absolute epoch numbers, 0-based).
    return pd.concat(histories, ignore_index=True), stop.best_epoch + 1
