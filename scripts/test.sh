#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine: installs what it needs,
# then runs every test. `.ci/run` calls exactly this (no arguments).
#   --quick  unit and model tests only (seconds after a warm build; no tools needed)
#   --rig    the power-cut rig alone (POWERCUT_CYCLES, default 20)
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-all}
case "$mode" in
all | --rig) ;;
--quick)
    # The library's unit tests (queue crash model, dedup, acks, codecs,
    # config) and the in-process pipeline model test: no child processes.
    cargo test --locked --lib -- --test-threads="${TEST_THREADS:-2}"
    exec cargo test --locked --test pipeline_model -- --test-threads="${TEST_THREADS:-2}"
    ;;
*)
    echo "usage: $0 [--quick | --rig]" >&2
    exit 2
    ;;
esac

# Debian packages the tests drive for real, added as features need them
# (serial tests need only the kernel's PTYs), each installed only when its
# tool is missing: "tool:package". (dbus: a private dbus-daemon carries the
# fake BlueZ of the BLE tests; qemu, nbdkit, a static busybox, cpio,
# mkfs.ext4 and strip build and run the power-cut rig's VM; mmdebstrap and
# xxd the field proof's Debian VM, tests/vm/.)
need_apt=()
for pair in mosquitto:mosquitto mosquitto_pub:mosquitto-clients mosquitto_sub:mosquitto-clients openssl:openssl dbus-daemon:dbus \
    qemu-system-x86_64:qemu-system-x86 nbdkit:nbdkit busybox:busybox-static cpio:cpio mkfs.ext4:e2fsprogs strip:binutils \
    mmdebstrap:mmdebstrap xxd:xxd; do
    tool=${pair%%:*} pkg=${pair#*:}
    if ! command -v "$tool" >/dev/null && [[ " ${need_apt[*]} " != *" $pkg "* ]]; then
        need_apt+=("$pkg")
    fi
done
# The rig's guest has no libc: a dynamically linked busybox cannot run there.
if command -v busybox >/dev/null && ldd "$(command -v busybox)" >/dev/null 2>&1; then
    need_apt+=(busybox-static)
fi
if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust with rustup (https://rustup.rs), then re-run $0" >&2
    exit 1
fi
if ((${#need_apt[@]})); then
    echo "installing: ${need_apt[*]}"
    if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi
# tests/package.rs builds the .deb with cargo-deb, which Debian does not
# package: built from crates.io when missing (about 1.5 min here).
if ! cargo deb --version >/dev/null 2>&1; then
    echo "installing: cargo-deb 3.8.0 (cargo install)"
    cargo install cargo-deb --locked --version 3.8.0
fi

if [ "$mode" = --rig ]; then
    exec tests/powercut/run.sh --cycles "${POWERCUT_CYCLES:-20}"
fi

# Debug builds: a release build of this tree costs minutes and tests do not
# need it. Benchmarks are compiled (so they cannot rot) but not run.
cargo build --all-targets --locked
cargo test --all-targets --locked -- --test-threads="${TEST_THREADS:-2}"
# The power-cut rig, short: the real binary in a VM, its power cut 20 times
# at random moments (~3 min; docs/testing.md "Power-cut rig"). The long soak is run by hand.
tests/powercut/run.sh --cycles "${POWERCUT_CYCLES:-20}"
# The same with [[rules]] on (an alarm lane routed to two topics, an
# aggregate checked window by window): 10 cuts (~2 min).
tests/powercut/run.sh --cycles "${POWERCUT_RULES_CYCLES:-10}" --rules
# The field proof (the .deb installed with apt on Debian 12, systemd as PID
# 1, in a VM; docs/field-proof.md) takes ~10 min on a fresh machine (the
# rootfs build alone is ~7.5 min), which does not fit the CI budget: run it
# by hand with tests/vm/run.sh, or here with FIELD_PROOF=1.
if [ "${FIELD_PROOF:-0}" = 1 ]; then
    tests/vm/run.sh
else
    echo "field proof skipped (FIELD_PROOF=1 $0, or tests/vm/run.sh, runs it)"
fi
