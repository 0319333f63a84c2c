"""Everything the numbered catdog scripts share.

Sections: paths and CLI, Kaggle data, splitting, images, backbones, feature cache, heads, training,
submission, pixels and Grad-CAM, Kaggle API, plots. What only one step uses lives in that step's script.
TensorFlow and Keras are imported inside the functions that need them, so the
data step (01) and `-h` stay fast and importing this module does no work.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import shutil
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

# Silence TF's C++ start-up chatter before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

log = logging.getLogger("catdog")

# ==================== Paths and CLI =================================================================================

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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's accepted range and default (not None: such flags' help says what happens without)."""

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
    bounds = ([f"{'>' if low_open else '>='} {low}"] if low is not None else []) + (
        [f"{'<' if high_open else '<='} {high}"] if high is not None else [])
    accepted = " ".join(["an integer" if kind is int else "a number", " and ".join(bounds)]).strip()

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {accepted}") from None
        if not (math.isfinite(value) and (low is None or (value > low if low_open else value >= low))
                and (high is None or (value < high if high_open else value <= high))):
            raise argparse.ArgumentTypeError(f"{text} is not {accepted}")
        return value

    convert.accepted, convert.__name__ = accepted, kind.__name__
    return convert


POSITIVE_INT = number(int, 1)
NONNEGATIVE_INT = number(int, 0)
POSITIVE = number(float, 0, low_open=True)
PROBABILITY = number(float, 0, 1)
DROPOUT = number(float, 0, 1, high_open=True)
SEED = number(int, 0, 2**32 - 1)  # what numpy's and TensorFlow's seeding accept


def base_parser(description: str, cnn: bool = False) -> argparse.ArgumentParser:
    """The flags every script shares; `cnn` adds --weights and --image-size."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
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


def run_cli(main: Callable[[argparse.Namespace], object], args: argparse.Namespace, log_stream=None) -> None:
    """Run a script's main(): user errors become one line and exit code 2; a main() that returns an int (predict.py)
    exits with it. Logs go to stdout, or `log_stream` (predict.py keeps stdout for its results)."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s", stream=log_stream or sys.stdout)
    try:
        result = main(args)
    except CatDogError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished outputs are kept; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    if isinstance(result, int):
        sys.exit(result)


def temp_name(path: str | Path, suffix: str = "") -> Path:
    """A hidden temp name beside `path`, this process's and call's own: two runs never share a half file."""
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
    parent = path.parent
    while not parent.exists() and parent != parent.parent:  # the nearest existing folder must be a folder
        parent = parent.parent
    if not parent.is_dir():
        raise CatDogError(f"{parent} is a file, not a folder: give another path")
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside `path`, renamed onto it only if the block succeeds. `suffix` keeps an extension
    some writers insist on (Keras wants `.keras`); a symlink to a regular file stays, its target is replaced."""
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


# ==================== Kaggle data ===================================================================================

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


# ==================== Splitting =====================================================================================

SPLIT_COLUMNS = ("filename", "label", "subset", "source")
# Where a labelled image comes from: Kaggle's train/, or the Oxford-IIIT Pet images of 01 --extra-data.
SOURCES = ("kaggle", "oxford-pets")


def read_split(data_dir: str | Path) -> pd.DataFrame:
    """split.csv (filename, label, subset, source): the one split every step trains and validates on.

    A split.csv of an older 01, without `source`, holds Kaggle's images only and reads as such.
    """
    path = Path(data_dir) / SPLIT_CSV
    if not path.is_file():
        raise CatDogError(f"{path} not found: run 01_reorganize_data.py first")
    garbage = CatDogError(f"{path} is not a split file made by 01_reorganize_data.py: rerun it")
    try:
        df = pd.read_csv(path, dtype={"filename": str, "label": int, "subset": str, "source": str})
    except ValueError:  # empty, not UTF-8, or text where a label belongs
        raise garbage from None
    if tuple(df.columns) == SPLIT_COLUMNS[:3]:
        df["source"] = SOURCES[0]
    if (tuple(df.columns) != SPLIT_COLUMNS or df.empty or not df.label.isin(range(len(CLASSES))).all()
            or not df.subset.isin(("train", "valid")).all() or not df.source.isin(SOURCES).all()):
        raise garbage
    return df


def train_image_paths(data_dir: str | Path, split: pd.DataFrame) -> list[str]:
    """Paths of the labelled images under train2/, in split.csv order."""
    root = Path(data_dir) / TRAIN2
    return [str(root / CLASSES[lab] / name) for name, lab in zip(split.filename, split.label, strict=True)]


def test_images(data_dir: str | Path) -> tuple[np.ndarray, list[str]]:
    """Test ids ascending numerically (`10.jpg` after `9.jpg`) and their paths under test2/test, by the files'
    own names (`01.jpg` is id 1 too, so a name is never rebuilt from its id)."""
    root = Path(data_dir) / TEST2
    if not root.is_dir():
        raise CatDogError(f"{root} not found: run 01_reorganize_data.py first")
    found = sorted((i, p.name) for p in root.iterdir() if (i := parse_test_name(p.name)) is not None)
    for (i, a), (j, b) in itertools.pairwise(found):
        if i == j:
            raise CatDogError(f"{root / a} and {root / b} are both test id {i}: rerun 01_reorganize_data.py")
    return np.asarray([i for i, _ in found], dtype=np.int64), [str(root / name) for _, name in found]


# ==================== Images ========================================================================================

# Pillow's filter for each --interpolation: 02's resize, and what predict.py and 08's graph reproduce.
PIL_FILTERS = {"bilinear": "BILINEAR", "nearest": "NEAREST", "bicubic": "BICUBIC", "area": "BOX"}
INTERPOLATIONS = tuple(PIL_FILTERS)
DECODERS = ("pil", "tf")


def pil_filter(interpolation: str):
    """The Pillow resampling filter of an --interpolation name."""
    from PIL import Image
    return getattr(Image.Resampling, PIL_FILTERS[interpolation])


def _pil_resized(path: str, size: int, interpolation: str, jpeg_draft: bool) -> np.ndarray:
    """Pillow's decode and antialiased resize of one image, as float32 RGB (size, size, 3). Pillow releases the
    GIL, so tf.data runs it in parallel threads; its antialiased bilinear is 2-3x faster than TF's."""
    from PIL import Image
    with Image.open(path) as im:
        if jpeg_draft:
            im.draft("RGB", (size, size))  # libjpeg DCT scaling to the smallest scale still >= size
        return np.asarray(im.convert("RGB").resize((size, size), pil_filter(interpolation)), dtype=np.float32)


# Augmented feature views (02 --views): view 0 is the image itself, view 1 its mirror, views 2.. random
# transformations. Each is drawn from (seed, image name, view) alone, so view k of an image is the same
# transformation for every backbone, and the rows of all feature files stay aligned view by view.
VIEW_PARAMS = ("mirror", "angle", "zoom", "shift_x", "shift_y", "brightness")
MAX_ANGLE, MIN_ZOOM, BRIGHTNESS = 20.0, 0.8, 0.2


def view_params(seed: int, names: Sequence[str], view: int) -> np.ndarray:
    """The transformation of view `view` of each image (rows of VIEW_PARAMS, float32): mirror 0/1, angle in
    degrees (+-MAX_ANGLE), zoom (the crop's share of each side, MIN_ZOOM..1), shift of the crop within the margin
    (-1..1 each way), brightness factor (1 +- BRIGHTNESS)."""
    identity = np.array([0, 0, 1, 0, 0, 1], np.float32)
    out = np.tile(identity, (len(names), 1))
    if view == 1:
        out[:, 0] = 1
    elif view >= 2:
        for i, name in enumerate(names):  # crc32, not hash(): the same draw in every process
            rng = np.random.default_rng([seed, view, zlib.crc32(str(name).encode())])
            out[i] = [rng.random() < 0.5, rng.uniform(-MAX_ANGLE, MAX_ANGLE), rng.uniform(MIN_ZOOM, 1.0),
                      rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS)]
    return out


def _pil_view(path: str, size: int, interpolation: str, jpeg_draft: bool, params: np.ndarray) -> np.ndarray:
    """_pil_resized of one view: mirrored, rotated about the image centre, cropped (zoom, shift), stretched to
    size x size, brightened. The whole image is first resized (antialiased) to the scale at which the crop is
    size x size, and rotated and cropped there: the augmentation costs little more than the plain resize."""
    from PIL import Image
    mirror, angle, zoom, shift_x, shift_y, brightness = (float(v) for v in params)
    with Image.open(path) as im:
        if jpeg_draft:
            im.draft("RGB", (size, size))
        im = im.convert("RGB")
        if mirror:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        scaled = max(size, round(size / zoom))  # the stretched, square image whose crop is size x size
        small = im.resize((scaled, scaled), pil_filter(interpolation))
    if angle:
        small = small.rotate(angle, resample=Image.Resampling.BILINEAR)
    if scaled != size:
        left, top = (scaled - size) / 2 * (1 + shift_x), (scaled - size) / 2 * (1 + shift_y)
        small = small.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + size, top + size))
    x = np.asarray(small, np.float32)
    return x if brightness == 1 else np.clip(x * brightness, 0, 255)


def _decode_resized(data, size: int, interpolation: str, jpeg_draft: bool):
    """Decode JPEG/PNG bytes to RGB and stretch to size x size (no crop, as the report does). With `jpeg_draft`,
    a JPEG at least twice the size is decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling."""
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


def load_resized(path, size: int, interpolation: str = "bilinear", jpeg_draft: bool = False, decoder: str = "pil",
                 params=None):
    """One image file (a string tensor) -> float32 RGB (size, size, 3) in [0, 255], stretched (no crop): by Pillow
    (the report's decoder) through tf.numpy_function, or by decoder 'tf' all in the TensorFlow graph. `params`
    (a row of view_params) makes it that view of the image (Pillow only)."""
    import tensorflow as tf
    if params is not None:
        if decoder != "pil":
            raise CatDogError("augmented views are made by Pillow: use --decoder pil with --views")
        img = tf.numpy_function(
            lambda p, v: _pil_view(os.fsdecode(np.asarray(p).item()), size, interpolation, jpeg_draft, v),
            [path, params], tf.float32, stateful=False)
        return tf.ensure_shape(img, (size, size, 3))
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
                  augment=None, preprocess=None, decoder: str = "pil", params: np.ndarray | None = None):
    """tf.data pipeline: parallel read + decode + resize, batched and prefetched, float32 in [0, 255], in `paths`
    order unless `shuffle_seed` (a new seeded order each epoch); (images, labels) with `labels`. `augment`
    (training only) and then `preprocess` are applied to each batch. `params` (view_params of `paths`) gives each
    image's view instead of the image itself."""
    import tensorflow as tf

    def load(p, *rest):  # rest: the view's params, then the label; or the label; or nothing
        view = rest[0] if params is not None else None
        x = load_resized(p, size, interpolation, jpeg_draft, decoder, view)
        label = rest[1:] if params is not None else rest
        return (x, *label) if label else x

    def on_images(fn):  # apply fn to the images of an element, whether or not it carries labels
        return lambda x, *y: (fn(x), *y) if y else fn(x)

    columns = [list(paths)] + ([np.asarray(params, np.float32)] if params is not None else []) + (
        [np.asarray(labels, np.float32)] if labels is not None else [])
    ds = tf.data.Dataset.from_tensor_slices(tuple(columns) if len(columns) > 1 else columns[0])
    if shuffle_seed is not None:
        ds = ds.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size)
    if augment is not None:
        # One batch at a time: the random layers' seed state then advances in the same order every run.
        ds = ds.map(on_images(lambda x: augment(x, training=True)))
    if preprocess is not None:
        ds = ds.map(on_images(preprocess), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def find_undecodable(paths: Sequence[str], size: int, interpolation: str, decoder: str = "pil") -> str | None:
    """The first of `paths` the pipeline cannot decode, to name it in an error."""
    import tensorflow as tf

    for p in paths:
        try:
            load_resized(tf.constant(p), size, interpolation, False, decoder)
        except (tf.errors.OpError, ValueError, OSError):
            return p
    return None


# ==================== Backbones =====================================================================================

@dataclass(frozen=True)
class Backbone:
    """One pretrained CNN: how to build it, feed it and where fine-tuning cuts it."""
    name: str
    module: str          # keras.applications submodule holding the constructor and preprocess_input
    constructor: str
    size: int            # native input size
    min_size: int        # smallest input Keras accepts (below it InceptionV3 yields an empty map)
    width: int           # GlobalAveragePool feature width
    weights_file: str    # Keras's no-top ImageNet weights file, as Keras caches it in ~/.keras/models
    split_layer: str | None  # where split-block fine-tuning cuts; "Add:last" = the last Add layer
    weights_url: str     # where Keras downloads weights_file from (NASNet's name differs there)
    # False where Keras builds the network differently unless weights="imagenet" (EfficientNet B0-B7 add an input
    # scaling only then), so a weights file would be read into a network that scales its input otherwise.
    file_weights: bool = True

    def preprocess(self, x):
        """This backbone's own preprocess_input ('caffe', [-1, 1], or none where the model normalises its 0-255
        input itself: EfficientNet, EfficientNetV2, ConvNeXt); returns a new array or tensor."""
        import keras
        fn = getattr(keras.applications, self.module).preprocess_input
        return fn(np.array(x, dtype=np.float32) if isinstance(x, np.ndarray) else x)  # it edits numpy in place

    def build(self, weights: str = "imagenet", image_size: int | None = None, pooling: str | None = "avg",
              input_tensor=None):
        """The CNN without its top: Keras's last feature maps, and with pooling='avg' their GlobalAveragePool.
        The pool is ours, not Keras's: Keras's pooled ConvNeXt normalises after pooling, so its features would not
        be the pooled maps that 04 fine-tunes and 08 exports (for the others the two are the same). On
        `input_tensor` (08), its layers join that tensor's graph instead of a nested model."""
        import keras
        size = image_size or self.size
        if size < self.min_size:
            raise CatDogError(f"{self.name} needs --image-size >= {self.min_size}, got {size}")
        if pooling not in (None, "avg"):
            raise ValueError(f"pooling must be None or 'avg', got {pooling!r}")
        ctor = getattr(keras.applications, self.constructor)
        w = resolve_weights(weights, self)
        build = functools.partial(ctor, include_top=False, weights=w, input_shape=(size, size, 3), pooling=None,
                                  input_tensor=input_tensor)
        try:
            net = build()
        except Exception as e:  # a download failure surfaces as various exception types
            if w is None:  # no weights were loaded: not a weights problem
                raise
            if w != "imagenet":
                raise CatDogError(f"could not load {self.name} weights from {w}: {e}") from e
            raise CatDogError(
                f"could not download {self.name}'s ImageNet weights ({e}). On a machine with internet fetch "
                f"{self.weights_url} and save it as ~/.keras/models/{self.weights_file}"
                + (" (or in any folder, and pass --weights FOLDER)" if self.file_weights else "")) from e
        if pooling is None:
            return net
        pooled = keras.layers.GlobalAveragePooling2D(name="avg_pool")(net.output)
        return keras.Model(net.input, pooled, name=net.name)


_NOTOP = "_weights_tf_dim_ordering_tf_kernels_notop.h5"
_APPS = "https://storage.googleapis.com/tensorflow/keras-applications/"
# The report's backbones, in its order: what 02 extracts by default.
REPORT_BACKBONES = ("ResNet50", "VGG16", "InceptionV3", "Xception", "InceptionResNetV2")
# Sizes, widths, file names and URLs are Keras's (keras/src/applications/); every min_size is Keras's own floor
# of 32, at which each of them builds and runs. The split layers cut before the last block (ConvNeXt: before its
# last stage, whose blocks end in ops, not layers); NASNet's cells each read the two cells before them, so no
# single layer splits it.
BACKBONES: dict[str, Backbone] = {b.name: b for b in [
    Backbone("ResNet50", "resnet50", "ResNet50", 224, 32, 2048, "resnet50" + _NOTOP, "conv5_block2_out",
             _APPS + "resnet/resnet50" + _NOTOP),
    Backbone("VGG16", "vgg16", "VGG16", 224, 32, 512, "vgg16" + _NOTOP, None, _APPS + "vgg16/vgg16" + _NOTOP),
    Backbone("InceptionV3", "inception_v3", "InceptionV3", 299, 75, 2048, "inception_v3" + _NOTOP, "mixed9",
             _APPS + "inception_v3/inception_v3" + _NOTOP),
    Backbone("Xception", "xception", "Xception", 299, 71, 2048, "xception" + _NOTOP, "Add:last",
             _APPS + "xception/xception" + _NOTOP),
    Backbone("InceptionResNetV2", "inception_resnet_v2", "InceptionResNetV2", 299, 75, 1536,
             "inception_resnet_v2" + _NOTOP, None, _APPS + "inception_resnet_v2/inception_resnet_v2" + _NOTOP),
    Backbone("EfficientNetV2S", "efficientnet_v2", "EfficientNetV2S", 384, 32, 1280, "efficientnetv2-s_notop.h5",
             "block6n_add", _APPS + "efficientnet_v2/efficientnetv2-s_notop.h5"),
    Backbone("EfficientNetV2L", "efficientnet_v2", "EfficientNetV2L", 480, 32, 1280, "efficientnetv2-l_notop.h5",
             "block7f_add", _APPS + "efficientnet_v2/efficientnetv2-l_notop.h5"),
    Backbone("EfficientNetB7", "efficientnet", "EfficientNetB7", 600, 32, 2560, "efficientnetb7_notop.h5",
             "block7c_add", "https://storage.googleapis.com/keras-applications/efficientnetb7_notop.h5",
             file_weights=False),
    Backbone("ConvNeXtBase", "convnext", "ConvNeXtBase", 224, 32, 1024, "convnext_base_notop.h5",
             "convnext_base_downsampling_block_2", _APPS + "convnext/convnext_base_notop.h5"),
    Backbone("ConvNeXtXLarge", "convnext", "ConvNeXtXLarge", 224, 32, 2048, "convnext_xlarge_notop.h5",
             "convnext_xlarge_downsampling_block_2", _APPS + "convnext/convnext_xlarge_notop.h5"),
    Backbone("NASNetLarge", "nasnet", "NASNetLarge", 331, 32, 4032, "nasnet_large_no_top.h5", None,
             _APPS + "nasnet/NASNet-large-no-top.h5"),
    Backbone("ResNet152V2", "resnet_v2", "ResNet152V2", 224, 32, 2048, "resnet152v2" + _NOTOP, "conv5_block2_out",
             _APPS + "resnet/resnet152v2" + _NOTOP),
]}


def get_backbone(name: str) -> Backbone:
    """Registry lookup with a helpful error."""
    if name not in BACKBONES:
        import difflib
        lower = {n.lower(): n for n in BACKBONES}
        close = difflib.get_close_matches(name.lower(), lower, n=1, cutoff=0.75)
        hint = f"did you mean {lower[close[0]]}? " if close else ""
        raise CatDogError(f"unknown backbone {name!r}: {hint}choose from {', '.join(BACKBONES)}")
    return BACKBONES[name]


def resolve_weights(spec: str, backbone: Backbone) -> str | None:
    """'imagenet' -> 'imagenet', 'none' -> None, a folder or .h5 file -> the weights file path."""
    if spec == "imagenet":
        return "imagenet"
    if spec.lower() == "none":
        return None
    if not backbone.file_weights:
        raise CatDogError(f"--weights {spec}: Keras builds {backbone.name}'s input scaling only with --weights "
                          f"imagenet, so a weights file would feed it other inputs; put {backbone.weights_file} in "
                          f"~/.keras/models/ (Keras then loads it from there, without downloading) and use "
                          f"--weights imagenet")
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / backbone.weights_file
    if not path.is_file():
        raise CatDogError(f"{path}: weights file not found (save {backbone.weights_url} in that folder as "
                          f"{backbone.weights_file}, or use --weights imagenet / none)")
    return str(path)


# ==================== Feature cache (HDF5) ==========================================================================

def feature_path(data_dir: str | Path, name: str) -> Path:
    """data/features/<name>.h5"""
    return Path(data_dir) / FEATURES / f"{name}.h5"


def feature_file_state(path: Path) -> dict | None:
    """A feature file's attributes if it is complete, else None."""
    import h5py
    with contextlib.suppress(OSError):
        with h5py.File(path, "r") as f:
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
        return attrs if attrs.get("complete") else None
    return None


@dataclass(frozen=True)
class ExtractSettings:
    """Everything that changes the numbers in a feature or maps file (the one source of truth for "settings"):
    the file's attributes, compared before reuse and kept in each model's sidecar, so a model only gets its own."""
    backbone: str
    image_size: int
    interpolation: str = "bilinear"
    decoder: str = "pil"
    jpeg_draft: bool = False
    weights: str = "imagenet"
    seed: int = DEFAULT_SEED
    mixed_precision: bool = False
    split_layer: str = ""     # maps files: the layer the backbone was cut after ("" for pooled features)
    dtype: str = "float32"
    views: int = 1            # 02 --views: feature rows of augmented views beside the plain ones
    views_dtype: str = ""     # their storage type ("" without views)

    def attrs(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, attrs: dict) -> ExtractSettings:  # the settings stored in a file's (or sidecar's) attributes
        return cls(**{f.name: attrs[f.name] for f in dataclasses.fields(cls) if f.name in attrs})


# Settings that add rows beside the plain ones without changing them: a model trained on a file's plain rows can
# use the file whatever its views.
VIEW_SETTINGS = ("views", "views_dtype")
ROW_SETTINGS = tuple(f.name for f in dataclasses.fields(ExtractSettings) if f.name not in VIEW_SETTINGS)


def setting_changes(stored: dict, wanted: dict, keys: Sequence[str] | None = None) -> list[str]:
    """The settings (all, or those in `keys`) in which two attribute sets differ; the seed only matters for
    random weights (`none`) or for views (it draws their transformations). A setting absent from a set (a file
    written before it existed) has its default."""
    def plain(attrs, f):  # HDF5 gives numpy scalars back
        v = attrs.get(f.name, f.default)
        return v.item() if hasattr(v, "item") else v
    return [f.name for f in dataclasses.fields(ExtractSettings)
            if (keys is None or f.name in keys) and plain(stored, f) != plain(wanted, f)
            and (f.name != "seed" or str(wanted.get("weights")) == "none"
                 or (int(wanted.get("views", 1)) > 1 and (keys is None or "views" in keys)))]


def laid_out_test_ids(data_dir: str | Path) -> np.ndarray:
    """The ids of the test images 01 laid out in test2/, checked against the test list 01 recorded in
    split.json: the set every feature file and every submission must cover exactly."""
    ids, paths = test_images(data_dir)
    meta_path = Path(data_dir) / SPLIT_META
    recorded = None
    with contextlib.suppress(OSError, ValueError, AttributeError):  # no readable record: 01 rebuilds it
        recorded = json.loads(meta_path.read_text()).get("test_sha256")
    names = "\n".join(Path(p).name for p in paths)
    if recorded and hashlib.sha256(names.encode()).hexdigest() != recorded:
        raise CatDogError(f"{Path(data_dir) / TEST2} no longer holds the {len(ids)} test images 01 laid out "
                          f"(see {meta_path}): rerun 01_reorganize_data.py, then 02")
    return ids


def check_same_settings(trained: dict, now: dict, what: str, now_where: str, fix: str,
                        keys: Sequence[str] = ROW_SETTINGS) -> None:
    """Refuse to use `what` (trained on features made with the `trained` settings) with features made with
    `now` (at `now_where`), naming both; `keys` limits the comparison to some settings (by default those of the
    plain rows: views are checked where they are used)."""
    changed = setting_changes(trained, now, keys)
    if changed:
        raise CatDogError(f"{what} was trained on features made with "
                          + ", ".join(f"{k}={trained.get(k)}" for k in changed) + f"; {now_where} now gives "
                          + ", ".join(f"{k}={now.get(k)}" for k in changed) + f": {fix}")


def rebuild_command(name: str, attrs: dict) -> str:
    """The command that makes the feature (or maps) file `name` again with the settings in `attrs`."""
    st = ExtractSettings.of({"backbone": name.split("_")[0], "image_size": 0, **attrs})
    flags = (f"--image-size {st.image_size} --weights {st.weights} --interpolation {st.interpolation} "
             f"--decoder {st.decoder} --seed {st.seed}")
    if st.split_layer:
        return f"04_finetune_split.py --model {st.backbone} --split-layer {st.split_layer} --dtype {st.dtype} {flags}"
    return (f"02_extract_features.py --models {st.backbone} {flags}" + " --jpeg-draft" * st.jpeg_draft
            + " --mixed-precision" * st.mixed_precision)


class FeatureWriter:
    """Appends feature rows to an HDF5 file built under a temp name (this process's own); `complete=True` and the
    rename come last. As a context manager it closes the file and removes the temp file whatever happens.

    With `view_params` ({'train': (V, N, 6), 'test': (V, M, 6)}, from view_params), the file also holds
    `train_views` (V, N, ...) and `test_views` (V, M, ...) in `views_dtype`, and the transformations as
    `train_view_params` and `test_view_params`; view 0 is written with the plain rows."""

    def __init__(self, path: Path, train_files: Sequence[str], labels: Sequence[int], test_ids: Sequence[int],
                 feature_shape: tuple[int, ...], dtype: str, attrs: dict,
                 view_params: dict[str, np.ndarray] | None = None, views_dtype: str = "float16"):
        self.path, self.tmp, self.file, self.attrs = check_writable_target(path), temp_name(path), None, attrs
        self.columns = {"label": np.asarray(labels, dtype=np.uint8), "test_ids": np.asarray(test_ids, dtype=np.int64),
                        "train_files": np.asarray(train_files, dtype=object).astype("S")}
        self.shape = {"train": (len(train_files), *feature_shape), "test": (len(test_ids), *feature_shape)}
        self.dtypes = {"train": dtype, "test": dtype}
        if view_params:
            for part, params in view_params.items():
                self.columns[f"{part}_view_params"] = np.asarray(params, np.float32)
                self.shape[f"{part}_views"] = (len(params), *self.shape[part])
                self.dtypes[f"{part}_views"] = views_dtype
        self.feature_shape = tuple(feature_shape)
        self.pos = {"train": 0, "test": 0} | {(part, v): 0 for part, params in (view_params or {}).items()
                                              for v in range(len(params))}

    def __enter__(self) -> FeatureWriter:
        import h5py
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.file = h5py.File(self.tmp, "w")
            # One row per chunk: streaming training reads single rows fast; no compression (10x slower reads).
            row = self.feature_shape
            self.data = {part: self.file.create_dataset(part, shape, self.dtypes[part],
                                                        chunks=(1,) * (len(shape) - len(row)) + row)
                         for part, shape in self.shape.items()}
            for k, v in self.columns.items():
                self.file[k] = v
        except BaseException:
            self.__exit__()
            raise
        return self

    def append(self, part: str, rows: np.ndarray, view: int = 0) -> None:
        """Write the next batch of rows of `part` ('train' or 'test'), of its plain images (view 0: also the first
        of its views) or of view `view`."""
        if view == 0:
            start = self.pos[part]
            self.data[part][start:start + len(rows)] = rows
            self.pos[part] = start + len(rows)
        if (part, view) in self.pos:
            start = self.pos[part, view]
            # numpy's rounding to float16, not HDF5's (which differs in the last bit): view 0 then equals
            # the plain rows cast with astype exactly.
            self.data[f"{part}_views"][view, start:start + len(rows)] = rows.astype(self.dtypes[f"{part}_views"])
            self.pos[part, view] = start + len(rows)

    def commit(self) -> None:
        """Check every row was written, mark complete, rename into place."""
        for key, count in self.pos.items():  # 'train', 'test', and (part, view) pairs
            want = self.shape[key if isinstance(key, str) else key[0]][0]
            if count != want:
                raise RuntimeError(f"{self.path}: wrote {count} of {want} {key} rows")
        self.file.attrs.update({**self.attrs, "complete": True})
        self.file.close()
        os.replace(self.tmp, self.path)

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            with contextlib.suppress(Exception):
                self.file.close()
        self.tmp.unlink(missing_ok=True)


def image_parts(data_dir: str | Path) -> tuple[pd.DataFrame, dict[str, list[str]], np.ndarray]:
    """split.csv, the image paths of the 'train' (split.csv order) and 'test' (id order) rows, test ids."""
    split = read_split(data_dir)
    ids, test_paths = test_images(data_dir)
    return split, {"train": train_image_paths(data_dir, split), "test": test_paths}, ids


def rows_mismatch(path: Path, split: pd.DataFrame, test_ids: np.ndarray) -> str:
    """Why the rows of a complete feature file no longer line up with split.csv or the test images 01
    laid out ('' when they do)."""
    import h5py
    with h5py.File(path, "r") as f:
        files, ids = f["train_files"][:].astype(str), f["test_ids"][:]
    if not np.array_equal(files, split.filename.to_numpy(str)):
        return (f"its {len(files)} labelled rows do not match the order of {SPLIT_CSV} ({len(split)} rows): "
                f"01 was rerun since")
    if not np.array_equal(ids, test_ids):
        was, now = set(ids.tolist()), set(test_ids.tolist())
        gone, new = sorted(was - now), sorted(now - was)
        return (f"its {len(ids)} test rows do not match the {len(test_ids)} images in {TEST2} (gone: {gone[:3]}, "
                f"new: {new[:3]}): the test folder changed since")
    return ""


def stale_reason(path: Path, settings: ExtractSettings, split: pd.DataFrame, test_ids: np.ndarray) -> str:
    """Why an existing feature file must be redone ('missing', 'incomplete', other settings or rows),
    or '' when it can be kept."""
    state = feature_file_state(path)
    if state is None:
        return "missing" if not path.exists() else "incomplete"
    changed = setting_changes(state, settings.attrs())
    if changed:
        return "made with other settings (" + ", ".join(f"{k}={state.get(k)}, now {getattr(settings, k)}"
                                                         for k in changed) + ")"
    return rows_mismatch(path, split, test_ids)


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


def extract_to_file(step, shape: tuple[int, ...], data_dir: str | Path, out_path: Path, settings: ExtractSettings,
                    batch_size: int, strategy=None) -> int:
    """Run every train2 and test2 image through `step` (see make_extract_step) into an HDF5 file of rows of
    `shape`, batch by batch: memory stays flat, the file appears only once complete. Returns the image count."""
    import tensorflow as tf

    split, parts, ids = image_parts(data_dir)
    attrs = {**settings.attrs(), **versions()}
    params = {part: np.stack([view_params(settings.seed, [f"{part}/{Path(p).name}" for p in paths], v)
                              for v in range(settings.views)]) for part, paths in parts.items()
              } if settings.views > 1 else None
    try:
        with FeatureWriter(out_path, split.filename, split.label, ids, shape, settings.dtype, attrs, params,
                           settings.views_dtype) as writer:
            for view, (part, paths) in itertools.product(range(settings.views), parts.items()):
                ds = image_dataset(paths, settings.image_size, batch_size, settings.interpolation,
                                   settings.jpeg_draft, decoder=settings.decoder, params=params[part][view] if view
                                   else None)
                if strategy is not None and strategy.num_replicas_in_sync > 1:
                    ds = strategy.experimental_distribute_dataset(ds)
                batches = iter(ds)
                desc = f"{out_path.stem} {part}" + (f" view {view}" if view else "")
                for k in progress(range(math.ceil(len(paths) / batch_size)), desc):
                    try:
                        x = next(batches)
                    except tf.errors.OpError as e:
                        chunk = paths[k * batch_size:(k + 1) * batch_size]
                        bad = find_undecodable(chunk, settings.image_size, settings.interpolation, settings.decoder)
                        raise CatDogError(f"cannot decode {bad or 'an image in ' + ', '.join(chunk[:3])}: "
                                          f"rerun 01_reorganize_data.py, which skips broken files") from e
                    writer.append(part, step(x).numpy().astype(settings.dtype), view)
            writer.commit()  # HDF5 flushes its chunk cache here: a full disk can surface now too
    except OSError as e:  # h5py's write errors carry the errno in their text only
        if e.errno != errno.ENOSPC and "No space left" not in str(e):
            raise
        need = sum(len(p) for p in parts.values()) * math.prod(shape) * (
            np.dtype(settings.dtype).itemsize + (settings.views * np.dtype(settings.views_dtype).itemsize
                                                 if settings.views > 1 else 0))
        raise CatDogError(f"{out_path.parent} is full: {out_path.name} needs about {need / 2**20:,.0f} MiB there; "
                          f"the partial file was removed. Free space and rerun") from e
    return sum(len(p) for p in parts.values())


def progress(it, desc: str):
    """A tqdm progress bar over `it` (batches)."""
    from tqdm import tqdm
    return tqdm(it, desc=desc, unit="batch", leave=False, mininterval=1.0)


@dataclass
class Features:
    """Aligned feature matrices of one or more backbones: `labelled` holds every labelled row (split.csv
    order, its train and valid rows), `test` every test row (id order)."""
    names: list[str]
    labelled: list[np.ndarray]
    labels: np.ndarray
    files: np.ndarray        # labelled rows' file names
    valid: np.ndarray        # boolean mask of split.csv's valid rows
    test: list[np.ndarray]
    test_ids: np.ndarray
    attrs: list[dict]
    paths: list[Path]
    labelled_views: list[np.ndarray] = dataclasses.field(default_factory=list)  # (V, N, D) each, when loaded
    test_views: list[np.ndarray] = dataclasses.field(default_factory=list)      # (V, M, D) each

    def subset(self, name: str) -> tuple[list[np.ndarray], np.ndarray]:
        """(inputs, labels) of split.csv's 'train' or 'valid' rows."""
        mask = self.valid if name == "valid" else ~self.valid
        return [x[mask] for x in self.labelled], self.labels[mask]

    def predict(self, model, part: str, batch_size: int = 256) -> np.ndarray:
        """Dog probabilities of the 'labelled' or 'test' rows: the one predict entry point for models fed
        from feature files. Parts not loaded (maps files are too big for RAM) are streamed from the files
        in contiguous slices."""
        if part.endswith("_views"):  # (V, rows): each view's probabilities
            views = self.labelled_views if part == "labelled_views" else self.test_views
            if not views:
                raise ValueError(f"{part} were not loaded")
            return np.stack([np.asarray(model.predict(model_inputs([x[v].astype(np.float32) for x in views]),
                                                      batch_size=batch_size, verbose=0)).ravel()
                             for v in range(len(views[0]))])
        loaded = {"labelled": self.labelled, "test": self.test}[part]
        if loaded:
            return np.asarray(model.predict(model_inputs(loaded), batch_size=batch_size, verbose=0)).ravel()
        import h5py
        key = "train" if part == "labelled" else "test"  # the files' dataset names
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(h5py.File(p, "r")) for p in self.paths]
            n = files[0][key].shape[0]
            out = [np.asarray(model.predict_on_batch(model_inputs([f[key][s:s + batch_size] for f in files])))
                   for s in progress(range(0, n, batch_size), f"predict {part}")]
        return np.concatenate(out).ravel() if out else np.zeros(0, np.float32)


def load_features(model_names: Sequence[str], data_dir: str | Path, parts: Iterable[str] = ("labelled", "test"),
                  views: int | None = None) -> Features:
    """Load feature files and check they line up row by row with split.csv and the test images on disk.
    `parts` may also name 'labelled_views' and 'test_views': the first `views` views (all without it) of
    files 02 wrote with --views, checked to be the same transformations in every file."""
    import h5py
    parts = tuple(parts)
    view_parts = [p for p in parts if p.endswith("_views")]
    if view_parts:
        views = check_views(model_names, data_dir, views)
    split = read_split(data_dir)
    test_ids = laid_out_test_ids(data_dir)
    out, attrs, paths, file_ids = {"labelled": [], "test": [], "labelled_views": [], "test_views": []}, [], [], test_ids
    for name in model_names:
        path = feature_path(data_dir, name)
        state = feature_file_state(path)
        if state is None:
            step = (f"04_finetune_split.py --model {name.split('_')[0]}" if name.endswith("_maps")
                    else f"02_extract_features.py --models {name}")
            raise CatDogError(f"{path} is missing or incomplete: run {step}")
        mismatch = rows_mismatch(path, split, test_ids)
        if mismatch:
            raise CatDogError(f"{path}: {mismatch}: rerun {rebuild_command(name, state)}")
        with h5py.File(path, "r") as f:
            file_ids = f["test_ids"][:]  # the rows the file really holds (equal to the disk's, checked above)
            for part in parts:
                key = part.replace("labelled", "train")  # the files' dataset names
                out[part].append(f[key][:views] if part in view_parts else f[key][:])
        attrs.append(state)
        paths.append(path)
    return Features(list(model_names), out["labelled"], split.label.to_numpy(np.float32), split.filename.to_numpy(str),
                    (split.subset == "valid").to_numpy(), out["test"], file_ids, attrs, paths,
                    out["labelled_views"], out["test_views"])


def check_views(model_names: Sequence[str], data_dir: str | Path, views: int | None) -> int:
    """Refuse feature files without `views` views (at least two when None: all they hold in common), or whose
    views are not the same transformations (another --seed); returns the number of views used."""
    import h5py
    states = {}
    for name in model_names:
        path = feature_path(data_dir, name)
        state = feature_file_state(path)
        if state is None:
            raise CatDogError(f"{path} is missing or incomplete: run 02_extract_features.py --models {name}")
        have, need = int(state.get("views", 1)), views or 2
        if have < need:
            raise CatDogError(f"{path} holds {'no augmented views' if have == 1 else f'{have} views'}"
                              f" and {need} are needed: rerun 02_extract_features.py --models {name} --views "
                              f"{views or 4} (or ask for fewer views)")
        states[name] = state
    used = views or min(int(st["views"]) for st in states.values())
    first = None
    for name, state in states.items():
        path = feature_path(data_dir, name)
        with h5py.File(path, "r") as f:
            params = f["train_view_params"][:used], f["test_view_params"][:used]
        if first is not None and not all(np.array_equal(a, b) for a, b in zip(first[1], params, strict=True)):
            raise CatDogError(f"{path}'s views are other transformations than {first[0]}'s (extracted with --seed "
                              f"{state.get('seed')} and {first[2]}): rerun 02_extract_features.py --models {name} "
                              f"--views {state.get('views')} --seed {first[2]}")
        first = first or (path, params, state.get("seed"))
    return used


# ==================== Heads =========================================================================================

def set_seed(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow. Call it before building any layer: Keras 3 draws each
    initializer's and Dropout's seed when the layer is created, so seeding after building is too late."""
    import keras
    keras.utils.set_random_seed(seed)


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


def build_head(input_dims: dict[str, int], dropout: float, optimizer, seed: int):
    """The report's head: one Input per backbone -> Concatenate (if several) -> Dropout -> Dense(1, sigmoid).
    Seeded first, so the same seed builds the same initial weights and dropout masks in any process."""
    import keras
    set_seed(seed)
    inputs = [keras.Input((dim,), name=name) for name, dim in input_dims.items()]
    x = inputs[0] if len(inputs) == 1 else keras.layers.Concatenate(name="concat")(inputs)
    x = keras.layers.Dropout(dropout)(x)
    out = keras.layers.Dense(1, activation="sigmoid", name="prediction")(x)
    # Keras scope names may not contain '+', so "ResNet50+Xception" is named "head_ResNet50_Xception".
    model = keras.Model(inputs if len(inputs) > 1 else inputs[0], out, name="head_" + "_".join(input_dims))
    model.compile(optimizer=optimizer, loss="binary_crossentropy", metrics=["accuracy"])
    return model


def head_args(p: argparse.ArgumentParser, epochs: int, optimizer: str = "adadelta", sgd_lr: float = 0.01) -> None:
    """Training flags shared by 03, 04 and 05; defaults are the report's. --lr defaults by optimizer."""
    p.add_argument("--epochs", type=POSITIVE_INT, default=epochs, help="training epochs")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=128, help="rows per training batch")
    p.add_argument("--optimizer", default=optimizer, choices=["adadelta", "sgd"], help="optimizer")
    p.add_argument("--lr", type=POSITIVE,
                   help=f"learning rate (default: 1.0 for adadelta, Keras 2's default that the report used; "
                        f"{sgd_lr} for sgd)")
    p.add_argument("--rho", type=number(float, 0, 1, low_open=True, high_open=True), default=0.95,
                   help="Adadelta's decay rate rho")
    p.add_argument("--momentum", type=number(float, 0, 1, high_open=True), default=0.9, help="SGD momentum")
    p.add_argument("--decay", type=number(float, 0), default=0.0,
                   help="SGD's Keras 2 learning-rate decay: lr / (1 + decay * step)")
    p.add_argument("--dropout", type=DROPOUT, default=0.5, help="dropout rate before the Dense layer")
    p.set_defaults(sgd_lr=sgd_lr)


def views_arg(p: argparse.ArgumentParser) -> None:
    """--views for the heads (03, 05, 06): train on feature files' augmented views."""
    p.add_argument("--views", type=POSITIVE_INT, default=1,
                   help="1: train on the plain features (the report); V > 1: each epoch each training row is "
                        "one of the first V views 02 --views wrote, drawn at random (seeded); validation always "
                        "uses the plain rows, so val_loss compares with the report's")


def head_parts(args: argparse.Namespace) -> dict:
    """load_features' `parts` and `views` for a head trained with `args.views`."""
    if args.views > 1:
        return {"parts": ("labelled", "test", "labelled_views"), "views": args.views}
    return {"parts": ("labelled", "test")}


def view_sampler(views: list[np.ndarray], rows: np.ndarray, seed: int) -> Callable[[int], object]:
    """Epoch -> the training inputs of that epoch: row `rows[i]` of a view drawn for it from (seed, epoch), the
    same view in every backbone's features (they hold the same transformations). Only one epoch's float32
    inputs exist at a time beside the float16 views."""
    def inputs(epoch: int):
        pick = np.random.default_rng([seed, epoch]).integers(len(views[0]), size=len(rows))
        return model_inputs([v[pick, rows].astype(np.float32) for v in views])
    return inputs


def resolve_head_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill --lr's optimizer-dependent default (after parse_args; vars(args) then holds the value used)."""
    if args.lr is None:
        args.lr = 1.0 if args.optimizer == "adadelta" else args.sgd_lr
    del args.sgd_lr
    return args


def clip_args(p: argparse.ArgumentParser) -> None:
    """--clip-low/--clip-high, shared by every step that writes a submission; check with clip_range()."""
    p.add_argument("--clip-low", type=PROBABILITY, default=CLIP[0], help="lowest probability submitted")
    p.add_argument("--clip-high", type=PROBABILITY, default=CLIP[1], help="highest probability submitted")


def clip_range(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[float, float]:
    """The clip range, refused by argparse (before any work) unless low < high."""
    if not args.clip_low < args.clip_high:
        p.error(f"--clip-low ({args.clip_low}) must be below --clip-high ({args.clip_high})")
    return args.clip_low, args.clip_high


# ==================== Training ======================================================================================

# Folders under --model-dir: what each step writes, and where later steps (04, 07) read it.
SINGLE_DIR, FINETUNE_DIR, MERGE_DIR, HYPEROPT_DIR = "single", "finetune", "merge", "hyperopt"
LOGS_DIR, ANALYSIS_DIR = "logs", "analysis"
HYPEROPT_BEST = Path(HYPEROPT_DIR) / "best.keras"


def check_model_dir(model_dir: Path) -> None:
    """Refuse a --model-dir that is a file, saying what to give instead."""
    if model_dir.exists() and not model_dir.is_dir():
        raise CatDogError(f"--model-dir {model_dir} is a file, not a folder: give the folder that 03, 05 or 06 "
                          f"saved their models in (default: model)")


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in blocks (models are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pick_model(model_dir: Path) -> tuple[Path, str]:
    """The model to submit and why it was chosen."""
    check_model_dir(model_dir)
    best = model_dir / HYPEROPT_BEST
    if best.is_file():
        return best, "hyperopt's best model (the report's final step)"
    for step, what in ((MERGE_DIR, "merged model"), (SINGLE_DIR, "single-backbone head")):
        results = model_dir / step / "results.csv"
        if results.is_file():
            df = pd.read_csv(results)
            df = df[[(model_dir / step / f"{m}.keras").is_file() for m in df.model]]
            if len(df):
                row = df.loc[df.val_loss.idxmin()]
                return (model_dir / step / f"{row.model}.keras",
                        f"the {what} with the lowest val_loss in {results} ({row.val_loss:.5f})")
    raise CatDogError(f"no trained model under {model_dir}/: run 03 or 05 first, or pass --model")


def model_inputs(xs: list[np.ndarray]):
    """A single array for one-input models, the list for merged ones."""
    return xs[0] if len(xs) == 1 else xs


def tensorboard(log_dir: Path):
    """A TensorBoard callback writing to an emptied `log_dir` (a rerun would otherwise draw two curves)."""
    import keras
    shutil.rmtree(log_dir, ignore_errors=True)
    return keras.callbacks.TensorBoard(str(log_dir))


def fit(model, train, valid, epochs: int, callbacks: Sequence, batch_size: int | None = None,
        initial_epoch: int = 0) -> pd.DataFrame:
    """Train `model` and return its history with a 1-based `epoch` column. `train`: (inputs, labels) arrays, the
    inputs possibly a callable giving each epoch's (see fit_arrays), trained by fit_arrays (Keras's fit, faster);
    or a dataset that batches and shuffles itself, trained by Keras's fit."""
    if isinstance(train, tuple):
        x, y = train
        hist = fit_arrays(model, x, y, batch_size=batch_size, epochs=epochs, verbose=2, callbacks=list(callbacks),
                          validation_data=valid, initial_epoch=initial_epoch)
    else:
        hist = model.fit(train, validation_data=valid, epochs=epochs, initial_epoch=initial_epoch, shuffle=False,
                         verbose=2, callbacks=list(callbacks))
    df = pd.DataFrame(hist.history)
    df.insert(0, "epoch", np.arange(initial_epoch + 1, initial_epoch + len(df) + 1))
    return df


# Keras's fit on arrays spends much of a head's epoch on per-step overhead: a tf.data batch and a Python call per
# step, 125 steps an epoch for the report's merged head. fit_arrays runs a whole epoch in one tf.function call
# instead, with the same steps in the same order, so every result stays Keras's own (tests/test_heads.py compares
# them) in about half the time (benchmarks/heads_bench.md).

def fit_arrays(model, x, y, *, batch_size: int | None = None, epochs: int = 1, verbose="auto",
               callbacks: Sequence | None = None, validation_data=None, shuffle: bool = True, initial_epoch: int = 0,
               validation_batch_size: int | None = None):
    """Keras's `model.fit(x, y, ...)` on arrays, run an epoch per tf.function call: the same batches in the same
    order (Keras's own shuffle), the same train_step and test_step, the same callbacks' hooks and logs (batch
    hooks once per epoch, as Keras makes them with steps_per_execution = steps per epoch), the same
    History, returned. `x`: an array, a list of arrays (one per model input), or a callable epoch -> those
    (epoch 0-based, counted as Keras does from 0 across initial_epoch) giving that epoch's training inputs:
    the same rows in the same shapes every epoch (e.g. an augmented view of the features); each epoch's
    result replaces the last. `validation_data`: (inputs, labels) arrays or None."""
    import keras
    import tensorflow as tf
    from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

    y = _as_tensor(y)
    n, batch_size = len(y), batch_size or 32  # 32: Keras's default
    if n == 0:
        raise CatDogError("fit_arrays: no training rows")
    xs = None if callable(x) else _check_rows(_as_tensors(x), n, "training inputs")
    steps = math.ceil(n / batch_size)
    # Keras's fit draws each epoch's order in a dataset of row numbers built like this one (by its ArrayDataAdapter,
    # a Keras internal): iterating it per epoch gives the same rows in the same batches as Keras's fit on these
    # arrays. tests/test_heads.py fails if a Keras upgrade changes that.
    order = ArrayDataAdapter(np.arange(n), batch_size=batch_size, shuffle=shuffle).get_tf_dataset()
    train_epoch = tf.function(functools.partial(_run_batches, model.train_step, n, batch_size),
                              jit_compile=model.jit_compile, autograph=False)
    if validation_data is not None:
        xv, yv = validation_data
        yv = _as_tensor(yv)
        xv = _check_rows(_as_tensors(xv), len(yv), "validation inputs")
        valid_size = validation_batch_size or batch_size
        valid_epoch = tf.function(functools.partial(_run_batches, model.test_step, len(yv), valid_size),
                                  jit_compile=model.jit_compile, autograph=False)
    if not isinstance(callbacks, keras.callbacks.CallbackList):  # as Keras's fit takes them
        callbacks = keras.callbacks.CallbackList(callbacks, add_history=True, add_progbar=verbose != 0,
                                                 verbose=verbose, epochs=epochs, steps=steps, model=model)
    model.stop_training = False
    callbacks.on_train_begin()
    logs, shapes = None, None
    for epoch in range(initial_epoch, epochs):
        model.reset_metrics()
        callbacks.on_epoch_begin(epoch)
        if callable(x):
            xs = None  # the last epoch's inputs go before this one's are made
            xs = _check_rows(_as_tensors(x(epoch)), n, f"training inputs of epoch {epoch}")
            shapes = shapes or [a.shape for a in xs]
            if [a.shape for a in xs] != shapes:
                raise CatDogError(f"fit_arrays: the training inputs of epoch {epoch} have shapes "
                                  f"{[tuple(a.shape) for a in xs]}, not those of the first epoch's "
                                  f"{[tuple(s) for s in shapes]}: every epoch needs the same shapes")
        if epoch == initial_epoch:
            _build_for_training(model, xs, y)
        callbacks.on_train_batch_begin(0)
        train_epoch(xs, y, tf.concat(list(order), 0))
        logs = model.get_metrics_result()
        callbacks.on_train_batch_end(steps - 1, logs)
        logs = dict(logs)
        if validation_data is not None:
            callbacks.on_test_begin()
            model.reset_metrics()
            callbacks.on_test_batch_begin(0)
            valid_epoch(xv, yv, None)
            val = {k: float(v) for k, v in model.get_metrics_result().items()}
            callbacks.on_test_batch_end(math.ceil(len(yv) / valid_size) - 1, val)
            callbacks.on_test_end(val)
            logs.update({f"val_{k}": v for k, v in val.items()})
        callbacks.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    if epochs > 0:
        model.optimizer.finalize_variable_values(model.trainable_weights)
    callbacks.on_train_end(logs)
    return model.history


def _as_tensor(a):
    """An array as a tensor, floats as Keras's floatx (as Keras's fit feeds them)."""
    import keras
    import tensorflow as tf
    a = np.asarray(a)
    if np.issubdtype(a.dtype, np.floating) and a.dtype != keras.config.floatx():
        a = a.astype(keras.config.floatx())
    return tf.identity(tf.convert_to_tensor(a))  # identity: onto the accelerator, if there is one


def _as_tensors(x) -> tuple:
    """A model's inputs (an array or a list of arrays) as a tuple of tensors."""
    return tuple(_as_tensor(a) for a in (x if isinstance(x, (list, tuple)) else [x]))


def _check_rows(xs: tuple, n: int, what: str) -> tuple:
    """`xs`, refused unless each has one row per label (Keras's fit would say 'Data cardinality is ambiguous')."""
    if any(len(a) != n for a in xs):
        raise CatDogError(f"fit_arrays: the {what} have shapes {[tuple(a.shape) for a in xs]}: each needs one row "
                          f"per label ({n})")
    return xs


def _build_for_training(model, xs: tuple, y) -> None:
    """Create the variables that Keras's first train step would (the compiled loss's and metrics', the
    optimizer's), from one row, without training: _run_batches' loop may not create any. The metrics that row
    updated are reset."""
    x1, y1 = tuple(a[:1] for a in xs), y[:1]
    x1 = x1 if len(x1) > 1 else x1[0]
    y_pred = model(x1, training=False)
    model.compute_loss(x1, y1, y_pred, training=False)
    model.compute_metrics(x1, y1, y_pred)
    model.reset_metrics()
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def _run_batches(step, n: int, batch_size: int, xs: tuple, y, order) -> None:
    """Inside a tf.function: `step((inputs, labels))` on each batch of `batch_size` rows (the last one smaller
    if `n` is not a multiple), in order; rows `order[i]` (None: 0..n-1). The full batches run in a loop, one
    iteration at a time (each step reads the weights the last one wrote); the variables must exist already
    (_build_for_training)."""
    import tensorflow as tf

    def batch(start, size: int):
        rows = start + tf.range(size) if order is None else tf.slice(order, [start], [size])
        x = tuple(tf.gather(a, rows) for a in xs)
        step((x if len(x) > 1 else x[0], tf.gather(y, rows)))

    def body(i):
        batch(i * batch_size, batch_size)
        return i + 1

    full, rest = divmod(n, batch_size)
    if full:
        tf.while_loop(lambda i: i < full, body, [tf.constant(0)], parallel_iterations=1)
    if rest:
        batch(full * batch_size, rest)


def fit_head(name: str, feats: Features, args: argparse.Namespace, trained: np.ndarray, held: np.ndarray,
             out_dir: Path, log_dir: Path, seed: int, meta: dict):
    """One head of 03/05: the report's head on `feats` (one input per backbone), built with `seed`, trained on the
    labelled rows `trained` (each epoch one of their views with --views) and validated on the rows `held`, then
    saved by finish_run as <out_dir>/<name>.keras with `meta`. Returns (model, results row)."""
    dims = {n: x.shape[1] for n, x in zip(feats.names, feats.labelled, strict=True)}
    optimizer = make_optimizer(args.optimizer, args.lr, args.momentum, args.decay, args.rho)
    model = build_head(dims, args.dropout, optimizer, seed)
    valid = (model_inputs([x[held] for x in feats.labelled]), feats.labels[held])
    xtr = (view_sampler(feats.labelled_views, trained, seed) if args.views > 1
           else model_inputs([x[trained] for x in feats.labelled]))
    hist = fit(model, (xtr, feats.labels[trained]), valid, args.epochs, [tensorboard(log_dir)], args.batch_size)
    return model, finish_run(name, model, hist, valid, out_dir, args, meta)


def head_meta(feats: Features, args: argparse.Namespace, step: str) -> dict:
    """The sidecar entries a head of 03/05 needs (its kind, features and split), for 04 and 07."""
    return {"kind": step, "features": feats.names, "feature_attrs": feats.attrs,
            "split_sha256": split_fingerprint(args.data_dir)}


def train_head(name: str, feats: Features, args: argparse.Namespace, step: str):
    """03's and 05's run: fit_head on split.csv's train rows, validated on its valid rows, saved under
    <model-dir>/<step>/ (step: SINGLE_DIR or MERGE_DIR, also the sidecar's kind). Returns (model, results row)."""
    return fit_head(name, feats, args, np.flatnonzero(~feats.valid), np.flatnonzero(feats.valid),
                    Path(args.model_dir) / step, Path(args.model_dir) / LOGS_DIR / step / name, args.seed,
                    head_meta(feats, args, step))


def finish_run(name: str, model, history: pd.DataFrame, valid, out_dir: Path, args: argparse.Namespace,
               meta: dict, saved_epoch: int | None = None) -> dict:
    """Evaluate the trained model on the valid rows, then save it, its sidecar and its history; returns the results
    row, which describes exactly the saved model (whose weights are `saved_epoch`'s, default the last epoch's).
    Nothing is written for a run that diverged."""
    x, y = valid if isinstance(valid, tuple) else (valid, None)
    scores = model.evaluate(x, y, verbose=0, return_dict=True)
    if not all(math.isfinite(v) for v in scores.values()):
        raise CatDogError(f"{name}: training diverged (val_loss {scores['loss']}); nothing was saved: "
                          f"lower --lr")
    saved_epoch = saved_epoch or int(history.epoch.iloc[-1])
    best = int(history.val_loss.idxmin())
    row = {"model": name, "val_loss": scores["loss"], "val_acc": scores["accuracy"], "saved_epoch": saved_epoch,
           "best_epoch": int(history.epoch[best]), "best_val_loss": float(history.val_loss[best]),
           "epochs": len(history), "seed": args.seed}
    save_model(model, out_dir / f"{name}.keras", {**meta, "args": vars(args), "seed": args.seed,
                                                  "val_loss": row["val_loss"], "val_acc": row["val_acc"],
                                                  "saved_epoch": saved_epoch})
    write_csv(history, out_dir / f"{name}.history.csv")
    log.info(f"{name}: val_loss {row['val_loss']:.5f}, val_acc {row['val_acc']:.4f} of the saved model "
             f"(epoch {saved_epoch}; best epoch {row['best_epoch']}: {row['best_val_loss']:.5f})")
    return row


def write_results(rows: list[dict], out_dir: Path, title: str, baseline: str | None = None,
                  show: bool = True) -> pd.DataFrame:
    """Merge `rows` into `out_dir/results.csv` (a rerun of one model replaces its row), print it (`show`),
    and plot every listed model's val_loss curve into `out_dir/val_loss.png`."""
    path = out_dir / "results.csv"
    new = pd.DataFrame(rows)
    with contextlib.suppress(FileNotFoundError, pd.errors.ParserError, pd.errors.EmptyDataError):
        old = pd.read_csv(path)
        if "model" in old.columns:
            new = pd.concat([old[~old.model.isin(new.model)], new], ignore_index=True)
    write_csv(new, path)
    if show:
        log.info(f"\n{title}\n" + new.to_string(index=False, float_format=lambda v: f"{v:.5f}"))
    histories = {m: pd.read_csv(out_dir / f"{m}.history.csv") for m in new.model
                 if (out_dir / f"{m}.history.csv").is_file()}
    saved = dict(zip(new.model, new.get("saved_epoch", pd.Series(dtype=float)), strict=False))
    plot_curves(histories, out_dir / "val_loss.png", title=title,
                baseline=baseline if baseline in histories else None, marks=saved)
    return new


def save_model(model, path: str | Path, meta: dict) -> None:
    """Save `<path>.keras` and its `<path>.json` sidecar: the run's whole configuration (`args`: every flag
    with its resolved default), the feature files' settings, the seed and library versions, so that any
    result can be rerun from its sidecar alone."""
    path = Path(path)
    sidecar = {**meta, **versions()}
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)
        write_json(sidecar, path.with_suffix(".json"))  # inside: the model is renamed only after its sidecar
    log.info(f"saved {path} and its sidecar {path.with_suffix('.json').name}")


# What a sidecar must hold, by kind, for 04 and 07 to feed its model as it was trained.
SIDECAR_KEYS = {kind: ("features", "feature_attrs", "seed") for kind in ("single", "merge", "hyperopt", "finetune")}
SIDECAR_KEYS["finetune_full"] = ("backbone", "feature_attrs", "seed")


def load_model(path: str | Path):
    """A saved model and its sidecar metadata, with a clear message for anything missing or broken."""
    path = Path(path)
    if path.suffix == ".keras" and not path.is_file():
        raise CatDogError(f"{path} not found: train the model first, or check --model")
    meta = read_sidecar(path)  # the cheap checks first
    return load_keras(path), meta


def read_sidecar(path: str | Path) -> dict:
    """The sidecar of the saved model `path` (`<name>.json` beside `<name>.keras`), checked to hold what its
    kind needs, with a clear message for anything missing or broken."""
    path = Path(path)
    if path.suffix != ".keras":
        raise CatDogError(f"{path} is not a .keras model: give one that 03-06 saved (model/<step>/<name>.keras)")
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise CatDogError(f"{meta_path} not found: train the model first, or check --model")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CatDogError(f"{meta_path} is not a valid sidecar (not JSON: {e}): retrain {path.name}") from e
    if not isinstance(meta, dict) or meta.get("kind") not in SIDECAR_KEYS:
        raise CatDogError(f"{meta_path} is not a catdog sidecar (no known 'kind'): retrain {path.name}")
    missing = [k for k in SIDECAR_KEYS[meta["kind"]] if k not in meta]
    if missing:
        raise CatDogError(f"{meta_path} lacks {', '.join(missing)}: retrain {path.name}")
    return meta


def load_keras(path: str | Path):
    """A saved .keras model, with a clear message for a broken file."""
    import keras
    path = Path(path)
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):  # Keras would call it "File not found"
        size = path.stat().st_size
        raise CatDogError(f"{path} is not a readable Keras model ("
                          + ("empty: 0 bytes" if size == 0 else f"{size:,} bytes, not a complete .keras zip")
                          + "): it may be truncated; retrain it")
    try:
        return keras.models.load_model(path)
    except Exception as e:  # Keras raises ValueError, OSError, zipfile errors... for a broken file
        raise CatDogError(f"{path} is not a readable Keras model ({type(e).__name__}: {str(e)[:200]}): it may be "
                          f"truncated; retrain it") from e


def check_trained_on(model_path: str | Path, meta: dict, feats: Features) -> None:
    """Refuse to feed a saved model features made with other settings than those it was trained on
    (e.g. 02 rerun at another --image-size), naming both."""
    if len(meta["feature_attrs"]) != len(feats.names):
        raise CatDogError(f"{model_path}: its sidecar does not record how its features {meta['features']} "
                          f"were made: retrain it")
    for name, trained, now, path in zip(feats.names, meta["feature_attrs"], feats.attrs, feats.paths, strict=True):
        check_same_settings(trained, now, f"{model_path} ({name})", str(path),
                            f"rerun {rebuild_command(name, trained)}, or retrain the model")


def predict_images(model, paths: Sequence[str], meta: dict, batch_size: int = 64, mirror: bool = False
                   ) -> np.ndarray:
    """Dog probabilities of images (or of their mirror images) for a model fine-tuned end to end (04 --mode
    full), fed as it was trained."""
    st = ExtractSettings.of(meta["feature_attrs"][0])
    preprocess = get_backbone(st.backbone).preprocess
    if mirror:  # flipping the resized image equals resizing the flipped one (the filters are symmetric)
        def preprocess(x, plain=preprocess):
            return plain(x[:, :, ::-1, :])
    ds = image_dataset(paths, st.image_size, batch_size, st.interpolation, decoder=st.decoder, preprocess=preprocess)
    return np.asarray(model.predict(ds, verbose=0)).ravel()


def predict_saved(model, meta: dict, model_path: Path, data_dir: Path, parts: tuple[str, ...], views: bool = False
                  ) -> tuple[Features, dict]:
    """The rows (labels, files, test ids) and the model's dog probabilities for each of `parts`
    ('labelled', 'test'): 07's predictions, which 08 compares its export with. With `views`, also
    '<part>_views': (V, rows) probabilities of each view, for test-time augmentation.

    Heads read their feature files, after checking they were made the way the model was trained (and, for
    views, that they hold some); a split fine-tuned model streams its maps file (too big for RAM); a model
    fine-tuned end to end (04 --mode full) reads the images themselves, and its views are the image and its mirror.
    """
    if meta.get("kind") == "finetune_full":
        split, paths, ids = image_parts(data_dir)
        feats = Features([], [], split.label.to_numpy(np.float32), split.filename.to_numpy(str),
                         (split.subset == "valid").to_numpy(), [], ids, [], [])
        images = {"labelled": paths["train"], "test": paths["test"]}
        probs = {part: predict_images(model, images[part], meta) for part in parts}
        if views:
            probs |= {f"{part}_views": np.stack([probs[part], predict_images(model, images[part], meta, mirror=True)])
                      for part in parts}
        return feats, probs
    streamed = any(name.endswith("_maps") for name in meta["features"])
    if streamed and views:
        raise CatDogError(f"{model_path} reads a maps file, which holds no augmented views: drop --tta, or "
                          f"fine-tune with 04 --mode full (its test-time views are the mirrored images)")
    wanted = () if streamed else parts + (tuple(f"{p}_views" for p in parts) if views else ())
    feats = load_features(meta["features"], data_dir, parts=wanted)
    check_trained_on(model_path, meta, feats)
    return feats, {part: feats.predict(model, part) for part in (wanted or parts)}


# ==================== K-fold ========================================================================================

KFOLD_SUMMARY, OOF_CSV, TEST_CSV = "kfold.json", "oof.csv", "test.csv"


def kfold_args(p: argparse.ArgumentParser) -> None:
    """--folds, shared by the heads (03, 05)."""
    p.add_argument("--folds", type=number(int, 2),
                   help="train one head per fold of a stratified, seeded K-fold over every labelled Kaggle row "
                        "(train and valid) instead of the report's single split; writes <model>_k<K>/ with the "
                        "fold models, oof.csv (out-of-fold predictions) and test.csv (the folds' mean)")


def kfold_name(name: str, folds: int) -> str:
    """The results row and folder of a K-fold run: `ResNet50_k5`."""
    return f"{name}_k{folds}"


def split_fingerprint(data_dir: str | Path) -> str:
    """sha256 of split.csv: models trained on another split (or other rows) are not judged together."""
    return file_sha256(Path(data_dir) / SPLIT_CSV)


def fold_assignment(labels: np.ndarray, folds: int, seed: int, held_out: np.ndarray | None = None) -> np.ndarray:
    """Each row's fold (0..folds-1): stratified (each class dealt round the folds in a seeded order), the same
    for every model with the same seed; -1 for rows outside `held_out` (extra data: always trained on)."""
    labels = np.asarray(labels).astype(int)
    held_out = np.ones(len(labels), bool) if held_out is None else np.asarray(held_out, bool)
    fold = np.full(len(labels), -1)
    rng = np.random.default_rng(seed)
    for c in np.unique(labels[held_out]):
        rows = rng.permutation(np.flatnonzero((labels == c) & held_out))
        if len(rows) < folds:
            raise CatDogError(f"--folds {folds} needs at least {folds} labelled images of each class; "
                              f"{CLASSES[c]} has {len(rows)}: use fewer folds")
        fold[rows] = np.arange(len(rows)) % folds
    return fold


def kaggle_rows(data_dir: str | Path) -> np.ndarray:
    """Mask of split.csv's rows from Kaggle's own training set (not 01 --extra-data's), the rows folds hold out."""
    split = read_split(data_dir)
    return (split["source"] == "kaggle").to_numpy() if "source" in split else np.ones(len(split), bool)


def train_kfold(name: str, feats: Features, args: argparse.Namespace, step: str) -> tuple[dict, np.ndarray]:
    """03's and 05's --folds: one head per fold, validated on its held-out fold, under
    <model-dir>/<step>/<name>_k<K>/: fold<k>.keras (+ sidecar, history), oof.csv (filename, label, fold,
    prediction of the fold's model), test.csv (id, mean of the fold models), kfold.json. Returns the results row
    (val_loss is the out-of-fold log loss, oof_std its spread over the folds) and the test predictions."""
    kname = kfold_name(name, args.folds)
    out_dir = Path(args.model_dir) / step / kname
    fold = fold_assignment(feats.labels, args.folds, args.seed, kaggle_rows(args.data_dir))
    (out_dir / KFOLD_SUMMARY).unlink(missing_ok=True)  # until the new one is written, the folder is unfinished
    oof, test, fold_rows = np.full(len(fold), np.nan), np.zeros(len(feats.test_ids)), []
    meta = {**head_meta(feats, args, step), "folds": args.folds}
    for k in range(args.folds):
        held, trained = np.flatnonzero(fold == k), np.flatnonzero(fold != k)
        log.info(f"{kname}: fold {k + 1}/{args.folds}: training on {len(trained)} rows, validating on {len(held)}")
        model, row = fit_head(f"fold{k + 1}", feats, args, trained, held, out_dir,
                              Path(args.model_dir) / LOGS_DIR / step / kname / f"fold{k + 1}", args.seed + k,
                              {**meta, "fold": k + 1})
        oof[held] = np.asarray(model.predict(model_inputs([x[held] for x in feats.labelled]), batch_size=256,
                                             verbose=0)).ravel()
        test += feats.predict(model, "test") / args.folds
        fold_rows.append(row["val_loss"])
    rows = fold >= 0
    oof_table = pd.DataFrame({"filename": feats.files[rows], "label": feats.labels[rows].astype(int),
                              "fold": fold[rows] + 1, "prediction": oof[rows]})
    oof_loss = log_loss(oof_table.label, oof_table.prediction)  # as 07 judges it
    write_csv(oof_table, out_dir / OOF_CSV)
    write_csv(pd.DataFrame({"id": feats.test_ids, "prediction": test}), out_dir / TEST_CSV)
    summary = {**meta, "model": kname, "seed": args.seed, "oof_log_loss": oof_loss, "fold_val_loss": fold_rows,
               "args": vars(args), **versions()}
    write_json(summary, out_dir / KFOLD_SUMMARY)  # last: a folder without it is an unfinished run
    log.info(f"{kname}: out-of-fold log loss {oof_loss:.5f} over {len(oof_table)} rows (folds: "
             + ", ".join(f"{v:.5f}" for v in fold_rows) + f"); wrote {out_dir}/")
    return {"model": kname, "val_loss": oof_loss, "oof_log_loss": oof_loss, "oof_std": float(np.std(fold_rows)),
            "folds": args.folds, "epochs": args.epochs, "seed": args.seed}, test


# ==================== Submission ====================================================================================

CLIP = (0.005, 0.995)


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


def validate_submission(df: pd.DataFrame, expected_ids: Sequence[int], clip: tuple[float, float]) -> None:
    """Refuse a submission Kaggle would reject or score badly: wrong header, ids other than `expected_ids`
    (the test images on disk), NaN, out of clip range."""
    if list(df.columns) != ["id", "label"]:
        raise CatDogError(f"submission refused: header is {','.join(map(str, df.columns))}, not id,label")
    problems, expected = [], np.asarray(expected_ids)
    ids = pd.to_numeric(df["id"], errors="coerce").to_numpy()
    if len(df) != len(expected):
        problems.append(f"{len(df)} rows for {len(expected)} test images")
    if pd.Series(ids).duplicated().any():
        problems.append(f"duplicate ids, e.g. {pd.Series(ids)[pd.Series(ids).duplicated()].iloc[0]}")
    missing, extra = set(expected.tolist()) - set(ids.tolist()), set(ids.tolist()) - set(expected.tolist())
    if missing or extra:
        problems.append(f"ids are not exactly the test image ids (missing {sorted(missing)[:3]}, "
                        f"not test images: {sorted(extra)[:3]})")
    elif not np.array_equal(ids, np.sort(ids)):
        problems.append("ids are not in ascending order")
    labels = pd.to_numeric(df["label"], errors="coerce").to_numpy(dtype=float)
    if np.isnan(labels).any():
        problems.append(f"{int(np.isnan(labels).sum())} missing or non-numeric labels")
    elif ((labels < clip[0] - 1e-12) | (labels > clip[1] + 1e-12)).any():
        problems.append(f"labels outside [{clip[0]}, {clip[1]}]")
    if problems:
        raise CatDogError("submission refused: " + "; ".join(problems))


def write_submission(ids: Sequence[int], probs: np.ndarray, path: str | Path, expected_ids: Sequence[int],
                     clip: tuple[float, float] = CLIP) -> pd.DataFrame:
    """Clip dog probabilities to `clip` (a confident mistake costs far more log loss than it saves),
    sort by id, check against `expected_ids` (laid_out_test_ids: the test images on disk) and write
    `id,label` atomically."""
    if not 0 <= clip[0] < clip[1] <= 1:
        raise CatDogError(f"clip range must satisfy 0 <= low < high <= 1, got {clip}")
    if len(ids) != len(probs):
        raise CatDogError(f"submission refused: {len(probs)} predictions for {len(ids)} test ids")
    df = pd.DataFrame({"id": np.asarray(ids, dtype=np.int64), "label": np.clip(np.asarray(probs, float), *clip)})
    df = df.sort_values("id", kind="stable").reset_index(drop=True)
    validate_submission(df, expected_ids, clip)
    write_csv(df, path)
    log.info(f"wrote {path} ({len(df)} rows, checked against the test images on disk)")
    return df


# ==================== Pixels and Grad-CAM ============================================================================

def load_pixels(path: str | Path, size: int, interpolation: str = "bilinear", exif: bool = False) -> np.ndarray:
    """One photo of any size, mode (grayscale, 16-bit, CMYK, palette, alpha) or format Pillow reads, stretched
    to size x size RGB uint8 as 02 did: what an exported model (08) takes. `exif` turns phone photos upright."""
    from PIL import Image, ImageOps
    try:
        with Image.open(path) as im:
            if exif:
                im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16 bits: convert("RGB") would clip it to white
                im = Image.fromarray((np.asarray(im, np.float64) / 257).clip(0, 255).astype(np.uint8))
            return np.asarray(im.convert("RGB").resize((size, size), pil_filter(interpolation)), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CatDogError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def grad_cam(model, images: np.ndarray, map_layers: Sequence[str], logit_layer: str = "logit") -> np.ndarray:
    """Grad-CAM maps (n_branches, batch, h, w), each resized to the images: ReLU(sum_c alpha_c A_c) with alpha_c
    the mean gradient of the logit over the branch's map A (the input of `map_layers[k]`, its pooling layer).
    The head is linear in the pooled features, so every branch's map is independent of the others."""
    import keras
    import tensorflow as tf
    map_tensors = [model.get_layer(n).input for n in map_layers]
    lower = keras.Model(model.inputs[0] if len(model.inputs) == 1 else model.inputs, map_tensors)  # image -> maps
    upper = keras.Model(map_tensors, model.get_layer(logit_layer).output)  # maps -> logit: what the tape sees
    maps = [tf.convert_to_tensor(a) for a in keras.tree.flatten(lower(images, training=False))]
    with tf.GradientTape() as tape:
        tape.watch(maps)
        total = tf.reduce_sum(upper(maps if len(maps) > 1 else maps[0], training=False))  # one logit per image
    grads = tape.gradient(total, maps)
    cams = [tf.nn.relu(tf.reduce_sum(tf.reduce_mean(g, axis=(1, 2), keepdims=True) * a, axis=-1))
            for a, g in zip(maps, grads, strict=True)]
    return np.stack([tf.image.resize(c[..., None], images.shape[1:3], method="bilinear")[..., 0].numpy()
                     for c in cams])


def save_cam_overlay(image: np.ndarray, cams: np.ndarray, names: Sequence[str], path: str | Path,
                     title: str = "") -> None:
    """The image, then each branch's map over it (normalised to [0, 1] on its own), then their unnormalised sum."""
    plt = pyplot()
    panels = [(n, c / c.max() if c.max() > 0 else c) for n, c in zip(names, cams, strict=True)]
    if len(cams) > 1:
        total = cams.sum(axis=0)
        panels.append(("sum", total / total.max() if total.max() > 0 else total))
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3 * (len(panels) + 1), 3.3), squeeze=False)
    axes[0, 0].imshow(image)
    axes[0, 0].set_title(title, fontsize=9)
    for ax, (name, cam) in zip(axes[0, 1:], panels, strict=True):
        ax.imshow(image)
        ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
    for ax in axes.ravel():
        ax.axis("off")
    save_figure(fig, path)


# ==================== Kaggle API ====================================================================================

KAGGLE_COMPETITION = "dogs-vs-cats-redux-kernels-edition"
KAGGLE_RULES = f"https://www.kaggle.com/c/{KAGGLE_COMPETITION}/rules"


def kaggle_credentials(flag: str) -> None:
    """Refuse `flag` when the kaggle package would find no credentials; reads files and variables only, so a
    missing token is reported before any work, without importing kaggle or reaching the network."""
    env, home = os.environ, Path.home()
    # What kaggle >= 2 accepts besides kaggle.json: an access token, or `kaggle auth login`'s OAuth file.
    if env.get("KAGGLE_API_TOKEN") or any((home / ".kaggle" / f).is_file()
                                          for f in ("access_token", "access_token.txt", "credentials.json")):
        return
    # kaggle's own lookup: $KAGGLE_CONFIG_DIR, else ~/.kaggle, else (when that is missing) the XDG folder.
    config_dir = Path(env.get("KAGGLE_CONFIG_DIR") or (home / ".kaggle" if (home / ".kaggle").exists() else
                                                       Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "kaggle"))
    config = config_dir / "kaggle.json"
    wanted = config if env.get("KAGGLE_CONFIG_DIR") else home / ".kaggle" / "kaggle.json"  # where to put one
    values = {}
    if config.is_file():
        try:
            values = json.loads(config.read_text())
        except (OSError, ValueError):  # unreadable, garbled or not UTF-8
            values = None
        if not isinstance(values, dict):
            raise CatDogError(f"{flag}: {config} is not the JSON kaggle.json Kaggle gives: create a new API token "
                              "at https://www.kaggle.com/settings and save its kaggle.json there (chmod 600)")
        if config.stat().st_mode & 0o044:
            log.warning(f"{config} is readable by other users: run chmod 600 {config}")
    values.update({k: env[f"KAGGLE_{k.upper()}"] for k in ("username", "key") if env.get(f"KAGGLE_{k.upper()}")})
    if not (values.get("username") and values.get("key")):
        raise CatDogError(f"{flag} needs Kaggle API credentials and found none: create an API token at "
                          f"https://www.kaggle.com/settings and save its kaggle.json as {wanted} with mode 600 "
                          "(chmod 600), or set KAGGLE_USERNAME and KAGGLE_KEY")


def kaggle_api(flag: str):
    """An authenticated kaggle KaggleApi for `flag`, or one clear error before any work.

    kaggle is imported only here: importing it authenticates, and prints its own long help when that fails.
    """
    kaggle_credentials(flag)
    try:
        with contextlib.redirect_stdout(io.StringIO()), kaggle_call(f"checking the Kaggle credentials for {flag}"):
            from kaggle.api.kaggle_api_extended import KaggleApi
            api = KaggleApi()
            api.authenticate()
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("kaggle"):  # kaggle or kagglesdk: an incomplete install
            raise
        raise CatDogError(f"{flag} needs the kaggle package: pip install -r requirements.txt") from None
    except SystemExit:  # authenticate() exits when no credential works, e.g. an expired access token
        raise CatDogError(f"{flag}: Kaggle accepted none of the credentials found: create a new API token at "
                          "https://www.kaggle.com/settings and save its kaggle.json in ~/.kaggle/ with mode 600, "
                          "or set KAGGLE_USERNAME and KAGGLE_KEY") from None
    return api


@contextlib.contextmanager
def kaggle_call(doing: str) -> Iterator[None]:
    """Kaggle's refusals and network failures, as one line saying what to do."""
    import requests
    try:
        yield
    except requests.HTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 403:
            raise CatDogError(f"Kaggle answered 403 Forbidden while {doing}: accept the competition's rules at "
                              f"{KAGGLE_RULES} (signed in as the account of your API token), then rerun") from e
        if status == 401:
            raise CatDogError(f"Kaggle answered 401 Unauthorized while {doing}: the API token is wrong or revoked; "
                              "create a new one at https://www.kaggle.com/settings and replace kaggle.json "
                              "(or KAGGLE_USERNAME and KAGGLE_KEY)") from e
        raise CatDogError(f"Kaggle answered {status or 'an error'} while {doing} ({e}): rerun later") from e
    except requests.RequestException as e:
        raise CatDogError(f"could not reach Kaggle while {doing} ({type(e).__name__}): check the network "
                          "connection and rerun") from e


# ==================== Plots =========================================================================================

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
                title: str = "", baseline: str | None = None, marks: dict[str, int] | None = None) -> None:
    """One line per run of `metric` by epoch (the report's TensorBoard charts), `baseline` blue and thick, a star
    on each run's saved epoch (`marks`), a dotted line where a `phase` column changes (04's warmup -> block)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, h in histories.items():
        style = {"color": "tab:blue", "linewidth": 3} if name == baseline else {}
        (line,) = ax.plot(h.epoch, h[metric], marker="o", markersize=3, label=name, **style)
        saved = (marks or {}).get(name)
        if saved is not None and saved in set(h.epoch):
            ax.plot([saved], h.loc[h.epoch == saved, metric], "*", markersize=14, color=line.get_color())
        if "phase" in h and h.phase.nunique() > 1:
            switch = int(h.epoch[(h.phase != h.phase.shift()).to_numpy()].iloc[1])
            phase = h.phase[h.epoch == switch].iloc[0]
            ax.axvline(switch - 0.5, linestyle=":", color=line.get_color(),
                       label=f"{name}: {phase} from epoch {switch}")
    ax.set(xlabel="epoch", ylabel=metric, title=title + ("  (*: saved epoch)" if marks else ""))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # K-fold rows have no single curve
        ax.legend()
    save_figure(fig, path)
