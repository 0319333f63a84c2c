"""Trustworthy results: reproducible runs, tables that describe the saved models, submissions and predictions
checked against what is on disk, and saved state that is bound to what made it."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import HEAD, IMAGE_SIZE, ROOT, run, script

import helper
from helper import CatDogError

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONHASHSEED": "0"}


def cli(script_name, *argv, check=True):
    """Run a numbered script as its own process, as a user would."""
    r = subprocess.run([sys.executable, str(ROOT / script_name), *map(str, argv)], capture_output=True, text=True,
                       env=ENV, cwd=ROOT)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


# ----------------------------------------------------------------------------- 1. same seed, same numbers

@pytest.mark.slow
def test_same_seed_gives_the_same_numbers_in_new_processes(pipeline, tmp_path):
    """03 and 05 run twice, each in its own process: results.csv and the histories are equal exactly (the
    CPU kernels are deterministic for a fixed seed and thread count)."""
    d = ["--data-dir", pipeline["data"], *HEAD]
    runs = {
        "03": ("03_train_single.py", ["--models", "ResNet50", "--no-predict"], "single", ["ResNet50"]),
        "05": ("05_train_merge.py", ["--models", "ResNet50", "Xception", "--epochs", 3], "merge",
               ["ResNet50+Xception"]),
    }
    for step, (name, extra, folder, models) in runs.items():
        for copy in ("a", "b"):
            cli(name, *d, "--model-dir", tmp_path / copy / step, *extra)
        a, b = (tmp_path / c / step / folder for c in ("a", "b"))
        pd.testing.assert_frame_equal(pd.read_csv(a / "results.csv"), pd.read_csv(b / "results.csv"), check_exact=True)
        for m in models:
            pd.testing.assert_frame_equal(pd.read_csv(a / f"{m}.history.csv"), pd.read_csv(b / f"{m}.history.csv"),
                                          check_exact=True)
        # Another seed (in this process) gives other numbers.
        other = tmp_path / "other" / step
        run(step, *d, "--model-dir", other, "--seed", 7, *extra)
        assert not np.allclose(pd.read_csv(other / folder / "results.csv").val_loss,
                               pd.read_csv(a / "results.csv").val_loss, rtol=1e-6, atol=0)


@pytest.mark.slow
def test_04_same_seed_same_numbers_in_new_processes(copied, tmp_path):
    """04 (random head on the cached maps) twice in new processes: equal results and histories; the time
    share spent reading maps is the one column that may differ."""
    d = ["--data-dir", copied["data"], *HEAD, "--weights", "none", "--image-size", IMAGE_SIZE, "--init", "random",
         "--epochs", 2]
    for copy in ("a", "b"):
        cli("04_finetune_split.py", *d, "--model-dir", tmp_path / copy)
    a, b = (tmp_path / c / "finetune" for c in ("a", "b"))
    pd.testing.assert_frame_equal(pd.read_csv(a / "results.csv").drop(columns="read_share"),
                                  pd.read_csv(b / "results.csv").drop(columns="read_share"), check_exact=True)
    pd.testing.assert_frame_equal(pd.read_csv(a / "ResNet50_random.history.csv"),
                                  pd.read_csv(b / "ResNet50_random.history.csv"), check_exact=True)


# ----------------------------------------------------------------------------- 4. submissions vs the test set

def test_submission_is_checked_against_the_test_images_on_disk(tmp_path):
    ids = [1, 2, 3]
    helper.write_submission(ids, np.array([0.1, 0.5, 0.9]), tmp_path / "ok.csv", [1, 2, 3])
    with pytest.raises(CatDogError, match=r"2 rows for 3 test images.*missing \[3\]"):
        helper.write_submission([1, 2], np.array([0.1, 0.5]), tmp_path / "s.csv", [1, 2, 3])
    with pytest.raises(CatDogError, match=r"not test images: \[4\]"):
        helper.write_submission([1, 2, 4], np.array([0.1, 0.5, 0.9]), tmp_path / "s.csv", [1, 2, 3])
    assert not (tmp_path / "s.csv").exists()


@pytest.fixture
def copied(pipeline, tmp_path):
    """A private copy of the demo pipeline's data (links resolved) and models, free to be changed."""
    data = tmp_path / "data"
    shutil.copytree(pipeline["data"], data, symlinks=True)
    shutil.copytree(pipeline["model"] / "single", tmp_path / "model" / "single")
    return {"data": data, "model": tmp_path / "model", "d": ["--data-dir", data, "--model-dir", tmp_path / "model"]}


@pytest.mark.parametrize("change", ["removed", "added"])
def test_a_test_folder_changed_after_extraction_is_refused(copied, tmp_path, change):
    test2 = copied["data"] / "test2" / "test"
    if change == "removed":
        (test2 / "16.jpg").unlink()
    else:
        os.symlink(os.readlink(test2 / "16.jpg"), test2 / "17.jpg")
    with pytest.raises(CatDogError, match="test2/test no longer holds the .* test images 01 laid out"):
        run("07", *copied["d"], "--model", copied["model"] / "single" / "ResNet50.keras", "--output",
            tmp_path / "s.csv")
    # After 01 is rerun the split.json record matches, and the feature file is what is out of date.
    if change == "added":
        (copied["data"] / "test" / "17.jpg").write_bytes((copied["data"] / "test" / "16.jpg").read_bytes())
    else:
        (copied["data"] / "test" / "16.jpg").unlink()
    run("01", "--data-dir", copied["data"])
    with pytest.raises(CatDogError, match="test rows do not match .* test folder changed since: rerun 02"):
        run("07", *copied["d"], "--model", copied["model"] / "single" / "ResNet50.keras", "--output",
            tmp_path / "s.csv")
    assert not (tmp_path / "s.csv").exists()
    split = helper.read_split(copied["data"])
    reason = helper.stale_reason(helper.feature_path(copied["data"], "ResNet50"),
                                 helper.ExtractSettings.of(helper.feature_file_state(
                                     helper.feature_path(copied["data"], "ResNet50"))),
                                 split, helper.laid_out_test_ids(copied["data"]))
    assert "test folder changed" in reason  # 02 redoes the file instead of skipping it


# ----------------------------------------------------------------------------- 5. features a model was trained on

@pytest.mark.slow
def test_a_model_is_only_fed_the_features_it_was_trained_on(copied, tmp_path):
    d6 = [*copied["d"], "--max-evals", 1, "--epochs", 1, *HEAD, "--models", "ResNet50", "InceptionV3"]
    run("06", *d6)
    run("02", *copied["d"], "--weights", "none", "--image-size", 96, "--models", "ResNet50", "--force")
    with pytest.raises(CatDogError, match=r"ResNet50.keras \(ResNet50\) was trained on features made with "
                                          r"image_size=75; .*ResNet50.h5 now gives image_size=96: rerun (.*), or") as e:
        run("07", *copied["d"], "--model", copied["model"] / "single" / "ResNet50.keras",
            "--output", tmp_path / "s.csv")
    command = e.value.args[0].split(": rerun ")[1].split(", or")[0].split()
    assert command[0] == "02_extract_features.py" and "--image-size" in command
    script("02").parse_args(command[1:])  # the recommended command is a valid one
    with pytest.raises(CatDogError, match=r"--init baseline: .*image_size=75; this run now gives image_size=96"):
        run("04", *copied["d"], "--weights", "none", "--image-size", 96, "--init", "baseline", "--epochs", 1)
    with pytest.raises(CatDogError, match=r"trials made with other features"):  # a resumed search checks them too
        run("06", *copied["d"], "--max-evals", 2, "--epochs", 1, *HEAD, "--models", "ResNet50", "InceptionV3")
    assert not (tmp_path / "s.csv").exists()
    # 04 at 96 px leaves 03's 75 px head out of its comparison rather than compare unlike runs.
    table = run("04", *copied["d"], "--weights", "none", "--image-size", 96, "--init", "random", "--epochs", 1)
    assert table.model.tolist() == ["ResNet50_random"]


def test_a_search_is_bound_to_its_models_and_settings(pipeline, tmp_path):
    d = ["--data-dir", pipeline["data"], "--model-dir", tmp_path, "--max-evals", 1, "--epochs", 1, *HEAD]
    run("06", *d, "--models", "ResNet50", "InceptionV3")
    before = {f: (tmp_path / "hyperopt" / f).read_bytes() for f in ("trials.json", "best.keras", "best.json")}
    with pytest.raises(CatDogError, match=r"trials made with other models \(\['ResNet50', 'InceptionV3'\], now "
                                          r"\['ResNet50', 'Xception'\]\).*another --model-dir"):
        run("06", *d, "--models", "ResNet50", "Xception")
    with pytest.raises(CatDogError, match=r"other epochs \(1, now 2\)"):
        run("06", *d[:-4], "--epochs", 2, *HEAD, "--models", "ResNet50", "InceptionV3")
    assert before == {f: (tmp_path / "hyperopt" / f).read_bytes() for f in before}
    best = json.loads((tmp_path / "hyperopt" / "best.json").read_text())
    assert best["features"] == ["ResNet50", "InceptionV3"] and best["args"]["models"] == ["ResNet50", "InceptionV3"]


# ----------------------------------------------------------------------------- 7. every setting is compared

def test_precision_is_part_of_the_reuse_check(copied):
    path = helper.feature_path(copied["data"], "ResNet50")
    state = helper.feature_file_state(path)
    settings = helper.ExtractSettings.of(state)
    split, ids = helper.read_split(copied["data"]), helper.laid_out_test_ids(copied["data"])
    assert helper.stale_reason(path, settings, split, ids) == ""
    for change in ({"precision": "bfloat16"}, {"precision": "float16"}, {"jpeg_draft": True}, {"decoder": "tf"},
                   {"image_size": 96}):
        other = helper.ExtractSettings(**{**settings.attrs(), **change})
        key = next(iter(change))
        assert key in helper.stale_reason(path, other, split, ids)
    # One source of truth: a maps file's settings are the same dataclass, with its cut and dtype.
    assert {"split_layer", "dtype", "precision"} <= set(settings.attrs())


# ----------------------------------------------------------------------------- 8. files closed, temp names

@pytest.mark.slow
def test_two_processes_extracting_one_file_do_not_collide(copied):
    cmd = [sys.executable, str(ROOT / "02_extract_features.py"), "--data-dir", str(copied["data"]), "--weights",
           "none", "--image-size", "32", "--models", "VGG16", "--force", "--batch-size", "4"]
    procs = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    path = helper.feature_path(copied["data"], "VGG16")
    state = helper.feature_file_state(path)
    assert state["complete"] and state["image_size"] == 32
    with h5py.File(path, "r") as f:
        assert f["labelled"].shape == (61, 512) and np.isfinite(f["labelled"][:]).all()
    assert not list(path.parent.glob(".*partial*"))


def test_feature_writer_cleans_up_whatever_happens(tmp_path):
    path = tmp_path / "f.h5"
    with pytest.raises(ValueError), helper.FeatureWriter(path, ["cat.1.jpg"], [0], [1], (2,), "float32", {}) as w:
        w.append("labelled", np.zeros((1, 2), np.float32))
        raise ValueError("interrupted")
    assert not list(tmp_path.iterdir())
    # A failure while creating the file (here: a dtype h5py refuses) leaves nothing either.
    with pytest.raises(TypeError), helper.FeatureWriter(path, ["cat.1.jpg"], [0], [1], (2,), "no-such-dtype", {}):
        pass
    assert not list(tmp_path.iterdir())
    assert helper.temp_name(path) != helper.temp_name(path) and str(os.getpid()) in helper.temp_name(path).name


def test_map_rows_close_their_file(tmp_path):
    path = tmp_path / "maps.h5"
    with helper.FeatureWriter(path, ["cat.1.jpg", "dog.2.jpg"], [0, 1], [1], (2, 2, 3), "float16", {}) as w:
        w.append("labelled", np.ones((2, 2, 2, 3), np.float16))
        w.append("test", np.ones((1, 2, 2, 3), np.float16))
        w.commit()
    with script("04").MapRows(path, in_ram=False) as rows:
        assert rows.read(np.array([0, 1])).shape == (2, 2, 2, 3)
        handle = rows._file
        assert handle.id.valid
    assert not handle.id.valid and rows._file is None


# ----------------------------------------------------------------------------- 9. sidecars

@pytest.mark.parametrize("step, path", [("03", "single/ResNet50.json"), ("05", "merge/ResNet50+Xception.json")])
def test_sidecar_holds_every_flag_versions_and_feature_settings(pipeline, step, path):
    meta = json.loads((pipeline["model"] / path).read_text())
    flags = vars(script(step).parse_args([]))
    assert set(flags) <= set(meta["args"]), set(flags) - set(meta["args"])
    assert meta["args"]["lr"] == 1.0 and meta["args"]["batch_size"] == 16 and meta["seed"] == 2018
    assert meta["keras"].startswith("3.") and meta["tensorflow"]
    for a in meta["feature_attrs"]:
        assert a["image_size"] == int(IMAGE_SIZE) and a["weights"] == "none" and a["precision"] == "float32"
    results = pd.read_csv(pipeline["model"] / path.split("/")[0] / "results.csv").set_index("model")
    assert meta["val_loss"] == pytest.approx(results.val_loss[path.split("/")[1][:-5]], abs=1e-12)


@pytest.mark.slow
def test_07_prints_the_sidecar_of_the_model_it_submits(pipeline, tmp_path):
    r = cli("07_predict_submit.py", "--data-dir", pipeline["data"], "--model-dir", pipeline["model"],
            "--model", pipeline["model"] / "single" / "ResNet50.keras", "--output", tmp_path / "s.csv")
    assert "kind single, features ResNet50, seed 2018" in r.stdout
    assert "--batch-size 16" in r.stdout and "image_size=75" in r.stdout


def test_results_rows_describe_the_saved_heads(pipeline):
    """val_loss in results.csv is the saved model's own score on split.csv's valid rows (sklearn's log loss)."""
    from sklearn.metrics import log_loss
    for folder, name in (("single", "Xception"), ("merge", "ResNet50+InceptionV3+Xception")):
        model, meta = helper.load_model(pipeline["model"] / folder / f"{name}.keras")
        feats = helper.load_features(meta["features"], pipeline["data"])
        probs = feats.predict(model, "labelled")
        row = pd.read_csv(pipeline["model"] / folder / "results.csv").set_index("model").loc[name]
        expected = log_loss(feats.labels[feats.valid], probs[feats.valid].astype(np.float64), labels=[0, 1])
        assert row.val_loss == pytest.approx(expected, rel=1e-4)


def test_a_diverged_run_saves_nothing(copied, monkeypatch):
    before = {p.name: p.read_bytes() for p in (copied["model"] / "single").iterdir() if p.is_file()}
    model_cls = __import__("keras").Model
    real = model_cls.evaluate
    monkeypatch.setattr(model_cls, "evaluate", lambda self, *a, **k: {**real(self, *a, **k), "loss": float("nan")})
    with pytest.raises(CatDogError, match="diverged.*nothing was saved"):
        run("03", *copied["d"], *HEAD, "--models", "ResNet50", "--epochs", 1, "--submissions-dir",
            copied["model"] / "subs")
    assert before == {p.name: p.read_bytes() for p in (copied["model"] / "single").iterdir() if p.is_file()}


def test_message_recommendations_are_valid_commands(tmp_path):
    """Every command an error message recommends parses with the script it names."""
    run("01", "--data-dir", tmp_path, "--demo", 3)
    with pytest.raises(CatDogError) as e:
        helper.load_features([script("04").maps_name("ResNet50", "conv5_block2_out")], tmp_path)
    with pytest.raises(CatDogError) as e2:
        helper.load_features(["Xception"], tmp_path)
    for err in (e, e2):
        words = str(err.value).split("run ", 1)[1].split()
        assert words[0].endswith(".py")
        script(words[0][:2]).parse_args(words[1:])  # no SystemExit
    # The commands that rebuild a feature or maps file with its own settings.
    for name, attrs in [("Xception", helper.ExtractSettings("Xception", 96, weights="none", jpeg_draft=True,
                                                            precision="bfloat16").attrs()),
                        ("ResNet50_conv4_block6_out_maps", helper.ExtractSettings(
                            "ResNet50", 64, split_layer="conv4_block6_out", dtype="float16").attrs())]:
        words = helper.rebuild_command(name, attrs).split()
        args = script(words[0][:2]).parse_args(words[1:])
        assert args.image_size == attrs["image_size"] and args.seed == attrs["seed"]
        assert getattr(args, "split_layer", "") in ("", None, attrs["split_layer"])


def test_helper_code_is_shared_code():
    """Scripts call no private helper function."""
    import re
    for path in ROOT.glob("0[0-9]_*.py"):
        assert not re.search(r"helper\._[a-z]", path.read_text()), path.name


def test_plot_marks_the_phase_switch(tmp_path):
    hist = pd.DataFrame({"epoch": [1, 2, 3, 4], "phase": ["head", "head", "block", "block"],
                         "val_loss": [0.5, 0.4, 0.3, 0.35]})
    plt = helper.pyplot()
    calls = []
    real = plt.Axes.axvline
    plt.Axes.axvline = lambda self, x, *a, **k: calls.append((x, k.get("label"))) or real(self, x, *a, **k)
    try:
        helper.plot_curves({"m": hist}, tmp_path / "p.png", marks={"m": 3})
    finally:
        plt.Axes.axvline = real
    assert calls == [(2.5, "m: block from epoch 3")]
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_help_and_flag_errors_do_not_import_tensorflow():
    code = textwrap.dedent(f"""
        import sys, importlib
        sys.path.insert(0, {str(ROOT)!r})
        for name in ("02_extract_features", "03_train_single", "04_finetune_split", "05_train_merge",
                     "06_hyperopt_merge", "07_predict_submit"):
            m = importlib.import_module(name)
            try:
                m.parse_args(["--seed", "-1"])
            except SystemExit:
                pass
        print("tensorflow" in sys.modules, "keras" in sys.modules)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert r.stdout.split() == ["False", "False"], r.stderr[-2000:]
    assert r.stderr.count("is not an integer >= 0") == 6


def test_06_holds_ctrl_c_until_its_files_agree(monkeypatch):
    import signal
    module, before, done = script("06"), signal.getsignal(signal.SIGINT), []
    with pytest.raises(KeyboardInterrupt), module.no_interrupt():
        os.kill(os.getpid(), signal.SIGINT)
        done.append("the block ran to its end")
    assert done and signal.getsignal(signal.SIGINT) is before


def test_full_disk_at_commit_is_a_clear_error_too(copied, monkeypatch):
    import errno
    monkeypatch.setattr(helper.FeatureWriter, "commit", lambda self: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(CatDogError, match="is full: VGG16.h5 needs about"):
        run("02", *copied["d"], "--weights", "none", "--image-size", 32, "--models", "VGG16", "--batch-size", 8)
    assert not list((copied["data"] / "features").glob("*VGG16*"))


@pytest.mark.parametrize("drop", ["features", "feature_attrs"])
def test_a_sidecar_without_what_07_needs_is_named(copied, tmp_path, drop):
    sidecar = copied["model"] / "single" / "ResNet50.json"
    meta = json.loads(sidecar.read_text())
    del meta[drop]
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(CatDogError, match=f"ResNet50.json lacks {drop}: retrain ResNet50.keras"):
        run("07", *copied["d"], "--model", copied["model"] / "single" / "ResNet50.keras", "--output",
            tmp_path / "s.csv")


def test_04_drops_a_baseline_whose_sidecar_is_broken(tmp_path):
    """The 03 comparison is optional: a garbled 03 sidecar drops it with a line, not a traceback."""
    single = tmp_path / "single"
    single.mkdir()
    pd.DataFrame({"model": ["ResNet50"], "val_loss": [0.1]}).to_csv(single / "results.csv", index=False)
    pd.DataFrame({"epoch": [1], "val_loss": [0.1]}).to_csv(single / "ResNet50.history.csv", index=False)
    (single / "ResNet50.json").write_text("{not json")
    settings = helper.ExtractSettings("ResNet50", 75, weights="none", split_layer="conv5_block2_out")
    assert script("04").baseline_row(tmp_path, settings, tmp_path / "finetune") is None
