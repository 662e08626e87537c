"""The edge as a service: graceful stop on real signals, Prometheus metrics, progress, unsent jobs.

Real broker and worker (tests/swarm.py, the shipped model), real clips written
by OpenCV, the real ``fer-swarm edge`` process where the feature is about
processes. Nothing is faked. No rate or duration is asserted; every wait is
bounded and polls for its condition.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import cv2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fer_swarm import cli
from fer_swarm.config import EdgeSettings
from fer_swarm.edge.app import EdgeProgress, run_edge
from fer_swarm.edge.metrics import OUTCOMES, EdgeMetrics
from fer_swarm.edge.pipeline import UNSENT
from fer_swarm.errors import FerSwarmError
from fer_swarm.samples import sample_clip

from .conftest import run_on_terminal
from .swarm import BrokerThread, WorkerThread, free_port, wait_for, zmq_context

CLIP_FRAMES = 300  # 20 s at 15 fps read in real time: every signal lands mid-file


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory) -> Path:
    return sample_clip(tmp_path_factory.mktemp("clip") / "long.mp4", frames=CLIP_FRAMES, size=(320, 240),
                       faces=1, fps=15)


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory) -> Path:
    return sample_clip(tmp_path_factory.mktemp("clip") / "short.mp4", frames=20, size=(320, 240), faces=1, fps=15)


@pytest.fixture(scope="module")
def swarm():
    """A real broker and one real worker with the shipped model, for the whole module."""
    with zmq_context() as ctx:
        b = BrokerThread(ctx)
        w = WorkerThread(ctx, b.backend, name="ops-pi")
        try:
            assert wait_for(lambda: len(b.scheduler.workers) == 1, 20), "the worker did not register"
            yield b
        finally:
            w.stop()
            b.stop()


def edge_command(front: str, clip: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fer_swarm", "edge", "--broker", front, "--video", str(clip),
            "--output", str(tmp_path / "annotated.mp4"), "--events", str(tmp_path / "events.jsonl"),
            "--connect-timeout-s", "60", "--deadline-ms", "2000", "--display-delay-ms", "1000", *extra]


def event_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample at ``/metrics``, by (sample name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def video_frames(path: Path) -> int:
    """Frames actually decodable from ``path`` (not the header's count)."""
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), f"{path} is not a readable video"
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def printed_frames(stdout: str) -> int:
    match = re.search(r"frames\W+(\d+) in ", stdout)
    assert match, stdout
    return int(match.group(1))


# ---------------------------------------------------------------- graceful stop, real process, real signal


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_file_flushes_closes_the_files_and_prints_the_summary(sig, swarm, long_clip, tmp_path):
    port = free_port()
    events = tmp_path / "events.jsonl"
    command = edge_command(swarm.frontend, long_clip, tmp_path, "--realtime", "--metrics-port", str(port))
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        assert wait_for(lambda: len(event_lines(events)) >= 10 or proc.poll() is not None, 90, 0.1)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if sig == signal.SIGINT:  # scrape the live endpoint while the edge runs
            samples: dict = {}

            def labelled() -> bool:
                samples.update(scrape(port))
                return samples.get(("fer_swarm_edge_replies_total", (("outcome", "result"),)), 0) > 0

            assert wait_for(labelled, 30, 0.2), samples
            assert samples[("fer_swarm_edge_frames_total", ())] > 0
            assert samples[("fer_swarm_edge_crops_sent_total", ())] > 0
            assert samples[("fer_swarm_edge_reply_seconds_count", ())] > 0
            assert samples[("fer_swarm_edge_frame_seconds_count", ())] == samples[("fer_swarm_edge_frames_total", ())]
            assert samples[("fer_swarm_edge_faces_per_frame_count", ())] == samples[("fer_swarm_edge_frames_total", ())]
            assert ("fer_swarm_edge_fps", ()) in samples
            labels_of = lambda metric: [dict(labels) for name, labels in samples if name == metric]  # noqa: E731
            assert {lb["outcome"] for lb in labels_of("fer_swarm_edge_replies_total")} == set(OUTCOMES)
            buckets = {lb["le"] for lb in labels_of("fer_swarm_edge_faces_per_frame_bucket")}
            assert buckets == {"0.0", "1.0", "2.0", "3.0", "4.0", "6.0", "8.0", "16.0", "+Inf"}
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    assert f"edge summary (stopped by {sig.name})" in stdout and "stopped early" in stdout, stdout
    frames = printed_frames(stdout)
    # The video holds every frame shown, and is playable: its index was written on close.
    assert 0 < frames < CLIP_FRAMES and video_frames(tmp_path / "annotated.mp4") == frames
    records = [json.loads(line) for line in events.read_text().splitlines()]  # every line whole JSON
    assert events.read_text().endswith("\n")
    assert len({r["frame"] for r in records}) <= frames and max(r["frame"] for r in records) < CLIP_FRAMES - 1
    with pytest.raises(OSError):  # the metrics endpoint went with the process
        scrape(port)


def test_a_stop_lets_the_frames_in_hand_collect_their_labels(swarm, long_clip, tmp_path):
    """After a stop no frame is read, but those already sent wait (up to the display delay) for their
    answers instead of being shown unlabelled at once."""
    stop = threading.Event()

    def stop_after_ten(p: EdgeProgress) -> None:
        if p.frames == 10:
            stop.set()

    settings = EdgeSettings(broker=swarm.frontend, video=long_clip, output=tmp_path / "a.mp4",
                            events=tmp_path / "e.jsonl", connect_timeout_s=30, deadline_ms=10_000,
                            display_delay_ms=10_000, max_pending_frames=16, tracking=False, relabel_ms=0)
    with zmq_context() as ctx:
        summary = run_edge(settings, context=ctx, stop=stop, progress=stop_after_ten)
    assert summary.stopped and summary.frames == 10
    assert summary.faces >= 8 and summary.answered == summary.faces, summary.errors
    records = [json.loads(line) for line in settings.events.read_text().splitlines()]
    assert len(records) == summary.faces and all(r["raw_label"] and r["error"] is None for r in records)
    assert video_frames(settings.output) == 10


# ---------------------------------------------------------------- unsent jobs, metrics read in-process


def test_jobs_the_socket_will_not_take_are_counted_unsent_in_summary_events_and_metrics(tmp_path, capsys):
    # Every frame read (not real time), so however fast this machine is, the frames after the broker
    # goes outnumber the jobs the socket may hold.
    clip = sample_clip(tmp_path / "clip.mp4", frames=300, size=(320, 240), faces=1, fps=20)
    metrics = EdgeMetrics()
    value = metrics.registry.get_sample_value
    result: dict = {}
    with zmq_context() as ctx:
        b = BrokerThread(ctx)
        w = WorkerThread(ctx, b.backend, name="short-lived")
        try:
            assert wait_for(lambda: b.scheduler.workers, 20)
            settings = EdgeSettings(broker=b.frontend, video=clip, events=tmp_path / "e.jsonl", connect_timeout_s=30,
                                    deadline_ms=500, tracking=False, relabel_ms=0)
            edge = threading.Thread(target=lambda: result.update(summary=run_edge(settings, context=ctx,
                                                                                 metrics=metrics)))
            edge.start()
            assert wait_for(lambda: value("fer_swarm_edge_replies_total", {"outcome": "result"}) > 0, 60, 0.05)
            b.stop()  # the broker goes and does not come back: the socket's queue fills, then sends fail
            edge.join(60)
            assert not edge.is_alive()
        finally:
            w.stop()
    summary = result["summary"]
    records = [json.loads(line) for line in settings.events.read_text().splitlines()]
    assert summary.frames == 300 and summary.unsent > 0 and summary.crops_sent > 0
    assert sum(r["job_error"] == UNSENT for r in records) == summary.unsent
    assert value("fer_swarm_edge_replies_total", {"outcome": "unsent"}) == summary.unsent
    assert value("fer_swarm_edge_crops_sent_total") == summary.crops_sent
    assert value("fer_swarm_edge_frames_total") == summary.frames
    assert value("fer_swarm_edge_faces_per_frame_sum") == summary.faces
    assert value("fer_swarm_edge_replies_total", {"outcome": "result"}) >= sum(r["raw_label"] is not None
                                                                                for r in records) > 0
    cli._print_edge_summary(summary, "edge summary")
    assert f"{summary.unsent} crop(s) unsent" in capsys.readouterr().out


def test_a_metrics_port_in_use_is_a_clear_error(short_clip, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = EdgeSettings(video=short_clip, events=tmp_path / "e.jsonl", metrics_port=port, connect_timeout_s=1)
        with pytest.raises(FerSwarmError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            run_edge(settings)


# ---------------------------------------------------------------- progress


def test_no_progress_when_stderr_is_not_a_terminal(swarm, short_clip, tmp_path):
    res = subprocess.run(edge_command(swarm.frontend, short_clip, tmp_path), capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert printed_frames(res.stdout) == 20
    assert "/20 frames" not in res.stderr and "━" not in res.stderr and "\x1b[" not in res.stderr, res.stderr


def test_progress_on_a_terminal_shows_frames_of_the_total(swarm, short_clip, tmp_path):
    code, stdout, seen = run_on_terminal(*edge_command(swarm.frontend, short_clip, tmp_path)[3:], timeout=120)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen)  # colours and cursor moves
    assert code == 0, text[-3000:]
    assert re.search(r"\b\d+/20 frames\s+[\d.]+ fps\s+\d+ faces", text), text[-3000:]
    assert printed_frames(stdout) == 20


def test_an_endpoint_the_client_cannot_use_leaves_no_output_file_behind(tmp_path, short_clip):
    events = tmp_path / "events.jsonl"
    with pytest.raises(FerSwarmError):
        run_edge(EdgeSettings(broker="tcp://127.0.0.1", video=short_clip, events=events))  # no port
    assert not events.exists()
