"""In-place ops, splits into parts and optionals that are None (issue 10, item 1).

An in-place op runs in Kiln only where nothing else can see what it writes; everywhere else
it stays in TorchScript and eager's aliasing holds. Each model is checked against eager on
fresh inputs, with the Kiln group asserted to have run."""

from typing import Optional

import pytest
import torch
import torch_kiln


def build(model, args, how):
    return torch.jit.script(model) if how == "script" else torch.jit.trace(model, args, check_trace=False)


def run(model, make_args, how, calls=3):
    """The model's results beside eager's, each call on fresh inputs (in-place ops may write
    them); returns (eager's inputs, Kiln's inputs) after the last call."""
    torch.manual_seed(0)
    args = make_args()
    m = build(model, tuple(a.clone() for a in args), how)
    before = torch_kiln.stats()["kernel_runs"]
    for _ in range(calls):
        mine, theirs = tuple(a.clone() for a in args), tuple(a.clone() for a in args)
        with torch.no_grad():
            want, got = model(*theirs), m(*mine)
        torch.testing.assert_close(got, want)
    assert torch_kiln.stats()["kernel_runs"] > before, torch_kiln.explain(m)
    return m, theirs, mine


@pytest.fixture(autouse=True)
def fresh_counters():
    torch_kiln.reset()


class GateChain(torch.nn.Module):
    """A traced RNN cell's kind of code: in-place activations and products on tensors made
    inside the model."""

    def forward(self, x, y):
        a = x * 2.0
        a.add_(y, alpha=0.5)
        a.sigmoid_()
        b = torch.tanh(y).mul_(a)
        b.sub_(1.0).relu_()
        return a, b


@pytest.mark.parametrize("how", ["script", "trace"])
def test_in_place_ops_on_tensors_made_inside_run_in_kiln(how):
    m, _, _ = run(GateChain(), lambda: (torch.randn(5, 7), torch.randn(5, 7)), how)
    text = torch_kiln.explain(m)
    assert "aten::sigmoid_" in text and "[torchscript]" not in text, text
    assert torch_kiln.stats()["fallbacks"] == {}


class WritesThroughAView(torch.nn.Module):
    def forward(self, x):
        a = x * 2.0
        row = a[0]
        row.add_(1.0)  # writes a: `a + 0.5` below must see it
        return a + 0.5, torch.exp(x)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_a_write_another_op_can_see_stays_in_torchscript(how):
    m, _, _ = run(WritesThroughAView(), lambda: (torch.randn(3, 4),), how)
    assert "writes a tensor other ops can see" in torch_kiln.explain(m)


class WritesItsInput(torch.nn.Module):
    def forward(self, x):
        x.mul_(2.0)
        return x + 1.0


def test_a_write_to_the_callers_tensor_stays_in_torchscript():
    m, theirs, mine = run(WritesItsInput(), lambda: (torch.randn(4, 4),), "script")
    torch.testing.assert_close(mine[0], theirs[0])  # the caller's tensor was written, as in eager


class WritesAWiderType(torch.nn.Module):
    def forward(self, x, y):
        a = x * 2.0
        a.add_(y)  # a stays float32 though y is float64
        return a * 1.5


def test_an_in_place_result_keeps_the_written_tensors_dtype():
    run(WritesAWiderType(), lambda: (torch.randn(3, 5), torch.randn(3, 5, dtype=torch.float64)), "script")


class WritesABroadcastResult(torch.nn.Module):
    def forward(self, x, y):
        a = x * 2.0
        a.add_(y)
        return a


def test_an_in_place_result_larger_than_its_tensor_raises_as_in_eager():
    m = torch.jit.script(WritesABroadcastResult())
    x, y = torch.randn(3, 1), torch.randn(3, 4)
    with pytest.raises(RuntimeError):
        WritesABroadcastResult()(x, y)
    for _ in range(3):
        with pytest.raises(RuntimeError):
            m(x, y)


class Splits(torch.nn.Module):
    def forward(self, x):
        a, b, c = torch.chunk(x, 3, 1)  # 7 columns: 3, 3, 1
        d, e = x.split(2, 0)  # 4 rows: 2, 2
        f, g, h = x.split([1, 4, 2], 1)
        p, q = torch.unsafe_chunk(x * 1.0, 2, 0)
        return a * b.sum(1, keepdim=True) + c, d - e, f + h.sum(1, keepdim=True), torch.relu(g), p * q


@pytest.mark.parametrize("how", ["script", "trace"])
def test_the_parts_of_a_split_are_slices(how):
    m, _, _ = run(Splits(), lambda: (torch.randn(4, 7),), how)
    assert torch_kiln.stats()["fallbacks"] == {}, torch_kiln.explain(m)


class UnpacksTwo(torch.nn.Module):
    def forward(self, x):
        a, b = x.split(3, 1)
        return a * 2.0 + b


def test_a_split_into_more_parts_than_unpacked_raises_as_in_eager():
    m = torch.jit.script(UnpacksTwo())
    for _ in range(3):
        torch.testing.assert_close(m(torch.ones(2, 6)), torch.full((2, 3), 3.0))
    with pytest.raises(Exception):
        UnpacksTwo()(torch.ones(2, 7))
    with pytest.raises(Exception):
        m(torch.ones(2, 7))


class OptionalWeight(torch.nn.Module):
    def forward(self, x, w: Optional[torch.Tensor] = None):
        return torch.nn.functional.layer_norm(x * 2.0, [8], w, None, 1e-5)


def test_an_optional_that_is_none_is_guarded():
    """A run-time optional: Kiln specialises on None, and a call that passes a tensor fails the
    guard (TorchScript runs it) instead of computing without it."""
    torch.manual_seed(0)
    model, x, w = OptionalWeight(), torch.randn(3, 8), torch.randn(8)
    m = torch.jit.script(model)
    for _ in range(3):
        torch.testing.assert_close(m(x), model(x))
    assert torch_kiln.stats()["kernel_runs"] > 0, torch_kiln.explain(m)
    failures = torch_kiln.stats()["guard_failures"]
    torch.testing.assert_close(m(x, w), model(x, w))
    assert torch_kiln.stats()["guard_failures"] == failures + 1
    torch.testing.assert_close(m(x), model(x))
