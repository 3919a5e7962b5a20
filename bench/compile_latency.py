"""Benchmark (not a test): what compiling costs the caller (issue 11's targets), each figure
from fresh processes so that every compile is cold (no disk cache, LLVM not yet used).

    .venv/bin/python bench/compile_latency.py [--repeat 3] [--parts sweep,compile,model]

- `sweep`: `softmax(gelu(x * w) + tanh(x)) * 2` on 4096-wide rows, called three times at each
  of 64 batch sizes (1..64, shuffled; as `bench/batch_sizes.py` does), from the first call of the process on: the total wall time of
  the 64 calls for eager, TorchScript and Kiln (background compiles, the default, and
  synchronous ones), every result checked against eager (not timed), and the worst excess of
  one call over TorchScript's own call at that size.
- `compile`: the cold compile of the spine's one-kernel group (1024x1024) and of the
  100-node normalisation stack (`bench/startup.py`'s `normstack`, traced, 64x1024): Kiln's
  compile time of the group (`stats()["compile_time_ms"]`: lowering, LLVM, loading; compiled
  synchronously, on all cores) and where it went (`compile_phases_ms`, summed over threads).
- `model`: the largest model Kiln compiles, the 4-layer transformer encoder of `bench/models.py`
  (traced, frozen, 1x128x256): Kiln's compile time for it beside torch.compile's cold first
  call (Inductor's caches in a fresh directory).

Runs against a build without background compiles too (before/after tables): `synchronize`,
the `background` option and the phase counters are then skipped.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def enable(**options):
    import torch_kiln
    if not hasattr(torch_kiln, "synchronize"):  # a build from before background compiles
        options.pop("background", None)
    torch_kiln.enable(**options)


def synchronize():
    import torch_kiln
    getattr(torch_kiln, "synchronize", lambda: None)()
WIDTH = 4096
CALLS_PER_SIZE = 3  # as a server sees repeats (bench/batch_sizes.py)
SIZES = [1 + (i * 29) % 64 for i in range(64) for _ in range(CALLS_PER_SIZE)]  # 1..64 shuffled
assert sorted(set(SIZES)) == list(range(1, 65))


def sweep_function(x, w):
    y = torch.nn.functional.gelu(x * w) + torch.tanh(x)
    return torch.softmax(y, -1) * 2.0


def child_sweep(tool):
    torch.manual_seed(0)
    w = torch.randn(WIDTH)
    inputs = [torch.randn(n, WIDTH) for n in SIZES]
    expected = [sweep_function(x, w) for x in inputs]
    if tool.startswith("kiln"):
        import torch_kiln
        enable(cache_dir=False, background=(tool == "kiln"))
    f = sweep_function if tool == "eager" else torch.jit.script(sweep_function)
    times, wrong = [], 0
    with torch.no_grad():
        for x, e in zip(inputs, expected):
            t = time.perf_counter()
            out = f(x, w)
            times.append((time.perf_counter() - t) * 1e3)
            wrong += not torch.allclose(out, e, rtol=1e-5, atol=1e-6)
    extra = {}
    if tool.startswith("kiln"):
        import torch_kiln
        synchronize()
        s = torch_kiln.stats()
        extra = {"compiles": s["compiles"], "kernel_runs": s["kernel_runs"], "compile_ms": s["compile_time_ms"]}
    if os.environ.get("KILN_SWEEP_TRACE"):
        print(" ".join(f"{n}:{t:.2f}" for n, t in zip(SIZES, times)), file=sys.stderr)
    print(json.dumps({"times": times, "wrong": wrong, **extra}))


def normstack():
    sys.path.insert(0, HERE)
    from startup import make_models
    return make_models()


def child_compile(name):
    import torch
    import torch_kiln
    model, args, _ = normstack()[name]
    # The compile itself, on the calling thread (on the compile thread it shares the cores
    # with the program: the sweep measures that).
    enable(cache_dir=False, background=False)
    f = torch.jit.trace(model, args) if name == "normstack" else torch.jit.script(model)
    with torch.no_grad():
        for _ in range(3):
            f(*args)
        synchronize()
        f(*args)
    s = torch_kiln.stats()
    assert s["kernel_runs"] > 0 and s["compiles"] == 1, s
    print(json.dumps({"compile_ms": s["compile_time_ms"], "phases": s.get("compile_phases_ms", {})}))


def encoder_model():
    import torch
    sys.path.insert(0, HERE)
    from models import encoder
    torch.manual_seed(0)
    return encoder().eval(), (torch.randn(1, 128, 256),)


def child_model(tool, cache):
    import torch
    import warnings
    warnings.filterwarnings("ignore")
    m, args = encoder_model()
    with torch.no_grad():
        expected = m(*args)
        if tool == "kiln":
            import torch_kiln
            f = torch.jit.freeze(torch.jit.trace(m, args, check_trace=False))
            enable(cache_dir=False, background=False)
            start = time.perf_counter()
            for _ in range(3):
                f(*args)
            synchronize()
            out = f(*args)
            wall = (time.perf_counter() - start) * 1e3
            s = torch_kiln.stats()
            assert s["kernel_runs"] > 0, s
            result = {"compile_ms": s["compile_time_ms"], "phases": s.get("compile_phases_ms", {}), "wall_ms": wall, "compiles": s["compiles"]}
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
            f = torch.compile(m)
            start = time.perf_counter()
            out = f(*args)
            result = {"compile_ms": (time.perf_counter() - start) * 1e3}
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    print(json.dumps(result))


def spawn(*args):
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median(v):
    v = sorted(v)
    return v[len(v) // 2]


def phase_text(rows):
    keys = rows[0]["phases"].keys()
    if not keys:
        return "(no phase counters in this build)"
    return ", ".join(f"{k} {median([r['phases'][k] for r in rows]):.1f}" for k in keys)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--parts", default="sweep,compile,model")
    p.add_argument("--child", nargs="+")
    a = p.parse_args()
    if a.child:
        kind, *rest = a.child
        return {"sweep": child_sweep, "compile": child_compile, "model": child_model}[kind](*rest)
    import torch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fresh process per run, median of {a.repeat}")
    parts = a.parts.split(",")
    if "sweep" in parts:
        tools = ["eager", "torchscript", "kiln", "kiln-sync"]
        runs = {t: [spawn("sweep", t) for _ in range(a.repeat)] for t in tools}
        total = {t: median([sum(r["times"]) for r in rs]) for t, rs in runs.items()}
        per_call_ts = [median([r["times"][i] for r in runs["torchscript"]]) for i in range(len(SIZES))]
        print(f"\nsweep: 64 batch sizes x {WIDTH} wide, {CALLS_PER_SIZE} calls each (ms)")
        print(f"{'tool':12} {'total':>8} {'÷ eager':>8} {'worst call - TS':>16} {'wrong':>6} {'compiles':>9}")
        for t, rs in runs.items():
            worst = median([max(c - ts for c, ts in zip(r["times"], per_call_ts)) for r in rs])
            wrong = max(r["wrong"] for r in rs)
            comp = rs[0].get("compiles", "")
            print(f"{t:12} {total[t]:8.1f} {total[t] / total['eager']:8.2f} {worst:16.2f} {wrong:6} {comp!s:>9}")
    if "compile" in parts:
        print("\ncold compile of one group (ms; phases summed over the process)")
        for name in ["spine", "normstack"]:
            rows = [spawn("compile", name) for _ in range(a.repeat)]
            print(f"{name:10} {median([r['compile_ms'] for r in rows]):8.1f}   {phase_text(rows)}")
    if "model" in parts:
        print("\ntransformer encoder (4 layers, d=256, 1x128), cold (ms)")
        kiln = [spawn("model", "kiln", "") for _ in range(a.repeat)]
        work = tempfile.mkdtemp(prefix="kiln-compile-latency-")
        inductor = [spawn("model", "torch.compile", os.path.join(work, f"inductor-{r}")) for r in range(a.repeat)]
        k, c = median([r["compile_ms"] for r in kiln]), median([r["compile_ms"] for r in inductor])
        print(f"kiln compile {k:.1f} ({kiln[0]['compiles']} programs; first 4 calls + sync {median([r['wall_ms'] for r in kiln]):.1f}; {phase_text(kiln)})")
        print(f"torch.compile first call {c:.1f}")
        print(f"kiln ÷ torch.compile: {k / c:.3f}")


if __name__ == "__main__":
    main()
