"""Augmented feature views (02 --views), heads trained on them (--views) and test-time augmentation (07 --tta)."""

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import HEAD, IMAGE_SIZE, run, script
from PIL import Image

import helper
from helper import CatDogError

VIEWS = 3


@pytest.fixture(scope="module")
def viewed(tmp_path_factory):
    """A small demo with ResNet50 and Xception features of 3 views each (float32 views: exact comparisons)."""
    root = tmp_path_factory.mktemp("views")
    d = ["--data-dir", root / "data", "--model-dir", root / "model"]
    run("01", *d, "--demo", 8)
    run("02", *d, "--weights", "none", "--image-size", IMAGE_SIZE, "--models", "ResNet50", "Xception",
        "--views", VIEWS, "--views-dtype", "float32")
    return {"root": root, "data": root / "data", "model": root / "model", "d": d}


def read(path, *keys):
    with h5py.File(path, "r") as f:
        return [f[k][:] for k in keys]


def direct_features(backbone: str, pixels: np.ndarray) -> np.ndarray:
    """Features of ready-resized pixels through the backbone 02 built (the same seed: the same random weights)."""
    bb = helper.get_backbone(backbone)
    helper.set_seed(helper.DEFAULT_SEED)
    model = bb.build("none", int(IMAGE_SIZE))
    return helper.make_extract_step(model, bb.preprocess)(pixels.astype(np.float32)).numpy()


@pytest.mark.slow
def test_views_are_written_beside_the_plain_rows(viewed):
    for name, width in (("ResNet50", 2048), ("Xception", 2048)):
        path = helper.feature_path(viewed["data"], name)
        train, test, tv, sv, tp = read(path, "labelled", "test", "labelled_views", "test_views", "labelled_view_params")
        assert tv.shape == (VIEWS, len(train), width) and sv.shape == (VIEWS, len(test), width)
        assert tp.shape == (VIEWS, len(train), len(helper.VIEW_PARAMS))
        assert np.array_equal(tv[0], train) and np.array_equal(sv[0], test)  # view 0 is the plain image
        assert not np.allclose(tv[1], tv[0]) and not np.allclose(tv[2], tv[1])
        assert helper.feature_file_state(path)["views"] == VIEWS


@pytest.mark.slow
def test_view_1_is_the_mirror_image(viewed):
    split = helper.read_split(viewed["data"])
    tv, = read(helper.feature_path(viewed["data"], "ResNet50"), "labelled_views")
    paths = helper.train_image_paths(viewed["data"], split)[:4]
    size = int(IMAGE_SIZE)
    mirrored = np.stack([np.asarray(Image.open(p).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                                    .resize((size, size), Image.Resampling.BILINEAR), np.float32) for p in paths])
    np.testing.assert_allclose(direct_features("ResNet50", mirrored), tv[1, :4], atol=1e-4)


@pytest.mark.slow
def test_a_view_is_the_same_transformation_for_every_backbone(viewed):
    params = [read(helper.feature_path(viewed["data"], n), "labelled_view_params", "test_view_params")
              for n in ("ResNet50", "Xception")]
    for a, b in zip(*params, strict=True):
        assert np.array_equal(a, b)
    train_params = params[0][0]
    assert (train_params[1, :, 0] == 1).all() and (train_params[1, :, 1:] == [0, 1, 0, 0, 1]).all()  # mirror only
    angle, zoom, brightness = train_params[2, :, 1], train_params[2, :, 2], train_params[2, :, 5]
    assert (np.abs(angle) <= 20).all() and ((zoom >= 0.8) & (zoom <= 1)).all() and np.ptp(angle) > 0
    assert ((brightness >= 0.8) & (brightness <= 1.2)).all()
    # Recompute one image's view 2 from its stored transformation, through Xception: the file's row.
    split = helper.read_split(viewed["data"])
    path = helper.train_image_paths(viewed["data"], split)[3]
    pixels = helper.load_resized(path, int(IMAGE_SIZE), params=train_params[2, 3]).numpy()[None]
    tv, = read(helper.feature_path(viewed["data"], "Xception"), "labelled_views")
    np.testing.assert_allclose(direct_features("Xception", pixels)[0], tv[2, 3], atol=1e-4)
    # ... and the transformation depends on (seed, image, view) only.
    again = helper.view_params(helper.DEFAULT_SEED, [f"train/{n}" for n in split.filename], 2)
    assert np.array_equal(again, train_params[2])


@pytest.mark.slow
def test_views_are_part_of_the_file_settings(viewed, caplog):
    d = viewed["d"]
    common = ["--weights", "none", "--image-size", IMAGE_SIZE, "--models", "ResNet50", "--views-dtype", "float32"]
    assert run("02", *d, *common, "--views", VIEWS).empty  # same settings: reused
    path = helper.feature_path(viewed["data"], "ResNet50")
    settings = helper.ExtractSettings("ResNet50", int(IMAGE_SIZE), weights="none", views=2, views_dtype="float32")
    split, ids = helper.read_split(viewed["data"]), helper.laid_out_test_ids(viewed["data"])
    assert "views=3, now 2" in helper.stale_reason(path, settings, split, ids)


@pytest.mark.slow
def test_views_of_another_seed_are_refused_together(viewed, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(viewed["data"] / "features", data / "features")
    for name in (helper.SPLIT_CSV, helper.SPLIT_META):
        shutil.copy(viewed["data"] / name, data / name)
    with h5py.File(helper.feature_path(data, "Xception"), "r+") as f:  # as if extracted with another --seed
        names = f["labelled_files"][:].astype(str)
        f["labelled_view_params"][2] = helper.view_params(7, [f"train/{n}" for n in names], 2)
    with pytest.raises(CatDogError, match=r"Xception.h5's views are other transformations than .*ResNet50.h5's"):
        helper.check_views(["ResNet50", "Xception"], data, None)  # 07 --tta: every view is compared
    assert helper.check_views(["ResNet50", "Xception"], data, 2) == 2  # views 0 and 1 do not depend on the seed


@pytest.mark.slow
def test_float16_views_are_the_plain_rows_rounded(tmp_path):
    d = ["--data-dir", tmp_path / "data", "--model-dir", tmp_path / "model"]
    run("01", *d, "--demo", 3)
    run("02", *d, "--weights", "none", "--image-size", "32", "--models", "ResNet50", "--views", 2)
    train, tv = read(helper.feature_path(tmp_path / "data", "ResNet50"), "labelled", "labelled_views")
    assert tv.dtype == np.float16 and np.array_equal(tv[0], train.astype(np.float16))


@pytest.mark.slow
def test_heads_train_on_views_and_validate_on_plain_rows(viewed):
    d = viewed["d"]
    single = run("03", *d, *HEAD, "--models", "ResNet50", "--views", VIEWS, "--no-predict")
    merged = run("05", *d, *HEAD, "--models", "ResNet50", "Xception", "--views", VIEWS)
    for step, name in (("single", "ResNet50"), ("merge", "ResNet50+Xception")):
        model = helper.load_keras(viewed["model"] / step / f"{name}.keras")
        feats = helper.load_features(name.split("+"), viewed["data"])
        xva, yva = feats.subset("valid")
        loss = model.evaluate(helper.model_inputs(xva), yva, verbose=0, return_dict=True)["loss"]
        row = (single if step == "single" else merged).set_index("model").loc[name]
        assert row.val_loss == pytest.approx(loss, abs=1e-5)  # validated on the plain rows
        assert helper.read_sidecar(viewed["model"] / step / f"{name}.keras")["args"]["views"] == VIEWS


@pytest.mark.slow
def test_06_searches_on_views(viewed):
    common = ["--max-evals", 2, "--epochs", 3, "--batch-size", 16, "--models", "ResNet50", "Xception"]
    plain = run("06", "--data-dir", viewed["data"], "--model-dir", viewed["root"] / "h1", *common)
    views = run("06", "--data-dir", viewed["data"], "--model-dir", viewed["root"] / "h3", *common, "--views", VIEWS)
    assert plain[["lr", "decay", "momentum", "dropout"]].equals(views[["lr", "decay", "momentum", "dropout"]])
    assert not np.allclose(plain.val_loss, views.val_loss)  # the same settings, trained on other rows
    import json
    assert json.loads((viewed["root"] / "h3" / "hyperopt" / "search.json").read_text())["views"] == VIEWS
    assert "views" not in json.loads((viewed["root"] / "h1" / "hyperopt" / "search.json").read_text())


def test_view_sampler_draws_one_view_per_row_the_same_in_every_backbone():
    rng = np.random.default_rng(0)
    views = [rng.normal(size=(4, 50, 3)).astype(np.float16), rng.normal(size=(4, 50, 5)).astype(np.float16)]
    rows = np.arange(3, 50, 2)
    sample = helper.view_sampler(views, rows, seed=7)
    epochs = [sample(e) for e in range(3)]
    for xs in epochs:
        picked = [np.flatnonzero([np.array_equal(x[i], v[k, r].astype(np.float32)) for k in range(4)])
                  for x, v in zip(xs, views, strict=True) for i, r in enumerate(rows)]
        assert all(len(p) == 1 for p in picked)  # each row is exactly one of its views
        half = len(rows)
        assert [p[0] for p in picked[:half]] == [p[0] for p in picked[half:]]  # the same view in both inputs
    assert not np.array_equal(epochs[0][0], epochs[1][0])  # a new draw each epoch
    assert all(np.array_equal(a, b) for a, b in zip(helper.view_sampler(views, rows, seed=7)(1), epochs[1],
                                                     strict=True))  # seeded


@pytest.mark.slow
def test_tta_submission_is_the_clipped_mean_of_the_views(viewed, tmp_path):
    d = viewed["d"]
    model_path = viewed["model"] / "merge" / "ResNet50+Xception.keras"
    if not model_path.is_file():
        run("05", *d, *HEAD, "--models", "ResNet50", "Xception", "--views", VIEWS)
    model = helper.load_keras(model_path)
    sv = [read(helper.feature_path(viewed["data"], n), "test_views")[0] for n in ("ResNet50", "Xception")]
    per_view = np.stack([model.predict([x[v] for x in sv], verbose=0).ravel() for v in range(VIEWS)])
    for how, expected in (("prob", per_view.mean(axis=0)),
                          ("logit", 1 / (1 + np.exp(-np.log(per_view / (1 - per_view)).mean(axis=0))))):
        out = tmp_path / f"{how}.csv"
        run("07", *d, "--model", model_path, "--output", out, "--tta", "--tta-mean", how)
        sub = pd.read_csv(out)
        np.testing.assert_allclose(sub.label, np.clip(expected, *helper.CLIP), atol=1e-6)
    plain = tmp_path / "plain.csv"
    run("07", *d, "--model", model_path, "--output", plain)
    assert not np.allclose(pd.read_csv(plain).label, sub.label)


@pytest.mark.slow
def test_tta_analysis_prints_both_losses(viewed, tmp_path, caplog):
    d = viewed["d"]
    caplog.set_level("INFO", logger="catdog")
    model_path = viewed["model"] / "merge" / "ResNet50+Xception.keras"
    if not model_path.is_file():
        run("05", *d, *HEAD, "--models", "ResNet50", "Xception", "--views", VIEWS)
    run("07", *d, "--model", model_path, "--output", tmp_path / "s.csv", "--tta", "--analyze")
    assert "val log loss without TTA" in caplog.text and "val log loss with TTA" in caplog.text


def test_views_bad_input(pipeline, tmp_path, capsys):
    d = ["--data-dir", pipeline["data"], "--model-dir", tmp_path / "model"]
    for number in ("02", "03"):
        with pytest.raises(SystemExit) as e:
            script(number).parse_args(["--views", "0"])
        assert e.value.code == 2 and "argument --views: 0 is not an integer >= 1" in capsys.readouterr().err
    with pytest.raises(CatDogError, match=r"ResNet50\.h5 holds no augmented views.*--views 3"):
        run("03", *d, *HEAD, "--models", "ResNet50", "--views", 3)
    with pytest.raises(CatDogError, match=r"holds no augmented views"):
        run("06", *d, "--models", "ResNet50", "Xception", "--views", 2, "--max-evals", 1)
    with pytest.raises(CatDogError, match=r"holds no augmented views.*02_extract_features.py"):
        run("07", "--data-dir", pipeline["data"], "--model-dir", pipeline["model"], "--output", tmp_path / "s.csv",
            "--tta")
    with pytest.raises(CatDogError, match="--decoder pil"):
        run("02", *d, "--weights", "none", "--models", "ResNet50", "--views", 2, "--decoder", "tf")
