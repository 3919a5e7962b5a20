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
