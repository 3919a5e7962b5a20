"""Guards: a call whose inputs differ from what a group was compiled for (shape, dtype,
strides, device layout, requires_grad) gets the right answer every time, through a new
specialisation or TorchScript's own nodes, and the counters say which."""

import torch
import torch_kiln

from kiln_check import close, fresh_script


def f(x, y):
    return torch.relu(x * y + 1.0) - torch.sigmoid(y)


def fresh():
    return fresh_script(f)


def delta(before):
    after = torch_kiln.stats()
    return {k: after[k] - before[k] for k in ("specializations", "guard_passes", "guard_failures", "kernel_runs", "compiles", "cache_hits")}


def call(fn, *args):
    before = torch_kiln.stats()
    out = fn(*args)
    close(out, f(*args))
    return delta(before)


def warm(fn, *args):
    for _ in range(2):
        call(fn, *args)


def test_same_signature_runs_compiled_without_failures():
    fn = fresh()
    x, y = torch.randn(8, 8), torch.randn(8, 8)
    warm(fn, x, y)
    d = call(fn, x, y)
    assert d["kernel_runs"] == 1 and d["guard_passes"] == 1 and d["guard_failures"] == 0 and d["specializations"] == 0


def test_new_shape_dtype_strides_each_get_a_specialisation():
    fn = fresh()
    x, y = torch.randn(8, 8), torch.randn(8, 8)
    warm(fn, x, y)
    variants = [
        (torch.randn(3, 5), torch.randn(3, 5)),  # shape
        (x.double(), y.double()),  # dtype
        (x.t(), y),  # strides
        (torch.randn(8, 16)[:, ::2], y),  # strides, not a transpose
    ]
    for args in variants:
        d = call(fn, *args)
        assert d["specializations"] == 1 and d["kernel_runs"] == 1 and d["guard_failures"] == 0, (args[0].shape, d)
        d = call(fn, *args)  # now cached in the group
        assert d["specializations"] == 0 and d["kernel_runs"] == 1, d


def test_explain_shows_which_dims_varied():
    fn = fresh()
    for n in (2, 5):
        x, y = torch.randn(n, 3), torch.randn(n, 3)
        for _ in range(3):
            call(fn, x, y)
    assert "input 0 dim 0: [2, 5]" in torch_kiln.explain(fn)


def test_channels_last_layout():
    fn = fresh()
    x = torch.randn(2, 3, 4, 5)
    y = torch.randn(2, 3, 4, 5)
    warm(fn, x, y)
    d = call(fn, x.contiguous(memory_format=torch.channels_last), y)
    assert d["kernel_runs"] == 1 and d["specializations"] == 1


def test_requires_grad_runs_torchscript_and_keeps_gradients():
    fn = fresh()
    x, y = torch.randn(4, 4), torch.randn(4, 4)
    warm(fn, x, y)
    xg = x.clone().requires_grad_()
    before = torch_kiln.stats()
    out = fn(xg, y)
    out.sum().backward()
    d = delta(before)
    assert d["kernel_runs"] == 0 and d["guard_failures"] >= 1
    expected = x.clone().requires_grad_()
    f(expected, y).sum().backward()
    close(xg.grad, expected.grad)
    assert out.requires_grad


def test_unsupported_dtype_falls_back_with_a_reason():
    fn = fresh()
    x, y = torch.randn(4, 4), torch.randn(4, 4)
    warm(fn, x, y)
    h = (x.half(), y.half())
    for _ in range(3):
        out = fn(*h)
        close(out, f(*h))
    assert any("dtype" in r for r in torch_kiln.stats()["fallbacks"])


def test_specialisation_limit_then_torchscript():
    # dynamic="static": one specialisation per size (test_dynamic covers the general code).
    torch_kiln.enable(max_specializations=2, dynamic="static")
    try:
        fn = fresh()
        for n in range(1, 7):
            x, y = torch.randn(n, 3), torch.randn(n, 3)
            for _ in range(3):
                close(fn(x, y), f(x, y))
        reasons = torch_kiln.stats()["fallbacks"]
        assert any("specialisation limit (2)" in r for r in reasons), reasons
    finally:
        torch_kiln.enable()


def test_same_region_in_two_functions_compiles_once():
    a, b = fresh(), fresh()
    x, y = torch.randn(5, 7), torch.randn(5, 7)
    warm(a, x, y)
    before = torch_kiln.stats()
    warm(b, x, y)
    d = delta(before)
    assert d["compiles"] == 0 and d["cache_hits"] >= 1, d


def test_guard_overhead_path_is_cheap_enough_to_count():
    # Not a timing test: the guard is asked once per call.
    fn = fresh()
    x, y = torch.randn(16), torch.randn(16)
    warm(fn, x, y)
    before = torch_kiln.stats()
    for _ in range(100):
        fn(x, y)
    d = delta(before)
    assert d["guard_passes"] == 100 and d["kernel_runs"] == 100


def test_concurrent_callers_with_different_signatures():
    # TorchScript releases the GIL; each thread's guard choice must reach its own group call,
    # and parallel kernels from several callers share one pool.
    import threading

    fn = fresh()
    shapes = [(256, 512), (3, 5), (1024,), (64, 64)]
    errors = []

    def worker(i):
        try:
            g = torch.Generator().manual_seed(i)
            for k in range(60):
                shape = shapes[(i + k) % len(shapes)]
                x, y = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
                close(fn(x, y), f(x, y))
        except Exception as e:  # collected: an assertion in a thread would be lost
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    before = torch_kiln.stats()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert delta(before)["kernel_runs"] > 0
