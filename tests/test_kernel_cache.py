"""The C kernels' cache is checked like data and guarded like code (compiled.NativeLibrary): a build that does not
match the digest recorded when it was built is rebuilt, a file or folder another user owns or others can write is
never loaded (a private copy is built instead), and private copies leave no folder behind."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from isoconv.models import compiled, depthwise

from conftest import captured_logs

SRC = Path(__file__).resolve().parents[1] / "src"
# width 128 at batch 64 on 8x8 maps is 2^19 activation elements: training takes the depthwise C kernel (ReLU keeps
# the fused GELU + BatchNorm and its inductor compiles out of it)
TRAIN = ["train", "--model", "cm-cpu", "--dim", "128", "--depth", "1", "--activation", "relu", "--train-subset", "64",
         "--test-subset", "32", "--batch-size", "64", "--epochs", "1", "--amp", "off", "--device", "cpu"]


def fresh_library() -> compiled.NativeLibrary:
    return compiled.NativeLibrary("depthwise_grad.c", depthwise.declare_param_grads)


@pytest.fixture(scope="module")
def one_build(tmp_path_factory) -> Path:
    """The kernels folder of a cache where the library was built once (each test copies it: a compile is seconds)."""
    root = tmp_path_factory.mktemp("kernel-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ISOCONV_CACHE", str(root))
        assert fresh_library().load() is not None
    return root / compiled.NATIVE_FOLDER


@pytest.fixture
def cache(one_build, tmp_path, monkeypatch):
    """$ISOCONV_CACHE's kernels folder (absent at first), and a private temporary folder to see what private builds
    leave there."""
    monkeypatch.setenv("ISOCONV_CACHE", str(tmp_path / "cache"))
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    return tmp_path / "cache" / compiled.NATIVE_FOLDER


def built(cache: Path, one_build: Path) -> Path:
    """The cached library, as a build leaves it (a copy of one_build's, loaded once)."""
    shutil.copytree(one_build, cache)
    (library,) = cache.glob("*.so")
    assert compiled.verified(library) and fresh_library().load() is not None
    return library


def replace(path: Path, data: bytes) -> None:
    """New bytes under `path` as a new file: this process has the old one loaded, and changing a loaded library in
    place would crash it (what another process, later, would load is what the tests are about)."""
    new = path.with_name("new")
    new.write_bytes(data)
    os.chmod(new, path.stat().st_mode)
    os.replace(new, path)


def test_truncated_cached_kernels_are_rebuilt_in_a_real_training_process(data_root, tmp_path):
    """Was: SIGBUS (exit 135) when the second run loaded the truncated library."""
    env = dict(os.environ, ISOCONV_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(SRC))

    def train(out: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "isoconv", *TRAIN, "--data-dir", str(data_root), "--out",
                               str(tmp_path / out)], env=env, capture_output=True, text=True, timeout=600)

    first = train("first")
    assert first.returncode == 0, first.stderr[-3000:]
    libraries = sorted((tmp_path / "cache" / compiled.NATIVE_FOLDER).glob("*.so"))
    assert libraries, "the first run built no C kernel"
    for library in libraries:
        with open(library, "r+b") as f:
            f.truncate(1000)
    second = train("second")
    assert second.returncode == 0, second.stderr[-3000:]
    warnings = [line for line in second.stderr.splitlines() if "does not match the digest" in line]
    assert len(warnings) == len(libraries) and "rebuilding it" in warnings[0]
    assert all(library.stat().st_size > 1000 and compiled.verified(library) for library in libraries)


def test_a_changed_kernel_is_rebuilt_after_one_warning(one_build, cache):
    library = built(cache, one_build)
    good = library.read_bytes()
    replace(library, good[:-1] + bytes([good[-1] ^ 1]))  # one bit flipped: same size
    with captured_logs("isoconv.models.compiled") as logs:
        assert fresh_library().load() is not None
    assert len(logs) == 1
    assert f"the cached CPU kernel {library} does not match the digest recorded when it was built" in logs[0]
    assert library.read_bytes() == good


def test_a_kernel_without_its_recorded_digest_is_rebuilt(one_build, cache):
    library = built(cache, one_build)
    compiled.digest_file(library).unlink()
    with captured_logs("isoconv.models.compiled") as logs:
        assert fresh_library().load() is not None
    assert "does not match the digest" in logs[0] and compiled.verified(library)


@pytest.mark.parametrize("what", ["file", "folder", "digest"])
def test_a_kernel_writable_by_others_is_not_loaded_and_a_private_copy_is_built(one_build, cache, tmp_path, what):
    library = built(cache, one_build)
    target = {"file": library, "folder": cache, "digest": compiled.digest_file(library)}[what]
    target.chmod(target.stat().st_mode | 0o002)
    bad = b"\0" * 1000  # what an attacker would put there; loading it would crash the process
    replace(library, bad)
    with captured_logs("isoconv.models.compiled") as logs:
        lib = fresh_library()
        assert lib.load() is not None and not lib.failed
    assert len(logs) == 1
    assert logs[0] == (f"not loading the cached CPU kernel {library}: {target} is writable by others (run "
                               f"`chmod go-w {target}` to use the cache); building a private copy for this run")
    assert library.read_bytes() == bad  # left alone
    assert list((tmp_path / "tmp").iterdir()) == []  # the private copy's folder is removed once loaded


def test_a_group_writable_kernel_is_refused_too(one_build, cache):
    library = built(cache, one_build)
    library.chmod(0o775)
    with captured_logs("isoconv.models.compiled") as logs:
        assert fresh_library().load() is not None
    assert f"{library} is writable by its group" in logs[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_kernel_owned_by_another_user_is_not_loaded(one_build, cache, tmp_path):
    library = built(cache, one_build)
    os.chown(library, 12345, -1)
    with captured_logs("isoconv.models.compiled") as logs:
        assert fresh_library().load() is not None
    assert logs[0].startswith(f"not loading the cached CPU kernel {library}: {library} belongs to user id "
                                      f"12345, not to you ({os.getuid()}) (point $ISOCONV_CACHE at a folder of your "
                                      f"own)")
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_symlinked_kernel_is_not_loaded(one_build, cache, tmp_path):
    library = built(cache, one_build)
    elsewhere = tmp_path / "elsewhere.so"
    library.rename(elsewhere)
    library.symlink_to(elsewhere)
    with captured_logs("isoconv.models.compiled") as logs:
        assert fresh_library().load() is not None
    assert f"{library} is not a plain file" in logs[0]


def test_builds_are_private_to_their_owner_whatever_the_umask(one_build, cache):
    old = os.umask(0o002)  # user-private groups: files are group-writable by default
    try:
        library = built(cache, one_build)
    finally:
        os.umask(old)
    for path in (cache, library, compiled.digest_file(library)):
        assert path.stat().st_mode & 0o022 == 0, path
    with captured_logs("isoconv.models.compiled") as logs:
        assert fresh_library().load() is not None
    assert logs == []  # trusted and verified: loaded without a word


def test_an_unwritable_cache_leaves_no_temporary_folder(one_build, cache, tmp_path, monkeypatch):
    monkeypatch.setattr(compiled, "atomic_write_with", lambda *a: (_ for _ in ()).throw(OSError(30, "Read-only")))
    for _ in range(2):  # two runs: was one more isoconv-kernels-* folder each time
        lib = fresh_library()
        assert lib.load() is not None and not lib.failed
    assert list((tmp_path / "tmp").iterdir()) == []
    assert list(cache.glob("*.so")) == []


def test_a_failed_private_build_leaves_no_temporary_folder_and_falls_back(one_build, cache, tmp_path, monkeypatch):
    built(cache, one_build).chmod(0o777)

    def broken(compiler, flags, source, output):
        output.write_bytes(b"half")
        raise subprocess.SubprocessError("cc failed: error")
    monkeypatch.setattr(compiled, "compile_c", broken)
    with captured_logs("isoconv.models.compiled") as logs:
        lib = fresh_library()
        assert lib.load() is None and lib.failed
    assert "cannot build the CPU kernels in depthwise_grad.c (cc failed: error)" in logs[-1]
    assert list((tmp_path / "tmp").iterdir()) == []
