"""Knowledge distillation from shipped TFLite models (the teacher: one, or the mean of several) into the network being trained.

The teacher is run once, by LiteRT (the workers' runtime), on every clean
training and validation image before training starts; its probabilities then
ride along with the labels through augmentation. ``fer-vgg`` averages its
answer on the face and its mirror image, so its label for a face is exactly
its label for the mirrored face that the flip augmentation makes (a teacher
without the mirror average, such as fer-res, answers the mirror a little
differently, and the flipped face keeps the unflipped face's answer). The other
augmentations are mild (10 degrees, 10% shifts, lighting, one small cutout),
and running the teacher on each augmented batch instead would cost about a
quarter more training time on this project's two CPU cores (measured: 0.17 s
per batch of 128 against 0.7 s for a student step).

The loss mixes the usual label-smoothed cross-entropy on the true class with
Hinton et al.'s temperature-softened KL divergence to the teacher:
``(1 - w) * CE(y, p) + w * T^2 * KL(softmax(log q / T) || softmax(log p / T))``.
Both models output probabilities; ``log p`` equals the logits up to a
per-image constant, which the softmax cancels, so no logits are needed.
The targets travel as one tensor, the one-hot label and the teacher's
probabilities side by side, so Keras' sample weights and metrics work as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from ..errors import FerSwarmError
from ..model import Classifier

_EPS = 1e-7


class Teacher:
    """TFLite classifiers answering whole float batches of 0-255 pixels (N, H, W, 1) with the mean of their probabilities.

    One model is the usual teacher; several are an ensemble, whose mean
    answer is usually better than any one of them (fer-res and fer-vgg
    averaged: 67.4% on FER2013's `val/`, each 66.3-66.4%).
    """

    def __init__(self, paths: Sequence[Path], classes: tuple[str, ...], size: int, *, threads: int = 1):
        if not paths:
            raise ValueError("a teacher needs at least one model")
        self.paths = tuple(paths)
        self._models = [_Model(p, classes, size, threads) for p in self.paths]

    def predict(self, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Probabilities for gray images (N, H, W) or (N, H, W, 1) of 0-255 pixels: the models' mean."""
        x = x.reshape(len(x), *x.shape[1:3], 1)
        return np.mean([np.concatenate([m.predict(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
                        for m in self._models], axis=0)


class _Model:
    """One teacher model, its interpreter resized to whole batches."""

    def __init__(self, path: Path, classes: tuple[str, ...], size: int, threads: int):
        clf = Classifier(path, threads=threads)
        if tuple(clf.labels) != tuple(classes):
            raise FerSwarmError(f"teacher {path} has classes {', '.join(clf.labels)}; the data has {', '.join(classes)}")
        if clf.crop_size != (size, size):
            raise FerSwarmError(f"teacher {path} takes {clf.crop_size} crops; training uses {size}x{size}")
        if clf.card.input_dtype != "float32":
            raise FerSwarmError(f"teacher {path} takes {clf.card.input_dtype} input; use a float-input export")
        self._interp = clf._interp  # noqa: SLF001 - the same loaded interpreter, resized to whole batches
        self._in = clf._in_index  # noqa: SLF001
        self._out = clf._out_index  # noqa: SLF001
        self._batch = 1

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if len(x) != self._batch:
            self._interp.resize_tensor_input(self._in, list(x.shape))
            self._interp.allocate_tensors()
            self._batch = len(x)
        self._interp.set_tensor(self._in, x)
        self._interp.invoke()
        return self._interp.get_tensor(self._out).astype(np.float32)


@keras.saving.register_keras_serializable(package="fer_swarm")
class DistillLoss(keras.losses.Loss):
    """Targets (N, 2K): one-hot labels then teacher probabilities; predictions (N, K) probabilities."""

    def __init__(self, n_classes: int, weight: float = 0.5, temperature: float = 3.0, label_smoothing: float = 0.1,
                 name: str = "distill", **kwargs):
        super().__init__(name=name, **kwargs)
        self.n_classes, self.weight, self.temperature, self.label_smoothing = n_classes, weight, temperature, label_smoothing

    def call(self, y_true, y_pred):
        k, t = self.n_classes, self.temperature
        hard, soft = y_true[:, :k], y_true[:, k:]
        hard = hard * (1.0 - self.label_smoothing) + self.label_smoothing / k
        log_p = keras.ops.log(keras.ops.clip(y_pred, _EPS, 1.0))
        ce = -keras.ops.sum(hard * log_p, axis=-1)
        log_q_t = keras.ops.log_softmax(keras.ops.log(keras.ops.clip(soft, _EPS, 1.0)) / t, axis=-1)
        log_p_t = keras.ops.log_softmax(log_p / t, axis=-1)
        kl = keras.ops.sum(keras.ops.exp(log_q_t) * (log_q_t - log_p_t), axis=-1)
        return (1.0 - self.weight) * ce + self.weight * t * t * kl

    def get_config(self):
        return {**super().get_config(), "n_classes": self.n_classes, "weight": self.weight,
                "temperature": self.temperature, "label_smoothing": self.label_smoothing}


@keras.saving.register_keras_serializable(package="fer_swarm")
def accuracy(y_true, y_pred):
    """Top-1 accuracy against the one-hot half of distillation targets (named so logs keep 'val_accuracy')."""
    k = keras.ops.shape(y_pred)[-1]
    return keras.metrics.categorical_accuracy(y_true[:, :k], y_pred)
