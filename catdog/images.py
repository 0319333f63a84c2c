"""Images: Pillow's and TensorFlow's decoders, the stretch to a square, the augmented views of 02 --views, the
tf.data pipeline that feeds the CNNs, and a user's photo as the uint8 pixels an exported model takes.

Used by: 02 and 04 (the pipeline, views), 07 (04 --mode full models, Grad-CAM), 08 and predict.py (pixels).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .common import CatDogError

# Pillow's filter for each --interpolation: 02's resize, and what predict.py and 08's graph reproduce.
PIL_FILTERS = {"bilinear": "BILINEAR", "nearest": "NEAREST", "bicubic": "BICUBIC", "area": "BOX"}
INTERPOLATIONS = tuple(PIL_FILTERS)
DECODERS = ("pil", "tf")


def pil_filter(interpolation: str):
    """The Pillow resampling filter of an --interpolation name."""
    from PIL import Image
    return getattr(Image.Resampling, PIL_FILTERS[interpolation])


def to_rgb(im):
    """A Pillow image of any mode (grayscale, 16-bit, CMYK, palette, alpha) as 8-bit RGB: the one conversion of
    02's decoder, predict.py and 08. 16-bit images are scaled to 8 bits (convert("RGB") would clip them to white)."""
    from PIL import Image
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        im = Image.fromarray((np.asarray(im, np.float64) / 257).clip(0, 255).astype(np.uint8))
    return im.convert("RGB")


def _pil_resized(path: str, size: int, interpolation: str, jpeg_draft: bool) -> np.ndarray:
    """Pillow's decode and antialiased resize of one image, as float32 RGB (size, size, 3). Pillow releases the
    GIL, so tf.data runs it in parallel threads; its antialiased bilinear is 2-3x faster than TF's."""
    from PIL import Image
    with Image.open(path) as im:
        if jpeg_draft:
            im.draft("RGB", (size, size))  # libjpeg DCT scaling to the smallest scale still >= size
        return np.asarray(to_rgb(im).resize((size, size), pil_filter(interpolation)), dtype=np.float32)


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
        im = to_rgb(im)
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


def _pil_decoded(path: str, size: int, jpeg_draft: bool) -> np.ndarray:
    """Pillow's decode of one image at its own size, uint8 RGB (h, w, 3): what an encoder's resize takes."""
    from PIL import Image
    with Image.open(path) as im:
        if jpeg_draft:
            im.draft("RGB", (size, size))
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _decode_resized(data, size: int, interpolation: str, jpeg_draft: bool, resize=None):
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
    if resize is not None:
        return tf.ensure_shape(tf.numpy_function(resize, [img], tf.float32, stateful=False), (size, size, 3))
    img = tf.image.resize(img, (size, size), method=interpolation, antialias=interpolation != "nearest")
    # 'nearest' keeps uint8, which the Inception family's preprocess (x /= 127.5) rejects.
    return tf.ensure_shape(tf.cast(img, tf.float32), (size, size, 3))


def load_resized(path, size: int, interpolation: str = "bilinear", jpeg_draft: bool = False, decoder: str = "pil",
                 params=None, resize=None):
    """One image file (a string tensor) -> float32 RGB (size, size, 3) in [0, 255], stretched (no crop): by Pillow
    (the report's decoder) through tf.numpy_function, or by decoder 'tf' all in the TensorFlow graph. `params`
    (a row of view_params) makes it that view of the image (Pillow only). `resize` (an encoder's: decoded uint8 numpy
    image -> size x size float32) replaces the stretch of the plain image: decoded at its own size, then resized so."""
    import tensorflow as tf
    if params is not None:
        if decoder != "pil":
            raise CatDogError("augmented views are made by Pillow: use --decoder pil with --views")
        img = tf.numpy_function(
            lambda p, v: _pil_view(os.fsdecode(np.asarray(p).item()), size, interpolation, jpeg_draft, v),
            [path, params], tf.float32, stateful=False)
        return tf.ensure_shape(img, (size, size, 3))
    if decoder == "tf":
        return _decode_resized(tf.io.read_file(path), size, interpolation, jpeg_draft, resize)
    if decoder != "pil":
        raise CatDogError(f"unknown decoder {decoder!r}: use one of {', '.join(DECODERS)}")
    if resize is not None:
        img = tf.numpy_function(lambda p: resize(_pil_decoded(os.fsdecode(np.asarray(p).item()), size, jpeg_draft)),
                                [path], tf.float32, stateful=False)
        return tf.ensure_shape(img, (size, size, 3))
    # The path arrives as bytes in a graph, as a 0-d object array when called eagerly.
    img = tf.numpy_function(lambda p: _pil_resized(os.fsdecode(np.asarray(p).item()), size, interpolation, jpeg_draft),
                            [path], tf.float32, stateful=False)
    return tf.ensure_shape(img, (size, size, 3))


def image_dataset(paths: Sequence[str], size: int, batch_size: int, interpolation: str = "bilinear",
                  jpeg_draft: bool = False, labels: Sequence[float] | None = None, shuffle_seed: int | None = None,
                  augment=None, preprocess=None, decoder: str = "pil", params: np.ndarray | None = None,
                  resize=None):
    """tf.data pipeline: parallel read + decode + resize, batched and prefetched, float32 in [0, 255], in `paths`
    order unless `shuffle_seed` (a new seeded order each epoch); (images, labels) with `labels`. `augment`
    (training only) and then `preprocess` are applied to each batch. `params` (view_params of `paths`) gives each
    image's view instead of the image itself; `resize` (an encoder's) replaces the stretch of the plain images."""
    import tensorflow as tf

    def load(p, *rest):  # rest: the view's params, then the label; or the label; or nothing
        view = rest[0] if params is not None else None
        x = load_resized(p, size, interpolation, jpeg_draft, decoder, view, resize)
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


def find_undecodable(paths: Sequence[str], size: int, interpolation: str, decoder: str = "pil",
                     resize=None) -> str | None:
    """The first of `paths` the pipeline cannot decode, to name it in an error."""
    import tensorflow as tf

    for p in paths:
        try:
            load_resized(tf.constant(p), size, interpolation, False, decoder, resize=resize)
        except (tf.errors.OpError, ValueError, OSError):
            return p
    return None



def load_pixels(path: str | Path, size: int | None, interpolation: str = "bilinear", exif: bool = False
                ) -> np.ndarray:
    """One photo of any size, mode (grayscale, 16-bit, CMYK, palette, alpha) or format Pillow reads, stretched
    to size x size RGB uint8 as 02 did: what an exported model (08) takes. `exif` turns phone photos upright.
    `size` None keeps the photo's own size (what an encoder's resize takes: Encoder.pixels)."""
    from PIL import Image, ImageOps
    try:
        with Image.open(path) as im:
            if exif:
                im = ImageOps.exif_transpose(im)
            im = to_rgb(im)
            return np.asarray(im if size is None else im.resize((size, size), pil_filter(interpolation)),
                              dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CatDogError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e

