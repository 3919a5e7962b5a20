"""Numbers computed at run time (a scripted module's `float(self.i)`, an int argument) are
kernel parameters: the group takes them as inputs, code does not depend on their value, and
they promote as Python numbers do in eager."""

import torch
import torch_kiln

from kiln_check import run_compiled, script_source


def test_a_module_attribute_as_a_float_stays_in_the_group_and_follows_its_value():
    class Block(torch.nn.Module):
        def __init__(self, i: int):
            super().__init__()
            self.i = i

        def forward(self, x):
            return torch.softmax(torch.nn.functional.gelu(x) + float(self.i), -1) * 2.0

    m = torch.jit.script(Block(3))
    x = torch.randn(4, 33)
    run_compiled(m, (x,), reference=Block(3))
    text = torch_kiln.explain(m)
    assert "[torchscript]" not in text, text
    compiles = torch_kiln.stats()["compiles"]
    m.i = 7  # a new value: the same code, no new specialisation
    for _ in range(2):
        torch.testing.assert_close(m(x), Block(7)(x))
    assert torch_kiln.stats()["compiles"] == compiles


def test_numbers_promote_as_python_numbers():
    fn = script_source(
        "def fn(x, y, a: float, n: int):\n"
        "    return x * a + n, y + n, (y * a).sum(-1), x - a * 0.5\n"
    )
    x, y = torch.randn(5, 6), torch.arange(6, dtype=torch.int32).reshape(2, 3)
    for a, n in [(1.5, 2), (-0.25, -7), (float("inf"), 0)]:
        run_compiled(fn, (x, y, a, n), reference=lambda x, y, a, n: (x * a + n, y + n, (y * a).sum(-1), x - a * 0.5))


def test_an_exponent_computed_at_run_time_stays_in_torchscript():
    # Eager special-cases pow's exponent by value (2: x*x, 0.5: sqrt): left to it.
    fn = script_source("def fn(x, e: float):\n    return torch.pow(x, e) + 1.0\n")
    x = torch.rand(8) + 0.5
    out, _ = run_compiled(fn, (x, 2.0), reference=lambda x, e: torch.pow(x, e) + 1.0, must_compile=False)
    assert "exponent computed at run time" in torch_kiln.explain(fn)
