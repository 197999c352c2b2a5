"""torch.compile's 'cudagraphs' backend, recording one CUDA graph per input shape under dynamic shapes.

torch's own 'cudagraphs' backend builds its CUDA-graph wrapper (``cudagraph_trees.cudagraphify_impl``)
at compile time, from the fake example inputs. With ``dynamic=True`` their sizes are symbolic, not
ints, so the wrapper finds no size to key its recordings on: it records a graph at the first call
and replays it for every later shape, which fails as soon as a shape changes ("The size of tensor
a (192) must match the size of tensor b (288)", in ``_copy_inputs_and_remove_from_src``; seen with
torch 2.11 on an H100; pytorch/pytorch#131009). Inductor's 'reduce-overhead' mode builds the same
wrapper at the first real call instead, where the sizes are ints, and records one graph per size.

``cudagraphs_per_shape`` does that for the 'cudagraphs' backend: while torch's backend sets itself up
it hands the backend a wrapper factory that waits for real inputs and builds one of torch's wrappers
per distinct set of input shapes and int inputs. The graphs themselves are torch's (CUDA-graph
trees, one memory pool, ``cudagraph_mark_step_begin``)."""
from typing import Any, Callable, Sequence

import torch

__all__ = ['cudagraphs_per_shape', 'shape_key']


def shape_key(inputs: Sequence[Any]) -> tuple:
    """What tells two calls' recordings apart: every tensor's shape and every int's value."""
    return tuple(tuple(value.shape) if isinstance(value, torch.Tensor)
                 else value if isinstance(value, int) else None
                 for value in inputs)


def _deferred_per_shape(cudagraphify_impl: Callable) -> Callable:
    """A stand-in for ``cudagraphify_impl(model, example_inputs, static_input_idxs, **options)``
    that ignores the example inputs and builds torch's wrapper once per shape key, from real inputs."""

    def cudagraphify_when_called(model, example_inputs, static_input_idxs, *args, **kwargs):
        del example_inputs  # fake tensors with symbolic sizes: nothing to key on
        wrappers = {}

        def run(inputs):
            key = shape_key(inputs)
            wrapper = wrappers.get(key)
            if wrapper is None:
                wrapper = wrappers[key] = cudagraphify_impl(model, inputs, static_input_idxs, *args, **kwargs)
            return wrapper(inputs)

        run._boxed_call = True  # called with the list of inputs, which it may clear
        return run

    return cudagraphify_when_called


def _check_backend_imports_impl(backend: Callable) -> None:
    # torch's backend imports cudagraphify_impl inside its body, so the forward and backward
    # compilers it defines (the backward's compiled lazily, at the first backward) keep whatever the
    # module held when the backend was called. Anything else and the stand-in would not be seen.
    if 'cudagraphify_impl' not in backend.__code__.co_names:
        raise RuntimeError(f"torch {torch.__version__}'s 'cudagraphs' backend no longer imports "
                           f"cudagraphify_impl where cudagraphs_per_shape expects it; use "
                           f"BlockGraphsHook(backend='inductor') with this torch")


def cudagraphs_per_shape(graph_module: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
    """A torch.compile backend: ``torch.compile(fn, dynamic=True, backend=cudagraphs_per_shape)``."""
    import torch._inductor.cudagraph_trees as cudagraph_trees
    from torch._dynamo.backends.cudagraphs import cudagraphs

    _check_backend_imports_impl(cudagraphs)
    real_impl = cudagraph_trees.cudagraphify_impl
    cudagraph_trees.cudagraphify_impl = _deferred_per_shape(real_impl)
    try:
        return cudagraphs(graph_module, example_inputs)
    finally:
        cudagraph_trees.cudagraphify_impl = real_impl
