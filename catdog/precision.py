"""The compute precision of the CNNs (--precision): resolving `auto` from this machine's CPU flags and GPUs, and
the Keras mixed-precision policy that goes with it, set for a block and restored after.

float32 is the report's. bfloat16 (Keras 'mixed_bfloat16': variables float32, compute bfloat16) is 1.6-1.7x
faster on a CPU with bf16 dot-product instructions (AVX512_BF16, AMX) and needs no loss scaling (its exponent
range is float32's); float16 ('mixed_float16') pays on GPUs of compute capability >= 7.0 (tensor cores) and is
slow on a CPU. Numbers: benchmarks/precision_bench.md.

Used by: 02 and 04 (the policy), 08 and predict.py (as_precision), catdog/features.py (legacy_precision: the
setting in feature files of the release before).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

from .common import log

PRECISIONS = ("float32", "float16", "bfloat16")
PRECISION_CHOICES = (*PRECISIONS, "auto")
KERAS_POLICY = {"float32": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")
MIN_FLOAT16_CAPABILITY = (7, 0)  # Volta: the first tensor cores


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    with contextlib.suppress(OSError):
        with open(path) as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86, ARM
                    return set(line.split(":", 1)[1].split())
    return set()


def gpu_capabilities() -> list[tuple[str, tuple[int, int] | None]]:
    """TensorFlow's GPUs with their compute capability (None where TensorFlow does not say)."""
    import tensorflow as tf
    found = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = {}
        with contextlib.suppress(Exception):
            details = tf.config.experimental.get_device_details(gpu)
        found.append((details.get("device_name", gpu.name), details.get("compute_capability")))
    return found


def resolve_precision(precision: str, flags: Callable[[], set[str]] | None = None,
                      gpus: Callable[[], Sequence[tuple[str, tuple[int, int] | None]]] | None = None) -> str:
    """`precision`, or for 'auto': float16 where every GPU has compute capability >= 7.0 (TensorFlow puts the CNN
    there), else float32 on other GPUs, bfloat16 on a CPU with bf16 instructions, else float32. Logs the choice
    and why; `flags` and `gpus` are the readers (default: cpu_flags and gpu_capabilities)."""
    if precision != "auto":
        return precision
    found = list((gpus or gpu_capabilities)())
    if found:
        slow = [name for name, cc in found if cc is None or tuple(cc) < MIN_FLOAT16_CAPABILITY]
        names = ", ".join(f"{name} (compute capability {'.'.join(map(str, cc)) if cc else 'unknown'})"
                          for name, cc in found)
        picked, why = (("float32", f"GPU {names}: float16 pays from compute capability 7.0") if slow
                       else ("float16", f"GPU {names}: tensor cores"))
    else:
        have = sorted(set(BF16_CPU_FLAGS) & (flags or cpu_flags)())
        picked, why = (("bfloat16", f"no GPU; the CPU has {', '.join(have)}") if have
                       else ("float32", f"no GPU; the CPU has none of {', '.join(BF16_CPU_FLAGS)}"))
    log.info(f"--precision auto: {picked} ({why})")
    return picked


@contextlib.contextmanager
def precision_policy(precision: str) -> Iterator[str]:
    """Keras's global dtype policy for `precision` ('auto' resolved) inside the block, the previous one restored
    after; yields the precision used. Layers built inside compute in it; their variables stay float32."""
    import keras
    precision = resolve_precision(precision)
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy(KERAS_POLICY[precision])
    try:
        yield precision
    finally:
        keras.config.set_dtype_policy(before)


def as_precision(model, precision: str):
    """A copy of a flat functional model (08's pixel model) that computes in `precision`, with its weights; the
    output layer stays float32, as Keras's mixed-precision guide advises. The model itself when it already does."""
    import keras
    policy, last = KERAS_POLICY[precision], model.layers[-1].name
    if all(layer.dtype_policy.name == ("float32" if layer.name == last else policy) for layer in model.layers
           if not isinstance(layer, keras.layers.InputLayer)):
        return model

    def clone(layer):
        config = layer.get_config()
        if not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = "float32" if layer.name == last else policy
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def legacy_precision(attrs: dict) -> dict:
    """Attributes of a feature file or sidecar of the release before --precision (`mixed_precision`) with
    `precision` instead: mixed_precision=True was float16, False float32, so those files are reused as they are."""
    if "mixed_precision" not in attrs:
        return attrs
    mixed = attrs["mixed_precision"]
    mixed = mixed.item() if hasattr(mixed, "item") else mixed  # HDF5 gives numpy scalars back
    rest = {k: v for k, v in attrs.items() if k != "mixed_precision"}
    return {"precision": "float16" if mixed else "float32", **rest}
