"""Benchmark (not a test): one function called at 50 different batch sizes in a row (each size
three times, as a server sees repeats), in one process per tool. Prints the total time of the
calls (compiles and profiling runs included; the correctness check against eager after each
size is not timed), the steady time (per size, the faster of calls 2 and 3, summed), the worst first call at a new
size (what a recompile stalls), and how many compiles each tool made.

    .venv/bin/python bench/batch_sizes.py [--sizes 50] [--width 1024]

Tools: eager; TorchScript (profiling executor, default settings); TorchScript + oneDNN fusion
(traced at the first size and frozen); Kiln dynamic (the default, dynamic="auto": the batch
dim becomes symbolic once it has moved; compiles in the background, the default, and with
`-sync` on the calling thread); Kiln static (dynamic="static": one specialisation per
signature up to max_specializations, then TorchScript); torch.compile (default automatic
dynamic shapes); ONNX Runtime (exported once with a dynamic batch dim; export and session
creation count as part of its first call, as compiling does for the others).
"""

import argparse
import json
import os
import subprocess
import sys
import time


def make_function():
    import torch

    def f(x, w):
        y = torch.nn.functional.gelu(x * w) + torch.tanh(x)
        return torch.softmax(y, -1) * 2.0

    return f


def onednn_runner(f, x, w):
    import torch

    class M(torch.nn.Module):
        def forward(self, x, w):
            return f(x, w)

    torch.jit.enable_onednn_fusion(True)
    return torch.jit.freeze(torch.jit.trace(M().eval(), (x, w)))


def onnxruntime_runner(f, x, w):
    import os
    import tempfile
    import onnxruntime as ort
    import torch

    class M(torch.nn.Module):
        def forward(self, x, w):
            return f(x, w)

    path = os.path.join(tempfile.mkdtemp(), "f.onnx")
    torch.onnx.export(M(), (x, w), path, input_names=["x", "w"], dynamo=True, verbose=False,
                      dynamic_shapes={"x": {0: torch.export.Dim.DYNAMIC}, "w": None})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return lambda x, w: torch.from_numpy(sess.run(None, {"x": x.numpy(), "w": w.numpy()})[0])


def child(tool, sizes, width):
    import torch
    import warnings
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    f = make_function()
    w = torch.randn(width)
    batches = [1 + (i * 37) % 97 for i in range(sizes)]  # 50 distinct sizes in 1..97, shuffled
    assert len(set(batches)) == sizes
    if tool.startswith("kiln"):
        import torch_kiln
        torch_kiln.enable(cache_dir=False, dynamic="static" if tool == "kiln-static" else "auto", background=not tool.endswith("-sync"))
    setup = 0.0
    if tool == "torch.compile":
        run = torch.compile(f)
    elif tool == "eager":
        run = f
    elif tool in ("torchscript+onednn", "onnxruntime"):
        t = time.perf_counter()
        make = onednn_runner if tool == "torchscript+onednn" else onnxruntime_runner
        run = make(f, torch.randn(batches[0], width), w)
        setup = time.perf_counter() - t
    else:
        run = torch.jit.script(f)
    calls = []  # per size: the three calls' times
    with torch.no_grad():
        for b in batches:
            x = torch.randn(b, width)
            times = []
            for _ in range(3):
                t = time.perf_counter()
                out = run(x, w)
                times.append(time.perf_counter() - t + setup)
                setup = 0.0
            calls.append(times)
            torch.testing.assert_close(out, f(x, w), rtol=1e-5, atol=1e-5)
    result = {"total_ms": sum(map(sum, calls)) * 1e3, "steady_ms": sum(min(c[1:]) for c in calls) * 1e3,
              "worst_first_ms": max(c[0] for c in calls) * 1e3}
    if tool.startswith("kiln"):
        s = torch_kiln.stats()
        result.update(compiles=s["compiles"], compile_ms=s["compile_time_ms"], kernel_runs=s["kernel_runs"], guard_failures=s["guard_failures"])
    elif tool == "torch.compile":
        from torch._dynamo.utils import counters
        result.update(compiles=counters["stats"]["unique_graphs"])
    print(json.dumps(result))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, default=50)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--child", default=None)
    a = p.parse_args()
    if a.child:
        return child(a.child, a.sizes, a.width)
    print(f"{a.sizes} batch sizes (1..97), width {a.width}, each size called 3 times; fresh process per tool")
    print(f"{'tool':20} {'total ms':>10} {'vs kiln':>8} {'steady ms':>13} {'vs kiln':>8} {'worst first call ms':>20} "
          f"{'compiles':>9} {'compile ms':>11} {'kiln runs':>10}")
    kiln = None
    for tool in ["kiln-dynamic", "eager", "torchscript", "torchscript+onednn", "kiln-dynamic-sync", "kiln-static", "torch.compile", "onnxruntime"]:
        out = subprocess.run([sys.executable, __file__, "--child", tool, "--sizes", str(a.sizes), "--width", str(a.width)],
                             capture_output=True, text=True, env=os.environ, timeout=1800)
        if out.returncode != 0:
            print(f"{tool:20} failed: {out.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        kiln = kiln or r
        compile_ms = f"{r['compile_ms']:.1f}" if "compile_ms" in r else "-"
        print(f"{tool:20} {r['total_ms']:10.1f} {r['total_ms'] / kiln['total_ms']:7.2f}x {r['steady_ms']:13.2f} "
              f"{r['steady_ms'] / kiln['steady_ms']:7.2f}x {r['worst_first_ms']:20.1f} "
              f"{r.get('compiles', '-'):>9} {compile_ms:>11} {r.get('kernel_runs', '-'):>10}")


if __name__ == "__main__":
    main()
