"""The ``fer-swarm`` command line: one typer app, one function per sub-command.

Each command does its argument handling and output here and leaves the work
to the module that owns it. Errors the project raises on purpose
(:class:`FerSwarmError`) become one ``error:`` line and a non-zero exit, never
a traceback; configuration errors exit 2, like typer's own usage errors.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional, get_args

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import config as config_mod
from . import logs
from .errors import ConfigError, FerSwarmError

app = typer.Typer(
    help="Real-time facial expression recognition on a swarm of small machines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
dataset_app = typer.Typer(help="Prepare folder-per-class datasets.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")
keys_app = typer.Typer(help="CurveZMQ key pairs for encrypted, authenticated links (see docs/security.md).",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")

console = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def friendly_errors(fn):
    """Turn the project's own exceptions into one error line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            fail(str(e), 2)
        except FerSwarmError as e:
            fail(str(e), 1)
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def settings_command(program: str, name: str | None = None, extra: tuple[inspect.Parameter, ...] = ()):
    """Register ``fn(settings)`` as a command whose flags are the fields of ``program``'s settings.

    The pydantic model stays the one description of the settings: each field
    becomes ``--field-name`` with the field's description as its help. Flags
    reach typer as text and are validated by pydantic with the file and the
    environment, so a bad value gives the same one-line error wherever it came from.
    ``extra`` are options that are not settings (how to show the result, say); they reach
    ``fn`` as keyword arguments after the settings.
    """
    model = config_mod.PROGRAMS[program]

    def decorator(fn: Callable[..., Any]):
        params = [
            inspect.Parameter(
                "config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                default=typer.Option(None, "--config", "-c", help=f"TOML settings file (see configs/{program}.toml).",
                                     rich_help_panel="Settings"),
            )
        ]
        for field_name, field in model.model_fields.items():
            dashed = field_name.replace("_", "-")
            is_bool = bool in (field.annotation, *get_args(field.annotation))
            default = "none" if field.default is None else field.default
            help_text = f"{field.description} (default: {default})"
            decls = (f"--{dashed}/--no-{dashed}",) if is_bool else (f"--{dashed}",)
            kind = next((t for t in (int, float, Path) if t in (field.annotation, *get_args(field.annotation))), str)
            metavar = {int: "INT", float: "NUMBER", Path: "PATH", str: "TEXT"}[kind]
            params.append(
                inspect.Parameter(
                    field_name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[bool] if is_bool else Optional[str],
                    default=typer.Option(None, *decls, help=help_text, show_default=False, rich_help_panel="Settings",
                                         metavar=None if is_bool else metavar),
                )
            )
        @functools.wraps(fn)
        def command(**kwargs):
            config_file = kwargs.pop("config")
            options = {p.name: kwargs.pop(p.name) for p in extra}
            return fn(config_mod.load(program, config_file=config_file, flags=kwargs), **options)

        command.__signature__ = inspect.Signature([*extra, *params])
        example = next(iter(model.model_fields))
        epilog = (f"Every setting can also come from the environment as {config_mod.env_prefix(program)}SETTING "
                  f"(e.g. {config_mod.env_prefix(program)}{example.upper()}) or from the TOML file given with --config; "
                  "a flag wins over the environment, which wins over the file.")
        app.command(name or program, epilog=epilog)(friendly_errors(command))
        return fn

    return decorator


def run(argv: list[str] | None = None) -> int:
    """Console-script entry point: like ``app()``, but usage errors are one ``error:`` line and exit 2."""
    try:
        code = app(args=argv, prog_name="fer-swarm", standalone_mode=False)
    except Exception as e:  # click's UsageError and friends, without importing click's private copy
        if callable(getattr(e, "format_message", None)) and isinstance(getattr(e, "exit_code", None), int):
            err.print(f"[bold red]error:[/] {escape(e.format_message())}", highlight=False, soft_wrap=True)
            return e.exit_code
        raise
    return code if isinstance(code, int) else 0


def _print_version(asked: bool) -> None:
    if asked:
        from . import __version__
        from .protocol import PROTOCOL_TAG

        console.print(f"fer-swarm {__version__} (wire protocol {PROTOCOL_TAG.decode()})", highlight=False)
        raise typer.Exit()


@app.callback()
def main(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True,
                                help="More log output: -v fer-swarm's DEBUG records, -vv the libraries' too."),
    quiet: bool = typer.Option(False, "--quiet", "-q",
                               help="Only warnings and errors in the log, the model runtime's banners hidden."),
    log_format: logs.LogFormat = typer.Option(
        logs.LogFormat.text, "--log-format", case_sensitive=False,
        help="text: human-readable lines (time, level, logger, message); json: one JSON object per line "
             "(ts in UTC, level, logger, message, exception, extra fields), for services and journald."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and the wire protocol it speaks, and exit."),
) -> None:
    logs.setup(verbose=verbose, quiet=quiet, fmt=log_format, console=err)


def _progress():
    """A rich progress display on stderr while a long command works, shown only when stderr is a terminal:
    nothing in pipes, files or service logs."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal)


def _default_model() -> Path:
    from .model import DEFAULT_MODEL

    return DEFAULT_MODEL


# --------------------------------------------------------------------------- train


@app.command()
@friendly_errors
def train(
    data_dir: Path = typer.Argument(..., help="Training images, one subfolder per class (e.g. DATA/happy/*.jpg)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the shipped TFLite model; its sidecar goes beside it as .json."),
    val: Optional[Path] = typer.Option(None, "--val", help="Validation folder (same classes). Without it, --val-fraction of DATA_DIR is held out."),
    val_fraction: float = typer.Option(0.1, help="Fraction of each class held out for validation when --val is not given."),
    epochs: int = typer.Option(40, min=1, help="Training epochs (the learning rate follows a cosine over them)."),
    batch_size: int = typer.Option(128, min=1, help="Images per training step."),
    learning_rate: float = typer.Option(2e-3, help="Peak learning rate (AdamW), reached after --warmup-epochs."),
    warmup_epochs: int = typer.Option(2, min=0, help="Epochs of linear warm-up before the cosine decay."),
    arch: str = typer.Option("vgg", help="Network: 'vgg' (fer-vgg, 96 MMAC per pass), 'res' (bottleneck residual + squeeze-excitation, 41 MMAC), 'sep' (depthwise-separable, 44 MMAC; slow to train on CPU) or 'tiny' (tests and smoke runs)."),
    image_size: int = typer.Option(48, min=16, help="Side of the square gray input, in pixels."),
    class_weight_power: float = typer.Option(0.5, help="Class-imbalance weighting: 0 none, 1 fully balanced."),
    seed: int = typer.Option(1234, help="Random seed for the split, initialisation, shuffling and augmentation."),
    run_dir: Optional[Path] = typer.Option(None, help="Checkpoints, logs and exports of this run (default: runs/OUT-STEM)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --run-dir from its last finished epoch."),
    flip_average: bool = typer.Option(False, "--flip-average", help="Export a model that averages its answer on the face and its mirror image (twice the inference time)."),
    model_version: str = typer.Option("1", help="Version string written into the sidecar and announced by workers."),
    teacher: Optional[list[Path]] = typer.Option(None, "--teacher", help="Distil from this TFLite model (float input, same classes), or a shipped model's name (fer-vgg), labels computed once by LiteRT before training. Repeat to distil from the mean of several models' answers (an ensemble teacher)."),
    init_weights: Optional[Path] = typer.Option(None, "--init-weights", help="Start from an earlier run's weights (its RUN_DIR/best.weights.h5, same --arch) instead of random ones: a second cosine cycle, usually with a lower --learning-rate. Recorded with its SHA-256 in the sidecar."),
    average_from: int = typer.Option(0, min=0, help="Stochastic weight averaging: export the mean of the weights after each epoch from this one (1-based) to the last, instead of the best epoch's (no epoch is picked on the validation set); 0 for none."),
    distill_weight: float = typer.Option(0.5, min=0.0, max=1.0, help="Share of the loss given to matching the teacher (the rest: the true labels)."),
    temperature: float = typer.Option(3.0, min=1.0, help="Distillation temperature: above 1 softens both models' answers so the teacher's second choices teach too."),
    label_smoothing: float = typer.Option(0.1, min=0.0, max=0.5, help="Share of each true label spread over the other classes (softer answers; 0 for none)."),
    bf16: bool = typer.Option(False, "--bf16", help="Train in mixed bfloat16 (float32 weights; export stays float32): faster on CPUs with AVX512-BF16 or AMX."),
) -> None:
    """Train the expression classifier on DATA_DIR and export a TFLite model plus its JSON sidecar.

    Needs the optional training dependencies: pip install 'fer-swarm\\[train]'.
    """
    from .logs import native_output
    from .model import resolve_model

    def _shipped_or_given(path: Path) -> Path:
        """A teacher as given, or a shipped model's name as its path relative to here when it lies under it
        (models/fer-vgg.tflite in a checkout), so sidecars and run identities do not carry one machine's path."""
        found = resolve_model(path)
        if found == path:
            return path
        try:
            return found.relative_to(Path.cwd())
        except ValueError:
            return found

    try:
        with native_output("tensorflow"):  # TensorFlow's import-time C++ notices become log records (-q hides them)
            from .training.train import TrainOptions, run
    except ImportError as e:
        fail(f"training needs TensorFlow: pip install 'fer-swarm[train]' ({e})")
    opts = TrainOptions(
        data_dir=data_dir, out=out, val_dir=val, val_fraction=val_fraction, epochs=epochs, batch_size=batch_size,
        learning_rate=learning_rate, warmup_epochs=warmup_epochs, init_weights=init_weights, arch=arch,
        image_size=image_size, class_weight_power=class_weight_power, seed=seed, run_dir=run_dir, resume=resume,
        model_version=model_version, flip_average=flip_average, average_from=average_from,
        teacher=tuple(_shipped_or_given(t) for t in teacher or ()), distill_weight=distill_weight, temperature=temperature, bf16=bf16,
        label_smoothing=label_smoothing,
    )
    from .training.arch import ARCHITECTURES

    if arch not in ARCHITECTURES:
        fail(f"unknown --arch {arch!r}: choose from {', '.join(ARCHITECTURES)}", 2)
    summary = run(opts)
    table = Table(title=f"exported {summary['out']} ({summary['shipped']})")
    for col in ("variant", "KB", "agrees with Keras", "val accuracy", "val macro-F1", "ms/face"):
        table.add_column(col, justify="right")
    for kind, c in summary["candidates"].items():
        mark = " *" if kind == summary["shipped"] else ""
        table.add_row(kind + mark, f"{c['size_bytes'] / 1024:.0f}", f"{c['agreement_with_keras']:.2%}",
                      f"{c['val_accuracy']:.2%}", f"{c['val_macro_f1']:.3f}", f"{c['ms_per_face_median']:.3f}")
    console.print(table)
    weights = (f"mean of epochs {summary['average_from']}-{summary['epochs']}" if summary["average_from"]
               else f"best epoch {summary['best_epoch']}/{summary['epochs']}")
    console.print(
        f"{weights}, training time {summary['train_seconds'] / 60:.1f} min; "
        f"shipped {summary['shipped']}: accuracy {summary['val_accuracy']:.2%}, macro-F1 {summary['val_macro_f1']:.3f}"
    )


# --------------------------------------------------------------------------- eval


@app.command("eval")
@friendly_errors
def eval_(
    data_dir: Path = typer.Argument(..., help="Labelled images, one subfolder per class, class names as in the model's labels."),
    model: Optional[list[Path]] = typer.Option(None, "--model", "-m", help="TFLite model (sidecar beside it) or a shipped model's name, fer-res or fer-vgg (default: fer-res). Repeat to score several side by side on the same faces; times are given as a ratio to the first."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also write the confusion matrix as a PNG heat map here (with several models: one per model, named PLOT-STEM-MODEL-NAME.png). Needs matplotlib: pip install 'fer-swarm\\[plot]'."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per model, one per line, instead of tables."),
) -> None:
    """Score models on DATA_DIR with the workers' runtime (LiteRT, one thread): accuracy, macro-F1,
    per-class precision and recall, confusion matrix, milliseconds per face, and what each model costs
    (MMAC per face counted from its graph, parameters, file size)."""
    from . import charts
    from .tools.evaluate import evaluate, plot_confusion

    if plot:
        charts.require()  # before minutes of scoring, not after
    models = model or [_default_model()]
    with _progress() as progress:
        task = progress.add_task(f"scoring faces on {len(models)} model(s)", total=None)
        evs = evaluate(data_dir, models, progress=lambda done, total: progress.update(task, completed=done,
                                                                                        total=total))
    for ev in evs:
        if plot:
            path = plot if len(evs) == 1 else plot.with_name(f"{plot.stem}-{ev.model.stem}{plot.suffix}")
            plot_confusion(ev.report, path, title=ev.model_id)
            if not as_json:
                console.print(f"confusion matrix written to {path}")
    results = [ev.to_dict() for ev in evs]
    if as_json:
        for result in results:
            print(json.dumps(result))
        return
    for ev, result in zip(evs, results):
        _print_evaluation(ev, result, data_dir)
    if len(evs) > 1:
        _print_comparison(results)
    if evs[0].unreadable:
        err.print(f"[yellow]warning:[/] {len(evs[0].unreadable)} unreadable image(s) skipped")


def _print_evaluation(ev, result: dict, data_dir: Path) -> None:
    from . import metrics

    r = ev.report
    console.print(f"model {ev.model_id} ({ev.model}) on {data_dir}, runtime {ev.runtime}, n={r.n}")
    table = Table()
    for col in ("class", "precision", "recall", "F1", "support"):
        table.add_column(col, justify="right")
    for c, row in result["per_class"].items():
        table.add_row(c, f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}", str(row["support"]))
    console.print(table)
    console.print("confusion matrix (rows: true class, columns: predicted)")
    console.print(metrics.format_confusion(r), highlight=False)
    console.print(
        f"accuracy {r.accuracy:.2%}  macro-F1 {r.macro_f1:.4f}  "
        f"ms/face median {result['ms_per_face_median']:.3f}  p95 {result['ms_per_face_p95']:.3f} (1 thread)\n"
        f"cost {result['mmac_per_face']:.1f} MMAC/face  {result['params']:,} parameters  "
        f"{result['size_bytes'] / 1024:.0f} KB ({result['quantization']})"
    )


def _print_comparison(results: list[dict]) -> None:
    base = results[0]["ms_per_face_median"]
    table = Table(title="side by side: same faces, same runtime, 1 thread; ms ratio to the first model")
    table.add_column("file", no_wrap=True)
    table.add_column("quant", no_wrap=True)
    for col in ("MMAC", "params", "KB", "acc %", "F1", "ms", "ratio"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in results:
        table.add_row(
            Path(r["model"]).stem, r["quantization"], f"{r['mmac_per_face']:.1f}", f"{r['params'] / 1e3:.0f}k",
            f"{r['size_bytes'] / 1024:.0f}", f"{100 * r['accuracy']:.2f}", f"{r['macro_f1']:.3f}",
            f"{r['ms_per_face_median']:.3f}", f"{r['ms_per_face_median'] / base:.2f}",
        )
    # Figures cut to "0.6…" in a log or a pipe help nobody; a terminal keeps its own width.
    Console(width=None if console.is_terminal else max(console.width, 120)).print(table)


# --------------------------------------------------------------------------- dataset crop


@dataset_app.command("crop")
@friendly_errors
def dataset_crop(
    raw_dir: Path = typer.Argument(..., help="Photos, one subfolder per class."),
    out_dir: Path = typer.Argument(..., help="Where to write OUT_DIR/CLASS/PHOTO-N.png face crops."),
    model: Optional[Path] = typer.Option(None, help="The model the crops are for: its sidecar gives the crop size "
                                                    "and framing; a path or a shipped model's name. Default: fer-res."),
    detector: str = typer.Option("yunet", help="Face detector: yunet or haar (as the edge's --detector)."),
    detect_width: int = typer.Option(640, min=0, help="Detect on a copy scaled to this width in pixels (0: full size); crops are always cut at full size."),
) -> None:
    """Find every face in each photo with the edge client's detector and write one crop per face,
    framed and sized as the model was trained (its sidecar says how)."""
    from rich.progress import Progress

    from .faces import make_detector
    from .model import DEFAULT_MODEL, load_card
    from .tools.crop import count_photos, crop_dataset

    card = load_card(model or DEFAULT_MODEL)
    found = make_detector(detector, detect_width_px=detect_width)
    total = count_photos(raw_dir)
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("cropping", total=total)
        tallies = crop_dataset(raw_dir, out_dir, card=card, detector=found, progress=lambda: progress.advance(task))
    table = Table(title=f"face crops written to {out_dir}")
    for col in ("class", "photos", "crops", "no face", "several faces", "unreadable"):
        table.add_column(col, justify="right")
    for cls, t in tallies.items():
        table.add_row(cls, str(t.photos), str(t.crops), str(t.no_face), str(t.several_faces), str(len(t.unreadable)))
    console.print(table)
    for t in tallies.values():
        for path in t.unreadable:
            err.print(f"[yellow]skipped unreadable file:[/] {path}")


# --------------------------------------------------------------------------- keys


@keys_app.command("generate")
@friendly_errors
def keys_generate(
    name: str = typer.Argument(..., help="Who the key is for: 'broker', a worker ('pi-1'), a client ('headset')."),
    directory: Path = typer.Option(Path("keys"), "--dir", "-d", help="Folder to write NAME.key and NAME.key_secret into."),
) -> None:
    """Write a key pair: NAME.key (public: copy it to the broker's allow-list or to the peers) and
    NAME.key_secret (secret: readable by its owner only; never copy it off its machine)."""
    from . import security

    public, secret = security.generate(name, directory)
    console.print(f"public key  {public}  (fingerprint {security.fingerprint(security.load_public(public))})")
    console.print(f"secret key  {secret}  (mode 0600: keep it on this machine)")


@keys_app.command("fingerprint")
@friendly_errors
def keys_fingerprint(path: Path = typer.Argument(..., help="A NAME.key or NAME.key_secret file.")) -> None:
    """Print a key's fingerprint, as the broker logs it when it refuses or admits a peer."""
    from . import security

    console.print(security.fingerprint(security.load_public(path)))


# --------------------------------------------------------------------------- swarm


def _serve(server) -> None:
    """Run ``server.serve()`` in this thread until it returns.

    The first SIGTERM or Ctrl-C asks the server to drain and stop (``serve``
    then returns and the command exits 0); a second one stops at once (exit 130).
    """
    import signal
    import threading

    signals: list[int] = []

    def on_signal(signum, _frame) -> None:
        if signals:
            raise KeyboardInterrupt
        signals.append(signum)
        # From another thread: a signal handler must not take a lock its own thread may be holding.
        threading.Thread(target=server.stop, name="stop", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.serve()


@settings_command("broker")
def broker(settings) -> None:
    """Run the broker: edge clients connect to --frontend, workers to --backend.

    Load-balances face jobs over the workers by credit (a worker never holds
    more jobs than it announced), fairly across clients, with deadlines and
    heartbeats. Every job gets exactly one reply: RESULT, EXPIRED, BUSY or ERROR.

    SIGTERM or Ctrl-C drains: new jobs are answered BUSY, jobs in hand get up to --drain-grace-s to finish,
    the rest ERROR, then workers are told to go; a second signal stops at once.
    See it run with `fer-swarm status`, or scrape --metrics-port with Prometheus.
    """
    from .broker import Broker

    server = Broker(settings)
    try:  # a second signal interrupts serve(), whose finally still answers every job ERROR
        _serve(server)
    finally:
        server.close()


@settings_command("worker")
def worker(settings) -> None:
    """Run a worker: N inference threads answer face jobs from the broker with the TFLite model.

    Run one per Raspberry Pi, e.g. fer-swarm worker --broker tcp://BROKER:5556 --threads 4.
    SIGTERM or Ctrl-C drains: new jobs are refused, the ones in hand are finished and
    answered, then it leaves the broker and exits 0 (within --drain-grace-s; a second
    Ctrl-C quits at once). --metrics-port serves Prometheus metrics.
    """
    from .worker import Worker

    _serve(Worker(settings))


_STATUS_OPTIONS = (
    inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
        False, "--json", help="Print one snapshot as a JSON object (workers, clients, queue, counters, latency_ms) "
                              "and exit.")),
    inspect.Parameter("check", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
        False, "--check", help="Print one line and exit 0 if the broker answers and has a worker registered, "
                               "1 otherwise: a health probe for systemd, Docker or Kubernetes.")),
)


@settings_command("status", extra=_STATUS_OPTIONS)
def status(settings, as_json: bool = False, check: bool = False) -> None:
    """Show a broker's live status: its workers (host, model, credits, jobs in flight and done, link and
    service time, heartbeat age), its clients (stream, jobs/s, BUSY/EXPIRED/ERROR counts), its queue and
    its latency split into queue and compute time. Refreshes every --interval-s until Ctrl-C.

    Asks the broker's frontend, with the same keys as an edge client: e.g.
    fer-swarm status --broker tcp://broker.local:5555 --secret-key keys/ops.key_secret --broker-key keys/broker.key
    """
    from rich.live import Live

    from .errors import TransportError
    from .status import StatusClient, check_line, render, require

    if as_json and check:
        raise ConfigError("give --json or --check, not both")
    try:
        client = StatusClient(settings)
    except TransportError as e:
        if check:
            console.print(f"not ok: {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        raise
    with client:
        if check:
            try:
                healthy, line = check_line(require(client.fetch()), settings.broker)
            except FerSwarmError as e:
                healthy, line = False, f"not ok: {e}"
            console.print(line, highlight=False, soft_wrap=True)
            raise typer.Exit(0 if healthy else 1)
        if as_json:
            print(json.dumps(require(client.fetch())))
            return
        import time

        with Live(render(require(client.fetch()), settings.broker), console=console, auto_refresh=False) as live:
            try:
                while True:
                    time.sleep(settings.interval_s)
                    live.update(render(require(client.fetch()), settings.broker), refresh=True)
            except KeyboardInterrupt:
                pass


def _print_edge_summary(summary, title: str) -> None:
    d = summary.to_dict()
    table = Table(title=title, show_header=False)
    table.add_column(justify="right")
    table.add_column()
    fmt = lambda v: "-" if v is None else f"{v:.1f} ms"  # noqa: E731
    errors = [f"{k} {v}" for k, v in d["errors"].items()]
    if d.get("unsent"):  # crops the socket would not take: the broker never saw them
        errors.append(f"{d['unsent']} crop(s) unsent")
    rows = [
        ("frames", f"{d['frames']} in {d['wall_s']:.1f} s ({d['fps']:.1f} fps)"
                   + (", stopped early" if d.get("stopped") else "")),
        ("faces", f"{d['faces']} in {d['tracks']} track(s) ({d['answered']} labelled)"),
        ("crops sent", f"{d['crops_sent']} ({d['crops_sent'] / max(d['faces'], 1):.2f} per face shown)"),
        ("labels", ", ".join(f"{k} {v}" for k, v in sorted(d["labels"].items(), key=lambda kv: -kv[1])) or "-"),
        ("errors", ", ".join(errors) or "none"),
        ("latency", f"p50 {fmt(d['latency_p50_ms'])}, p95 {fmt(d['latency_p95_ms'])}"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


@settings_command("edge")
def edge(settings) -> None:
    """Run the edge client: find faces in a camera, video or image folder, label them through the swarm,
    and show them in a window or write --output annotated.mp4 and --events events.jsonl.

    Ctrl-C or SIGTERM stops it cleanly: no new frames are read, the frames
    in hand get their labels (up to --display-delay-ms), the video and events
    files are closed and the summary is printed (exit 0). A second Ctrl-C
    quits at once. Reading a file on a terminal shows its progress."""
    import signal
    import threading

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .edge.app import run_edge

    if settings.camera is None and settings.video is None and settings.images is None:
        raise ConfigError("give a source: --camera INDEX, --video FILE or --images DIR")
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum, _frame) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user will not wait for the flush
        received.append(signal.Signals(signum).name)
        stop.set()  # the edge loop notices within one wait and flushes what it holds

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    # Progress for files only (a camera has no end), and only for a person watching a terminal.
    progress = Progress(TextColumn("edge"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("frames  {task.fields[fps]:.1f} fps  {task.fields[faces]} faces"),
                        TimeElapsedColumn(), console=err, transient=True,
                        disable=not err.is_terminal or settings.camera is not None)
    task = progress.add_task("edge", total=None, fps=0.0, faces=0)
    try:
        with progress:
            summary = run_edge(settings, stop=stop, progress=None if progress.disable else (
                lambda p: progress.update(task, completed=p.position, total=p.total, fps=p.fps, faces=p.faces)))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    title = "edge summary" + (f" (stopped by {received[0]})" if received else "")
    _print_edge_summary(summary, title)


@app.command()
@friendly_errors
def demo(
    out_dir: Path = typer.Option(Path("demo-out"), "--out", help="Folder for sample.mp4, annotated.mp4 and events.jsonl."),
    workers: int = typer.Option(2, min=1, max=8, help="Worker processes to start."),
    frames: int = typer.Option(90, min=1, max=3000, help="Frames in the generated sample clip."),
    faces: int = typer.Option(2, min=1, max=2, help="Faces in the sample clip."),
) -> None:
    """Start a broker, workers and an edge on this machine over loopback, label a built-in sample clip of
    real faces, write the annotated video and the events, and print a summary.

    The clip is made from the public-domain NASA astronaut portrait that scikit-image ships in its wheel:
    no download, no camera, no display needed.
    """
    from .config import EdgeSettings
    from .edge.app import run_edge
    from .launch import swarm
    from .samples import sample_clip

    out_dir.mkdir(parents=True, exist_ok=True)
    clip = sample_clip(out_dir / "sample.mp4", frames=frames, faces=faces)
    console.print(f"sample clip: {clip} ({frames} frames, {faces} faces)")
    with swarm(workers, worker_args=("--threads", "1")) as (front, _back):
        console.print(f"broker on {front}, {workers} worker(s) starting")
        settings = EdgeSettings(broker=front, video=clip, output=out_dir / "annotated.mp4",
                                events=out_dir / "events.jsonl", connect_timeout_s=60, stream="demo")
        summary = run_edge(settings)
    _print_edge_summary(summary, "fer-swarm demo")
    console.print(f"annotated video: {settings.output}\nevents: {settings.events}")


@app.command()
@friendly_errors
def bench(
    quick: bool = typer.Option(False, "--quick", help="A smoke run of seconds: one point per configuration, short windows."),
    out_dir: Path = typer.Option(Path("bench-out"), "--out", help="Folder for bench.json, bench.png (with the plot extra: matplotlib) and the edge clips."),
    configs: str = typer.Option("abcde", help="Which configurations to run (letters, see docs/performance.md)."),
    edge: bool = typer.Option(True, "--edge/--no-edge", help="Also measure the edge pipeline's frames per second."),
    window_s: float = typer.Option(1.0, min=0.1, help="Seconds per measurement window."),
    max_windows: int = typer.Option(8, min=4, help="Windows per point at most, if three never agree within 10%."),
    service_ms: float = typer.Option(15.0, min=0.0, help="Simulated Raspberry Pi service time per face (config e), ms."),
    rtt_ms: float = typer.Option(5.0, min=0.0, help="Round-trip delay added on every link in config e, ms."),
    sim_workers: str = typer.Option("1,2,4,8", help="Simulated Pi worker counts for config e."),
    faces_per_job: int = typer.Option(4, min=1, max=16,
                                      help="Crops per JOB in config c (and a custom point), as the edge sends a "
                                           "frame's faces together."),
    workers: int | None = typer.Option(None, min=1, max=16, rich_help_panel="One custom point",
                                       help="Run one point of your own instead of the suite: this many real "
                                            "workers with the shipped model."),
    threads: int = typer.Option(1, min=1, max=16, rich_help_panel="One custom point",
                                help="Inference threads per worker."),
    clients: int = typer.Option(1, min=1, max=16, rich_help_panel="One custom point",
                                help="Load-generating client processes."),
    in_flight: int = typer.Option(8, min=1, max=10_000, rich_help_panel="One custom point",
                                  help="Closed loop: JOBs in flight, shared among the clients."),
    rate: float = typer.Option(0.0, min=0.0, rich_help_panel="One custom point",
                               help="Open loop at this many faces/s in all, shared among the clients (0: closed loop)."),
) -> None:
    """Measure fer-swarm against in-process inference and the prototype's design, side by side in one run,
    on real processes over loopback: throughput, latency p50/p90/p99, EXPIRED/BUSY/ERROR counts.

    With --workers, measure one point of your own instead, e.g. 2 workers of 2 threads driven by 2 clients
    at 1,500 faces/s: fer-swarm bench --workers 2 --threads 2 --clients 2 --rate 1500"""
    import dataclasses

    from .bench import suite
    from .bench.runner import Point

    custom = None
    if workers is not None:
        load = f"{rate:g} faces/s" if rate else f"{in_flight} JOBs in flight"
        custom = Point("custom", f"custom: {workers}W x {threads}T, {clients} client(s), {load}, {faces_per_job}/JOB",
                       "swarm", workers=workers, threads=threads,
                       clients=clients, in_flight=in_flight, rate=rate, faces_per_job=faces_per_job)
    if quick:
        opts = dataclasses.replace(suite.BenchOptions.smoke(out_dir), configs=configs, faces_per_job=faces_per_job,
                                   custom=custom)
    else:
        opts = suite.BenchOptions(out_dir=out_dir, window_s=window_s, max_windows=max_windows, service_ms=service_ms,
                                  rtt_ms=rtt_ms, configs=configs, faces_per_job=faces_per_job, custom=custom,
                                  sim_workers=tuple(int(w) for w in sim_workers.split(",") if w.strip()))
    table = Table(title="fer-swarm bench (this machine, one run)")
    for col in ("configuration", "faces/s", "p50 ms", "p90 ms", "p99 ms", "expired", "busy", "errors", "settled"):
        table.add_column(col, justify="right")
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731

    def progress(m) -> None:
        err.print(f"  {m.point.name}: {m.throughput_per_s:.0f} faces/s, p99 {fmt(m.p99_ms)} ms"
                  f"{'' if m.settled else ' (windows did not agree within 10%)'}", highlight=False)
        table.add_row(m.point.name, f"{m.throughput_per_s:.0f}", fmt(m.p50_ms), fmt(m.p90_ms), fmt(m.p99_ms),
                      str(m.expired), str(m.busy), str(m.errors), "yes" if m.settled else "NO")

    measure_edge = edge and custom is None
    with _progress() as bar:
        task = bar.add_task("bench", total=suite.planned(opts) + measure_edge)

        def starting(point) -> None:
            bar.update(task, description=point.name)

        def measured(m) -> None:
            progress(m)
            bar.advance(task)

        report = suite.run(opts, measured, starting)
        result = report.to_dict()
        if measure_edge:
            from .bench.edgefps import measure

            bar.update(task, description="edge pipeline, frames per second")
            result["edge"] = measure(out_dir / "edge", frames=60 if quick else 150)
            bar.advance(task)
    Console(width=max(console.width, 140)).print(table)  # a table of figures is unreadable wrapped at 80
    for t in report.targets:
        verdict = {True: "[green]met[/]", False: "[red]not met[/]", None: ""}[t["met"]]
        console.print(f"{t['target']}: {t['measured']} (goal {t['goal']}) {verdict}")
    if measure_edge:
        for name, e in result["edge"].items():
            if not isinstance(e, dict):
                continue
            console.print(f"edge, {name}: {e['edge_fps']} fps whole pipeline; stages (ms/frame) "
                          + ", ".join(f"{k} {v}" for k, v in e["stages_ms"].items()), highlight=False)
    json_path, png_path = suite.write(report, out_dir)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"figures: {json_path}" + (f", chart: {png_path}" if png_path else ""))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
