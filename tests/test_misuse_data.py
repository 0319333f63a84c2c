"""Misuse of 01 and the data dir (issue 19): the user's files in derived folders, paths read from files, hostile
images, misleading layouts, and two runs at once. Small demo data only, no CNN."""

import json
import os
import re
import shlex
import signal
import struct
import subprocess
import sys
import warnings
import zlib

import pandas as pd
import pytest
from conftest import ROOT, jpeg_bytes, run

import helper
from helper import CatDogError


def tree(folder):
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, ds, fs in os.walk(folder) for f in fs + ds)


# ----------------------------------------------------------------------------- item 4: derived folders

@pytest.mark.parametrize("place", ["train2/cat/my.jpg", "splitted/valid/dog/mine/x.jpg", "test2/notes.txt",
                                   "train2/cat/cat.1.jpg"])  # the last: the user's own image over 01's link
def test_a_users_file_in_a_derived_folder_stops_the_rebuild(tmp_path, place):
    data = tmp_path / "data"
    run("01", "--data-dir", data, "--demo", 4)
    mine = data / place
    mine.parent.mkdir(parents=True, exist_ok=True)
    mine.unlink(missing_ok=True)
    mine.write_bytes(jpeg_bytes(size=(33, 21)))
    split = (data / "split.csv").read_bytes()
    shown = data / ("splitted/valid/dog/mine" if "mine" in place else place)
    with pytest.raises(CatDogError, match=re.escape(str(shown)) + r": not made by 01 .* move them out"):
        run("01", "--data-dir", data, "--seed", 7)  # another split: the layout is rebuilt
    assert mine.read_bytes() == jpeg_bytes(size=(33, 21)) and (data / "split.csv").read_bytes() == split
    # Moved out, the rebuild goes ahead.
    os.rename(shown, tmp_path / "moved")
    assert len(run("01", "--data-dir", data, "--seed", 7)["split"]) == 8


def test_01s_own_links_and_copies_are_replaced_even_when_their_original_is_gone(tmp_path):
    data = tmp_path / "data"
    run("01", "--data-dir", data, "--demo", 5, "--copy")
    (data / "train" / "cat.3.jpg").unlink()  # its copies are 01's, known from the last check
    (data / "test2" / "test" / "99.jpg").write_bytes(b"mine")
    with pytest.raises(CatDogError, match=r"test2/test/99.jpg: not made by 01") as e:
        run("01", "--data-dir", data, "--copy")
    assert "cat.3.jpg" not in str(e.value) and (data / "test2" / "test" / "99.jpg").read_bytes() == b"mine"
    (data / "test2" / "test" / "99.jpg").unlink()
    run("01", "--data-dir", data, "--copy")
    assert not list(data.glob("*/*/cat.3.jpg")) and not list(data.glob("*/*/*/cat.3.jpg"))
    run("01", "--data-dir", data)  # copies to links
    (data / "train" / "dog.2.jpg").unlink()  # a dangling link to an original is 01's too
    run("01", "--data-dir", data, "--seed", 3)
    assert "train2/dog/dog.2.jpg" not in tree(data)


# ----------------------------------------------------------------------------- item 6: paths read from files

@pytest.mark.parametrize("entry", ["../victim.txt", "train/../../victim.txt", "/VICTIM", "train2/cat/cat.0.jpg"])
def test_a_demo_marker_never_leads_out_of_train_and_test(tmp_path, entry):
    data = tmp_path / "data"
    data.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    entry = entry.replace("/VICTIM", str(victim))
    (data / helper.DEMO_MARKER).write_text(json.dumps({"files": {"train/cat.0.jpg": "0" * 64, entry: "0" * 64}},
                                                      indent=2, sort_keys=True))
    line = next(i for i, text in enumerate((data / helper.DEMO_MARKER).read_text().splitlines(), 1) if entry in text)
    with pytest.raises(CatDogError, match=re.escape(f"{data / helper.DEMO_MARKER}, line {line}: {entry!r} is not a "
                                                    "file in train/ or test/")):
        run("01", "--data-dir", data, "--demo", 12)
    assert victim.read_text() == "precious"


def write_split(data, text):
    """A split.csv by hand, with the split.json record 01 writes beside it."""
    (data / "split.csv").write_text(text)
    helper.write_json({"split_sha256": helper.file_sha256(data / "split.csv")}, data / "split.json")


@pytest.mark.parametrize("text, source", [
    ("filename,label,subset\ncat.1.jpg,0,train\ndog.1.jpg,1,valid\n", ["kaggle", "kaggle"]),  # an older 01's
    ("filename,label,subset,source\ncat.1.jpg,0,train,kaggle\nbeagle_4.jpg,1,train,oxford-pets\n",
     ["kaggle", "oxford-pets"]),
])
def test_read_split_reads_both_forms(tmp_path, text, source):
    write_split(tmp_path, text)
    split = helper.read_split(tmp_path)
    assert list(split.columns) == ["filename", "label", "subset", "source"] and split.source.tolist() == source
    assert split.label.tolist() == [0, 1]


@pytest.mark.parametrize("text", [
    "garbled", "", "filename,label,subset,source\n",
    "filename,label,subset,source\ncat.1.jpg,0,train,flickr\n",
    "filename,label,subset,source,extra\ncat.1.jpg,0,train,kaggle,1\n",
    "filename,label,source\ncat.1.jpg,0,kaggle\n",
    "filename,label,subset\ncat.1.jpg,2,train\n", "filename,label,subset\ncat.1.jpg,cat,train\n",
    "filename,label,subset\ncat.1.jpg,0,test\n",
])
def test_read_split_refuses_garbage(tmp_path, text):
    write_split(tmp_path, text)
    with pytest.raises(CatDogError, match="is not a split file made by 01_reorganize_data.py: rerun it"):
        helper.read_split(tmp_path)


@pytest.mark.parametrize("name", ["../../../outside/x.jpg", "/etc/passwd", "cat/cat.1.jpg", "..", "a\\b.jpg"])
def test_split_csv_names_are_plain_file_names(tmp_path, name):
    write_split(tmp_path, f"filename,label,subset,source\ncat.1.jpg,0,train,kaggle\n{name},0,valid,kaggle\n")
    with pytest.raises(CatDogError, match=re.escape(f"{tmp_path / 'split.csv'}, line 3: {name!r} is a path")):
        helper.read_split(tmp_path)


def test_a_split_csv_changed_since_01_wrote_it_is_refused(tmp_path):
    run("01", "--data-dir", tmp_path, "--demo", 4)
    assert len(helper.read_split(tmp_path)) == 8
    split = pd.read_csv(tmp_path / "split.csv")
    split.loc[0, "subset"] = "valid" if split.subset[0] == "train" else "train"
    split.to_csv(tmp_path / "split.csv", index=False)
    with pytest.raises(CatDogError, match="split.csv is not the split 01 wrote .*edited or replaced.* rerun 01"):
        helper.read_split(tmp_path)
    (tmp_path / "split.json").unlink()
    with pytest.raises(CatDogError, match=r"split.csv comes without its record in .*split.json.*rerun 01"):
        helper.read_split(tmp_path)
    run("01", "--data-dir", tmp_path)
    assert len(helper.read_split(tmp_path)) == 8


@pytest.mark.parametrize("line", ["train/cat.1.jpg", "../cat.1.jpg", "/data/train/cat.1.jpg", ".."])
def test_an_exclude_line_that_is_a_path_is_refused_with_its_line(tmp_path, line):
    helper.make_demo_dataset(tmp_path, 3)
    (tmp_path / "ex.txt").write_text(f"# suspects\ndog.1.jpg  # fine\n{line}  # not a name\n")
    with pytest.raises(CatDogError, match=re.escape(f"{tmp_path / 'ex.txt'}, line 3: {line!r} is a path, not a "
                                                    "file name: give each image by its file name alone")):
        run("01", "--data-dir", tmp_path, "--exclude", tmp_path / "ex.txt")
    assert not (tmp_path / "split.csv").exists()


# ----------------------------------------------------------------------------- item 12: decompression bombs

def png_claiming(width, height):
    """A tiny PNG whose header claims width x height pixels: Pillow sizes it from the header alone."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("size, strict", [((20000, 20000), False),  # over twice Pillow's limit: an error
                                          ((12000, 10000), True)])  # over it: a warning, an error under -W error
def test_a_decompression_bomb_is_a_named_skip(tmp_path, caplog, size, strict):
    helper.make_demo_dataset(tmp_path, 3)
    (tmp_path / "train" / "cat.50.jpg").write_bytes(png_claiming(*size))
    (tmp_path / "test" / "7.jpg").write_bytes(png_claiming(*size))
    with warnings.catch_warnings(), caplog.at_level("INFO", logger="catdog"):
        if strict:
            warnings.simplefilter("error")
        out = run("01", "--data-dir", tmp_path)
    for name in ("train/cat.50.jpg", "test/7.jpg"):
        assert f"skipped {name}: too many pixels to decode safely, a possible decompression bomb" in caplog.text
    assert "cat.50.jpg" not in set(out["split"].filename) and "7.jpg" not in out["test_names"]


# ----------------------------------------------------------------------------- item 14: messages

def test_exclude_given_a_folder_says_so(tmp_path):
    helper.make_demo_dataset(tmp_path, 3)
    with pytest.raises(CatDogError, match=f"{tmp_path / 'train'} is a folder, not a file: give a text file"):
        run("01", "--data-dir", tmp_path, "--exclude", tmp_path / "train")


@pytest.mark.parametrize("real", ["train.zip", "test.zip", "train/"])
def test_demo_beside_real_data_is_refused_before_writing(tmp_path, real):
    data = tmp_path / "data"
    data.mkdir()
    if real.endswith("/"):
        (data / "train").mkdir()
        (data / "train" / "cat.1.jpg").write_bytes(jpeg_bytes())
    else:
        (data / real).write_bytes(b"PK")
    before = tree(data)
    with pytest.raises(CatDogError, match=r"run 01 without --demo to use them, or give --demo an empty --data-dir"):
        run("01", "--data-dir", data, "--demo", 3)
    assert tree(data) == before


def test_a_test1_folder_of_the_2013_competition_gets_a_quoted_hint(tmp_path):
    data = tmp_path / "my data"
    helper.make_demo_dataset(data, 3)
    os.rename(data / "test", data / "test1")
    with pytest.raises(CatDogError, match="test1 is the test set of the original 2013 competition") as e:
        run("01", "--data-dir", data)
    assert f"mv {shlex.quote(str(data / 'test1'))} {shlex.quote(str(data / 'test'))}" in str(e.value)


@pytest.mark.parametrize("sub", ["train", "test"])
def test_images_one_folder_deeper_get_a_quoted_hint(tmp_path, sub):
    data = tmp_path / "my data"
    helper.make_demo_dataset(data, 3)
    os.rename(data / sub, data / "inner")
    (data / sub).mkdir()
    os.rename(data / "inner", data / sub / sub)
    with pytest.raises(CatDogError, match=f"its images lie one folder deeper, in {re.escape(str(data / sub / sub))}/"
                       ) as e:
        run("01", "--data-dir", data)
    q = shlex.quote
    folder, aside = data / sub, data / f"{sub}.outer"
    command = f"mv {q(str(folder))} {q(str(aside))} && mv {q(str(aside / sub))} {q(str(folder))}"
    assert command in str(e.value)
    subprocess.run(command, shell=True, check=True)  # the advice works
    assert len(run("01", "--data-dir", data)["split"]) == 6


# ----------------------------------------------------------------------------- item 16: one 01 at a time

def test_a_second_01_on_the_same_data_dir_is_refused(tmp_path):
    helper.make_demo_dataset(tmp_path, 3)
    with helper.exclusive_lock(tmp_path / helper.DATA_LOCK, "01"):
        with pytest.raises(CatDogError, match=re.escape(f"another 01 is running on {tmp_path} (pid {os.getpid()})")):
            run("01", "--data-dir", tmp_path)
        assert not (tmp_path / "split.csv").exists()
    run("01", "--data-dir", tmp_path)  # released
    assert (tmp_path / "split.csv").is_file() and not (tmp_path / helper.DATA_LOCK).exists()


def test_the_lock_of_a_killed_01_does_not_block(tmp_path):
    helper.make_demo_dataset(tmp_path, 3)
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); import helper, pathlib; "
            "lock = helper.exclusive_lock(pathlib.Path(sys.argv[2]) / helper.DATA_LOCK, '01'); lock.__enter__(); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CatDogError, match=f"another 01 is running on .* \\(pid {holder.pid}\\)"):
            run("01", "--data-dir", tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    assert (tmp_path / helper.DATA_LOCK).exists()  # left by the killed run, but no longer held
    assert len(run("01", "--data-dir", tmp_path)["split"]) == 6
    assert not (tmp_path / helper.DATA_LOCK).exists()
