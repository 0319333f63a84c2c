"""04_finetune_split.py: split_model, frozen BatchNorm, the maps cache, streaming, the variants and 07 on them."""

import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import HEAD, IMAGE_SIZE, run, script
from test_heads import epoch_loss_tags

import helper
from helper import CatDogError

MAPS = "ResNet50_conv5_block2_out_maps"
SMALL = {"ResNet50": 64, "InceptionV3": 75, "Xception": 71}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMALL))
def test_split_model_equals_the_full_model_with_shared_layers(name):
    import keras
    bb = helper.BACKBONES[name]
    keras.utils.set_random_seed(3)
    full = bb.build("none", SMALL[name], pooling=None)
    extractor, tail = script("04").split_model(full, script("04").split_layer_name(bb, full))
    x = np.random.default_rng(0).uniform(-1, 1, (2, SMALL[name], SMALL[name], 3)).astype(np.float32)
    expected = full.predict(x, verbose=0)
    got = tail.predict(extractor.predict(x, verbose=0), verbose=0)
    assert isinstance(got, np.ndarray)  # one tensor out, not a one-element list
    np.testing.assert_allclose(got, expected, atol=1e-5)
    full_weights = {id(w) for w in full.weights}
    assert tail.weights and all(id(w) in full_weights for w in tail.weights)
    for layer in tail.layers[1:]:  # [0] is the tail's own input
        assert full.get_layer(layer.name) is layer


def test_cut_inside_a_block_is_refused():
    full = helper.BACKBONES["ResNet50"].build("none", 32, pooling=None)
    with pytest.raises(CatDogError, match="conv5_block3_add after the cut also reads.*inside a block"):
        script("04").split_model(full, "conv5_block3_1_relu")
    with pytest.raises(CatDogError, match="no layer 'nope'"):
        script("04").split_model(full, "nope")


def classifier_on_tail(size=32):
    import keras
    keras.utils.set_random_seed(5)
    full = helper.BACKBONES["ResNet50"].build("none", size)  # as 04 builds it: to the pooled features
    _, tail = script("04").split_model(full, "conv5_block2_out")
    model = script("04").classifier(tail, tail.input_shape[1:], "maps", 0.5, "ft")
    x = np.random.default_rng(1).normal(size=(16, *tail.input_shape[1:])).astype(np.float16)
    y = (np.arange(16) % 2).astype(np.float32)
    return model, tail, x, y


def bn_state(tail):
    bn = tail.get_layer("conv5_block3_2_bn")
    return [v.numpy().copy() for v in (bn.moving_mean, bn.moving_variance, bn.gamma, bn.beta)]


def test_frozen_batchnorm_keeps_its_statistics_while_convs_train():
    import keras
    model, tail, x, y = classifier_on_tail()
    script("04").set_block_trainable(model, tail, tail.layers, True)
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "binary_crossentropy")
    before, kernel = bn_state(tail), tail.get_layer("conv5_block3_2_conv").kernel.numpy().copy()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    for a, b in zip(before, bn_state(tail), strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.abs(tail.get_layer("conv5_block3_2_conv").kernel.numpy() - kernel).max() > 0
    # Inference mode even when called in training mode: same output both ways (dropout aside).
    trunk = tail(x.astype(np.float32), training=True)
    np.testing.assert_allclose(trunk, tail(x.astype(np.float32), training=False), atol=1e-5)


def test_without_freezing_keras_updates_batchnorm():
    """Why freeze_batchnorm exists: a trainable BN layer in fit() moves its statistics (Keras 2.1's failure)."""
    import keras
    model, tail, x, y = classifier_on_tail()
    model.trainable = True
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "binary_crossentropy")
    before = bn_state(tail)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.abs(bn_state(tail)[0] - before[0]).max() > 0


def test_warmup_phase_trains_only_the_head():
    model, tail, _, _ = classifier_on_tail()
    script("04").set_block_trainable(model, tail, tail.layers, False)
    assert [w.path for w in model.trainable_weights] == ["prediction/kernel", "prediction/bias"]
    script("04").set_block_trainable(model, tail, tail.layers, True)
    names = {w.path.split("/")[0] for w in model.trainable_weights}
    assert names == {"conv5_block3_1_conv", "conv5_block3_2_conv", "conv5_block3_3_conv", "prediction"}


@pytest.fixture
def maps_file(tmp_path):
    rng = np.random.default_rng(0)
    n, shape = 37, (2, 2, 8)
    path = tmp_path / "maps.h5"
    with helper.FeatureWriter(path, [f"cat.{i}.jpg" for i in range(n)], np.arange(n) % 2, [1], shape, "float16",
                              {}) as w:
        w.append("labelled", rng.normal(size=(n, *shape)).astype(np.float16))
        w.append("test", np.zeros((1, *shape), np.float16))
        w.commit()
    return path, n


def test_streaming_and_in_ram_batches_are_identical(maps_file):
    path, n = maps_file
    rows = np.arange(3, n)  # a subset, like split.csv's train rows
    labels = (rows % 2).astype(np.float32)
    ram_rows, stream_rows = script("04").MapRows(path, in_ram=True), script("04").MapRows(path, in_ram=False)
    ram = script("04").map_batches(ram_rows, rows, labels, 8, True, seed=7)
    stream = script("04").map_batches(stream_rows, rows, labels, 8, True, seed=7)
    assert stream.source.array is None and stream.source._ds is None  # nothing read until the first batch
    with h5py.File(path, "r") as f:
        truth = f["labelled"][:]
    orders = []
    for epoch in range(2):
        seen = []
        for k in range(len(ram)):
            (xa, ya), (xb, yb) = ram[k], stream[k]
            assert xa.dtype == np.float16 and np.array_equal(xa, xb) and np.array_equal(ya, yb)
            picked = [int(np.flatnonzero((truth == row).all(axis=(1, 2, 3)))[0]) for row in xa]
            assert np.array_equal(ya, np.asarray(picked) % 2)  # labels travel with their maps
            seen += picked
        assert sorted(seen) == rows.tolist()  # each row once per epoch
        orders.append(seen)
        ram.set_epoch(epoch + 1)
        stream.set_epoch(epoch + 1)
    assert orders[0] != orders[1]  # a new permutation each epoch
    assert stream.source.read_seconds > 0
    ram_rows.close()
    stream_rows.close()


@pytest.fixture(scope="module")
def finetuned(pipeline, tmp_path_factory):
    """04 --init all for 2 epochs on the demo pipeline's data, with a copy of its 03 results."""
    model_dir = tmp_path_factory.mktemp("finetune") / "model"
    shutil.copytree(pipeline["model"] / "single", model_dir / "single")
    d = ["--data-dir", pipeline["data"], "--model-dir", model_dir]
    table = run("04", *d, "--weights", "none", "--image-size", IMAGE_SIZE, *HEAD, "--init", "all",
                "--epochs", 2, "--warmup-epochs", 1, "--load", "stream")
    return {"model": model_dir, "args": d, "table": table}


def test_maps_cache_is_aligned_float16_and_matches_02(pipeline, finetuned):
    import keras
    split = pipeline["split"]
    with h5py.File(pipeline["data"] / "features" / f"{MAPS}.h5", "r") as f:
        assert f["labelled"].dtype == np.float16 and f["labelled"].shape == (len(split), 3, 3, 2048)
        assert f["test"].shape == (16, 3, 3, 2048)
        assert f["labelled_files"][:].astype(str).tolist() == split.filename.tolist()
        assert f["test_ids"][:].tolist() == list(range(1, 17))
        assert f.attrs["complete"] and f.attrs["split_layer"] == "conv5_block2_out"
        assert f.attrs["dtype"] == "float16" and f.attrs["image_size"] == int(IMAGE_SIZE)
        maps = f["labelled"][:]
    # The untouched tail (which ends in the pooling) reproduces 02's ResNet50 features (same pipeline, weights).
    keras.utils.set_random_seed(2018)
    full = helper.BACKBONES["ResNet50"].build("none", int(IMAGE_SIZE))
    _, tail = script("04").split_model(full, "conv5_block2_out")
    pooled = tail.predict(maps.astype(np.float32), verbose=0)
    with h5py.File(pipeline["data"] / "features" / "ResNet50.h5", "r") as f:
        np.testing.assert_allclose(pooled, f["labelled"][:], rtol=2e-2, atol=2e-2 * np.abs(f["labelled"][:]).mean())


def test_baseline_init_starts_as_03s_head(pipeline, finetuned):
    import keras
    keras.utils.set_random_seed(2018)
    full = helper.BACKBONES["ResNet50"].build("none", int(IMAGE_SIZE))
    _, tail = script("04").split_model(full, "conv5_block2_out")
    model = script("04").classifier(tail, tail.input_shape[1:], "maps", 0.5, "a")
    settings = helper.ExtractSettings("ResNet50", int(IMAGE_SIZE), weights="none", split_layer="conv5_block2_out",
                                      dtype="float16")
    weights = script("04").baseline_head(pipeline["model"], settings)
    model.get_layer("prediction").set_weights(weights)
    head, _ = helper.load_model(pipeline["model"] / "single" / "ResNet50.keras")
    with h5py.File(pipeline["data"] / "features" / f"{MAPS}.h5", "r") as f:
        maps = f["labelled"][:20]
    with h5py.File(pipeline["data"] / "features" / "ResNet50.h5", "r") as f:
        feats = f["labelled"][:20]
    # 0.02: the tail reads the float16 maps cache, 03's head 02's features of float32 maps (pooled, they agree
    # to ~2e-2 relative: the test above).
    np.testing.assert_allclose(model.predict(maps, verbose=0), head.predict(feats, verbose=0), atol=0.02)


def test_variants_results_and_logs(finetuned):
    out = finetuned["model"] / "finetune"
    results = pd.read_csv(out / "results.csv")
    variants = ["ResNet50_random", "ResNet50_baseline", "ResNet50_warmup"]
    assert results.model.tolist() == [*variants, "baseline_ResNet50"]
    assert np.isfinite(results.set_index("model").loc[variants, ["val_loss", "best_val_loss", "read_share"]]).all(None)
    base = results.set_index("model").loc["baseline_ResNet50"]
    single = pd.read_csv(finetuned["model"] / "single" / "results.csv").set_index("model").loc["ResNet50"]
    assert base.best_val_loss == pytest.approx(single.best_val_loss)
    for name in variants:
        row = results.set_index("model").loc[name]
        assert row.vs_baseline == pytest.approx(row.val_loss - base.val_loss)
        hist = pd.read_csv(out / f"{name}.history.csv")
        assert len(hist) == 2 and hist.epoch.tolist() == [1, 2]
        assert hist.phase.tolist() == (["head", "block"] if name.endswith("warmup") else ["block", "block"])
        logs = finetuned["model"] / "logs" / "finetune" / name
        assert "epoch_loss" in epoch_loss_tags(logs / "validation")
        model, meta = helper.load_model(out / f"{name}.keras")
        assert meta["features"] == [MAPS] and meta["kind"] == "finetune" and meta["seed"] == 2018
        assert type(model.optimizer).__name__ == "SGD"
        assert float(model.optimizer.learning_rate) == pytest.approx(0.001)
        assert float(model.optimizer.momentum) == pytest.approx(0.9)
        bns = [la for la in script("04").all_layers(model) if type(la).__name__ == "BatchNormalization"]
        assert bns and not any(la.trainable for la in bns)  # saved frozen, reloaded frozen
    assert (out / "val_loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_saved_model_loads_in_a_fresh_process_and_07_submits_it(pipeline, finetuned, tmp_path):
    path = finetuned["model"] / "finetune" / "ResNet50_warmup.keras"
    with h5py.File(pipeline["data"] / "features" / f"{MAPS}.h5", "r") as f:
        test_maps = f["test"][:]
    np.save(tmp_path / "x.npy", test_maps)
    code = f"""
import json, keras, numpy as np
m = keras.models.load_model({str(path)!r})
print(json.dumps(m.predict(np.load({str(tmp_path / "x.npy")!r}), verbose=0).ravel().tolist()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}).stdout
    fresh = np.array(json.loads(out.strip().splitlines()[-1]))
    sub = run("07", *finetuned["args"], "--model", path, "--output", tmp_path / "sub.csv")
    helper.validate_submission(pd.read_csv(tmp_path / "sub.csv"), range(1, 17), helper.CLIP)
    np.testing.assert_allclose(sub.label, np.clip(fresh, *helper.CLIP), atol=1e-5)
    # The saved weights are the best epoch's (early stopping restored them): 07's val log loss shows it.
    model, _ = helper.load_model(path)
    feats = helper.load_features([MAPS], pipeline["data"], parts=())
    probs = feats.predict(model, "labelled")
    saved = pd.read_csv(finetuned["model"] / "finetune" / "results.csv").set_index("model").val_loss
    assert script("07").log_loss(feats.labels[feats.valid], probs[feats.valid]) == pytest.approx(
        saved["ResNet50_warmup"], rel=1e-3)


@pytest.mark.slow
def test_rerun_reuses_the_maps_cache(pipeline, finetuned, caplog):
    path = pipeline["data"] / "features" / f"{MAPS}.h5"
    mtime = path.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="catdog"):
        run("04", *finetuned["args"], "--weights", "none", "--image-size", IMAGE_SIZE, *HEAD, "--init", "random",
            "--epochs", 1, "--load", "ram")
    assert path.stat().st_mtime_ns == mtime
    assert "reused" in caplog.text and "loading them into RAM" in caplog.text
    assert "reading maps from RAM" in caplog.text


@pytest.mark.slow
def test_full_mode_runs_from_augmented_images_and_07_reads_images(pipeline, tmp_path):
    model_dir = tmp_path / "model"
    d = ["--data-dir", pipeline["data"], "--model-dir", model_dir]
    table = run("04", *d, "--weights", "none", "--image-size", "48", *HEAD, "--mode", "full", "--init", "random",
                "--epochs", 1)
    assert table.model.tolist() == ["ResNet50_full_random"]  # no 03 run in this model dir: no baseline row
    model, meta = helper.load_model(model_dir / "finetune" / "ResNet50_full_random.keras")
    assert meta["kind"] == "finetune_full" and meta["feature_attrs"][0]["image_size"] == 48
    frozen = [la for la in script("04").all_layers(model)
              if la.trainable and la.weights and la.name.startswith("conv4")]
    assert not frozen  # only the last block (and the head) trained
    sub = run("07", *d, "--model", model_dir / "finetune" / "ResNet50_full_random.keras",
              "--output", tmp_path / "sub.csv")
    assert len(sub) == 16 and sub.label.between(*helper.CLIP).all()
    # --tta: the mean of each image's and its mirror's predictions, computed here directly.
    tta = run("07", *d, "--model", model_dir / "finetune" / "ResNet50_full_random.keras",
              "--output", tmp_path / "tta.csv", "--tta")
    from PIL import Image
    _, paths = helper.test_images(pipeline["data"])
    bb = helper.get_backbone("ResNet50")
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB").resize((48, 48), Image.Resampling.BILINEAR),
                                  np.float32) for p in paths])
    both = [model.predict(bb.preprocess(x), verbose=0).ravel() for x in (pixels, pixels[:, :, ::-1])]
    np.testing.assert_allclose(tta.label, np.clip(np.mean(both, axis=0), *helper.CLIP), atol=1e-5)


def test_augmentation_changes_training_images_only_and_differs_by_epoch(pipeline):
    import argparse
    split = pipeline["split"].iloc[:12].copy()
    split["subset"] = ["train"] * 8 + ["valid"] * 4
    settings = helper.ExtractSettings("ResNet50", 48)
    args = argparse.Namespace(data_dir=pipeline["data"], seed=3, batch_size=4)
    train, val = script("04").image_data(split, settings, args)
    paths = helper.train_image_paths(pipeline["data"], split)
    bb = helper.BACKBONES["ResNet50"]
    plain = {s: np.concatenate(list(helper.image_dataset(paths[rows], 48, 4, preprocess=bb.preprocess)
                                    .as_numpy_iterator()))
             for s, rows in (("train", slice(0, 8)), ("valid", slice(8, 12)))}
    got_val = np.concatenate([x for x, _ in val.as_numpy_iterator()])
    np.testing.assert_array_equal(got_val, plain["valid"])  # validation images are never augmented
    assert np.concatenate([x for x, _ in train.as_numpy_iterator()]).shape == plain["train"].shape
    # The same images in the same order (no shuffle), two epochs: augmented, and differently each epoch.
    fixed = helper.image_dataset(paths[:8], 48, 4, labels=split.label[:8], preprocess=bb.preprocess,
                                 augment=script("04").augmentation(3))
    epochs = [np.concatenate([x for x, _ in fixed.as_numpy_iterator()]) for _ in range(2)]
    assert np.abs(epochs[0] - plain["train"]).mean() > 1
    assert np.abs(epochs[0] - epochs[1]).mean() > 1


def test_results_describe_the_saved_models(pipeline, finetuned):
    """results.csv's val_loss is what each saved model scores on the valid rows, with the epoch and phase
    its weights come from (early stopping restores the best block-phase epoch)."""
    out = finetuned["model"] / "finetune"
    results = pd.read_csv(out / "results.csv").set_index("model")
    split = pipeline["split"]
    valid = (split.subset == "valid").to_numpy()
    with h5py.File(pipeline["data"] / "features" / f"{MAPS}.h5", "r") as f:
        maps = f["labelled"][:][valid]
    for name in ("ResNet50_random", "ResNet50_baseline", "ResNet50_warmup"):
        model, meta = helper.load_model(out / f"{name}.keras")
        loss = model.evaluate(maps, split.label.to_numpy(np.float32)[valid], verbose=0, return_dict=True)["loss"]
        row = results.loc[name]
        assert row.val_loss == pytest.approx(loss, abs=1e-5)
        hist = pd.read_csv(out / f"{name}.history.csv").set_index("epoch")
        assert hist.phase[row.saved_epoch] == row.saved_phase == "block"
        block = hist[hist.phase == "block"]
        assert row.saved_epoch == block.val_loss.idxmin()  # early stopping's best
        assert hist.val_loss[row.saved_epoch] == pytest.approx(row.val_loss, abs=1e-5)
        assert meta["saved_epoch"] == row.saved_epoch and meta["init"] == row.init
        assert meta["args"]["image_size"] == int(IMAGE_SIZE) and meta["args"]["split_layer"] == "conv5_block2_out"


@pytest.mark.slow
def test_init_all_gives_every_variant_the_same_batches(pipeline, tmp_path, monkeypatch):
    module = script("04")
    seen = {}
    cls = module._map_batches_class()[0]
    real = cls.__getitem__

    def recording(self, k):
        x, y = real(self, k)
        if self.shuffle:  # the training batches: (epoch, batch number) -> rows; keyed by the object itself,
            seen.setdefault(self, {})[self.epoch, k] = self.rows[np.sort(  # which keeps it alive (no id reuse)
                self.order[k * self.batch_size:(k + 1) * self.batch_size])].tolist()
        return x, y

    monkeypatch.setattr(cls, "__getitem__", recording)
    shutil.copytree(pipeline["model"] / "single", tmp_path / "single")  # model A starts from 03's head
    run("04", "--data-dir", pipeline["data"], "--model-dir", tmp_path, "--weights", "none", "--image-size",
        IMAGE_SIZE, *HEAD, "--init", "all", "--epochs", 2, "--warmup-epochs", 1, "--load", "ram")
    sequences = list(seen.values())
    assert len(sequences) == 3  # a fresh batch source per variant
    assert sequences[0] == sequences[1] == sequences[2]
    assert set(sequences[0]) == {(e, k) for e in (0, 1) for k in range(4)}  # 49 train rows, batch 16
    assert sequences[0][0, 0] != sequences[0][1, 0]  # a new order each epoch


def test_bad_input(pipeline, tmp_path, capsys):
    d = ["--data-dir", pipeline["data"], "--model-dir", tmp_path / "model"]
    cnn = ["--weights", "none", "--image-size", IMAGE_SIZE]
    with pytest.raises(CatDogError, match=r"single/ResNet50.keras: run 03_train_single.py"):
        run("04", *d, *cnn, "--init", "baseline")
    with pytest.raises(CatDogError, match="no layer 'conv9'"):
        run("04", *d, *cnn, "--split-layer", "conv9")
    with pytest.raises(CatDogError, match="run 04_finetune_split.py"):
        helper.load_features(["ResNet50_conv4_block6_out_maps"], pipeline["data"])
    with pytest.raises(CatDogError, match="nothing comes after it"):
        run("04", *d, *cnn, "--split-layer", "conv5_block3_out")
    with pytest.raises(SystemExit) as e:
        script("04").parse_args(["--model", "VGG16"])  # no split point registered
    assert e.value.code == 2 and "argument --model: invalid choice: 'VGG16'" in capsys.readouterr().err
