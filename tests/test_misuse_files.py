"""Files a run leaves or meets (issue #19): dead runs' temp files are removed and never listed as results, writes
never follow a symlink out of their folder, 16-bit images decode as their 8-bit selves everywhere, the advice for
an image only TensorFlow cannot decode, and progress in a log file."""

import shutil
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import extract, run, script

import helper
from helper import CatDogError


@pytest.fixture
def pids():
    """(a pid that is dead, a pid that is alive): a process that has exited, and one sleeping till the test ends."""
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield done.pid, alive.pid
    alive.kill()
    alive.wait()


def test_dead_runs_temps_are_removed_and_never_listed(pipeline, pids, tmp_path):
    """A kill during model.save leaves `.NAME.keras.<pid>.N.partial.keras`: 07 --blend auto must not take it for a
    model, and the next run writing into that folder removes it, but not a temp of a process still running."""
    dead, alive = pids
    models = tmp_path / "model"
    for step in (helper.SINGLE_DIR, helper.MERGE_DIR):
        shutil.copytree(pipeline["model"] / step, models / step)
    single = models / helper.SINGLE_DIR
    stale = [single / f".ResNet50.keras.{dead}.3.partial.keras", single / f".ResNet50.json.{dead}.4.partial",
             single / f".{helper.RESULTS_CSV}.{dead}.0.partial"]
    live = single / f".Xception.keras.{alive}.0.partial.keras"
    hidden_kfold = single / f".ResNet50_k3.{dead}.0.partial"
    for p in [*stale, live]:
        p.write_bytes(b"half a file")
    hidden_kfold.mkdir()
    (hidden_kfold / helper.KFOLD_SUMMARY).write_text("{}")
    listed = script("07").auto_models(models, kfold_only=False)
    assert listed and not [p for p in listed if p.name.startswith(".")]
    assert listed == script("07").auto_models(models)  # no K-fold folder: the hidden one is not one

    sub = tmp_path / "submissions" / "blend.csv"
    run("07", "--data-dir", pipeline["data"], "--model-dir", models, "--output", sub, "--blend", "auto")
    assert sub.is_file()
    with pytest.raises(CatDogError, match="temp file of an unfinished"):
        script("07").locate(str(stale[0]), models)

    run("03", "--data-dir", pipeline["data"], "--model-dir", models, "--models", "ResNet50", "--epochs", 1,
        "--batch-size", 16)
    assert not [p for p in [*stale, hidden_kfold] if p.exists()]
    assert live.read_bytes() == b"half a file"  # its writer is still running
    assert (single / "ResNet50.keras").is_file()


def test_feature_folder_temps_of_dead_runs_are_removed(pids, tmp_path):
    """02 and 04 write through FeatureWriter: a killed extraction's `.X.h5.<pid>.0.partial` (GBs for 04's maps)
    goes when the next one starts; a running one's stays; a file of ours that is not a temp name stays."""
    dead, alive = pids
    folder = tmp_path / helper.FEATURES
    folder.mkdir()
    stale, live = folder / f".ResNet50.h5.{dead}.0.partial", folder / f".VGG16.h5.{alive}.0.partial"
    mine = folder / ".notes.partial"  # not temp_name's pattern: not ours to remove
    for p in (stale, live, mine):
        p.write_bytes(b"x")
    path = folder / "X.h5"
    with helper.FeatureWriter(path, ["cat.1.jpg"], [0], [1], (2,), "float32", {}) as writer:
        writer.append("labelled", np.ones((1, 2), np.float32))
        writer.append("test", np.ones((1, 2), np.float32))
        writer.commit()
    assert not stale.exists() and live.exists() and mine.exists()
    assert helper.feature_file_state(path)["complete"]


def test_own_temps_in_flight_are_kept_and_a_reused_pid_is_cleaned(tmp_path):
    """save_model writes the sidecar while the model's own temp exists: the cleanup of that write must leave this
    process's temps alone, yet one of our pid that this process did not make (an earlier run, in a container,
    with the same pid) is stale."""
    import os
    earlier = tmp_path / f".old.csv.{os.getpid()}.99999.partial"
    earlier.write_text("x")
    with helper.atomic_path(tmp_path / "a.keras", suffix=".keras") as outer:
        outer.write_text("model")
        helper.write_json({"k": 1}, tmp_path / "a.json")
        assert outer.read_text() == "model"
    assert (tmp_path / "a.keras").read_text() == "model" and not earlier.exists()


def test_writes_never_follow_a_symlink_out_of_their_folder(tmp_path):
    outside = tmp_path / "thesis"
    outside.mkdir()
    victim = outside / "chapter1.txt"
    victim.write_text("years of work")
    folder = tmp_path / "submissions"
    folder.mkdir()
    link = folder / "submission.csv"
    link.symlink_to(victim)
    with pytest.raises(CatDogError, match=r"submission.csv is a symlink to .*chapter1.txt, outside its folder"):
        helper.write_csv(pd.DataFrame({"id": [1], "label": [0.5]}), link)
    (folder / "dots.json").symlink_to("../thesis/new.json")  # relative, and to a file not there yet
    with pytest.raises(CatDogError, match="outside its folder"):
        helper.write_json({"a": 1}, folder / "dots.json")
    assert sorted(p.name for p in outside.iterdir()) == ["chapter1.txt"]
    assert victim.read_text() == "years of work" and link.is_symlink()
    # A link within its folder still works: the file it names is replaced, the link stays.
    real, alias = folder / "real.json", folder / "latest.json"
    real.write_text("{}")
    alias.symlink_to("real.json")
    helper.write_json({"b": 2}, alias)
    assert alias.is_symlink() and '"b": 2' in real.read_text()


def sixteen_bit_pair(tmp_path):
    """A 16-bit grayscale PNG and the 8-bit PNG of the same picture."""
    from PIL import Image
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (40, 60)).astype(np.uint8)
    deep, flat = tmp_path / "deep.png", tmp_path / "flat.png"
    Image.fromarray(grey.astype(np.uint16) * 257).save(deep)  # mode I;16
    Image.fromarray(grey).save(flat)
    with Image.open(deep) as im:
        assert im.mode.startswith("I;16")
    return deep, flat


def test_sixteen_bit_images_decode_like_their_8_bit_version_in_02_predict_and_08(tmp_path):
    """02's Pillow decoder (plain and an augmented view), and load_pixels (predict.py and 08): one conversion."""
    import tensorflow as tf
    deep, flat = sixteen_bit_pair(tmp_path)
    plain = [helper.load_resized(tf.constant(str(p)), 32).numpy() for p in (deep, flat)]
    np.testing.assert_array_equal(plain[0], plain[1])
    assert plain[0].max() < 255  # not clipped to white
    params = helper.view_params(1, ["train/deep.png"], 3)[0]
    views = [helper.load_resized(tf.constant(str(p)), 32, params=tf.constant(params)).numpy() for p in (deep, flat)]
    np.testing.assert_array_equal(views[0], views[1])
    pixels = [helper.load_pixels(p, 32) for p in (deep, flat)]
    np.testing.assert_array_equal(pixels[0], pixels[1])
    np.testing.assert_array_equal(pixels[0].astype(np.float32), plain[0])  # 02's pixels are the export's


def test_animated_gif_with_tf_decoder_gets_advice_that_helps(small_data, monkeypatch, capfd):
    """01 keeps an animated GIF (Pillow reads it), so "rerun 01" would loop: say to use --decoder pil or convert
    it. Then 02 with stderr in a log file: plain progress lines, no carriage-return frames."""
    from PIL import Image
    frames = [Image.new("RGB", (40, 30), c) for c in ((200, 30, 30), (30, 200, 30))]
    gif = small_data / "train" / "dog.3.jpg"
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    assert helper.check_image(gif)["problem"] == ""  # what 01 accepts
    with pytest.raises(CatDogError, match=r"cannot decode .*dog.3.jpg with --decoder tf .*animated GIF.*Pillow "
                                          r"reads it, so 01 keeps it: extract with --decoder pil.*or convert"):
        extract(small_data, "--decoder", "tf")
    capfd.readouterr()
    monkeypatch.setattr("catdog.common.PROGRESS_SECONDS", 0.0)
    extract(small_data)  # Pillow decodes it
    err = capfd.readouterr().err
    assert "\r" not in err
    assert "VGG16 labelled: batch 1/" in err and ", done in" in err
    with h5py.File(helper.feature_path(small_data, "VGG16"), "r") as f:
        assert f.attrs["complete"]


def test_progress_without_a_terminal_is_plain_lines(monkeypatch, capfd):
    monkeypatch.setattr("catdog.common.PROGRESS_SECONDS", 0.0)
    assert list(helper.progress(range(3), "predict test")) == [0, 1, 2]
    err = capfd.readouterr().err
    assert "\r" not in err and err.splitlines() == ["predict test: batch 1/3, 0 s", "predict test: batch 2/3, 0 s",
                                                    "predict test: batch 3/3, 0 s",
                                                    "predict test: batch 3/3, done in 0 s"]
    monkeypatch.setattr("catdog.common.PROGRESS_SECONDS", 3600.0)
    assert list(helper.progress(iter(range(3)), "quick", unit="file")) == [0, 1, 2]
    assert capfd.readouterr().err == ""  # a short loop says nothing: the summary lines stay readable
