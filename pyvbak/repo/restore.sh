#!/bin/sh
# restore.sh - restore a pyvbak snapshot WITHOUT pyvbak.
# Needs only a POSIX sh (dash, bash, busybox sh), coreutils (GNU or busybox, plus `join`;
# `split` if there), grep and zstd.  Usage, from anywhere:
#     sh /path/to/REPO/restore.sh [--force] SNAPSHOT OUTPUT
# SNAPSHOT: a snapshot id, a unique prefix of one, VM@latest or VM/DISK@latest.
# OUTPUT: a new file; an existing file or a block device only with --force.
# See README-RESTORE.txt beside this script and docs/FORMAT.md in the pyvbak sources.
# restore kit revision: 5  (backups replace an older revision's restore.sh and README-RESTORE.txt)
# Format v1: integers are big-endian, so hex fields read from od become numbers
# with $((0x...)).  Every block is a standard zstd frame with a content checksum,
# which `zstd -d` checks; the block's SHA-256 is checked too.
#
# `set -e` does not see a failure inside a pipeline (only its last command counts), so
# every stage writes a file and is checked on its own, and the counts that tie the
# stages together (records = blocks of the disk; every non-zero block found in a pack)
# are compared: a missing tool or a failed step stops the script, never a disk of zeros.
set -eu
LC_ALL=C
export LC_ALL
unset CDPATH

writing=
die() {
  # restore.sh takes no lock: a prune (the one writer that moves blocks) running meanwhile
  # is the likely cause of a block gone missing, not damage - say so
  hint=
  if [ -n "${in_packs:-}" ]; then  # from step 2 on: where a prune's moves show
    for lock in "$repo"/locks/*.json; do
      if [ -f "$lock" ] && grep -qs '"exclusive": true' "$lock"; then
        hint=" [a pyvbak prune holds the repository's exclusive lock right now and may be moving blocks: run restore.sh again once it has finished]"
      fi
    done
  fi
  if [ -n "$writing" ]; then
    printf '%s\n' "restore.sh: error: $*$hint ($out now holds an INCOMPLETE restore: do not use it)" >&2
  else
    printf '%s\n' "restore.sh: error: $*$hint" >&2
  fi
  writing=
  exit 1
}
usage="usage: sh restore.sh [--force] SNAPSHOT OUTPUT (SNAPSHOT: an id from snapshots/, a unique prefix of one, VM@latest or VM/DISK@latest)"

force=
if [ $# -eq 3 ] && [ "$1" = "--force" ]; then force=1; shift; fi
[ $# -eq 2 ] || die "$usage"
snap=$1
out=$2
[ -n "$out" ] || die "$usage"
case $out in -*) out=./$out ;; esac  # a name no tool takes for an option
missing_tools=
for t in zstd od tr head tail cut nl sort join paste wc dd sha256sum mktemp truncate mv ln rm dirname readlink sync grep; do
  command -v "$t" >/dev/null 2>&1 || missing_tools="$missing_tools $t"
done
[ -z "$missing_tools" ] || die "needs these commands, not found on PATH:$missing_tools (install coreutils, grep and zstd)"
case $0 in /*) self=$0 ;; *) self=./$0 ;; esac  # ./: neither an option nor looked up in CDPATH
here=$(dirname "$self") || die "cannot find the directory of $0: run it as sh /path/to/REPO/restore.sh"
repo=$(cd -P "$here" && pwd) || die "cannot enter the directory of $0 ($here)"
[ -d "$repo/snapshots" ] && [ -d "$repo/index" ] \
  || die "$repo is not a pyvbak repository (no snapshots/ and index/): run the restore.sh inside the repository"

# The output: a new file, or (with --force) an existing file replaced only at the end, or a
# block device written in place.  A symbolic link is followed: the file it names is
# restored (as cp and pyvbak restore do), not the link replaced by a file.
if [ -L "$out" ] && [ ! -b "$out" ]; then
  # each link's target taken relative to the link's own directory (busybox readlink -f
  # resolved a dangling relative link against the working directory), then the
  # directory made physical
  given=$out
  n=0
  while [ -L "$out" ]; do
    n=$((n + 1))
    [ "$n" -le 40 ] || die "too many levels of symbolic links in $given: give the path of the file itself"
    link=$(readlink -- "$out") || die "cannot read the symbolic link $out"
    case $link in
      /*) out=$link ;;
      *) out=$(dirname -- "$out")/$link ;;
    esac
  done
  ldir=$(dirname -- "$out") && ldir=$(cd -P -- "$ldir" 2>/dev/null && pwd) \
    || die "cannot resolve the symbolic link $given (its directory is missing?): give the path of the file itself"
  out=$ldir/${out##*/}
fi
device=
if [ -b "$out" ]; then
  [ -n "$force" ] || die "$out is a block device: pass --force to overwrite it with the snapshot"
  device=1
  # Not while it or one of its partitions is mounted (Linux): the device's own name (a
  # link such as /dev/disk/by-id/... resolved) and its partitions' from sysfs - exact
  # names: /dev/loop70 mounted says nothing about /dev/loop7
  if [ -r /proc/mounts ]; then
    rdev=$(readlink -f -- "$out") || rdev=$out
    names=" $out $rdev "
    for p in /sys/class/block/"${rdev##*/}"/*/partition; do
      [ -f "$p" ] || continue
      p=${p%/partition}
      names="$names/dev/${p##*/} "
    done
    while read -r mdev mrest; do
      case $names in
        *" $mdev "*) die "$mdev is mounted (on ${mrest%% *}): unmount it before restoring onto $out" ;;
      esac
    done < /proc/mounts
  fi
elif [ -e "$out" ] || [ -L "$out" ]; then
  [ -f "$out" ] || die "$out exists and is neither a regular file nor a block device: choose another output"
  [ -n "$force" ] || die "$out exists: remove it, choose another output, or pass --force to replace it"
fi
# never into the repository itself (over its config, a pack, or a new file among them):
# by identity (-ef), so that a bind mount of the repository is seen too
odir=$(dirname -- "$out") && odir=$(cd -P -- "$odir" 2>/dev/null && pwd) || odir=
d=$odir
while [ -n "$d" ]; do
  if [ "$d" = "$repo" ] || [ "$d" -ef "$repo" ]; then die "$out is inside the repository $repo: restore it elsewhere"; fi
  [ "$d" != / ] || break
  d=$(dirname -- "$d") || break
done
if [ -n "$device" ] && command -v flock >/dev/null 2>&1; then
  # the device's advisory lock (util-linux or busybox flock), as pyvbak restore takes it:
  # two restores writing one device leave it matching neither snapshot
  exec 9<"$out" || die "cannot open $out"
  flock -n 9 || die "$out is locked by another program (a pyvbak restore, or a tool partitioning it): wait for it to finish"
fi
part="$out.pyvbak-restore-partial"
base=${out##*/}
if [ "${#base}" -gt 231 ]; then  # the suffix would pass NAME_MAX (255 bytes; LC_ALL=C counts bytes)
  case $out in */*) odir_=${out%/*} ;; *) odir_=. ;; esac
  h=$(printf '%s' "$base" | sha256sum | cut -c1-16) || die "sha256sum failed"
  part="$odir_/.pyvbak-restore-partial-$h"
fi
# The temporary directory is named after this machine and pid namespace (a scope: a TMPDIR
# on a share is seen by other hosts, and the initial pid namespace is alike on all of
# them) and this process, so that one a restore.sh killed with SIGKILL left (no trap runs
# then: block lists and decompressed blocks, GiB for a large disk) is recognised and
# removed by the next run of the same scope, here - only where /proc shows this pid
# namespace's processes (not so under 'unshare -p' without its own /proc).
scope=
ns=$(readlink /proc/self/ns/pid 2>/dev/null) || ns=
if [ -n "$ns" ] && [ "$(readlink "/proc/$$/ns/pid" 2>/dev/null)" = "$ns" ]; then
  mid=$(head -n 1 /etc/machine-id 2>/dev/null) || mid=
  # no machine id (Alpine, a rescue shell): this boot's id tells hosts apart (a directory
  # from before a reboot is then left alone: safe, not tidy)
  [ -n "$mid" ] || mid=$(head -n 1 /proc/sys/kernel/random/boot_id 2>/dev/null) || mid=
  hn=$(head -n 1 /proc/sys/kernel/hostname 2>/dev/null) || hn=
  scope=$(printf '%s|%s|%s' "$mid" "$hn" "$ns" | sha256sum | cut -c1-8) || scope=
  case $scope in *[!0-9a-f]*) scope= ;; ????????) ;; *) scope= ;; esac  # 8 hex digits or none
fi
if [ -n "$scope" ]; then
  for d in "${TMPDIR:-/tmp}/pyvbak-restore.$scope."*; do
    [ -d "$d" ] || continue
    pid=${d#"${TMPDIR:-/tmp}/pyvbak-restore.$scope."}
    pid=${pid%%.*}
    case $pid in '' | *[!0-9]*) continue ;; esac
    [ -d "/proc/$pid" ] || rm -rf "$d" 2>/dev/null || :
  done
fi
# (after that sweep: a restore killed with SIGKILL leaves both, and the next run, which
# stops here, removed its GiB of temporary files only once the partial file was gone)
if [ -z "$device" ] && { [ -e "$part" ] || [ -L "$part" ]; }; then
  die "$part exists (left by an interrupted restore, or another restore is writing it): remove it first"
fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/pyvbak-restore.${scope:-x}.$$.XXXXXX") || die "cannot make a temporary directory in ${TMPDIR:-/tmp} (set TMPDIR to a writable directory)"
made_part=
cleanup() {
  rm -rf "$tmp"
  [ -z "$made_part" ] || rm -f "$part"
}
interrupted() {
  if [ -n "$writing" ]; then
    printf '%s\n' "restore.sh: error: interrupted by SIG$1: $out now holds an INCOMPLETE restore: do not use it" >&2
  else
    printf '%s\n' "restore.sh: error: interrupted by SIG$1: nothing restored, $out left as it was" >&2
  fi
  writing=
  exit "$2"
}
trap cleanup EXIT
trap 'interrupted HUP 129' HUP
trap 'interrupted INT 130' INT
trap 'interrupted TERM 143' TERM

# 0. Which snapshot.  Its metadata snapshots/ID.json makes it exist (an index without it
# is an interrupted backup's).  pyvbak writes the metadata with json.dumps(indent=2):
# one "key": value per line, top-level keys indented by two spaces.
json_field() {  # FILE KEY: the string value of a top-level key (empty if none)
  grep "^  \"$2\": \"" "$1" > "$tmp/field" || :
  head -n 1 "$tmp/field" | cut -d'"' -f4
}
json_sequence() {  # FILE: its "sequence", zero-padded to 18 digits (0 if none; "bad" if not one)
  grep "^  \"sequence\": " "$1" > "$tmp/field" || :
  q=$(head -n 1 "$tmp/field" | cut -d: -f2 | tr -d ' ,') || return 1
  case $q in '') q=0 ;; *[!0-9]*) echo bad; return 0 ;; esac
  [ "${#q}" -le 18 ] || { echo bad; return 0; }
  q="000000000000000000$q"
  echo "${q#"${q%??????????????????}"}"
}
# The repository's format version (config): this script reads version 1; a newer pyvbak
# writes a newer restore.sh beside a newer format.
[ -r "$repo/config" ] || die "cannot read $repo/config: is this a pyvbak repository (and may this user read it)?"
grep '^  "version": ' "$repo/config" > "$tmp/field" || :
v=$(head -n 1 "$tmp/field" | cut -d: -f2 | tr -d ' ,') || die "cannot read the format version in $repo/config"
[ "$v" = 1 ] || die "$repo/config says repository format version ${v:-(none)}; this restore.sh reads version 1: use the restore.sh that pyvbak wrote for that version"
case $snap in
  *@latest)
    target=${snap%@latest}
    vm=${target%%/*}
    want_disk=
    case $target in */*) want_disk=${target#*/} ;; esac
    [ -n "$vm" ] || die "$usage"
    : > "$tmp/cands"
    : > "$tmp/unreadable"
    for f in "$repo"/snapshots/*.json; do
      [ -f "$f" ] || continue
      id=${f##*/}
      # pyvbak writes only complete snapshots: metadata without its vm, disk, time and
      # status lines, or with an index_sha256 that is no SHA-256, is damaged, and may be
      # this VM's newest (checked once the latest is chosen)
      { grep -q '^  "vm": "' "$f" && grep -Fqx -e '  "status": "complete",' "$f" \
          && grep -q '^  "disk": "' "$f" && grep -q '^  "time": "' "$f" \
          && { ! grep -q '^  "index_sha256": ' "$f" || grep -Eq '^  "index_sha256": "[0-9a-f]{64}",?$' "$f"; }; } \
        || { printf '%s\n' "${id%.json}" >> "$tmp/unreadable"; continue; }
      grep -Fqx -e "  \"vm\": \"$vm\"," "$f" || continue
      grep -Fqx -e '  "status": "complete",' "$f" || continue
      d=$(json_field "$f" disk) || die "cannot read $f"
      [ -z "$want_disk" ] || [ "$d" = "$want_disk" ] || continue
      t=$(json_field "$f" time) || die "cannot read $f"
      # ordered by sequence number, then time (the clock that dated them may have gone
      # back, or run ahead, between two backups): as pyvbak orders them
      q=$(json_sequence "$f") || die "cannot read $f"
      if [ "$q" = bad ]; then printf '%s\n' "${id%.json}" >> "$tmp/unreadable"; continue; fi
      printf '%s\n' "$q $t ${id%.json} $d" >> "$tmp/cands"
    done
    [ -s "$tmp/cands" ] || die "no snapshot of $target in $repo (names with quotes, backslashes or non-ASCII characters: give the snapshot id; list them with: grep -l '\"vm\": \"NAME\"' $repo/snapshots/*.json)"
    zero=000000000000000000
    if grep -q "^$zero " "$tmp/cands" && grep -q -v "^$zero " "$tmp/cands"; then
      # snapshots an older pyvbak made (no sequence) among numbered ones: each comes after
      # the numbered ones made before it by time, as pyvbak places them
      sort -k2,2 -k3,3 "$tmp/cands" > "$tmp/cands.t" || die "sort failed (is ${TMPDIR:-/tmp} full?)"  # time, then id
      run=$zero
      : > "$tmp/cands"
      while read -r q t rest; do
        if [ "$q" = "$zero" ]; then q=$run; elif [ "$q" -gt "$run" ]; then run=$q; fi
        printf '%s\n' "$q $t $rest" >> "$tmp/cands"
      done < "$tmp/cands.t"
    fi
    sort "$tmp/cands" > "$tmp/cands.sorted" || die "sort failed (is ${TMPDIR:-/tmp} full?)"
    if [ -z "$want_disk" ]; then
      cut -d' ' -f4- "$tmp/cands.sorted" > "$tmp/disks" && sort -u "$tmp/disks" > "$tmp/disks.u" || die "cut failed"
      [ "$(wc -l < "$tmp/disks.u")" -eq 1 ] \
        || die "VM $vm has several disks ($(tr '\n' ' ' < "$tmp/disks.u")): restore one at a time with $vm/DISK@latest"
    fi
    line=$(tail -n 1 "$tmp/cands.sorted") || die "tail failed"
    snap=$(printf '%s\n' "$line" | cut -d' ' -f3) || die "cut failed"
    # A damaged one may be this VM's newest: its VM and sequence cannot be read, and the
    # time in its id says nothing once a clock went back between two backups.
    if [ -s "$tmp/unreadable" ]; then
      newest=$(sort "$tmp/unreadable" | tail -n 1) || die "sort failed (is ${TMPDIR:-/tmp} full?)"
      die "snapshot metadata snapshots/$newest.json cannot be read (damaged?) and may be newer than $snap, the newest readable snapshot of $target; give a snapshot id to restore an older one ($snap)"
    fi
    ;;
  '' | *[!0-9A-Za-z-]*)
    die "'$snap' is not a snapshot id, prefix or VM[/DISK]@latest: the ids are the names of the *.json files in $repo/snapshots/"
    ;;
  *)
    if [ ! -f "$repo/snapshots/$snap.json" ]; then
      [ ! -f "$repo/snapshots/$snap.index" ] \
        || die "snapshot $snap is incomplete (an interrupted backup's index, no metadata): choose another"
      n=0
      for f in "$repo/snapshots/$snap"*.json; do
        [ -f "$f" ] || continue
        n=$((n + 1))
        id=${f##*/}
        match=${id%.json}
      done
      [ "$n" -gt 0 ] || die "no snapshot $snap in $repo (the ids are the names of the *.json files in $repo/snapshots/)"
      [ "$n" -eq 1 ] || die "snapshot id prefix $snap is ambiguous ($n snapshots): give more characters"
      snap=$match
    fi
    ;;
esac
meta="$repo/snapshots/$snap.json"
index="$repo/snapshots/$snap.index"
[ -f "$index" ] || die "the index of snapshot $snap ($index) is missing: the repository is damaged, restore another snapshot"
# The fields read from here on, whatever the JSON's layout: white space taken out.
[ -r "$meta" ] || die "permission denied reading $meta: check its ownership and permissions"
tr -d ' \n\r\t' < "$meta" > "$tmp/meta" || die "cannot read $meta"
grep -q '"status":"complete"' "$tmp/meta" \
  || die "snapshot $snap is not complete or its metadata is damaged ($meta has no \"status\": \"complete\"): choose another"
# The metadata names its index by SHA-256 (index_sha256; older snapshots have none): an
# index copied over another's would restore the other snapshot's disk.
rc=0; grep -o '"index_sha256":"[0-9a-f]*"' "$tmp/meta" > "$tmp/field" || rc=$?
[ "$rc" -le 1 ] || die "grep failed on $meta"
want=$(cut -d'"' -f4 "$tmp/field") || die "cut failed on $meta"
if [ "${#want}" -ne 64 ] && grep -q '"index_sha256"' "$tmp/meta"; then
  die "snapshot metadata $meta is damaged (its index_sha256 is not a SHA-256): choose another snapshot"
fi
if [ -n "$want" ]; then
  # from stdin: GNU sha256sum escapes a name with a backslash or newline and starts
  # its line with '\', which no digest equals
  sha256sum < "$index" > "$tmp/sum" || die "sha256sum failed on $index"
  read -r got rest < "$tmp/sum"
  [ "$got" = "$want" ] || die "$index is not the index snapshot $snap's metadata names (replaced or damaged)"
fi

# 1. The snapshot index: a 48-byte header, then one 48-byte record per block:
#    sha256(32) fast_hash(16).  An all-zero digest marks a zero block.
zstd -dcq "$index" > "$tmp/index.bin" 2>/dev/null || die "$index cannot be decompressed: the repository is damaged, restore another snapshot"
ilen=$(wc -c < "$tmp/index.bin") || die "wc failed on $index"
[ "$ilen" -ge 48 ] && [ $((ilen % 48)) -eq 0 ] || die "$index is damaged: $ilen bytes, not 48-byte records"
od -An -v -tx1 -w48 "$tmp/index.bin" > "$tmp/index.od" || die "od failed on $index"
tr -d ' ' < "$tmp/index.od" > "$tmp/index.hex" || die "tr failed on $index"
rm -f "$tmp/index.bin" "$tmp/index.od"
header=$(head -n 1 "$tmp/index.hex") || die "head failed on $index"
[ "${#header}" -eq 96 ] && [ "$(echo "$header" | cut -c1-16)" = "29388ea2738fa92c" ] \
  || die "$index is not a pyvbak snapshot index (damaged)"
[ "$((0x$(echo "$header" | cut -c17-24)))" -eq 1 ] || die "$index has an unsupported version: restore it with a newer pyvbak"
bs=$((0x$(echo "$header" | cut -c25-32)))
size=$((0x$(echo "$header" | cut -c33-48)))
count=$((0x$(echo "$header" | cut -c49-64)))
[ "$bs" -gt 0 ] && [ "$size" -ge 0 ] && [ "$count" -eq $(( (size + bs - 1) / bs )) ] \
  || die "$index is damaged: $count records for a $size-byte disk of $bs-byte blocks"
# the top-level keys only (two spaces in): a hot snapshot's change_tracking state holds a
# "size" of its own, and every "size" run together was no size at all
grep '^  "size": [0-9]' "$meta" > "$tmp/msize" || :
grep '^  "block_size": [0-9]' "$meta" > "$tmp/mbs" || :
msize=$(head -n 1 "$tmp/msize" | tr -dc 0-9) && mbs=$(head -n 1 "$tmp/mbs" | tr -dc 0-9) || die "tr failed on $meta"
[ -z "$msize" ] || [ "$msize" = "$size" ] || die "$index is a $size-byte disk but $meta says $msize bytes: the repository is damaged"
[ -z "$mbs" ] || [ "$mbs" = "$bs" ] || die "$index has $bs-byte blocks but $meta says $mbs: the repository is damaged"
tail -n +2 "$tmp/index.hex" > "$tmp/records" || die "tail failed on $index"
rm -f "$tmp/index.hex"  # (files go as soon as they are read: $TMPDIR holds less)
[ "$(wc -l < "$tmp/records")" -eq "$count" ] || die "$index is damaged: it does not hold its $count block records"
zero=0000000000000000000000000000000000000000000000000000000000000000
# "digest blockno" for every non-zero block, sorted by digest.
cut -c1-64 "$tmp/records" > "$tmp/digests" || die "cut failed on $index"
rm -f "$tmp/records"
nl -ba -v0 -w1 -s' ' "$tmp/digests" > "$tmp/numbered" || die "nl failed on $index"
rm -f "$tmp/digests"
rc=0; grep -v " $zero\$" "$tmp/numbered" > "$tmp/nonzero" || rc=$?
[ "$rc" -le 1 ] || die "grep failed on $index (is ${TMPDIR:-/tmp} full?)"
{ cut -d' ' -f1 "$tmp/nonzero" > "$tmp/nz.n" && cut -d' ' -f2 "$tmp/nonzero" > "$tmp/nz.d" \
  && rm -f "$tmp/nonzero" && paste -d ' ' "$tmp/nz.d" "$tmp/nz.n" > "$tmp/unsorted"; } \
  || die "cannot list the blocks of $index (is ${TMPDIR:-/tmp} full?)"
rm -f "$tmp/nz.d" "$tmp/nz.n"
sort -k1,1 "$tmp/unsorted" > "$tmp/blocks" || die "sort failed (is ${TMPDIR:-/tmp} full?)"
if [ -n "$device" ]; then
  rc=0; grep " $zero\$" "$tmp/numbered" > "$tmp/zeros" || rc=$?
  [ "$rc" -le 1 ] || die "grep failed on $index (is ${TMPDIR:-/tmp} full?)"
  cut -d' ' -f1 "$tmp/zeros" > "$tmp/zero.n" || die "cut failed on $index"
fi
rm -f "$tmp/records" "$tmp/digests" "$tmp/numbered" "$tmp/unsorted" "$tmp/nonzero" "$tmp/nz.n" "$tmp/nz.d" "$tmp/zeros"

in_packs=1
# 2. Pack indexes: an 80-byte header (magic 692fe50019b13e63, version, count), then
#    80-byte records: sha256(32) pack_id(32) offset(u64) compressed_len(u32) uncompressed_len(u32).
#    Each is joined with the snapshot's blocks on its own: only the records this snapshot
#    needs are kept, not the whole repository's.  Every copy of a block is kept: one that
#    reads back damaged is replaced by another.
: > "$tmp/found"
denied() {  # FILE: it exists but this user may not read it - rights, not damage
  die "permission denied reading $1: check its ownership and permissions (run restore.sh as a user who can read the whole repository)"
}
for f in "$repo"/index/*; do
  [ -f "$f" ] || continue
  [ -r "$f" ] || denied "$f"
  # A damaged pack index is left out, as pyvbak does: if it named a block this snapshot
  # needs and no other index does, step 3 says that block is missing.
  if ! zstd -dcq "$f" > "$tmp/pi.bin" 2>/dev/null; then
    printf '%s\n' "restore.sh: warning: pack index $f cannot be decompressed: left out" >&2
    continue
  fi
  od -An -v -tx1 -w80 "$tmp/pi.bin" > "$tmp/pi.od" || die "od failed on $f"
  tr -d ' ' < "$tmp/pi.od" > "$tmp/pi.hex" || die "tr failed on $f"
  h=$(head -n 1 "$tmp/pi.hex") || die "head failed on $f"
  tail -n +2 "$tmp/pi.hex" > "$tmp/pi.rec" || die "tail failed on $f"
  plen=$(wc -c < "$tmp/pi.bin") || die "wc failed on $f"
  if [ "$(echo "$h" | cut -c1-24)" != "692fe50019b13e6300000001" ] || [ $((plen % 80)) -ne 0 ] \
     || [ "$((0x$(echo "$h" | cut -c25-40)))" -ne "$(wc -l < "$tmp/pi.rec")" ]; then
    printf '%s\n' "restore.sh: warning: pack index $f is damaged or not a pyvbak v1 pack index: left out" >&2
    continue
  fi
  # "digest pack offset length" (cut and paste: busybox cut has no --output-delimiter)
  { cut -c1-64 "$tmp/pi.rec" > "$tmp/c1" && cut -c65-128 "$tmp/pi.rec" > "$tmp/c2" \
    && cut -c129-144 "$tmp/pi.rec" > "$tmp/c3" && cut -c145-152 "$tmp/pi.rec" > "$tmp/c4"; } \
    || die "cut failed on $f (is ${TMPDIR:-/tmp} full?)"
  paste -d ' ' "$tmp/c1" "$tmp/c2" "$tmp/c3" "$tmp/c4" > "$tmp/where.unsorted" || die "paste failed on $f"
  sort -k1,1 "$tmp/where.unsorted" > "$tmp/where" || die "sort failed (is ${TMPDIR:-/tmp} full?)"
  join "$tmp/blocks" "$tmp/where" >> "$tmp/found" || die "join failed on $f (is ${TMPDIR:-/tmp} full?)"
done
rm -f "$tmp/pi.bin" "$tmp/pi.od" "$tmp/pi.hex" "$tmp/pi.rec" "$tmp/c1" "$tmp/c2" "$tmp/c3" "$tmp/c4" \
  "$tmp/where.unsorted" "$tmp/where"

# 3. Every block must be somewhere: "digest blockno pack offset length", one line per copy.
cut -d' ' -f2 "$tmp/found" > "$tmp/found.n" && sort -u "$tmp/found.n" > "$tmp/found.u" || die "sort failed (is ${TMPDIR:-/tmp} full?)"
wanted=$(wc -l < "$tmp/blocks")
found=$(wc -l < "$tmp/found.u")
[ "$found" -eq "$wanted" ] \
  || die "$((wanted - found)) block(s) of snapshot $snap are missing from the repository (no pack index names them): run 'pyvbak verify', or restore another snapshot"
# The plan: one copy of every block, in pack order (sequential reads, and runs of frames
# that are consecutive both in a pack and on the disk: a full backup stores them so).
sort -u -k2,2 "$tmp/found" > "$tmp/primary" && rm -f "$tmp/blocks" "$tmp/found.n" \
  && sort -k3,3 -k4,4 "$tmp/primary" > "$tmp/plan" || die "sort failed (is ${TMPDIR:-/tmp} full?)"
rm -f "$tmp/found.n" "$tmp/primary" "$tmp/blocks"

# 4. Write every non-zero block at its place; zero blocks stay holes of the truncated file
#    (on a block device they are written as zeros).
if [ -n "$device" ]; then
  dst=$out
  dev=${out##*/}
  if [ -r "/sys/class/block/$dev/size" ]; then
    read -r sectors < "/sys/class/block/$dev/size" || sectors=
    [ -z "$sectors" ] || [ $((sectors * 512)) -ge "$size" ] \
      || die "$out holds $((sectors * 512)) bytes, the snapshot $size: choose a larger device"
  fi
else
  dst=$part
  ( set -C; : > "$part" ) 2>/dev/null \
    || die "cannot create $part: does its directory exist, is it writable (or did another restore just create it)?"
  made_part=1
  truncate -s "$size" "$part" 2>"$tmp/err" || die "cannot make $part $size bytes long: $(tail -n 1 "$tmp/err")"
fi
writing=$device
: > "$tmp/done"
: > "$tmp/failed"

# One block: read its frame, decompress it, check its SHA-256, write it; a copy that does
# not read back good is noted in failed (another copy is tried after the first pass).
# A frame that several blocks share (identical blocks) is read and checked once.
last_good=
block() {  # DIGEST BLOCKNO PACK OFFSET_HEX CLEN_HEX
  if [ "$3 $4" != "$last_good" ]; then
    last_good=
    check_frame "$@" || return 0
    last_good="$3 $4"
  fi
  dd if="$tmp/block" of="$dst" bs="$bs" seek="$2" conv=notrunc status=none 2>"$tmp/err" \
    || die "cannot write block $2 to $dst: $(tail -n 1 "$tmp/err")"
  echo "$2" >> "$tmp/done"
}
check_frame() {  # as block: the frame decompressed to $tmp/block and checked, or 1
  pack="$repo/packs/${3%"${3#??}"}/$3"
  if [ ! -f "$pack" ]; then
    echo "$2 is in pack $3, which is missing" >> "$tmp/failed"
    return 1
  fi
  [ -r "$pack" ] || denied "$pack"
  if ! dd if="$pack" iflag=skip_bytes,count_bytes skip=$((0x$4)) count=$((0x$5)) bs=1M status=none \
      > "$tmp/frame" 2>/dev/null; then
    echo "$2 cannot be read from pack $3" >> "$tmp/failed"
    return 1
  fi
  # at most one byte more than a block: a frame that decompresses to gigabytes (a damaged
  # or hostile pack) must not fill $TMPDIR; whatever went wrong, the SHA-256 below says so
  zstd -dcq < "$tmp/frame" 2>/dev/null | head -c "$((bs + 1))" > "$tmp/block" \
    || die "head failed writing $tmp/block (is ${TMPDIR:-/tmp} full?)"
  sha256sum < "$tmp/block" > "$tmp/sum" || die "sha256sum failed (is ${TMPDIR:-/tmp} full?)"
  read -r got rest < "$tmp/sum"
  if [ "$got" != "$1" ]; then
    echo "$2 does not match its digest in pack $3 at offset $((0x$4))" >> "$tmp/failed"
    return 1
  fi
}

# A run of frames consecutive in one pack that are consecutive blocks of the disk: one dd,
# one zstd, one split and one sha256sum for all of them (a process per block is what
# restores spend their time on).  Any failure: each block of the run on its own.
# (No `local` in POSIX sh: the functions' variables are named apart from the loop's.)
run_pack=; run_n=0; run_k=0; run_off=0; run_end=-1
max_k=$((16777216 / bs)); [ "$max_k" -ge 1 ] || max_k=1
command -v split >/dev/null 2>&1 || max_k=1  # (busybox has no split: one block at a time)
: > "$tmp/run.lines"; : > "$tmp/run.want"
flush_run() {
  [ "$run_k" -gt 0 ] || return 0
  if [ "$run_k" -eq 1 ]; then
    read -r f_d f_n f_p f_o f_c < "$tmp/run.lines"
    block "$f_d" "$f_n" "$f_p" "$f_o" "$f_c"
  else
    if run_ok; then
      dd if="$tmp/run" of="$dst" bs="$bs" seek="$run_n" conv=notrunc status=none 2>"$tmp/err" \
        || die "cannot write blocks $run_n to $((run_n + run_k - 1)) to $dst: $(tail -n 1 "$tmp/err")"
      cut -d' ' -f2 "$tmp/run.lines" >> "$tmp/done" || die "cut failed (is ${TMPDIR:-/tmp} full?)"
    else
      while read -r f_d f_n f_p f_o f_c; do block "$f_d" "$f_n" "$f_p" "$f_o" "$f_c"; done < "$tmp/run.lines"
    fi
    rm -f "$tmp/run" "$tmp/frames" "$tmp"/blk.*
  fi
  : > "$tmp/run.lines"; : > "$tmp/run.want"
  run_k=0
}
run_ok() {  # the run decompressed to $tmp/run, every block of it matching its digest
  pack="$repo/packs/${run_pack%"${run_pack#??}"}/$run_pack"
  [ -f "$pack" ] || return 1
  [ -r "$pack" ] || denied "$pack"
  dd if="$pack" iflag=skip_bytes,count_bytes skip="$run_off" count=$((run_end - run_off)) bs=1M status=none \
    > "$tmp/frames" 2>/dev/null || return 1
  # (capped like check_frame's: a frame that failed to decompress leaves less, caught below)
  zstd -dcq < "$tmp/frames" 2>/dev/null | head -c "$((run_k * bs + 1))" > "$tmp/run" || return 1
  [ -s "$tmp/run" ] || return 1
  split -b "$bs" "$tmp/run" "$tmp/blk." 2>/dev/null || return 1
  (cd "$tmp" && sha256sum blk.*) > "$tmp/sums" 2>/dev/null || return 1  # names without escapes
  cut -c1-64 "$tmp/sums" > "$tmp/got" && paste -d ' ' "$tmp/got" "$tmp/run.want" > "$tmp/both" || return 1
  [ "$(wc -l < "$tmp/both")" -eq "$run_k" ] || return 1
  rc=0; grep -c -v '^\([0-9a-f]\{64\}\) \1$' "$tmp/both" > "$tmp/bad" || rc=$?
  [ "$rc" -eq 1 ]  # grep -v selected nothing: every line is "digest digest"
}
while read -r d n p o c; do
  off=$((0x$o))
  if [ "$p" != "$run_pack" ] || [ "$off" -ne "$run_end" ] || [ "$n" -ne $((run_n + run_k)) ] \
     || [ "$run_k" -ge "$max_k" ]; then
    flush_run
    run_pack=$p; run_n=$n; run_off=$off
  fi
  run_end=$((off + 0x$c))
  run_k=$((run_k + 1))
  echo "$d $n $p $o $c" >> "$tmp/run.lines"
  echo "$d" >> "$tmp/run.want"
done < "$tmp/plan"
flush_run
# Blocks whose copy did not read back good: every other copy of them.
sort -u "$tmp/done" > "$tmp/done.u" || die "sort failed (is ${TMPDIR:-/tmp} full?)"
if [ "$(wc -l < "$tmp/done.u")" -ne "$wanted" ]; then
  join -v 1 "$tmp/found.u" "$tmp/done.u" > "$tmp/todo" && sort -k2,2 "$tmp/found" > "$tmp/found.byn" \
    && join -1 2 -2 1 "$tmp/found.byn" "$tmp/todo" > "$tmp/retry" || die "join failed"
  while read -r n d p o c; do block "$d" "$n" "$p" "$o" "$c"; done < "$tmp/retry"
  sort -u "$tmp/done" > "$tmp/done.u" || die "sort failed (is ${TMPDIR:-/tmp} full?)"
fi
written=$(wc -l < "$tmp/done.u")
if [ "$written" -ne "$wanted" ]; then
  sort -k1,1 "$tmp/failed" > "$tmp/failed.s" && join -v 1 "$tmp/failed.s" "$tmp/done.u" > "$tmp/lost" || die "join failed"
  first=$(head -n 1 "$tmp/lost") || die "head failed"
  die "block $first, and no other copy of it reads back good: the repository is damaged ($((wanted - written)) block(s) of snapshot $snap lost; run 'pyvbak verify', or restore another snapshot)"
fi
if [ -n "$device" ]; then
  # Zero blocks, in runs of consecutive blocks: one dd per run.
  start=-1; prev=-2
  flush() {
    [ "$start" -ge 0 ] || return 0
    end=$(( (prev + 1) * bs )); [ "$end" -le "$size" ] || end=$size
    dd if=/dev/zero of="$dst" bs="$bs" seek="$start" count=$((end - start * bs)) iflag=count_bytes \
      conv=notrunc status=none 2>"$tmp/err" || die "cannot write zeros at block $start of $dst: $(tail -n 1 "$tmp/err")"
  }
  while read -r z; do
    if [ "$z" -ne $((prev + 1)) ]; then flush; start=$z; fi
    prev=$z
  done < "$tmp/zero.n"
  flush
else
  [ "$(wc -c < "$part")" -eq "$size" ] || die "$part is not $size bytes after the restore"
fi
sync  # the restored data is on disk before it gets its final name
if [ -z "$device" ]; then
  if [ -n "$force" ]; then
    mv -f "$part" "$out" || die "cannot rename $part to $out"
  elif ln "$part" "$out" 2>/dev/null; then
    rm -f "$part"
  else
    # ln refuses an OUTPUT made meanwhile, and also file systems without hard links.
    [ ! -e "$out" ] && [ ! -L "$out" ] || die "$out was created by something else during the restore: left alone"
    mv "$part" "$out" || die "cannot rename $part to $out"
  fi
  made_part=
  sync  # and the rename too
fi
writing=
printf '%s\n' "restored snapshot $snap ($size bytes) to $out"
