"""Benchmark (not a test): Kiln's kernels for weights with zeros (issue 13).

1. The kernel sweep: square layers 256² and 1024² at batch 1 and 16, blocks 1×1, 1×4, 1×8,
   4×4, 16×1 and 50–95% zeros; per case the time of Kiln's own dense kernel, of every sparse
   format, what the cost model chose and its speedup over dense (`compiler/examples/
   sparse_speed`, `x · Wᵀ` with W kept packed, as a frozen model's is). Table, and a chart of
   the chosen kernel's speedup (`--png`).
2. The models: two Linear(256, 256) + ReLU with 90% of each weight zero (l1-unstructured
   pruning, `prune.remove`), batch 1, beside the floor of a call (a scripted `nn.Identity`,
   one relu over the same input); the WaveRNN-style step of bench/models.py with its
   five linears (embedding, the GRU's two, fc1, fc2) 90% pruned. Kiln beside Kiln's dense
   kernels on the same weights (`KILN_SPARSE_WEIGHTS=0`), eager, TorchScript, TorchScript +
   oneDNN fusion, torch.compile and ONNX Runtime, in one process, median µs and ratios.

    .venv/bin/python bench/sparse.py [--threads 2] [--reps 2000] [--png bench/sparse.png] [--no-sweep]

The FP32 peak is measured in the same run (../shared/tools/peak.c, or its AVX2 variant).
"""

import argparse
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from gemm import peak_gflops  # noqa: E402
from models import TOOLS, WaveStep, measure, print_table  # noqa: E402
from pointwise import ensure  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


class TwoLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(256, 256), torch.nn.Linear(256, 256)

    def forward(self, x):
        return torch.relu(self.b(torch.relu(self.a(x))))


def pruned(make, amount):
    """`make` with every Linear's and GRU cell's weights l1-unstructured pruned by `amount`."""
    import torch.nn.utils.prune as prune

    def build():
        m = make()
        for mod in m.modules():
            names = ["weight"] if isinstance(mod, torch.nn.Linear) else ["weight_ih", "weight_hh"] if isinstance(mod, torch.nn.GRUCell) else []
            for n in names:
                prune.l1_unstructured(mod, n, amount=amount)
                prune.remove(mod, n)
        return m

    return build


def sweep(threads):
    env = dict(os.environ)
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    env["LD_LIBRARY_PATH"] = torch_lib + ":" + env.get("LD_LIBRARY_PATH", "")
    cmd = ["cargo", "run", "--release", "-q", "-p", "kiln-compiler", "--example", "sparse_speed", "--", str(threads)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        if line.startswith("#"):
            continue
        f = line.split()
        kv = dict(x.split("=") for x in f[4:])
        times = {k: float(v) for k, v in kv.items() if k not in ("best", "predicted", "chosen", "blocks", "steps", "code_compile_ms")}
        rows.append(dict(n=int(f[0]), batch=int(f[1]), block=f[2], zeros=float(f[3]), times=times, chosen=kv["chosen"], predicted=float(kv["predicted"])))
    return rows


def print_sweep(rows, threads, peak):
    print(f"\nsparse kernels, {threads} threads, µs per call (speedup = Kiln dense / chosen)" + (f"; FP32 peak {peak:.0f} GFLOP/s" if peak else ""))
    print(f"{'layer':>6} {'batch':>5} {'block':>5} {'zeros':>5} {'dense':>8} {'chosen':>8} {'µs':>8} {'speedup':>7} {'best':>8} {'dense %peak':>11}")
    for r in rows:
        t = r["times"]
        chosen = t[r["chosen"]]
        fastest = min(t, key=t.get)
        rate = 2 * r["batch"] * r["n"] * r["n"] / t["dense"] / 1e3
        pk = f"{rate / peak:10.0%}" if peak else ""
        print(f"{r['n']:>6} {r['batch']:>5} {r['block']:>5} {r['zeros']:>5.2f} {t['dense']:>8.2f} {r['chosen']:>8} {chosen:>8.2f} {t['dense'] / chosen:>6.2f}x {fastest:>8} {pk:>11}")
    lost = [r for r in rows if r["times"][r["chosen"]] > 1.15 * min(r["times"].values())]
    print(f"cost model: {len(rows) - len(lost)} of {len(rows)} choices within 15% of the fastest measured kernel")


def chart(rows, png):
    try:
        import matplotlib
    except ImportError:
        ensure("matplotlib")
        import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["n"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), sharey=True)
    for ax, (n, batch) in zip(axes, panels):
        for block in sorted({r["block"] for r in rows}):
            pts = sorted((r["zeros"], r["times"]["dense"] / r["times"][r["chosen"]]) for r in rows if (r["n"], r["batch"], r["block"]) == (n, batch, block))
            ax.plot([100 * z for z, _ in pts], [s for _, s in pts], marker="o", label=block)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(f"{n}x{n}, batch {batch}")
        ax.set_xlabel("% zeros")
        ax.set_yscale("log")
    axes[0].set_ylabel("speedup over Kiln dense (chosen kernel)")
    axes[-1].legend(title="block", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"chart: {png}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--png", default="bench/sparse.png")
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peak = peak_gflops(args.threads)
    if not args.no_sweep:
        rows = sweep(args.threads)
        print_sweep(rows, args.threads, peak)
        chart(rows, args.png)

    onehot = torch.zeros(1, 256)
    onehot[0, 3] = 1.0
    # The floor of a call (what the two linears' target has to fit in): a scripted module
    # with no ops (no Kiln group), and one pointwise op over the same 256 floats (a group).
    cases = {
        "call_identity": (lambda: torch.nn.Identity(), (torch.randn(1, 256),), "script"),
        "call_relu_256": (lambda: torch.nn.Sequential(torch.nn.ReLU()), (torch.randn(1, 256),), "script"),
        "two_linear_90": (pruned(TwoLinear, 0.9), (torch.randn(1, 256),), "script"),
        "wavestep_90": (pruned(WaveStep, 0.9), (onehot, torch.randn(1, 80), torch.randn(1, 512)), "script"),
    }
    tools = ["kiln", "kiln dense", *TOOLS[1:]]
    results = []
    for name, (make, inputs, how) in cases.items():
        times, notes = measure(make, inputs, how, args.threads, args.reps, {"kiln dense": {"KILN_SPARSE_WEIGHTS": "0"}})
        results.append((name, times, notes))
    print_table(f"pruned models, {args.threads} threads, median µs (x = time / Kiln's)", results, tools)
    t = dict((n, times) for n, times, _ in results)
    ok = lambda x: isinstance(x, float)  # noqa: E731
    if ok(t["two_linear_90"].get("kiln")) and ok(t["two_linear_90"].get("onnxruntime")):
        r = t["two_linear_90"]["kiln"] / t["two_linear_90"]["onnxruntime"]
        print(f"target two_linear_90: Kiln / ONNX Runtime = {r:.2f} (target <= 0.25)")
    if ok(t["wavestep_90"].get("kiln")) and ok(t["wavestep_90"].get("kiln dense")):
        r = t["wavestep_90"]["kiln"] / t["wavestep_90"]["kiln dense"]
        print(f"target wavestep_90: Kiln / Kiln dense = {r:.2f} (target <= 0.4)")


if __name__ == "__main__":
    main()
