#!/bin/sh
# The test command (README): installs what the tests need, then runs the whole suite.
# Debian packages are installed when running as root with apt-get available; pip
# packages always.  Usage: sh tests/run.sh [pytest args...]
set -eu
cd "$(dirname "$0")/.."
DEB_PACKAGES="gcc zstd e2fsprogs qemu-utils qemu-system-common fuse3 coreutils"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  missing=""
  for p in $DEB_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  fi
fi
python3 -m pip install -q -e '.[test]'
exec python3 -m pytest -q -p no:cacheprovider "$@"
