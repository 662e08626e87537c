"""The MMAC counter against small models whose multiply-accumulates are counted by hand."""

import contextlib
import io

import pytest

from fer_swarm.modelstats import model_stats

from .conftest import SHIPPED_MODEL

tf = pytest.importorskip("tensorflow", reason="building test models needs the 'train' extra")
keras = pytest.importorskip("keras")
L = keras.layers


def _tflite(model, path):
    with contextlib.redirect_stdout(io.StringIO()):
        path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return path


def _small_model():
    """8x8x1 input; every counted layer kind once, with the MACs each should cost.

    Biases start random, as after training: the converter shares and drops all-zero constants.
    """
    b = {"bias_initializer": "random_normal"}
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(4, 3, padding="same", **b)(inputs)  # 8*8 outputs * 4 filters * 3*3*1 = 2304 MACs, 4*9 + 4 params
    x = L.DepthwiseConv2D(3, padding="same", **b)(x)  # 8*8*4 outputs * 3*3 = 2304 MACs, 4*9 + 4 params
    x = L.Conv2D(6, 1, **b)(x)  # 8*8*6 outputs * 4 = 1536 MACs, 6*4 + 6 params
    flat = L.Reshape((64, 6))(x)
    gram = L.Lambda(lambda t: tf.matmul(t, t, transpose_a=True))(flat)  # 6x6 outputs * 64 = 2304 MACs, no params
    x = L.Flatten()(gram)
    outputs = L.Dense(3, activation="softmax", **b)(x)  # 3 outputs * 36 = 108 MACs, 3*36 + 3 params
    return keras.Model(inputs, outputs)


HAND_MACS = 2304 + 2304 + 1536 + 2304 + 108
HAND_PARAMS = 40 + 40 + 30 + 111


def test_counts_each_layer_kind_as_counted_by_hand(tmp_path):
    stats = model_stats(_tflite(_small_model(), tmp_path / "small.tflite"))
    assert stats.macs_by_op == {"CONV_2D": 2304 + 1536, "DEPTHWISE_CONV_2D": 2304, "BATCH_MATMUL": 2304,
                                "FULLY_CONNECTED": 108}
    assert stats.macs_per_face == HAND_MACS
    assert stats.params == HAND_PARAMS
    assert stats.size_bytes == (tmp_path / "small.tflite").stat().st_size


def test_mirror_averaging_in_the_graph_counts_twice_and_weights_once(tmp_path):
    from fer_swarm.training.arch import with_flip_average

    stats = model_stats(_tflite(with_flip_average(_small_model()), tmp_path / "mirrored.tflite"))
    assert stats.macs_per_face == 2 * HAND_MACS
    assert stats.params == HAND_PARAMS


def test_shipped_fer_vgg_costs_192_mmac_per_face():
    # 96 MMAC per pass (six 3x3 convolutions past the first, a 21.2 MMAC pair per stage), twice for the mirror.
    stats = model_stats(SHIPPED_MODEL.parent / "fer-vgg.tflite")
    assert stats.mmac_per_face == pytest.approx(192.4, abs=0.1)


def test_the_default_fer_res_costs_41_mmac_per_face():
    # One pass, no mirror: within the 48 MMAC budget of issue 11.
    assert model_stats(SHIPPED_MODEL).mmac_per_face == pytest.approx(41.4, abs=0.1)
