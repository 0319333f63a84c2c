"""Everything the numbered catdog scripts share.

Sections: paths and CLI, Kaggle data, splitting, demo data, images, backbones,
feature cache, heads, training, fine-tuning, metrics, submission, kopt compatibility, plots.
TensorFlow and Keras are imported inside the functions that need them, so the
data step (01) and `-h` stay fast and importing this module does no work.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import logging
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # for annotations only: importing Keras at import time would slow every script's start
    import keras

# Silence TF's C++ start-up chatter before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

log = logging.getLogger("catdog")

# =============================================================================
# Paths and CLI
# =============================================================================

DEFAULT_SEED = 2018
SPLIT_CSV = "split.csv"
SPLIT_META = "split.json"
TRAIN2 = "train2"
SPLITTED = "splitted"
TEST2 = Path("test2") / "test"
FEATURES = "features"
CLASSES = ("cat", "dog")  # label 0 = cat, 1 = dog, as Kaggle scores it


class CatDogError(Exception):
    """A problem the user can fix; the CLI prints it as one line, without a traceback."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's accepted range and default, except None: those flags' help says what happens
    without them."""

    def _get_help_string(self, action):
        text = action.help or ""
        accepted = getattr(action.type, "accepted", "")
        if accepted and accepted not in text:
            text += f" [{accepted}]"
        if action.default is None or action.default is argparse.SUPPRESS or "%(default)" in text:
            return text
        return text + " (default: %(default)s)"


def number(kind: type = int, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], int | float]:
    """An argparse `type=` that refuses what is not a finite `kind` within the range, so a bad value fails in
    argparse (with the range in the message and in -h) before any work starts."""
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    accepted = f"{'an integer' if kind is int else 'a number'}" + (" " + " and ".join(parts) if parts else "")

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {accepted}") from None
        bad = (not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low))
               or (high is not None and (value >= high if high_open else value > high)))
        if bad:
            raise argparse.ArgumentTypeError(f"{text} is not {accepted}")
        return value

    convert.accepted = accepted
    convert.__name__ = kind.__name__
    return convert


POSITIVE_INT = number(int, 1)
NONNEGATIVE_INT = number(int, 0)
POSITIVE = number(float, 0, low_open=True)
PROBABILITY = number(float, 0, 1)
DROPOUT = number(float, 0, 1, high_open=True)
SEED = number(int, 0, 2**32 - 1)  # what numpy's and TensorFlow's seeding accept


def base_parser(description: str, cnn: bool = False) -> argparse.ArgumentParser:
    """The flags every script shares; `cnn` adds --weights and --image-size."""
    p = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    p.add_argument("--data-dir", default="data", help="folder with the Kaggle data and derived files")
    p.add_argument("--model-dir", default="model", help="folder for trained models, logs and results")
    p.add_argument("--seed", type=SEED, default=DEFAULT_SEED, help="the one seed behind every random choice")
    p.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    if cnn:
        p.add_argument("--weights", default="imagenet",
                       help="'imagenet' (downloaded to ~/.keras/models), 'none' (random init, for tests "
                            "and the demo), or a folder holding Keras *_notop.h5 files")
        p.add_argument("--image-size", type=number(int, 32), default=None,
                       help="square input size for every backbone (default: each backbone's native size)")
    return p


def run_cli(main: Callable[[argparse.Namespace], object], args: argparse.Namespace) -> None:
    """Run a script's main(): user errors become one line and exit code 2."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s", stream=sys.stdout)
    try:
        main(args)
    except CatDogError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished outputs are kept; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


def temp_name(path: str | Path, suffix: str = "") -> Path:
    """A hidden temp name beside `path`, unique to this process and call: two runs on one data dir never
    write the same half file (the last to finish wins, atomically)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{next(_TEMP_COUNTER)}.partial{suffix}")


_TEMP_COUNTER = itertools.count()


def check_writable_target(path: str | Path) -> Path:
    """Refuse a target that an atomic write's rename would destroy: a directory, device, FIFO or socket
    (a symlink counts as what it points to). A missing path or a regular file is fine."""
    path = Path(path)
    if path.is_dir():
        raise CatDogError(f"{path} is a directory: give a file name")
    if path.exists() and not path.is_file():
        raise CatDogError(f"{path} exists and is not a regular file (a device, FIFO or socket): give a file name")
    if path.parent.exists() and not path.parent.is_dir():
        raise CatDogError(f"{path.parent} is a file, not a folder: give another path")
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside `path`, renamed onto it only if the block succeeds.

    `suffix` keeps an extension some writers insist on (Keras wants `.keras`). A symlink to a regular
    file is followed, so the link stays and its target is replaced.
    """
    path = check_writable_target(path)
    if path.is_symlink():
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_csv(df: pd.DataFrame, path: str | Path) -> None:
    """Write a CSV atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def write_json(obj: dict, path: str | Path) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def versions() -> dict:
    """Library versions stored with every output."""
    import keras
    import tensorflow as tf
    return {"tensorflow": tf.__version__, "keras": keras.__version__}


# =============================================================================
# Kaggle data
# =============================================================================

_TRAIN_NAME = re.compile(r"^(cat|dog)\.(\d+)\.jpg$")
_TEST_NAME = re.compile(r"^(\d+)\.jpg$")


def parse_train_name(name: str) -> tuple[int, int] | None:
    """`cat.123.jpg` -> (0, 123), `dog.45.jpg` -> (1, 45); None if not a Kaggle training name."""
    m = _TRAIN_NAME.match(name)
    return (CLASSES.index(m.group(1)), int(m.group(2))) if m else None


def parse_test_name(name: str) -> int | None:
    """`123.jpg` -> 123; None if not a Kaggle test name."""
    m = _TEST_NAME.match(name)
    return int(m.group(1)) if m else None


DECODABLE = ("JPEG", "PNG", "GIF")  # what tf.io.decode_jpeg reads


def check_image(path: str | Path) -> dict:
    """Header size, format and mode of an image, and `problem` (empty when usable).

    The size comes from the header; the full decode is what catches truncated files.
    Grayscale, CMYK and PNG content are usable: the pipeline converts them to RGB.
    """
    from PIL import Image, UnidentifiedImageError

    info = {"width": 0, "height": 0, "format": "", "mode": "", "problem": "", "note": ""}
    path = Path(path)
    if path.stat().st_size == 0:
        info["problem"] = "empty file (0 bytes)"
        return info
    try:
        with Image.open(path) as im:
            info.update(width=im.width, height=im.height, format=im.format or "", mode=im.mode)
            im.load()
    except UnidentifiedImageError:
        info["problem"] = "not an image (no known image format)"
    except (OSError, SyntaxError, ValueError) as e:
        info["problem"] = f"corrupt or truncated image ({e})"
    if not info["problem"] and info["format"] not in DECODABLE:
        info["problem"] = f"{info['format']} content: the pipeline decodes only JPEG, PNG and GIF"
    if not info["problem"]:
        notes = []
        if info["format"] != "JPEG":
            notes.append(f"{info['format']} content in a .jpg file")
        if info["mode"] != "RGB":
            notes.append(f"mode {info['mode']}")
        info["note"] = ", ".join(notes) + (", decoded as RGB" if notes else "")
    return info


def read_name_list(path: str | Path) -> list[str]:
    """File names, one per line; `#` starts a comment."""
    path = Path(path)
    if not path.is_file():
        raise CatDogError(f"{path}: no such file (give a text file with one image name per line)")
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise CatDogError(f"{path}: not a text file (byte {e.start} is not UTF-8); give a text file with one "
                          "image name per line") from None
    names = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


# =============================================================================
# Splitting
# =============================================================================

def stratified_split(labels: Sequence[int], valid_frac: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows: the same fraction of each class, fixed by `seed`.

    Depends only on the row order and the labels, so it is stable across runs and machines.
    """
    if not 0 < valid_frac < 1:
        raise CatDogError(f"--valid-frac must be between 0 and 1, got {valid_frac}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    valid = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        n_valid = int(round(len(rows) * valid_frac))
        valid[rng.permutation(rows)[:n_valid]] = True
    return valid


def read_split(data_dir: str | Path) -> pd.DataFrame:
    """split.csv (filename, label, subset): the one split every step trains and validates on."""
    path = Path(data_dir) / SPLIT_CSV
    if not path.is_file():
        raise CatDogError(f"{path} not found: run 01_reorganize_data.py first")
    df = pd.read_csv(path, dtype={"filename": str, "label": int, "subset": str})
    if list(df.columns) != ["filename", "label", "subset"] or df.empty:
        raise CatDogError(f"{path} is not a split file made by 01_reorganize_data.py: rerun it")
    return df


def train_image_paths(data_dir: str | Path, split: pd.DataFrame) -> list[str]:
    """Paths of the labelled images under train2/, in split.csv order."""
    root = Path(data_dir) / TRAIN2
    return [str(root / CLASSES[lab] / name) for name, lab in zip(split.filename, split.label, strict=True)]


def test_images(data_dir: str | Path) -> tuple[np.ndarray, list[str]]:
    """Test ids ascending numerically (`10.jpg` after `9.jpg`) and their paths under test2/test.

    The paths are the files' own names: `01.jpg` is id 1 too, so a name is never rebuilt from its id.
    """
    root = Path(data_dir) / TEST2
    if not root.is_dir():
        raise CatDogError(f"{root} not found: run 01_reorganize_data.py first")
    found = sorted((i, p.name) for p in root.iterdir() if (i := parse_test_name(p.name)) is not None)
    for (i, a), (j, b) in itertools.pairwise(found):
        if i == j:
            raise CatDogError(f"{root / a} and {root / b} are both test id {i}: rerun 01_reorganize_data.py")
    return np.asarray([i for i, _ in found], dtype=np.int64), [str(root / name) for _, name in found]


# =============================================================================
# Images
# =============================================================================

INTERPOLATIONS = ("bilinear", "nearest", "bicubic", "area")
DECODERS = ("pil", "tf")


def _pil_resized(path: str, size: int, interpolation: str, jpeg_draft: bool) -> np.ndarray:
    """Pillow's decode and antialiased resize of one image, as float32 RGB (size, size, 3).

    Pillow releases the GIL while it decodes and resamples, so tf.data runs this in parallel threads;
    its antialiased bilinear is 2-3x faster than TF's (tf.image.resize with antialias=True).
    """
    from PIL import Image
    filters = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "bicubic": Image.BICUBIC, "area": Image.BOX}
    with Image.open(path) as im:
        if jpeg_draft:
            im.draft("RGB", (size, size))  # libjpeg DCT scaling to the smallest scale still >= size
        return np.asarray(im.convert("RGB").resize((size, size), filters[interpolation]), dtype=np.float32)


def _decode_resized(data, size: int, interpolation: str, jpeg_draft: bool):
    """Decode JPEG/PNG bytes to RGB and stretch to size x size (no crop, as the report does).

    With `jpeg_draft`, a JPEG at least twice the target size is decoded at 1/2, 1/4 or 1/8
    scale by libjpeg's DCT scaling, which skips most of the decode work.
    """
    import tensorflow as tf

    def full():
        # decode_jpeg's kernel also decodes PNG and GIF, and skips decode_image's Python-side format switch.
        return tf.io.decode_jpeg(data, channels=3)

    def draft():
        shape = tf.image.extract_jpeg_shape(data)
        small = tf.minimum(shape[0], shape[1])
        # The largest of 8, 4, 2, 1 that still leaves the short side >= size.
        index = tf.reduce_sum(tf.cast(tf.stack([small >= 2 * size, small >= 4 * size, small >= 8 * size]),
                                      tf.int32))
        branches = [lambda r=r: tf.io.decode_jpeg(data, channels=3, ratio=r) for r in (1, 2, 4, 8)]
        return tf.switch_case(index, branches)

    img = tf.cond(tf.io.is_jpeg(data), draft, full) if jpeg_draft else full()
    img = tf.image.resize(img, (size, size), method=interpolation, antialias=interpolation != "nearest")
    # 'nearest' keeps uint8, which the Inception family's preprocess (x /= 127.5) rejects.
    return tf.ensure_shape(tf.cast(img, tf.float32), (size, size, 3))


def load_resized(path, size: int, interpolation: str = "bilinear", jpeg_draft: bool = False, decoder: str = "pil"):
    """One image file (a string tensor) -> float32 RGB (size, size, 3) in [0, 255], stretched (no crop).

    decoder 'pil' runs Pillow (what the report's Keras 2 used) through tf.numpy_function; 'tf' stays
    in the TensorFlow graph (tf.io.decode_jpeg + tf.image.resize).
    """
    import tensorflow as tf
    if decoder == "tf":
        return _decode_resized(tf.io.read_file(path), size, interpolation, jpeg_draft)
    if decoder != "pil":
        raise CatDogError(f"unknown decoder {decoder!r}: use one of {', '.join(DECODERS)}")
    # The path arrives as bytes in a graph, as a 0-d object array when called eagerly.
    img = tf.numpy_function(lambda p: _pil_resized(os.fsdecode(np.asarray(p).item()), size, interpolation, jpeg_draft),
                            [path], tf.float32, stateful=False)
    return tf.ensure_shape(img, (size, size, 3))


def image_dataset(paths: Sequence[str], size: int, batch_size: int, interpolation: str = "bilinear",
                  jpeg_draft: bool = False, labels: Sequence[float] | None = None, shuffle_seed: int | None = None,
                  augment=None, preprocess=None, decoder: str = "pil"):
    """tf.data pipeline: parallel read + decode + resize, batched and prefetched, float32 in [0, 255].

    Order is kept (deterministic map), so batch k holds paths[k*batch_size:(k+1)*batch_size], unless
    `shuffle_seed` is given (a new seeded order each epoch). With `labels` it yields (images, labels).
    `augment` (training only) and then `preprocess` are applied to each batch.
    """
    import tensorflow as tf

    def load(p):
        return load_resized(p, size, interpolation, jpeg_draft, decoder)

    def on_images(fn):  # apply fn to the images of an element, whether or not it carries labels
        return lambda x, *y: (fn(x), *y) if y else fn(x)

    if labels is None:
        ds = tf.data.Dataset.from_tensor_slices(list(paths))
    else:
        ds = tf.data.Dataset.from_tensor_slices((list(paths), np.asarray(labels, np.float32)))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.map(on_images(load), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size)
    if augment is not None:
        ds = ds.map(on_images(lambda x: augment(x, training=True)), num_parallel_calls=tf.data.AUTOTUNE)
    if preprocess is not None:
        ds = ds.map(on_images(preprocess), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


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


def find_undecodable(paths: Sequence[str], size: int, interpolation: str, decoder: str = "pil") -> str | None:
    """The first of `paths` the pipeline cannot decode, to name it in an error."""
    import tensorflow as tf

    for p in paths:
        try:
            load_resized(tf.constant(p), size, interpolation, False, decoder)
        except (tf.errors.OpError, ValueError, OSError):
            return p
    return None


# =============================================================================
# Backbones
# =============================================================================

@dataclass(frozen=True)
class Backbone:
    """One pretrained CNN: how to build it, feed it and where fine-tuning cuts it."""
    name: str
    module: str          # keras.applications submodule holding the constructor and preprocess_input
    constructor: str
    size: int            # native input size
    min_size: int        # smallest input Keras accepts (below it InceptionV3 yields an empty map)
    width: int           # GlobalAveragePool feature width
    weights_file: str    # Keras's no-top ImageNet weights file, for offline boxes
    split_layer: str | None  # where split-block fine-tuning cuts; "Add:last" = the last Add layer

    def preprocess(self, x):
        """This backbone's own preprocess_input ('caffe' or [-1, 1]); returns a new array or tensor."""
        import keras
        fn = getattr(keras.applications, self.module).preprocess_input
        return fn(np.array(x, dtype=np.float32) if isinstance(x, np.ndarray) else x)  # it edits numpy in place

    def build(self, weights: str = "imagenet", image_size: int | None = None, pooling: str | None = "avg"):
        """The CNN without its top, with GlobalAveragePool when pooling='avg'."""
        import keras
        size = image_size or self.size
        if size < self.min_size:
            raise CatDogError(f"{self.name} needs --image-size >= {self.min_size}, got {size}")
        ctor = getattr(keras.applications, self.constructor)
        w = resolve_weights(weights, self)
        build = functools.partial(ctor, include_top=False, weights=w, input_shape=(size, size, 3), pooling=pooling)
        try:
            return build()
        except Exception as e:  # a download failure surfaces as various exception types
            if w is None:  # no weights were loaded: not a weights problem
                raise
            if w != "imagenet":
                raise CatDogError(f"could not load {self.name} weights from {w}: {e}") from e
            raise CatDogError(
                f"could not download {self.name}'s ImageNet weights ({e}). Fetch {self.weights_file} from "
                f"https://storage.googleapis.com/tensorflow/keras-applications/ on a machine with internet, "
                f"put it in ~/.keras/models/ (or any folder and pass --weights FOLDER)") from e

    def split_layer_name(self, model) -> str:
        """The split layer's name in this model instance (Keras numbers Add layers per session)."""
        if self.split_layer is None:
            raise CatDogError(f"{self.name} has no split point for fine-tuning")
        if self.split_layer == "Add:last":
            import keras
            return [layer.name for layer in model.layers if isinstance(layer, keras.layers.Add)][-1]
        return self.split_layer


_NOTOP = "_weights_tf_dim_ordering_tf_kernels_notop.h5"
BACKBONES: dict[str, Backbone] = {b.name: b for b in [
    Backbone("ResNet50", "resnet50", "ResNet50", 224, 32, 2048, "resnet50" + _NOTOP, "conv5_block2_out"),
    Backbone("VGG16", "vgg16", "VGG16", 224, 32, 512, "vgg16" + _NOTOP, None),
    Backbone("InceptionV3", "inception_v3", "InceptionV3", 299, 75, 2048, "inception_v3" + _NOTOP, "mixed9"),
    Backbone("Xception", "xception", "Xception", 299, 71, 2048, "xception" + _NOTOP, "Add:last"),
    Backbone("InceptionResNetV2", "inception_resnet_v2", "InceptionResNetV2", 299, 75, 1536,
             "inception_resnet_v2" + _NOTOP, None),
]}


def get_backbone(name: str) -> Backbone:
    """Registry lookup with a helpful error."""
    if name not in BACKBONES:
        raise CatDogError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    return BACKBONES[name]


def resolve_weights(spec: str, backbone: Backbone) -> str | None:
    """'imagenet' -> 'imagenet', 'none' -> None, a folder or .h5 file -> the weights file path."""
    if spec == "imagenet":
        return "imagenet"
    if spec.lower() == "none":
        return None
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / backbone.weights_file
    if not path.is_file():
        raise CatDogError(f"{path}: weights file not found (download {backbone.weights_file} into that "
                          f"folder, or use --weights imagenet / none)")
    return str(path)


# =============================================================================
# Feature cache (HDF5)
# =============================================================================

def feature_path(data_dir: str | Path, name: str) -> Path:
    """data/features/<name>.h5"""
    return Path(data_dir) / FEATURES / f"{name}.h5"


def feature_file_state(path: Path) -> dict | None:
    """A feature file's attributes if it is complete, else None."""
    import h5py
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    except OSError:
        return None
    return attrs if attrs.get("complete") else None


class FeatureWriter:
    """Appends feature rows to an HDF5 file built in a temp file; `complete=True` and the rename come last.

    An interrupted run leaves only the temp file, which the next run replaces.
    """

    def __init__(self, path: Path, train_files: Sequence[str], labels: Sequence[int], test_ids: Sequence[int],
                 feature_shape: tuple[int, ...], dtype: str, attrs: dict):
        import h5py
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = path.with_name(f".{path.name}.partial")
        self.file = h5py.File(self.tmp, "w")
        n, m = len(train_files), len(test_ids)
        # One row per chunk: streaming training reads single rows, which is fast; no compression (10x slower reads).
        chunks = (1, *feature_shape)
        self.data = {"train": self.file.create_dataset("train", (n, *feature_shape), dtype, chunks=chunks),
                     "test": self.file.create_dataset("test", (m, *feature_shape), dtype, chunks=chunks)}
        self.file["label"] = np.asarray(labels, dtype=np.uint8)
        self.file["train_files"] = np.asarray(train_files, dtype=object).astype("S")
        self.file["test_ids"] = np.asarray(test_ids, dtype=np.int64)
        self.pos = {"train": 0, "test": 0}
        self.attrs = attrs

    def append(self, part: str, rows: np.ndarray) -> None:
        """Write the next batch of rows of `part` ('train' or 'test')."""
        start = self.pos[part]
        self.data[part][start:start + len(rows)] = rows
        self.pos[part] = start + len(rows)

    def close(self) -> None:
        """Check every row was written, mark complete, rename into place."""
        for part, ds in self.data.items():
            if self.pos[part] != ds.shape[0]:
                raise RuntimeError(f"{self.path}: wrote {self.pos[part]} of {ds.shape[0]} {part} rows")
        for k, v in self.attrs.items():
            self.file.attrs[k] = v
        self.file.attrs["complete"] = True
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Drop the temp file."""
        with contextlib.suppress(Exception):
            self.file.close()
        self.tmp.unlink(missing_ok=True)


@dataclass
class ExtractSettings:
    """How images become model inputs; stored as attributes of every feature file."""
    image_size: int
    batch_size: int = 64
    interpolation: str = "bilinear"
    jpeg_draft: bool = False
    weights: str = "imagenet"
    seed: int = DEFAULT_SEED
    decoder: str = "pil"

    def attrs(self) -> dict:
        return {"image_size": self.image_size, "interpolation": self.interpolation, "decoder": self.decoder,
                "jpeg_draft": self.jpeg_draft, "weights": self.weights, "seed": self.seed}


def image_parts(data_dir: str | Path) -> tuple[pd.DataFrame, dict[str, list[str]], np.ndarray]:
    """split.csv, the image paths of the 'train' (split.csv order) and 'test' (id order) rows, test ids."""
    split = read_split(data_dir)
    ids, test_paths = test_images(data_dir)
    return split, {"train": train_image_paths(data_dir, split), "test": test_paths}, ids


def stale_reason(path: Path, settings: ExtractSettings, split: pd.DataFrame, attrs: dict | None = None) -> str:
    """Why an existing feature file must be redone ('missing', 'incomplete', other settings or split),
    or '' when it can be kept. `attrs` are further attributes that must match."""
    import h5py
    state = feature_file_state(path)
    if state is None:
        return "missing" if not path.exists() else "incomplete"
    wanted = {**settings.attrs(), **(attrs or {})}
    # The seed only changes features made from random weights.
    changed = [k for k, v in wanted.items() if state.get(k) != v and (k != "seed" or wanted.get("weights") == "none")]
    if changed:
        return "made with other settings (" + ", ".join(f"{k}={state.get(k)}" for k in changed) + ")"
    with h5py.File(path, "r") as f:
        if not np.array_equal(f["train_files"][:].astype(str), split.filename.to_numpy(str)):
            return "made for another split.csv"
    return ""


def make_extract_step(model, preprocess, strategy=None):
    """A compiled step: a batch of [0, 255] images -> float32 model outputs, replica-parallel on several GPUs."""
    import tensorflow as tf

    # A free batch dimension: the smaller last batch must not trigger a second trace of the whole CNN.
    @tf.function(input_signature=[tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)])
    def step(x):
        return tf.cast(model(preprocess(x), training=False), tf.float32)

    if strategy is None or strategy.num_replicas_in_sync == 1:
        return step

    @tf.function(reduce_retracing=True)
    def distributed_step(x):
        return strategy.gather(strategy.run(step, args=(x,)), axis=0)

    return distributed_step


def extract_to_file(step, shape: tuple[int, ...], data_dir: str | Path, out_path: Path,
                    settings: ExtractSettings, attrs: dict, dtype: str = "float32", strategy=None) -> int:
    """Run every train2 and test2 image through `step` (see make_extract_step) into an HDF5 file, batch by batch.

    `shape` is one output row's shape. Memory stays flat whatever the image count; the file appears
    only once complete. Returns the number of images done.
    """
    import tensorflow as tf

    split, parts, ids = image_parts(data_dir)
    writer = FeatureWriter(out_path, split.filename, split.label, ids, shape, dtype,
                           {**settings.attrs(), **attrs, **versions()})
    try:
        for part, paths in parts.items():
            ds = image_dataset(paths, settings.image_size, settings.batch_size, settings.interpolation,
                               settings.jpeg_draft, decoder=settings.decoder)
            if strategy is not None and strategy.num_replicas_in_sync > 1:
                ds = strategy.experimental_distribute_dataset(ds)
            n_batches = math.ceil(len(paths) / settings.batch_size)
            batches = iter(ds)
            for k in _progress(range(n_batches), f"{out_path.stem} {part}"):
                try:
                    x = next(batches)
                except tf.errors.OpError as e:
                    chunk = paths[k * settings.batch_size:(k + 1) * settings.batch_size]
                    bad = find_undecodable(chunk, settings.image_size, settings.interpolation, settings.decoder)
                    raise CatDogError(f"cannot decode {bad or 'an image in ' + ', '.join(chunk[:3])}: "
                                      f"rerun 01_reorganize_data.py, which skips broken files") from e
                writer.append(part, step(x).numpy().astype(dtype))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return sum(len(p) for p in parts.values())


def _progress(it, desc: str):
    from tqdm import tqdm
    return tqdm(it, desc=desc, unit="batch", leave=False, mininterval=1.0)


@dataclass
class Features:
    """Aligned feature matrices of one or more backbones, in split.csv / test-id order."""
    names: list[str]
    train: list[np.ndarray]
    labels: np.ndarray
    train_files: np.ndarray
    valid: np.ndarray        # boolean mask of validation rows, from split.csv
    test: list[np.ndarray]
    test_ids: np.ndarray
    attrs: list[dict]
    paths: list[Path]

    def part(self, subset: str) -> tuple[list[np.ndarray], np.ndarray]:
        """(inputs, labels) of the 'train' or 'valid' rows."""
        mask = self.valid if subset == "valid" else ~self.valid
        return [x[mask] for x in self.train], self.labels[mask]

    def predict(self, model, part: str, batch_size: int = 256) -> np.ndarray:
        """Dog probabilities of the 'train' or 'test' rows, from the loaded matrices or, when that part was
        not loaded (maps files are too big for RAM), streamed from the files in contiguous slices."""
        loaded = self.train if part == "train" else self.test
        if loaded:
            return predict(model, loaded)
        import h5py
        files = [h5py.File(p, "r") for p in self.paths]
        try:
            n = files[0][part].shape[0]
            out = [np.asarray(model.predict_on_batch(model_inputs([f[part][s:s + batch_size] for f in files])))
                   for s in _progress(range(0, n, batch_size), f"predict {part}")]
        finally:
            for f in files:
                f.close()
        return np.concatenate(out).ravel() if out else np.zeros(0, np.float32)


def load_features(model_names: Sequence[str], data_dir: str | Path, parts: Iterable[str] = ("train", "test"),
                  ) -> Features:
    """Load feature files and check they line up row by row with each other and with split.csv."""
    import h5py
    split = read_split(data_dir)
    out = {"train": [], "test": []}
    labels = train_files = test_ids = None
    attrs, paths = [], []
    for name in model_names:
        path = feature_path(data_dir, name)
        paths.append(path)
        state = feature_file_state(path)
        if state is None:
            step = "04_finetune_split.py" if name.endswith("_maps") else "02_extract_features.py"
            raise CatDogError(f"{path} is missing or incomplete: run {step} --models {name.split('_')[0]}")
        with h5py.File(path, "r") as f:
            files = f["train_files"][:].astype(str)
            if len(files) != len(split) or not np.array_equal(files, split.filename.to_numpy(str)):
                raise CatDogError(f"{path}: its {len(files)} rows do not match the order of {SPLIT_CSV} "
                                  f"({len(split)} rows); it was extracted before 01 was rerun: rerun 02 with --force")
            ids = f["test_ids"][:]
            if test_ids is not None and not np.array_equal(ids, test_ids):
                raise CatDogError(f"{path}: its test ids differ from {model_names[0]}'s: rerun 02 with --force")
            labels, train_files, test_ids = f["label"][:], files, ids
            for part in parts:
                out[part].append(f[part][:])
        attrs.append(state)
    return Features(list(model_names), out["train"], labels.astype(np.float32), train_files,
                    (split.subset == "valid").to_numpy(), out["test"], test_ids, attrs, paths)


# =============================================================================
# Heads
# =============================================================================

def make_optimizer(name: str, learning_rate: float, momentum: float = 0.0, decay: float = 0.0,
                   rho: float = 0.95):
    """Adadelta or SGD; SGD's Keras 2 `decay` becomes InverseTimeDecay(lr, 1, decay) as Keras 2 computed it."""
    import keras
    if name == "adadelta":
        # Keras 2's Adadelta defaults: lr 1.0 (Keras 3 changed it to 0.001), rho 0.95, epsilon 1e-7.
        return keras.optimizers.Adadelta(learning_rate=learning_rate, rho=rho, epsilon=1e-7)
    if name == "sgd":
        lr = learning_rate
        if decay:
            lr = keras.optimizers.schedules.InverseTimeDecay(learning_rate, decay_steps=1, decay_rate=decay)
        return keras.optimizers.SGD(learning_rate=lr, momentum=momentum)
    raise CatDogError(f"unknown optimizer {name!r}: use adadelta or sgd")


def build_head(input_dims: dict[str, int], dropout: float = 0.5, optimizer=None):
    """The report's head: one Input per backbone -> Concatenate (if several) -> Dropout -> Dense(1, sigmoid)."""
    import keras
    inputs = [keras.Input((dim,), name=name) for name, dim in input_dims.items()]
    x = inputs[0] if len(inputs) == 1 else keras.layers.Concatenate(name="concat")(inputs)
    x = keras.layers.Dropout(dropout)(x)
    out = keras.layers.Dense(1, activation="sigmoid", name="prediction")(x)
    # Keras scope names may not contain '+', so "ResNet50+Xception" is named "head_ResNet50_Xception".
    model = keras.Model(inputs if len(inputs) > 1 else inputs[0], out, name="head_" + "_".join(input_dims))
    model.compile(optimizer=optimizer or make_optimizer("adadelta", 1.0),
                  loss="binary_crossentropy", metrics=["accuracy"])
    return model


# =============================================================================
# Training
# =============================================================================

def model_inputs(xs: list[np.ndarray]):
    """A single array for one-input models, the list for merged ones."""
    return xs[0] if len(xs) == 1 else xs


def fit_head(model, feats: Features, epochs: int, batch_size: int, log_dir: Path, seed: int,
             callbacks: Sequence = (), verbose: int = 2) -> pd.DataFrame:
    """Train on split.csv's train rows, validate on its valid rows; TensorBoard logs in `log_dir`.

    Returns the history with a 1-based `epoch` column.
    """
    import keras
    shutil.rmtree(log_dir, ignore_errors=True)  # a rerun would otherwise draw two curves in one run
    keras.utils.set_random_seed(seed)
    (xtr, ytr), (xva, yva) = feats.part("train"), feats.part("valid")
    if len(yva) == 0:
        raise CatDogError("split.csv has no valid rows: rerun 01 with a --valid-frac above 0")
    hist = model.fit(model_inputs(xtr), ytr, validation_data=(model_inputs(xva), yva), epochs=epochs,
                     batch_size=batch_size, shuffle=True, verbose=verbose,
                     callbacks=[keras.callbacks.TensorBoard(str(log_dir)), *callbacks])
    df = pd.DataFrame(hist.history)
    df.insert(0, "epoch", np.arange(1, len(df) + 1))
    return df


def summarize(name: str, history: pd.DataFrame, seed: int) -> dict:
    """A results-table row: final val_loss/val_acc (the figure the report quotes) and the best epoch."""
    best = int(history.val_loss.idxmin())
    return {"model": name, "val_loss": float(history.val_loss.iloc[-1]),
            "val_acc": float(history.val_accuracy.iloc[-1]), "best_epoch": best + 1,
            "best_val_loss": float(history.val_loss.iloc[best]), "epochs": len(history), "seed": seed}


def head_args(p: argparse.ArgumentParser, epochs: int, optimizer: str = "adadelta", lr: float = 1.0) -> None:
    """Training flags shared by the head-training scripts; defaults are the report's."""
    p.add_argument("--epochs", type=int, default=epochs, help="training epochs")
    p.add_argument("--batch-size", type=int, default=128, help="rows per training batch")
    p.add_argument("--optimizer", default=optimizer, choices=["adadelta", "sgd"], help="optimizer")
    p.add_argument("--lr", type=float, default=lr,
                   help="learning rate (1.0 is Keras 2's Adadelta default, which the report used)")
    p.add_argument("--rho", type=float, default=0.95, help="Adadelta's decay rate rho")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--dropout", type=float, default=0.5, help="dropout rate before the Dense layer")


def train_run(name: str, model, feats: Features, out_dir: Path, log_dir: Path, args: argparse.Namespace,
              meta: dict, callbacks: Sequence = ()) -> tuple[dict, pd.DataFrame]:
    """Fit, then save `<name>.keras`, its sidecar and `<name>.history.csv` in `out_dir`; returns (row, history)."""
    hist = fit_head(model, feats, args.epochs, args.batch_size, log_dir, args.seed, callbacks)
    write_csv(hist, out_dir / f"{name}.history.csv")
    save_model(model, out_dir / f"{name}.keras", {"features": feats.names, "seed": args.seed,
                                                  "feature_attrs": feats.attrs, **meta})
    row = summarize(name, hist, args.seed)
    log.info(f"{name}: val_loss {row['val_loss']:.5f}, val_acc {row['val_acc']:.4f} "
             f"(best {row['best_val_loss']:.5f} at epoch {row['best_epoch']})")
    return row, hist


def write_results(rows: list[dict], out_dir: Path, title: str, baseline: str | None = None) -> pd.DataFrame:
    """Merge `rows` into `out_dir/results.csv` (a rerun of one model replaces its row), print it,
    and plot every listed model's val_loss curve into `out_dir/val_loss.png`."""
    path = out_dir / "results.csv"
    new = pd.DataFrame(rows)
    if path.is_file():
        old = pd.read_csv(path)
        new = pd.concat([old[~old.model.isin(new.model)], new], ignore_index=True)
    write_csv(new, path)
    log.info(f"\n{title}\n" + new.to_string(index=False, float_format=lambda v: f"{v:.5f}"))
    histories = {m: pd.read_csv(out_dir / f"{m}.history.csv") for m in new.model
                 if (out_dir / f"{m}.history.csv").is_file()}
    if baseline and baseline not in histories:
        baseline = None
    plot_curves(histories, out_dir / "val_loss.png", title=title, baseline=baseline)
    return new


def save_model(model, path: str | Path, meta: dict) -> None:
    """Save `<path>.keras` and its `<path>.json` sidecar (which feature files it reads, settings, seed)."""
    path = Path(path)
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)
    write_json({**meta, **versions()}, path.with_suffix(".json"))
    log.info(f"saved {path}")


def load_model(path: str | Path):
    """A saved model and its sidecar metadata."""
    import keras
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise CatDogError(f"{path} (and its {meta_path.name}) not found: train it first or check --model")
    return keras.models.load_model(path), json.loads(meta_path.read_text())


# =============================================================================
# Fine-tuning (split model, feature maps, frozen BatchNorm)
# =============================================================================

def split_model(model: keras.Model, layer_name: str) -> tuple[keras.Model, keras.Model]:
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
    for layer in after.values():
        for t in layer._inbound_nodes[0].input_tensors:
            src = t._keras_history.operation
            if src is not cut and id(src) not in after:
                raise CatDogError(f"cannot cut {model.name} at {layer_name}: {layer.name} after the cut also reads "
                                  f"{src.name} from before it (the cut is inside a block); cut at a block output")
    extractor = keras.Model(model.input, cut.output, name=f"{model.name}_to_{layer_name}")
    tail = keras.Model(cut.output, model.output, name=f"{model.name}_from_{layer_name}")
    return extractor, tail


def freeze_batchnorm(model: keras.Model) -> int:
    """Run every BatchNormalization layer (nested ones too) in inference mode with fixed statistics.

    `trainable = False` is what Keras 3 honours during fit(); `training=False` in a functional graph is
    not (keras-team/keras#20285). Call it after any `trainable = True`, which would turn them back on.
    Returns how many layers were frozen.
    """
    import keras
    bns = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in bns:
        layer.trainable = False
    return len(bns)


def set_block_trainable(model: keras.Model, base: keras.Model, block: Sequence[keras.layers.Layer],
                        train_block: bool) -> None:
    """Only `block`'s layers of `base` train (when `train_block`), everything outside `base` (the head)
    trains, BatchNorm never does. Recompile the model afterwards."""
    model.trainable = True
    inside = set(map(id, block))
    for layer in base._flatten_layers(include_self=False):
        layer.trainable = train_block and id(layer) in inside
    freeze_batchnorm(model)


def maps_name(backbone: str, layer: str) -> str:
    """The feature-cache name of a backbone's maps at its split layer: data/features/<name>.h5."""
    return f"{backbone}_{layer}_maps"


def predict_images(model: keras.Model, paths: Sequence[str], meta: dict, batch_size: int = 64) -> np.ndarray:
    """Dog probabilities of images for a model fine-tuned end to end, fed the way it was trained."""
    bb = get_backbone(meta["backbone"])
    ds = image_dataset(paths, meta["image_size"], batch_size, meta["interpolation"], preprocess=bb.preprocess,
                       decoder=meta.get("decoder", "pil"))
    return np.asarray(model.predict(ds, verbose=0)).ravel()


def available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux MemAvailable, else free pages)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            line = next(row for row in f if row.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class MapRows:
    """Rows of one part of a maps file, read from RAM or, when `in_ram` is False, from HDF5 on demand.

    The HDF5 file is opened lazily (at the first read) so the object can be built cheaply and pickled.
    """

    def __init__(self, path: Path, part: str = "train", in_ram: bool = False):
        import h5py
        self.path, self.part, self.in_ram = Path(path), part, in_ram
        with h5py.File(self.path, "r") as f:
            ds = f[part]
            self.shape, self.dtype = ds.shape, ds.dtype
            self.array = ds[:] if in_ram else None
        self._file = self._ds = None
        self.read_seconds = 0.0

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The maps of `rows` (ascending indices), in that order."""
        import time
        start = time.perf_counter()
        if self.in_ram:
            out = self.array[rows]
        else:
            if self._ds is None:
                import h5py
                self._file = h5py.File(self.path, "r")
                self._ds = self._file[self.part]
            # Single-row reads over sorted rows: h5py's fancy indexing on the same rows is ~10-30x slower.
            out = np.empty((len(rows), *self.shape[1:]), self.dtype)
            for j, i in enumerate(rows):
                self._ds.read_direct(out, np.s_[int(i)], np.s_[j])
        self.read_seconds += time.perf_counter() - start
        return out

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_ds": None}


@functools.cache
def _map_batches_class():
    import keras

    class MapBatches(keras.utils.PyDataset):
        """Batches of (maps, labels) over `rows` of a MapRows; a new seeded permutation each epoch when shuffled.

        Each batch's rows are sorted (order inside a batch does not change a gradient step), so the in-RAM
        and streaming sources give identical batches and HDF5 reads go forward.
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

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self.order = self._order()

    return MapBatches


def map_batches(source: MapRows, rows: np.ndarray, labels: np.ndarray, batch_size: int, shuffle: bool,
                seed: int):
    """A keras.utils.PyDataset of (maps, labels) batches; see MapBatches."""
    return _map_batches_class()(source, rows, labels, batch_size, shuffle, seed)


# =============================================================================
# Metrics
# =============================================================================

def log_loss(y_true: np.ndarray, y_prob: np.ndarray, clip: tuple[float, float] | None = None) -> float:
    """Kaggle's binary log loss; with `clip`, predictions are first clipped as in the submission.

    Without `clip` it guards log(0) the way sklearn does (float64 machine epsilon).
    """
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    eps = np.finfo(np.float64).eps
    lo, hi = clip if clip else (eps, 1 - eps)
    p = np.clip(p, lo, hi)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def predict(model, xs: list[np.ndarray], batch_size: int = 512) -> np.ndarray:
    """Probabilities of dog, 1-D."""
    return np.asarray(model.predict(model_inputs(xs), batch_size=batch_size, verbose=0)).ravel()


# =============================================================================
# Submission
# =============================================================================

CLIP = (0.005, 0.995)


def validate_submission(df: pd.DataFrame, expected_ids: Sequence[int], clip: tuple[float, float]) -> None:
    """Refuse a submission Kaggle would reject or score badly: wrong header, ids, NaN, out of clip range."""
    problems = []
    if list(df.columns) != ["id", "label"]:
        problems.append(f"header is {','.join(map(str, df.columns))}, not id,label")
    else:
        expected = np.asarray(expected_ids)
        ids = df["id"].to_numpy()
        if len(df) != len(expected):
            problems.append(f"{len(df)} rows for {len(expected)} test images")
        if pd.Series(ids).duplicated().any():
            problems.append(f"duplicate ids, e.g. {pd.Series(ids)[pd.Series(ids).duplicated()].iloc[0]}")
        if set(ids.tolist()) != set(expected.tolist()):
            problems.append("ids are not exactly the test image ids")
        elif not np.array_equal(ids, np.sort(ids)):
            problems.append("ids are not in ascending order")
        labels = pd.to_numeric(df["label"], errors="coerce").to_numpy(dtype=float)
        if np.isnan(labels).any():
            problems.append(f"{int(np.isnan(labels).sum())} missing or non-numeric labels")
        elif ((labels < clip[0] - 1e-12) | (labels > clip[1] + 1e-12)).any():
            problems.append(f"labels outside [{clip[0]}, {clip[1]}]")
    if problems:
        raise CatDogError("submission refused: " + "; ".join(problems))


def write_submission(ids: Sequence[int], probs: np.ndarray, path: str | Path,
                     clip: tuple[float, float] = CLIP) -> pd.DataFrame:
    """Clip dog probabilities to `clip` (a confident mistake costs far more log loss than it saves),
    sort by id, validate and write `id,label` atomically."""
    if not 0 <= clip[0] < clip[1] <= 1:
        raise CatDogError(f"clip range must satisfy 0 <= low < high <= 1, got {clip}")
    df = pd.DataFrame({"id": np.asarray(ids, dtype=np.int64), "label": np.clip(np.asarray(probs, float), *clip)})
    df = df.sort_values("id", kind="stable").reset_index(drop=True)
    validate_submission(df, ids, clip)
    write_csv(df, path)
    log.info(f"wrote {path} ({len(df)} rows)")
    return df


def submit(model, feats: Features, path: str | Path, clip: tuple[float, float] = CLIP) -> pd.DataFrame:
    """Predict the test rows of `feats` and write the clipped, validated Kaggle CSV."""
    return write_submission(feats.test_ids, feats.predict(model, "test"), path, clip)


# =============================================================================
# kopt compatibility
# =============================================================================
# kopt 0.1.0 (the report's HyperOpt wrapper) was written for Keras 2 and PyYAML 5. import_kopt() patches
# the three places where it breaks on Keras 3 / PyYAML 6; tests/test_hyperopt.py runs CompileFN end to
# end so an upgrade that breaks it fails CI.
#  1. kopt.config reads ~/.kopt/config.yaml with yaml.load() and no Loader, which PyYAML 6 rejects on the
#     second import. It is imported with a safe default Loader, and with HOME pointed at `config_dir`
#     so the file lands under --model-dir, not in the user's home folder.
#  2. kopt.hyopt.eval_model zips model.metrics_names (Keras 3: ['loss', 'compile_metrics']) with
#     evaluate()'s values, mislabelling metrics: replaced by evaluate(return_dict=True).
#  3. CompileFN checkpoints to '<uuid>.h5', which Keras 3 writes in its legacy HDF5 format: the path
#     is rewritten to '<uuid>.keras'.

def _kopt_eval_model(model, test, add_eval_metrics={}):  # noqa: B006 - kopt's own signature
    """kopt's eval_model with metrics named by Keras itself."""
    metrics = {k: float(v) for k, v in
               model.evaluate(test[0], test[1], verbose=0, batch_size=len(test[1]), return_dict=True).items()}
    if add_eval_metrics:  # a second pass over the validation set only when extra metrics need predictions
        y_pred = model.predict(test[0], verbose=0)
        metrics.update({k: fn(test[1], y_pred) for k, fn in add_eval_metrics.items() if k not in metrics})
    return metrics


def import_kopt(config_dir: str | Path):
    """kopt, imported and patched for Keras 3 and PyYAML 6 (see above); returns the module."""
    import keras
    import yaml

    config_dir = Path(config_dir)
    config_dir.mkdir(parents=True, exist_ok=True)
    if "kopt" not in sys.modules:
        real_load, home = yaml.load, os.environ.get("HOME")
        yaml.load = functools.partial(real_load, Loader=yaml.SafeLoader)
        os.environ["HOME"] = str(config_dir)
        try:
            import kopt
        finally:
            yaml.load = real_load
            if home is None:
                os.environ.pop("HOME", None)
            else:
                os.environ["HOME"] = home
    import kopt
    import kopt.hyopt

    class KerasCheckpoint(keras.callbacks.ModelCheckpoint):
        def __init__(self, filepath, *args, **kwargs):
            super().__init__(re.sub(r"\.h5$", ".keras", filepath), *args, **kwargs)

    kopt.hyopt.eval_model = _kopt_eval_model
    kopt.hyopt.ModelCheckpoint = KerasCheckpoint
    kopt.config.set_save_dir(str(config_dir))
    return kopt


# =============================================================================
# Plots
# =============================================================================

def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | Path) -> None:
    """Save a PNG atomically and close the figure."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    pyplot().close(fig)
    log.info(f"wrote {path}")


def plot_curves(histories: dict[str, pd.DataFrame], path: str | Path, metric: str = "val_loss",
                title: str = "", baseline: str | None = None) -> None:
    """One line per run of `metric` by epoch (the report's TensorBoard charts); `baseline` drawn blue and thick."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, h in histories.items():
        style = {"color": "tab:blue", "linewidth": 3} if name == baseline else {}
        ax.plot(h.epoch, h[metric], marker="o", markersize=3, label=name, **style)
    ax.set(xlabel="epoch", ylabel=metric, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
