#!/usr/bin/env bash
# The eclipse paho.mqtt.testing interoperability suites, by hand, against
# the gateway's broker and Mosquitto side by side (docs/broker-acl.md).
#
#   git clone https://github.com/eclipse/paho.mqtt.testing /tmp/paho
#   scripts/paho-conformance.sh /tmp/paho          # ~8 minutes
#
# The suite is not on any package registry, so it is neither vendored nor
# run in CI. Needs python3, mosquitto (apt-get install -y mosquitto).
set -euo pipefail
paho=${1:?usage: $0 PATH-TO-paho.mqtt.testing}
suite="$paho/interoperability"
[ -f "$suite/client_test5.py" ] || { echo "no $suite/client_test5.py" >&2; exit 2; }
command -v mosquitto >/dev/null || { echo "mosquitto missing: apt-get install -y mosquitto" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
cargo build --quiet --manifest-path "$root/Cargo.toml" --bin edge-gateway
work=$(mktemp -d)
chmod 755 "$work"   # mosquitto run as root drops to its own user, which must read the acl_file
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
gw=$(free_port) mdef=$(free_port) macl=$(free_port) metrics=$(free_port)

cat > "$work/gw.toml" <<EOF
[gateway]
id = "paho"
data_dir = "$work/data"
[metrics]
listen = "127.0.0.1:$metrics"
[broker]
enabled = true
tcp = "127.0.0.1:$gw"
allow_anonymous = true
[[broker.acl]]
topic = "test/nosubscribe"
access = "subscribe"
permission = "deny"
[[broker.acl]]
topic = "#"
access = "readwrite"
permission = "allow"
EOF
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$mdef" > "$work/mdef.conf"
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nacl_file %s/acl\n' "$macl" "$work" > "$work/macl.conf"
printf 'topic readwrite #\ntopic deny test/nosubscribe\n' > "$work/acl"
chmod 644 "$work/acl"

"$root/target/debug/edge-gateway" run --config "$work/gw.toml" > "$work/gw.log" 2>&1 & pids+=($!)
mosquitto -c "$work/mdef.conf" > "$work/mdef.log" 2>&1 & pids+=($!)
mosquitto -c "$work/macl.conf" > "$work/macl.log" 2>&1 & pids+=($!)
sleep 2
for p in $gw $mdef $macl; do
    python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $p), 2)" 2>/dev/null ||
        { echo "nothing listens on port $p; logs in $work" >&2; exit 1; }
done

# v3.1.1: client_test.py reads host/port from unittest's argv; set them instead.
cat > "$work/run3.py" <<'EOF'
import os, sys, unittest, logging
sys.path.insert(0, os.environ["SUITE"])
import client_test as ct
ct.host, ct.port = "127.0.0.1", int(os.environ["PORT"])
ct.topics = ("TopicA", "TopicA/B", "Topic/C", "TopicA/C", "/TopicA")
ct.wildtopics = ("TopicA/+", "+/C", "#", "/#", "/+", "+/+", "TopicA/#")
ct.nosubscribe_topics = ("test/nosubscribe",)
logging.getLogger().setLevel(logging.CRITICAL)
unittest.main(module=ct, argv=[sys.argv[0], "-v"])
EOF
run5() { # port -> "name pass|FAIL" lines
    local port=$1 t
    for t in $(grep -o "def test_[a-z0-9_]*" "$suite/client_test5.py" | sed 's/def //'); do
        if (cd "$suite" && timeout 60 python3 client_test5.py -p "$port" "Test.$t" > "$work/$t.$port.log" 2>&1); then
            echo "$t pass"; else echo "$t FAIL"; fi
    done
}
runs=()
for p in $gw $mdef $macl; do
    SUITE=$suite PORT=$p python3 "$work/run3.py" > "$work/v3.$p.txt" 2>&1 || true
    run5 "$p" > "$work/v5.$p.txt" & runs+=($!)
done
wait "${runs[@]}"

v3() { grep -E '^test.* \.\.\. ' "$work/v3.$1.txt" | sed -E 's/ \(.*\) \.\.\. .*//' | while read -r t; do
    if grep -qE "^(FAIL|ERROR): $t " "$work/v3.$1.txt"; then echo "$t FAIL"; else echo "$t pass"; fi; done; }
echo "| v3.1.1 client_test.py | gateway | Mosquitto | Mosquitto + acl_file |"
paste -d' ' <(v3 $gw) <(v3 $mdef | cut -d' ' -f2) <(v3 $macl | cut -d' ' -f2) | awk '{print "| " $1 " | " $2 " | " $3 " | " $4 " |"}'
echo
echo "| MQTT 5 client_test5.py | gateway | Mosquitto | Mosquitto + acl_file |"
paste -d' ' "$work/v5.$gw.txt" <(cut -d' ' -f2 "$work/v5.$mdef.txt") <(cut -d' ' -f2 "$work/v5.$macl.txt") |
    awk '{print "| " $1 " | " $2 " | " $3 " | " $4 " |"; for (i=2;i<=4;i++) if ($i=="pass") n[i]++}
         END {print "| total | " n[2]+0 " | " n[3]+0 " | " n[4]+0 " |"}'
if grep -q panicked "$work/gw.log"; then echo "the gateway's log has a panic: $work/gw.log" >&2; exit 1; fi
echo "logs in $work"
