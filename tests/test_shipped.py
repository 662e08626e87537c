"""The shipped model files are found in a checkout and, from a wheel, under <prefix>/share/fer-swarm/models."""

import tomllib
from pathlib import Path

from fer_swarm import shipped as shipped_mod
from fer_swarm.faces import YUNET_MODEL
from fer_swarm.model import ACCURATE_MODEL, DEFAULT_MODEL

ROOT = Path(__file__).resolve().parent.parent


def test_the_checkout_copy_is_used_when_there_is_one():
    assert DEFAULT_MODEL == ROOT / "models" / "fer-res.tflite" and DEFAULT_MODEL.is_file()
    assert ACCURATE_MODEL == ROOT / "models" / "fer-vgg.tflite" and ACCURATE_MODEL.is_file()
    assert YUNET_MODEL == ROOT / "models" / "face_detection_yunet_2023mar.onnx" and YUNET_MODEL.is_file()


def test_an_installed_wheel_finds_its_data_files(tmp_path, monkeypatch):
    installed = tmp_path / "share" / "fer-swarm" / "models"
    installed.mkdir(parents=True)
    (installed / "fer-vgg.tflite").write_bytes(b"x")
    monkeypatch.setattr(shipped_mod, "CHECKOUT_MODELS", tmp_path / "no-checkout")
    monkeypatch.setattr(shipped_mod, "INSTALLED_MODELS", installed)
    assert shipped_mod.shipped("fer-vgg.tflite") == installed / "fer-vgg.tflite"
    # Neither: the checkout's path, so the error names where a developer would look.
    assert shipped_mod.shipped("nothing.onnx") == tmp_path / "no-checkout" / "nothing.onnx"


def test_the_wheel_carries_every_file_the_code_loads_with_its_sidecar_and_licence():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    listed = {Path(f).name for f in data["share/fer-swarm/models"]}
    assert {DEFAULT_MODEL.name, DEFAULT_MODEL.with_suffix(".json").name, YUNET_MODEL.name,
            YUNET_MODEL.with_suffix(".LICENSE").name} <= listed
    assert all((ROOT / f).is_file() for f in data["share/fer-swarm/models"])
