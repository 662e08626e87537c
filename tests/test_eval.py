"""``fer-swarm eval`` with the workers' runtime, and the model-loading errors it must report clearly."""

import json
import shutil

import cv2
import numpy as np
import pytest

from fer_swarm.errors import ModelError
from fer_swarm.model import Classifier, load_card

from .conftest import FER2013, error_lines, make_pattern_dataset, run_cli


@pytest.fixture
def fer_sample(tmp_path):
    """20 real FER2013 validation faces per class (symlinked, never copied into the repo)."""
    if not (FER2013 / "val").is_dir():
        pytest.skip("FER2013 folder absent")
    root = tmp_path / "fer"
    for cls in sorted((FER2013 / "val").iterdir()):
        (root / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:20]:
            (root / cls.name / f.name).symlink_to(f)
    return root


def test_shipped_model_loads_with_matching_sidecar(shipped_model):
    card = load_card(shipped_model)
    clf = Classifier(shipped_model)
    assert clf.labels == card.labels == ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
    assert clf.crop_size == (48, 48)


def test_eval_json_on_real_faces(fer_sample, shipped_model, tmp_path):
    plot = tmp_path / "cm.png"
    res = run_cli("eval", str(fer_sample), "--model", str(shipped_model), "--json", "--plot", str(plot))
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["n"] == 140
    assert report["accuracy"] > 0.4  # chance is 1/7; the shipped model scores far above it
    assert 0 < report["macro_f1"] <= 1
    assert 0 < report["ms_per_face_median"] <= report["ms_per_face_p95"]
    assert sum(map(sum, report["confusion"]["rows_truth_cols_predicted"])) == 140
    img = cv2.imread(str(plot))
    assert img is not None and img.shape[0] > 300


def test_eval_text_report_and_unreadable_image(fer_sample, shipped_model):
    (fer_sample / "happy" / "corrupt.jpg").write_bytes(b"\xff\xd8 broken")
    res = run_cli("eval", str(fer_sample), "--model", str(shipped_model))
    assert res.returncode == 0, res.stderr
    for word in ("precision", "recall", "confusion", "macro-F1", "ms/face median", "p95"):
        assert word in res.stdout
    assert "1 unreadable" in res.stderr


def _model_copy(shipped_model, tmp_path, name="m"):
    dst = tmp_path / f"{name}.tflite"
    shutil.copy(shipped_model, dst)
    shutil.copy(shipped_model.with_suffix(".json"), dst.with_suffix(".json"))
    return dst


def test_not_a_tflite_file(tmp_path, shipped_model):
    model = _model_copy(shipped_model, tmp_path)
    model.write_bytes(b"PK\x03\x04 a zip, not a model" * 10)
    with pytest.raises(ModelError, match="not a TFLite model"):
        load_card(model)
    make_pattern_dataset(tmp_path / "d", classes=("happy",), per_class=2)
    res = run_cli("eval", str(tmp_path / "d"), "--model", str(model))
    assert res.returncode == 1 and len(error_lines(res.stderr)) == 1 and "not a TFLite model" in res.stderr


def test_sidecar_of_another_model_is_refused(tmp_path, shipped_model):
    model = _model_copy(shipped_model, tmp_path)
    card = json.loads(model.with_suffix(".json").read_text())
    card["tflite_sha256"] = "0" * 64
    model.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="does not match"):
        load_card(model)


def test_sidecar_with_wrong_label_count_is_refused(tmp_path, shipped_model):
    model = _model_copy(shipped_model, tmp_path)
    card = json.loads(model.with_suffix(".json").read_text())
    card["labels"] = card["labels"][:5]
    model.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="5 labels"):
        Classifier(model)


def test_missing_sidecar_and_missing_model(tmp_path, shipped_model):
    model = _model_copy(shipped_model, tmp_path)
    model.with_suffix(".json").unlink()
    with pytest.raises(ModelError, match="sidecar not found"):
        load_card(model)
    res = run_cli("eval", str(tmp_path), "--model", str(tmp_path / "absent.tflite"))
    assert res.returncode == 1 and "not found" in error_lines(res.stderr)[0]


def test_eval_on_folder_without_classes(tmp_path, shipped_model):
    res = run_cli("eval", str(tmp_path), "--model", str(shipped_model))
    assert res.returncode == 1 and "no class subfolders" in error_lines(res.stderr)[0]


def test_predict_rejects_wrong_crop_size(shipped_model):
    clf = Classifier(shipped_model)
    with pytest.raises(ModelError, match="2304"):
        clf.predict(np.zeros((10, 10), np.uint8))


def test_eval_reports_compute_beside_accuracy(fer_sample, shipped_model):
    res = run_cli("eval", str(fer_sample), "--model", str(shipped_model), "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["mmac_per_face"] == pytest.approx(41.4, abs=0.1)  # counted from the graph (fer-res, one pass)
    assert 600_000 < report["params"] < 630_000 and report["size_bytes"] == shipped_model.stat().st_size
    assert report["quantization"] == load_card(shipped_model).quantization


def test_eval_scores_several_models_side_by_side(fer_sample, shipped_model, tmp_path):
    other = _model_copy(shipped_model, tmp_path, name="fer-res-dynamic-second-cycle")  # a run's long export name
    res = run_cli("eval", str(fer_sample), "--model", str(shipped_model), "--model", str(other), "--json")
    assert res.returncode == 0, res.stderr
    first, second = (json.loads(line) for line in res.stdout.splitlines())
    assert first["n"] == second["n"] == 140
    assert first["accuracy"] == second["accuracy"]  # the same model on the same faces
    assert first["confusion"] == second["confusion"]
    text = run_cli("eval", str(fer_sample), "--model", str(shipped_model), "--model", str(other))
    assert text.returncode == 0, text.stderr
    assert "side by side" in text.stdout and "ratio" in text.stdout and "MMAC" in text.stdout
    assert text.stdout.count("1.00") >= 1  # the first model's ratio to itself
    table = text.stdout.split("side by side")[1]
    assert "…" not in table and f"{first['macro_f1']:.3f}" in table  # whole figures, also in a pipe or a log


def test_eval_refuses_models_that_cannot_see_the_same_faces(fer_sample, shipped_model, tmp_path):
    other = _model_copy(shipped_model, tmp_path)
    card = json.loads(other.with_suffix(".json").read_text())
    card["labels"] = list(reversed(card["labels"]))
    other.with_suffix(".json").write_text(json.dumps(card))
    res = run_cli("eval", str(fer_sample), "--model", str(shipped_model), "--model", str(other))
    assert res.returncode == 1 and "same faces" in error_lines(res.stderr)[0]
