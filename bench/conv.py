"""Benchmark (not a test): Kiln's convolutions on the layers ResNet-18 runs (input 224×224,
batch 1), in GFLOP/s and as a fraction of this machine's FP32 peak, beside torch.conv2d
(oneDNN) on the same layer in the same process. Each layer is conv + bias + ReLU, as a
frozen ResNet runs it (batch norm folded into the convolution). The peak is measured in the
same run with ../shared/tools/peak.c.

    .venv/bin/python bench/conv.py [--threads 2] [--batch 1]

Kiln runs a scripted function of the layer through its own kernel (asserted: the final call
ran a Kiln group); results are checked against eager.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from gemm import best_seconds, peak_gflops  # noqa: E402

# (name, in channels, out channels, kernel, stride, padding, input size): ResNet-18's
# distinct convolutions, with how many times the network runs each.
LAYERS = [
    ("conv1 7x7/2", 3, 64, 7, 2, 3, 224, 1),
    ("layer1 3x3", 64, 64, 3, 1, 1, 56, 4),
    ("layer2 3x3/2", 64, 128, 3, 2, 1, 56, 1),
    ("layer2 3x3", 128, 128, 3, 1, 1, 28, 3),
    ("layer2 1x1/2", 64, 128, 1, 2, 0, 56, 1),
    ("layer3 3x3/2", 128, 256, 3, 2, 1, 28, 1),
    ("layer3 3x3", 256, 256, 3, 1, 1, 14, 3),
    ("layer3 1x1/2", 128, 256, 1, 2, 0, 28, 1),
    ("layer4 3x3/2", 256, 512, 3, 2, 1, 14, 1),
    ("layer4 3x3", 512, 512, 3, 1, 1, 7, 3),
    ("layer4 1x1/2", 256, 512, 1, 2, 0, 14, 1),
]

SOURCE = (
    "def layer(x, w, b):\n"
    "    return torch.relu(torch.conv2d(x, w, b, [{s}, {s}], [{p}, {p}], [1, 1], 1))\n"
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--channels-last", action="store_true", help="images (and so outputs) in channels-last layout")
    args = ap.parse_args()
    import torch_kiln

    torch.set_num_threads(args.threads)
    peak = peak_gflops(args.threads)
    layout = "channels-last" if args.channels_last else "NCHW"
    print(f"ResNet-18's convolutions (+ bias + ReLU), {layout}, batch {args.batch}, {args.threads} thread(s), "
          f"FP32 peak {peak:.0f} GFLOP/s" if peak else "peak unknown")
    print(f"{'layer':>14} {'MFLOP':>7} {'kiln GFLOP/s':>16} {'torch.conv2d':>16} {'kiln/torch time':>16}")
    total = {"kiln": 0.0, "torch": 0.0, "flops": 0.0}
    for name, cin, cout, k, s, p, size, count in LAYERS:
        torch.manual_seed(0)
        x = torch.randn(args.batch, cin, size, size)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5
        b = torch.randn(cout)
        out = (size + 2 * p - k) // s + 1
        flops = 2.0 * args.batch * cout * out * out * cin * k * k
        eager = lambda: torch.relu(torch.conv2d(x, w, b, s, p))  # noqa: E731
        with torch.no_grad():
            t_torch = best_seconds(eager, flops)
            torch_kiln.enable(num_threads=args.threads, background=False)
            fn = torch.jit.CompilationUnit(SOURCE.format(s=s, p=p)).layer
            for _ in range(3):
                fn(x, w, b)
            runs = torch_kiln.stats()["kernel_runs"]
            got = fn(x, w, b)
            assert torch_kiln.stats()["kernel_runs"] > runs, torch_kiln.explain(fn)
            torch.testing.assert_close(got, eager(), rtol=1e-4, atol=1e-4)
            t_kiln = best_seconds(lambda: fn(x, w, b), flops)
            torch_kiln.disable()
        cell = lambda t: f"{flops / t / 1e9:7.1f}" + (f" ({flops / t / 1e9 / peak:4.0%})" if peak else "")  # noqa: E731
        print(f"{name:>14} {flops / 1e6:7.1f} {cell(t_kiln):>16} {cell(t_torch):>16} {t_kiln / t_torch:16.2f}")
        total["kiln"] += count * t_kiln
        total["torch"] += count * t_torch
        total["flops"] += count * flops
    cell = lambda t: f"{total['flops'] / t / 1e9:7.1f}" + (f" ({total['flops'] / t / 1e9 / peak:4.0%})" if peak else "")  # noqa: E731
    print(f"{'all (x count)':>14} {total['flops'] / 1e6:7.1f} {cell(total['kiln']):>16} {cell(total['torch']):>16} {total['kiln'] / total['torch']:16.2f}")


if __name__ == "__main__":
    main()
