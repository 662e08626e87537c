"""The default model in a real worker behind a real broker, answering real FER2013 faces."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fer_swarm import datasets
from fer_swarm import protocol as p
from fer_swarm.model import DEFAULT_MODEL, Classifier, load_card

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
