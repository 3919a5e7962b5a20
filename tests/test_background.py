"""Background compilation (issue 11): a call whose signature has no code runs TorchScript's
nodes at once and queues the compile; later calls run Kiln's code once it has landed.

Each test enables background compiles itself (the suite's default is synchronous, see
conftest.py) and puts the suite's default back afterwards."""

import os
import textwrap

import pytest
import torch
import torch_kiln

from kiln_check import close, fresh_script, in_threads, run_isolated, spine, script_source


@pytest.fixture
def background():
    torch_kiln.enable(background=True)
    yield
    torch_kiln.synchronize()
    torch_kiln.enable()


def counts():
    s = torch_kiln.stats()
    return s["background"], s["kernel_runs"], s["compiles"]


def test_results_are_right_while_the_compile_is_pending_and_kiln_runs_after_synchronize(background):
    f = fresh_script(spine)
    x, y = torch.randn(33, 70), torch.randn(33, 70)
    expected = spine(x, y)
    before, runs0, compiles0 = counts()
    close(f(x, y), expected)  # profiling run
    close(f(x, y), expected)  # optimised: the guard misses, the compile is queued
    queued, _, _ = counts()
    assert queued["submitted"] == before["submitted"] + 1
    assert queued["calls_while_pending"] >= before["calls_while_pending"] + 1, "the queuing call ran TorchScript"
    torch_kiln.synchronize()
    after, runs1, compiles1 = counts()
    assert (after["queued"], after["running"]) == (0, 0)
    assert after["done"] == before["done"] + 1
    assert after["submitted"] == after["done"] + after["dropped"]
    assert compiles1 == compiles0 + 1
    close(f(x, y), expected)
    assert counts()[1] > runs1, f"Kiln's code did not run after synchronize:\n{torch_kiln.explain(f)}"
    assert "compile pending" not in torch_kiln.explain(f)


def test_many_threads_calling_while_the_compile_is_queued_get_right_results_and_one_compile(background):
    f = fresh_script(spine)
    inputs = [(torch.randn(17, 130), torch.randn(17, 130)) for _ in range(4)]
    expected = [spine(*a) for a in inputs]
    _, _, compiles0 = counts()

    def worker(k):
        for i in range(30):
            a = inputs[(i + k) % len(inputs)]
            close(f(*a), expected[(i + k) % len(inputs)])

    in_threads(worker, 8)
    torch_kiln.synchronize()
    assert counts()[2] == compiles0 + 1, "one signature, one compile"
    runs = counts()[1]
    close(f(*inputs[0]), expected[0])
    assert counts()[1] > runs


def test_disable_and_reset_with_a_compile_queued_neither_hang_nor_break_results(background):
    f = fresh_script(spine)
    x, y = torch.randn(9, 301), torch.randn(9, 301)
    expected = spine(x, y)
    f(x, y)
    close(f(x, y), expected)  # queued
    torch_kiln.reset()
    torch_kiln.disable()
    close(f(x, y), expected)
    torch_kiln.synchronize()
    s = torch_kiln.stats()["background"]
    assert (s["queued"], s["running"]) == (0, 0)
    torch_kiln.enable(background=True)
    close(f(x, y), expected)
    torch_kiln.synchronize()
    close(f(x, y), expected)


def test_compile_never_never_queues(tmp_path):
    torch_kiln.enable(background=True, compile="never", cache_dir=str(tmp_path))
    try:
        f = fresh_script(spine)
        x, y = torch.randn(5, 7), torch.randn(5, 7)
        before = torch_kiln.stats()["background"]["submitted"]
        for _ in range(3):
            close(f(x, y), spine(x, y))
        s = torch_kiln.stats()
        assert s["background"]["submitted"] == before
        assert any("compile='never'" in why for why in s["fallbacks"]), s["fallbacks"]
    finally:
        torch_kiln.enable()


def test_a_compile_error_in_the_background_is_a_fallback_reason_and_is_not_retried(background):
    # Integer true division under a default dtype Kiln has no code for: the compile refuses.
    # (The group is made under float32, whose code compiles; then the default changes.)
    f = script_source("def fn(x):\n    return x / 3 + 1\n")
    i = torch.arange(6)
    for _ in range(2):
        close(f(i), i / 3 + 1)
    torch_kiln.synchronize()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        expected = i / 3 + 1
        close(f(i), expected)
        torch_kiln.synchronize()
        s = torch_kiln.stats()
        submitted = s["background"]["submitted"]
        reasons = [why for why in s["fallbacks"] if why.startswith("group not run") and "BFloat16" in why]
        assert len(reasons) == 1, s["fallbacks"]
        for _ in range(3):
            close(f(i), expected)
        torch_kiln.synchronize()
        s = torch_kiln.stats()
        assert s["background"]["submitted"] == submitted, "a refused signature is not queued again"
        assert s["fallbacks"][reasons[0]] >= 3
    finally:
        torch.set_default_dtype(old)


# A traced stack whose compile takes long enough to be in flight when the test acts.
STACK = """class Stack(torch.nn.Module):
            def forward(self, x):
                for _ in range(6):
                    x = torch.nn.functional.gelu(torch.layer_norm(x, [x.shape[-1]])) + torch.softmax(x, -1)
                return x"""


def test_fork_with_a_compile_in_flight():
    out = run_isolated(f"""
        import os
        torch_kiln.enable(cache_dir=False, background=True)
        torch.manual_seed(0)
        {STACK}
        m = torch.jit.trace(Stack(), torch.randn(64, 512))
        x = torch.randn(64, 512)
        with torch.no_grad():
            expected = Stack()(x)
            m(x); m(x)  # the compile is queued (and likely running) now
            pid = os.fork()
            if pid == 0:
                # A forked child of a process whose OpenMP team has run must not enter a
                # parallel region of that team (libgomp hangs there, with or without Kiln):
                # PyTorch's rule for forked workers is one thread.
                torch.set_num_threads(1)
                ok = torch.allclose(m(x), expected, atol=1e-5)
                torch_kiln.synchronize()
                ok = ok and torch.allclose(m(x), expected, atol=1e-5)
                os._exit(0 if ok else 3)
            _, status = os.waitpid(pid, 0)
            torch_kiln.synchronize()
            assert torch.allclose(m(x), expected, atol=1e-5)
        print("child", os.waitstatus_to_exitcode(status))
    """, timeout=240)
    assert "child 0" in out, out


def test_interpreter_exit_with_a_compile_in_flight_leaves_no_bad_entry(tmp_path):
    run_isolated(f"""
        torch_kiln.enable(cache_dir={str(tmp_path)!r}, background=True)
        {STACK}
        m = torch.jit.trace(Stack(), torch.randn(64, 512))
        with torch.no_grad():
            m(torch.randn(64, 512)); m(torch.randn(64, 512))
        print(torch_kiln.stats()["background"])
    """, timeout=240)
    report = torch_kiln.cache.verify(str(tmp_path))
    assert not report["bad"] and not report["foreign"], report


def test_a_group_past_its_limit_queues_nothing():
    torch_kiln.enable(background=True, max_specializations=1, dynamic="static")
    try:
        f = fresh_script(spine)
        before = torch_kiln.stats()["background"]["submitted"]
        for n in range(2, 7):
            x, y = torch.randn(n, 5), torch.randn(n, 5)
            for _ in range(3):
                close(f(x, y), spine(x, y))
            torch_kiln.synchronize()
        s = torch_kiln.stats()
        assert s["background"]["submitted"] == before + 1, s["background"]
        assert any("specialisation limit (1)" in why for why in s["fallbacks"]), s["fallbacks"]
    finally:
        torch_kiln.enable()


def test_code_a_cache_holds_serves_the_call_that_misses(background):
    # An identical function compiled before: its code is in memory, so the miss of the new one
    # (its second call, where TorchScript first runs Kiln's pass) runs Kiln's code at once.
    first, second = fresh_script(spine), fresh_script(spine)
    x, y = torch.randn(21, 45), torch.randn(21, 45)
    first(x, y)
    first(x, y)
    torch_kiln.synchronize()
    submitted, runs, _ = counts()
    second(x, y)
    close(second(x, y), spine(x, y))
    bg, runs2, _ = counts()
    assert bg["submitted"] == submitted["submitted"], "nothing to compile, nothing queued"
    assert runs2 > runs, "the missing call itself ran Kiln's code"


def test_a_disk_entry_serves_a_new_process_from_its_second_call(tmp_path):
    body = f"""
        torch_kiln.enable(cache_dir={str(tmp_path)!r}, background=BACKGROUND)
        from kiln_check import spine, fresh_script
        f = fresh_script(spine)
        x, y = torch.randn(13, 77), torch.randn(13, 77)
        f(x, y)
        torch.testing.assert_close(f(x, y), spine(x, y))
        s = torch_kiln.stats()
        print(s["disk_hits"], s["background"]["submitted"], s["kernel_runs"])
    """
    env_path = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
    run_isolated(env_path + textwrap.dedent(body).replace("BACKGROUND", "False"))
    hits, submitted, runs = map(int, run_isolated(env_path + textwrap.dedent(body).replace("BACKGROUND", "True")).split())
    assert (hits, submitted) == (1, 0) and runs > 0, (hits, submitted, runs)


def test_background_option_must_be_a_bool():
    with pytest.raises(ValueError, match="background"):
        torch_kiln.enable(background="yes")
    torch_kiln.enable()
