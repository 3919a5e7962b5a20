"""Output layouts (issue 9): Kiln's outputs have the strides eager gives them, from
TensorIterator's rule for elementwise ops (the inputs' layout, channels-last kept) and
contiguous results for reductions and softmax, at every size of symbolic code too. What must
match are the significant strides (PyTorch's `check_significant_strides`: dims longer than 1
of tensors with elements); the tests hold Kiln to that, and to the values."""

import random

import pytest
import torch
import torch_kiln

from graph_fuzz import significant_strides
from kiln_check import close, fresh_script, run_compiled


def same_layout(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    assert significant_strides(got) == significant_strides(want), f"strides {got.stride()} vs eager {want.stride()} for shape {tuple(got.shape)}"


def abba(a, b):
    return a + b - a


def layouts():
    x = torch.arange(6.0)
    return {
        "transposed": torch.rand(3, 4).t(),
        "as_strided": torch.as_strided(x, (2, 3), (1, 2)),
        "channels_last": torch.rand(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "permuted": torch.rand(2, 3, 4).permute(2, 0, 1),
        "sliced": torch.rand(4, 10)[:, ::3].t(),
    }


@pytest.mark.parametrize("name", list(layouts()))
def test_strided_output_preserved(name):
    # PyTorch's own fuser test (test/test_tensorexpr.py) on the layouts of issue 9.
    x = layouts()[name]
    out, _ = run_compiled(fresh_script(abba), (x, x), reference=abba)
    same_layout(out, abba(x, x))


def test_layout_dependent_code_works():
    x = torch.rand(2, 3, 4, 5).to(memory_format=torch.channels_last)
    out, _ = run_compiled(fresh_script(abba), (x, x), reference=abba)
    close(out.permute(0, 2, 3, 1).view(2, -1), abba(x, x).permute(0, 2, 3, 1).view(2, -1))


def mixed(a, b):
    s = torch.softmax(a, -1)
    return a * 2.0 + b, s + b, a.sum(-1, keepdim=True), (a > b).to(torch.float64), torch.where(a > 0, b, a)


def test_each_op_kind_follows_its_rule():
    a = torch.rand(4, 5, 6).permute(1, 2, 0)
    b = torch.rand(6, 4)
    outs, _ = run_compiled(fresh_script(mixed), (a, b), reference=mixed)
    for got, want in zip(outs, mixed(a, b)):
        same_layout(got, want)


def test_symbolic_code_keeps_the_layout_at_every_size():
    fn = fresh_script(abba)
    for batch in (3, 5, 9, 17, 33):
        x = torch.rand(batch, 3, 4, 5).to(memory_format=torch.channels_last)
        for _ in range(2):
            out = fn(x, x)
        same_layout(out, abba(x, x))
        close(out, abba(x, x))
    assert torch_kiln.stats()["symbolic_specializations"] > 0


def _random_view(rng, shape):
    """A tensor of `shape` laid out at random: a permutation, gaps, broadcast dims."""
    order = list(range(len(shape)))
    rng.shuffle(order)
    full = [shape[d] * (2 if rng.random() < 0.3 else 1) for d in order]
    t = torch.randn(full)
    for i, d in enumerate(order):
        if full[i] != shape[d]:
            t = t.narrow(i, 0, shape[d] * 2)[(slice(None),) * i + (slice(None, None, 2),)]
    t = t.permute([order.index(d) for d in range(len(shape))])
    if rng.random() < 0.2 and shape:
        d = rng.randrange(len(shape))
        t = t.narrow(d, 0, 1).expand(shape) if shape[d] > 1 else t
    return t


FUNCTIONS = {
    "add": "def fn(a, b):\n    return a + b\n",
    "scalar": "def fn(a, b):\n    return a * 0.5 + b * 2.0\n",
    "where": "def fn(a, b):\n    return torch.where(a > b, a, b)\n",
    "rsub": "def fn(a, b):\n    return torch.rsub(a, b, alpha=2)\n",
    "unary_cast": "def fn(a, b):\n    return torch.exp(a).to(torch.float64) - b\n",
    "chain": "def fn(a, b):\n    c = torch.sigmoid(a) * b\n    return c + a, torch.relu(b)\n",
    "promote": "def fn(a, b):\n    return a.to(torch.int64) * 2 + b\n",
    "clamp": "def fn(a, b):\n    return torch.clamp(a, b, b + 1.0)\n",
    "leaky_relu": "def fn(a, b):\n    return torch.nn.functional.leaky_relu(a, 0.1) + torch.maximum(a, b)\n",
    "type_as": "def fn(a, b):\n    return a.type_as(b.double()) * 2.0 + 1.0\n",
    "alpha": "def fn(a, b):\n    return torch.add(a, b, alpha=3.0)\n",
    "where_promote": "def fn(a, b):\n    return torch.where(a > 0, a.to(torch.int32), b)\n",
}


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_random_layouts_match_eager(name):
    rng = random.Random(name)
    src = FUNCTIONS[name]
    ns = {"torch": torch}
    exec(src, ns)
    eager = ns["fn"]
    for trial in range(40):
        rank = rng.randint(1, 4)
        shape = [rng.choice([1, 2, 3, 5]) for _ in range(rank)]
        a = _random_view(rng, shape)
        b_shape = shape[rng.randint(0, rank - 1):] if rng.random() < 0.3 else shape
        b = _random_view(rng, [n if rng.random() > 0.2 else 1 for n in b_shape])
        fn = torch.jit.CompilationUnit(src).fn
        for _ in range(3):
            got = fn(a, b)
        want = eager(a, b)
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        for g, w in zip(got, want):
            # float32 inputs go through every function: float64 results carry float32 rounding.
            torch.testing.assert_close(g, w, equal_nan=True, **({"rtol": 1.3e-6, "atol": 1e-5} if g.is_floating_point() else {}))
            same_layout(g, w)
