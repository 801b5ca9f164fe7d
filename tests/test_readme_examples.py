"""Runs every `bash` and `python` block of the README section "Inference, export and pretrained weights".

The blocks run in order in a scratch folder holding `runs/my-run` (a tiny trained run), `photos/` and `more/`
(real CIFAR-10 test images). `isoconv` command lines are run in-process (one line each; `> FILE` redirects
stdout); `isoconv train` lines get flags that shorten training appended. `text` blocks are sample output.
"""
import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest
from PIL import Image

from isoconv.cli import main
from isoconv.config import build_config
from isoconv.data import load_dataset
from isoconv.train.loop import train

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Inference, export and pretrained weights"


def section_blocks() -> list[tuple[str, str]]:
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start:end if end >= 0 else len(text)]
    return re.findall(r"^```(\w*)\n(.*?)^```", section, flags=re.S | re.M)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, data_root) -> Path:
    root = tmp_path_factory.mktemp("readme")
    cfg = build_config(model="cm-cpu", dim=16, depth=1, epochs=1, train_subset=64, test_subset=32, batch_size=32,
                       data_dir=str(data_root), out=str(root / "runs" / "my-run"), amp="off")
    train(cfg)
    test = load_dataset("cifar10", data_root, "test").subset(100)
    (root / "photos").mkdir()
    (root / "more").mkdir()
    for name, target in (("cat", "photos/cat.png"), ("ship", "photos/ship.png"), ("truck", "more/truck.jpg")):
        index = next(i for i, y in enumerate(test.labels.tolist()) if test.classes[y] == name)
        Image.fromarray(test.images[index].permute(1, 2, 0).numpy()).save(root / target)
    return root


def run_command_line(line: str, data_root: Path) -> str:
    """Run one `isoconv ...` line in-process; returns what it printed (also written to a `> FILE` target)."""
    argv = shlex.split(line, comments=True)
    if not argv:
        return ""
    assert argv[0] == "isoconv", f"README bash blocks may only run isoconv, got: {line}"
    redirect = None
    if ">" in argv:
        redirect = argv[argv.index(">") + 1]
        argv = argv[:argv.index(">")]
    if argv[1] == "train":  # same command, shortened
        argv += ["--epochs", "1", "--train-subset", "64", "--test-subset", "32", "--batch-size", "32",
                 "--data-dir", str(data_root), "--amp", "off"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv[1:])
    assert code == 0, f"`{line}` exited with {code}"
    if redirect:
        Path(redirect).write_text(out.getvalue())
    return out.getvalue()


def test_readme_examples_run(workdir, data_root, monkeypatch):
    monkeypatch.chdir(workdir)
    blocks = section_blocks()
    assert {lang for lang, _ in blocks} >= {"bash", "python", "text"}
    printed = []
    for lang, code in blocks:
        if lang == "bash":
            printed.extend(run_command_line(line, data_root) for line in code.splitlines())
        elif lang == "python":
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
            printed.append(out.getvalue())
    output = "".join(printed)

    classes = load_dataset("cifar10", data_root, "test").classes
    predictions = json.loads((workdir / "predictions.json").read_text())["predictions"]
    assert sorted(p["file"] for p in predictions) == ["photos/cat.png", "photos/ship.png"]
    assert all(p["top"][0]["class"] in classes for p in predictions)
    for name in ("runs/my-run/model.onnx", "my-model.pt", "my-model.safetensors", "runs/finetuned/summary.json"):
        assert (workdir / name).is_file(), name
    assert "more/truck.jpg" in output and "file,rank,class,index,probability" in output
    assert "pretrained weights from convmixer-imagenet.pth" in output
    assert "re-initialised: head.weight, head.bias" in output
    python_lines = [line for line in output.splitlines() if line.startswith("[")]  # the printed class lists
    assert python_lines and all(c.strip(" '") in classes for c in python_lines[0].strip("[]").split(","))
