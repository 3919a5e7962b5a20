"""The pointwise and pooling ops of convolutional networks that need no convolution kernel
(issue 12's first step): batch norm in eval, adaptive average pooling to 1x1, the hard
activations and mish — results, output layouts as eager's, and a frozen block of them run
entirely in Kiln."""

import torch
import torch_kiln

from kiln_check import close, run_compiled, script_source


def test_batch_norm_and_pooling_keep_eagers_layout():
    fn = script_source(
        "def fn(x, m, v, w, b):\n"
        "    y = torch.nn.functional.batch_norm(x, m, v, w, b, False, 0.1, 1e-5)\n"
        "    return y, torch.nn.functional.adaptive_avg_pool2d(y, [1, 1])\n"
    )
    c = 19
    stats = (torch.randn(c), torch.rand(c) + 0.1, torch.randn(c), torch.randn(c))
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(3, c, 7, 5).contiguous(memory_format=layout)
        ref = lambda x, m, v, w, b: (torch.nn.functional.batch_norm(x, m, v, w, b, False, 0.1, 1e-5),  # noqa: E731
                                     torch.nn.functional.adaptive_avg_pool2d(torch.nn.functional.batch_norm(x, m, v, w, b, False, 0.1, 1e-5), [1, 1]))
        out, _ = run_compiled(fn, (x, *stats), reference=ref)
        expected = ref(x, *stats)
        for o, e in zip(out, expected):
            assert o.stride() == e.stride(), (layout, o.stride(), e.stride())


class Block(torch.nn.Module):
    """A mobile network's tail without its convolutions: batch norm, hard-swish, squeeze-
    excitation's gate (pool, hard-sigmoid, scale), pooling, a classifier."""

    def __init__(self, c=24):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(c)
        self.fc = torch.nn.Linear(c, 10)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.normal_()
            self.bn.bias.normal_()

    def forward(self, x):
        x = torch.nn.functional.hardswish(self.bn(x))
        gate = torch.nn.functional.hardsigmoid(torch.nn.functional.adaptive_avg_pool2d(x, 1))
        x = torch.nn.functional.relu6(x * gate) + torch.nn.functional.mish(x)
        x = torch.nn.functional.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
        return self.fc(torch.nn.functional.hardtanh(x, -2.0, 2.0))


def test_a_frozen_block_of_them_runs_entirely_in_kiln():
    torch.manual_seed(0)
    m = Block().eval()
    x = torch.randn(2, 24, 9, 11)
    with torch.no_grad():
        frozen = torch.jit.freeze(torch.jit.script(m))
        run_compiled(frozen, (x,), reference=m)
        text = torch_kiln.explain(frozen)
    assert "[torchscript]" not in text, text


def test_pad_and_channel_shuffle_keep_eagers_layout():
    fn = script_source(
        "def fn(x):\n"
        "    y = torch.nn.functional.pad(x, [1, 2, 0, -1], 'constant', 0.5)\n"
        "    return y, torch.nn.functional.channel_shuffle(x, 3)\n"
    )
    ref = lambda x: (torch.nn.functional.pad(x, [1, 2, 0, -1], "constant", 0.5), torch.nn.functional.channel_shuffle(x, 3))  # noqa: E731
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 6, 5, 7).contiguous(memory_format=layout)
        out, _ = run_compiled(fn, (x,), reference=ref)
        for o, e in zip(out, ref(x)):
            assert o.stride() == e.stride(), (layout, o.stride(), e.stride())


def test_pooling_whose_windows_tile_the_input():
    # max_pool2d / avg_pool2d with stride = kernel and no padding: odd sizes (rows and columns
    # no window covers are dropped), channels-last, no batch dim, NaN and infinities.
    cases = [((2, 3, 7, 9), [2, 2], False), ((1, 5, 6, 6), [3, 2], True), ((4, 2, 5), [1, 1], False),
             ((2, 16, 17, 3), [2, 3], False), ((3, 4, 8, 8), [4, 4], True)]
    for shape, k, ceil in cases:
        for layout in (torch.contiguous_format, torch.channels_last):
            if layout == torch.channels_last and len(shape) != 4:
                continue
            x = torch.randn(*shape)
            x.view(-1)[::7] = float("nan")
            x.view(-1)[3::11] = float("inf")
            x.view(-1)[5::13] = float("-inf")
            x = x.contiguous(memory_format=layout)
            fn = script_source(
                "def fn(x):\n"
                f"    return torch.nn.functional.max_pool2d(x, {k}, ceil_mode={ceil}), torch.nn.functional.avg_pool2d(x, {k}, ceil_mode={ceil})\n"
            )
            ref = lambda x: (torch.nn.functional.max_pool2d(x, k, ceil_mode=ceil), torch.nn.functional.avg_pool2d(x, k, ceil_mode=ceil))  # noqa: E731
            out, _ = run_compiled(fn, (x,), reference=ref)
            for o, e in zip(out, ref(x)):
                assert o.stride() == e.stride(), (shape, layout, o.stride(), e.stride())


def test_pooling_eager_rejects_stays_in_torchscript_and_raises_eagers_error():
    # Padding above half the kernel: Kiln leaves the node to TorchScript, which raises (a
    # call that raises never finishes profiling, so no call is ever optimised).
    import pytest

    fn = script_source("def fn(x):\n    return torch.nn.functional.max_pool2d(x, 2, 2, 2)\n")
    x = torch.randn(1, 2, 9, 9)
    for _ in range(3):
        with pytest.raises(RuntimeError, match="pad should be"):
            fn(x)