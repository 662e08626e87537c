"""``fer-swarm train`` for real: one short epoch on a generated dataset, exported and run by LiteRT."""

import json

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="training tests need the 'train' extra")

from fer_swarm import datasets  # noqa: E402
from fer_swarm.errors import FerSwarmError  # noqa: E402
from fer_swarm.model import Classifier, load_card, sha256_file  # noqa: E402

from .conftest import ROOT, error_lines, make_pattern_dataset, run_cli  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = make_pattern_dataset(root / "data", per_class=40)
    out = root / "models" / "tiny.tflite"
    res = run_cli("train", str(data), "--out", str(out), "--epochs", "1", "--arch", "tiny", "--batch-size", "16",
                  "--val-fraction", "0.25", "--run-dir", str(root / "run"), "--model-version", "7")
    assert res.returncode == 0, res.stderr[-3000:]
    return root, data, out, res


def test_train_writes_model_sidecar_and_run_state(trained):
    root, _, out, res = trained
    card = load_card(out)  # validates the sidecar against the model file
    assert card.labels == ("calm", "dots", "stripes")
    assert card.version == "7"
    assert card.input_shape == (1, 48, 48, 1)
    assert card.quantization in ("int8", "dynamic", "float")
    assert set(card.metrics) >= {"val_accuracy", "val_macro_f1", "agreement_with_keras"}
    assert card.metrics["agreement_with_keras"] >= 0.99
    assert card.dataset["train_counts"] == {"calm": 30, "dots": 30, "stripes": 30}
    assert card.dataset["val_counts"] == {"calm": 10, "dots": 10, "stripes": 10}
    assert card.training["seed"] == 1234
    for name in ("last.keras", "best.weights.h5", "state.json", "log.csv", "summary.json"):
        assert (root / "run" / name).exists(), name
    assert "shipped" in res.stdout and "accuracy" in res.stdout


def test_exported_model_runs_in_the_worker_runtime(trained):
    _, data, out, _ = trained
    clf = Classifier(out)
    from fer_swarm import datasets

    imgs = datasets.load_gray(datasets.scan(data), clf.crop_size, classes=clf.labels)
    probs = clf.predict_many(imgs.images)
    assert probs.shape == (len(imgs.labels), 3)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=0.02)


def test_resume_continues_and_fresh_run_refuses_to_overwrite(trained):
    root, data, out, _ = trained
    again = run_cli("train", str(data), "--out", str(out), "--epochs", "1", "--arch", "tiny", "--batch-size", "16",
                    "--val-fraction", "0.25", "--run-dir", str(root / "run"))
    assert again.returncode == 1
    assert len(error_lines(again.stderr)) == 1 and "--resume" in again.stderr
    state_before = json.loads((root / "run" / "state.json").read_text())
    resumed = run_cli("train", str(data), "--out", str(out), "--epochs", "1", "--arch", "tiny", "--batch-size", "16",
                      "--val-fraction", "0.25", "--run-dir", str(root / "run"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((root / "run" / "state.json").read_text())["epochs_done"] == state_before["epochs_done"] == 1


def test_resume_with_other_options_is_refused(trained):
    root, data, out, _ = trained
    res = run_cli("train", str(data), "--out", str(out), "--epochs", "3", "--arch", "tiny", "--batch-size", "16",
                  "--val-fraction", "0.25", "--run-dir", str(root / "run"), "--resume")
    assert res.returncode == 1
    assert "epochs" in error_lines(res.stderr)[0]


def test_train_on_folder_without_classes_is_one_error_line(tmp_path):
    (tmp_path / "loose.png").write_bytes(b"")
    res = run_cli("train", str(tmp_path), "--out", str(tmp_path / "m.tflite"), "--arch", "tiny")
    assert res.returncode == 1
    assert len(error_lines(res.stderr)) == 1 and "no class subfolders" in res.stderr
    assert "Traceback" not in res.stderr


def test_train_on_empty_class_is_one_error_line(tmp_path):
    make_pattern_dataset(tmp_path, classes=("a", "b"), per_class=3)
    (tmp_path / "c").mkdir()
    res = run_cli("train", str(tmp_path), "--out", str(tmp_path / "m.tflite"), "--arch", "tiny")
    assert res.returncode == 1
    assert "c" in error_lines(res.stderr)[0] and "Traceback" not in res.stderr


def test_int8_export_passes_the_agreement_gate_on_a_labelled_sample(trained):
    root, _, out, _ = trained
    card = load_card(out)
    int8 = card.metrics["candidates"]["int8"]
    assert int8["agreement_with_keras"] >= 0.99
    assert int8["val_accuracy"] >= card.metrics["candidates"]["float"]["val_accuracy"] - 0.005
    assert card.quantization == "int8" and card.input_dtype == "uint8"  # int8 is the first choice when it passes
    assert card.metrics["mmac_per_face"] > 0 and card.metrics["params"] > 0


def test_distilled_bf16_training_records_its_teacher_and_resumes(trained, tmp_path):
    root, data, _, _ = trained
    teacher = root / "run" / "export" / "tiny-dynamic.tflite"  # float input, the pattern set's classes
    out = tmp_path / "student.tflite"
    args = ("train", str(data), "--out", str(out), "--epochs", "1", "--arch", "tiny", "--batch-size", "16",
            "--val-fraction", "0.25", "--run-dir", str(tmp_path / "run"), "--teacher", str(teacher),
            "--distill-weight", "0.6", "--temperature", "2", "--bf16")
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    card = load_card(out)
    assert card.training["teacher"] == {"models": [str(teacher)], "sha256": [sha256_file(teacher)],
                                        "distill_weight": 0.6, "temperature": 2.0}
    assert card.training["bf16"] is True
    assert "teacher labelled 90 training images" in res.stderr
    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    other_teacher = run_cli(*args[:-7], "--bf16", "--resume")  # the same run without its teacher is another run
    assert other_teacher.returncode == 1 and "teacher" in error_lines(other_teacher.stderr)[0]
    more_teachers = run_cli(*args, "--teacher", str(teacher.with_name("tiny-float.tflite")), "--resume")
    assert more_teachers.returncode == 1 and "teacher" in error_lines(more_teachers.stderr)[0]


def test_a_teacher_named_by_its_shipped_name_is_found_and_checked_against_the_data(tmp_path):
    data = make_pattern_dataset(tmp_path / "data", per_class=4)
    res = run_cli("train", str(data), "--out", str(tmp_path / "m.tflite"), "--arch", "tiny", "--epochs", "1",
                  "--run-dir", str(tmp_path / "run"), "--teacher", "fer-vgg", cwd=ROOT)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    # Found by name, named as the checkout's relative path, and refused: FER2013's classes are not the data's.
    assert "teacher models/fer-vgg.tflite has classes angry" in error_lines(res.stderr)[0]
    # A path is kept as given (a run started with it resumes with it).
    given = ROOT / "models" / "fer-vgg.tflite"
    res = run_cli("train", str(data), "--out", str(tmp_path / "m.tflite"), "--arch", "tiny", "--epochs", "1",
                  "--run-dir", str(tmp_path / "run2"), "--teacher", str(given), cwd=ROOT)
    assert f"teacher {given} has classes angry" in error_lines(res.stderr)[0]


def test_an_ensemble_teacher_answers_the_mean_of_its_models(trained):
    from fer_swarm.training.distill import Teacher
    from fer_swarm.training.train import TrainOptions

    root, data, _, _ = trained
    a, b = root / "run" / "export" / "tiny-dynamic.tflite", root / "run" / "export" / "tiny-float.tflite"
    classes = tuple(load_card(a).labels)
    faces = datasets.load_gray(datasets.scan(data), (48, 48)).images[::7]
    one, other, both = (Teacher(p, classes, 48).predict(faces) for p in ([a], [b], [a, b]))
    assert not np.allclose(one, other)  # float and dynamic-range exports answer differently: the mean is a third answer
    np.testing.assert_allclose(both, (one + other) / 2, rtol=1e-6)
    np.testing.assert_allclose(both.sum(axis=1), 1.0, rtol=1e-5)
    with pytest.raises(FerSwarmError, match="classes"):
        Teacher([a, b], (*classes[:2], "x"), 48)
    # A run distilled from one teacher before teachers could be several keeps its --resume identity,
    # and an ensemble is the same run whichever order its models are named in.
    def identity(*teachers):
        return TrainOptions(data_dir=data, out=root / "m.tflite", teacher=teachers).identity()["teacher"]

    assert identity(a) == str(a)
    assert identity(a, b) == identity(b, a) != identity(a)


def _first_kernel(weights_path, arch="tiny"):
    from fer_swarm.training import arch as arch_mod

    model = arch_mod.build(arch, 48, 3)  # the pattern set has three classes
    model.load_weights(weights_path)
    return next(w for w in model.get_weights() if w.ndim == 4)


def test_warm_start_begins_from_the_given_weights_and_records_them(trained, tmp_path):
    root, data, _, _ = trained
    init = root / "run" / "best.weights.h5"
    out = tmp_path / "again.tflite"
    res = run_cli("train", str(data), "--out", str(out), "--epochs", "1", "--arch", "tiny", "--batch-size", "16",
                  "--val-fraction", "0.25", "--run-dir", str(tmp_path / "run"), "--init-weights", str(init),
                  "--learning-rate", "1e-9", "--warmup-epochs", "0")
    assert res.returncode == 0, res.stderr[-3000:]
    # At a learning rate of 1e-9 one epoch leaves the starting weights where they were, not where a fresh start is.
    np.testing.assert_allclose(_first_kernel(tmp_path / "run" / "best.weights.h5"), _first_kernel(init), atol=1e-6)
    card = load_card(out)
    assert card.training["init_weights"]["path"] == str(init)
    assert len(card.training["init_weights"]["sha256"]) == 64
    assert card.training["learning_rate"] == 1e-9 and card.training["warmup_epochs"] == 0


def test_warm_start_from_weights_of_another_network_is_one_error_line(trained, tmp_path):
    root, data, _, _ = trained
    res = run_cli("train", str(data), "--out", str(tmp_path / "m.tflite"), "--epochs", "1", "--arch", "res",
                  "--val-fraction", "0.25", "--run-dir", str(tmp_path / "run"),
                  "--init-weights", str(root / "run" / "best.weights.h5"))
    assert res.returncode == 1
    lines = error_lines(res.stderr)
    assert len(lines) == 1 and "does not fit --arch res" in lines[0], res.stderr[-2000:]
    missing = run_cli("train", str(data), "--out", str(tmp_path / "m.tflite"), "--arch", "tiny",
                      "--val-fraction", "0.25", "--run-dir", str(tmp_path / "run2"),
                      "--init-weights", str(tmp_path / "nope.weights.h5"))
    assert missing.returncode == 1 and "no such file" in error_lines(missing.stderr)[0]


def test_weight_averaging_keeps_the_mean_of_the_epochs_from_average_from_across_a_resume(tmp_path):
    from fer_swarm.training import arch as arch_mod
    from fer_swarm.training.train import RunState

    model = arch_mod.build("tiny", 48, 3)
    rng = np.random.default_rng(0)
    epochs = [[rng.normal(size=w.shape).astype(np.float32) for w in model.get_weights()] for _ in range(4)]
    state = {"epochs_done": 0, "best_val_accuracy": -1.0, "best_epoch": 0, "history": []}

    def finish_epoch(callback, epoch, weights):
        model.set_weights(weights)
        callback.on_epoch_end(epoch, {"val_accuracy": 0.5})

    def resumed():
        callback = RunState(tmp_path, json.loads((tmp_path / "state.json").read_text()), 3, average_from=2)
        callback.set_model(model)
        return callback

    first = RunState(tmp_path, state, 3, average_from=2)
    first.set_model(model)
    finish_epoch(first, 0, epochs[0])  # epoch 1: before --average-from, not in the mean
    finish_epoch(first, 1, epochs[1])
    # Killed during epoch 3's bookkeeping: its mean was written, state.json not. The resumed run trains epoch 3
    # again (other weights); the mean must hold epochs 2 and the retrained 3, each once.
    crashed = resumed()
    model.set_weights(epochs[2])
    crashed._add_to_average(3)  # noqa: SLF001
    again = resumed()
    finish_epoch(again, 2, epochs[3])

    mean = arch_mod.build("tiny", 48, 3)
    mean.load_weights(tmp_path / again.state["average_file"])  # batch-norm statistics are averaged as well
    for got, two, three in zip(mean.get_weights(), epochs[1], epochs[3]):
        np.testing.assert_allclose(got, (two + three) / 2, rtol=1e-5, atol=1e-6)
    assert again.state["averaged"] == 2
    assert sorted(p.name for p in tmp_path.glob("average-*")) == ["average-003.weights.h5"]  # the old mean is gone


def test_averaged_run_exports_the_mean_and_records_it(trained, tmp_path):
    root, data, _, _ = trained
    out = tmp_path / "swa.tflite"
    args = ("train", str(data), "--out", str(out), "--epochs", "2", "--arch", "tiny", "--batch-size", "16",
            "--val-fraction", "0.25", "--run-dir", str(tmp_path / "run"))
    res = run_cli(*args, "--average-from", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mean of epochs 2-2" in res.stdout
    # The mean of one epoch is that epoch: the last one, which need not be the best.
    last = _keras_weights(tmp_path / "run" / "last.keras")
    for got, want in zip(_weights(tmp_path / "run" / "average.weights.h5"), last):
        np.testing.assert_array_equal(got, want)
    card = load_card(out)
    assert card.training["average_from"] == 2
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["averaged"] == 1 and 0 <= state["average_val_accuracy"] <= 1
    late = run_cli(*args[:-2], "--run-dir", str(tmp_path / "run2"), "--average-from", "3")
    assert late.returncode == 1
    assert "--average-from 3: the run has epochs 1-2" in error_lines(late.stderr)[0]


def _weights(weights_path, arch="tiny"):
    from fer_swarm.training import arch as arch_mod

    model = arch_mod.build(arch, 48, 3)
    model.load_weights(weights_path)
    return model.get_weights()


def _keras_weights(path):
    import keras

    return keras.models.load_model(path, compile=False).get_weights()
