"""Benchmark (not a test): Kiln's GEMM in GFLOP/s and as a fraction of this machine's FP32 peak,
beside torch.mm (MKL) on the same shapes, 1 and 2 threads, in one process. The peak is
measured in the same run with ../shared/tools/peak.c (`gcc -O2 -mavx512f -mfma peak.c
-lpthread`; on a host without AVX-512 its AVX2 variant, `avx2_variant`); without gcc or the
file the %-of-peak columns are left out.

    .venv/bin/python bench/gemm.py [--threads 1 2] [--shapes 2048x2048x2048 64x1024x1024 ...]

Shapes are MxNxK. `xWᵀ` shapes multiply by a transposed weight, as a Linear layer does (B
read k-contiguous); others are plain row-major products. B is an unchanging input, so Kiln
packs it once and keeps it (as it does a model's weights); A is packed on every call. Kiln
runs a scripted `torch.mm`
through its own kernel (asserted: the final call ran a Kiln group); results are checked
against torch.mm.
"""

import argparse
import os
import re
import subprocess
import tempfile
import time

import torch

DEFAULT_SHAPES = [
    "2048x2048x2048",
    # The models' shapes (issue 10): mlp at batch 1 / 64, the encoder's 128-token projections.
    "1x1024x512", "1x1024x1024", "1x256x1024",
    "64x1024x512", "64x1024x1024", "64x256x1024",
    "128x768x256", "128x256x256", "128x1024x256", "128x256x1024",
    "64x4096x4096", "128x4096x1024",
]


def has_avx512():
    with open("/proc/cpuinfo") as f:
        return " avx512f" in f.read()


def avx2_variant(c_source):
    """peak.c with 8-float AVX2 registers for its 16-float AVX-512 ones (same 12 chains of
    FMAs), for hosts without AVX-512 (Zen 3), where the original cannot run."""
    s = c_source.replace("__m512", "__m256").replace("_mm512_set1_ps", "_mm256_set1_ps").replace("_mm512_fmadd_ps", "_mm256_fmadd_ps")
    s = s.replace("s+=_mm512_reduce_add_ps(a[i]);", "{float t[8]; _mm256_storeu_ps(t,a[i]); for(int j=0;j<8;j++) s+=t[j];}")
    return s.replace("*12*16*2", "*12*8*2")


def peak_gflops(threads):
    src = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "tools", "peak.c")
    if not os.path.exists(src):
        return None
    tmp = tempfile.mkdtemp()
    exe = os.path.join(tmp, "peak")
    flags = ["-mavx512f"]
    if not has_avx512():
        with open(src) as f:
            variant = avx2_variant(f.read())
        src, flags = os.path.join(tmp, "peak_avx2.c"), ["-mavx2"]
        with open(src, "w") as f:
            f.write(variant)
    if subprocess.run(["gcc", "-O2", *flags, "-mfma", src, "-o", exe, "-lpthread"], capture_output=True).returncode != 0:
        return None
    out = subprocess.run([exe], capture_output=True, text=True).stdout
    found = dict(re.findall(r"threads (\d+): ([\d.]+) GFLOP/s", out))
    return float(found[str(threads)]) if str(threads) in found else None


def best_seconds(fn, flops):
    reps = max(3, min(2000, int(4e9 / max(flops, 1))))
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES)
    args = ap.parse_args()
    import torch_kiln

    print("GEMM, float32, GFLOP/s (% of the measured FP32 peak); Kiln / torch.mm time ratio")
    for threads in args.threads:
        torch.set_num_threads(threads)
        peak = peak_gflops(threads)
        print(f"\n{threads} thread(s), peak {peak:.0f} GFLOP/s" if peak else f"\n{threads} thread(s), peak unknown")
        print(f"{'M x N x K':>16} {'B':>5} {'kiln':>16} {'torch.mm':>16} {'kiln/mm time':>13}")
        for shape in args.shapes:
            m, n, k = (int(x) for x in shape.split("x"))
            for transposed in (False, True):
                a = torch.randn(m, k)
                b = torch.randn(n, k).t() if transposed else torch.randn(k, n)
                flops = 2.0 * m * n * k
                t_mm = best_seconds(lambda: torch.mm(a, b), flops)
                torch_kiln.enable(num_threads=threads, background=False)
                fn = torch.jit.CompilationUnit("def f(a, b):\n    return torch.mm(a, b)\n").f
                for _ in range(3):
                    out = fn(a, b)
                before = torch_kiln.stats()["kernel_runs"]
                out = fn(a, b)
                ran = torch_kiln.stats()["kernel_runs"] > before
                torch.testing.assert_close(out, torch.mm(a, b), rtol=1e-4, atol=1e-4 * k ** 0.5)
                t_kiln = best_seconds(lambda: fn(a, b), flops) if ran else None
                torch_kiln.disable()

                def cell(t):
                    if t is None:
                        return "no kiln group"
                    g = flops / t / 1e9
                    return f"{g:7.1f}" + (f" ({100 * g / peak:3.0f}%)" if peak else "")

                ratio = f"{t_kiln / t_mm:13.2f}" if t_kiln else f"{'-':>13}"
                print(f"{shape:>16} {'xWᵀ' if transposed else 'x·B':>5} {cell(t_kiln):>16} {cell(t_mm):>16} {ratio}", flush=True)


if __name__ == "__main__":
    main()
