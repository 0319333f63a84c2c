"""Classify your own photos as cat or dog with the model 08_export_model.py exported.

    python predict.py photo.jpg more/*.jpg [--model model/export/catdog.keras|catdog.tflite|saved_model]
                      [--json] [--cam DIR]

Each photo (any size; grayscale, CMYK and PNG content too) is stretched to the model's input size with Pillow,
as 02 did. Prints file, cat/dog, P(dog) clipped as in the submission, and milliseconds; then images/s. A file
that is not a readable image gets its own line and the others are still classified (exit status 1 at the end).
--json prints JSON Lines (file, label, p_dog, ms, error); --cam DIR writes Grad-CAM overlays (.keras only):
where each backbone looked, and their sum.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import helper
from helper import CatDogError, log


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=helper.HelpFormatter)
    p.add_argument("images", nargs="+", help="photos to classify")
    p.add_argument("--model", default=str(Path("model", helper.EXPORT_DIR, helper.EXPORT_KERAS)),
                   help="the exported model: catdog.keras (Keras), catdog.tflite or a student's catdog_int8.tflite "
                        "(LiteRT, as on a phone), or the saved_model folder (TF Serving's); export.json must be "
                        "beside it")
    p.add_argument("--json", action="store_true", help="print JSON Lines instead of a table")
    p.add_argument("--cam", metavar="DIR", help="write a Grad-CAM overlay per image into DIR (.keras models)")
    helper.precision_args(p, "a .keras model (a TFLite model computes in its own types: 08 --quantize)")
    p.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    args = p.parse_args(argv)
    if Path(args.model).suffix == ".tflite" and args.precision not in ("float32", "auto"):
        p.error(f"--precision {args.precision} applies to .keras models; TFLite has its own types (08 --quantize)")
    if Path(args.model).suffix not in (".keras", ".tflite") and not Path(args.model, "saved_model.pb").is_file():
        p.error(f"--model {args.model}: give 08's catdog.keras or catdog.tflite (or its saved_model folder)")
    if args.cam and Path(args.model).suffix != ".keras":
        p.error("--cam needs the .keras model (TFLite has no gradients): pass --model .../catdog.keras")
    return args


class Classifier:
    """The exported model, Keras or TFLite, one image at a time (the latency a phone app sees)."""

    def __init__(self, path: Path, precision: str = "float32"):
        info_path = path.parent / helper.EXPORT_INFO
        if not path.exists():
            raise CatDogError(f"{path} not found: run 08_export_model.py first, or pass --model")
        try:
            self.info = json.loads(info_path.read_text())
            self.size, self.interpolation = int(self.info["input_size"]), self.info["interpolation"]
            self.encoder = str(self.info.get("pixels", "pillow")).removeprefix("encoder:") \
                if str(self.info.get("pixels", "")).startswith("encoder:") else None
            self.clip = tuple(self.info["clip"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CatDogError(f"{info_path} is missing or not 08's export.json ({e}): rerun 08_export_model.py") from e
        self.keras, self.saved_model = path.suffix == ".keras", path.is_dir()
        if self.saved_model:
            import tensorflow as tf
            self.model = tf.saved_model.load(str(path))
            self.call = self.model.serve
            self.call(np.zeros((1, self.size, self.size, 3), np.uint8))  # traced now, not on the first photo
        elif self.keras:
            import tensorflow as tf
            self.model = helper.as_precision(helper.load_keras(path), helper.resolve_precision(precision))
            if tuple(self.model.input.shape[1:]) != (self.size, self.size, 3):
                raise CatDogError(f"{path} takes {tuple(self.model.input.shape[1:])} images but {info_path} says "
                                  f"{self.size} px: the two come from different exports; rerun 08_export_model.py")
            # One traced graph for every image, and traced now: the first photo's time is not tracing's.
            spec = tf.TensorSpec((None, self.size, self.size, 3), tf.uint8)
            self.call = tf.function(lambda x: self.model(x, training=False), input_signature=[spec])
            self.call(np.zeros((1, self.size, self.size, 3), np.uint8))
        else:
            try:
                from ai_edge_litert.interpreter import Interpreter
            except ImportError as e:
                raise CatDogError("TFLite models run with ai-edge-litert: pip install -r requirements.txt") from e
            try:
                self.model = Interpreter(model_path=str(path), num_threads=2)
            except (ValueError, RuntimeError) as e:
                raise CatDogError(f"{path} is not a readable TFLite model ({e}): rerun 08_export_model.py") from e
            self.model.allocate_tensors()
            self.input, self.output = self.model.get_input_details()[0], self.model.get_output_details()[0]
            if self.input["dtype"] != np.uint8:
                raise CatDogError(f"{path} takes {np.dtype(self.input['dtype']).name} input, not uint8 pixels: "
                                  f"rerun 08_export_model.py")

    def p_dog(self, pixels: np.ndarray) -> float:
        """P(dog) of one size x size RGB uint8 image."""
        if self.keras or self.saved_model:
            return float(np.asarray(self.call(pixels[None])).ravel()[0])
        scale, zero = self.input["quantization"]
        if scale:  # an input quantised other than as the raw pixels (08's keeps them raw: scale 0)
            pixels = np.clip(np.round(pixels / scale + zero), 0, 255).astype(np.uint8)
        self.model.set_tensor(self.input["index"], pixels[None])
        self.model.invoke()
        out = self.model.get_tensor(self.output["index"]).ravel()[0]
        scale, zero = self.output["quantization"]
        # A quantised output (int8 or uint8) is dequantised; 08's int8 export already gives a float P(dog).
        return float((float(out) - zero) * scale) if scale and out.dtype != np.float32 else float(out)


def cam_overlay(classifier: Classifier, path: str, pixels: np.ndarray, p: float, out: Path) -> None:
    """Where each backbone looked, over the photo as it is (the maps stretched back to its shape)."""
    from PIL import Image
    names = [st["backbone"] for st in classifier.info["backbones"]]
    cams = helper.grad_cam(classifier.model, pixels[None], [f"{n}_{helper.POOL_LAYER}" for n in names])[:, 0]
    from PIL import ImageOps
    with Image.open(path) as im:
        photo = np.asarray(helper.to_rgb(ImageOps.exif_transpose(im)))
    h, w = photo.shape[:2]
    cams = np.stack([np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))
                     for c in cams])
    helper.save_cam_overlay(photo, cams, names, out, title=f"{Path(path).name}: {'dog' if p >= 0.5 else 'cat'} "
                                                        f"{p:.4f}")


def main(args) -> int:
    classifier = Classifier(Path(args.model), args.precision)
    if args.cam and classifier.encoder:
        raise CatDogError(f"--cam: Grad-CAM is not made for foundation-encoder exports ({classifier.encoder}): a "
                          f"ViT has no convolutional map, and the class-token features of CLIP and MetaCLIP get no "
                          f"gradient from the last layer's patch tokens; leave --cam out")
    if args.cam:
        helper.check_writable_target(Path(args.cam) / "x.png")
    failed, done, total_ms, cam_names = 0, 0, 0.0, set()
    for path in args.images:
        row = {"file": path, "label": None, "p_dog": None, "ms": None, "error": None}
        try:
            # Upright as the phone shows it (EXIF), stretched as 02 did.
            pixels = (helper.get_backbone(classifier.encoder).pixels(path, classifier.size, exif=True)
                      if classifier.encoder else helper.load_pixels(path, classifier.size, classifier.interpolation,
                                                                    exif=True))
        except CatDogError as e:
            failed += 1
            row["error"] = str(e)
        else:
            start = time.perf_counter()
            p = float(np.clip(classifier.p_dog(pixels), *classifier.clip))
            row.update(ms=round(1000 * (time.perf_counter() - start), 2), p_dog=p, label="dog" if p >= 0.5 else "cat")
            done, total_ms = done + 1, total_ms + row["ms"]
            if args.cam:
                stem = Path(path).stem  # a/1.jpg and b/1.jpg get two overlays, not one
                name = next(n for n in (f"{stem}{f'_{k}' if k else ''}_cam.png" for k in range(len(cam_names) + 1))
                            if n not in cam_names)
                cam_names.add(name)
                try:
                    cam_overlay(classifier, path, pixels, p, Path(args.cam) / name)
                except (OSError, CatDogError) as e:  # the classification stands; only its picture failed
                    log.warning(f"{path}: no Grad-CAM overlay ({e})")
        if args.json:
            print(json.dumps(row), flush=True)
        elif row["error"]:
            print(f"{path}\terror: {row['error']}", flush=True)
        else:
            print(f"{path}\t{row['label']}\t{row['p_dog']:.4f}\t{row['ms']:.1f} ms", flush=True)
    rate = f"{1000 * done / total_ms:.1f} images/s" if total_ms else "no image classified"
    log.info(f"{done} classified, {failed} failed: {rate} ("
             f"{'Keras' if classifier.keras else 'SavedModel' if classifier.saved_model else 'TFLite'}, "
             f"{classifier.size}x{classifier.size} input)")
    return 1 if failed else 0


if __name__ == "__main__":
    helper.run_cli(main, parse_args(), log_stream=sys.stderr)
