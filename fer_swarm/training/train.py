"""``fer-swarm train``: fit the expression classifier on a folder-per-class dataset.

A run lives in a run directory (``runs/NAME`` by default) that holds
``options.json`` (what was asked), ``last.keras`` (model and optimizer after
the last finished epoch), ``best.weights.h5`` (the epoch with the best
validation accuracy), ``state.json`` (epochs done, best so far, history) and
``log.csv``; with ``--average-from`` also ``average-NNN.weights.h5`` (the
running mean of the weights after each epoch from that one on, up to epoch
NNN), copied to ``average.weights.h5`` at the end: what the run exports.
``--resume`` continues from ``last.keras`` at the next epoch with the same
learning-rate schedule, so an interrupted run ends where an uninterrupted one
would have.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from .. import datasets  # noqa: E402
from ..errors import DatasetError, FerSwarmError  # noqa: E402
from ..model import sha256_file  # noqa: E402
from . import arch as arch_mod  # noqa: E402
from .augment import FaceAugment  # noqa: E402
from .distill import DistillLoss, Teacher  # noqa: E402
from .distill import accuracy as distill_accuracy  # noqa: E402

log = logging.getLogger(__name__)


@dataclass
class TrainOptions:
    data_dir: Path
    out: Path
    val_dir: Path | None = None
    val_fraction: float = 0.1
    epochs: int = 40
    batch_size: int = 128
    learning_rate: float = 2e-3
    warmup_epochs: int = 2
    label_smoothing: float = 0.1
    class_weight_power: float = 0.5
    arch: str = "vgg"
    image_size: int = 48
    seed: int = 1234
    run_dir: Path | None = None
    resume: bool = False
    flip_average: bool = False
    teacher: tuple[Path, ...] = ()  # several: distil from the mean of their answers
    init_weights: Path | None = None
    average_from: int = 0
    distill_weight: float = 0.5
    temperature: float = 3.0
    bf16: bool = False
    model_version: str = "1"
    command: str = field(default_factory=lambda: " ".join(["fer-swarm", *sys.argv[1:]]))

    def resolved_run_dir(self) -> Path:
        return self.run_dir or Path("runs") / self.out.stem

    def identity(self) -> dict:
        """The options that must match for --resume to continue the same run."""
        keep = ("data_dir", "val_dir", "val_fraction", "batch_size", "arch", "image_size", "seed", "epochs",
                "teacher", "distill_weight", "temperature", "bf16", "label_smoothing", "init_weights",
                "learning_rate", "warmup_epochs", "average_from")
        identity = {k: str(v) for k, v in asdict(self).items() if k in keep}
        # One teacher reads as before teachers could be several, so runs from then still resume; an
        # ensemble's mean does not depend on the order its models were named in, nor does its identity.
        identity["teacher"] = " + ".join(sorted(str(t) for t in self.teacher)) if self.teacher else "None"
        return identity


# What runs from before an option existed did, for --resume's comparison.
_IDENTITY_BEFORE_OPTION = {"teacher": "None", "distill_weight": "0.5", "temperature": "3.0", "bf16": "False",
                          "label_smoothing": "0.1", "init_weights": "None", "learning_rate": "0.002",
                          "warmup_epochs": "2", "average_from": "0"}


@dataclass
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    classes: tuple[str, ...]
    summary: dict


def load_split(opts: TrainOptions) -> Split:
    """Read the training folder and the validation folder (or hold out a stratified, seeded fraction)."""
    size = (opts.image_size, opts.image_size)
    train_folders = datasets.scan(opts.data_dir)
    log.info("reading %d images from %s", len(train_folders), opts.data_dir)
    train = datasets.load_gray(train_folders, size)
    summary = {"train_dir": str(opts.data_dir), "classes": list(train.classes)}
    if opts.val_dir is not None:
        val_folders = datasets.scan(opts.val_dir)
        val = datasets.load_gray(val_folders, size, classes=train.classes)
        x_tr, y_tr, x_va, y_va = train.images, train.labels, val.images, val.labels
        summary["val_dir"] = str(opts.val_dir)
        unreadable = train.unreadable + val.unreadable
    else:
        if not 0 < opts.val_fraction < 1:
            raise DatasetError("--val-fraction must be between 0 and 1 when no --val folder is given")
        rng = np.random.default_rng(opts.seed)
        val_idx = []
        for k in range(len(train.classes)):
            idx = np.flatnonzero(train.labels == k)
            rng.shuffle(idx)
            val_idx.extend(idx[: max(1, round(len(idx) * opts.val_fraction))])
        mask = np.zeros(len(train.labels), bool)
        mask[val_idx] = True
        x_tr, y_tr, x_va, y_va = train.images[~mask], train.labels[~mask], train.images[mask], train.labels[mask]
        summary["val_fraction"] = opts.val_fraction
        unreadable = train.unreadable
    k = len(train.classes)
    summary["train_counts"] = dict(zip(train.classes, np.bincount(y_tr, minlength=k).tolist()))
    summary["val_counts"] = dict(zip(train.classes, np.bincount(y_va, minlength=k).tolist()))
    summary["unreadable"] = len(unreadable)
    for path in unreadable[:10]:
        log.warning("skipped unreadable image %s", path)
    return Split(x_tr, y_tr, x_va, y_va, train.classes, summary)


def class_weights(labels: np.ndarray, n_classes: int, power: float) -> np.ndarray:
    """Inverse-frequency weights raised to ``power`` and normalised to a mean of 1 per sample.

    power 1 fully balances the classes; 0 ignores imbalance. 0.5 lifts a rare
    class (FER2013's disgust is 1.5% of the data) without letting its few
    images dominate the gradient and cost overall accuracy.
    """
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    w = np.where(counts > 0, (counts.sum() / np.maximum(counts, 1)) ** power, 0.0)
    return w / (w[labels].mean())


def lr_at(epoch: int, opts: TrainOptions) -> float:
    """Linear warm-up, then cosine decay to zero at the last epoch (a function of the epoch alone, so resumable)."""
    if epoch < opts.warmup_epochs:
        return opts.learning_rate * (epoch + 1) / opts.warmup_epochs
    span = max(1, opts.epochs - opts.warmup_epochs)
    return 0.5 * opts.learning_rate * (1 + math.cos(math.pi * (epoch - opts.warmup_epochs) / span))


class RunState(keras.callbacks.Callback):
    """Checkpoint after every epoch, keep the best validation epoch's weights and, from ``average_from``, their mean."""

    def __init__(self, run_dir: Path, state: dict, total_epochs: int, average_from: int = 0):
        super().__init__()
        self.run_dir = run_dir
        self.state = state
        self.total = total_epochs
        self.average_from = average_from
        self._mean: list[np.ndarray] | None = None  # the running mean, read from its file only after a resume
        self._shadow: keras.Model | None = None  # an uncompiled twin that saves it: the file holds weights only
        self._t0 = time.time()

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        val_acc = float(logs.get("val_accuracy", 0.0))
        entry = {k: round(float(v), 5) for k, v in logs.items()}
        entry["epoch"] = epoch + 1
        entry["seconds"] = round(time.time() - self._t0, 1)
        self.state["history"].append(entry)
        if val_acc > self.state["best_val_accuracy"]:
            self.state.update(best_val_accuracy=val_acc, best_epoch=epoch + 1)
            self.model.save_weights(self.run_dir / "best.weights.h5")
        replaced = self._add_to_average(epoch + 1) if self.average_from and epoch + 1 >= self.average_from else None
        self.state["epochs_done"] = epoch + 1
        self.state["train_seconds"] = self.state.get("train_seconds", 0.0) + entry["seconds"]
        self.model.save(self.run_dir / "last.keras.tmp.keras")
        os.replace(self.run_dir / "last.keras.tmp.keras", self.run_dir / "last.keras")
        _write_json(self.run_dir / "state.json", self.state)  # the commit point: a resume starts from what it names
        if replaced is not None:
            replaced.unlink(missing_ok=True)
        log.info(
            "epoch %d/%d  loss %.4f  acc %.4f  val_loss %.4f  val_acc %.4f  (best %.4f @ %d)  %.0fs",
            epoch + 1, self.total, logs.get("loss", float("nan")), logs.get("accuracy", float("nan")),
            logs.get("val_loss", float("nan")), val_acc, self.state["best_val_accuracy"], self.state["best_epoch"],
            entry["seconds"],
        )

    def _add_to_average(self, epoch: int) -> Path | None:
        """Stochastic weight averaging: fold this epoch's weights (batch-norm statistics too) into the running mean.

        The mean goes to a new file named by the epoch, which state.json names once it is written, so a run
        killed in between resumes from the previous mean and count. Returns the file this one replaces.
        """
        n = self.state.get("averaged", 0)
        current = self.model.get_weights()
        if self._shadow is None:
            self._shadow = keras.Model.from_config(self.model.get_config())
        previous = self.run_dir / self.state["average_file"] if n else None
        if previous is not None and self._mean is None:
            if not previous.is_file():
                raise FerSwarmError(f"{previous}: the running mean of {n} epochs that state.json names is missing")
            self._shadow.load_weights(previous)
            self._mean = self._shadow.get_weights()
        if self._mean is not None:
            current = [m + (w - m) / (n + 1) for m, w in zip(self._mean, current)]
        self._mean = current
        self._shadow.set_weights(current)
        name = f"average-{epoch:03d}.weights.h5"
        self._shadow.save_weights(self.run_dir / name)
        self.state.update(averaged=n + 1, average_file=name)
        return previous if previous is not None and previous.name != name else None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _datasets(split: Split, opts: TrainOptions, weights: np.ndarray, teacher: Teacher | None):
    """Augmented training batches and validation batches; with a teacher, targets carry its probabilities too."""
    n_classes = len(split.classes)
    x_tr = split.x_train[..., None].astype(np.float32)
    y_tr = keras.utils.to_categorical(split.y_train, n_classes).astype(np.float32)
    w_tr = weights[split.y_train].astype(np.float32)
    if teacher is not None:
        t0 = time.time()
        y_tr = np.concatenate([y_tr, teacher.predict(x_tr)], axis=1)
        log.info("teacher labelled %d training images in %.0f s", len(x_tr), time.time() - t0)
    train = (
        tf.data.Dataset.from_tensor_slices((x_tr, y_tr, w_tr))
        .shuffle(len(x_tr), seed=opts.seed, reshuffle_each_iteration=True)
        .batch(opts.batch_size)
        .map(FaceAugment(opts.image_size, opts.seed), num_parallel_calls=1)
        .prefetch(2)
    )
    x_va = split.x_val[..., None].astype(np.float32)
    y_va = keras.utils.to_categorical(split.y_val, n_classes).astype(np.float32)
    if teacher is not None:
        y_va = np.concatenate([y_va, teacher.predict(x_va)], axis=1)
    val = tf.data.Dataset.from_tensor_slices((x_va, y_va)).batch(512)
    return train, val


def _prepare_run_dir(opts: TrainOptions) -> tuple[Path, dict]:
    run_dir = opts.resolved_run_dir()
    state_path = run_dir / "state.json"
    if state_path.exists() and not opts.resume:
        raise FerSwarmError(f"{run_dir} holds an earlier run: pass --resume to continue it, or --run-dir for a new one")
    if opts.resume and not state_path.exists():
        raise FerSwarmError(f"--resume: no run to continue in {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    if opts.resume:
        saved = json.loads((run_dir / "options.json").read_text())
        saved = {**_IDENTITY_BEFORE_OPTION, **saved}
        differs = {k: (saved.get(k), v) for k, v in opts.identity().items() if saved.get(k) != v}
        if differs:
            detail = "; ".join(f"{k}: run has {a}, now {b}" for k, (a, b) in differs.items())
            raise FerSwarmError(f"--resume with different options ({detail})")
        return run_dir, json.loads(state_path.read_text())
    _write_json(run_dir / "options.json", opts.identity())
    return run_dir, {"epochs_done": 0, "best_val_accuracy": -1.0, "best_epoch": 0, "history": []}


def train(opts: TrainOptions, *, verbose: int | None = None):
    """Run (or resume) training; return the Keras model (best epoch's weights, or the mean), the split and run state."""
    if not 0 <= opts.average_from <= opts.epochs:
        raise FerSwarmError(f"--average-from {opts.average_from}: the run has epochs 1-{opts.epochs} (0: no averaging)")
    if opts.init_weights is not None and not opts.init_weights.is_file():  # before minutes of reading and labelling
        raise FerSwarmError(f"--init-weights {opts.init_weights}: no such file (an earlier run's best.weights.h5)")
    keras.utils.set_random_seed(opts.seed)
    if opts.bf16:
        # bfloat16 arithmetic with float32 weights: 1.7x faster steps on CPUs with AVX512-BF16 (measured here).
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    split = load_split(opts)
    run_dir, state = _prepare_run_dir(opts)
    weights = class_weights(split.y_train, len(split.classes), opts.class_weight_power)
    log.info(
        "train %d images, validate on %d; classes %s; class weights %s",
        len(split.y_train), len(split.y_val), ", ".join(split.classes),
        ", ".join(f"{c}={w:.2f}" for c, w in zip(split.classes, weights)),
    )
    teacher = None
    if opts.teacher:
        teacher = Teacher(opts.teacher, split.classes, opts.image_size)
        log.info("distilling from %s (weight %.2f, temperature %.1f)", " and ".join(map(str, opts.teacher)),
                 opts.distill_weight, opts.temperature)
    if opts.resume:
        model = keras.models.load_model(run_dir / "last.keras")
        log.info("resuming %s after epoch %d of %d", run_dir, state["epochs_done"], opts.epochs)
    else:
        model = arch_mod.build(opts.arch, opts.image_size, len(split.classes))
        if opts.init_weights is not None:
            _warm_start(model, opts)
        if teacher is None:
            loss, metric = keras.losses.CategoricalCrossentropy(label_smoothing=opts.label_smoothing), "accuracy"
        else:
            loss = DistillLoss(len(split.classes), opts.distill_weight, opts.temperature, opts.label_smoothing)
            metric = distill_accuracy
        model.compile(
            optimizer=keras.optimizers.AdamW(opts.learning_rate, weight_decay=1e-4), loss=loss, metrics=[metric],
        )
    train_ds, val_ds = _datasets(split, opts, weights, teacher)
    if state["epochs_done"] < opts.epochs:
        model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=opts.epochs,
            initial_epoch=state["epochs_done"],
            verbose=(1 if sys.stderr.isatty() else 0) if verbose is None else verbose,
            callbacks=[
                keras.callbacks.LearningRateScheduler(lambda e: lr_at(e, opts)),
                keras.callbacks.CSVLogger(str(run_dir / "log.csv"), append=True),
                RunState(run_dir, state, opts.epochs, opts.average_from),
            ],
        )
    if opts.average_from:
        shutil.copyfile(run_dir / state["average_file"], run_dir / "average.weights.h5")
        model.load_weights(run_dir / "average.weights.h5")
        x_va = split.x_val[..., None].astype(np.float32)
        pred = np.argmax(model.predict(x_va, batch_size=512, verbose=0), axis=1)
        state["average_val_accuracy"] = float((pred == split.y_val).mean())
        _write_json(run_dir / "state.json", state)
        log.info("mean of the weights after epochs %d-%d: val_acc %.4f (best single epoch %.4f @ %d)",
                 opts.average_from, opts.epochs, state["average_val_accuracy"], state["best_val_accuracy"],
                 state["best_epoch"])
    else:
        model.load_weights(run_dir / "best.weights.h5")
    return model, split, state, run_dir


def _warm_start(model: keras.Model, opts: TrainOptions) -> None:
    """Start from an earlier run's weights (same --arch): a new cosine cycle over a trained network."""
    path = opts.init_weights
    try:
        model.load_weights(path)
    except (ValueError, KeyError, OSError) as e:
        raise FerSwarmError(f"--init-weights {path} does not fit --arch {opts.arch}: {e}") from e
    log.info("starting from the weights in %s", path)


def _float32_copy(model: keras.Model, opts: TrainOptions, n_classes: int) -> keras.Model:
    """The same network and weights computing in float32, so the export is not full of bfloat16 casts."""
    keras.mixed_precision.set_global_policy("float32")
    plain = arch_mod.build(opts.arch, opts.image_size, n_classes)
    plain.set_weights(model.get_weights())
    return plain


def run(opts: TrainOptions, *, verbose: int | None = None) -> dict:
    """Train (or resume), export the TFLite candidates, ship one to ``opts.out``; return the run summary."""
    from . import export as export_mod

    t0 = time.time()
    model, split, state, run_dir = train(opts, verbose=verbose)
    rng = np.random.default_rng(opts.seed)
    representative = split.x_train[rng.choice(len(split.x_train), min(1000, len(split.x_train)), replace=False)]
    card_fields = {
        "name": opts.out.stem,
        "version": opts.model_version,
        "dataset": split.summary,
        "training": {
            "command": opts.command,
            "arch": opts.arch,
            "flip_average": opts.flip_average,
            "bf16": opts.bf16,
            "label_smoothing": opts.label_smoothing,
            "init_weights": None if opts.init_weights is None else {
                "path": str(opts.init_weights), "sha256": sha256_file(opts.init_weights),
            },
            "learning_rate": opts.learning_rate,
            "warmup_epochs": opts.warmup_epochs,
            "teacher": None if not opts.teacher else {
                "models": [str(t) for t in opts.teacher], "sha256": [sha256_file(t) for t in opts.teacher],
                "distill_weight": opts.distill_weight, "temperature": opts.temperature,
            },
            "params": int(model.count_params()),
            "epochs": opts.epochs,
            "best_epoch": state["best_epoch"],
            "average_from": opts.average_from or None,
            "seed": opts.seed,
            "batch_size": opts.batch_size,
            "train_seconds": round(state.get("train_seconds", 0.0)),
            "tensorflow": tf.__version__,
        },
    }
    if opts.bf16:
        model = _float32_copy(model, opts, len(split.classes))
    if opts.flip_average:
        model = arch_mod.with_flip_average(model)
    shipped, candidates = export_mod.export(
        model,
        out=opts.out,
        work_dir=run_dir / "export",
        classes=split.classes,
        x_val=split.x_val,
        y_val=split.y_val,
        x_representative=representative,
        card_fields=card_fields,
    )
    summary = {
        "out": str(opts.out),
        "shipped": shipped.kind,
        "val_accuracy": shipped.report.accuracy,
        "val_macro_f1": shipped.report.macro_f1,
        "best_epoch": state["best_epoch"],
        "average_from": opts.average_from or None,
        "epochs": opts.epochs,
        "train_seconds": state.get("train_seconds", 0.0),
        "wall_seconds_this_call": time.time() - t0,
        "candidates": {c.kind: c.summary for c in candidates},
        "report": shipped.report,
    }
    _write_json(run_dir / "summary.json", {k: v for k, v in summary.items() if k != "report"})
    return summary
