"""Pruned models (issue 13): a frozen module's weights with zeros run on Kiln's sparse kernels,
chosen from the weights' own zeros (explain() says which and why), and compute what eager
computes — every batch, pattern and special value in the activations; a weight that is not a
constant (unfrozen) stays on the dense kernel. Products are compared with float64: no
further from it than eager's float32 (the kernels' order of summation differs from MKL's)."""

import pytest
import torch
import torch.nn.utils.prune as prune

import kiln_check
import torch_kiln


class TwoLinear(torch.nn.Module):
    def __init__(self, n=256, k=256, out=256):
        super().__init__()
        self.a, self.b = torch.nn.Linear(k, n), torch.nn.Linear(n, out)

    def forward(self, x):
        return torch.relu(self.b(torch.relu(self.a(x))))


def zero_blocks(w, block, zeros, gen):
    """w with blocks (rows × cols) zeroed at random, about `zeros` of them."""
    r, c = block
    keep = (torch.rand((w.shape[0] + r - 1) // r, (w.shape[1] + c - 1) // c, generator=gen) >= zeros).float()
    mask = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[: w.shape[0], : w.shape[1]]
    return w * mask


def pruned_model(block=None, zeros=0.9, seed=0, **sizes):
    torch.manual_seed(seed)
    m = TwoLinear(**sizes).eval()
    gen = torch.Generator().manual_seed(seed)
    for lin in (m.a, m.b):
        if block is None:
            prune.l1_unstructured(lin, "weight", amount=zeros)
            prune.remove(lin, "weight")
        else:
            with torch.no_grad():
                lin.weight.copy_(zero_blocks(lin.weight, block, zeros, gen))
    return m


def weight_lines(scripted):
    return [line.strip() for line in torch_kiln.explain(scripted).splitlines() if line.strip().startswith("weight ")]


def check_against_float64(frozen, eager, x):
    out, _ = kiln_check.run_compiled(frozen, (x,), check=lambda out: None)
    with torch.no_grad():
        exact = eager.double()(x.double())
        eager.float()
        kiln_check.no_worse_than_float32(out, [eager(x)], exact)
    return out


@pytest.mark.parametrize("block,zeros,batch", [
    (None, 0.9, 1), (None, 0.95, 16), ((16, 1), 0.9, 1), ((16, 1), 0.8, 16), ((1, 8), 0.9, 1),
    ((1, 4), 0.9, 3), ((4, 4), 0.9, 1), ((4, 4), 0.9, 33),
])
def test_pruned_linears_run_sparse_and_match_eager(block, zeros, batch):
    m = pruned_model(block, zeros)
    with torch.no_grad():
        frozen = torch.jit.freeze(torch.jit.script(m))
        check_against_float64(frozen, m, torch.randn(batch, 256))
    lines = weight_lines(frozen)
    assert len(lines) == 2 and all("sparse" in line and "dense:" not in line for line in lines), lines
    assert "sparse_b=" in torch_kiln.explain(frozen)


def test_odd_sizes_all_zero_rows_and_a_three_dim_input():
    torch.manual_seed(1)
    m = TwoLinear(n=77, k=45, out=19).eval()
    with torch.no_grad():
        m.a.weight[::2] = 0.0  # every other output feature: an all-zero row
        m.a.weight[:, 5:40] = 0.0  # inputs no feature reads: all-zero columns
        m.b.weight.mul_((torch.rand_like(m.b.weight) < 0.1).float())
        frozen = torch.jit.freeze(torch.jit.script(m))
        check_against_float64(frozen, m, torch.randn(2, 3, 45))
    assert any("sparse" in line and "dense:" not in line for line in weight_lines(frozen)), weight_lines(frozen)


def test_an_all_zero_weight_gives_the_bias():
    m = pruned_model(None, 0.9)
    with torch.no_grad():
        m.a.weight.zero_()
        frozen = torch.jit.freeze(torch.jit.script(m))
        x = torch.randn(4, 256)
        out = check_against_float64(frozen, m, x)
        torch.testing.assert_close(out, m(x))


@pytest.mark.parametrize("batch", [1, 16])
def test_infs_and_nans_in_the_activations_make_eagers_nans(batch):
    # 0 · inf is NaN: a zero the sparse kernel skips must still make one (the call runs B dense).
    m = pruned_model((16, 1), 0.9)
    with torch.no_grad():
        frozen = torch.jit.freeze(torch.jit.script(m))
        x = torch.randn(batch, 256)
        x[0, 7], x[-1, 100] = float("inf"), float("nan")
        out, _ = kiln_check.run_compiled(frozen, (x,), m(x))
        assert out.isnan().any()
        # And a finite call after it is sparse again and right.
        y = torch.randn(batch, 256)
        torch.testing.assert_close(frozen(y), m(y))


def test_dynamic_batch_keeps_the_sparse_kernel():
    m = pruned_model((1, 8), 0.9)
    with torch.no_grad():
        frozen = torch.jit.freeze(torch.jit.script(m))
        for batch in [1, 2, 5, 17, 64, 3]:
            x = torch.randn(batch, 256)
            kiln_check.run_compiled(frozen, (x,), m(x))
    assert all("sparse" in line for line in weight_lines(frozen)), weight_lines(frozen)


def test_weights_that_are_not_constants_stay_dense():
    # Unfrozen: the weights are module attributes, read at run time; Kiln never sees their
    # values when it lowers, so it keeps the dense kernel (and no facts are counted).
    m = pruned_model(None, 0.95)
    with torch.no_grad():
        s = torch.jit.script(m)
        x = torch.randn(1, 256)
        kiln_check.run_compiled(s, (x,), m(x))
    assert weight_lines(s) == []
    assert "sparse_b=" not in torch_kiln.explain(s)


def test_dense_weights_keep_the_dense_kernel():
    torch.manual_seed(2)
    m = TwoLinear().eval()
    with torch.no_grad():
        frozen = torch.jit.freeze(torch.jit.script(m))
        x = torch.randn(1, 256)
        kiln_check.run_compiled(frozen, (x,), m(x))
    # Too few zeros to count: no facts at all.
    assert weight_lines(frozen) == []


# Runs pruned models in a fresh process with the disk cache in `dir`: each (seed, block,
# zeros, scale, batch) is pruned_model(block, zeros, seed) with its weights times `scale`, run
# on a random batch and compared with eager. Prints per model: seed, scale, whether a Kiln
# group ran its last call, and how many of its weights are in code.
DISK_CACHE_RUN = """
import sys
sys.path.insert(0, {here!r})
import test_sparse as t
torch_kiln.enable(cache_dir={dir!r}, compile={mode!r})
for seed, block, zeros, scale, batch in {models}:
    m = t.pruned_model(block, zeros, seed=seed)
    with torch.no_grad():
        for lin in (m.a, m.b):
            lin.weight.mul_(scale)
        f = torch.jit.freeze(torch.jit.script(m))
        x = torch.randn(batch, 256)
        runs = torch_kiln.stats()["kernel_runs"]
        for _ in range(3):
            out = f(x)
        torch.testing.assert_close(out, m(x), rtol=1e-4, atol=1e-5)
    in_code = sum("values in the code" in line for line in t.weight_lines(f))
    print(seed, scale, torch_kiln.stats()["kernel_runs"] > runs, in_code)
"""


def run_from_disk_cache(tmp_path, mode, models):
    """{(seed, scale): (whether Kiln ran it, weights in code)} of DISK_CACHE_RUN's models."""
    here = kiln_check.__file__.rsplit("/", 1)[0]
    out = kiln_check.run_isolated(DISK_CACHE_RUN.format(here=here, dir=str(tmp_path), mode=mode, models=models))
    rows = [line.split() for line in out.strip().splitlines()]
    return {(int(r[0]), float(r[1])): (r[2] == "True", int(r[3])) for r in rows}


def test_a_cache_entry_is_code_for_any_weight_of_its_choice(tmp_path):
    # Sparse code is weight-independent: the key holds the choice (the format, in the graph's
    # text), not the weights. A fresh process with compile="never" runs a model with other
    # weights but the same choice from the first process's entry, with its own weights; one
    # whose weights choose another kernel (too few zeros: dense) finds no entry (another key)
    # and runs TorchScript. (This also loads a GEMM with a fused epilogue from disk: its
    # fused-away product buffer's table entry was once malformed.)
    first = run_from_disk_cache(tmp_path, "lazy", [(0, (16, 1), 0.9, 1.0, 16)])
    assert first[(0, 1.0)][0], first
    second = run_from_disk_cache(tmp_path, "never", [(1, (16, 1), 0.9, 1.0, 16), (2, None, 0.3, 1.0, 16)])
    assert {seed: ran for (seed, _), (ran, _) in second.items()} == {1: True, 2: False}, second


def in_code_checks():
    c = torch_kiln.stats()["weights_in_code_checks"]
    return c["same"], c["other"]


@pytest.mark.parametrize("block,zeros,batch,sizes", [
    (None, 0.9, 1, {}), (None, 0.95, 2, {}), (None, 0.95, 3, {}), ((4, 4), 0.9, 1, {}), ((16, 1), 0.95, 1, {}),
    (None, 0.8, 1, {"n": 77, "k": 45, "out": 19}), (None, 0.9, 1, {"n": 200, "k": 300, "out": 33}),
])
def test_small_sparse_weights_go_into_code_and_match_eager(block, zeros, batch, sizes):
    # Batch 1–3, a small weight: its values become the code's constants (explain says so),
    # each kept weight is checked once against them and found to be them, and the product
    # is eager's.
    torch_kiln.reset()
    m = pruned_model(block, zeros, **sizes)
    with torch.no_grad():
        frozen = torch.jit.freeze(torch.jit.script(m))
        check_against_float64(frozen, m, torch.randn(batch, sizes.get("k", 256)))
    lines = weight_lines(frozen)
    assert lines and all("values in the code" in line for line in lines), lines
    assert "sparse_b=code" in torch_kiln.explain(frozen)
    same, other = in_code_checks()
    assert same == len(lines) and other == 0, (same, other)


def test_a_weight_in_code_changed_in_place_runs_dense_over_its_new_values():
    # The code holds the values the weight had when it was compiled. A frozen model's
    # constant changed in place since (its version counter moves) is checked again, found
    # to be another weight, and that product runs dense over the new values.
    torch_kiln.reset()
    m = pruned_model(None, 0.9)
    with torch.no_grad():
        frozen = torch.jit.freeze(torch.jit.script(m))
        x = torch.randn(1, 256)
        kiln_check.run_compiled(frozen, (x,), m(x))
        assert in_code_checks() == (2, 0)
        consts = [n.output().toIValue() for n in frozen.graph.nodes() if n.kind() == "prim::Constant" and n.output().type().kind() == "TensorType"]
        (w,) = [t for t in consts if t.shape == (256, 256) and torch.equal(t, m.a.weight)]
        w[3, :] += 1.0  # a whole row of new nonzeros
        m.a.weight[3, :] += 1.0
        out, ran = kiln_check.run_compiled(frozen, (x,), m(x))
        assert ran
        assert in_code_checks()[1] >= 1
        torch.testing.assert_close(out, m(x))


def test_a_weight_in_code_is_never_served_to_other_weights(tmp_path):
    # Code with a weight in it is keyed by the weight's values (their hash is in its format,
    # in the graph's text). A fresh process with compile="never" finds the first process's
    # entry for the same weights, and none for weights with the same zeros but other values
    # (each nonzero doubled): those run TorchScript, and right.
    first = run_from_disk_cache(tmp_path, "lazy", [(0, None, 0.9, 1.0, 1)])
    assert first == {(0, 1.0): (True, 2)}, first
    second = run_from_disk_cache(tmp_path, "never", [(0, None, 0.9, 1.0, 1), (0, None, 0.9, 2.0, 1)])
    assert {scale: ran for (_, scale), (ran, _) in second.items()} == {1.0: True, 2.0: False}, second


def test_weights_stay_out_of_code_when_asked(monkeypatch):
    # KILN_WEIGHTS_IN_CODE=0 (read as the frontend lowers): the same small weight takes a
    # weight-independent kernel, and the result is the same.
    monkeypatch.setenv("KILN_WEIGHTS_IN_CODE", "0")
    m = pruned_model(None, 0.9, seed=3)
    with torch.no_grad():
        frozen = torch.jit.freeze(torch.jit.script(m))
        check_against_float64(frozen, m, torch.randn(1, 256))
    lines = weight_lines(frozen)
    assert len(lines) == 2 and not any("values in the code" in line for line in lines), lines
    assert "sparse_b=code" not in torch_kiln.explain(frozen)
