"""Foundation encoders: FLOPs per image at native size (counted from the architecture), the GPU time those FLOPs
suggest for 37,500 images (an estimate), and measured CPU ms/image with random weights of the real architecture.

    python benchmarks/encoders_bench.py                       # every encoder (ViT-g needs ~6 GB of RAM)
    python benchmarks/encoders_bench.py --models DINOv3L --images 2 --flops-only

Writes its table to stdout as Markdown (docs/foundation-encoders.md holds a run's).
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import helper  # noqa: E402

IMAGES = 37_500   # Kaggle's 25,000 train + 12,500 test images
GPU_TFLOPS = {"T4 (16 GB, fp16 ~25 TFLOP/s effective)": 25e12, "A100 (bf16 ~150 TFLOP/s effective)": 150e12}


def tokens(e: helper.Encoder) -> int:
    """Sequence length at native size: patches, class token, registers (SigLIP has no class token)."""
    patches = (e.size // e.patch_size) ** 2
    return patches + (0 if e.family == "siglip" else 1) + int(e.config.get("num_register_tokens", 0))


def flops(e: helper.Encoder) -> float:
    """Multiply-adds x 2 of one image: every per-layer weight meets every token once (2 FLOPs per weight per
    token), plus attention's two T x T x D products per layer. Per-layer weights are counted on 1- and 2-layer
    builds (biases and norms included: a rounding error)."""
    counts = [dataclasses.replace(e, config={**e.config, "num_layers": n}).build("none").count_params()
              for n in (1, 2)]
    per_layer = counts[1] - counts[0]
    t, d, n = tokens(e), int(e.config["hidden_dim"]), int(e.config["num_layers"])
    patch_embed = 2 * (e.patch_size ** 2 * 3 * d) * (e.size // e.patch_size) ** 2
    return n * (2 * per_layer * t + 4 * t * t * d) + patch_embed


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(helper.ENCODERS))
    p.add_argument("--images", type=int, default=2, help="timed images (batch 1) after one warm-up")
    p.add_argument("--flops-only", action="store_true")
    args = p.parse_args()
    import keras
    rows = []
    for name in args.models:
        e = helper.ENCODERS[name]
        f = flops(e)
        ms = None
        if not args.flops_only:
            keras.backend.clear_session()
            t0 = time.perf_counter()
            model = e.build("none")
            built = time.perf_counter() - t0
            x = np.random.default_rng(0).uniform(-2, 2, (1, e.size, e.size, 3)).astype(np.float32)
            model.predict_on_batch(x)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.images):
                model.predict_on_batch(x)
            # Wall time depends on who else uses the cores; CPU time (all threads) is what the image costs.
            ms = ((time.perf_counter() - t0) / args.images * 1000, (time.process_time() - c0) / args.images * 1000)
            print(f"{name}: built in {built:.0f} s, {ms[0]:.0f} ms/image wall, {ms[1]:.0f} ms/image CPU time",
                  file=sys.stderr, flush=True)
            del model
        rows.append((name, e.size, e.width, e.vision_params, f, ms))
    print("| encoder | size | width | vision params | GFLOPs/image | " + " | ".join(
        f"37,500 images on {g}" for g in GPU_TFLOPS) + " | CPU ms/image (wall) | CPU time ms/image |")
    print("|" + " --- |" * (7 + len(GPU_TFLOPS)))
    for name, size, width, params, f, ms in rows:
        est = " | ".join(f"~{IMAGES * f / r / 60:.0f} min" for r in GPU_TFLOPS.values())
        timed = "not measured | not measured" if ms is None else f"{ms[0]:,.0f} | {ms[1]:,.0f}"
        print(f"| {name} | {size} | {width} | {params / 1e6:.0f}M | {f / 1e9:.0f} | {est} | {timed} |")


if __name__ == "__main__":
    main()
