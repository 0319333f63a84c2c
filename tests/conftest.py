"""Shared fixtures: the numbered scripts loaded as modules, and demo datasets run through the pipeline."""

import hashlib
import importlib.util
import io
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SCRIPTS = {p.stem.split("_", 1)[0]: p for p in ROOT.glob("0[0-9]_*.py")}
_loaded = {}

# Small images keep the CNNs fast on 2 cores; batch 16 gives the heads several steps per epoch on ~50 rows.
IMAGE_SIZE = "75"
HEAD = ["--batch-size", "16"]


def script(number: str):
    """The numbered script `number` ('01'...'07') as a module."""
    if number not in _loaded:
        spec = importlib.util.spec_from_file_location(f"script_{number}", SCRIPTS[number])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # as an import would (06 --spark ships its functions by value from it)
        spec.loader.exec_module(module)
        _loaded[number] = module
    return _loaded[number]


def run(number: str, *argv):
    """Call a script's main() the way its command line would."""
    module = script(number)
    return module.main(module.parse_args([str(a) for a in argv]))


def tree_digest(folder) -> dict[str, str]:
    """Every file under `folder` and its sha256: what must not change."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def derived_files(data) -> list[str]:
    """The entries 01 laid out under train2/, splitted/ and test2/, relative to the data folder."""
    return sorted(os.path.relpath(os.path.join(r, f), data) for top in ("train2", "splitted", "test2")
                  for r, _, fs in os.walk(data / top) for f in fs)


def jpeg_bytes(mode="RGB", size=(60, 40), fmt="JPEG") -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new(mode, size, color=(120 if mode != "CMYK" else (10, 20, 30, 40)) if mode != "RGB" else (200, 100, 50)
              ).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def small_data(tmp_path):
    """A small demo data dir laid out by 01 (6 images per class), for tests that extract features of their own."""
    run("01", "--data-dir", tmp_path, "--demo", 6)
    return tmp_path


def extract(data, *extra):
    """02 on `data`: VGG16 at 32 px with random weights, the cheapest feature file."""
    return run("02", "--data-dir", data, "--weights", "none", "--image-size", 32, "--models", "VGG16",
               "--batch-size", 4, *extra)


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """01 --demo, 02 (three backbones), 03, 05 --combos and 07 --analyze, run once for the session."""
    root = tmp_path_factory.mktemp("pipeline")
    data, models, subs = root / "data", root / "model", root / "submissions"
    d = ["--data-dir", data, "--model-dir", models]
    out = {"root": root, "data": data, "model": models, "subs": subs}
    out["split"] = run("01", *d, "--demo", 30)["split"]
    out["extract"] = run("02", *d, "--weights", "none", "--image-size", IMAGE_SIZE,
                         "--models", "ResNet50", "InceptionV3", "Xception")
    out["single"] = run("03", *d, *HEAD, "--submissions-dir", subs)
    out["merge"] = run("05", *d, *HEAD, "--combos")
    out["submission"] = run("07", *d, "--output", subs / "submission.csv", "--analyze")
    return out
