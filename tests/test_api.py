"""The Python API: options, stats, explain, disable/enable, reset, logging."""

import os
import subprocess
import sys

import pytest
import torch
import torch_kiln

from kiln_check import run_compiled, script_source


def test_unknown_option_names_it():
    with pytest.raises(ValueError, match="bogus"):
        torch_kiln.enable(bogus=1)


@pytest.mark.parametrize("opts", [{"max_specializations": 0}, {"opt_level": 7}, {"num_threads": "2"}, {"max_specializations": True}])
def test_bad_option_values(opts):
    with pytest.raises(ValueError, match=next(iter(opts))):
        torch_kiln.enable(**opts)
    torch_kiln.enable()


def test_explain_lists_groups_and_reasons():
    fn = script_source("def fn(x):\n    y = torch.exp(x) + 1.0\n    return torch.cumsum(y, 0) * 2.0\n")
    assert "not optimised yet" in torch_kiln.explain(fn)
    run_compiled(fn, (torch.randn(10),), reference=lambda x: torch.cumsum(torch.exp(x) + 1.0, 0) * 2.0)
    text = torch_kiln.explain(fn)
    assert "[kiln group" in text and "aten::exp, aten::add" in text
    assert "[torchscript] aten::cumsum: not an op Kiln supports yet" in text
    assert "loop ir:" in text and "guards: f32[10]" in text


def test_explain_rejects_plain_functions():
    with pytest.raises(TypeError):
        torch_kiln.explain(lambda x: x)


def test_stats_keys():
    s = torch_kiln.stats()
    for k in ("groups", "specializations", "compiles", "cache_hits", "compile_time_ms", "kernel_runs",
              "guard_passes", "guard_failures", "fallbacks", "enabled", "num_threads", "disk_hits", "disk_writes",
              "disk_problems", "disk_load_time_ms", "compile_mode", "cache_dir"):
        assert k in s


def test_disable_stops_new_groups():
    torch_kiln.disable()
    try:
        fn = script_source("def fn(x):\n    return torch.sigmoid(x) * 3.0\n")
        x = torch.randn(5)
        for _ in range(3):
            torch.testing.assert_close(fn(x), torch.sigmoid(x) * 3.0)
        assert "[kiln group" not in torch_kiln.explain(fn)
    finally:
        torch_kiln.enable()


def test_disable_stops_new_specialisations_of_existing_groups():
    fn = script_source("def fn(x):\n    return torch.tanh(x) + 1.0\n")
    run_compiled(fn, (torch.randn(4),), reference=lambda x: torch.tanh(x) + 1.0)
    torch_kiln.disable()
    try:
        before = torch_kiln.stats()
        y = torch.randn(7)
        torch.testing.assert_close(fn(y), torch.tanh(y) + 1.0)
        after = torch_kiln.stats()
        assert after["specializations"] == before["specializations"]
        assert any("Kiln is disabled" in r for r in after["fallbacks"])
        x = torch.randn(4)
        torch.testing.assert_close(fn(x), torch.tanh(x) + 1.0)  # compiled code still runs
        assert torch_kiln.stats()["kernel_runs"] == after["kernel_runs"] + 1
    finally:
        torch_kiln.enable()


def test_reset_zeroes_counters():
    run_compiled(script_source("def fn(x):\n    return x * 2.0 + 1.0\n"), (torch.randn(3),), reference=lambda x: x * 2.0 + 1.0)
    torch_kiln.reset()
    s = torch_kiln.stats()
    assert s["kernel_runs"] == 0 and s["guard_passes"] == 0 and s["fallbacks"] == {}


def test_kiln_log_logs_fallback_reasons_once():
    code = (
        "import torch, torch_kiln, warnings\n"
        "warnings.filterwarnings('ignore')\n"
        "torch_kiln.enable()\n"
        "fn = torch.jit.CompilationUnit('def fn(x):\\n    return torch.cumsum(x, 0) + 1.0\\n').fn\n"
        "for _ in range(4): fn(torch.randn(4))\n"
    )
    env = dict(os.environ, KILN_LOG="info")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("kiln fallback: aten::cumsum") == 1, r.stderr


@pytest.mark.parametrize("opts", [{"max_specializations": 2 ** 64}, {"cache_size_limit": 2 ** 64}, {"num_threads": 10 ** 6},
                                  {"opt_level": 2 ** 70}])
def test_huge_integer_options_name_the_option(opts):
    # Was an OverflowError that named nothing.
    with pytest.raises(ValueError, match=next(iter(opts))):
        torch_kiln.enable(**opts)
    torch_kiln.enable()


def test_a_cache_dir_path_too_long_is_a_value_error():
    with pytest.raises(ValueError, match="cache_dir .* cannot be used: File name too long"):
        torch_kiln.enable(cache_dir="x" * 5000)
    torch_kiln.enable()


def test_threads_the_system_will_not_start_are_a_clear_error():
    # A failed thread spawn used to panic. Address space for a few threads' stacks only.
    from kiln_check import run_isolated
    out = run_isolated("""
        import resource
        vm = int(open('/proc/self/statm').read().split()[0]) * 4096
        resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))
        try:
            torch_kiln.enable(cache_dir=False, num_threads=1000)
            print("no error")
        except ValueError as e:
            print(e)
        fn = torch.jit.CompilationUnit('def fn(x):\\n    return x * 2.0\\n').fn
        x = torch.randn(8)
        for _ in range(3):
            y = fn(x)
        print(torch.equal(y, x * 2.0), torch_kiln.stats()['kernel_runs'])
    """)
    err, ran = out.strip().splitlines()[-2:]
    assert "'num_threads'=1000: cannot start that many threads" in err, out
    assert ran == "True 2", out


def test_explain_lists_nodes_with_several_outputs():
    # Nodes with a list of tensors or several outputs used to be left out of explain().
    fn = script_source(
        "def fn(x):\n"
        "    a, b = torch.split(x, 2, 0)\n"
        "    c, d = torch.chunk(torch.exp(x), 2, 1)\n"
        "    m, i = torch.max(x, 1)\n"
        "    return a + b, c * d, m, i\n")
    x = torch.randn(4, 6)
    for _ in range(3):
        fn(x)
    text = torch_kiln.explain(fn)
    # Splits join groups as their parts (slices); an op with two outputs Kiln does not know
    # is listed with the number.
    assert "aten::split, aten::split, aten::add" in text and "aten::chunk, aten::chunk, aten::mul" in text, text
    assert "[torchscript] aten::max: has 2 outputs: not an op Kiln supports yet" in text, text


def test_reset_zeroes_every_counter():
    fn = script_source("def fn(x):\n    return torch.sigmoid(x) * 4.0 - 1.0\n")
    run_compiled(fn, (torch.randn(9),), reference=lambda x: torch.sigmoid(x) * 4.0 - 1.0)
    assert torch_kiln.stats()["compile_time_ms"] > 0
    torch_kiln.reset()
    s = torch_kiln.stats()
    counters = {k: v for k, v in s.items() if isinstance(v, (int, float, dict)) and not isinstance(v, bool) and k != "num_threads"}
    # Nested counters (background, compile phases) are zeroed one by one.
    counters = {**counters, **{f"{k}.{j}": x for k, v in counters.items() if isinstance(v, dict) and k not in ("fallbacks", "disk_problems") for j, x in v.items()}}
    counters = {k: v for k, v in counters.items() if not isinstance(v, dict) or k in ("fallbacks", "disk_problems")}
    assert all(not v for v in counters.values()), counters


def test_scratch_memory_kept_by_a_thread_is_bounded():
    # After a call with ~400 MB of intermediates a thread used to keep them for good.
    from kiln_check import run_isolated
    out = run_isolated("""
        import gc, torch_kiln._kiln as k
        def rss():
            return int(open('/proc/self/statm').read().split()[1]) * 4096
        fn = torch.jit.CompilationUnit('def fn(x):\\n    return torch.softmax(torch.nn.functional.gelu(x), 1)\\n').fn
        small = torch.randn(4, 64)
        for _ in range(3):
            fn(small)
        base = rss()
        big = torch.randn(100, 1 << 20)  # 400 MB; gelu(x) is kept in scratch for softmax's passes
        for _ in range(3):
            out = fn(big)
        torch.testing.assert_close(out, torch.softmax(torch.nn.functional.gelu(big), 1))
        kept_big, limit = k.scratch_bytes_kept()
        del out, big
        gc.collect()
        for _ in range(3):
            fn(small)
        print(kept_big, limit, (rss() - base) >> 20)
    """)
    kept, limit, grown_mb = map(int, out.strip().splitlines()[-1].split())
    assert kept <= limit, out
    assert grown_mb < 64, f"the process kept {grown_mb} MiB after the large call"
