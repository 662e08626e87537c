
import numpy as np
import pytest

from fer_swarm import datasets, metrics
from fer_swarm.errors import DatasetError

from .conftest import make_pattern_dataset


def test_scan_lists_classes_in_sorted_order(tmp_path):
    make_pattern_dataset(tmp_path, classes=("b", "a"), per_class=2)
    folders = datasets.scan(tmp_path)
    assert folders.classes == ("a", "b")
    assert folders.counts() == {"a": 2, "b": 2}


def test_scan_rejects_folder_without_class_subfolders(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="no class subfolders"):
        datasets.scan(tmp_path)


def test_scan_rejects_empty_class(tmp_path):
    make_pattern_dataset(tmp_path, classes=("a",), per_class=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        datasets.scan(tmp_path)


def test_scan_rejects_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="not a folder"):
        datasets.scan(tmp_path / "nope")


def test_unreadable_image_is_skipped_and_reported(tmp_path):
    make_pattern_dataset(tmp_path, classes=("a", "b"), per_class=3)
    bad = tmp_path / "a" / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    loaded = datasets.load_gray(datasets.scan(tmp_path), (48, 48))
    assert loaded.unreadable == [bad]
    assert len(loaded.labels) == 6
    assert loaded.images.shape == (6, 48, 48) and loaded.images.dtype == np.uint8


def test_load_rejects_class_the_model_does_not_know(tmp_path):
    make_pattern_dataset(tmp_path, classes=("a", "zz"), per_class=1)
    with pytest.raises(DatasetError, match="zz"):
        datasets.load_gray(datasets.scan(tmp_path), (48, 48), classes=("a", "b"))


def test_classification_report_by_hand():
    truth = np.array([0, 0, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0])
    r = metrics.classification_report(truth, pred, ("a", "b", "c"))
    assert r.accuracy == pytest.approx(3 / 5)
    assert r.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert r.precision.tolist() == pytest.approx([0.5, 2 / 3, 0.0])
    assert r.recall.tolist() == pytest.approx([0.5, 1.0, 0.0])
    f1_b = 2 * (2 / 3) / (2 / 3 + 1)
    assert r.macro_f1 == pytest.approx((0.5 + f1_b + 0.0) / 3)
