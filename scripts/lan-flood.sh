#!/usr/bin/env bash
# A LAN flood of long arrays, by hand (docs/performance.md, "Channels bounded
# in bytes"): N anonymous publishers each send one ~250 KB payload of numbers
# (`{"value":[1,1,...]}`, 125,000 numbers: a 1 MiB reading once parsed) R
# times at QoS 1 into the gateway's embedded broker, as fast as it takes them.
# Prints the gateway's peak RSS, the time until the publishers were done and
# until the gateway had stored everything and exited, the CPU seconds of its
# threads, and its exit summary's count of readings accepted.
#
#   scripts/lan-flood.sh [PUBLISHERS] [REPEATS]      # default 4 200 (800 readings, 200 MB)
#
# Env: EDGE_GATEWAY_BIN (default: a release build of this checkout),
# LAN_FLOOD_PORT (default 18951), LAN_FLOOD_REPUBLISH (the broker's
# `republish`; default "" (off): set e.g. readings/{device}/{sensor}).
# Needs mosquitto_pub (apt-get install -y mosquitto-clients), python3, bc.
# Not run in CI.
set -euo pipefail
pubs=${1:-4}
reps=${2:-200}
port=${LAN_FLOOD_PORT:-18951}
root=$(cd "$(dirname "$0")/.." && pwd)
for t in mosquitto_pub python3 bc; do
    command -v "$t" >/dev/null || { echo "$t missing: apt-get install -y mosquitto-clients python3 bc" >&2; exit 2; }
done
bin=${EDGE_GATEWAY_BIN:-}
if [ -z "$bin" ]; then
    (cd "$root" && cargo build --release --bin edge-gateway)
    bin=$root/target/release/edge-gateway
fi
d=$(mktemp -d /tmp/lan-flood.XXXXXX)
gw=
cleanup() {
    [ -n "$gw" ] && kill -TERM "$gw" 2>/dev/null && wait "$gw" 2>/dev/null
    rm -rf "$d"
}
trap cleanup EXIT
python3 -c "open('$d/payload', 'wb').write(b'{\"value\":[' + b','.join([b'1'] * 124990) + b']}')"
cat > "$d/gw.toml" <<EOF
[gateway]
id = "flood-gw"
data_dir = "$d/data"
[store]
max_bytes = "4GiB"
[broker]
enabled = true
tcp = "127.0.0.1:$port"
allow_anonymous = true
republish = "${LAN_FLOOD_REPUBLISH:-}"
EOF
RUST_LOG=info "$bin" run --config "$d/gw.toml" > "$d/gw.log" 2>&1 &
gw=$!
for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
t0=$(date +%s.%N)
senders=()
for p in $(seq "$pubs"); do
    mosquitto_pub -p "$port" -q 1 -i "flood-$p" -t "sensors/flood-$p/ecg" -f "$d/payload" --repeat "$reps" \
        > "$d/pub$p.log" 2>&1 &
    senders+=($!)
done
wait "${senders[@]}"
t1=$(date +%s.%N)
hwm=$(awk '/VmHWM/{print $2}' "/proc/$gw/status")
cpu=$(for t in /proc/$gw/task/*; do awk '{printf "%s %.2f  ", $2, ($14 + $15) / 100}' "$t/stat"; done)
kill -TERM "$gw"
wait "$gw" || true
t2=$(date +%s.%N)
gw=
accepted=$(grep -o 'stopped: [0-9]* readings accepted' "$d/gw.log" | grep -o '[0-9]*' || echo '?')
echo "$(basename "$bin"): $pubs x $reps payloads of $(stat -c %s "$d/payload") bytes"
echo "  publishers done in $(echo "$t1 - $t0" | bc) s, stored and exited after $(echo "$t2 - $t0" | bc) s"
echo "  peak RSS $(echo "scale=1; $hwm / 1024" | bc) MiB, $accepted readings accepted (of $((pubs * reps)))"
echo "  CPU s by thread: $cpu"
