"""Kiln's disk cache of compiled code: one entry per compiled group (machine code, the data to
run it, a header naming the CPU and versions it was built for, a checksum).

    torch_kiln.cache.info()      # directory, entries, bytes, size limit
    torch_kiln.cache.verify()    # check every entry; corrupt ones are listed
    torch_kiln.cache.clear()     # remove every entry

Each function takes ``cache_dir``; None means the directory ``enable()`` uses (or would use).
The cache holds executable code: Kiln creates it 0700 and refuses a directory that another
user owns or can write (``ValueError`` naming it).
"""

import os
from pathlib import Path

from . import _kiln

__all__ = ["default_dir", "resolve_dir", "info", "verify", "clear"]


def default_dir():
    """$KILN_CACHE_DIR, else $XDG_CACHE_HOME/torch_kiln, else ~/.cache/torch_kiln."""
    if os.environ.get("KILN_CACHE_DIR"):
        return str(Path(os.environ["KILN_CACHE_DIR"]).expanduser())
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return str(Path(base) / "torch_kiln")


def resolve_dir(cache_dir):
    """The absolute directory meant by ``cache_dir`` (None: the default)."""
    if cache_dir is None:
        return os.path.abspath(default_dir())
    if not isinstance(cache_dir, (str, os.PathLike)) or not str(cache_dir):
        raise ValueError(f"torch_kiln option 'cache_dir' must be a path, None or False, got {cache_dir!r}")
    try:
        path = Path(cache_dir).expanduser()
        if path.exists() and not path.is_dir():
            raise ValueError(f"torch_kiln cache_dir {str(path)!r} is not a directory")
        return os.path.abspath(path)
    except (OSError, RuntimeError) as e:  # a name too long, a home that cannot be expanded...
        shown = str(cache_dir) if len(str(cache_dir)) <= 80 else str(cache_dir)[:77] + "..."
        raise ValueError(f"torch_kiln cache_dir {shown!r} cannot be used: {e.strerror or e}") from None


def _current_dir(cache_dir):
    if cache_dir is None:
        from . import _options
        if _options is not None and _options["cache_dir"]:
            return _options["cache_dir"]
    return resolve_dir(cache_dir)


def info(cache_dir=None):
    """A dict: ``dir``, ``entries`` (count), ``bytes``, ``size_limit`` (of the running
    options, when ``cache_dir`` is theirs) and ``files``: (path, bytes, seconds since last
    use), least recently used first."""
    from . import _options, OPTIONS
    d = _current_dir(cache_dir)
    files = _kiln.cache_entries(d) if os.path.isdir(d) else []
    limit = (_options or OPTIONS)["cache_size_limit"]
    return {"dir": d, "entries": len(files), "bytes": sum(f[1] for f in files), "size_limit": limit, "files": files}


def verify(cache_dir=None):
    """Checks every entry (framing, checksum, name, and whether it was built for this CPU and
    Kiln). Returns a dict: ``ok`` (loadable here), ``foreign`` (sound, built elsewhere) and
    ``bad``: (path, problem) of each corrupt entry. Kiln never loads a bad entry; ``clear()``
    or the next compile of its group replaces it."""
    d = _current_dir(cache_dir)
    report = _kiln.cache_verify(d) if os.path.isdir(d) else []
    return {
        "dir": d,
        "ok": [p for p, v in report if v == "ok"],
        "foreign": [p for p, v in report if v == "foreign"],
        "bad": [(p, v) for p, v in report if v not in ("ok", "foreign")],
    }


def clear(cache_dir=None):
    """Removes every entry (and temporary files of interrupted writes); returns how many.
    Code already loaded in running processes keeps running."""
    d = _current_dir(cache_dir)
    return _kiln.cache_clear(d) if os.path.isdir(d) else 0
