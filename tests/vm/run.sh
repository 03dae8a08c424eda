#!/usr/bin/env bash
# Field proof: the .deb on a real Debian 12 with systemd as PID 1, in QEMU.
# See docs/field-proof.md.
#
#   tests/vm/run.sh [--work DIR]
#
# Builds (once, cached in target/vm/rootfs) a Debian 12 root file system with
# mmdebstrap, builds the .deb with `cargo deb` (dev profile), boots the VM
# (amd64, TCG) with a simulated serial dock on the guest's /dev/ttyS1 and a
# Mosquitto on the host (guest: 10.0.2.2), and lets tests/vm/agent.sh run the
# checks inside. Every reading the dock hands over must reach the host's
# subscriber exactly once. One summary line at the end; exit 1 on any failure.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"
work=
while (($#)); do
    case $1 in
        --work) work=$2; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done
T0=$(date +%s)
if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
missing=()
for pair in qemu-system-x86_64:qemu-system-x86 mmdebstrap:mmdebstrap mkfs.ext4:e2fsprogs mosquitto:mosquitto \
    mosquitto_sub:mosquitto-clients xxd:xxd; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
if ((${#missing[@]})); then
    echo "field proof: installing ${missing[*]}"
    $SUDO apt-get install -y "${missing[@]}" >/dev/null || { echo "field proof: apt-get install ${missing[*]} failed" >&2; exit 1; }
fi
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb

target=${CARGO_TARGET_DIR:-$root/target}
vm=$target/vm
mkdir -p "$vm"
# 1. The root file system, from Debian's packages (once).
if [ ! -d "$vm/rootfs" ]; then
    echo "field proof: building the Debian 12 rootfs (once, into $vm/rootfs)"
    rm -rf "$vm/rootfs.tmp"
    $SUDO mmdebstrap --variant=minbase \
        --include=systemd-sysv,udev,dbus,apt,adduser,iproute2,procps,linux-image-amd64,initramfs-tools \
        bookworm "$vm/rootfs.tmp" http://deb.debian.org/debian >"$vm/mmdebstrap.log" 2>&1 ||
        { echo "field proof: mmdebstrap failed, see $vm/mmdebstrap.log" >&2; exit 1; }
    mv "$vm/rootfs.tmp" "$vm/rootfs"
fi
# 2. The .deb, as a user would build it (dev profile: a release build takes
# too long on a shared 2-core machine; the binary is the same code).
cargo build --locked --bin edge-gateway
rm -f "$target"/debian/edge-gateway_*.deb
cargo deb --no-build --profile dev >/dev/null
deb=$(ls "$target"/debian/edge-gateway_*.deb | head -1)
bin=$target/debug/edge-gateway

work=${work:-$vm/runs/$(date +%Y%m%d-%H%M%S)-$$}
mkdir -p "$work"; work=$(cd "$work" && pwd)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# 3. Host side: Mosquitto on a free port, a subscriber, the simulated dock.
port=
for _ in $(seq 50); do
    p=$(shuf -i 20000-60000 -n 1)
    ss -ltn | awk '{print $4}' | grep -q ":$p\$" || { port=$p; break; }
done
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$port" >"$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 & pids+=($!)
sleep 0.5
mosquitto_sub -h 127.0.0.1 -p "$port" -q 2 -t '#' -F '%t %x' >"$work/received.hex" 2>"$work/sub.log" & subpid=$!; pids+=($subpid)
"$bin" simulate --link "$work/dock" --device field-wrist --rate 5 >"$work/sim.log" 2>&1 & simpid=$!; pids+=($simpid)
for _ in $(seq 50); do [ -e "$work/dock" ] && break; sleep 0.1; done

# 4. The disk: a copy of the rootfs plus the agent, the .deb and the config.
echo "field proof: preparing the disk"
r=$work/root
rm -rf "$r"; cp -a "$vm/rootfs" "$r"
echo field-gw >"$r/etc/hostname"
printf '/dev/vda / ext4 rw 0 1\n' >"$r/etc/fstab"
sed -i 's/^root:[^:]*:/root::/' "$r/etc/shadow"
mkdir -p "$r/etc/systemd/network"
printf '[Match]\nName=en*\n[Network]\nDHCP=ipv4\n' >"$r/etc/systemd/network/20-wired.network"
ln -sf /lib/systemd/system/systemd-networkd.service "$r/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
# hvc0 carries the agent's results, not a login prompt.
ln -sf /dev/null "$r/etc/systemd/system/serial-getty@hvc0.service"
install -m 755 "$here/agent.sh" "$r/usr/local/sbin/vm-agent"
cat >"$r/etc/systemd/system/vm-agent.service" <<UNIT
[Unit]
Description=field-proof agent (tests/vm/agent.sh)
After=systemd-networkd.service
[Service]
Type=simple
ExecStart=/usr/local/sbin/vm-agent
[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/vm-agent.service "$r/etc/systemd/system/multi-user.target.wants/vm-agent.service"
cp "$deb" "$r/root/"
cat >"$r/root/gateway.toml" <<TOML
[gateway]
id = "field-gw"
data_dir = "/var/lib/edge-gateway"

# The host's simulated dock on the guest's second 16550 UART.
[[serial]]
name = "dock0"
path = "/dev/ttyS1"
framing = "jsonl"

[pipeline]
batch_max_age = "200ms"

[broker]
enabled = false

# Debug for the serial source only: acks carry DEVICE= into the journal.
[log]
level = "info,edge_gateway::source::serial=debug"

# Plaintext opt-in: the host's Mosquitto behind QEMU's user-mode network.
[upstream]
url = "mqtt://10.0.2.2:$port"
allow_plaintext = true
client_id = "field-gw"
reconnect_min = "200ms"
reconnect_max = "2s"
TOML
kver=$(ls "$r"/boot/vmlinuz-* | head -1); kver=${kver##*/vmlinuz-}
cp "$r/boot/vmlinuz-$kver" "$work/vmlinuz"; cp "$r/boot/initrd.img-$kver" "$work/initrd.img"
rm -f "$work/disk.raw"
mkfs.ext4 -q -F -d "$r" "$work/disk.raw" 3G
rm -rf "$r"
: >"$work/results.log"

# 5. Boot (twice: the agent reboots the guest) until it powers off.
echo "field proof: booting (amd64, TCG); results in $work/results.log"
TB=$(date +%s)
timeout 1500 qemu-system-x86_64 -accel tcg -m 1024 -smp 2 -display none -monitor none -nodefaults \
    -kernel "$work/vmlinuz" -initrd "$work/initrd.img" \
    -append "root=/dev/vda rw console=ttyS0 net.ifnames=1" \
    -drive "file=$work/disk.raw,format=raw,if=virtio" \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0 \
    -serial "file:$work/console.log" \
    -chardev "serial,id=dock,path=$work/dock" -serial chardev:dock \
    -device virtio-serial-pci -chardev "file,id=res,path=$work/results.log" -device virtconsole,chardev=res \
    </dev/null >"$work/qemu.log" 2>&1 & qpid=$!; pids+=($qpid)
tail -f "$work/results.log" & tp=$!; pids+=($tp)
while kill -0 $qpid 2>/dev/null; do
    # The agent's last step: unplug the dock, let the guest drain what was acked.
    if kill -0 "$simpid" 2>/dev/null && grep -q 'AGENT DONE' "$work/results.log"; then kill "$simpid"; fi
    sleep 1
done
kill $tp 2>/dev/null || true
wait $qpid || echo "field proof: qemu exited with $?"
TQ=$(date +%s)

# 6. Exactly once: every reading the dock created reached the subscriber once.
# SIGTERM, then SIGKILL: a dock whose port nobody reads blocks in write(2).
kill "$simpid" 2>/dev/null || true
for _ in $(seq 50); do kill -0 "$simpid" 2>/dev/null || break; sleep 0.1; done
kill -9 "$simpid" 2>/dev/null || true; wait "$simpid" 2>/dev/null || true
sleep 2; kill "$subpid"; wait "$subpid" 2>/dev/null || true
sent=$(sed -n 's/^unplugged: \([0-9]*\) readings sent, \([0-9]*\) pending.*/\1 \2/p' "$work/sim.log")
# Killed: its last one-second report instead.
[ -n "$sent" ] || sent=$(sed -n 's/^sent \([0-9]*\) .*pending \([0-9]*\)$/\1 \2/p' "$work/sim.log" | tail -1)
: >"$work/delivered.jsonl"
# Batches only: the gateway's status messages (online/offline) are not batches.
while read -r topic hex; do
    echo "$hex" | xxd -r -p | "$bin" decode >>"$work/delivered.jsonl" 2>/dev/null || echo "$topic" >>"$work/not-batches"
done <"$work/received.hex"
total=$(wc -l <"$work/delivered.jsonl")
uniq=$(grep -o '"device":"[^"]*","sensor":"[^"]*","seq":[0-9]*' "$work/delivered.jsonl" | sort -u | wc -l)
set -- $sent
# Acked = sent - pending: each must arrive once; a pending one may too (stored,
# its ack lost in flight), never twice.
if [ "${1:-0}" -gt 0 ] && [ "$total" = "$uniq" ] && [ "$uniq" -ge $(( $1 - ${2:-0} )) ] && [ "$uniq" -le "$1" ]; then
    echo "CHECK exactly-once ok dock sent $1 ($2 unacked at unplug), subscriber got $total readings, $uniq distinct" >>"$work/results.log"
else
    echo "CHECK exactly-once FAIL dock sent ${1:-?} (${2:-?} pending), subscriber got $total readings, $uniq distinct" >>"$work/results.log"
fi
tail -1 "$work/results.log"

grep -q 'AGENT DONE' "$work/results.log" || echo "CHECK agent-finished FAIL the guest agent did not finish (see $work/console.log)" >>"$work/results.log"
ok=$(grep -c '^CHECK [^ ]* ok' "$work/results.log" || true)
bad=$(grep '^CHECK [^ ]* FAIL' "$work/results.log" | awk '{print $2}' | tr '\n' ' ' || true)
boot=$(grep -m1 'INFO boot 1 up after' "$work/results.log" | sed 's/.*after \([0-9.]*\) s.*/\1/' || true)
if [ -z "$bad" ]; then
    echo "field proof: PASS, $ok checks ok; boot ${boot:-?} s; VM $((TQ - TB)) s, total $(( $(date +%s) - T0 )) s; $work"
else
    echo "field proof: FAIL ($bad), $ok checks ok; VM $((TQ - TB)) s, total $(( $(date +%s) - T0 )) s; $work"
    exit 1
fi
