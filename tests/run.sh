#!/bin/sh
# The test command (README): installs what the tests need, then runs the whole suite.
# Debian packages are installed when running as root with apt-get available; pip
# packages always.  Usage: sh tests/run.sh [pytest args...]
set -eu
cd "$(dirname "$0")/.."
DEB_PACKAGES="gcc zstd e2fsprogs qemu-utils qemu-system-common fuse3 coreutils"
# Debian's own python3 (PEP 668): a venv for the tests, and headers for the C extension
if [ "$(command -v python3)" = /usr/bin/python3 ]; then
  DEB_PACKAGES="$DEB_PACKAGES python3-venv python3-dev python3-pip"
fi
# a real VM for the guest-device tests, and the kernel and static busybox its booted Linux
# guest is built from (tests/guest_linux.py); without their recommends (a GUI, UEFI firmware,
# firmware blobs)
# (btrfs-progs: restore.sh must refuse a device of a mounted btrfs, which mountinfo does not name)
DEB_PACKAGES_NO_RECOMMENDS="qemu-system-x86 linux-image-cloud-amd64 busybox-static btrfs-progs"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  missing=""
  for p in $DEB_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  lean=""
  for p in $DEB_PACKAGES_NO_RECOMMENDS; do dpkg -s "$p" >/dev/null 2>&1 || lean="$lean $p"; done
  if [ -n "$missing$lean" ]; then
    apt-get update -qq
  fi
  if [ -n "$missing" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  fi
  if [ -n "$lean" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $lean >/dev/null
  fi
fi
# A Python that refuses pip installs outside a virtual environment (PEP 668: Debian's
# own python3) gets one of its own, .venv/ in the checkout.
PY=python3
if [ -z "${VIRTUAL_ENV:-}" ] && python3 -c 'import os, sys, sysconfig
sys.exit(0 if sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)'; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=.venv/bin/python
fi
"$PY" -m pip install -q -e '.[test]'
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
