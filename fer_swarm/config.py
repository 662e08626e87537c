"""Typed settings for each program, from a TOML file, the environment and flags.

One pydantic model per program is the single description of its settings:
the TOML file (``configs/NAME.toml``), the environment (``FER_SWARM_NAME_KEY``)
and the command-line flags (``--key``) are all read into it, with precedence
flag > environment > file > default. The file and the environment are read by
pydantic-settings' sources (``TomlConfigSettingsSource``, ``EnvSettingsSource``).
Every field has a description and a unit in its name, and that text is the
flag's ``--help``.

Unknown keys are errors, not silently ignored: a misspelt ``theads = 4`` in a
file or ``FER_SWARM_WORKER_THEADS`` in the environment would otherwise leave
the default running while the operator believes otherwise.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from .errors import ConfigError

ENV_PREFIX = "FER_SWARM_"


class Settings(BaseSettings):
    """Base of every program's settings: frozen, strict about unknown keys.

    Settings built in code (``WorkerSettings(threads=2)``) are exactly what
    they are given: the file and the environment are read by :func:`load`
    alone, so a test or the demo is not changed by a variable left in the shell.
    """

    model_config = SettingsConfigDict(frozen=True, extra="forbid", case_sensitive=False, env_ignore_empty=True)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return (init_settings,)


class BrokerSettings(Settings):
    frontend: str = Field("tcp://*:5555", description="Endpoint the broker binds for edge clients.")
    backend: str = Field("tcp://*:5556", description="Endpoint the broker binds for workers.")
    heartbeat_interval_s: float = Field(1.0, gt=0, description="Seconds between heartbeats to each worker.")
    liveness: int = Field(3, ge=1, description="Heartbeat intervals of silence after which a worker is declared dead.")
    max_queue: int = Field(1000, ge=1, description="Jobs waiting for a worker, all clients together; beyond it jobs are answered BUSY.")
    max_queue_per_client: int = Field(200, ge=1, description="Jobs one client may have waiting; beyond it its jobs are answered BUSY.")
    max_queue_bytes: int = Field(32 << 20, ge=1024, description="Bytes of pixels waiting for a worker, all clients together; beyond it jobs are answered BUSY.")
    max_client_bytes: int = Field(4 << 20, ge=1024, description="Bytes of pixels one client may have waiting (at most max_queue_bytes); beyond it its jobs are answered BUSY.")
    max_clients: int = Field(256, ge=1, description="Clients the broker keeps state for; idle ones are forgotten first.")
    client_idle_s: float = Field(60.0, gt=0, description="Seconds after which a client with nothing pending may be forgotten.")
    max_workers: int = Field(256, ge=1, description="Workers the broker accepts at once.")
    max_message_bytes: int = Field(65536, ge=1024, description="Largest message accepted on either socket (ZMQ_MAXMSGSIZE), in bytes.")
    max_deadline_ms: int = Field(10000, ge=1, description="Longest deadline a job may ask for; longer ones are clamped, in milliseconds.")
    redispatch_min_ms: int = Field(20, ge=0, description="A lost worker's job is re-dispatched only if at least this many ms of its deadline remain.")
    secret_key: Path | None = Field(None, description="The broker's CURVE secret key file (fer-swarm keys generate broker); turns encryption on.")
    client_keys: Path | None = Field(None, description="Folder of public keys (*.key) of the edge clients allowed to connect.")
    worker_keys: Path | None = Field(None, description="Folder of public keys (*.key) of the workers allowed to connect.")
    insecure: bool = Field(False, description="Allow plaintext on a non-loopback endpoint (anyone on the network can read face crops).")
    drain_grace_s: float = Field(5.0, ge=0, le=600, description="On SIGTERM or Ctrl-C, seconds to wait for jobs already at workers before answering the rest and exiting; new jobs are answered BUSY meanwhile.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Serve Prometheus metrics over HTTP on this port (/metrics); 0 turns them off.")
    metrics_host: str = Field("127.0.0.1", description="Address the metrics port binds; loopback unless you open it on purpose (e.g. 0.0.0.0).")

    @model_validator(mode="after")
    def _queues(self):
        if self.max_queue_per_client > self.max_queue:
            raise ValueError("max_queue_per_client must not exceed max_queue")
        return self


class WorkerSettings(Settings):
    broker: str = Field("tcp://127.0.0.1:5556", description="The broker's backend endpoint to connect to.")
    threads: int = Field(1, ge=1, le=64, description="Inference threads, each with its own interpreter.")
    capacity: int = Field(0, ge=0, le=1024, description="Jobs the worker announces it can hold at once; 0 means 8 per thread. The broker sends only as many as the link needs (two per thread on a LAN, more over a slow link), up to this.")
    model: Path | None = Field(None, description="TFLite model file (sidecar beside it), or a shipped model's name: fer-res (the default, 41 MMAC per face) or fer-vgg (192 MMAC); unset for the default.")
    name: str = Field("", max_length=48, description="Worker name shown in logs and results; empty for HOST-PID.")
    heartbeat_interval_s: float = Field(1.0, gt=0, description="Seconds between heartbeats to the broker.")
    liveness: int = Field(3, ge=1, description="Heartbeat intervals of broker silence after which the worker reconnects.")
    reconnect_initial_s: float = Field(0.5, gt=0, description="First reconnect delay after losing the broker, in seconds.")
    reconnect_max_s: float = Field(16.0, gt=0, description="Longest reconnect delay (the delay doubles up to this), in seconds.")
    max_message_bytes: int = Field(65536, ge=1024, description="Largest message accepted from the broker (ZMQ_MAXMSGSIZE), in bytes.")
    service_time_ms: float = Field(0.0, ge=0, description="Pad every inference to at least this many ms, to simulate a slower device (benchmarks, tests); 0 for none.")
    echo: bool = Field(False, description="Answer every job without running the model: at once, or after service_time_ms to simulate a device (benchmarks).")
    echo_crop_px: int = Field(0, ge=0, le=4096, description="With echo: announce and take square crops of this size instead of the model's (benchmarks of the broker alone); 0 for the model's.")
    secret_key: Path | None = Field(None, description="This worker's CURVE secret key file (fer-swarm keys generate NAME); turns encryption on.")
    broker_key: Path | None = Field(None, description="The broker's public key file (broker.key), needed with secret_key.")
    insecure: bool = Field(False, description="Allow plaintext to a non-loopback broker (anyone on the network can read face crops).")
    drain_grace_s: float = Field(5.0, ge=0, le=600, description="On SIGTERM or Ctrl-C, seconds to finish and send the jobs in hand before leaving the broker (new ones are refused meanwhile).")
    metrics_port: int = Field(0, ge=0, le=65535, description="Serve Prometheus metrics over HTTP on this port (/metrics); 0 turns them off.")
    metrics_host: str = Field("127.0.0.1", description="Address the metrics port binds; loopback unless you open it on purpose (e.g. 0.0.0.0).")

    @model_validator(mode="after")
    def _echo_crop_needs_echo(self):
        if self.echo_crop_px and not self.echo:
            raise ValueError("echo_crop_px is for echo workers only (add --echo)")
        return self


class EdgeSettings(Settings):
    broker: str = Field("tcp://127.0.0.1:5555", description="The broker's frontend endpoint to connect to.")
    camera: int | None = Field(None, ge=0, description="Camera index to read frames from.")
    video: Path | None = Field(None, description="Video file to read frames from.")
    images: Path | None = Field(None, description="Folder of images to read as frames, in name order.")
    output: Path | None = Field(None, description="Write the annotated video here (headless).")
    events: Path | None = Field(None, description="Write one JSON line per face here (headless).")
    show: bool | None = Field(None, description="Show a window; default: only when no --output/--events is given.")
    stream: str = Field("", max_length=64,
                        description="Stream name in correlation ids, printable ASCII; empty for SOURCE-PID.")
    deadline_ms: int = Field(250, ge=1, le=600_000, description="Deadline of each face job, in milliseconds.")
    display_delay_ms: int = Field(150, ge=0, description="How long a frame waits for its labels before it is shown with what has arrived, in ms.")
    max_pending_frames: int = Field(8, ge=1, description="Frames held waiting for labels; the oldest is shown early beyond this.")
    max_faces: int = Field(8, ge=1, description="Faces per frame tracked and labelled (largest first).")
    detector: Literal["yunet", "haar"] = Field("yunet", description="Face detector: yunet (OpenCV's YuNet CNN, finds small, tilted and turned faces) or haar (OpenCV's frontal-face cascade).")
    detect_width_px: int | None = Field(None, ge=0, description="Detect faces on a copy scaled to this width (0: full size), in pixels; default 640 for yunet, 480 for haar. Crops are always cut at full size.")
    min_face_px: int | None = Field(None, ge=8, description="Smallest face kept, in frame pixels; default 24 for yunet, 48 for haar (smaller is slower for haar).")
    score_threshold: float = Field(0.4, gt=0, lt=1, description="YuNet: smallest detection score kept (lower finds more faces and more false ones).")
    nms_threshold: float = Field(0.3, gt=0, lt=1, description="YuNet: overlap (IoU) above which two detections are one face.")
    yunet_model: Path | None = Field(None, description="YuNet ONNX model file; unset for the one shipped in models/.")
    tracking: bool = Field(True, description="Follow each face over frames as a track, so its label is its answers over time; off: every frame's faces are labelled alone.")
    track_keep_ms: int = Field(500, ge=0, le=10_000, description="How long a track survives without a detection before its face counts as gone, in ms.")
    track_hold_ms: int = Field(250, ge=0, le=10_000, description="How long a missed track is still drawn at its predicted box, in ms (at most track_keep_ms).")
    smoothing: bool = Field(True, description="Show each track's label filtered over its answers (steady against one noisy answer); off: its latest answer.")
    label_memory_ms: int = Field(100, ge=0, le=60_000, description="Smoothing: time over which earlier answers fade from a track's label, in ms (longer is steadier and slower to follow a change).")
    label_switch_margin: float = Field(0.2, ge=0, lt=1, description="Smoothing: a track's label changes only when the new one leads it by this much smoothed probability (steadies faces between two expressions).")
    answer_weight: float = Field(1.0, gt=0, le=1, description="Smoothing: how much one answer counts against the track's belief, 1 taking the model's probabilities at face value.")
    relabel_ms: int = Field(60, ge=0, le=60_000, description="Send a track's crop for inference at most this often, in ms of video time (at once when a face is new, moved or resized a lot); 60: every other frame at 30 fps; 0: every face in every frame.")
    second_label_threshold: float = Field(0.25, ge=0, le=1, description="Show the second label too when its probability is at least this.")
    realtime: bool | None = Field(None, description="Read files at their own frame rate, dropping frames when behind; default: on for cameras only.")
    max_frames: int = Field(0, ge=0, description="Stop after this many frames; 0 for no limit.")
    connect_timeout_s: float = Field(10.0, gt=0, description="Seconds to wait for the broker to announce the pool's model.")
    secret_key: Path | None = Field(None, description="This edge client's CURVE secret key file (fer-swarm keys generate NAME); turns encryption on.")
    broker_key: Path | None = Field(None, description="The broker's public key file (broker.key), needed with secret_key.")
    insecure: bool = Field(False, description="Allow plaintext to a non-loopback broker (anyone on the network can read face crops).")
    metrics_port: int = Field(0, ge=0, le=65535, description="Serve Prometheus metrics over HTTP on this port (/metrics); 0 turns them off.")
    metrics_host: str = Field("127.0.0.1", description="Address the metrics port binds; loopback unless you open it on purpose (e.g. 0.0.0.0).")

    @model_validator(mode="after")
    def _hold_within_keep(self):
        if self.track_hold_ms > self.track_keep_ms:
            raise ValueError("track_hold_ms must not exceed track_keep_ms (a track is drawn only while it is kept)")
        return self

    @field_validator("stream")
    @classmethod
    def _stream_is_printable_ascii(cls, stream: str) -> str:
        if not all(" " <= ch <= "~" for ch in stream):
            raise ValueError("must be printable ASCII (the protocol's correlation ids carry it)")
        return stream

    @model_validator(mode="after")
    def _one_source(self):
        given = [n for n in ("camera", "video", "images") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give one source, not {' and '.join('--' + g for g in given)}")
        return self


class StatusSettings(Settings):
    broker: str = Field("tcp://127.0.0.1:5555", description="The broker's frontend endpoint (where edge clients connect).")
    interval_s: float = Field(1.0, gt=0, le=3600, description="Seconds between refreshes of the live table.")
    timeout_s: float = Field(5.0, gt=0, le=600, description="Seconds to wait for the broker's answer.")
    secret_key: Path | None = Field(None, description="A CURVE secret key file the broker lists among its clients (fer-swarm keys generate NAME); turns encryption on.")
    broker_key: Path | None = Field(None, description="The broker's public key file (broker.key), needed with secret_key.")
    insecure: bool = Field(False, description="Allow plaintext to a non-loopback broker.")


PROGRAMS: dict[str, type[Settings]] = {"broker": BrokerSettings, "worker": WorkerSettings, "edge": EdgeSettings,
                                       "status": StatusSettings}


def env_prefix(program: str) -> str:
    return f"{ENV_PREFIX}{program.upper()}_"


class _EnvironSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading a given mapping instead of ``os.environ``
    (names in any case, empty values unset, as Settings.model_config asks)."""

    def __init__(self, settings_cls: type[Settings], environ: Mapping[str, str], **kwargs: Any):
        self._environ = environ
        super().__init__(settings_cls, **kwargs)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name.lower(): value for name, value in self._environ.items() if value != ""}


def read_toml(model: type[Settings], path: Path) -> dict[str, Any]:
    """The keys of a TOML settings file, as written (unknown ones included, for :func:`load` to name)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file")
    try:
        return TomlConfigSettingsSource(model, toml_file=path)()
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e


def from_env(program: str, environ: Mapping[str, str]) -> dict[str, Any]:
    """``program``'s settings in the environment (``FER_SWARM_PROGRAM_KEY``, any case; empty ones unset).

    A variable with the program's prefix that names no setting is an error, not
    ignored: pydantic-settings skips it, and the operator would run the default
    while believing otherwise.
    """
    model = PROGRAMS[program]
    prefix = env_prefix(program)
    for name, value in environ.items():
        key = name[len(prefix):].lower()
        if name.upper().startswith(prefix) and value != "" and key not in model.model_fields:
            raise ConfigError(f"environment: unknown {program} setting {name}")
    return _EnvironSource(model, environ, env_prefix=prefix)()


def load(
    program: str,
    *,
    config_file: Path | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Read ``program``'s settings with precedence flag > environment > file > default, or raise
    ConfigError naming the key, where it came from, and what is wrong.

    The file and the environment are read by pydantic-settings' sources; the
    merge stays here so that a bad value can be traced to the source that set it.
    """
    model = PROGRAMS[program]
    environ = os.environ if environ is None else environ
    sources: list[tuple[str, Mapping[str, Any]]] = []  # lowest precedence first
    if config_file is not None:
        sources.append((str(config_file), read_toml(model, config_file)))
    sources.append(("environment", from_env(program, environ)))
    sources.append(("command line", {k: v for k, v in (flags or {}).items() if v is not None}))
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for where, values in sources:
        for key, value in values.items():
            if key not in model.model_fields:
                raise ConfigError(f"{where}: unknown {program} setting {_spell(program, key, where)}")
            merged[key] = value
            origin[key] = where
    try:
        return model.model_validate(merged)
    except ValidationError as e:
        first = e.errors()[0]
        msg = first["msg"].removeprefix("Value error, ")
        if not first["loc"]:  # a rule across keys: no one key or source to name
            raise ConfigError(f"{program} settings: {msg}") from None
        key = str(first["loc"][0])
        where = origin.get(key, "settings")
        raise ConfigError(f"{where}: {_spell(program, key, where, environ)}: {msg}") from None


def _spell(program: str, key: str, where: str, environ: Mapping[str, str] | None = None) -> str:
    """A key as the user wrote it in that source."""
    if where == "environment":
        wanted = env_prefix(program) + key.upper()
        return next((name for name in environ or {} if name.upper() == wanted), wanted)
    if where == "command line":
        return "--" + key.replace("_", "-")
    return repr(key)


def toml_template(program: str) -> str:
    """The commented TOML listing every setting with its default (configs/NAME.toml is this text)."""
    model = PROGRAMS[program]
    lines = [
        f"# fer-swarm {program} settings. Every key is optional; shown are the defaults.",
        f"# Precedence: command-line flag > environment ({env_prefix(program)}KEY) > this file > default.",
        f"# Use: fer-swarm {program} --config configs/{program}.toml",
        "",
    ]
    for name, field in model.model_fields.items():
        lines.append(f"# {field.description}")
        default = field.default
        if default is None:
            lines.append(f"# {name} =")
        else:
            lines.append(f"{name} = {_toml_value(default)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
