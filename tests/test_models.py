"""Whole models on Kiln's dense kernels (issue 10): scripted and traced, frozen and not, each
against eager, with zero fallbacks and no FLOP-carrying op left in TorchScript."""

import pytest
import torch
import torch_kiln

from kiln_check import in_threads, same_layouts

FLOP_OPS = ("aten::linear", "aten::matmul", "aten::mm", "aten::bmm", "aten::addmm")


class MLP(torch.nn.Module):
    """The issue's mlp: Linear(512,1024) → GELU → Linear(1024,1024) → GELU → Linear(1024,256)."""

    def __init__(self, sizes=(512, 1024, 1024, 256)):
        super().__init__()
        self.l1 = torch.nn.Linear(sizes[0], sizes[1])
        self.l2 = torch.nn.Linear(sizes[1], sizes[2])
        self.l3 = torch.nn.Linear(sizes[2], sizes[3])

    def forward(self, x):
        g = torch.nn.functional.gelu
        return self.l3(g(self.l2(g(self.l1(x)))))


class Residual(torch.nn.Module):
    """A residual block on 3-D input (batch, sequence, features): bias, tanh-gelu, residual add."""

    def __init__(self, d=96, hidden=160):
        super().__init__()
        self.up = torch.nn.Linear(d, hidden)
        self.down = torch.nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x), approximate="tanh"))


class Products(torch.nn.Module):
    """mm, bmm, addmm, matmul with broadcast batch dims and transposes, as user code writes them."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(40, 24))
        self.b = torch.nn.Parameter(torch.randn(24))

    def forward(self, x, y):
        a = torch.addmm(self.b, x, self.w, beta=0.5, alpha=2.0)
        s = torch.bmm(y, y.transpose(1, 2))
        t = torch.matmul(y.permute(0, 2, 1), s)
        return torch.relu(a), torch.sigmoid(s), t * 0.5, torch.mm(x.t(), x)


def build(model, args, how, freeze):
    m = torch.jit.script(model) if how == "script" else torch.jit.trace(model, args)
    return torch.jit.freeze(m) if freeze else m


def check_model(model, args, how, freeze, allowed_fallbacks=()):
    torch.manual_seed(0)
    model = model.eval()
    with torch.no_grad():
        want = model(*args)
        m = build(model, args, how, freeze)
        before = torch_kiln.stats()["kernel_runs"]
        for _ in range(3):
            got = m(*args)
        torch.testing.assert_close(got, want)
        assert torch_kiln.stats()["kernel_runs"] > before, torch_kiln.explain(m)
    text = torch_kiln.explain(m)
    fallbacks = {k: v for k, v in torch_kiln.stats()["fallbacks"].items() if not k.startswith(allowed_fallbacks)}
    assert fallbacks == {}, text
    left = [line for line in text.splitlines() if "TorchScript" in line or line.startswith("  aten::")]
    assert not any(op in line for line in left for op in FLOP_OPS), text
    return m


@pytest.fixture(autouse=True)
def fresh_counters():
    # Kiln is enabled for the session (conftest); each model's fallbacks are its own.
    torch_kiln.reset()


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("freeze", [True, False], ids=["frozen", "unfrozen"])
@pytest.mark.parametrize("batch", [1, 3, 64])
def test_mlp(how, freeze, batch):
    torch.manual_seed(0)
    check_model(MLP(), (torch.randn(batch, 512),), how, freeze)


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("freeze", [True, False], ids=["frozen", "unfrozen"])
def test_residual_block_on_3d_input(how, freeze):
    torch.manual_seed(0)
    check_model(Residual(), (torch.randn(2, 37, 96),), how, freeze)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_products(how):
    torch.manual_seed(0)
    check_model(Products(), (torch.randn(19, 40), torch.randn(3, 17, 9)), how, False)


def test_an_unfrozen_weight_updated_in_place_is_read_anew():
    torch.manual_seed(0)
    model = MLP((64, 48, 32, 16)).eval()
    x = torch.randn(8, 64)
    m = check_model(model, (x,), "script", False)
    with torch.no_grad():
        model.l2.weight.mul_(-2.0)
        model.l1.bias.add_(1.0)
        torch.testing.assert_close(m(x), model(x))


def test_outputs_are_contiguous_as_in_eager():
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(3, 20, 96).transpose(0, 1)
    with torch.no_grad():
        m = build(model, (x,), "script", True)
        for _ in range(3):
            got = m(x)
        want = model(x)
    torch.testing.assert_close(got, want)
    assert got.stride() == want.stride()


def test_a_kept_packed_weight_follows_every_change_to_it():
    """Kiln keeps each weight packed between calls (torch-bridge/src/packed.rs); the copy must
    follow in-place writes (version counter), a replaced parameter (another storage), a
    storage freed and another allocated, and tensors with no version counter."""
    torch.manual_seed(0)
    model = MLP((64, 48, 32, 16)).eval()
    x = torch.randn(8, 64)
    m = check_model(model, (x,), "script", False)
    with torch.no_grad():
        model.l2.weight.copy_(torch.randn(32, 48))
        torch.testing.assert_close(m(x), model(x))
        model.l2.weight[3:5].zero_()  # a write through a view bumps the shared counter
        torch.testing.assert_close(m(x), model(x))
        for _ in range(3):  # new storages, the old ones freed: addresses may be reused
            w = torch.randn(32, 48)
            model.l2.weight = torch.nn.Parameter(w)
            m.l2.weight = torch.nn.Parameter(w.clone())  # the scripted module's own attribute
            torch.testing.assert_close(m(x), model(x))
    with torch.inference_mode():
        w = torch.randn(32, 48)  # an inference tensor: no version counter
        model.l2.weight = torch.nn.Parameter(w, requires_grad=False)
        m.l2.weight = torch.nn.Parameter(w, requires_grad=False)
        for _ in range(2):
            torch.testing.assert_close(m(x), model(x))
        w.mul_(3.0)
        torch.testing.assert_close(m(x), model(x))


def test_many_threads_share_a_model_and_its_packed_weights():
    torch.manual_seed(0)
    model = MLP((64, 96, 64, 16)).eval()
    xs = [torch.randn(16, 64) for _ in range(4)]
    with torch.no_grad():
        m = check_model(model, (xs[0],), "script", True)
        want = [model(x) for x in xs]

        def work(i):
            for _ in range(50):
                torch.testing.assert_close(m(xs[i]), want[i])

        in_threads(work, 4)


def encoder(layers=2, d=64, heads=4, ff=96, norm_first=False, activation="gelu"):
    layer = torch.nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True, activation=activation, norm_first=norm_first)
    return torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_traced_transformer_encoder_runs_in_kiln(norm_first, activation):
    """Traced in eval, each layer is one `_transformer_encoder_layer_fwd` (the fast path):
    Kiln lowers it into its own ops (projections, heads as views, attention, norms, FFN)."""
    torch.manual_seed(0)
    m = check_model(encoder(norm_first=norm_first, activation=activation), (torch.randn(2, 19, 64),), "trace", True)
    assert "_transformer_encoder_layer_fwd" in torch_kiln.explain(m)


def test_the_issues_encoder_shape_matches_eager():
    torch.manual_seed(0)
    check_model(encoder(layers=1, d=256, heads=4, ff=1024), (torch.randn(1, 128, 256),), "trace", True)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_scripted_transformer_encoder_runs_in_kiln(norm_first):
    """Scripted, the encoder keeps its Python control flow: each layer's fast path is an
    `_transformer_encoder_layer_fwd` inside a prim::If, fed a merged mask and mask type that
    the scripted code computes (None here). Kiln specialises on them being None (the guard
    checks), and the slow path's nodes, which never run, are no fallbacks."""
    torch.manual_seed(0)
    m = check_model(encoder(norm_first=norm_first), (torch.randn(2, 19, 64),), "script", True)
    text = torch_kiln.explain(m)
    assert "_transformer_encoder_layer_fwd" in text and "(has not run)" in text, text


def test_a_scripted_encoder_given_a_mask_falls_back_to_torchscript():
    torch.manual_seed(0)
    model = encoder().eval()
    x, pad = torch.randn(2, 19, 64), torch.zeros(2, 19, dtype=torch.bool)
    pad[1, 15:] = True
    with torch.no_grad():
        m = check_model(model, (x,), "script", True)
        failures = torch_kiln.stats()["guard_failures"]
        torch.testing.assert_close(m(x, src_key_padding_mask=pad), model(x, src_key_padding_mask=pad))
        torch.testing.assert_close(m(x), model(x))
    assert torch_kiln.stats()["guard_failures"] > failures


class Views(torch.nn.Module):
    def forward(self, x, y):
        a = x.view(4, 6).t().reshape(2, 12)  # a flattened transpose: stored, then viewed
        b = x[1:3].unsqueeze(0) * 2.0
        c = torch.narrow(y, 1, 2, 3).flatten() + y.select(0, 1).sum()
        d = x.unflatten(1, (2, 3)).squeeze(0).expand(2, 4, 2, 3) + 1.0
        return a + 1.0, b, c, d.contiguous() * 1.0, torch.nn.functional.dropout(x, 0.5, False) - 1.0


@pytest.mark.parametrize("how", ["script", "trace"])
def test_view_ops_read_through(how):
    torch.manual_seed(0)
    check_model(Views(), (torch.randn(4, 6), torch.randn(3, 7)), how, False)


class WaveStep(torch.nn.Module):
    """One WaveRNN-style sampling step (the issue's wavestep, smaller sizes)."""

    def __init__(self, classes=64, cond=20, hidden=96):
        super().__init__()
        self.embed = torch.nn.Linear(classes, 32)
        self.gru = torch.nn.GRUCell(32 + cond, hidden)
        self.fc1, self.fc2 = torch.nn.Linear(hidden, hidden), torch.nn.Linear(hidden, classes)

    def forward(self, prev, cond, h):
        x = torch.cat([self.embed(prev), cond], 1)
        h = self.gru(x, h)
        p = torch.softmax(self.fc2(torch.relu(self.fc1(h))), 1)
        return p, h


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("freeze", [True, False], ids=["frozen", "unfrozen"])
def test_scripted_wavestep_runs_in_kiln(batch, freeze):
    """Scripted, the GRU cell is one `aten::gru_cell` (lowered to two projections, gate slices
    and pointwise math) and the concatenation an `aten::cat` of a list."""
    torch.manual_seed(0)
    prev = torch.zeros(batch, 64)
    prev[:, 3] = 1.0
    # nn.GRUCell's `hx is None` branch (never taken here) builds zeros of a size computed at
    # run time: Kiln takes sizes as constants, so that dead node stays in TorchScript.
    m = check_model(WaveStep(), (prev, torch.randn(batch, 20), torch.randn(batch, 96)), "script", freeze, allowed_fallbacks=("aten::zeros",))
    text = torch_kiln.explain(m)
    assert "aten::gru_cell" in text and "aten::cat" in text, text


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("freeze", [True, False], ids=["frozen", "unfrozen"])
def test_traced_wavestep_runs_in_kiln(batch, freeze):
    """Traced, the GRU cell is decomposed: linears, unsafe_chunk + ListUnpack (parts as
    slices) and in-place add_, sigmoid_, mul_, tanh_ on tensors nothing else reads (Kiln
    computes them as their functional ops): one group for the whole step."""
    torch.manual_seed(0)
    prev = torch.zeros(batch, 64)
    prev[:, 3] = 1.0
    m = check_model(WaveStep(), (prev, torch.randn(batch, 20), torch.randn(batch, 96)), "trace", freeze)
    text = torch_kiln.explain(m)
    assert "aten::sigmoid_" in text and "aten::unsafe_chunk" in text and "[torchscript]" not in text, text


@pytest.mark.parametrize("name", ["mlp", "encoder"])
def test_batch_and_sequence_sweeps_compile_at_most_three_times(name):
    """Batch (mlp, 1..64) and sequence length (encoder, 1..256) stay symbolic through the
    GEMM and attention: size 1 gets code of its own, every other size shares one."""
    torch.manual_seed(0)
    if name == "mlp":
        model, make, sizes = MLP().eval(), lambda n: (torch.randn(n, 512),), range(1, 65)
    else:
        model, make, sizes = encoder().eval(), lambda n: (torch.randn(2, n, 64),), [1, 2, 3, 7, 16, 17, 31, 64, 100, 128, 255, 256]
    with torch.no_grad():
        m = torch.jit.freeze(torch.jit.trace(model, make(8)))
        for n in sizes:
            args = make(n)
            before = torch_kiln.stats()["kernel_runs"]
            for _ in range(3):
                got = m(*args)
            torch.testing.assert_close(got, model(*args))
            assert torch_kiln.stats()["kernel_runs"] > before, f"size {n} ran no Kiln code"
    s = torch_kiln.stats()
    assert s["groups"] == 1 and s["specializations"] <= 3 and s["symbolic_specializations"] >= 1, s
    assert s["fallbacks"] == {}, s["fallbacks"]


class CausalBlock(torch.nn.Module):
    """A GPT-style decoder block: pre-norm, causal scaled_dot_product_attention over heads
    made with chunk/unflatten/transpose, a GELU feed-forward, residuals."""

    def __init__(self, d=64, heads=4):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.up, self.down = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x):
        q, k, v = self.qkv(self.ln1(x)).chunk(3, -1)
        q, k, v = [t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v)]
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).flatten(2))
        return x + self.down(torch.nn.functional.gelu(self.up(self.ln2(x))))


@pytest.mark.parametrize("how", ["script", "trace"])
def test_a_causal_decoder_block_runs_in_kiln(how):
    torch.manual_seed(0)
    m = check_model(CausalBlock(), (torch.randn(2, 23, 64),), how, True)
    assert "scaled_dot_product_attention" in torch_kiln.explain(m)


class Attention(torch.nn.Module):
    """nn.MultiheadAttention's slow path (masks, weights not needed) as models call it."""

    def __init__(self, d=48, heads=4):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x, mask):
        out, _ = self.mha(x, x, x, attn_mask=mask, need_weights=False)
        return out


def test_masked_attention_matches_eager():
    """A bool mask (True = masked, as nn.MultiheadAttention takes it), one row of which masks
    everything: eager returns NaN there for the math path; Kiln must return what eager does."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, 48)
    mask = torch.rand(9, 9) > 0.7
    with torch.no_grad():
        model = Attention().eval()
        want = model(x, mask)
        m = torch.jit.freeze(torch.jit.trace(model, (x, mask)))
        for _ in range(3):
            got = m(x, mask)
    torch.testing.assert_close(got, want, equal_nan=True)


class HeadsFromShape(torch.nn.Module):
    """Views whose sizes come from the input's shape at run time (`b, s, d = x.shape`), with
    integer arithmetic on them, as attention code writes it."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.proj = torch.nn.Linear(d, d)

    def forward(self, x):
        b, s, d = x.shape
        h = self.proj(x).view(b, s, self.heads, d // self.heads).transpose(1, 2)
        return torch.softmax(h @ h.transpose(-2, -1), -1).reshape(b * self.heads, s, s) * x.size(1)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_sizes_read_from_the_input_shape_become_constants_of_the_group(how):
    torch.manual_seed(0)
    m = check_model(HeadsFromShape(), (torch.randn(2, 11, 32),), how, True)
    assert "[torchscript]" not in torch_kiln.explain(m), torch_kiln.explain(m)
    torch.manual_seed(0)
    model = HeadsFromShape().eval()
    with torch.no_grad():  # other shapes: their own sizes, never stale constants
        for shape in [(3, 5, 32), (1, 11, 32), (2, 11, 32)]:
            x = torch.randn(*shape)
            for _ in range(2):
                torch.testing.assert_close(m(x), model(x))


class SelfAttention(torch.nn.Module):
    def __init__(self, d=48, heads=4):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("how", ["script", "trace"])
def test_multi_head_attention_runs_in_kiln(how):
    """Traced in eval, nn.MultiheadAttention takes its fast path (`_native_multi_head_attention`);
    scripted, its Python control flow decides at run time."""
    torch.manual_seed(0)
    m = check_model(SelfAttention(), (torch.randn(2, 13, 48),), how, True)
    assert "attention" in torch_kiln.explain(m)


def test_symbolic_products_of_two_inputs_follow_every_size():
    """Every dim of both operands symbolic (`dynamic="always"`'s kind of code, reached by
    `auto` once each dim has moved): the GEMM's shape is evaluated per call, and a B operand
    whose packed layout moves with the sizes is packed per call, never kept from another size."""
    torch.manual_seed(0)
    fn = torch.jit.CompilationUnit("def fn(x, w):\n    return torch.relu(torch.matmul(x, w))\n").fn
    sizes = [(17, 33, 24), (17, 33, 24), (17, 33, 24), (5, 20, 24), (5, 20, 24), (9, 20, 40), (9, 20, 40), (3, 4, 17), (3, 4, 17), (17, 33, 24)]
    for m, k, n in sizes:
        x, w = torch.randn(m, k), torch.randn(k, n)
        torch.testing.assert_close(fn(x, w), torch.relu(x @ w))
    s = torch_kiln.stats()
    assert s["symbolic_specializations"] >= 1 and s["kernel_runs"] >= 6, s


class Recurrent(torch.nn.Module):
    """A whole-sequence nn.LSTM or nn.GRU and a linear over its output."""

    def __init__(self, kind, layers, bidirectional, batch_first, bias):
        super().__init__()
        rnn = torch.nn.LSTM if kind == "lstm" else torch.nn.GRU
        self.rnn = rnn(12, 20, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
        self.out = torch.nn.Linear(40 if bidirectional else 20, 5)

    def forward(self, x):
        y, state = self.rnn(x)
        return self.out(y), y, state


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("layers,bidirectional,batch_first,bias", [(1, False, False, True), (2, True, True, True), (2, False, False, False)])
def test_a_sequence_rnn_runs_in_kiln(kind, how, layers, bidirectional, batch_first, bias):
    """Frozen, `aten::lstm` / `aten::gru` is unrolled in one group (its weights, one `Tensor[]`
    constant, listed by the pass): each layer's input projected at once, each step's state
    product and gates; every output in eager's sizes and strides (a batch-first output is a
    transposed view in eager). Eager's LSTM is oneDNN's: compared as float32 results are."""
    torch.manual_seed(0)
    model = Recurrent(kind, layers, bidirectional, batch_first, bias).eval()
    x = torch.randn((3, 7, 12) if batch_first else (7, 3, 12))
    m = build(model, (x,), how, freeze=True)
    with torch.no_grad():
        want = model(x)
        for _ in range(3):
            got = m(x)
    same_layouts(want)(got)
    text = torch_kiln.explain(m)
    assert any(line.strip().startswith("[kiln group") and f"aten::{kind}" in line for line in text.splitlines()), text
    assert torch_kiln.stats()["kernel_runs"] > 0, text
