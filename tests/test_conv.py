"""Convolution and pooling windows (issue 12) against eager: random shapes with odd images,
channels that fill no tile, every stride / padding / dilation / groups combination, bias or
none, NCHW, channels-last and non-contiguous inputs, fused epilogues; eager's output layouts;
pooling with padding, ceil_mode, dilation and divisors; the torchvision classifiers, frozen,
entirely in Kiln and as close to float64 as eager is; and the batch sweep's compile count."""

import random

import pytest
import torch
import torch_kiln

from kiln_check import no_worse_than_float32, run_compiled, script_source


def conv_source(stride, padding, dilation, groups, bias, tail):
    pad = repr(padding)
    b = "b" if bias else "None"
    body = f"torch.nn.functional.conv2d(x, w, {b}, {list(stride)}, {pad}, {list(dilation)}, {groups})"
    if tail == "relu":
        body = f"torch.relu({body})"
    elif tail == "residual":
        body = f"torch.relu({body} + r)"
    return f"def fn(x, w, b, r):\n    return {body}\n"


def make_input(shape, layout, rng):
    if layout == "channels_last":
        return torch.randn(shape).contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        # A slice of a wider image: not contiguous in any format.
        n, c, h, w = shape
        return torch.randn(n, c, h, w + 3)[..., 1 : w + 1]
    return torch.randn(shape)


def out_size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def test_conv2d_matches_eager_on_random_shapes():
    rng = random.Random(12)
    torch.manual_seed(12)
    checked = 0
    while checked < 36:
        c = rng.choice([1, 3, 5, 16, 17])
        groups = rng.choice([1, 1, 1, c] + ([2] if c % 2 == 0 else []))
        cout = groups * rng.choice([1, 5, 16, 17, 33]) if groups > 1 else rng.choice([1, 5, 16, 17, 33, 64, 96])
        h, w = rng.choice([1, 3, 7, 17]), rng.choice([1, 3, 7, 17])
        k = (rng.choice([1, 2, 3, 5]), rng.choice([1, 3]))
        stride = (rng.choice([1, 2]), rng.choice([1, 2, 3]))
        dilation = (rng.choice([1, 1, 2]), rng.choice([1, 2]))
        padding = rng.choice([0, 1, 2, "valid", "same"])
        if padding == "same":
            stride = (1, 1)
        p = {"valid": 0, "same": None}.get(padding, padding)
        if p is not None and (out_size(h, k[0], stride[0], p, dilation[0]) < 1 or out_size(w, k[1], stride[1], p, dilation[1]) < 1):
            continue
        n = rng.choice([1, 2])
        x = make_input((n, c, h, w), rng.choice(["contiguous", "channels_last", "strided"]), rng)
        weight = torch.randn(cout, c // groups, *k)
        bias = torch.randn(cout)
        tail = rng.choice(["none", "relu", "residual"])
        ref_conv = lambda x, w, b: torch.nn.functional.conv2d(x, w, b if bias_on else None, stride, padding, dilation, groups)  # noqa: E731
        bias_on = rng.random() < 0.7
        probe = ref_conv(x, weight, bias)
        r = torch.randn(probe.shape)
        src = conv_source(stride, padding, dilation, groups, bias_on, tail)

        def reference(x, w, b, r):
            y = ref_conv(x, w, b)
            return torch.relu(y) if tail == "relu" else torch.relu(y + r) if tail == "residual" else y

        # Sums of up to 255 products: eager's order of summation differs by machine (its
        # AVX2 and AVX-512 kernels), so Kiln is checked against float64, no further from it
        # than eager's float32 result is (or the default tolerance).
        expected = reference(x, weight, bias, r)
        exact = reference(x.double(), weight.double(), bias.double(), r.double())
        check = lambda out: no_worse_than_float32(out, [expected], exact)  # noqa: E731
        out, _ = run_compiled(script_source(src), (x, weight, bias, r), check=check)
        assert out.stride() == expected.stride(), (src, x.stride(), out.stride(), expected.stride())
        checked += 1


def test_conv_layouts_follow_eager():
    # Channels-last in, or a channels-last weight: channels-last out, as oneDNN's path gives.
    fn = script_source("def fn(x, w):\n    return torch.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1)\n")
    for x_cl, w_cl in [(False, False), (True, False), (False, True)]:
        x = torch.randn(2, 8, 9, 10)
        w = torch.randn(16, 8, 3, 3)
        if x_cl:
            x = x.contiguous(memory_format=torch.channels_last)
        if w_cl:
            w = w.contiguous(memory_format=torch.channels_last)
        out, _ = run_compiled(fn, (x, w), reference=lambda x, w: torch.conv2d(x, w, None, 1, 1))
        assert out.stride() == torch.conv2d(x, w, None, 1, 1).stride(), (x_cl, w_cl)


def test_conv1d_unbatched_and_float64():
    fn = script_source("def fn(x, w, b):\n    return torch.nn.functional.conv1d(x, w, b, [2], [3], [1], 1)\n")
    ref = lambda x, w, b: torch.nn.functional.conv1d(x, w, b, 2, 3)  # noqa: E731
    run_compiled(fn, (torch.randn(3, 6, 29), torch.randn(10, 6, 5), torch.randn(10)), reference=ref)
    run_compiled(fn, (torch.randn(6, 29), torch.randn(10, 6, 5), torch.randn(10)), reference=ref)
    fn2 = script_source("def fn(x, w):\n    return torch.conv2d(x, w, None, [1, 2], [1, 0], [1, 1], 2)\n")
    x, w = torch.randn(2, 4, 7, 9, dtype=torch.float64), torch.randn(6, 2, 3, 3, dtype=torch.float64)
    run_compiled(fn2, (x, w), reference=lambda x, w: torch.conv2d(x, w, None, (1, 2), (1, 0), 1, 2))


def test_pooling_windows_match_eager():
    cases = [
        "torch.nn.functional.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], False)",
        "torch.nn.functional.max_pool2d(x, [3, 2], [2, 1], [1, 0], [2, 1], True)",
        "torch.nn.functional.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], True)",
        "torch.nn.functional.avg_pool2d(x, [3, 3], [2, 2], [1, 1], False, True, None)",
        "torch.nn.functional.avg_pool2d(x, [3, 3], [2, 2], [1, 1], True, False, None)",
        "torch.nn.functional.avg_pool2d(x, [3, 3], [2, 2], [1, 1], True, True, None)",
        "torch.nn.functional.avg_pool2d(x, [2, 3], [1, 2], [1, 1], False, True, 5)",
        "torch.nn.functional.adaptive_avg_pool2d(x, [3, 1])",
    ]
    for body in cases:
        fn = script_source(f"def fn(x):\n    return {body}\n")
        ref = eval(f"lambda x: {body}")  # noqa: S307 (test source, not input)
        for shape, layout in [((2, 3, 9, 11), torch.contiguous_format), ((1, 4, 6, 7), torch.channels_last), ((5, 6, 7), torch.contiguous_format)]:
            x = torch.randn(shape)
            x.view(-1)[3] = float("nan")
            x.view(-1)[10] = float("inf")
            x.view(-1)[11] = float("-inf")
            x = x.contiguous(memory_format=layout) if len(shape) == 4 else x
            out, _ = run_compiled(fn, (x,), reference=ref)
            assert out.stride() == ref(x).stride(), (body, shape)


def test_adaptive_pooling_and_upsampling_match_eager():
    # Adaptive pools to sizes that do not divide the input's (windows of unequal sizes),
    # nearest and bilinear upsampling by sizes and scale factors, up and down, with
    # align_corners both ways: eager's indices and weights at the borders, NaN and infinities.
    F = "torch.nn.functional."
    cases = [
        F + "adaptive_avg_pool2d(x, [4, 3])",
        F + "adaptive_avg_pool2d(x, [5, 7])",
        F + "adaptive_max_pool2d(x, [4, 5])",
        F + "adaptive_max_pool2d(x, [2, 3])",
        F + "interpolate(x, scale_factor=2.0, mode='nearest')",
        F + "interpolate(x, size=[13, 5], mode='nearest')",
        F + "interpolate(x, scale_factor=1.5, mode='nearest')",
        F + "interpolate(x, scale_factor=2.0, mode='bilinear', align_corners=False)",
        F + "interpolate(x, size=[12, 16], mode='bilinear', align_corners=False)",
        F + "interpolate(x, scale_factor=0.5, mode='bilinear', align_corners=False)",
        F + "interpolate(x, size=[11, 13], mode='bilinear', align_corners=True)",
    ]
    for body in cases:
        ref = eval(f"lambda x: {body}")  # noqa: S307 (test source, not input)
        shapes = [((2, 3, 9, 11), torch.contiguous_format), ((1, 4, 6, 7), torch.channels_last)]
        if "adaptive" in body:
            shapes.append(((5, 6, 7), torch.contiguous_format))
        for shape, layout in shapes:
            x = torch.randn(shape)
            x.view(-1)[3] = float("nan")
            x.view(-1)[10] = float("inf")
            x.view(-1)[11] = float("-inf")
            x = x.contiguous(memory_format=layout) if len(shape) == 4 else x
            # A scripted F.interpolate builds its scale list in a loop over the input's rank
            # at run time (Kiln takes constants); traced, the op has them as constants.
            fn = torch.jit.trace(ref, (x,)) if "interpolate" in body else script_source(f"def fn(x):\n    return {body}\n")
            out, _ = run_compiled(fn, (x,), reference=ref)
            assert out.stride() == ref(x).stride(), (body, shape)
            text = torch_kiln.explain(fn)
            assert "[torchscript]" not in text, text


# The classifiers of issue 12 at sizes that keep the test command short (the headline
# resnet18 at the 224 x 224; vgg and alexnet below 224 pool 2 x 2 features
# adaptively to 7 x 7 and 6 x 6: windows of unequal sizes), each scripted (or traced where
# scripting keeps Python lists or returns a named tuple) and frozen.
MODELS = [
    ("resnet18", 224, "script"), ("resnet50", 96, "script"), ("mobilenet_v3_small", 96, "script"),
    ("convnext_tiny", 64, "script"), ("shufflenet_v2_x1_0", 96, "script"), ("squeezenet1_1", 96, "script"),
    ("densenet121", 64, "trace"), ("googlenet", 96, "trace"), ("mnasnet0_5", 96, "script"),
    ("vgg11_bn", 64, "script"), ("alexnet", 96, "script"),
]


@pytest.mark.parametrize("name,size,how", MODELS, ids=[m[0] for m in MODELS])
def test_torchvision_classifier_runs_entirely_in_kiln(name, size, how):
    import torchvision  # scripts/setup.sh installs it: a missing one must fail, not skip

    torch_kiln.reset()
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        m = torch.jit.freeze(torch.jit.script(model) if how == "script" else torch.jit.trace(model, x))
        eager = model(x)
        exact = model.double()(x.double())
        runs = torch_kiln.stats()["kernel_runs"]
        for _ in range(3):
            got = m(x)
        assert torch_kiln.stats()["kernel_runs"] > runs
    # As close to float64 as eager's float32 (a deep network's rounding differs by the order
    # of its sums, for eager's kernels as much as for Kiln's).
    eager_err = (eager.double() - exact).abs().max().item()
    kiln_err = (got.double() - exact).abs().max().item()
    assert kiln_err <= 2 * eager_err + 1e-6 * exact.abs().max().item(), (kiln_err, eager_err)
    text = torch_kiln.explain(m)
    left = [line for line in text.splitlines() if "[torchscript]" in line and "a view outside any group" not in line]
    assert left == [], text
    assert torch_kiln.stats()["fallbacks"] == {}, torch_kiln.stats()["fallbacks"]


class SmallConvNet(torch.nn.Module):
    """A stem, a residual block and a classifier: conv, batch norm, ReLU, max pool, the
    residual add, adaptive average pool, linear."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 2, 1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, 1))
        self.block = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, 1, 1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, 1, 1))
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_batch_sweep_through_convolutions_compiles_at_most_three_times():
    torch_kiln.reset()
    torch.manual_seed(0)
    model = SmallConvNet().eval()
    with torch.no_grad():
        m = torch.jit.freeze(torch.jit.trace(model, torch.randn(4, 3, 32, 32)))
        for n in range(1, 33):
            x = torch.randn(n, 3, 32, 32)
            before = torch_kiln.stats()["kernel_runs"]
            for _ in range(3):
                got = m(x)
            torch.testing.assert_close(got, model(x))
            assert torch_kiln.stats()["kernel_runs"] > before, f"batch {n} ran no Kiln code"
        # A new image size is a specialisation of its own, compiled once.
        x = torch.randn(2, 3, 40, 40)
        for _ in range(3):
            torch.testing.assert_close(m(x), model(x))
    s = torch_kiln.stats()
    assert s["groups"] == 1 and s["specializations"] <= 4 and s["symbolic_specializations"] >= 1, s
    assert s["fallbacks"] == {}, s["fallbacks"]
