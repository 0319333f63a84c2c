"""06_hyperopt_merge.py and helper's kopt compatibility layer."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, run, script

import helper

MODELS = ["ResNet50", "InceptionV3", "Xception"]


def search(pipeline, model_dir, evals):
    return run("06", "--data-dir", pipeline["data"], "--model-dir", model_dir, "--max-evals", evals,
               "--epochs", 2, "--batch-size", 16, "--models", *MODELS)


@pytest.fixture(scope="module")
def searched(pipeline, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("hyperopt")
    search(pipeline, model_dir, 3)
    return model_dir


def test_trials_stay_in_the_reports_space(searched):
    df = pd.read_csv(searched / "hyperopt" / "trials.csv")
    assert len(df) == 3 and df.trial.tolist() == [0, 1, 2]
    assert df.lr.between(0.001, 0.01).all() and df.decay.between(0.0005, 0.05).all()
    assert df.momentum.isin([0.5, 0.8, 0.9]).all() and df.dropout.isin([0.1, 0.2, 0.3, 0.5]).all()
    assert np.isfinite(df.val_loss).all() and df.val_acc.between(0, 1).all() and (df.epochs <= 2).all()
    assert (searched / "hyperopt" / "val_loss_by_trial.png").read_bytes()[:4] == b"\x89PNG"
    best = json.loads((searched / "hyperopt" / "best.json").read_text())
    assert best["val_loss"] == pytest.approx(df.val_loss.min()) and best["features"] == MODELS
    runs = list((searched / "hyperopt" / "merge").glob("*/tensorboard/*"))
    assert len(runs) == 3  # one TensorBoard run per trial


@pytest.mark.slow
def test_best_model_loads_in_a_fresh_process_with_keras2_decay(searched, pipeline):
    code = f"""
import json, keras
m = keras.models.load_model({str(searched / "hyperopt" / "best.keras")!r})
s = m.optimizer._learning_rate
print(json.dumps({{"opt": type(m.optimizer).__name__, "sched": type(s).__name__,
                  "lr": [float(s(t)) for t in (0, 1, 10, 100)], "mom": float(m.optimizer.momentum)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}).stdout
    got = json.loads(out.strip().splitlines()[-1])
    best = pd.read_csv(searched / "hyperopt" / "trials.csv").sort_values("val_loss").iloc[0]
    assert got["opt"] == "SGD" and got["sched"] == "InverseTimeDecay"
    assert got["lr"] == pytest.approx([best.lr / (1 + best.decay * t) for t in (0, 1, 10, 100)], rel=1e-6)
    assert got["mom"] == pytest.approx(best.momentum)


def test_predict_picks_hyperopts_best(searched, pipeline, tmp_path):
    path, why = helper.pick_model(searched)
    assert path == searched / "hyperopt" / "best.keras" and "hyperopt" in why
    sub = run("07", "--data-dir", pipeline["data"], "--model-dir", searched, "--output", tmp_path / "s.csv")
    helper.validate_submission(sub, range(1, 17), helper.CLIP)


@pytest.mark.slow
def test_rerun_with_more_evals_continues(pipeline, tmp_path):
    search(pipeline, tmp_path, 2)
    first = pd.read_csv(tmp_path / "hyperopt" / "trials.csv")
    calls = {"n": 0}
    module = script("06")
    real = module.model

    def counting_model(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    module.model = counting_model
    try:
        search(pipeline, tmp_path, 4)
    finally:
        module.model = real
    second = pd.read_csv(tmp_path / "hyperopt" / "trials.csv")
    assert calls["n"] == 2 and len(second) == 4
    pd.testing.assert_frame_equal(second.iloc[:2][["lr", "decay", "val_loss"]], first[["lr", "decay", "val_loss"]])


@pytest.mark.slow
def test_kopt_imports_twice_in_a_fresh_home(tmp_path):
    code = (f"import sys, importlib; sys.path.insert(0, {str(ROOT)!r}); "
            "s = importlib.import_module('06_hyperopt_merge'); "
            f"k = s.import_kopt({str(tmp_path / 'cfg')!r}); s.import_kopt({str(tmp_path / 'cfg')!r}); "
            "print(k.config.save_dir())")
    env = {**os.environ, "HOME": str(tmp_path / "home"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    (tmp_path / "home").mkdir()
    for _ in range(2):  # the second process reads back the config.yaml the first one wrote
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip().splitlines()[-1] == str(tmp_path / "cfg")
    assert (tmp_path / "cfg" / ".kopt" / "config.yaml").is_file()
    assert not (tmp_path / "home" / ".kopt").exists()  # the user's home folder is left alone


def test_kopt_compilefn_end_to_end_reports_keras_metrics(tmp_path):
    import keras
    kopt = script("06").import_kopt(tmp_path / "cfg")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)

    def data_fn():
        return (x[:60], y[:60]), (x[60:], y[60:])

    def model_fn(train_data, lr):
        return helper.build_head({"f": 6}, 0.1, helper.make_optimizer("sgd", lr, 0.9, 0.01), seed=0)

    fn = kopt.CompileFN("db", "exp", data_fn=data_fn, model_fn=model_fn, loss_metric="loss",
                        loss_metric_mode="min", valid_split=None, save_model="best", save_dir=str(tmp_path))
    ret = fn({"data": {}, "model": {"lr": 0.05}, "fit": {"epochs": 3, "batch_size": 16, "patience": 2}})
    assert set(ret["eval"]) == {"loss", "accuracy"} and ret["loss"] == ret["eval"]["loss"]
    saved = keras.models.load_model(ret["path"]["model"].replace(".h5", ".keras"))
    loss, acc = saved.evaluate(x[60:], y[60:], verbose=0, batch_size=20)
    assert ret["eval"]["loss"] == pytest.approx(loss, rel=1e-5) and ret["eval"]["accuracy"] == pytest.approx(acc)


def spark_missing() -> str:
    import importlib.util
    import shutil
    if importlib.util.find_spec("pyspark") is None:
        return "pyspark is not installed (pip install -r requirements-spark.txt)"
    if not (shutil.which("java") or os.environ.get("JAVA_HOME")):
        return "Spark needs Java, which is not on PATH"
    return ""


@pytest.mark.slow
@pytest.mark.skipif(bool(spark_missing()), reason=spark_missing() or "-")
def test_spark_trials_on_local_2(pipeline, tmp_path):
    table = run("06", "--data-dir", pipeline["data"], "--model-dir", tmp_path, "--max-evals", 2, "--epochs", 2,
                "--batch-size", 16, "--models", *MODELS, "--spark", "local[2]", "--parallelism", 2)
    assert len(table) == 2 and table.val_loss.notna().all()
    assert table.lr.between(0.001, 0.01).all() and table.momentum.isin([0.5, 0.8, 0.9]).all()
    assert (tmp_path / "hyperopt" / "best.keras").is_file()
    # Resumable like the sequential search: one more round adds exactly one trial.
    more = run("06", "--data-dir", pipeline["data"], "--model-dir", tmp_path, "--max-evals", 3, "--epochs", 2,
               "--batch-size", 16, "--models", *MODELS, "--spark", "local[2]", "--parallelism", 2)
    assert len(more) == 3
    pd.testing.assert_frame_equal(more.iloc[:2][["lr", "decay", "val_loss"]], table[["lr", "decay", "val_loss"]])


def test_spark_without_pyspark_says_how_to_install(pipeline, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyspark", None)  # import pyspark now raises ImportError
    with pytest.raises(helper.CatDogError, match="pip install -r requirements-spark.txt"):
        run("06", "--data-dir", pipeline["data"], "--model-dir", tmp_path, "--max-evals", 1, "--models", *MODELS,
            "--spark")
