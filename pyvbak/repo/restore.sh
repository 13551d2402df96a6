#!/bin/sh
# restore.sh - restore a pyvbak snapshot WITHOUT pyvbak.
# Needs only POSIX sh, GNU coreutils and zstd.  Usage, from anywhere:
#     sh /path/to/REPO/restore.sh SNAPSHOT_ID OUTPUT_FILE
# See README-RESTORE.txt beside this script and docs/FORMAT.md in the pyvbak sources.
# Format v1: integers are big-endian, so hex fields read from od become numbers
# with $((0x...)).  Every block is a standard zstd frame with a content checksum,
# which `zstd -d` checks; the block's SHA-256 is checked too.
set -eu

die() { echo "restore.sh: error: $*" >&2; exit 1; }

[ $# -eq 2 ] || die "usage: sh restore.sh SNAPSHOT_ID OUTPUT_FILE"
snap=$1
out=$2
command -v zstd >/dev/null 2>&1 || die "zstd is not installed: install the 'zstd' package"
repo=$(cd "$(dirname "$0")" && pwd)
index="$repo/snapshots/$snap.index"
[ -f "$index" ] || die "no snapshot $snap in $repo (see the snapshots/ directory: the ids are the *.json names)"
[ -f "$repo/snapshots/$snap.json" ] || die "snapshot $snap is incomplete (no metadata): choose another"
[ ! -e "$out" ] || die "$out exists: remove it first or choose another output"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/pyvbak-restore.XXXXXX")
part="$out.pyvbak-restore-partial"
trap 'rm -rf "$tmp"; rm -f "$part"' EXIT
trap 'exit 130' INT TERM

# 1. The snapshot index: a 48-byte header, then one 48-byte record per block:
#    sha256(32) fast_hash(16).  An all-zero digest marks a zero block.
zstd -dcq "$index" | od -An -v -tx1 -w48 | tr -d ' ' > "$tmp/index.hex"
header=$(head -n 1 "$tmp/index.hex")
[ "$(echo "$header" | cut -c1-16)" = "29388ea2738fa92c" ] || die "$index is not a pyvbak snapshot index"
[ "$((0x$(echo "$header" | cut -c17-24)))" -eq 1 ] || die "$index has an unsupported version"
bs=$((0x$(echo "$header" | cut -c25-32)))
size=$((0x$(echo "$header" | cut -c33-48)))
zero=0000000000000000000000000000000000000000000000000000000000000000
# "digest blockno" for every non-zero block, sorted by digest.
tail -n +2 "$tmp/index.hex" | cut -c1-64 | nl -ba -v0 -w1 -s' ' \
  | while read -r n d; do [ "$d" = "$zero" ] || echo "$d $n"; done | sort -k1,1 > "$tmp/blocks"

# 2. Pack indexes: an 80-byte header, then 80-byte records:
#    sha256(32) pack_id(32) offset(u64) compressed_len(u32) uncompressed_len(u32).
for f in "$repo"/index/*; do
  [ -f "$f" ] || continue
  zstd -dcq "$f" | od -An -v -tx1 -w80 | tr -d ' ' | tail -n +2
done | cut -c1-64,65-128,129-144,145-152 --output-delimiter=' ' | sort -u -k1,1 > "$tmp/where"

# 3. Every block must be somewhere.
missing=$(join -v1 "$tmp/blocks" "$tmp/where" | wc -l)
[ "$missing" -eq 0 ] || die "$missing block(s) of snapshot $snap are missing from the repository"

# 4. Write: "digest blockno pack offset length", in pack order for sequential reads.
: > "$part"
truncate -s "$size" "$part"
join "$tmp/blocks" "$tmp/where" | sort -k3,3 -k4,4 | while read -r d n p o c; do
  dd if="$repo/packs/$(echo "$p" | cut -c1-2)/$p" iflag=skip_bytes,count_bytes \
     skip=$((0x$o)) count=$((0x$c)) bs=1M status=none | zstd -dcq > "$tmp/block" \
    || die "block $n cannot be decompressed (pack $p): the repository is damaged"
  got=$(sha256sum "$tmp/block" | cut -c1-64)
  [ "$got" = "$d" ] || die "block $n does not match its digest (pack $p): the repository is damaged"
  dd if="$tmp/block" of="$part" bs="$bs" seek="$n" conv=notrunc,sparse status=none
done
mv "$part" "$out"
echo "restored snapshot $snap ($size bytes) to $out"
