"""03_train_single.py, 05_train_merge.py, 07_predict_submit.py and helper's metrics and submission code."""

import json

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
        helper.validate_submission(sub, range(1, 16), helper.CLIP)
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
    helper.validate_submission(sub, range(1, 16), helper.CLIP)
    truth = pd.read_csv(pipeline["data"] / "demo_test_labels.csv")
    assert script("07").log_loss(truth.label, sub.label) < np.log(2)  # better than predicting 0.5 everywhere
    merged = pd.read_csv(pipeline["model"] / "merge" / "results.csv")
    best = merged.loc[merged.val_loss.idxmin(), "model"]
    expected = helper.load_features(best.split("+"), pipeline["data"])
    model, _ = helper.load_model(pipeline["model"] / "merge" / f"{best}.keras")
    np.testing.assert_allclose(sub.label, np.clip(expected.predict(model, "test"), 0.005, 0.995), atol=1e-6)


def test_analysis_outputs(pipeline):
    worst = pd.read_csv(pipeline["model"] / "analysis" / "worst.csv")
    assert len(worst) == 60 and worst.error.is_monotonic_decreasing
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
    assert sub.label.between(0.01, 0.99).all() and len(sub) == 15
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
