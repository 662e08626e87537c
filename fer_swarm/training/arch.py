"""Network architectures for the expression classifier.

``vgg`` is a compact VGG-style net sized for this project's two budgets: it
trains at about 1.6 min per FER2013 epoch on two CPU cores, and its int8
export is 1.2 MB and runs in about 0.2 ms per 48x48 face on one core. Most of
its cost sits at 24x24 and 12x12, where a face's expression features
(mouth, brows, eyes) are a few pixels wide; a full-resolution second conv
would cost a quarter more time for little accuracy.
"""

from __future__ import annotations

import keras
from keras import layers as L

ARCHITECTURES = ("vgg", "tiny")


def _conv(x, filters: int, l2: float):
    x = L.Conv2D(filters, 3, padding="same", use_bias=False, kernel_regularizer=keras.regularizers.l2(l2))(x)
    x = L.BatchNormalization()(x)
    return L.ReLU()(x)


def build(arch: str, size: int, n_classes: int, *, dropout: float = 0.4, l2: float = 1e-5) -> keras.Model:
    """A Keras model taking raw 0-255 gray pixels (N, size, size, 1) and returning softmax probabilities.

    Scaling to [-1, 1] is the first layer, so the exported model takes the
    crop's bytes as they are and the int8 export can take uint8 input.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    widths = {"vgg": (32, 64, 128, 256), "tiny": (8, 16, 16, 32)}[arch]
    inputs = keras.Input((size, size, 1), name="face")
    x = L.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = _conv(x, widths[0], l2)
    x = L.MaxPooling2D()(x)
    for w in widths[1:3]:
        x = _conv(x, w, l2)
        x = _conv(x, w, l2)
        x = L.MaxPooling2D()(x)
    x = _conv(x, widths[3], l2)
    x = _conv(x, widths[3], l2)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dropout(dropout)(x)
    outputs = L.Dense(n_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=f"fer_{arch}")


def with_flip_average(model: keras.Model) -> keras.Model:
    """The same network, answering with the mean of its output on the face and on its mirror image.

    Expressions are left-right symmetric, so the two views are two honest
    looks at one face; averaging them steadies borderline answers. It is
    baked into the exported graph so every runtime gets it, at twice the
    inference cost.
    """
    inputs = keras.Input(model.input_shape[1:], name="face")
    mirrored = keras.ops.flip(inputs, axis=2)
    outputs = L.Average(name="probabilities")([model(inputs), model(mirrored)])
    return keras.Model(inputs, outputs, name=f"{model.name}_flipavg")
