"""TFLite export: float, dynamic-range and full-int8 candidates, each checked through LiteRT.

Every candidate is written with its sidecar and run on the validation images
by :class:`fer_swarm.model.Classifier`, the same code and runtime the workers
use. A candidate whose top-1 answers agree with the Keras model on fewer than
``min_agreement`` of the validation images is rejected; if the float export
itself fails, the export fails loudly (the converter broke the model).

Which one ships: the first that passes in Raspberry Pi order, full-int8
(integer kernels on the Pi's NEON, a quarter of the size), then int8 with a
float head, then dynamic-range (int8 weights, float activations), then
float, provided its validation accuracy is within ``accuracy_tolerance`` of
the float model's ("equal accuracy").

Why an int8 variant with a float head: full-int8 quantizes the 7 logits and
the softmax to 256 levels each (the softmax's step is 1/256), so two classes
within a step of each other tie, and the tie goes to the first label; on
FER2013, where many faces sit between two expressions, that alone flips
about 1% of answers (fer-vgg's int8 export agreed on 98.97%). Keeping only
the last fully connected layer and the softmax in float (0.002 MMAC of
41, from the int8 average-pooled features) removes the ties; every
convolution still runs on int8 kernels. Its input is float with a quantize
at the edge.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from .. import metrics
from ..errors import FerSwarmError
from ..model import Classifier, ModelCard, Preprocessing, _interpreter_class, sha256_file, write_card
from ..modelstats import model_stats

log = logging.getLogger(__name__)

PI_ORDER = ("int8", "int8-float-head", "dynamic", "float")
KINDS = ("float", "dynamic", "int8", "int8-float-head")
# The head kept in float by "int8-float-head": in these networks the only fully connected layer is the classifier.
_FLOAT_HEAD_OPS = ["FULLY_CONNECTED", "SOFTMAX"]


class ExportError(FerSwarmError):
    """The exported TFLite model does not behave like the Keras model."""


@dataclass
class Candidate:
    kind: str
    path: Path
    size_bytes: int
    agreement: float
    report: metrics.Report
    ms_per_face_median: float

    @property
    def summary(self) -> dict:
        return {
            "size_bytes": self.size_bytes,
            "agreement_with_keras": round(self.agreement, 5),
            "val_accuracy": round(self.report.accuracy, 5),
            "val_macro_f1": round(self.report.macro_f1, 5),
            "ms_per_face_median": round(self.ms_per_face_median, 4),
        }


def convert(model: keras.Model, kind: str, representative: np.ndarray) -> bytes:
    """The TFLite flatbuffer of ``model`` as one of ``KINDS``, calibrated on ``representative`` (uint8 faces).

    "int16x8" (int8 weights, int16 activations) is not an export candidate;
    bench/int8_agreement.py uses it to show what 8-bit activations cost.
    """
    def samples():
        return ([r[None, ..., None].astype(np.float32)] for r in representative)

    # Keras 3 prints its SavedModel export signature to stdout; keep it out of the user's output.
    with contextlib.redirect_stdout(io.StringIO()) as noise:
        conv = tf.lite.TFLiteConverter.from_keras_model(model)
        if kind != "float":
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
        if kind == "int8":
            conv.representative_dataset = samples
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            # uint8 input with scale 1, zero point 0 (the first layer rescales): the crop's bytes go in as they are.
            conv.inference_input_type = tf.uint8
            conv.inference_output_type = tf.float32
        if kind == "int16x8":
            conv.representative_dataset = samples
            conv.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
        if kind == "int8-float-head":
            # The converter's selective quantization lives in its quantization debugger.
            conv.representative_dataset = samples
            debugger = tf.lite.experimental.QuantizationDebugger(
                converter=conv, debug_dataset=lambda: iter(list(samples())[:8]),
                debug_options=tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=_FLOAT_HEAD_OPS),
            )
            flat = debugger.get_nondebug_quantized_model()
        else:
            flat = conv.convert()
    log.debug("%s", noise.getvalue())
    return flat


def export(
    model: keras.Model,
    *,
    out: Path,
    work_dir: Path,
    classes: tuple[str, ...],
    x_val: np.ndarray,
    y_val: np.ndarray,
    x_representative: np.ndarray,
    card_fields: dict,
    min_agreement: float = 0.99,
    accuracy_tolerance: float = 0.005,
) -> tuple[Candidate, list[Candidate]]:
    """Write ``out`` (the shipped TFLite) and its sidecar; return the shipped candidate and all candidates."""
    size = x_val.shape[1]
    keras_pred = np.argmax(model.predict(x_val[..., None].astype(np.float32), batch_size=512, verbose=0), axis=1)
    keras_acc = float((keras_pred == y_val).mean())
    log.info("Keras model: validation accuracy %.4f on %d images", keras_acc, len(y_val))
    work_dir.mkdir(parents=True, exist_ok=True)
    candidates: list[Candidate] = []
    for kind in KINDS:
        path = work_dir / f"{out.stem}-{kind}.tflite"
        path.write_bytes(convert(model, kind, x_representative))
        card = _card(path, kind, classes, size, card_fields)
        write_card(card, path)
        clf = Classifier(path, threads=1, card=card)
        probs = clf.predict_many(x_val)
        pred = np.argmax(probs, axis=1)
        cand = Candidate(
            kind=kind,
            path=path,
            size_bytes=path.stat().st_size,
            agreement=float((pred == keras_pred).mean()),
            report=metrics.classification_report(y_val, pred, classes),
            ms_per_face_median=_median_ms(clf, x_val[:200]),
        )
        log.info("TFLite %-7s %7.1f KB  agreement %.4f  val accuracy %.4f  %.3f ms/face", kind,
                 cand.size_bytes / 1024, cand.agreement, cand.report.accuracy, cand.ms_per_face_median)
        candidates.append(cand)
    by_kind = {c.kind: c for c in candidates}
    if by_kind["float"].agreement < min_agreement:
        raise ExportError(
            f"the float TFLite model agrees with the Keras model on only {by_kind['float'].agreement:.2%} "
            f"of validation images (need {min_agreement:.0%}): the conversion changed the model"
        )
    float_acc = by_kind["float"].report.accuracy
    shipped = next(
        c for c in (by_kind[k] for k in PI_ORDER)
        if c.agreement >= min_agreement and c.report.accuracy >= float_acc - accuracy_tolerance
    )
    for c in candidates:
        if c.agreement < min_agreement:
            log.warning("%s export rejected: agrees with Keras on %.2f%% of validation images", c.kind, 100 * c.agreement)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shipped.path, out)
    fields = dict(card_fields)
    fields["metrics"] = {
        **fields.get("metrics", {}),
        **{k: v for k, v in model_stats(out).to_dict().items() if k in ("mmac_per_face", "params")},
        "keras_val_accuracy": round(keras_acc, 5),
        "val_accuracy": round(shipped.report.accuracy, 5),
        "val_macro_f1": round(shipped.report.macro_f1, 5),
        "agreement_with_keras": round(shipped.agreement, 5),
        "candidates": {c.kind: c.summary for c in candidates},
        "per_class": shipped.report.to_dict()["per_class"],
    }
    write_card(_card(out, shipped.kind, classes, size, fields), out)
    return shipped, candidates


def _card(path: Path, kind: str, classes, size: int, fields: dict) -> ModelCard:
    return ModelCard(
        name=fields.get("name", path.stem),
        version=fields.get("version", "1"),
        labels=tuple(classes),
        input_shape=(1, size, size, 1),
        input_dtype=_input_dtype(path),
        quantization=kind,
        preprocessing=Preprocessing(width_px=size, height_px=size),
        tflite_sha256=sha256_file(path),
        **{k: v for k, v in fields.items() if k not in ("name", "version")},
    )


def _input_dtype(path: Path) -> str:
    """What the model's input tensor holds ('uint8' for full int8, 'float32' otherwise), as the runtime reads it."""
    return np.dtype(_interpreter_class()(model_path=str(path)).get_input_details()[0]["dtype"]).name


def _median_ms(clf: Classifier, crops: np.ndarray) -> float:
    times = []
    for c in crops:
        t0 = time.perf_counter()
        clf.predict(c)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)
