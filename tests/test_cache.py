"""The disk cache end to end: prewarming (API and command line), fresh processes that run with
compile='never' and compile nothing, damaged entries, concurrent writers, read-only and unsafe
directories, eviction, the cache tools, and options.

Each "process" here is a new Python interpreter: what a deployment does. (The Rust tests in
cache/tests/disk.rs cover the same safety cases entry by entry.)"""

import importlib.util
import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
import torch_kiln

from kiln_check import close, script_source

# Two Kiln groups split by cumsum (which Kiln does not compile), a parameter, a reduction.
MODEL = """
import torch

class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, 64))

    def forward(self, x):
        y = torch.sigmoid(x * self.scale) + torch.tanh(x) * 0.5
        z = torch.cumsum(y, 1)
        return torch.softmax(z - z.amax(1, keepdim=True), 1) * 3.0
"""


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    # torch.jit.script reads a class's source from its file.
    folder = tmp_path_factory.mktemp("model")
    (folder / "kiln_cache_model.py").write_text(MODEL)
    spec = importlib.util.spec_from_file_location("kiln_cache_model", folder / "kiln_cache_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = folder / "model.pt"
    torch.jit.save(torch.jit.script(module.Model().eval()), str(path))
    return str(path)


# A fresh process: loads the model, runs it three times in Kiln's `mode` on `cache_dir`, checks
# each result against eager, prints stats as JSON.
CHILD = """
import json, sys, torch, torch_kiln
exec(sys.argv[4], globals())
mode, cache_dir, model = sys.argv[1], sys.argv[2], sys.argv[3]
torch_kiln.enable(compile=mode, cache_dir=cache_dir, **json.loads(sys.argv[5]))
m = torch.jit.load(model)
ref = Model()
ref.load_state_dict(m.state_dict())
for batch in json.loads(sys.argv[6]):
    x = torch.randn(batch, 64)
    x[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(m(x), ref(x), equal_nan=True)
s = torch_kiln.stats()
# cumsum's reason ("not an op Kiln supports yet") is the same in every mode: left out.
s["fallbacks"] = {k: v for k, v in s["fallbacks"].items() if not k.startswith("aten::cumsum")}
print(json.dumps({k: s[k] for k in ("groups", "compiles", "disk_hits", "disk_writes", "kernel_runs", "guard_failures", "fallbacks", "disk_problems")}))
"""


def child(mode, cache_dir, model_file, options=None, batches=(4,)):
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(cache_dir), model_file, MODEL, json.dumps(options or {}), json.dumps(list(batches))],
                         capture_output=True, text=True, timeout=300, env=_env())
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _env():
    # One thread: GNU OpenMP must not be in use when these processes fork (see test_cases).
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args, check=True):
    out = subprocess.run([sys.executable, "-m", "torch_kiln", *args], capture_output=True, text=True, timeout=300, env=_env())
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def prewarm_cli(model_file, cache_dir, batch=4):
    return cli("prewarm", model_file, "--input", f"{batch}x64:float32", "--cache-dir", str(cache_dir)).stdout


def entries(cache_dir):
    return sorted(p for p in os.listdir(cache_dir) if p.endswith(".kiln"))


def test_prewarmed_cache_serves_a_fresh_process_that_compiles_nothing(model_file, tmp_path):
    out = prewarm_cli(model_file, tmp_path / "c")
    assert "groups: 2, specialisations: 2 (compiled 2" in out and "2 entries written" in out, out
    assert stat.S_IMODE(os.stat(tmp_path / "c").st_mode) == 0o700
    s = child("never", tmp_path / "c", model_file)
    assert (s["compiles"], s["disk_hits"], s["fallbacks"], s["disk_problems"]) == (0, 2, {}, {}), s
    assert s["kernel_runs"] == 4  # two groups, on the optimising call and the last


def test_never_mode_on_an_empty_cache_runs_torchscript_and_says_why(model_file, tmp_path):
    s = child("never", tmp_path / "empty", model_file)
    assert (s["compiles"], s["kernel_runs"]) == (0, 0)
    assert s["fallbacks"] == {"group not run: no cached code for this signature and compile='never'": 4}, s
    assert s["guard_failures"] == 4  # once per group per call: the fallback copy is not guarded again


def test_lazy_mode_compiles_once_and_a_second_process_loads(model_file, tmp_path):
    first = child("lazy", tmp_path, model_file)
    assert (first["compiles"], first["disk_writes"]) == (2, 2)
    second = child("lazy", tmp_path, model_file)
    assert (second["compiles"], second["disk_hits"]) == (0, 2)


def test_always_mode_compiles_even_with_entries(model_file, tmp_path):
    child("lazy", tmp_path, model_file)
    s = child("always", tmp_path, model_file)
    assert (s["compiles"], s["disk_hits"], s["disk_writes"]) == (2, 0, 2)


def test_two_processes_compute_the_same_keys(model_file, tmp_path):
    child("lazy", tmp_path / "a", model_file)
    child("lazy", tmp_path / "b", model_file)
    assert entries(tmp_path / "a") == entries(tmp_path / "b") and len(entries(tmp_path / "a")) == 2


def test_options_that_change_code_change_the_key(model_file, tmp_path):
    child("lazy", tmp_path, model_file)
    s = child("lazy", tmp_path, model_file, {"opt_level": 2})
    assert s["compiles"] == 2
    assert len(entries(tmp_path)) == 4


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "header"])
def test_damaged_entries_are_compiled_again_never_loaded(model_file, tmp_path, damage):
    prewarm_cli(model_file, tmp_path)
    for name in entries(tmp_path):
        path = tmp_path / name
        data = bytearray(path.read_bytes())
        if damage == "flip_byte":
            data[len(data) // 2] ^= 0x01
        elif damage == "truncate":
            del data[len(data) - 100:]
        else:
            at = data.index(b"cpu ") + 4
            data[at:at + 1] = b"Z"
        path.write_bytes(bytes(data))
    assert len(torch_kiln.cache.verify(tmp_path)["bad"]) == 2
    never = child("never", tmp_path, model_file)
    assert never["kernel_runs"] == 0 and len(never["disk_problems"]) == 2, never
    # Under the policy the prewarm used (always): the same keys, so the bad entries are rewritten.
    lazy = child("lazy", tmp_path, model_file, options={"dynamic": "always"})
    assert (lazy["compiles"], lazy["disk_writes"]) == (2, 2), lazy
    assert all("checksum" in p or "truncated" in p for p in lazy["disk_problems"]), lazy
    v = torch_kiln.cache.verify(tmp_path)
    assert len(v["ok"]) == 2 and not v["bad"], v


def test_two_processes_writing_the_same_keys_at_once(model_file, tmp_path):
    batches = list(range(1, 9))
    # dynamic="static": one entry per batch size and group.
    args = [sys.executable, "-c", CHILD, "always", str(tmp_path), model_file, MODEL, '{"dynamic": "static"}', json.dumps(batches)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    v = torch_kiln.cache.verify(tmp_path)
    assert len(v["ok"]) == 16 and not v["bad"], v
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
    s = child("never", tmp_path, model_file, options={"dynamic": "static"}, batches=batches)
    assert (s["compiles"], s["disk_hits"]) == (0, 16), s


def test_symbolic_code_from_disk_serves_sizes_never_compiled(model_file, tmp_path):
    # dynamic="always": code for every batch >= 2 from the first call, under the same key in
    # every process (the samples it is compiled at do not depend on the sizes seen).
    lazy = child("lazy", tmp_path, model_file, options={"dynamic": "always"}, batches=[3])
    assert (lazy["compiles"], lazy["disk_writes"]) == (2, 2), lazy
    s = child("never", tmp_path, model_file, options={"dynamic": "always"}, batches=[2, 7, 40, 300])
    assert (s["compiles"], s["disk_hits"], s["guard_failures"]) == (0, 2, 0), s
    assert s["kernel_runs"] == 2 * (2 + 3 * 3), s  # 2 groups; 3 calls per size, the first profiling
    # The default policy (auto) in production finds the general code from the first size too.
    s = child("never", tmp_path, model_file, batches=[9, 2, 64])
    assert (s["compiles"], s["disk_hits"], s["guard_failures"], s["fallbacks"]) == (0, 2, 0, {}), s


def test_read_only_cache_serves_never_mode(model_file, tmp_path):
    prewarm_cli(model_file, tmp_path / "ro")
    os.chmod(tmp_path / "ro", 0o500)
    try:
        s = child("never", tmp_path / "ro", model_file)
        assert (s["compiles"], s["disk_hits"], s["disk_problems"]) == (0, 2, {}), s
    finally:
        os.chmod(tmp_path / "ro", 0o700)


def test_unsafe_directories_are_refused_with_the_reason(tmp_path):
    open_dir = tmp_path / "shared"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    try:
        with pytest.raises(ValueError, match="writable by other users"):
            torch_kiln.enable(cache_dir=str(open_dir))
        out = cli("cache", "info", "--cache-dir", str(open_dir), check=False)
        assert out.returncode != 0 and "writable by other users" in out.stderr
    finally:
        torch_kiln.enable()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        torch_kiln.enable(cache_dir=str(tmp_path / "file"))
    torch_kiln.enable()


@pytest.mark.parametrize("opts,match", [({"compile": "sometimes"}, "compile"), ({"cache_size_limit": -1}, "cache_size_limit"),
                                        ({"cache_dir": 3}, "cache_dir")])
def test_bad_cache_options(opts, match):
    with pytest.raises(ValueError, match=match):
        torch_kiln.enable(**opts)
    torch_kiln.enable()


def test_default_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "k"))
    assert torch_kiln.cache.default_dir() == str(tmp_path / "k")
    monkeypatch.delenv("KILN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert torch_kiln.cache.default_dir() == str(tmp_path / "xdg" / "torch_kiln")


def test_eviction_keeps_the_cache_under_its_limit(tmp_path):
    sources = [f"def fn(x):\n    return torch.exp(x) * {k}.0 + torch.sigmoid(x)\n" for k in range(5)]
    torch_kiln.enable(cache_dir=str(tmp_path), cache_size_limit=10**9)
    try:
        fn = script_source(sources[0])
        x = torch.randn(33)
        for _ in range(3):
            fn(x)
        one = torch_kiln.cache.info()["bytes"]
        assert one > 0
        torch_kiln.enable(cache_dir=str(tmp_path), cache_size_limit=int(one * 2.5))
        for k, src in enumerate(sources[1:], 1):
            fn = script_source(src)
            for _ in range(3):
                close(fn(x), torch.exp(x) * k + torch.sigmoid(x))
        info = torch_kiln.cache.info()
        assert info["entries"] == 2 and info["bytes"] <= int(one * 2.5), info
    finally:
        torch_kiln.enable()


def test_prewarm_api_summary_and_cache_tools(tmp_path):
    fn = script_source("def fn(x, y):\n    return torch.relu(x) * y + 1.0\n")
    before = torch_kiln.stats()["enabled"]
    s = torch_kiln.prewarm(fn, [(torch.randn(8), torch.randn(8)), (torch.randn(3, 5), torch.randn(5))], cache_dir=tmp_path)
    assert (s["groups"], s["specializations"], s["entries"]) == (1, 2, 2), s
    assert s["bytes"] > 0 and s["seconds"] > 0
    assert torch_kiln.stats()["enabled"] == before
    info = cli("cache", "info", "--cache-dir", str(tmp_path)).stdout
    assert "2 entries" in info
    assert "2 ok" in cli("cache", "verify", "--cache-dir", str(tmp_path)).stdout
    path = tmp_path / entries(tmp_path)[0]
    path.write_bytes(path.read_bytes()[:-1])
    bad = cli("cache", "verify", "--cache-dir", str(tmp_path), check=False)
    assert bad.returncode == 1 and "1 bad" in bad.stdout and "truncated" in bad.stdout
    assert "removed 2 entries" in cli("cache", "clear", "--cache-dir", str(tmp_path)).stdout
    assert torch_kiln.cache.info(tmp_path)["entries"] == 0


def test_prewarm_writes_programs_this_process_compiled_before(tmp_path):
    fn = script_source("def fn(x):\n    return torch.abs(x) * 7.0 - 1.0\n")
    x = torch.randn(6)
    for _ in range(3):
        fn(x)
    # fn is optimised already: its guard passes without asking the cache, and prewarm writes
    # what this process holds.
    s = torch_kiln.prewarm(fn, (x,), cache_dir=tmp_path)
    assert s["entries"] >= 1 and torch_kiln.cache.verify(tmp_path)["ok"]


def test_prewarm_cli_reports_bad_model_paths(tmp_path):
    out = cli("prewarm", str(tmp_path / "missing.pt"), "--input", "2x2", "--cache-dir", str(tmp_path), check=False)
    assert out.returncode != 0 and "cannot load" in out.stderr
    out = cli("prewarm", "m.pt", "--input", "2xQ:float32", check=False)
    assert out.returncode != 0 and "bad shape" in out.stderr


def test_an_unusable_default_directory_keeps_code_in_memory(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".cache").write_text("a file where the cache folder would go")
    code = ("import warnings, torch, torch_kiln\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    torch_kiln.enable()\n"
            "assert torch_kiln.stats()['cache_dir'] is None\n"
            "assert any('no disk cache' in str(x.message) for x in w), [str(x.message) for x in w]\n"
            "f = torch.jit.CompilationUnit('def f(x):\\n    return torch.exp(x) + 1.0\\n').f\n"
            "x = torch.randn(5)\n"
            "for _ in range(3):\n"
            "    torch.testing.assert_close(f(x), torch.exp(x) + 1.0)\n"
            "assert torch_kiln.stats()['kernel_runs'] == 2\n")
    env = {k: v for k, v in _env().items() if k not in ("KILN_CACHE_DIR", "XDG_CACHE_HOME")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "HOME": str(home)}, timeout=300)
    assert out.returncode == 0, out.stderr


def _plant(cache_dir, what):
    """Something that is not an entry under an entry's name in `cache_dir` (issue 9)."""
    os.makedirs(cache_dir, mode=0o700, exist_ok=True)
    name = os.path.join(cache_dir, "0" * 64 + ".kiln")
    if what == "fifo":
        os.mkfifo(name, 0o600)
    elif what == "sparse":
        with open(name, "wb") as f:
            f.truncate(1 << 40)
    else:
        os.mkdir(name)
        open(os.path.join(name, "inside"), "w").close()
    return name


@pytest.mark.parametrize("what", ["fifo", "sparse", "directory"])
def test_cache_tools_handle_what_is_not_an_entry(tmp_path, what):
    # verify used to hang on a FIFO and abort on a 1 TB sparse file; clear raised on a directory.
    d = tmp_path / "c"
    name = _plant(d, what)
    out = cli("cache", "verify", "--cache-dir", str(d), check=False)
    assert out.returncode == 1 and name in out.stdout, out.stdout + out.stderr
    assert "not an entry" in out.stdout or "more than any entry" in out.stdout, out.stdout
    assert "Traceback" not in out.stderr
    assert torch_kiln.cache.clear(d) == 1
    assert os.listdir(d) == []


def test_a_planted_fifo_never_blocks_a_load(model_file, tmp_path):
    # Every entry name of the model planted as a FIFO: a fresh process compiles, reports and
    # replaces them (was: blocked forever in open()).
    d = tmp_path / "c"
    child("lazy", d, model_file)
    for e in entries(d):
        os.remove(d / e)
        os.mkfifo(d / e, 0o600)
    s = child("lazy", d, model_file)
    assert s["compiles"] == 2 and s["disk_writes"] == 2, s
    assert any("a FIFO" in p for p in s["disk_problems"]), s
    assert child("never", d, model_file)["disk_hits"] == 2


def test_prewarm_cli_explains_bad_inputs_without_a_traceback(model_file, tmp_path):
    d = str(tmp_path / "c")
    cases = [
        (["--input", "4x3:float32"], "did not run on the inputs (4, 3):float32"),  # the model rejects it
        (["--input", "-1x2"], "negative size in '-1x2'"),  # was read as an option
        (["--input", "100000x100000x100000"], "cannot make an input"),  # cannot be allocated
    ]
    for args, message in cases:
        out = cli("prewarm", model_file, *args, "--cache-dir", d, "--quiet", check=False)
        assert out.returncode != 0 and message in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr, out.stderr


def test_prewarm_of_a_plain_module_says_what_it_needs(tmp_path):
    with pytest.raises(TypeError, match="plain nn.Module: script or trace it first"):
        torch_kiln.prewarm(torch.nn.ReLU(), (torch.randn(3),), cache_dir=tmp_path)
