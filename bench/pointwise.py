"""Benchmark (not a test): the spine's pointwise function on two float32 tensors, Kiln beside
eager, TorchScript, TorchScript + oneDNN fusion, torch.compile and ONNX Runtime, all in this
one process with the same thread count. Prints median times and ratios to Kiln.

    .venv/bin/python bench/pointwise.py [--n 1048576] [--threads 2] [--reps 300]

ONNX Runtime needs `onnx`, `onnxruntime` and `onnxscript`; they are installed into the venv
on first use (a benchmark dependency, not a test one). A tool that fails here is reported
as such and the others still run.
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def f(x, y):
    a = x * torch.sigmoid(x)
    b = torch.tanh(y) * 0.5 + 1.0
    c = torch.relu(a - b) * a + b
    return c / (1.0 + torch.exp(-c))


class M(torch.nn.Module):
    def forward(self, x, y):
        return f(x, y)


def median_ms(fn, args, reps):
    for _ in range(max(10, reps // 10)):
        fn(*args)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] * 1e3


def ratio_cells(times, tools, width, digits):
    """Each tool's time (a float) with its ratio to Kiln's, or its failure text, for a table
    row of `width`-wide cells."""
    k = times.get("kiln")
    cells = []
    for t in tools:
        v = times.get(t)
        if isinstance(v, float):
            cells.append(f"{v:8.{digits}f}" + (f" ({v / k:4.2f}x)" if isinstance(k, float) else ""))
        else:
            cells.append(" " + str(v)[: width - 1])
    return "".join(f"{c:>{width}}" for c in cells)


def fresh_script():
    # torch.jit.script(f) is cached per Python function; each variant needs its own graph.
    return torch.jit.CompilationUnit(
        "def f(x, y):\n"
        "    a = x * torch.sigmoid(x)\n"
        "    b = torch.tanh(y) * 0.5 + 1.0\n"
        "    c = torch.relu(a - b) * a + b\n"
        "    return c / (1.0 + torch.exp(-c))\n").f


def ensure(*modules):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        print(f"installing {' '.join(missing)} for the ONNX Runtime column ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)


def onnxruntime_runner(x, y, threads):
    ensure("onnx", "onnxruntime", "onnxscript")
    import onnxruntime as ort

    path = os.path.join(tempfile.mkdtemp(), "f.onnx")
    torch.onnx.export(M(), (x, y), path, input_names=["x", "y"], dynamo=True, verbose=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feeds = {"x": x.numpy(), "y": y.numpy()}
    return lambda *_: sess.run(None, feeds)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1 << 20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=300)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x, y = torch.randn(a.n), torch.randn(a.n)
    expected = f(x, y)
    results = {}

    def run(name, make):
        try:
            fn = make()
            out = fn(x, y)
            if isinstance(out, torch.Tensor):
                torch.testing.assert_close(out, expected)
            results[name] = median_ms(fn, (x, y), a.reps)
        except Exception as e:  # report and go on: one broken tool must not hide the others
            results[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}"

    def warmed(fn):
        for _ in range(3):
            fn(x, y)
        return fn

    run("eager", lambda: f)
    run("torchscript", lambda: warmed(fresh_script()))

    def onednn():
        torch.jit.enable_onednn_fusion(True)
        try:
            traced = torch.jit.freeze(torch.jit.trace(M().eval(), (x, y)))
            return warmed(traced)
        finally:
            torch.jit.enable_onednn_fusion(False)

    run("torchscript+onednn", onednn)
    run("torch.compile", lambda: warmed(torch.compile(f)))
    run("onnxruntime", lambda: onnxruntime_runner(x, y, a.threads))

    import torch_kiln

    torch_kiln.enable(num_threads=a.threads, background=False)
    kiln_fn = warmed(fresh_script())
    run("kiln", lambda: kiln_fn)
    stats = torch_kiln.stats()

    # Guard + dispatch: a 16-element call of the Kiln group vs a TorchScript call that does
    # nothing but return its input (the interpreter's own floor).
    xs, ys = torch.randn(16), torch.randn(16)
    small = warmed_small = fresh_script()
    for _ in range(3):
        warmed_small(xs, ys)
    identity = torch.jit.CompilationUnit("def g(x, y):\n    return x\n").g
    for _ in range(3):
        identity(xs, ys)
    t_small = median_ms(small, (xs, ys), 20000) * 1e3
    t_floor = median_ms(identity, (xs, ys), 20000) * 1e3
    # Non-contiguous inputs run on strides in the generated code: transposed and strided.
    side = int(a.n ** 0.5)
    xt, yt = torch.randn(side, side).t(), torch.randn(side, side * 2)[:, ::2]
    layouts = {}
    for name, (u, v) in {"contiguous": (xt.contiguous(), yt.contiguous()), "transposed+strided": (xt, yt)}.items():
        k_fn = warmed_fn = fresh_script()
        for _ in range(3):
            warmed_fn(u, v)
        torch.testing.assert_close(k_fn(u, v), f(u, v))
        layouts[name] = (median_ms(k_fn, (u, v), a.reps), median_ms(f, (u, v), max(20, a.reps // 5)))
    torch_kiln.disable()
    ts_small = fresh_script()
    for _ in range(3):
        ts_small(xs, ys)
    t_ts_small = median_ms(ts_small, (xs, ys), 20000) * 1e3

    k = results["kiln"]
    print(f"\npointwise spine, float32, n = {a.n}, {a.threads} threads, median of {a.reps} calls")
    print(f"{'':22}{'ms':>10}{'vs kiln':>10}")
    for name, t in results.items():
        if isinstance(t, float):
            ratio = f"{t / k:.2f}x" if isinstance(k, float) else "-"
            print(f"{name:22}{t:10.3f}{ratio:>10}")
        else:
            print(f"{name:22}  {t}")
    for name, (tk, te) in layouts.items():
        print(f"{side}x{side} {name:20} kiln {tk:.3f} ms, eager {te:.3f} ms")
    print(f"\ncompile time of the group: {stats['compile_time_ms']:.1f} ms (compiles: {stats['compiles']})")
    print(f"16 elements: TorchScript identity call {t_floor:.2f} us, Kiln group call {t_small:.2f} us "
          f"(guard + dispatch + output alloc + kernel = {t_small - t_floor:.2f} us over the floor), "
          f"same function in TorchScript {t_ts_small:.2f} us")


if __name__ == "__main__":
    main()
