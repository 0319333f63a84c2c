"""08_export_model.py, predict.py and Grad-CAM: one model from pixels to P(dog), and where it looked."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import HEAD, IMAGE_SIZE, ROOT, run, script

import helper
from helper import CatDogError

MERGED = "ResNet50+InceptionV3+Xception"
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


@pytest.fixture(scope="module")
def exported(pipeline, tmp_path_factory):
    """08 on the demo's merged head (into model/export, float16 TFLite) and on its ResNet50 head (float32)."""
    root = tmp_path_factory.mktemp("export")
    d = ["--data-dir", pipeline["data"], "--model-dir", pipeline["model"]]
    merged = pipeline["model"] / "merge" / f"{MERGED}.keras"
    single = pipeline["model"] / "single" / "ResNet50.keras"
    return {"merge": (run("08", *d, "--model", merged), pipeline["model"] / "export", merged),
            "single": (run("08", *d, "--model", single, "--out-dir", root / "single", "--quantize", "none"),
                       root / "single", single)}


def feature_path_and_pixels(pipeline, model_path):
    """07's test predictions for a saved model, and the test images as the exported model takes them."""
    model, meta = helper.load_model(model_path)
    streamed = meta["kind"] == "finetune"
    feats = helper.load_features(meta["features"], pipeline["data"], parts=() if streamed else ("test",))
    _, paths = helper.test_images(pipeline["data"])
    pixels = np.stack([helper.load_pixels(p, int(IMAGE_SIZE)) for p in paths])
    return feats.predict(model, "test"), pixels


def tflite_predict(path, pixels):
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=str(path), num_threads=2)
    inp = it.get_input_details()[0]
    it.resize_tensor_input(inp["index"], pixels.shape)
    it.allocate_tensors()
    it.set_tensor(inp["index"], pixels)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"]).ravel()


@pytest.mark.slow
@pytest.mark.parametrize("which", ["single", "merge"])
def test_every_format_agrees_with_07s_feature_path(pipeline, exported, which):
    """The demo's features are 75 px and so is the export's input: predict.py's Pillow stretch is 02's, and the
    in-graph preprocess is exact, so Keras and the SavedModel agree with 07 to float32 rounding (1e-4). TFLite
    float32 runs other kernels (1e-3); float16 weights are looser (0.01 on P(dog); the benchmark measures 4e-4)."""
    import tensorflow as tf
    info, folder, model_path = exported[which]
    expected, pixels = feature_path_and_pixels(pipeline, model_path)
    assert info["input_size"] == int(IMAGE_SIZE) and np.ptp(expected) > 0.01  # not a constant model
    keras_model = helper.load_keras(folder / "catdog.keras")
    np.testing.assert_allclose(keras_model.predict(pixels, verbose=0).ravel(), expected, atol=1e-4)
    loaded = tf.saved_model.load(str(folder / "saved_model"))  # kept: its variables die with it
    served = loaded.serve(tf.constant(pixels))
    np.testing.assert_allclose(np.asarray(served).ravel(), expected, atol=1e-4)
    # Float32 TFLite runs other kernels (1e-3); --quantize float16 rounds every weight to float16 (0.01).
    tolerance = {"none": 1e-3, "float16": 0.01}[info["quantize"]]
    np.testing.assert_allclose(tflite_predict(folder / "catdog.tflite", pixels), expected, atol=tolerance)
    meta = json.loads((folder / "export.json").read_text())
    assert meta["source"] == str(model_path.resolve()) and meta["clip"] == list(helper.CLIP)
    assert [b["backbone"] for b in meta["backbones"]] == helper.load_model(model_path)[1]["features"]


def test_08_and_predict_on_a_small_demo(tmp_path, capsys):
    """The fast tier's 08 and predict.py main paths: a VGG16 head at 32 px (the smallest graph to export) on a small
    demo, exported with float32 TFLite. Every format gives 07's P(dog) (the tolerances of the test above), and
    predict.py prints it, clipped, for each test image."""
    d = ["--data-dir", tmp_path / "data", "--model-dir", tmp_path / "model"]
    run("01", *d, "--demo", 6)
    run("02", *d, "--weights", "none", "--image-size", 32, "--models", "VGG16", "--batch-size", 8)
    run("03", *d, "--models", "VGG16", "--batch-size", 4, "--epochs", 2, "--no-predict")
    model_path = tmp_path / "model" / "single" / "VGG16.keras"
    info = run("08", *d, "--model", model_path, "--quantize", "none")
    folder = tmp_path / "model" / "export"
    assert info["input_size"] == 32 and info["max_diff_vs_features"] < 1e-4
    model, meta = helper.load_model(model_path)
    expected = helper.load_features(meta["features"], tmp_path / "data", parts=("test",)).predict(model, "test")
    _, paths = helper.test_images(tmp_path / "data")
    pixels = np.stack([helper.load_pixels(p, 32) for p in paths])
    assert len(paths) == 3 and np.ptp(expected) > 0  # three test images, not a constant model
    got = helper.load_keras(folder / "catdog.keras").predict(pixels, verbose=0).ravel()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_allclose(tflite_predict(folder / "catdog.tflite", pixels), expected, atol=1e-3)
    spec = importlib.util.spec_from_file_location("predict", ROOT / "predict.py")
    predict = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(predict)
    capsys.readouterr()
    assert predict.main(predict.parse_args([*paths, "--model", str(folder / "catdog.tflite"), "--json"])) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["file"] for row in rows] == paths and all(row["error"] is None for row in rows)
    np.testing.assert_allclose([row["p_dog"] for row in rows], np.clip(expected, *helper.CLIP), atol=1e-3)
    assert [row["label"] for row in rows] == ["dog" if p >= 0.5 else "cat" for p in np.clip(expected, *helper.CLIP)]
    assert predict.main(predict.parse_args([paths[0], "--model", str(folder / "catdog.keras"), "--cam",
                                            str(tmp_path / "cam")])) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{paths[0]}\t") and f"\t{np.clip(expected[0], *helper.CLIP):.4f}\t" in line
    assert (tmp_path / "cam" / f"{Path(paths[0]).stem}_cam.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_export_is_one_flat_graph(exported):
    import keras
    model = helper.load_keras(exported["merge"][1] / "catdog.keras")
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)
    assert model.input.dtype == "uint8" and tuple(model.input.shape) == (None, 75, 75, 3)
    for name in ("ResNet50", "InceptionV3", "Xception"):
        assert model.get_layer(f"{name}_avg_pool").input.shape[-1] == 2048
    assert model.get_layer("concat").output.shape[-1] == 3 * 2048


@pytest.mark.slow
def test_split_fine_tuned_model_exports(pipeline, tmp_path):
    """04's split model: the backbone is rebuilt and the fine-tuned block's weights put back. 07 feeds it the
    float16 maps cache, the export computes the maps in float32: agreement to 0.01."""
    model_dir = tmp_path / "model"
    run("04", "--data-dir", pipeline["data"], "--model-dir", model_dir, "--weights", "none", "--image-size",
        IMAGE_SIZE, *HEAD, "--init", "random", "--epochs", 2)
    model_path = model_dir / "finetune" / "ResNet50_random.keras"
    info = run("08", "--data-dir", pipeline["data"], "--model-dir", model_dir, "--model", model_path,
               "--quantize", "none")
    expected, pixels = feature_path_and_pixels(pipeline, model_path)
    got = helper.load_keras(model_dir / "export" / "catdog.keras").predict(pixels, verbose=0).ravel()
    # 0.01: 07's P(dog) comes from the float16 maps cache, the export's from float32 maps (the same for TFLite
    # below: --quantize none, so its float32 kernels add only ~1e-3).
    np.testing.assert_allclose(got, expected, atol=0.01)
    assert info["max_diff_vs_features"] < 0.01  # 08's own check says the same
    import tensorflow as tf
    loaded = tf.saved_model.load(str(model_dir / "export" / "saved_model"))
    np.testing.assert_allclose(np.asarray(loaded.serve(tf.constant(pixels))).ravel(), got, atol=1e-5)
    np.testing.assert_allclose(tflite_predict(model_dir / "export" / "catdog.tflite", pixels), expected, atol=0.01)


@pytest.mark.slow
def test_full_mode_model_exports(pipeline, tmp_path):
    """04 --mode full: the nested backbone's fine-tuned weights go into the flat graph; 07 reads the same images
    through Pillow at the same size, so the export agrees to float32 rounding."""
    model_dir = tmp_path / "model"
    run("04", "--data-dir", pipeline["data"], "--model-dir", model_dir, "--weights", "none", "--image-size", 48,
        *HEAD, "--mode", "full", "--init", "random", "--epochs", 1)
    model_path = model_dir / "finetune" / "ResNet50_full_random.keras"
    info = run("08", "--data-dir", pipeline["data"], "--model-dir", model_dir, "--model", model_path, "--quantize",
               "none")
    assert info["input_size"] == 48 and info["max_diff_vs_features"] is None  # no feature files to compare with
    model, meta = helper.load_model(model_path)
    _, paths = helper.test_images(pipeline["data"])
    expected = helper.predict_images(model, paths, meta)
    pixels = np.stack([helper.load_pixels(p, 48) for p in paths])
    got = helper.load_keras(model_dir / "export" / "catdog.keras").predict(pixels, verbose=0).ravel()
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "area", "nearest"])
def test_in_graph_resize_is_pillows(interpolation):
    """A branch smaller than the input resizes with Pillow's own weights: within 1.5 grey levels of 02's resize
    of the same pixels, 0.5 on average (Pillow rounds each of its two passes to uint8, the graph does not)."""
    import keras
    from PIL import Image
    export = script("08")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (96, 96, 3)).astype(np.uint8)
    image = keras.Input((96, 96, 3))
    model = keras.Model(image, export.resize(image, 96, 75, interpolation, "t"))
    got = model.predict(pixels[None].astype(np.float32), verbose=0)[0]
    filt = helper.pil_filter(interpolation)
    expected = np.asarray(Image.fromarray(pixels).resize((75, 75), filt), np.float32)
    assert np.abs(got - expected).max() <= 1.5 and np.abs(got - expected).mean() < 0.5


def test_grad_cam_equals_the_analytic_map():
    """For A = x W (a 1x1 linear convolution), pooling and logit = w . mean(A) + b, the logit's gradient over
    A[i, j, c] is w_c / (h * w): Grad-CAM is ReLU(sum_c w_c / (h * w) * A_c), known in closed form."""
    import keras
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
    kernel, head = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(4, 1)).astype(np.float32)
    inp = keras.Input((6, 6, 3))
    conv = keras.layers.Conv2D(4, 1, use_bias=False, name="maps")
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(conv(inp))
    logit = keras.layers.Dense(1, name="logit")
    model = keras.Model(inp, keras.layers.Activation("sigmoid")(logit(pooled)))
    conv.set_weights([kernel[None, None]])
    logit.set_weights([head, np.array([0.3], np.float32)])
    cams = helper.grad_cam(model, x, ["pool"])
    a = x @ kernel                                                  # (2, 6, 6, 4)
    expected = np.maximum((a * head[:, 0] / 36).sum(axis=-1), 0)   # (2, 6, 6)
    assert cams.shape == (1, 2, 6, 6)
    np.testing.assert_allclose(cams[0], expected, atol=1e-5)


@pytest.mark.slow
def test_grad_cam_on_the_exported_merged_model(pipeline, exported, tmp_path):
    model = helper.load_keras(exported["merge"][1] / "catdog.keras")
    _, pixels = feature_path_and_pixels(pipeline, exported["merge"][2])
    cams = helper.grad_cam(model, pixels[:2], [f"{n}_avg_pool" for n in ("ResNet50", "InceptionV3", "Xception")])
    assert cams.shape == (3, 2, 75, 75) and np.isfinite(cams).all() and (cams >= 0).all()
    norm = cams / np.maximum(cams.max(axis=(2, 3), keepdims=True), 1e-12)
    assert 0 <= norm.min() and norm.max() <= 1 and (norm.max(axis=(2, 3)) > 0).any()
    helper.save_cam_overlay(pixels[0], cams[:, 0], ["ResNet50", "InceptionV3", "Xception"], tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def predict_cli(*argv):
    return subprocess.run([sys.executable, str(ROOT / "predict.py"), *map(str, argv)], capture_output=True,
                          text=True, env=ENV, cwd=ROOT)


@pytest.mark.slow
def test_predict_classifies_good_files_and_names_bad_ones(pipeline, exported, tmp_path):
    folder = exported["merge"][1]
    test = pipeline["data"] / "test"
    png, bad = tmp_path / "photo.png", tmp_path / "notes.jpg"
    from PIL import Image
    Image.open(test / "1.jpg").convert("L").save(png)  # grayscale PNG content
    bad.write_text("not a picture")
    r = predict_cli(test / "1.jpg", bad, png, "--model", folder / "catdog.tflite", "--json")
    assert r.returncode == 1, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["file"] for row in rows] == [str(test / "1.jpg"), str(bad), str(png)]
    assert set(rows[0]) == {"file", "label", "p_dog", "ms", "error"}
    assert rows[0]["error"] is None and rows[1]["error"].startswith(f"{bad}: not a readable image")
    assert rows[1]["p_dog"] is None and rows[2]["label"] in ("cat", "dog")
    keras_model, _ = helper.load_keras(folder / "catdog.keras"), None
    p = float(keras_model.predict(helper.load_pixels(test / "1.jpg", 75)[None], verbose=0)[0, 0])
    # float16 TFLite weights against the float32 Keras model; their agreement (0.01) is tested above, this only
    # checks that predict.py's row carries that model's P(dog).
    assert rows[0]["p_dog"] == pytest.approx(np.clip(p, *helper.CLIP), abs=0.05)
    assert rows[0]["label"] == ("dog" if rows[0]["p_dog"] >= 0.5 else "cat")
    assert "2 classified, 1 failed" in r.stderr and "images/s" in r.stderr
    r = predict_cli(test / "1.jpg", test / "2.jpg", "--model", folder / "catdog.keras", "--cam", tmp_path / "cam")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{test / '1.jpg'}\t") and lines[0].endswith(" ms")
    assert sorted(p.name for p in (tmp_path / "cam").iterdir()) == ["1_cam.png", "2_cam.png"]


@pytest.mark.slow
def test_predict_refuses_what_it_cannot_do(exported, tmp_path):
    folder = exported["merge"][1]
    r = predict_cli("x.jpg", "--model", folder / "catdog.tflite", "--cam", tmp_path)
    assert r.returncode == 2 and "--cam needs the .keras model" in r.stderr
    r = predict_cli("x.jpg", "--model", tmp_path / "missing.keras")
    assert r.returncode == 2 and "run 08_export_model.py first" in r.stderr and "Traceback" not in r.stderr
    r = predict_cli("x.jpg", "--model", folder / "export.json")
    assert r.returncode == 2 and "give 08's catdog.keras or catdog.tflite" in r.stderr
    with pytest.raises(CatDogError, match="split.csv is not a .keras model"):
        helper.load_model(tmp_path / "split.csv")  # 07/08 --model given the wrong file


@pytest.mark.slow
def test_07_analyze_draws_grad_cam_of_the_worst_images(pipeline, exported, tmp_path):
    run("07", "--data-dir", pipeline["data"], "--model-dir", pipeline["model"], "--model", exported["merge"][2],
        "--output", tmp_path / "s.csv", "--analyze", "--top", 3)
    cams = sorted((pipeline["model"] / "analysis" / "cam").glob("*.png"))
    worst = pd.read_csv(pipeline["model"] / "analysis" / "worst.csv").head(3)
    assert {p.stem for p in cams} >= {f.rsplit(".", 1)[0] for f in worst.filename}


def test_export_refuses_what_it_cannot_rebuild(tmp_path):
    export = script("08")
    head = helper.build_head({"VGG16": 512, "Xception": 2048}, 0.5, helper.make_optimizer("adadelta", 1.0), 0)
    attrs = [helper.ExtractSettings("VGG16", 32, weights="none").attrs(),
             helper.ExtractSettings("Xception", 71, weights="none").attrs()]
    meta = {"kind": "merge", "features": ["VGG16", "Xception"], "feature_attrs": attrs}
    with pytest.raises(CatDogError, match="share layer names .*block1_conv1"):
        export.pixel_model(head, meta, tmp_path / "m.keras", None)
    single = helper.build_head({"VGG16": 512}, 0.5, helper.make_optimizer("adadelta", 1.0), 0)
    draft = {"kind": "single", "features": ["VGG16"],
             "feature_attrs": [helper.ExtractSettings("VGG16", 32, jpeg_draft=True).attrs()]}
    with pytest.raises(CatDogError, match="--jpeg-draft"):
        export.pixel_model(single, draft, tmp_path / "m.keras", None)


@pytest.mark.slow
def test_backbones_of_different_sizes(tmp_path):
    """ResNet50 at 64 px beside InceptionV3 at 75: the export's input is 75 px and the ResNet50 branch resizes
    75 -> 64 in the graph, so its pixels are resampled twice where 02 resized once. On the demo that moves P(dog)
    by about 0.01 (08 refuses an export off by more than --max-diff, 0.02 by default)."""
    d = ["--data-dir", tmp_path / "data", "--model-dir", tmp_path / "model"]
    run("01", *d, "--demo", 12)
    run("02", *d, "--weights", "none", "--image-size", 64, "--models", "ResNet50")
    run("02", *d, "--weights", "none", "--image-size", 75, "--models", "InceptionV3")
    run("05", *d, "--models", "ResNet50", "InceptionV3", "--batch-size", 8, "--epochs", 3)
    model_path = tmp_path / "model" / "merge" / "ResNet50+InceptionV3.keras"
    info = run("08", *d, "--model", model_path, "--quantize", "none")
    # The double resampling of the ResNet50 branch (above), within 08's default --max-diff.
    assert info["input_size"] == 75 and 0 < info["max_diff_vs_features"] <= 0.02
    exported = helper.load_keras(tmp_path / "model" / "export" / "catdog.keras")
    assert exported.get_layer("ResNet50_resize_w").output.shape[-1] == 64
    with pytest.raises(CatDogError, match=r"differs from 07's by 0\.0\d+ \(more than --max-diff 0\.0001\)"):
        run("08", *d, "--model", model_path, "--max-diff", 0.0001)
    with pytest.raises(CatDogError, match="--weights imagenet: the model's ResNet50 features were made with "
                                          "--weights none"):
        run("08", *d, "--model", model_path, "--weights", "imagenet")
    assert json.loads((tmp_path / "model" / "export" / "export.json").read_text())["source_sha256"] == \
        helper.file_sha256(model_path)  # the refused runs left the good export alone


@pytest.mark.parametrize("mode", ["L", "CMYK", "I;16", "P", "RGBA"])
def test_load_pixels_takes_every_mode_users_have(tmp_path, mode):
    from PIL import Image
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3)).astype(np.uint8))
    im = rgb.convert(mode) if mode != "I;16" else Image.fromarray(
        (np.asarray(rgb.convert("L"), np.uint16) * 257).astype(np.uint16))
    path = tmp_path / f"x.{'jpg' if mode in ('L', 'CMYK') else 'png'}"
    im.save(path)
    pixels = helper.load_pixels(path, 32)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    assert 20 < pixels.mean() < 235  # 16-bit is scaled to 8 bits, not clipped to white
