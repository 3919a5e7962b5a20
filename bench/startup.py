"""Benchmark (not a test): time from `import torch_kiln` (or, for the others, from right after
`import torch`) to a model's first result, each in a fresh process, for Kiln with an empty
cache and with a prewarmed one (compile="never"), plain TorchScript, and torch.compile cold,
with its local caches warm, and warm from `torch.compiler.save_cache_artifacts` /
`load_cache_artifacts` into an empty cache directory (what shipping a cache looks like).

    .venv/bin/python bench/startup.py [--repeat 3] [--models spine,normstack]

Models: `spine`, the spine's pointwise function on two 1024x1024 float32 tensors, and
`normstack`, six traced blocks of layer norm (written out), gelu and softmax on 64x1024: the
largest model that runs entirely in Kiln today. Reported per tool (median of --repeat fresh
processes): ms to the first result, ms to the first result computed by the tool's own code
(TorchScript profiles the first call in its interpreter and optimises on the second, where
Kiln's groups first run), and the model's steady run time.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# The child part imports torch itself, after its timer has started where it must.


def make_models():
    import torch

    class Spine(torch.nn.Module):
        def forward(self, x, y):
            a = x * torch.sigmoid(x)
            b = torch.tanh(y) * 0.5 + 1.0
            c = torch.relu(a - b) * a + b
            return c / (1.0 + torch.exp(-c))

    class NormStack(torch.nn.Module):
        def __init__(self, width=1024, depth=6):
            super().__init__()
            torch.manual_seed(0)
            self.gamma = torch.nn.Parameter(1.0 + 0.1 * torch.randn(depth, width))
            self.beta = torch.nn.Parameter(0.1 * torch.randn(depth, width))

        def forward(self, x):
            for i in range(self.gamma.shape[0]):
                mu = x.mean(-1, keepdim=True)
                var = ((x - mu) * (x - mu)).mean(-1, keepdim=True)
                h = (x - mu) * torch.rsqrt(var + 1e-5) * self.gamma[i] + self.beta[i]
                h = torch.nn.functional.gelu(h)
                x = x + torch.softmax(h, -1) * h
            return x

    torch.manual_seed(1)
    return {
        "spine": (Spine(), (torch.randn(1024, 1024), torch.randn(1024, 1024)), ["1024x1024:float32", "1024x1024:float32"]),
        "normstack": (NormStack().eval(), (torch.randn(64, 1024),), ["64x1024:float32"]),
    }


def child(tool, model_name, model_file, cache_dir, artifacts):
    """One fresh process: prints {"first_ms", "first_own_ms", "run_ms"}."""
    import torch  # not timed: every tool needs it
    import warnings
    warnings.filterwarnings("ignore")
    torch.manual_seed(1)
    model, args, _ = make_models()[model_name]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls_to_own = 1
    start = time.perf_counter()
    if tool.startswith("kiln"):
        import torch_kiln
        torch_kiln.enable(compile="never" if tool == "kiln-prewarmed" else "lazy", cache_dir=cache_dir, background=False)
    if tool in ("torchscript", "kiln-cold", "kiln-prewarmed"):
        run = torch.jit.load(model_file)
        calls_to_own = 2
    else:
        if tool == "compile-artifacts":
            with open(artifacts, "rb") as f:
                torch.compiler.load_cache_artifacts(f.read())
        model.load_state_dict(state)
        run = torch.compile(model)
    times = []
    with torch.no_grad():
        for _ in range(calls_to_own):
            out = run(*args)
            times.append((time.perf_counter() - start) * 1e3)
        if tool == "compile-cold" and artifacts:
            blob = torch.compiler.save_cache_artifacts()
            if blob is not None:
                with open(artifacts, "wb") as f:
                    f.write(blob[0])
        torch.testing.assert_close(out, model(*args), rtol=1e-4, atol=1e-4)
        steady = []
        for _ in range(20):
            t = time.perf_counter()
            run(*args)
            steady.append((time.perf_counter() - t) * 1e3)
    if tool.startswith("kiln"):
        s = torch_kiln.stats()
        assert s["kernel_runs"] > 0, s
        if tool == "kiln-prewarmed":
            assert s["compiles"] == 0, s
    steady.sort()
    print(json.dumps({"first_ms": times[0], "first_own_ms": times[-1], "run_ms": steady[len(steady) // 2]}))


def spawn(tool, model, model_file, cache_dir, artifacts="", env=None):
    out = subprocess.run([sys.executable, __file__, "--child", tool, model, model_file, cache_dir, artifacts],
                         capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{tool} on {model} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median(rows, key):
    v = sorted(r[key] for r in rows)
    return v[len(v) // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--models", default="spine,normstack")
    p.add_argument("--child", nargs=5, metavar=("TOOL", "MODEL", "FILE", "CACHE", "ARTIFACTS"))
    a = p.parse_args()
    if a.child:
        return child(*a.child)
    import torch
    work = tempfile.mkdtemp(prefix="kiln-startup-")
    models = make_models()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fresh process per run, median of {a.repeat}")
    for name in a.models.split(","):
        model, args, specs = models[name]
        model_file = os.path.join(work, f"{name}.pt")
        scripted = torch.jit.trace(model, args) if name == "normstack" else torch.jit.script(model)
        torch.jit.save(scripted, model_file)
        prewarmed = os.path.join(work, f"{name}-prewarmed")
        pw = subprocess.run([sys.executable, "-m", "torch_kiln", "prewarm", model_file, "--quiet", "--cache-dir", prewarmed]
                            + [x for s in specs for x in ("--input", s)], capture_output=True, text=True)
        assert pw.returncode == 0, pw.stderr
        results = {}
        for tool in ["torchscript", "kiln-cold", "kiln-prewarmed", "compile-cold", "compile-local-warm", "compile-artifacts"]:
            rows = []
            for r in range(a.repeat):
                run_dir = os.path.join(work, f"{name}-{tool}-{r}")
                inductor = {"TORCHINDUCTOR_CACHE_DIR": os.path.join(run_dir, "inductor")}
                if tool == "kiln-cold":
                    rows.append(spawn(tool, name, model_file, os.path.join(run_dir, "kiln")))
                elif tool == "kiln-prewarmed":
                    rows.append(spawn(tool, name, model_file, prewarmed))
                elif tool == "compile-cold":
                    rows.append(spawn(tool, name, model_file, "", os.path.join(work, f"{name}-artifacts-{r}"), inductor))
                elif tool == "compile-local-warm":
                    # The same inductor cache directory as the cold run r, now filled.
                    cold = {"TORCHINDUCTOR_CACHE_DIR": os.path.join(work, f"{name}-compile-cold-{r}", "inductor")}
                    rows.append(spawn(tool, name, model_file, "", "", cold))
                elif tool == "compile-artifacts":
                    rows.append(spawn(tool, name, model_file, "", os.path.join(work, f"{name}-artifacts-{r}"), inductor))
                else:
                    rows.append(spawn(tool, name, model_file, ""))
            results[tool] = {k: median(rows, k) for k in ("first_ms", "first_own_ms", "run_ms")}
        print(f"\n{name}: {pw.stdout.strip().splitlines()[0]}")
        print(f"{'tool':22} {'first result ms':>16} {'first own-code ms':>18} {'run ms':>8}")
        for tool, r in results.items():
            print(f"{tool:22} {r['first_ms']:16.1f} {r['first_own_ms']:18.1f} {r['run_ms']:8.3f}")
        pre, ts = results["kiln-prewarmed"], results["torchscript"]
        print(f"kiln prewarmed vs torchscript, first own-code result: {pre['first_own_ms'] - ts['first_own_ms']:+.1f} ms")


if __name__ == "__main__":
    main()
