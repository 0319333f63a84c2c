"""09_distill_student.py and 08's export of its students (issue #22): the registry's students, honest soft targets
from a K-fold teacher (by construction), valid rows never in training, the distillation loss, KL to the teacher
falling over the run, every export format agreeing with the student, the int8 model's uint8 input and builtin ops,
predict.py on each format, and clear messages for bad teachers and flags before any training."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import HEAD, run, script

import helper
from helper import CatDogError

SIZE = 32  # the students' smallest size: Keras's floor
FACTS = {"MobileNetV3Large": 960, "MobileNetV3Small": 576, "EfficientNetV2B0": 1280}  # keras/src/applications/


@pytest.fixture(scope="module")
def teacher(pipeline, tmp_path_factory):
    """A 3-fold ResNet50 head on the session pipeline's features: the teacher (in a model dir of its own)."""
    model_dir = tmp_path_factory.mktemp("student_models")
    run("03", "--data-dir", pipeline["data"], "--model-dir", model_dir, *HEAD, "--models", "ResNet50", "--folds", 3,
        "--no-predict", "--epochs", 5)
    return {"d": ["--data-dir", pipeline["data"], "--model-dir", model_dir], "model_dir": model_dir,
            "folder": model_dir / helper.SINGLE_DIR / "ResNet50_k3", "data": pipeline["data"]}


@pytest.mark.slow
def test_students_in_the_registry_build_at_their_smallest_size_and_scale_their_own_input():
    import keras
    pixels = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    for name, width in FACTS.items():
        bb = helper.BACKBONES[name]
        assert (bb.size, bb.min_size, bb.width) == (224, SIZE, width) and name in helper.STUDENTS
        assert bb.weights_url.endswith("/" + bb.weights_file)
        np.testing.assert_array_equal(bb.preprocess(pixels), pixels)  # 0-255 in: the network rescales itself
        helper.set_seed(1)
        net = bb.build("none", SIZE)
        assert tuple(net.output.shape) == (None, width)
        assert any(isinstance(layer, keras.layers.Rescaling) for layer in net.layers[:3])
        keras.backend.clear_session()
    assert helper.STUDENTS[0] == script("09").parse_args(["--teacher", "t"]).student == "MobileNetV3Large"


def test_the_loss_mixes_hard_and_soft_targets_and_uses_the_one_a_row_has():
    loss = script("09").distillation_loss(0.7, 3.0)
    p = np.array([[0.8], [0.3], [0.6], [0.9]], np.float32)
    y = np.array([[1, 0.6], [0, 0.2], [1, -1], [-1, 0.7]], np.float32)  # both, both, hard only, soft only
    got = np.asarray(loss(y, p))

    def bce(t, q):
        return -(t * np.log(q) + (1 - t) * np.log(1 - q))
    q = 1 / (1 + np.exp(-np.log(p[:, 0] / (1 - p[:, 0])) / 3.0))
    expected = [0.3 * bce(1, .8) + 0.7 * 9 * bce(.6, q[0]), 0.3 * bce(0, .3) + 0.7 * 9 * bce(.2, q[1]),
                bce(1, .6), 9 * bce(.7, q[3])]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    hard_only = np.asarray(script("09").distillation_loss(0.0, 3.0)(y[:3], p[:3]))
    np.testing.assert_allclose(hard_only, [bce(1, .8), bce(0, .3), bce(1, .6)], rtol=1e-5)


@pytest.mark.slow
def test_distil_export_and_predict_end_to_end(teacher, tmp_path, monkeypatch, capsys):
    folder, data = teacher["folder"], teacher["data"]
    split = helper.read_split(data)
    oof = pd.read_csv(folder / helper.OOF_CSV)
    # Honest targets by construction: each row's out-of-fold prediction is that of the fold model that did not
    # train on it (its fold, drawn as 03 draws them, is the one held out from that model).
    fold = helper.fold_assignment(split.label.to_numpy(), 3, helper.DEFAULT_SEED, None,
                                  helper.fold_groups(data))  # duplicates in one fold, as 03 deals them
    np.testing.assert_array_equal(oof.set_index("filename").fold.reindex(split.filename).to_numpy(), fold + 1)
    feats = helper.load_features(["ResNet50"], data, parts=("labelled",))
    for k in (1, 2, 3):
        model, meta = helper.load_model(folder / f"fold{k}.keras")
        held = (fold + 1) == k
        np.testing.assert_allclose(feats.predict(model, "labelled")[held],
                                   oof.set_index("filename").prediction.reindex(split.filename[held]), atol=1e-5)

    seen = {}
    real = helper.image_data

    def spy(train_paths, train_targets, valid_paths, valid_targets, *rest):
        seen.update(train=list(train_paths), targets=np.asarray(train_targets), valid=list(valid_paths),
                    valid_targets=np.asarray(valid_targets))
        return real(train_paths, train_targets, valid_paths, valid_targets, *rest)
    monkeypatch.setattr(helper, "image_data", spy)
    argv = [*teacher["d"], "--teacher", folder, "--student", "MobileNetV3Small", "--weights", "none", "--image-size",
            SIZE, "--epochs", 3, "--batch-size", 16, "--pseudo", "--lr", 0.05]
    table = run("09", *argv)
    row = table.set_index("model").loc["MobileNetV3Small_pseudo"]
    # Valid rows never train; train rows carry [label, teacher_T of their out-of-fold prediction]; test rows
    # (--pseudo) the teacher's test prediction only; valid rows their label only.
    names = [p.rsplit("/", 1)[-1] for p in seen["train"]]
    valid_names = set(split.filename[split.subset == "valid"])
    assert not valid_names & set(names) and len(seen["valid"]) == len(valid_names)
    n_train = int((split.subset == "train").sum())
    train_files = split.filename[split.subset == "train"].to_numpy()
    soft = script("09").tempered(oof.set_index("filename").prediction.reindex(train_files).to_numpy(), 3.0)
    np.testing.assert_allclose(seen["targets"][:n_train, 1], soft, rtol=1e-6)
    np.testing.assert_array_equal(seen["targets"][:n_train, 0], split.label[split.subset == "train"])
    test_pred = pd.read_csv(folder / helper.TEST_CSV).prediction.to_numpy()
    np.testing.assert_allclose(seen["targets"][n_train:, 1], script("09").tempered(test_pred, 3.0), rtol=1e-6)
    assert (seen["targets"][n_train:, 0] == -1).all() and (seen["valid_targets"][:, 1] == -1).all()
    # The results row: the student's and the teacher's val_loss on the same valid rows, agreement, KL falling.
    valid = split.subset == "valid"
    expected_teacher = helper.log_loss(split.label[valid], oof.set_index("filename").prediction.reindex(
        split.filename[valid]))
    assert row.teacher_val_loss == pytest.approx(expected_teacher)
    assert row.kl_train_end < row.kl_train_start, row
    assert 0 <= row.agreement <= 1 and np.isfinite(row.val_loss)
    path = teacher["model_dir"] / helper.STUDENT_DIR / "MobileNetV3Small_pseudo.keras"
    student, meta = helper.load_model(path)  # plain loss: loads without custom objects
    assert meta["kind"] == helper.STUDENT_DIR and meta["teacher"]["source"] == str(folder.resolve())
    assert set(meta["args"]) == set(vars(script("09").parse_args([str(a) for a in argv])))
    assert meta["args"]["alpha"] == 0.7 and meta["args"]["temperature"] == 3.0
    frozen = [la for la in helper.all_layers(student) if type(la).__name__ == "BatchNormalization"]
    assert frozen and not any(la.trainable for la in frozen)
    assert list((teacher["model_dir"] / helper.LOGS_DIR / helper.STUDENT_DIR / "MobileNetV3Small_pseudo").rglob(
        "events.out.tfevents*"))
    # 07 submits it like any model.
    sub = run("07", *teacher["d"], "--model", path, "--output", tmp_path / "sub.csv")
    np.testing.assert_allclose(sub.sort_values("id").label, np.clip(helper.predict_images(
        student, helper.test_images(data)[1], meta), 0.005, 0.995), atol=1e-6)

    out = tmp_path / "export"
    info = run("08", *teacher["d"], "--model", path, "--out-dir", out, "--calibration-images", 8, "--check", 4)
    saved = json.loads((out / helper.EXPORT_INFO).read_text())
    assert saved["teacher"] == meta["teacher"] and saved["input_size"] == SIZE and info["kind"] == "student"
    diffs = saved["max_diff_vs_student"]
    assert set(diffs) == {helper.EXPORT_KERAS, helper.EXPORT_SAVED_MODEL, helper.EXPORT_TFLITE,
                          helper.EXPORT_TFLITE_INT8}
    assert diffs[helper.EXPORT_KERAS] < 1e-5 and diffs[helper.EXPORT_SAVED_MODEL] < 1e-5
    assert diffs[helper.EXPORT_TFLITE] < 0.02 and diffs[helper.EXPORT_TFLITE_INT8] < 0.1
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=str(out / helper.EXPORT_TFLITE_INT8))
    it.allocate_tensors()
    assert it.get_input_details()[0]["dtype"] == np.uint8
    assert tuple(it.get_input_details()[0]["shape"][1:]) == (SIZE, SIZE, 3)
    ops = {op["op_name"] for op in it._get_ops_details()}
    assert "CONV_2D" in ops and not any(o.startswith("Flex") or o == "CUSTOM" for o in ops), ops
    int8 = [t for t in it.get_tensor_details() if t["dtype"] == np.int8]
    assert len(int8) > len(it.get_tensor_details()) / 2  # weights and activations, not weights only
    # predict.py runs every format, and they agree with each other.
    photos = helper.test_images(data)[1][:2]  # two: predict.py's per-photo loop, not only its first call
    capsys.readouterr()
    got = {}
    for f in (helper.EXPORT_KERAS, helper.EXPORT_SAVED_MODEL, helper.EXPORT_TFLITE, helper.EXPORT_TFLITE_INT8):
        assert predict_main(["--model", str(out / f), "--json", *photos]) == 0
        got[f] = [json.loads(line)["p_dog"] for line in capsys.readouterr().out.splitlines()]
    for f, p in got.items():
        np.testing.assert_allclose(p, got[helper.EXPORT_KERAS], atol=0.1 if "int8" in f else 0.02, err_msg=f)


def predict_main(argv) -> int:
    import importlib.util

    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("predict_script", ROOT / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(module.parse_args(argv))


def test_bad_teachers_and_flags_are_refused_before_training(teacher, tmp_path, capsys, monkeypatch):
    def refuse(*argv):
        monkeypatch.setattr(helper, "classifier", lambda *a, **k: pytest.fail("built a student"))
        return run("09", *teacher["d"], "--weights", "none", "--image-size", SIZE, *argv)

    with pytest.raises(SystemExit):
        script("09").parse_args(["--teacher", "t", "--alpha", "1.5"])
    err = capsys.readouterr().err
    assert "argument --alpha: 1.5 is not a number >= 0 and <= 1" in err
    with pytest.raises(SystemExit):
        script("09").parse_args(["--teacher", "t", "--alpha", "-0.1"])
    assert ">= 0" in capsys.readouterr().err
    # A teacher of another split.
    other = tmp_path / "other_k3"
    shutil.copytree(teacher["folder"], other)
    summary = json.loads((other / helper.KFOLD_SUMMARY).read_text())
    (other / helper.KFOLD_SUMMARY).write_text(json.dumps({**summary, "split_sha256": "0" * 64}))
    with pytest.raises(CatDogError, match="--teacher: .*other_k3 was trained on another split"):
        refuse("--teacher", other)
    # A K-fold folder without its out-of-fold predictions.
    missing = tmp_path / "missing_k3"
    shutil.copytree(teacher["folder"], missing)
    (missing / helper.OOF_CSV).unlink()
    with pytest.raises(CatDogError, match="missing_k3 is not a complete K-fold run.*oof.csv"):
        refuse("--teacher", missing)
    # A single-split model, one fold's model, a blend of single-split models, a blend naming a foreign folder.
    single = tmp_path / "single.keras"
    shutil.copy(teacher["folder"] / "fold1.keras", single)
    meta = json.loads((teacher["folder"] / "fold1.json").read_text())
    (tmp_path / "single.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "fold"}))
    with pytest.raises(CatDogError, match="no honest prediction for the rows the student trains on: use a K-fold"):
        refuse("--teacher", single)
    with pytest.raises(CatDogError, match="fold 1 of a K-fold run: give its folder"):
        refuse("--teacher", teacher["folder"] / "fold1.keras")
    recipe = {"models": [str(teacher["folder"])], "weights": {"ResNet50_k3": 1.0}, "temperature": 1.0,
              "clip": [0.005, 0.995], "judged_on": "valid"}
    (tmp_path / "blend.json").write_text(json.dumps(recipe))
    with pytest.raises(CatDogError, match="judged on split.csv's valid rows.*blend K-fold models"):
        refuse("--teacher", tmp_path / "blend.json")
    (tmp_path / "blend.json").write_text(json.dumps({**recipe, "judged_on": "out-of-fold", "models": [str(other)]}))
    with pytest.raises(CatDogError, match="outside --model-dir"):
        refuse("--teacher", tmp_path / "blend.json")
    with pytest.raises(CatDogError, match="not found, or not a K-fold folder"):
        refuse("--teacher", tmp_path / "nope")
    # 07's recipe of K-fold models: their out-of-fold predictions, weighted and tempered as 07 submits them.
    (tmp_path / "blend.json").write_text(json.dumps({**recipe, "judged_on": "out-of-fold", "temperature": 2.0}))
    test_ids = helper.laid_out_test_ids(teacher["data"])
    got = script("09").load_teacher(str(tmp_path / "blend.json"), teacher["model_dir"],
                                    helper.split_fingerprint(teacher["data"]), test_ids)
    oof = pd.read_csv(teacher["folder"] / helper.OOF_CSV).set_index("filename").prediction
    assert got.kind == "blend"
    np.testing.assert_allclose(got.oof.reindex(oof.index), script("09").tempered(oof.to_numpy(), 2.0))
