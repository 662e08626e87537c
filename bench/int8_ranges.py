#!/usr/bin/env python3
"""Narrower 8-bit steps for full int8: does giving each activation more of its 256 levels pass the gate?

Issue 11's gate asks the full-int8 default to agree with its float model on
99% of `val/` faces; fer-res agrees on 98.0%, and 16-bit activations (same
int8 weights) on 99.3%, so the rounding of activations is the cause. This
script tries the two ways to make each activation's rounding step smaller
without changing the network's answers in float:

1. **Channel equalization.** A full-int8 model quantizes each activation
   tensor with one scale for all of its channels, set by the widest channel,
   so a narrow channel gets few of the 256 levels. ReLU, max pooling, global
   average pooling and addition commute with a positive per-channel scale,
   so dividing channel c by s_c where it is produced (a batch norm's gamma
   and beta) and multiplying the weights that read it by s_c (a
   convolution's or dense layer's input weights) computes the same function
   in float; with s_c = (channel range / tensor range) ** strength every
   channel spans more of the tensor's range. This is the activation side of
   cross-layer equalization (Nagel et al., "Data-Free Quantization Through
   Weight Equalization and Bias Correction", ICCV 2019) and of SmoothQuant's
   migration (Xiao et al., 2023), with ranges measured on the calibration
   faces. Tensors linked by an addition (a residual stream) share one scale
   vector: ``groups`` finds these sets on the Keras graph.
2. **Clipped ranges.** Rare large activations set each tensor's range (the
   99.99th percentile is about half the max). Each ReLU inside a block (the
   ones that ``groups`` can rescale alone) is rescaled so its ``--percentile``
   maps to 6 and becomes a ReLU6, which TFLite fuses into the convolution:
   the int8 range of that tensor is then the percentile, not the max. This
   changes the float model (the clipped one is the reference); it shows how
   far tighter ranges could take a model fine-tuned with them.
3. **Every int8 tensor clipped.** The same for all 48 tensors a full-int8
   export stores with a range of its own (the residual streams, the
   squeeze-excitation products, the head): a clip after each in the float
   model, and each such tensor's calibrated range set to the clip's bounds
   before quantizing, so int8 saturates where the float model clips (the
   bound of what clipping, with the fine-tuning that would win back the
   accuracy, can buy).

It also counts the disagreements where the int8 softmax's top two outputs
are equal (its step is 1/256), measures int8 with the head (pooling, dense,
softmax) in float, where no output can tie, and counts the float top-2
margins under 1/256 and 0.01.

Usage (the shipped fer-res's float weights):

    python bench/int8_ranges.py --weights checkpoints/res-cycle4-swa.weights.h5

Writes bench-out/int8_ranges.json (override with --json).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from int8_agreement import calibrate, margins, quantize, representative_sets, run  # noqa: E402  (bench/ is on sys.path)
from keras import layers as L  # noqa: E402
from qat_finetune import _fixed_range, quantized_outputs  # noqa: E402
from tensorflow.lite.python import schema_py_generated as schema  # noqa: E402
from tensorflow.lite.tools import flatbuffer_utils  # noqa: E402

from fer_swarm import datasets  # noqa: E402
from fer_swarm.training import arch as arch_mod  # noqa: E402

# Ops through which a per-channel scale passes unchanged: op(x / s) = op(x) / s for s > 0 (a ReLU only
# without a ceiling or threshold: see _passes).
_PASS = (L.ReLU, L.MaxPooling2D, L.GlobalAveragePooling2D, L.Dropout, L.Add)


def _passes(layer) -> bool:
    if isinstance(layer, L.ReLU):
        return layer.max_value is None and not layer.threshold and not layer.negative_slope
    return isinstance(layer, _PASS)


@dataclass
class Group:
    """Tensors (named by the layer producing each) sharing one per-channel scale."""

    tensors: list[str] = field(default_factory=list)
    producers: list[str] = field(default_factory=list)  # batch norms that absorb 1/s
    consumers: list[str] = field(default_factory=list)  # convolutions and dense layers whose input weights take s
    channels: int = 0


def _graph(model: keras.Model) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Each layer's input layers and consumer layers, by name (every layer called once)."""
    inputs: dict[str, list[str]] = {}
    for layer in model.layers:
        names = []
        for node in layer._inbound_nodes:  # noqa: SLF001 - Keras exposes the functional graph only here
            names += [t._keras_history[0].name for t in node.input_tensors]  # noqa: SLF001
        if len(layer._inbound_nodes) > 1:  # noqa: SLF001
            raise ValueError(f"layer {layer.name} is shared; equalization needs each layer called once")
        inputs[layer.name] = names
    consumers: dict[str, list[str]] = {name: [] for name in inputs}
    for name, ins in inputs.items():
        for i in ins:
            consumers[i].append(name)
    return inputs, consumers


def _is_gate(layer) -> bool:
    return isinstance(layer, L.Conv2D) and getattr(layer.activation, "__name__", "") == "sigmoid"


def _gated(model: keras.Model, name: str, inputs: list[str]) -> str | None:
    """If layer ``name`` is a squeeze-excitation product, x * gate (two inputs, one a sigmoid gate), x's name."""
    gates = [i for i in inputs if _is_gate(model.get_layer(i))]
    if not isinstance(model.get_layer(name), L.Multiply) or len(inputs) != 2 or len(gates) != 1:
        return None
    return next(i for i in inputs if i not in gates)


def groups(model: keras.Model) -> list[Group]:
    """Every set of tensors that can take one per-channel scale without changing the float function."""
    inputs, consumers = _graph(model)
    outputs = {t._keras_history[0].name for t in model.outputs}  # noqa: SLF001 - their values must not change
    seen: set[str] = set()
    found = []
    for start in model.layers:
        if not isinstance(start, L.BatchNormalization) or start.name in seen:
            continue
        group, ok = Group(), True
        todo = [start.name]
        members: set[str] = set()
        while todo and ok:
            name = todo.pop()
            if name in members:
                continue
            members.add(name)
            layer = model.get_layer(name)
            if name in outputs:
                ok = False
            # Where the tensor comes from: absorbed by a batch norm, or passed back through a commuting op.
            if isinstance(layer, L.BatchNormalization):
                group.producers.append(name)
            elif _passes(layer):
                todo += inputs[name]
            elif (x := _gated(model, name, inputs[name])) is not None:
                todo.append(x)
            else:
                ok = False
            # Where it goes: compensated by a weight layer, or passed on through a commuting op.
            for c in consumers[name]:
                cl = model.get_layer(c)
                if isinstance(cl, (L.Conv2D, L.Dense)):  # Keras 3's DepthwiseConv2D is neither
                    if c not in group.consumers:
                        group.consumers.append(c)
                elif _passes(cl) or _gated(model, c, inputs[c]) == name:
                    todo.append(c)
                else:
                    ok = False
        seen |= members
        if ok and not todo:
            group.tensors = sorted(members, key=[l.name for l in model.layers].index)
            group.channels = int(model.get_layer(group.producers[0]).gamma.shape[0])
            found.append(group)
    return found


def channel_ranges(model: keras.Model, tensors: list[str], faces: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
    """Each tensor's largest absolute value per channel over ``faces`` (uint8 (N, H, W))."""
    probe = keras.Model(model.inputs, [model.get_layer(t).output for t in tensors])
    ranges = {t: None for t in tensors}
    for i in range(0, len(faces), batch):
        outs = probe(faces[i:i + batch, ..., None].astype(np.float32), training=False)
        for t, o in zip(tensors, outs if isinstance(outs, (list, tuple)) else [outs]):
            o = np.asarray(o, np.float32)
            m = np.abs(o.reshape(-1, o.shape[-1])).max(axis=0)
            ranges[t] = m if ranges[t] is None else np.maximum(ranges[t], m)
    return ranges


def scales(group: Group, ranges: dict[str, np.ndarray], *, strength: float = 1.0, floor: float = 1e-3) -> np.ndarray:
    """The divisor per channel: (the channel's range as a share of its tensor's range, widest over the group) ** strength.

    strength 1 brings every channel to its tensor's full range; 0 changes
    nothing. ``floor`` keeps dead channels from getting weights of 1e6.
    """
    share = np.zeros(group.channels, np.float64)
    for t in group.tensors:
        r = ranges[t].astype(np.float64)
        share = np.maximum(share, r / max(float(r.max()), 1e-12))
    return np.maximum(share, floor) ** strength


def equalize(model: keras.Model, faces: np.ndarray, *, strength: float = 1.0) -> list[tuple[Group, np.ndarray]]:
    """Rescale ``model`` in place, channel ranges measured on ``faces``; return each group with its scales."""
    found = groups(model)
    ranges = channel_ranges(model, [t for g in found for t in g.tensors], faces)
    applied = []
    for g in found:
        s = scales(g, ranges, strength=strength)
        _rescale(model, g, s)
        applied.append((g, s))
    return applied


# ---------------------------------------------------------------- clipped ranges

def _outputs(model: keras.Model, names: list[str], faces: np.ndarray) -> list[np.ndarray]:
    """The named layers' outputs on ``faces`` (uint8 (N, H, W))."""
    probe = keras.Model(model.inputs, [model.get_layer(n).output for n in names])
    outs = probe.predict(faces[..., None].astype(np.float32), batch_size=250, verbose=0)
    return outs if isinstance(outs, list) else [outs]


class ReLU6(L.Layer):
    """min(max(x, 0), 6): TFLite fuses it into the convolution before it, so the int8 range is [0, 6]."""

    def call(self, x):
        return keras.ops.relu6(x)


def clip_block_relus(model: keras.Model, faces: np.ndarray, percentile: float) -> keras.Model:
    """A copy of ``model`` (its weights rescaled in place) where each rescalable ReLU clips at its ``percentile``.

    Each group holding one ReLU and no addition (the ReLUs inside blocks and
    the stem's) is divided by the percentile / 6, its readers' weights
    multiplied by it, and the ReLU becomes a ReLU6: the same network except
    for the values above the percentile, which are clipped.
    """
    found = [g for g in groups(model)
             if not any(isinstance(model.get_layer(t), L.Add) for t in g.tensors)
             and sum(isinstance(model.get_layer(t), L.ReLU) for t in g.tensors) == 1]
    relus = [next(t for t in g.tensors if isinstance(model.get_layer(t), L.ReLU)) for g in found]
    for g, out in zip(found, _outputs(model, relus, faces)):
        _rescale(model, g, np.full(g.channels, float(np.percentile(out, percentile)) / 6.0))
    return keras.models.clone_model(
        model, clone_function=lambda layer: ReLU6(name=f"{layer.name}_6") if layer.name in relus else layer)


def _rescale(model: keras.Model, group: Group, s: np.ndarray) -> None:
    for p in group.producers:
        bn = model.get_layer(p)
        bn.gamma.assign(bn.gamma.numpy() / s)
        bn.beta.assign(bn.beta.numpy() / s)
    for c in group.consumers:
        kernel = model.get_layer(c).kernel
        kernel.assign(kernel.numpy() * s.reshape((-1, 1)).astype(kernel.dtype))


class Clip(L.Layer):
    def __init__(self, lo: float, hi: float, **kwargs):
        super().__init__(**kwargs)
        self.lo, self.hi = lo, hi

    def call(self, x):
        return keras.ops.clip(x, self.lo, self.hi)

    def get_config(self):
        return {**super().get_config(), "lo": self.lo, "hi": self.hi}


def clip_all(model: keras.Model, faces: np.ndarray, percentile: float) -> keras.Model:
    """``model`` with a clip after every tensor an int8 export stores, at its ``percentile`` (and 100 - it, or 0)."""
    points = [n for n in quantized_outputs(model) if not _fixed_range(model.get_layer(n))]
    clips = {n: Clip(min(0.0, float(np.percentile(o, 100 - percentile))), float(np.percentile(o, percentile)),
                     name=f"clip_{n}") for n, o in zip(points, _outputs(model, points, faces))}

    def call(layer, *args, **kwargs):
        out = layer(*args, **kwargs)
        return clips[layer.name](out) if layer.name in clips else out

    return keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call)


def saturate(calibrated: bytes) -> bytes:
    """Set the calibrated range of each clipped tensor (a MINIMUM, then maybe a MAXIMUM, by constants) to the clip."""
    fb = flatbuffer_utils.read_model_from_bytearray(bytearray(calibrated))
    g = fb.subgraphs[0]

    def code(op) -> int:
        c = fb.operatorCodes[op.opcodeIndex]
        return max(c.builtinCode, c.deprecatedBuiltinCode)

    def constant(tensor: int) -> float:
        return float(np.frombuffer(bytes(fb.buffers[g.tensors[tensor].buffer].data), np.float32)[0])

    readers: dict[int, list] = {}
    for op in g.operators:
        readers.setdefault(op.inputs[0], []).append(op)
    for op in g.operators:
        if code(op) != schema.BuiltinOperator.MINIMUM:
            continue
        maxes = [r for r in readers.get(op.outputs[0], []) if code(r) == schema.BuiltinOperator.MAXIMUM]
        lo = constant(maxes[0].inputs[1]) if maxes else float(g.tensors[op.inputs[0]].quantization.min[0])
        for t in (op.inputs[0], op.outputs[0], *(m.outputs[0] for m in maxes)):
            q = g.tensors[t].quantization
            q.min, q.max = np.array([lo], np.float32), np.array([constant(op.inputs[1])], np.float32)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(fb))


# ---------------------------------------------------------------- the measurement

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--weights", type=Path, required=True, help="float weights (.weights.h5) of the model")
    ap.add_argument("--arch", default="res", choices=arch_mod.ARCHITECTURES)
    ap.add_argument("--train", type=Path, default=Path("../shared/datasets/fer2013/train"))
    ap.add_argument("--val", type=Path, default=Path("../shared/datasets/fer2013/val"))
    ap.add_argument("--strengths", default="0.5,1", help="channel equalization strengths to try")
    ap.add_argument("--percentiles", default="99.9,99.5", help="ReLU clipping percentiles to try")
    ap.add_argument("--saturate", default="99.99,99.9,99.5",
                    help="percentiles at which to clip every int8 tensor, int8 saturating there too")
    ap.add_argument("--draws", default="1234,1", help="calibration draws (seeds of 1,000 training faces) per variant")
    ap.add_argument("--json", type=Path, default=Path("bench-out/int8_ranges.json"))
    args = ap.parse_args()

    t_start = time.time()
    train = datasets.load_gray(datasets.scan(args.train), (48, 48))
    val = datasets.load_gray(datasets.scan(args.val), (48, 48), classes=train.classes)
    x, y = val.images, val.labels
    draws = {int(d): representative_sets(train.images, int(d), ["train1000"])["train1000"] for d in args.draws.split(",")}
    first = next(iter(draws.values()))

    def fresh() -> keras.Model:
        m = arch_mod.build(args.arch, x.shape[1], len(train.classes))
        m.load_weights(args.weights)
        return m

    def answers(m: keras.Model) -> np.ndarray:
        return m.predict(x[..., None].astype(np.float32), batch_size=512, verbose=0)

    ref = answers(fresh())
    m = margins(ref)
    report = {"weights": str(args.weights), "val_faces": len(y), "float_accuracy": float((ref.argmax(1) == y).mean()),
              "float_margin_under_1_256": float((m < 1 / 256).mean()), "float_margin_under_0.01": float((m < 0.01).mean()),
              "variants": []}
    print(f"float: accuracy {report['float_accuracy']:.2%}; top-2 margin under 1/256 on "
          f"{report['float_margin_under_1_256']:.2%} of faces, under 0.01 on {report['float_margin_under_0.01']:.2%}")

    def measure(name: str, model: keras.Model, reference: np.ndarray, edit=lambda calibrated: calibrated,
                denylisted_ops=()) -> None:
        row = {"variant": name, "float_accuracy": float((reference.argmax(1) == y).mean()),
               "float_agreement_with_original": float((reference.argmax(1) == ref.argmax(1)).mean()), "draws": []}
        for seed, faces in draws.items():
            probs = run(quantize(edit(calibrate(model, faces)), denylisted_ops=denylisted_ops), x)
            top2 = np.sort(probs, axis=1)[:, -2:]
            disagree = probs.argmax(1) != reference.argmax(1)
            row["draws"].append({"seed": seed, "agreement": float(1 - disagree.mean()),
                                 "accuracy": float((probs.argmax(1) == y).mean()),
                                 "disagreements": int(disagree.sum()),
                                 "tied_in_int8": int((disagree & (top2[:, 0] == top2[:, 1])).sum())})
        report["variants"].append(row)
        agree = ", ".join(f"{d['agreement']:.2%} ({d['tied_in_int8']} of {d['disagreements']} tied)" for d in row["draws"])
        print(f"{name:34} float {row['float_accuracy']:.2%} (agrees {row['float_agreement_with_original']:.2%} "
              f"with the original)  int8 agreement with this float: {agree}", flush=True)

    measure("int8, post-training", fresh(), ref)
    measure("int8, head float", fresh(), ref, denylisted_ops=("MEAN", "FULLY_CONNECTED", "SOFTMAX"))
    for strength in (float(v) for v in args.strengths.split(",") if v):
        model = fresh()
        applied = equalize(model, first, strength=strength)
        shares = [float(np.median(s ** (1 / strength))) for _, s in applied]
        if "median_channel_share_per_group" not in report:
            report["median_channel_share_per_group"] = shares
            print(f"{len(applied)} groups; the median channel's maximum is {min(shares):.2f}-{max(shares):.2f} of "
                  f"its group's tensors' (widest over the group; first group, the stem: {shares[0]:.2f})")
        eq_ref = answers(model)
        if not np.array_equal(eq_ref.argmax(1), ref.argmax(1)) or np.abs(eq_ref - ref).max() > 1e-4:
            raise SystemExit(f"equalization at strength {strength} changed the float answers: a bug")
        measure(f"equalized, strength {strength:g}", model, ref)
    for pct in (float(v) for v in args.percentiles.split(",") if v):
        model = clip_block_relus(fresh(), first, pct)
        measure(f"block ReLUs clipped at p{pct:g}", model, answers(model))
    for pct in (float(v) for v in args.saturate.split(",") if v):
        model = clip_all(fresh(), first, pct)
        measure(f"all int8 tensors clipped at p{pct:g}", model, answers(model), saturate)

    report["wall_s"] = round(time.time() - t_start)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {args.json} ({report['wall_s']} s)")


if __name__ == "__main__":
    main()
