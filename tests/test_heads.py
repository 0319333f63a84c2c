"""03_train_single.py, 05_train_merge.py, 07_predict_submit.py and helper's metrics and submission code."""

import functools
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import HEAD, run, script

import helper
from helper import CatDogError

# ----------------------------------------------------------------------------- metrics


def test_log_loss_matches_sklearn():
    from sklearn.metrics import log_loss as sk_log_loss
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = rng.uniform(0, 1, 500)
    p[:3] = [0.0, 1.0, 1e-20]  # sklearn clips these to machine epsilon
    assert abs(script("07").log_loss(y, p) - sk_log_loss(y, p, labels=[0, 1])) < 1e-9
    clipped = np.clip(p, 0.005, 0.995)
    assert abs(script("07").log_loss(y, p, (0.005, 0.995)) - sk_log_loss(y, clipped, labels=[0, 1])) < 1e-9


def test_log_loss_by_hand():
    assert script("07").log_loss([1, 0], [0.9, 0.2]) == pytest.approx(-(np.log(0.9) + np.log(0.8)) / 2, abs=1e-12)
    # Clipping caps the cost of a confident mistake at -log(0.005).
    assert script("07").log_loss([1], [0.0], (0.005, 0.995)) == pytest.approx(-np.log(0.005))


# ----------------------------------------------------------------------------- submission

def test_write_submission_clips_and_sorts_ids_numerically(tmp_path):
    df = helper.write_submission([10, 9, 1, 100], np.array([0.0, 1.0, 0.5, 0.3]), tmp_path / "s.csv",
                                  [1, 9, 10, 100])
    assert df.id.tolist() == [1, 9, 10, 100]
    assert df.label.tolist() == [0.5, 0.995, 0.005, 0.3]
    text = (tmp_path / "s.csv").read_text().splitlines()
    assert text[0] == "id,label" and text[1].startswith("1,") and len(text) == 5


def test_test_images_are_in_numeric_id_order(tmp_path):
    folder = tmp_path / "test2" / "test"
    folder.mkdir(parents=True)
    for i in (1, 2, 9, 10, 100):
        (folder / f"{i}.jpg").write_bytes(b"x")
    ids, paths = helper.test_images(tmp_path)
    assert ids.tolist() == [1, 2, 9, 10, 100] and paths[3].endswith("/10.jpg")


GOOD = pd.DataFrame({"id": [1, 2, 3], "label": [0.1, 0.5, 0.9]})


@pytest.mark.parametrize("bad, message", [
    (GOOD.rename(columns={"label": "prob"}), "header"),
    (GOOD.iloc[:2], "2 rows for 3"),
    (pd.DataFrame({"id": [1, 1, 3], "label": [0.1, 0.5, 0.9]}), "duplicate"),
    (pd.DataFrame({"id": [1, 2, 4], "label": [0.1, 0.5, 0.9]}), "not exactly the test image ids"),
    (pd.DataFrame({"id": [2, 1, 3], "label": [0.1, 0.5, 0.9]}), "ascending"),
    (pd.DataFrame({"id": [1, 2, 3], "label": [0.1, np.nan, 0.9]}), "missing or non-numeric"),
    (pd.DataFrame({"id": [1, 2, 3], "label": [0.1, "dog", 0.9]}), "missing or non-numeric"),
    (pd.DataFrame({"id": [1, 2, 3], "label": [0.001, 0.5, 0.9]}), "outside"),
])
def test_validator_rejects_each_bad_case(bad, message):
    with pytest.raises(CatDogError, match=message):
        helper.validate_submission(bad, [1, 2, 3], (0.005, 0.995))
    helper.validate_submission(GOOD, [1, 2, 3], (0.005, 0.995))


def test_bad_clip_range_is_refused(tmp_path):
    with pytest.raises(CatDogError, match="clip range"):
        helper.write_submission([1], np.array([0.5]), tmp_path / "s.csv", [1], (0.9, 0.1))
    assert not (tmp_path / "s.csv").exists()


# ----------------------------------------------------------------------------- optimizers

def test_adadelta_uses_keras2_default_learning_rate():
    cfg = helper.make_optimizer("adadelta", 1.0).get_config()
    assert cfg["learning_rate"] == 1.0 and cfg["rho"] == 0.95


def test_sgd_decay_follows_keras2_formula():
    opt = helper.make_optimizer("sgd", 0.0096, momentum=0.9, decay=0.0084)
    for step in (0, 1, 10, 100):
        assert float(opt._learning_rate(step)) == pytest.approx(0.0096 / (1 + 0.0084 * step), rel=1e-6)


# ----------------------------------------------------------------------------- the pipeline

def epoch_loss_tags(folder):
    import tensorflow as tf
    tags = set()
    for f in folder.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(f)):
            tags.update(v.tag for v in event.summary.value)
    return tags


def test_single_heads_table_models_and_logs(pipeline):
    model_dir = pipeline["model"] / "single"
    results = pd.read_csv(model_dir / "results.csv")
    assert results.model.tolist() == ["ResNet50", "InceptionV3", "Xception"]
    assert np.isfinite(results[["val_loss", "val_acc", "best_val_loss"]]).all().all()
    assert (results.epochs == 10).all() and (results.seed == 2018).all()
    assert results.set_index("model").val_acc["ResNet50"] >= 0.75  # the demo's class signal is learned
    for name in results.model:
        model, meta = helper.load_model(model_dir / f"{name}.keras")
        cfg = model.optimizer.get_config()
        assert type(model.optimizer).__name__ == "Adadelta" and cfg["learning_rate"] == pytest.approx(1.0)
        assert meta["features"] == [name] and meta["seed"] == 2018
        assert [type(layer).__name__ for layer in model.layers] == ["InputLayer", "Dropout", "Dense"]
        assert model.layers[1].rate == 0.5
        logs = pipeline["model"] / "logs" / "single" / name
        assert "epoch_loss" in epoch_loss_tags(logs / "train")
        assert "epoch_loss" in epoch_loss_tags(logs / "validation")
        hist = pd.read_csv(model_dir / f"{name}.history.csv")
        assert len(hist) == 10 and hist.val_loss.iloc[-1] == pytest.approx(results.set_index("model").val_loss[name])
        sub = pd.read_csv(pipeline["subs"] / f"{name}.csv")
        helper.validate_submission(sub, range(1, 17), helper.CLIP)
    assert (model_dir / "val_loss.png").read_bytes()[:4] == b"\x89PNG"


def test_merged_heads_table_and_models(pipeline):
    model_dir = pipeline["model"] / "merge"
    results = pd.read_csv(model_dir / "results.csv")
    assert results.model.tolist() == ["ResNet50+InceptionV3", "ResNet50+Xception", "ResNet50+InceptionV3+Xception"]
    assert np.isfinite(results.val_loss).all() and (results.epochs == 7).all()
    assert (results.val_acc >= 0.75).all()
    model, meta = helper.load_model(model_dir / "ResNet50+InceptionV3+Xception.keras")
    assert len(model.inputs) == 3 and meta["features"] == ["ResNet50", "InceptionV3", "Xception"]
    assert model.get_layer("concat").output.shape[-1] == 3 * 2048
    assert model.optimizer.get_config()["learning_rate"] == pytest.approx(1.0)
    for combo in results.model:
        assert "epoch_loss" in epoch_loss_tags(pipeline["model"] / "logs" / "merge" / combo / "validation")
    assert (model_dir / "val_loss.png").is_file()


def test_submission_is_valid_and_beats_chance(pipeline):
    sub = pd.read_csv(pipeline["subs"] / "submission.csv")
    helper.validate_submission(sub, range(1, 17), helper.CLIP)
    truth = pd.read_csv(pipeline["data"] / "demo_test_labels.csv")
    assert script("07").log_loss(truth.label, sub.label) < np.log(2)  # better than predicting 0.5 everywhere
    merged = pd.read_csv(pipeline["model"] / "merge" / "results.csv")
    best = merged.loc[merged.val_loss.idxmin(), "model"]
    expected = helper.load_features(best.split("+"), pipeline["data"])
    model, _ = helper.load_model(pipeline["model"] / "merge" / f"{best}.keras")
    np.testing.assert_allclose(sub.label, np.clip(expected.predict(model, "test"), 0.005, 0.995), atol=1e-6)


def test_analysis_outputs(pipeline):
    worst = pd.read_csv(pipeline["model"] / "analysis" / "worst.csv")
    assert len(worst) == 61 and worst.error.is_monotonic_decreasing
    assert np.allclose(worst.error, (worst.label - worst.prediction).abs())
    assert (pipeline["model"] / "analysis" / "worst.png").read_bytes()[:4] == b"\x89PNG"


def test_predict_prefers_hyperopt_then_merge_then_single(pipeline, tmp_path):
    path, why = helper.pick_model(pipeline["model"])
    assert path.parent.name == "merge" and "lowest val_loss" in why
    single_only = tmp_path / "m"
    (single_only / "single").mkdir(parents=True)
    for f in (pipeline["model"] / "single").iterdir():
        (single_only / "single" / f.name).write_bytes(f.read_bytes())
    path, _ = helper.pick_model(single_only)
    results = pd.read_csv(single_only / "single" / "results.csv")
    assert path.stem == results.loc[results.val_loss.idxmin(), "model"]
    (single_only / "hyperopt").mkdir()
    (single_only / "hyperopt" / "best.keras").write_bytes(b"")
    assert helper.pick_model(single_only)[0].parent.name == "hyperopt"
    with pytest.raises(CatDogError, match="no trained model"):
        helper.pick_model(tmp_path / "empty")


def test_predict_with_explicit_model_and_bad_input(pipeline, tmp_path):
    d = ["--data-dir", pipeline["data"], "--model-dir", pipeline["model"]]
    out = tmp_path / "sub.csv"
    run("07", *d, "--model", pipeline["model"] / "single" / "ResNet50.keras", "--output", out, "--clip-low", 0.01,
        "--clip-high", 0.99)
    sub = pd.read_csv(out)
    assert sub.label.between(0.01, 0.99).all() and len(sub) == 16
    with pytest.raises(CatDogError, match="not found"):
        run("07", *d, "--model", tmp_path / "nope.keras", "--output", out)


def test_heads_refuse_missing_features(tmp_path):
    run("01", "--data-dir", tmp_path, "--demo", 3)
    with pytest.raises(CatDogError, match="run 02"):
        run("03", "--data-dir", tmp_path, "--model-dir", tmp_path / "m", *HEAD)
    with pytest.raises(CatDogError, match="run 02"):
        run("05", "--data-dir", tmp_path, "--model-dir", tmp_path / "m", "--combos")
    with pytest.raises(CatDogError, match="missing or incomplete"):
        run("05", "--data-dir", tmp_path, "--model-dir", tmp_path / "m")


def test_sidecar_stores_settings(pipeline):
    meta = json.loads((pipeline["model"] / "merge" / "ResNet50+Xception.json").read_text())
    assert meta["kind"] == "merge" and meta["args"]["epochs"] == 7 and meta["args"]["optimizer"] == "adadelta"
    assert meta["feature_attrs"][0]["backbone"] == "ResNet50"
    # The config it was trained with beside every flag: the report's merged head.
    assert meta["config"] == {**helper.HeadConfig().attrs(), "epochs": 7, "batch_size": 16}
    assert helper.HeadConfig.of(meta["args"]) == helper.HeadConfig(**meta["config"])


# ----------------------------------------------------------------------------- helper.fit_arrays, Keras's fit faster

def small_problem(inputs: int, rows: int = 203, valid: int = 57):
    """Random features (one or two inputs) whose label depends on them, and a seed-built head."""
    rng = np.random.default_rng(inputs)
    dims = {"a": 7, "b": 5}
    dims = dict(list(dims.items())[:inputs])
    x = [rng.normal(size=(rows, d)).astype(np.float32) for d in dims.values()]
    xv = [rng.normal(size=(valid, d)).astype(np.float32) for d in dims.values()]
    y, yv = ((a[0][:, 0] + a[-1][:, 1] > 0).astype(np.float32) for a in (x, xv))
    return dims, helper.model_inputs(x), y, helper.model_inputs(xv), yv


def head(dims, optimizer: str):
    opt = (helper.make_optimizer("sgd", 0.05, 0.9, 0.01) if optimizer == "sgd"
           else helper.make_optimizer("adadelta", 1.0))
    return helper.build_head(dims, 0.5, opt, seed=3)


def trained(how, dims, optimizer, x, y, valid, **kwargs):
    """(history, weights, optimizer variables) of a new head trained by Keras's fit or by helper.fit_arrays."""
    model = head(dims, optimizer)
    fit = model.fit if how == "keras" else functools.partial(helper.fit_arrays, model)
    hist = fit(x, y, batch_size=16, validation_data=valid, verbose=0, **kwargs)
    return hist, [w.numpy() for w in model.weights], [v.numpy() for v in model.optimizer.variables]


def assert_same_training(a, b, atol=1e-5):
    (ha, wa, oa), (hb, wb, ob) = a, b
    assert list(ha.history) == list(hb.history) == ["accuracy", "loss", "val_accuracy", "val_loss"]
    for key in ha.history:
        np.testing.assert_allclose(hb.history[key], ha.history[key], atol=atol, rtol=0, err_msg=key)
    assert hb.epoch == ha.epoch and hb.params == ha.params
    for p, q in zip(wa + oa, wb + ob, strict=True):
        np.testing.assert_allclose(q, p, atol=atol, rtol=0)


@pytest.mark.parametrize(("optimizer", "inputs"), [  # the fast tier: 03's heads and 06's merged ones
    ("adadelta", 1), pytest.param("adadelta", 2, marks=pytest.mark.slow),
    pytest.param("sgd", 1, marks=pytest.mark.slow), ("sgd", 2)])
def test_fit_arrays_trains_exactly_like_keras_fit(inputs, optimizer):
    dims, x, y, xv, yv = small_problem(inputs)  # 203 rows: batches of 16 leave a last one of 11
    keras_run = trained("keras", dims, optimizer, x, y, (xv, yv), epochs=5)
    fast_run = trained("fast", dims, optimizer, x, y, (xv, yv), epochs=5)
    assert len(keras_run[0].epoch) == 5 and keras_run[0].history["loss"][0] != keras_run[0].history["loss"][-1]
    assert_same_training(keras_run, fast_run)
    # Dropout's masks and the shuffle come from the seed: another seed trains differently.
    model = helper.build_head(dims, 0.5, helper.make_optimizer(optimizer, 0.05, 0.9, 0.01), seed=4)
    other = helper.fit_arrays(model, x, y, batch_size=16, epochs=5, validation_data=(xv, yv), verbose=0)
    assert abs(other.history["loss"][-1] - fast_run[0].history["loss"][-1]) > 1e-4


def test_fit_arrays_takes_each_epochs_inputs_from_a_callable():
    dims, x, y, xv, yv = small_problem(2)
    asked = []

    def inputs(epoch):
        asked.append(epoch)
        return [a.copy() for a in x]

    arrays = trained("fast", dims, "sgd", x, y, (xv, yv), epochs=5, initial_epoch=1)
    called = trained("fast", dims, "sgd", inputs, y, (xv, yv), epochs=5, initial_epoch=1)
    assert asked == [1, 2, 3, 4]  # Keras's epoch numbers, 0-based
    assert_same_training(arrays, called, atol=0)
    # helper.fit, which the steps call, takes the callable in place of the arrays.
    df = helper.fit(head(dims, "sgd"), (lambda e: x, y), (xv, yv), 5, [], batch_size=16, initial_epoch=1)
    assert df.epoch.tolist() == [2, 3, 4, 5] and df.loss.tolist() == arrays[0].history["loss"]
    # The inputs are used: a view that changes from epoch 3 on changes the loss from epoch 3 on.
    shifted = trained("fast", dims, "sgd", lambda e: [a + (e >= 3) for a in x], y, (xv, yv), epochs=5)
    plain = trained("fast", dims, "sgd", x, y, (xv, yv), epochs=5)
    assert shifted[0].history["loss"][:3] == plain[0].history["loss"][:3]
    assert shifted[0].history["loss"][3] != plain[0].history["loss"][3]
    with pytest.raises(CatDogError, match=r"epoch 1 have shapes \[\(202, 7\), \(202, 5\)\]: each needs one row "
                                          r"per label \(203\)"):
        trained("fast", dims, "sgd", lambda e: [a[:203 - e] for a in x], y, (xv, yv), epochs=3)
    with pytest.raises(CatDogError, match=r"epoch 2 have shapes \[\(203, 7\), \(203, 4\)\], not those of the first"):
        trained("fast", dims, "sgd", lambda e: [x[0], x[1][:, :5 - e // 2]], y, (xv, yv), epochs=3)
    with pytest.raises(CatDogError, match=r"the validation inputs have shapes \[\(56, 7\), \(56, 5\)\]"):
        trained("fast", dims, "sgd", x, y, ([a[1:] for a in xv], yv), epochs=3)


def test_fit_arrays_runs_keras_callbacks(tmp_path):
    import keras
    dims, x, y, xv, yv = small_problem(2)
    runs = {}
    for how in ("keras", "fast"):
        stop = keras.callbacks.EarlyStopping("val_loss", patience=1, min_delta=10)  # no epoch improves enough
        best = keras.callbacks.ModelCheckpoint(tmp_path / f"{how}.keras", monitor="val_loss", save_best_only=True)
        board = keras.callbacks.TensorBoard(str(tmp_path / how))
        runs[how] = trained(how, dims, "sgd", x, y, (xv, yv), epochs=10, callbacks=[stop, best, board])
        assert runs[how][0].epoch == [0, 1] and stop.stopped_epoch == 1
        assert {"epoch_loss", "epoch_accuracy", "epoch_learning_rate"} <= epoch_loss_tags(tmp_path / how / "train")
        assert {"epoch_loss", "evaluation_loss_vs_iterations"} <= epoch_loss_tags(tmp_path / how / "validation")
    assert_same_training(runs["keras"], runs["fast"])
    # The checkpoints hold the same weights, in the same .keras layout.
    saved = {how: keras.models.load_model(tmp_path / f"{how}.keras") for how in runs}
    for p, q in zip(saved["keras"].weights + saved["keras"].optimizer.variables,
                    saved["fast"].weights + saved["fast"].optimizer.variables, strict=True):
        np.testing.assert_allclose(q.numpy(), p.numpy(), atol=1e-5, rtol=0)
    assert keras_file_layout(tmp_path / "keras.keras") == keras_file_layout(tmp_path / "fast.keras")


def keras_file_layout(path):
    """A .keras file's config, member names and its weight file's dataset names and shapes, without what differs
    from object to object: the numbers Keras appends to automatic layer names ('dropout_3': the fourth Dropout of
    this process) and the Python ids that mark shared objects."""
    import zipfile

    import h5py
    with zipfile.ZipFile(path) as z:
        names = sorted(z.namelist())
        config = z.read("config.json").decode()
        z.extract("model.weights.h5", path.parent / f"{path.stem}_weights")
    datasets = []
    with h5py.File(path.parent / f"{path.stem}_weights" / "model.weights.h5") as f:
        f.visititems(lambda name, obj: datasets.append((name, getattr(obj, "shape", None))))
    assert len(datasets) > 5 and '"Dense"' in config
    return re.sub(r'"shared_object_id": \d+', "", re.sub(r'_\d+"', '"', config)), names, datasets


def test_06_trains_its_heads_with_fit_arrays_and_keras_results(tmp_path, monkeypatch):
    """kopt's CompileFN calls model.fit itself; 06's model() routes it to helper.fit_arrays."""
    dims, x, y, xv, yv = small_problem(2)
    module = script("06")
    kopt = module.import_kopt(tmp_path / "cfg")
    calls = []
    real = helper.fit_arrays
    monkeypatch.setattr(helper, "fit_arrays", lambda *a, **k: calls.append(1) or real(*a, **k))

    def keras_model(*args, **kwargs):
        m = module.model(*args, **kwargs)
        del m.fit  # back to Keras's own fit
        return m

    results = {}
    for how, model_fn in (("fast", module.model), ("keras", keras_model)):
        fn = kopt.CompileFN("db", how, data_fn=lambda: ((x, y), (xv, yv)), model_fn=model_fn, loss_metric="loss",
                            loss_metric_mode="min", valid_split=None, use_tensorboard=True, save_model="best",
                            save_dir=str(tmp_path / how))
        results[how] = fn({"data": {}, "model": {"lr": 0.005, "decay": 0.01, "momentum": 0.9, "dropout": 0.5,
                                                 "seed": 1}, "fit": {"epochs": 6, "batch_size": 16, "patience": 2}})
    assert len(calls) == 1  # the fast run only
    fast, slow = results["fast"], results["keras"]
    assert fast["loss"] == pytest.approx(slow["loss"], abs=1e-5)
    assert fast["history"]["params"] == slow["history"]["params"]
    for key, values in slow["history"]["loss"].items():
        np.testing.assert_allclose(fast["history"]["loss"][key], values, atol=1e-5, rtol=0, err_msg=key)
    assert (keras_file_layout(Path(fast["path"]["model"]).with_suffix(".keras"))
            == keras_file_layout(Path(slow["path"]["model"]).with_suffix(".keras")))
    # What fit_arrays does not do (here sample weights) still goes to Keras's fit.
    m = module.model((x, y), lr=0.005)
    hist = m.fit(x, y, batch_size=16, epochs=2, sample_weight=np.ones(len(y)), verbose=0)
    assert len(calls) == 1 and len(hist.history["loss"]) == 2
