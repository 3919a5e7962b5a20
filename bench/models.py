"""Benchmark (not a test): issue 10's models and issue 12's torchvision classifiers (input
1 × 3 × 224 × 224), Kiln beside eager, TorchScript, TorchScript +
oneDNN fusion, torch.compile and ONNX Runtime in one process, median µs and ratios to Kiln,
and a PNG chart. Random weights (`torch.manual_seed(0)`), eval, `torch.no_grad()`, scripted
or traced, then frozen; 2 threads by default. Kiln's column says how much of each model ran
in Kiln: the count of ops left in TorchScript, taken from `torch_kiln.explain`.

    .venv/bin/python bench/models.py [--threads 2] [--reps 300] [--models mlp_b1 resnet18 ...] [--png out.png]

For the classifiers it also prints the network's GFLOP (convolutions and linears, counted by
forward hooks) and Kiln's rate as a fraction of this machine's FP32 peak, measured in the
same run with ../shared/tools/peak.c.
"""

import argparse
import os
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from gemm import peak_gflops  # noqa: E402
from pointwise import ensure, median_ms, ratio_cells  # noqa: E402

warnings.filterwarnings("ignore")


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 256)

    def forward(self, x):
        g = torch.nn.functional.gelu
        return self.l3(g(self.l2(g(self.l1(x)))))


class WaveStep(torch.nn.Module):
    """One WaveRNN-style sampling step."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(256, 128)
        self.gru = torch.nn.GRUCell(208, 512)
        self.fc1, self.fc2 = torch.nn.Linear(512, 512), torch.nn.Linear(512, 256)

    def forward(self, prev, cond, h):
        x = torch.cat([self.embed(prev), cond], 1)
        h = self.gru(x, h)
        p = torch.softmax(self.fc2(torch.relu(self.fc1(h))), 1)
        return p, h


def encoder():
    layer = torch.nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True, activation="gelu")
    return torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)


# torchvision classifiers: (name, how). Scripting densenet keeps Python lists and googlenet
# returns a named tuple, so those two are traced.
CLASSIFIERS = [
    ("resnet18", "script"), ("resnet50", "script"), ("mobilenet_v3_small", "script"), ("convnext_tiny", "script"),
    ("shufflenet_v2_x1_0", "script"), ("squeezenet1_1", "script"), ("densenet121", "trace"), ("googlenet", "trace"),
    ("mnasnet0_5", "script"), ("vgg11_bn", "script"), ("alexnet", "script"),
]


def classifier(name):
    import torchvision

    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    return lambda: getattr(torchvision.models, name)(weights=None, **kwargs)


def conv_flops(model, inputs):
    """Multiply-adds × 2 of the model's convolutions and linears on these inputs."""
    total = [0]

    def conv(m, _, out):
        total[0] += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, _, out):
        total[0] += 2 * out.numel() * m.in_features

    hooks = [m.register_forward_hook(conv if isinstance(m, torch.nn.Conv2d) else linear)
             for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(*inputs)
    for h in hooks:
        h.remove()
    return total[0]


def models():
    onehot = torch.zeros(1, 256)
    onehot[0, 3] = 1.0
    return {
        "mlp_b1": (MLP, (torch.randn(1, 512),), "script"),
        "mlp_b64": (MLP, (torch.randn(64, 512),), "script"),
        "wavestep": (WaveStep, (onehot, torch.randn(1, 80), torch.randn(1, 512)), "script"),
        "wavestep_traced": (WaveStep, (onehot, torch.randn(1, 80), torch.randn(1, 512)), "trace"),
        "encoder": (encoder, (torch.randn(1, 128, 256),), "trace"),
        "encoder_scripted": (encoder, (torch.randn(1, 128, 256),), "script"),
        **{name: (classifier(name), (torch.randn(1, 3, 224, 224),), how) for name, how in CLASSIFIERS},
    }


def median_us(fn, args, reps):
    return median_ms(fn, args, reps) * 1e3


def build(make, args, how):
    torch.manual_seed(0)
    m = make().eval()
    ts = torch.jit.script(m) if how == "script" else torch.jit.trace(m, args)
    return m, torch.jit.freeze(ts)


TOOLS = ["kiln", "eager", "torchscript", "ts+onednn", "torch.compile", "onnxruntime"]


def measure(make, inputs, how, threads, reps, kiln_variants=None, tolerance=1e-4, onnx_model=None):
    """Median µs of the model under every tool of `TOOLS` (and of Kiln once more per entry of
    `kiln_variants`, {column: {env var: value}}, set while that variant lowers and runs), each
    checked against eager (to `tolerance`, relative and absolute; a dict gives a tool's own,
    key None the others'); and notes on what ran in
    Kiln. `onnx_model(eager, inputs, path)` writes the ONNX file ONNX Runtime runs (default:
    eager exported)."""
    import torch_kiln

    times, notes = {}, []
    with torch.no_grad():
        eager, _ = build(make, inputs, how)
        want = eager(*inputs)

        def run(tool, fn):
            try:
                for _ in range(3):
                    out = fn(*inputs)
                tol = tolerance.get(tool, tolerance[None]) if isinstance(tolerance, dict) else tolerance
                torch.testing.assert_close(out, want, rtol=tol, atol=tol)
                times[tool] = median_us(fn, inputs, reps)
            except Exception as e:  # one broken tool must not hide the others
                times[tool] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:60] if str(e) else ''}"

        # Kiln first: other tools leave threads spinning for a while after their runs
        # (OpenMP, ONNX Runtime), which would take the cores from Kiln's pool.
        for tool, env in [("kiln", {}), *(kiln_variants or {}).items()]:
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                torch_kiln.enable(num_threads=threads, background=False)
                torch_kiln.reset()
                k = build(make, inputs, how)[1]
                run(tool, k)
                text = torch_kiln.explain(k)
            finally:
                for key, v in saved.items():
                    if v is None:
                        os.environ.pop(key)
                    else:
                        os.environ[key] = v
            if tool == "kiln":
                left = [line.split("]")[1].split(": ")[0].strip() for line in text.splitlines() if line.startswith("  [torchscript]")]
                notes.append(f"{len(left)} op(s) left in TorchScript" + (f": {', '.join(sorted(set(left)))[:80]}" if left else ""))
                notes += sorted({line.strip() for line in text.splitlines() if line.strip().startswith("weight ")})
            torch_kiln.disable()
        run("eager", eager)
        run("torchscript", build(make, inputs, how)[1])
        torch.jit.enable_onednn_fusion(True)
        try:
            run("ts+onednn", build(make, inputs, how)[1])
        finally:
            torch.jit.enable_onednn_fusion(False)
        run("torch.compile", torch.compile(eager))
        try:
            ensure("onnx", "onnxruntime", "onnxscript")
            import onnxruntime as ort

            path = os.path.join(tempfile.mkdtemp(), "m.onnx")
            names = [f"i{i}" for i in range(len(inputs))]
            if onnx_model is None:
                torch.onnx.export(eager, inputs, path, input_names=names, dynamo=True, verbose=False)
            else:
                onnx_model(eager, inputs, path, names)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
            sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

            def ort_fn(*xs):
                outs = sess.run(None, {n: x.numpy() for n, x in zip(names, xs)})
                outs = [torch.from_numpy(o) for o in outs]
                return outs[0] if len(outs) == 1 else tuple(outs)

            run("onnxruntime", ort_fn)
            del sess, ort_fn  # its threads go with it
        except Exception as e:
            times["onnxruntime"] = f"failed: {type(e).__name__}"
    return times, notes


def print_table(title, rows, tools):
    """Rows of (model, times, notes) as a table of each tool's time and ratio to Kiln's, the
    notes under each model, then every tool's failure in full."""
    print(f"\n{title}")
    print(f"{'model':20}" + "".join(f"{t:>22}" for t in tools))
    for name, times, notes in rows:
        print(f"{name:20}" + ratio_cells(times, tools, 22, 1))
        for n in notes:
            print(f"{'':20}kiln: {n}")
    for name, times, _ in rows:
        for t, v in times.items():
            if not isinstance(v, float):
                print(f"  {name} / {t}: {v}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--models", nargs="+", default=list(models()))
    ap.add_argument("--png", default="bench/models.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tools = TOOLS
    peak = peak_gflops(args.threads)
    rows = []
    for name in args.models:
        make, inputs, how = models()[name]
        times, notes = measure(make, inputs, how, args.threads, args.reps)
        if name in dict(CLASSIFIERS) and isinstance(times.get("kiln"), float):
            flops = conv_flops(build(make, inputs, how)[0], inputs)
            rate = flops / times["kiln"] / 1e3
            notes.append(f"{flops / 1e9:.2f} GFLOP: {rate:.0f} GFLOP/s" + (f" = {rate / peak:.0%} of the {peak:.0f} GFLOP/s peak" if peak else ""))
        rows.append((name, times, notes))

    title = f"models, {args.threads} threads, median µs (x = time / Kiln's)"
    print_table(title + (f"; FP32 peak {peak:.0f} GFLOP/s" if peak else ""), rows, tools)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        ensure("matplotlib")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(10, len(rows) * 0.9), 4))
    width = 0.8 / len(tools)
    for i, t in enumerate(tools):
        vals = [r[1].get(t) if isinstance(r[1].get(t), float) else 0 for r in rows]
        ax.bar([j + i * width for j in range(len(rows))], vals, width, label=t)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [r[0] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("median µs (lower is better)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"chart: {args.png}")


if __name__ == "__main__":
    main()
