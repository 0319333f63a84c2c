"""The foundation encoders (catdog/encoders.py): the registry's numbers against the presets, 02's features against
KerasHub's own pipeline (image converter, backbone, the chosen feature), preset folders and failed downloads, and
encoder features merged with a CNN's through 05, 07 and 08. Tiny random encoders of each family at 32 px: the
code path of the real ones; no network."""

import dataclasses
import importlib.util
import json

import h5py
import numpy as np
import pytest
from conftest import ROOT, run, script

import helper
from helper import CatDogError

SIZE = 32
TINY_NAMES = {"DINOv2L": "TinyDINOv2", "DINOv3L": "TinyDINOv3", "CLIPL336": "TinyCLIP", "SigLIP2SO400M": "TinySigLIP",
              "MetaCLIP2H": "TinyMetaCLIP2"}
TINY = dict(num_layers=2, hidden_dim=32, num_heads=2, intermediate_dim=64, patch_size=16)


def tiny(name: str) -> helper.Encoder:
    """A 2-layer, 32-wide encoder of the family of registry entry `name`: same classes, same converter."""
    e = helper.ENCODERS[name]
    cfg = {**e.config, **TINY}
    if "position_embedding_shape" in cfg:
        cfg["position_embedding_shape"] = (64, 64)  # interpolated down to 32 px, as the real 518 ones are
    return dataclasses.replace(e, name=TINY_NAMES[name], config=cfg, projection_dim=16 if e.projection_dim else 0,
                               batch_size=8)


def full_backbone(enc: helper.Encoder):
    """The KerasHub backbone (vision and, for the image-text models, a tiny text tower) whose preset a user has."""
    import keras_hub
    m = keras_hub.models
    shape = (SIZE, SIZE, 3)
    text = dict(vocabulary_size=50, embedding_dim=32, hidden_dim=32, num_layers=1, num_heads=2, intermediate_dim=64,
                max_sequence_length=8)
    if enc.family == "dinov2":
        return m.DINOV2Backbone(**enc.config, image_shape=shape)
    if enc.family == "dinov3":
        return m.DINOV3Backbone(**enc.config, image_shape=shape)
    if enc.family == "clip":
        return m.CLIPBackbone(m.CLIPVisionEncoder(**enc.config, image_shape=shape), m.CLIPTextEncoder(**text),
                              projection_dim=enc.projection_dim)
    if enc.family == "siglip":
        return m.SigLIPBackbone(m.SigLIPVisionEncoder(**enc.config, image_shape=shape), m.SigLIPTextEncoder(**text))
    return m.MetaCLIP2Backbone(m.MetaCLIP2VisionEncoder(**enc.config, image_shape=shape),
                               m.MetaCLIP2TextEncoder(**text), projection_dim=enc.projection_dim)


def reference(backbone, enc: helper.Encoder, converter, image: np.ndarray) -> np.ndarray:
    """KerasHub's own pipeline on one decoded image: converter, backbone, the feature its authors probe."""
    x = converter(image[None])
    if enc.family in ("dinov2", "dinov3"):
        inp = backbone.input
        tokens = np.asarray(backbone({k: x for k in inp} if isinstance(inp, dict) else x))
        first_patch = 1 + int(enc.config.get("num_register_tokens", 0))
        return np.concatenate([tokens[:, 0], tokens[:, first_patch:].mean(1)], axis=-1)[0]
    return np.asarray(backbone.get_vision_embeddings(x))[0]


def script_module(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_registry(monkeypatch):
    entries = {TINY_NAMES[n]: tiny(n) for n in TINY_NAMES}
    for name, e in entries.items():
        monkeypatch.setitem(helper.BACKBONES, name, e)
    return entries


def test_registry_entries():
    """The requested encoders, their presets in the installed KerasHub, feature widths, converters."""
    import keras_hub
    want = {"DINOv2L": ("dinov2_large", 2048), "DINOv2G": ("dinov2_giant", 3072),
            "DINOv3L": ("dinov3_vit_large_lvd1689m", 2048), "CLIPL336": ("clip_vit_large_patch14_336", 768),
            "SigLIP2SO400M": ("siglip2_so400m_patch14_384", 1152),
            "MetaCLIP2H": ("metaclip_2_vit_huge_patch14_224", 1024)}
    presets = keras_hub.models.Backbone.presets
    for name, (preset, width) in want.items():
        e = helper.get_backbone(name)
        assert (e.preset, e.width) == (preset, width), name
        assert presets[preset]["kaggle_handle"] == e.kaggle_handle
        assert presets[preset]["metadata"]["params"] == e.params
        assert e.split_layer is None and e.size >= e.min_size
    assert helper.get_backbone("DINOv3L").gated and not helper.get_backbone("DINOv2L").gated
    conv = helper.get_backbone("SigLIP2SO400M").converter()
    assert (conv.image_size, conv.interpolation, conv.antialias, conv.crop_to_aspect_ratio) == (
        (384, 384), "bicubic", True, False)
    assert np.allclose(conv.scale, [2 / 255] * 3) and np.allclose(conv.offset, [-1] * 3)
    # The report's CNNs stay 02's default; the encoders are choices.
    assert tuple(helper.REPORT_BACKBONES) == (
        "ResNet50", "VGG16", "InceptionV3", "Xception", "InceptionResNetV2")


@pytest.mark.slow
def test_registry_architectures_match_presets():
    """Each entry's architecture has its preset's parameter count, counted on 1- and 2-layer builds of the same
    widths (the layers are identical, so the count is linear in them): the full towers, ViT-g's 1.1B included,
    are never built. DINO presets are vision only, so their counts are exact; the image-text presets' counts
    include the text tower, so their vision towers are checked against vision_params (the published tower sizes:
    CLIP ViT-L 304M, SigLIP SO400M 428M, MetaCLIP 2 ViT-H 632M)."""
    for name, e in helper.ENCODERS.items():
        nets = [dataclasses.replace(e, config={**e.config, "num_layers": n}).build("none") for n in (1, 2)]
        assert nets[0].output.shape == (None, e.width) and nets[0].input.shape == (None, e.size, e.size, 3), name
        counts = [net.count_params() for net in nets]
        total = counts[0] + (counts[1] - counts[0]) * (e.config["num_layers"] - 1)
        assert total == e.vision_params, name
        if e.family == "dinov2":
            assert total == e.params, name
    assert abs(helper.ENCODERS["DINOv3L"].vision_params / 300e6 - 1) < 0.02  # KerasHub rounds it to 300M


@pytest.mark.slow
def test_encoders_through_the_pipeline(tmp_path, tiny_registry, monkeypatch, capsys):
    """02 on preset folders saved here equals KerasHub's own pipeline to 1e-5 for each family; --weights none
    builds them; 05 merges a CNN's and two encoders' features; 07 submits; a missing preset or a failed (gated)
    download fails before any image is read."""
    from PIL import Image
    data, models = tmp_path / "data", tmp_path / "model"
    d = ["--data-dir", data, "--model-dir", models, "--image-size", SIZE]
    run("01", "--data-dir", data, "--model-dir", models, "--demo", 8)
    split = helper.read_split(data)
    first = helper.train_image_paths(data, split)[0]
    decoded = np.asarray(Image.open(first).convert("RGB"))
    for name, enc in tiny_registry.items():
        folder = tmp_path / f"preset_{name}"
        backbone = full_backbone(enc)
        backbone.save_to_preset(str(folder))
        enc.converter(SIZE).save_to_preset(str(folder))
        import keras_hub
        converter = keras_hub.layers.ImageConverter.from_preset(str(folder))
        table = run("02", *d, "--models", name, "--weights", folder)
        assert table.backbone.tolist() == [name]
        with h5py.File(helper.feature_path(data, name), "r") as f:
            row = f["labelled"][0]
            assert f["labelled"].shape[1] == enc.width and f.attrs["interpolation"] == enc.interpolation
        np.testing.assert_allclose(row, reference(backbone, enc, converter, decoded), atol=1e-5, rtol=0, err_msg=name)
    # Random weights, no download: the same architecture, the width recorded.
    none = run("02", *d, "--models", "TinyDINOv2", "--weights", "none", "--force", "--views", 2)
    assert none.images.tolist() == [len(split) + len(helper.laid_out_test_ids(data))]
    run("02", *d, "--models", "ResNet50", "--weights", "none")
    # A CNN and two encoders merged, then 07's submission.
    merged = run("05", "--data-dir", data, "--model-dir", models, "--batch-size", 8, "--epochs", 2,
                 "--models", "ResNet50", "TinyDINOv2", "TinySigLIP")
    assert len(merged) == 1 and np.isfinite(merged.val_loss.iloc[0])
    dm = ["--data-dir", data, "--model-dir", models, "--batch-size", 8, "--epochs", 2]
    run("05", *dm, "--models", "ResNet50", "TinyCLIP", "--folds", 3)  # K-fold heads on a CNN + encoder merge
    run("03", *dm, "--models", "TinyMetaCLIP2", "--folds", 3)
    search = run("06", *dm, "--max-evals", 1, "--models", "ResNet50", "TinyDINOv3")
    assert np.isfinite(search.val_loss).all()
    blend = run("07", "--data-dir", data, "--model-dir", models, "--output", tmp_path / "blend.csv", "--blend", "auto")
    info = json.loads((tmp_path / "blend.json").read_text())
    assert sorted(info["weights"]) == ["ResNet50+TinyCLIP_k3", "TinyMetaCLIP2_k3"]
    assert len(blend) == len(helper.laid_out_test_ids(data))
    sub = run("07", "--data-dir", data, "--model-dir", models, "--output", tmp_path / "sub.csv")
    assert len(sub) == len(helper.laid_out_test_ids(data)) and sub.label.between(0.005, 0.995).all()
    # 08: a CNN + encoder model needs two resizes of each photo: refused, naming them. A head on an encoder's
    # features exports with the encoder and its converter inside, and agrees with 07 on the test images.
    with pytest.raises(CatDogError, match="(?s)differently resized photos.*ResNet50: pillow.*TinyDINOv3: 32 px "
                                          "bilinear antialiased squash"):
        run("08", "--data-dir", data, "--model-dir", models)
    run("03", "--data-dir", data, "--model-dir", models, "--batch-size", 8, "--epochs", 2, "--models", "TinyDINOv2")
    export = tmp_path / "export"
    info = run("08", "--data-dir", data, "--model-dir", models, "--model", models / helper.SINGLE_DIR /
               "TinyDINOv2.keras", "--out-dir", export, "--max-diff", 1e-4)
    assert info["pixels"] == "encoder:TinyDINOv2" and info["max_diff_vs_features"] < 1e-4
    assert (export / helper.EXPORT_TFLITE).is_file() and "tflite_refused" not in info  # every tiny family converts
    # Where the TFLite converter refuses an encoder, the export says why and has no .tflite.
    def refuse(*a):
        raise RuntimeError("op not supported: Erf")
    monkeypatch.setattr(script("08"), "to_tflite", refuse)
    refused = run("08", "--data-dir", data, "--model-dir", models, "--model", models / helper.SINGLE_DIR /
                  "TinyDINOv2.keras", "--out-dir", tmp_path / "export2", "--check", 0)
    assert refused["tflite_refused"] == "RuntimeError: op not supported: Erf"
    assert not (tmp_path / "export2" / helper.EXPORT_TFLITE).exists()
    assert json.loads((tmp_path / "export2" / helper.EXPORT_INFO).read_text())["tflite_refused"]
    predict = script_module("predict")
    photo = helper.test_images(data)[1][0]
    predict.main(predict.parse_args([str(photo), "--model", str(export / helper.EXPORT_KERAS), "--json"]))
    p = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["p_dog"]
    pixels = helper.get_backbone("TinyDINOv2").pixels(photo, SIZE)
    assert abs(p - float(helper.load_keras(export / helper.EXPORT_KERAS).predict(pixels[None], verbose=0)[0, 0])
               ) < 1e-6
    with pytest.raises(CatDogError, match="Grad-CAM is not made for foundation-encoder exports"):
        predict.main(predict.parse_args([str(photo), "--model", str(export / helper.EXPORT_KERAS), "--cam",
                                         str(tmp_path / "c")]))

    # --mixed-precision: float16 compute, the same features to float16's precision.
    with h5py.File(helper.feature_path(data, "TinySigLIP"), "r") as f:
        plain = f["labelled"][:]
    run("02", *d, "--models", "TinySigLIP", "--weights", tmp_path / "preset_TinySigLIP", "--mixed-precision")
    with h5py.File(helper.feature_path(data, "TinySigLIP"), "r") as f:
        assert f.attrs["precision"] == "float16"
        half = f["labelled"][:]
    assert 0 < np.abs(half - plain).max() < 0.05

    # Bad weights fail before any image is read.
    def no_images(*a, **k):
        raise AssertionError("images were read")
    monkeypatch.setattr(helper, "extract_to_file", no_images)
    with pytest.raises(CatDogError, match="not a KerasHub preset folder.*config.json"):
        run("02", *d, "--models", "TinyCLIP", "--weights", tmp_path)

    def gated(handle):
        raise PermissionError("403 Forbidden: accept the licence")
    import kagglehub
    monkeypatch.setattr(kagglehub, "model_download", gated)
    with pytest.raises(CatDogError, match="(?s)could not download TinyCLIP's preset.*--weights FOLDER"):
        run("02", *d, "--models", "TinyCLIP", "--force")
    with pytest.raises(CatDogError, match="(?s)gated: sign in at https://www.kaggle.com/models/keras/dinov3.*accept"):
        run("02", *d, "--models", "ResNet50", "DINOv3L", "--force")
