"""isoconv.eval.run: which precision `isoconv eval` uses."""
from __future__ import annotations

import json

import torch

from isoconv import runtime
from isoconv.eval.run import eval_precision

CPU = torch.device("cpu")


def test_auto_evaluates_in_the_precision_the_run_trained_in(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)  # the rule alone would say bf16
    run = tmp_path / "run"
    run.mkdir()
    assert eval_precision("auto", CPU, run) == "bf16"  # no summary yet: the rule
    (run / "summary.json").write_text(json.dumps({"amp": "fp32", "device": "cpu"}))
    assert eval_precision("auto", CPU, run) == "fp32"  # --amp auto measured fp32 faster when it trained
    assert eval_precision("bf16", CPU, run) == "bf16"  # an explicit --amp is kept
    (run / "summary.json").write_text(json.dumps({"amp": "fp16", "device": "cuda:0"}))
    assert eval_precision("auto", CPU, run) == "bf16"  # trained on a GPU: fp16 does not carry over to a CPU
