#!/bin/sh
# restore.sh - restore a pyvbak snapshot WITHOUT pyvbak.
# Needs only a POSIX sh (dash, bash, busybox sh), coreutils (GNU or busybox, plus `join`)
# and zstd.  Usage, from anywhere:
#     sh /path/to/REPO/restore.sh SNAPSHOT_ID OUTPUT_FILE
# See README-RESTORE.txt beside this script and docs/FORMAT.md in the pyvbak sources.
# Format v1: integers are big-endian, so hex fields read from od become numbers
# with $((0x...)).  Every block is a standard zstd frame with a content checksum,
# which `zstd -d` checks; the block's SHA-256 is checked too.
#
# `set -e` does not see a failure inside a pipeline (only its last command counts), so
# every stage writes a file and is checked on its own, and the counts that tie the
# stages together (records = blocks of the disk; every non-zero block found in a pack)
# are compared: a missing tool or a failed step stops the script, never a disk of zeros.
set -eu

die() { echo "restore.sh: error: $*" >&2; exit 1; }

[ $# -eq 2 ] || die "usage: sh restore.sh SNAPSHOT_ID OUTPUT_FILE"
snap=$1
out=$2
missing_tools=
for t in zstd od tr head tail cut nl sort join paste wc dd sha256sum mktemp truncate mv rm dirname sync grep; do
  command -v "$t" >/dev/null 2>&1 || missing_tools="$missing_tools $t"
done
[ -z "$missing_tools" ] || die "needs these commands, not found on PATH:$missing_tools (install coreutils and zstd)"
repo=$(cd "$(dirname "$0")" && pwd)
index="$repo/snapshots/$snap.index"
[ -f "$index" ] || die "no snapshot $snap in $repo (see the snapshots/ directory: the ids are the *.json names)"
[ -f "$repo/snapshots/$snap.json" ] || die "snapshot $snap is incomplete (no metadata): choose another"
[ ! -e "$out" ] || die "$out exists: remove it first or choose another output"
# The metadata names its index by SHA-256 (index_sha256; older snapshots have none): an
# index copied over another's would restore the other snapshot's disk.
want=$(tr -d ' \n\r\t' < "$repo/snapshots/$snap.json" | grep -o '"index_sha256":"[0-9a-f]*"' | cut -d'"' -f4) || want=
if [ -n "$want" ]; then
  got=$(sha256sum "$index" | cut -c1-64) || die "sha256sum failed on $index"
  [ "$got" = "$want" ] || die "$index is not the index snapshot $snap's metadata names (replaced or damaged)"
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/pyvbak-restore.XXXXXX") || die "cannot make a temporary directory in ${TMPDIR:-/tmp}"
part="$out.pyvbak-restore-partial"
trap 'rm -rf "$tmp"; rm -f "$part"' EXIT
trap 'exit 130' INT TERM

# 1. The snapshot index: a 48-byte header, then one 48-byte record per block:
#    sha256(32) fast_hash(16).  An all-zero digest marks a zero block.
zstd -dcq "$index" > "$tmp/index.bin" || die "$index cannot be decompressed: the repository is damaged"
od -An -v -tx1 -w48 "$tmp/index.bin" > "$tmp/index.od" || die "od failed on $index"
tr -d ' ' < "$tmp/index.od" > "$tmp/index.hex" || die "tr failed on $index"
rm -f "$tmp/index.bin" "$tmp/index.od"
header=$(head -n 1 "$tmp/index.hex") || die "head failed on $index"
[ "$(echo "$header" | cut -c1-16)" = "29388ea2738fa92c" ] || die "$index is not a pyvbak snapshot index"
[ "$((0x$(echo "$header" | cut -c17-24)))" -eq 1 ] || die "$index has an unsupported version"
bs=$((0x$(echo "$header" | cut -c25-32)))
size=$((0x$(echo "$header" | cut -c33-48)))
count=$((0x$(echo "$header" | cut -c49-64)))
[ "$bs" -gt 0 ] && [ "$count" -eq $(( (size + bs - 1) / bs )) ] \
  || die "$index is damaged: $count records for a $size-byte disk of $bs-byte blocks"
tail -n +2 "$tmp/index.hex" > "$tmp/records" || die "tail failed on $index"
[ "$(wc -l < "$tmp/records")" -eq "$count" ] || die "$index is damaged: it holds fewer records than its $count blocks"
zero=0000000000000000000000000000000000000000000000000000000000000000
# "digest blockno" for every non-zero block, sorted by digest.
cut -c1-64 "$tmp/records" > "$tmp/digests" || die "cut failed on $index"
nl -ba -v0 -w1 -s' ' "$tmp/digests" > "$tmp/numbered" || die "nl failed on $index"
while read -r n d; do [ "$d" = "$zero" ] || echo "$d $n"; done < "$tmp/numbered" > "$tmp/unsorted" \
  || die "cannot list the blocks of $index (is ${TMPDIR:-/tmp} full?)"
sort -k1,1 "$tmp/unsorted" > "$tmp/blocks" || die "sort failed (is ${TMPDIR:-/tmp} full?)"
rm -f "$tmp/records" "$tmp/digests" "$tmp/numbered" "$tmp/unsorted"

# 2. Pack indexes: an 80-byte header, then 80-byte records:
#    sha256(32) pack_id(32) offset(u64) compressed_len(u32) uncompressed_len(u32).
: > "$tmp/packidx"
for f in "$repo"/index/*; do
  [ -f "$f" ] || continue
  # A damaged pack index is left out, as pyvbak does: if it named a block this snapshot
  # needs, step 3 says that block is missing.
  if ! zstd -dcq "$f" > "$tmp/pi.bin" 2>/dev/null; then
    echo "restore.sh: warning: pack index $f cannot be decompressed: left out" >&2
    continue
  fi
  od -An -v -tx1 -w80 "$tmp/pi.bin" > "$tmp/pi.od" || die "od failed on $f"
  tr -d ' ' < "$tmp/pi.od" > "$tmp/pi.hex" || die "tr failed on $f"
  tail -n +2 "$tmp/pi.hex" >> "$tmp/packidx" || die "tail failed on $f"
done
rm -f "$tmp/pi.bin" "$tmp/pi.od" "$tmp/pi.hex"
# "digest pack offset length" (cut and paste: busybox cut has no --output-delimiter)
{ cut -c1-64 "$tmp/packidx" > "$tmp/c1" && cut -c65-128 "$tmp/packidx" > "$tmp/c2" \
  && cut -c129-144 "$tmp/packidx" > "$tmp/c3" && cut -c145-152 "$tmp/packidx" > "$tmp/c4"; } \
  || die "cut failed on the pack indexes"
paste -d ' ' "$tmp/c1" "$tmp/c2" "$tmp/c3" "$tmp/c4" > "$tmp/where.unsorted" || die "paste failed on the pack indexes"
sort -u -k1,1 "$tmp/where.unsorted" > "$tmp/where" || die "sort failed (is ${TMPDIR:-/tmp} full?)"
rm -f "$tmp/packidx" "$tmp/c1" "$tmp/c2" "$tmp/c3" "$tmp/c4" "$tmp/where.unsorted"

# 3. Every block must be somewhere: "digest blockno pack offset length", in pack order
#    for sequential reads.
join "$tmp/blocks" "$tmp/where" > "$tmp/found" || die "join failed"
sort -k3,3 -k4,4 "$tmp/found" > "$tmp/plan" || die "sort failed (is ${TMPDIR:-/tmp} full?)"
wanted=$(wc -l < "$tmp/blocks")
found=$(wc -l < "$tmp/plan")
[ "$found" -eq "$wanted" ] || die "$((wanted - found)) block(s) of snapshot $snap are missing from the repository"

# 4. Write every non-zero block at its place; zero blocks stay holes of the truncated file.
: > "$part"
truncate -s "$size" "$part" || die "cannot make $part $size bytes long"
written=0
while read -r d n p o c; do
  pack="$repo/packs/$(echo "$p" | cut -c1-2)/$p"
  dd if="$pack" iflag=skip_bytes,count_bytes skip=$((0x$o)) count=$((0x$c)) bs=1M status=none > "$tmp/frame" \
    || die "block $n cannot be read (pack $p): the repository is damaged"
  zstd -dcq < "$tmp/frame" > "$tmp/block" \
    || die "block $n cannot be decompressed (pack $p): the repository is damaged"
  got=$(sha256sum "$tmp/block" | cut -c1-64)
  [ "$got" = "$d" ] || die "block $n does not match its digest (pack $p): the repository is damaged"
  dd if="$tmp/block" of="$part" bs="$bs" seek="$n" conv=notrunc status=none \
    || die "cannot write block $n to $part"
  written=$((written + 1))
done < "$tmp/plan"
[ "$written" -eq "$wanted" ] || die "wrote $written of $wanted blocks"
[ "$(wc -c < "$part")" -eq "$size" ] || die "$part is not $size bytes after the restore"
sync  # the restored data is on disk before it gets its final name
mv "$part" "$out" || die "cannot rename $part to $out"
sync  # and the rename too
echo "restored snapshot $snap ($size bytes) to $out"
