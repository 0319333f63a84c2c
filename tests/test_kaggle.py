"""01 --download and 07 --kaggle-submit against a stand-in for the kaggle package: nothing reaches the network."""

import importlib.util
import inspect
import io
import logging
import os
import re
import sys
import types
import zipfile

import pandas as pd
import pytest
import requests
from conftest import run, script

import helper
from helper import CatDogError

COMPETITION = "dogs-vs-cats-redux-kernels-edition"
RULES = f"https://www.kaggle.com/c/{COMPETITION}/rules"


class FakeApi:
    """Records every call in `calls`; downloads write `zips[name]`, unless `fail` names an exception to raise."""

    calls: list = []
    zips: dict = {}
    fail: dict = {}

    def __init__(self):
        self.calls.append(("KaggleApi",))

    def authenticate(self):
        self.calls.append(("authenticate",))

    def competition_download_file(self, competition, file_name, path=None, force=False, quiet=False, unzip=False):
        self.calls.append(("download", competition, file_name, path))
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, file_name), "wb") as f:
            f.write(self.zips[file_name][:100] if "download" in self.fail else self.zips[file_name])
        if "download" in self.fail:
            raise self.fail["download"]

    def competition_submissions(self, competition, group=None, sort=None, page_number=-1, page_token="",
                                page_size=20):
        self.calls.append(("submissions", competition))
        if "submissions" in self.fail:
            raise self.fail["submissions"]
        return []

    def competition_submit(self, file_name, message, competition, quiet=False, sandbox=False):
        # What is uploaded is the file as it is at this moment: written and checked.
        self.calls.append(("submit", file_name, message, competition, pd.read_csv(file_name)))
        if "submit" in self.fail:
            raise self.fail["submit"]
        return types.SimpleNamespace(message="Successfully submitted to Dogs vs. Cats Redux")


def http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status} Client Error", response=response)


@pytest.fixture(scope="module")
def kaggle_zips(tmp_path_factory):
    """train.zip and test.zip as Kaggle ships them (a top folder named like the zip), of demo images."""
    root = tmp_path_factory.mktemp("kaggle_zips")
    helper.make_demo_dataset(root, 3)
    zips = {}
    for sub in ("train", "test"):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for image in sorted((root / sub).iterdir()):
                z.write(image, f"{sub}/{image.name}")
        zips[f"{sub}.zip"] = buf.getvalue()
    return zips


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    """A home without any Kaggle credentials, and no KAGGLE_* variables."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in list(os.environ):
        if name.startswith("KAGGLE_") or name == "XDG_CONFIG_HOME":
            monkeypatch.delenv(name)
    return home


@pytest.fixture
def fake_kaggle(no_credentials, monkeypatch, kaggle_zips):
    """The stand-in installed as the kaggle package, and credentials in the environment."""
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "0123456789abcdef")
    for name in ("kaggle", "kaggle.api"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    extended = types.ModuleType("kaggle.api.kaggle_api_extended")
    extended.KaggleApi = FakeApi
    monkeypatch.setitem(sys.modules, extended.__name__, extended)
    monkeypatch.setattr(FakeApi, "calls", [])
    monkeypatch.setattr(FakeApi, "zips", kaggle_zips)
    monkeypatch.setattr(FakeApi, "fail", {})
    return FakeApi


def names(calls):
    return [c[0] for c in calls]


# ----------------------------------------------------------------------------- 01 --download

def test_download_fetches_both_zips_into_the_data_dir_and_unpacks_them(tmp_path, fake_kaggle):
    data = tmp_path / "data"
    out = run("01", "--data-dir", data, "--download")
    assert fake_kaggle.calls == [("KaggleApi",), ("authenticate",),
                                 ("download", COMPETITION, "train.zip", str(data / ".kaggle-download")),
                                 ("download", COMPETITION, "test.zip", str(data / ".kaggle-download"))]
    assert (data / "train.zip").is_file() and (data / "test.zip").is_file()
    assert not (data / ".kaggle-download").exists()
    assert sorted(os.listdir(data / "train")) == [f"{c}.{i}.jpg" for c in ("cat", "dog") for i in range(3)]
    assert len(out["split"]) == 6 and out["test_names"] == ["1.jpg", "2.jpg"]


def test_download_skips_what_is_there_and_says_so(tmp_path, fake_kaggle, kaggle_zips, caplog, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.zip").write_bytes(kaggle_zips["train.zip"])
    with caplog.at_level(logging.INFO, logger="catdog"):
        run("01", "--data-dir", data, "--download")
    assert [c[2] for c in fake_kaggle.calls if c[0] == "download"] == ["test.zip"]
    assert f"{data / 'train.zip'} is already there: train.zip not downloaded" in caplog.text

    # Both there (now unpacked): Kaggle is not asked at all, so no credentials are needed.
    fake_kaggle.calls.clear()
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(name)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="catdog"):
        run("01", "--data-dir", data, "--download")
    assert fake_kaggle.calls == []
    assert f"{data / 'train'}/ is already there: train.zip not downloaded" in caplog.text
    assert f"{data / 'test'}/ is already there: test.zip not downloaded" in caplog.text


def test_download_without_credentials_is_refused_before_any_work(tmp_path, fake_kaggle, capsys, monkeypatch):
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(name)
    data = tmp_path / "data"
    module = script("01")
    with pytest.raises(SystemExit) as exit_:
        helper.run_cli(module.main, module.parse_args(["--data-dir", str(data), "--download"]))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --download needs Kaggle API credentials") and "\n" not in err
    for needed in ("https://www.kaggle.com/settings", "kaggle.json", "mode 600", "KAGGLE_USERNAME and KAGGLE_KEY"):
        assert needed in err
    assert fake_kaggle.calls == [] and not data.exists()


def test_download_forbidden_asks_to_accept_the_rules(tmp_path, fake_kaggle):
    fake_kaggle.fail["download"] = http_error(403)
    data = tmp_path / "data"
    with pytest.raises(CatDogError, match="403 Forbidden while downloading train.zip: accept the competition's "
                                          f"rules at {RULES}"):
        run("01", "--data-dir", data, "--download")
    assert not (data / "train.zip").exists()


def test_interrupted_download_never_passes_for_a_zip(tmp_path, fake_kaggle):
    """A half download stays in the stage (where kaggle resumes it), not as data/train.zip, which 01 would skip."""
    fake_kaggle.fail["download"] = requests.ConnectionError("connection reset")
    data = tmp_path / "data"
    with pytest.raises(CatDogError, match="could not reach Kaggle while downloading train.zip"):
        run("01", "--data-dir", data, "--download")
    assert not (data / "train.zip").exists() and (data / ".kaggle-download" / "train.zip").is_file()
    del fake_kaggle.fail["download"]
    run("01", "--data-dir", data, "--download")
    assert (data / "train").is_dir() and not (data / ".kaggle-download").exists()


def test_download_and_demo_exclude_each_other():
    with pytest.raises(SystemExit):
        script("01").parse_args(["--download", "--demo", "3"])


# ----------------------------------------------------------------------------- credentials (helper's, 01's and 07's)

@pytest.mark.parametrize("flag", ["--download", "--kaggle-submit"])
def test_credentials_where_kaggle_looks(flag, tmp_path, fake_kaggle, monkeypatch, caplog):
    assert helper.kaggle_api(flag).calls[-1] == ("authenticate",)  # KAGGLE_USERNAME + KAGGLE_KEY
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(name)
    config = tmp_path / "config"
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(config))
    with pytest.raises(CatDogError, match=f"{flag} needs Kaggle API credentials .* as "
                                          f"{re.escape(str(config / 'kaggle.json'))} with mode 600"):
        helper.kaggle_api(flag)
    config.mkdir()
    (config / "kaggle.json").write_text('{"username": "someone", "key": "0123456789abcdef"}')
    (config / "kaggle.json").chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="catdog"):
        helper.kaggle_credentials(flag)
        assert caplog.text == ""
        (config / "kaggle.json").chmod(0o644)
        helper.kaggle_credentials(flag)
    assert f"run chmod 600 {config / 'kaggle.json'}" in caplog.text
    (config / "kaggle.json").write_text("not json")
    with pytest.raises(CatDogError, match="is not the JSON kaggle.json"):
        helper.kaggle_credentials(flag)
    monkeypatch.delenv("KAGGLE_CONFIG_DIR")
    (tmp_path / "home" / ".kaggle").mkdir()
    (tmp_path / "home" / ".kaggle" / "access_token").write_text("KGAT_0123")  # kaggle >= 2's token file
    helper.kaggle_credentials(flag)


def test_the_real_kaggle_package_takes_these_calls(fake_kaggle, monkeypatch):
    """The calls the stand-in answers fit the installed kaggle's KaggleApi (no request is made: legacy
    credentials are checked locally)."""
    for name in ("kaggle", "kaggle.api", "kaggle.api.kaggle_api_extended"):
        monkeypatch.delitem(sys.modules, name)
    if not importlib.util.find_spec("kaggle"):
        pytest.skip("kaggle is not installed (pip install -r requirements.txt)")
    api = helper.kaggle_api("--download")
    assert type(api).__name__ == "KaggleApi" and api.get_config_value("username") == "someone"
    inspect.signature(api.competition_download_file).bind(COMPETITION, "train.zip", path="data/.kaggle-download",
                                                          quiet=False, unzip=True)
    inspect.signature(api.competition_submit).bind("s.csv", "msg", COMPETITION)
    inspect.signature(api.competition_submissions).bind(COMPETITION)


# ----------------------------------------------------------------------------- 07 --kaggle-submit

def submit_args(pipeline, out):
    return ("07", "--data-dir", pipeline["data"], "--model-dir", pipeline["model"], "--output", out)


@pytest.fixture
def loads(monkeypatch, fake_kaggle):
    """helper.load_model, noting each call in the stand-in's log."""
    real = helper.load_model

    def load_model(path):
        fake_kaggle.calls.append(("load_model",))
        return real(path)

    monkeypatch.setattr(helper, "load_model", load_model)
    return fake_kaggle.calls


def test_submit_uploads_the_checked_csv_with_the_message(pipeline, tmp_path, fake_kaggle, loads):
    out = tmp_path / "s.csv"
    sub = run(*submit_args(pipeline, out), "--kaggle-submit", "merged head, seed 2018")
    assert names(fake_kaggle.calls) == ["KaggleApi", "authenticate", "submissions", "load_model", "submit"]
    _, file_name, message, competition, uploaded = fake_kaggle.calls[-1]
    assert (file_name, message, competition) == (str(out), "merged head, seed 2018", COMPETITION)
    pd.testing.assert_frame_equal(uploaded, sub)


def test_submit_forbidden_asks_to_accept_the_rules_and_keeps_the_csv(pipeline, tmp_path, fake_kaggle, loads):
    fake_kaggle.fail["submit"] = http_error(403)
    out = tmp_path / "s.csv"
    with pytest.raises(CatDogError, match=f"403 Forbidden while submitting {out}: accept the competition's rules "
                                          f"at {RULES}"):
        run(*submit_args(pipeline, out), "--kaggle-submit", "msg")
    assert out.is_file()


def test_unaccepted_rules_are_found_before_any_work(pipeline, tmp_path, fake_kaggle, loads):
    fake_kaggle.fail["submissions"] = http_error(403)
    out = tmp_path / "s.csv"
    with pytest.raises(CatDogError, match=f"403 Forbidden while checking access to {helper.KAGGLE_COMPETITION}: "
                                          f"accept the competition's rules at {RULES}"):
        run(*submit_args(pipeline, out), "--kaggle-submit", "msg")
    assert not out.exists() and "load_model" not in names(loads)  # no model loaded, nothing written


def test_submit_without_credentials_is_refused_before_the_model_loads(pipeline, tmp_path, fake_kaggle, loads,
                                                                      monkeypatch):
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(name)
    out = tmp_path / "s.csv"
    with pytest.raises(CatDogError, match="--kaggle-submit needs Kaggle API credentials .*kaggle.com/settings"):
        run(*submit_args(pipeline, out), "--kaggle-submit", "msg")
    assert fake_kaggle.calls == [] and not out.exists()


def test_submit_message_must_not_be_empty():
    with pytest.raises(SystemExit):
        script("07").parse_args(["--kaggle-submit", " "])
