"""Duplicate images (catdog/duplicates.py, 01): exact and near duplicates found, none missed, no false groups at the
documented threshold; the split and the folds keep groups together and are exactly the old ones without groups;
01's test-name messages and its record of every unusable test entry."""

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run

import catdog.checks
import helper
from catdog.demo import demo_image, demo_size
from helper import CatDogError


def photo(rng, w=None, h=None):
    """A photo-like image: a smooth random colour field with a few ellipses."""
    from PIL import Image, ImageDraw
    w, h = w or int(rng.integers(300, 501)), h or int(rng.integers(300, 501))
    im = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        draw.ellipse([x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200))],
                     fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return im


def encoded(im, fmt="JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def hashes_of(data: bytes) -> dict:
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return helper.image_hashes(im)


def table(files: dict[str, bytes]) -> pd.DataFrame:
    rows = [{"file": f, "part": "test" if f[0].isdigit() else "train",
             "label": -1 if f[0].isdigit() else int(f.startswith("dog")), **hashes_of(b)} for f, b in files.items()]
    return pd.DataFrame(rows)


def test_exact_reencoded_and_resized_copies_are_grouped_and_nothing_else():
    from PIL import Image
    rng = np.random.default_rng(3)
    files = {f"cat.{i}.jpg": encoded(photo(rng), quality=85) for i in range(40)}
    files |= {f"{i}.jpg": encoded(photo(rng), quality=85) for i in range(1, 41)}
    decoded = Image.open(io.BytesIO(files["cat.1.jpg"])).convert("RGB")
    copies = {"100.jpg": files["cat.1.jpg"],                                       # the same bytes
              "101.jpg": encoded(decoded, "PNG"),                                  # other bytes, the same pixels
              "dog.200.jpg": encoded(Image.open(io.BytesIO(files["cat.2.jpg"])), quality=55),     # re-encoded
              "102.jpg": encoded(Image.open(io.BytesIO(files["3.jpg"])).resize((200, 150)), quality=80),  # resized
              "dog.201.jpg": encoded(Image.open(io.BytesIO(files["4.jpg"])).convert("RGB").resize(
                  (256, 256)), quality=90)}
    groups = helper.find_groups(table(files | copies))
    found = sorted(sorted(g.file) for _, g in groups.groupby("group"))
    assert found == sorted([sorted(["cat.1.jpg", "100.jpg", "101.jpg"]), ["cat.2.jpg", "dog.200.jpg"],
                            ["102.jpg", "3.jpg"], ["4.jpg", "dog.201.jpg"]])
    exact = groups.set_index("file").pixels
    assert exact["cat.1.jpg"] == exact["100.jpg"] == exact["101.jpg"] and exact["cat.2.jpg"] != exact["dog.200.jpg"]
    assert helper.duplicate_summary(groups) == {"groups": 4, "images": 9, "cross": 2, "mixed": 1}
    assert list(groups.columns) == list(helper.DUPLICATE_COLUMNS)


def test_no_false_groups_among_different_flat_demo_images():
    # The demo's flat, noisy images are the hard case for a perceptual hash (pHash alone pairs some of them).
    rng = np.random.default_rng(0)
    files = {f"{'cat' if i % 2 == 0 else 'dog'}.{i}.jpg":
             encoded(demo_image(rng, i % 2, *demo_size(rng)), quality=85) for i in range(150)}
    t = table(files)
    assert helper.find_groups(t).empty
    h = np.array([int(x, 16) for x in t.phash], dtype=np.uint64)
    assert (np.bitwise_count(h[:, None] ^ h[None, :]) <= helper.NEAR_BITS).sum() > len(h)  # pHash alone: false pairs


def test_near_pairs_are_every_pair_within_the_threshold():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2**63, 300, dtype=np.int64).astype(np.uint64)
    flips = rng.integers(0, 64, (300, 12))
    h = base.copy()
    for k in range(150, 300):  # the second half: copies of the first with 0..12 flipped bits
        h[k] = base[k - 150]
        for b in flips[k][:k % 13]:
            h[k] ^= np.uint64(1) << np.uint64(b)
    rgb = rng.integers(100, 112, (300, 3))  # close colours: many pairs within 3 levels, many not
    colour = [bytes(v.astype(np.uint8).tolist()).hex() for v in rgb]
    got = {tuple(p) for p in helper.near_pairs([f"{int(x):016x}" for x in h], colour, chunk=16).tolist()}
    want = {(i, j) for i in range(300) for j in range(i + 1, 300) if bin(int(h[i]) ^ int(h[j])).count("1") <= 10
            and np.abs(rgb[i] - rgb[j]).max() <= 3}
    assert got == want and len(want) > 10


# ----------------------------------------------------------------------------- split and folds


def old_stratified_split(labels, valid_frac, seed):
    """The split before duplicate groups (the reference: today's figures must stay comparable)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    valid = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        valid[rng.permutation(rows)[:int(round(len(rows) * valid_frac))]] = True
    return valid


def old_fold_assignment(labels, folds, seed, held_out):
    labels, fold = np.asarray(labels).astype(int), np.full(len(labels), -1)
    rng = np.random.default_rng(seed)
    for c in np.unique(labels[held_out]):
        rows = rng.permutation(np.flatnonzero((labels == c) & held_out))
        fold[rows] = np.arange(len(rows)) % folds
    return fold


@pytest.mark.parametrize("n,seed", [(25, 0), (61, 2018), (1000, 7)])
def test_split_and_folds_are_exactly_the_old_ones_without_groups(n, seed):
    rng = np.random.default_rng(n)
    labels, held = rng.integers(0, 2, n), rng.random(n) < 0.9
    for groups in (None, np.full(n, -1), np.arange(n)):  # no groups, none of two rows: the plain deal
        assert (helper.stratified_split(labels, 0.2, seed, groups) == old_stratified_split(labels, 0.2, seed)).all()
        assert (helper.fold_assignment(labels, 3, seed, held, groups) == old_fold_assignment(labels, 3, seed, held)
                ).all()


def test_split_and_folds_keep_each_group_on_one_side():
    rng = np.random.default_rng(5)
    n = 600
    labels = rng.integers(0, 2, n)
    groups = np.full(n, -1)
    groups[:120] = np.repeat(np.arange(40), 3)  # 40 groups of three
    labels[:120] = np.repeat(rng.integers(0, 2, 40), 3)
    groups[120:124] = 99  # a group of a cat and a dog... and two more
    labels[120:124] = [0, 1, 1, 0]
    valid = helper.stratified_split(labels, 0.2, 1, groups)
    fold = helper.fold_assignment(labels, 5, 1, None, groups)
    for g in set(groups[groups >= 0].tolist()):
        assert len(set(valid[groups == g].tolist())) == 1 and len(set(fold[groups == g].tolist())) == 1
    for c in (0, 1):
        assert abs(valid[labels == c].mean() - 0.2) < 0.02
        sizes = np.bincount(fold[labels == c], minlength=5)
        assert sizes.max() - sizes.min() <= 4
    assert not (valid == old_stratified_split(labels, 0.2, 1)).all()


def test_group_ids():
    groups = pd.DataFrame({"group": [1, 1, 2, 2], "file": ["cat.1.jpg", "cat.2.jpg", "dog.1.jpg", "5.jpg"],
                           "part": ["train", "train", "train", "test"], "label": ["cat", "cat", "dog", ""],
                           "pixels": ["a", "b", "c", "c"]})
    files = ["cat.1.jpg", "cat.2.jpg", "cat.3.jpg", "dog.1.jpg"]
    assert helper.group_ids(files, groups).tolist() == [1, 1, -1, 2]
    assert helper.group_ids(["cat.3.jpg", "dog.1.jpg"], groups) is None  # no two rows share a group: plain
    assert helper.known_test_labels(groups, {"dog.1.jpg": 1, "cat.1.jpg": 0}) == ({"5.jpg": 1}, [])


# ----------------------------------------------------------------------------- 01


def test_01_finds_the_demos_duplicates_keeps_them_together_and_reruns_for_free(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="catdog")
    out = run("01", "--data-dir", tmp_path, "--demo", 25)  # from 25 per class the demo holds two duplicates
    dups = pd.read_csv(tmp_path / helper.DUPLICATES_CSV, keep_default_na=False)
    assert sorted(sorted(g.file) for _, g in dups.groupby("group")) == [["13.jpg", "cat.24.jpg"],
                                                                         ["dog.24.jpg", "dog.25.jpg"]]
    assert "duplicates: 2 groups of 4 images" in caplog.text and "1 across train and test" in caplog.text
    split = out["split"].set_index("filename")
    assert split.subset["dog.24.jpg"] == split.subset["dog.25.jpg"]
    meta = json.loads((tmp_path / helper.SPLIT_META).read_text())
    assert meta["group_duplicates"] is True and meta["test_unusable"] == []
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.csv")}
    monkeypatch.setattr(catdog.checks, "check_image", lambda p: pytest.fail(f"{p} decoded again"))
    run("01", "--data-dir", tmp_path, "--demo", 25)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.csv")} == before


def test_01_no_group_duplicates_is_the_plain_split(tmp_path):
    run("01", "--data-dir", tmp_path, "--demo", 8)
    src = tmp_path / "train"
    for i in range(8):  # make many duplicate pairs so that grouping changes the split
        shutil.copy(src / f"cat.{i}.jpg", src / f"cat.{100 + i}.jpg")
    grouped = run("01", "--data-dir", tmp_path)["split"]
    plain = run("01", "--data-dir", tmp_path, "--no-group-duplicates")["split"]
    assert json.loads((tmp_path / helper.SPLIT_META).read_text())["group_duplicates"] is False
    assert (plain.subset == np.where(old_stratified_split(plain.label, 0.2, helper.DEFAULT_SEED), "valid", "train")
            ).all()
    sub = grouped.set_index("filename").subset
    assert all(sub[f"cat.{i}.jpg"] == sub[f"cat.{100 + i}.jpg"] for i in range(8))


def test_a_group_of_a_cat_and_a_dog_goes_to_the_suspects_list(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="catdog")
    run("01", "--data-dir", tmp_path, "--demo", 4)
    shutil.copy(tmp_path / "train" / "cat.2.jpg", tmp_path / "train" / "dog.77.jpg")
    run("01", "--data-dir", tmp_path)
    assert "1 holding a cat and a dog" in caplog.text
    lines = (tmp_path / helper.DUPLICATE_SUSPECTS).read_text().splitlines()
    assert [ln.split()[0] for ln in lines if not ln.startswith("#")] == ["cat.2.jpg", "dog.77.jpg"]
    assert helper.read_name_list(tmp_path / helper.DUPLICATE_SUSPECTS) == ["cat.2.jpg", "dog.77.jpg"]


def test_test_names_that_cannot_be_kaggle_ids_get_a_clear_message_and_every_unusable_entry_is_recorded(
        tmp_path, caplog):
    run("01", "--data-dir", tmp_path, "--demo", 4)
    test = tmp_path / "test"
    jpg = (test / "1.jpg").read_bytes()
    for name in ("0.jpg", "99999999999999999999.jpg", "7.JPG", "8.jpeg", "notes.txt"):
        (test / name).write_bytes(jpg)
    (test / "9.jpg").write_bytes(b"")
    (test / "010.jpg").write_bytes(jpg)
    caplog.set_level(logging.INFO, logger="catdog")
    run("01", "--data-dir", tmp_path)
    text = caplog.text
    assert "test id 0 is not a Kaggle id" in text and "beyond any Kaggle id" in text
    assert "7.JPG: not Kaggle's name for test id 7: rename it 7.jpg" in text
    assert "010.jpg: not Kaggle's name for test id 10" in text  # kept, but said
    meta = json.loads((tmp_path / helper.SPLIT_META).read_text())
    ids = {n: i for n, i, _ in meta["test_unusable"]}
    assert ids == {"0.jpg": None, "99999999999999999999.jpg": None, "7.JPG": 7, "8.jpeg": 8, "9.jpg": 9,
                   "notes.txt": None}
    last = caplog.records[-1]
    assert last.levelname == "WARNING" and last.message.startswith("6 test entries") and "9.jpg" in last.message
    assert 10 in helper.laid_out_test_ids(tmp_path)  # 02 reads them without an OverflowError
    assert helper.unusable_test_entries(tmp_path)[0][0] == "0.jpg"


def test_a_garbled_duplicates_file_is_refused(tmp_path):
    (tmp_path / helper.DUPLICATES_CSV).write_text("what,ever\n1,2\n")
    with pytest.raises(CatDogError, match="not a duplicates file made by 01"):
        helper.read_duplicates(tmp_path)
    assert helper.read_duplicates(tmp_path / "nowhere") is None
    assert Path(tmp_path).is_dir()
