"""The broker as an operator meets it: status, metrics, graceful drain, and what it does about bad workers.

Real brokers and workers (threads or processes) on 127.0.0.1; every wait is bounded and no
assertion is about speed: where a test needs "fast", it is a deadline the job must meet.
"""

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
import zmq

from fer_swarm import protocol as p
from fer_swarm.config import StatusSettings
from fer_swarm.errors import TransportError
from fer_swarm.status import StatusClient, check_line

from .swarm import BrokerThread, Client, WorkerProcess, WorkerThread, free_port, real_faces, wait_for, zmq_context


def _replies(client: Client, n: int, timeout_s: float) -> list[p.Message]:
    """Up to ``n`` job replies (late WELCOMEs to the repeated HELLOs of ``welcome()`` skipped)."""
    out: list[p.Message] = []
    end = time.monotonic() + timeout_s
    while len(out) < n and (left := end - time.monotonic()) > 0:
        msg = client.recv(left)
        if isinstance(msg, (p.Result, p.Expired, p.Busy, p.Error)):
            out.append(msg)
    return out


def _status(front: str) -> dict:
    with StatusClient(StatusSettings(broker=front, timeout_s=10)) as c:
        return c.fetch()


def test_status_report_names_workers_clients_queue_and_latency():
    with zmq_context() as ctx:
        broker = BrokerThread(ctx)
        worker = WorkerThread(ctx, broker.backend, name="pi-test")
        client = Client(ctx, broker.frontend, stream="cam-status")
        try:
            client.welcome(timeout_s=20)
            faces = real_faces(4)
            for frame in range(5):
                client.frame_job(frame, faces[:2])
            replies = _replies(client, 5, 20)
            assert [type(r) for r in replies] == [p.Result] * 5
            report = _status(broker.frontend)
        finally:
            client.close()
            worker.stop()
            broker.stop()
    (w,) = report["workers"]
    assert w["name"] == "pi-test" and w["host"] == "127.0.0.1" and w["model"] == "fer-res:1"
    assert w["done"] == 5 and w["in_flight"] == 0 and w["capacity"] >= w["credits"] >= 1
    assert w["service_ms"] > 0 and w["link_ms"] >= 0 and w["heartbeat_age_s"] < 30
    (c,) = [c for c in report["clients"] if c["stream"] == "cam-status"]
    assert (c["received"], c["results"], c["busy"], c["expired"], c["errors"]) == (5, 5, 0, 0, 0)
    assert report["queue"]["jobs"] == 0 and report["counters"]["results"] == 5
    lat = report["latency_ms"]
    assert lat["jobs"] == 5 and 0 <= lat["queue"]["p50"] <= lat["total"]["p50"]
    assert lat["compute"]["p99"] <= lat["total"]["p99"]
    assert report["broker"]["protocol"] == "fer-swarm/3" and report["broker"]["draining"] is False
    healthy, line = check_line(report, "tcp://x")
    assert healthy and "1 worker(s)" in line


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fer_swarm", *args], capture_output=True, text=True, timeout=timeout)


def test_status_command_check_and_json_for_probes():
    with zmq_context() as ctx:
        broker = BrokerThread(ctx)
        try:
            res = _cli("status", "--broker", broker.frontend, "--check")
            assert res.returncode == 1 and "no worker is registered" in res.stdout, res.stdout + res.stderr
            worker = WorkerThread(ctx, broker.backend, echo=True)
            try:
                assert wait_for(lambda: len(broker.scheduler.workers) == 1, 20)
                res = _cli("status", "--broker", broker.frontend, "--check")
                assert res.returncode == 0 and res.stdout.startswith("ok:"), res.stdout + res.stderr
                res = _cli("status", "--broker", broker.frontend, "--json")
                assert res.returncode == 0, res.stderr
                report = json.loads(res.stdout)
                assert {"workers", "clients", "queue", "counters"} <= set(report) and len(report["workers"]) == 1
            finally:
                worker.stop()
        finally:
            broker.stop()
    nobody = f"tcp://127.0.0.1:{free_port()}"
    res = _cli("status", "--broker", nobody, "--check", "--timeout-s", "1")
    assert res.returncode == 1 and "no broker answered" in res.stdout and "nothing accepted a connection" in res.stdout


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_prometheus_metrics_count_jobs_by_outcome_and_time_them():
    port = free_port()
    with zmq_context() as ctx:
        broker = BrokerThread(ctx, metrics_port=port)
        worker = WorkerThread(ctx, broker.backend, echo=True)
        client = Client(ctx, broker.frontend)
        try:
            client.welcome(timeout_s=20)
            for frame in range(4):
                client.job(frame)
            client.send(p.Job(ids=(p.CorrelationId(stream="x", frame=0, face=0),), deadline_ms=1000, width_px=8,
                              height_px=8, payloads=(bytes(64),)))  # wrong size: ERROR
            assert len(_replies(client, 5, 20)) == 5
            assert broker.broker.metrics_port == port
            m = {}
            assert wait_for(lambda: (m.update(_scrape(port)) or m)["fer_swarm_broker_workers"] == 1, 5)
        finally:
            client.close()
            worker.stop()
            broker.stop()
    assert m['fer_swarm_broker_jobs_total{outcome="result"}'] == 4
    assert m['fer_swarm_broker_jobs_total{outcome="error"}'] == 1
    assert m["fer_swarm_broker_jobs_received_total"] == 5
    assert m["fer_swarm_broker_job_seconds_count"] == 4 and m["fer_swarm_broker_compute_seconds_sum"] > 0
    assert m["fer_swarm_broker_queue_jobs"] == 0 and m["fer_swarm_broker_draining"] == 0
    assert not any(k.startswith(("python_", "process_")) for k in m)  # its own registry, not the global one


def test_broker_drains_on_sigterm_every_job_gets_one_reply():
    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    broker = subprocess.Popen([sys.executable, "-m", "fer_swarm", "broker", "--frontend", front, "--backend", back,
                               "--drain-grace-s", "20"], stderr=subprocess.PIPE, text=True)
    with zmq_context() as ctx:
        # An echo worker taking 1.5 s a job, two jobs at once: the broker has work in hand when told to stop.
        worker = WorkerThread(ctx, back, echo=True, service_time_ms=1500, threads=2, heartbeat_interval_s=1.0)
        client = Client(ctx, front)
        try:
            client.welcome(timeout_s=30)
            held = [client.job(frame, deadline_ms=30_000) for frame in range(2)]
            assert wait_for(lambda: _status(front)["queue"]["in_flight"] == 2, 20)
            broker.send_signal(signal.SIGTERM)
            assert wait_for(lambda: _status(front)["broker"]["draining"], 10)
            late = client.job(99, deadline_ms=30_000)
            replies = _replies(client, 3, 30)
            assert broker.wait(30) == 0, broker.stderr.read()
        finally:
            client.close()
            worker.stop()
            if broker.poll() is None:
                broker.kill()
    assert len(replies) == 3, replies
    answers = {(r.ids[0] if not isinstance(r, p.Result) else r.faces[0].id).frame: r for r in replies}
    assert [type(answers[i.frame]) for i in held] == [p.Result, p.Result]
    assert isinstance(answers[late.frame], p.Busy) and "shutting down" in answers[late.frame].reason


def test_broker_gives_up_at_its_grace_and_answers_what_is_left():
    with zmq_context() as ctx:
        broker = BrokerThread(ctx, drain_grace_s=0.5, heartbeat_interval_s=1.0)
        worker = WorkerThread(ctx, broker.backend, echo=True, service_time_ms=5000, heartbeat_interval_s=1.0)
        client = Client(ctx, broker.frontend)
        try:
            client.welcome(timeout_s=20)
            client.job(1, deadline_ms=30_000)
            assert wait_for(lambda: broker.scheduler.inflight == 1, 10)
            broker.stop(drain=True)
            (reply,) = _replies(client, 1, 10)
        finally:
            client.close()
            worker.stop()
    assert isinstance(reply, p.Error) and "shut down" in reply.reason


def test_a_worker_answering_with_ids_it_was_not_given_is_dropped_then_disconnected():
    with zmq_context() as ctx:
        broker = BrokerThread(ctx, heartbeat_interval_s=1.0)
        fake = ctx.socket(zmq.DEALER)
        fake.linger = 0
        fake.connect(broker.backend)
        model = p.ModelInfo(name="m", version="1", input_shape=(1, 48, 48, 1), labels=("a", "b"), width_px=48,
                            height_px=48)
        fake.send_multipart(p.encode(p.Ready(worker="liar", capacity=4, model=model)))
        client = Client(ctx, broker.frontend)
        try:
            client.welcome(timeout_s=10)
            for frame in range(3):
                client.job(frame, deadline_ms=2000)
            jobs, disconnect = [], None
            end = time.monotonic() + 10
            while time.monotonic() < end and disconnect is None:
                if not fake.poll(200):
                    continue
                msg = p.decode(fake.recv_multipart())
                if isinstance(msg, p.Job):
                    jobs.append(msg)
                    other = p.CorrelationId(stream="someone-else", frame=msg.ids[0].frame, face=7)
                    fake.send_multipart(p.encode(p.Result(job=msg.job, model="m:1", worker="liar", faces=(
                        p.FaceResult(id=other, label="a", probabilities={"a": 1.0, "b": 0.0}, inference_ms=1.0),))))
                elif isinstance(msg, p.Disconnect):
                    disconnect = msg
            replies = _replies(client, 3, 10)
        finally:
            client.close()
            fake.close(0)
            counters = broker.scheduler.counters
            broker.stop()
    assert len(jobs) == 3 and disconnect is not None and "do not match" in disconnect.reason
    assert counters.wrong_replies == 3
    # No wrong label reached the client: each job got one reply, and none is a RESULT.
    assert sorted(r.ids[0].frame for r in replies) == [0, 1, 2]
    assert not any(isinstance(r, p.Result) for r in replies)


def test_a_killed_workers_job_is_sent_again_long_before_the_next_heartbeat():
    # Heartbeats every 30 s (a worker is declared silent after 90 s); the job's deadline is 4 s. Only the
    # transport's own news of the dropped connection can save it.
    with zmq_context() as ctx:
        broker = BrokerThread(ctx, heartbeat_interval_s=30.0, liveness=3)
        doomed = WorkerProcess(broker.backend, "--echo", "--service-time-ms", "60000", "--heartbeat-interval-s", "30")
        client = Client(ctx, broker.frontend)
        spare = None
        try:
            client.welcome(timeout_s=30)
            assert wait_for(lambda: len(broker.scheduler.workers) == 1, 30)
            sent = client.job(1, crop=np.full((48, 48), 7, np.uint8), deadline_ms=4000)
            assert wait_for(lambda: broker.scheduler.inflight == 1, 5)
            spare = WorkerThread(ctx, broker.backend, echo=True, heartbeat_interval_s=30.0)
            assert wait_for(lambda: len(broker.scheduler.workers) == 2, 10)
            doomed.kill()
            (reply,) = _replies(client, 1, 10)
        finally:
            client.close()
            doomed.stop()
            if spare:
                spare.stop()
            broker.stop()
    assert isinstance(reply, p.Result) and reply.faces[0].id == sent, reply
    assert broker.scheduler.counters.redispatched == 1


def test_status_names_a_broker_of_another_protocol_version():
    with zmq_context() as ctx:
        other = ctx.socket(zmq.ROUTER)  # stands for a broker one version ahead: it answers in its own tag
        other.linger = 0
        port = other.bind_to_random_port("tcp://127.0.0.1")

        def answer():
            if other.poll(20_000):
                identity = other.recv_multipart()[0]
                other.send_multipart([identity, b"fer-swarm/4", b"ERROR", b'{"ids":[],"reason":"version"}'])

        replier = threading.Thread(target=answer)
        replier.start()
        try:
            with StatusClient(StatusSettings(broker=f"tcp://127.0.0.1:{port}", timeout_s=20), ctx) as client:
                with pytest.raises(TransportError, match="speaks fer-swarm/4, this tool fer-swarm/3"):
                    client.fetch()
        finally:
            replier.join(30)
            other.close(0)
