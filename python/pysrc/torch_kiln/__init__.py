"""Kiln: TorchScript regions compiled to machine code for this CPU.

    import torch, torch_kiln
    torch_kiln.enable()          # TorchScript functions and modules run on Kiln's code
    print(torch_kiln.stats())
    print(torch_kiln.explain(scripted_fn_or_module))

Kiln never changes what a program computes: whatever it cannot compile, or any call whose
inputs differ from what a compiled group was built for, runs TorchScript's own nodes, and the
reason is counted in ``stats()["fallbacks"]``. Set ``KILN_LOG=info`` (or ``debug``) to log.

Compiled code is kept on disk (``cache_dir``) and reused by later processes; a deployment can
ship a cache made with ``prewarm()`` (or ``python -m torch_kiln prewarm``) and run with
``enable(compile="never")``. See ``torch_kiln.cache``.
"""

import atexit
import os
import warnings

import torch  # loads libtorch before the extension, which has no RUNPATH of its own

from . import _kiln
from . import cache

__all__ = ["enable", "disable", "reset", "stats", "explain", "prewarm", "synchronize", "cache", "OPTIONS"]
__version__ = _kiln.VERSION

#: Options of ``enable()`` and their defaults.
OPTIONS = {
    # Input signatures (dtype, sizes, strides) one region may be compiled for; past it the
    # region stays in TorchScript (reported in stats()["fallbacks"]).
    "max_specializations": 8,
    # LLVM optimisation level of the generated code (0-3; below 2 nothing is vectorised).
    "opt_level": 3,
    # Threads for parallel kernels; None: torch.get_num_threads() at the time of enable().
    "num_threads": None,
    # When to compile: "lazy" compiles a group the first time it needs code that no cache has;
    # "never" runs only cached code (a miss runs TorchScript, counted in stats()); "always"
    # compiles what this process has not compiled yet without reading the disk cache, and
    # rewrites its entries.
    "compile": "lazy",
    # Dynamic shapes. "auto": once a dim of a group's input has been seen with two sizes, the
    # group is compiled once for any size >= 2 of it (sizes 0 and 1 get code of their own);
    # "static": code for each distinct signature; "always": every dim of size >= 2 is
    # symbolic from the first call. A group whose lowering changes with the sizes, or an input
    # whose layout does, keeps code per size; explain() says why.
    "dynamic": "auto",
    # Directory of compiled code shared across processes. None: $KILN_CACHE_DIR, else
    # $XDG_CACHE_HOME/torch_kiln, else ~/.cache/torch_kiln. False: memory only. It holds
    # executable code: it is created 0700, and a directory other users can write is refused.
    "cache_dir": None,
    # Bytes of entries kept in cache_dir; past it, least recently used entries are removed.
    "cache_size_limit": 1 << 30,
    # Compile on Kiln's compile thread: a call whose signature has no code yet runs
    # TorchScript's own nodes at once, and later calls run Kiln's code once it is ready
    # (synchronize() waits for it). False: that call waits for its compile. The default is
    # $KILN_BACKGROUND ("0" turns it off), else True.
    "background": None,
}

_enabled = False
#: The options of the last enable(), resolved (what prewarm() restores).
_options = None


# Upper bounds of the integer options: a value past them is a mistake, not a wish (and would
# overflow the native integer it becomes).
_MAX_SPECIALIZATIONS = 1 << 16
_MAX_THREADS = 1024
_MAX_BYTES = (1 << 63) - 1


def _check_int(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"torch_kiln option {name!r} must be an int in [{lo}, {hi}], got {value!r}")


def enable(**options):
    """Compile TorchScript regions with Kiln from now on. Unknown options raise ValueError."""
    global _enabled
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown torch_kiln option(s): {', '.join(unknown)}; known: {', '.join(sorted(OPTIONS))}")
    opts = {**OPTIONS, **options}
    _check_int("max_specializations", opts["max_specializations"], 1, _MAX_SPECIALIZATIONS)
    _check_int("opt_level", opts["opt_level"], 0, 3)
    threads = opts["num_threads"]
    if threads is None:
        threads = torch.get_num_threads()
    else:
        _check_int("num_threads", threads, 1, _MAX_THREADS)
    if opts["compile"] not in ("lazy", "never", "always"):
        raise ValueError(f"torch_kiln option 'compile' must be 'lazy', 'never' or 'always', got {opts['compile']!r}")
    if opts["dynamic"] not in ("auto", "static", "always"):
        raise ValueError(f"torch_kiln option 'dynamic' must be 'auto', 'static' or 'always', got {opts['dynamic']!r}")
    _check_int("cache_size_limit", opts["cache_size_limit"], 0, _MAX_BYTES)
    background = opts["background"]
    if background is None:
        background = os.environ.get("KILN_BACKGROUND", "1") != "0"
    elif not isinstance(background, bool):
        raise ValueError(f"torch_kiln option 'background' must be a bool, got {background!r}")
    cache_dir = opts["cache_dir"]
    if cache_dir is not False:
        cache_dir = cache.resolve_dir(cache_dir)
    global _options
    args = (opts["max_specializations"], opts["opt_level"], threads, opts["compile"], opts["dynamic"])
    try:
        _kiln.enable(*args, cache_dir or None, opts["cache_size_limit"], background)
    except ValueError as e:
        # A directory the user named is their mistake to hear about; the default one (say, a
        # read-only home) must not stop their program: Kiln keeps code in memory instead.
        if opts["cache_dir"] is not None or os.environ.get("KILN_CACHE_DIR"):
            raise
        warnings.warn(f"torch_kiln: no disk cache ({e}); compiled code is kept in memory only", RuntimeWarning, stacklevel=2)
        cache_dir = False
        _kiln.enable(*args, None, opts["cache_size_limit"], background)
    _options = {**opts, "cache_dir": cache_dir, "background": background}
    _enabled = True


def synchronize():
    """Wait until no compile is queued or running on Kiln's compile thread: afterwards every
    signature seen so far runs Kiln's code (or has its reason in stats()). For tests,
    benchmarks and warm-up."""
    _kiln.synchronize()


# No compile may be inside LLVM while the interpreter tears down.
atexit.register(_kiln.shutdown)


def disable():
    """Stop compiling: no new groups, no new specialisations (those calls run TorchScript's
    nodes; queued compiles are dropped). Code already compiled keeps running for the
    signatures it was built for."""
    global _enabled
    _kiln.disable()
    _enabled = False


def reset():
    """Zero the counters and fallback reasons of stats(); compiled code stays cached."""
    _kiln.reset()


def stats():
    """Counters: groups (regions taken by Kiln), specialisations made for them (of which
    symbolic_specializations serve many sizes) and where their code came from (compiles,
    cache_hits in memory, disk_hits), entries written to the disk cache and problems met
    there, kernel runs, guard passes, misses (calls no existing specialisation accepted:
    compiled for, or failed) and failures (calls that ran TorchScript's own nodes), and every
    reason code ran in TorchScript, with counts; the options compile_mode, dynamic,
    background_compile and cache_dir. ``background``: the compile thread's jobs queued,
    running, done and dropped (no longer wanted), and the calls that ran TorchScript while
    their group's compile was pending (counted there, not as fallbacks); ``compile_phases_ms``:
    where compile time went (summed over threads); ``kernels_compiled`` / ``kernels_reused``:
    kernels compiled, and kernels whose code an earlier compile had made."""
    s = _kiln.stats()
    s["fallbacks"] = dict(s["fallbacks"])
    s["disk_problems"] = dict(s["disk_problems"])
    s["enabled"] = _enabled
    return s


def _debug_state(obj):
    if isinstance(obj, torch.jit.ScriptModule):
        return obj._c.get_debug_state()
    if isinstance(obj, torch.jit.ScriptFunction):
        return obj.get_debug_state()
    raise TypeError(f"explain() takes a scripted or traced function or module, got {type(obj).__name__}")


def _is_guarded_group(node):
    return node.kind() == "prim::If" and any(n.kind() == "kiln::CompilationGroup" for n in next(node.blocks()).nodes())


def _holds_tensors(t):
    return isinstance(t, torch._C.TensorType) or any(_holds_tensors(c) for c in t.containedTypes())


def _is_listed(node):
    # An aten op the pass did not see (the pass itself stamps a reason on every computing node
    # it leaves, with one output or several); ops on scalars, lists and strings (size, dim,
    # __not__, format...) are not Kiln candidates.
    return node.kind().startswith("aten::") and any(_holds_tensors(o.type()) for o in node.outputs())


def _walk(block, lines, groups, depth):
    pad = "  " * depth
    # Fallbacks count once their block has run; those of a block that has not are marked.
    not_run = ""
    for node in block.nodes():
        kind = node.kind()
        if kind == "kiln::FallbacksRan":
            not_run = "" if _kiln.fallback_block_ran(node.i("kiln_marker")) else " (has not run)"
            continue
        if _is_guarded_group(node):
            # The else branch is TorchScript's fallback copy of the group: not listed.
            _walk(next(node.blocks()), lines, groups, depth)
            continue
        if kind == "kiln::CompilationGroup":
            info = _kiln.group_info(node.i("kiln_group"))
            groups.append(info)
            lines.append(f"{pad}[kiln group {info['id']}] {', '.join(info['nodes'])}")
        elif node.hasAttribute("kiln_reason"):
            lines.append(f"{pad}[torchscript] {_kiln.reason(node.i('kiln_reason')) or kind + ': unknown'}{not_run}")
        elif _is_listed(node):
            lines.append(f"{pad}[torchscript] {kind}: not seen by the Kiln pass")
        for sub in node.blocks():
            _walk(sub, lines, groups, depth + 1)


def explain(obj):
    """Which nodes of a scripted function or module run in Kiln, which stay in TorchScript and
    why, and what each compiled group is (Kiln IR, loop IR, guards, compile time)."""
    try:
        plans = list(_debug_state(obj).execution_plans.values())
    except RuntimeError:  # the executor asserts when it has no optimised plan yet
        plans = []
    if not plans:
        return ("not optimised yet: TorchScript profiles the first call and optimises on the next; "
                "call it at least twice (with Kiln enabled) before explain()")
    lines, groups = [], []
    _walk(plans[0].graph, lines, groups, 0)
    out = ["nodes:"] + ["  " + l for l in lines]
    for g in groups:
        specs = g["specializations"]
        out.append(f"group {g['id']}: {len(g['nodes'])} ops, {len(specs)} specialisation(s), "
                   f"guard passes {g['guard_passes']} (of which {g['guard_misses']} needed new code), "
                   f"failures {g['guard_failures']}")
        if g["pending"]:
            out.append(f"  compile pending on the compile thread: [{g['pending']}]")
        if g["varying_dims"]:
            out.append("  dims seen with several sizes: " + "; ".join(g["varying_dims"]))
        for why in g["symbolic_refused"]:
            out.append(f"  no code for symbolic sizes (kept code per size): {why}")
        for sig, why in g["rejected"]:
            out.append(f"  refused [{sig}]: {why}")
        for i, sp in enumerate(specs):
            how = {"compiled": f"compiled in {sp['compile_time_ms']:.1f} ms",
                   "disk": f"loaded from the disk cache in {sp['compile_time_ms']:.1f} ms",
                   "memory": "shared with an identical group"}[sp["source"]]
            out.append(f"  specialisation {i}: {sp['kernels']} kernel(s) ({sp['parallel_kernels']} parallel), "
                       f"{how}, runs {sp['runs']}")
            out.append(f"    memory: intermediates {sp['arena_bytes']} bytes (memory plan), "
                       f"GEMM packing and image copies {sp['pack_bytes']} bytes")
            out.append("    guards: " + "; ".join(sp["guards"]))
            out.append("    state: " + sp["state"])
            for w in sp["weights"]:
                out.append("    " + w)
            if sp["symbols"]:
                at = ", ".join(f"s{k}={v}" for k, v in enumerate(sp["compiled_at"]))
                out.append(f"    symbolic: {'; '.join(sp['symbols'])}; serves every size >= 2 of them "
                           f"(ties kept); compiled at {at}, as the IR below shows")
            out.append("    kiln ir:")
            out += ["      " + l for l in sp["kiln_ir"].splitlines()]
            out.append("    loop ir:")
            out += ["      " + l for l in sp["loop_ir"].splitlines()]
    return "\n".join(out)


from ._prewarm import prewarm  # noqa: E402  (needs enable() above)
