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
import torch
import torch._dynamo.exc
import torch._inductor.exc

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


def test_truncated_or_others_writable_kernels_are_not_loaded_in_a_real_training_process(data_root, tmp_path):
    """Was: SIGBUS (exit 135) when the second run loaded the truncated library."""
    env = dict(os.environ, ISOCONV_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(SRC))

    def train(out: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "isoconv", *TRAIN, "--data-dir", str(data_root), "--out",
                               str(tmp_path / out)], env=env, capture_output=True, text=True, timeout=600)

    # the cache as a first training run leaves it (built by loading the kernels alone: a training process less)
    build = "from isoconv.models import depthwise; assert depthwise.native.load()"
    first = subprocess.run([sys.executable, "-c", build], env=env, capture_output=True, text=True, timeout=600)
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
    # a kernel others can write is not loaded, whatever it holds: cut again (loading it would kill the process)
    for library in libraries:
        with open(library, "r+b") as f:
            f.truncate(1000)
        library.chmod(0o777)
    third = train("third")
    assert third.returncode == 0, third.stderr[-3000:]
    warnings = [line for line in third.stderr.splitlines() if "not loading the cached CPU kernel" in line]
    assert len(warnings) == len(libraries) and "is writable by others" in warnings[0]
    assert all(library.stat().st_size == 1000 for library in libraries)  # left alone


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


# ---- what enters a C kernel is checked (the op is public: torch.ops.isoconv.depthwise_param_grads)

def reference_param_grads(grad_out, x, k, pad):
    weight = torch.zeros(x.shape[1], 1, k, k, dtype=torch.float64)
    _, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad_out.double(), x.double(), weight, [x.shape[1]], [1, 1], [pad, pad], [1, 1], False, [0, 0], x.shape[1],
        [False, True, True])
    return grad_w, grad_b


@pytest.mark.parametrize("grad_dtype, x_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_mismatched_dtypes_are_an_error_not_a_wrong_number(grad_dtype, x_dtype):
    """Was: NaN for a float32 gradient with a bf16 input, a read past the gradient's buffer the other way round."""
    x = torch.randn(2, 8, 6, 6, dtype=x_dtype)
    grad_out = torch.randn(2, 8, 6, 6, dtype=grad_dtype)
    with pytest.raises(TypeError, match=f"needs grad_out of x's dtype and device, got {grad_dtype} on cpu and "
                                        f"{x_dtype} on cpu"):
        torch.ops.isoconv.depthwise_param_grads(grad_out, x, 3, 3, [1, 1, 1, 1])


@pytest.mark.parametrize("grad_shape", [(2, 8, 4, 4), (2, 8, 6, 7), (1, 8, 6, 6), (2, 4, 6, 6), (2, 8, 36)])
def test_a_gradient_of_the_wrong_shape_is_an_error(grad_shape):
    """Was: a gradient smaller than the input implied writes past the kernel's buffers."""
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"needs (grad_out of shape \(2, 8, 6, 6\)|4-d grad_out)"):
        torch.ops.isoconv.depthwise_param_grads(torch.randn(grad_shape), x, 3, 3, [1, 1, 1, 1])


@pytest.mark.parametrize("pad", [[-1, 1, 1, 1], [1, 1, 1]])
def test_bad_padding_is_an_error(pad):
    x = torch.randn(2, 8, 6, 6)
    with pytest.raises(ValueError, match="4 non-negative paddings"):
        torch.ops.isoconv.depthwise_param_grads(torch.randn(2, 8, 6, 6), x, 3, 3, pad)


def test_a_non_contiguous_gradient_gives_the_right_numbers_through_the_op_and_an_error_at_the_kernel():
    torch.manual_seed(0)
    x = torch.randn(3, 16, 7, 7).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(3, 16, 7, 14)[..., ::2]  # every other column: no dense layout
    assert not grad_out.is_contiguous() and not grad_out.is_contiguous(memory_format=torch.channels_last)
    grad_w, grad_b = torch.ops.isoconv.depthwise_param_grads(grad_out, x, 3, 3, [1, 1, 1, 1])
    want_w, want_b = reference_param_grads(grad_out, x, 3, 1)
    torch.testing.assert_close(grad_w.double(), want_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_b.double(), want_b, rtol=1e-5, atol=1e-5)
    assert depthwise.native.library is not None  # the C kernel computed them
    with pytest.raises(ValueError, match=r"the C kernel needs grad_out as a channels-last contiguous fp32 or bf16 "
                                         r"CPU tensor, got torch.float32 on cpu with strides \(1568, 98, 14, 2\)"):
        depthwise.param_grads_native(grad_out, x, 3, 3, [1, 1, 1, 1])
    with pytest.raises(ValueError, match="the C kernel needs x as a channels-last"):
        depthwise.param_grads_native(grad_out.contiguous(memory_format=torch.channels_last), x.contiguous(), 3, 3,
                                     [1, 1, 1, 1])


def test_the_gelu_kernel_takes_only_what_it_can_read():
    """float64 or contiguous (not channels-last) inputs go to the inductor kernels' eager fallback, never to C."""
    from isoconv.models import act_norm

    a = torch.randn(2, 4, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    calls = []
    real = act_norm._activate_gelu
    act_norm._activate_gelu = lambda t: (calls.append(t.dtype), act_norm.activate_gelu(t))[1]
    try:
        h, slope, *_ = act_norm.gelu_and_channel_sums(a)
    finally:
        act_norm._activate_gelu = real
    assert calls == [torch.float64]
    torch.testing.assert_close(h, torch.nn.functional.gelu(a), rtol=1e-6, atol=1e-6)


# ---- CompiledKernel falls back on compile failures only

def fake_compile(error):
    def compile(fn, **kwargs):
        def run(*args):
            raise error
        return run
    return compile


def test_a_compile_failure_falls_back_after_one_warning(monkeypatch):
    monkeypatch.setattr(torch, "compile", fake_compile(torch._inductor.exc.InvalidCxxCompiler()))
    kernel = compiled.CompiledKernel(lambda t: t * 2, "doubling")
    with captured_logs("isoconv.models.compiled") as logs:
        assert torch.equal(kernel(torch.ones(3)), torch.full((3,), 2.0))
        assert torch.equal(kernel(torch.ones(2)), torch.full((2,), 2.0))
    assert kernel.failed and len(logs) == 1
    assert logs[0].startswith("doubling: torch.compile failed (InvalidCxxCompiler: No working C++ compiler found")


def test_an_error_that_is_not_a_compile_failure_is_raised_and_keeps_the_compiled_path(monkeypatch):
    monkeypatch.setattr(torch, "compile", fake_compile(MemoryError("out of memory")))
    kernel = compiled.CompiledKernel(lambda t: t * 2, "doubling")
    with pytest.raises(MemoryError, match="out of memory"):
        kernel(torch.ones(3))
    assert not kernel.failed


def test_bad_inputs_raise_their_own_error_and_keep_the_compiled_path(monkeypatch):
    monkeypatch.setattr(torch, "compile", fake_compile(torch._dynamo.exc.TorchRuntimeError("shape mismatch")))
    kernel = compiled.CompiledKernel(lambda a, b: a + b, "adding")
    with pytest.raises(RuntimeError, match="must match the size"):
        kernel(torch.ones(3), torch.ones(4))
    assert not kernel.failed


def test_this_round_s_cases_are_documented():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    for name in ("truncated cached kernel", "kernel cache writable by others", "kernel cache of another user",
                 "symlinked cached kernel", "unwritable kernel cache", "kernel op misused",
                 "tracking server unreachable", "tracking folder on another host", "SQLite URI without a file",
                 "unwritable tracking store", "tracking URI forms", "no GPU for gpu-check",
                 "16-bit, float and other image modes", "folder link out of a class", "dangling or looping file link",
                 "Ray request the cluster cannot meet", "Ray sweep stopped", "killed export"):
        assert f"\n| {name} |" in doc, f"docs/errors.md has no row for {name!r}"
