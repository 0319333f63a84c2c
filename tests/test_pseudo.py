"""03/05 --pseudo (training rows only, K-fold honest), 07 --known-labels (exact duplicates only) and every test id
in a submission (07 refuses one that misses a test entry 01 saw; --fill-unreadable completes it)."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import HEAD, run, script

import catdog.heads
import helper
from helper import CatDogError

FOLDS = 3


@pytest.fixture(scope="module")
def first(pipeline, tmp_path_factory):
    """A first round: 03 --folds 3 on ResNet50 (test_folds.csv: each fold model's test predictions)."""
    models = tmp_path_factory.mktemp("round1") / "model"
    d = ["--data-dir", pipeline["data"], "--model-dir", models]
    run("03", *d, *HEAD, "--epochs", 2, "--models", "ResNet50", "--folds", FOLDS, "--submissions-dir", models / "subs")
    return {"model": models, "data": pipeline["data"], "kfold": models / "single" / f"ResNet50_k{FOLDS}",
            "sub": pipeline["subs"] / "ResNet50.csv"}


@pytest.fixture
def fits(monkeypatch):
    """Every head fit's training targets and validation rows."""
    seen = []
    real = catdog.heads.fit

    def fit(model, train, valid, *a, **kw):
        seen.append({"y": np.asarray(train[1], float), "valid": len(valid[1])})
        return real(model, train, valid, *a, **kw)
    monkeypatch.setattr(catdog.heads, "fit", fit)
    return seen


def test_pseudo_rows_train_only_with_soft_or_hard_targets(first, fits, tmp_path):
    split, sub = helper.read_split(first["data"]), pd.read_csv(first["sub"])
    n_train, n_valid = int((split.subset == "train").sum()), int((split.subset == "valid").sum())
    d = ["--data-dir", first["data"], "--model-dir", tmp_path / "m", "--models", "ResNet50", "--no-predict"]
    results = run("03", *d, *HEAD, "--epochs", 1, "--pseudo", first["sub"], "--pseudo-min", 0.5)
    confident = sub.label.to_numpy()  # --pseudo-min 0.5: every test row
    assert fits[-1]["valid"] == n_valid and len(fits[-1]["y"]) == n_train + len(sub)
    assert fits[-1]["y"][n_train:] == pytest.approx(confident, abs=1e-6)  # soft: the predicted probability
    meta = json.loads((tmp_path / "m" / "single" / "ResNet50.json").read_text())
    assert meta["pseudo"] == {"source": str(first["sub"]), "sha256": helper.file_sha256(first["sub"]), "min": 0.5,
                              "hard": False, "rows": len(sub)}
    assert results.set_index("model").pseudo_rows["ResNet50"] == len(sub)
    run("03", *d, *HEAD, "--epochs", 1, "--pseudo", first["sub"], "--pseudo-min", 0.9, "--pseudo-hard")
    picked = confident[(confident >= 0.9) | (confident <= 0.1)]
    assert len(fits[-1]["y"]) == n_train + len(picked) and fits[-1]["valid"] == n_valid
    assert (fits[-1]["y"][n_train:] == (picked >= 0.5)).all()


def test_kfold_pseudo_labels_of_fold_k_come_from_fold_ks_model(first, fits, tmp_path):
    d = ["--data-dir", first["data"], "--model-dir", tmp_path / "m", "--models", "ResNet50", "--no-predict"]
    run("03", *d, *HEAD, "--epochs", 1, "--folds", FOLDS, "--pseudo", first["kfold"], "--pseudo-min", 0.5)
    per_fold = pd.read_csv(first["kfold"] / helper.TEST_FOLDS_CSV)
    oof = pd.read_csv(tmp_path / "m" / "single" / f"ResNet50_k{FOLDS}" / helper.OOF_CSV)
    labelled = len(helper.read_split(first["data"]))
    assert len(oof) == labelled and oof.filename.str.startswith(("cat.", "dog.")).all()  # no test row held out
    for k, seen in enumerate(fits[-FOLDS:]):
        held = int((oof.fold == k + 1).sum())
        assert seen["valid"] == held and len(seen["y"]) == labelled - held + len(per_fold)
        assert seen["y"][labelled - held:] == pytest.approx(per_fold[f"fold{k + 1}"].to_numpy(), abs=1e-6)
    summary = json.loads((tmp_path / "m" / "single" / f"ResNet50_k{FOLDS}" / helper.KFOLD_SUMMARY).read_text())
    assert summary["pseudo"]["rows"] == [len(per_fold)] * FOLDS
    assert summary["pseudo"]["sha256"] == helper.file_sha256(first["kfold"] / helper.TEST_FOLDS_CSV)


@pytest.mark.parametrize("source,extra,message", [
    ("sub", [], "come from models that trained on every fold's rows"),
    ("kfold_test", [], r"give a K-fold folder \(give its folder"),
    ("kfold", ["--seed", 5], "not trained on this run's 3 folds"),
    ("kfold", ["--no-group-duplicates"], "not trained on this run's 3 folds"),
    ("kfold", ["--same-dir"], "this run would overwrite it"),
])
def test_kfold_refuses_pseudo_labels_that_cannot_be_honest(first, tmp_path, source, extra, message):
    given = {"sub": first["sub"], "kfold": first["kfold"], "kfold_test": first["kfold"] / helper.TEST_CSV}[source]
    models = first["model"] if "--same-dir" in extra else tmp_path / "m"
    extra = [e for e in extra if e != "--same-dir"]
    with pytest.raises(CatDogError, match=message):
        run("03", "--data-dir", first["data"], "--model-dir", models, "--models", "ResNet50", *HEAD, "--epochs", 1,
            "--folds", FOLDS, "--pseudo", given, *extra, "--submissions-dir", first["model"] / "subs")
    assert not (tmp_path / "m").exists()  # refused before any training


def test_pseudo_bad_files_are_refused(first, tmp_path):
    bad = tmp_path / "bad.csv"
    d = ["--data-dir", first["data"], "--model-dir", tmp_path / "m", "--models", "ResNet50", "--no-predict"]
    for text, message in [("id,label\n99999,0.9\n", "not this data dir's test images"),
                          ("id,label\n1,1.5\n", "probabilities in"), ("a,b\n", "not a submission CSV")]:
        bad.write_text(text)
        with pytest.raises(CatDogError, match=message):
            run("03", *d, "--pseudo", bad)


def test_pseudo_min_below_a_half_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit):
        script("03").parse_args(["--pseudo", "x.csv", "--pseudo-min", "0.4"])
    assert "--pseudo-min" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 07


def test_known_labels_only_for_exact_duplicates(pipeline, tmp_path, caplog):
    data, model = pipeline["data"], pipeline["model"] / "single" / "ResNet50.keras"
    groups = helper.read_duplicates(data)
    exact = groups[groups.part == "test"].file.tolist()  # the demo's test copy of its last cat
    assert exact == ["16.jpg"]
    d = ["--data-dir", data, "--model-dir", pipeline["model"], "--model", model]
    plain = run("07", *d, "--output", tmp_path / "plain.csv").set_index("id").label
    known = run("07", *d, "--output", tmp_path / "known.csv", "--known-labels").set_index("id").label
    assert known[16] == helper.CLIP[0] and plain[16] != helper.CLIP[0]
    assert (known.drop(16) == plain.drop(16)).all()
    record = json.loads((tmp_path / "known.json").read_text())
    assert record["known_labels"] == {"count": 1, "ids": [16]}
    assert not (tmp_path / "plain.json").exists()


def test_known_labels_never_from_a_near_duplicate():
    groups = pd.DataFrame({"group": [1, 1], "file": ["dog.3.jpg", "7.jpg"], "part": ["train", "test"],
                           "label": ["dog", ""], "pixels": ["aa", "bb"]})  # one group, other pixels: near only
    assert helper.known_test_labels(groups, {"dog.3.jpg": 1}) == ({}, [])
    groups.loc[1, "pixels"] = "aa"
    assert helper.known_test_labels(groups, {"dog.3.jpg": 1}) == ({"7.jpg": 1}, [])
    assert helper.known_test_labels(groups, {}) == ({}, [])  # an excluded image's label is not used


def test_a_skipped_test_image_makes_07_refuse_and_fill_unreadable_completes_the_ids(pipeline, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(pipeline["data"], data, symlinks=True)
    (data / "test" / "40.jpg").write_bytes(b"")                                      # 0 bytes
    (data / "test" / "41.JPG").write_bytes((data / "test" / "1.jpg").read_bytes())   # not Kaggle's name
    run("01", "--data-dir", data)
    assert "2 test entries" in caplog.records[-1].message
    model = pipeline["model"] / "single" / "ResNet50.keras"
    d = ["--data-dir", data, "--model-dir", pipeline["model"], "--model", model]
    with pytest.raises(CatDogError, match=r"2 test entries 01 saw have no prediction.*40\.jpg \(empty file"):
        run("07", *d, "--output", tmp_path / "sub.csv")
    assert not (tmp_path / "sub.csv").exists()
    sub = run("07", *d, "--output", tmp_path / "sub.csv", "--fill-unreadable")
    n = len(helper.laid_out_test_ids(data))
    assert len(sub) == n + 2 and sub.id.is_monotonic_increasing
    assert sub.set_index("id").label[[40, 41]].tolist() == [0.5, 0.5]
    assert json.loads((tmp_path / "sub.json").read_text())["filled"] == {"value": 0.5, "ids": [40, 41]}
    sub = run("07", *d, "--output", tmp_path / "sub.csv", "--fill-unreadable", 0.3)
    assert sub.set_index("id").label[40] == 0.3
