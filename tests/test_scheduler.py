"""The broker's rules on their own (no sockets): credits, least-loaded, fairness, deadlines, bounds."""

import pytest

from fer_swarm import protocol as p
from fer_swarm.broker.scheduler import Scheduler
from fer_swarm.config import BrokerSettings

MODEL = p.ModelInfo(name="m", version="1", input_shape=(1, 48, 48, 1), labels=("a", "b"), width_px=48, height_px=48)


def job(stream: str, frame: int, deadline_ms: int = 1000, faces: int = 1) -> p.Job:
    return p.Job(ids=tuple(p.CorrelationId(stream=stream, frame=frame, face=i) for i in range(faces)),
                 deadline_ms=deadline_ms, width_px=48, height_px=48, payloads=(bytes(48 * 48),) * faces)


def answer(sent: p.Job, ms: float = 1.0) -> p.Result:
    """The RESULT a worker gives for ``sent``: every id, in order."""
    return p.Result(job=sent.job, model="m:1", worker="w", faces=tuple(
        p.FaceResult(id=i, label="a", probabilities={"a": 0.9, "b": 0.1}, inference_ms=ms) for i in sent.ids))


def ready(name: str, capacity: int, model: p.ModelInfo = MODEL) -> p.Ready:
    return p.Ready(worker=name, capacity=capacity, model=model)


@pytest.fixture
def sched():
    return Scheduler(BrokerSettings(max_queue=50, max_queue_per_client=20, max_clients=3))


def test_worker_never_gets_more_than_its_capacity(sched):
    sched.register(b"w", ready("w", 3), 0.0)
    for i in range(10):
        assert sched.submit(b"c", job("c", i), 0.0) == []
    sends, _ = sched.dispatch(0.0)
    assert len(sends) == 3 and len(sched.workers[b"w"].inflight) == 3
    assert sched.dispatch(0.0) == ([], [])
    assert sched.complete(b"w", answer(sends[0][1]), 0.0) is not None
    sends2, _ = sched.dispatch(0.0)
    assert len(sends2) == 1


def test_least_loaded_worker_goes_first(sched):
    sched.register(b"big", ready("big", 4), 0.0)
    sched.register(b"small", ready("small", 1), 0.0)
    for i in range(5):
        sched.submit(b"c", job("c", i), 0.0)
    sends, _ = sched.dispatch(0.0)
    # Both start empty; then the share of capacity in use decides: small fills at 1/1, big takes the rest.
    assert sorted(w for w, _ in sends).count(b"big") == 4
    assert sorted(w for w, _ in sends).count(b"small") == 1


def test_flooding_client_cannot_starve_another(sched):
    sched.register(b"w", ready("w", 1), 0.0)
    for i in range(20):
        sched.submit(b"flood", job("flood", i), 0.0)
    for i in range(3):
        sched.submit(b"polite", job("polite", i), 0.0)
    order = []
    for _ in range(6):
        (wid, sent), = sched.dispatch(0.0)[0]
        order.append(sent.ids[0].stream)
        sched.complete(wid, answer(sent), 0.0)
    assert order == ["flood", "polite"] * 3


def test_forwarded_job_carries_broker_id_and_remaining_deadline(sched):
    sched.register(b"w", ready("w", 1), 0.0)
    sched.submit(b"c", job("c", 1, deadline_ms=500), 10.0)
    (_, sent), = sched.dispatch(10.2)[0]
    assert sent.job is not None and sent.deadline_ms == 300


def test_queued_and_inflight_jobs_expire_once(sched):
    sched.register(b"w", ready("w", 1), 0.0)
    sched.submit(b"c", job("c", 1, deadline_ms=100), 0.0)
    sched.submit(b"c", job("c", 2, deadline_ms=100), 0.0)
    (_, sent), = sched.dispatch(0.0)[0]
    replies = sched.expire(0.2)
    assert sorted(r.ids[0].frame for _, r in replies) == [1, 2]
    assert all(isinstance(r, p.Expired) for _, r in replies)
    assert sched.expire(0.3) == []
    # The worker's late answer frees its credit but is not forwarded: the client already has its one reply.
    assert sched.complete(b"w", answer(sent), 0.0) is None
    assert len(sched.workers[b"w"].inflight) == 0


def test_full_queues_answer_busy(sched):
    for i in range(20):
        assert sched.submit(b"c", job("c", i), 0.0) == []
    (_, reply), = sched.submit(b"c", job("c", 99), 0.0)
    assert isinstance(reply, p.Busy) and "client" in reply.reason
    for i in range(30):
        sched.submit(b"d", job("d", i), 0.0) if i < 20 else sched.submit(b"e", job("e", i), 0.0)
    (_, reply), = sched.submit(b"e", job("e", 99), 0.0)
    assert isinstance(reply, p.Busy) and "broker queue" in reply.reason


def test_client_table_is_bounded_and_forgets_idle_clients_first(sched):
    sched.submit(b"busy", job("busy", 0), 0.0)  # keeps a queued job
    sched.client(b"idle1", 0.0)
    sched.client(b"idle2", 0.0)
    assert sched.client(b"new", 1.0) is not None  # idle1 forgotten
    assert b"idle1" not in sched.clients and b"busy" in sched.clients
    for i in range(3):
        sched.submit(b"new", job("new", i), 1.0)
        sched.submit(b"idle2", job("idle2", i), 1.0)
    (_, reply), = sched.submit(b"another", job("another", 0), 1.0)
    assert isinstance(reply, p.Busy) and "client table" in reply.reason
    assert len(sched.clients) == 3


def test_lost_worker_jobs_are_redispatched_once_then_error(sched):
    sched.register(b"w1", ready("w1", 2), 0.0)
    sched.submit(b"c", job("c", 1, deadline_ms=1000), 0.0)
    sched.submit(b"c", job("c", 2, deadline_ms=10), 0.0)
    sched.dispatch(0.0)
    replies = sched.remove_worker(b"w1", 0.005, "test")
    # frame 2 has 5 ms left (< redispatch_min_ms): ERROR now; frame 1 is queued again.
    assert [(r.ids[0].frame, type(r)) for _, r in replies] == [(2, p.Error)]
    sched.register(b"w2", ready("w2", 2), 0.0)
    (_, again), = sched.dispatch(0.01)[0]
    assert again.ids[0].frame == 1
    replies = sched.remove_worker(b"w2", 0.02, "test")
    assert [(r.ids[0].frame, type(r)) for _, r in replies] == [(1, p.Error)]


def test_worker_with_another_model_is_refused(sched):
    sched.register(b"w1", ready("w1", 1), 0.0)
    other = MODEL.model_copy(update={"labels": ("x", "y", "z")})
    assert "does not match" in sched.register(b"w2", ready("w2", 1, other), 0.0)


def test_silent_worker_is_reaped(sched):
    sched.register(b"w", ready("w", 1), 0.0)
    assert sched.reap_silent_workers(2.0) == []
    assert sched.reap_silent_workers(3.5) == [] and b"w" not in sched.workers


def test_dropped_client_leaves_no_turn_behind(sched):
    sched.register(b"w", ready("w", 1), 0.0)
    sched.submit(b"c", job("c", 1), 0.0)
    sched.drop_client(b"c")
    assert sched.queued == 0 and sched.dispatch(0.0) == ([], [])


def test_credits_count_jobs_and_every_reply_names_all_of_a_jobs_faces(sched):
    sched.register(b"w", ready("w", 2), 0.0)
    for frame in range(3):
        assert sched.submit(b"c", job("c", frame, deadline_ms=100, faces=4), 0.0) == []
    sends, _ = sched.dispatch(0.0)
    # Two frames of four faces each: credits are messages, so a 1-thread worker still holds the next frame.
    assert [len(j.ids) for _, j in sends] == [4, 4] and len(sched.workers[b"w"].inflight) == 2
    replies = sched.expire(0.2)  # one queued frame and two at the worker, all past their deadline
    assert sorted((r.ids[0].frame, len(r.ids)) for _, r in replies) == [(0, 4), (1, 4), (2, 4)]
    assert all(isinstance(r, p.Expired) for _, r in replies)
    big = Scheduler(BrokerSettings(max_queue=1, max_queue_per_client=1))
    big.submit(b"c", job("c", 0, faces=3), 0.0)
    (_, busy), = big.submit(b"c", job("c", 1, faces=3), 0.0)
    assert isinstance(busy, p.Busy) and [i.face for i in busy.ids] == [0, 1, 2]


def test_queued_pixels_are_bounded_in_bytes_and_accounted_back_to_zero():
    s = Scheduler(BrokerSettings(max_queue=100, max_queue_per_client=100, max_queue_bytes=10 * 2304))
    for frame in range(2):
        assert s.submit(b"c", job("c", frame, faces=4), 0.0) == []  # 8 crops of 2,304 bytes
    (_, busy), = s.submit(b"c", job("c", 2, faces=3), 0.0)  # 11 crops would not fit
    assert isinstance(busy, p.Busy) and "bytes" in busy.reason and len(busy.ids) == 3
    assert s.submit(b"c", job("c", 3, faces=2), 0.0) == [] and s.queued_bytes == 10 * 2304
    s.register(b"w", ready("w", 1), 0.0)
    s.dispatch(0.0)  # one JOB leaves the queue for the worker
    assert s.queued_bytes == 6 * 2304
    s.submit(b"d", job("d", 0, deadline_ms=10), 0.0)
    s.expire(0.05)  # d's JOB expires in the queue
    assert s.queued_bytes == 6 * 2304
    s.remove_worker(b"w", 0.06, "test")  # its JOB goes back to the queue
    assert s.queued_bytes == 10 * 2304
    s.drop_client(b"c")
    assert s.queued_bytes == 0 and s.queued == 0


def test_crops_of_another_size_than_the_pools_model_are_answered_error_at_once(sched):
    odd = p.Job(ids=(p.CorrelationId(stream="c", frame=0, face=0),), deadline_ms=1000, width_px=64, height_px=64,
                payloads=(bytes(64 * 64),))
    assert sched.submit(b"c", odd, 0.0) == []  # no worker yet: the pool's size is not known, so it waits
    sched.register(b"w", ready("w", 1), 0.0)
    (_, reply), = sched.submit(b"c", odd.model_copy(update={"ids": (p.CorrelationId(stream="c", frame=1, face=0),)}), 0.0)
    assert isinstance(reply, p.Error) and "64x64" in reply.reason and "48x48" in reply.reason
    assert sched.queued == 1


def test_a_forgotten_client_coming_back_is_not_charged_for_its_old_jobs(sched):
    sched.register(b"w", ready("w", 2), 0.0)
    sched.submit(b"c", job("c", 0), 0.0)
    (_, old), = sched.dispatch(0.0)[0]
    sched.drop_client(b"c")  # e.g. it stopped reading; the same identity then sends again
    sched.submit(b"c", job("c", 1), 0.1)
    (_, new), = sched.dispatch(0.1)[0]
    assert sched.complete(b"w", answer(old), 0.0) is None  # the old job's answer is late: its client was forgotten
    assert sched.clients[b"c"].inflight == 1 and not sched.clients[b"c"].idle
    assert sched.complete(b"w", answer(new), 0.0) is not None
    assert sched.clients[b"c"].inflight == 0


def measure(sched, wid: bytes, link_s: float, service_ms: float, jobs: int = 5, t: float = 0.0) -> float:
    """Run ``jobs`` one-face jobs through worker ``wid`` as if its link took ``link_s`` and the model
    ``service_ms``; returns the clock after the last."""
    for i in range(jobs):
        sched.submit(b"m", job("m", 10_000 + i, deadline_ms=10_000), t)
        (_, sent), = sched.dispatch(t)[0]
        t += link_s + service_ms / 1000
        assert sched.complete(wid, answer(sent, service_ms), t) is not None
    return t


def test_credits_cover_a_slow_links_round_trip_but_never_exceed_capacity():
    s = Scheduler(BrokerSettings())
    s.register(b"w", p.Ready(worker="w", capacity=16, threads=1, model=MODEL), 0.0)
    assert s.workers[b"w"].credits == 2  # nothing measured: two per thread, as on a fast link
    measure(s, b"w", link_s=0.0005, service_ms=2.0)
    assert s.workers[b"w"].credits == 2  # loopback: the round trip is a fraction of a job
    s.register(b"far", p.Ready(worker="far", capacity=16, threads=1, model=MODEL), 0.0)
    s.workers.pop(b"w")
    measure(s, b"far", link_s=0.100, service_ms=10.0)
    # 100 ms away at 10 ms a job: one running, ten crossing the link.
    assert s.workers[b"far"].credits == 11
    measure(s, b"far", link_s=0.100, service_ms=2.0, jobs=20)
    assert s.workers[b"far"].credits == 16  # capped by what the worker said it can hold


def test_a_job_no_worker_can_finish_in_time_is_answered_expired_at_once():
    s = Scheduler(BrokerSettings())
    s.register(b"far", p.Ready(worker="far", capacity=16, threads=1, model=MODEL), 0.0)
    t = measure(s, b"far", link_s=0.100, service_ms=2.0)
    assert s.submit(b"c", job("c", 1, deadline_ms=60), t) == []
    sends, replies = s.dispatch(t)
    assert sends == [] and len(replies) == 1
    (_, reply), = replies
    assert isinstance(reply, p.Expired) and "needs about 10" in reply.reason and s.counters.expired == 1
    assert s.submit(b"c", job("c", 2, deadline_ms=250), t) == []
    (_, sent), = s.dispatch(t)[0]  # 250 ms is enough for a 102 ms trip
    assert sent.ids[0].frame == 2


def test_a_reply_is_forwarded_only_with_exactly_its_jobs_ids(sched):
    sched.register(b"w", ready("w", 2), 0.0)
    sched.submit(b"c", job("c", 1, faces=2), 0.0)
    (_, sent), = sched.dispatch(0.0)[0]
    good = answer(sent)
    wrong = good.model_copy(update={"faces": (good.faces[0].model_copy(update={
        "id": p.CorrelationId(stream="c", frame=99, face=0)}), good.faces[1])})
    assert sched.complete(b"w", wrong, 0.0) is None
    assert sched.complete(b"w", good.model_copy(update={"faces": good.faces[:1]}), 0.0) is None  # one id short
    assert sched.complete(b"w", good.model_copy(update={"job": 12345}), 0.0) is None  # not a job it holds
    assert sched.workers[b"w"].wrong_replies == 3 and sched.counters.wrong_replies == 3
    assert sched.complete(b"w", good, 0.0) is not None  # the job stayed in flight for its true answer
    # An error reply naming no ids is about the job it names by number (a worker that could not read it).
    sched.submit(b"c", job("c", 2), 0.0)
    (_, sent), = sched.dispatch(0.0)[0]
    assert sched.complete(b"w", p.Error(ids=(), job=sent.job, reason="cannot read"), 0.0) is not None


def test_a_client_under_its_share_pushes_out_the_biggest_queues_newest_job():
    s = Scheduler(BrokerSettings(max_queue=10, max_queue_per_client=10))
    for i in range(10):
        assert s.submit(b"flood", job("flood", i), 0.0) == []
    replies = s.submit(b"polite", job("polite", 0), 0.0)
    assert [(who, type(r), r.ids[0].frame) for who, r in replies] == [(b"flood", p.Busy, 9)]
    assert len(s.clients[b"polite"].queue) == 1 and s.queued == 10
    # The flooder cannot take the place back: it already holds more than the polite client.
    (_, busy), = s.submit(b"flood", job("flood", 10), 0.0)
    assert isinstance(busy, p.Busy) and "broker queue is full" in busy.reason


def test_draining_refuses_new_jobs_and_workers_and_abandon_answers_the_rest(sched):
    sched.register(b"w", ready("w", 1), 0.0)
    sched.submit(b"c", job("c", 1), 0.0)
    sched.submit(b"c", job("c", 2), 0.0)
    sched.dispatch(0.0)
    sched.draining = True
    (_, busy), = sched.submit(b"c", job("c", 3), 0.0)
    assert isinstance(busy, p.Busy) and "shutting down" in busy.reason
    assert "shutting down" in sched.register(b"w2", ready("w2", 1), 0.0)
    replies = sched.abandon("broker shut down")
    assert sorted((r.ids[0].frame, type(r)) for _, r in replies) == [(1, p.Error), (2, p.Error)]
    assert sched.queued == 0 and sched.abandon("again") == []


def test_wrong_size_crops_queued_before_any_worker_are_answered_error_not_expired(sched):
    odd = p.Job(ids=(p.CorrelationId(stream="c", frame=0, face=0),), deadline_ms=1000, width_px=64, height_px=64,
                payloads=(bytes(64 * 64),))
    assert sched.submit(b"c", odd, 0.0) == []
    sched.register(b"w", ready("w", 1), 0.0)
    sends, replies = sched.dispatch(0.0)
    assert sends == [] and [type(r) for _, r in replies] == [p.Error] and "64x64" in replies[0][1].reason


def test_nobody_is_pushed_out_for_a_newcomer_that_would_be_refused_anyway():
    s = Scheduler(BrokerSettings(max_queue_bytes=9500, max_client_bytes=9500))
    for i in range(4):
        assert s.submit(b"a", job("a", i), 0.0) == []  # 4 x 2304 = 9216 bytes
    (who, reply), = s.submit(b"b", job("b", 0, faces=3), 0.0)  # 6912 bytes: pushing out a's jobs
    # down to b's share would not free enough, so b is refused and a keeps all four.
    assert who == b"b" and isinstance(reply, p.Busy) and "bytes" in reply.reason
    assert len(s.clients[b"a"].queue) == 4 and s.queued_bytes == 4 * 2304


def test_a_worker_answering_busy_is_paused_and_its_job_tried_elsewhere_once():
    s = Scheduler(BrokerSettings(heartbeat_interval_s=1.0))
    s.register(b"draining", ready("draining", 2), 0.0)
    s.submit(b"c", job("c", 1, deadline_ms=1000), 0.0)
    (_, sent), = s.dispatch(0.0)[0]
    busy = p.Busy(ids=sent.ids, job=sent.job, reason="worker draining")
    assert s.complete(b"draining", busy, 0.01) is None  # not forwarded: queued again
    assert s.queued == 1 and s.counters.redispatched == 1
    assert s.dispatch(0.02) == ([], [])  # the worker that said BUSY gets nothing for a heartbeat interval
    s.register(b"steady", ready("steady", 2), 0.02)
    (wid, again), = s.dispatch(0.03)[0]
    assert wid == b"steady" and again.ids == sent.ids
    # A second BUSY for the same job is its answer: it was already tried twice.
    assert s.complete(b"steady", p.Busy(ids=again.ids, job=again.job, reason="full"), 0.04) is not None


def test_a_clients_rate_falls_when_it_stops_sending():
    from fer_swarm.broker.scheduler import ClientState

    c = ClientState(b"c", 0.0)
    for i in range(60):  # 10 jobs a second for 6 s
        c.count_job(1.0 + i / 10)
    assert c.rate(6.95) == pytest.approx(10, rel=0.1)
    assert c.rate(60.0) < 1  # silent since: not its old 10 jobs/s
