"""The linear-attention op's input checks (mlla_kernels/checks.py) and the import graph of
mlla_kernels that keeps them in one place."""
import ast
import os
import re

import pytest
import torch

import mlla_kernels
from mlla_kernels import apply_rope, linear_attention, rope_angles
from mlla_kernels.triton import linear_attention_triton

# The kernels run on the CPU only under the interpreter (tests/conftest.py sets it without a GPU).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

PACKAGE_DIR = os.path.dirname(mlla_kernels.__file__)


def _module_name(path):
    relative = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[:-len(".py")]
    parts = relative.split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name):
    base = os.path.join(os.path.dirname(PACKAGE_DIR), *name.split("."))
    return os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__init__.py"))


def mlla_kernels_imports():
    """{module: set of mlla_kernels modules it imports}, function-level imports included."""
    graph = {}
    for directory, _, filenames in os.walk(PACKAGE_DIR):
        for filename in filenames:
            if not filename.endswith(".py"):
                continue
            path = os.path.join(directory, filename)
            module = _module_name(path)
            package = module if filename == "__init__.py" else module.rsplit(".", 1)[0]
            with open(path) as source:
                tree = ast.parse(source.read())
            imported = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    imported |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom):
                    base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                    base = ".".join(base + ([node.module] if node.module else []))
                    # `from . import kernels` names a module; `from .rope import apply_rope` does not
                    submodules = {f"{base}.{alias.name}" for alias in node.names}
                    imported |= {name for name in submodules if _is_module(name)} or {base}
            graph[module] = {name for name in imported if name.split(".")[0] == "mlla_kernels"} - {module}
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules, or None."""
    visiting, done = [], set()

    def visit(module):
        if module in visiting:
            return visiting[visiting.index(module):] + [module]
        if module in done:
            return None
        visiting.append(module)
        for imported in sorted(graph.get(module, ())):
            cycle = visit(imported)
            if cycle:
                return cycle
        visiting.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module)
        if cycle:
            return cycle
    return None


def test_import_graph_finds_a_cycle_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_mlla_kernels_imports_are_one_way():
    graph = mlla_kernels_imports()
    assert "mlla_kernels.triton" in graph["mlla_kernels.linear_attention"]  # the scan sees function-level imports
    assert "mlla_kernels.checks" in graph["mlla_kernels.triton.launch"]
    assert "mlla_kernels.dwconv.kernels" in graph["mlla_kernels.dwconv.op"]  # `from . import kernels`
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    assert graph["mlla_kernels.checks"] == set()  # the checks depend on nothing of the package


# Two negative sides multiply to a valid N and used to fail deep inside (torch.arange).
NON_POSITIVE_HW_SHAPES = [(-3, -4), (-1, -12), (0, 5), (4, 0), (-4, 3)]


def _non_positive_sides_message(hw_shape):
    return re.escape(f"hw_shape's sides must be positive integers, got {hw_shape!r}")


@pytest.mark.parametrize("hw_shape", NON_POSITIVE_HW_SHAPES)
@pytest.mark.parametrize("impl", ["reference", "triton", "auto"])
def test_linear_attention_refuses_non_positive_hw_sides(impl, hw_shape):
    qk, v = torch.randn(2, 12, 16, device=DEVICE), torch.randn(2, 12, 8, device=DEVICE)
    with pytest.raises(ValueError, match=_non_positive_sides_message(hw_shape)):
        linear_attention(qk, v, hw_shape, 2, impl=impl)


@pytest.mark.parametrize("hw_shape", NON_POSITIVE_HW_SHAPES)
def test_triton_entry_point_refuses_non_positive_hw_sides(hw_shape):
    qk, v = torch.randn(2, 12, 16, device=DEVICE), torch.randn(2, 12, 8, device=DEVICE)
    with pytest.raises(ValueError, match=_non_positive_sides_message(hw_shape)):
        linear_attention_triton(qk, v, hw_shape, 2)


@pytest.mark.parametrize("hw_shape", [(-3, -4), (0, 5)])
def test_rope_refuses_non_positive_hw_sides(hw_shape):
    with pytest.raises(ValueError, match=_non_positive_sides_message(hw_shape)):
        rope_angles(hw_shape, 8)
    with pytest.raises(ValueError, match=_non_positive_sides_message(hw_shape)):
        apply_rope(torch.randn(1, 12, 8), hw_shape)


def test_hw_shape_as_size_or_index_likes_still_works():
    qk, v = torch.randn(1, 12, 16), torch.randn(1, 12, 8)
    expected = linear_attention(qk, v, (3, 4), 2, impl="reference")
    for hw_shape in (torch.Size([3, 4]), [3, 4], (torch.tensor(3), torch.tensor(4))):
        assert torch.equal(linear_attention(qk, v, hw_shape, 2, impl="reference"), expected)
