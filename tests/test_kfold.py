"""K-fold heads (--folds), 05 --params, and 07's blend, temperature calibration, --clip auto and suspects."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import HEAD, run, script
from sklearn.metrics import log_loss as sk_log_loss

import helper
from helper import CatDogError

FOLDS = 3


def s07():
    return script("07")


# ----------------------------------------------------------------------------- fold assignment

def test_folds_are_stratified_seeded_and_cover_every_row_once():
    labels = np.r_[np.zeros(23), np.ones(17)].astype(int)
    fold = helper.fold_assignment(labels, 4, seed=1)
    assert set(fold) == {0, 1, 2, 3}
    for c in (0, 1):
        counts = np.bincount(fold[labels == c], minlength=4)
        assert counts.max() - counts.min() <= 1  # each class spread evenly
    assert np.array_equal(fold, helper.fold_assignment(labels, 4, seed=1))  # stable for a seed
    assert not np.array_equal(fold, helper.fold_assignment(labels, 4, seed=2))
    extra = np.arange(40) >= 36  # rows of 01 --extra-data are never held out
    assert (helper.fold_assignment(labels, 4, 1, held_out=~extra)[extra] == -1).all()
    with pytest.raises(CatDogError, match="--folds 9 needs at least 9 labelled images of each class"):
        helper.fold_assignment(np.r_[labels[:8], labels[-10:]], 9, 1)


# ----------------------------------------------------------------------------- K-fold heads

@pytest.fixture(scope="module")
def kfold(pipeline, tmp_path_factory):
    """03 --folds 3 on ResNet50 and 05 --folds 3 on ResNet50+InceptionV3, in a model dir of their own."""
    models = tmp_path_factory.mktemp("kfold") / "model"
    d = ["--data-dir", pipeline["data"], "--model-dir", models]
    single = run("03", *d, *HEAD, "--models", "ResNet50", "--folds", FOLDS, "--submissions-dir", models / "subs")
    merged = run("05", *d, *HEAD, "--models", "ResNet50", "InceptionV3", "--folds", FOLDS)
    return {"d": d, "model": models, "data": pipeline["data"], "single": single, "merged": merged}


@pytest.mark.slow
def test_kfold_oof_covers_every_labelled_row_once_and_matches_the_fold_models(kfold):
    folder = kfold["model"] / "single" / f"ResNet50_k{FOLDS}"
    oof = pd.read_csv(folder / "oof.csv")
    split = helper.read_split(kfold["data"])
    assert list(oof.columns) == ["filename", "label", "fold", "prediction"]
    assert sorted(oof.filename) == sorted(split.filename) and oof.filename.is_unique
    assert set(oof.fold) == set(range(1, FOLDS + 1))
    assert (oof.label.to_numpy() == split.set_index("filename").label.reindex(oof.filename).to_numpy()).all()
    feats = helper.load_features(["ResNet50"], kfold["data"])
    position = {f: i for i, f in enumerate(feats.files)}
    tests, fold_losses = [], []
    for k in range(1, FOLDS + 1):
        model, meta = helper.load_model(folder / f"fold{k}.keras")
        assert meta["fold"] == k and meta["folds"] == FOLDS
        held = oof[oof.fold == k]
        rows = [position[f] for f in held.filename]
        np.testing.assert_allclose(model.predict(feats.labelled[0][rows], verbose=0).ravel(), held.prediction,
                                   atol=1e-6)
        tests.append(model.predict(feats.test[0], verbose=0).ravel())
        fold_losses.append(sk_log_loss(held.label, held.prediction, labels=[0, 1]))
    test = pd.read_csv(folder / "test.csv")
    assert np.array_equal(test.id, feats.test_ids)
    np.testing.assert_allclose(test.prediction, np.mean(tests, axis=0), atol=1e-6)  # the fold models' mean
    row = kfold["single"].set_index("model").loc[f"ResNet50_k{FOLDS}"]
    assert row.oof_log_loss == pytest.approx(sk_log_loss(oof.label, oof.prediction), abs=1e-6)
    assert row.oof_std == pytest.approx(np.std(fold_losses), abs=1e-4)
    sub = pd.read_csv(kfold["model"] / "subs" / f"ResNet50_k{FOLDS}.csv")
    np.testing.assert_allclose(sub.label, np.clip(test.prediction, *helper.CLIP), atol=1e-6)


@pytest.mark.slow
def test_07_submits_a_kfold_folder_as_the_mean_of_its_folds(kfold, tmp_path):
    folder = kfold["model"] / "merge" / f"ResNet50+InceptionV3_k{FOLDS}"
    sub = run("07", *kfold["d"], "--model", folder, "--output", tmp_path / "k.csv")
    test = pd.read_csv(folder / "test.csv")
    np.testing.assert_allclose(sub.label, np.clip(test.prediction, *helper.CLIP), atol=1e-9)
    info = json.loads((tmp_path / "k.json").read_text())
    assert info["weights"] == {folder.name: 1.0} and info["temperature"] == 1.0


@pytest.mark.slow
def test_folds_are_the_same_for_every_model(kfold):
    a = pd.read_csv(kfold["model"] / "single" / f"ResNet50_k{FOLDS}" / "oof.csv").set_index("filename").fold
    b = pd.read_csv(kfold["model"] / "merge" / f"ResNet50+InceptionV3_k{FOLDS}" / "oof.csv").set_index("filename").fold
    assert a.reindex(b.index).equals(b)


def test_folds_1_is_refused(capsys):
    for number in ("03", "05"):
        with pytest.raises(SystemExit) as e:
            script(number).parse_args(["--folds", "1"])
        assert e.value.code == 2 and "argument --folds: 1 is not an integer >= 2" in capsys.readouterr().err


# ----------------------------------------------------------------------------- blend, calibrate, clip

def test_blend_weights_reach_a_known_optimum():
    # Model A: 0.9 on dogs, 0.5 on cats; B: 0.5 on dogs, 0.1 on cats. Blend loss is
    # -(log(0.5 + 0.4w) + log(0.9 - 0.4w)) / 2, lowest at w = 0.5.
    y = np.r_[np.ones(50), np.zeros(50)]
    preds = np.column_stack([np.where(y == 1, 0.9, 0.5), np.where(y == 1, 0.5, 0.1)])
    w = helper.fit_blend(preds, y)
    np.testing.assert_allclose(w, [0.5, 0.5], atol=1e-4)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400).astype(float)
    preds = np.column_stack([np.clip(y * 0.7 + rng.uniform(0, 0.3, 400), 0.01, 0.99) for _ in range(3)]
                            + [rng.uniform(size=400)])
    w = helper.fit_blend(preds, y)
    assert (w >= 0).all() and w.sum() == pytest.approx(1)
    best_single = min(sk_log_loss(y, preds[:, i]) for i in range(preds.shape[1]))
    assert sk_log_loss(y, preds @ w) <= best_single + 1e-12
    assert w[3] < 0.05  # the noise model is left out


def test_temperature_softens_overconfidence_and_leaves_calibrated_alone():
    rng = np.random.default_rng(1)
    true_p = rng.uniform(0.02, 0.98, 20000)
    y = (rng.uniform(size=true_p.size) < true_p).astype(float)
    t = helper.fit_temperature(true_p, y)
    assert t == pytest.approx(1, abs=0.05)  # already calibrated
    overconfident = helper.scale_temperature(true_p, 1 / 3)  # logits x3
    t = helper.fit_temperature(overconfident, y)
    assert t == pytest.approx(3, rel=0.05)
    assert sk_log_loss(y, helper.scale_temperature(overconfident, t)) < sk_log_loss(y, overconfident) - 0.05


def test_clip_auto_picks_the_known_best_bound_within_its_limits():
    # Confident predictions wrong on a share f of rows: the log loss of clipping at c is
    # -(1 - f) log(1 - c) - f log(c), lowest at c = f.
    def case(f, n=1000):
        y = np.ones(n)
        y[: int(f * n)] = 0
        return np.full(n, 0.9999), y
    assert helper.auto_clip(*case(0.02)) == pytest.approx(0.02)
    assert helper.auto_clip(*case(0.2)) == pytest.approx(0.05)  # never above 0.05
    assert helper.auto_clip(*case(0.0)) == pytest.approx(0.001)  # never below 0.001


def test_cross_fitted_rows_never_see_their_own_labels():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300).astype(float)
    preds = np.column_stack([np.clip(y * 0.6 + rng.uniform(0, 0.4, 300), 0.001, 0.999), rng.uniform(size=300)])
    folds = helper.fold_assignment(y, 5, 0)

    def fit(p, labels):
        return helper.fit_recipe(p, labels, calibrate=True, clip=None)

    before = helper.cross_fit(preds, y, folds, fit)
    flipped = y.copy()
    flipped[folds == 0] = 1 - flipped[folds == 0]  # the labels of fold 0 change...
    after = helper.cross_fit(preds, flipped, folds, fit)
    for stage in before:  # ... and fold 0's predictions do not, while the other folds' do
        np.testing.assert_array_equal(before[stage][folds == 0], after[stage][folds == 0])
        assert not np.allclose(before[stage][folds != 0], after[stage][folds != 0])


@pytest.mark.slow
def test_blend_of_kfold_models_is_fitted_and_judged_on_oof_rows(kfold, tmp_path):
    out = tmp_path / "blend.csv"
    sub = run("07", *kfold["d"], "--output", out, "--blend", "auto", "--calibrate", "temperature", "--clip", "auto",
              "--analyze")
    info = json.loads(out.with_suffix(".json").read_text())
    assert set(info) >= {"models", "weights", "temperature", "clip", "oof_log_loss"}
    names = [f"ResNet50_k{FOLDS}", f"ResNet50+InceptionV3_k{FOLDS}"]
    assert sorted(info["weights"]) == sorted(names) and info["judged_on"] == "out-of-fold"
    w = np.array([info["weights"][n] for n in names])
    assert (w >= 0).all() and w.sum() == pytest.approx(1)
    assert 0.001 <= info["clip"][0] <= 0.05 and info["clip"][1] == pytest.approx(1 - info["clip"][0])
    # Recompute from the stored out-of-fold and test predictions.
    oofs = [pd.read_csv(kfold["model"] / s / n / "oof.csv").set_index("filename")
            for s, n in (("single", names[0]), ("merge", names[1]))]
    rows = oofs[0].index
    assert info["rows"] == len(rows) == len(helper.read_split(kfold["data"]))
    preds = np.column_stack([o.prediction.reindex(rows) for o in oofs])
    y = oofs[0].label.to_numpy(float)
    recipe = helper.fit_recipe(preds, y, calibrate=True, clip=None)
    np.testing.assert_allclose(recipe.weights, w, atol=1e-6)
    assert recipe.temperature == pytest.approx(info["temperature"])
    tests = [pd.read_csv(kfold["model"] / s / n / "test.csv").prediction
             for s, n in (("single", names[0]), ("merge", names[1]))]
    expected = np.clip(helper.scale_temperature(np.column_stack(tests) @ w, info["temperature"]), *info["clip"])
    np.testing.assert_allclose(sub.label, expected, atol=1e-6)
    folds = helper.fold_assignment(y, 5, helper.DEFAULT_SEED)
    crossed = helper.cross_fit(preds, y, folds, lambda p, t: helper.fit_recipe(p, t, True, None))
    assert info["oof_log_loss"] == pytest.approx(sk_log_loss(y, crossed["clipped"]), abs=1e-9)
    table = pd.read_csv(kfold["model"] / "blend" / "results.csv")
    assert sorted(table.model[:2]) == sorted(names) and table.model.iloc[2] == "blend"
    assert table.fitted_log_loss.iloc[2] <= table.log_loss[:2].min() + 1e-9  # the blend fits at least as well
    suspects = helper.read_name_list(kfold["model"] / "analysis" / "suspects.txt")
    assert suspects and set(suspects) <= set(rows)  # 01 --exclude reads it; only judged rows


def test_calibrate_a_single_model_on_its_valid_rows(pipeline, tmp_path):
    out = tmp_path / "s.csv"
    model = pipeline["model"] / "merge" / "ResNet50+InceptionV3.keras"
    run("07", "--data-dir", pipeline["data"], "--model-dir", pipeline["model"], "--model", model, "--output", out,
        "--calibrate", "temperature")
    info = json.loads(out.with_suffix(".json").read_text())
    split = helper.read_split(pipeline["data"])
    assert info["judged_on"] == "valid" and info["rows"] == int((split.subset == "valid").sum())
    assert info["weights"] == {"ResNet50+InceptionV3": 1.0} and info["clip"] == list(helper.CLIP)


@pytest.mark.slow
def test_blend_bad_input(kfold, tmp_path, capsys):
    d = kfold["d"]
    with pytest.raises(CatDogError, match=r"--blend NoSuchModel: no such model.*found: .*ResNet50_k3"):
        run("07", *d, "--output", tmp_path / "s.csv", "--blend", "NoSuchModel")
    with pytest.raises(SystemExit) as e:
        s07().parse_args(["--blend", "auto", "--model", "x.keras"])
    assert e.value.code == 2 and "--model and --blend exclude each other" in capsys.readouterr().err
    # A K-fold model of another split ...
    other = tmp_path / "model"
    shutil.copytree(kfold["model"] / "single", other / "single")
    summary = other / "single" / f"ResNet50_k{FOLDS}" / "kfold.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "split_sha256": "0" * 64}))
    with pytest.raises(CatDogError, match="was trained on another split"):
        run("07", "--data-dir", kfold["data"], "--model-dir", other, "--output", tmp_path / "s.csv", "--blend", "auto")
    # A single-split model of another split, and one fold's model (its training rows hold most valid rows).
    meta_path = other / "single" / "ResNet50.json"
    shutil.copy(kfold["model"] / "single" / f"ResNet50_k{FOLDS}" / "fold1.keras", other / "single" / "ResNet50.keras")
    meta = json.loads((kfold["model"] / "single" / f"ResNet50_k{FOLDS}" / "fold1.json").read_text())
    meta_path.write_text(json.dumps({**meta, "fold": None, "split_sha256": "1" * 64}))
    with pytest.raises(CatDogError, match=r"ResNet50.keras was trained on another split"):
        run("07", "--data-dir", kfold["data"], "--model-dir", other, "--output", tmp_path / "s.csv", "--blend",
            "ResNet50")
    fold = kfold["model"] / "single" / f"ResNet50_k{FOLDS}" / "fold1.keras"
    for extra in (["--analyze"], ["--calibrate", "temperature"]):
        with pytest.raises(CatDogError, match=r"fold1.keras is fold 1 of a K-fold run.*give its folder"):
            run("07", *d, "--model", fold, "--output", tmp_path / "s.csv", *extra)
    # ... and K-fold models holding out other rows.
    shutil.copytree(kfold["model"] / "merge", other / "merge")
    summary.write_text(json.dumps({**json.loads(summary.read_text()),
                                   "split_sha256": helper.split_fingerprint(kfold["data"])}))
    oof = other / "single" / f"ResNet50_k{FOLDS}" / "oof.csv"
    pd.read_csv(oof).iloc[1:].to_csv(oof, index=False)
    with pytest.raises(CatDogError, match="were trained on different rows"):
        run("07", "--data-dir", kfold["data"], "--model-dir", other, "--output", tmp_path / "s.csv", "--blend", "auto")
    summary.write_text("{")  # a broken K-fold folder
    with pytest.raises(CatDogError, match=r"ResNet50_k3 is not a complete K-fold run \(JSONDecodeError"):
        run("07", "--data-dir", kfold["data"], "--model-dir", other, "--output", tmp_path / "s.csv", "--blend", "auto")


# ----------------------------------------------------------------------------- 05 --params

def test_05_trains_with_06s_best_parameters(pipeline, tmp_path):
    best = {"kind": "hyperopt", "features": ["ResNet50", "Xception"], "lr": 0.004, "decay": 0.01, "momentum": 0.8,
            "dropout": 0.2, "epochs": 9, "best_epoch": 3, "trial": 4, "val_loss": 0.1, "args": {"batch_size": 16}}
    path = tmp_path / "best.json"
    path.write_text(json.dumps(best))
    models = tmp_path / "model"
    run("05", "--data-dir", pipeline["data"], "--model-dir", models, "--params", path, "--folds", 2)
    meta = helper.read_sidecar(models / "merge" / "ResNet50+Xception_k2" / "fold1.keras")
    args = meta["args"]
    assert (args["optimizer"], args["lr"], args["decay"], args["momentum"], args["dropout"]) == ("sgd", 0.004, 0.01,
                                                                                                  0.8, 0.2)
    assert args["epochs"] == 3 and args["batch_size"] == 16
    history = pd.read_csv(models / "merge" / "ResNet50+Xception_k2" / "fold1.history.csv")
    assert len(history) == 3
    path.write_text(json.dumps({**best, "args": {"batch_size": 16, "views": 3}}))  # 06 searched on 3 views
    with pytest.raises(CatDogError, match=r"holds no augmented views and 3 are needed"):
        run("05", "--data-dir", pipeline["data"], "--model-dir", models, "--params", path)
    path.write_text(json.dumps({"kind": "merge"}))
    with pytest.raises(CatDogError, match="not a best.json of 06_hyperopt_merge.py"):
        run("05", "--data-dir", pipeline["data"], "--model-dir", models, "--params", path)
    path.write_text("{")
    with pytest.raises(CatDogError, match="not a readable JSON file"):
        run("05", "--data-dir", pipeline["data"], "--model-dir", models, "--params", path)


# ----------------------------------------------------------------------------- suspects -> 01 --exclude

def test_a_suspects_file_naming_unknown_images_gets_a_clear_message(tmp_path, caplog):
    caplog.set_level("WARNING", logger="catdog")
    run("01", "--data-dir", tmp_path / "data", "--demo", 6)
    suspects = tmp_path / "suspects.txt"
    suspects.write_text("# header\ncat.1.jpg  # cat, P(dog) 0.9\ncat.999.jpg  # not there\n")
    out = run("01", "--data-dir", tmp_path / "data", "--exclude", suspects)
    assert out["excluded"] == {"cat.1.jpg"}
    assert f"--exclude {suspects}: cat.999.jpg is not among the usable training images" in caplog.text
