"""The Kaggle API: credentials checked before any work, an authenticated client, Kaggle's refusals and network
failures as one line saying what to do, and the download of the competition's data.

Used by: 01 --download and 07 --kaggle-submit.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

from .common import CatDogError, log
from .files import no_space

KAGGLE_COMPETITION = "dogs-vs-cats-redux-kernels-edition"
KAGGLE_RULES = f"https://www.kaggle.com/c/{KAGGLE_COMPETITION}/rules"
KAGGLE_FILES = ("train.zip", "test.zip")
# Kaggle writes (and resumes) a download in place: staged here, a half file never passes for a finished zip.
DOWNLOAD_STAGE = ".kaggle-download"


def kaggle_credentials(flag: str) -> None:
    """Refuse `flag` when the kaggle package would find no credentials; reads files and variables only, so a
    missing token is reported before any work, without importing kaggle or reaching the network."""
    env, home = os.environ, Path.home()
    # What kaggle >= 2 accepts besides kaggle.json: an access token, or `kaggle auth login`'s OAuth file.
    if env.get("KAGGLE_API_TOKEN") or any((home / ".kaggle" / f).is_file()
                                          for f in ("access_token", "access_token.txt", "credentials.json")):
        return
    # kaggle's own lookup: $KAGGLE_CONFIG_DIR, else ~/.kaggle, else (when that is missing) the XDG folder.
    config_dir = Path(env.get("KAGGLE_CONFIG_DIR") or (home / ".kaggle" if (home / ".kaggle").exists() else
                                                       Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "kaggle"))
    config = config_dir / "kaggle.json"
    wanted = config if env.get("KAGGLE_CONFIG_DIR") else home / ".kaggle" / "kaggle.json"  # where to put one
    values = {}
    if config.is_file():
        try:
            values = json.loads(config.read_text())
        except (OSError, ValueError):  # unreadable, garbled or not UTF-8
            values = None
        if not isinstance(values, dict):
            raise CatDogError(f"{flag}: {config} is not the JSON kaggle.json Kaggle gives: create a new API token "
                              "at https://www.kaggle.com/settings and save its kaggle.json there (chmod 600)")
        if config.stat().st_mode & 0o044:
            log.warning(f"{config} is readable by other users: run chmod 600 {config}")
    values.update({k: env[f"KAGGLE_{k.upper()}"] for k in ("username", "key") if env.get(f"KAGGLE_{k.upper()}")})
    if not (values.get("username") and values.get("key")):
        raise CatDogError(f"{flag} needs Kaggle API credentials and found none: create an API token at "
                          f"https://www.kaggle.com/settings and save its kaggle.json as {wanted} with mode 600 "
                          "(chmod 600), or set KAGGLE_USERNAME and KAGGLE_KEY")


def kaggle_api(flag: str):
    """An authenticated kaggle KaggleApi for `flag`, or one clear error before any work.

    kaggle is imported only here: importing it authenticates, and prints its own long help when that fails.
    """
    kaggle_credentials(flag)
    try:
        with contextlib.redirect_stdout(io.StringIO()), kaggle_call(f"checking the Kaggle credentials for {flag}"):
            from kaggle.api.kaggle_api_extended import KaggleApi
            api = KaggleApi()
            api.authenticate()
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("kaggle"):  # kaggle or kagglesdk: an incomplete install
            raise
        raise CatDogError(f"{flag} needs the kaggle package: pip install -r requirements.txt") from None
    except SystemExit:  # authenticate() exits when no credential works, e.g. an expired access token
        raise CatDogError(f"{flag}: Kaggle accepted none of the credentials found: create a new API token at "
                          "https://www.kaggle.com/settings and save its kaggle.json in ~/.kaggle/ with mode 600, "
                          "or set KAGGLE_USERNAME and KAGGLE_KEY") from None
    return api


@contextlib.contextmanager
def kaggle_call(doing: str) -> Iterator[None]:
    """Kaggle's refusals and network failures, as one line saying what to do."""
    import requests
    try:
        yield
    except requests.HTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 403:
            raise CatDogError(f"Kaggle answered 403 Forbidden while {doing}: accept the competition's rules at "
                              f"{KAGGLE_RULES} (signed in as the account of your API token), then rerun") from e
        if status == 401:
            raise CatDogError(f"Kaggle answered 401 Unauthorized while {doing}: the API token is wrong or revoked; "
                              "create a new one at https://www.kaggle.com/settings and replace kaggle.json "
                              "(or KAGGLE_USERNAME and KAGGLE_KEY)") from e
        raise CatDogError(f"Kaggle answered {status or 'an error'} while {doing} ({e}): rerun later") from e
    except requests.RequestException as e:
        raise CatDogError(f"could not reach Kaggle while {doing} ({type(e).__name__}): check the network "
                          "connection and rerun") from e



def unwrap(path: Path) -> None:
    """Kaggle's server may wrap a single file in a zip of the same name (train.zip holding only train.zip); newer
    kaggle clients unwrap it (their unzip=True), the one pinned here does not: unwrap it in place."""
    if not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as z:
        if z.namelist() != [path.name]:
            return  # the archive itself (train.zip holds train/...)
        tmp = path.with_name(path.name + ".unwrapping")
        with z.open(path.name) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, path)


def download_competition(data: Path) -> None:
    """Download the competition's train.zip and test.zip into `data` (01 --download), each unless it or its folder
    is there. Kaggle is not asked (nor credentials needed) when both are. A download interrupted is resumed by a
    rerun."""
    if data.exists() and not data.is_dir():
        raise CatDogError(f"--data-dir {data} is a file, not a folder: give the folder to download into")
    missing = []
    for name in KAGGLE_FILES:
        folder, archive = data / Path(name).stem, data / name
        if folder.is_dir() or archive.is_file():
            have = f"{folder}/" if folder.is_dir() else str(archive)
            log.info(f"--download: {have} is already there: {name} not downloaded")
        else:
            missing.append(name)
    if not missing:
        return
    api = kaggle_api("--download")
    stage = data / DOWNLOAD_STAGE
    for name in missing:
        log.info(f"downloading {name} of {KAGGLE_COMPETITION} from Kaggle into {data}/")
        try:
            with kaggle_call(f"downloading {name}"):
                api.competition_download_file(KAGGLE_COMPETITION, name, path=str(stage), quiet=False)
            unwrap(stage / name)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                shutil.rmtree(stage, ignore_errors=True)
                raise no_space(data, f"downloading {name}", 0) from e
            raise
        if not (stage / name).is_file():
            raise CatDogError(f"Kaggle's download of {name} left no {stage / name}: rerun; if it happens again, "
                              f"download {name} from {KAGGLE_RULES.removesuffix('/rules')}/data into {data}/")
        os.replace(stage / name, data / name)
    shutil.rmtree(stage, ignore_errors=True)
