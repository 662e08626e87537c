"""What a TFLite model costs: multiply-accumulates per face, parameters and file size, read from the graph.

Milliseconds depend on the CPU far more than on the model (the same model ran
0.4 ms on a core with AMX/VNNI units and 3.8 ms on an AVX2-only one), so the
project counts compute in multiply-accumulates (MACs), the figure that carries
from a server to a Raspberry Pi. Counted are the layers that hold nearly all
of it: CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED and BATCH_MATMUL. Pooling,
adds, activations and the squeeze-excitation gates' multiplies are a few
percent at most and left out, as papers do. Every op in the graph is counted
once per invocation, so a model that averages its answer on the face and on
its mirror image (two passes in one graph) counts twice.

Read through the runtime's own view of the graph (LiteRT's op and tensor
details); TensorFlow is never imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .model import _interpreter_class

COUNTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL")


@dataclass(frozen=True)
class ModelStats:
    macs_per_face: int
    params: int
    size_bytes: int
    macs_by_op: dict[str, int]

    @property
    def mmac_per_face(self) -> float:
        return self.macs_per_face / 1e6

    def to_dict(self) -> dict:
        return {
            "mmac_per_face": round(self.mmac_per_face, 2),
            "params": self.params,
            "size_bytes": self.size_bytes,
            "mmac_by_op": {k: round(v / 1e6, 3) for k, v in self.macs_by_op.items()},
        }


def _op_macs(name: str, shapes: list[tuple[int, ...]], out: tuple[int, ...]) -> int:
    """MACs of one op for the whole batch of its output, from its input and output shapes."""
    if name == "CONV_2D":  # filter (Cout, kh, kw, Cin/groups); output (N, H, W, Cout)
        _, kh, kw, cin = shapes[1]
        return int(np.prod(out)) * kh * kw * cin
    if name == "DEPTHWISE_CONV_2D":  # filter (1, kh, kw, Cout): one kh x kw window per output value
        _, kh, kw, _ = shapes[1]
        return int(np.prod(out)) * kh * kw
    if name == "FULLY_CONNECTED":  # weights (units, depth); each output value sums `depth` products
        return int(np.prod(out)) * shapes[1][-1]
    if name == "BATCH_MATMUL":  # output (..., M, N); lhs holds M*K values, (M, K) or transposed (K, M)
        return int(np.prod(out)) * (shapes[0][-1] * shapes[0][-2] // out[-2])
    raise ValueError(name)


def model_stats(path: str | Path) -> ModelStats:
    """Count MACs per face (per invocation divided by the input batch), parameters and file size of ``path``."""
    path = Path(path)
    interp = _interpreter_class()(model_path=str(path))
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    batch = max(1, int(interp.get_input_details()[0]["shape"][0]))
    by_op: dict[str, int] = {}
    for op in interp._get_ops_details():  # noqa: SLF001 - the runtime's only view of the graph's ops
        name = op["op_name"]
        if name not in COUNTED_OPS:
            continue
        shapes = [tuple(int(d) for d in tensors[i]["shape"]) if i >= 0 else () for i in op["inputs"]]
        out = tuple(int(d) for d in tensors[op["outputs"][0]]["shape"])
        by_op[name] = by_op.get(name, 0) + _op_macs(name, shapes, out)
    return ModelStats(
        macs_per_face=sum(by_op.values()) // batch,
        params=_count_params(interp, tensors),
        size_bytes=path.stat().st_size,
        macs_by_op=by_op,
    )


def _count_params(interp, tensors: dict) -> int:
    """Elements of the constant tensors the counted layers and ops read (weights and biases), each counted once.

    A tensor is constant when no op writes it and it is not a graph input; a
    mirror-averaged graph reads the same weights twice, so they count once.
    """
    written = {int(i) for op in interp._get_ops_details() for i in op["outputs"]}  # noqa: SLF001
    inputs = {d["index"] for d in interp.get_input_details()}
    read = {int(i) for op in interp._get_ops_details() if op["op_name"] in COUNTED_OPS for i in op["inputs"][1:] if i >= 0}  # noqa: SLF001
    consts = (read - written) - inputs
    return int(sum(int(np.prod(tensors[i]["shape"])) for i in consts))
