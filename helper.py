"""The map of catdog: what the numbered steps share, re-exported from the package catdog/, module by module in
pipeline order. A step imports `helper` and calls `helper.NAME`; NAME lives in the module listed here.

  catdog/common.py     the user-error exception, the logger, the seed, names shared between files
  catdog/cli.py        the command line: flag types, shared flags, run_cli (the only module that sees argparse)
  catdog/files.py      atomic writes, temp names and their cleanup, sha256, JSON state
  catdog/data.py       Kaggle names, split.csv, the test ids, the split and the folds
  catdog/demo.py       the generated demo data (01 --demo)
  catdog/images.py     decoders, resizing, augmented views, the tf.data pipeline, photos as pixels
  catdog/backbones.py  the backbone registry
  catdog/features.py   extraction settings, the HDF5 feature cache, Features
  catdog/epochs.py     the whole-epoch training loop (the one place that touches Keras internals)
  catdog/heads.py      head configs, building, fitting, saving and K-fold training of heads, results tables
  catdog/finetune.py   end-to-end training from images: classifier, frozen BatchNorm, augmentation, phased fit
  catdog/models.py     saved models and sidecars, predictions of saved models, submissions
  catdog/kaggle_api.py Kaggle credentials and API calls
  catdog/cam.py        Grad-CAM and its overlays
  catdog/plots.py      figures and training curves

What only one step uses lives in that step's script. Importing helper does no work: TensorFlow and Keras are
imported inside the functions that need them, so the data step (01) and `-h` stay fast.
"""


from catdog.common import (
    CatDogError, log, DEFAULT_SEED, CLASSES, SPLIT_CSV, SPLIT_META, TRAIN2, SPLITTED, TEST2, FEATURES, SINGLE_DIR,
    FINETUNE_DIR, MERGE_DIR, HYPEROPT_DIR, STUDENT_DIR, LOGS_DIR, ANALYSIS_DIR, BLEND_DIR, HYPEROPT_BEST, RESULTS_CSV,
    KFOLD_SUMMARY, OOF_CSV, TEST_CSV, EXPORT_DIR, EXPORT_KERAS, EXPORT_SAVED_MODEL, EXPORT_TFLITE, EXPORT_TFLITE_INT8,
    EXPORT_INFO, SIDECAR_KINDS, FINETUNE_FULL, PREDICTION_LAYER, POOL_LAYER, CLIP, LOG_EPS, LOGIT_EPS, SUSPECT_SHARE,
    PREDICT_BATCH, versions, progress, set_seed
)
from catdog.cli import (
    HelpFormatter, number, POSITIVE_INT, NONNEGATIVE_INT, POSITIVE, PROBABILITY, DROPOUT, SEED, base_parser,
    run_cli, head_args, parse_head_args, views_arg, kfold_args, clip_args, clip_range
)
from catdog.files import (
    temp_name, check_writable_target, atomic_path, write_csv, write_json, read_json, file_sha256, remove_stale_temps
)
from catdog.data import (
    parse_train_name, parse_test_name, SPLIT_COLUMNS, SOURCES, read_split, train_image_paths, test_images,
    laid_out_test_ids, split_fingerprint, stratified_split, fold_assignment, kaggle_rows
)
from catdog.demo import (
    DEMO_MARKER, make_demo_dataset
)
from catdog.images import (
    PIL_FILTERS, INTERPOLATIONS, DECODERS, pil_filter, VIEW_PARAMS, view_params, load_resized, image_dataset,
    find_undecodable, load_pixels
)
from catdog.backbones import (
    Backbone, REPORT_BACKBONES, STUDENTS, BACKBONES, get_backbone, resolve_weights
)
from catdog.features import (
    ExtractSettings, VIEW_SETTINGS, ROW_SETTINGS, LEGACY_NAMES, dataset, feature_path, feature_file_state,
    setting_changes, check_same_settings, rebuild_command, FeatureWriter, image_parts, rows_mismatch, stale_reason,
    make_extract_step, extract_to_file, Features, load_features, check_views, model_inputs
)
from catdog.epochs import (
    fit_arrays
)
from catdog.heads import (
    HeadConfig, Output, make_optimizer, build_head, view_sampler, tensorboard, fit, save_run, train_head,
    kfold_name, train_kfold, write_results
)
from catdog.finetune import (
    all_layers, freeze_batchnorm, set_block_trainable, classifier, augmentation, image_data, fit_phases
)
from catdog.models import (
    save_model, SIDECAR_KEYS, load_model, read_sidecar, load_keras, check_trained_on, predict_images, predict_saved,
    read_kfold, check_model_dir, pick_model, log_loss, validate_submission, write_submission
)
from catdog.kaggle_api import (
    KAGGLE_COMPETITION, KAGGLE_RULES, kaggle_credentials, kaggle_api, kaggle_call
)
from catdog.cam import (
    grad_cam, save_cam_overlay
)
from catdog.plots import (
    pyplot, save_figure, plot_curves
)

__all__ = [
    # common
    "CatDogError", "log", "DEFAULT_SEED", "CLASSES", "SPLIT_CSV", "SPLIT_META", "TRAIN2", "SPLITTED", "TEST2",
    "FEATURES", "SINGLE_DIR", "FINETUNE_DIR", "MERGE_DIR", "HYPEROPT_DIR", "STUDENT_DIR", "LOGS_DIR", "ANALYSIS_DIR",
    "BLEND_DIR", "HYPEROPT_BEST", "RESULTS_CSV", "KFOLD_SUMMARY", "OOF_CSV", "TEST_CSV", "EXPORT_DIR", "EXPORT_KERAS",
    "EXPORT_SAVED_MODEL", "EXPORT_TFLITE", "EXPORT_TFLITE_INT8", "EXPORT_INFO", "SIDECAR_KINDS", "FINETUNE_FULL",
    "PREDICTION_LAYER", "POOL_LAYER", "CLIP", "LOG_EPS", "LOGIT_EPS", "SUSPECT_SHARE", "PREDICT_BATCH", "versions",
    "progress", "set_seed",
    # cli
    "HelpFormatter", "number", "POSITIVE_INT", "NONNEGATIVE_INT", "POSITIVE", "PROBABILITY", "DROPOUT", "SEED",
    "base_parser", "run_cli", "head_args", "parse_head_args", "views_arg", "kfold_args", "clip_args", "clip_range",
    # files
    "temp_name", "check_writable_target", "atomic_path", "write_csv", "write_json", "read_json", "file_sha256",
    "remove_stale_temps",
    # data
    "parse_train_name", "parse_test_name", "SPLIT_COLUMNS", "SOURCES", "read_split", "train_image_paths",
    "test_images", "laid_out_test_ids", "split_fingerprint", "stratified_split", "fold_assignment", "kaggle_rows",
    # demo
    "DEMO_MARKER", "make_demo_dataset",
    # images
    "PIL_FILTERS", "INTERPOLATIONS", "DECODERS", "pil_filter", "VIEW_PARAMS", "view_params", "load_resized",
    "image_dataset", "find_undecodable", "load_pixels",
    # backbones
    "Backbone", "REPORT_BACKBONES", "STUDENTS", "BACKBONES", "get_backbone", "resolve_weights",
    # features
    "ExtractSettings", "VIEW_SETTINGS", "ROW_SETTINGS", "LEGACY_NAMES", "dataset", "feature_path", "feature_file_state",
    "setting_changes", "check_same_settings", "rebuild_command", "FeatureWriter", "image_parts", "rows_mismatch",
    "stale_reason", "make_extract_step", "extract_to_file", "Features", "load_features", "check_views",
    "model_inputs",
    # epochs
    "fit_arrays",
    # heads
    "HeadConfig", "Output", "make_optimizer", "build_head", "view_sampler", "tensorboard", "fit", "save_run",
    "train_head", "kfold_name", "train_kfold", "write_results",
    # finetune
    "all_layers", "freeze_batchnorm", "set_block_trainable", "classifier", "augmentation", "image_data", "fit_phases",
    # models
    "save_model", "SIDECAR_KEYS", "load_model", "read_sidecar", "load_keras", "check_trained_on", "predict_images",
    "predict_saved", "read_kfold", "check_model_dir", "pick_model", "log_loss", "validate_submission",
    "write_submission",
    # kaggle_api
    "KAGGLE_COMPETITION", "KAGGLE_RULES", "kaggle_credentials", "kaggle_api", "kaggle_call",
    # cam
    "grad_cam", "save_cam_overlay",
    # plots
    "pyplot", "save_figure", "plot_curves",
]
