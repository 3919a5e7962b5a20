"""Statically quantized models (issue 13): `torch.ao.quantization.prepare` / `convert` (the
fbgemm backend), traced or scripted and frozen, run in one Kiln group from `quantize_per_tensor`
to `dequantize` — the quantized convolutions and linears on Kiln's int8 kernel, the adds,
pools and views between them — and return exactly what PyTorch returns, bit for bit.

fbgemm's AVX2 and AVX-512 kernels saturate the pair sums of 8-bit activations; its VNNI kernels
(a host with AVX-512 VNNI) sum exactly, but for its depthwise kernel, AVX2's everywhere. Kiln
sums as the kernel PyTorch runs does, so these tests hold on either host, and on a VNNI host
`test_forced_avx2_fbgemm` runs a few of them again with fbgemm forced to AVX2
(`FBGEMM_ENABLE_INSTRUCTIONS`)."""

import os
import subprocess
import sys

import pytest
import torch

import torch_kiln

nn = torch.nn
qd = torch.ao.quantization
torch.backends.quantized.engine = "fbgemm"


def host_has_vnni():
    """fbgemm's test for its VNNI kernels (AVX-VNNI alone is not one)."""
    with open("/proc/cpuinfo") as f:
        return " avx512_vnni" in f.read()


VNNI = host_has_vnni()


def assert_ran(scripted, ops=("kiln::conv2d_quantized",)):
    text = torch_kiln.explain(scripted)
    grouped = [line for line in text.splitlines() if line.strip().startswith("[kiln group")]
    for op in ops:
        assert any(op in line for line in grouped), text
    assert not any(line.strip().startswith("[torchscript]") and ("quantize" in line or "quantized" in line) for line in text.splitlines()), text
    assert "runs 0" not in text and "refused" not in text, text


def exactly(out, expected):
    assert out.dtype == expected.dtype and out.shape == expected.shape and out.stride() == expected.stride(), (out.stride(), expected.stride())
    assert torch.equal(out, expected), f"differs in {(out != expected).sum().item()} elements, by up to {(out - expected).abs().max().item()}"


# Weight observers: fbgemm's default (per channel, symmetric), per tensor (symmetric), and per
# channel with zero points (affine).
WEIGHTS = {
    True: None,
    False: qd.default_weight_observer,
    "affine": qd.PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_affine),
}


def convert(model, calibration, per_channel=True, fuse=()):
    model = model.eval()
    if fuse:
        model = qd.fuse_modules(model, list(fuse))
    weights = WEIGHTS[per_channel]
    model.qconfig = qd.get_default_qconfig("fbgemm") if weights is None else qd.QConfig(activation=qd.HistogramObserver.with_args(reduce_range=True), weight=weights)
    qd.prepare(model, inplace=True)
    with torch.no_grad():
        for x in calibration:
            model(*x)
    return qd.convert(model, inplace=True)


class Conv(nn.Module):
    def __init__(self, c, o, k, stride, padding, dilation, bias, relu, groups=1):
        super().__init__()
        self.quant, self.dequant = qd.QuantStub(), qd.DeQuantStub()
        self.conv = nn.Conv2d(c, o, k, stride=stride, padding=padding, dilation=dilation, bias=bias, groups=groups)
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x):
        return self.dequant(self.relu(self.conv(self.quant(x))))


def run_both(model, x, trace=True):
    with torch.no_grad():
        expected = model(x)
        scripted = torch.jit.freeze(torch.jit.trace(model, x) if trace else torch.jit.script(model))
        for _ in range(3):
            out = scripted(x)
    return scripted, out, expected


@pytest.mark.parametrize(
    "c,o,k,stride,padding,dilation,hw",
    [(3, 16, 7, 2, 3, 1, 23), (8, 16, 3, 1, 1, 1, 9), (5, 17, 3, 2, 0, 1, 11), (16, 33, 1, 1, 0, 1, 7), (19, 8, 3, 1, 2, 2, 10), (64, 64, 3, 1, 1, 1, 14), (4, 4, 2, 3, 1, 1, 5), (1, 1, 1, 1, 0, 1, 1)],
)
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("relu", [False, True])
def test_conv_equals_fbgemm(c, o, k, stride, padding, dilation, hw, per_channel, relu):
    gen = torch.Generator().manual_seed(c * 100 + o + k)
    model = convert(Conv(c, o, k, stride, padding, dilation, bias=(c % 2 == 1 or relu), relu=relu), [(torch.randn(2, c, hw, hw, generator=gen),)], per_channel, fuse=[["conv", "relu"]] if relu else ())
    # Values past the calibrated range: requantized values above 127, as in deployed models.
    x = torch.randn(2, c, hw, hw, generator=gen) * 1.5
    scripted, out, expected = run_both(model, x)
    exactly(out, expected)
    assert_ran(scripted)


@pytest.mark.parametrize(
    "c,m,k,stride,padding,dilation,hw",
    # fbgemm's depthwise kernel (3×3, 5×5, 7×7 with "same" padding, strides 1 and 2, channels a
    # multiple of 8, multipliers 1 and 2) and its im2col path (6 channels, no padding,
    # dilation 2, a 2×3 window): the same sums.
    [(32, 1, 3, 1, 1, 1, 9), (16, 1, 3, 2, 1, 1, 8), (24, 1, 5, 1, 2, 1, 9), (8, 1, 7, 2, 3, 1, 11), (16, 2, 3, 1, 1, 1, 7),
     (6, 1, 3, 1, 1, 1, 7), (8, 1, 3, 1, 0, 1, 7), (16, 1, 3, 1, 1, 2, 9), (5, 3, (2, 3), 1, (1, 0), 1, 6)],
)
@pytest.mark.parametrize("weights", [True, False, "affine"])
@pytest.mark.parametrize("relu", [False, True])
def test_depthwise_conv_equals_fbgemm(c, m, k, stride, padding, dilation, hw, weights, relu):
    """Depthwise convolutions (one input channel per group) are a chain of pointwise steps,
    exact in float32, that saturate the pair sums where fbgemm's kernel does: every element
    equal, for inputs past the calibrated range (pairs of large products saturate)."""
    gen = torch.Generator().manual_seed(c * 100 + m * 10 + stride)
    # (A per-tensor weight with a bias is refused: test_a_per_tensor_depthwise_bias_stays_in_torchscript.)
    bias = weights is not False
    float_model = Conv(c, c * m, k, stride, padding, dilation, bias=bias, relu=relu, groups=c)
    with torch.no_grad():
        # Most taps near the int8 extremes, of either sign, and inputs three times the
        # calibrated range: many pairs of products saturate, both ways.
        w = float_model.conv.weight
        w.copy_(torch.sign(torch.randn(w.shape, generator=gen)) * (0.7 + 0.3 * torch.rand(w.shape, generator=gen)))
    model = convert(float_model, [(torch.randn(2, c, hw, hw, generator=gen),)], weights, fuse=[["conv", "relu"]] if relu else ())
    x = torch.randn(2, c, hw, hw, generator=gen) * 3
    scripted, out, expected = run_both(model, x)
    exactly(out, expected)
    assert_ran(scripted)
    assert "depthwise" in torch_kiln.explain(scripted)


def test_a_per_tensor_depthwise_bias_stays_in_torchscript():
    """fbgemm adds a per-tensor weight's bias with a fused multiply-add that Kiln's chain does
    not round alike: refused, with PyTorch's result."""
    gen = torch.Generator().manual_seed(11)
    model = convert(Conv(8, 8, 3, 1, 1, 1, bias=True, relu=False, groups=8), [(torch.randn(1, 8, 6, 6, generator=gen),)], per_channel=False)
    scripted, out, expected = run_both(model, torch.randn(1, 8, 6, 6, generator=gen))
    exactly(out, expected)
    assert "per-tensor quantized depthwise convolution with a bias" in torch_kiln.explain(scripted)


def test_the_x86_engine():
    """PyTorch's default engine packs for fbgemm, which Kiln computes, except symmetric weights
    on a host with AVX-512 VNNI, which it packs for oneDNN (another rounding): those stay in
    TorchScript, and explain names the packing."""
    gen = torch.Generator().manual_seed(13)
    torch.backends.quantized.engine = "x86"
    try:
        model = Conv(16, 32, 3, 1, 1, 1, bias=True, relu=False).eval()
        model.qconfig = qd.get_default_qconfig("x86")
        qd.prepare(model, inplace=True)
        with torch.no_grad():
            model(torch.randn(2, 16, 9, 9, generator=gen))
        qd.convert(model, inplace=True)
        scripted, out, expected = run_both(model, torch.randn(2, 16, 9, 9, generator=gen))
    finally:
        torch.backends.quantized.engine = "fbgemm"
    exactly(out, expected)
    if VNNI:
        assert "its weight is packed for oneDNN" in torch_kiln.explain(scripted), torch_kiln.explain(scripted)
    else:
        assert_ran(scripted)


def test_a_grouped_conv_stays_in_torchscript():
    """Groups of more than one channel are not Kiln's yet: refused by name, PyTorch's result."""
    gen = torch.Generator().manual_seed(12)
    model = convert(Conv(8, 8, 3, 1, 1, 1, bias=True, relu=False, groups=4), [(torch.randn(1, 8, 6, 6, generator=gen),)])
    scripted, out, expected = run_both(model, torch.randn(1, 8, 6, 6, generator=gen))
    exactly(out, expected)
    assert "2 input channels per group" in torch_kiln.explain(scripted)


class Linear(nn.Module):
    def __init__(self, k, n, relu):
        super().__init__()
        self.quant, self.dequant = qd.QuantStub(), qd.DeQuantStub()
        self.fc = nn.Linear(k, n)
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x):
        return self.dequant(self.relu(self.fc(self.quant(x))))


@pytest.mark.parametrize("m,k,n", [(1, 7, 5), (3, 33, 17), (13, 100, 48), (64, 512, 256), (9, 1, 3)])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("relu", [False, True])
def test_linear_equals_fbgemm(m, k, n, per_channel, relu):
    gen = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    model = convert(Linear(k, n, relu), [(torch.randn(m, k, generator=gen),)], per_channel, fuse=[["fc", "relu"]] if relu else ())
    x = torch.randn(m, k, generator=gen) * 1.5
    scripted, out, expected = run_both(model, x)
    exactly(out, expected)
    assert_ran(scripted, ("kiln::linear_quantized",))


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("params", [(0.05, 10, 0.07, 20, 0.09, 5), (0.0186, 114, 0.1234567, 64, 0.1, 60), (0.0213, 77, 0.0343, 140, 0.0419, 99)])
def test_add_of_every_pair_of_values(params, relu):
    """quantized::add(_relu) on all 256 × 256 pairs of uint8 values, against PyTorch's."""
    sa, za, sb, zb, so, zo = params
    op = "add_relu" if relu else "add"
    code = f"""
def f(a, b):
    qa = torch.quantize_per_tensor(a, {sa}, {za}, torch.quint8)
    qb = torch.quantize_per_tensor(b, {sb}, {zb}, torch.quint8)
    return torch.ops.quantized.{op}(qa, qb, {so}, {zo}).dequantize()
"""
    f = torch.jit.CompilationUnit(code).f
    qa, qb = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    a, b = ((qa.reshape(-1) - za) * sa).float(), ((qb.reshape(-1) - zb) * sb).float()
    expected = getattr(torch.ops.quantized, op)(torch.quantize_per_tensor(a, sa, za, torch.quint8), torch.quantize_per_tensor(b, sb, zb, torch.quint8), so, zo).dequantize()
    for _ in range(3):
        out = f(a, b)
    exactly(out, expected)
    text = torch_kiln.explain(f)
    assert "[kiln group" in text and "quantized::" + op in text, text


class Block(nn.Module):
    """A residual block of ResNet with the ops between: max pool, add_relu, average pool,
    flatten, linear."""

    def __init__(self):
        super().__init__()
        self.quant, self.dequant = qd.QuantStub(), qd.DeQuantStub()
        self.conv1, self.relu1 = nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 1)
        self.add = nn.quantized.FloatFunctional()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(nn.functional.max_pool2d(self.quant(x), 3, 2, 1))
        y = self.add.add_relu(self.conv2(self.relu1(self.conv1(x))), self.down(x))
        return self.dequant(self.fc(torch.flatten(self.pool(y), 1)))


@pytest.mark.parametrize("trace", [True, False])
def test_a_residual_block_equals_eager(trace):
    gen = torch.Generator().manual_seed(5)
    model = convert(Block(), [(torch.randn(2, 8, 14, 14, generator=gen),)], fuse=[["conv1", "relu1"]])
    x = torch.randn(2, 8, 14, 14, generator=gen) * 1.5
    scripted, out, expected = run_both(model, x, trace)
    exactly(out, expected)
    # (Scripted, the quantized modules check their input's rank outside the group: those
    # values leave the group for aten::size only.)
    assert_ran(scripted, ("kiln::conv2d_quantized", "quantized::add_relu", "kiln::linear_quantized", "aten::max_pool2d", "aten::adaptive_avg_pool2d", "aten::relu"))


@pytest.mark.parametrize("trace", [True, False])
@pytest.mark.parametrize(
    "arch,ops",
    [
        ("resnet18", ("kiln::conv2d_quantized", "quantized::add_relu", "kiln::linear_quantized")),
        # Depthwise convolutions and quantized adds.
        ("mobilenet_v2", ("kiln::conv2d_quantized", "quantized::add", "kiln::linear_quantized")),
    ],
)
def test_torchvision_quantized_model_equals_eager(arch, ops, trace):
    """torchvision's quantizable ResNet-18 and MobileNetV2 (random weights), fused and
    converted: one group, PyTorch's result bit for bit."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(tv.models.quantization, arch)(weights=None, quantize=False).eval()
    model.fuse_model()
    model = convert(model, [(torch.randn(1, 3, 64, 64),)])
    x = torch.randn(1, 3, 64, 64) * 1.5
    scripted, out, expected = run_both(model, x, trace)
    exactly(out, expected)
    assert_ran(scripted, ops)


class QuantizedOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = qd.QuantStub()
        self.conv = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        return self.conv(self.quant(x))


def test_a_quantized_result_stays_in_torchscript():
    """A group never returns a quantized tensor: the model's own result is TorchScript's."""
    model = convert(QuantizedOut(), [(torch.randn(1, 4, 8, 8),)])
    x = torch.randn(1, 4, 8, 8)
    scripted, out, expected = run_both(model, x)
    assert out.is_quantized and torch.equal(out.int_repr(), expected.int_repr())
    assert "quantized tensor leaves the group" in torch_kiln.explain(scripted)


def test_other_batch_sizes():
    """Batch sizes the model was not traced with: PyTorch's results at each, from Kiln's code."""
    gen = torch.Generator().manual_seed(6)
    model = convert(Block(), [(torch.randn(2, 8, 14, 14, generator=gen),)], fuse=[["conv1", "relu1"]])
    scripted = torch.jit.freeze(torch.jit.trace(model, torch.randn(2, 8, 14, 14, generator=gen)))
    with torch.no_grad():
        for batch in [2, 3, 1, 5, 2, 4]:
            x = torch.randn(batch, 8, 14, 14, generator=gen)
            exactly(scripted(x), model(x))
    assert_ran(scripted, ("kiln::conv2d_quantized",))


@pytest.mark.parametrize("params", [(0.05, 10, 0.07, 20, 0.09, 5), (0.0186, 114, 0.1234567, 64, 0.1, 60), (0.1, 3, 0.1, 3, 0.1, 3)])
def test_cat_of_every_value(params):
    """quantized::cat requantizes each input to the output's parameters: every uint8 value of
    each, against PyTorch's."""
    s1, z1, s2, z2, so, zo = params
    code = f"""
def f(a, b):
    qa = torch.quantize_per_tensor(a, {s1}, {z1}, torch.quint8)
    qb = torch.quantize_per_tensor(b, {s2}, {z2}, torch.quint8)
    return torch.ops.quantized.cat([qa, qb], 1, {so}, {zo}).dequantize()
"""
    f = torch.jit.CompilationUnit(code).f
    q = torch.arange(256.0).reshape(2, 128)
    a, b = ((q - z1) * s1).float(), ((q - z2) * s2).float()
    expected = torch.ops.quantized.cat([torch.quantize_per_tensor(a, s1, z1, torch.quint8), torch.quantize_per_tensor(b, s2, z2, torch.quint8)], 1, so, zo).dequantize()
    for _ in range(3):
        out = f(a, b)
    exactly(out, expected)
    text = torch_kiln.explain(f)
    assert "[kiln group" in text and "quantized::cat" in text, text


class Branches(nn.Module):
    """Two convolutions of one image concatenated along the channels (an Inception-style
    block), then a convolution of the concatenation."""

    def __init__(self):
        super().__init__()
        self.quant, self.dequant = qd.QuantStub(), qd.DeQuantStub()
        self.a, self.b = nn.Conv2d(4, 8, 1), nn.Conv2d(4, 8, 3, padding=1)
        self.cat = nn.quantized.FloatFunctional()
        self.c = nn.Conv2d(16, 8, 3)

    def forward(self, x):
        x = self.quant(x)
        return self.dequant(self.c(self.cat.cat([self.a(x), self.b(x)], dim=1)))


def test_a_concatenation_of_branches():
    gen = torch.Generator().manual_seed(7)
    model = convert(Branches(), [(torch.randn(2, 4, 9, 9, generator=gen),)])
    x = torch.randn(2, 4, 9, 9, generator=gen) * 1.5
    scripted, out, expected = run_both(model, x)
    exactly(out, expected)
    assert_ran(scripted, ("quantized::cat", "kiln::conv2d_quantized"))


@pytest.mark.skipif(not VNNI, reason="fbgemm runs its AVX2 kernels here already")
def test_forced_avx2_fbgemm():
    """On a VNNI host, fbgemm forced to its AVX2 kernels (`FBGEMM_ENABLE_INSTRUCTIONS=AVX2`, read
    once per process) saturates the pairs again, and Kiln follows it: the products and the
    depthwise convolutions again, in a process of their own (their saturating inputs fail
    when Kiln sums exactly)."""
    env = dict(os.environ, FBGEMM_ENABLE_INSTRUCTIONS="AVX2")
    tests = "test_conv_equals_fbgemm or test_depthwise_conv_equals_fbgemm or test_linear_equals_fbgemm"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", tests], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout, run.stdout[-2000:]
