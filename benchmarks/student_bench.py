"""Benchmark of 09's students as 08 exports them: size and LiteRT latency per format, and on the demo the log loss
of teacher, hard-label student and distilled student. Not a test: it prints the tables of benchmarks/student_bench.md.

Sizes and times: each student (random weights: the architecture decides size and speed, not the weights) at
--size (224, 09's default) is composed by 08's pixel_model() into one model from uint8 pixels to P(dog) and
written as 08 writes it: .keras, SavedModel (the folder's total), float16 TFLite and full-integer int8 TFLite
(calibrated on --calibration demo images). ms/image: the median at batch 1 over --images demo images after one
warm-up call, LiteRT with num_threads=2; the machine's load average is printed beside (it is shared).

Losses: on 01 --demo --demo images, a 3-fold ResNet50 head (02 at --demo-size, --weights none) is the teacher;
09 trains --demo-student at --demo-size twice from the same seed, --alpha 0 (labels only) and the default alpha,
and the table gives each one's log loss on split.csv's valid rows beside the teacher's out-of-fold log loss there.

    python benchmarks/student_bench.py                       # sizes and times of the three, and the demo losses
    python benchmarks/student_bench.py --students MobileNetV3Large --skip-demo
"""

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import helper  # noqa: E402


def step(number: str):
    path = next(ROOT.glob(f"{number}_*.py"))
    spec = importlib.util.spec_from_file_location(f"step_{number}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(number: str, *argv):
    module = step(number)
    return module.main(module.parse_args([str(a) for a in argv]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=helper.HelpFormatter)
    p.add_argument("--students", nargs="+", default=list(helper.STUDENTS), choices=helper.STUDENTS)
    p.add_argument("--size", type=helper.number(int, 32), default=224, help="input size of the timed exports")
    p.add_argument("--images", type=helper.POSITIVE_INT, default=50, help="demo images timed per format")
    p.add_argument("--calibration", type=helper.POSITIVE_INT, default=50, help="int8 calibration images")
    p.add_argument("--demo", type=helper.POSITIVE_INT, default=100, help="01 --demo N for the losses")
    p.add_argument("--demo-size", type=helper.number(int, 32), default=64)
    p.add_argument("--demo-student", default="MobileNetV3Small", choices=helper.STUDENTS)
    p.add_argument("--demo-epochs", type=helper.POSITIVE_INT, default=8)
    p.add_argument("--skip-demo", action="store_true", help="sizes and times only")
    p.add_argument("--workdir", help="where files go (default: a temp folder, removed at the end)")
    return p.parse_args(argv)


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def litert_ms(path: Path, images: np.ndarray) -> float:
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=str(path), num_threads=2)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    times = []
    for image in np.concatenate([images[:1], images]):  # the first call warms up
        start = time.perf_counter()
        it.set_tensor(inp["index"], image[None])
        it.invoke()
        it.get_tensor(out["index"])
        times.append(1000 * (time.perf_counter() - start))
    return float(np.median(times[1:]))


def sizes_and_times(args, work: Path, data: Path) -> pd.DataFrame:
    export = step("08")
    split = helper.read_split(data)
    paths = helper.train_image_paths(data, split)
    images = np.stack([helper.load_pixels(p, args.size) for p in paths[:args.images]])
    calibration = images[:args.calibration]
    rows = []
    for name in args.students:
        bb = helper.get_backbone(name)
        st = helper.ExtractSettings(backbone=name, image_size=args.size, weights="none")
        helper.set_seed(helper.DEFAULT_SEED)
        model = helper.classifier(bb.build("none", args.size, pooling=None), (args.size,) * 2 + (3,), "image", 0.2,
                                  name)
        meta = {"kind": helper.STUDENT_DIR, "feature_attrs": [st.attrs()]}
        pixels, _, _ = export.pixel_model(model, meta, Path(f"{name}.keras"), None)
        out = work / name
        start = time.perf_counter()
        export.write_export(pixels, out, "float16", {}, calibration)
        took = time.perf_counter() - start
        load = os.getloadavg()[0]
        for f in (helper.EXPORT_KERAS, helper.EXPORT_SAVED_MODEL, helper.EXPORT_TFLITE, helper.EXPORT_TFLITE_INT8):
            ms = litert_ms(out / f, images) if f.endswith(".tflite") else float("nan")
            rows.append({"student": name, "format": {helper.EXPORT_TFLITE: "TFLite float16",
                                                     helper.EXPORT_TFLITE_INT8: "TFLite int8"}.get(f, f),
                         "MB": folder_size(out / f) / 1e6, "MiB": folder_size(out / f) / 2**20,
                         "ms/image": ms, "params": model.count_params(), "export s": took,
                         "load avg": os.getloadavg()[0] if ms == ms else load})
        print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2f}"), flush=True)
    return pd.DataFrame(rows)


def demo_losses(args, work: Path, data: Path) -> pd.DataFrame:
    model = work / "model"
    d = ["--data-dir", data, "--model-dir", model]
    run("02", *d, "--weights", "none", "--image-size", args.demo_size, "--models", "ResNet50")
    run("03", *d, "--batch-size", 16, "--folds", 3, "--no-predict")
    teacher = model / helper.SINGLE_DIR / "ResNet50_k3"
    common = [*d, "--teacher", teacher, "--student", args.demo_student, "--weights", "none", "--image-size",
              args.demo_size, "--epochs", args.demo_epochs, "--batch-size", 16]
    run("09", *common, "--alpha", 0)
    table = run("09", *common)
    return table[["model", "alpha", "val_loss", "teacher_val_loss", "agreement", "kl_valid_start", "kl_valid_end",
                  "kl_train_start", "kl_train_end"]]


def markdown(df: pd.DataFrame, digits: int) -> str:
    """A pipe table (pandas' to_markdown needs tabulate, not a dependency)."""
    def cell(v):
        return "" if isinstance(v, float) and v != v else f"{v:.{digits}f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)])


def main(args):
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="student_bench_"))
    try:
        data = work / "data"
        if not (data / helper.SPLIT_CSV).is_file():
            run("01", "--data-dir", data, "--model-dir", work / "model", "--demo", args.demo)
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()}", flush=True)
        table = sizes_and_times(args, work / "exports", data)
        print("\n" + markdown(table, 2))
        if not args.skip_demo:
            losses = demo_losses(args, work, data)
            print("\n" + markdown(losses, 4))
        print(f"load average at the end {os.getloadavg()}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(parse_args())
