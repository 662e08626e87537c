#!/usr/bin/env python3
"""Where a full-int8 export disagrees with its float model, and what each quantization option buys.

Starting from a trained Keras model (an architecture and its weights), this
calibrates once per representative set, then quantizes variants from the
same calibration (TFLite's MLIR quantizer, as the converter and its
QuantizationDebugger do) and runs each through LiteRT, one thread, on every
validation face. For each variant it prints and saves:

- top-1 agreement with the float Keras model, on all faces and on the faces
  whose float top-2 margin is at least ``--margin`` (and what share of the
  disagreements are such near-ties);
- validation accuracy and macro-F1;
- ms per face (median, one thread, all models timed face by face in turn)
  and its ratio to the full-int8 and dynamic-range exports;
- the share of MACs (convolutions and fully connected layers) left in float.

``--layers`` also ranks the layers by the debugger's per-layer error
(rmse/scale: 0.29 is the error of rounding alone, a uniform quantization
step) and by the error carried from the input to each layer's output.

Usage (the res candidate of issue 11):

    python bench/int8_agreement.py --weights ../wt-model/runs/res-kd20/best.weights.h5 --arch res \
        --train ../shared/datasets/fer2013/train --val ../shared/datasets/fer2013/val --layers

Writes bench-out/int8_agreement.json (override with --json).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.lite.python import convert as tfl_convert  # noqa: E402

from fer_swarm import datasets, metrics  # noqa: E402
from fer_swarm.model import _interpreter_class  # noqa: E402
from fer_swarm.modelstats import COUNTED_OPS, _op_macs  # noqa: E402
from fer_swarm.training import arch as arch_mod  # noqa: E402
from fer_swarm.training import export as export_mod  # noqa: E402
from fer_swarm.training.augment import FaceAugment  # noqa: E402


# ---------------------------------------------------------------- calibration and quantization

def calibrate(model, representative: np.ndarray) -> bytes:
    """A float TFLite model annotated with each tensor's min/max over ``representative`` (nothing quantized yet)."""
    def samples():
        return ([r[None, ..., None].astype(np.float32)] for r in representative)

    with contextlib.redirect_stdout(io.StringIO()):
        conv = tf.lite.TFLiteConverter.from_keras_model(model)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = samples
        conv.experimental_mlir_quantizer = True
        conv._experimental_calibrate_only = True  # noqa: SLF001 - what QuantizationDebugger does
        return conv.convert()


def quantize(calibrated: bytes, *, denylisted_nodes=(), denylisted_ops=(), per_channel=True, verify=None) -> bytes:
    """Full int8 (float input/output, quantize/dequantize at the edges) from a calibrated model.

    Denylisted ops and nodes (output tensor names) stay float, with a
    dequantize before and a quantize after. ``verify`` ('layer' or 'model')
    adds the NumericVerify ops the QuantizationDebugger reads.
    """
    return tfl_convert.mlir_quantize(
        calibrated,
        disable_per_channel=not per_channel,
        enable_numeric_verify=verify is not None,
        enable_whole_model_verify=verify == "model",
        denylisted_ops=list(denylisted_ops) or None,
        denylisted_nodes=list(denylisted_nodes) or None,
    )


def ops_of(flat: bytes) -> list[dict]:
    """Each op of a TFLite model with its output tensor's name and shape and its input shapes and dtypes."""
    interp = _interpreter_class()(model_content=flat)
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    out = []
    for op in interp._get_ops_details():  # noqa: SLF001
        o = tensors[op["outputs"][0]]
        ins = [tensors[i] if i >= 0 else None for i in op["inputs"]]
        out.append({
            "op": op["op_name"], "name": o["name"], "shape": tuple(int(d) for d in o["shape"]),
            "in_shapes": [tuple(int(d) for d in t["shape"]) if t else () for t in ins],
            "in_dtype": np.dtype(ins[0]["dtype"]).name if ins and ins[0] else "",
        })
    return out


def macs(flat: bytes) -> tuple[int, int]:
    """(all MACs, MACs of counted ops whose activations are float) per invocation."""
    total = float_ = 0
    for op in ops_of(flat):
        if op["op"] not in COUNTED_OPS:
            continue
        m = _op_macs(op["op"], op["in_shapes"], op["shape"])
        total += m
        float_ += m if op["in_dtype"] == "float32" else 0
    return total, float_


# ---------------------------------------------------------------- groups of ops to keep float

def op_groups(calibrated: bytes) -> dict[str, list[str]]:
    """Output tensor names of the calibrated graph's ops, by the part of the network they belong to.

    stem: the input scaling and the first convolution; se: squeeze-excitation
    branches (their pooling, two 1x1 convolutions, sigmoid and the gating
    multiply); add: the residual additions; head: the last pooling, the
    classifier and the softmax.
    """
    ops = ops_of(calibrated)
    groups: dict[str, list[str]] = {"stem": [], "se": [], "add": [], "head": []}
    first_conv = next(i for i, o in enumerate(ops) if o["op"] == "CONV_2D")
    groups["stem"] = [o["name"] for o in ops[: first_conv + 1]]
    for i, o in enumerate(ops):
        spatial_1 = len(o["shape"]) == 4 and o["shape"][1:3] == (1, 1)
        later = [x["op"] for x in ops[i + 1:]]
        if o["op"] in ("LOGISTIC",) or (o["op"] == "CONV_2D" and spatial_1):
            groups["se"].append(o["name"])
        elif o["op"] == "MEAN" and "FULLY_CONNECTED" in later[:1]:
            groups["head"].append(o["name"])
        elif o["op"] == "MEAN":
            groups["se"].append(o["name"])
        elif o["op"] == "MUL" and i > first_conv:
            groups["se"].append(o["name"])
        elif o["op"] == "ADD" and i > first_conv:
            groups["add"].append(o["name"])
        elif o["op"] in ("FULLY_CONNECTED", "SOFTMAX"):
            groups["head"].append(o["name"])
    return groups


def layer_ranking(calibrated: bytes, debug_faces: np.ndarray) -> list[dict]:
    """Per-layer rmse/scale from the QuantizationDebugger: alone (same quantized input) and carried from the input."""
    def dataset():
        return ([f[None, ..., None].astype(np.float32)] for f in debug_faces)

    rows: dict[str, dict] = {}
    for mode in ("layer", "model"):
        dbg = tf.lite.experimental.QuantizationDebugger(
            quant_debug_model_content=quantize(calibrated, verify=mode), debug_dataset=dataset)
        dbg.run()
        buf = io.StringIO()
        dbg.layer_statistics_dump(buf)
        buf.seek(0)
        import csv

        for r in csv.DictReader(buf):
            row = rows.setdefault(r["tensor_name"], {"op": r["op_name"], "name": r["tensor_name"],
                                                     "scale": float(r["scale"])})
            row[f"rmse_per_scale_{mode}"] = math.sqrt(float(r["mean_squared_error"])) / float(r["scale"])
            row[f"rmse_{mode}"] = math.sqrt(float(r["mean_squared_error"]))
    return list(rows.values())


# ---------------------------------------------------------------- running and scoring

def run(flat: bytes, faces: np.ndarray) -> np.ndarray:
    """Probabilities for each face (uint8 (N, H, W)) through LiteRT, one thread, one face per call."""
    interp = _interpreter_class()(model_content=flat, num_threads=1)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    res = np.empty((len(faces), int(out["shape"][-1])), np.float32)
    for i, f in enumerate(faces):
        interp.set_tensor(inp["index"], f[None, ..., None].astype(inp["dtype"]))
        interp.invoke()
        y = interp.get_tensor(out["index"])[0]
        if out["dtype"] != np.float32:
            scale, zero = out["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        res[i] = y
    return res


def time_models(flats: dict[str, bytes], faces: np.ndarray, rounds: int = 3) -> dict[str, float]:
    """Median ms per face of each model, one thread, the models taking turns face by face (same load for all)."""
    interps = {}
    for k, flat in flats.items():
        it = _interpreter_class()(model_content=flat, num_threads=1)
        it.allocate_tensors()
        interps[k] = (it, it.get_input_details()[0])
    times: dict[str, list[float]] = {k: [] for k in flats}
    for _ in range(rounds):
        for f in faces:
            for k, (it, inp) in interps.items():
                it.set_tensor(inp["index"], f[None, ..., None].astype(inp["dtype"]))
                t0 = time.perf_counter()
                it.invoke()
                times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v) * 1000) for k, v in times.items()}


def margins(probs: np.ndarray) -> np.ndarray:
    top2 = np.sort(probs, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def input_noise_agreement(model, faces: np.ndarray, ref: np.ndarray, levels=(1, 2)) -> dict[int, float]:
    """How stable the float model's own answers are: agreement after +-k gray levels of noise on each pixel.

    A yardstick for int8's disagreements: rounding every activation to 8 bits
    is a perturbation too, and near-tied faces flip under either.
    """
    rng = np.random.default_rng(0)
    out = {}
    for k in levels:
        noisy = np.clip(faces.astype(np.float32) + rng.integers(-k, k + 1, faces.shape), 0, 255)
        out[k] = float((model.predict(noisy[..., None], batch_size=512, verbose=0).argmax(1) == ref.argmax(1)).mean())
    return out


@dataclass
class Row:
    name: str
    note: str
    agreement: float
    agreement_confident: float
    disagreements: int
    near_tie_share: float
    accuracy: float
    macro_f1: float
    float_mac_share: float
    size_bytes: int
    ms: float = float("nan")
    extra: dict = field(default_factory=dict)


def score(name: str, note: str, flat: bytes, ref: np.ndarray, faces: np.ndarray, labels: np.ndarray,
          classes, margin: float) -> tuple[Row, np.ndarray]:
    probs = run(flat, faces)
    pred, ref_pred = probs.argmax(1), ref.argmax(1)
    agree = pred == ref_pred
    confident = margins(ref) >= margin
    report = metrics.classification_report(labels, pred, classes)
    total, float_ = macs(flat)
    n_dis = int((~agree).sum())
    return Row(
        name=name, note=note, agreement=float(agree.mean()), agreement_confident=float(agree[confident].mean()),
        disagreements=n_dis, near_tie_share=float((~agree & ~confident).sum() / max(1, n_dis)),
        accuracy=report.accuracy, macro_f1=report.macro_f1, float_mac_share=float_ / max(1, total),
        size_bytes=len(flat),
    ), probs


# ---------------------------------------------------------------- the variants

def representative_sets(x_train: np.ndarray, seed: int, which: list[str]) -> dict[str, np.ndarray]:
    """The 1,000 training faces `fer-swarm train` calibrates on, all of them, or the 1,000 augmented."""
    rng = np.random.default_rng(seed)
    base = x_train[rng.choice(len(x_train), min(1000, len(x_train)), replace=False)]
    sets = {}
    for w in which:
        if w == "train1000":
            sets[w] = base
        elif w == "train-all":
            sets[w] = x_train
        elif w == "train1000-aug":
            aug = FaceAugment(x_train.shape[1], seed)
            sets[w] = np.clip(np.round(aug(tf.constant(base[..., None], tf.float32))[0].numpy()[..., 0]), 0, 255).astype(np.uint8)
        else:
            raise SystemExit(f"unknown representative set {w!r}")
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, required=True, help="best.weights.h5 of a training run")
    ap.add_argument("--arch", default="res", choices=arch_mod.ARCHITECTURES)
    ap.add_argument("--train", type=Path, default=Path("../shared/datasets/fer2013/train"))
    ap.add_argument("--val", type=Path, default=Path("../shared/datasets/fer2013/val"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--margin", type=float, default=0.05, help="float top-2 margin under which a face is a near-tie")
    ap.add_argument("--rep", default="train1000,train-all,train1000-aug",
                    help="representative sets to calibrate on (train1000, train-all, train1000-aug)")
    ap.add_argument("--draws", type=int, default=0,
                    help="also calibrate on this many other random draws of 1,000 training faces (the spread)")
    ap.add_argument("--top-k", default="3,8", help="keep the k layers of worst per-layer error float, for each k")
    ap.add_argument("--layers", action="store_true", help="also rank the layers with the QuantizationDebugger")
    ap.add_argument("--time-faces", type=int, default=300, help="faces timed per model (ms per face)")
    ap.add_argument("--json", type=Path, default=Path("bench-out/int8_agreement.json"))
    args = ap.parse_args()

    t_start = time.time()
    train = datasets.load_gray(datasets.scan(args.train), (48, 48))
    val = datasets.load_gray(datasets.scan(args.val), (48, 48), classes=train.classes)
    classes, x_val, y_val = train.classes, val.images, val.labels
    model = arch_mod.build(args.arch, x_val.shape[1], len(classes))
    model.load_weights(args.weights)
    ref = model.predict(x_val[..., None].astype(np.float32), batch_size=512, verbose=0)
    ref_m = margins(ref)
    print(f"float Keras model: accuracy {(ref.argmax(1) == y_val).mean():.4f}; "
          f"{(ref_m < args.margin).mean():.1%} of {len(y_val)} val faces have a top-2 margin < {args.margin}")
    noise_floor = input_noise_agreement(model, x_val, ref)
    print("the float model's own agreement when every pixel moves by up to +-k gray levels (uniform integer noise): "
          + ", ".join(f"k={k}: {a:.2%}" for k, a in noise_floor.items()))

    flats: dict[str, tuple[str, bytes]] = {}
    rep_sets = representative_sets(train.images, args.seed, args.rep.split(","))
    flats["float"] = ("converter, no quantization", export_mod.convert(model, "float", rep_sets["train1000"]))
    flats["dynamic"] = ("converter, int8 weights, float activations", export_mod.convert(model, "dynamic", rep_sets["train1000"]))
    flats["int8-export"] = ("export's int8: uint8 input, 1,000 calibration faces", export_mod.convert(model, "int8", rep_sets["train1000"]))
    calibrated = {}
    for rep_name, rep in rep_sets.items():
        t0 = time.time()
        calibrated[rep_name] = calibrate(model, rep)
        print(f"calibrated on {rep_name} ({len(rep)} faces) in {time.time() - t0:.0f} s")
    cal = calibrated["train1000"]
    flats["int8"] = ("all int8, float input/output, 1,000 calibration faces", quantize(cal))
    for rep_name in rep_sets:
        if rep_name != "train1000":
            flats[f"int8 {rep_name}"] = (f"calibrated on {rep_name}", quantize(calibrated[rep_name]))
    for seed in range(1, args.draws + 1):
        draw = representative_sets(train.images, seed, ["train1000"])["train1000"]
        flats[f"int8 draw {seed}"] = (f"1,000 other calibration faces (seed {seed})", quantize(calibrate(model, draw)))
    flats["int8 per-tensor"] = ("per-tensor weights (_experimental_disable_per_channel)", quantize(cal, per_channel=False))
    groups = op_groups(cal)
    for g, names in groups.items():
        flats[f"int8, {g} float"] = (f"{len(names)} ops float", quantize(cal, denylisted_nodes=names))
    flats["int8, se+add float"] = ("", quantize(cal, denylisted_nodes=groups["se"] + groups["add"]))
    flats["int8, all but convs float"] = ("stem, se, add and head float", quantize(
        cal, denylisted_nodes=groups["stem"] + groups["se"] + groups["add"] + groups["head"]))
    flats["int16 activations"] = ("diagnostic, not int8: int8 weights, int16 activations",
                                  export_mod.convert(model, "int16x8", rep_sets["train1000"]))

    ranking = []
    if args.layers:
        debug_faces = x_val[np.random.default_rng(0).choice(len(x_val), 300, replace=False)]
        ranking = layer_ranking(cal, debug_faces)
        ranking.sort(key=lambda r: -r["rmse_per_scale_layer"])
        print("\nlayers by per-layer error (rmse/scale; 0.29 = rounding alone), and the error carried from the input")
        print(f"{'op':16} {'alone':>6} {'carried':>8} {'carried rmse':>12}  tensor")
        for r in ranking:
            print(f"{r['op']:16} {r['rmse_per_scale_layer']:6.3f} {r.get('rmse_per_scale_model', float('nan')):8.3f} "
                  f"{r.get('rmse_model', float('nan')):12.4f}  {r['name'][-60:]}")
        for k in (int(k) for k in args.top_k.split(",") if k):
            worst = [r["name"] for r in ranking[:k]]
            flats[f"int8, worst {k} float"] = (f"top {k} by per-layer rmse/scale", quantize(cal, denylisted_nodes=worst))

    rows: list[Row] = []
    for name, (note, flat) in flats.items():
        row, _ = score(name, note, flat, ref, x_val, y_val, classes, args.margin)
        rows.append(row)
    ms = time_models({k: f for k, (_, f) in flats.items()}, x_val[: args.time_faces])
    for r in rows:
        r.ms = ms[r.name]

    base_int8, base_dyn = ms["int8-export"], ms["dynamic"]
    print(f"\n{'variant':28} {'agree':>7} {'agree m>=' + str(args.margin):>12} {'#dis':>5} {'ties':>5} "
          f"{'val acc':>7} {'F1':>6} {'ms':>6} {'/int8':>6} {'/dyn':>6} {'float MAC':>9}")
    for r in rows:
        print(f"{r.name:28} {r.agreement:7.2%} {r.agreement_confident:12.2%} {r.disagreements:5d} "
              f"{r.near_tie_share:5.0%} {r.accuracy:7.2%} {r.macro_f1:6.3f} {r.ms:6.3f} {r.ms / base_int8:6.2f} "
              f"{r.ms / base_dyn:6.2f} {r.float_mac_share:9.2%}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "weights": str(args.weights), "arch": args.arch, "margin": args.margin, "val_faces": len(y_val),
        "keras_accuracy": float((ref.argmax(1) == y_val).mean()),
        "near_tie_share_of_val": float((ref_m < args.margin).mean()),
        "float_agreement_under_input_noise": noise_floor,
        "groups": {g: len(v) for g, v in groups.items()},
        "variants": [r.__dict__ for r in rows],
        "layers": ranking,
        "wall_s": round(time.time() - t_start),
    }, indent=2) + "\n")
    print(f"\nwritten {args.json} ({time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
