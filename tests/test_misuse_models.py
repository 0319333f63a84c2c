"""Misuse of model files, exports, searches and submissions (issue 19): no step removes a folder it did not make,
no output overwrites another or an input, nothing read from a model dir runs code or leads out of it, and every
judgement of a model is made on the split it was trained on."""

import json
import logging
import os
import pickle
import shlex
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import HEAD, run, script

import helper
from helper import CatDogError

SEARCH = ["--epochs", 1, *HEAD, "--models", "ResNet50", "InceptionV3"]


@pytest.fixture
def copied(pipeline, tmp_path):
    """The pipeline's data dir and model dir, copied (the data's links kept): free to change."""
    data, models = tmp_path / "data", tmp_path / "model"
    shutil.copytree(pipeline["data"], data, symlinks=True)
    shutil.copytree(pipeline["model"], models)
    return {"data": data, "model": models, "d": ["--data-dir", data, "--model-dir", models]}


def files_under(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- 1. 08 --out-dir

def test_08_refuses_an_out_dir_it_did_not_make(pipeline, tmp_path, monkeypatch):
    model = pipeline["model"] / "single" / "ResNet50.keras"
    d = ["--data-dir", pipeline["data"], "--model-dir", pipeline["model"], "--model", model]
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("three years of work")
    with pytest.raises(CatDogError, match=r"--out-dir .*thesis holds files that are not an export of 08 \(no "
                                          r"export.json; e.g. chapter1.tex\).*give a new or empty folder"):
        run("08", *d, "--out-dir", thesis)
    assert (thesis / "chapter1.tex").read_text() == "three years of work"
    # An export the user added a file to is not replaced either (the file would go with it).
    (thesis / "export.json").write_text("{}")
    with pytest.raises(CatDogError, match=r"holds an export and other files \(chapter1.tex\)"):
        run("08", *d, "--out-dir", thesis)
    assert (thesis / "chapter1.tex").is_file()
    # The model dir and the data dir are no exports.
    for folder in (pipeline["model"], pipeline["data"]):
        before = files_under(folder)
        with pytest.raises(CatDogError, match="holds files that are not an export of 08"):
            run("08", *d, "--out-dir", folder)
        assert files_under(folder) == before
    (tmp_path / "a file").write_text("x")
    with pytest.raises(CatDogError, match=r"a file is a file: give a folder"):
        run("08", *d, "--out-dir", tmp_path / "a file")
    monkeypatch.chdir(thesis)  # `.` was a raw ValueError (a temp name of an empty name)
    with pytest.raises(CatDogError, match=rf"--out-dir {thesis} holds an export and other files"):
        run("08", *d, "--out-dir", ".")
    with pytest.raises(CatDogError, match="is the root folder"):
        run("08", *d, "--out-dir", "/")


@pytest.mark.slow
def test_08_replaces_its_own_export_and_counts_the_images_it_compared(pipeline, tmp_path, caplog):
    out = tmp_path / "export"
    out.mkdir()
    (out / "export.json").write_text('{"old": true}')  # a previous export of 08
    (out / "catdog.keras").write_bytes(b"old")
    test_images = len(helper.test_images(pipeline["data"])[0])
    with caplog.at_level(logging.INFO, logger="catdog"):  # --check: more than there are, so the count is theirs
        info = run("08", "--data-dir", pipeline["data"], "--model-dir", pipeline["model"], "--model",
                   pipeline["model"] / "single" / "ResNet50.keras", "--out-dir", out, "--check", test_images + 5)
    assert json.loads((out / "export.json").read_text())["source_sha256"] == info["source_sha256"]
    assert (out / "catdog.keras").read_bytes() != b"old"
    assert sorted(p.name for p in out.iterdir()) == sorted(set(script("08").EXPORT_FILES) - {helper.EXPORT_TFLITE_INT8})
    assert f"on {test_images} test images the exported model" in caplog.text
    assert not list(tmp_path.glob(".export*"))  # the old export and the temp folder are gone


# ----------------------------------------------------------------------------- 2. 07's outputs and inputs

def test_07_refuses_outputs_that_overwrite_each_other_or_its_inputs(pipeline, copied, tmp_path):
    model = copied["model"] / "single" / "ResNet50.keras"
    before = {**files_under(copied["model"]), **files_under(copied["data"])}
    sub = tmp_path / "sub.json"
    for flags in (["--calibrate", "temperature"], ["--clip", "auto"], ["--blend", "ResNet50", "InceptionV3"]):
        with pytest.raises(CatDogError, match=rf"--output {sub} and the recipe .* {sub} are the same file"):
            run("07", *copied["d"], *(["--model", model] if flags[0] != "--blend" else []), "--output", sub, *flags)
    cases = [  # --output, other flags, what it would have overwritten
        (copied["model"] / "single" / "ResNet50.json", [], "its sidecar"),
        (copied["data"] / "split.csv", [], "the split"),
        (copied["model"] / "single" / "results.csv", [], "the results table"),
        (copied["model"] / "single" / "ResNet50.csv", ["--calibrate", "temperature"], "its sidecar"),  # the recipe
    ]
    for output, flags, what in cases:
        with pytest.raises(CatDogError, match=rf"would overwrite {what} "):
            run("07", *copied["d"], "--model", model, "--output", output, *flags)
    with pytest.raises(CatDogError, match=r"--output .*worst.csv and --analyze's .*worst.csv are the same file"):
        run("07", *copied["d"], "--model", model, "--output", copied["model"] / "analysis" / "worst.csv", "--analyze")
    assert {**files_under(copied["model"]), **files_under(copied["data"])} == before
    assert not sub.exists()


# ----------------------------------------------------------------------------- 5., 6., 7. 06's saved search

def search(data, model_dir, evals, *flags):
    return run("06", "--data-dir", data, "--model-dir", model_dir, "--max-evals", evals, *SEARCH, *flags)


@pytest.fixture(scope="module")
def searched(pipeline, tmp_path_factory):
    """A one-trial search, never changed (tests copy its model dir)."""
    model_dir = tmp_path_factory.mktemp("search19")
    search(pipeline["data"], model_dir, 1)
    return model_dir


class Marker:
    """A pickle that, when read, writes a file: what a trials.pkl from someone else could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.path))}",)


def test_06_refuses_a_pickle_without_running_it(pipeline, tmp_path):
    out = tmp_path / "model" / "hyperopt"
    out.mkdir(parents=True)
    marker = tmp_path / "ran"
    (out / "trials.pkl").write_bytes(pickle.dumps(Marker(marker)))
    with pytest.raises(CatDogError, match=r"trials.pkl is a pickle .* can run any code in it: .*--trust-pickle .*"
                                          r"move .* away"):
        search(pipeline["data"], tmp_path / "model", 1)
    assert not marker.exists()
    assert not (out / "trials.json").exists()


def test_06_converts_a_trusted_pickle_of_the_last_release_once(pipeline, searched, tmp_path):
    shutil.copytree(searched, tmp_path / "model")
    out = tmp_path / "model" / "hyperopt"
    trials = script("06").load_trials(out)
    with open(out / "trials.pkl", "wb") as f:  # what the last release saved: the Trials pickled
        pickle.dump(trials, f)
    record = json.loads((out / "trials.json").read_text())
    (out / "trials.json").unlink()
    with pytest.raises(CatDogError, match="--trust-pickle"):
        search(pipeline["data"], tmp_path / "model", 1)
    search(pipeline["data"], tmp_path / "model", 1, "--trust-pickle")  # no new trial: read, then saved as JSON
    assert json.loads((out / "trials.json").read_text()) == record
    (out / "trials.pkl").write_bytes(b"garbage")  # from now on trials.json is read
    assert len(search(pipeline["data"], tmp_path / "model", 1)) == 1


@pytest.mark.parametrize("where", ["../../outside.keras", "/tmp/elsewhere/x.keras", "a symlink out"])
def test_06_refuses_a_trial_whose_model_lies_outside_the_search(pipeline, searched, tmp_path, where):
    shutil.copytree(searched, tmp_path / "model")
    out = tmp_path / "model" / "hyperopt"
    path = out / "trials.json"
    record = json.loads(path.read_text())
    if where == "a symlink out":
        (tmp_path / "outside").mkdir()
        (out / "merge").rename(tmp_path / "outside" / "merge")
        (out / "merge").symlink_to(tmp_path / "outside" / "merge")
    else:
        record["trials"][0]["result"]["path"]["model"] = where
        path.write_text(json.dumps(record))
    with pytest.raises(CatDogError, match=rf"{path} names .*, which lies outside {out}"):
        search(pipeline["data"], tmp_path / "model", 2)


def test_06_resume_on_another_split_is_refused(copied, searched, tmp_path):
    shutil.rmtree(copied["model"])
    shutil.copytree(searched, copied["model"])
    run("01", "--data-dir", copied["data"], "--seed", 5)  # a new split of the same images
    before = files_under(copied["model"] / "hyperopt")
    with pytest.raises(CatDogError, match=r"hyperopt holds trials made on other data \(split.csv changed since: 01 "
                                          r"was rerun, or this is another --data-dir\).*use another --model-dir"):
        search(copied["data"], copied["model"], 2)
    assert files_under(copied["model"] / "hyperopt") == before


def test_06_best_json_records_its_model(searched):
    best = json.loads((searched / "hyperopt" / "best.json").read_text())
    assert best["model_sha256"] == helper.file_sha256(searched / "hyperopt" / "best.keras")
    bound = json.loads((searched / "hyperopt" / "search.json").read_text())
    assert len(bound["split_sha256"]) == 64 and len(bound["test_ids_sha256"]) == 64


@pytest.mark.slow
def test_06_a_search_resumed_from_json_equals_an_uninterrupted_one(pipeline, searched, tmp_path):
    shutil.copytree(searched, tmp_path / "resumed")
    resumed = search(pipeline["data"], tmp_path / "resumed", 3)
    whole = search(pipeline["data"], tmp_path / "whole", 3)
    columns = ["trial", "lr", "decay", "momentum", "dropout", "val_loss", "epochs"]
    pd.testing.assert_frame_equal(resumed[columns], whole[columns])


# ----------------------------------------------------------------------------- 8. judged on the model's split

def test_07_and_08_judge_a_model_only_on_its_own_split(copied, tmp_path):
    model = copied["model"] / "single" / "ResNet50.keras"
    run("01", "--data-dir", copied["data"], "--seed", 5)
    for extra in (["--analyze"], ["--analyze", "--tta"], ["--calibrate", "temperature"]):
        with pytest.raises(CatDogError, match=rf"{model} was trained on another split than .*split.csv .*Retrain it"):
            run("07", *copied["d"], "--model", model, "--output", tmp_path / "s.csv", *extra)
    assert not (tmp_path / "s.csv").exists()
    with pytest.raises(CatDogError, match=rf"{model} was trained on another split.*--check 0"):
        run("08", *copied["d"], "--model", model, "--out-dir", tmp_path / "export")
    run("07", *copied["d"], "--model", model, "--output", tmp_path / "s.csv")  # test predictions judge nothing
    assert len(pd.read_csv(tmp_path / "s.csv")) == len(helper.test_images(copied["data"])[0])


# ----------------------------------------------------------------------------- 9. a sidecar and its model

def test_a_sidecar_describing_another_model_is_refused(copied, tmp_path):
    single = copied["model"] / "single"
    meta = json.loads((single / "ResNet50.json").read_text())
    assert meta["model_sha256"] == helper.file_sha256(single / "ResNet50.keras")
    shutil.copy(single / "InceptionV3.keras", single / "ResNet50.keras")  # as a kill between the two would leave it
    with pytest.raises(CatDogError, match=r"the sidecar .*ResNet50.json describes another model than .*ResNet50.keras"
                                          r" .*retrain ResNet50.keras, or rerun the step that saved it"):
        run("07", *copied["d"], "--model", single / "ResNet50.keras", "--output", tmp_path / "s.csv")
    # A sidecar of an older release, which does not record its model, is read as it is.
    shutil.copy(single / "InceptionV3.json", single / "ResNet50.json")
    old = json.loads((single / "ResNet50.json").read_text())
    del old["model_sha256"]
    (single / "ResNet50.json").write_text(json.dumps(old))
    assert helper.read_sidecar(single / "ResNet50.keras")["features"] == ["InceptionV3"]


# ----------------------------------------------------------------------------- 14. what a model file is

def test_a_kfold_or_unfinished_folder_given_as_a_model_is_named(copied, tmp_path):
    single = copied["model"] / "single"
    folder = single / "ResNet50_k3"
    folder.mkdir()
    for k in (1, 2):
        shutil.copy(single / "ResNet50.keras", folder / f"fold{k}.keras")
    with pytest.raises(CatDogError, match=rf"{folder} is an unfinished K-fold run \(no kfold.json: it was "
                                          r"interrupted.*rerun 03 or 05 with --folds"):
        run("07", *copied["d"], "--model", folder, "--output", tmp_path / "s.csv")
    with pytest.raises(CatDogError, match=rf"--blend {folder}: {folder} is an unfinished K-fold run"):
        run("07", *copied["d"], "--blend", folder, "ResNet50", "--output", tmp_path / "s.csv")
    (folder / "kfold.json").write_text("{}")
    with pytest.raises(CatDogError, match=rf"{folder} is a K-fold folder \(the mean of its 2 fold models\), not one "
                                          rf".keras model: 07 takes it whole .* e.g. {folder / 'fold1.keras'}"):
        run("08", *copied["d"], "--model", folder)


def test_a_model_that_safe_mode_refuses_is_not_called_truncated(tmp_path):
    import keras
    x = keras.Input((3,))
    model = keras.Model(x, keras.layers.Lambda(lambda t: t * 2)(x))
    model.save(tmp_path / "lambda.keras")
    with pytest.raises(CatDogError) as e:
        helper.load_keras(tmp_path / "lambda.keras")
    assert "holds Python code (a Lambda layer), which Keras's safe mode refuses to run" in str(e.value)
    assert "truncated" not in str(e.value)


def test_recommended_commands_are_shell_quoted():
    weights = "/home/me/my weights"
    words = shlex.split(helper.rebuild_command("ResNet50", helper.ExtractSettings("ResNet50", 96,
                                                                                 weights=weights).attrs()))
    args = script("02").parse_args(words[1:])
    assert args.weights == weights and args.models == ["ResNet50"]


def test_suspects_command_is_shell_quoted(pipeline, tmp_path):
    data, models = tmp_path / "my data", tmp_path / "my models"
    shutil.copytree(pipeline["data"], data, symlinks=True)
    shutil.copytree(pipeline["model"] / "single", models / "single")
    run("07", "--data-dir", data, "--model-dir", models, "--model", models / "single" / "ResNet50.keras",
        "--output", tmp_path / "s.csv", "--analyze")
    line = next(s for s in (models / "analysis" / "suspects.txt").read_text().splitlines() if "01_reorganize" in s)
    words = shlex.split(line.lstrip("# ").split("  and retrain")[0])
    args = script("01").parse_args(words[1:])
    assert Path(args.data_dir) == data and Path(args.exclude) == models / "analysis" / "suspects.txt"


# ----------------------------------------------------------------------------- 6. paths read from model files

def test_paths_read_from_model_files_stay_in_their_folder(copied, tmp_path):
    single = copied["model"] / "single"
    outside = tmp_path / "outside.keras"
    shutil.copy(single / "ResNet50.keras", outside)
    (single / "Evil.keras").symlink_to(outside)
    shutil.copy(single / "ResNet50.json", single / "Evil.json")
    with pytest.raises(CatDogError, match=rf"--blend Evil names .*Evil.keras, which lies outside {single}"):
        run("07", *copied["d"], "--output", tmp_path / "s.csv", "--blend", "Evil", "ResNet50")
    meta = json.loads((single / "ResNet50.json").read_text())
    (single / "ResNet50.json").write_text(json.dumps({**meta, "features": ["../../../outside/x"]}))
    with pytest.raises(CatDogError, match=r"ResNet50.json names the feature file '../../../outside/x', which is not "
                                          r"a file name in a data dir's features/ folder"):
        run("07", *copied["d"], "--model", single / "ResNet50.keras", "--output", tmp_path / "s.csv")
