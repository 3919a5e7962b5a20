"""prewarm(): run a model once per example so that every group it uses has code in a cache
directory, ready for processes that run with ``enable(compile="never")``."""

import sys
import threading
import time

import torch

import torch_kiln
from . import _kiln, cache

# TorchScript's profiling executor profiles the first call and optimises on the second (that is
# when Kiln's pass runs and its guards first compile); the third runs the optimised plan.
_CALLS_PER_EXAMPLE = 3


def _calls(example_inputs):
    """The argument tuples to call the model with: a tensor is one call with one argument, a
    tuple one call, and a list of tuples (or lists) one call each."""
    if isinstance(example_inputs, torch.Tensor):
        return [(example_inputs,)]
    if isinstance(example_inputs, tuple):
        return [example_inputs]
    if isinstance(example_inputs, list) and example_inputs and all(isinstance(c, (tuple, list)) for c in example_inputs):
        return [tuple(c) for c in example_inputs]
    if isinstance(example_inputs, list):
        return [tuple(example_inputs)]
    raise TypeError(f"example_inputs must be a tensor, a tuple of arguments or a list of tuples, got {type(example_inputs).__name__}")


class _Progress:
    """A one-line bar on stderr, redrawn from Kiln's counters while the model runs (TorchScript
    releases the GIL while it executes a graph, so this thread gets to draw)."""

    def __init__(self, enabled, before):
        self.enabled = enabled
        self.before = before
        self.stop = threading.Event()
        self.start = time.perf_counter()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def counts(self):
        s = _kiln.stats()
        groups = s["groups"] - self.before["groups"]
        done = s["specializations"] - self.before["specializations"]
        return groups, done

    def draw(self, final=False):
        groups, done = self.counts()
        width = 30
        filled = width if groups == 0 else min(width, width * done // max(groups, 1))
        line = f"\rkiln prewarm [{'#' * filled}{'.' * (width - filled)}] {done}/{groups} groups  {time.perf_counter() - self.start:5.1f} s"
        sys.stderr.write(line + ("\n" if final else ""))
        sys.stderr.flush()

    def _loop(self):
        while not self.stop.wait(0.1):
            self.draw()

    def __enter__(self):
        if self.enabled:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.stop.set()
            self.thread.join()
            self.draw(final=True)


def _new_counts(before, after):
    before = dict(before)
    return {k: v - before.get(k, 0) for k, v in dict(after).items() if v > before.get(k, 0)}


def prewarm(module, example_inputs, cache_dir=None, progress=None, dynamic="always"):
    """Runs ``module`` (a scripted, traced or loaded TorchScript function or module, not yet
    optimised: fresh from ``torch.jit.script/trace/load``) on ``example_inputs`` under
    ``torch.no_grad()``, compiling each Kiln group for those inputs into ``cache_dir`` (None:
    the default directory). ``example_inputs``: a tensor, a tuple of arguments for one call,
    or a list of such tuples (one call each, e.g. several batch sizes).

    ``dynamic`` is the policy the code is made under: ``"always"`` (the default) makes code
    for every size >= 2 of every dim from the first example, which a server with
    ``compile="never"`` finds whatever sizes it sees (sizes 1 and 0 need examples of their
    own); ``"static"`` makes code for exactly the examples' sizes.

    Returns a summary: groups and specialisations made, how many were compiled or found in
    the cache, entries written, the directory's entries and bytes, and seconds taken. Kiln's
    options are restored afterwards (or Kiln disabled again if it was off).
    """
    if not isinstance(module, (torch.jit.ScriptModule, torch.jit.ScriptFunction)):
        what = type(module).__name__
        hint = " (a plain nn.Module: script or trace it first)" if isinstance(module, torch.nn.Module) else ""
        raise TypeError(f"prewarm() takes a TorchScript module or function (torch.jit.script, trace or load), got {what}{hint}")
    calls = _calls(example_inputs)
    directory = cache.resolve_dir(cache_dir)
    previous = dict(torch_kiln._options) if torch_kiln._enabled else None
    # Synchronous compiles: each call's code exists before the next call, so the calls made
    # here are the ones whose code is written.
    options = {**(previous or {}), "cache_dir": directory, "compile": "lazy", "dynamic": dynamic, "background": False}
    if progress is None:
        progress = sys.stderr.isatty()
    torch_kiln.enable(**options)
    try:
        before = _kiln.stats()
        runs_before = dict(_kiln.specialization_runs())
        start = time.perf_counter()
        with _Progress(progress, before), torch.no_grad():
            for args in calls:
                for _ in range(_CALLS_PER_EXAMPLE):
                    module(*args)
        # The code these calls ran, when this process held it before (a module optimised
        # earlier passes its guards without asking the cache) is written here.
        used = [k for k, n in _kiln.specialization_runs() if n > runs_before.get(k, 0)]
        _kiln.persist(directory, torch_kiln._options["cache_size_limit"], used)
        seconds = time.perf_counter() - start
        after = _kiln.stats()
    finally:
        if previous is not None:
            torch_kiln.enable(**previous)
        else:
            torch_kiln.disable()
    delta = {k: after[k] - before[k] for k in ("groups", "specializations", "compiles", "disk_hits", "cache_hits", "disk_writes")}
    listing = cache.info(directory)
    return {
        "cache_dir": directory,
        "groups": delta["groups"],
        "specializations": delta["specializations"],
        "compiled": delta["compiles"],
        "from_disk": delta["disk_hits"],
        "from_memory": delta["cache_hits"],
        "entries_written": delta["disk_writes"],  # persist()'s writes included
        "entries": listing["entries"],
        "bytes": listing["bytes"],
        "seconds": seconds,
        "fallbacks": _new_counts(before["fallbacks"], after["fallbacks"]),
    }
