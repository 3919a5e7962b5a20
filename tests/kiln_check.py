"""Helpers for end-to-end tests: run a scripted function past profiling and assert both the
result (against eager) and that a Kiln group really ran on the final call."""

import inspect
import textwrap

import torch
import torch_kiln

# TorchScript's profiling executor: call 1 profiles, call 2 optimises (Kiln's pass runs).
WARMUP_CALLS = 2


def spine(x, y):
    """The pointwise function Kiln started from (issue 1), used by several test files."""
    a = x * torch.sigmoid(x)
    b = torch.tanh(y) * 0.5 + 1.0
    c = torch.relu(a - b) * a + b
    return c / (1.0 + torch.exp(-c))


def counters():
    s = torch_kiln.stats()
    return s["kernel_runs"], s["guard_failures"]


def run_compiled(scripted, args, expected=None, reference=None, *, must_compile=True, warmup_reference=None, check=None):
    """Calls `scripted` until it is optimised, then once more, comparing every result with
    `reference(*args)` (or `expected`). Returns (result, whether a Kiln group ran on the
    final call). With must_compile, a final call that ran no Kiln group fails the test.
    `warmup_reference` checks the profiling call instead (it runs TorchScript's own kernels,
    where `reference` is more exact than those; from the optimising call on, Kiln runs).
    `check(result)`, where given, is the comparison instead."""
    if expected is None and check is None:
        expected = reference(*args)
    compare = check or (lambda out: close(out, expected))
    for call in range(WARMUP_CALLS):
        if call == 0 and warmup_reference is not None:
            close(scripted(*args), warmup_reference(*args))
        else:
            compare(scripted(*args))
    runs, fails = counters()
    out = scripted(*args)
    runs2, fails2 = counters()
    ran = runs2 > runs and fails2 == fails
    compare(out)
    if must_compile:
        assert ran, f"no Kiln group ran on the final call; explain:\n{torch_kiln.explain(scripted)}"
    return out, ran


def in_threads(work, n):
    """Runs `work(i)` for i in 0..n, each on a thread of its own, and raises the first error
    one of them met (an assertion in a thread is otherwise lost)."""
    import threading

    errors = []

    def run(i):
        try:
            work(i)
        except Exception as e:  # noqa: BLE001 (raised below, in the caller's thread)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def close(actual, expected):
    torch.testing.assert_close(actual, expected, equal_nan=True)


def flat(out):
    """A model's result as a list of tensors (tuples of states flattened)."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for part in out for t in flat(part)]


def same_layouts(expected):
    """A check that every result is `close` to eager's (Kiln's sigmoid and tanh are its own:
    compared as float32 results are) with eager's sizes and strides."""

    def check(out):
        for got, want in zip(flat(out), flat(expected), strict=True):
            assert got.shape == want.shape and got.stride() == want.stride(), (got.shape, got.stride(), want.stride())
            close(got, want)

    return check


def no_worse_than_float32(out, evaluations, exact):
    """Kiln's `out` is nowhere further from `exact` than twice the largest error of the
    float32 `evaluations` (or than the default tolerance allows), NaN where exact is NaN."""
    assert all(out.dtype == e.dtype and out.shape == e.shape for e in evaluations)
    assert torch.equal(out.isnan(), exact.isnan()), "NaN elsewhere than the float64 result"
    worst = max((float((e.double() - exact).nan_to_num(0).abs().max()) for e in evaluations), default=0.0) if exact.numel() else 0.0
    err = (out.double() - exact).nan_to_num(0).abs()
    bound = torch.clamp(1e-5 + 1.3e-6 * exact.nan_to_num(0).abs(), min=2 * worst)
    assert bool((err <= bound).all()), f"error {err.max().item():.3g}, float32 evaluations' largest {worst:.3g}"


def script_source(src, name="fn"):
    """A TorchScript function from source text (torch.jit.script needs a file for a def)."""
    return getattr(torch.jit.CompilationUnit(src), name)


def fresh_script(fn):
    """A new TorchScript function for `fn`: torch.jit.script(fn) returns one cached per
    Python function, whose groups would carry specialisations from other tests."""
    return script_source(textwrap.dedent(inspect.getsource(fn)), fn.__name__)


def run_isolated(body, timeout=300):
    """Runs `body` (Python source) in a fresh interpreter with Kiln enabled (memory cache
    only), so that a crash fails the calling test instead of killing pytest. Returns what it
    printed; fails the test on a non-zero exit (a signal included)."""
    import subprocess
    import sys

    preamble = (
        "import warnings\nwarnings.filterwarnings('ignore')\n"
        "import torch, torch_kiln\ntorch_kiln.enable(cache_dir=False)\n"
    )
    r = subprocess.run([sys.executable, "-c", preamble + textwrap.dedent(body)], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"exit status {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r.stdout
