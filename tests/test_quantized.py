"""Dynamically quantized models (issue 13): `quantize_dynamic`'s linears, frozen, run on Kiln's
int8 kernel and return exactly what PyTorch's fbgemm kernels return — bit for bit, for every
shape (remainders of every tile and of k's groups of four), per-tensor and per-channel weights,
with and without bias, a fused relu, batches of matrices, non-contiguous inputs, activations of
one sign, all zeros, a tiny range, large values. Every test asserts the Kiln group ran the
quantized op."""

import pytest
import torch

import kiln_check
import torch_kiln

nn = torch.nn
qd = torch.ao.quantization

# fbgemm's packed weights, whatever the host: the x86 engine packs symmetric weights for oneDNN
# on a host with VNNI, whose arithmetic Kiln does not compute (those stay in TorchScript).
torch.backends.quantized.engine = "fbgemm"


class Single(nn.Module):
    def __init__(self, k, n, bias=True):
        super().__init__()
        self.lin = nn.Linear(k, n, bias=bias)

    def forward(self, x):
        return self.lin(x)


class ReluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(96, 200), nn.Linear(200, 130), nn.Linear(130, 24)

    def forward(self, x):
        return self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))


def quantized(model, per_channel=False, seed=0):
    torch.manual_seed(seed)
    model = model.eval()
    spec = {nn.Linear: qd.per_channel_dynamic_qconfig} if per_channel else {nn.Linear}
    return qd.quantize_dynamic(model, spec, dtype=torch.qint8)


def frozen(q):
    return torch.jit.freeze(torch.jit.script(q))


def assert_in_kiln(scripted, op="kiln::linear_dynamic"):
    text = torch_kiln.explain(scripted)
    grouped = [line for line in text.splitlines() if line.strip().startswith("[kiln group")]
    assert any(op in line for line in grouped), text
    assert any(line.strip().startswith("weight ") and ": int8 (per " in line for line in text.splitlines()), text


def exactly(expected):
    def check(out):
        assert out.dtype == expected.dtype and out.shape == expected.shape and out.stride() == expected.stride()
        assert torch.equal(out, expected), f"differs in {(out != expected).sum().item()} elements, by up to {(out - expected).abs().max().item()}"
    return check


def activations(kind, shape, gen):
    if kind == "normal":
        return torch.randn(shape, generator=gen)
    if kind == "positive":
        return torch.rand(shape, generator=gen) * 3
    if kind == "negative":
        return -torch.rand(shape, generator=gen)
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "tiny":
        return torch.randn(shape, generator=gen) * 1e-6
    if kind == "large":
        return torch.randn(shape, generator=gen) * 1e4
    raise ValueError(kind)


@pytest.mark.parametrize("m,k,n", [(1, 7, 5), (2, 16, 16), (3, 33, 17), (5, 4, 31), (13, 100, 48), (64, 512, 1024), (9, 1, 3)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_linear_dynamic_equals_fbgemm(m, k, n, per_channel):
    gen = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    q = quantized(Single(k, n, bias=(m + n) % 2 == 0), per_channel, seed=k + n)
    f = frozen(q)
    x = activations("normal", (m, k), gen)
    with torch.no_grad():
        kiln_check.run_compiled(f, (x,), check=exactly(q(x)))
    assert_in_kiln(f)


@pytest.mark.parametrize("kind", ["positive", "negative", "zeros", "tiny", "large"])
def test_activation_ranges(kind):
    gen = torch.Generator().manual_seed(5)
    q = quantized(Single(40, 24))
    f = frozen(q)
    x = activations(kind, (6, 40), gen)
    with torch.no_grad():
        kiln_check.run_compiled(f, (x,), check=exactly(q(x)))
    assert_in_kiln(f)


@pytest.mark.parametrize("value,at", [(float("nan"), 3), (float("nan"), 17), (float("inf"), 0), (float("inf"), 5), (-float("inf"), 9)])
def test_special_values(value, at):
    """What fbgemm makes of them, element for element: a NaN past the first element is left out
    of the range as its vector lanes leave it out and quantizes to 255; an infinity makes the
    scale infinite and the zero point x86's integer indefinite. (A NaN as the first element makes
    eager raise in ChooseQuantizationParams: Kiln cannot raise from its kernel and returns NaNs;
    not tested.)"""
    q = quantized(Single(16, 8))
    f = frozen(q)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(at))
    x.view(-1)[at] = value

    def same(out):
        expected = q(x)
        assert torch.equal(out.isnan(), expected.isnan()), (out, expected)
        assert torch.equal(out.nan_to_num(0.0, 1.0, 2.0), expected.nan_to_num(0.0, 1.0, 2.0)), (out, expected)
    with torch.no_grad():
        kiln_check.run_compiled(f, (x,), check=same)
    assert_in_kiln(f)


def test_batches_of_matrices_and_strided_inputs():
    gen = torch.Generator().manual_seed(6)
    q = quantized(Single(24, 20), per_channel=True)
    f = frozen(q)
    x = torch.randn(3, 5, 24, generator=gen)
    t = torch.randn(24, 7, generator=gen).t()  # not contiguous
    with torch.no_grad():
        kiln_check.run_compiled(f, (x,), check=exactly(q(x)))
        kiln_check.run_compiled(f, (t,), check=exactly(q(t)))
    assert_in_kiln(f)


class Direct(nn.Module):
    """A packed weight called through the quantized op itself."""

    def __init__(self, packed, op, reduce_range):
        super().__init__()
        self.packed, self.relu, self.reduce_range = packed, op == "linear_relu_dynamic", reduce_range

    def forward(self, x):
        if self.relu:
            return torch.ops.quantized.linear_relu_dynamic(x, self.packed, self.reduce_range)
        return torch.ops.quantized.linear_dynamic(x, self.packed, self.reduce_range)


@pytest.mark.parametrize("per_channel", [False, True])
def test_fused_relu(per_channel):
    gen = torch.Generator().manual_seed(7)
    packed = quantized(Single(30, 18), per_channel).lin._packed_params._packed_params
    f = torch.jit.freeze(torch.jit.script(Direct(packed, "linear_relu_dynamic", True).eval()))
    assert "linear_relu_dynamic" in str(f.graph)
    x = torch.randn(4, 30, generator=gen)
    with torch.no_grad():
        expected = torch.ops.quantized.linear_relu_dynamic(x, packed, True)
        kiln_check.run_compiled(f, (x,), check=exactly(expected))
    assert_in_kiln(f)


@pytest.mark.parametrize("per_channel", [False, True])
def test_a_relu_mlp_equals_eager(per_channel):
    """Relu is exact, so the whole model is fbgemm's result bit for bit, each layer's
    activations quantized from the previous one's output."""
    gen = torch.Generator().manual_seed(8)
    q = quantized(ReluMLP(), per_channel)
    f = frozen(q)
    x = torch.randn(10, 96, generator=gen)
    with torch.no_grad():
        kiln_check.run_compiled(f, (x,), check=exactly(q(x)))
    assert_in_kiln(f)
    text = torch_kiln.explain(f)
    assert "[torchscript]" not in text, text


def test_gelu_mlp_is_as_close_to_float_as_eager():
    """With gelu between the layers (Kiln's gelu is not ATen's to the last bit, so a value
    near a rounding boundary of the next layer's quantization may land one step away), the
    int8 model is no further from the float model than eager's int8 model is, give or take
    that step."""
    gen = torch.Generator().manual_seed(9)
    torch.manual_seed(9)
    fp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval()
    q = qd.quantize_dynamic(fp, {nn.Linear}, dtype=torch.qint8)
    f = frozen(q)
    x = torch.randn(16, 64, generator=gen)
    with torch.no_grad():
        out, _ = kiln_check.run_compiled(f, (x,), check=lambda out: None)
        eager_err = (q(x) - fp(x)).abs().max().item()
        assert (out - fp(x)).abs().max().item() <= 1.5 * eager_err
    assert_in_kiln(f)


def test_unfrozen_modules_stay_in_torchscript():
    """Without freezing, the packed weight is an attribute that may change: not Kiln's."""
    gen = torch.Generator().manual_seed(10)
    q = quantized(Single(16, 16))
    s = torch.jit.script(q)
    x = torch.randn(4, 16, generator=gen)
    with torch.no_grad():
        for _ in range(4):
            assert torch.equal(s(x), q(x))
    assert "kiln::linear_dynamic" not in torch_kiln.explain(s)


def test_8_bit_activations_stay_in_torchscript():
    """`reduce_range=False` (modules saved before version 4) gives fbgemm's AVX2 kernel 16-bit
    pair sums that saturate; Kiln leaves those calls to fbgemm and says why."""
    q = quantized(Single(16, 16))
    f = torch.jit.freeze(torch.jit.script(Direct(q.lin._packed_params._packed_params, "linear_dynamic", False).eval()))
    x = torch.randn(4, 16)
    with torch.no_grad():
        expected = torch.ops.quantized.linear_dynamic(x, q.lin._packed_params._packed_params, False)
        for _ in range(4):
            assert torch.equal(f(x), expected)
    assert "reduce_range" in torch_kiln.explain(f)


def test_dynamic_batch():
    """Batches of every size, after two sizes code for symbolic sizes: each call's activations
    quantized with their own range, as fbgemm does."""
    gen = torch.Generator().manual_seed(11)
    q = quantized(ReluMLP(), per_channel=True)
    f = frozen(q)
    with torch.no_grad():
        for batch in [1, 2, 5, 17, 64, 3, 1]:
            x = torch.randn(batch, 96, generator=gen)
            kiln_check.run_compiled(f, (x,), check=exactly(q(x)))
    assert_in_kiln(f)


def test_a_cache_entry_serves_other_weights(tmp_path):
    """int8 code is weight-independent (weights, scales, zero points and bias are inputs): a
    fresh process with compile="never" runs a model of the same shapes with other weights from
    the first process's entry, bit for bit."""
    here = kiln_check.__file__.rsplit("/", 1)[0]
    body = """
    import sys
    sys.path.insert(0, {here!r})
    import test_quantized as t
    torch_kiln.enable(cache_dir={dir!r}, compile={mode!r})
    q = t.quantized(t.ReluMLP(), per_channel=True, seed={seed})
    with torch.no_grad():
        f = t.frozen(q)
        x = torch.randn(10, 96)
        runs = torch_kiln.stats()["kernel_runs"]
        for _ in range(3):
            out = f(x)
        assert torch.equal(out, q(x))
    print(torch_kiln.stats()["kernel_runs"] > runs, torch_kiln.stats()["disk_hits"])
    """
    first = kiln_check.run_isolated(body.format(here=here, dir=str(tmp_path), mode="lazy", seed=0))
    assert first.split()[0] == "True", first
    second = kiln_check.run_isolated(body.format(here=here, dir=str(tmp_path), mode="never", seed=1))
    assert second.split() == ["True", "1"], second


class WaveStep(nn.Module):
    """A WaveRNN-style sampling step: linears and a GRU cell, all dynamically quantized."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(40, 24)
        self.gru = nn.GRUCell(24 + 12, 48)
        self.fc = nn.Linear(48, 20)

    def forward(self, prev, cond, h):
        h = self.gru(torch.cat([self.embed(prev), cond], 1), h)
        return torch.softmax(self.fc(torch.relu(h)), 1), h


class LSTMStep(nn.Module):
    """An LSTM cell and a linear, dynamically quantized."""

    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(30, 40)
        self.out = nn.Linear(40, 10)

    def forward(self, x, h, c):
        h, c = self.cell(x, (h, c))
        return self.out(h), h, c


CELLS = {
    # model, its cell's module, its quantized op, the model's inputs' sizes
    "gru": (WaveStep, nn.GRUCell, "quantized_gru_cell_dynamic", [(3, 40), (3, 12), (3, 48)]),
    "lstm": (LSTMStep, nn.LSTMCell, "quantized_lstm_cell_dynamic", [(2, 30), (2, 40), (2, 40)]),
}


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("per_channel", [False, True])
def test_a_quantized_rnn_cell_step(cell, per_channel):
    """quantized_gru_cell_dynamic and quantized_lstm_cell_dynamic (two outputs): both
    projections on the int8 kernel (exact), the gates in float32 as ATen's cells order them
    (Kiln's sigmoid and tanh are its own: compared as float32 results are)."""
    make, module, op, sizes = CELLS[cell]
    gen = torch.Generator().manual_seed(12)
    torch.manual_seed(12)
    spec = {nn.Linear: qd.per_channel_dynamic_qconfig, module: qd.per_channel_dynamic_qconfig} if per_channel else {nn.Linear, module}
    q = qd.quantize_dynamic(make().eval(), spec, dtype=torch.qint8)
    f = frozen(q)
    assert op in str(f.graph)
    args = tuple(torch.randn(size, generator=gen) for size in sizes)
    with torch.no_grad():
        kiln_check.run_compiled(f, args, q(*args))
    assert_in_kiln(f, f"kiln::{cell}_cell_dynamic")
    assert "[torchscript]" not in torch_kiln.explain(f)


@pytest.mark.parametrize("how", ["trace", "load"])
def test_traced_and_loaded_models(how, tmp_path):
    """A traced model, and a scripted one saved and loaded back (packed weights go through
    their own serialization), then frozen: the same exact results."""
    gen = torch.Generator().manual_seed(14)
    q = quantized(ReluMLP(), per_channel=True)
    x = torch.randn(7, 96, generator=gen)
    if how == "trace":
        m = torch.jit.trace(q, (x,))
    else:
        path = str(tmp_path / "q.pt")
        torch.jit.save(torch.jit.script(q), path)
        m = torch.jit.load(path)
    f = torch.jit.freeze(m.eval())
    with torch.no_grad():
        kiln_check.run_compiled(f, (x,), check=exactly(q(x)))
    assert_in_kiln(f)


class Sequence(nn.Module):
    """A whole-sequence LSTM or GRU (`aten::quantized_lstm` / `quantized_gru` once dynamically
    quantized), its output through a linear, the final states returned."""

    def __init__(self, kind, layers, bidirectional, batch_first, inputs=12, hidden=20):
        super().__init__()
        rnn = nn.LSTM if kind == "lstm" else nn.GRU
        self.rnn = rnn(inputs, hidden, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
        self.out = nn.Linear(hidden * (2 if bidirectional else 1), 6)

    def forward(self, x):
        y, state = self.rnn(x)
        return self.out(y), y, state


class LSTMWithState(nn.Module):
    """The caller's initial state (h, c)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(12, 20, num_layers=2)

    def forward(self, x, h, c):
        return self.rnn(x, (h, c))


class GRUWithState(nn.Module):
    """The caller's initial state h."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(12, 20, num_layers=2)

    def forward(self, x, h):
        return self.rnn(x, h)


def sequence_model(make, per_channel, modules=(nn.LSTM, nn.GRU, nn.Linear)):
    torch.manual_seed(21)
    config = qd.per_channel_dynamic_qconfig if per_channel else qd.default_dynamic_qconfig
    return qd.quantize_dynamic(make().eval(), {m: config for m in modules}, dtype=torch.qint8)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("layers,bidirectional,batch_first,steps,batch", [(1, False, False, 7, 3), (2, True, False, 5, 2), (2, True, True, 4, 5), (3, False, True, 1, 1)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_a_quantized_sequence_rnn(kind, layers, bidirectional, batch_first, steps, batch, per_channel):
    """The whole-sequence quantized RNN, unrolled in one group: per layer and direction the
    input projected at once (one activation range, as ATen's layers on CPU do), each step's
    state quantized with its own range; the outputs in eager's layout (a batch-first output
    is a transposed view there), the final states stacked by layer and direction."""
    q = sequence_model(lambda: Sequence(kind, layers, bidirectional, batch_first), per_channel)
    f = frozen(q)
    assert f"aten::quantized_{kind}" in str(f.graph)
    gen = torch.Generator().manual_seed(22)
    x = torch.randn((batch, steps, 12) if batch_first else (steps, batch, 12), generator=gen)
    with torch.no_grad():
        kiln_check.run_compiled(f, (x,), check=kiln_check.same_layouts(q(x)))
    assert_in_kiln(f, f"kiln::{kind}_dynamic")
    assert "[torchscript]" not in torch_kiln.explain(f)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_a_quantized_sequence_from_a_given_state(kind):
    """An initial state the caller passes (non-zero, so each first step's activation range
    is its own), other inputs of the same shapes on a later call, then a longer sequence
    (code of its own: the steps are unrolled)."""
    q = sequence_model(LSTMWithState if kind == "lstm" else GRUWithState, per_channel=True)
    f = frozen(q)
    gen = torch.Generator().manual_seed(23)
    for steps in (6, 6, 9):
        args = (torch.randn(steps, 3, 12, generator=gen), torch.randn(2, 3, 20, generator=gen), torch.randn(2, 3, 20, generator=gen))
        args = args if kind == "lstm" else args[:2]
        with torch.no_grad():
            kiln_check.run_compiled(f, args, check=kiln_check.same_layouts(q(*args)))
    assert_in_kiln(f, f"kiln::{kind}_dynamic")


def test_a_long_sequence_stays_in_torchscript():
    """Past the steps a group unrolls, TorchScript runs the RNN (and says why)."""
    q = sequence_model(lambda: Sequence("gru", 2, True, False), per_channel=False, modules=(nn.GRU,))
    f = frozen(q)
    x = torch.randn(300, 1, 12)
    with torch.no_grad():
        kiln_check.run_compiled(f, (x,), check=kiln_check.same_layouts(q(x)), must_compile=False)
    assert "Kiln unrolls at most 1024 cell steps" in torch_kiln.explain(f), torch_kiln.explain(f)
