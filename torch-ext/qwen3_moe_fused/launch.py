"""Kernel launches: Triton's JIT path once per launch plan, then the compiled kernel's own launcher.

``kernel[grid](...)`` spends ~50 µs of Python per launch on the H200's host before its C launcher runs
(benchmarks/NOTES.md 21): it binds and specialises every argument, looks the compiled kernel up, reads its knobs
and builds launch metadata. ``launch(kernel, grid, ...)`` takes that path once per *plan key* — the current
device, every non-tensor argument by value and type, every tensor argument's dtype and address modulo 16, the launch
options — keeps the ``CompiledKernel`` Triton returns, and launches it through its launcher for every later call
with the same key. Triton specialises an int on properties of its value and a pointer on its dtype and 16-byte
alignment, so equal keys are calls Triton would send to the same compiled kernel; the launcher then gets the
call's own values (tensor addresses as ints).

Triton 3.6's calling convention of the launcher is what this relies on: other versions, the interpreter, and
launches while a Triton launch hook is set (profilers such as proton) take Triton's path every time (a version
other than 3.6 says so once). An argument that is a tensor at a kernel's first launch stays one (the key function
is made for them); a call that breaks this is refused.
"""

import inspect
import logging

import torch

logger = logging.getLogger(__name__)

_TESTED = "3.6."  # Triton versions whose launcher convention the plans follow
_MAX_PLANS = 1024  # per kernel; past it the plans start over (e.g. many distinct sequence lengths)


class Kernel:
    """One Triton kernel's plans. ``kernel``: a ``JITFunction`` (what is used of it: ``fn``, ``arg_names``,
    ``__name__``, and ``kernel[grid](...)`` returning its ``CompiledKernel``); ``device`` and ``stream``: functions
    giving the current device and its raw stream; ``hooks``: a function that says whether a launch hook is set."""

    def __init__(self, kernel, device, stream, hooks):
        self.kernel = kernel
        self.device, self.stream, self.hooks = device, stream, hooks
        self.plans = {}
        self.key_of = None  # made at the first launch, when the tensor arguments are known
        self.kinds = None  # each argument's kind ("tensor", or its Python type) at the first launch
        self.jit_launches = 0  # launches that went through Triton's JIT path (tests and benchmarks read it)

    def __call__(self, grid, *args, **kwargs):
        if self.hooks():
            self.jit_launches += 1
            return self.kernel[grid](*args, **kwargs)
        if self.key_of is None:
            self.key_of, self.kinds = _key_function(self.kernel, args, kwargs, self.device)
        try:
            key, values = self.key_of(*args, **kwargs)
        except AttributeError:  # no data_ptr: an argument that was a tensor is not
            self._check_kinds(args, kwargs)
            raise
        plan = self.plans.get(key)
        if plan is None:  # launched through Triton, which gives the plan
            return self._plan(key, grid, args, kwargs)
        gx, gy, gz = (*grid, 1, 1)[:3]
        plan.run(gx, gy, gz, self.stream(key[0]), plan.function, plan.packed_metadata, None, None, None, *values)

    def _check_kinds(self, args, kwargs):
        kinds = _kinds(self.kernel, args, kwargs)
        changed = [f"{name}: {a} -> {b}" for name, a, b in zip(self.kernel.arg_names, self.kinds, kinds)
                   if (a == "tensor") != (b == "tensor")]
        if changed:
            raise TypeError(f"qwen3-moe-fused: kernel {self.kernel.__name__} was launched with tensors where its first "
                            f"launch had none or none where it had tensors ({', '.join(changed)}); they must stay")

    def _plan(self, key, grid, args, kwargs):
        self._check_kinds(args, kwargs)
        self.jit_launches += 1
        compiled = self.kernel[grid](*args, **kwargs)  # this call's launch, through Triton
        if len(self.plans) >= _MAX_PLANS:
            self.plans.clear()
        self.plans[key] = compiled


def _kinds(kernel, args, kwargs):
    bound = inspect.signature(kernel.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in kernel.arg_names})
    bound.apply_defaults()
    return tuple("tensor" if isinstance(v, torch.Tensor) else type(v) for v in bound.arguments.values())


def _key_function(kernel, args, kwargs, device):
    """A function of the kernel's arguments (and launch options) returning (plan key, launcher arguments), made
    as straight-line code for the tensor arguments of this first call, as Triton makes its binder."""
    kinds = _kinds(kernel, args, kwargs)
    params = inspect.signature(kernel.fn).parameters.values()
    signature, keys, values, body = [], ["_device()"], [], []
    namespace = {"_device": device}
    for i, (param, kind) in enumerate(zip(params, kinds)):
        name = param.name
        if param.default is inspect.Parameter.empty:
            signature.append(name)
        else:
            signature.append(f"{name}=_default{i}")
            namespace[f"_default{i}"] = param.default
        if kind == "tensor":
            body.append(f"    _p{i} = {name}.data_ptr()")
            keys += [f"{name}.dtype", f"_p{i} & 15"]
            values.append(f"_p{i}")
        else:  # by value and type (1, 1.0 and True are equal keys)
            keys += [name, f"{name}.__class__"]
            values.append(name)
    source = "\n".join([f"def key_of({', '.join(signature)}, **options):", *body,
                        f"    return ({', '.join(keys)}, *options.items()), ({', '.join(values)},)"])
    exec(compile(source, f"<launch plan key of {kernel.__name__}>", "exec"), namespace)
    return namespace["key_of"], kinds


_kernels: dict = {}  # JITFunction -> its Kernel
_fallback_said = False


def _jit_path(kernel):
    return lambda grid, *args, **kwargs: kernel[grid](*args, **kwargs)


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` for a Triton kernel (``kwargs`` may hold launch options such as
    num_warps), through its launch plans where this Triton supports them."""
    planned = _kernels.get(kernel)
    if planned is None:
        planned = _kernels[kernel] = _new(kernel)
    planned(grid, *args, **kwargs)


def _new(kernel):
    global _fallback_said
    import triton
    from triton import knobs
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel, JITFunction):  # the interpreter's InterpretedFunction
        return _jit_path(kernel)
    if not triton.__version__.startswith(_TESTED):
        if not _fallback_said:
            _fallback_said = True
            logger.warning("qwen3-moe-fused: Triton %s: every kernel launch takes Triton's own launch path (launch "
                           "plans follow Triton %sx's launcher; ~40 µs more host time per launch)",
                           triton.__version__, _TESTED)
        return _jit_path(kernel)
    driver = triton.runtime.driver.active
    runtime = knobs.runtime
    return Kernel(kernel, driver.get_current_device, driver.get_current_stream,
                  lambda: bool(runtime.launch_enter_hook.calls or runtime.launch_exit_hook.calls))


def jit_launches() -> int:
    """Launches so far that took Triton's JIT path (a plan's first launch, or every launch without plans)."""
    return sum(k.jit_launches for k in _kernels.values() if isinstance(k, Kernel))
