"""`--launcher ray`'s own exits, against a stand-in for the ray module (a real local Ray instance takes minutes to
start on a shared 2-core machine; test_launchers runs the real one): a request the cluster cannot meet stops in one
line (was: waited forever), and the local Ray instance is shut down on every exit path, SIGTERM included (was: the
parent's death left Ray's processes running)."""
import os
import signal
import sys
import types

import pytest

from isoconv.cli import main
from isoconv.errors import Interrupted, UserError
from isoconv.experiments.launchers import LaunchOptions, check_ray_resources, run_with_ray

from test_launchers import write_spec


class FakeRay(types.ModuleType):
    """What run_with_ray uses of ray, recording init/shutdown; `on_wait` runs inside ray.wait."""

    def __init__(self, resources, on_wait=lambda: None):
        super().__init__("ray")
        self.resources, self.on_wait, self.calls, self.initialized = resources, on_wait, [], False
        self.exceptions = types.SimpleNamespace(RayError=RuntimeError)

    def is_initialized(self):
        return self.initialized

    def init(self, **kwargs):
        self.initialized = True
        self.calls.append("init")

    def shutdown(self):
        self.initialized = False
        self.calls.append("shutdown")

    def cluster_resources(self):
        return dict(self.resources)

    def remote(self, **kwargs):
        return lambda fn: types.SimpleNamespace(remote=lambda *a: object())

    def wait(self, refs, num_returns):
        self.on_wait()
        raise AssertionError("on_wait should have ended the sweep")

    def cancel(self, ref, force):
        self.calls.append("cancel")


def run(fake, monkeypatch, **options):
    monkeypatch.setitem(sys.modules, "ray", fake)
    todo = [types.SimpleNamespace(config=None, out="x")]
    return run_with_ray(todo, lambda *a: None, stop_after=None, on_finish=lambda *a: None,
                        options=LaunchOptions(**options))


def test_gpus_the_cluster_does_not_have_stop_in_one_line_and_ray_is_shut_down(monkeypatch):
    fake = FakeRay({"CPU": 2.0, "memory": 1e9})
    with pytest.raises(UserError) as e:
        run(fake, monkeypatch, gpus_per_run=1)
    assert str(e.value) == ("--gpus-per-run 1 cannot be met: the Ray cluster has 0 GPU(s) in all, so the runs would "
                            "wait forever; pass --gpus-per-run 0 to train on CPUs, or --ray-address a cluster that "
                            "has them")
    assert fake.calls == ["init", "shutdown"]


def test_the_cli_says_it_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", FakeRay({"CPU": 2.0}))
    spec = write_spec(tmp_path / "tiny.yaml")
    assert main(["ablate", str(spec), "--out", str(tmp_path / "o"), "--launcher", "ray", "--gpus-per-run", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["isoconv: error: --gpus-per-run 0.5 cannot be met: the Ray cluster has 0 GPU(s) in all, so the "
                   "runs would wait forever; pass --gpus-per-run 0 to train on CPUs, or --ray-address a cluster that "
                   "has them"]


@pytest.mark.parametrize("resources, options, ok", [
    ({"CPU": 4.0, "GPU": 2.0}, {"gpus_per_run": 2, "cpus_per_run": 4}, True),
    ({"CPU": 4.0, "GPU": 2.0}, {"gpus_per_run": 0.5}, True),
    ({"CPU": 4.0, "GPU": 2.0}, {"gpus_per_run": 3}, False),
    ({"CPU": 4.0}, {"cpus_per_run": 5}, False)])
def test_what_the_cluster_has_is_compared_with_each_run_s_request(resources, options, ok):
    if ok:
        check_ray_resources(resources, LaunchOptions(**options))
    else:
        with pytest.raises(UserError, match="cannot be met: the Ray cluster has"):
            check_ray_resources(resources, LaunchOptions(**options))


def test_sigterm_shuts_the_local_ray_instance_down(monkeypatch):
    fake = FakeRay({"CPU": 2.0}, on_wait=lambda: os.kill(os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as e:
        run(fake, monkeypatch)
    assert e.value.exit_code == 128 + signal.SIGTERM
    assert str(e.value) == "the sweep was stopped by SIGTERM; run the same command again to continue it"
    assert fake.calls == ["init", "cancel", "shutdown"]
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is only there while Ray runs


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError, MemoryError])
def test_any_other_exit_shuts_it_down_too(monkeypatch, error):
    def fail():
        raise error()
    fake = FakeRay({"CPU": 2.0}, on_wait=fail)
    with pytest.raises(error):
        run(fake, monkeypatch)
    assert fake.calls == ["init", "cancel", "shutdown"]


def test_a_ray_instance_this_process_had_joined_is_left_running(monkeypatch):
    fake = FakeRay({"CPU": 2.0}, on_wait=lambda: os.kill(os.getpid(), signal.SIGTERM))
    fake.initialized = True
    with pytest.raises(Interrupted):
        run(fake, monkeypatch)
    assert fake.calls == ["cancel"]
