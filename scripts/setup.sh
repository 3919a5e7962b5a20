#!/usr/bin/env bash
# Sets up everything Kiln needs on a fresh Debian machine, and nothing already there:
# Debian packages for LLVM 19, the project venv (.venv) with torch==2.13.0, and the
# torch_kiln extension built in release mode into the venv.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$KILN_ROOT"

DEBS=(llvm-19-dev libpolly-19-dev libzstd-dev zlib1g-dev)
missing=()
for p in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
# Test-only packages: expecttest (torch's OpInfo database imports it), pytest, and
# torchvision (the version built for torch 2.13.0) for the classifiers the model tests run.
PYPKGS=(torch==2.13.0 torchvision==0.28.0 maturin expecttest pytest numpy)
if ! .venv/bin/python - "${PYPKGS[@]}" <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError
for spec in sys.argv[1:]:
    name, _, want = spec.partition("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        sys.exit(1)
    if want and have.split("+")[0] != want:
        sys.exit(1)
PY
then
  echo "setup: installing ${PYPKGS[*]} into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "${PYPKGS[@]}"
fi

# Rebuild the extension only when a source is newer than the installed one.
so=python/pysrc/torch_kiln/_kiln.abi3.so
newer=""
if [ -f "$so" ] && .venv/bin/python -c "import torch_kiln" 2>/dev/null; then
  newer=$(find Cargo.toml Cargo.lock */Cargo.toml */src */cpp */build.rs -newer "$so" -print -quit 2>/dev/null || true)
else
  newer=yes
fi
if [ -n "$newer" ]; then
  echo "setup: building torch_kiln (release) into .venv"
  (cd python && maturin develop --release --quiet)
fi
