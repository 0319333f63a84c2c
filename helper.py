"""The map of catdog: what the numbered steps share, re-exported from the package catdog/, module by module in
pipeline order. A step imports `helper` and calls `helper.NAME`; NAME lives in the module listed here.

  catdog/common.py     the user-error exception, the logger, the seed, names shared between files
  catdog/cli.py        the command line: flag types, shared flags, run_cli (the only module that sees argparse)
  catdog/files.py      atomic writes, temp names and their cleanup, sha256, JSON state, paths kept inside, the lock
  catdog/data.py       Kaggle names and name lists, split.csv, the test ids, the split and the folds
  catdog/duplicates.py exact and near-duplicate images, their groups (split, folds, 07 --known-labels)
  catdog/checks.py     step 1's image checks (what is skipped, and why) and their cache, with the hashes
  catdog/demo.py       the generated demo data (01 --demo)
  catdog/images.py     decoders, resizing, augmented views, the tf.data pipeline, photos as pixels
  catdog/encoders.py   KerasHub's foundation encoders (DINOv2/v3, CLIP, SigLIP 2, MetaCLIP 2) as backbones
  catdog/backbones.py  the backbone registry (keras.applications CNNs, and the encoders)
  catdog/precision.py  the compute precision (--precision): auto from CPU flags and GPUs, the Keras policy
  catdog/features.py   extraction settings, the HDF5 feature cache, Features
  catdog/epochs.py     the whole-epoch training loop (the one place that touches Keras internals)
  catdog/pseudo.py     pseudo-labels of an earlier round's test predictions (03/05 --pseudo), K-fold honest
  catdog/heads.py      head configs, building, fitting, saving and K-fold training of heads, results tables
  catdog/finetune.py   end-to-end training from images: classifier, frozen BatchNorm, augmentation, phased fit
  catdog/models.py     saved models and sidecars, predictions of saved models, submissions
  catdog/blend.py      07's recipe: blend weights, temperature, clip bound, cross-fitted on honest rows
  catdog/kaggle_api.py Kaggle credentials and API calls, the download of the competition's data
  catdog/cam.py        Grad-CAM and its overlays
  catdog/plots.py      figures and training curves

What only one step uses lives in that step's script. Importing helper does no work: TensorFlow and Keras are
imported inside the functions that need them, so the data step (01) and `-h` stay fast.
"""

from catdog.common import (
    CatDogError, log, DEFAULT_SEED, CLASSES, SPLIT_CSV, SPLIT_META, DUPLICATES_CSV, DUPLICATE_SUSPECTS, TRAIN2,
    SPLITTED, TEST2, FEATURES, DATA_LOCK, SINGLE_DIR, FINETUNE_DIR, MERGE_DIR, HYPEROPT_DIR, STUDENT_DIR, LOGS_DIR,
    ANALYSIS_DIR, BLEND_DIR, HYPEROPT_BEST, RESULTS_CSV, KFOLD_SUMMARY, OOF_CSV, TEST_CSV, TEST_FOLDS_CSV, EXPORT_DIR,
    EXPORT_KERAS, EXPORT_SAVED_MODEL, EXPORT_TFLITE, EXPORT_TFLITE_INT8, EXPORT_INFO, SIDECAR_KINDS, FINETUNE_FULL,
    PREDICTION_LAYER, POOL_LAYER, CLIP, LOG_EPS, LOGIT_EPS, SUSPECT_SHARE, PREDICT_BATCH, versions, progress, set_seed
)
from catdog.cli import (
    HelpFormatter, number, POSITIVE_INT, NONNEGATIVE_INT, POSITIVE, PROBABILITY, DROPOUT, SEED, base_parser, run_cli,
    precision_args, head_args, parse_head_args, views_arg, kfold_args, clip_args, clip_range
)
from catdog.files import (
    temp_name, check_writable_target, atomic_path, write_csv, write_json, read_json, file_sha256, remove_stale_temps,
    no_space, plain_name, exclusive_lock, inside, check_outputs, to_plain, from_plain, is_temp, result_files
)
from catdog.data import (
    parse_train_name, parse_test_name, read_name_list, TEST_ID_MAX, test_entry_id, test_name_problem, SPLIT_COLUMNS,
    SOURCES, read_split, train_image_paths, test_images, laid_out_test_ids, unusable_test_entries, split_fingerprint,
    stratified_split, fold_assignment, kaggle_rows
)
from catdog.duplicates import (
    DUPLICATE_COLUMNS, NEAR_BITS, NEAR_COLOUR, image_hashes, near_pairs, find_groups, duplicate_summary,
    read_duplicates, group_ids, known_test_labels, hash_rows, suspect_lines, save_groups, fold_groups
)
from catdog.checks import (
    CHECK_CACHE, CHECK_COLUMNS, DECODABLE, check_image, read_check_cache, check_folder
)
from catdog.demo import (
    DEMO_MARKER, make_demo_dataset
)
from catdog.images import (
    PIL_FILTERS, INTERPOLATIONS, DECODERS, pil_filter, to_rgb, VIEW_PARAMS, view_params, load_resized, image_dataset,
    find_undecodable, load_pixels
)
from catdog.encoders import (
    Encoder, ENCODERS
)
from catdog.backbones import (
    Backbone, REPORT_BACKBONES, STUDENTS, BACKBONES, get_backbone, resolve_weights
)
from catdog.precision import (
    PRECISIONS, PRECISION_CHOICES, KERAS_POLICY, cpu_flags, gpu_capabilities, resolve_precision, precision_policy,
    as_precision, legacy_precision
)
from catdog.features import (
    ExtractSettings, VIEW_SETTINGS, ROW_SETTINGS, LEGACY_NAMES, dataset, feature_path, feature_file_state,
    setting_changes, check_same_settings, rebuild_command, FeatureWriter, image_parts, rows_mismatch, stale_reason,
    make_extract_step, extract_to_file, Features, load_features, check_views, model_inputs
)
from catdog.epochs import (
    fit_arrays
)
from catdog.pseudo import (
    fold_fingerprint, Pseudo, load_pseudo, pseudo_for
)
from catdog.heads import (
    HeadConfig, Output, make_optimizer, build_head, view_sampler, tensorboard, fit, save_run, train_head, kfold_name,
    train_kfold, write_results
)
from catdog.finetune import (
    all_layers, freeze_batchnorm, set_block_trainable, classifier, augmentation, image_data, fit_phases
)
from catdog.models import (
    save_model, MODEL_SHA256, write_sidecar, SIDECAR_KEYS, load_model, read_sidecar, folder_problem, load_keras,
    check_split, check_trained_on, predict_images, predict_saved, read_kfold, check_model_dir, pick_model, log_loss,
    validate_submission, write_submission
)
from catdog.blend import (
    CLIP_GRID, logit, fit_blend, scale_temperature, fit_temperature, auto_clip, Recipe, fit_recipe, cross_fit
)
from catdog.kaggle_api import (
    KAGGLE_COMPETITION, KAGGLE_RULES, kaggle_credentials, kaggle_api, kaggle_call, download_competition
)
from catdog.cam import (
    grad_cam, save_cam_overlay
)
from catdog.plots import (
    pyplot, save_figure, plot_curves
)

__all__ = [
    # common
    "CatDogError", "log", "DEFAULT_SEED", "CLASSES", "SPLIT_CSV", "SPLIT_META", "DUPLICATES_CSV", "DUPLICATE_SUSPECTS",
    "TRAIN2", "SPLITTED", "TEST2", "FEATURES", "DATA_LOCK", "SINGLE_DIR", "FINETUNE_DIR", "MERGE_DIR", "HYPEROPT_DIR",
    "STUDENT_DIR", "LOGS_DIR", "ANALYSIS_DIR", "BLEND_DIR", "HYPEROPT_BEST", "RESULTS_CSV", "KFOLD_SUMMARY", "OOF_CSV",
    "TEST_CSV", "TEST_FOLDS_CSV", "EXPORT_DIR", "EXPORT_KERAS", "EXPORT_SAVED_MODEL", "EXPORT_TFLITE",
    "EXPORT_TFLITE_INT8", "EXPORT_INFO", "SIDECAR_KINDS", "FINETUNE_FULL", "PREDICTION_LAYER", "POOL_LAYER", "CLIP",
    "LOG_EPS", "LOGIT_EPS", "SUSPECT_SHARE", "PREDICT_BATCH", "versions", "progress", "set_seed",
    # cli
    "HelpFormatter", "number", "POSITIVE_INT", "NONNEGATIVE_INT", "POSITIVE", "PROBABILITY", "DROPOUT", "SEED",
    "base_parser", "run_cli", "precision_args", "head_args", "parse_head_args", "views_arg", "kfold_args", "clip_args",
    "clip_range",
    # files
    "temp_name", "check_writable_target", "atomic_path", "write_csv", "write_json", "read_json", "file_sha256",
    "remove_stale_temps", "no_space", "plain_name", "exclusive_lock", "inside", "check_outputs", "to_plain",
    "from_plain", "is_temp", "result_files",
    # data
    "parse_train_name", "parse_test_name", "read_name_list", "TEST_ID_MAX", "test_entry_id", "test_name_problem",
    "SPLIT_COLUMNS", "SOURCES", "read_split", "train_image_paths", "test_images", "laid_out_test_ids",
    "unusable_test_entries", "split_fingerprint", "stratified_split", "fold_assignment", "kaggle_rows",
    # duplicates
    "DUPLICATE_COLUMNS", "NEAR_BITS", "NEAR_COLOUR", "image_hashes", "near_pairs", "find_groups", "duplicate_summary",
    "read_duplicates", "group_ids", "known_test_labels", "hash_rows", "suspect_lines", "save_groups", "fold_groups",
    # checks
    "CHECK_CACHE", "CHECK_COLUMNS", "DECODABLE", "check_image", "read_check_cache", "check_folder",
    # demo
    "DEMO_MARKER", "make_demo_dataset",
    # images
    "PIL_FILTERS", "INTERPOLATIONS", "DECODERS", "pil_filter", "to_rgb", "VIEW_PARAMS", "view_params", "load_resized",
    "image_dataset", "find_undecodable", "load_pixels",
    # encoders
    "Encoder", "ENCODERS",
    # backbones
    "Backbone", "REPORT_BACKBONES", "STUDENTS", "BACKBONES", "get_backbone", "resolve_weights",
    # precision
    "PRECISIONS", "PRECISION_CHOICES", "KERAS_POLICY", "cpu_flags", "gpu_capabilities", "resolve_precision",
    "precision_policy", "as_precision", "legacy_precision",
    # features
    "ExtractSettings", "VIEW_SETTINGS", "ROW_SETTINGS", "LEGACY_NAMES", "dataset", "feature_path", "feature_file_state",
    "setting_changes", "check_same_settings", "rebuild_command", "FeatureWriter", "image_parts", "rows_mismatch",
    "stale_reason", "make_extract_step", "extract_to_file", "Features", "load_features", "check_views", "model_inputs",
    # epochs
    "fit_arrays",
    # pseudo
    "fold_fingerprint", "Pseudo", "load_pseudo", "pseudo_for",
    # heads
    "HeadConfig", "Output", "make_optimizer", "build_head", "view_sampler", "tensorboard", "fit", "save_run",
    "train_head", "kfold_name", "train_kfold", "write_results",
    # finetune
    "all_layers", "freeze_batchnorm", "set_block_trainable", "classifier", "augmentation", "image_data", "fit_phases",
    # models
    "save_model", "MODEL_SHA256", "write_sidecar", "SIDECAR_KEYS", "load_model", "read_sidecar", "folder_problem",
    "load_keras", "check_split", "check_trained_on", "predict_images", "predict_saved", "read_kfold", "check_model_dir",
    "pick_model", "log_loss", "validate_submission", "write_submission",
    # blend
    "CLIP_GRID", "logit", "fit_blend", "scale_temperature", "fit_temperature", "auto_clip", "Recipe", "fit_recipe",
    "cross_fit",
    # kaggle_api
    "KAGGLE_COMPETITION", "KAGGLE_RULES", "kaggle_credentials", "kaggle_api", "kaggle_call", "download_competition",
    # cam
    "grad_cam", "save_cam_overlay",
    # plots
    "pyplot", "save_figure", "plot_curves",
]
