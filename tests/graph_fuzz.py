"""A fuzzer of whole TorchScript functions: random DAGs of the ops Kiln supports, on random
shapes with broadcasting, non-contiguous inputs, special values and several dtypes, each run
by TorchScript (with Kiln enabled) and by eager PyTorch on a sequence of input shapes.

    .venv/bin/python tests/graph_fuzz.py --graphs 3000 --seed 7     # the long run
    (tests/test_graph_fuzz.py runs a short one with a fixed seed in the test command)

Outputs are compared for their layout (significant strides) as well as their values.

A mismatch is shrunk (nodes dropped, sizes made smaller) to a small reproducer, which is
printed and, with --save, written to tests/fuzz_regressions/ where test_graph_fuzz.py replays
it on every test run.

What counts as a mismatch: integer and bool results must equal eager's. Each floating-point
element must agree with eager (torch.testing's default tolerances, float32's wherever float32
rounding is inside the function; NaN with NaN), or with eager run on contiguous copies of the
inputs or with gelu as eager's vectorised loop computes it (eager's vectorised and scalar
loops differ on a few special values: float32 gelu(+inf), which zero minimum(+0, -0) is), or
with the float64 result of the same function, or be no further from that float64 result than
eager's result is (times two, plus the tolerance):
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
INPUT_DTYPES = [torch.float32, torch.float64, torch.int64, torch.int32, torch.bool]


class Case:
    """A generated function: source text, the inputs' dims (each a base-dim index or None for
    a broadcast 1) and dtypes. Shapes are drawn per call from base sizes."""

    def __init__(self, source, input_dims, dtypes, rank):
        self.source, self.input_dims, self.dtypes, self.rank = source, input_dims, dtypes, rank

    def to_json(self):
        return {"source": self.source, "input_dims": self.input_dims, "dtypes": [str(d).split(".")[1] for d in self.dtypes], "rank": self.rank}

    @staticmethod
    def from_json(d):
        return Case(d["source"], [list(x) for x in d["input_dims"]], [getattr(torch, t) for t in d["dtypes"]], d["rank"])


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


def _result_type(*values):
    """torch.result_type of values (name, dims, dtype), with their ranks (a 0-dim tensor
    promotes like a scalar)."""
    ts = [torch.empty((1,) * len(dims), dtype=dt) for _, dims, dt in values]
    out = ts[0]
    for t in ts[1:]:
        out = torch.empty(out.shape if out.dim() >= t.dim() else t.shape, dtype=torch.result_type(out, t))
    return out.dtype


def generate(rng, max_nodes=8):
    """A random Case. Values are (name, dims, dtype); dims are symbolic: a list of base-dim
    indices, None for a broadcast 1."""
    main = rng.choice(DTYPES)
    rank = rng.randint(1, 4)
    base = list(range(rank))
    inputs, dtypes = [], []
    for _ in range(rng.randint(1, 3)):
        dims = [d if rng.random() > 0.25 else None for d in base]
        if rng.random() < 0.2 and len(dims) > 1:
            dims = dims[1:]  # a lower-rank input, broadcast from the left
        inputs.append(dims)
        dtypes.append(main if rng.random() < 0.75 else rng.choice(INPUT_DTYPES))
    values = [(f"x{i}", dims, dt) for i, (dims, dt) in enumerate(zip(inputs, dtypes))]
    lines = []
    for k in range(rng.randint(1, max_nodes)):
        made = _node(rng, values)
        if made is None:
            continue
        expr, dims, dtype = made
        lines.append(f"v{k} = {expr}")
        values.append((f"v{k}", dims, dtype))
    if not lines:
        lines.append("v0 = x0.to(torch.float64) * 2.0")
        values.append(("v0", inputs[0], torch.float64))
    outs = [values[-1][0]]
    if rng.random() < 0.3 and len(values) > len(inputs) + 1:
        outs.append(rng.choice(values[len(inputs):-1])[0])
    args = ", ".join(f"x{i}" for i in range(len(inputs)))
    body = "\n".join("    " + l for l in lines)
    ret = outs[0] if len(outs) == 1 else f"({', '.join(outs)})"
    return Case(f"def fn({args}):\n{body}\n    return {ret}\n", inputs, dtypes, rank)


def _node(rng, values):
    """One random node over `values`: (expression, dims, dtype), or None."""
    name, adims, adt = a = rng.choice(values)
    numeric = [v for v in values if v[2] != torch.bool and _broadcast(adims, v[1]) is not None]
    kind = rng.random()
    if kind < 0.3:
        if adt.is_floating_point:
            return FLOAT_UNARY[rng.choice(list(FLOAT_UNARY))].format(a=name), adims, adt
        if adt == torch.bool:
            return "torch.logical_not({a})".format(a=name), adims, torch.bool
        op = rng.choice(list(INT_UNARY) + ["halve"])
        if op == "halve":  # an integer tensor times a float scalar is float32
            return f"{name} * 0.5", adims, torch.float32
        return INT_UNARY[op].format(a=name), adims, adt
    if kind < 0.4:
        # float -> int is left out: eager's conversion of NaN/inf/out-of-range is undefined.
        # A conversion to the same dtype returns its input (no op to compile): left out too.
        targets = [torch.float32, torch.float64] + ([] if adt.is_floating_point else [torch.int64, torch.int32])
        to = rng.choice([t for t in targets if t != adt])
        return f"{name}.to(torch.{str(to).split('.')[1]})", adims, to
    if kind < 0.62:
        if adt == torch.bool or not numeric:
            return None
        b = rng.choice(numeric)
        op = rng.choice(list(FLOAT_BINARY))
        dtype = _result_type(a, b)
        if op == "div" and not dtype.is_floating_point:
            dtype = torch.float32
        return FLOAT_BINARY[op].format(a=name, b=b[0]), _broadcast(adims, b[1]), dtype
    if kind < 0.72:
        if adt == torch.bool or not numeric:
            return None
        b, c = rng.choice(numeric), rng.choice(numeric)
        dims = _broadcast(_broadcast(adims, b[1]), c[1])
        if dims is None:
            return None
        cond = f"{name} {rng.choice(CMP)} {b[0]}"
        if rng.random() < 0.3:
            return cond, _broadcast(adims, b[1]), torch.bool
        return f"torch.where({cond}, {name}, {c[0]})", dims, _result_type(a, c)
    if kind < 0.88 and adims:
        d = rng.randrange(len(adims))
        keep = rng.random() < 0.5
        dims = [x if i != d else None for i, x in enumerate(adims)] if keep else adims[:d] + adims[d + 1:]
        if adt.is_floating_point:
            op, dtype = rng.choice(FLOAT_REDUCE), adt
        elif adt == torch.bool:
            op, dtype = "sum", torch.int64
        else:
            op = rng.choice(INT_REDUCE)
            dtype = torch.int64 if op == "sum" else adt
        return f"torch.{op}({name}, {d}, keepdim={keep})", dims, dtype
    if kind < 0.94 and adt.is_floating_point and len(adims) >= 2:
        # A product with its own transpose, or of its transpose with a function of itself
        # (the GEMM, or the loop nest for thin outputs and float64): views as operands.
        if rng.random() < 0.5:
            return f"torch.matmul({name}, {name}.transpose(-1, -2))", adims[:-1] + [adims[-2]], adt
        return f"torch.matmul({name}.transpose(-1, -2), torch.tanh({name}))", adims[:-2] + [adims[-1], adims[-1]], adt
    if adt.is_floating_point and adims:
        d = rng.randrange(len(adims))
        return f"torch.{rng.choice(['softmax', 'log_softmax'])}({name}, {d})", adims, adt
    return None


def shape_sequence(rng, rank, n=6):
    """Base sizes for successive calls: repeats (profiling, optimising, compiled), then new
    sizes, twice each (the dims that moved become symbolic: later sizes run general code),
    then the first again. Half the new sizes move one dim only, as a batch or a sequence
    length does."""
    first = [rng.choice(SIZES) for _ in range(rank)]
    seq = [first, first, first]
    last = first
    for _ in range(n - 2):
        new = lambda: rng.choice(SIZES + [0]) if rng.random() < 0.1 else rng.choice(SIZES)
        if rank and rng.random() < 0.5:
            d = rng.randrange(rank)
            last = last[:d] + [new()] + last[d + 1:]
        else:
            last = [new() for _ in range(rank)]
        seq += [last] * 2
    return seq + [first]


def make_input(rng, dims, sizes, dtype, gen):
    """An input of the shape `dims` gives at `sizes`, in a random layout: contiguous, with its
    dims in another order in memory (transposed, channels-last-like), every other element of
    its last dim (a slice), or an as_strided view with a size-1 dim's stride out of the
    ordinary; special values in some."""
    shape = [1 if d is None else sizes[d] for d in dims]
    order = list(range(len(shape)))
    if rng.random() < 0.3:
        rng.shuffle(order)
    noncontig = rng.random() < 0.25 and shape
    full = [shape[d] for d in order]
    if noncontig:
        full[-1] = full[-1] * 2
    if dtype == torch.bool:
        t = torch.rand(full, generator=gen) < 0.5
    elif dtype.is_floating_point:
        t = torch.randn(full, generator=gen, dtype=torch.float64).mul_(2.0).to(dtype)
        if rng.random() < 0.25 and t.numel():
            flat = t.view(-1)
            for v in (float("nan"), float("inf"), -float("inf"), 0.0):
                flat[rng.randrange(flat.numel())] = v
    else:
        t = torch.randint(-20, 20, full, generator=gen, dtype=dtype)
    if noncontig:
        t = t[..., ::2]
    t = t.permute([order.index(d) for d in range(len(shape))])
    units = [d for d, n in enumerate(shape) if n == 1]
    if units and rng.random() < 0.2:
        strides = list(t.stride())
        strides[rng.choice(units)] = rng.choice([1, 7, 1000])  # never stepped along
        t = t.as_strided(t.shape, strides)
    return t


def compile_case(case):
    ns = {"torch": torch}
    exec(case.source, ns)
    scripted = torch.jit.CompilationUnit(case.source).fn
    return scripted, ns["fn"]


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _gelu_as_vectorised(x, approximate="none"):
    """float32 gelu as eager's vectorised loop computes it: gelu(+inf) is NaN there, but +inf
    in its scalar loop (one-element and strided tensors). Kiln always gives NaN."""
    y = torch.nn.functional.gelu(x, approximate=approximate)
    if x.dtype == torch.float32 and approximate == "none":
        y = torch.where(x == float("inf"), torch.full_like(y, float("nan")), y)
    return y


def eager_variants(case):
    """Eager's answers to compare against: the function as written, and (where it calls gelu)
    with gelu as eager's vectorised loop computes it."""
    ns = {"torch": torch, "_gelu": _gelu_as_vectorised}
    exec(case.source, ns)
    fns = [ns["fn"]]
    if "functional.gelu(" in case.source:
        exec(case.source.replace("torch.nn.functional.gelu(", "_gelu("), ns)
        fns.append(ns["fn"])
    return fns


def float64_reference(case):
    """The function computed in float64 throughout (float inputs are cast by the caller):
    casts to float32 become float64, and integer * 0.5 or integer division (float32 by
    PyTorch's default dtype) are float64 under a float64 default dtype."""
    ns = {"torch": torch}
    exec(case.source.replace("torch.float32", "torch.float64"), ns)

    def fn(*args):
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            return ns["fn"](*args)
        finally:
            torch.set_default_dtype(old)

    return fn


def significant_strides(t):
    """The strides that decide a tensor's layout (PyTorch's `check_significant_strides`):
    those of dims longer than 1, in tensors with elements."""
    if t.numel() == 0:
        return ()
    return tuple((d, s) for d, (n, s) in enumerate(zip(t.shape, t.stride())) if n > 1)


def agrees(got, wants, f64, float32_inside=False):
    """None if `got` (TorchScript + Kiln) is acceptable against eager's answers `wants` (see
    `run_case`), else why not (see the module docstring). Its layout must be eager's on the
    same inputs (`wants[0]`). With `float32_inside` the result carries float32 rounding even
    if it is float64, and is held to float32 tolerances."""
    want = wants[0]
    if got.dtype != want.dtype or got.shape != want.shape:
        return f"dtype/shape {got.dtype}{tuple(got.shape)} vs eager {want.dtype}{tuple(want.shape)}"
    if significant_strides(got) != significant_strides(want):
        return f"strides {got.stride()} vs eager {want.stride()} (shape {tuple(got.shape)})"
    if not want.dtype.is_floating_point:
        return None if any(torch.equal(got, w) for w in wants) else "integer results differ"
    f32 = want.dtype == torch.float32 or float32_inside
    rtol, atol = (1.3e-6, 1e-5) if f32 else (1e-7, 1e-7)
    g, e = got.double(), f64.double()

    def same(a, b):
        return (torch.isnan(a) & torch.isnan(b)) | (a == b) | ((a - b).abs() <= atol + rtol * b.abs())

    ok = same(g, e)
    for w in wants:
        w = w.double()
        # No further from the float64 answer than eager is (finite values only).
        no_worse = (g - e).abs() <= 2 * (w - e).abs() + atol + rtol * e.abs()
        ok |= same(g, w) | (torch.isfinite(g) & torch.isfinite(w) & no_worse)
    if bool(ok.all()):
        return None
    i = tuple(int(j) for j in (~ok).nonzero()[0])
    return f"at {i}: kiln {g[i].item()!r}, eager {[w.double()[i].item() for w in wants]!r}, float64 {e[i].item()!r}"


def run_case(case, seed, kiln_stats):
    """Runs `case` on a shape sequence. Returns (problem or None, calls that ran Kiln code)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    scripted, eager = compile_case(case)
    variants = eager_variants(case)
    reference = float64_reference(case)
    kiln_calls = 0
    for step, sizes in enumerate(shape_sequence(rng, case.rank)):
        args = [make_input(rng, dims, sizes, dt, gen) for dims, dt in zip(case.input_dims, case.dtypes)]
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
        answers = [want, _as_tuple(eager(*[a.contiguous() for a in args]))]
        answers += [_as_tuple(f(*args)) for f in variants[1:]]
        exact = _as_tuple(reference(*[a.double() if a.is_floating_point() else a for a in args]))
        # The ways a generated function makes float32 from other dtypes: a float32 input, a cast,
        # an integer times 0.5, an integer division.
        float32_inside = torch.float32 in case.dtypes or any(t in case.source for t in ("float32", " * 0.5", " / "))
        for i, (g, e) in enumerate(zip(got, exact)):
            why = agrees(g, [a[i] for a in answers], e, float32_inside)
            if why:
                shapes = [(tuple(a.shape), a.stride()) for a in args]
                return f"call {step} sizes {sizes} inputs (shape, strides) {shapes} output {i}: {why}", kiln_calls
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
                cand = Case(src, best.input_dims, best.dtypes, best.rank)
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


def symbolic_code():
    import torch_kiln
    return torch_kiln.stats()["symbolic_specializations"]


def fuzz(graphs, seed, log=print, save_dir=None):
    """Runs `graphs` cases from `seed`. Returns (cases that ran Kiln code, cases that made code
    for symbolic sizes, list of failures)."""
    rng = random.Random(seed)
    failures, with_kiln, with_symbolic = [], 0, 0
    for g in range(graphs):
        case_seed = rng.randrange(1 << 30)
        case = generate(random.Random(case_seed))
        symbolic_before = symbolic_code()
        problem, kiln_calls = run_case(case, case_seed, kiln_runs)
        with_kiln += kiln_calls > 0
        with_symbolic += symbolic_code() > symbolic_before
        if problem:
            small = shrink(case, case_seed, kiln_runs)
            small_problem, _ = run_case(small, case_seed, kiln_runs)
            log(f"graph {g} (case seed {case_seed}): {small_problem or problem}\n{textwrap.indent(small.source, '    ')}")
            failures.append((case_seed, small, small_problem or problem))
            if save_dir:
                os.makedirs(save_dir, exist_ok=True)
                with open(os.path.join(save_dir, f"case_{case_seed}.json"), "w") as f:
                    json.dump({"seed": case_seed, "problem": small_problem or problem, **small.to_json()}, f, indent=1)
    return with_kiln, with_symbolic, failures


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--graphs", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", action="store_true", help="write shrunk failures to tests/fuzz_regressions/")
    p.add_argument("--dynamic", default="auto", choices=["auto", "static", "always"], help="Kiln's dynamic= policy")
    a = p.parse_args()
    import torch_kiln
    torch.set_num_threads(1)
    torch_kiln.enable(cache_dir=False, dynamic=a.dynamic)
    save = os.path.join(os.path.dirname(__file__), "fuzz_regressions") if a.save else None
    with_kiln, with_symbolic, failures = fuzz(a.graphs, a.seed, save_dir=save)
    print(f"{a.graphs} graphs, {with_kiln} ran Kiln code, {with_symbolic} made code for symbolic sizes, "
          f"{len(failures)} mismatches")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
