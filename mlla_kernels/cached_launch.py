"""Launching Triton kernels with less host work per call.

Triton's `kernel[grid](...)` re-derives the specialisation (argument types, 16-byte alignment of
pointers and integers, integers equal to 1) and its cache key on every call: tens of microseconds
of host time per launch, more than the whole GPU work of a kernel at the small stages, paid by
every eager (not CUDA-graphed) training step. `launch` keeps the compiled kernel of each
specialisation and calls its own launcher directly after the first launch.
"""
import os
import warnings

import torch


class CachedLauncher:
    """fn[grid](*args, **constexprs), minus JITFunction.run's per-call work after the first.

    The first launch of a specialisation goes through Triton and returns its compiled kernel;
    later launches with the same specialisation (key computed below, at least as fine as
    Triton's) call that kernel's own launcher with the same argument list JITFunction.run passes
    (all parameters, constexprs included, grid padded to 3 dimensions). If the compiled kernel
    does not look as expected, every launch takes the ordinary path; if a cached launch raises,
    the cache is switched off for the process (with a warning) and the launch is redone the
    ordinary way. MLLA_CACHED_LAUNCH=0 switches it off up front.
    """

    enabled = os.environ.get("MLLA_CACHED_LAUNCH", "1") != "0"
    hits = 0

    def __init__(self, fn):
        self.fn = fn
        self.name = getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", type(fn).__name__)
        self.compiled = {}
        names = list(getattr(fn, "arg_names", []))
        params = list(getattr(fn, "params", []))
        self.constexpr_names = [p.name for p in params if p.is_constexpr]
        self.n_runtime = len(names) - len(self.constexpr_names)
        # Per runtime parameter, whether Triton specialises on its value: a do_not_specialize int's
        # value stays out of the key, which is then exactly as fine as Triton's for it.
        self.specialised = tuple(not getattr(p, "do_not_specialize", False) for p in params if not p.is_constexpr)
        if len(self.specialised) != self.n_runtime:  # no parameter list to read: key every value
            self.specialised = (True,) * self.n_runtime

    @staticmethod
    def _spec(arg, specialised: bool = True):
        if isinstance(arg, torch.Tensor):
            return (arg.dtype, arg.data_ptr() % 16 == 0)
        if isinstance(arg, bool):
            return ("b", arg)
        if isinstance(arg, int):
            if not specialised:
                return (-2 ** 31 <= arg < 2 ** 31,)
            return (arg == 1, arg % 16 == 0, -2 ** 31 <= arg < 2 ** 31)
        return (type(arg), arg)

    def __call__(self, grid, args, num_warps, num_stages=None, max_registers=None, **constexprs):
        options = dict(num_warps=num_warps)
        if num_stages is not None:
            options.update(num_stages=num_stages)
        if max_registers is not None:
            options.update(maxnreg=max_registers)
        if not CachedLauncher.enabled or len(args) != self.n_runtime:
            return self.fn[grid](*args, **options, **constexprs)
        const_values = tuple(constexprs[name] for name in self.constexpr_names)
        key = (tuple(self._spec(a, specialised) for a, specialised in zip(args, self.specialised)), const_values,
               num_warps, num_stages, max_registers, torch.cuda.current_device())
        kernel = self.compiled.get(key)
        if kernel is not None:
            grid3 = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
            try:
                kernel[grid3](*args, *const_values)
                CachedLauncher.hits += 1
                return
            except Exception as exc:  # keep working, say so: the ordinary path below redoes it
                CachedLauncher.enabled = False
                warnings.warn(f"mlla_kernels: cached Triton relaunch failed ({type(exc).__name__}: {exc}); "
                              f"using Triton's ordinary launch path from now on")
        kernel = self.fn[grid](*args, **options, **constexprs)
        if CachedLauncher.enabled and hasattr(kernel, "packed_metadata") and hasattr(kernel, "__getitem__"):
            self.compiled[key] = kernel
            int_specs = [(a == 1, a % 16 == 0) for a, specialised in zip(args, self.specialised)
                         if type(a) is int and specialised]
            _SPECIALISATIONS.append(f"{self.name} {constexprs} warps={num_warps} "
                                    f"stages={num_stages} maxnreg={max_registers} ints(==1, %16)={int_specs}")


_LAUNCHERS = {}
_SPECIALISATIONS = []  # what each new specialisation was, in launch order


def launch(fn, grid, args: tuple, num_warps: int, num_stages: int = None, max_registers: int = None,
           **constexprs) -> None:
    """fn[grid](*args, num_warps=num_warps, num_stages=num_stages, maxnreg=max_registers, **constexprs),
    args being every runtime parameter in order (None: Triton's default); through CachedLauncher for
    CUDA tensors, the ordinary way in the interpreter (which has no registers to cap)."""
    if args[0].device.type != "cuda":
        fn[grid](*args, num_warps=num_warps, **constexprs)
        return
    launcher = _LAUNCHERS.get(fn)
    if launcher is None:
        launcher = _LAUNCHERS[fn] = CachedLauncher(fn)
    launcher(grid, args, num_warps, num_stages, max_registers, **constexprs)


def specialisation_count() -> int:
    """Kernel specialisations launched through `launch` so far in this process: each one went
    through Triton's own launch path at its first launch, a compile (or a load from Triton's disk
    cache) unless Triton's coarser key had it already."""
    return len(_SPECIALISATIONS)


def specialisations(start: int = 0) -> list:
    """Descriptions of the specialisations from the `start`-th on: kernel, constexprs, launch
    options and the (== 1, % 16) pattern of its integer arguments."""
    return _SPECIALISATIONS[start:]
