"""Kiln's own end-to-end cases against eager: fused chains, non-contiguous and broadcast
inputs, sizes 0 and 1, NaN/inf, sizes large enough to run in parallel, reductions and
softmax fused with their producers."""

import multiprocessing

import pytest
import torch
import torch_kiln

from kiln_check import fresh_script, run_compiled, script_source, spine

SPECIAL = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-30, -1e30, 88.0, -104.0])


def chain(x, y):
    z = torch.nn.functional.gelu(x) + torch.erf(y) * torch.rsqrt(torch.abs(y) + 1.0)
    # Well-conditioned on purpose: sqrt(|z|) - 1 near z = 0 would turn the last-bit
    # differences every libm has into visible ones (in eager vs any other implementation too).
    w = torch.where(z > 0.5, torch.log1p(torch.abs(z)), torch.sqrt(torch.abs(z) + 1.0) - 2.0)
    return torch.clamp(w, -2.0, 3.0) ** 2.0, torch.nn.functional.silu(w).sum(dim=-1)


def reductions(x):
    m = torch.mean(x * x, dim=-1, keepdim=True)
    s = torch.softmax(x - m, dim=-1)
    return s, torch.log_softmax(x, dim=0), torch.amax(x, dim=[0, 1]), torch.amin(x, dim=-1), x.sum()


def mixed_dtypes(i, f):
    a = i * 3 + 1
    b = (a > 4) & (f < 0.5)
    return torch.where(b, f, a.to(torch.float32)), a.sum(dim=0), (i / 2).to(torch.float64)


scripted = fresh_script


def shapes():
    return [(1 << 16,), (3, 5), (1,), (0,), (7, 1, 3), (4, 0, 2), ()]


@pytest.mark.parametrize("shape", shapes(), ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_spine_contiguous(shape, dtype):
    x, y = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    run_compiled(scripted(spine), (x, y), reference=spine)


def test_spine_noncontiguous_and_broadcast():
    base = torch.randn(64, 96)
    x = base.t()  # transposed
    y = torch.randn(96, 1).expand(96, 64)  # stride 0
    run_compiled(scripted(spine), (x, y), reference=spine)
    z = torch.randn(96, 128)[:, ::2]  # strided
    w = torch.randn(64)  # broadcast along rows
    run_compiled(scripted(spine), (z, w), reference=spine)


def test_special_values():
    x = SPECIAL.repeat(4)
    y = SPECIAL.flip(0).repeat(4)
    run_compiled(scripted(spine), (x, y), reference=spine)
    run_compiled(scripted(chain), (x, y), reference=chain)


def test_chain_large_parallel():
    x, y = torch.randn(512, 1024), torch.randn(512, 1024)
    fn = scripted(chain)
    run_compiled(fn, (x, y), reference=chain)
    assert "parallel for" in torch_kiln.explain(fn)


def _child_runs_parallel_kernel(conn):
    # GNU OpenMP (torch's own intra-op threads) hangs in a forked child of a parent that used
    # it; keep torch single-threaded here. Kiln's pool is still 2 threads.
    torch.set_num_threads(1)
    x, y = torch.randn(512, 1024), torch.randn(512, 1024)
    fn = scripted(spine)
    for _ in range(3):
        out = fn(x, y)
    conn.send(bool(torch.allclose(out, spine(x, y))) and torch_kiln.stats()["kernel_runs"] > 0)


def test_forked_child_runs_parallel_kernels():
    # The parent's pool threads do not exist in a forked child (DataLoader workers, servers).
    x, y = torch.randn(512, 1024), torch.randn(512, 1024)
    run_compiled(scripted(spine), (x, y), reference=spine)
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_child_runs_parallel_kernel, args=(child,))
    p.start()
    p.join(timeout=120)
    if p.exitcode is None:
        p.kill()
    assert p.exitcode == 0, "the forked child hung or crashed"
    assert parent.recv() is True


@pytest.mark.parametrize("shape", [(4, 6, 8), (1, 1, 1), (3, 1, 7), (2, 0, 3), (64, 33, 257)], ids=str)
def test_reductions(shape):
    fn = reductions if 0 not in shape else reductions_no_amax
    x = torch.randn(shape)
    # A float32 sum of 500k values differs between summation orders by more than float32's
    # tolerance (eager's cascade in float32 is off by ~1e-6 relative here). Kiln accumulates
    # float32 in float64, so it is held to the exact answer: the function in float64, rounded.
    # The profiling call runs TorchScript's own kernels: those are eager's.
    run_compiled(scripted(fn), (x,), reference=lambda x: tuple(o.float() for o in fn(x.double())), warmup_reference=fn)
    # Against eager too, where eager's own rounding error is small enough to compare.
    if x.numel() < 10_000:
        run_compiled(scripted(fn), (x,), reference=fn)


def reductions_no_amax(x):
    m = torch.mean(x * x, dim=-1, keepdim=True)
    return torch.softmax(x - m, dim=-1), x.sum(), torch.sum(x, dim=[0, 2])


def test_reductions_special_values():
    x = SPECIAL.reshape(3, 3)
    run_compiled(scripted(reductions), (x,), reference=reductions)


def test_reductions_noncontiguous():
    x = torch.randn(8, 16, 24).permute(2, 0, 1)
    run_compiled(scripted(reductions), (x,), reference=reductions)


def test_mixed_dtypes():
    i = torch.randint(-5, 5, (6, 7), dtype=torch.int32)
    f = torch.rand(6, 7)
    run_compiled(scripted(mixed_dtypes), (i, f), reference=mixed_dtypes)
    run_compiled(scripted(mixed_dtypes), (i.to(torch.int64).t(), f.t()), reference=mixed_dtypes)


def test_scalar_arguments_and_integer_promotion():
    fn = script_source("def fn(x, y):\n    return (x + 2) * y - 1.5, x * 2, 1.0 - x, 2 ** y, x / 4\n")

    def ref(x, y):
        return (x + 2) * y - 1.5, x * 2, 1.0 - x, 2 ** y, x / 4

    x, y = torch.arange(12, dtype=torch.int64).reshape(3, 4), torch.randn(3, 4)
    run_compiled(fn, (x, y), reference=ref)


def test_traced_module():
    class M(torch.nn.Module):
        def forward(self, x):
            return torch.softmax(torch.nn.functional.gelu(x) * 2.0, dim=-1)

    m = M()
    x = torch.randn(16, 32)
    traced = torch.jit.trace(m, (x,))
    run_compiled(traced, (x,), reference=m)


def test_saved_and_loaded_module(tmp_path):
    class M(torch.nn.Module):
        def forward(self, x, y):
            return spine(x, y).mean(dim=0)

    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(M()), str(path))
    loaded = torch.jit.load(str(path))
    x, y = torch.randn(32, 8), torch.randn(32, 8)
    run_compiled(loaded, (x, y), reference=M())


def test_transformer_encoder_layer_runs_unchanged():
    # A large scripted graph with control flow, lists, strings and ops Kiln does not take:
    # nothing may break, and the answer is eager's.
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0,
                                             activation="gelu", batch_first=True).eval()
    m = torch.jit.script(layer)
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        ref = layer(x)
        for _ in range(4):
            torch.testing.assert_close(m(x), ref)
    text = torch_kiln.explain(m)
    assert "[kiln group" in text and "aten::layer_norm" in text, text  # parts run in Kiln
    assert "aten::size" not in text  # scalar ops are not candidates, so not listed


def test_frozen_conv_block_epilogue_runs_in_kiln():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)

        def forward(self, x):
            y = torch.relu(self.bn(self.c1(x)))
            return torch.sigmoid(y + x) * x

    b = Block().eval()
    x = torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        frozen = torch.jit.freeze(torch.jit.trace(b, x))
        _, ran = run_compiled(frozen, (x,), reference=b)
    assert ran and "aten::relu, aten::add, aten::sigmoid, aten::mul" in torch_kiln.explain(frozen)


def test_stacked_norm_gelu_softmax_blocks_with_parameters_under_no_grad():
    # Reductions feeding reductions, four blocks deep: values several kernels need are computed
    # once (materialised); parameters that require grad are plain data under no_grad.
    class Blocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gamma = torch.nn.Parameter(1.0 + 0.1 * torch.randn(4, 48))
            self.beta = torch.nn.Parameter(0.1 * torch.randn(4, 48))

        def forward(self, x):
            for i in range(4):
                mu = x.mean(-1, keepdim=True)
                var = ((x - mu) * (x - mu)).mean(-1, keepdim=True)
                h = torch.nn.functional.gelu((x - mu) * torch.rsqrt(var + 1e-5) * self.gamma[i] + self.beta[i])
                x = x + torch.softmax(h, -1) * h
            return x

    torch.manual_seed(0)
    model = Blocks()
    x = torch.randn(5, 48)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,))
        run_compiled(traced, (x,), reference=model)
        text = torch_kiln.explain(traced)
        # A kernel of its own stores gelu's value: "bN[...] = gelu(...)".
        assert "] = gelu(" in text, "gelu was not computed once into a buffer"


OUT_OF_RANGE = torch.tensor([float("nan"), float("inf"), -float("inf"), 3e9, -3e9, 1e20, -1e20, 2147483520.0, -2147483648.0, 2.7, -2.7, 0.0])


def _to_int32(x):
    return (x * 1.0).to(torch.int32)


def _to_int64(x):
    return (x + 0.0).to(torch.int64)


@pytest.mark.parametrize("cast", [_to_int32, _to_int64], ids=["int32", "int64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_float_to_int_casts_of_special_values_match_eager(cast, dtype):
    # x86's "integer indefinite" (INT_MIN) for NaN, inf and values out of range, as in eager;
    # Kiln used to saturate.
    for x in (OUT_OF_RANGE.to(dtype).repeat(64), OUT_OF_RANGE.to(dtype)[::2]):
        out, _ = run_compiled(scripted(cast), (x,), reference=cast)
        assert torch.equal(out, cast(x))


def _gelu(x):
    return torch.nn.functional.gelu(x) + 0.0


def test_gelu_overflows_where_eager_does():
    # Eager's AVX-512 kernel forms x (1 + erf(x / sqrt 2)) before halving it (inf from
    # FLT_MAX / 2 on) and gives NaN at +inf; its AVX2 kernel halves first and gives inf.
    # Kiln follows the kernel eager runs on this machine.
    x = torch.tensor([3e38, 1.8e38, 1.6e38, -3e38, 1e38, 2.0, float("inf"), float("-inf")]).repeat(32)
    out, _ = run_compiled(scripted(_gelu), (x,), reference=_gelu)
    expected = _gelu(x)
    assert torch.equal(out.isinf(), expected.isinf()) and torch.equal(out.isnan(), expected.isnan())


def _mean_rows(x):
    return torch.mean(x * 1.0, dim=1)


def test_float32_mean_of_a_sum_that_overflows_is_inf():
    x = torch.full((4, 64), 1e38)
    x[1] = 1.0
    out, _ = run_compiled(scripted(_mean_rows), (x,), reference=_mean_rows)
    assert torch.isinf(out[0]) and out[1] == 1.0
