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
# a real VM for the guest-device tests, without its recommends (a GUI, UEFI firmware,
# firmware blobs); kmod's depmod for the guest's kernel (below)
# (btrfs-progs: restore.sh must refuse a device of a mounted btrfs, which mountinfo does not name)
DEB_PACKAGES_NO_RECOMMENDS="qemu-system-x86 btrfs-progs kmod"
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
# The kernel and static busybox the booted Linux guest is built from (tests/guest_linux.py):
# Debian's packages unpacked into tests/.guest/, never installed on this host (a kernel
# package would add a boot entry and run initramfs hooks).  Best effort: without them the
# guest tests skip (fail in CI) and say how to get them.
GUEST=tests/.guest
if [ ! -f "$GUEST/.unpacked" ] && command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1; then
  kernel_package() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[^ ]*\)$/\1/p' | head -n 1
  }
  kernel=$(kernel_package)
  if [ -z "$kernel" ] && [ "$(id -u)" = 0 ] && ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
    apt-get update -qq && kernel=$(kernel_package)  # (no package lists yet)
  fi
  debs=$(mktemp -d)
  trap 'rm -rf "$debs"' EXIT
  trap 'rm -rf "$debs"; exit 130' INT
  trap 'rm -rf "$debs"; exit 143' TERM
  if [ -z "$kernel" ]; then
    echo "tests/run.sh: apt knows no linux-image-cloud-amd64 (no package lists, or not Debian on amd64): the" \
         "booted-guest tests will skip" >&2
  elif (cd "$debs" && apt-get download -qq "$kernel" busybox-static >/dev/null 2>"$debs/why") || {
         # (lists out of date or missing, the kernel known from the installed packages)
         [ "$(id -u)" = 0 ] && apt-get update -qq && kernel=$(kernel_package) && [ -n "$kernel" ] \
           && (cd "$debs" && apt-get download -qq "$kernel" busybox-static >/dev/null 2>"$debs/why"); }; then
    rm -rf "$GUEST" && mkdir -p "$GUEST"
    unpacked=yes
    for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$GUEST" || unpacked=; done
    for modules in "$GUEST"/lib/modules/* "$GUEST"/usr/lib/modules/*; do
      [ -d "$modules" ] || continue
      PATH="$PATH:/sbin:/usr/sbin" depmod -b "$GUEST" "$(basename "$modules")" || unpacked=
    done
    # (only once complete: a failed step is tried again by the next run)
    if [ -n "$unpacked" ]; then touch "$GUEST/.unpacked"; else echo "tests/run.sh: unpacking $kernel failed (kmod's depmod missing?)" >&2; fi
  else
    echo "tests/run.sh: could not download $kernel and busybox-static ($(grep -v '^W:' "$debs/why" | tail -n 1)):" \
         "the booted-guest tests will skip" >&2
  fi
  rm -rf "$debs"
  trap - EXIT INT TERM
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
