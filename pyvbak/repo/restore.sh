#!/bin/sh
# restore.sh - restore a pyvbak snapshot WITHOUT pyvbak.
# Needs only a POSIX sh (dash, bash, busybox sh), coreutils (GNU or busybox, plus `join`;
# `split` if there), grep and zstd.  Usage, from anywhere:
#     sh /path/to/REPO/restore.sh [--force] SNAPSHOT OUTPUT
# SNAPSHOT: a snapshot id, a unique prefix of one, VM@latest or VM/DISK@latest.
# OUTPUT: a new file; an existing file or a block device only with --force.
# See README-RESTORE.txt beside this script and docs/FORMAT.md in the pyvbak sources.
# restore kit revision: 18  (backups replace an older revision's restore.sh and README-RESTORE.txt)
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
    printf '%s\n' "restore.sh: error: $*$hint (block device $out was partly overwritten: it holds an INCOMPLETE restore, restore it again before using it)" >&2
  else
    printf '%s\n' "restore.sh: error: $*$hint" >&2
  fi
  writing=
  exit 1
}
# A step that writes into $TMPDIR failed: one line naming TMPDIR (its tools' own messages
# went to ERRFILE, not the terminal: a nearly full TMPDIR printed several lines, and a
# write that failed there was taken for an unreadable pack or a damaged index).
tmp_die() {  # MESSAGE [ERRFILE]: with the last line ERRFILE kept of the tool's error, if any
  t_why=
  [ -z "${2:-}" ] || t_why=$(tail -n 1 "$2" 2>/dev/null) || t_why=
  [ -z "$t_why" ] || t_why=": $t_why"
  die "$1$t_why (is ${TMPDIR:-/tmp} full? set TMPDIR to a directory with more room)"
}
# The size of FILE in bytes, from the fifth field of `ls -ln` (POSIX): busybox's `wc -c`
# counts in 32 bits (a 5 GiB file: 1073754169, a 4 GiB one: 0) and busybox sh runs its own
# wc applet before PATH's, so every restore of a disk of 4 GiB or more failed its last check.
size_of() {  # FILE
  so_line=$(ls -ln -- "$1") || return 1
  so_size=$(set -f; set -- $so_line; [ $# -ge 5 ] && printf '%s' "$5") || return 1
  case $so_size in ''|*[!0-9]*) return 1 ;; esac
  printf '%s\n' "$so_size"
}
usage="usage: sh restore.sh [--force] SNAPSHOT OUTPUT (SNAPSHOT: an id from snapshots/, a unique prefix of one, VM@latest or VM/DISK@latest)"

force=
# --force SNAPSHOT: it is OUTPUT that is missing (this was called "--force goes before SNAPSHOT")
if [ $# -eq 2 ] && [ "$1" = "--force" ]; then die "OUTPUT is missing: $usage"; fi
if [ $# -eq 3 ] && [ "$1" = "--force" ]; then force=1; shift; fi
[ $# -eq 2 ] || die "$usage"
snap=$1
out=$2
[ -n "$out" ] || die "$usage"
# --force goes first: after SNAPSHOT it was taken for the OUTPUT name (a file ./--force)
[ "$snap" != --force ] && [ "$out" != --force ] || die "--force goes before SNAPSHOT: $usage"
case $out in -*) out=./$out ;; esac  # a name no tool takes for an option
missing_tools=
for t in zstd od tr head tail cut nl sort join paste wc ls dd sha256sum mktemp truncate mv ln rm dirname readlink sync grep; do
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
sysdir=
if [ -b "$out" ]; then
  [ -n "$force" ] || die "$out is a block device: pass --force to overwrite it with the snapshot"
  device=1
  # The device is told by its number, not its name: a mounted device named by another node
  # (a link such as /dev/disk/by-id/..., a node made with mknod outside /dev, the kernel's
  # /dev/root in /proc/mounts) was overwritten while mounted.  stat -L gives its major and
  # minor (hex; GNU and busybox stat), /sys/dev/block/MAJ:MIN its sysfs directory (size,
  # holders, partitions) whatever the node is called.
  rdev=$(readlink -f -- "$out") || rdev=$out
  # (stat is needed here: by name alone a mounted device named by another node was missed)
  command -v stat >/dev/null 2>&1 || die "stat (coreutils) is needed to restore onto a block device: install it"
  devnum=
  mm=$(stat -L -c '%t %T' "$out" 2>/dev/null) || mm=
  mj=${mm%% *}; mn=${mm#* }
  case $mm/$mj/$mn in
    *' '*/*/* ) case $mj/$mn in ?*/?*) case $mj$mn in *[!0-9a-f]*) ;; *) devnum=$((0x$mj)):$((0x$mn)) ;; esac ;; esac ;;
  esac
  if [ -n "$devnum" ] && [ -d "/sys/dev/block/$devnum" ]; then
    sysdir=$(cd -P "/sys/dev/block/$devnum" 2>/dev/null && pwd) || sysdir=
  fi
  if [ -z "$sysdir" ]; then
    # no stat -c or no /sys/dev/block: by name, only for a node directly in /dev (one made
    # elsewhere with mknod may carry another device's name): without one, step 4 measures
    # the size by reading
    case $rdev in
      /dev/*/*) ;;
      /dev/?*) [ ! -d "/sys/class/block/${rdev#/dev/}" ] || sysdir=/sys/class/block/${rdev#/dev/} ;;
    esac
  fi
  # Not while device mapper, md RAID, LVM or bcache is built on it or on one of its
  # partitions (pyvbak's O_EXCL open refuses those; sh cannot open O_EXCL, but sysfs
  # lists them as holders)
  if [ -n "$sysdir" ]; then
    for h in "$sysdir"/holders/* "$sysdir"/*/holders/*; do  # (only partitions have holders/ among its subdirectories)
      [ -e "$h" ] || [ -L "$h" ] || continue
      hd=${h%/holders/*}
      what=$out
      [ "$hd" = "$sysdir" ] || what="$out (its partition /dev/${hd##*/})"
      die "$what is held by ${h##*/}: device mapper, LVM, RAID or bcache is built on it; release it first (dmsetup remove, vgchange -an, mdadm --stop...)"
    done
  fi
  # Not while it or one of its partitions is mounted (Linux).  By number: field 3 (MAJ:MIN)
  # of /proc/self/mountinfo against the device's and its partitions' (their sysfs dev
  # files).  And by name, in /proc/mounts (where there is no mountinfo or no number, and for
  # file systems such as btrfs whose mountinfo shows a number of their own): the device's
  # name (a link resolved) and its partitions' - exact names: /dev/loop70 mounted says
  # nothing about /dev/loop7
  if [ -n "$devnum" ] && [ -r /proc/self/mountinfo ]; then
    nums=" $devnum "
    if [ -n "$sysdir" ]; then
      for p in "$sysdir"/*/partition; do
        [ -f "$p" ] || continue
        p=${p%/partition}
        pn=
        [ ! -r "$p/dev" ] || read -r pn < "$p/dev" || pn=
        [ -z "$pn" ] || nums="$nums$pn "
      done
    fi
    while read -r m_id m_parent m_num m_root m_point m_rest; do
      case $nums in
        *" $m_num "*)
          what=$out
          [ "$m_num" = "$devnum" ] || what="$out (its partition, device $m_num)"
          # (mountinfo escapes a space, tab, newline and backslash as \040 \011 \012 \134)
          m_point=$(printf '%b' "$m_point") || :
          die "$what is mounted (on $m_point): unmount it before restoring onto $out" ;;
      esac
    done < /proc/self/mountinfo
  fi
  # btrfs shows a number of its own in mountinfo and one device name in /proc/mounts, for
  # a file system that may span several devices: its sysfs lists every device it is on
  # (a mounted btrfs named by another node, or its second device, was overwritten)
  if [ -n "$sysdir" ]; then
    for b in /sys/fs/btrfs/*/devices/*; do
      [ -e "$b" ] || continue
      bd=$(cd -P "$b" 2>/dev/null && pwd) || continue
      case $bd in
        "$sysdir" | "$sysdir"/*)
          fsid=${b#/sys/fs/btrfs/}
          die "$out is part of the mounted btrfs file system ${fsid%%/*}: unmount it before restoring onto $out" ;;
      esac
    done
  fi
  # Without /proc (a rescue chroot) nothing above could tell whether it is mounted:
  # refused rather than assumed free
  if [ ! -r /proc/self/mountinfo ] && [ ! -r /proc/mounts ]; then
    die "cannot tell whether $out is mounted (/proc is not mounted here): mount /proc (mount -t proc proc /proc) and retry"
  fi
  if [ -r /proc/mounts ]; then
    names=" $out $rdev "
    pdir=$sysdir
    [ -n "$pdir" ] || pdir=/sys/class/block/${rdev##*/}
    for p in "$pdir"/*/partition; do
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
# The longest name the output's file system takes (NAME_MAX: 255 bytes, or what getconf,
# where there, says for that directory; LC_ALL=C counts bytes): a longer OUTPUT name was
# refused only by the final rename, once the whole disk had been restored
nmax=
[ -z "$odir" ] || nmax=$(getconf NAME_MAX "$odir" 2>/dev/null) || nmax=
case $nmax in '' | *[!0-9]*) nmax=255 ;; esac
if [ -z "$device" ] && [ "${#base}" -gt "$nmax" ]; then
  die "the name of $out is ${#base} bytes long, longer than its file system takes ($nmax bytes): choose a shorter name"
fi
if [ $((${#base} + 24)) -gt "$nmax" ]; then  # the suffix would pass NAME_MAX
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
# Both handlers clean up, and first ignore further signals: a signal's trap that ran while
# the EXIT trap was running exited the shell from inside it, and the partial file stayed
# (the retry then refused to start: 1 Ctrl-C in 40).  Idempotent.
cleanup() {
  trap '' HUP INT TERM
  rm -rf "$tmp"
  if [ "$made_part" = 1 ]; then
    rm -f "$part"
  elif [ "$made_part" = maybe ] && [ -f "$part" ] && [ ! -L "$part" ] && [ ! -s "$part" ]; then
    rm -f "$part"  # (see its creation below)
  fi
}
renaming=
in_place=
restored_in_place() {  # whether OUTPUT is the restored file already (renamed or linked)
  [ -n "$in_place" ] && return 0
  [ -n "$renaming" ] || return 1
  { [ ! -e "$part" ] && [ ! -L "$part" ]; } && return 0  # (mv done)
  [ "$out" -ef "$part" ] 2>/dev/null  # (ln done)
}
interrupted() {
  trap '' HUP INT TERM
  if restored_in_place; then
    # (else "nothing restored, left as it was" would be said of an OUTPUT already replaced)
    printf '%s\n' "restore.sh: error: interrupted by SIG$1 after the restore was complete: $out holds snapshot $snap (run sync to be sure it is on disk)" >&2
  elif [ -n "$writing" ]; then
    printf '%s\n' "restore.sh: error: interrupted by SIG$1: block device $out was partly overwritten: it holds an INCOMPLETE restore, restore it again before using it" >&2
  else
    printf '%s\n' "restore.sh: error: interrupted by SIG$1: nothing restored, $out left as it was" >&2
  fi
  writing=
  cleanup
  exit "$2"
}
trap cleanup EXIT
trap 'interrupted HUP 129' HUP
trap 'interrupted INT 130' INT
trap 'interrupted TERM 143' TERM
if [ -z "$device" ]; then
  # made now, not after the work: an output directory that is missing or not writable is
  # said at once, not after hours of reading the repository
  # A signal as the file is made (it reaches the subshell too) runs the trap before
  # made_part=1: the partial file stayed, and the retry refused to start.  "maybe": the
  # clean-up then removes it while it is still empty - it did not exist a moment ago (only
  # another restore of the same OUTPUT making it in that same instant would lose its file,
  # and then fail at its rename, not restore wrongly).
  made_part=maybe
  ( set -C; : > "$part" ) 2>/dev/null \
    || { made_part=; die "cannot create $part: does its directory exist, is it writable (or did another restore just create it)?"; }
  made_part=1
fi

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
# writes a newer restore.sh beside a newer format.  config.copy holds the same bytes: it
# is read when config is missing or says no version (a file lost or damaged alone).
config=$repo/config
if ! { [ -r "$config" ] && grep -q '^  "version": ' "$config"; } \
    && [ -r "$repo/config.copy" ] && grep -q '^  "version": ' "$repo/config.copy"; then
  config=$repo/config.copy
  echo "restore.sh: $repo/config is missing or damaged: reading its copy config.copy" >&2
fi
[ -r "$config" ] || die "cannot read $config: is this a pyvbak repository (and may this user read it)?"
grep '^  "version": ' "$config" > "$tmp/field" || :
v=$(head -n 1 "$tmp/field" | cut -d: -f2 | tr -d ' ,') || die "cannot read the format version in $config"
[ "$v" = 1 ] || die "$config says repository format version ${v:-(none)}; this restore.sh reads version 1: use the restore.sh that pyvbak wrote for that version"
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
      sort -k2,2 -k3,3 "$tmp/cands" > "$tmp/cands.t" 2>"$tmp/err" || tmp_die "sort failed" "$tmp/err"  # time, then id
      run=$zero
      : > "$tmp/cands"
      while read -r q t rest; do
        if [ "$q" = "$zero" ]; then q=$run; elif [ "$q" -gt "$run" ]; then run=$q; fi
        printf '%s\n' "$q $t $rest" >> "$tmp/cands"
      done < "$tmp/cands.t"
    fi
    sort "$tmp/cands" > "$tmp/cands.sorted" 2>"$tmp/err" || tmp_die "sort failed" "$tmp/err"
    if [ -z "$want_disk" ]; then
      cut -d' ' -f4- "$tmp/cands.sorted" > "$tmp/disks" && sort -u "$tmp/disks" > "$tmp/disks.u" || die "cut failed"
      ndisks=$(wc -l < "$tmp/disks.u") || die "wc failed"
      [ "$ndisks" -eq 1 ] \
        || die "VM $vm has several disks ($(paste -s -d ' ' "$tmp/disks.u")): restore one at a time with $vm/DISK@latest"
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
if ! zstd -dcq "$index" > "$tmp/index.bin" 2>"$tmp/err"; then
  # a TMPDIR too full for it is no damaged index: zstd -t reads it and writes nothing
  ! zstd -tq "$index" >/dev/null 2>&1 || tmp_die "cannot decompress $index into ${TMPDIR:-/tmp}" "$tmp/err"
  die "$index cannot be decompressed: the repository is damaged, restore another snapshot"
fi
ilen=$(size_of "$tmp/index.bin") || die "ls failed on $index"
[ "$ilen" -ge 48 ] && [ $((ilen % 48)) -eq 0 ] || die "$index is damaged: $ilen bytes, not 48-byte records"
od -An -v -tx1 -w48 "$tmp/index.bin" > "$tmp/index.od" 2>"$tmp/err" || tmp_die "od failed on $index" "$tmp/err"
tr -d ' ' < "$tmp/index.od" > "$tmp/index.hex" 2>"$tmp/err" || tmp_die "tr failed on $index" "$tmp/err"
rm -f "$tmp/index.bin" "$tmp/index.od"
header=$(head -n 1 "$tmp/index.hex") || die "head failed on $index"
[ "${#header}" -eq 96 ] && [ "$(echo "$header" | cut -c1-16)" = "29388ea2738fa92c" ] \
  || die "$index is not a pyvbak snapshot index (damaged)"
# (each field cut by a command of its own: a Ctrl-C that killed a cut inside the arithmetic
# left it "0x", a stray shell error line, before the signal's trap could run)
version=$(echo "$header" | cut -c17-24) && bsx=$(echo "$header" | cut -c25-32) \
  && sizex=$(echo "$header" | cut -c33-48) && countx=$(echo "$header" | cut -c49-64) || die "cut failed on $index"
[ "$((0x$version))" -eq 1 ] || die "$index has an unsupported version: restore it with a newer pyvbak"
bs=$((0x$bsx))
size=$((0x$sizex))
count=$((0x$countx))
[ "$bs" -gt 0 ] && [ "$size" -ge 0 ] && [ "$count" -eq $(( (size + bs - 1) / bs )) ] \
  || die "$index is damaged: $count records for a $size-byte disk of $bs-byte blocks"
# the top-level keys only (two spaces in): a hot snapshot's change_tracking state holds a
# "size" of its own, and every "size" run together was no size at all
grep '^  "size": [0-9]' "$meta" > "$tmp/msize" || :
grep '^  "block_size": [0-9]' "$meta" > "$tmp/mbs" || :
msize=$(head -n 1 "$tmp/msize" | tr -dc 0-9) && mbs=$(head -n 1 "$tmp/mbs" | tr -dc 0-9) || die "tr failed on $meta"
[ -z "$msize" ] || [ "$msize" = "$size" ] || die "$index is a $size-byte disk but $meta says $msize bytes: the repository is damaged"
[ -z "$mbs" ] || [ "$mbs" = "$bs" ] || die "$index has $bs-byte blocks but $meta says $mbs: the repository is damaged"
tail -n +2 "$tmp/index.hex" > "$tmp/records" 2>"$tmp/err" || tmp_die "tail failed on $index" "$tmp/err"
rm -f "$tmp/index.hex"  # (files go as soon as they are read: $TMPDIR holds less)
nrecords=$(wc -l < "$tmp/records") || die "wc failed on $index"
[ "$nrecords" -eq "$count" ] || die "$index is damaged: it does not hold its $count block records"
zero=0000000000000000000000000000000000000000000000000000000000000000
# Busybox's grep, cut, nl, paste and sort (the applets `busybox sh` runs before PATH) exit 0
# after a write that failed (ENOSPC: a TMPDIR full for a moment): a list cut short was taken
# for the whole disk, and its missing blocks left as holes.  So every list is counted
# against what it must hold.
# (Every number a command prints goes into a variable first, checked: a Ctrl-C kills the
# command too, and its empty output inside a [ test printed "[: Illegal number" before
# the signal's trap ran.)
lines_are() {  # FILE N: FILE holds N lines, or it was cut short in $TMPDIR
  la_n=$(wc -l < "$1") || die "wc failed on $1"
  [ "$la_n" -eq "$2" ] \
    || tmp_die "a list of blocks was cut short writing it into ${TMPDIR:-/tmp} (${1##*/}: $la_n lines, not $2)"
}
# "digest blockno" for every non-zero block, sorted by digest.
cut -c1-64 "$tmp/records" > "$tmp/digests" 2>"$tmp/err" || tmp_die "cut failed on $index" "$tmp/err"
lines_are "$tmp/digests" "$count"
rm -f "$tmp/records"
nl -ba -v0 -w1 -s' ' "$tmp/digests" > "$tmp/numbered" 2>"$tmp/err" || tmp_die "nl failed on $index" "$tmp/err"
lines_are "$tmp/numbered" "$count"
rm -f "$tmp/digests"
rc=0; grep -v " $zero\$" "$tmp/numbered" > "$tmp/nonzero" 2>"$tmp/err" || rc=$?
[ "$rc" -le 1 ] || tmp_die "grep failed on $index" "$tmp/err"
# the zero blocks counted into a variable (no file to cut short): with the non-zero ones,
# every record of the index
rc=0; zeros=$(grep -c " $zero\$" "$tmp/numbered" 2>"$tmp/err") || rc=$?
[ "$rc" -le 1 ] || tmp_die "grep failed on $index" "$tmp/err"
case $zeros in '' | *[!0-9]*) tmp_die "grep failed on $index" "$tmp/err" ;; esac
nonzero=$(wc -l < "$tmp/nonzero") || die "wc failed"
[ $((nonzero + zeros)) -eq "$count" ] \
  || tmp_die "a list of blocks was cut short writing it into ${TMPDIR:-/tmp} (nonzero: $nonzero lines and $zeros zero blocks, not $count)"
# (2> on each command, never on a { group }: a signal's trap run between the group's
# commands wrote its message there - into a file removed on exit, or /dev/null)
{ cut -d' ' -f1 "$tmp/nonzero" > "$tmp/nz.n" 2>"$tmp/err" && cut -d' ' -f2 "$tmp/nonzero" > "$tmp/nz.d" 2>"$tmp/err" \
  && rm -f "$tmp/nonzero" && paste -d ' ' "$tmp/nz.d" "$tmp/nz.n" > "$tmp/unsorted" 2>"$tmp/err"; } \
  || tmp_die "cannot list the blocks of $index" "$tmp/err"
lines_are "$tmp/nz.n" "$nonzero"; lines_are "$tmp/nz.d" "$nonzero"; lines_are "$tmp/unsorted" "$nonzero"
rm -f "$tmp/nz.d" "$tmp/nz.n"
sort -k1,1 "$tmp/unsorted" > "$tmp/blocks" 2>"$tmp/err" || tmp_die "sort failed" "$tmp/err"
lines_are "$tmp/blocks" "$nonzero"
if [ -n "$device" ]; then
  rc=0; grep " $zero\$" "$tmp/numbered" > "$tmp/zeros" 2>"$tmp/err" || rc=$?
  [ "$rc" -le 1 ] || tmp_die "grep failed on $index" "$tmp/err"
  lines_are "$tmp/zeros" "$zeros"
  cut -d' ' -f1 "$tmp/zeros" > "$tmp/zero.n" 2>"$tmp/err" || tmp_die "cut failed on $index" "$tmp/err"
  lines_are "$tmp/zero.n" "$zeros"
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
  if ! zstd -dcq "$f" > "$tmp/pi.bin" 2>"$tmp/err"; then
    ! zstd -tq "$f" >/dev/null 2>&1 || tmp_die "cannot decompress $f into ${TMPDIR:-/tmp}" "$tmp/err"
    printf '%s\n' "restore.sh: warning: pack index $f cannot be decompressed: left out" >&2
    continue
  fi
  od -An -v -tx1 -w80 "$tmp/pi.bin" > "$tmp/pi.od" 2>"$tmp/err" || tmp_die "od failed on $f" "$tmp/err"
  tr -d ' ' < "$tmp/pi.od" > "$tmp/pi.hex" 2>"$tmp/err" || tmp_die "tr failed on $f" "$tmp/err"
  h=$(head -n 1 "$tmp/pi.hex") || die "head failed on $f"
  tail -n +2 "$tmp/pi.hex" > "$tmp/pi.rec" 2>"$tmp/err" || tmp_die "tail failed on $f" "$tmp/err"
  plen=$(size_of "$tmp/pi.bin") || die "ls failed on $f"
  magic=$(echo "$h" | cut -c1-24) && nrec=$(echo "$h" | cut -c25-40) || die "cut failed on $f"  # (as for the header)
  pi_lines=$(wc -l < "$tmp/pi.rec") || die "wc failed on $f"
  if [ "$magic" != "692fe50019b13e6300000001" ] || [ $((plen % 80)) -ne 0 ] \
     || [ "$((0x$nrec))" -ne "$pi_lines" ]; then
    printf '%s\n' "restore.sh: warning: pack index $f is damaged or not a pyvbak v1 pack index: left out" >&2
    continue
  fi
  # "digest pack offset length" (cut and paste: busybox cut has no --output-delimiter)
  { cut -c1-64 "$tmp/pi.rec" > "$tmp/c1" 2>"$tmp/err" && cut -c65-128 "$tmp/pi.rec" > "$tmp/c2" 2>"$tmp/err" \
    && cut -c129-144 "$tmp/pi.rec" > "$tmp/c3" 2>"$tmp/err" && cut -c145-152 "$tmp/pi.rec" > "$tmp/c4" 2>"$tmp/err"; } \
    || tmp_die "cut failed on $f" "$tmp/err"
  nrec=$pi_lines
  for c in c1 c2 c3 c4; do lines_are "$tmp/$c" "$nrec"; done
  paste -d ' ' "$tmp/c1" "$tmp/c2" "$tmp/c3" "$tmp/c4" > "$tmp/where.unsorted" 2>"$tmp/err" || tmp_die "paste failed on $f" "$tmp/err"
  lines_are "$tmp/where.unsorted" "$nrec"
  sort -k1,1 "$tmp/where.unsorted" > "$tmp/where" 2>"$tmp/err" || tmp_die "sort failed" "$tmp/err"
  lines_are "$tmp/where" "$nrec"
  join "$tmp/blocks" "$tmp/where" >> "$tmp/found" 2>"$tmp/err" || tmp_die "join failed on $f" "$tmp/err"
done
rm -f "$tmp/pi.bin" "$tmp/pi.od" "$tmp/pi.hex" "$tmp/pi.rec" "$tmp/c1" "$tmp/c2" "$tmp/c3" "$tmp/c4" \
  "$tmp/where.unsorted" "$tmp/where"

# 3. Every block must be somewhere: "digest blockno pack offset length", one line per copy.
{ cut -d' ' -f2 "$tmp/found" > "$tmp/found.n" 2>"$tmp/err" && sort -u "$tmp/found.n" > "$tmp/found.u" 2>"$tmp/err"; } \
  || tmp_die "sort failed" "$tmp/err"
nfound=$(wc -l < "$tmp/found") || die "wc failed"
lines_are "$tmp/found.n" "$nfound"
wanted=$nonzero
found=$(wc -l < "$tmp/found.u") || die "wc failed"
[ "$found" -eq "$wanted" ] \
  || die "$((wanted - found)) of the disk's block(s) of snapshot $snap are missing from the repository (no pack index names them): run 'pyvbak verify', or restore another snapshot"
# The plan: one copy of every block, in pack order (sequential reads, and runs of frames
# that are consecutive both in a pack and on the disk: a full backup stores them so).
{ sort -u -k2,2 "$tmp/found" > "$tmp/primary" 2>"$tmp/err" && rm -f "$tmp/blocks" "$tmp/found.n" \
  && lines_are "$tmp/primary" "$wanted" \
  && sort -k3,3 -k4,4 "$tmp/primary" > "$tmp/plan" 2>"$tmp/err"; } || tmp_die "sort failed" "$tmp/err"
lines_are "$tmp/plan" "$wanted"
rm -f "$tmp/found.n" "$tmp/primary" "$tmp/blocks"

# 4. Write every non-zero block at its place; zero blocks stay holes of the truncated file
#    (on a block device they are written as zeros).
if [ -n "$device" ]; then
  dst=$out
  # It must hold the whole disk, checked before anything is written: its size from sysfs
  # (in 512-byte sectors), or else the snapshot's last byte read from it.  A device whose
  # size cannot be told is refused, not written unchecked (a too-small one was overwritten
  # up to its end before dd failed).
  sectors=
  [ -z "$sysdir" ] || [ ! -r "$sysdir/size" ] || read -r sectors < "$sysdir/size" || sectors=
  case $sectors in *[!0-9]*) sectors= ;; esac
  if [ -n "$sectors" ]; then
    [ $((sectors * 512)) -ge "$size" ] \
      || die "$out holds $((sectors * 512)) bytes, the snapshot $size: choose a larger device"
  elif [ "$size" -gt 0 ]; then
    got=$(dd if="$out" bs=1 count=1 skip=$((size - 1)) iflag=skip_bytes status=none 2>/dev/null | wc -c | tr -d ' ') || got=
    [ "$got" = 1 ] \
      || die "cannot tell the size of $out (no /sys/class/block entry for it, and byte $((size - 1)) of it does not read): it may be smaller than the snapshot ($size bytes); give the device's /dev/NAME, or check that it can be read"
  fi
  exec 8<"$dst" || die "cannot open $dst"  # (for the fsync at the end)
else
  dst=$part
  truncate -s "$size" "$part" 2>"$tmp/err" || die "cannot make $part $size bytes long: $(tail -n 1 "$tmp/err")"
  exec 8<"$part" || die "cannot open $part"  # (for the fsync at the end)
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
  printf '%s\n' "$2" 2>/dev/null >> "$tmp/done" || tmp_die "cannot note block $2 as written in $tmp/done"
}
note_failed() {  # WHY: a copy that did not read back good, for the error if no other copy does
  printf '%s\n' "$1" 2>/dev/null >> "$tmp/failed" || tmp_die "cannot note a bad copy in $tmp/failed"
}
check_frame() {  # as block: the frame decompressed to $tmp/block and checked, or 1
  pack="$repo/packs/${3%"${3#??}"}/$3"
  if [ ! -f "$pack" ]; then
    note_failed "$2 is in pack $3, which is missing"
    return 1
  fi
  [ -r "$pack" ] || denied "$pack"
  if ! dd if="$pack" iflag=skip_bytes,count_bytes skip=$((0x$4)) count=$((0x$5)) bs=1M status=none \
      > "$tmp/frame" 2>"$tmp/err"; then
    # the pack read again, into nothing: if that works, it was $TMPDIR that failed
    ! dd if="$pack" iflag=skip_bytes,count_bytes skip=$((0x$4)) count=$((0x$5)) bs=1M status=none \
        of=/dev/null 2>/dev/null || tmp_die "cannot copy a frame of pack $3 into ${TMPDIR:-/tmp}" "$tmp/err"
    note_failed "$2 cannot be read from pack $3"
    return 1
  fi
  # at most one byte more than a block: a frame that decompresses to gigabytes (a damaged
  # or hostile pack) must not fill $TMPDIR; whatever went wrong, the SHA-256 below says so
  zstd -dcq < "$tmp/frame" 2>/dev/null | head -c "$((bs + 1))" > "$tmp/block" 2>"$tmp/err" \
    || tmp_die "head failed writing $tmp/block" "$tmp/err"
  sha256sum < "$tmp/block" > "$tmp/sum" 2>"$tmp/err" || tmp_die "sha256sum failed" "$tmp/err"
  read -r got rest < "$tmp/sum"
  if [ "$got" != "$1" ]; then
    note_failed "$2 does not match its digest in pack $3 at offset $((0x$4))"
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
      cut -d' ' -f2 "$tmp/run.lines" >> "$tmp/done" 2>"$tmp/err" || tmp_die "cut failed" "$tmp/err"
    else
      # (what the run left in $TMPDIR goes first: a nearly full one has room for one block)
      rm -f "$tmp/run" "$tmp/frames" "$tmp"/blk.*
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
  zstd -dcq < "$tmp/frames" 2>/dev/null | head -c "$((run_k * bs + 1))" > "$tmp/run" 2>/dev/null || return 1
  [ -s "$tmp/run" ] || return 1
  split -b "$bs" "$tmp/run" "$tmp/blk." 2>/dev/null || return 1
  (cd "$tmp" && sha256sum blk.*) > "$tmp/sums" 2>/dev/null || return 1  # names without escapes
  cut -c1-64 "$tmp/sums" > "$tmp/got" 2>/dev/null && paste -d ' ' "$tmp/got" "$tmp/run.want" > "$tmp/both" 2>/dev/null \
    || return 1
  r_lines=$(wc -l < "$tmp/both" 2>/dev/null) && [ "$r_lines" -eq "$run_k" ] || return 1
  rc=0; grep -c -v '^\([0-9a-f]\{64\}\) \1$' "$tmp/both" > "$tmp/bad" 2>/dev/null || rc=$?
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
  printf '%s\n' "$d $n $p $o $c" 2>/dev/null >> "$tmp/run.lines" && printf '%s\n' "$d" 2>/dev/null >> "$tmp/run.want" \
    || tmp_die "cannot write $tmp/run.lines"
done < "$tmp/plan"
flush_run
# Blocks whose copy did not read back good: every other copy of them.
sort -u "$tmp/done" > "$tmp/done.u" 2>"$tmp/err" || tmp_die "sort failed" "$tmp/err"
written=$(wc -l < "$tmp/done.u") || die "wc failed"
if [ "$written" -ne "$wanted" ]; then
  { join -v 1 "$tmp/found.u" "$tmp/done.u" > "$tmp/todo" 2>"$tmp/err" && sort -k2,2 "$tmp/found" > "$tmp/found.byn" 2>"$tmp/err" \
    && join -1 2 -2 1 "$tmp/found.byn" "$tmp/todo" > "$tmp/retry" 2>"$tmp/err"; } || tmp_die "join failed" "$tmp/err"
  while read -r n d p o c; do block "$d" "$n" "$p" "$o" "$c"; done < "$tmp/retry"
  sort -u "$tmp/done" > "$tmp/done.u" 2>"$tmp/err" || tmp_die "sort failed" "$tmp/err"
fi
written=$(wc -l < "$tmp/done.u") || die "wc failed"
if [ "$written" -ne "$wanted" ]; then
  { sort -k1,1 "$tmp/failed" > "$tmp/failed.s" 2>"$tmp/err" && join -v 1 "$tmp/failed.s" "$tmp/done.u" > "$tmp/lost" 2>"$tmp/err"; } \
    || tmp_die "join failed" "$tmp/err"
  first=$(head -n 1 "$tmp/lost") || die "head failed"
  die "block $first, and no other copy of it reads back good: the repository is damaged ($((wanted - written)) block(s) of snapshot $snap lost; run 'pyvbak verify' (it flags the bad copies, so the next backup of a disk that still holds those blocks stores them again), or restore another snapshot)"
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
  psize=$(size_of "$part") || die "ls failed on $part"
  [ "$psize" -eq "$size" ] || die "$part is not $size bytes after the restore"
  if [ -n "$force" ] && [ -f "$out" ]; then
    # the file it replaces keeps its owner, group and mode, as with pyvbak (a VM manager
    # may not open it otherwise): GNU chown/chmod --reference, where there; a failure
    # (busybox has no --reference, a non-root user cannot give a file away) is ignored
    chown --reference="$out" -- "$part" >/dev/null 2>&1 || :
    chmod --reference="$out" -- "$part" >/dev/null 2>&1 || :
  fi
fi
# The restored data on disk before it is called restored (a file: before its rename).  dd
# writes into the page cache, and a write that fails later, at write-back (a thin volume
# out of space, a failing disk: EIO, ENOSPC), is reported only by an fsync - not by a bare
# sync.  fsync here through fd 8, opened before the first write: it reports every
# write-back error since then, even one another program's fsync has already seen.  (dd
# without of= fsyncs its standard output, also when it writes nothing.)
if ! fsync_err=$(dd if=/dev/null count=0 conv=fsync status=none 2>&1 >&8); then
  fsync_err=${fsync_err##*: }  # (GNU dd names the file 'standard output')
  die "writing $dst failed when it was flushed to disk (a thin volume out of space, or a failing disk?): ${fsync_err:-fsync failed}"
fi
exec 8<&-
if [ -z "$device" ]; then
  # (mv and ln put a file INTO a directory: one made at OUTPUT during the restore, or a
  # link to one, got the restore inside it, and "restored to OUTPUT" was said)
  if [ -d "$out" ]; then
    die "$out became a directory during the restore (or a link to one): nothing restored; give a file path"
  fi
  renaming=1
  if [ -n "$force" ]; then
    mv -f "$part" "$out" || die "cannot rename $part to $out"
  elif ln "$part" "$out" 2>/dev/null; then
    rm -f "$part"
  else
    # ln refuses an OUTPUT made meanwhile, and also file systems without hard links.
    [ ! -e "$out" ] && [ ! -L "$out" ] || die "$out was created by something else during the restore: left alone"
    mv "$part" "$out" || die "cannot rename $part to $out"
  fi
  in_place=1
  made_part=
  sync  # and the rename too
fi
writing=
printf '%s\n' "restored snapshot $snap ($size bytes) to $out"
