"""Step 2: GlobalAveragePool features of ImageNet CNNs (or foundation encoders' features) for every image.

A foundation encoder from KerasHub (DINOv2L, DINOv2G, DINOv3L, CLIPL336, SigLIP2SO400M, MetaCLIP2H; see
docs/foundation-encoders.md) gets its own image converter: its resize (filter, antialias, centre crop or squash)
on the decoded image, then its scale and offset; --interpolation applies to the CNNs only. Its feature is the one
its authors probe linearly (DINO: class token + mean patch token; CLIP, MetaCLIP: image embedding; SigLIP: the
attention-pooled output). Augmented views of an encoder are made by Pillow with its converter's filter.

For each backbone, data/features/<Model>.h5 holds `train` (split.csv order), `label`, `train_files`,
`test` (ids ascending), `test_ids`, and the settings as attributes; `complete=True` is written last.
With --views V it also holds `train_views` (V, N, D) and `test_views` (V, M, D) (view 0 = the plain rows, view 1 the
mirror, then random augmentations) and their transformations `train_view_params`, `test_view_params`.
A complete file made with the same settings is skipped, so an interrupted run resumes.
"""

import time

import pandas as pd

import helper
from helper import CatDogError, log


def parse_args(argv=None):
    p = helper.base_parser(__doc__.splitlines()[0], cnn=True)
    p.add_argument("--models", nargs="+", default=list(helper.REPORT_BACKBONES), choices=list(helper.BACKBONES),
                   metavar="MODEL", help=f"backbones to extract, from {', '.join(helper.BACKBONES)}")
    p.add_argument("--batch-size", type=helper.POSITIVE_INT, default=None,
                   help="images per batch (default: 64 for the CNNs; for each encoder the batch its registry entry "
                        "gives, sized for a 16 GB GPU)")
    p.add_argument("--interpolation", default="bilinear", choices=helper.INTERPOLATIONS,
                   help="resize method (images are stretched to a square, as in the report); "
                        "'nearest' reproduces Keras 2's flow_from_directory")
    p.add_argument("--decoder", default="pil", choices=helper.DECODERS,
                   help="pil: Pillow decode + resize in parallel tf.data threads (fastest on CPU; the report's "
                        "decoder); tf: tf.io.decode_jpeg + tf.image.resize, all in the TensorFlow graph")
    p.add_argument("--jpeg-draft", action="store_true",
                   help="decode JPEGs at least twice the target size at 1/2, 1/4 or 1/8 scale (faster decode, "
                        "slightly different features)")
    p.add_argument("--views", type=helper.POSITIVE_INT, default=1,
                   help="feature rows per image: 1 is the report (no augmentation); V > 1 also writes train_views "
                        "and test_views (V rows per image: the image, its mirror, then random rotations, crops, "
                        "shifts and brightness, the same for every backbone) for heads' --views and 07 --tta")
    p.add_argument("--views-dtype", default="float16", choices=["float16", "float32"],
                   help="storage type of the views (float16 halves the files; the plain rows stay float32)")
    helper.precision_args(p, "the CNNs (a setting of the feature files)", mixed_precision=True)
    p.add_argument("--multi-gpu", action="store_true", help="split batches across all visible GPUs")
    p.add_argument("--force", action="store_true", help="recompute even complete feature files")
    return p.parse_args(argv)


def plan(args, precision: str, resolved: dict | None = None) -> dict[str, helper.ExtractSettings]:
    """Each requested backbone's settings, all checked before the first one starts (a size too small for the
    last backbone must not surface after minutes of extracting the first); `resolved` receives where each one's
    weights are (an encoder's pretrained preset is downloaded here)."""
    resolved = {} if resolved is None else resolved
    if args.views > 1 and args.decoder != "pil":
        raise CatDogError("--views makes its augmented views with Pillow: use --decoder pil (the default)")
    settings = {}
    for name in dict.fromkeys(args.models):
        bb = helper.get_backbone(name)
        size = args.image_size or bb.size
        if size < bb.min_size:
            raise CatDogError(f"{name} needs --image-size >= {bb.min_size}, got {size}: raise --image-size, or "
                              f"extract {name} in a run of its own at its native size")
        # A missing weights file, a failed or gated download: named now, before any image is read.
        resolved[name] = helper.resolve_weights(args.weights, bb)
        interpolation = bb.interpolation if isinstance(bb, helper.Encoder) else args.interpolation
        settings[name] = helper.ExtractSettings(name, size, interpolation, args.decoder, args.jpeg_draft,
                                                args.weights, args.seed, precision, views=args.views,
                                                views_dtype=args.views_dtype if args.views > 1 else "")
    return settings


def main(args):
    resolved = {}
    settings = plan(args, helper.resolve_precision(args.precision), resolved)
    split = helper.read_split(args.data_dir)
    test_ids = helper.laid_out_test_ids(args.data_dir)
    import keras
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy() if args.multi_gpu else tf.distribute.get_strategy()
    rows = []
    for name, s in settings.items():
        bb = helper.get_backbone(name)
        path = helper.feature_path(args.data_dir, name)
        reason = "forced" if args.force else helper.stale_reason(path, s, split, test_ids)
        if not reason:
            log.info(f"{path} is complete with these settings: skipped (--force recomputes)")
            continue
        log.info(f"{name}: {reason}; extracting at {s.image_size} px in {s.precision}")
        helper.set_seed(args.seed)  # makes --weights none reproducible (and 04's network the same)
        encoder = isinstance(bb, helper.Encoder)
        # Per backbone: clear_session() below resets Keras's dtype policy too.
        with helper.precision_policy(s.precision):
            with strategy.scope():
                model = (bb.build(args.weights, s.image_size, resolved=resolved[name]) if encoder
                         else bb.build(args.weights, s.image_size))
            start = time.perf_counter()
            step = helper.make_extract_step(model, bb.preprocess, strategy)
            batch = args.batch_size or (bb.batch_size if encoder else 64)
            n = helper.extract_to_file(step, (bb.width,), args.data_dir, path, s, batch, strategy,
                                       resize=bb.resizer(s.image_size) if encoder else None)
        secs = time.perf_counter() - start
        rows.append({"backbone": name, "images": n, "seconds": round(secs, 1),
                     "images_per_s": round(n / secs, 1), "MB": round(path.stat().st_size / 2**20, 1)})
        log.info(f"wrote {path}")
        keras.backend.clear_session()
    table = pd.DataFrame(rows, columns=["backbone", "images", "seconds", "images_per_s", "MB"])
    if rows:
        log.info("\n" + table.to_string(index=False))
    return table


if __name__ == "__main__":
    helper.run_cli(main, parse_args())
