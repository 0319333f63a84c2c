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


def load_resized(path, size: int, interpolation: str = "bilinear", jpeg_draft: bool = False, decoder: str = "pil"):
    """One image file (a string tensor) -> float32 RGB (size, size, 3) in [0, 255], stretched (no crop): by Pillow
    (the report's decoder) through tf.numpy_function, or by decoder 'tf' all in the TensorFlow graph."""
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
    """tf.data pipeline: parallel read + decode + resize, batched and prefetched, float32 in [0, 255], in `paths`
    order unless `shuffle_seed` (a new seeded order each epoch); (images, labels) with `labels`. `augment`
    (training only) and then `preprocess` are applied to each batch."""
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

    def attrs(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, attrs: dict) -> ExtractSettings:  # the settings stored in a file's (or sidecar's) attributes
        return cls(**{f.name: attrs[f.name] for f in dataclasses.fields(cls) if f.name in attrs})


def setting_changes(stored: dict, wanted: dict, keys: Sequence[str] | None = None) -> list[str]:
    """The settings (all, or those in `keys`) in which two attribute sets differ; the seed only matters for
    random weights (`none`)."""
    def plain(v):  # HDF5 gives numpy scalars back
        return v.item() if hasattr(v, "item") else v
    return [f.name for f in dataclasses.fields(ExtractSettings)
            if (keys is None or f.name in keys) and plain(stored.get(f.name)) != plain(wanted.get(f.name))
            and (f.name != "seed" or plain(wanted.get("weights")) == "none")]


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
                        keys: Sequence[str] | None = None) -> None:
    """Refuse to use `what` (trained on features made with the `trained` settings) with features made with
    `now` (at `now_where`), naming both; `keys` limits the comparison to some settings."""
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
    rename come last. As a context manager it closes the file and removes the temp file whatever happens."""

    def __init__(self, path: Path, train_files: Sequence[str], labels: Sequence[int], test_ids: Sequence[int],
                 feature_shape: tuple[int, ...], dtype: str, attrs: dict):
        self.path, self.tmp, self.file, self.attrs = check_writable_target(path), temp_name(path), None, attrs
        self.columns = {"label": np.asarray(labels, dtype=np.uint8), "test_ids": np.asarray(test_ids, dtype=np.int64),
                        "train_files": np.asarray(train_files, dtype=object).astype("S")}
        self.shape = {"train": (len(train_files), *feature_shape), "test": (len(test_ids), *feature_shape)}
        self.dtype, self.pos = dtype, {"train": 0, "test": 0}

    def __enter__(self) -> FeatureWriter:
        import h5py
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.file = h5py.File(self.tmp, "w")
            # One row per chunk: streaming training reads single rows fast; no compression (10x slower reads).
            self.data = {part: self.file.create_dataset(part, shape, self.dtype, chunks=(1, *shape[1:]))
                         for part, shape in self.shape.items()}
            for k, v in self.columns.items():
                self.file[k] = v
        except BaseException:
            self.__exit__()
            raise
        return self

    def append(self, part: str, rows: np.ndarray) -> None:
        """Write the next batch of rows of `part` ('train' or 'test')."""
        start = self.pos[part]
        self.data[part][start:start + len(rows)] = rows
        self.pos[part] = start + len(rows)

    def commit(self) -> None:
        """Check every row was written, mark complete, rename into place."""
        for part, shape in self.shape.items():
            if self.pos[part] != shape[0]:
                raise RuntimeError(f"{self.path}: wrote {self.pos[part]} of {shape[0]} {part} rows")
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
    try:
        with FeatureWriter(out_path, split.filename, split.label, ids, shape, settings.dtype, attrs) as writer:
            for part, paths in parts.items():
                ds = image_dataset(paths, settings.image_size, batch_size, settings.interpolation,
                                   settings.jpeg_draft, decoder=settings.decoder)
                if strategy is not None and strategy.num_replicas_in_sync > 1:
                    ds = strategy.experimental_distribute_dataset(ds)
                batches = iter(ds)
                for k in progress(range(math.ceil(len(paths) / batch_size)), f"{out_path.stem} {part}"):
                    try:
                        x = next(batches)
                    except tf.errors.OpError as e:
                        chunk = paths[k * batch_size:(k + 1) * batch_size]
                        bad = find_undecodable(chunk, settings.image_size, settings.interpolation, settings.decoder)
                        raise CatDogError(f"cannot decode {bad or 'an image in ' + ', '.join(chunk[:3])}: "
                                          f"rerun 01_reorganize_data.py, which skips broken files") from e
                    writer.append(part, step(x).numpy().astype(settings.dtype))
            writer.commit()  # HDF5 flushes its chunk cache here: a full disk can surface now too
    except OSError as e:  # h5py's write errors carry the errno in their text only
        if e.errno != errno.ENOSPC and "No space left" not in str(e):
            raise
        need = sum(len(p) for p in parts.values()) * math.prod(shape) * np.dtype(settings.dtype).itemsize
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

    def subset(self, name: str) -> tuple[list[np.ndarray], np.ndarray]:
        """(inputs, labels) of split.csv's 'train' or 'valid' rows."""
        mask = self.valid if name == "valid" else ~self.valid
        return [x[mask] for x in self.labelled], self.labels[mask]

    def predict(self, model, part: str, batch_size: int = 256) -> np.ndarray:
        """Dog probabilities of the 'labelled' or 'test' rows: the one predict entry point for models fed
        from feature files. Parts not loaded (maps files are too big for RAM) are streamed from the files
        in contiguous slices."""
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
                  ) -> Features:
    """Load feature files and check they line up row by row with split.csv and the test images on disk."""
    import h5py
    split = read_split(data_dir)
    test_ids = laid_out_test_ids(data_dir)
    out, attrs, paths, file_ids = {"labelled": [], "test": []}, [], [], test_ids
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
                out[part].append(f["train" if part == "labelled" else "test"][:])
        attrs.append(state)
        paths.append(path)
    return Features(list(model_names), out["labelled"], split.label.to_numpy(np.float32), split.filename.to_numpy(str),
                    (split.subset == "valid").to_numpy(), out["test"], file_ids, attrs, paths)


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
    p.add_argument("--dropout", type=DROPOUT, default=0.5, help="dropout rate before the Dense layer")
    p.set_defaults(sgd_lr=sgd_lr)


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
    """model.fit on (inputs, labels) arrays, or on a dataset that batches and shuffles itself; returns the
    history with a 1-based `epoch` column."""
    arrays = isinstance(train, tuple)
    x, y = train if arrays else (train, None)
    hist = model.fit(x, y, validation_data=valid, epochs=epochs, initial_epoch=initial_epoch,
                     batch_size=batch_size if arrays else None, shuffle=arrays, verbose=2, callbacks=list(callbacks))
    df = pd.DataFrame(hist.history)
    df.insert(0, "epoch", np.arange(initial_epoch + 1, initial_epoch + len(df) + 1))
    return df


def train_head(name: str, feats: Features, args: argparse.Namespace, step: str):
    """03's and 05's run: the report's head on `feats` (one input per backbone), trained on split.csv's train
    rows and validated on its valid rows, then saved by finish_run under <model-dir>/<step>/ (step: SINGLE_DIR
    or MERGE_DIR, also the sidecar's kind). Returns (model, results row)."""
    dims = {n: x.shape[1] for n, x in zip(feats.names, feats.labelled, strict=True)}
    model = build_head(dims, args.dropout, make_optimizer(args.optimizer, args.lr, args.momentum, rho=args.rho),
                       args.seed)
    (xtr, ytr), (xva, yva) = feats.subset("train"), feats.subset("valid")
    valid = (model_inputs(xva), yva)
    log_dir = Path(args.model_dir) / LOGS_DIR / step / name
    hist = fit(model, (model_inputs(xtr), ytr), valid, args.epochs, [tensorboard(log_dir)], args.batch_size)
    meta = {"kind": step, "features": feats.names, "feature_attrs": feats.attrs}
    return model, finish_run(name, model, hist, valid, Path(args.model_dir) / step, args, meta)


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


def predict_images(model, paths: Sequence[str], meta: dict, batch_size: int = 64) -> np.ndarray:
    """Dog probabilities of images for a model fine-tuned end to end (04 --mode full), fed as it was trained."""
    st = ExtractSettings.of(meta["feature_attrs"][0])
    ds = image_dataset(paths, st.image_size, batch_size, st.interpolation, decoder=st.decoder,
                       preprocess=get_backbone(st.backbone).preprocess)
    return np.asarray(model.predict(ds, verbose=0)).ravel()


def predict_saved(model, meta: dict, model_path: Path, data_dir: Path, parts: tuple[str, ...]
                  ) -> tuple[Features, dict]:
    """The rows (labels, files, test ids) and the model's dog probabilities for each of `parts`
    ('labelled', 'test'): 07's predictions, which 08 compares its export with.

    Heads read their feature files, after checking they were made the way the model was trained; a split
    fine-tuned model streams its maps file (too big for RAM); a model fine-tuned end to end (04 --mode full)
    reads the images themselves.
    """
    if meta.get("kind") == "finetune_full":
        split, paths, ids = image_parts(data_dir)
        feats = Features([], [], split.label.to_numpy(np.float32), split.filename.to_numpy(str),
                         (split.subset == "valid").to_numpy(), [], ids, [], [])
        images = {"labelled": paths["train"], "test": paths["test"]}
        return feats, {part: predict_images(model, images[part], meta) for part in parts}
    streamed = any(name.endswith("_maps") for name in meta["features"])
    feats = load_features(meta["features"], data_dir, parts=() if streamed else parts)
    check_trained_on(model_path, meta, feats)
    return feats, {part: feats.predict(model, part) for part in parts}


# ==================== Submission ====================================================================================

CLIP = (0.005, 0.995)


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
    ax.legend()
    save_figure(fig, path)
