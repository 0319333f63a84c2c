"""The modern backbones beyond the report (issue #12): registry facts checked against Keras, preprocessing with no
double normalisation, split layers, weights files, names the steps accept, and 02/04/08 on two of them."""

import inspect

import h5py
import numpy as np
import pytest
from conftest import run, script

import helper
from helper import CatDogError

# The facts (checked in keras/src/applications/): native size, pooled width, and the input range Keras
# documents for the model: "0-255" where the model normalises inside (include_preprocessing), "-1..1" where
# preprocess_input maps to [-1, 1] (mode "tf").
FACTS = {
    "EfficientNetV2S": (384, 1280, "0-255"),
    "EfficientNetV2L": (480, 1280, "0-255"),
    "EfficientNetB7": (600, 2560, "0-255"),
    "ConvNeXtBase": (224, 1024, "0-255"),
    "ConvNeXtXLarge": (224, 2048, "0-255"),
    "NASNetLarge": (331, 4032, "-1..1"),
    "ResNet152V2": (224, 2048, "-1..1"),
}
RANGES = {"0-255": lambda x: x, "-1..1": lambda x: x / 127.5 - 1.0}
SMALL = 32  # the smallest size each of them builds at (Keras's floor)
DEMO = 64  # where ConvNeXt's last maps are 2 x 2, so pooling before or after its final LayerNorm differs


def call(model, x) -> np.ndarray:
    """One eager forward pass: tracing predict() for networks of ~1000 layers costs more than running them."""
    return np.asarray(model(x, training=False))


def assert_close(got, expected, rel: float = 1e-4):
    """Equal up to float32 rounding, relative to the largest value (random deep networks give tiny features)."""
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= rel * np.abs(expected).max()


def keras_pool(model, maps: np.ndarray) -> np.ndarray:
    """Keras's pooling (include_top=False, pooling="avg") of `maps`, in numpy: the average, then for ConvNeXt the
    network's final LayerNorm (with `model`'s weights of it)."""
    pooled = maps.mean(axis=(1, 2))
    norm = model.layers[-1]
    if type(norm).__name__ != "LayerNormalization":
        return pooled
    gamma, beta = norm.get_weights()
    mean, var = pooled.mean(-1, keepdims=True), pooled.var(-1, keepdims=True)
    return (pooled - mean) / np.sqrt(var + norm.epsilon) * gamma + beta


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FACTS))
def test_new_backbone_matches_keras_at_its_smallest_size(name):
    """Registry size/width/min_size; our preprocess + backbone gives what Keras's network gives on its documented
    input range (a model that normalises inside gets 0-255 pixels, not normalised twice); the split layer cuts
    the network into two parts whose composition is the network. One build each: they are slow on a CPU."""
    import keras
    bb = helper.BACKBONES[name]
    size, width, documented = FACTS[name]
    assert (bb.size, bb.width, bb.min_size) == (size, width, SMALL)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, SMALL, SMALL, 3)).astype(np.float32)

    helper.set_seed(1)
    ours = bb.build("none", SMALL)
    assert tuple(ours.output.shape) == (None, width)
    assert (type(ours.layers[-1]).__name__ == "LayerNormalization") == name.startswith("ConvNeXt")
    assert bb.pooling == ("avg+layernorm" if name.startswith("ConvNeXt") else "avg")
    got = call(ours, bb.preprocess(pixels))
    # Keras's network as its constructor built it (its maps, before the pool), fed as Keras documents.
    net = keras.Model(ours.input, ours.get_layer("avg_pool").input)
    normalises = [type(layer).__name__ for layer in net.layers[:4]
                  if isinstance(layer, keras.layers.Rescaling | keras.layers.Normalization)]
    assert bool(normalises) == (documented == "0-255"), normalises
    maps = call(net, RANGES[documented](pixels))
    assert_close(got, keras_pool(ours, maps))
    # The comparison has power: the other input range changes the features.
    wrong = "-1..1" if documented == "0-255" else "0-255"
    other = keras_pool(ours, call(net, RANGES[wrong](pixels)))
    assert np.abs(got - other).max() > 0.01 * np.abs(got).max()

    split = script("04")
    if bb.split_layer:
        extractor, tail = split.split_model(ours, split.split_layer_name(bb, ours))
        assert_close(call(tail, call(extractor, RANGES[documented](pixels))), got)
        assert 0 < tail.count_params() < net.count_params() / 2  # the last block(s), not the network
    else:  # NASNet: each cell also reads the cell before the last one, so no layer is a clean cut
        with pytest.raises(CatDogError, match="inside a block"):
            split.split_model(net, "normal_concat_17")
    keras.backend.clear_session()


def test_weights_files_are_those_keras_downloads():
    """weights_file is what Keras caches in ~/.keras/models and weights_url where it fetches it, derived here from
    each application's source: EfficientNet(V2) and ConvNeXt name it <model name>_notop.h5."""
    import keras
    from keras.src.applications import convnext, efficientnet, efficientnet_v2, nasnet, resnet
    base = {"efficientnet_v2": efficientnet_v2.BASE_WEIGHTS_PATH, "efficientnet": efficientnet.BASE_WEIGHTS_PATH,
            "convnext": convnext.BASE_WEIGHTS_PATH}
    for name in ("EfficientNetV2S", "EfficientNetV2L", "EfficientNetB7", "ConvNeXtBase", "ConvNeXtXLarge"):
        bb = helper.BACKBONES[name]
        model_name = inspect.signature(getattr(keras.applications, name)).parameters["name"].default
        assert bb.weights_file == f"{model_name}_notop.h5"
        assert bb.weights_url == base[bb.module] + bb.weights_file
    nas = helper.BACKBONES["NASNetLarge"]
    assert nas.weights_url == nasnet.NASNET_LARGE_WEIGHT_PATH_NO_TOP
    assert f'"{nas.weights_file}"' in inspect.getsource(nasnet.NASNet)
    r152 = helper.BACKBONES["ResNet152V2"]
    assert r152.weights_file == "resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert r152.weights_url == resnet.BASE_WEIGHTS_PATH + r152.weights_file


def test_weights_folder_messages(tmp_path):
    """A folder without the file names the file and where to fetch it (NASNet's has another name there);
    EfficientNetB7 takes ImageNet weights only as 'imagenet' (Keras adds its input scaling only then)."""
    with pytest.raises(CatDogError, match=r"NASNet-large-no-top\.h5 in that folder as nasnet_large_no_top\.h5"):
        helper.resolve_weights(str(tmp_path), helper.BACKBONES["NASNetLarge"])
    (tmp_path / "efficientnetb7_notop.h5").write_bytes(b"")
    with pytest.raises(CatDogError, match=r"efficientnetb7_notop\.h5 in ~/\.keras/models/.*--weights imagenet"):
        helper.resolve_weights(str(tmp_path), helper.BACKBONES["EfficientNetB7"])
    assert helper.resolve_weights("none", helper.BACKBONES["EfficientNetB7"]) is None
    (tmp_path / "convnext_base_notop.h5").write_bytes(b"")
    assert helper.resolve_weights(str(tmp_path), helper.BACKBONES["ConvNeXtBase"]) == str(
        tmp_path / "convnext_base_notop.h5")


def test_steps_accept_the_new_names_and_refuse_unknown_ones(capsys):
    assert script("02").parse_args([]).models == list(helper.REPORT_BACKBONES)  # the report's five by default
    assert len(helper.REPORT_BACKBONES) == 5 and set(helper.REPORT_BACKBONES) < set(helper.BACKBONES)
    assert script("02").parse_args(["--models", *FACTS]).models == list(FACTS)
    assert script("03").parse_args(["--models", "ConvNeXtXLarge", "NASNetLarge"]).models == ["ConvNeXtXLarge",
                                                                                             "NASNetLarge"]
    merge = ["EfficientNetV2L", "ConvNeXtXLarge", "InceptionV3"]
    assert script("05").parse_args(["--models", *merge]).models == merge
    assert script("06").parse_args(["--models", *merge]).models == merge
    splittable = {n for n in FACTS if helper.BACKBONES[n].split_layer}
    assert splittable == set(FACTS) - {"NASNetLarge"}
    for name in splittable:
        assert script("04").parse_args(["--model", name]).model == name
    for number, argv in [("02", ["--models", "EfficientNetV2M"]), ("05", ["--models", "ResNet50", "ConvNextBase"]),
                         ("04", ["--model", "NASNetLarge"])]:
        with pytest.raises(SystemExit) as e:
            script(number).parse_args(argv)
        assert e.value.code == 2 and f"argument {argv[0]}: invalid choice: '{argv[-1]}'" in capsys.readouterr().err
    with pytest.raises(CatDogError, match=r"unknown backbone 'ConvnextBase': did you mean ConvNeXtBase\? choose "
                                          r"from .*ResNet152V2"):
        helper.get_backbone("ConvnextBase")
    with pytest.raises(CatDogError, match=r"unknown backbone 'ViT'.*EfficientNetV2S"):
        helper.get_backbone("ViT")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A small demo dataset with EfficientNetV2S and ConvNeXtBase features at 64 px (random weights)."""
    data = tmp_path_factory.mktemp("backbones") / "data"
    split = run("01", "--data-dir", data, "--demo", 4)["split"]
    table = run("02", "--data-dir", data, "--models", "EfficientNetV2S", "ConvNeXtBase", "--weights", "none",
                "--image-size", DEMO, "--batch-size", 4)
    return {"data": data, "split": split, "table": table}


@pytest.mark.slow
def test_extract_new_backbones_on_demo_data(demo):
    """02's files have the registry's widths; ConvNeXt's features are Keras's pooled features
    (include_top=False, pooling="avg": pooled, then normalised) of the raw 0-255 pixels (the same seeded network
    02 built), and the file records that pooling."""
    import keras
    data, split = demo["data"], demo["split"]
    assert demo["table"].backbone.tolist() == ["EfficientNetV2S", "ConvNeXtBase"]
    n_test = len(helper.laid_out_test_ids(data))
    for name in ("EfficientNetV2S", "ConvNeXtBase"):
        with h5py.File(helper.feature_path(data, name), "r") as f:
            assert f["labelled"].shape == (len(split), FACTS[name][1]) and f["test"].shape == (n_test, FACTS[name][1])
            assert np.isfinite(f["labelled"][:]).all() and f.attrs["image_size"] == DEMO
            assert f.attrs["pooling"] == helper.BACKBONES[name].pooling
            if name == "ConvNeXtBase":
                features = f["labelled"][:2]
    paths = helper.train_image_paths(data, split)[:2]
    pixels = np.stack([helper.load_pixels(p, DEMO) for p in paths]).astype(np.float32)
    helper.set_seed(helper.DEFAULT_SEED)  # as 02 did before building
    net = keras.applications.ConvNeXtBase(include_top=False, weights=None, input_shape=(DEMO, DEMO, 3),
                                          pooling="avg")
    assert_close(features, call(net, pixels), rel=1e-3)
    maps = call(keras.Model(net.input, net.layers[-2].input), pixels)  # the old features: normalised maps' mean
    norm = net.layers[-1]
    normalised = (maps - maps.mean(-1, keepdims=True)) / np.sqrt(maps.var(-1, keepdims=True) + norm.epsilon)
    assert np.abs(features - normalised.mean(axis=(1, 2))).max() > 0.01 * np.abs(features).max()
    keras.backend.clear_session()


def test_old_convnext_feature_files_are_recomputed():
    """A ConvNeXt feature file written before the pooling was recorded (the mean of the normalised maps) is stale;
    the others' files stay good, and their settings read back with the pooling they were made with."""
    for name in ("ConvNeXtBase", "ConvNeXtXLarge", "ResNet50", "EfficientNetV2S"):
        now = helper.ExtractSettings(name, 64).attrs()
        old = {k: v for k, v in now.items() if k != "pooling"}
        assert now["pooling"] == helper.BACKBONES[name].pooling
        assert helper.setting_changes(old, now) == (["pooling"] if name.startswith("ConvNeXt") else [])
        assert helper.ExtractSettings.of(old).pooling == "avg"
        assert helper.ExtractSettings.of(now) == helper.ExtractSettings(name, 64)


@pytest.mark.slow
def test_too_small_sizes_are_refused_before_any_work(demo, capsys):
    data = demo["data"]
    with pytest.raises(SystemExit) as e:
        script("02").parse_args(["--models", "EfficientNetV2S", "--image-size", "31"])
    assert e.value.code == 2 and "argument --image-size: 31 is not an integer >= 32" in capsys.readouterr().err
    before = sorted(p.name for p in (data / helper.FEATURES).iterdir())
    with pytest.raises(CatDogError, match="InceptionV3 needs --image-size >= 75, got 32: raise --image-size"):
        run("02", "--data-dir", data, "--models", "ResNet152V2", "InceptionV3", "--weights", "none",
            "--image-size", SMALL)
    assert sorted(p.name for p in (data / helper.FEATURES).iterdir()) == before  # ResNet152V2 not started


@pytest.mark.slow
def test_finetune_splits_efficientnetv2s(demo, tmp_path):
    """04 on a new splittable backbone: caches the maps at its split layer and trains the last block + head."""
    data = demo["data"]
    table = run("04", "--data-dir", data, "--model-dir", tmp_path, "--model", "EfficientNetV2S", "--weights",
                "none", "--image-size", DEMO, "--init", "random", "--epochs", 1, "--batch-size", 4)
    assert table.model.tolist() == ["EfficientNetV2S_random"] and np.isfinite(table.val_loss).all()
    with h5py.File(helper.feature_path(data, "EfficientNetV2S_block6n_add_maps"), "r") as f:
        assert f["labelled"].shape == (len(demo["split"]), 2, 2, 256) and f["labelled"].dtype == np.float16
    assert (tmp_path / "finetune" / "EfficientNetV2S_random.keras").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["EfficientNetV2S", "ConvNeXtBase"])
def test_export_branch_feeds_raw_pixels_like_02(name):
    """08 probes preprocess_input into a 1x1 convolution: for a model that normalises inside it is the identity;
    and 08's branch (its own pool on the backbone's maps) computes 02's features."""
    import keras
    bb = helper.BACKBONES[name]
    export = script("08")
    settings = helper.ExtractSettings(name, DEMO, weights="none", seed=7)
    image = keras.Input((DEMO, DEMO, 3))
    features, _ = export.branch(image, DEMO, settings, "none")
    branch = keras.Model(image, features)
    kernel, bias = branch.get_layer(f"{name}_preprocess").get_weights()
    np.testing.assert_array_equal(kernel[0, 0], np.eye(3))
    np.testing.assert_array_equal(bias, np.zeros(3))
    pixels = np.random.default_rng(1).uniform(0, 255, (2, DEMO, DEMO, 3)).astype(np.float32)
    helper.set_seed(7)
    extracted = call(bb.build("none", DEMO), bb.preprocess(pixels))
    assert_close(call(branch, pixels), extracted)
    keras.backend.clear_session()


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in helper.BACKBONES if n.startswith("ConvNeXt")])
def test_convnext_02_04_08_give_keras_pooled_features(name, tmp_path):
    """02's network, 04's maps extractor + tail + classifier and 08's branch all compute
    keras.applications.ConvNeXt*(include_top=False, pooling="avg") to 1e-5, with the same weights read from a
    weights file as the ImageNet ones are (LayerNorm weights made non-trivial, so their copy is tested too)."""
    import keras
    from keras.src.legacy.saving import legacy_h5_format
    bb = helper.BACKBONES[name]
    ref = getattr(keras.applications, name)(include_top=False, pooling="avg", weights=None,
                                            input_shape=(SMALL, SMALL, 3))
    rng = np.random.default_rng(0)
    for layer in ref.layers:
        if isinstance(layer, keras.layers.LayerNormalization):
            gamma, beta = layer.get_weights()
            layer.set_weights([gamma + rng.normal(0, 0.3, gamma.shape), beta + rng.normal(0, 0.3, beta.shape)])
    with h5py.File(tmp_path / bb.weights_file, "w") as f:  # the layout of Keras's *_notop.h5 files
        legacy_h5_format.save_weights_to_hdf5_group(f, ref)
    pixels = np.random.default_rng(1).uniform(0, 255, (2, SMALL, SMALL, 3)).astype(np.float32)
    expected = call(ref, pixels)
    del ref

    ours = bb.build(str(tmp_path), SMALL)  # 02
    assert_close(call(ours, bb.preprocess(pixels)), expected, rel=1e-5)
    split = script("04")
    extractor, tail = split.split_model(ours, split.split_layer_name(bb, ours))
    model = split.classifier(tail, tail.input_shape[1:], "maps", 0.5, "m")
    features = keras.Model(model.input, model.get_layer(helper.PREDICTION_LAYER).input)
    assert_close(call(features, call(extractor, pixels)), expected, rel=1e-5)
    del ours, extractor, tail, model, features

    image = keras.Input((SMALL, SMALL, 3))
    settings = helper.ExtractSettings(name, SMALL, weights=str(tmp_path))
    branch, _ = script("08").branch(image, SMALL, settings, str(tmp_path))
    assert_close(call(keras.Model(image, branch), pixels), expected, rel=1e-5)
    keras.backend.clear_session()
