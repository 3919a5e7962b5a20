"""python -m torch_kiln: prewarm a cache for a saved TorchScript model, and manage caches.

    python -m torch_kiln prewarm model.pt --input 1x3x224x224:float32 [--input ...] [--cache-dir DIR]
    python -m torch_kiln cache info|clear|verify [--cache-dir DIR]
"""

import argparse
import sys

import torch

import torch_kiln
from torch_kiln import cache

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "float64": torch.float64, "double": torch.float64,
    "int32": torch.int32, "int": torch.int32, "int64": torch.int64, "long": torch.int64, "bool": torch.bool,
}


def parse_input(spec):
    """'1x3x224x224:float32' -> a random tensor of that shape and dtype ('scalar' for 0-dim;
    the dtype defaults to float32)."""
    shape, _, dtype = spec.partition(":")
    dtype = dtype or "float32"
    if dtype not in _DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {dtype!r} in {spec!r}; known: {', '.join(_DTYPES)}")
    try:
        sizes = [] if shape == "scalar" else [int(d) for d in shape.split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {shape!r} in {spec!r}: expected e.g. 1x3x224x224 or 'scalar'") from None
    if any(d < 0 for d in sizes):
        raise argparse.ArgumentTypeError(f"negative size in {spec!r}")
    t = _DTYPES[dtype]
    try:
        if t.is_floating_point:
            return torch.randn(sizes, dtype=t)
        if t == torch.bool:
            return torch.rand(sizes) < 0.5
        return torch.randint(-100, 100, sizes, dtype=t)
    except (RuntimeError, MemoryError) as e:  # too large to allocate
        raise argparse.ArgumentTypeError(f"cannot make an input {spec!r}: {str(e).splitlines()[0]}") from None


def _size(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def prewarm(args):
    try:
        model = torch.jit.load(args.model, map_location="cpu")
    except Exception as e:  # a bad path or file: say which, without a traceback
        sys.exit(f"torch_kiln prewarm: cannot load {args.model}: {e}")
    model.eval()
    try:
        s = torch_kiln.prewarm(model, tuple(args.input), cache_dir=args.cache_dir, progress=not args.quiet, dynamic=args.dynamic)
    except ValueError:
        raise  # an unusable cache directory: main() reports it
    except Exception as e:  # the model rejects these inputs: say so, without a traceback
        shapes = ", ".join(f"{tuple(t.shape)}:{str(t.dtype).split('.')[1]}" for t in args.input)
        # TorchScript puts its traceback first and the error itself last.
        why = next((line.strip() for line in reversed(str(e).splitlines()) if line.strip()), type(e).__name__)
        sys.exit(f"torch_kiln prewarm: {args.model} did not run on the inputs {shapes}: {why}")
    print(f"groups: {s['groups']}, specialisations: {s['specializations']} "
          f"(compiled {s['compiled']}, already cached {s['from_disk'] + s['from_memory']})")
    print(f"cache {s['cache_dir']}: {s['entries_written']} entries written, "
          f"{s['entries']} entries, {_size(s['bytes'])} in all")
    print(f"time: {s['seconds']:.2f} s")
    for why, n in s["fallbacks"].items():
        print(f"ran in TorchScript ({n}x): {why}")


def cache_command(args):
    if args.action == "info":
        i = cache.info(args.cache_dir)
        print(f"{i['dir']}: {i['entries']} entries, {_size(i['bytes'])} (limit {_size(i['size_limit'])})")
        for path, size, age in i["files"]:
            print(f"  {path}  {_size(size)}  used {age:.0f} s ago")
    elif args.action == "clear":
        print(f"removed {cache.clear(args.cache_dir)} entries")
    else:
        v = cache.verify(args.cache_dir)
        print(f"{v['dir']}: {len(v['ok'])} ok, {len(v['foreign'])} built for another CPU or Kiln, {len(v['bad'])} bad")
        for path, why in v["bad"]:
            print(f"  bad: {path}: {why}")
        if v["bad"]:
            sys.exit(1)


def _values_after_input(argv):
    """`--input -1x2` as `--input=-1x2`: argparse would read a value starting with '-' as an
    option and say "expected one argument" instead of what is wrong with it."""
    out = []
    for i, a in enumerate(argv):
        if i > 0 and argv[i - 1] == "--input" and a.startswith("-") and out and out[-1] == "--input":
            out[-1] = f"--input={a}"
        else:
            out.append(a)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m torch_kiln", description="Kiln: prewarm and manage the compiled-code cache.")
    sub = p.add_subparsers(dest="command", required=True)
    pw = sub.add_parser("prewarm", help="compile a saved TorchScript model's groups into the cache")
    pw.add_argument("model", help="a file saved with torch.jit.save")
    pw.add_argument("--input", action="append", type=parse_input, required=True,
                    help="one argument of the model, as SHAPE:DTYPE (e.g. 1x3x224x224:float32); repeat for each argument")
    pw.add_argument("--cache-dir", default=None, help="default: $KILN_CACHE_DIR or ~/.cache/torch_kiln")
    pw.add_argument("--quiet", action="store_true", help="no progress bar")
    pw.add_argument("--dynamic", default="always", choices=["always", "auto", "static"],
                    help="always (default): code for every size >= 2 of every dim; static: for exactly these sizes")
    pw.set_defaults(run=prewarm)
    c = sub.add_parser("cache", help="inspect, verify or clear a cache directory")
    c.add_argument("action", choices=["info", "clear", "verify"])
    c.add_argument("--cache-dir", default=None)
    c.set_defaults(run=cache_command)
    args = p.parse_args(_values_after_input(sys.argv[1:] if argv is None else argv))
    try:
        args.run(args)
    except ValueError as e:  # an unsafe or unusable cache directory
        sys.exit(f"torch_kiln: {e}")


if __name__ == "__main__":
    main()
