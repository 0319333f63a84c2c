"""Bad input and misuse: every refusal exits non-zero with one line naming the file or flag and what to do,
before any work starts, and loses or overwrites nothing of the user's (models, results.csv, submissions)."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import IMAGE_SIZE, ROOT, run, script

from helper import CatDogError

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def snapshot(*roots) -> dict[Path, bytes]:
    """Every regular file under `roots` (files or folders) and its bytes."""
    files = {}
    for root in map(Path, roots):
        for p in [root] if root.is_file() else sorted(root.rglob("*")):
            if p.is_file():
                files[p] = p.read_bytes()
    return files


def assert_unchanged(before: dict[Path, bytes], *roots) -> None:
    """The files of `before` are all still there, byte for byte, and nothing was added under `roots`."""
    changed = [str(p) for p, data in before.items() if not p.is_file() or p.read_bytes() != data]
    assert not changed, f"changed or removed: {changed}"
    added = sorted(set(snapshot(*roots)) - set(before)) if roots else []
    assert not added, f"written: {added}"


def usage_error(capsys, number: str, *argv) -> str:
    """Run a script and expect argparse to refuse it (exit 2); its stderr."""
    with pytest.raises(SystemExit) as e:
        run(number, *argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def user_files(pipeline):
    """Call it after a refused command: the demo pipeline's models, results and submissions are as they were."""
    roots = (pipeline["model"], pipeline["subs"])
    before = snapshot(*roots)
    return lambda: assert_unchanged(before, *roots)


# ----------------------------------------------------------------------------- 1. 07's output and model dir

@pytest.mark.parametrize("kind", ["/dev/null", "fifo", "directory", "symlink to a directory"])
def test_07_refuses_an_output_that_is_not_a_regular_file(pipeline, user_files, tmp_path, kind):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep.csv").write_text("id,label\n1,0.5\n")
    if kind == "/dev/null":
        target = Path("/dev/null")
    elif kind == "fifo":
        target = tmp_path / "fifo.csv"
        os.mkfifo(target)
    elif kind == "directory":
        target = folder
    else:
        target = tmp_path / "link"
        target.symlink_to(folder)
    with pytest.raises(CatDogError) as e:
        run("07", "--data-dir", pipeline["data"], "--model-dir", pipeline["model"], "--output", target)
    message = str(e.value)
    assert str(target) in message and "give a file name" in message
    assert ("is a directory" if "directory" in kind else "not a regular file") in message
    if kind == "/dev/null":
        assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    elif kind == "fifo":
        assert stat.S_ISFIFO(os.lstat(target).st_mode)
    elif kind == "symlink to a directory":
        assert target.is_symlink() and target.resolve() == folder
    assert (folder / "keep.csv").read_text() == "id,label\n1,0.5\n" and len(list(folder.iterdir())) == 1
    user_files()


def test_07_refuses_an_output_device_on_the_command_line_in_one_line(pipeline):
    """As a user sees it: exit 2, one `error:` line, no traceback (and no TensorFlow start-up: it fails first)."""
    r = subprocess.run([sys.executable, str(ROOT / "07_predict_submit.py"), "--data-dir", str(pipeline["data"]),
                        "--model-dir", str(pipeline["model"]), "--output", "/dev/null"],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: /dev/null ")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.parametrize("output", ["", "   "])
def test_07_refuses_an_empty_output(capsys, pipeline, user_files, output):
    err = usage_error(capsys, "07", "--data-dir", pipeline["data"], "--model-dir", pipeline["model"],
                      "--output", output)
    assert "--output is empty" in err
    user_files()


@pytest.mark.parametrize("how", ["picked", "--model and --analyze"])
def test_07_model_dir_that_is_a_file(pipeline, user_files, tmp_path, how):
    not_a_dir = tmp_path / "model.txt"
    not_a_dir.write_text("notes\n")
    extra = ["--model", pipeline["model"] / "single" / "ResNet50.keras", "--analyze"] if how != "picked" else []
    with pytest.raises(CatDogError, match=rf"--model-dir {not_a_dir} is a file, not a folder: give the folder"):
        run("07", "--data-dir", pipeline["data"], "--model-dir", not_a_dir, "--output", tmp_path / "s.csv", *extra)
    assert not_a_dir.read_text() == "notes\n" and not (tmp_path / "s.csv").exists()
    user_files()


def test_07_output_below_a_file(pipeline, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CatDogError, match="is a file, not a folder"):
        run("07", "--data-dir", pipeline["data"], "--model-dir", pipeline["model"],
            "--output", tmp_path / "file" / "sub" / "s.csv")


# ----------------------------------------------------------------------------- 2. refused before any training

HEAD_FLAGS = [  # (flags, what the error says)
    (["--epochs", "0"], "argument --epochs: 0 is not an integer >= 1"),
    (["--epochs", "-1"], "argument --epochs: -1 is not an integer >= 1"),
    (["--lr", "nan"], "argument --lr: nan is not a number > 0"),
    (["--lr", "-1"], "argument --lr: -1 is not a number > 0"),
    (["--dropout", "1.5"], "argument --dropout: 1.5 is not a number >= 0 and < 1"),
    (["--batch-size", "-4"], "argument --batch-size: -4 is not an integer >= 1"),
]
CLIP_FLAGS = (["--clip-low", "0.9", "--clip-high", "0.1"], "--clip-low (0.9) must be below --clip-high (0.1)")


@pytest.mark.parametrize(("flags", "says"), [*HEAD_FLAGS, CLIP_FLAGS], ids=lambda v: " ".join(v) if
                         isinstance(v, list) else None)
def test_03_bad_flags_are_refused_before_the_good_model_is_touched(capsys, pipeline, user_files, flags, says):
    err = usage_error(capsys, "03", "--data-dir", pipeline["data"], "--model-dir", pipeline["model"],
                      "--submissions-dir", pipeline["subs"], *flags)
    assert says in err
    single = pipeline["model"] / "single"
    assert {"ResNet50.keras", "ResNet50.json", "results.csv"} <= {p.name for p in single.iterdir()}
    user_files()


@pytest.mark.parametrize(("flags", "says"), HEAD_FLAGS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_05_bad_flags_are_refused_before_the_good_model_is_touched(capsys, pipeline, user_files, flags, says):
    err = usage_error(capsys, "05", "--data-dir", pipeline["data"], "--model-dir", pipeline["model"], *flags)
    assert says in err
    assert (pipeline["model"] / "merge" / "results.csv").is_file()
    user_files()


@pytest.mark.parametrize(("flags", "says"), [
    (["--epochs", "0"], "argument --epochs: 0 is not an integer >= 1"),
    (["--batch-size", "0"], "argument --batch-size: 0 is not an integer >= 1"),
    (["--warmup-epochs", "-1"], "argument --warmup-epochs: -1 is not an integer >= 0"),
    (["--patience", "0"], "argument --patience: 0 is not an integer >= 1"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_04_bad_flags_are_refused_by_argparse(capsys, flags, says):
    with pytest.raises(SystemExit) as e:
        script("04").parse_args(flags)
    assert e.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize("problem", ["--submissions-dir is a file", "a submission is a folder", "no features"])
def test_03_checks_its_inputs_and_targets_before_training(pipeline, single_copy, tmp_path, monkeypatch, problem):
    """Nothing trains (and so no good model is replaced) when a later model or submission is bound to fail."""
    subs = tmp_path / "subs"
    subs.mkdir()
    models = ["ResNet50", "InceptionV3"]
    if problem == "--submissions-dir is a file":
        subs = tmp_path / "subs.txt"
        subs.write_text("notes\n")
        says = f"{subs} is a file, not a folder"
    elif problem == "a submission is a folder":
        (subs / "InceptionV3.csv").mkdir()
        says = f"{subs / 'InceptionV3.csv'} is a directory: give a file name"
    else:
        models.append("VGG16")  # the demo pipeline extracted no VGG16 features
        says = "VGG16.h5 is missing or incomplete: run 02_extract_features.py --models VGG16"
    monkeypatch.setattr(script("03").helper, "train_head", lambda *a: pytest.fail("trained before the check"))
    before = snapshot(single_copy, subs)
    with pytest.raises(CatDogError, match=says):
        run("03", "--data-dir", pipeline["data"], "--model-dir", single_copy.parent, "--submissions-dir", subs,
            "--models", *models)
    assert_unchanged(before, single_copy, subs)


def test_a_bad_flag_on_the_command_line_exits_2_without_a_traceback():
    r = subprocess.run([sys.executable, str(ROOT / "03_train_single.py"), "--epochs", "0"], capture_output=True,
                       text=True, env=ENV, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("error: argument --epochs: 0 is not an integer >= 1")


# ----------------------------------------------------------------------------- 3. 02 checks every size first

def test_02_refuses_a_too_small_size_before_extracting_anything(tmp_path):
    data = tmp_path / "data"
    run("01", "--data-dir", data, "--demo", 3)
    features = data / "features"
    before = snapshot(data)
    with pytest.raises(CatDogError) as e:
        run("02", "--data-dir", data, "--model-dir", tmp_path / "model", "--weights", "none",
            "--models", "ResNet50", "InceptionV3", "--image-size", 64)
    assert "InceptionV3 needs --image-size >= 75, got 64" in str(e.value)
    assert not (features / "ResNet50.h5").exists() and not list(features.glob("*ResNet50*"))
    assert_unchanged(before, data)


# ----------------------------------------------------------------------------- 4. broken model files

@pytest.fixture
def single_copy(pipeline, tmp_path):
    """A private copy of 03's models, free to be broken."""
    shutil.copytree(pipeline["model"] / "single", tmp_path / "model" / "single")
    return tmp_path / "model" / "single"


BROKEN = {  # what is done to ResNet50.keras / .json, which file the message names, what it says
    "truncated .keras": (lambda m, s: m.write_bytes(m.read_bytes()[: m.stat().st_size // 2]), ".keras",
                         "is not a readable Keras model"),
    "zero-byte .keras": (lambda m, s: m.write_bytes(b""), ".keras", "is not a readable Keras model"),
    "sidecar not JSON": (lambda m, s: s.write_text("{'kind': single"), ".json", "is not a valid sidecar (not JSON"),
    "empty sidecar": (lambda m, s: s.write_bytes(b""), ".json", "is not a valid sidecar (not JSON"),
    "sidecar without kind": (lambda m, s: s.write_text(json.dumps({"features": ["ResNet50"]})), ".json",
                             "is not a catdog sidecar (no known 'kind')"),
    "sidecar a JSON list": (lambda m, s: s.write_text("[]"), ".json", "is not a catdog sidecar (no known 'kind')"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_07_names_a_broken_model_or_sidecar(pipeline, single_copy, tmp_path, case):
    break_it, named, says = BROKEN[case]
    model, sidecar = single_copy / "ResNet50.keras", single_copy / "ResNet50.json"
    break_it(model, sidecar)
    output = tmp_path / "submission.csv"
    output.write_text("id,label\n1,0.5\n")  # the user's last submission
    before = snapshot(single_copy, output)
    with pytest.raises(CatDogError) as e:
        run("07", "--data-dir", pipeline["data"], "--model-dir", single_copy.parent, "--model", model,
            "--output", output)
    message = str(e.value)
    assert message.startswith(f"{single_copy / ('ResNet50' + named)} {says}") and "retrain" in message
    if named == ".json":
        assert "not found" not in message  # for .keras: see the next test
    assert_unchanged(before, single_copy)


@pytest.mark.parametrize("size", ["zero-byte", "truncated"])
def test_a_broken_keras_file_is_not_called_missing(pipeline, single_copy, tmp_path, size):
    model = single_copy / "ResNet50.keras"
    model.write_bytes(b"" if size == "zero-byte" else model.read_bytes()[:1000])
    with pytest.raises(CatDogError) as e:
        run("07", "--data-dir", pipeline["data"], "--model", model, "--output", tmp_path / "s.csv")
    assert "not found" not in str(e.value).lower()


def test_04_baseline_from_a_zero_byte_head(pipeline, single_copy, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(pipeline["data"], data, symlinks=True)  # a maps file must not land in the shared data
    head = single_copy / "ResNet50.keras"
    head.write_bytes(b"")
    before = snapshot(single_copy, data / "features")
    with pytest.raises(CatDogError, match=rf"{head} is not a readable Keras model .*truncated; retrain it"):
        run("04", "--data-dir", data, "--model-dir", single_copy.parent, "--weights", "none",
            "--image-size", IMAGE_SIZE, "--init", "baseline", "--epochs", 1)
    assert_unchanged(before, single_copy.parent, data / "features")


# ----------------------------------------------------------------------------- 5. 06's saved search

SEARCH = ["--epochs", 1, "--batch-size", 16, "--models", "ResNet50", "InceptionV3"]


def search(pipeline, model_dir, evals):
    return run("06", "--data-dir", pipeline["data"], "--model-dir", model_dir, "--max-evals", evals, *SEARCH)


@pytest.fixture(scope="module")
def searched(pipeline, tmp_path_factory):
    """A one-trial search, never changed (tests copy its hyperopt folder)."""
    model_dir = tmp_path_factory.mktemp("misuse_search")
    search(pipeline, model_dir, 1)
    return model_dir / "hyperopt"


KEPT = ("trials.json", "trials.csv", "best.keras", "best.json")


@pytest.mark.parametrize("damage", ["truncated", "empty", "a JSON list"])
def test_06_unreadable_trials_say_how_to_start_over(pipeline, searched, tmp_path, damage):
    out = tmp_path / "hyperopt"
    shutil.copytree(searched, out)
    record = out / "trials.json"
    data = record.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "empty": b"", "a JSON list": b"[1, 2]"}
    record.write_bytes(damaged[damage])
    before = snapshot(*(out / f for f in KEPT))
    with pytest.raises(CatDogError) as e:
        search(pipeline, tmp_path, 2)
    message = str(e.value)
    assert str(record) in message and f"move {out} away to start the search over" in message
    assert ("holds a list that is not catdog's record" if damage == "a JSON list" else "not a readable trials file"
            ) in message
    assert_unchanged(before)


def test_06_zero_epochs_is_refused_by_argparse(capsys, pipeline, tmp_path):
    err = usage_error(capsys, "06", "--data-dir", pipeline["data"], "--model-dir", tmp_path, "--epochs", 0)
    assert "argument --epochs: 0 is not an integer >= 1" in err
    assert not any(tmp_path.iterdir())


def test_06_best_trials_model_gone(pipeline, tmp_path):
    search(pipeline, tmp_path, 1)
    out = tmp_path / "hyperopt"
    models = list(out.glob("merge/*/train_models/*.keras"))
    assert len(models) == 1
    models[0].unlink()
    before = snapshot(*(out / f for f in KEPT))
    with pytest.raises(CatDogError) as e:
        search(pipeline, tmp_path, 2)
    message = str(e.value)
    assert f"{models[0]}, the model of trial 0 (the best), is gone" in message and "start the search over" in message
    assert_unchanged(before)


# ----------------------------------------------------------------------------- 6. Ctrl-C during a search

def assert_consistent(out: Path, n: int) -> None:
    """trials.json, trials.csv and best.keras/best.json describe the same `n` finished trials."""
    trials = script("06").load_trials(out)
    table = pd.read_csv(out / "trials.csv")
    assert len(trials.trials) == n and len(table) == n and table.trial.tolist() == list(range(n))
    assert [t["result"]["loss"] for t in trials.trials] == pytest.approx(table.val_loss.tolist(), rel=1e-12)
    best_row = table.loc[table.val_loss.idxmin()]
    best = json.loads((out / "best.json").read_text())
    assert best["trial"] == best_row.trial and best["val_loss"] == pytest.approx(best_row.val_loss, rel=1e-12)
    best_model = Path(trials.trials[int(best_row.trial)]["result"]["path"]["model"]).with_suffix(".keras")
    assert (out / "best.keras").read_bytes() == best_model.read_bytes()


def test_06_ctrl_c_in_a_trial_keeps_the_saved_search_consistent(pipeline, tmp_path, monkeypatch):
    module = script("06")
    real, calls = module.model, []

    def interrupted_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "model", interrupted_second)
    with pytest.raises(KeyboardInterrupt):
        search(pipeline, tmp_path, 2)
    assert len(calls) == 2
    out = tmp_path / "hyperopt"
    assert_consistent(out, 1)
    monkeypatch.setattr(module, "model", real)
    search(pipeline, tmp_path, 2)
    assert_consistent(out, 2)
