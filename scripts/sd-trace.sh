#!/usr/bin/env bash
# Which file the gateway's SD-card bytes go to, by hand (docs/performance.md,
# "Where the 2.5 went, by file"). Runs the `sdwear` bench at a site's pace on
# a fresh journalled ext4 image (as a Pi's root file system) with ext4's and
# iomap's tracepoints on, and splits what reached the device by inode: pages
# written back (`ext4_writepages_result`) and direct writes
# (`iomap_dio_rw_begin`), named by a listing of the data dir every 0.3 s.
#
#   sudo scripts/sd-trace.sh /tmp/sd 360     # 6 minutes, 1 MiB segments
#   SDWEAR_STORE= sudo -E scripts/sd-trace.sh /tmp/sd 60   # default segments
#
# Needs root (loop mount, /sys/kernel/tracing), mkfs.ext4, python3, mosquitto.
# Env: EDGE_GATEWAY_BIN (default: a release build of this checkout),
# SDWEAR_STORE (default `segment_bytes = 1048576`), SDWEAR_PIPELINE,
# SD_TRACE_FROM (count only from this many seconds into the gateway's run,
# e.g. 1800 of a 3600 s run for the steady state; encoded bytes are then
# taken pro rata, the bench's pace being steady).
# Not run in CI. A file reused under another name (a kept segment) shows
# under all its names; names with 20 digits (segments) are shown as N.
set -euo pipefail
out=${1:?usage: $0 OUT-PREFIX [SECS]}
secs=${2:-360}
root=$(cd "$(dirname "$0")/.." && pwd)
T=/sys/kernel/tracing
[ -w "$T/trace" ] || { echo "no writable $T (run as root; mount -t tracefs nodev $T)" >&2; exit 2; }
for t in mkfs.ext4 python3 mosquitto; do
    command -v "$t" >/dev/null || { echo "$t missing: apt-get install -y e2fsprogs python3 mosquitto" >&2; exit 2; }
done
cd "$root"
if [ -z "${EDGE_GATEWAY_BIN:-}" ]; then
    cargo build --release --quiet --bin edge-gateway
    export EDGE_GATEWAY_BIN=$root/target/release/edge-gateway
fi
export SDWEAR_STORE=${SDWEAR_STORE-segment_bytes = 1048576} SDWEAR_SECS=$secs
cargo bench --quiet --bench sdwear --no-run

img=$(mktemp /var/tmp/sd-trace.XXXXXX.img)
mnt=$(mktemp -d)
truncate -s 2G "$img"
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$img"
mount -o loop "$img" "$mnt"
dev=$(findmnt -n -o MAJ:MIN --target "$mnt" | tr -d ' ')
buf=$(cat $T/buffer_size_kb)
events="ext4/ext4_writepages_result iomap/iomap_dio_rw_begin jbd2/jbd2_commit_logging"
pids=()
cleanup() {
    echo 0 > $T/tracing_on
    for e in $events; do echo 0 > "$T/events/$e/enable" 2>/dev/null || true; done
    echo "$buf" > $T/buffer_size_kb
    echo 1 > $T/tracing_on
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    umount "$mnt" 2>/dev/null || true
    rm -rf "$img" "$mnt"
}
trap cleanup EXIT
echo 0 > $T/tracing_on
echo > $T/trace
echo 65536 > $T/buffer_size_kb
for e in $events; do echo 1 > "$T/events/$e/enable" 2>/dev/null || true; done
echo 1 > $T/tracing_on
cat $T/trace_pipe > "$out.trace" &
pids+=($!)
(while true; do find "$mnt" -xdev -printf '%i %P\n' 2>/dev/null; sleep 0.3; done) > "$out.inodes" &
pids+=($!)
TMPDIR=$mnt cargo bench --quiet --bench sdwear | tee "$out.log"
sleep 1
python3 - "$out" "$dev" "${SD_TRACE_FROM:-0}" <<'EOF'
import collections, re, sys
out, dev, skip = sys.argv[1], sys.argv[2], float(sys.argv[3])
major, minor = dev.split(":")
names = collections.defaultdict(set)
for line in open(out + ".inodes"):
    ino, _, path = line.rstrip("\n").partition(" ")
    if path:
        names[int(ino)].add(re.sub(r"^\.tmp\w+/", "", re.sub(r"\d{20}", "N", path)))
m = re.search(r"\((\d+) encoded\)", open(out + ".log").read())
encoded = float(m.group(1)) if m else 0.0
events = []
for line in open(out + ".trace"):
    m = re.search(r" (\d+\.\d+): (\w+): (.*)", line)
    if m:
        events.append((float(m.group(1)), m.group(2), m.group(3)))
# The gateway's run: from its first direct write to its last (Mosquitto's
# run after it, on the same image, writes through the page cache only).
direct = [t for t, ev, rest in events if ev == "iomap_dio_rw_begin" and rest.startswith(f"dev {major}:{minor} ")]
t0, t1 = (min(direct) - 1.0, max(direct) + 0.5) if direct else (0.0, float("inf"))
if skip and direct:
    encoded *= max(0.0, 1.0 - skip / (t1 - t0))
    t0 += skip
bytes_by = collections.Counter()
commits = 0
for t, ev, rest in events:
    if not t0 <= t <= t1:
        continue
    if ev == "ext4_writepages_result" and rest.startswith(f"dev {major},{minor} "):
        ino = int(re.search(r"ino (\d+)", rest).group(1))
        n = int(re.search(r"pages_written (\d+)", rest).group(1)) * 4096
        kind = "pages"
    elif ev == "iomap_dio_rw_begin" and rest.startswith(f"dev {major}:{minor} "):
        ino = int(re.search(r"ino 0x([0-9a-f]+)", rest).group(1), 16)
        n = int(re.search(r"length 0x([0-9a-f]+)", rest).group(1), 16)
        kind = "direct"
    elif ev == "jbd2_commit_logging" and (f"dev {major},{minor}" in rest or f"{major}:{minor}" in rest):
        commits += 1
        continue
    else:
        continue
    bytes_by[kind + " " + " / ".join(sorted(names.get(ino, {"?"})))] += n
print(f"\nby file, per encoded byte ({t1 - t0:.0f} s of the gateway's run, from {skip:.0f} s; {encoded:.0f} encoded bytes):")
for k, v in bytes_by.most_common():
    share = f"{v / encoded:6.3f}" if encoded else "     -"
    print(f"{v:>12} {share}  {k[:110]}")
total = sum(bytes_by.values())
print(f"{total:>12} {total / encoded if encoded else 0:6.3f}  total; {commits} journal commits")
EOF
