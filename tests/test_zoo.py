"""The model zoo: shipped weights load by name, their checksum is checked before every load, and the listing works."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import isoconv
from isoconv import zoo
from isoconv.cli import main
from isoconv.errors import UserError
from isoconv.interop.export import export_target
from isoconv.interop.load import read_model
from isoconv.interop.predict import format_json, predict_files

from test_export import make_run


@pytest.fixture
def fake_zoo(tmp_path, monkeypatch):
    """A zoo folder holding one tiny exported model, in place of the shipped one."""
    run = make_run(tmp_path / "run", model="cm-cpu")
    folder = tmp_path / "zoo"
    folder.mkdir()
    export_target(run, "safetensors", folder / "tiny.safetensors")
    entry = {"name": "tiny-cifar10", "file": "tiny.safetensors", "sha256": zoo.file_sha256(folder / "tiny.safetensors"),
             "model": "cm-cpu", "recipe": "cpu-quick", "dataset": "cifar10", "data": "random weights (a test)",
             "test_top1": 0.1, "test_images": 10000, "commit": "0000000", "command": "none",
             "description": "a test entry"}
    (folder / "index.json").write_text(json.dumps({"models": [entry]}))
    monkeypatch.setattr(zoo, "ZOO_DIR", folder)
    monkeypatch.setattr(zoo, "INDEX_FILE", folder / "index.json")
    return run, folder


def test_a_zoo_name_loads_the_same_model_as_its_run(fake_zoo, monkeypatch, tmp_path):
    run, _ = fake_zoo
    monkeypatch.chdir(tmp_path)  # no file named like the entry here
    by_name, preprocess = isoconv.load("tiny-cifar10")
    from_run, _ = isoconv.load(run)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(by_name(x), from_run(x))
    assert preprocess.classes[0] == "airplane"


def test_an_existing_path_wins_over_a_zoo_name(fake_zoo, monkeypatch, tmp_path):
    run, _ = fake_zoo
    monkeypatch.chdir(tmp_path)
    shutil.copytree(run, tmp_path / "tiny-cifar10")
    assert zoo.resolve_model_path("tiny-cifar10") == Path("tiny-cifar10")
    assert zoo.resolve_model_path("no-such-model") == Path("no-such-model")


def test_a_tampered_zoo_file_is_refused_in_one_line(fake_zoo, monkeypatch, tmp_path):
    _, folder = fake_zoo
    monkeypatch.chdir(tmp_path)
    data = bytearray((folder / "tiny.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "tiny.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"^the zoo file .*tiny.safetensors fails its checksum \(sha256 [0-9a-f]{16}"
                                        r"\.\.\., expected [0-9a-f]{16}\.\.\.\): it was altered or truncated; "
                                        r"reinstall isoconv$"):
        read_model(Path("tiny-cifar10"), torch.device("cpu"))
    (folder / "tiny.safetensors").unlink()
    with pytest.raises(UserError, match=r"has no file .*tiny.safetensors; reinstall isoconv"):
        isoconv.load("tiny-cifar10")


def test_zoo_command_lists_each_model_with_its_provenance(fake_zoo, capsys):
    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    assert "tiny-cifar10             cm-cpu        10.00%       10,000  random weights (a test)" in out
    assert "commit 0000000" in out and "trained with: none" in out
    assert main(["models"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("shipped weights (`isoconv zoo`): tiny-cifar10")


def test_an_unreadable_index_is_one_line(tmp_path):
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(UserError, match=r"the model zoo index .*index.json is unreadable \(.*\); reinstall isoconv"):
        zoo.zoo_entries(tmp_path / "index.json")


REPO = Path(__file__).resolve().parents[1]


def test_the_shipped_zoo_predicts_offline_from_an_installed_package(tmp_path, lossless_subset):
    """pip-install the package (not the source tree) into a folder, then predict with the shipped cpu-quick model by
    name in a fresh process whose isoconv comes from there: same answer as the source tree's model."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(REPO)],
                   check=True, capture_output=True, cwd=tmp_path)
    image = tmp_path / "cat.png"
    Image.fromarray(np.load(lossless_subset)["test_images_hwc"][0]).save(image)  # official test image 0: a cat
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), HOME=str(tmp_path), ISOCONV_CACHE=str(tmp_path / "cache"))
    script = ("import json, sys, isoconv; from isoconv.interop.predict import predict_files, format_json\n"
              "print(isoconv.__file__)\n"
              "print(format_json(predict_files('cpu-quick', [sys.argv[1]], top_k=3, device='cpu')))")
    out = subprocess.run([sys.executable, "-c", script, str(image)], capture_output=True, text=True, cwd=tmp_path,
                         env=env, check=True).stdout.splitlines()
    assert out[0].startswith(str(site)), out[0]
    installed = json.loads("\n".join(out[1:]))
    ours = json.loads(format_json(predict_files("cpu-quick", [image], top_k=3, device="cpu")))
    assert installed["predictions"][0]["top"] == ours["predictions"][0]["top"]
    assert len(ours["predictions"][0]["top"]) == 3


def test_the_shipped_index_matches_its_files():
    entries = zoo.zoo_entries()
    assert [e.name for e in entries] == ["cpu-quick"]
    for e in entries:
        assert zoo.verified_file(e) == e.path and e.test_images == 10000 and 0.7 < e.test_top1 < 0.9
        assert "JPEG-degraded" in e.data and len(e.commit) >= 7
