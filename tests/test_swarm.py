"""Broker and workers over real ZeroMQ sockets on 127.0.0.1, with the real model in the real runtime."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
import zmq

from fer_swarm import protocol as p
from fer_swarm.model import Classifier

from .swarm import MODEL, BrokerThread, Client, WorkerProcess, WorkerThread, free_port, real_faces, wait_for, zmq_context


@pytest.fixture
def ctx():
    with zmq_context() as c:
        yield c


@pytest.fixture
def broker(ctx):
    b = BrokerThread(ctx)
    yield b
    b.stop()


def one_reply_each(replies: list[p.Message], sent: list[p.CorrelationId]) -> dict:
    """Assert the invariant: exactly one terminal reply for each face sent; return the replies by face id."""
    ids = Counter(i for r in replies for i in r.ids)
    assert set(ids) == set(sent), f"missing {set(sent) - set(ids)}, unexpected {set(ids) - set(sent)}"
    assert all(n == 1 for n in ids.values()), [i for i, n in ids.items() if n > 1]
    return {i: r for r in replies for i in r.ids}


def face(result: p.Result, id: p.CorrelationId) -> p.FaceResult:
    return next(f for f in result.faces if f.id == id)


class ScriptedWorker:
    """A DEALER the test drives by hand, to watch exactly what the broker hands a worker."""

    def __init__(self, ctx, backend, capacity):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(backend)
        info = p.ModelInfo(name="m", version="1", input_shape=(1, 48, 48, 1),
                           labels=Classifier(MODEL).labels, width_px=48, height_px=48)
        self.sock.send_multipart(p.encode(p.Ready(worker="scripted", capacity=capacity, model=info)))

    def jobs(self, wait_s: float) -> list[p.Job]:
        out, end = [], time.monotonic() + wait_s
        while (left := end - time.monotonic()) > 0 and self.sock.poll(left * 1000):
            msg = p.decode(self.sock.recv_multipart())
            if isinstance(msg, p.Job):
                out.append(msg)
            else:
                self.sock.send_multipart(p.encode(p.Heartbeat()))
        return out

    def answer(self, job: p.Job) -> None:
        faces = tuple(p.FaceResult(id=i, label="happy", probabilities={"happy": 0.9, "sad": 0.1}, inference_ms=0.1)
                      for i in job.ids)
        self.sock.send_multipart(p.encode(p.Result(job=job.job, model="m:1", worker="scripted", faces=faces)))


def test_results_carry_label_probabilities_model_worker_and_time(ctx, broker):
    w = WorkerThread(ctx, broker.backend, threads=2, name="pi-1")
    c = Client(ctx, broker.frontend)
    try:
        welcome = c.welcome()
        assert welcome.workers == 1 and welcome.model.width_px == 48
        clf = Classifier(MODEL)
        crops = real_faces(12)
        # Frames of 1, 4 and 7 faces: a JOB's crops are split across the worker's two threads and gathered again.
        sent: list[p.CorrelationId] = []
        for frame, (start, stop) in enumerate([(0, 1), (1, 5), (5, 12)]):
            sent += c.frame_job(frame, crops[start:stop])
        replies = c.collect(3)
        by_id = one_reply_each(replies, sent)
        assert sorted(len(r.faces) for r in replies) == [1, 4, 7]
        for i, cid in enumerate(sent):
            r = by_id[cid]
            assert isinstance(r, p.Result), r
            f = face(r, cid)
            expected = clf.predict(crops[i])
            assert f.label == clf.labels[int(np.argmax(expected))]
            assert f.probabilities[f.label] == pytest.approx(float(expected.max()), abs=1e-4)
            assert set(f.probabilities) == set(clf.labels)
            assert abs(sum(f.probabilities.values()) - 1) < 0.02
            assert r.worker == "pi-1" and r.model == clf.card.model_id and f.inference_ms > 0
    finally:
        c.close()
        w.stop()


def test_broker_never_exceeds_announced_credit(ctx, broker):
    w = ScriptedWorker(ctx, broker.backend, capacity=2)
    c = Client(ctx, broker.frontend)
    try:
        c.welcome()
        for i in range(8):
            c.job(i)
        first = w.jobs(0.5)
        assert len(first) == 2
        w.answer(first[0])
        more = w.jobs(0.5)
        assert len(more) == 1
        assert max(len(x.inflight) for x in broker.scheduler.workers.values()) == 2
    finally:
        c.close()
        w.sock.close(0)


def test_slow_and_fast_worker_replies_are_matched(ctx, broker):
    slow = WorkerThread(ctx, broker.backend, name="slow", service_time_ms=60)
    fast = WorkerThread(ctx, broker.backend, name="fast")
    c = Client(ctx, broker.frontend)
    try:
        assert wait_for(lambda: len(broker.scheduler.workers) == 2)
        clf = Classifier(MODEL)
        crops = real_faces(20)
        sent = [c.job(frame=i // 4, face=i % 4, crop=crop) for i, crop in enumerate(crops)]
        replies = c.collect(len(sent))
        by_id = one_reply_each(replies, sent)
        assert [r.ids[0] for r in replies] != sent, "the slow worker should have reordered the replies"
        assert {r.worker for r in replies} == {"slow", "fast"}
        for cid, crop in zip(sent, crops):
            assert face(by_id[cid], cid).label == clf.labels[int(np.argmax(clf.predict(crop)))]
    finally:
        c.close()
        slow.stop()
        fast.stop()


def test_worker_killed_mid_stream_loses_no_job(ctx, broker):
    victim = WorkerProcess(broker.backend, "--name", "victim", "--service-time-ms", "40", "--threads", "2")
    survivor = WorkerProcess(broker.backend, "--name", "survivor", "--service-time-ms", "10")
    c = Client(ctx, broker.frontend)
    try:
        assert wait_for(lambda: len(broker.scheduler.workers) == 2, timeout_s=30)
        sent = [c.job(i, deadline_ms=8000) for i in range(40)]
        replies = c.collect(3)
        victim.kill()
        replies += c.collect(len(sent) - len(replies), timeout_s=15)
        by_id = one_reply_each(replies, sent)
        assert all(isinstance(r, p.Result) for r in by_id.values()), Counter(type(r).__name__ for r in replies)
        assert broker.scheduler.counters.redispatched >= 1
        assert {r.worker for r in replies} >= {"survivor"}
    finally:
        c.close()
        victim.stop()
        survivor.stop()


def test_deadline_expiry_queued_and_in_flight(ctx, broker):
    c = Client(ctx, broker.frontend)
    try:
        queued = c.job(1, deadline_ms=100)  # no worker yet: expires in the queue
        t0 = time.monotonic()
        r = c.recv(2)
        assert isinstance(r, p.Expired) and r.ids == (queued,) and "queued" in r.reason
        assert time.monotonic() - t0 > 0.08  # not before its deadline; how soon after is the machine's business
        w = ScriptedWorker(ctx, broker.backend, capacity=1)
        assert wait_for(lambda: broker.scheduler.workers)
        held = c.job(2, deadline_ms=150)
        (job,) = w.jobs(0.3)
        r = c.recv(2)
        assert isinstance(r, p.Expired) and r.ids == (held,) and "worker" in r.reason
        w.answer(job)  # too late: must not reach the client as a second reply
        assert c.recv(0.3) is None
        w.sock.close(0)
    finally:
        c.close()


def test_busy_when_the_queue_is_full(ctx):
    b = BrokerThread(ctx, max_queue=10, max_queue_per_client=10)
    c = Client(ctx, b.frontend)
    try:
        sent = [c.job(i, deadline_ms=300) for i in range(30)]
        by_id = one_reply_each(c.collect(30, timeout_s=5), sent)
        kinds = Counter(type(r).__name__ for r in by_id.values())
        assert kinds == {"Busy": 20, "Expired": 10}
    finally:
        c.close()
        b.stop()


def test_broker_restart_is_survived_by_workers_and_clients(ctx):
    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    b = BrokerThread(ctx, front, back)
    w = WorkerThread(ctx, back, name="steady")
    c = Client(ctx, front)
    try:
        c.welcome()
        c.job(1)
        assert isinstance(c.recv(5), p.Result)
        b.stop()
        b = BrokerThread(ctx, front, back)
        assert wait_for(lambda: len(b.scheduler.workers) == 1, timeout_s=10), "worker did not re-register"
        sent = [c.job(i) for i in range(10, 15)]
        by_id = one_reply_each(c.collect(5, timeout_s=10), sent)
        assert all(isinstance(r, p.Result) for r in by_id.values())
        assert w.worker.registrations >= 2
    finally:
        c.close()
        w.stop()
        b.stop()


def test_malformed_client_messages_get_errors_and_broker_lives(ctx, broker):
    w = WorkerThread(ctx, broker.backend)
    c = Client(ctx, broker.frontend)
    try:
        c.welcome()
        c.send_raw([p.PROTOCOL_TAG, b"JOB", b"{not json"])
        c.send_raw([b"fer-swarm/1", b"JOB", b"{}"])
        c.send_raw([b"\xff\xfe", b"\x00"])
        ids = (p.CorrelationId(stream="s", frame=9, face=0), p.CorrelationId(stream="s", frame=9, face=1))
        bad_size = p.encode(p.Job(ids=ids, deadline_ms=500, width_px=2, height_px=2, payloads=(b"1234", b"5678")))
        bad_size[-1] = b"123"
        c.send_raw(bad_size)
        c.send(p.Result(model="m:1", worker="w", faces=(p.FaceResult(
            id=ids[0], label="a", probabilities={"a": 1.0, "b": 0.0}, inference_ms=1.0),)))
        errors = c.collect(5, timeout_s=3)
        assert len(errors) == 5 and all(isinstance(e, p.Error) for e in errors)
        assert any(e.ids == ids and "payload 1" in e.reason for e in errors)
        assert any("version" in e.reason for e in errors)
        cid = c.job(1)
        (r,) = c.collect(1)
        assert isinstance(r, p.Result) and r.ids == (cid,)
    finally:
        c.close()
        w.stop()


def test_a_failing_inference_answers_the_whole_job_error_and_the_threads_live_on(ctx, broker):
    w = WorkerThread(ctx, broker.backend, threads=2, name="flaky")
    c = Client(ctx, broker.frontend)
    try:
        c.welcome()
        clfs = w.worker.pool._classifiers

        def fail(crop):
            raise RuntimeError("delegate exploded: " + "x" * 2000)  # longer than a reason may be

        for clf in clfs:
            clf.predict = fail
        ids = c.frame_job(1, real_faces(4))  # split over both threads, both fail
        (r,) = c.collect(1)
        assert isinstance(r, p.Error) and r.ids == ids and "delegate exploded" in r.reason
        assert len(r.reason) <= p.MAX_REASON_CHARS
        for clf in clfs:
            del clf.predict  # the class's own method again
        ids = c.frame_job(2, real_faces(4))
        (r,) = c.collect(1)
        assert isinstance(r, p.Result) and r.ids == ids
    finally:
        c.close()
        w.stop()


def test_a_job_naming_the_largest_ids_gets_its_reply_and_the_broker_lives(ctx, broker):
    c = Client(ctx, broker.frontend, stream='"\\' * 32)  # JSON escapes every character: the widest stream
    try:
        ids = tuple(p.CorrelationId(stream=c.stream, frame=p.MAX_INT, face=p.MAX_INT - i) for i in range(p.MAX_CROPS))
        c.send(p.Job(ids=ids, deadline_ms=50, width_px=1, height_px=1, payloads=(b"x",) * p.MAX_CROPS))
        r = c.recv(3)  # no worker: it expires in the queue, and the EXPIRED names all sixteen ids
        assert isinstance(r, p.Expired) and r.ids == ids
        c.send_raw([p.PROTOCOL_TAG, b"JOB", b'{"ids":[{"stream":"s","frame":%d,"face":0}],"deadline_ms":50,'
                    b'"width_px":1,"height_px":1}' % (p.MAX_INT + 1), b"x"])
        r = c.recv(3)
        assert isinstance(r, p.Error) and "frame" in r.reason
        assert broker.thread.is_alive()
    finally:
        c.close()


def test_worker_answers_malformed_and_wrong_size_jobs_and_lives(ctx):
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    w = WorkerThread(ctx, f"tcp://127.0.0.1:{port}", heartbeat_interval_s=1.0)
    try:
        assert router.poll(5000)
        ident, ready = p.decode_routed(router.recv_multipart())
        assert isinstance(ready, p.Ready) and (ready.capacity, ready.threads) == (8, 1) and ready.model.width_px == 48

        def roundtrip(frames):
            router.send_multipart([ident, *frames])
            while router.poll(3000):
                _, msg = p.decode_routed(router.recv_multipart())
                if not isinstance(msg, p.Heartbeat):
                    return msg
            raise AssertionError("no reply from worker")

        cid = p.CorrelationId(stream="s", frame=1, face=0)
        r = roundtrip([p.PROTOCOL_TAG, b"JOB", b'{"ids": [{"stream": "s", "frame": 1, "face": 0}], "deadline_ms": "soon"}', b"x"])
        assert isinstance(r, p.Error) and r.ids == (cid,)
        small = np.zeros((32, 32), np.uint8)
        r = roundtrip(p.encode(p.Job(ids=(cid,), job=5, deadline_ms=1000, width_px=32, height_px=32,
                                     payloads=(small.tobytes(),))))
        assert isinstance(r, p.Error) and "32x32" in r.reason and r.job == 5 and r.ids == (cid,)
        two = (cid, p.CorrelationId(stream="s", frame=1, face=1))
        r = roundtrip(p.encode(p.Job(ids=two, job=6, deadline_ms=1000, width_px=48, height_px=48,
                                     payloads=(bytes(2304), bytes(2304)))))
        assert isinstance(r, p.Result) and r.job == 6 and r.ids == two
    finally:
        w.stop()
        router.close(0)


def test_broker_imports_neither_opencv_nor_a_model_runtime():
    import subprocess
    import sys

    code = ("import sys, fer_swarm.broker, fer_swarm.cli; "
            "bad = [m for m in ('cv2', 'ai_edge_litert', 'tflite_runtime', 'tensorflow', 'numpy') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
