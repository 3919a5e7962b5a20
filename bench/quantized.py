"""Quantized int8 models (issue 13): dynamically quantized, the MLP of the dense issue and the
WaveRNN step with its linears and GRU cell quantized; statically quantized, ResNet-18
(`resnet18_int8`, fbgemm backend, per-channel weights) and MobileNetV2 (`mobilenet_v2_int8`, its
depthwise convolutions); a two-layer LSTM over 50 frames
(`speech_lstm`, `aten::quantized_lstm`, unrolled). Kiln's int8 kernels beside Kiln's own float32
code for the same model, and the int8 model under eager, TorchScript, TorchScript + oneDNN
fusion, torch.compile and ONNX Runtime (its own `quantize_dynamic` of the float model,
QInt8 weights, 2 threads), in one run, as ratios to Kiln.

    KILN_BACKGROUND=0 .venv/bin/python bench/quantized.py [--threads 2] [--reps 300]

The target's ratio (Kiln float32 / Kiln int8, the "target:" line under each model) is measured
on its own, the two in alternation (best of five rounds); the table's columns are one median
each, tool after tool. The int8 GEMMs are
quoted as multiply-adds per second against the float32 peak of this
machine measured in the same run (`../shared/tools/peak.c`): an AVX2 core does 16 float32
multiply-adds a cycle (two FMAs of 8) and 32 int8 ones (`vpmaddubsw` + `vpmaddwd` on two
ports, 32 bytes each), so 2× the float32 multiply-adds are the int8 ceiling; with AVX-512 VNNI
(`vpdpbusd`: 64 multiply-adds where an FMA of 16 lanes does 16, on the same ports) 4×.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from gemm import peak_gflops  # noqa: E402
from models import MLP, TOOLS, build, conv_flops, ensure, measure, median_us, models, print_table  # noqa: E402

nn = torch.nn


def dynamic(make, modules):
    def quantized():
        torch.manual_seed(0)
        return torch.ao.quantization.quantize_dynamic(make().eval(), modules, dtype=torch.qint8)
    return quantized


class ReluMLP(MLP):
    def forward(self, x):
        return self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))


def ort_int8(float_make):
    """ONNX Runtime's own dynamic quantization of the float model (what an ORT user runs)."""
    def write(_eager, inputs, path, names):
        ensure("onnx", "onnxruntime", "onnxscript")
        from onnxruntime.quantization import QuantType, quantize_dynamic

        torch.manual_seed(0)
        fp = float_make().eval()
        tmp = path + ".fp32.onnx"
        torch.onnx.export(fp, inputs, tmp, input_names=names, dynamo=False, verbose=False)
        quantize_dynamic(tmp, path, weight_type=QuantType.QInt8)
    return write


class SpeechLSTM(nn.Module):
    """A speech-style acoustic model at batch 1: two LSTM layers over 50 frames of 80
    features, a linear over each frame's state."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(80, 256, num_layers=2)
        self.fc = nn.Linear(256, 40)

    def forward(self, x):
        return self.fc(self.rnn(x)[0])


def linear_macs(model, inputs):
    """Multiply-adds of a model's linears (and RNNs) for these inputs."""
    total = 0
    rows = inputs[0].shape[0]
    if isinstance(getattr(model, "rnn", None), (nn.LSTM, nn.GRU)):
        rows = inputs[0].shape[0] * inputs[0].shape[1]  # (time-major: every frame is a row)
    for m in model.modules():
        if isinstance(m, (nn.LSTM, nn.GRU)):
            gates = 4 if isinstance(m, nn.LSTM) else 3
            for layer in range(m.num_layers):
                fan_in = m.input_size if layer == 0 else m.hidden_size * (2 if m.bidirectional else 1)
                total += (2 if m.bidirectional else 1) * rows * (fan_in + m.hidden_size) * gates * m.hidden_size
        if isinstance(m, nn.Linear):
            total += rows * m.in_features * m.out_features
        if isinstance(m, (nn.GRUCell, nn.LSTMCell)):
            total += rows * (m.input_size + m.hidden_size) * m.weight_ih.shape[0]
    return total


def static_torchvision(arch):
    """torchvision's quantizable `arch` (random weights), fused, statically quantized for fbgemm
    (per channel weights, histogram-calibrated activations on random images), built once:
    each call returns a copy."""
    import copy

    def make():
        if arch not in static_torchvision.built:
            from torchvision.models import quantization

            torch.backends.quantized.engine = "fbgemm"
            torch.manual_seed(0)
            m = getattr(quantization, arch)(weights=None, quantize=False).eval()
            m.fuse_model()
            m.qconfig = torch.ao.quantization.get_default_qconfig("fbgemm")
            torch.ao.quantization.prepare(m, inplace=True)
            with torch.no_grad():
                for _ in range(4):
                    m(torch.randn(2, 3, 224, 224))
            static_torchvision.built[arch] = torch.ao.quantization.convert(m, inplace=True)
        return copy.deepcopy(static_torchvision.built[arch])

    return make


static_torchvision.built = {}


def float_torchvision(arch):
    def make():
        import torchvision

        torch.manual_seed(0)
        return getattr(torchvision.models, arch)(weights=None)

    return make


def ort_static_int8(arch):
    """ONNX Runtime's own static quantization of the float model (QDQ, per channel, calibrated
    on the same kind of random images): what an ORT user runs."""

    def write(_eager, inputs, path, names):
        ensure("onnx", "onnxruntime", "onnxscript")
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Images(CalibrationDataReader):
            def __init__(self):
                torch.manual_seed(0)
                self.batches = iter([{names[0]: torch.randn(1, 3, 224, 224).numpy()} for _ in range(4)])

            def get_next(self):
                return next(self.batches, None)

        tmp = path + ".fp32.onnx"
        torch.onnx.export(float_torchvision(arch)().eval(), inputs, tmp, input_names=names, dynamo=False, verbose=False)
        quantize_static(tmp, path, Images(), quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)

    return write


# Statically quantized models: (torchvision architecture, inputs, how TorchScript gets them,
# the target for Kiln fp32 / Kiln int8).
STATIC = {
    "resnet18_int8": ("resnet18", (torch.randn(1, 3, 224, 224),), "trace", "; target >= 2x"),
    # Depthwise convolutions (`depthwise_int8` in the frontend) and quantized adds.
    "mobilenet_v2_int8": ("mobilenet_v2", (torch.randn(1, 3, 224, 224),), "trace", ""),
}

MODELS = {
    # (float model, inputs, the modules quantize_dynamic quantizes)
    "mlp_b64": (MLP, (torch.randn(64, 512),), {nn.Linear}),
    "relu_mlp_b64": (ReluMLP, (torch.randn(64, 512),), {nn.Linear}),
    "mlp_b1": (MLP, (torch.randn(1, 512),), {nn.Linear}),
    "wavestep": (models()["wavestep"][0], models()["wavestep"][1], {nn.Linear, nn.GRUCell}),
    "speech_lstm": (SpeechLSTM, (torch.randn(50, 1, 80),), {nn.Linear, nn.LSTM}),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--models", nargs="+", default=list(MODELS) + list(STATIC))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "fbgemm"
    peak = peak_gflops(args.threads)
    rows = []
    for name in args.models:
        if name in STATIC:
            rows.append(static_row(name, args, peak))
            continue
        make, inputs, modules = MODELS[name]
        # The target's ratio: Kiln int8 against Kiln float32 on the same model.
        best = alternating_best({"fp32": (make, "script"), "int8": (dynamic(make, modules), "script")}, inputs, args.threads, max(args.reps // 5, 20))
        # Quantized outputs differ from eager's by a quantization step where Kiln's gelu and
        # ATen's round a value to either side of a boundary (tests/test_quantized.py checks
        # exactness where it is defined): compared to 1e-2 here; ONNX Runtime quantizes its
        # own way (8-bit activations, its own rounding): to 0.25, against a broken run only.
        tolerance = {None: 1e-2, "onnxruntime": 0.25}
        times, notes = measure(dynamic(make, modules), inputs, "script", args.threads, args.reps, tolerance=tolerance, onnx_model=ort_int8(make))
        notes += target_notes(best, linear_macs(make(), inputs), peak)
        rows.append((name, times, notes))
    title = f"quantized int8, {args.threads} threads, median µs (x = time / Kiln int8's)"
    print_table(title + (f"; FP32 peak {peak:.0f} GFLOP/s" if peak else ""), rows, TOOLS)


def alternating_best(models, inputs, threads, reps):
    """Each of `models` ({kind: (make, how)}) under Kiln, measured in turn, five rounds: the best
    of each one's round medians (µs). This VM has slow windows of a second or more, which one
    median each would let land on one of them."""
    import torch_kiln

    torch_kiln.enable(num_threads=threads, background=False)
    torch_kiln.reset()
    best = {}
    with torch.no_grad():
        built = {kind: build(make, inputs, how)[1] for kind, (make, how) in models.items()}
        for _ in range(5):
            for kind, fn in built.items():
                for _ in range(3):
                    fn(*inputs)
                best[kind] = min(best.get(kind, float("inf")), median_us(fn, inputs, reps))
    torch_kiln.disable()
    return best


def static_row(name, args, peak):
    """A statically quantized model under every tool, and Kiln int8 against Kiln float32 on
    the float model (alternating, best of five rounds)."""
    arch, inputs, how, target = STATIC[name]
    make, float_make = static_torchvision(arch), float_torchvision(arch)
    reps = max(args.reps // 10, 20)
    best = alternating_best({"fp32": (float_make, how), "int8": (make, how)}, inputs, args.threads, max(reps // 5, 10))
    # Kiln and TorchScript return PyTorch's int8 result exactly (tests/test_static_quantized.py);
    # ONNX Runtime quantizes its own way (its own calibration and rounding): compared loosely,
    # against a broken run only.
    tolerance = {None: 1e-4, "onnxruntime": 10.0}
    times, notes = measure(make, inputs, how, args.threads, reps, tolerance=tolerance, onnx_model=ort_static_int8(arch))
    notes += target_notes(best, conv_flops(float_make().eval(), inputs) // 2, peak, target)
    return (name, times, notes)


def host_has_vnni():
    with open("/proc/cpuinfo") as f:
        return "avx512_vnni" in f.read()


def target_notes(best, macs, peak, target=""):
    """The int8 rate against the int8 ceiling, and the target's ratio Kiln fp32 / Kiln int8."""
    rate = macs / best["int8"] / 1e3
    # (`peak` is float32 GFLOP/s: twice its multiply-adds.)
    times, how = (4, "vpdpbusd") if host_has_vnni() else (2, "vpmaddubsw")
    top = peak / 2 * times if peak else 0
    ceiling = f" = {rate / top:.0%} of the int8 ceiling ({top:.0f} G multiply-adds/s, {how}: {times}x the float32 peak's)" if peak else ""
    return [
        f"int8 (best of 5) {rate:.0f} G multiply-adds/s" + ceiling,
        f"target: Kiln fp32 / Kiln int8 = {best['fp32']:.1f} / {best['int8']:.1f} µs = {best['fp32'] / best['int8']:.2f}x (best of 5 alternating rounds{target})",
    ]


if __name__ == "__main__":
    main()
