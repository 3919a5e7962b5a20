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
