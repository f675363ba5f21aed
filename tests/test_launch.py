"""Launch plans (``launch.py``): a call reuses a compiled kernel only where Triton would pick the same one, with
the call's own argument values; everything else takes Triton's path.

On CPU against a stand-in for a ``JITFunction`` (the interpreter has no compiled kernels); on the GPU the real
kernels give the same bits through their plans as through Triton's path, and a repeated call takes no JIT launch.
"""

import pytest
import torch

from test_kernels import _qwen3_30b_problem, _run


class FakeJIT:
    """What ``Kernel`` uses of a JITFunction: its Python function, argument names, and ``[grid](...)``, which here
    records the call and returns a compiled kernel whose launcher records its arguments."""

    def __init__(self, fn):
        self.fn, self.__name__ = fn, fn.__name__
        self.arg_names = list(fn.__code__.co_varnames[: fn.__code__.co_argcount])
        self.jit_calls, self.launches = [], []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.jit_calls.append((grid, args, kwargs))
            return Compiled(self.launches, len(self.jit_calls))

        return run


class Compiled:
    def __init__(self, launches, n):
        self.launches, self.function, self.packed_metadata = launches, f"function{n}", f"metadata{n}"

    def run(self, *args):
        self.launches.append(args)


def _kernel_fn(x_ptr, y_ptr, n, scale, BLOCK=64):
    pass


@pytest.fixture
def fake(kernel):
    hooks = []
    jit = FakeJIT(_kernel_fn)
    planned = kernel.launch.Kernel(jit, device=lambda: 0, stream=lambda device: 1234 + device,
                                   hooks=lambda: bool(hooks))
    return jit, planned, hooks


def test_a_plan_is_reused_only_for_the_same_specialisation(fake):
    jit, planned, hooks = fake
    x, y = torch.randn(64), torch.randn(64)
    planned.launch((4,), x, y, 64, 0.5, BLOCK=32, num_warps=4)
    assert len(jit.jit_calls) == 1 and not jit.launches  # the first launch is Triton's
    x2, y2 = torch.randn(64), torch.randn(64)  # other tensors, same dtypes and alignment
    planned.launch((5, 2), x2, y2, 64, 0.5, BLOCK=32, num_warps=4)
    assert len(jit.jit_calls) == 1
    assert jit.launches == [(5, 2, 1, 1234, "function1", "metadata1", None, None, None, x2.data_ptr(), y2.data_ptr(),
                             64, 0.5, 32)]

    def jit_calls_after(*args, **kwargs):
        before = len(jit.jit_calls)
        planned.launch((1,), *args, **kwargs)
        return len(jit.jit_calls) - before

    assert jit_calls_after(x, y, 63, 0.5, BLOCK=32, num_warps=4) == 1  # another int: Triton specialises on it
    assert jit_calls_after(x2, y2, 64, 0.5, BLOCK=32, num_warps=4) == 0  # the first plan is still there
    assert jit_calls_after(x[1:], y[1:], 64, 0.5, BLOCK=32, num_warps=4) == 1  # 4-byte aligned addresses
    assert jit_calls_after(x.double(), y, 64, 0.5, BLOCK=32, num_warps=4) == 1  # another dtype
    assert jit_calls_after(x, y, 64, 0.5, BLOCK=16, num_warps=4) == 1  # another constexpr
    assert jit_calls_after(x, y, 64, 0.5, num_warps=4) == 1  # the constexpr's default (64)
    assert jit_calls_after(x, y, 64, 0.5, BLOCK=32, num_warps=8) == 1  # another launch option
    assert jit_calls_after(x, y, 64, 0.5, BLOCK=32, num_warps=8) == 0
    assert jit.launches[-1][9:] == (x.data_ptr(), y.data_ptr(), 64, 0.5, 32)
    assert planned.jit_launches == len(jit.jit_calls) == 7


def test_launch_hooks_and_changed_argument_kinds_take_or_refuse_the_plan(fake):
    jit, planned, hooks = fake
    x, y = torch.randn(64), torch.randn(64)
    planned.launch((4,), x, y, 64, 0.5)
    planned.launch((4,), x, y, 64, 0.5)
    hooks.append("profiler")  # a launch hook is set: every launch through Triton, so the hook sees it
    planned.launch((4,), x, y, 64, 0.5)
    planned.launch((4,), x, y, 64, 0.5)
    assert len(jit.jit_calls) == 3 and len(jit.launches) == 1
    hooks.clear()
    planned.launch((4,), x, y, 64.0, 0.5)
    assert len(jit.jit_calls) == 4  # 64.0 == 64, but Triton compiles a float argument for a float
    planned.launch((4,), x, y, 64.0, 0.5)
    assert len(jit.jit_calls) == 4 and len(jit.launches) == 2
    with pytest.raises(TypeError, match=r"_kernel_fn .*scale: <class 'float'> -> tensor"):
        planned.launch((4,), x, y, 64, torch.tensor(0.5))
    with pytest.raises(TypeError, match=r"y_ptr: tensor -> <class 'int'>"):
        planned.launch((4,), x, y.data_ptr(), 64, 0.5)


def test_kernels_off_the_tested_triton_take_its_path_and_say_so_once(kernel, monkeypatch, caplog):
    import triton
    from triton.runtime.jit import JITFunction

    launch = kernel.launch
    monkeypatch.setattr(triton, "__version__", "3.7.0")
    monkeypatch.setattr(launch, "_fallback_said", False)
    jit = JITFunction(_kernel_fn)
    with caplog.at_level("WARNING", logger=launch.__name__):
        path = launch._new(jit)
        launch._new(JITFunction(_kernel_fn))
    assert not isinstance(path, launch.Kernel)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "Triton 3.7.0: every kernel launch takes Triton's own launch path" in said[0]


@pytest.mark.gpu
def test_gpu_plans_give_tritons_bits_and_repeat_calls_take_no_jit_launch(kernel):
    from triton import knobs

    leaves, index, grad_out = _qwen3_30b_problem(1024, seed=7)
    planned = _run(kernel, leaves, index, grad_out)  # the first call may tune and make plans
    jit_before = kernel.launch.jit_launches()
    again = _run(kernel, leaves, index, grad_out)
    assert kernel.launch.jit_launches() == jit_before  # every launch of the repeat through its plan

    def hook(*args):
        pass

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        through_triton = _run(kernel, leaves, index, grad_out)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert kernel.launch.jit_launches() > jit_before
    for got in (again, through_triton):
        for a, b in zip((planned[0], *planned[1]), (got[0], *got[1])):
            assert torch.equal(a, b)
