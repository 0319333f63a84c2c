"""The foundation encoders from KerasHub (DINOv2, DINOv3, CLIP, SigLIP 2, MetaCLIP 2) as backbones: each one's
preset, architecture (enough to build it offline with random weights), image converter, and the output its
authors probe linearly. backbones.py adds them to BACKBONES, so 02-08 take them by name like the CNNs.

Used by: 02 (extraction), 08 (export), the --models choices; tests and docs/foundation-encoders.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .common import CatDogError

# Where each family's classes live in keras_hub (imported only when an encoder is built).
FAMILIES = {"dinov2": ("DINOV2Backbone", None), "dinov3": ("DINOV3Backbone", None),
            "clip": ("CLIPBackbone", "CLIPVisionEncoder"), "siglip": ("SigLIPBackbone", "SigLIPVisionEncoder"),
            "metaclip_2": ("MetaCLIP2Backbone", "MetaCLIP2VisionEncoder")}
# The feature of each family: what its authors' linear probes read (see FEATURE_SOURCES in the docs page).
FEATURES = {"dinov2": "cls+mean", "dinov3": "cls+mean", "clip": "embedding", "siglip": "map",
            "metaclip_2": "embedding"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
PRESET_FILES = ("config.json", "model.weights.h5")  # what Backbone.save_to_preset writes (and from_preset reads)
KAGGLE = "https://www.kaggle.com/models/"


@dataclass(frozen=True)
class Encoder:
    """One KerasHub image encoder: how to build it (pretrained, from a preset folder, or random), feed it (its
    image converter's resize, then scale/offset) and read its feature."""
    name: str
    family: str          # a key of FAMILIES
    preset: str          # KerasHub preset name; its Kaggle handle below
    kaggle_handle: str
    size: int            # native input size: the preset's image converter's
    config: dict         # the (vision) backbone's constructor arguments, as the preset's config.json has them
    interpolation: str   # the image converter's resize: filter,
    antialias: bool      # antialias,
    crop: bool           # crop_to_aspect_ratio (centre crop to a square before resizing) or squash,
    mean: tuple[float, float, float]  # and normalisation (scale = 1 / 255 / std, offset = -mean / std)
    std: tuple[float, float, float]
    projection_dim: int = 0  # CLIP, MetaCLIP: the image embedding's width
    batch_size: int = 32     # 02's default: activations of a batch in float32 fit a 16 GB GPU
    params: int = 0          # the preset's parameter count (KerasHub's metadata: vision and text towers)
    vision_params: int = 0   # what build() makes: the vision tower and its feature (checked in the tests)
    gated: bool = False      # the weights' licence must be accepted on Kaggle before they download
    licence: str = ""
    split_layer: str | None = None  # not split-block fine-tunable (04)
    file_weights: bool = True

    @property
    def feature(self) -> str:
        return FEATURES[self.family]

    @property
    def patch_size(self) -> int:
        return int(self.config["patch_size"])

    @property
    def min_size(self) -> int:
        return self.patch_size  # one patch; position embeddings interpolate (DINOv2) or are built at the size

    @property
    def width(self) -> int:
        hidden = int(self.config["hidden_dim"])
        return {"cls+mean": 2 * hidden, "map": hidden, "embedding": self.projection_dim}[self.feature]

    @property
    def weights_file(self) -> str:
        return PRESET_FILES[1]

    @property
    def weights_url(self) -> str:
        return KAGGLE + self.kaggle_handle.removeprefix("kaggle://").rsplit("/", 1)[0]

    # ------------------------------------------------------------------ the image converter

    def converter(self, image_size: int | None = None):
        """KerasHub's image converter of this encoder at `image_size`: what its preset's preprocessor.json holds."""
        import keras_hub
        size = image_size or self.size
        return keras_hub.layers.ImageConverter(
            image_size=(size, size), scale=[1.0 / 255.0 / s for s in self.std],
            offset=[-m / s for m, s in zip(self.mean, self.std, strict=True)], crop_to_aspect_ratio=self.crop,
            interpolation=self.interpolation, antialias=self.antialias)

    def resizer(self, image_size: int):
        """The converter's resize alone, for one decoded uint8 image (h, w, 3) as numpy -> (size, size, 3) float32,
        run eagerly as a user's `converter(image)` runs it: Keras rounds an eager resize of uint8 back to whole
        values, and its graph-mode resize (inside tf.data) differs, so 02 calls this from its Pillow thread."""
        import keras
        import numpy as np
        layer = keras.layers.Resizing(image_size, image_size, interpolation=self.interpolation,
                                      crop_to_aspect_ratio=self.crop, antialias=self.antialias,
                                      dtype="float32")  # as the converter's, whatever --mixed-precision sets

        def resize(img: np.ndarray) -> np.ndarray:
            return np.asarray(layer(np.asarray(img, np.uint8)), np.float32).reshape(image_size, image_size, 3)
        return resize

    def pixels(self, path, image_size: int, exif: bool = False):
        """One photo as the uint8 (size, size, 3) pixels this encoder's converter makes of it (its crop, filter
        and, on uint8, Keras's rounding): what 08's export of an encoder head takes (predict.py, 08's check)."""
        import numpy as np

        from .images import load_pixels
        x = self.resizer(image_size)(load_pixels(path, None, exif=exif))
        return np.clip(np.round(x), 0, 255).astype(np.uint8)

    def preprocess(self, x):
        """The converter's scale and offset (after its resize): x / 255 - mean, / std."""
        import numpy as np
        scale = np.array([1.0 / 255.0 / s for s in self.std], np.float32)
        offset = np.array([-m / s for m, s in zip(self.mean, self.std, strict=True)], np.float32)
        if isinstance(x, np.ndarray):
            return np.asarray(x, np.float32) * scale + offset
        return x * scale + offset

    # ------------------------------------------------------------------ weights

    def resolve_weights(self, spec: str) -> str | None:
        """'imagenet' (pretrained: the preset, downloaded now into the kagglehub cache) -> its local folder,
        'none' -> None, a preset folder -> its path; a gated or failed download gets a clear message now, before
        any image is read."""
        if spec.lower() == "none":
            return None
        if spec == "imagenet":
            return download(self)
        path = Path(spec).expanduser()
        missing = [f for f in PRESET_FILES if not (path / f).is_file()]
        if not path.is_dir() or missing:
            raise CatDogError(f"--weights {spec}: not a KerasHub preset folder (missing {', '.join(missing)}); "
                              f"give the folder that keras_hub's save_to_preset wrote for {self.preset} (or the "
                              f"one kagglehub downloaded from {self.weights_url}), or use --weights imagenet / none")
        return str(path)

    # ------------------------------------------------------------------ the network

    @property
    def pooling(self) -> str:
        """The output that is its feature: a setting of its feature files, as a CNN's pooling is."""
        return FEATURES[self.family]

    def build(self, weights: str = "imagenet", image_size: int | None = None, pooling: str | None = "avg",
              resolved: str | None = None):
        """images (size, size, 3), already preprocessed -> this encoder's feature (width,); `pooling` None gives
        the token sequence (batch, tokens, hidden) the feature is read from. `resolved`: where resolve_weights
        found the weights (02 resolves them all before the first extraction)."""
        import keras
        import keras_hub
        size = image_size or self.size
        if size < self.min_size:
            raise CatDogError(f"{self.name} needs --image-size >= {self.min_size}, got {size}")
        path = resolved if resolved is not None else self.resolve_weights(weights)
        backbone_cls, vision_cls = (getattr(keras_hub.models, c) if c else None for c in FAMILIES[self.family])
        if path is None:  # random weights: the vision tower alone, built from the registry's numbers
            cls = backbone_cls if vision_cls is None else vision_cls
            tower = cls(**self.config, image_shape=(size, size, 3))
            proj = keras.layers.Dense(self.projection_dim, use_bias=False, name="vision_projection") \
                if self.feature == "embedding" else None
            post = keras.layers.LayerNormalization(epsilon=1e-5, name="vision_post_layer_norm") \
                if self.family == "metaclip_2" else None
        else:
            # The preset's config.json records its own dtype; the run's policy (float32, or --mixed-precision's
            # mixed_float16) decides, as for the CNNs.
            dtype = keras.config.dtype_policy().name
            try:
                if vision_cls is None:  # DINO: the position embeddings interpolate (DINOv2) or rotate (v3)
                    backbone = backbone_cls.from_preset(path, image_shape=(size, size, 3), dtype=dtype)
                else:
                    backbone = backbone_cls.from_preset(path, dtype=dtype)
            except Exception as e:
                raise CatDogError(f"could not load {self.name} from {path} ({type(e).__name__}: {e}): give a "
                                  f"folder saved by {backbone_cls.__name__}.save_to_preset") from e
            tower = backbone if vision_cls is None else backbone.vision_encoder
            if tower.dtype_policy.name != dtype:  # a nested tower keeps the dtype its own config records
                weights_of = tower.get_weights()
                tower = vision_cls.from_config({**tower.get_config(), "dtype": dtype})
                tower.set_weights(weights_of)
            have = tuple(tower.image_shape)[:2]
            if have != (size, size):
                raise CatDogError(f"{self.name}'s preset {path} takes {have[0]} px images (its position embeddings "
                                  f"are fixed): use --image-size {have[0]}")
            proj = getattr(backbone, "vision_projection", None) if self.feature == "embedding" else None
            post = getattr(backbone, "vision_post_layer_norm", None) if self.family == "metaclip_2" else None
        x = keras.Input((size, size, 3), name="images")
        inp = tower.input  # DINOv3 names its input pixel_values, the others images
        tokens = tower({k: x for k in inp} if isinstance(inp, dict) else x)
        if pooling is None:
            out = tokens
        elif self.feature == "cls+mean":
            out = keras.layers.Concatenate(name="cls_patch_mean")(
                [tokens[:, 0], keras.ops.mean(tokens[:, 1 + int(self.config.get("num_register_tokens", 0)):], 1)])
        elif self.feature == "map":
            out = tokens  # SigLIP's vision tower ends in its attention-pooling (MAP) head
        else:
            cls = tokens[:, 0]
            out = proj(post(cls) if post is not None else cls)
        return keras.Model(x, out, name=self.name)


def download(encoder: Encoder) -> str:
    """The pretrained preset's local folder: kagglehub downloads it (once, into KAGGLEHUB_CACHE) as keras_hub's
    from_preset would. Any failure, gated licence included, becomes a message saying what to do."""
    try:
        import kagglehub
        return str(kagglehub.model_download(encoder.kaggle_handle.removeprefix("kaggle://")))
    except Exception as e:  # network, credentials, licence: kagglehub raises various types
        terms = (f"{encoder.name}'s weights are gated: sign in at {encoder.weights_url}, accept its licence, and "
                 f"set KAGGLE_USERNAME and KAGGLE_KEY (or ~/.kaggle/kaggle.json); " if encoder.gated else "")
        raise CatDogError(f"could not download {encoder.name}'s preset {encoder.preset} ({type(e).__name__}: {e}). "
                          f"{terms}On a machine with internet run `python -c \"import kagglehub; print(kagglehub."
                          f"model_download('{encoder.kaggle_handle.removeprefix('kaggle://')}'))\"`, copy that folder "
                          f"here and pass --weights FOLDER; --weights none builds it with random weights") from e


# The numbers: each preset's architecture is keras_hub's conversion (tools/checkpoint_conversion/convert_*.py,
# keras_hub/src/utils/transformers/convert_*.py) of the Hugging Face config.json named beside it; the image
# converter's settings are those scripts' convert_image_converter. tests/test_encoders.py checks the DINO entries
# against the preset's parameter count (keras_hub's *_presets.py metadata).
_DINOV2 = dict(interpolation="bicubic", antialias=False, crop=True, mean=IMAGENET_MEAN, std=IMAGENET_STD)
_OPENAI = dict(interpolation="bicubic", antialias=False, crop=True, mean=OPENAI_MEAN, std=OPENAI_STD)
ENCODERS: dict[str, Encoder] = {e.name: e for e in [
    # facebook/dinov2-large: ViT-L/14, image_size 518 (the converter's size), mlp_ratio 4, layerscale 1.0.
    # Feature: the DINOv2 paper's linear probe (Sec. 7.1) reads the class token and the average-pooled patch tokens.
    Encoder("DINOv2L", "dinov2", "dinov2_large", "kaggle://keras/dinov2/keras/dinov2_large/1", 518,
            dict(patch_size=14, num_layers=24, hidden_dim=1024, num_heads=16, intermediate_dim=4096,
                 layer_scale_init_value=1.0, use_swiglu_ffn=False, position_embedding_shape=(518, 518)),
            **_DINOV2, batch_size=16, params=305_771_520, vision_params=305_771_520, licence="Apache-2.0"),
    # facebook/dinov2-giant: ViT-g/14, hidden 1536, 40 layers, 24 heads, SwiGLU FFN (mlp_ratio 4).
    Encoder("DINOv2G", "dinov2", "dinov2_giant", "kaggle://keras/dinov2/keras/dinov2_giant/1", 518,
            dict(patch_size=14, num_layers=40, hidden_dim=1536, num_heads=24, intermediate_dim=6144,
                 layer_scale_init_value=1.0, use_swiglu_ffn=True, position_embedding_shape=(518, 518)),
            **_DINOV2, batch_size=8, params=1_138_585_088, vision_params=1_138_585_088, licence="Apache-2.0"),
    # facebook/dinov3-vitl16-pretrain-lvd1689m: ViT-L/16, 4 registers, RoPE (theta 100), no key bias, 224 px;
    # converter: squash, bilinear with antialias. Feature: DINOv3's linear probes read the class token and the
    # mean of the patch tokens (registers excluded).
    Encoder("DINOv3L", "dinov3", "dinov3_vit_large_lvd1689m",
            "kaggle://keras/dinov3/keras/dinov3_vit_large_lvd1689m/1", 224,
            dict(patch_size=16, num_layers=24, hidden_dim=1024, num_heads=16, intermediate_dim=4096,
                 layer_scale_init_value=1.0, num_register_tokens=4, hidden_activation="gelu", use_gated_mlp=False,
                 use_query_bias=True, use_key_bias=False, use_value_bias=True, use_proj_bias=True,
                 use_mlp_bias=True, layer_norm_eps=1e-5, rope_theta=100.0),
            interpolation="bilinear", antialias=True, crop=False, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            batch_size=32, params=300_000_000, vision_params=303_129_600, gated=True,
            licence="DINOv3 License (Meta; gated, accept on Kaggle)"),
    # openai/clip-vit-large-patch14-336: vision hidden 1024, 24 layers, 16 heads, quick_gelu, projection 768.
    # Feature: the CLIP paper's linear probes (Sec. 3.2) read the image embedding.
    Encoder("CLIPL336", "clip", "clip_vit_large_patch14_336", "kaggle://keras/clip/keras/clip_vit_large_patch14_336/3",
            336, dict(patch_size=14, hidden_dim=1024, num_layers=24, num_heads=16, intermediate_dim=4096,
                      intermediate_activation="quick_gelu"),
            **_OPENAI, projection_dim=768, batch_size=32, params=427_944_770, vision_params=304_294_465,
            licence="MIT"),
    # google/siglip2-so400m-patch14-384: hidden 1152, 27 layers, 16 heads, mlp 4304, tanh-GELU; converter: squash,
    # bicubic with antialias, mean = std = 0.5. Feature: the MAP head's output, SigLIP's image embedding.
    Encoder("SigLIP2SO400M", "siglip", "siglip2_so400m_patch14_384",
            "kaggle://keras/siglip/keras/siglip2_so400m_patch14_384/1", 384,
            dict(patch_size=14, hidden_dim=1152, num_layers=27, num_heads=16, intermediate_dim=4304,
                 intermediate_activation="gelu_approximate", layer_norm_epsilon=1e-6),
            interpolation="bicubic", antialias=True, crop=False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
            batch_size=16, params=1_136_009_291, vision_params=428_226_329, licence="Apache-2.0"),
    # facebook/metaclip-2-worldwide-huge-quickgelu (ViT-H-14-quickgelu-worldwide, 224 px): vision hidden 1280,
    # 32 layers, 16 heads, mlp 5120, projection 1024. Feature: the image embedding, as for CLIP.
    Encoder("MetaCLIP2H", "metaclip_2", "metaclip_2_vit_huge_patch14_224",
            "kaggle://keras/metaclip2/keras/metaclip_2_vit_huge_patch14_224/1", 224,
            dict(patch_size=14, hidden_dim=1280, num_layers=32, num_heads=16, intermediate_dim=5120,
                 intermediate_activation="quick_gelu"),
            **_OPENAI, projection_dim=1024, batch_size=32, params=1_858_783_745, vision_params=632_076_800,
            licence="CC-BY-NC-4.0"),
]}
