"""A fuzzer of whole TorchScript functions: random DAGs of the ops Kiln supports, on random
shapes with broadcasting, non-contiguous inputs, special values and several dtypes, each run
by TorchScript (with Kiln enabled) and by eager PyTorch on a sequence of input shapes.

    .venv/bin/python tests/graph_fuzz.py --graphs 3000 --seed 7     # the long run
    (tests/test_graph_fuzz.py runs a short one with a fixed seed in the test command)

A mismatch is shrunk (nodes dropped, sizes made smaller) to a small reproducer, which is
printed and, with --save, written to tests/fuzz_regressions/ where test_graph_fuzz.py replays
it on every test run.

What counts as a mismatch: integer and bool results must equal eager's. Each floating-point
element must agree with eager (torch.testing's default tolerances; NaN with NaN), or with
eager run on contiguous copies of the inputs (eager's own vectorised and scalar loops differ
on some special values), or with the float64 result of the same function, or be no further
from that float64 result than eager's float32 result is (times two, plus the tolerance):
Kiln's exp or tanh differ from eager's in the last bit, and a chain like exp(exp(x))
magnifies that legitimately. Kiln being less accurate than eager is never accepted. Calls
where eager raises are not compared (TorchScript drops unused ops that would raise).
"""

import argparse
import json
import os
import random
import sys
import textwrap

import torch

FLOAT_UNARY = {
    "exp": "torch.exp({a})", "log": "torch.log({a})", "log1p": "torch.log1p({a})", "sigmoid": "torch.sigmoid({a})",
    "tanh": "torch.tanh({a})", "relu": "torch.relu({a})", "abs": "torch.abs({a})", "neg": "-{a}",
    "sqrt": "torch.sqrt({a})", "rsqrt": "torch.rsqrt({a})", "erf": "torch.erf({a})",
    "gelu": "torch.nn.functional.gelu({a})", "gelu_tanh": "torch.nn.functional.gelu({a}, approximate='tanh')",
    "silu": "torch.nn.functional.silu({a})", "reciprocal": "torch.reciprocal({a})",
    "leaky_relu": "torch.nn.functional.leaky_relu({a}, 0.1)", "square": "torch.pow({a}, 2.0)",
    "clamp": "torch.clamp({a}, -1.5, 2.0)", "clamp_min": "torch.clamp_min({a}, 0.25)",
    "scale": "{a} * 0.75", "shift": "{a} + 1.5", "rsub": "2.0 - {a}", "halve": "{a} / 2.0",
}
INT_UNARY = {
    "abs": "torch.abs({a})", "neg": "-{a}", "relu": "torch.relu({a})", "scale": "{a} * 3", "shift": "{a} + 2",
    "rsub": "5 - {a}", "clamp": "torch.clamp({a}, -4, 6)",
}
BINARY = {"add": "{a} + {b}", "sub": "{a} - {b}", "mul": "{a} * {b}", "maximum": "torch.maximum({a}, {b})",
          "minimum": "torch.minimum({a}, {b})"}
FLOAT_BINARY = {**BINARY, "div": "{a} / {b}"}
CMP = [">", "<", ">=", "<=", "==", "!="]
FLOAT_REDUCE = ["sum", "mean", "amax", "amin"]
INT_REDUCE = ["sum", "amax", "amin"]
SIZES = [1, 2, 3, 5, 8, 17, 33]
DTYPES = [torch.float32] * 6 + [torch.float64] * 2 + [torch.int64, torch.int32]


class Case:
    """A generated function: source text, the inputs' dims (each a base-dim index or None for
    a broadcast 1), and the dtype. Shapes are drawn per call from base sizes."""

    def __init__(self, source, input_dims, dtype, rank):
        self.source, self.input_dims, self.dtype, self.rank = source, input_dims, dtype, rank

    def to_json(self):
        return {"source": self.source, "input_dims": self.input_dims, "dtype": str(self.dtype).split(".")[1], "rank": self.rank}

    @staticmethod
    def from_json(d):
        return Case(d["source"], [list(x) for x in d["input_dims"]], getattr(torch, d["dtype"]), d["rank"])


def _broadcast(a, b):
    """The broadcast of two dims lists (right-aligned; None is a 1), or None if incompatible."""
    n = max(len(a), len(b))
    a, b = [None] * (n - len(a)) + list(a), [None] * (n - len(b)) + list(b)
    out = []
    for x, y in zip(a, b):
        if x is not None and y is not None and x != y:
            return None
        out.append(x if x is not None else y)
    return out


def generate(rng, max_nodes=8):
    """A random Case. Values are symbolic: a list of dims, each a base-dim index or None."""
    dtype = rng.choice(DTYPES)
    is_float = dtype.is_floating_point
    rank = rng.randint(1, 3)
    base = list(range(rank))
    inputs = []
    for _ in range(rng.randint(1, 3)):
        dims = [d if rng.random() > 0.25 else None for d in base]
        if rng.random() < 0.2 and len(dims) > 1:
            dims = dims[1:]  # a lower-rank input, broadcast from the left
        inputs.append(dims)
    values = [(f"x{i}", dims) for i, dims in enumerate(inputs)]
    lines = []
    unary = FLOAT_UNARY if is_float else INT_UNARY
    binary = FLOAT_BINARY if is_float else BINARY
    for k in range(rng.randint(1, max_nodes)):
        name = f"v{k}"
        a, adims = rng.choice(values)
        kind = rng.random()
        if kind < 0.4:
            expr, dims = unary[rng.choice(list(unary))].format(a=a), adims
        elif kind < 0.7:
            partners = [(b, bd) for b, bd in values if _broadcast(adims, bd) is not None]
            b, bdims = rng.choice(partners)
            expr, dims = binary[rng.choice(list(binary))].format(a=a, b=b), _broadcast(adims, bdims)
        elif kind < 0.8:
            partners = [(b, bd) for b, bd in values if _broadcast(adims, bd) is not None]
            (b, bdims), (c, cdims) = rng.choice(partners), rng.choice(partners)
            dims = _broadcast(_broadcast(adims, bdims), cdims)
            if dims is None:
                continue
            expr = f"torch.where({a} {rng.choice(CMP)} {b}, {a}, {c})"
        elif kind < 0.92 and adims:
            d = rng.randrange(len(adims))
            keep = rng.random() < 0.5
            op = rng.choice(FLOAT_REDUCE if is_float else INT_REDUCE)
            expr = f"torch.{op}({a}, {d}, keepdim={keep})"
            dims = [x if i != d else None for i, x in enumerate(adims)] if keep else adims[:d] + adims[d + 1:]
        elif is_float and adims:
            d = rng.randrange(len(adims))
            expr, dims = f"torch.{rng.choice(['softmax', 'log_softmax'])}({a}, {d})", adims
        else:
            continue
        lines.append(f"{name} = {expr}")
        values.append((name, dims))
    if not lines:
        lines.append(f"v0 = {unary['abs'].format(a='x0')}")
        values.append(("v0", inputs[0]))
    outs = [values[-1][0]]
    if rng.random() < 0.3 and len(values) > len(inputs) + 1:
        outs.append(rng.choice(values[len(inputs):-1])[0])
    args = ", ".join(f"x{i}" for i in range(len(inputs)))
    body = "\n".join("    " + l for l in lines)
    ret = outs[0] if len(outs) == 1 else f"({', '.join(outs)})"
    return Case(f"def fn({args}):\n{body}\n    return {ret}\n", inputs, dtype, rank)


def shape_sequence(rng, rank, n=4):
    """Base sizes for successive calls: repeats (profiling, optimising, compiled), then new
    sizes, then the first again."""
    first = [rng.choice(SIZES) for _ in range(rank)]
    seq = [first, first, first]
    for _ in range(n - 2):
        seq += [[rng.choice(SIZES + [0]) if rng.random() < 0.1 else rng.choice(SIZES) for _ in range(rank)]] * 2
    return seq + [first]


def make_input(rng, dims, sizes, dtype, gen):
    shape = [1 if d is None else sizes[d] for d in dims]
    noncontig = rng.random() < 0.3 and shape
    full = list(shape)
    if noncontig:
        full[-1] = full[-1] * 2
    if dtype.is_floating_point:
        t = torch.randn(full, generator=gen, dtype=torch.float64).mul_(2.0).to(dtype)
        if rng.random() < 0.25 and t.numel():
            flat = t.view(-1)
            for v in (float("nan"), float("inf"), -float("inf"), 0.0):
                flat[rng.randrange(flat.numel())] = v
    else:
        t = torch.randint(-20, 20, full, generator=gen, dtype=dtype)
    if noncontig:
        t = t[..., ::2]
    if rng.random() < 0.15 and t.dim() >= 2:
        t = t.transpose(0, 1).contiguous().transpose(0, 1)  # column-major strides
    return t


def compile_case(case):
    ns = {"torch": torch}
    exec(case.source, ns)
    scripted = torch.jit.CompilationUnit(case.source).fn
    return scripted, ns["fn"]


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def agrees(got, want, want_contiguous, f64):
    """None if `got` (TorchScript + Kiln) is acceptable against eager, else why not (see the
    module docstring). Eager is asked twice: on the inputs as given and on contiguous copies,
    because eager itself answers some special values differently by layout and size (its
    vectorised and scalar loops disagree on float32 gelu(+inf), and on which zero
    minimum(+0, -0) returns)."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return f"dtype/shape {got.dtype}{tuple(got.shape)} vs eager {want.dtype}{tuple(want.shape)}"
    if not want.dtype.is_floating_point:
        return None if torch.equal(got, want) or torch.equal(got, want_contiguous) else "integer results differ"
    rtol, atol = (1.3e-6, 1e-5) if want.dtype == torch.float32 else (1e-7, 1e-7)
    g, w, wc, e = got.double(), want.double(), want_contiguous.double(), f64.double()

    def same(a, b):
        return (torch.isnan(a) & torch.isnan(b)) | (a == b) | ((a - b).abs() <= atol + rtol * b.abs())

    # No further from the float64 answer than eager is (finite values only).
    no_worse = (g - e).abs() <= 2 * (w - e).abs() + atol + rtol * e.abs()
    ok = same(g, w) | same(g, wc) | same(g, e) | (torch.isfinite(g) & torch.isfinite(w) & no_worse)
    if bool(ok.all()):
        return None
    i = tuple(int(j) for j in (~ok).nonzero()[0])
    return f"at {i}: kiln {g[i].item()!r}, eager {w[i].item()!r} (contiguous {wc[i].item()!r}), float64 {e[i].item()!r}"


def run_case(case, seed, kiln_stats):
    """Runs `case` on a shape sequence. Returns (problem or None, calls that ran Kiln code)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    scripted, eager = compile_case(case)
    kiln_calls = 0
    for step, sizes in enumerate(shape_sequence(rng, case.rank)):
        args = [make_input(rng, dims, sizes, case.dtype, gen) for dims in case.input_dims]
        try:
            want = _as_tuple(eager(*args))
        except (RuntimeError, IndexError, ValueError):
            # Eager refuses these inputs (amax over an empty dim), possibly in an op whose
            # result is unused: TorchScript removes dead ops, so it may legitimately not raise.
            want = None
        before = kiln_stats()
        try:
            got = _as_tuple(scripted(*args))
        except (RuntimeError, IndexError, ValueError) as e:
            if want is None:
                continue
            return f"call {step} sizes {sizes}: TorchScript+Kiln raised {e}, eager did not", kiln_calls
        if want is None:
            continue
        kiln_calls += kiln_stats() > before
        contiguous = _as_tuple(eager(*[a.contiguous() for a in args]))
        exact = _as_tuple(eager(*[a.double() if a.is_floating_point() else a for a in args]))
        for i, (g, w, wc, e) in enumerate(zip(got, want, contiguous, exact)):
            why = agrees(g, w, wc, e)
            if why:
                shapes = [tuple(a.shape) for a in args]
                return f"call {step} sizes {sizes} input shapes {shapes} output {i}: {why}", kiln_calls
    return None, kiln_calls


def shrink(case, seed, kiln_stats, max_tries=200):
    """A smaller case that still fails: drop body lines one by one (keeping the function
    valid), then return earlier values."""
    best = case
    tries = 0
    changed = True
    while changed and tries < max_tries:
        changed = False
        lines = best.source.splitlines()
        body = [l for l in lines[1:] if l.strip() and not l.strip().startswith("return")]
        names = [l.split("=")[0].strip() for l in body]
        for i in range(len(body)):
            for ret in names[:i] or []:
                cand_body = body[:i]
                src = lines[0] + "\n" + "\n".join(cand_body) + f"\n    return {ret}\n"
                tries += 1
                cand = Case(src, best.input_dims, best.dtype, best.rank)
                try:
                    problem, _ = run_case(cand, seed, kiln_stats)
                except Exception:
                    continue
                if problem:
                    best, changed = cand, True
                    break
            if changed:
                break
    return best


def kiln_runs():
    import torch_kiln
    return torch_kiln.stats()["kernel_runs"]


def fuzz(graphs, seed, log=print, save_dir=None):
    """Runs `graphs` cases from `seed`. Returns (cases that ran Kiln code, list of failures)."""
    rng = random.Random(seed)
    failures, with_kiln = [], 0
    for g in range(graphs):
        case_seed = rng.randrange(1 << 30)
        case = generate(random.Random(case_seed))
        problem, kiln_calls = run_case(case, case_seed, kiln_runs)
        with_kiln += kiln_calls > 0
        if problem:
            small = shrink(case, case_seed, kiln_runs)
            small_problem, _ = run_case(small, case_seed, kiln_runs)
            log(f"graph {g} (case seed {case_seed}): {small_problem or problem}\n{textwrap.indent(small.source, '    ')}")
            failures.append((case_seed, small, small_problem or problem))
            if save_dir:
                os.makedirs(save_dir, exist_ok=True)
                with open(os.path.join(save_dir, f"case_{case_seed}.json"), "w") as f:
                    json.dump({"seed": case_seed, "problem": small_problem or problem, **small.to_json()}, f, indent=1)
    return with_kiln, failures


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--graphs", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", action="store_true", help="write shrunk failures to tests/fuzz_regressions/")
    a = p.parse_args()
    import torch_kiln
    torch.set_num_threads(1)
    torch_kiln.enable(cache_dir=False)
    save = os.path.join(os.path.dirname(__file__), "fuzz_regressions") if a.save else None
    with_kiln, failures = fuzz(a.graphs, a.seed, save_dir=save)
    print(f"{a.graphs} graphs, {with_kiln} ran Kiln code, {len(failures)} mismatches")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
