"""Step 8: export a trained model as ONE model from pixels to P(dog): Keras, TF SavedModel and TFLite.

Any saved catdog model (a 03/05 head, 06's best, a 04 fine-tuned model; default: the one 07 would submit) is
composed with its backbones into one flat functional graph: a batch of S x S RGB uint8 images in (S: the largest
backbone size), and per backbone branch: the resize 02 did (Pillow's own filter weights as two fixed matrix
products, when the branch is smaller than S), the backbone's preprocess_input (as a fixed 1x1 convolution), the
backbone (the weights of its features: ImageNet, or the same seeded random network 02 built with --weights none),
Keras's pooling (global average pooling; ConvNeXt's LayerNorm after it); then the head (`logit`, `p_dog`).
predict.py stretches any photo to S x S with Pillow, as 02 did, so with S equal to the backbone size the exported
model sees exactly 02's pixels.
A head on foundation-encoder features (02 --models DINOv2L ...) exports the same way: its input is the photo as
the encoder's image converter crops and resizes it (predict.py makes it so), then the converter's scale and
offset, the encoder and its feature; a model mixing CNN and encoder branches is refused (one input cannot be
both resizes), and where the TFLite converter refuses an encoder the export has no catdog.tflite and export.json
says why (tflite_refused).
Writes model/export/catdog.keras, saved_model/ (TF Serving), catdog.tflite and export.json.
A student of 09 (one backbone end to end) is exported the same way, plus catdog_int8.tflite: full-integer int8
(weights and activations, calibrated on training images; uint8 pixels in, builtin ops only); every format is
checked against the student's own Keras predictions, and export.json records its teacher.
"""

import contextlib
import errno
import os
import shutil
import time
from pathlib import Path

import numpy as np

import helper
from helper import CatDogError, log


def parse_args(argv=None):
    p = helper.base_parser(__doc__.splitlines()[0])
    p.add_argument("--model", help="the saved .keras model to export (default: the one 07 would submit)")
    p.add_argument("--weights",
                   help="where the backbones' weights come from: 'imagenet', 'none' or a folder of Keras *_notop.h5 "
                        "files (default: what the model's features were made with, from its sidecar)")
    p.add_argument("--out-dir", help="where the exported files go (default: <model-dir>/export)")
    p.add_argument("--quantize", default="float16", choices=["none", "float16", "dynamic"],
                   help="TFLite weights: float32 (none), float16 (half the size), or dynamic-range int8")
    helper.precision_args(p, "catdog.keras and saved_model/ (the TFLite file is converted from the float32 model: "
                             "TFLite has no bfloat16; its types are --quantize's)")
    p.add_argument("--check", type=helper.NONNEGATIVE_INT, default=16,
                   help="test images on which the export is compared with the feature path (07's predictions)")
    p.add_argument("--max-diff", type=helper.PROBABILITY, default=0.02,
                   help="refuse to write an export whose P(dog) differs from 07's by more than this on those images")
    p.add_argument("--int8-max-diff", type=helper.PROBABILITY, default=0.1,
                   help="students: refuse an int8 TFLite whose P(dog) differs from the student's by more than this "
                        "(activations rounded to 256 levels per tensor cost more than float16's weights)")
    p.add_argument("--calibration-images", type=helper.POSITIVE_INT, default=100,
                   help="students: training images (a seeded draw) that calibrate the int8 activations' ranges")
    helper.clip_args(p)
    args = p.parse_args(argv)
    helper.clip_range(p, args)
    return args


# ----------------------------------------------------------------------------- what the model was trained on

def branches(model, meta: dict, model_path: Path, precision: str = "float32") -> list[helper.ExtractSettings]:
    """The backbone branches to rebuild, in the head's input order, refused where they cannot be rebuilt
    faithfully."""
    settings = [helper.ExtractSettings.of(a) for a in meta["feature_attrs"]]
    if meta["kind"] in ("single", "merge", "hyperopt") and len(settings) != len(model.inputs):
        raise CatDogError(f"{model_path}: {len(model.inputs)} inputs but {len(settings)} feature files in its sidecar")
    for st in settings:
        if st.jpeg_draft:
            raise CatDogError(f"{model_path}: its {st.backbone} features were decoded with --jpeg-draft (reduced-scale "
                              f"JPEG decoding), which a pixel model cannot reproduce: extract without it and retrain")
        bb = helper.get_backbone(st.backbone)
        if not isinstance(bb, helper.Encoder) and st.pooling != bb.pooling:
            raise CatDogError(f"{model_path}: its {st.backbone} features were pooled as an earlier release did "
                              f"({st.pooling}), not as Keras pools {st.backbone} ({bb.pooling}), which the export "
                              f"rebuilds: rerun the step that made them (02_extract_features.py, or "
                              f"04_finetune_split.py for its maps: they are recomputed) and retrain the model")
    encoders = [st for st in settings if isinstance(helper.get_backbone(st.backbone), helper.Encoder)]
    if encoders:
        resize = {resize_of(st) for st in settings}
        if len(encoders) != len(settings) or len(resize) > 1:
            raise CatDogError(f"{model_path}: its branches need differently resized photos ("
                              + ", ".join(f"{st.backbone}: {resize_of(st)}" for st in settings)
                              + "): a foundation encoder's image converter crops and resizes the photo itself, and "
                                "one exported input cannot be both; export a model of CNN features, or of encoders "
                                "with the same converter and size")
    for st in settings:
        if st.decoder != "pil":
            raise CatDogError(f"{model_path}: its {st.backbone} features were decoded by TensorFlow (02 --decoder "
                              f"{st.decoder}); exports take Pillow's pixels: extract with --decoder pil and retrain")
        if st.precision != precision:
            # Not refused: the P(dog) difference this makes (benchmarks/precision_bench.md) is what --max-diff
            # checks on test images before anything is written.
            log.warning(f"{st.backbone}'s features were computed in {st.precision}; the export computes in "
                        f"{precision} (--precision), so its P(dog) differs slightly")
    if len({st.interpolation for st in settings}) > 1:
        raise CatDogError(f"{model_path}: its backbones' features were resized with different methods "
                          f"({', '.join(st.interpolation for st in settings)}); one exported input cannot match both")
    return settings


def resize_of(st: helper.ExtractSettings) -> str:
    """How a branch's photos are resized: Pillow's stretch, or an encoder's converter ('encoder:<name>' of its
    size, filter, antialias and crop)."""
    bb = helper.get_backbone(st.backbone)
    if not isinstance(bb, helper.Encoder):
        return "pillow"
    return f"{st.image_size} px {bb.interpolation}{' antialiased' if bb.antialias else ''} " \
           f"{'centre crop' if bb.crop else 'squash'}"


# ----------------------------------------------------------------------------- building blocks

def check_weights(override: str | None, settings: list[helper.ExtractSettings]) -> None:
    """--weights may say where the same weights are read from (imagenet or a folder of its files), never swap
    random weights for trained ones or back: the head would be fed other features."""
    if override is None:
        return
    for st in settings:
        if (override.lower() == "none") != (st.weights.lower() == "none"):
            raise CatDogError(f"--weights {override}: the model's {st.backbone} features were made with --weights "
                              f"{st.weights}; the head only fits those (leave --weights out)")


def resize_matrix(n_in: int, n_out: int, interpolation: str) -> np.ndarray:
    """Pillow's own resampling weights (n_out x n_in) for one axis: the response of Pillow's resize of a float
    image to each unit impulse. Resizing is separable, so two of these reproduce 02's resize, short of Pillow's
    rounding of each pass to uint8 (within 1.5 grey levels, 0.3 on average)."""
    from PIL import Image
    filt = helper.pil_filter(interpolation)
    w = np.zeros((n_out, n_in), np.float32)
    for p in range(n_in):
        impulse = np.zeros((1, n_in), np.float32)
        impulse[0, p] = 1.0
        w[:, p] = np.asarray(Image.fromarray(impulse, mode="F").resize((n_out, 1), filt))[0]
    return w


def resize(x, n_in: int, n_out: int, interpolation: str, name: str):
    """S x S -> n_out x n_out with fixed Pillow weights, as transposes and Dense layers (TFLite builtins)."""
    import keras
    weights = resize_matrix(n_in, n_out, interpolation).T
    x = keras.layers.Permute((1, 3, 2), name=f"{name}_hcw")(x)
    cols = keras.layers.Dense(n_out, use_bias=False, trainable=False, name=f"{name}_resize_w")
    # Pillow clamps each pass to [0, 255] (bicubic's negative lobes overshoot): so do we.
    x = keras.layers.ReLU(max_value=255.0, name=f"{name}_clamp_w")(cols(x))
    x = keras.layers.Permute((3, 2, 1), name=f"{name}_wch")(x)
    rows = keras.layers.Dense(n_out, use_bias=False, trainable=False, name=f"{name}_resize_h")
    x = keras.layers.ReLU(max_value=255.0, name=f"{name}_clamp_h")(rows(x))
    x = keras.layers.Permute((3, 1, 2), name=f"{name}_hwc")(x)
    cols.set_weights([weights])
    rows.set_weights([weights])
    return x


def preprocess(x, bb: helper.Backbone, name: str):
    """The backbone's preprocess_input as a fixed 1x1 convolution: it is affine per pixel (caffe: RGB->BGR and
    mean subtraction; tf: [-1, 1]), so probing it with the unit colours gives its exact matrix and offset."""
    import keras
    probes = np.vstack([np.zeros(3), np.eye(3)]).astype(np.float32)[:, None, None, :]
    out = np.asarray(bb.preprocess(probes))[:, 0, 0, :]
    offset, matrix = out[0], out[1:] - out[0]  # matrix[i] is what input channel i adds to each output channel
    conv = keras.layers.Conv2D(3, 1, trainable=False, name=f"{name}_preprocess")
    x = conv(x)
    conv.set_weights([matrix[None, None], offset])
    return x


@contextlib.contextmanager
def phone_ops(bb: helper.Backbone):
    """While building MobileNetV3, its hard-swish is written as (x / 6) * ReLU6(x + 3): the same function, in ops
    that LiteRT's CPU delegate (XNNPACK) runs in int8. Keras's Activation("hard_swish") becomes TFLite's
    HARD_SWISH, which XNNPACK does not take quantised: each of the 20 then splits the graph and runs in the slow
    reference kernel (MobileNetV3Large int8: 44 ms instead of ~6 at 224 px). The layers that hold weights are the
    same, so copy_weights still pairs them."""
    if bb.module != "mobilenet_v3":
        yield
        return
    import keras
    from keras.src.applications import mobilenet_v3

    def hard_swish(x):
        relu6 = keras.layers.ReLU(6.0)(keras.layers.Rescaling(1.0, offset=3.0)(x))
        return keras.layers.Multiply()([keras.layers.Rescaling(1.0 / 6.0)(x), relu6])

    keras_own, mobilenet_v3.hard_swish = mobilenet_v3.hard_swish, hard_swish
    try:
        yield
    finally:
        mobilenet_v3.hard_swish = keras_own


def branch(image, size_in: int, st: helper.ExtractSettings, weights: str):
    """One backbone branch on the float image: resize, preprocess, the backbone (seeded as 02 built it: the
    same random network with --weights none) with Keras's pooling, as 02 extracted and 04 fine-tuned it.
    Returns (features, backbone)."""
    bb = helper.get_backbone(st.backbone)
    x = image if size_in == st.image_size else resize(image, size_in, st.image_size, st.interpolation, bb.name)
    x = preprocess(x, bb, bb.name)
    helper.set_seed(st.seed)  # as 02 and 04 did right before building: same initializers, same random weights
    if isinstance(bb, helper.Encoder):  # the encoder and its feature as one nested model (KerasHub's own layers)
        import keras
        net = bb.build(weights, st.image_size)
        return keras.layers.Identity(name=f"{bb.name}_{helper.POOL_LAYER}")(net(x)), net
    with phone_ops(bb):
        net = bb.build(weights, st.image_size, input_tensor=x, pool_name=f"{bb.name}_{helper.POOL_LAYER}")
    return net.output, net


def copy_weights(source, target, what: str) -> None:
    """Put the weights of `source` (a fine-tuned model's nested backbone or tail) into the rebuilt backbone
    `target`: layer by layer from the output back (the tail is the backbone's last layers), since auto-generated
    names (InceptionV3's conv2d_N) differ between processes. Refused unless every pair matches."""
    src = [layer for layer in source.layers if layer.weights]
    dst = [layer for layer in target.layers if layer.weights][-len(src):] if src else []
    for a, b in zip(src, dst, strict=True):
        if type(a) is not type(b) or [w.shape for w in a.weights] != [w.shape for w in b.weights]:
            raise CatDogError(f"{what}: its layer {a.name} does not match the rebuilt backbone's {b.name}: the model "
                              f"was not made from this backbone")
        b.set_weights(a.get_weights())


# ----------------------------------------------------------------------------- the pixel model

def pixel_model(model, meta: dict, model_path: Path, weights: str | None, precision: str = "float32"):
    """(the pixel-to-P(dog) model in float32, its input size S, the branches' settings)."""
    import keras
    settings = branches(model, meta, model_path, precision)
    check_weights(weights, settings)
    size = max(st.image_size for st in settings)
    image = keras.Input((size, size, 3), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1.0, name="to_float")(image)  # uint8 -> float32, values unchanged
    kind = meta["kind"]
    if kind in ("single", "merge", "hyperopt"):
        built = [branch(x, size, st, weights or st.weights) for st in settings]
        shared = {image.name, "to_float"}  # every branch starts from these
        names = [layer.name for _, net in built for layer in net.layers if layer.name not in shared]
        clash = sorted({n for n in names if names.count(n) > 1})
        if clash:
            raise CatDogError(f"{model_path}: its backbones share layer names ({', '.join(clash[:3])}), so they "
                              f"cannot live in one flat graph; export a model of other backbones")
        feats = [f for f, _ in built]
        feats = feats[0] if len(feats) == 1 else keras.layers.Concatenate(name="concat")(feats)
    else:  # 04: the backbone rebuilt, then the fine-tuned layers' weights put back
        feats, net = branch(x, size, settings[0], weights or settings[0].weights)
        nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
        if len(nested) != 1:
            raise CatDogError(f"{model_path}: expected one nested backbone or tail, found {len(nested)}")
        copy_weights(nested[0], net, str(model_path))
    dense = keras.layers.Dense(1, name="logit")
    out = keras.layers.Activation("sigmoid", name="p_dog")(dense(feats))
    dense.set_weights(model.get_layer(helper.PREDICTION_LAYER).get_weights())
    return keras.Model(image, out, name="catdog"), size, settings


def to_tflite(saved_model: Path, quantize: str, calibration: np.ndarray | None = None) -> bytes:
    """The SavedModel as TFLite flatbuffer bytes, builtin ops only (what LiteRT runs on a phone). quantize "int8":
    full-integer, its activations' ranges calibrated on `calibration` (uint8 images); the uint8 input stays the
    raw pixels (a cast, then int8 inside), the output a float P(dog)."""
    import tensorflow as tf
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    if quantize == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image[None]] for image in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
    elif quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # dynamic range: int8 weights
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    return converter.convert()


def compared(meta: dict, data_dir: Path, n: int) -> bool:
    """Whether the export is compared with the feature path: a head, --check images, and a data dir to do it in."""
    return bool(n) and meta["kind"] not in (helper.FINETUNE_FULL, helper.STUDENT_DIR) and (
        data_dir / helper.SPLIT_CSV).is_file()


def photo_pixels(path, size: int, interpolation: str, meta: dict) -> np.ndarray:
    """A test image as the export's input: Pillow's stretch, or the encoders' converter resize."""
    bb = helper.get_backbone(helper.ExtractSettings.of(meta["feature_attrs"][0]).backbone)
    if isinstance(bb, helper.Encoder):
        return bb.pixels(path, size)
    return helper.load_pixels(path, size, interpolation)


def check_against_features(pixels, model, meta: dict, model_path: Path, data_dir: Path, size: int,
                           interpolation: str, n: int) -> tuple[float, int] | None:
    """The largest |P(dog)| difference between the pixel model and 07's predictions (helper.predict_saved) on
    `n` test images (at most those there are), and their number; None when the model's feature files are not
    there to compare with."""
    if not compared(meta, data_dir, n):
        return None
    try:
        _, probs = helper.predict_saved(model, meta, model_path, data_dir, ("test",))
    except CatDogError as e:
        log.info(f"no comparison with the feature path ({e})")
        return None
    _, paths = helper.test_images(data_dir)
    n = min(n, len(paths))
    got = pixels.predict(np.stack([photo_pixels(p, size, interpolation, meta) for p in paths[:n]]), verbose=0)
    return float(np.abs(got.ravel() - probs["test"][:n]).max()), n


EXPORT_FILES = (helper.EXPORT_KERAS, helper.EXPORT_SAVED_MODEL, helper.EXPORT_TFLITE, helper.EXPORT_TFLITE_INT8,
                helper.EXPORT_INFO)


def check_out_dir(out_dir: Path) -> Path:
    """--out-dir as an absolute path, refused unless it is new, an empty folder, or a previous export (its
    export.json, and only 08's files): an export replaces the folder whole, and no step removes what it did not make."""
    out_dir = Path(os.path.abspath(out_dir))  # `.` and `..` by name, symlinks kept as they are
    if out_dir.parent == out_dir:
        raise CatDogError(f"--out-dir {out_dir} is the root folder: give a folder for the export, e.g. model/export")
    if out_dir.is_symlink():  # swapping the export in would replace the link, not the folder it points to
        raise CatDogError(f"--out-dir {out_dir} is a symlink: give the folder it points to ({out_dir.resolve()}), "
                          f"or another")
    if out_dir.exists() and not out_dir.is_dir():
        raise CatDogError(f"--out-dir {out_dir} is a file: give a folder for the export (a new one, or one 08 wrote)")
    if not out_dir.is_dir():
        return out_dir
    others = sorted(p.name for p in out_dir.iterdir() if p.name not in EXPORT_FILES)
    if any(out_dir.iterdir()) and not (out_dir / helper.EXPORT_INFO).is_file():
        raise CatDogError(f"--out-dir {out_dir} holds files that are not an export of 08 (no {helper.EXPORT_INFO}; "
                          f"e.g. {(others or ['?'])[0]}): an export replaces its folder whole, so give a new or empty "
                          f"folder")
    if others:
        raise CatDogError(f"--out-dir {out_dir} holds an export and other files ({', '.join(others[:3])}), which "
                          f"replacing it would delete: move them out, or give another folder")
    return out_dir


def tflite_predict(path: Path, images: np.ndarray) -> np.ndarray:
    """P(dog) of uint8 images by a TFLite file, one at a time as on a phone (LiteRT, 2 threads)."""
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=str(path), num_threads=2)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    probs = []
    for image in images:
        it.set_tensor(inp["index"], image[None])
        it.invoke()
        probs.append(float(it.get_tensor(out["index"]).ravel()[0]))
    return np.asarray(probs)


def check_student(folder: Path, images: np.ndarray, reference: np.ndarray, tolerance: dict[str, float]) -> dict:
    """Each format's largest |P(dog)| difference from the student's own Keras predictions (`reference`, of the
    uint8 `images`), refused above its `tolerance`."""
    import tensorflow as tf
    served = tf.saved_model.load(str(folder / helper.EXPORT_SAVED_MODEL))  # held: its variables die with it
    got = {helper.EXPORT_KERAS: helper.load_keras(folder / helper.EXPORT_KERAS).predict(images, verbose=0),
           helper.EXPORT_SAVED_MODEL: served.serve(images),
           helper.EXPORT_TFLITE: tflite_predict(folder / helper.EXPORT_TFLITE, images),
           helper.EXPORT_TFLITE_INT8: tflite_predict(folder / helper.EXPORT_TFLITE_INT8, images)}
    diffs = {f: float(np.abs(np.asarray(p).ravel() - reference).max()) for f, p in got.items()}
    for f, d in diffs.items():
        log.info(f"{f}: P(dog) within {d:.2e} of the student's on {len(images)} test images "
                 f"(tolerance {tolerance[f]})")
        if d > tolerance[f]:
            raise CatDogError(f"the exported {f}'s P(dog) differs from the student's by {d:.3f} (more than "
                              f"{tolerance[f]}) on the test images: nothing written"
                              + (" (raise --int8-max-diff to accept it)" if f == helper.EXPORT_TFLITE_INT8 else ""))
    return diffs


def write_export(pixels, out_dir: Path, quantize: str, info: dict, float32=None, tflite_optional: bool = False,
                 calibration: np.ndarray | None = None, check=None) -> None:
    """catdog.keras, saved_model/, catdog.tflite and export.json, built in a temp folder and swapped in whole:
    an interrupted or failed export never leaves a new model beside an old export.json. Only a new folder, an empty
    one or a previous export is replaced (check_out_dir). `float32`: the float32 twin of a bfloat16 or float16
    `pixels`, which the TFLite file is converted from. With `tflite_optional` (encoders), a TFLite conversion that
    fails is left out and its reason recorded in export.json. With `calibration` (students), also
    catdog_int8.tflite; `check(folder)` may refuse the files, or give entries for export.json."""
    out_dir = check_out_dir(out_dir)
    helper.remove_stale_temps(out_dir.parent, f".{out_dir.name}.*")  # a killed export's folders (GBs)
    tmp, old = helper.temp_name(out_dir), helper.temp_name(out_dir)
    try:
        tmp.mkdir(parents=True)
        pixels.save(tmp / helper.EXPORT_KERAS)
        pixels.export(str(tmp / helper.EXPORT_SAVED_MODEL), verbose=False)
        source = tmp / helper.EXPORT_SAVED_MODEL
        if float32 is not None and float32 is not pixels:
            source = tmp / "float32_saved_model"
            float32.export(str(source), verbose=False)
        try:
            (tmp / helper.EXPORT_TFLITE).write_bytes(to_tflite(source, quantize))
        except Exception as e:  # the converter raises ConverterError and others
            if not tflite_optional:
                raise
            info["tflite_refused"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning(f"no {helper.EXPORT_TFLITE}: the TFLite converter refused the encoder "
                        f"({info['tflite_refused']})")
        if calibration is not None:
            (tmp / helper.EXPORT_TFLITE_INT8).write_bytes(to_tflite(source, "int8", calibration))
        if source.name != helper.EXPORT_SAVED_MODEL:
            shutil.rmtree(source)
        if check is not None:
            info = {**info, **check(tmp)}
        helper.write_json(info, tmp / helper.EXPORT_INFO)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise CatDogError(f"{out_dir.parent} is full: an export needs about three times the model's size there "
                          f"(Keras, SavedModel, TFLite); the partial export was removed") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def student_checks(model, meta: dict, data_dir: Path, size: int, args) -> tuple[np.ndarray, object]:
    """A student's int8 calibration images (a seeded draw of split.csv's train rows, as predict.py loads a photo)
    and the check of every format against its own Keras predictions on --check test images."""
    split = helper.read_split(data_dir)
    train = np.asarray(helper.train_image_paths(data_dir, split))[(split.subset == "train").to_numpy()]
    pick = np.sort(np.random.default_rng(args.seed).permutation(len(train))[:args.calibration_images])
    interpolation = meta["feature_attrs"][0]["interpolation"]
    calibration = np.stack([helper.load_pixels(p, size, interpolation) for p in train[pick]])
    _, paths = helper.test_images(data_dir)
    paths = paths[:max(1, args.check)]
    images = np.stack([helper.load_pixels(p, size, interpolation) for p in paths])
    reference = helper.predict_images(model, paths, meta)  # the student fed by 09's own pipeline
    tolerance = {helper.EXPORT_KERAS: args.max_diff, helper.EXPORT_SAVED_MODEL: args.max_diff,
                 helper.EXPORT_TFLITE: args.max_diff, helper.EXPORT_TFLITE_INT8: args.int8_max_diff}

    def check(folder: Path) -> dict:
        return {"max_diff_vs_student": check_student(folder, images, reference, tolerance),
                "tolerance_vs_student": tolerance}
    return calibration, check


def main(args):
    model_dir = Path(args.model_dir)
    path, why = (Path(args.model), "given by --model") if args.model else helper.pick_model(model_dir)
    out_dir = check_out_dir(Path(args.out_dir) if args.out_dir else model_dir / helper.EXPORT_DIR)
    data_dir = Path(args.data_dir)
    model, meta = helper.load_model(path)
    if compared(meta, data_dir, args.check):  # judged against 07's predictions: only on the model's own split
        try:
            helper.check_split(path, meta, data_dir)
        except CatDogError as e:
            raise CatDogError(f"{e}; or export it without comparing (--check 0)") from None
    log.info(f"exporting {path} ({why})")
    precision = helper.resolve_precision(args.precision)
    float32, size, settings = pixel_model(model, meta, path, args.weights, precision)
    pixels = helper.as_precision(float32, precision)
    interpolation = settings[0].interpolation
    checked = check_against_features(pixels, model, meta, path, data_dir, size, interpolation, args.check)
    diff = None if checked is None else checked[0]
    if checked is not None:
        log.info(f"on {checked[1]} test images the exported model's P(dog) is within {diff:.2e} of 07's")
        if diff > args.max_diff:
            raise CatDogError(f"the exported model's P(dog) differs from 07's by {diff:.3f} (more than --max-diff "
                              f"{args.max_diff}) on the test images: nothing written. Backbones of different sizes "
                              f"see photos resized twice (to {size} px, then to theirs): raise --max-diff to accept it")
    import PIL
    info = {"source": str(path.resolve()), "source_sha256": helper.file_sha256(path), "kind": meta["kind"],
            "input_size": size, "interpolation": interpolation, "backbones": [st.attrs() for st in settings],
            "weights": args.weights or settings[0].weights, "clip": [args.clip_low, args.clip_high],
            "quantize": args.quantize, "precision": precision, "max_diff_vs_features": diff,
            "exported": time.strftime("%Y-%m-%d %H:%M:%S"),
            "args": vars(args), "pillow": PIL.__version__, **helper.versions()}
    encoder = resize_of(settings[0]) != "pillow"
    info["pixels"] = f"encoder:{settings[0].backbone}" if encoder else "pillow"  # how predict.py makes the input
    calibration = check = None
    if meta["kind"] == helper.STUDENT_DIR:
        info["teacher"] = meta.get("teacher")
        calibration, check = student_checks(model, meta, Path(args.data_dir), size, args)
    write_export(pixels, out_dir, args.quantize, info, float32, tflite_optional=encoder, calibration=calibration,
                 check=check)
    sizes = {f: (out_dir / f).stat().st_size / 2**20 if (out_dir / f).is_file() else 0.0
             for f in (helper.EXPORT_KERAS, helper.EXPORT_TFLITE)}
    int8 = out_dir / helper.EXPORT_TFLITE_INT8
    log.info(f"wrote {out_dir}/: {helper.EXPORT_KERAS} ({sizes[helper.EXPORT_KERAS]:.1f} MiB), "
             f"{helper.EXPORT_SAVED_MODEL}/, " + (f"{helper.EXPORT_TFLITE} ({sizes[helper.EXPORT_TFLITE]:.1f} MiB, "
             f"{args.quantize}), " if "tflite_refused" not in info else "")
             + (f"{int8.name} ({int8.stat().st_size / 2**20:.1f} MiB, int8), " if int8.is_file() else "")
             + f"{helper.EXPORT_INFO}; input {size}x{size} RGB uint8"
             + (f" (the photo as {settings[0].backbone}'s converter resizes it)" if encoder else ""))
    return info


if __name__ == "__main__":
    helper.run_cli(main, parse_args())
