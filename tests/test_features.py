"""02_extract_features.py, the backbone registry and the feature cache."""

import logging
import os

import h5py
import numpy as np
import pytest
from conftest import IMAGE_SIZE, extract, run, script

import helper
from helper import CatDogError

# The keras.applications CNNs; the foundation encoders' builds are tests/test_encoders.py's.
CNNS = [n for n, b in helper.BACKBONES.items() if isinstance(b, helper.Backbone)]

@pytest.mark.slow
@pytest.mark.parametrize("name", CNNS)
def test_backbone_builds_at_smallest_size(name):
    """Guards the registry's min_size and width (what 02 checks every request against) against Keras's models."""
    bb = helper.BACKBONES[name]
    model = bb.build("none", bb.min_size)
    assert tuple(model.output.shape) == (None, bb.width)
    with pytest.raises(CatDogError, match=f">= {bb.min_size}"):
        bb.build("none", bb.min_size - 1)


@pytest.mark.parametrize("name", CNNS)
def test_registry_preprocess_matches_keras(name):
    """Our wrapper: Keras's own preprocess_input per backbone, without editing the caller's array in place."""
    import keras
    bb = helper.BACKBONES[name]
    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    original = x.copy()
    expected = getattr(keras.applications, bb.module).preprocess_input(x.copy())
    got = bb.preprocess(x)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)
    assert np.array_equal(x, original), "preprocess must not edit the caller's array"
    caffe = bb.name in ("ResNet50", "VGG16")
    assert (np.asarray(got).min() < -1) == caffe  # caffe subtracts means; the Inception family maps to [-1, 1]


def test_xception_split_layer_is_found_by_type():
    bb = helper.BACKBONES["Xception"]
    names = {script("04").split_layer_name(bb, bb.build("none", 71)) for _ in range(2)}
    assert len(names) == 2 and all(n.startswith("add") for n in names)  # numbered per session, found anyway


def test_weights_folder_without_the_file_says_which_file(tmp_path):
    with pytest.raises(CatDogError, match="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"):
        helper.BACKBONES["ResNet50"].build(str(tmp_path), 32)
    assert helper.resolve_weights("none", helper.BACKBONES["VGG16"]) is None
    assert helper.resolve_weights("imagenet", helper.BACKBONES["VGG16"]) == "imagenet"


def test_feature_files_are_aligned_and_described(pipeline):
    data, split = pipeline["data"], pipeline["split"]
    for name in ("ResNet50", "InceptionV3", "Xception"):
        with h5py.File(data / "features" / f"{name}.h5", "r") as f:
            assert f["labelled"].shape == (len(split), helper.BACKBONES[name].width)
            assert f["labelled"].dtype == np.float32 and f["test"].dtype == np.float32
            assert f["labelled_files"][:].astype(str).tolist() == split.filename.tolist()
            assert f["label"][:].tolist() == split.label.tolist()
            assert f["test_ids"][:].tolist() == list(range(1, f["test"].shape[0] + 1))
            a = dict(f.attrs)
            assert a["complete"] and a["backbone"] == name and a["image_size"] == int(IMAGE_SIZE)
            assert a["weights"] == "none" and a["interpolation"] == "bilinear" and a["seed"] == 2018
            assert a["keras"].startswith("3.") and a["tensorflow"]
            assert np.isfinite(f["labelled"][:]).all()
    table = pipeline["extract"]
    assert table.backbone.tolist() == ["ResNet50", "InceptionV3", "Xception"]
    assert (table.images == len(split) + 16).all()


def test_features_equal_a_direct_predict(pipeline):
    import keras
    import tensorflow as tf
    data = pipeline["data"]
    bb = helper.BACKBONES["ResNet50"]
    keras.utils.set_random_seed(2018)  # 02 seeds the random init the same way
    model = bb.build("none", int(IMAGE_SIZE))
    row = 7
    name, label = pipeline["split"].filename[row], pipeline["split"].label[row]
    path = tf.constant(str(data / "train2" / helper.CLASSES[label] / name))
    img = helper.load_resized(path, int(IMAGE_SIZE)).numpy()[None]  # 02's default decoder
    direct = model.predict(bb.preprocess(img), verbose=0)[0]
    with h5py.File(data / "features" / "ResNet50.h5", "r") as f:
        np.testing.assert_allclose(f["labelled"][row], direct, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("decoder", helper.DECODERS)
def test_jpeg_draft_decodes_large_images_at_reduced_scale(pipeline, decoder, tmp_path):
    import tensorflow as tf
    from PIL import Image
    path = str(pipeline["data"] / "train2" / "cat" / "cat.0.jpg")  # 1100 x 800
    full = helper.load_resized(tf.constant(path), 75, "bilinear", False, decoder).numpy()
    draft = helper.load_resized(tf.constant(path), 75, "bilinear", True, decoder).numpy()
    assert full.shape == draft.shape == (75, 75, 3)
    assert 0 < np.abs(full - draft).mean() < 5  # close, not identical: libjpeg scaled the DCT
    png = tmp_path / "cat.png"
    Image.open(path).save(png)
    assert helper.load_resized(tf.constant(str(png)), 75, "bilinear", True, decoder).shape == (75, 75, 3)


@pytest.mark.parametrize("interpolation", helper.INTERPOLATIONS)
def test_pillow_and_tf_decoders_agree(pipeline, interpolation):
    import tensorflow as tf
    for name in ("cat/cat.0.jpg", "dog/dog.1.jpg"):  # a large one, and the grayscale one
        path = tf.constant(str(pipeline["data"] / "train2" / name))
        pil = helper.load_resized(path, 75, interpolation, decoder="pil").numpy()
        tf_ = helper.load_resized(path, 75, interpolation, decoder="tf").numpy()
        assert pil.dtype == tf_.dtype == np.float32
        # Same filters; Pillow rounds to uint8 and the two libjpeg builds differ by a level here and there.
        assert np.abs(pil - tf_).mean() < (8 if interpolation == "nearest" else 2)


def test_rerun_skips_complete_files(small_data, caplog):
    extract(small_data)
    path = small_data / "features" / "VGG16.h5"
    stamp = os.stat(path).st_mtime_ns
    with caplog.at_level(logging.INFO, logger="catdog"):
        extract(small_data)
    assert "skipped" in caplog.text and os.stat(path).st_mtime_ns == stamp
    extract(small_data, "--interpolation", "nearest")  # other settings: redone, not silently reused
    with h5py.File(path, "r") as f:
        assert f.attrs["interpolation"] == "nearest" and f.attrs["decoder"] == "pil"
    extract(small_data, "--interpolation", "nearest", "--decoder", "tf")
    with h5py.File(path, "r") as f:
        assert f.attrs["decoder"] == "tf"


def test_interrupted_run_leaves_nothing_complete_and_rerun_finishes(small_data, monkeypatch):
    calls = {"n": 0}
    real_append = helper.FeatureWriter.append

    def dying_append(self, part, rows, view=0):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        real_append(self, part, rows, view)

    monkeypatch.setattr(helper.FeatureWriter, "append", dying_append)
    with pytest.raises(KeyboardInterrupt):
        extract(small_data)
    path = small_data / "features" / "VGG16.h5"
    assert not path.exists()
    assert not list(path.parent.glob(".*partial"))
    monkeypatch.setattr(helper.FeatureWriter, "append", real_append)
    extract(small_data)
    assert helper.feature_file_state(path)["complete"]


def test_hard_kill_leftover_is_not_mistaken_for_complete(small_data):
    path = small_data / "features" / "VGG16.h5"
    path.parent.mkdir()
    with h5py.File(path, "w") as f:  # what a file without the final attribute looks like
        f["labelled"] = np.zeros((3, 512), np.float32)
    assert helper.feature_file_state(path) is None
    with pytest.raises(CatDogError, match="missing or incomplete"):
        helper.load_features(["VGG16"], small_data)
    extract(small_data)
    assert helper.load_features(["VGG16"], small_data).labelled[0].shape == (12, 512)


def test_load_features_refuses_a_file_from_another_split(small_data):
    extract(small_data)
    ex = small_data / "ex.txt"
    ex.write_text("cat.2.jpg\n")
    run("01", "--data-dir", small_data, "--exclude", ex)
    with pytest.raises(CatDogError, match="do not match the order of split.csv"):
        helper.load_features(["VGG16"], small_data)


def test_load_features_refuses_misaligned_test_ids(small_data):
    extract(small_data)
    run("02", "--data-dir", small_data, "--weights", "none", "--image-size", 32, "--models", "ResNet50")
    with h5py.File(small_data / "features" / "ResNet50.h5", "r+") as f:
        f["test_ids"][0] = 99
    with pytest.raises(CatDogError, match="test rows do not match"):
        helper.load_features(["VGG16", "ResNet50"], small_data)


@pytest.mark.parametrize("decoder", helper.DECODERS)
def test_undecodable_image_is_named(small_data, decoder):
    (small_data / "train" / "dog.3.jpg").write_bytes(b"garbage after 01 checked it")
    with pytest.raises(CatDogError, match="cannot decode .*dog.3.jpg"):
        extract(small_data, "--decoder", decoder)
    assert not (small_data / "features" / "VGG16.h5").exists()


def test_missing_split_says_run_01(tmp_path):
    with pytest.raises(CatDogError, match="run 01_reorganize_data.py"):
        extract(tmp_path)


def test_mixed_precision_features_are_close(small_data):
    extract(small_data)
    ref = helper.load_features(["VGG16"], small_data).labelled[0]
    extract(small_data, "--force", "--mixed-precision")
    import keras
    assert keras.mixed_precision.global_policy().name == "float32"  # restored afterwards
    got = helper.load_features(["VGG16"], small_data).labelled[0]
    np.testing.assert_allclose(got, ref, rtol=0.05, atol=0.05 * np.abs(ref).max())
    assert helper.feature_file_state(small_data / "features" / "VGG16.h5")["precision"] == "float16"


def test_full_disk_removes_the_partial_file_and_says_how_much_is_needed(small_data, monkeypatch):
    import errno

    def full(self, part, rows, view=0):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(helper.FeatureWriter, "append", full)
    with pytest.raises(CatDogError, match=r"features is full: VGG16.h5 needs about 0 MiB there; the partial file "
                                          r"was removed"):
        extract(small_data)
    assert not list((small_data / "features").iterdir())


@pytest.mark.parametrize("interpolation", helper.INTERPOLATIONS)
def test_every_interpolation_feeds_the_inception_preprocess(pipeline, interpolation):
    import tensorflow as tf
    path = tf.constant(str(pipeline["data"] / "train2" / "dog" / "dog.1.jpg"))  # the grayscale one
    img = helper.load_resized(path, 75, interpolation)
    assert img.dtype == tf.float32 and img.shape == (75, 75, 3)
    x = helper.BACKBONES["InceptionV3"].preprocess(img[None])
    assert -1 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 1


def test_feature_files_of_the_last_release_still_read(pipeline, tmp_path):
    """The release before this one named the labelled datasets train, train_files (and train_views,
    train_view_params): such a file is reused by 02 and read by the heads, with the same rows."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(pipeline["data"], data, symlinks=True)
    path = helper.feature_path(data, "ResNet50")
    current = helper.load_features(["ResNet50"], data)
    with h5py.File(path, "r+") as f:
        for new, old in helper.LEGACY_NAMES.items():
            if new in f:
                f.move(new, old)
        assert "labelled" not in f and "train" in f
    before = path.stat().st_mtime_ns
    old = helper.load_features(["ResNet50"], data)
    assert np.array_equal(old.labelled[0], current.labelled[0]) and np.array_equal(old.test[0], current.test[0])
    assert np.array_equal(old.files, current.files)
    run("02", "--data-dir", data, "--weights", "none", "--image-size", IMAGE_SIZE, "--models", "ResNet50")
    assert path.stat().st_mtime_ns == before  # reused, not recomputed
