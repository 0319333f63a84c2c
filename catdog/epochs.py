"""The whole-epoch training loop: Keras's `model.fit` on arrays, run an epoch per tf.function call.

Keras's fit on arrays spends much of a head's epoch on per-step overhead: a tf.data batch and a Python call per
step, 125 steps an epoch for the report's merged head. fit_arrays runs a whole epoch in one tf.function call
instead, with the same steps in the same order, so every result stays Keras's own (tests/test_heads.py compares
them) in about half the time (benchmarks/heads_bench.md). The one module that touches Keras internals (its
ArrayDataAdapter, for the batch order), behind the equality tests that guard it.

Used by: the heads (03, 05, their K-fold runs) through heads.fit, and 06's trials (kopt calls model.fit).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

from .common import CatDogError


def fit_arrays(model, x, y, *, batch_size: int | None = None, epochs: int = 1, verbose="auto",
               callbacks: Sequence | None = None, validation_data=None, shuffle: bool = True, initial_epoch: int = 0,
               validation_batch_size: int | None = None):
    """Keras's `model.fit(x, y, ...)` on arrays, run an epoch per tf.function call: the same batches in the same
    order (Keras's own shuffle), the same train_step and test_step, the same callbacks' hooks and logs (batch
    hooks once per epoch, as Keras makes them with steps_per_execution = steps per epoch), the same
    History, returned. `x`: an array, a list of arrays (one per model input), or a callable epoch -> those
    (epoch 0-based, counted as Keras does from 0 across initial_epoch) giving that epoch's training inputs:
    the same rows in the same shapes every epoch (e.g. an augmented view of the features); each epoch's
    result replaces the last. `validation_data`: (inputs, labels) arrays or None."""
    import keras
    import tensorflow as tf
    from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

    y = _as_tensor(y)
    n, batch_size = len(y), batch_size or 32  # 32: Keras's default
    if n == 0:
        raise CatDogError("fit_arrays: no training rows")
    xs = None if callable(x) else _check_rows(_as_tensors(x), n, "training inputs")
    steps = math.ceil(n / batch_size)
    # Keras's fit draws each epoch's order in a dataset of row numbers built like this one (by its ArrayDataAdapter,
    # a Keras internal): iterating it per epoch gives the same rows in the same batches as Keras's fit on these
    # arrays. tests/test_heads.py fails if a Keras upgrade changes that.
    order = ArrayDataAdapter(np.arange(n), batch_size=batch_size, shuffle=shuffle).get_tf_dataset()
    train_epoch = tf.function(functools.partial(_run_batches, model.train_step, n, batch_size),
                              jit_compile=model.jit_compile, autograph=False)
    if validation_data is not None:
        xv, yv = validation_data
        yv = _as_tensor(yv)
        xv = _check_rows(_as_tensors(xv), len(yv), "validation inputs")
        valid_size = validation_batch_size or batch_size
        valid_epoch = tf.function(functools.partial(_run_batches, model.test_step, len(yv), valid_size),
                                  jit_compile=model.jit_compile, autograph=False)
    if not isinstance(callbacks, keras.callbacks.CallbackList):  # as Keras's fit takes them
        callbacks = keras.callbacks.CallbackList(callbacks, add_history=True, add_progbar=verbose != 0,
                                                 verbose=verbose, epochs=epochs, steps=steps, model=model)
    model.stop_training = False
    callbacks.on_train_begin()
    logs, shapes = None, None
    for epoch in range(initial_epoch, epochs):
        model.reset_metrics()
        callbacks.on_epoch_begin(epoch)
        if callable(x):
            xs = None  # the last epoch's inputs go before this one's are made
            xs = _check_rows(_as_tensors(x(epoch)), n, f"training inputs of epoch {epoch}")
            shapes = shapes or [a.shape for a in xs]
            if [a.shape for a in xs] != shapes:
                raise CatDogError(f"fit_arrays: the training inputs of epoch {epoch} have shapes "
                                  f"{[tuple(a.shape) for a in xs]}, not those of the first epoch's "
                                  f"{[tuple(s) for s in shapes]}: every epoch needs the same shapes")
        if epoch == initial_epoch:
            _build_for_training(model, xs, y)
        callbacks.on_train_batch_begin(0)
        train_epoch(xs, y, tf.concat(list(order), 0))
        logs = model.get_metrics_result()
        callbacks.on_train_batch_end(steps - 1, logs)
        logs = dict(logs)
        if validation_data is not None:
            callbacks.on_test_begin()
            model.reset_metrics()
            callbacks.on_test_batch_begin(0)
            valid_epoch(xv, yv, None)
            val = {k: float(v) for k, v in model.get_metrics_result().items()}
            callbacks.on_test_batch_end(math.ceil(len(yv) / valid_size) - 1, val)
            callbacks.on_test_end(val)
            logs.update({f"val_{k}": v for k, v in val.items()})
        callbacks.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    if epochs > 0:
        model.optimizer.finalize_variable_values(model.trainable_weights)
    callbacks.on_train_end(logs)
    return model.history


def _as_tensor(a):
    """An array as a tensor, floats as Keras's floatx (as Keras's fit feeds them)."""
    import keras
    import tensorflow as tf
    a = np.asarray(a)
    if np.issubdtype(a.dtype, np.floating) and a.dtype != keras.config.floatx():
        a = a.astype(keras.config.floatx())
    return tf.identity(tf.convert_to_tensor(a))  # identity: onto the accelerator, if there is one


def _as_tensors(x) -> tuple:
    """A model's inputs (an array or a list of arrays) as a tuple of tensors."""
    return tuple(_as_tensor(a) for a in (x if isinstance(x, (list, tuple)) else [x]))


def _check_rows(xs: tuple, n: int, what: str) -> tuple:
    """`xs`, refused unless each has one row per label (Keras's fit would say 'Data cardinality is ambiguous')."""
    if any(len(a) != n for a in xs):
        raise CatDogError(f"fit_arrays: the {what} have shapes {[tuple(a.shape) for a in xs]}: each needs one row "
                          f"per label ({n})")
    return xs


def _build_for_training(model, xs: tuple, y) -> None:
    """Create the variables that Keras's first train step would (the compiled loss's and metrics', the
    optimizer's), from one row, without training: _run_batches' loop may not create any. The metrics that row
    updated are reset."""
    x1, y1 = tuple(a[:1] for a in xs), y[:1]
    x1 = x1 if len(x1) > 1 else x1[0]
    y_pred = model(x1, training=False)
    model.compute_loss(x1, y1, y_pred, training=False)
    model.compute_metrics(x1, y1, y_pred)
    model.reset_metrics()
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def _run_batches(step, n: int, batch_size: int, xs: tuple, y, order) -> None:
    """Inside a tf.function: `step((inputs, labels))` on each batch of `batch_size` rows (the last one smaller
    if `n` is not a multiple), in order; rows `order[i]` (None: 0..n-1). The full batches run in a loop, one
    iteration at a time (each step reads the weights the last one wrote); the variables must exist already
    (_build_for_training)."""
    import tensorflow as tf

    def batch(start, size: int):
        rows = start + tf.range(size) if order is None else tf.slice(order, [start], [size])
        x = tuple(tf.gather(a, rows) for a in xs)
        step((x if len(x) > 1 else x[0], tf.gather(y, rows)))

    def body(i):
        batch(i * batch_size, batch_size)
        return i + 1

    full, rest = divmod(n, batch_size)
    if full:
        tf.while_loop(lambda i: i < full, body, [tf.constant(0)], parallel_iterations=1)
    if rest:
        batch(full * batch_size, rest)

