"""Dynamic shapes: a group compiled once serves every batch size and sequence length (each
result checked against eager, NaN/inf included), the counters say how many compiles it took,
and the dynamic= policy, ties between dims, layouts and dtypes the symbolic guard does not
cover, and the disk cache all behave.

Sizes 0 and 1 of a symbolic dim get code of their own (a dim of 1 broadcasts), so a sweep
starting at 1 compiles twice under dynamic="auto": once for 1, once for every size >= 2."""

import math

import pytest
import torch
import torch_kiln

from kiln_check import close, fresh_script, spine


@pytest.fixture
def policy():
    """Enables Kiln with the given dynamic= policy for one test, then the defaults again."""
    yield lambda dynamic, **kw: torch_kiln.enable(dynamic=dynamic, **kw)
    torch_kiln.enable()


def softmax_reduce(x, w):
    # Softmax over the last dim, a sum over it and a mean over the sequence (dim 1): the
    # mean's loop, count and the batch stride follow the sequence length.
    y = torch.softmax(x * w, dim=-1)
    return y + torch.sigmoid(x).sum(-1, keepdim=True), torch.tanh(x).mean(1)


def rows(fn, shape, seed):
    """Random inputs for `fn` with NaN/inf sprinkled in: x of `shape` and, for spine, y of
    the same shape; for softmax_reduce, a weight over the last dim."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if x.numel() >= 4:
        flat = x.view(-1)
        flat[0], flat[1], flat[-1] = math.nan, math.inf, -math.inf
    other = torch.randn(shape, generator=g) if fn is spine else torch.randn(shape[-1], generator=g)
    return x, other


def sweep(fn, shapes, calls=2):
    """Calls a fresh scripted `fn` `calls` times per shape, checking every result; returns
    the counters' change over the sweep and the scripted function."""
    scripted = fresh_script(fn)
    before = torch_kiln.stats()
    with torch.no_grad():
        for i, shape in enumerate(shapes):
            args = rows(fn, shape, i)
            for _ in range(calls):
                close(scripted(*args), fn(*args))
    after = torch_kiln.stats()
    keys = ("groups", "compiles", "specializations", "symbolic_specializations", "guard_misses", "guard_failures", "kernel_runs")
    return {k: after[k] - before[k] for k in keys}, scripted


@pytest.mark.parametrize("fn", [spine, softmax_reduce], ids=["spine", "softmax_reduce"])
def test_batch_sweep_1_to_64_compiles_once_for_1_and_once_for_the_rest(policy, fn):
    policy("auto", cache_dir=False)
    d, scripted = sweep(fn, [(b, 12, 40) for b in range(1, 65)])
    # Per group: call 1 profiles; call 2 (batch 1) compiles code for batch 1; batch 2 has
    # moved the batch dim: code for every batch >= 2. (Code is counted in specialisations:
    # an identical group elsewhere in the session may have compiled it first.)
    groups = d["groups"]
    assert groups >= 1 and d["specializations"] == 2 * groups and d["symbolic_specializations"] == groups, (d, torch_kiln.explain(scripted))
    assert d["compiles"] <= d["specializations"]
    assert d["guard_misses"] == 2 * groups and d["guard_failures"] == 0
    assert d["kernel_runs"] == (2 * 64 - 1) * groups
    assert "symbolic: s0 = input 0 dim 0" in torch_kiln.explain(scripted)


@pytest.mark.parametrize("fn", [spine, softmax_reduce], ids=["spine", "softmax_reduce"])
def test_sequence_sweep_1_to_512_compiles_once_for_1_and_once_for_the_rest(policy, fn):
    policy("auto", cache_dir=False)
    d, scripted = sweep(fn, [(3, s, 16) for s in range(1, 513)])
    groups = d["groups"]
    assert groups >= 1 and d["specializations"] == 2 * groups and d["symbolic_specializations"] == groups, (d, torch_kiln.explain(scripted))
    assert d["guard_misses"] == 2 * groups and d["guard_failures"] == 0
    assert d["kernel_runs"] == (2 * 512 - 1) * groups
    assert "symbolic: s0 = input 0 dim 1" in torch_kiln.explain(scripted)


def test_batch_and_sequence_moving_together_share_one_general_version(policy):
    policy("auto", cache_dir=False)
    shapes = [(2, 3, 16), (5, 3, 16), (5, 7, 16)] + [(b, s, 16) for b in (2, 9, 33) for s in (2, 17, 128)]
    d, scripted = sweep(softmax_reduce, shapes)
    # Per group: (2,3) static; (5,3): the batch moved; (5,7): the sequence too. Then nothing
    # new.
    groups = d["groups"]
    assert d["specializations"] == 3 * groups and d["symbolic_specializations"] == 2 * groups, (d, torch_kiln.explain(scripted))
    assert d["guard_failures"] == 0


def test_always_is_symbolic_from_the_first_call(policy):
    policy("always", cache_dir=False)
    d, scripted = sweep(softmax_reduce, [(b, s, 16) for b in (2, 5, 64) for s in (3, 40)])
    assert d["specializations"] == d["symbolic_specializations"] == d["groups"], (d, torch_kiln.explain(scripted))


def test_static_compiles_per_size_until_the_limit_then_counts_and_names_the_fallback(policy):
    policy("static", cache_dir=False, max_specializations=3)
    d, scripted = sweep(spine, [(b, 8) for b in range(2, 8)])
    assert d["specializations"] == 3 and d["symbolic_specializations"] == 0
    # Sizes 5, 6, 7 run TorchScript: twice each, with the reason counted.
    assert d["guard_failures"] == 6
    assert "specialisation limit (3) reached" in " ".join(torch_kiln.stats()["fallbacks"])


def test_rank_and_dtype_changes_get_code_of_their_own(policy):
    policy("auto", cache_dir=False)
    d, scripted = sweep(spine, [(b, 8) for b in (2, 3, 4)] + [(2, 3, 8)])
    assert d["specializations"] == 3 and d["guard_failures"] == 0  # 2; then batch >= 2; then rank 3
    before = torch_kiln.stats()
    x, y = rows(spine, (6, 8), 99)
    with torch.no_grad():
        for _ in range(2):
            close(scripted(x.double(), y.double()), spine(x.double(), y.double()))
    assert torch_kiln.stats()["guard_misses"] - before["guard_misses"] == 1


def test_tied_batch_dims_that_stop_agreeing_are_a_new_signature(policy):
    policy("auto", cache_dir=False)
    fn = fresh_script(spine)
    with torch.no_grad():
        for b in (2, 3, 4):
            x, y = rows(spine, (b, 8), b)
            for _ in range(2):
                close(fn(x, y), spine(x, y))
        # y now broadcasts along the batch: the tie is broken, and its batch of 1 is static.
        x, y = torch.randn(5, 8), torch.randn(1, 8)
        before = torch_kiln.stats()
        close(fn(x, y), spine(x, y))
        after = torch_kiln.stats()
    assert after["guard_misses"] - before["guard_misses"] == 1 and after["kernel_runs"] - before["kernel_runs"] == 1


def test_transposed_and_sliced_inputs_get_general_code_for_their_layout(policy):
    policy("auto", cache_dir=False)
    fn = fresh_script(softmax_reduce)
    before = torch_kiln.stats()
    with torch.no_grad():
        for b in (2, 3, 4, 5, 17):
            x, _ = rows(softmax_reduce, (6, 7, b), b)
            x, w = x.permute(2, 1, 0), torch.randn(6)  # dense, batch innermost: strides follow the batch
            for _ in range(2):
                close(fn(x, w), softmax_reduce(x, w))
        for b in (2, 3, 4, 5, 17):
            buf, w = rows(softmax_reduce, (b, 7, 12), b)
            x = buf[:, :, :6]  # a slice of a wider buffer: strides fixed, whatever the batch
            w = w[:6]
            for _ in range(2):
                close(fn(x, w), softmax_reduce(x, w))
        # Contiguous: another layout, code of its own.
        x, w = rows(softmax_reduce, (9, 7, 6), 9)
        for _ in range(2):
            close(fn(x, w), softmax_reduce(x, w))
    after = torch_kiln.stats()
    groups = after["groups"] - before["groups"]
    assert after["guard_failures"] == before["guard_failures"]
    # Per group: permuted (2 static, then general), sliced (one general), contiguous (one).
    assert after["specializations"] - before["specializations"] == 4 * groups
    text = torch_kiln.explain(fn)
    assert "f32[s0, 7, 6] dense order=[2, 1, 0]" in text and "f32[s0, 7, 6] strides=[84, 12, 1]" in text, text


def test_bad_dynamic_option_names_the_problem():
    with pytest.raises(ValueError, match="'dynamic' must be 'auto', 'static' or 'always'"):
        torch_kiln.enable(dynamic="sometimes")
    torch_kiln.enable()


def test_explain_and_stats_show_symbols_and_policy(policy):
    policy("auto", cache_dir=False)
    d, scripted = sweep(softmax_reduce, [(2, 4, 8), (3, 4, 8)])
    text = torch_kiln.explain(scripted)
    assert "guards: f32[s0, 4, 8] contiguous; f32[8] strides=[1]" in text
    assert "needed new code" in text
    assert torch_kiln.stats()["dynamic"] == "auto"
