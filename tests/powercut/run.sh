#!/usr/bin/env bash
# Power-cut rig: the real edge-gateway binary in a small VM whose virtual disk
# loses everything not flushed, its power cut at random moments, again and
# again. See docs/testing.md "Power-cut rig".
#
#   tests/powercut/run.sh [--cycles N] [--seed S] [--rate R] [--work DIR] [--when-full P]
#
#   --cycles N  power cuts (default 30)
#   --seed S    repeat a run (the seed is printed at the start of every run)
#   --rate R    readings per second from the simulated wearable (default 40)
#   --work DIR  keep VM images and logs here (default: a fresh dir under
#               target/powercut/runs/, kept when the run fails)
#   --when-full P  drop_oldest (a 32 MiB queue) or reject_new (a 16 KiB
#               queue, full whenever the uplink is away for a few seconds);
#               default: by the seed, so half the runs use each
#   --bin PATH  run this edge-gateway binary instead of building one (e.g. a
#               build with a planted bug, to see the rig catch it)
#   --rules     run the gateway with tests/powercut/rules.toml (a conversion,
#               an alarm lane with its own topic, an aggregate the rig checks
#               window by window)
#
# This script prepares the guest (kernel, modules, busybox, the debug binary
# and its libraries, cached under target/powercut/) and then runs the cycles
# in tests/powercut/main.rs, an ignored cargo test:
#   cargo test --test powercut -- --ignored --nocapture
# It never skips: a missing tool fails the run with the command that installs
# it (scripts/test.sh installs them).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"

cycles=30 seed= rate=40 work= when_full= bin= rules=
while (($#)); do
    case $1 in
        --cycles) cycles=$2; shift 2 ;;
        --seed) seed=$2; shift 2 ;;
        --rate) rate=$2; shift 2 ;;
        --work) work=$2; shift 2 ;;
        --when-full) when_full=$2; shift 2 ;;
        --bin) bin=$(realpath "$2"); shift 2 ;;
        --rules) rules=1; shift ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        *) echo "unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done

missing=()
for pair in qemu-system-x86_64:qemu-system-x86 nbdkit:nbdkit busybox:busybox-static cpio:cpio \
    mkfs.ext4:e2fsprogs strip:binutils mosquitto:mosquitto mosquitto_sub:mosquitto-clients \
    apt-get:apt dpkg-deb:dpkg; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
if ((${#missing[@]})); then
    echo "power-cut rig: missing tools; install them with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi
# busybox must be static: it runs in a guest without libc.
if ldd "$(command -v busybox)" >/dev/null 2>&1; then
    echo "power-cut rig: $(command -v busybox) is not static; install busybox-static" >&2
    exit 1
fi

target=${CARGO_TARGET_DIR:-$root/target}
assets=$target/powercut
mkdir -p "$assets"

# Kernel and modules: Debian's stock kernel, fetched once.
modules=(crc32c_generic crc16 mbcache jbd2 ext4 virtio_ring virtio virtio_pci_legacy_dev
    virtio_pci_modern_dev virtio_pci virtio_blk failover net_failover virtio_net virtio_console)
if [ ! -s "$assets/kernel/vmlinuz" ]; then
    echo "power-cut rig: fetching Debian's kernel (once, into $assets/kernel)"
    kpkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'; }
    pkg=$(kpkg)
    if [ -z "$pkg" ]; then
        if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
        $SUDO apt-get update -qq
        pkg=$(kpkg)
    fi
    [ -n "$pkg" ] || { echo "power-cut rig: apt-cache knows no linux-image-amd64; is this Debian?" >&2; exit 1; }
    rm -rf "$assets/kernel.tmp" && mkdir -p "$assets/kernel.tmp/x"
    (cd "$assets/kernel.tmp" && apt-get download -q "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
    deb=$(ls "$assets"/kernel.tmp/*.deb 2>/dev/null | head -1)
    [ -n "$deb" ] || { echo "power-cut rig: apt-get download $pkg failed" >&2; exit 1; }
    dpkg-deb -x "$deb" "$assets/kernel.tmp/x"
    mkdir -p "$assets/kernel.tmp/k/modules"
    cp "$assets"/kernel.tmp/x/boot/vmlinuz-* "$assets/kernel.tmp/k/vmlinuz"
    for m in "${modules[@]}"; do
        f=$(find "$assets/kernel.tmp/x/lib/modules" -name "$m.ko*" | head -1)
        [ -n "$f" ] || { echo "power-cut rig: module $m not in $pkg" >&2; exit 1; }
        case $f in
            *.ko) cp "$f" "$assets/kernel.tmp/k/modules/$m.ko" ;;
            *.ko.xz) xz -dc "$f" >"$assets/kernel.tmp/k/modules/$m.ko" ;;
            *.ko.zst) zstd -qdc "$f" >"$assets/kernel.tmp/k/modules/$m.ko" ;;
        esac
    done
    echo "$pkg" >"$assets/kernel.tmp/k/package"
    rm -rf "$assets/kernel"
    mv "$assets/kernel.tmp/k" "$assets/kernel"
    rm -rf "$assets/kernel.tmp"
fi

# The binary CI already builds (debug, dynamically linked): a no-op after
# `cargo build --all-targets`.
if [ -z "$bin" ]; then
    cargo build --locked --bin edge-gateway
    bin=$target/debug/edge-gateway
fi

work=${work:-$assets/runs/$(date +%Y%m%d-%H%M%S)-$$}
mkdir -p "$work"
work=$(cd "$work" && pwd)

# The initramfs (per run, so runs can go in parallel): busybox, modules,
# init, config, the binary (stripped: the guest needs no line tables, and
# unpacking time follows size) and the libraries ldd names, at the same
# paths. Uncompressed: unpacking is a copy.
stage=$work/initramfs
rm -rf "$stage"
mkdir -p "$stage"/{bin,etc,lib/modules,proc,sys,dev,data}
cp "$(command -v busybox)" "$stage/bin/busybox"
cp "$assets"/kernel/modules/*.ko "$stage/lib/modules/"
install -m 755 "$here/init" "$stage/init"
cp "$here/gateway.toml.in" "$stage/etc/gateway.toml.in"
if [[ -n $rules ]]; then
    cat "$here/rules.toml" >>"$stage/etc/gateway.toml.in"
fi
strip -o "$stage/bin/edge-gateway" "$bin"
for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
    mkdir -p "$stage$(dirname "$lib")"
    cp -L "$lib" "$stage$lib"
done
(cd "$stage" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) >"$work/initrd.cpio"
rm -rf "$stage"

export POWERCUT_KERNEL=$assets/kernel/vmlinuz POWERCUT_INITRD=$work/initrd.cpio POWERCUT_WORK=$work
export POWERCUT_CYCLES=$cycles POWERCUT_RATE=$rate POWERCUT_SEED=$seed POWERCUT_WHEN_FULL=$when_full
export POWERCUT_RULES=$rules
exec cargo test --locked --test powercut -- --ignored --nocapture
