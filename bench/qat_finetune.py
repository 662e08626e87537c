"""Quantization-aware fine-tuning by hand, for Keras 3 (tensorflow-model-optimization needs tf-keras 2).

``with_fake_quant`` wraps a trained functional model so that every tensor a
full-int8 TFLite export stores in 8 bits is rounded to 8 bits in the forward
pass too (``tf.quantization.fake_quant_with_min_max_args``, straight-through
gradient), with the ranges the converter's own calibration would find (the
min/max over the representative faces). Where TFLite fuses ops (a
convolution, its batch norm and its ReLU; an add and its ReLU), only the
fused op's output is rounded. Weights stay float: per-channel int8 weights
cost little (the dynamic-range export, int8 weights, agrees 99.5%).

Measured on the issue-11 `res` candidate (models/README.md): 400 steps
(1.8 epochs, 4.6 min here) raised accuracy 0.4 points but left the int8
export's agreement with its own float weights where post-training
quantization puts it (97.7-98.2% over three calibration draws); it is kept
as the tool for a longer try, not wired into `fer-swarm train`.

The wrapped model shares its layers, and so its weights, with the model it
wraps: fine-tuning it fine-tunes the float model, which is then exported as
usual. Batch norms are frozen (inference statistics), since the export folds
their moving statistics into the convolutions.
"""

from __future__ import annotations

import time

import keras
import numpy as np
import tensorflow as tf
from keras import layers as L

# Outputs of these are rounded in TFLite unless fused into the op that consumes them.
_FUSED_INTO_NEXT = {"Conv2D": ("BatchNormalization",), "BatchNormalization": ("ReLU",), "Add": ("ReLU",)}
_PASS_THROUGH = ("MaxPooling2D", "Dropout", "InputLayer")


class FakeQuant(L.Layer):
    """Round to 256 levels between fixed ``lo`` and ``hi`` (nudged so zero is exact, as TFLite does)."""

    def __init__(self, lo: float, hi: float, **kwargs):
        super().__init__(**kwargs)
        self.lo, self.hi = float(min(lo, 0.0)), float(max(hi, 0.0))

    def call(self, x):
        return tf.quantization.fake_quant_with_min_max_args(x, min=self.lo, max=self.hi, num_bits=8)

    def get_config(self):
        return {**super().get_config(), "lo": self.lo, "hi": self.hi}


def _consumers(layer) -> list[str]:
    return [node.operation.__class__.__name__ for node in layer._outbound_nodes]  # noqa: SLF001


def quantized_outputs(model: keras.Model) -> list[str]:
    """Names of the layers whose outputs a full-int8 export stores as int8 tensors of their own."""
    names = []
    for layer in model.layers:
        kind = layer.__class__.__name__
        if kind in _PASS_THROUGH:
            continue
        fused = _FUSED_INTO_NEXT.get(kind, ())
        if kind == "Conv2D" and layer.get_config().get("activation") != "linear":
            fused = ()
        consumers = _consumers(layer)
        if consumers and all(c in fused for c in consumers):
            continue
        names.append(layer.name)
    return names


def _fixed_range(layer) -> tuple[float, float] | None:
    """Outputs whose int8 range TFLite fixes whatever the data: sigmoid and softmax, [0, 255/256]."""
    act = layer.get_config().get("activation")
    return (0.0, 255 / 256) if act in ("sigmoid", "softmax") else None


def with_fake_quant(model: keras.Model, representative: np.ndarray, batch_size: int = 250) -> keras.Model:
    """The same network (shared layers) with each int8-stored output rounded, ranges from ``representative``."""
    points = quantized_outputs(model)
    probe = keras.Model(model.input, [model.get_layer(n).output for n in points])
    lo = {n: np.inf for n in points}
    hi = {n: -np.inf for n in points}
    x = representative[..., None].astype(np.float32)
    for i in range(0, len(x), batch_size):
        outs = probe.predict(x[i:i + batch_size], verbose=0)
        for n, o in zip(points, outs):
            lo[n], hi[n] = min(lo[n], float(o.min())), max(hi[n], float(o.max()))
    quant = {n: FakeQuant(*(_fixed_range(model.get_layer(n)) or (lo[n], hi[n])), name=f"fq_{n}") for n in points}

    def call(layer, *args, **kwargs):
        out = layer(*args, **kwargs)
        return quant[layer.name](out) if layer.name in quant else out

    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            layer.trainable = False
    return keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call)


KL, CE = keras.losses.KLDivergence(), keras.losses.SparseCategoricalCrossentropy()


def fine_tune(model: keras.Model, loss_of, x_train: np.ndarray, y_train: np.ndarray, *, steps: int,
              learning_rate: float, seed: int = 7, batch_size: int = 128, report_every: int = 100) -> None:
    """Adam on ``model``'s trainable weights for ``steps`` batches of augmented training faces, the rate on a cosine.

    ``loss_of(x, y, target)`` gives the batch loss, ``target`` being the answers of a frozen copy of
    ``model`` as it was before fine-tuning (the teacher it is held to).
    """
    from fer_swarm.training.augment import FaceAugment

    teacher = keras.models.clone_model(model)
    teacher.set_weights(model.get_weights())
    aug = FaceAugment(x_train.shape[1], seed)
    ds = (tf.data.Dataset.from_tensor_slices((x_train[..., None].astype(np.float32), y_train.astype(np.int32)))
          .shuffle(len(x_train), seed=seed).repeat().batch(batch_size)
          .map(lambda x, y: (aug(x)[0], y)).prefetch(2))
    opt = keras.optimizers.Adam(learning_rate)

    @tf.function
    def step(x, y):
        target = teacher(x, training=False)
        with tf.GradientTape() as tape:
            loss = loss_of(x, y, target)
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    t0 = time.time()
    for i, (x, y) in enumerate(ds.take(steps)):
        opt.learning_rate.assign(learning_rate * 0.5 * (1 + np.cos(np.pi * i / steps)))
        loss = step(x, y)
        if i % report_every == 0:
            print(f"step {i}/{steps}  loss {float(loss):.4f}  {time.time() - t0:.0f} s", flush=True)


def finetune(float_model: keras.Model, x_train: np.ndarray, y_train: np.ndarray, representative: np.ndarray, *,
             steps: int, learning_rate: float = 1e-4, label_weight: float = 0.3, seed: int = 7,
             batch_size: int = 128) -> keras.Model:
    """Quantization-aware fine-tuning of ``float_model`` in place; returns its fake-quantized twin.

    The loss is the KL divergence from a frozen copy of the float model's
    answers (so the rounded network learns to answer as the float one did)
    plus ``label_weight`` times cross-entropy on the true labels, on the
    training faces under the training augmentation, with a cosine decay of
    ``learning_rate`` over ``steps``.
    """
    qat = with_fake_quant(float_model, representative)  # shares float_model's layers, so its weights

    def loss_of(x, y, target):
        p = qat(x, training=True)
        return KL(target, p) + label_weight * CE(y, p)

    fine_tune(float_model, loss_of, x_train, y_train, steps=steps, learning_rate=learning_rate, seed=seed,
              batch_size=batch_size)
    return qat
