"""01_reorganize_data.py (with its demo data) and helper's Kaggle data and splitting sections."""

import errno
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, derived_files, jpeg_bytes, run, script, tree_digest

import catdog.checks
import catdog.demo
import helper
from helper import CatDogError

step01 = script("01")

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
    names = helper.read_name_list(ROOT / "data" / "exclude_report.txt")
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

def test_demo_layout_split_and_eda(tmp_path):
    out = run("01", "--data-dir", tmp_path, "--demo", 20)
    split = pd.read_csv(tmp_path / "split.csv")
    assert list(split.columns) == ["filename", "label", "subset", "source"] and len(split) == 40
    assert (split.source == "kaggle").all()
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
    stamp = {p: os.lstat(tmp_path / p).st_mtime_ns for p in ["split.csv", "split.json", "file_check.csv",
                                                             "eda/sizes.csv", "eda/sizes.png", "eda/aspect.png",
                                                             *derived_files(tmp_path)]}
    caplog.clear()  # the first run's lines too are captured once an earlier test has set the logger to INFO
    with caplog.at_level(logging.INFO, logger="catdog"):
        run("01", "--data-dir", tmp_path)
    assert "nothing changed" in caplog.text and "wrote" not in caplog.text
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
    r = subprocess.run([sys.executable, str(ROOT / "01_reorganize_data.py"),
                        "--data-dir", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("error: neither") and "Traceback" not in r.stderr


def test_demo_refuses_to_overwrite_real_data(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "cat.1.jpg").write_bytes(jpeg_bytes())
    with pytest.raises(CatDogError, match="cat.1.jpg is not demo data.*empty --data-dir"):
        run("01", "--data-dir", tmp_path, "--demo", 3)
    assert tree_digest(tmp_path / "train") == {"cat.1.jpg": hashlib.sha256(jpeg_bytes()).hexdigest()}


# ----------------------------------------------------------------------------- reruns

def test_rerun_with_odd_entries_decodes_nothing_and_leaves_the_check_cache_alone(tmp_path, monkeypatch, caplog):
    helper.make_demo_dataset(tmp_path, 5)
    (tmp_path / "train" / "Thumbs.db").write_bytes(b"\x00" * 64)
    (tmp_path / "train" / "extra").mkdir()
    (tmp_path / "train" / "extra" / "cat.77.jpg").write_bytes(jpeg_bytes())
    run("01", "--data-dir", tmp_path)
    stamp = {p: os.stat(tmp_path / p).st_mtime_ns for p in ("file_check.csv", "eda/sizes.png", "eda/aspect.png")}
    decoded = []
    real = catdog.checks.check_image
    monkeypatch.setattr(catdog.checks, "check_image", lambda path: decoded.append(path) or real(path))
    with caplog.at_level(logging.INFO, logger="catdog"):
        run("01", "--data-dir", tmp_path)
    assert "nothing changed" in caplog.text
    out = run("01", "--data-dir", tmp_path, "--seed", 7)  # a TypeError in write_eda before
    assert decoded == [] and stamp == {p: os.stat(tmp_path / p).st_mtime_ns for p in stamp}
    assert len(out["split"]) == 10 and len(pd.read_csv(tmp_path / "eda" / "sizes.csv")) == 10


# ----------------------------------------------------------------------------- --demo deletes only its own files

@pytest.mark.parametrize("add, named", [
    (lambda d: (d / "train" / "cat.100.jpg").write_bytes(jpeg_bytes()), "train/cat.100.jpg"),
    (lambda d: (d / "test" / "500.jpg").write_bytes(jpeg_bytes()), "test/500.jpg"),
    (lambda d: (d / "train" / "cat.0.jpg").write_bytes(jpeg_bytes()), "train/cat.0.jpg"),  # replaced by the user's
    (lambda d: (d / "train" / "mine").mkdir(), "train/mine"),
])
def test_demo_never_deletes_what_it_did_not_generate(tmp_path, add, named):
    run("01", "--data-dir", tmp_path, "--demo", 5)
    add(tmp_path)
    before = {sub: tree_digest(tmp_path / sub) for sub in ("train", "test")}
    with pytest.raises(CatDogError, match=f"{tmp_path / named} is not demo data.*empty --data-dir"):
        run("01", "--data-dir", tmp_path, "--demo", 6)
    assert before == {sub: tree_digest(tmp_path / sub) for sub in ("train", "test")}
    assert (tmp_path / named).exists()


def test_demo_replaces_its_own_files(tmp_path, caplog):
    run("01", "--data-dir", tmp_path, "--demo", 6)
    out = run("01", "--data-dir", tmp_path, "--demo", 3)
    assert sorted(os.listdir(tmp_path / "train")) == sorted(f"{c}.{i}.jpg" for c in ("cat", "dog") for i in range(3))
    assert sorted(os.listdir(tmp_path / "test")) == ["1.jpg", "2.jpg"] and len(out["split"]) == 6
    with caplog.at_level(logging.INFO, logger="catdog"):
        run("01", "--data-dir", tmp_path, "--demo", 3)
    assert "kept" in caplog.text


def test_interrupted_demo_is_replaced_by_the_next(tmp_path, monkeypatch):
    real = catdog.demo.demo_image
    calls = []

    def stop_after_three(*args):
        calls.append(args)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(catdog.demo, "demo_image", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        run("01", "--data-dir", tmp_path, "--demo", 4)
    assert len(os.listdir(tmp_path / "train")) == 3
    monkeypatch.undo()
    assert len(run("01", "--data-dir", tmp_path, "--demo", 4)["split"]) == 8


# ----------------------------------------------------------------------------- what cannot train is refused

def remove_dogs(data):
    for p in (data / "train").glob("dog.*"):
        p.unlink()


def exclude_cats(data):
    (data / "ex.txt").write_text("\n".join(p.name for p in (data / "train").glob("cat.*")))
    return ["--exclude", data / "ex.txt"]


@pytest.mark.parametrize("setup, message", [
    (remove_dogs, r"no usable dog images in {train}/ \(see the messages above\)"),
    (exclude_cats, r"no usable cat images in {train}/ \(--exclude .*ex.txt leaves none\)"),
])
def test_a_class_without_usable_images_is_refused(tmp_path, setup, message):
    helper.make_demo_dataset(tmp_path, 4)
    flags = setup(tmp_path) or []
    with pytest.raises(CatDogError, match=message.format(train=tmp_path / "train")):
        run("01", "--data-dir", tmp_path, *flags)
    assert not (tmp_path / "split.csv").exists()


@pytest.mark.parametrize("frac, counts", [
    (0.99, "train: cat 0, dog 0; valid: cat 5, dog 5"),
    (0.01, "train: cat 5, dog 5; valid: cat 0, dog 0"),
])
def test_a_split_with_an_empty_part_is_refused_with_a_working_fraction(tmp_path, frac, counts):
    helper.make_demo_dataset(tmp_path, 5)
    with pytest.raises(CatDogError, match=rf"--valid-frac {frac} .*empty \({counts}\): use a --valid-frac from "
                                          r"0.2 to 0.8"):
        run("01", "--data-dir", tmp_path, "--valid-frac", frac)
    for works in (0.2, 0.8):
        assert len(run("01", "--data-dir", tmp_path, "--valid-frac", works)["split"]) == 10


def test_a_class_of_one_image_cannot_be_split(tmp_path):
    helper.make_demo_dataset(tmp_path, 3)
    for name in ("dog.1.jpg", "dog.2.jpg"):
        (tmp_path / "train" / name).unlink()
    with pytest.raises(CatDogError, match="at least 2 usable images, dog has 1"):
        run("01", "--data-dir", tmp_path)


@pytest.mark.parametrize("sub, a, b", [("test", "1.jpg", "01.jpg"), ("train", "cat.1.jpg", "cat.01.jpg")])
def test_duplicate_ids_are_refused(tmp_path, sub, a, b):
    helper.make_demo_dataset(tmp_path, 4)
    (tmp_path / sub / b).write_bytes((tmp_path / sub / a).read_bytes())
    folder = tmp_path / sub
    with pytest.raises(CatDogError, match=f"{folder / b} and {folder / a} have the same image id"):
        run("01", "--data-dir", tmp_path)


def test_names_with_leading_zeros_work_end_to_end(tmp_path):
    helper.make_demo_dataset(tmp_path, 4)
    os.rename(tmp_path / "test" / "1.jpg", tmp_path / "test" / "01.jpg")
    os.rename(tmp_path / "train" / "cat.1.jpg", tmp_path / "train" / "cat.001.jpg")
    run("01", "--data-dir", tmp_path)
    ids, paths = helper.test_images(tmp_path)
    assert ids.tolist() == [1, 2] and paths[0].endswith("/test2/test/01.jpg")
    split = helper.read_split(tmp_path)
    assert "cat.001.jpg" in split.filename.tolist()
    assert all(os.path.isfile(p) for p in [*paths, *helper.train_image_paths(tmp_path, split)])


# ----------------------------------------------------------------------------- clear messages

def test_folder_beside_its_zip_says_which_is_used(tmp_path, caplog):
    helper.make_demo_dataset(tmp_path, 3)
    with zipfile.ZipFile(tmp_path / "train.zip", "w") as z:
        z.writestr("train/cat.9.jpg", jpeg_bytes())
    with caplog.at_level(logging.INFO, logger="catdog"):
        out = run("01", "--data-dir", tmp_path)
    line = next(line for line in caplog.text.splitlines() if "train.zip" in line)
    assert f"using {tmp_path / 'train'}/" in line and "not extracted again" in line and "remove or rename" in line
    assert "cat.9.jpg" not in set(out["split"].filename)


def test_symlink_loops_are_skipped_with_a_warning(tmp_path, caplog):
    helper.make_demo_dataset(tmp_path, 3)
    train = tmp_path / "train"
    os.symlink("cat.50.jpg", train / "cat.50.jpg")
    os.symlink("dog.52.jpg", train / "dog.51.jpg")
    os.symlink("dog.51.jpg", train / "dog.52.jpg")
    with caplog.at_level(logging.INFO, logger="catdog"):
        out = run("01", "--data-dir", tmp_path)
    for name in ("cat.50.jpg", "dog.51.jpg", "dog.52.jpg"):
        assert f"skipped train/{name}: unreadable (Too many levels of symbolic links)" in caplog.text
    assert len(out["split"]) == 6


def test_binary_exclude_file_is_named(tmp_path):
    helper.make_demo_dataset(tmp_path, 3)
    (tmp_path / "ex.jpg").write_bytes(jpeg_bytes())
    with pytest.raises(CatDogError, match=f"{tmp_path / 'ex.jpg'}: not a text file"):
        run("01", "--data-dir", tmp_path, "--exclude", tmp_path / "ex.jpg")


@pytest.mark.parametrize("flag, value, accepted", [
    ("--workers", "0", "an integer >= 1"), ("--workers", "-2", "an integer >= 1"),
    ("--valid-frac", "0", "a number > 0 and < 1"), ("--valid-frac", "1", "a number > 0 and < 1"),
    ("--valid-frac", "nan", "a number > 0 and < 1"), ("--demo", "1", "an integer >= 2"),
])
def test_flag_out_of_range_is_refused_by_argparse(flag, value, accepted, capsys):
    with pytest.raises(SystemExit) as e:
        step01.parse_args([flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: {value} is not {accepted}" in capsys.readouterr().err


def test_help_shows_the_ranges(capsys):
    with pytest.raises(SystemExit) as e:
        step01.parse_args(["-h"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "[an integer >= 1]" in text and "[a number > 0 and < 1]" in text and "[an integer >= 2]" in text


@pytest.mark.parametrize("name, content", [
    ("file_check.csv", b""), ("file_check.csv", b"\x00\xff\xfe garbage"), ("file_check.csv", b"a,b\n1,2\n"),
    ("file_check.csv", b"folder,name,bytes,mtime_ns,width,height,format,mode,problem,note\ntrain,x,big,,,,,,,\n"),
    ("split.json", b""), ("split.json", b"{not json"), ("split.json", b"\xff\xfe"), ("split.json", b"[1, 2]"),
    ("split.csv", b"garbled"),
])
def test_garbled_state_files_are_rebuilt_with_a_warning(tmp_path, caplog, name, content):
    run("01", "--data-dir", tmp_path, "--demo", 4)
    good = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(content)
    with caplog.at_level(logging.INFO, logger="catdog"):
        run("01", "--data-dir", tmp_path)
    if name != "split.csv":  # split.json's checksum of split.csv notices that one
        assert any(str(tmp_path / name) in line and "WARNING" in line for line in caplog.text.splitlines())
    assert (tmp_path / name).read_bytes() == good


# ----------------------------------------------------------------------------- full disk

def fail_after(n, real):
    calls = []

    def fake(*args, **kwargs):
        calls.append(args)
        if len(calls) > n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)
    return fake


def test_full_disk_while_copying_leaves_nothing_partial(tmp_path, monkeypatch):
    run("01", "--data-dir", tmp_path, "--demo", 5)
    before = {sub: tree_digest(tmp_path / sub) for sub in ("train", "test")}
    links = derived_files(tmp_path)
    need = 2 * sum(p.stat().st_size for p in (tmp_path / "train").iterdir()) + sum(
        p.stat().st_size for p in (tmp_path / "test").iterdir())
    monkeypatch.setattr(shutil, "copy2", fail_after(3, shutil.copy2))
    with pytest.raises(CatDogError, match=rf"no space left on the disk of {tmp_path}/ while copying: it needs about "
                                          rf"{need / 1e6:,.1f} MB free there; the partial output was removed"):
        run("01", "--data-dir", tmp_path, "--copy")
    assert not list(tmp_path.glob(".*partial*")) and not list(tmp_path.glob(".*.old"))
    assert before == {sub: tree_digest(tmp_path / sub) for sub in ("train", "test")}
    assert derived_files(tmp_path) == links and (tmp_path / "train2" / "cat" / "cat.1.jpg").is_symlink()


def test_full_disk_while_extracting_leaves_nothing_partial(tmp_path, monkeypatch):
    src = tmp_path / "src"
    helper.make_demo_dataset(src, 4)
    data = tmp_path / "data"
    data.mkdir()
    with zipfile.ZipFile(data / "train.zip", "w") as z:
        for p in sorted((src / "train").iterdir()):
            z.write(p, f"train/{p.name}")
    zipped = (data / "train.zip").read_bytes()
    monkeypatch.setattr(zipfile.ZipFile, "extract", fail_after(2, zipfile.ZipFile.extract))
    with pytest.raises(CatDogError, match=f"no space left on the disk of {data}/ while extracting train.zip: it "
                                          "needs about 0.[0-9] MB free there"):
        run("01", "--data-dir", data)
    assert sorted(os.listdir(data)) == ["train.zip"] and (data / "train.zip").read_bytes() == zipped


# ----------------------------------------------------------------------------- command line

def test_cli_flag_error_is_quick_one_line_and_01_never_imports_tensorflow(tmp_path):
    script_path = str(ROOT / "01_reorganize_data.py")
    start = time.monotonic()
    r = subprocess.run([sys.executable, script_path, "--data-dir", str(tmp_path), "--workers", "0"],
                       capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 30
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "argument --workers: 0 is not an integer >= 1" in r.stderr
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import importlib;"
            "m = importlib.import_module('01_reorganize_data');"
            "m.main(m.parse_args(['--data-dir', sys.argv[2], '--demo', '3']));"
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "False False"
