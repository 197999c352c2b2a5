"""cudagraphs_per_shape builds torch's CUDA-graph wrapper once per input shape under dynamic shapes.

On the CPU there are no CUDA graphs: torch's wrapper factory (cudagraph_trees.cudagraphify_impl) is
replaced by a stand-in that notes what it was built for and runs the graph eagerly, and torch's
backend is told the graph runs on CUDA device 0. torch's own 'cudagraphs' backend under the same
stand-in is the control: it builds one wrapper, from symbolic example inputs, for every shape
(pytorch/pytorch#131009), which is the failure seen on the GPU."""
import pytest
import torch
import torch._dynamo.backends.cudagraphs as torch_cudagraphs_backend
import torch._inductor.cudagraph_trees as cudagraph_trees

from mlla_det.engine.cudagraphs_per_shape import cudagraphs_per_shape, shape_key


def blocks_like(x, weight):
    # Shapes enter through x only, as the canvas's sides enter the compiled blocks.
    return torch.nn.functional.silu(x * weight).cumsum(dim=1).square()


@pytest.fixture
def built_wrappers(monkeypatch):
    """The wrappers torch's backend builds: (is_backward, shape key of the inputs given) each."""
    built = []

    def record_and_run_eagerly(model, inputs, static_input_idxs, *args, is_backward, **kwargs):
        built.append((is_backward, shape_key(inputs)))

        def run(call_inputs):
            return model(call_inputs)
        run._boxed_call = True
        return run

    monkeypatch.setattr(cudagraph_trees, "cudagraphify_impl", record_and_run_eagerly)
    monkeypatch.setattr(torch_cudagraphs_backend, "check_for_skip", lambda *args: None)
    monkeypatch.setattr(torch_cudagraphs_backend, "get_device_index", lambda *args: 0)
    torch._dynamo.reset()
    yield built
    torch._dynamo.reset()


SHAPES = [(2, 12, 5), (2, 20, 5), (2, 12, 5), (2, 28, 5), (2, 20, 5)]


def run_shapes(backend):
    compiled = torch.compile(blocks_like, dynamic=True, backend=backend)
    weight = torch.randn(5, dtype=torch.float64, requires_grad=True)
    for shape in SHAPES:
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        upstream = torch.randn(shape, dtype=torch.float64)
        out = compiled(x, weight)
        grads = torch.autograd.grad(out, (x, weight), upstream)
        expected = blocks_like(x, weight)
        expected_grads = torch.autograd.grad(expected, (x, weight), upstream)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


def test_one_wrapper_per_shape_forward_and_backward(built_wrappers):
    run_shapes(cudagraphs_per_shape)
    for is_backward in (False, True):
        keys = [key for backward, key in built_wrappers if backward == is_backward]
        tensor_shapes = [tuple(k for k in key if isinstance(k, tuple)) for key in keys]
        assert len(keys) == 3, keys  # three distinct shapes, built at their first call each
        assert len(set(keys)) == 3
        assert all(all(isinstance(size, int) for shape in shapes for size in shape) for shapes in tensor_shapes)
    # The real factory is back in place after every compile.
    assert cudagraph_trees.cudagraphify_impl.__name__ == "record_and_run_eagerly"


def test_control_torch_backend_builds_one_wrapper_for_all_shapes(built_wrappers):
    run_shapes("cudagraphs")
    assert sum(1 for backward, _ in built_wrappers if not backward) == 1
    assert sum(1 for backward, _ in built_wrappers if backward) == 1


def test_shape_key():
    assert shape_key([torch.zeros(2, 3), 7, None, torch.zeros(())]) == ((2, 3), 7, None, ())
    assert shape_key([torch.zeros(2, 3)]) != shape_key([torch.zeros(3, 2)])


def test_unknown_torch_backend_layout_is_an_error(monkeypatch):
    def cudagraphs(graph_module, example_inputs):  # a backend that never imports the factory
        return graph_module

    monkeypatch.setattr(torch_cudagraphs_backend, "cudagraphs", cudagraphs)
    with pytest.raises(RuntimeError, match="backend='inductor'"):
        cudagraphs_per_shape(torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph()), [])
