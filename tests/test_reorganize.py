"""01_reorganize_data.py and helper's data, splitting and demo sections."""

import hashlib
import logging
import os
import zipfile

import numpy as np
import pandas as pd
import pytest
from conftest import jpeg_bytes, run

import helper
from helper import CatDogError

# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize("name, expected", [
    ("cat.0.jpg", (0, 0)), ("dog.12499.jpg", (1, 12499)), ("cat.123.jpg", (0, 123)),
    ("Cat.1.jpg", None), ("cat.1.jpeg", None), ("cat1.jpg", None), ("bird.1.jpg", None), ("1.jpg", None),
    ("Thumbs.db", None), ("cat.1.jpg.bak", None),
])
def test_parse_train_name(name, expected):
    assert helper.parse_train_name(name) == expected


@pytest.mark.parametrize("name, expected", [("1.jpg", 1), ("12500.jpg", 12500), ("cat.1.jpg", None),
                                            ("1.png", None), ("x.jpg", None)])
def test_parse_test_name(name, expected):
    assert helper.parse_test_name(name) == expected


# ----------------------------------------------------------------------------- splitting

def test_split_is_stratified_and_seeded():
    labels = np.array([0] * 100 + [1] * 60)
    a = helper.stratified_split(labels, 0.2, seed=1)
    assert (a & (labels == 0)).sum() == 20 and (a & (labels == 1)).sum() == 12
    assert np.array_equal(a, helper.stratified_split(labels, 0.2, seed=1))
    assert not np.array_equal(a, helper.stratified_split(labels, 0.2, seed=2))


def test_split_is_stable_across_runs():
    # A fixed expectation: numpy's PCG64 is stable across versions and machines.
    got = np.flatnonzero(helper.stratified_split([0, 0, 0, 0, 0, 1, 1, 1, 1, 1], 0.4, seed=2018))
    assert got.tolist() == [0, 3, 6, 7]


@pytest.mark.parametrize("frac", [0, 1, -0.1, 1.5])
def test_split_rejects_bad_fraction(frac):
    with pytest.raises(CatDogError, match="valid-frac"):
        helper.stratified_split([0, 1], frac, 0)


def test_read_name_list_skips_comments(tmp_path):
    f = tmp_path / "ex.txt"
    f.write_text("# header\ncat.1.jpg  # wrong label\n\n  dog.2.jpg\n")
    assert helper.read_name_list(f) == ["cat.1.jpg", "dog.2.jpg"]
    with pytest.raises(CatDogError, match="no such file"):
        helper.read_name_list(tmp_path / "missing.txt")


def test_shipped_exclude_list_names_the_reports_images():
    names = helper.read_name_list(helper.Path(__file__).parents[1] / "data" / "exclude_report.txt")
    assert len(names) == 11 and "cat.4085.jpg" in names and "dog.4334.jpg" in names
    assert all(helper.parse_train_name(n) for n in names)


# ----------------------------------------------------------------------------- image checks

@pytest.mark.parametrize("content, problem, note", [
    (lambda: jpeg_bytes()[:-400] if len(jpeg_bytes()) > 600 else jpeg_bytes()[: len(jpeg_bytes()) // 2],
     "truncated", ""),
    (lambda: b"", "0 bytes", ""),
    (lambda: b"this is not an image\n", "not an image", ""),
    (lambda: jpeg_bytes(fmt="PNG"), "", "PNG content"),
    (lambda: jpeg_bytes(mode="L"), "", "mode L"),
    (lambda: jpeg_bytes(mode="CMYK"), "", "mode CMYK"),
    (lambda: jpeg_bytes(), "", ""),
])
def test_check_image(tmp_path, content, problem, note):
    f = tmp_path / "cat.1.jpg"
    f.write_bytes(content())
    info = helper.check_image(f)
    assert (problem in info["problem"]) if problem else info["problem"] == ""
    assert (note in info["note"]) if note else info["note"] == ""


# ----------------------------------------------------------------------------- 01 end to end

def tree_digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def derived_files(data):
    return sorted(os.path.relpath(os.path.join(r, f), data) for top in ("train2", "splitted", "test2")
                  for r, _, fs in os.walk(data / top) for f in fs)


def test_demo_layout_split_and_eda(tmp_path):
    out = run("01", "--data-dir", tmp_path, "--demo", 20)
    split = pd.read_csv(tmp_path / "split.csv")
    assert list(split.columns) == ["filename", "label", "subset"] and len(split) == 40
    assert split.groupby(["subset", "label"]).size().to_dict() == {("train", 0): 16, ("train", 1): 16,
                                                                   ("valid", 0): 4, ("valid", 1): 4}
    assert split.filename.tolist() == sorted(split.filename, key=helper.parse_train_name)
    for r in split.itertuples():
        cls = helper.CLASSES[r.label]
        for link in (tmp_path / "train2" / cls / r.filename, tmp_path / "splitted" / r.subset / cls / r.filename):
            assert link.is_symlink() and not os.path.isabs(os.readlink(link))
            assert link.read_bytes() == (tmp_path / "train" / r.filename).read_bytes()
    assert sorted(p.name for p in (tmp_path / "test2" / "test").iterdir()) == sorted(
        p.name for p in (tmp_path / "test").iterdir())
    sizes = pd.read_csv(tmp_path / "eda" / "sizes.csv")
    assert len(sizes) == 40 and (sizes.width > 1000).sum() == 1  # the demo's one big image
    for png in ("sizes.png", "aspect.png"):
        assert (tmp_path / "eda" / png).read_bytes()[:4] == b"\x89PNG"
    assert len(out["test_names"]) == 10


def test_rerun_changes_nothing_and_says_so(tmp_path, caplog):
    run("01", "--data-dir", tmp_path, "--demo", 10)
    stamp = {p: os.lstat(tmp_path / p).st_mtime_ns for p in ["split.csv", *derived_files(tmp_path)]}
    with caplog.at_level(logging.INFO, logger="catdog"):
        run("01", "--data-dir", tmp_path)
    assert "nothing changed" in caplog.text
    assert stamp == {p: os.lstat(tmp_path / p).st_mtime_ns for p in stamp}


def test_other_seed_or_exclude_rebuilds_without_stale_entries(tmp_path):
    run("01", "--data-dir", tmp_path, "--demo", 10)
    first = pd.read_csv(tmp_path / "split.csv")
    run("01", "--data-dir", tmp_path, "--seed", 7)
    second = pd.read_csv(tmp_path / "split.csv")
    assert not first.subset.equals(second.subset)
    ex = tmp_path / "ex.txt"
    ex.write_text("cat.3.jpg\ndog.4.jpg\ncat.999.jpg  # not there: warned about\n")
    run("01", "--data-dir", tmp_path, "--seed", 7, "--exclude", ex)
    split = pd.read_csv(tmp_path / "split.csv")
    assert len(split) == 18 and not split.filename.isin(["cat.3.jpg", "dog.4.jpg"]).any()
    expected = sorted([f"train2/{helper.CLASSES[r.label]}/{r.filename}" for r in split.itertuples()]
                      + [f"splitted/{r.subset}/{helper.CLASSES[r.label]}/{r.filename}" for r in split.itertuples()]
                      + [f"test2/test/{n}" for n in os.listdir(tmp_path / "test")])
    assert derived_files(tmp_path) == expected
    assert not list(tmp_path.glob(".*partial*")) and not list(tmp_path.glob(".*.old"))


def test_copy_mode_writes_real_files(tmp_path):
    run("01", "--data-dir", tmp_path, "--demo", 5, "--copy")
    f = tmp_path / "train2" / "cat" / "cat.2.jpg"
    assert f.is_file() and not f.is_symlink()


def add_bad_files(data):
    train = data / "train"
    good = (train / "cat.2.jpg").read_bytes()
    (train / "cat.900.jpg").write_bytes(good[: len(good) // 2])
    (train / "cat.901.jpg").write_bytes(b"")
    (train / "dog.902.jpg").write_text("<html>not a picture</html>")
    (train / "dog.903.jpg").write_bytes(jpeg_bytes(fmt="PNG"))
    (train / "cat.904.jpg").write_bytes(jpeg_bytes(mode="CMYK"))
    (train / "Thumbs.db").write_bytes(b"\x00" * 64)
    (data / "test" / ".DS_Store").write_bytes(b"\x00")


def test_bad_files_are_named_and_skipped_and_originals_untouched(tmp_path, caplog):
    helper.make_demo_dataset(tmp_path, 6)
    add_bad_files(tmp_path)
    before = {sub: tree_digest(tmp_path / sub) for sub in ("train", "test")}
    with caplog.at_level(logging.INFO, logger="catdog"):
        out = run("01", "--data-dir", tmp_path)
    text = caplog.text
    for name, why in [("cat.900.jpg", "truncated"), ("cat.901.jpg", "0 bytes"), ("dog.902.jpg", "not an image"),
                      ("Thumbs.db", "pattern"), (".DS_Store", "pattern")]:
        assert any(name in line and "skipped" in line and why in line for line in text.splitlines()), name
    for name, note in [("dog.903.jpg", "PNG"), ("cat.904.jpg", "CMYK"), ("dog.1.jpg", "mode L")]:
        assert any(name in line and "kept" in line and note in line for line in text.splitlines()), name
    used = set(out["split"].filename)
    assert {"dog.903.jpg", "cat.904.jpg", "dog.1.jpg"} <= used
    assert not used & {"cat.900.jpg", "cat.901.jpg", "dog.902.jpg", "Thumbs.db"}
    assert "4 skipped" in text and "test: 3 used, 1 skipped" in text
    assert before == {sub: tree_digest(tmp_path / sub) for sub in ("train", "test")}
    assert all(not p.is_symlink() for p in (tmp_path / "train").iterdir())


def test_zip_input_is_extracted(tmp_path):
    src = tmp_path / "src"
    helper.make_demo_dataset(src, 4)
    data = tmp_path / "data"
    data.mkdir()
    for sub in ("train", "test"):
        with zipfile.ZipFile(data / f"{sub}.zip", "w") as z:
            for p in sorted((src / sub).iterdir()):
                z.write(p, f"{sub}/{p.name}")
    out = run("01", "--data-dir", data)
    assert len(out["split"]) == 8 and (data / "train" / "cat.0.jpg").is_file()
    assert (data / "train2" / "dog" / "dog.3.jpg").read_bytes() == (src / "train" / "dog.3.jpg").read_bytes()


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "neither"),
    (lambda d: [(d / "train").mkdir(), (d / "test").mkdir()], "no usable images"),
    (lambda d: [(d / "train").mkdir(), (d / "test").mkdir(), (d / "train" / "cat.1.jpg").write_bytes(b"")],
     "no usable images"),
    (lambda d: [(d / "train").mkdir(), (d / "test.zip").write_bytes(b"not a zip")], "not a valid zip"),
])
def test_bad_input_gets_one_clear_error(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(CatDogError, match=message):
        run("01", "--data-dir", tmp_path)


def test_cli_prints_one_line_without_traceback(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, str(helper.Path(__file__).parents[1] / "01_reorganize_data.py"),
                        "--data-dir", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("error: neither") and "Traceback" not in r.stderr


def test_demo_refuses_to_overwrite_real_data(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(CatDogError, match="not demo data"):
        run("01", "--data-dir", tmp_path, "--demo", 3)
