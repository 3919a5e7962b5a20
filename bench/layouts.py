"""Benchmark (not a test): elementwise functions on inputs in other layouts than contiguous
(transposed, channels-last, a permuted 3-D tensor), whose outputs take the inputs' layout as
in eager. Kiln beside eager, TorchScript, TorchScript + oneDNN fusion, torch.compile and ONNX
Runtime, in one process, median ms and ratios to Kiln. Checks every output's values and
significant strides against eager.

    .venv/bin/python bench/layouts.py [--n 1048576] [--threads 2] [--reps 200]

ONNX Runtime takes contiguous arrays only: its column includes the copy to one (and its
output is contiguous).
"""

import argparse
import os
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from pointwise import ensure, median_ms, ratio_cells  # noqa: E402

warnings.filterwarnings("ignore")

SOURCES = {
    "a + b - a": "def f(a, b):\n    return a + b - a\n",
    "gelu(a) * b + a": "def f(a, b):\n    return torch.nn.functional.gelu(a) * b + a\n",
}


def layouts(n):
    side = int(n ** 0.5)
    c = max(2, int((n / 256) ** 0.5))
    return {
        "contiguous": lambda: torch.randn(side, side),
        "transposed": lambda: torch.randn(side, side).t(),
        "channels_last": lambda: torch.randn(4, 64, c, c).to(memory_format=torch.channels_last),
        "permuted": lambda: torch.randn(64, side // 8, side // 8).permute(1, 2, 0),
    }


def significant(t):
    return tuple((n, s) for n, s in zip(t.shape, t.stride()) if n > 1)


class Module(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, a, b):
        return self.fn(a, b)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1 << 20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import torch_kiln

    warm = torch.randn(args.n)
    median_ms(lambda x: x + x, (warm,), 200)  # settle clocks and the allocator first
    rows = []
    for fname, src in SOURCES.items():
        ns = {"torch": torch}
        exec(src, ns)
        eager = ns["f"]
        for lname, make in layouts(args.n).items():
            a, b = make(), make()
            want = eager(a, b)
            times = {}

            def run(tool, build, check_layout=True):
                try:
                    fn = build()
                    for _ in range(3):
                        out = fn(a, b)
                    if isinstance(out, torch.Tensor):
                        torch.testing.assert_close(out, want)
                        if check_layout and significant(out) != significant(want):
                            raise AssertionError(f"strides {out.stride()}, eager {want.stride()}")
                    times[tool] = median_ms(fn, (a, b), args.reps)
                except Exception as e:  # one broken tool must not hide the others
                    times[tool] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"

            run("eager", lambda: eager)
            run("torchscript", lambda: torch.jit.CompilationUnit(src).f)

            def onednn():
                torch.jit.enable_onednn_fusion(True)
                try:
                    return torch.jit.freeze(torch.jit.trace(Module(eager).eval(), (a, b)))
                finally:
                    torch.jit.enable_onednn_fusion(False)

            run("ts+onednn", onednn)
            run("torch.compile", lambda: torch.compile(eager))

            def onnxruntime():
                ensure("onnx", "onnxruntime", "onnxscript")
                import onnxruntime as ort

                path = os.path.join(tempfile.mkdtemp(), "f.onnx")
                torch.onnx.export(Module(eager), (a.contiguous(), b.contiguous()), path, input_names=["a", "b"], dynamo=True, verbose=False)
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = args.threads
                opts.inter_op_num_threads = 1
                sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
                return lambda x, y: torch.from_numpy(sess.run(None, {"a": x.contiguous().numpy(), "b": y.contiguous().numpy()})[0])

            run("onnxruntime", onnxruntime, check_layout=False)
            torch_kiln.enable(num_threads=args.threads, background=False)
            before = torch_kiln.stats()["kernel_runs"]
            run("kiln", lambda: torch.jit.CompilationUnit(src).f)
            ran = torch_kiln.stats()["kernel_runs"] > before
            torch_kiln.disable()
            if not ran:
                times["kiln"] = "failed: no Kiln group ran"
            rows.append((fname, lname, tuple(a.shape), times))

    print(f"\nelementwise functions on laid-out float32 inputs, ~{args.n} elements, {args.threads} threads, median ms (x = time / Kiln's)")
    tools = ["kiln", "eager", "torchscript", "ts+onednn", "torch.compile", "onnxruntime"]
    print(f"{'function':18}{'layout':15}" + "".join(f"{t:>18}" for t in tools))
    for fname, lname, shape, times in rows:
        print(f"{fname:18}{lname:15}" + ratio_cells(times, tools, 18, 3))
    failures = [(f, l, t, v) for f, l, _, times in rows for t, v in times.items() if not isinstance(v, float)]
    for f, l, t, v in failures:
        print(f"  {f} / {l} / {t}: {v}")


if __name__ == "__main__":
    main()
