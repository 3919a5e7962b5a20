# Sourced by the set-up and test scripts: where LLVM, the venv and the cargo target dir live.
# Kept in one place so the build sees the same environment everywhere (a changed variable
# makes cargo rebuild torch-sys, which costs ~90 s).
KILN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export KILN_ROOT
export LLVM_SYS_191_PREFIX=/usr/lib/llvm-19        # the llvm-config on PATH may be another version
export LIBTORCH_USE_PYTORCH=1                      # link the pip wheel's own libtorch
export VIRTUAL_ENV="$KILN_ROOT/.venv"
export PATH="$VIRTUAL_ENV/bin:$PATH"
export PYO3_PYTHON="$VIRTUAL_ENV/bin/python"
# A target dir outside the clone survives fresh clones (CI) on the same machine.
export CARGO_TARGET_DIR="${KILN_TARGET_DIR:-$HOME/.cache/kiln/target}"
