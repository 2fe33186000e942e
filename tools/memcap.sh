#!/usr/bin/env bash
# Runs a command under a memory limit, to emulate a smaller machine (needs root).
#
#   tools/memcap.sh LIMIT -- COMMAND [ARGS...]
#   tools/memcap.sh 10G -- cargo run --release --example flex_opt -- --model facebook/opt-13b ...
#
# LIMIT is bytes with an optional K, M, G or T suffix (powers of 1024). The command runs in a
# fresh memory cgroup created under this shell's own cgroup (cgroup v1 `memory` controller, or
# cgroup v2 where the memory controller is delegated), with swap forbidden where the kernel
# allows it. Page cache counts against the limit as the kernel sees fit; anonymous memory above
# it gets the command OOM-killed. On exit the script prints the cgroup's peak usage and OOM-kill
# count to stderr, removes the cgroup, and exits with the command's status.
set -euo pipefail

die() { echo "memcap: $*" >&2; exit 2; }

[[ $# -ge 3 && $2 == "--" ]] || die "usage: $0 LIMIT -- COMMAND [ARGS...]"
limit_arg=$1
shift 2
[[ $(id -u) -eq 0 ]] || die "needs root to create a cgroup (run with sudo)"

to_bytes() {
    local v=$1 n unit
    [[ $v =~ ^([0-9]+)([KkMmGgTt]?)[Bb]?$ ]] || die "bad LIMIT '$v' (examples: 10G, 512M, 1073741824)"
    n=${BASH_REMATCH[1]}
    unit=${BASH_REMATCH[2]^^}
    case $unit in
        K) echo $((n << 10)) ;;
        M) echo $((n << 20)) ;;
        G) echo $((n << 30)) ;;
        T) echo $((n << 40)) ;;
        *) echo "$n" ;;
    esac
}
limit=$(to_bytes "$limit_arg")
(( limit >= (16 << 20) )) || die "LIMIT $limit_arg is below 16 MiB"

# This shell's cgroup path for a controller ("" for the v2 unified line).
own_path() {
    local ctrl=$1 line
    while IFS= read -r line; do
        local id=${line%%:*} rest=${line#*:}
        local ctrls=${rest%%:*} path=${rest#*:}
        if [[ -z $ctrl && -z $ctrls && $id == 0 ]]; then echo "$path"; return; fi
        if [[ -n $ctrl && ,$ctrls, == *",$ctrl,"* ]]; then echo "$path"; return; fi
    done </proc/self/cgroup
}

mode=""
cg=""
make_child() { # $1 = parent dir
    local dir="$1/memcap-$$"
    mkdir "$dir" 2>/dev/null || return 1
    cg=$dir
}

if [[ -f /sys/fs/cgroup/memory/memory.limit_in_bytes ]]; then
    mode=v1
    base=/sys/fs/cgroup/memory
    make_child "$base$(own_path memory)" || make_child "$base" || die "cannot create a cgroup under $base"
    echo "$limit" >"$cg/memory.limit_in_bytes"
    # Forbid swap too where the kernel accounts it.
    if [[ -f $cg/memory.memsw.limit_in_bytes ]]; then
        echo "$limit" >"$cg/memory.memsw.limit_in_bytes" 2>/dev/null || true
    fi
else
    for root in /sys/fs/cgroup /sys/fs/cgroup/unified; do
        if [[ -f $root/cgroup.controllers ]] && grep -qw memory "$root/cgroup.controllers"; then
            mode=v2
            base=$root
            break
        fi
    done
    [[ -n $mode ]] || die "no cgroup memory controller found (v1 at /sys/fs/cgroup/memory or v2)"
    parent="$base$(own_path "")"
    # The memory controller must be enabled for the parent's children.
    if ! grep -qw memory "$parent/cgroup.subtree_control" 2>/dev/null; then
        echo +memory >"$parent/cgroup.subtree_control" 2>/dev/null || parent=$base
    fi
    make_child "$parent" || make_child "$base" || die "cannot create a cgroup under $parent"
    echo "$limit" >"$cg/memory.max"
    [[ -f $cg/memory.swap.max ]] && echo 0 >"$cg/memory.swap.max"
fi

cleanup() {
    [[ -n $cg && -d $cg ]] || return 0
    local peak="?" ooms="?"
    if [[ $mode == v1 ]]; then
        peak=$(cat "$cg/memory.max_usage_in_bytes" 2>/dev/null || echo "?")
        ooms=$(awk '$1=="oom_kill"{print $2}' "$cg/memory.oom_control" 2>/dev/null || true)
    else
        peak=$(cat "$cg/memory.peak" 2>/dev/null || echo "?")
        ooms=$(awk '$1=="oom_kill"{print $2}' "$cg/memory.events" 2>/dev/null || true)
    fi
    echo "memcap: limit $limit bytes, peak usage $peak bytes (page cache included), oom kills ${ooms:-?} ($mode $cg)" >&2
    # Move any leftover process out, then remove the group.
    local procs="$cg/cgroup.procs" up
    up=$(dirname "$cg")
    if [[ -s $procs ]]; then
        while read -r p; do echo "$p" >"$up/cgroup.procs" 2>/dev/null || true; done <"$procs"
    fi
    rmdir "$cg" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

status=0
( echo "$BASHPID" >"$cg/cgroup.procs" && exec "$@" ) || status=$?
exit "$status"
