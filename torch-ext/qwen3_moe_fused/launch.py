"""Kernel launches: Triton's JIT path once per launch plan, then the compiled kernel's own launcher.

``kernel[grid](...)`` spends ~40–60 µs of Python per launch on the H200's host before its C launcher runs
(benchmarks/NOTES.md 21): it binds and specialises every argument, looks the compiled kernel up, reads its knobs
and builds launch metadata. ``launcher(kernel)(grid, ...)`` takes that path once per *plan key* — the current
device, every non-tensor argument by value and type, every tensor argument's dtype and address modulo 16, the
launch options — keeps the ``CompiledKernel`` Triton returns, and launches it through its launcher for every later
call with the same key. Triton specialises an int on properties of its value and a pointer on its dtype and
16-byte alignment, so equal keys are calls Triton would send to the same compiled kernel; the launcher then gets
the call's own values (tensor addresses as ints). The key is computed by a function made for each kernel at its
first launch, straight-line code over its arguments, as Triton makes its binder.

Triton 3.6's calling convention of the launcher is what this relies on: other versions, the interpreter, launches
while a Triton launch hook is set (profilers such as proton), and launches inside ``jit_path()`` take Triton's path
every time (a version other than 3.6 says so once). An argument that is a tensor at a kernel's first launch stays
one; a call that breaks this is refused.
"""

import contextlib
import inspect
import logging

import torch

logger = logging.getLogger(__name__)

_TESTED = "3.6."  # Triton versions whose launcher convention the plans follow
_MAX_PLANS = 1024  # per kernel; past it the plans start over (e.g. many distinct sequence lengths)


class Kernel:
    """One Triton kernel's plans. ``kernel``: a ``JITFunction`` (what is used of it: ``fn``, ``__name__``, and
    ``kernel[grid](...)`` returning its ``CompiledKernel``); ``device`` and ``stream``: functions giving the
    current device and its raw stream; ``hooks``: a function that says whether a launch hook is set.
    ``self.launch(grid, *args, **kwargs)`` launches as ``kernel[grid](*args, **kwargs)`` would."""

    def __init__(self, kernel, device, stream, hooks):
        self.kernel = kernel
        self.device, self.stream, self.hooks = device, stream, hooks
        self.plans = {}
        self.kinds = None  # each argument's kind ("tensor", or its Python type) at the first launch
        self.launch = self._first_launch  # then the function made for this kernel's arguments
        self.jit_launches = 0  # launches that went through Triton's JIT path (tests and benchmarks read it)

    def _first_launch(self, grid, *args, **kwargs):
        bound = inspect.signature(self.kernel.fn).bind(*args, **{k: v for k, v in kwargs.items()
                                                                 if k in self.kernel.arg_names})
        bound.apply_defaults()
        self.kinds = _kinds(bound.arguments.values())
        self.launch = _launch_function(self)
        self.launch(grid, *args, **kwargs)

    def jit(self, key, grid, args, options):
        """This call's launch through Triton (``args``: every argument, in order), whose compiled kernel becomes the
        plan of ``key`` (None: no plan, e.g. while a launch hook is set)."""
        kinds = _kinds(args)
        changed = [f"{name}: {a} -> {b}" for name, a, b in zip(self.kernel.arg_names, self.kinds, kinds)
                   if (a == "tensor") != (b == "tensor")]
        if changed:
            raise TypeError(f"qwen3-moe-fused: kernel {self.kernel.__name__} was launched with tensors where its first "
                            f"launch had none or none where it had tensors ({', '.join(changed)}); they must stay")
        self.jit_launches += 1
        compiled = self.kernel[grid](*args, **options)
        if key is not None:
            if len(self.plans) >= _MAX_PLANS:
                self.plans.clear()
            self.plans[key] = compiled


def _kinds(values):
    return tuple("tensor" if isinstance(v, torch.Tensor) else type(v) for v in values)


def _launch_function(planned):
    """``launch(grid, <the kernel's arguments>, **options)`` for ``planned``'s kernel: the plan key (tensors at
    the positions where the first launch had them), then the plan's launcher or, for a new key, ``planned.jit``."""
    kernel = planned.kernel
    params = list(inspect.signature(kernel.fn).parameters.values())
    signature, names, keys, values, pointers = [], [], ["_device()"], [], []
    namespace = {"_device": planned.device, "_stream": planned.stream, "_hooks": planned.hooks,
                 "_plans": planned.plans, "_jit": planned.jit}
    for i, (param, kind) in enumerate(zip(params, planned.kinds)):
        name = param.name
        names.append(name)
        if param.default is inspect.Parameter.empty:
            signature.append(name)
        else:
            signature.append(f"{name}=_default{i}")
            namespace[f"_default{i}"] = param.default
        if kind == "tensor":
            pointers.append(f"_p{i} = {name}.data_ptr()")
            keys += [f"{name}.dtype", f"_p{i} & 15"]
            values.append(f"_p{i}")
        else:  # by value and type (1, 1.0 and True are equal keys)
            keys += [name, f"{name}.__class__"]
            values.append(name)
    args = f"({', '.join(names)},)"
    source = f"""
def launch(grid, {', '.join(signature)}, **options):
    if _hooks():
        return _jit(None, grid, {args}, options)
    try:
        {'; '.join(pointers) or 'pass'}
    except AttributeError:  # an argument that was a tensor is not: _jit says which
        return _jit(None, grid, {args}, options)
    key = ({', '.join(keys)}, *options.items())
    plan = _plans.get(key)
    if plan is None:
        return _jit(key, grid, {args}, options)
    gx, gy, gz = (*grid, 1, 1)[:3]
    plan.run(gx, gy, gz, _stream(key[0]), plan.function, plan.packed_metadata, None, None, None, {', '.join(values)})
"""
    exec(compile(source, f"<launch plans of {kernel.__name__}>", "exec"), namespace)
    return namespace["launch"]


_kernels: dict = {}  # id(JITFunction) -> its launch function (plans, or Triton's path)
_fallback_said = False
_plans_on = True


def launcher(kernel):
    """The function launching a Triton kernel: ``launcher(kernel)(grid, *args, **kwargs)`` does what
    ``kernel[grid](*args, **kwargs)`` does (``kwargs`` may hold launch options such as num_warps), through launch
    plans where this Triton supports them. (Returned rather than called, so the arguments are bound once.)"""
    if not _plans_on:
        return _TritonPath(kernel).launch
    planned = _kernels.get(id(kernel))
    if planned is None:
        planned = _kernels[id(kernel)] = _new(kernel)
    return planned.launch


@contextlib.contextmanager
def jit_path():
    """Within the block every launch takes Triton's own path, and no plan is made (benchmarks time the two side by
    side; tests/hopper_compile.py records launches at ``JITFunction.run`` without a GPU)."""
    global _plans_on
    saved, _plans_on = _plans_on, False
    try:
        yield
    finally:
        _plans_on = saved


class _TritonPath:
    def __init__(self, kernel):
        self.kernel = kernel

    def launch(self, grid, *args, **kwargs):
        self.kernel[grid](*args, **kwargs)


def _new(kernel):
    global _fallback_said
    import triton
    from triton import knobs
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel, JITFunction):  # the interpreter's InterpretedFunction
        return _TritonPath(kernel)
    if not triton.__version__.startswith(_TESTED):
        if not _fallback_said:
            _fallback_said = True
            logger.warning("qwen3-moe-fused: Triton %s: every kernel launch takes Triton's own launch path (launch "
                           "plans follow Triton %sx's launcher; ~50 µs more host time per launch on an H200's host)",
                           triton.__version__, _TESTED)
        return _TritonPath(kernel)
    driver = triton.runtime.driver.active
    runtime = knobs.runtime
    return Kernel(kernel, driver.get_current_device, driver.get_current_stream,
                  lambda: bool(runtime.launch_enter_hook.calls or runtime.launch_exit_hook.calls))


def jit_launches() -> int:
    """Launches so far that took Triton's JIT path through a ``Kernel`` (a plan's first launch, launches under a
    hook); launches inside ``jit_path()`` or without plans are not counted."""
    return sum(k.jit_launches for k in _kernels.values() if isinstance(k, Kernel))
