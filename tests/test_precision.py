"""--precision (issue 21): `auto` from CPU flags and GPUs, the setting in feature files and sidecars (and the files
of the release before), bfloat16 features close to float32 ones, heads refusing features of another precision,
04 training and 08 exporting in bfloat16."""

import importlib.util
import logging
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import HEAD, IMAGE_SIZE, ROOT, run, script

import catdog.precision
import helper
from helper import CatDogError

# Measured (benchmarks/precision_bench.md): bfloat16 features are 0.36% (ResNet50) and 1.1% (InceptionV3) from
# float32 ones in relative L2 at native size with random weights; the bound leaves room for other sizes and CPUs.
FEATURE_TOLERANCE = 0.02


def predict_module():
    spec = importlib.util.spec_from_file_location("predict_script", ROOT / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- auto

@pytest.mark.parametrize("flags, gpus, picked, why", [
    ({"avx512f", "avx512_bf16"}, [], "bfloat16", "no GPU; the CPU has avx512_bf16"),
    ({"amx_tile", "amx_bf16"}, [], "bfloat16", "no GPU; the CPU has amx_bf16, amx_tile"),
    ({"avx512f", "avx2"}, [], "float32", "no GPU; the CPU has none of avx512_bf16"),
    (set(), [("NVIDIA H100", (9, 0))], "float16", "NVIDIA H100 (compute capability 9.0): tensor cores"),
    ({"avx512_bf16"}, [("Tesla V100", (7, 0))], "float16", "compute capability 7.0"),
    ({"avx512_bf16"}, [("Tesla P100", (6, 0))], "float32", "float16 pays from compute capability 7.0"),
    (set(), [("A100", (8, 0)), ("GTX 1080", (6, 1))], "float32", "GTX 1080 (compute capability 6.1)"),
    (set(), [("some GPU", None)], "float32", "compute capability unknown"),
])
def test_auto_picks_by_cpu_flags_and_gpus_and_says_why(flags, gpus, picked, why, caplog):
    with caplog.at_level(logging.INFO, logger="catdog"):
        assert helper.resolve_precision("auto", lambda: flags, lambda: gpus) == picked
    assert f"--precision auto: {picked} (" in caplog.text and why in caplog.text


def test_an_explicit_precision_is_kept_whatever_the_machine():
    def boom():
        raise AssertionError("not asked")
    for p in helper.PRECISIONS:
        assert helper.resolve_precision(p, boom, boom) == p


def test_the_readers_cpuinfo_and_tensorflows_device_details(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n\n"
                    "processor\t: 1\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n")
    assert helper.cpu_flags(str(info)) == {"fpu", "avx512f", "avx512_bf16", "amx_tile"}
    assert helper.cpu_flags(str(tmp_path / "missing")) == set()
    import tensorflow as tf
    devices = [SimpleNamespace(name="/physical_device:GPU:0"), SimpleNamespace(name="/physical_device:GPU:1")]
    details = {devices[0].name: {"device_name": "NVIDIA A100", "compute_capability": (8, 0)}, devices[1].name: {}}
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind: devices if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "get_device_details", lambda d: details[d.name])
    assert helper.gpu_capabilities() == [("NVIDIA A100", (8, 0)), ("/physical_device:GPU:1", None)]
    # The defaults read those: no GPU and a bf16 CPU is bfloat16.
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind: [])
    monkeypatch.setattr(catdog.precision, "cpu_flags", lambda: helper.cpu_flags(str(info)))
    assert helper.resolve_precision("auto") == "bfloat16"


# ----------------------------------------------------------------------------- the flag

@pytest.mark.parametrize("step", ["02", "04", "08", "predict"])
def test_every_cnn_step_has_the_flag_float32_by_default(step, capsys):
    module = predict_module() if step == "predict" else script(step)
    first = ["photo.jpg"] if step == "predict" else []
    assert module.parse_args(first).precision == "float32"
    assert module.parse_args([*first, "--precision", "bfloat16"]).precision == "bfloat16"
    assert module.parse_args([*first, "--precision", "auto"]).precision == "auto"
    with pytest.raises(SystemExit):
        module.parse_args([*first, "--precision", "bf16"])
    assert "invalid choice: 'bf16'" in capsys.readouterr().err


def test_mixed_precision_is_float16_and_says_so(capsys):
    assert script("02").parse_args(["--mixed-precision"]).precision == "float16"
    with pytest.raises(SystemExit):
        script("02").parse_args(["-h"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--mixed-precision the same as --precision float16" in text and "auto: bfloat16 on such a CPU" in text


def test_predict_refuses_a_precision_for_tflite(capsys):
    with pytest.raises(SystemExit):
        predict_module().parse_args(["x.jpg", "--model", "catdog.tflite", "--precision", "bfloat16"])
    assert "--precision bfloat16 applies to .keras models" in capsys.readouterr().err


def test_policy_is_set_inside_and_restored_after_an_error():
    import keras
    with helper.precision_policy("bfloat16") as p:
        assert p == "bfloat16" and keras.config.dtype_policy().name == "mixed_bfloat16"
        assert keras.layers.Dense(2).compute_dtype == "bfloat16"
    with pytest.raises(RuntimeError), helper.precision_policy("float16"):
        assert keras.config.dtype_policy().name == "mixed_float16"
        raise RuntimeError
    assert keras.config.dtype_policy().name == "float32"


def test_as_precision_keeps_the_weights_and_a_float32_output():
    import keras
    helper.set_seed(1)
    x = keras.Input((8, 8, 3), dtype="uint8")
    y = keras.layers.Conv2D(4, 3)(keras.layers.Rescaling(1 / 255)(x))
    y = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D()(y))
    model = keras.Model(x, keras.layers.Activation("sigmoid", name="p_dog")(y))
    pixels = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    bf16 = helper.as_precision(model, "bfloat16")
    assert [la.dtype_policy.name for la in bf16.layers[1:]] == ["mixed_bfloat16"] * 4 + ["float32"]
    assert bf16.output.dtype == "float32" and helper.as_precision(bf16, "bfloat16") is bf16
    assert helper.as_precision(model, "float32") is model
    ref, got = model.predict(pixels, verbose=0), bf16.predict(pixels, verbose=0)
    assert not np.array_equal(ref, got)
    np.testing.assert_allclose(got, ref, atol=0.01)
    back = helper.as_precision(bf16, "float32")  # predict.py --precision float32 on a bfloat16 export
    np.testing.assert_allclose(back.predict(pixels, verbose=0), ref, rtol=1e-6)


# ----------------------------------------------------------------------------- a setting of the files

def test_files_of_the_release_before_map_to_a_precision():
    old = {"backbone": "ResNet50", "image_size": 224, "mixed_precision": np.bool_(True)}
    assert helper.ExtractSettings.of(old).precision == "float16"
    assert helper.ExtractSettings.of({**old, "mixed_precision": np.bool_(False)}).precision == "float32"
    now = helper.ExtractSettings("ResNet50", 224)
    assert "mixed_precision" not in now.attrs() and now.attrs()["precision"] == "float32"
    # An old float32 file (or sidecar) is the same as a float32 one now, an old float16 one is float16.
    assert helper.setting_changes({**old, "mixed_precision": False}, now.attrs()) == []
    assert helper.setting_changes(old, {**now.attrs(), "precision": "float16"}) == []
    assert helper.setting_changes(old, now.attrs()) == ["precision"]
    with pytest.raises(CatDogError, match=r"precision=float16; here now gives precision=float32: fix"):
        helper.check_same_settings(old, now.attrs(), "a head", "here", "fix")
    words = helper.rebuild_command("ResNet50", {**now.attrs(), "precision": "bfloat16"}).split()
    assert script("02").parse_args(words[1:]).precision == "bfloat16"
    assert "--precision" not in helper.rebuild_command("ResNet50", now.attrs())
    assert "--precision float16" in helper.rebuild_command("ResNet50", old)


def test_an_old_file_is_reused_and_another_precision_is_redone(pipeline, tmp_path, caplog):
    import h5py
    data = tmp_path / "data"
    shutil.copytree(pipeline["data"], data, symlinks=True)
    path = helper.feature_path(data, "ResNet50")
    with h5py.File(path, "r+") as f:  # as the release before wrote it
        del f.attrs["precision"]
        f.attrs["mixed_precision"] = False
    st = helper.ExtractSettings.of(helper.feature_file_state(path))
    split, ids = helper.read_split(data), helper.laid_out_test_ids(data)
    assert st.precision == "float32" and helper.stale_reason(path, st, split, ids) == ""
    import dataclasses
    assert helper.stale_reason(path, dataclasses.replace(st, precision="bfloat16"), split, ids) == (
        "made with other settings (precision=float32, now bfloat16)")
    with caplog.at_level(logging.INFO, logger="catdog"):
        run("02", "--data-dir", data, "--weights", "none", "--image-size", IMAGE_SIZE, "--models", "ResNet50")
    assert "is complete with these settings: skipped" in caplog.text


# ----------------------------------------------------------------------------- bfloat16 features and heads

@pytest.fixture(scope="module")
def bf16(pipeline, tmp_path_factory):
    """The demo's data with ResNet50 features in bfloat16 (02 --precision auto on a faked bf16 CPU), and a 03 head
    trained on them."""
    root = tmp_path_factory.mktemp("bf16")
    data, model = root / "data", root / "model"
    shutil.copytree(pipeline["data"], data, symlinks=True)
    d = ["--data-dir", data, "--model-dir", model]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(catdog.precision, "cpu_flags", lambda: {"avx512_bf16"})
        mp.setattr(catdog.precision, "gpu_capabilities", lambda: [])
        run("02", *d, "--weights", "none", "--image-size", IMAGE_SIZE, "--models", "ResNet50", "--precision", "auto")
    run("03", *d, *HEAD, "--models", "ResNet50", "--no-predict")
    return {"data": data, "model": model, "d": d, "head": model / "single" / "ResNet50.keras"}


def test_bfloat16_features_are_close_to_float32(pipeline, bf16):
    assert helper.feature_file_state(helper.feature_path(bf16["data"], "ResNet50"))["precision"] == "bfloat16"
    ref = helper.load_features(["ResNet50"], pipeline["data"], parts=("labelled", "test"))
    got = helper.load_features(["ResNet50"], bf16["data"], parts=("labelled", "test"))
    for part in ("labelled", "test"):
        a, b = getattr(ref, part)[0], getattr(got, part)[0]
        rel = np.linalg.norm(b - a) / np.linalg.norm(a)
        assert 0 < rel < FEATURE_TOLERANCE, rel


def test_a_head_on_bfloat16_features_refuses_float32_ones(pipeline, bf16, tmp_path):
    meta = helper.read_sidecar(bf16["head"])
    assert meta["feature_attrs"][0]["precision"] == "bfloat16" and meta["args"]["models"] == ["ResNet50"]
    assert run("07", *bf16["d"], "--model", bf16["head"], "--output", tmp_path / "ok.csv").label.notna().all()
    data = tmp_path / "data"  # a copy: the fixture's data keeps its bfloat16 features for the tests after this one
    shutil.copytree(bf16["data"], data, symlinks=True)
    shutil.copy(helper.feature_path(pipeline["data"], "ResNet50"), helper.feature_path(data, "ResNet50"))
    with pytest.raises(CatDogError, match=r"made with precision=bfloat16; .*ResNet50.h5 now gives "
                                          r"precision=float32: rerun 02_extract_features.py .*--precision bfloat16"):
        run("07", "--data-dir", data, "--model-dir", bf16["model"], "--model", bf16["head"],
            "--output", tmp_path / "sub.csv")


@pytest.mark.slow
def test_04_fine_tunes_in_bfloat16(pipeline, tmp_path):
    data = tmp_path / "data"  # its own maps file: the session's data keeps test_finetune's
    shutil.copytree(pipeline["data"], data, symlinks=True)
    d = ["--data-dir", data, "--model-dir", tmp_path / "model"]
    table = run("04", *d, "--weights", "none", "--image-size", 32, *HEAD, "--init", "random", "--epochs", 2,
                "--precision", "bfloat16", "--dtype", "float32")
    assert np.isfinite(table.val_loss).all()
    path = tmp_path / "model" / "finetune" / "ResNet50_random.keras"
    model, meta = helper.load_model(path)
    assert meta["args"]["precision"] == "bfloat16" and meta["feature_attrs"][0]["precision"] == "bfloat16"
    tail = next(la for la in model.layers if hasattr(la, "layers"))
    assert {la.dtype_policy.name for la in tail.layers if la.weights} == {"mixed_bfloat16"}
    head = model.get_layer(helper.PREDICTION_LAYER)
    assert head.dtype_policy.name == "float32" and head.kernel.dtype == "float32"  # variables stay float32
    maps = helper.feature_path(data, "ResNet50_conv5_block2_out_maps")
    assert helper.feature_file_state(maps)["precision"] == "bfloat16"
    sub = run("07", *d, "--model", path, "--output", tmp_path / "sub.csv")
    assert sub.label.between(*helper.CLIP).all()


@pytest.mark.slow
def test_08_exports_a_bfloat16_head_in_float32_or_bfloat16(bf16, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="catdog"):
        info = run("08", *bf16["d"], "--model", bf16["head"], "--out-dir", tmp_path / "f32", "--quantize", "none")
    assert "features were computed in bfloat16; the export computes in float32" in caplog.text
    assert info["precision"] == "float32" and info["max_diff_vs_features"] < 0.02
    info = run("08", *bf16["d"], "--model", bf16["head"], "--out-dir", tmp_path / "bf16", "--quantize", "none",
               "--precision", "bfloat16")
    assert info["precision"] == "bfloat16" and info["max_diff_vs_features"] < 0.02
    model = helper.load_keras(tmp_path / "bf16" / helper.EXPORT_KERAS)
    assert model.get_layer("conv1_conv").dtype_policy.name == "mixed_bfloat16" and model.output.dtype == "float32"
    assert (tmp_path / "bf16" / helper.EXPORT_TFLITE).stat().st_size > 0  # from the float32 twin
    # predict.py computes the .keras export in the precision it is asked for.
    predict = predict_module()
    _, paths = helper.test_images(bf16["data"])
    pixels = helper.load_pixels(paths[0], int(IMAGE_SIZE))
    as_f32 = predict.Classifier(tmp_path / "bf16" / helper.EXPORT_KERAS, "float32")
    assert {la.dtype_policy.name for la in as_f32.model.layers} == {"float32"}
    f32 = predict.Classifier(tmp_path / "f32" / helper.EXPORT_KERAS)
    assert as_f32.p_dog(pixels) == pytest.approx(f32.p_dog(pixels), abs=1e-5)
