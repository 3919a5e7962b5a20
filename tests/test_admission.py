"""What generated code may read, and the state it may run under (issue 9): tensor subclasses
and wrappers, ZeroTensors, lazy conj/neg views, dispatch modes and functorch transforms run
TorchScript's own nodes, with the reason in stats(); global state that changes eager's
result (the default dtype, autocast) is part of each guard. The crash cases run in a
subprocess: a regression fails the test instead of killing pytest."""

import torch
import torch_kiln

from kiln_check import close, fresh_script, run_isolated


def _refused(fn_source, make_input, reason):
    """Compiles `fn` on plain float tensors, then calls it on `make_input()` (source text):
    the result must be eager's and the call refused for `reason`."""
    out = run_isolated(f"""
        fn = torch.jit.CompilationUnit({fn_source!r}).fn
        ns = {{}}
        exec({fn_source!r}, {{'torch': torch}}, ns)
        plain = torch.randn(4)
        for _ in range(3):
            fn(plain)
        assert torch_kiln.stats()['kernel_runs'] > 0
        x = {make_input}
        got, want = fn(x), ns['fn'](x)
        print(type(got).__name__, type(want).__name__)
        def plain(t):  # the values of a plain tensor, a TwoTensor or a LoggingTensor
            if hasattr(t, 'a'):
                return (t.a.tolist(), t.b.tolist())
            return getattr(t, 'elem', t).tolist()
        print(repr(plain(got)))
        print(repr(plain(want)))
        print(sorted(torch_kiln.stats()['fallbacks']))
    """)
    kind_got_want, got, want, fallbacks = out.strip().splitlines()[-4:]
    types = kind_got_want.split()
    assert types[0] == types[1], out
    assert got == want, out
    assert reason in fallbacks, out


F = "def fn(x):\n    return torch.sigmoid(x) * 2.0 + x\n"


def test_wrapper_subclass_runs_torchscript():
    # _make_wrapper_subclass: a storage with no data behind it (was a SIGSEGV).
    _refused(F, "__import__('torch.testing._internal.two_tensor', fromlist=['x']).TwoTensor(torch.randn(4), torch.randn(4))",
             "tensor subclass or wrapper")


def test_logging_tensor_runs_torchscript():
    _refused(F, "__import__('torch.testing._internal.logging_tensor', fromlist=['x']).LoggingTensor(torch.randn(4))",
             "tensor subclass or wrapper")


def test_zero_tensor_runs_torchscript():
    # torch._efficientzerotensor: no memory at all (was a SIGSEGV).
    _refused(F, "torch._efficientzerotensor(4)", "ZeroTensor")


def test_negative_bit_view_runs_torchscript():
    # z.conj().imag is a float view with the negative bit set: read as plain memory its
    # sign is wrong (was a wrong result).
    _refused(F, "torch.randn(4, dtype=torch.complex64).conj().imag", "negative bit")


def test_dispatch_mode_sees_every_op():
    # Under a TorchDispatchMode eager hands each op to the mode; Kiln's code must not hide them.
    out = run_isolated("""
        from torch.utils._python_dispatch import TorchDispatchMode
        class Count(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.ops = []
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.ops.append(str(func))
                return func(*args, **(kwargs or {}))
        fn = torch.jit.CompilationUnit('def fn(x):\\n    return torch.sigmoid(x) * 2.0\\n').fn
        x = torch.randn(4)
        for _ in range(3):
            fn(x)
        with Count() as mode:
            got = fn(x)
        print(any('sigmoid' in op for op in mode.ops), torch.equal(got, torch.sigmoid(x) * 2.0))
        print(sorted(torch_kiln.stats()['fallbacks']))
    """)
    seen, fallbacks = out.strip().splitlines()[-2:]
    assert seen == "True True", out
    assert "TorchDispatchMode" in fallbacks, out


def test_vmap_of_a_scripted_function():
    out = run_isolated("""
        fn = torch.jit.CompilationUnit('def fn(x):\\n    return torch.tanh(x) + x * 3.0\\n').fn
        for _ in range(3):
            fn(torch.randn(5))
        xs = torch.randn(3, 5)
        got = torch.vmap(fn)(xs)
        print(torch.allclose(got, torch.tanh(xs) + xs * 3.0))
    """)
    assert out.strip().splitlines()[-1] == "True", out


def _div(x):
    return x / 2


def test_default_dtype_is_part_of_the_guard():
    fn = fresh_script(_div)
    i = torch.arange(6)
    for _ in range(3):
        close(fn(i), _div(i))
    old = torch.get_default_dtype()
    try:
        for default in (torch.float64, torch.bfloat16):
            torch.set_default_dtype(default)
            before = torch_kiln.stats()
            for _ in range(2):
                got = fn(i)
                assert got.dtype == default, (default, got.dtype)
                close(got, _div(i))
            if default == torch.float64:  # Kiln compiles float64 promotion...
                assert torch_kiln.stats()["kernel_runs"] > before["kernel_runs"]
            else:  # ...and refuses a default dtype it has no code for
                assert any("default dtype BFloat16" in r for r in torch_kiln.stats()["fallbacks"])
    finally:
        torch.set_default_dtype(old)
    close(fn(i), _div(i))
    assert fn(i).dtype == torch.float32


def _float_scalar(x):
    return x * 0.5 + 1


def test_default_dtype_of_float_scalars():
    fn = fresh_script(_float_scalar)
    i = torch.arange(4, dtype=torch.int32)
    f = torch.randn(4)
    for _ in range(3):
        close(fn(i), _float_scalar(i))
        close(fn(f), _float_scalar(f))
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        assert fn(i).dtype == torch.float64 and fn(f).dtype == torch.float32
        close(fn(i), _float_scalar(i))
    finally:
        torch.set_default_dtype(old)


def test_autocast_state_is_part_of_the_guard():
    # TorchScript optimises a plan of its own under autocast; Kiln's groups there record the
    # autocast state in their guards (kiln_guards' tests check that code made under one
    # state never runs under another).
    fn = fresh_script(_float_scalar)
    f = torch.randn(8)
    for _ in range(3):
        fn(f)
    runs = torch_kiln.stats()["kernel_runs"]
    with torch.autocast("cpu"):
        for _ in range(3):
            close(fn(f), _float_scalar(f))
    assert torch_kiln.stats()["kernel_runs"] > runs
    runs = torch_kiln.stats()["kernel_runs"]
    close(fn(f), _float_scalar(f))
    assert torch_kiln.stats()["kernel_runs"] == runs + 1
    assert "state: default dtype Float, no autocast" in torch_kiln.explain(fn)
