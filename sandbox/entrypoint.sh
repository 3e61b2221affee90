#!/usr/bin/env bash
# Sandbox entrypoint: run the agent command (or idle) until SIGTERM/SIGINT or the hard deadline.
#
# The listener creates every sandbox machine with auto_destroy and restart policy "no", so when
# this process exits the machine destroys itself. The deadline makes that happen even when no
# listener is left to do it.
#
#   SANDBOX_DEADLINE_EPOCH_S  unix seconds. At that moment the child gets SIGTERM, then SIGKILL
#                             after the grace period, and this script exits 124. If the deadline
#                             has already passed at start, nothing runs and the exit code is 123.
#                             Unset or not a whole number: a warning, and no deadline (the
#                             listener's sweeper still reaps the machine).
#   SANDBOX_STOP_GRACE_S      seconds the child gets after SIGTERM before SIGKILL (default 5).
#   SESSION_ID                the coding session; only logged.
#
# With arguments, they are the command to run; without, the sandbox idles. SIGTERM and SIGINT
# are forwarded to the child once; the exit code is then the child's (0 when idling).
set -uo pipefail

if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 501)); then
    echo "sandbox-entrypoint: needs bash 5.1 or newer (wait -n -p)" >&2
    exit 2
fi

readonly EXIT_DEADLINE_EXPIRED=123
readonly EXIT_DEADLINE_REACHED=124
readonly DEFAULT_STOP_GRACE_S=5
readonly IDLE_S=2147483647

child=""
timer=""
signal_received=""
finished=""
status=0
child_status=0

log() {
    local level=$1 event=$2
    shift 2
    local line="sandbox-entrypoint: level=$level event=$event session_id=${SESSION_ID:-none}"
    local pair
    for pair in "$@"; do
        line+=" $pair"
    done
    printf '%s\n' "$line" >&2
}

now_us() {
    local now=${EPOCHREALTIME//[!0-9]/}
    printf '%s' "$((10#$now))"
}

seconds_of() {
    printf '%d.%06d' "$(($1 / 1000000))" "$(($1 % 1000000))"
}

on_signal() {
    signal_received=$1
    if [[ -n $child ]]; then
        log info signal_forwarded signal="$1" pid="$child"
        kill -s "$1" "$child" 2>/dev/null
    fi
}

# Wait for the first of the given processes to end: sets `finished` to its pid and `status` to
# its exit code; `finished` is empty when a trapped signal interrupted the wait.
wait_first() {
    wait -n -p finished "$@"
    status=$?
    finished=${finished:-}
    if [[ -z $finished ]] && ((status == 127)); then # none of them is our child any more
        finished=$1
    fi
}

# Give the child up to the grace period to exit, then SIGKILL it; sets child_status.
await_child() {
    local grace
    sleep "$grace_s" &
    grace=$!
    while :; do
        wait_first "$child" "$grace"
        if [[ $finished == "$child" ]]; then
            child_status=$status
            kill "$grace" 2>/dev/null
            wait "$grace" 2>/dev/null
            return
        fi
        if [[ $finished == "$grace" ]]; then
            log warning child_killed pid="$child" grace_s="$grace_s"
            kill -s KILL "$child" 2>/dev/null
            wait "$child" 2>/dev/null
            child_status=$?
            return
        fi
    done
}

deadline_us=""
raw_deadline=${SANDBOX_DEADLINE_EPOCH_S:-}
if [[ -z $raw_deadline ]]; then
    log warning deadline_ignored reason=unset
elif [[ $raw_deadline =~ ^[0-9]{1,12}$ ]]; then
    deadline_us=$((10#$raw_deadline * 1000000))
else
    log warning deadline_ignored reason=invalid value="${raw_deadline:0:40}"
fi

grace_s=${SANDBOX_STOP_GRACE_S:-$DEFAULT_STOP_GRACE_S}
if ! [[ $grace_s =~ ^[0-9]{1,6}([.][0-9]{1,6})?$ ]]; then
    log warning grace_ignored value="${grace_s:0:40}" default_s="$DEFAULT_STOP_GRACE_S"
    grace_s=$DEFAULT_STOP_GRACE_S
fi

trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'if [[ -n $timer ]]; then kill "$timer" 2>/dev/null; fi' EXIT

if [[ -n $deadline_us ]]; then
    remaining_us=$((deadline_us - $(now_us)))
    if ((remaining_us <= 0)); then
        log error deadline_expired deadline_epoch_s="$raw_deadline" \
            overdue_s="$(seconds_of $((-remaining_us)))"
        exit "$EXIT_DEADLINE_EXPIRED"
    fi
    sleep "$(seconds_of "$remaining_us")" &
    timer=$!
fi

if (($# > 0)); then
    mode="command"
    # Without job control an asynchronous command gets stdin from /dev/null and ignores SIGINT
    # and SIGQUIT. Bash 5.2 already resets the signals in a subshell; the trap keeps it explicit.
    (
        trap - INT QUIT
        exec "$@"
    ) <&0 &
else
    mode="idle"
    sleep "$IDLE_S" &
fi
child=$!
if [[ -n $deadline_us ]]; then
    log info entrypoint_started mode="$mode" pid="$child" deadline_epoch_s="$raw_deadline" \
        remaining_s="$(seconds_of "$remaining_us")"
else
    log info entrypoint_started mode="$mode" pid="$child"
fi
if [[ -n $signal_received ]]; then # arrived before the child existed
    on_signal "$signal_received"
fi

while :; do
    wait_first "$child" ${timer:+"$timer"}
    if [[ $finished == "$child" ]]; then
        child_status=$status
        break
    fi
    if [[ -n $timer && $finished == "$timer" ]]; then
        timer=""
        log warning deadline_reached deadline_epoch_s="$raw_deadline" pid="$child"
        kill -s TERM "$child" 2>/dev/null
        await_child
        log info child_exited status="$child_status" mode="$mode"
        exit "$EXIT_DEADLINE_REACHED"
    fi
    if [[ -n $signal_received ]]; then
        await_child
        break
    fi
done

log info child_exited status="$child_status" mode="$mode" signal="${signal_received:-none}"
if [[ $mode == idle && -n $signal_received ]]; then
    exit 0
fi
exit "$child_status"
