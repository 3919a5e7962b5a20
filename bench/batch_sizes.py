"""Benchmark (not a test): one function called at 50 different batch sizes in a row (each size
twice, as a server sees repeats), in one process per tool. Prints total time, the time of the
first call at each new size (what a recompile stalls), and how many compiles each tool made.

    .venv/bin/python bench/batch_sizes.py [--sizes 50] [--width 1024]

Tools: TorchScript (profiling executor, default settings), Kiln static (one specialisation per
signature up to max_specializations, then TorchScript), torch.compile (default automatic
dynamic shapes). Kiln dynamic (symbolic dims) joins this table when it exists (issue 4).
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
        torch_kiln.enable(cache_dir=False)
    if tool == "torch.compile":
        run = torch.compile(f)
    else:
        run = torch.jit.script(f)
    first_calls, start = [], time.perf_counter()
    with torch.no_grad():
        for b in batches:
            x = torch.randn(b, width)
            t = time.perf_counter()
            out = run(x, w)
            first_calls.append(time.perf_counter() - t)
            run(x, w)
            torch.testing.assert_close(out, f(x, w), rtol=1e-5, atol=1e-5)
    total = time.perf_counter() - start
    result = {"total_ms": total * 1e3, "worst_first_ms": max(first_calls) * 1e3}
    if tool.startswith("kiln"):
        s = torch_kiln.stats()
        result.update(compiles=s["compiles"], kernel_runs=s["kernel_runs"], guard_failures=s["guard_failures"])
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
    print(f"{a.sizes} batch sizes (1..97), width {a.width}, each size called twice; fresh process per tool")
    print(f"{'tool':16} {'total ms':>10} {'worst first call ms':>20} {'compiles':>9} {'kiln runs':>10}")
    for tool in ["torchscript", "kiln-static", "torch.compile"]:
        out = subprocess.run([sys.executable, __file__, "--child", tool, "--sizes", str(a.sizes), "--width", str(a.width)],
                             capture_output=True, text=True, env=os.environ, timeout=1800)
        if out.returncode != 0:
            print(f"{tool:16} failed: {out.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{tool:16} {r['total_ms']:10.1f} {r['worst_first_ms']:20.1f} {r.get('compiles', '-'):>9} {r.get('kernel_runs', '-'):>10}")


if __name__ == "__main__":
    main()
