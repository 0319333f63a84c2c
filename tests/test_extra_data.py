"""01 --extra-data: the Oxford-IIIT Pet images join the training rows only, beside Kaggle's split."""

import json
import logging
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import derived_files, jpeg_bytes, run, script, tree_digest

import catdog.checks
import catdog.demo
import helper
from helper import CatDogError

step01 = script("01")

# Oxford-style names -> label (cats capitalised, dogs lower-case); beagle_4.jpg holds PNG content.
PETS = {"Abyssinian_1.jpg": 0, "Abyssinian_2.jpg": 0, "Egyptian_Mau_3.jpg": 0, "yorkshire_terrier_5.jpg": 1,
        "american_pit_bull_terrier_10.jpg": 1, "beagle_4.jpg": 1}
CORRUPT_PET = "Bengal_7.jpg"


def make_pets(root):
    """An Oxford-IIIT Pet-like dataset: root/images/ with PETS, one truncated JPEG and one .mat file."""
    import io
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, label in PETS.items():
        buf = io.BytesIO()
        catdog.demo.demo_image(rng, label, 80, 60).save(buf, "PNG" if name == "beagle_4.jpg" else "JPEG")
        (images / name).write_bytes(buf.getvalue())
    whole = (images / "Abyssinian_1.jpg").read_bytes()
    (images / CORRUPT_PET).write_bytes(whole[: len(whole) // 2])
    (images / "Abyssinian_100.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\x00" * 100)
    (root / "annotations").mkdir()
    return images


@pytest.mark.parametrize("name, expected", [
    ("Abyssinian_1.jpg", (0, "Abyssinian", 1)), ("yorkshire_terrier_5.jpg", (1, "yorkshire_terrier", 5)),
    ("Egyptian_Mau_191.jpg", (0, "Egyptian_Mau", 191)), ("cat.1.jpg", None), ("Abyssinian_1.mat", None),
    ("Abyssinian.jpg", None), ("_1.jpg", None), ("beagle_1.png", None), ("1.jpg", None),
])
def test_parse_extra_name(name, expected):
    assert step01.parse_extra_name(name) == expected
    assert helper.parse_train_name(name) is None or expected is None  # the two sources never share a name


def test_train_image_id_names_both_sources():
    assert script("07").train_image_id("cat.123.jpg") == "123" and script("07").train_image_id("cat.007.jpg") == "7"
    assert script("07").train_image_id("Abyssinian_1.jpg") == "Abyssinian_1"


@pytest.mark.parametrize("form", ["dataset", "images"])
def test_extra_data_joins_train_only_and_leaves_the_kaggle_split_alone(tmp_path, caplog, form):
    data, pets = tmp_path / "data", tmp_path / "pets"
    images = make_pets(pets)
    before = tree_digest(pets)
    run("01", "--data-dir", data, "--demo", 10)
    alone = pd.read_csv(data / "split.csv")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="catdog"):
        out = run("01", "--data-dir", data, "--extra-data", pets if form == "dataset" else images)
    split = helper.read_split(data)
    assert split.equals(out["split"]) and list(split.columns) == ["filename", "label", "subset", "source"]
    kaggle, extra = split[split.source == "kaggle"], split[split.source == "oxford-pets"]
    pd.testing.assert_frame_equal(kaggle.reset_index(drop=True), alone)  # the same rows, order and subsets
    assert len(split) == len(alone) + len(PETS) and set(split.source) == {"kaggle", "oxford-pets"}
    assert dict(zip(extra.filename, extra.label, strict=True)) == PETS
    assert (extra.subset == "train").all() and extra.index.min() == len(alone)  # appended after Kaggle's
    # Links in train2/ and splitted/train/ only, to the untouched originals; absolute, as they lie outside data/.
    for name, label in PETS.items():
        cls = helper.CLASSES[label]
        for link in (data / "train2" / cls / name, data / "splitted" / "train" / cls / name):
            assert link.is_symlink() and os.readlink(link) == str(images.resolve() / name)
            assert link.read_bytes() == (images / name).read_bytes()
    laid_out = derived_files(data)
    assert not [f for f in laid_out if f.startswith(("splitted/valid/", "test2/")) and f.split("/")[-1] in PETS]
    assert not [f for f in laid_out if CORRUPT_PET in f or ".mat" in f]
    assert before == tree_digest(pets)
    lines = caplog.text.splitlines()
    assert any(f"skipped oxford-pets/{CORRUPT_PET}: corrupt or truncated" in line for line in lines)
    assert any("kept    oxford-pets/beagle_4.jpg: PNG content" in line for line in lines)
    assert not any("Abyssinian_100.mat" in line for line in lines)  # counted, not named
    assert (f"extra: 6 oxford-pets images from {images}/ added to train (cat 3, dog 3), 1 skipped; not images, "
            "ignored: 1 .mat") in caplog.text
    meta = json.loads((data / "split.json").read_text())
    assert meta["extra_data"] == {"dir": str(images.resolve()), "source": "oxford-pets", "cat": 3, "dog": 3}
    assert len(pd.read_csv(data / "eda" / "sizes.csv")) == 20  # the report's figure: Kaggle's images only


def test_extra_data_reruns_follow_its_folder_and_content(tmp_path, caplog, monkeypatch):
    data, pets = tmp_path / "data", tmp_path / "pets"
    make_pets(pets)
    run("01", "--data-dir", data, "--demo", 4, "--extra-data", pets)
    stamp = {p: os.lstat(data / p).st_mtime_ns for p in ["split.csv", "split.json", *derived_files(data)]}
    decoded = []
    real = catdog.checks.check_image
    monkeypatch.setattr(catdog.checks, "check_image", lambda path: decoded.append(path) or real(path))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="catdog"):
        run("01", "--data-dir", data, "--extra-data", pets / "images")  # the same folder, named the other way
    assert "nothing changed" in caplog.text and decoded == []  # the check cache covers the extra images too
    monkeypatch.undo()
    assert stamp == {p: os.lstat(data / p).st_mtime_ns for p in stamp}
    # A copy elsewhere: the same names, but the links must point at the copy.
    shutil.copytree(pets, tmp_path / "copy")
    run("01", "--data-dir", data, "--extra-data", tmp_path / "copy")
    assert os.readlink(data / "train2" / "cat" / "Abyssinian_1.jpg") == str(tmp_path / "copy" / "images"
                                                                            / "Abyssinian_1.jpg")
    # Content: a new image is added, a repaired one comes back.
    images = tmp_path / "copy" / "images"
    shutil.copy(images / "Abyssinian_2.jpg", images / "Persian_9.jpg")
    shutil.copy(images / "Abyssinian_2.jpg", images / CORRUPT_PET)
    split = run("01", "--data-dir", data, "--extra-data", tmp_path / "copy")["split"]
    assert {"Persian_9.jpg", CORRUPT_PET} <= set(split.filename)
    assert (data / "splitted" / "train" / "cat" / "Persian_9.jpg").is_symlink()
    # Without it again: Kaggle's images only, nothing of the extra data left in the layout.
    split = run("01", "--data-dir", data)["split"]
    assert (split.source == "kaggle").all() and len(split) == 8
    assert not [f for f in derived_files(data) if step01.parse_extra_name(f.split("/")[-1])]
    assert json.loads((data / "split.json").read_text())["extra_data"] is None


def test_extra_data_inside_the_data_folder_is_linked_relatively(tmp_path):
    data = tmp_path / "data"
    helper.make_demo_dataset(data, 3)
    make_pets(data / "oxford-iiit-pet")
    run("01", "--data-dir", data, "--extra-data", data / "oxford-iiit-pet")
    link = data / "train2" / "dog" / "beagle_4.jpg"
    assert os.readlink(link) == "../../oxford-iiit-pet/images/beagle_4.jpg"
    shutil.move(data, tmp_path / "moved")  # the data folder moves as a whole
    assert (tmp_path / "moved" / "train2" / "dog" / "beagle_4.jpg").is_file()


def test_copy_mode_copies_extra_images(tmp_path):
    data, pets = tmp_path / "data", tmp_path / "pets"
    images = make_pets(pets)
    run("01", "--data-dir", data, "--demo", 3, "--extra-data", pets, "--copy")
    f = data / "splitted" / "train" / "cat" / "Egyptian_Mau_3.jpg"
    assert f.is_file() and not f.is_symlink() and f.read_bytes() == (images / "Egyptian_Mau_3.jpg").read_bytes()


def test_exclude_names_extra_images_as_split_csv_does(tmp_path, caplog):
    data, pets = tmp_path / "data", tmp_path / "pets"
    make_pets(pets)
    helper.make_demo_dataset(data, 4)
    ex = tmp_path / "suspects.txt"
    ex.write_text("Abyssinian_2.jpg\nyorkshire_terrier_5.jpg\ncat.1.jpg\n")
    with caplog.at_level(logging.INFO, logger="catdog"):
        out = run("01", "--data-dir", data, "--extra-data", pets, "--exclude", ex)
    assert out["excluded"] == {"Abyssinian_2.jpg", "yorkshire_terrier_5.jpg", "cat.1.jpg"}
    assert not out["split"].filename.isin(out["excluded"]).any() and len(out["split"]) == 7 + len(PETS) - 2
    assert "not among the usable" not in caplog.text
    assert not (data / "train2" / "cat" / "Abyssinian_2.jpg").exists()


def mat_only(root):
    root.mkdir()
    (root / "Abyssinian_100.mat").write_bytes(b"\x00")
    (root / "cat.1.jpg").write_bytes(jpeg_bytes())  # Kaggle's name is not Oxford's


def corrupt_only(root):
    (root / "images").mkdir(parents=True)
    (root / "images" / "Abyssinian_1.jpg").write_bytes(b"")


@pytest.mark.parametrize("setup, given, message", [
    (lambda r: None, "pets", "--extra-data {given}: no such folder; give the unpacked Oxford-IIIT Pet dataset"),
    (lambda r: r.mkdir(), "pets", "--extra-data {given}: {given}/ holds no Oxford-IIIT Pet images"),
    (lambda r: (r / "images").mkdir(parents=True), "pets",
     "--extra-data {given}: {given}/images/ holds no Oxford-IIIT Pet images .* or that images/ folder"),
    (mat_only, "pets", "{given}/ holds no Oxford-IIIT Pet images"),
    (corrupt_only, "pets", r"no usable images in {given}/images/ \(see the messages above\)"),
    (lambda r: None, "data/train2/cat", "lies inside .*train2/, which this step rebuilds"),
])
def test_bad_extra_data_gets_one_clear_error(tmp_path, setup, given, message):
    data = tmp_path / "data"
    run("01", "--data-dir", data, "--demo", 3)
    split = (data / "split.csv").read_bytes()
    setup(tmp_path / "pets")
    given = tmp_path / given
    with pytest.raises(CatDogError, match=message.format(given=given)):
        run("01", "--data-dir", data, "--extra-data", given)
    assert (data / "split.csv").read_bytes() == split


@pytest.mark.slow
def test_feature_step_picks_up_extra_rows(tmp_path):
    import h5py
    data, pets = tmp_path / "data", tmp_path / "pets"
    make_pets(pets)
    split = run("01", "--data-dir", data, "--demo", 4, "--extra-data", pets)["split"]
    run("02", "--data-dir", data, "--models", "ResNet50", "--weights", "none", "--image-size", 32)
    with h5py.File(data / "features" / "ResNet50.h5", "r") as f:
        files, labels, rows = f["labelled_files"][:].astype(str), f["label"][:], f["labelled"].shape[0]
    assert rows == len(split) == 8 + len(PETS)
    assert files.tolist() == split.filename.tolist() and labels.tolist() == split.label.tolist()
    feats = helper.load_features(["ResNet50"], data)
    assert feats.valid.sum() == (split.subset == "valid").sum() == 2  # valid: Kaggle's rows only
    # 07 --analyze titles its grid of every labelled image by name, Oxford's too (a TypeError before).
    d = ["--data-dir", data, "--model-dir", tmp_path / "model"]
    run("03", *d, "--batch-size", 16, "--submissions-dir", tmp_path / "subs")
    run("07", *d, "--output", tmp_path / "subs" / "s.csv", "--analyze", "--top", len(split))
    worst = pd.read_csv(tmp_path / "model" / helper.ANALYSIS_DIR / "worst.csv")
    assert sorted(worst.filename) == sorted(split.filename)
