"""mlla_kernels.cached_launch: the host-side shortcut both ops launch their Triton kernels through."""
import pytest
import torch

from mlla_kernels.cached_launch import CachedLauncher, specialisation_count, specialisations


class _FakeParam:
    """What CachedLauncher reads of a JITFunction's parameters."""

    def __init__(self, name, is_constexpr, do_not_specialize=False):
        self.name, self.is_constexpr, self.do_not_specialize = name, is_constexpr, do_not_specialize


class _FakeJit:
    """What CachedLauncher reads and calls of a JITFunction: its parameters (name, is_constexpr) and
    fn[grid](*args, num_warps, **constexprs), which records ("jit", grid, args) in calls and
    returns `compiled`."""

    def __init__(self, params, compiled, calls, unspecialised=()):
        self.params = [_FakeParam(name, is_constexpr, name in unspecialised) for name, is_constexpr in params]
        self.arg_names = [p.name for p in self.params]
        self.compiled, self.calls = compiled, calls

    def __getitem__(self, grid):
        def run(*args, num_warps, **constexprs):
            self.calls.append(("jit", grid, args))
            return self.compiled
        return run


class _RecordingCompiled:
    """A compiled kernel whose launcher records ("cached", grid, args) in calls."""
    packed_metadata = None

    def __init__(self, calls):
        self.calls = calls

    def __getitem__(self, grid):
        return lambda *args: self.calls.append(("cached", grid, args))


def _recording_launcher(monkeypatch, params, calls, unspecialised=()):
    """A CachedLauncher (enabled, device 0) over a fake JITFunction of `params` that records its
    ordinary launches ("jit") and its cached relaunches ("cached") in calls."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(CachedLauncher, "enabled", True)
    return CachedLauncher(_FakeJit(params, _RecordingCompiled(calls), calls, unspecialised=unspecialised))


def test_cached_launch_reuses_a_kernel_only_for_the_same_specialisation(monkeypatch):
    """CachedLauncher relaunches a compiled kernel only when everything Triton specialises on
    (dtypes, 16-byte alignment, ints equal to 1 or divisible by 16, constexprs, warps) matches."""
    calls = []
    launch = _recording_launcher(monkeypatch, [("t", False), ("n", False), ("K", True)], calls)
    count_before = specialisation_count()
    t = torch.zeros(64)
    launch((1,), (t, 32), 4, K=8)
    launch((2,), (t, 48), 4, K=8)             # same specialisation: cached, constexpr appended
    launch((2,), (t, 1), 4, K=8)              # an int equal to 1
    launch((2,), (t, 40), 4, K=8)             # an int not divisible by 16
    launch((2,), (t[1:], 32), 4, K=8)         # a pointer off 16-byte alignment
    launch((2,), (t.double(), 32), 4, K=8)    # another dtype
    launch((2,), (t, 32), 4, K=16)            # another constexpr
    launch((2,), (t, 32), 8, K=8)             # other warps
    assert [c[0] for c in calls] == ["jit", "cached"] + ["jit"] * 6
    # Triton's own launcher indexes grid[0..2] and takes every parameter, constexprs included.
    assert calls[1][1] == (2, 1, 1) and calls[1][2][1:] == (48, 8)
    # Each new specialisation is counted and described: constexprs, warps, the ints' (==1, %16).
    assert specialisation_count() - count_before == 7
    described = specialisations(count_before)
    assert "{'K': 8} warps=4" in described[0] and "(False, True)" in described[0]
    assert "(True, False)" in described[1] and "(False, False)" in described[2]
    assert "{'K': 16}" in described[5] and "warps=8" in described[6]


def test_cached_launch_leaves_unspecialised_ints_out_of_its_key(monkeypatch):
    """An int Triton does not specialise on (do_not_specialize) does not split the cache: any value
    relaunches the kernel compiled first, as Triton would; the other ints still do."""
    calls = []
    launch = _recording_launcher(monkeypatch, [("t", False), ("n", False), ("m", False), ("K", True)], calls,
                                 unspecialised=("n",))
    t = torch.zeros(64)
    for n in (32, 1, 41, 2 ** 20):
        launch((1,), (t, n, 32), 4, K=8)
    launch((1,), (t, 41, 33), 4, K=8)    # the specialised int changes: a new specialisation
    assert [c[0] for c in calls] == ["jit", "cached", "cached", "cached", "jit"]
    assert calls[2][2][1] == 41


def test_the_attention_kernels_leave_their_sizes_unspecialised():
    from mlla_kernels.triton import backward, forward
    from mlla_kernels.triton._common import UNSPECIALISED_SIZES
    for kernel in (forward.kv_state_kernel, forward.output_kernel, backward.query_grad_state_kernel,
                   backward.key_value_grad_kernel):
        if hasattr(kernel, "params"):  # a JITFunction
            unspecialised = {p.name for p in kernel.params if p.do_not_specialize}
        else:  # the interpreter's stand-in keeps the decorator's arguments
            unspecialised = set(kernel.kwargs["do_not_specialize"])
        assert unspecialised == set(UNSPECIALISED_SIZES), (kernel.fn.__name__, unspecialised)


def test_cached_launch_failure_falls_back_to_triton(monkeypatch):
    calls = []

    class BrokenCompiled:
        packed_metadata = None

        def __getitem__(self, grid):
            def runner(*args):
                raise IndexError("launcher signature changed")
            return runner

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(CachedLauncher, "enabled", True)
    launch = CachedLauncher(_FakeJit([("t", False)], BrokenCompiled(), calls))
    t = torch.zeros(4)
    launch((1,), (t,), 4)
    with pytest.warns(UserWarning, match="cached Triton relaunch failed"):
        launch((1,), (t,), 4)
    launch((1,), (t,), 4)
    assert [c[0] for c in calls] == ["jit"] * 3 and not CachedLauncher.enabled


def _dwconv_step():
    from mlla_kernels.dwconv import dwconv3x3_tokens
    x = torch.randn(2, 9 * 11, 64, device="cuda", requires_grad=True)
    weight = torch.randn(64, 1, 3, 3, device="cuda", requires_grad=True)
    bias = torch.randn(64, device="cuda", requires_grad=True)
    out = dwconv3x3_tokens(x, weight, bias, (9, 11), "residual")
    torch.autograd.grad(out, [x, weight, bias], torch.ones_like(out))


def _attention_step():
    from mlla_kernels.triton import linear_attention_triton
    qk = torch.randn(2, 9 * 11, 128, device="cuda", requires_grad=True)
    v = torch.randn(2, 9 * 11, 64, device="cuda", requires_grad=True)
    out = linear_attention_triton(qk, v, (9, 11), 2)
    torch.autograd.grad(out, [qk, v], torch.ones_like(out))


@pytest.mark.gpu
@pytest.mark.parametrize("step", [_dwconv_step, _attention_step], ids=["dwconv", "attention"])
def test_gpu_cached_launch_is_used(step):
    """From the second call on, each op's kernels are relaunched through the cache, and the
    relaunch has not failed (a failure switches it off with a warning)."""
    step()
    hits = CachedLauncher.hits
    step()
    assert CachedLauncher.enabled, "the cached relaunch failed and was switched off (see the warning)"
    assert CachedLauncher.hits > hits
