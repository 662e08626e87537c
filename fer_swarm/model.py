"""The expression model as the workers and ``eval`` run it: a TFLite file and its JSON sidecar.

The sidecar (``NAME.json`` beside ``NAME.tflite``) says what the model expects
and what it knows: labels in output order, input size, preprocessing, the
figures it scored, and the SHA-256 of the TFLite file it describes, so a
sidecar that belongs to another model is caught at load time, not by wrong
labels at run time.

The runtime is LiteRT (``ai_edge_litert``), falling back to ``tflite_runtime``
where only that is installed; TensorFlow is never imported here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ModelError
from .framing import DEFAULT_FRAMINGS, Framing
from .logs import native_output
from .shipped import shipped

SIDECAR_FORMAT = "fer-swarm-model/1"
DEFAULT_MODEL = shipped("fer-res.tflite")  # 41 MMAC per face (models/README.md)
ACCURATE_MODEL = shipped("fer-vgg.tflite")  # the earlier default: 192 MMAC per face; `--model fer-vgg`


class Preprocessing(BaseModel):
    """How a face crop becomes the model's input. The edge and ``dataset crop`` follow it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    color: str = Field("gray", description="colour space of the crop: 'gray' (8-bit luma)")
    width_px: int = Field(48, gt=0, description="crop width fed to the model")
    height_px: int = Field(48, gt=0, description="crop height fed to the model")
    interpolation: str = Field("area", description="OpenCV resize interpolation used to reach the size")
    pixel_range: tuple[int, int] = Field((0, 255), description="raw pixel values; scaling is inside the model")


class ModelCard(BaseModel):
    """The sidecar JSON. Unknown keys are kept (``extra='allow'``) so newer sidecars still load."""

    model_config = ConfigDict(frozen=True, extra="allow")

    format: str = SIDECAR_FORMAT
    name: str
    version: str
    labels: tuple[str, ...] = Field(min_length=2)
    input_shape: tuple[int, ...]
    input_dtype: str
    quantization: str
    preprocessing: Preprocessing
    framing: dict[str, Framing] = Field(
        default_factory=lambda: dict(DEFAULT_FRAMINGS),
        description="per detector, how its face box maps to the crop this model was trained on",
    )
    tflite_sha256: str
    metrics: dict[str, Any] = Field(default_factory=dict)
    dataset: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)

    @property
    def model_id(self) -> str:
        return f"{self.name}:{self.version}"


def sidecar_path(model_path: str | Path) -> Path:
    return Path(model_path).with_suffix(".json")


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError as e:
            raise ModelError("no TFLite runtime: install ai-edge-litert (or tflite-runtime)") from e
    return Interpreter


def runtime_name() -> str:
    return _interpreter_class().__module__.split(".")[0]


SHIPPED_NAMES = (DEFAULT_MODEL.stem, ACCURATE_MODEL.stem)


def resolve_model(model_path: str | Path) -> Path:
    """A model file's path, or the name of a shipped model (``fer-res``, ``fer-vgg``) for its file.

    Anything that exists here, or has a folder or a suffix (``models/x.tflite``, ``x.tflite``), is a
    path and is taken as it is; a bare name is looked up among the shipped models (a checkout's
    ``models/`` or an installed wheel's), so ``--model fer-vgg`` works wherever fer-swarm is installed.
    """
    path = Path(model_path)
    if path.exists() or path.parent != Path(".") or path.suffix or str(model_path).startswith("."):
        return path
    found = shipped(f"{path.name}.tflite")
    return found if found.is_file() else path


def load_card(model_path: str | Path) -> ModelCard:
    """Read and validate the sidecar of ``model_path`` (a path or a shipped model's name) against the model file."""
    model_path = resolve_model(model_path)
    if not model_path.is_file():
        named = "" if model_path.suffix else f", nor a shipped model (those are {', '.join(SHIPPED_NAMES)})"
        raise ModelError(f"{model_path}: model file not found{named}")
    data = model_path.read_bytes()
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ModelError(f"{model_path}: not a TFLite model (no TFL3 flatbuffer identifier)")
    card_path = sidecar_path(model_path)
    if not card_path.is_file():
        raise ModelError(f"{card_path}: sidecar not found (every model needs NAME.json beside NAME.tflite)")
    try:
        card = ModelCard.model_validate_json(card_path.read_bytes())
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ModelError(f"{card_path}: invalid sidecar: {where}: {first['msg']}") from e
    if card.format != SIDECAR_FORMAT:
        raise ModelError(f"{card_path}: sidecar format {card.format!r}, expected {SIDECAR_FORMAT!r}")
    if card.tflite_sha256 != hashlib.sha256(data).hexdigest():
        raise ModelError(f"{card_path}: sidecar does not match {model_path.name} (SHA-256 differs)")
    return card


class Classifier:
    """One interpreter on one model. Not thread-safe: give each thread its own."""

    def __init__(self, model_path: str | Path = DEFAULT_MODEL, *, threads: int = 1, card: ModelCard | None = None):
        self.path = resolve_model(model_path)
        self.card = card or load_card(self.path)
        try:
            with native_output():  # LiteRT's INFO banner becomes a log record (hidden by -q)
                self._interp = _interpreter_class()(model_path=str(self.path), num_threads=threads)
                self._interp.allocate_tensors()
        except ValueError as e:
            raise ModelError(f"{self.path}: the runtime cannot load this model: {e}") from e
        inp = self._interp.get_input_details()[0]
        out = self._interp.get_output_details()[0]
        self._in_index, self._out_index = inp["index"], out["index"]
        self._in_dtype = inp["dtype"]
        self._out_quant = out["quantization"]
        self._out_dtype = out["dtype"]
        shape = tuple(int(s) for s in inp["shape"])
        if shape != tuple(self.card.input_shape):
            raise ModelError(f"{self.path}: sidecar says input {tuple(self.card.input_shape)}, model has {shape}")
        n_out = int(out["shape"][-1])
        if n_out != len(self.card.labels):
            raise ModelError(f"{self.path}: sidecar lists {len(self.card.labels)} labels, model outputs {n_out} classes")
        self.input_shape = shape

    @property
    def labels(self) -> tuple[str, ...]:
        return self.card.labels

    @property
    def crop_size(self) -> tuple[int, int]:
        """(width, height) of the crop the model takes."""
        return (self.card.preprocessing.width_px, self.card.preprocessing.height_px)

    def predict(self, crop: np.ndarray) -> np.ndarray:
        """Class probabilities (float32, one per label) for one preprocessed uint8 crop of ``crop_size``."""
        if crop.dtype != np.uint8 or crop.size != int(np.prod(self.input_shape)):
            raise ModelError(
                f"crop must be uint8 with {int(np.prod(self.input_shape))} pixels, got {crop.dtype} with {crop.size}"
            )
        self._interp.set_tensor(self._in_index, crop.reshape(self.input_shape).astype(self._in_dtype, copy=False))
        self._interp.invoke()
        out = self._interp.get_tensor(self._out_index)[0]
        if self._out_dtype != np.float32:
            scale, zero = self._out_quant
            out = (out.astype(np.float32) - zero) * scale
        return out.astype(np.float32, copy=False)

    def predict_many(self, crops: np.ndarray) -> np.ndarray:
        return np.stack([self.predict(c) for c in crops]) if len(crops) else np.empty((0, len(self.labels)), np.float32)



def write_card(card: ModelCard, model_path: Path) -> Path:
    path = sidecar_path(model_path)
    path.write_text(json.dumps(card.model_dump(mode="json"), indent=2) + "\n")
    return path
