"""The backbone registry: each pretrained CNN's constructor, native size, feature width, preprocessing, weights
file and the layer where split-block fine-tuning cuts it; BACKBONES also holds KerasHub's foundation encoders
(encoders.py), so every step takes them by name.

Used by: 02 (extraction), 04 (fine-tuning), 09 (students), 07 and 08 (feeding and rebuilding models), the heads'
--models choices.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import POOL_LAYER, CatDogError
from .encoders import ENCODERS, Encoder


@dataclass(frozen=True)
class Backbone:
    """One pretrained CNN: how to build it, feed it and where fine-tuning cuts it."""
    name: str
    module: str          # keras.applications submodule holding the constructor and preprocess_input
    constructor: str
    size: int            # native input size
    min_size: int        # smallest input Keras accepts (below it InceptionV3 yields an empty map)
    width: int           # GlobalAveragePool feature width
    weights_file: str    # Keras's no-top ImageNet weights file, as Keras caches it in ~/.keras/models
    split_layer: str | None  # where split-block fine-tuning cuts; "Add:last" = the last Add layer
    weights_url: str     # where Keras downloads weights_file from (NASNet's name differs there)
    # False where Keras builds the network differently unless weights="imagenet" (EfficientNet B0-B7 add an input
    # scaling only then), so a weights file would be read into a network that scales its input otherwise.
    file_weights: bool = True
    # Keras's pooled features (include_top=False, pooling="avg"): "avg", or "avg+layernorm" where the pooled vector
    # is normalised by the network's final LayerNorm (ConvNeXt). Feature files record it.
    pooling: str = "avg"

    def preprocess(self, x):
        """This backbone's own preprocess_input ('caffe', [-1, 1], or none where the model normalises its 0-255
        input itself: EfficientNet, EfficientNetV2, ConvNeXt); returns a new array or tensor."""
        import keras
        fn = getattr(keras.applications, self.module).preprocess_input
        return fn(np.array(x, dtype=np.float32) if isinstance(x, np.ndarray) else x)  # it edits numpy in place

    def build(self, weights: str = "imagenet", image_size: int | None = None, pooling: str | None = "avg",
              input_tensor=None, pool_name: str = POOL_LAYER):
        """The CNN without its top: with pooling='avg' Keras's own pooled features (`include_top=False,
        pooling="avg"`: ConvNeXt normalises the pooled vector with its final LayerNorm, what its ImageNet head was
        trained on), its GlobalAveragePooling named `pool_name` (Grad-CAM reads the maps at its input); with
        pooling=None Keras's last feature maps. On `input_tensor` (08), its layers join that tensor's graph instead
        of a nested model."""
        import keras
        size = image_size or self.size
        if size < self.min_size:
            raise CatDogError(f"{self.name} needs --image-size >= {self.min_size}, got {size}")
        if pooling not in (None, "avg"):
            raise ValueError(f"pooling must be None or 'avg', got {pooling!r}")
        ctor = getattr(keras.applications, self.constructor)
        w = resolve_weights(weights, self)
        if input_tensor is not None and w is not None:
            return self._flat_with_weights(weights, size, pooling, input_tensor, pool_name)
        build = functools.partial(ctor, include_top=False, weights=w, input_shape=(size, size, 3), pooling=pooling,
                                  input_tensor=input_tensor)
        try:
            net = build()
        except Exception as e:  # a download failure surfaces as various exception types
            if w is None:  # no weights were loaded: not a weights problem
                raise
            if w != "imagenet":
                raise CatDogError(f"could not load {self.name} weights from {w}: {e}") from e
            raise CatDogError(
                f"could not download {self.name}'s ImageNet weights ({e}). On a machine with internet fetch "
                f"{self.weights_url} and save it as ~/.keras/models/{self.weights_file}"
                + (" (or in any folder, and pass --weights FOLDER)" if self.file_weights else "")) from e
        if pooling is None:
            return net
        return _named_pool(net, pool_name)

    def _flat_with_weights(self, weights: str, size: int, pooling: str | None, input_tensor, pool_name: str):
        """build() on `input_tensor` with weights: Keras reads a weights file by the order of the layers with
        weights, which on an input tensor would include the layers before it (08's preprocessing), so the network
        is built with its weights on its own input and they are copied into a random one built on the tensor."""
        if not self.file_weights:  # Keras adds its input scaling only while loading: the random one would lack it
            raise CatDogError(f"{self.name}'s ImageNet network cannot be rebuilt inside another graph (Keras adds "
                              f"its input scaling only when it loads the weights itself): use another backbone")
        loaded = self.build(weights, size, pooling, pool_name=pool_name)
        flat = self.build("none", size, pooling, input_tensor, pool_name)
        src = [layer for layer in loaded.layers if layer.weights]
        dst = [layer for layer in flat.layers if layer.weights][-len(src):]
        for a, b in zip(src, dst, strict=True):
            b.set_weights(a.get_weights())
        return flat


def _named_pool(net, pool_name: str):
    """Keras's pooled network with its GlobalAveragePooling named `pool_name` and the layers after it (ConvNeXt's
    LayerNorm) rebuilt with its weights: the same computation, under names later steps look up and that do not
    depend on how many networks this session built."""
    import keras
    pools = [i for i, layer in enumerate(net.layers) if isinstance(layer, keras.layers.GlobalAveragePooling2D)]
    if not pools:
        raise ValueError(f"{net.name} has no GlobalAveragePooling2D")
    pool = net.layers[pools[-1]]
    x = keras.layers.GlobalAveragePooling2D(name=pool_name)(pool.input)
    for layer in net.layers[pools[-1] + 1:]:
        twin = type(layer).from_config({**layer.get_config(), "name": f"{pool_name}_{type(layer).__name__.lower()}"})
        x = twin(x)
        twin.set_weights(layer.get_weights())
    return keras.Model(net.input, x, name=net.name)


CONVNEXT_POOLING = "avg+layernorm"
_NOTOP = "_weights_tf_dim_ordering_tf_kernels_notop.h5"
_APPS = "https://storage.googleapis.com/tensorflow/keras-applications/"
# The report's backbones, in its order: what 02 extracts by default.
REPORT_BACKBONES = ("ResNet50", "VGG16", "InceptionV3", "Xception", "InceptionResNetV2")
# Phone-sized networks that 09 distils the ensemble into (its --student choices, the first its default).
STUDENTS = ("MobileNetV3Large", "MobileNetV3Small", "EfficientNetV2B0")
_MOBILENET_V3 = "_224_1.0_float_no_top_v2.h5"
# Sizes, widths, file names and URLs are Keras's (keras/src/applications/); every min_size is Keras's own floor
# of 32, at which each of them builds and runs. The split layers cut before the last block (ConvNeXt: before its
# last stage, whose blocks end in ops, not layers); NASNet's cells each read the two cells before them, so no
# single layer splits it.
BACKBONES: dict[str, Backbone] = {b.name: b for b in [
    Backbone("ResNet50", "resnet50", "ResNet50", 224, 32, 2048, "resnet50" + _NOTOP, "conv5_block2_out",
             _APPS + "resnet/resnet50" + _NOTOP),
    Backbone("VGG16", "vgg16", "VGG16", 224, 32, 512, "vgg16" + _NOTOP, None, _APPS + "vgg16/vgg16" + _NOTOP),
    Backbone("InceptionV3", "inception_v3", "InceptionV3", 299, 75, 2048, "inception_v3" + _NOTOP, "mixed9",
             _APPS + "inception_v3/inception_v3" + _NOTOP),
    Backbone("Xception", "xception", "Xception", 299, 71, 2048, "xception" + _NOTOP, "Add:last",
             _APPS + "xception/xception" + _NOTOP),
    Backbone("InceptionResNetV2", "inception_resnet_v2", "InceptionResNetV2", 299, 75, 1536,
             "inception_resnet_v2" + _NOTOP, None, _APPS + "inception_resnet_v2/inception_resnet_v2" + _NOTOP),
    Backbone("EfficientNetV2S", "efficientnet_v2", "EfficientNetV2S", 384, 32, 1280, "efficientnetv2-s_notop.h5",
             "block6n_add", _APPS + "efficientnet_v2/efficientnetv2-s_notop.h5"),
    Backbone("EfficientNetV2L", "efficientnet_v2", "EfficientNetV2L", 480, 32, 1280, "efficientnetv2-l_notop.h5",
             "block7f_add", _APPS + "efficientnet_v2/efficientnetv2-l_notop.h5"),
    Backbone("EfficientNetB7", "efficientnet", "EfficientNetB7", 600, 32, 2560, "efficientnetb7_notop.h5",
             "block7c_add", "https://storage.googleapis.com/keras-applications/efficientnetb7_notop.h5",
             file_weights=False),
    Backbone("ConvNeXtBase", "convnext", "ConvNeXtBase", 224, 32, 1024, "convnext_base_notop.h5",
             "convnext_base_downsampling_block_2", _APPS + "convnext/convnext_base_notop.h5", pooling=CONVNEXT_POOLING),
    Backbone("ConvNeXtXLarge", "convnext", "ConvNeXtXLarge", 224, 32, 2048, "convnext_xlarge_notop.h5",
             "convnext_xlarge_downsampling_block_2", _APPS + "convnext/convnext_xlarge_notop.h5",
             pooling=CONVNEXT_POOLING),
    Backbone("NASNetLarge", "nasnet", "NASNetLarge", 331, 32, 4032, "nasnet_large_no_top.h5", None,
             _APPS + "nasnet/NASNet-large-no-top.h5"),
    Backbone("ResNet152V2", "resnet_v2", "ResNet152V2", 224, 32, 2048, "resnet152v2" + _NOTOP, "conv5_block2_out",
             _APPS + "resnet/resnet152v2" + _NOTOP),
    # The students: MobileNetV3 (include_preprocessing: its own Rescaling to [-1, 1]) and EfficientNetV2 take
    # 0-255 pixels, so their preprocess_input passes them through. Without the top, MobileNetV3's last maps are its
    # conv_1 (960 / 576 channels): the 1280 / 1024 of Keras's top come after the pool.
    Backbone("MobileNetV3Large", "mobilenet_v3", "MobileNetV3Large", 224, 32, 960,
             "weights_mobilenet_v3_large" + _MOBILENET_V3, None,
             _APPS + "mobilenet_v3/weights_mobilenet_v3_large" + _MOBILENET_V3),
    Backbone("MobileNetV3Small", "mobilenet_v3", "MobileNetV3Small", 224, 32, 576,
             "weights_mobilenet_v3_small" + _MOBILENET_V3, None,
             _APPS + "mobilenet_v3/weights_mobilenet_v3_small" + _MOBILENET_V3),
    Backbone("EfficientNetV2B0", "efficientnet_v2", "EfficientNetV2B0", 224, 32, 1280, "efficientnetv2-b0_notop.h5",
             None, _APPS + "efficientnet_v2/efficientnetv2-b0_notop.h5"),
]} | ENCODERS


def get_backbone(name: str) -> Backbone | Encoder:
    """Registry lookup with a helpful error."""
    if name not in BACKBONES:
        import difflib
        lower = {n.lower(): n for n in BACKBONES}
        close = difflib.get_close_matches(name.lower(), lower, n=1, cutoff=0.75)
        hint = f"did you mean {lower[close[0]]}? " if close else ""
        raise CatDogError(f"unknown backbone {name!r}: {hint}choose from {', '.join(BACKBONES)}")
    return BACKBONES[name]


def resolve_weights(spec: str, backbone: Backbone | Encoder) -> str | None:
    """'imagenet' -> 'imagenet', 'none' -> None, a folder or .h5 file -> the weights file path; for an encoder,
    its preset folder (pretrained: downloaded now)."""
    if isinstance(backbone, Encoder):
        return backbone.resolve_weights(spec)
    if spec == "imagenet":
        return "imagenet"
    if spec.lower() == "none":
        return None
    if not backbone.file_weights:
        raise CatDogError(f"--weights {spec}: Keras builds {backbone.name}'s input scaling only with --weights "
                          f"imagenet, so a weights file would feed it other inputs; put {backbone.weights_file} in "
                          f"~/.keras/models/ (Keras then loads it from there, without downloading) and use "
                          f"--weights imagenet")
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / backbone.weights_file
    if not path.is_file():
        raise CatDogError(f"{path}: weights file not found (save {backbone.weights_url} in that folder as "
                          f"{backbone.weights_file}, or use --weights imagenet / none)")
    return str(path)

