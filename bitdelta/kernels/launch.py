"""Launching Triton and Gluon kernels with less host time than `kernel[grid](...)` (GPU only).

An eager serving step (any step carrying prompt tokens) launches hundreds of kernels from Python,
and the GPU waits on the host (docs/kernels.md). Triton's `JITFunction.run` costs tens of
microseconds of host time a launch, more than many of the kernels it launches: besides binding the
arguments it re-parses options, builds a string cache key, checks the globals the kernel read and
prepares launch hooks every call. `fast(kernel)[grid](*args, **kwargs)` keeps
Triton's own argument binder, which computes each argument's specialisation (dtype, 16-byte
alignment, divisibility: what selects a compiled binary), looks the compiled kernel up by that
specialisation and the launch options, and calls its launcher directly. The first launch of each
specialisation, and every launch while a launch hook is registered (profilers such as proton), goes
through `JITFunction.run`, which compiles and caches as usual. The key holds what Triton's holds
(specialisation, launch options, `debug`, the instrumentation mode); not checked per launch: the
kernel's pre-run hooks and its used globals (the package sets neither).

It relies on two Triton internals (3.6): `JITFunction.device_caches[device]` ends with the binder,
and a compiled kernel's `run(grid x, y, z, stream, function, metadata, launch metadata, enter hook,
exit hook, *args)`; the GPU tests launch every kernel through it. Where the JIT function has no
binder (the interpreter), `fast(kernel)` is the kernel itself.
"""

from __future__ import annotations

import functools

from triton import knobs
from triton.runtime.driver import driver


class FastLaunch:
    def __init__(self, fn) -> None:
        self.fn = fn
        self.kernels: dict[tuple, tuple] = {}

    def __getitem__(self, grid: tuple[int, ...]):
        return functools.partial(self.launch, grid)

    def launch(self, grid: tuple[int, ...], *args, **kwargs) -> None:
        # the options JITFunction.run adds before binding: they select the binary too (debug, proton's instrumentation)
        kwargs["debug"] = kwargs.get("debug", self.fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        device = driver.active.get_current_device()
        bound, specialization, options = self.fn.device_caches[device][-1](*args, **kwargs)
        key = (device, *specialization, *options.items())
        entry = self.kernels.get(key)
        if entry is None or _hooks_registered():
            kernel = self.fn[grid](*args, **kwargs)
            if hasattr(kernel, "result"):  # an asynchronous compile
                kernel = kernel.result()
            if kernel is not None and not _hooks_registered():
                self.kernels[key] = (kernel.run, kernel.function, kernel.packed_metadata)
            return
        run, function, metadata = entry
        grid = (*grid, 1, 1)
        run(grid[0], grid[1], grid[2], driver.active.get_current_stream(device), function, metadata, None, None, None,
            *bound.values())


def _hooks_registered() -> bool:
    # Triton 3.6 keeps the hooks in HookChains, never None: only their registered calls count
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return any(hook is not None and bool(getattr(hook, "calls", True)) for hook in hooks)


_launchers: dict[int, object] = {}  # by id: hashing a JITFunction hashes its source key under a lock


def fast(fn):
    """`fn` (a @triton.jit or @gluon.jit kernel) with the fast launch path, where this Triton has it."""
    launcher = _launchers.get(id(fn))
    if launcher is None:
        binder = callable(getattr(fn, "create_binder", None)) and hasattr(fn, "device_caches")
        launcher = _launchers[id(fn)] = FastLaunch(fn) if binder else fn
    return launcher
