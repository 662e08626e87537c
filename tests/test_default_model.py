"""The default model in a real worker behind a real broker, answering real FER2013 faces."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from fer_swarm import datasets
from fer_swarm import protocol as p
from fer_swarm.config import StatusSettings
from fer_swarm.errors import ModelError
from fer_swarm.model import DEFAULT_MODEL, Classifier, load_card
from fer_swarm.modelstats import model_stats
from fer_swarm.status import StatusClient

from .conftest import FER2013
from .swarm import BrokerThread, Client, WorkerThread, zmq_context

PER_CLASS = 15


@pytest.fixture(scope="module")
def val_faces():
    """The first PER_CLASS validation faces of each class, as the edge would send them (48x48 gray)."""
    if not (FER2013 / "val").is_dir():
        pytest.skip("FER2013 folder absent")
    card = load_card(DEFAULT_MODEL)
    folders = datasets.scan(FER2013 / "val")
    folders = dataclasses.replace(folders, files={c: tuple(sorted(f)[:PER_CLASS]) for c, f in folders.files.items()})
    data = datasets.load_gray(folders, (card.preprocessing.width_px, card.preprocessing.height_px), classes=card.labels)
    return data.images, data.labels


def test_default_model_in_a_worker_answers_real_faces(val_faces):
    images, labels = val_faces
    clf = Classifier(DEFAULT_MODEL)
    with zmq_context() as ctx:
        broker = BrokerThread(ctx)
        worker = WorkerThread(ctx, broker.backend, threads=2, name="pi-default")  # no --model: the default
        client = Client(ctx, broker.frontend)
        try:
            welcome = client.welcome()
            assert (welcome.model.name, welcome.model.version) == (clf.card.name, clf.card.version)
            sent = [client.frame_job(i, [img])[0] for i, img in enumerate(images)]
            replies = client.collect(len(sent), timeout_s=60)
        finally:
            client.close()
            worker.stop()
            broker.stop()
    answers = {f.id: f for r in replies if isinstance(r, p.Result) for f in r.faces}
    assert set(answers) == set(sent)
    predicted = np.array([clf.labels.index(answers[cid].label) for cid in sent])
    # The worker answers exactly what the model answers in-process ...
    assert (predicted == np.argmax(clf.predict_many(images), axis=1)).all()
    # ... and that is right far more often than chance (1/7) on faces it never trained on.
    assert (predicted == labels).mean() >= 0.5
    assert all(r.model == clf.card.model_id for r in replies)


def test_shipped_models_are_found_by_name_and_the_default_is_the_small_one():
    assert Classifier("fer-vgg").card.name == "fer-vgg"
    assert load_card("fer-res").name == "fer-res"
    assert load_card(DEFAULT_MODEL).name == "fer-res"
    # Counted from the graphs (the budget: at most 48 MMAC per face; fer-vgg costs 192).
    assert model_stats(DEFAULT_MODEL).mmac_per_face <= 48 < model_stats(Classifier("fer-vgg").path).mmac_per_face
    with pytest.raises(ModelError, match="not found, nor a shipped model"):
        load_card("fer-nothing")
    # A name with a suffix or a folder is a path: a missing run export is an error, not the shipped namesake.
    with pytest.raises(ModelError, match="^runs/x/fer-res.tflite: model file not found$"):
        load_card("runs/x/fer-res.tflite")


def test_a_pool_of_both_shipped_models_serves_every_job_and_each_answer_names_its_model(val_faces):
    """Mixed pools are allowed (models/README.md): same labels, input size and framing."""
    images, _ = val_faces
    with zmq_context() as ctx:
        broker = BrokerThread(ctx)
        small = WorkerThread(ctx, broker.backend, threads=1, name="pi-small")
        accurate = WorkerThread(ctx, broker.backend, threads=1, name="pi-accurate", model="fer-vgg")
        client = Client(ctx, broker.frontend)
        try:
            client.welcome()
            deadline = time.monotonic() + 20
            while len(_status(broker.frontend)["workers"]) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            workers = {w["name"]: w["model"] for w in _status(broker.frontend)["workers"]}
            sent = [client.frame_job(i, [img])[0] for i, img in enumerate(images[:40])]
            replies = client.collect(len(sent), timeout_s=60)
        finally:
            client.close()
            small.stop()
            accurate.stop()
            broker.stop()
    assert workers == {"pi-small": "fer-res:1", "pi-accurate": "fer-vgg:1"}
    results = [r for r in replies if isinstance(r, p.Result)]
    assert sorted((f.id for r in results for f in r.faces), key=lambda c: c.frame) == sent  # each exactly once
    assert {r.model for r in results} == {"fer-res:1", "fer-vgg:1"}  # both served
    expected = {"fer-res:1": Classifier("fer-res"), "fer-vgg:1": Classifier("fer-vgg")}
    by_id = dict(zip(sent, images[:40]))
    for r in results:  # each answer is what the model it names says about that face
        clf = expected[r.model]
        assert r.faces[0].label == clf.labels[int(np.argmax(clf.predict(by_id[r.faces[0].id])))]


def _status(front: str) -> dict:
    with StatusClient(StatusSettings(broker=front, timeout_s=10)) as c:
        return c.fetch()
