"""Network architectures for the expression classifier.

``vgg`` is a compact VGG-style net sized for this project's two budgets: it
trains at about 1.6 min per FER2013 epoch on two CPU cores, and its int8
export is 1.2 MB and runs in about 0.2 ms per 48x48 face on one core. Most of
its cost sits at 24x24 and 12x12, where a face's expression features
(mouth, brows, eyes) are a few pixels wide; a full-resolution second conv
would cost a quarter more time for little accuracy.

``res`` (the shipped default, fer-res) and ``sep`` are networks for the Raspberry Pi (``res`` 41.4 MMAC
per face, ``sep`` 44.1; fer-vgg: 96 per pass), with fer-vgg's stages and
depth, residual blocks and squeeze-excitation. ``sep`` makes each 3x3
convolution depthwise-separable (a 3x3 per channel, then a 1x1 mix: 9*C +
C*C' MACs per pixel against 9*C*C'), as in mini-Xception and MobileNet; it
suits a Pi but trains at about 450 s per FER2013 epoch on this project's two
CPU cores, as TensorFlow's depthwise gradients are slow there. ``res`` gets
the saving from bottlenecks instead (a 1x1 down to half the width, a full
3x3 there, a 1x1 back up, as in ResNet-50); it trains at about fer-vgg's
time per batch (memory-bound layers, not MACs, set training time here), some
100-170 s per epoch in bfloat16. Figures: models/README.md.
"""

from __future__ import annotations

import keras
from keras import layers as L

ARCHITECTURES = ("vgg", "tiny", "res", "sep")

# (stem width, stage widths at 24x24, 12x12, 6x6) of the residual nets.
_RES_WIDTHS = {"res": (32, 48, 128, 256), "sep": (48, 72, 144, 288)}


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
    if arch in _RES_WIDTHS:
        return _build_residual(arch, size, n_classes, dropout=dropout, l2=l2)
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
    outputs = L.Dense(n_classes, activation="softmax", name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"fer_{arch}")


def _sep_conv(x, filters: int, l2: float, *, relu: bool = True):
    x = L.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.Conv2D(filters, 1, use_bias=False, kernel_regularizer=keras.regularizers.l2(l2))(x)
    x = L.BatchNormalization()(x)
    return L.ReLU()(x) if relu else x


def _squeeze_excite(x, ratio: int = 8):
    """Channel attention: a per-channel gate from the block's global average, costing C*C/4 MACs per face."""
    c = x.shape[-1]
    s = L.GlobalAveragePooling2D(keepdims=True)(x)
    s = L.Conv2D(max(8, c // ratio), 1, activation="relu")(s)
    s = L.Conv2D(c, 1, activation="sigmoid")(s)
    return L.Multiply()([x, s])


def _pointwise(x, filters: int, l2: float, *, relu: bool = True):
    x = L.Conv2D(filters, 1, use_bias=False, kernel_regularizer=keras.regularizers.l2(l2))(x)
    x = L.BatchNormalization()(x)
    return L.ReLU()(x) if relu else x


def _res_block(x, filters: int, l2: float, *, separable: bool):
    """Squeeze-excited residual block (a 1x1 projection on the shortcut when the width changes).

    separable: two depthwise-separable 3x3s; otherwise a bottleneck, 1x1 to
    half the width, a full 3x3 there, 1x1 back up.
    """
    shortcut = x
    if x.shape[-1] != filters:
        shortcut = _pointwise(x, filters, l2, relu=False)
    if separable:
        y = _sep_conv(x, filters, l2)
        y = _sep_conv(y, filters, l2, relu=False)
    else:
        y = _pointwise(x, filters // 2, l2)
        y = _conv(y, filters // 2, l2)
        y = _pointwise(y, filters, l2, relu=False)
    y = _squeeze_excite(y)
    return L.ReLU()(L.Add()([shortcut, y]))


def _build_residual(arch: str, size: int, n_classes: int, *, dropout: float, l2: float) -> keras.Model:
    stem, *stages = _RES_WIDTHS[arch]
    separable = arch == "sep"
    inputs = keras.Input((size, size, 1), name="face")
    x = L.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = _conv(x, 32, l2)
    if separable:
        x = _sep_conv(x, stem, l2)
    for w in stages:
        x = L.MaxPooling2D()(x)
        x = _res_block(x, w, l2, separable=separable)
        x = _res_block(x, w, l2, separable=separable)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dropout(dropout)(x)
    outputs = L.Dense(n_classes, activation="softmax", name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"fer_{arch.replace('-', '_')}")


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
