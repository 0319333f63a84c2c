"""Grad-CAM: where each backbone branch of an exported model looked, and the overlays that show it.

Used by: 07 --analyze (the worst images) and predict.py --cam.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .plots import pyplot, save_figure


def grad_cam(model, images: np.ndarray, map_layers: Sequence[str], logit_layer: str = "logit") -> np.ndarray:
    """Grad-CAM maps (n_branches, batch, h, w), each resized to the images: ReLU(sum_c alpha_c A_c) with alpha_c
    the mean gradient of the logit over the branch's map A (the input of `map_layers[k]`, its pooling layer).
    The head is linear in the pooled features, so every branch's map is independent of the others."""
    import keras
    import tensorflow as tf
    map_tensors = [model.get_layer(n).input for n in map_layers]
    lower = keras.Model(model.inputs[0] if len(model.inputs) == 1 else model.inputs, map_tensors)  # image -> maps
    upper = keras.Model(map_tensors, model.get_layer(logit_layer).output)  # maps -> logit: what the tape sees
    maps = [tf.convert_to_tensor(a) for a in keras.tree.flatten(lower(images, training=False))]
    with tf.GradientTape() as tape:
        tape.watch(maps)
        total = tf.reduce_sum(upper(maps if len(maps) > 1 else maps[0], training=False))  # one logit per image
    grads = tape.gradient(total, maps)
    cams = [tf.nn.relu(tf.reduce_sum(tf.reduce_mean(g, axis=(1, 2), keepdims=True) * a, axis=-1))
            for a, g in zip(maps, grads, strict=True)]
    return np.stack([tf.image.resize(c[..., None], images.shape[1:3], method="bilinear")[..., 0].numpy()
                     for c in cams])


def save_cam_overlay(image: np.ndarray, cams: np.ndarray, names: Sequence[str], path: str | Path,
                     title: str = "") -> None:
    """The image, then each branch's map over it (normalised to [0, 1] on its own), then their unnormalised sum."""
    plt = pyplot()
    panels = [(n, c / c.max() if c.max() > 0 else c) for n, c in zip(names, cams, strict=True)]
    if len(cams) > 1:
        total = cams.sum(axis=0)
        panels.append(("sum", total / total.max() if total.max() > 0 else total))
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3 * (len(panels) + 1), 3.3), squeeze=False)
    axes[0, 0].imshow(image)
    axes[0, 0].set_title(title, fontsize=9)
    for ax, (name, cam) in zip(axes[0, 1:], panels, strict=True):
        ax.imshow(image)
        ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
    for ax in axes.ravel():
        ax.axis("off")
    save_figure(fig, path)

