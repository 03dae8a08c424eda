#!/usr/bin/env bash
# Serial -> queue smoke test of the aarch64 (Raspberry Pi) binary under
# qemu-aarch64 user mode, on this x86 machine:
#
#   scripts/pi-smoke.sh [N]        # N readings (default 300); PI_SMOKE_PROFILE=release for the release binary
#
# A simulated wearable on a host PTY (the host binary's `simulate`, resending
# until acked) feeds the aarch64 `edge-gateway run`; once all N readings are
# acked the gateway gets SIGTERM, and the aarch64 `queue dump` must show each
# of the N readings exactly once. qemu-user 7.2 has no TCGETS2, so this also
# runs the serial module's plain-termios fallback (the log says so).
# Missing tools fail the test with the command that installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-300}
profile=${PI_SMOKE_PROFILE:-debug}

fail() { echo "pi-smoke: FAIL: $*" >&2; exit 1; }
command -v qemu-aarch64 >/dev/null || fail "qemu-aarch64 not found: sudo apt-get install -y qemu-user"
sysroot=/usr/aarch64-linux-gnu
[ -e "$sysroot/lib/ld-linux-aarch64.so.1" ] ||
    fail "no aarch64 glibc in $sysroot: sudo apt-get install -y gcc-aarch64-linux-gnu (brings libc6-arm64-cross)"

t0=$SECONDS
flag=$([ "$profile" = release ] || echo --debug)
arm=$(scripts/build-pi.sh aarch64 $flag) || fail "aarch64 build failed (see above)"
cargo build --locked --bin edge-gateway >&2
host=${CARGO_TARGET_DIR:-target}/debug/edge-gateway
echo "pi-smoke: builds took $((SECONDS - t0)) s; aarch64 binary: $arm" >&2
file_type=$(od -An -tx1 -j18 -N2 "$arm" | tr -d ' ')
[ "$file_type" = b700 ] || fail "$arm is not an aarch64 ELF (e_machine $file_type)"

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
qemu() { qemu-aarch64 -L "$sysroot" "$arm" "$@"; }

cat >"$work/gateway.toml" <<EOF
[gateway]
id = "pi-smoke"
data_dir = "$work/data"

[[serial]]
name = "dock0"
path = "$work/dock0"
framing = "jsonl"

[pipeline]
batch_max_age = "50ms"

[store]
fsync_interval = "50ms"
EOF
qemu check-config "$work/gateway.toml" >&2 || fail "check-config under qemu"

t1=$SECONDS
"$host" simulate --link "$work/dock0" --device wrist-pi --rate 100 --count "$n" 2>"$work/sim.log" &
sim=$!
pids+=("$sim")
# Not through the qemu function: $! must be qemu itself, which passes
# SIGTERM on to the gateway.
RUST_LOG=info qemu-aarch64 -L "$sysroot" "$arm" run --config "$work/gateway.toml" 2>"$work/gw.log" &
gw=$!
pids+=("$gw")

# simulate exits 0 once all N readings are acked.
deadline=$((SECONDS + 120 + n / 10))
while kill -0 "$sim" 2>/dev/null; do
    if ((SECONDS > deadline)); then
        tail -3 "$work/sim.log" >&2
        tail -20 "$work/gw.log" >&2
        fail "not all $n readings acked in time"
    fi
    kill -0 "$gw" 2>/dev/null || { cat "$work/gw.log" >&2; fail "the gateway exited early"; }
    sleep 0.2
done
wait "$sim" || { cat "$work/sim.log" >&2; fail "simulate failed"; }
echo "pi-smoke: $n readings acked in $((SECONDS - t1)) s: $(tail -1 "$work/sim.log")" >&2

kill -TERM "$gw"
code=0
wait "$gw" || code=$?
[ "$code" = 0 ] || { cat "$work/gw.log" >&2; fail "gateway exit status $code after SIGTERM"; }

qemu queue dump --config "$work/gateway.toml" >"$work/dump.jsonl" || fail "queue dump under qemu"
lines=$(wc -l <"$work/dump.jsonl")
others=$(grep -vc '"device":"wrist-pi"' "$work/dump.jsonl" || true)
grep -o '"seq":[0-9]*' "$work/dump.jsonl" | cut -d: -f2 | sort -n >"$work/seqs"
# The simulated device counts from 0 (since 704362c3: a first seq of 0 is acked at once).
seq 0 $((n - 1)) >"$work/want"
if [ "$lines" != "$n" ] || [ "$others" != 0 ] || ! cmp -s "$work/seqs" "$work/want"; then
    echo "dump: $lines lines, $others from other devices; seq differences (< dump, > wanted):" >&2
    diff "$work/seqs" "$work/want" | head -20 >&2 || true
    fail "the queue does not hold readings 0..$((n - 1)) of wrist-pi exactly once"
fi
how=$(grep -q 'plain termios fallback' "$work/gw.log" && echo "the plain termios fallback" || echo "tokio-serial")
echo "pi-smoke: OK: $n readings queued exactly once by the aarch64 binary under qemu-aarch64 (serial via $how); total $((SECONDS - t0)) s"
