#!/usr/bin/env bash
# setup-swap.sh: attach, detach and report the nbd-postcopy swap device. `setup-swap.sh --help` explains.
set -euo pipefail

prog=setup-swap.sh
repo=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)

# Where attachments are registered: one entry per name (a directory, or a link to a --state-dir).
RUN_DIR=${NBD_POSTCOPY_RUN_DIR:-/run/nbd-postcopy}
# Testing aids (documented in --help): the zswap switch to read, and a stand-in nbdkit plugin.
ZSWAP_ENABLED=${NBD_POSTCOPY_ZSWAP_ENABLED:-/sys/module/zswap/parameters/enabled}
STANDIN_PLUGIN=${NBD_POSTCOPY_NBDKIT_PLUGIN:-}
PLUGIN_FILE=${NBD_POSTCOPY_PLUGIN_FILE:-$repo/plugin/postcopy.py}
if [ -n "${NBD_POSTCOPY_PYTHON:-}" ]; then
    PYTHON=$NBD_POSTCOPY_PYTHON
elif [ -x "$repo/.venv/bin/python" ]; then
    PYTHON=$repo/.venv/bin/python
else
    PYTHON=/usr/bin/python3
fi

MAX_PRIORITY=32767
STOP_TIMEOUT=30 # seconds to wait for the supervisor and nbdkit to exit

# ---------------------------------------------------------------------------------------------------
# Help

usage_main() {
    cat <<EOF
Usage: $prog COMMAND [OPTIONS]

Attach the nbd-postcopy device as a swap area, report on it, and take it down again.

Commands:
  attach   start nbdkit with plugin/postcopy.py, connect it as a block device, swapon it
  detach   run completion, swapoff, disconnect, stop nbdkit, remove the state
  status   show each attachment: device, size, swap use, priority, processes, plugin state

Run '$prog COMMAND --help' for the options of each command.

How it fits together (destination host, as root):
  1. $prog attach --name vm1 -- source=nbd://SRC:10809/ram pages=65536 key=/run/vm1.key
  2. nbd-postcopy stage --pid QEMU_PID ... --device /dev/loopN      (markers out to the device)
  3. the guest runs; swap-ins fetch pages from the source
  4. $prog detach vm1 --pid QEMU_PID --address ADDR --length BYTES (pre-page the rest, tear down)

nbdkit runs with -f --swap (memory locked) under a small supervisor process
(python -m nbd_postcopy.host.supervisor), so the device outlives this script. Every attachment keeps
its state in a directory (default $RUN_DIR/NAME): 'state' (shell-sourceable), 'log', 'pids',
nbdkit.sock, control.sock and the FUSE mount fuse/disk.

Exit status: 0 success, 1 refused or failed (a message says why), 2 bad usage.
EOF
}

usage_attach() {
    cat <<EOF
Usage: $prog attach [--name NAME] [--priority N] [--transport auto|nbd|fuse]
                    [--state-dir DIR] [--threads N] [--no-discard] -- PLUGIN_KEY=VALUE...

Start nbdkit with plugin/postcopy.py and the given KEY=VALUE arguments under a supervisor, connect
the export as a block device and swapon it. Prints the name and the device:
  attached vm1: /dev/loop3 (swap priority 32767, 1.0 GiB, nbdkit pid 4242)

Options:
  --name NAME          attachment name, [A-Za-z0-9][A-Za-z0-9_.-]* up to 32 characters
                       (default: the first free postcopyN)
  --priority N         swap priority 0..$MAX_PRIORITY (default $MAX_PRIORITY: the highest, so that
                       staging's MADV_PAGEOUT lands on this device and nowhere else)
  --transport T        auto (default): kernel nbd (nbd-client) when the nbd module exists,
                       otherwise fuse; fuse: nbdfuse STATE/fuse/disk + losetup --direct-io=on
  --state-dir DIR      keep the state here instead of $RUN_DIR/NAME (must not exist yet;
                       its path must be short: it holds Unix sockets)
  --threads N          nbdkit threads per connection (default 4). Every thread stack is locked
                       in memory, so keep this small.
  --no-discard         swapon without --discard=pages (by default freed swap slots reach the
                       plugin as NBD TRIM, which frees the slot and its overlay)

Plugin keys (after --) go to plugin/postcopy.py as they are, e.g. source=URI pages=N key=FILE.
control=STATE/control.sock is added unless you give control=. Unknown keys are refused by the plugin.

Refuses when: not root; zswap is on (it would keep swapped-out pages in RAM and the device would
never see them); a tool is missing (nbdkit and its python plugin, losetup, swapon, swapoff, and
nbdfuse + fusermount3 or nbd-client for the transport); the name is taken. If any step fails, every
step done so far is undone in reverse order, and nothing is left behind.

The fuse transport needs loop direct I/O: without it the loop device's page cache answers
swap-ins with the staging markers instead of asking nbdkit, and the guest reads garbage. attach
checks /sys/block/loopN/loop/dio = 1 and refuses otherwise.

Testing aid: NBD_POSTCOPY_NBDKIT_PLUGIN="memory size=256M" runs that nbdkit plugin instead of
plugin/postcopy.py (keys after -- are appended, no control= is added) and writes a swap header
with mkswap, because a stand-in does not make its own.

Example:
  $prog attach --name vm1 -- source=nbd+unix:///ram?socket=/run/src.sock pages=65536 key=/run/vm1.key
EOF
}

usage_detach() {
    cat <<EOF
Usage: $prog detach NAME [--no-complete] [--pid PID --address ADDR --length BYTES]

Take the attachment down, in this order:
  1. completion: nbd-postcopy complete --pid PID --address ADDR --length BYTES, pre-paging every
     page still on the device into the target process (skipped with --no-complete, when no target
     is known, or with a warning when 'nbd-postcopy complete' is not installed). The target comes
     from the options, else from STATE/target (target_pid=, target_address=, target_length=),
     which the stager may write.
  2. swapoff (reads every remaining slot in; may take a while, and fails with ENOMEM if the pages
     do not fit in memory: then nothing else is touched and you can retry)
  3. losetup -d (fuse) or nbd-client -d (nbd)
  4. fusermount3 -u STATE/fuse
  5. stop the supervisor (SIGTERM) and wait for nbdkit to exit
  6. remove the state directory

Every step checks first whether there is anything to undo, so detach can be re-run after a partial
failure. Exit status 0 only when nothing remains (also when NAME is not attached at all).

Example:
  $prog detach vm1 --pid 4242 --address 0x7f0000000000 --length 268435456
EOF
}

usage_status() {
    cat <<EOF
Usage: $prog status [NAME] [--json]

For each attachment (or just NAME): device, size, swap used and priority (from /proc/swaps),
whether the supervisor, nbdkit and nbdfuse are alive, nbdkit's locked memory, and the plugin's
control 'status' (armed, mapped, remaining, complete) when its control socket answers.
--json prints a JSON array with one object per attachment.

Exit status: 0, or 1 when NAME is not attached.
EOF
}

# ---------------------------------------------------------------------------------------------------
# Small helpers

say() { printf '%s\n' "$*"; }
warn() { printf '%s: %s: warning: %s\n' "$prog" "$command" "$*" >&2; }
die() {
    printf '%s: %s: %s\n' "$prog" "$command" "$*" >&2
    exit 1
}
usage_error() {
    printf '%s: %s: %s\n' "$prog" "$command" "$*" >&2
    printf "Run '%s %s --help' for usage.\n" "$prog" "$command" >&2
    exit 2
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
valid_name() { [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$ ]]; }

human_bytes() {
    awk -v b="$1" 'BEGIN { split("B KiB MiB GiB TiB", u, " "); i = 1
        while (b >= 1024 && i < 5) { b /= 1024; i++ }
        fmt = (i == 1) ? "%d %s" : "%.1f %s"; printf fmt, b, u[i] }'
}

# pid_is PID NEEDLE: PID is a live process (not a zombie) whose command line contains NEEDLE.
pid_is() {
    local pid=$1 needle=$2 stat
    [ -n "$pid" ] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [ "${stat%% *}" != Z ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$needle"
}

wait_gone() { # wait_gone PID NEEDLE SECONDS
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        pid_is "$1" "$2" || return 0
        sleep 0.1
    done
    return 1
}

swap_line() { # the /proc/swaps line of a device, if it is an active swap area
    [ -n "$1" ] || return 1
    awk -v dev="$(readlink -f "$1")" 'NR > 1 && $1 == dev' /proc/swaps | grep .
}

is_mounted() { [ -n "$1" ] && awk -v dir="$1" '$2 == dir { found = 1 } END { exit !found }' /proc/mounts; }

# state_dir_of NAME: where NAME's state lives (the registry entry, followed if it is a link).
state_dir_of() { readlink -f "$RUN_DIR/$1"; }

kernel_has_nbd() { [ -d /sys/module/nbd ] || modprobe -n -q nbd 2>/dev/null; }

# ---------------------------------------------------------------------------------------------------
# State file: every variable below, written after each attach step so that detach (and the cleanup
# of a failed attach) knows exactly what exists.

STATE_VARS=(name state_dir transport device loop_device nbd_device fuse_dir fuse_disk socket control
    supervisor_pid nbdkit_pid nbdfuse_pid priority discard size_bytes standin attached_at)

reset_state() {
    local var
    for var in "${STATE_VARS[@]}"; do printf -v "$var" '%s' ''; done
    plugin_args=()
}

save_state() {
    local var tmp="$state_dir/state.tmp"
    {
        printf '# nbd-postcopy attachment (written by %s; shell-sourceable)\n' "$prog"
        for var in "${STATE_VARS[@]}"; do printf '%s=%q\n' "$var" "${!var}"; done
        printf 'plugin_args=('
        [ ${#plugin_args[@]} -eq 0 ] || printf ' %q' "${plugin_args[@]}"
        printf ' )\n'
    } >"$tmp"
    mv -f "$tmp" "$state_dir/state"
}

load_state() { # load_state DIR
    reset_state
    [ -f "$1/state" ] || return 1
    # shellcheck disable=SC1091
    . "$1/state"
    # A supervisor that became ready after the state was last written (e.g. attach was interrupted).
    if [ -z "$supervisor_pid" ] && [ -f "$1/pids" ]; then
        # shellcheck disable=SC1091
        . "$1/pids"
    fi
}

# ---------------------------------------------------------------------------------------------------
# Teardown: the reverse of attach, each step only when there is something to undo. Used by detach
# and by the cleanup of a failed attach. Sets teardown_failed=1 when something could not be removed.

teardown_failed=0

teardown_fail() {
    printf '%s: %s: %s\n' "$prog" "$command" "$*" >&2
    teardown_failed=1
}

teardown() {
    local out
    teardown_failed=0
    if swap_line "$device" >/dev/null; then
        if ! out=$(swapoff "$device" 2>&1); then
            teardown_fail "swapoff $device failed: ${out:-no message}. Nothing else was touched (the pages" \
                "on the device are still needed); free memory or fix the source, then run detach again."
            return
        fi
    fi
    if [ -n "$loop_device" ] && [ "$(cat "/sys/block/${loop_device#/dev/}/loop/backing_file" 2>/dev/null)" = "$fuse_disk" ]; then
        out=$(losetup -d "$loop_device" 2>&1) || teardown_fail "losetup -d $loop_device failed: ${out:-no message}"
    fi
    if [ -n "$nbd_device" ] && [ -e "/sys/block/${nbd_device#/dev/}/pid" ]; then
        out=$(nbd-client -d "$nbd_device" 2>&1) || teardown_fail "nbd-client -d $nbd_device failed: ${out:-no message}"
    fi
    if is_mounted "$fuse_dir"; then
        # The loop device may let go of the file a moment after losetup -d returns: retry briefly.
        local try
        for try in {1..50}; do
            ! out=$(fusermount3 -u "$fuse_dir" 2>&1) || break
            sleep 0.1
        done
        ! is_mounted "$fuse_dir" || teardown_fail "fusermount3 -u $fuse_dir failed: ${out:-no message}"
    fi
    local supervisor="nbd_postcopy.host.supervisor --state-dir $state_dir "
    if pid_is "$supervisor_pid" "$supervisor"; then
        kill -TERM "$supervisor_pid" 2>/dev/null || true
        wait_gone "$supervisor_pid" "$supervisor" "$STOP_TIMEOUT" \
            || teardown_fail "the supervisor (pid $supervisor_pid) did not exit within ${STOP_TIMEOUT}s; see $state_dir/log"
    fi
    if pid_is "$nbdkit_pid" "$socket"; then # the supervisor was gone, or did not stop it
        kill -TERM "$nbdkit_pid" 2>/dev/null || true
        wait_gone "$nbdkit_pid" "$socket" "$STOP_TIMEOUT" \
            || teardown_fail "nbdkit (pid $nbdkit_pid) did not exit within ${STOP_TIMEOUT}s"
    fi
    if pid_is "$nbdfuse_pid" "$fuse_disk"; then
        teardown_fail "nbdfuse (pid $nbdfuse_pid) is still running although its mount is gone"
    fi
    if [ "$teardown_failed" -eq 0 ] && [ -n "$state_dir" ]; then
        rm -rf -- "$state_dir"
        [ "$(readlink "$RUN_DIR/$name")" != "$state_dir" ] || rm -f -- "$RUN_DIR/$name"
    fi
}

# ---------------------------------------------------------------------------------------------------
# attach

attach_done=0
attach_started=0

attach_cleanup() {
    local rc=$?
    [ "$attach_started" -eq 1 ] && [ "$attach_done" -eq 0 ] || return 0
    attach_started=0
    printf '%s: attach: undoing the steps done so far\n' "$prog" >&2
    load_state "$state_dir" || true
    teardown
    if [ "$teardown_failed" -eq 0 ]; then
        printf '%s: attach: undone; nothing is left behind\n' "$prog" >&2
    else
        printf '%s: attach: could not undo everything; see above and run: %s detach %s\n' "$prog" "$prog" "$name" >&2
    fi
    [ "$rc" -ne 0 ] || rc=1
    exit "$rc"
}

require_tools() {
    local tool missing=()
    for tool in "$@"; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
    [ ${#missing[@]} -eq 0 ] || die "missing tool(s): ${missing[*]} (PATH=$PATH); install them: scripts/install.sh"
}

first_free_name() {
    local i
    for ((i = 0; ; i++)); do
        [ -e "$RUN_DIR/postcopy$i" ] || [ -L "$RUN_DIR/postcopy$i" ] || { echo "postcopy$i"; return; }
    done
}

free_nbd_device() {
    local dev
    for dev in /sys/block/nbd*; do
        [ -e "$dev" ] || continue
        [ -e "$dev/pid" ] || [ "$(cat "$dev/size")" != 0 ] || { echo "/dev/${dev##*/}"; return 0; }
    done
    return 1
}

cmd_attach() {
    local opt_name="" opt_state_dir="" opt_transport=auto opt_threads=4 opt_priority=$MAX_PRIORITY opt_discard=1
    local keys=() key has_control=0 out
    while [ $# -gt 0 ]; do
        case $1 in
            -h | --help) usage_attach; exit 0 ;;
            --name) [ $# -ge 2 ] || usage_error "--name needs a value"; opt_name=$2; shift 2 ;;
            --priority) [ $# -ge 2 ] || usage_error "--priority needs a value"; opt_priority=$2; shift 2 ;;
            --transport) [ $# -ge 2 ] || usage_error "--transport needs a value"; opt_transport=$2; shift 2 ;;
            --state-dir) [ $# -ge 2 ] || usage_error "--state-dir needs a value"; opt_state_dir=$2; shift 2 ;;
            --threads) [ $# -ge 2 ] || usage_error "--threads needs a value"; opt_threads=$2; shift 2 ;;
            --no-discard) opt_discard=0; shift ;;
            --) shift; keys=("$@"); break ;;
            *) usage_error "unknown option '$1' (plugin keys go after --)" ;;
        esac
    done
    [ -z "$opt_name" ] || valid_name "$opt_name" \
        || usage_error "bad name '$opt_name': use [A-Za-z0-9][A-Za-z0-9_.-]*, at most 32 characters"
    is_uint "$opt_priority" && [ "$opt_priority" -le "$MAX_PRIORITY" ] \
        || usage_error "bad --priority '$opt_priority': want 0..$MAX_PRIORITY"
    is_uint "$opt_threads" && [ "$opt_threads" -ge 1 ] && [ "$opt_threads" -le 64 ] \
        || usage_error "bad --threads '$opt_threads': want 1..64"
    case $opt_transport in auto | nbd | fuse) ;; *) usage_error "bad --transport '$opt_transport': want auto, nbd or fuse" ;; esac
    for key in "${keys[@]}"; do
        [[ $key =~ ^[A-Za-z][A-Za-z0-9_-]*= ]] || usage_error "bad plugin argument '$key': want KEY=VALUE"
        [[ $key != control=* ]] || has_control=1
    done
    [ -n "$STANDIN_PLUGIN" ] || [ ${#keys[@]} -gt 0 ] \
        || usage_error "no plugin keys: give at least source=URI, pages=N (or size=BYTES) and key=FILE after --"

    # Refusals, before anything is created.
    [ "$(id -u)" -eq 0 ] || die "must run as root (swapon, losetup and FUSE mounts need it)"
    if [ -r "$ZSWAP_ENABLED" ] && [[ $(cat "$ZSWAP_ENABLED") == [Yy1]* ]]; then
        die "zswap is on ($ZSWAP_ENABLED = $(cat "$ZSWAP_ENABLED")): it would keep swapped-out pages" \
            "compressed in RAM and never send them to the device. Turn it off first:" \
            "echo N > /sys/module/zswap/parameters/enabled"
    fi
    if [ "$opt_transport" = auto ]; then
        if kernel_has_nbd; then opt_transport=nbd; else opt_transport=fuse; fi
    elif [ "$opt_transport" = nbd ] && ! kernel_has_nbd; then
        die "--transport nbd: this kernel has no nbd module (modprobe -n nbd fails); use --transport fuse"
    fi
    local tools=(nbdkit losetup swapon swapoff blockdev "$PYTHON")
    if [ "$opt_transport" = fuse ]; then tools+=(nbdfuse fusermount3); else tools+=(nbd-client modprobe); fi
    [ -z "$STANDIN_PLUGIN" ] || tools+=(mkswap)
    require_tools "${tools[@]}"
    if [ -z "$STANDIN_PLUGIN" ]; then
        nbdkit python --version >/dev/null 2>&1 \
            || die "missing tool: nbdkit's python plugin (Debian package nbdkit-plugin-python)"
        [ -f "$PLUGIN_FILE" ] || die "missing plugin file $PLUGIN_FILE"
    fi
    local new_name=${opt_name:-$(first_free_name)}
    if [ -e "$RUN_DIR/$new_name" ] || [ -L "$RUN_DIR/$new_name" ]; then
        die "the name '$new_name' is taken ($RUN_DIR/$new_name exists); see '$prog status $new_name'," \
            "or pick another --name"
    fi
    local dir=${opt_state_dir:-$RUN_DIR/$new_name}
    [ -z "$opt_state_dir" ] || [ ! -e "$opt_state_dir" ] \
        || die "--state-dir $opt_state_dir already exists; give a path that does not exist yet"
    dir=$(readlink -m "$dir")
    [ ${#dir} -le 80 ] || die "state directory path $dir is too long for Unix sockets (at most 80 characters)"

    # From here on, a failure undoes everything done so far (the state variables are globals, which
    # the EXIT trap reads).
    reset_state
    name=$new_name state_dir=$dir transport=$opt_transport priority=$opt_priority discard=$opt_discard
    trap attach_cleanup EXIT
    mkdir -p "$RUN_DIR"
    mkdir -- "$dir" || die "cannot create $dir"
    attach_started=1
    [ -z "$opt_state_dir" ] || ln -s -- "$dir" "$RUN_DIR/$name"
    socket=$dir/nbdkit.sock
    if [ "$transport" = fuse ]; then fuse_dir=$dir/fuse fuse_disk=$dir/fuse/disk; fi
    if [ -n "$STANDIN_PLUGIN" ]; then
        standin=1
        read -r -a plugin_args <<<"$STANDIN_PLUGIN"
        plugin_args+=("${keys[@]}")
    else
        standin=0
        plugin_args=(python "$PLUGIN_FILE" "${keys[@]}")
        if [ "$has_control" -eq 0 ]; then plugin_args+=("control=$dir/control.sock"); fi
    fi
    for key in "${plugin_args[@]}"; do [[ $key != control=* ]] || control=${key#control=}; done
    save_state

    # 1. nbdkit (and nbdfuse) under the supervisor, which detaches and reports the PIDs once ready.
    if ! out=$("$PYTHON" -m nbd_postcopy.host.supervisor --state-dir "$dir" --transport "$transport" \
        --threads "$opt_threads" -- "${plugin_args[@]}" 2>&1); then
        die "starting nbdkit failed: $(printf '%s' "$out" | sed 's/^supervisor: //')$(log_tail "$dir/log")"
    fi
    # shellcheck disable=SC1090
    eval "$(printf '%s\n' "$out" | grep -E '^(supervisor|nbdkit|nbdfuse)_pid=[0-9]+$')"
    save_state

    # 2. the block device.
    if [ "$transport" = fuse ]; then
        out=$(losetup --find --show --direct-io=on "$fuse_disk" 2>&1) || die "losetup --direct-io=on $fuse_disk failed: $out"
        loop_device=$out device=$out
        save_state
        local dio
        dio=$(cat "/sys/block/${loop_device#/dev/}/loop/dio" 2>/dev/null || echo missing)
        [ "$dio" = 1 ] || die "$loop_device does not use direct I/O (/sys/block/${loop_device#/dev/}/loop/dio = $dio):" \
            "its page cache would answer swap-ins with stale data"
    else
        [ -d /sys/module/nbd ] || out=$(modprobe nbd 2>&1) || die "modprobe nbd failed: $out"
        nbd_device=$(free_nbd_device) || die "no free /dev/nbdN device"
        out=$(nbd-client -unix "$socket" "$nbd_device" -block-size 4096 -swap 2>&1) \
            || die "nbd-client -unix $socket $nbd_device failed: $out"
        device=$nbd_device
        save_state
    fi
    size_bytes=$(blockdev --getsize64 "$device")

    # 3. swap.
    if [ "$standin" -eq 1 ]; then
        out=$(mkswap -q "$device" 2>&1) || die "mkswap $device (stand-in plugin) failed: $out"
    fi
    local swapon_args=(-p "$priority")
    [ "$discard" -eq 0 ] || swapon_args+=(--discard=pages)
    out=$(swapon "${swapon_args[@]}" "$device" 2>&1) || die "swapon ${swapon_args[*]} $device failed: ${out:-no message}" \
        "(does the plugin write a valid swap header in slot 0?)"
    attached_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    save_state
    attach_done=1
    say "attached $name: $device (swap priority $priority, $(human_bytes "$size_bytes"), nbdkit pid $nbdkit_pid)"
}

log_tail() { # the last lines of a log, indented, for an error message
    [ -s "$1" ] || return 0
    printf '\nlast lines of %s:\n' "$1"
    tail -n 8 "$1" | sed 's/^/  /'
}

# ---------------------------------------------------------------------------------------------------
# detach

run_completion() { # run_completion PID ADDRESS LENGTH
    if ! command -v nbd-postcopy >/dev/null 2>&1 || ! nbd-postcopy complete --help >/dev/null 2>&1; then
        warn "'nbd-postcopy complete' is not available; skipping completion (swapoff reads the rest in)"
        return 0
    fi
    local args=(--pid "$1" --address "$2" --length "$3")
    [ -z "$control" ] || [ ! -S "$control" ] || args+=(--control "$control")
    say "completing: nbd-postcopy complete ${args[*]}"
    nbd-postcopy complete "${args[@]}" \
        || warn "completion failed (status $?); continuing with swapoff, which reads every remaining page in"
}

cmd_detach() {
    local target=() complete=1 opt_pid="" opt_address="" opt_length="" want
    while [ $# -gt 0 ]; do
        case $1 in
            -h | --help) usage_detach; exit 0 ;;
            --no-complete) complete=0; shift ;;
            --pid) [ $# -ge 2 ] || usage_error "--pid needs a value"; opt_pid=$2; shift 2 ;;
            --address) [ $# -ge 2 ] || usage_error "--address needs a value"; opt_address=$2; shift 2 ;;
            --length) [ $# -ge 2 ] || usage_error "--length needs a value"; opt_length=$2; shift 2 ;;
            -*) usage_error "unknown option '$1'" ;;
            *) target+=("$1"); shift ;;
        esac
    done
    [ ${#target[@]} -eq 1 ] || usage_error "give exactly one NAME (see '$prog status')"
    want=${target[0]}
    valid_name "$want" || usage_error "bad name '$want'"
    if [ -n "$opt_pid$opt_address$opt_length" ] && { [ -z "$opt_pid" ] || [ -z "$opt_address" ] || [ -z "$opt_length" ]; }; then
        usage_error "--pid, --address and --length go together"
    fi
    [ "$(id -u)" -eq 0 ] || die "must run as root"
    if [ ! -e "$RUN_DIR/$want" ] && [ ! -L "$RUN_DIR/$want" ]; then
        say "$want is not attached; nothing to do"
        return 0
    fi
    local dir
    dir=$(state_dir_of "$want")
    if ! load_state "$dir"; then
        # Only an empty registry entry (attach died before writing any state): nothing was started.
        rm -rf -- "$dir"
        [ ! -L "$RUN_DIR/$want" ] || rm -f -- "$RUN_DIR/$want"
        say "detached $want (it had no state: nothing was running)"
        return 0
    fi
    if [ "$complete" -eq 1 ]; then
        if [ -n "$opt_pid" ]; then
            run_completion "$opt_pid" "$opt_address" "$opt_length"
        elif [ -f "$dir/target" ]; then
            local target_pid="" target_address="" target_length=""
            # shellcheck disable=SC1091
            . "$dir/target"
            run_completion "$target_pid" "$target_address" "$target_length"
        else
            say "no target process known (no --pid, no $dir/target): skipping completion; swapoff reads the rest in"
        fi
    fi
    teardown
    [ "$teardown_failed" -eq 0 ] || die "$want is only partly detached; fix the above and run: $prog detach $want"
    say "detached $want${device:+: $device}"
}

# ---------------------------------------------------------------------------------------------------
# status

json_str() { # a JSON string literal (names and paths here hold no control characters)
    local s=${1//\\/\\\\}
    printf '"%s"' "${s//\"/\\\"}"
}

control_status() { # the plugin's control status as one JSON line, or nothing
    [ -n "$control" ] && [ -S "$control" ] || return 0
    timeout 5 "$PYTHON" -c '
import json, sys
from nbd_postcopy.device.control import request
print(json.dumps(request(sys.argv[1], "status")))
' "$control" 2>/dev/null || true
}

proc_state() { # alive|dead for a PID and a needle; empty when the PID is unknown
    [ -n "$1" ] || return 0
    if pid_is "$1" "$2"; then echo alive; else echo dead; fi
}

locked_kib() { awk '/^VmLck:/ { print $2 }' "/proc/$1/status" 2>/dev/null || true; }

status_one() { # status_one NAME JSON(0|1)
    local want=$1 as_json=$2 dir line swap_size="" swap_used="" swap_prio="" ctl sup kit fuse lck
    dir=$(state_dir_of "$want")
    if ! load_state "$dir"; then
        name=$want state_dir=$dir
    fi
    if line=$(swap_line "$device"); then
        read -r _ _ swap_size swap_used swap_prio <<<"$line"
    fi
    sup=$(proc_state "$supervisor_pid" "nbd_postcopy.host.supervisor --state-dir $dir ")
    kit=$(proc_state "$nbdkit_pid" "$socket")
    fuse=$(proc_state "$nbdfuse_pid" "$fuse_disk")
    lck=""
    [ "$kit" != alive ] || lck=$(locked_kib "$nbdkit_pid")
    ctl=$(control_status)
    if [ "$as_json" -eq 1 ]; then
        printf '{"name":%s,"state_dir":%s,"device":%s,"transport":%s,"size_bytes":%s,' \
            "$(json_str "$want")" "$(json_str "$dir")" "$(json_str "$device")" "$(json_str "$transport")" "${size_bytes:-null}"
        printf '"swap_active":%s,"swap_size_kib":%s,"swap_used_kib":%s,"priority":%s,' \
            "$([ -n "$swap_prio" ] && echo true || echo false)" "${swap_size:-null}" "${swap_used:-null}" "${swap_prio:-${priority:-null}}"
        printf '"processes":{"supervisor":{"pid":%s,"state":%s},"nbdkit":{"pid":%s,"state":%s,"locked_kib":%s},"nbdfuse":{"pid":%s,"state":%s}},' \
            "${supervisor_pid:-null}" "$(json_str "$sup")" "${nbdkit_pid:-null}" "$(json_str "$kit")" "${lck:-null}" \
            "${nbdfuse_pid:-null}" "$(json_str "$fuse")"
        printf '"control_socket":%s,"plugin":%s}' "$(json_str "$control")" "${ctl:-null}"
        return
    fi
    say "$want: ${device:-no device} (${transport:-?}, $( [ -n "$size_bytes" ] && human_bytes "$size_bytes" || echo 'size unknown'))"
    if [ -n "$swap_prio" ]; then
        say "  swap: active, priority $swap_prio, used $(human_bytes $((swap_used * 1024))) of $(human_bytes $((swap_size * 1024)))"
    else
        say "  swap: not active"
    fi
    say "  processes: supervisor ${supervisor_pid:-?} ${sup:-unknown}, nbdkit ${nbdkit_pid:-?} ${kit:-unknown}${lck:+ (locked $(human_bytes $((lck * 1024))))}${fuse_disk:+, nbdfuse ${nbdfuse_pid:-?} ${fuse:-unknown}}"
    if [ -n "$ctl" ]; then
        say "  plugin: $("$PYTHON" -c '
import json, sys
s = json.loads(sys.argv[1])
print(", ".join(f"{k} {s[k]}" for k in ("armed", "mapped", "remaining", "complete") if k in s))
' "$ctl")"
    else
        say "  plugin: control socket ${control:-(none)} not answering"
    fi
    say "  state: $dir"
}

cmd_status() {
    local want="" as_json=0 names=() entry first=1 n
    while [ $# -gt 0 ]; do
        case $1 in
            -h | --help) usage_status; exit 0 ;;
            --json) as_json=1; shift ;;
            -*) usage_error "unknown option '$1'" ;;
            *) [ -z "$want" ] || usage_error "give at most one NAME"; want=$1; shift ;;
        esac
    done
    if [ -n "$want" ]; then
        valid_name "$want" || usage_error "bad name '$want'"
        [ -e "$RUN_DIR/$want" ] || [ -L "$RUN_DIR/$want" ] || die "$want is not attached"
        names=("$want")
    else
        for entry in "$RUN_DIR"/*; do
            [ -e "$entry" ] || [ -L "$entry" ] || continue
            names+=("${entry##*/}")
        done
    fi
    if [ "$as_json" -eq 1 ]; then
        printf '['
        for n in "${names[@]}"; do
            [ "$first" -eq 1 ] || printf ','
            first=0
            status_one "$n" 1
        done
        printf ']\n'
    elif [ ${#names[@]} -eq 0 ]; then
        say "no postcopy swap device is attached"
    else
        for n in "${names[@]}"; do status_one "$n" 0; done
    fi
}

# ---------------------------------------------------------------------------------------------------

trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 131' QUIT
trap 'exit 143' TERM
command=${1:-}
[ $# -eq 0 ] || shift
case $command in
    attach) cmd_attach "$@" ;;
    detach) cmd_detach "$@" ;;
    status) cmd_status "$@" ;;
    -h | --help | help) usage_main ;;
    "") usage_main >&2; exit 2 ;;
    *)
        printf "%s: unknown command '%s' (want attach, detach or status; see --help)\n" "$prog" "$command" >&2
        exit 2
        ;;
esac
