#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine (as root):
# clang to rebuild and check tracer.bpf.o, qemu and busybox for the kprobe
# kernels, iproute2/util-linux for network namespaces, pytest.
set -euo pipefail
PYTHON=${PYTHON:-python3}
pkgs=(clang llvm make qemu-system-x86 busybox-static iproute2 util-linux nftables xz-utils zstd kmod)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! "$PYTHON" -m pytest --version >/dev/null 2>&1; then
    echo "setup: installing pytest"
    "$PYTHON" -m pip install -q pytest
fi
# pyte: a terminal emulator, to read back the live view's screen (test_screen.py)
if ! "$PYTHON" -c "import pyte" >/dev/null 2>&1; then
    echo "setup: installing pyte"
    "$PYTHON" -m pip install -q pyte
fi
