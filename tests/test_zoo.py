"""The model zoo: shipped weights load by name, their checksum is checked before every load, and the listing works."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import isoconv
from isoconv import zoo
from isoconv.cli import main
from isoconv.errors import UserError
from isoconv.interop.export import export_target
from isoconv.interop.load import read_model

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
