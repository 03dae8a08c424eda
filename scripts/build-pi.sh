#!/usr/bin/env bash
# Build edge-gateway for a Raspberry Pi without Docker: cargo + Debian's
# cross gcc (which also compiles ring's C/asm and the vendored libdbus).
#
#   scripts/build-pi.sh aarch64          # Pi 3/4/5, 64-bit OS (release)
#   scripts/build-pi.sh armv7            # 32-bit Raspberry Pi OS (release)
#   scripts/build-pi.sh aarch64 --deb    # ... and the .deb (cargo-deb)
#   scripts/build-pi.sh aarch64 --debug  # dev profile (quicker; the qemu smoke test uses it)
#
# Prints the binary's path (and the .deb's with --deb) on stdout, one per line.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: $0 aarch64|armv7 [--debug] [--deb]" >&2; exit 2; }
[ $# -ge 1 ] || usage
case "$1" in
    aarch64 | aarch64-unknown-linux-gnu) triple=aarch64-unknown-linux-gnu gcc=aarch64-linux-gnu-gcc pkg=gcc-aarch64-linux-gnu ;;
    armv7 | armv7-unknown-linux-gnueabihf) triple=armv7-unknown-linux-gnueabihf gcc=arm-linux-gnueabihf-gcc pkg=gcc-arm-linux-gnueabihf ;;
    *) usage ;;
esac
shift
profile=release deb=0
for a in "$@"; do
    case "$a" in
        --debug) profile=dev ;;
        --deb) deb=1 ;;
        *) usage ;;
    esac
done

# Missing tools fail the build with the command that installs them.
if ! command -v "$gcc" >/dev/null; then
    echo "$gcc not found: sudo apt-get install -y $pkg" >&2
    exit 1
fi
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$triple"; then
    echo "Rust target $triple missing: rustup target add $triple" >&2
    exit 1
fi
if [ "$deb" = 1 ] && ! command -v cargo-deb >/dev/null; then
    echo "cargo-deb not found: cargo install cargo-deb --locked" >&2
    exit 1
fi

# cargo links with the cross gcc; the cc crate (ring, libdbus-sys vendored)
# compiles C with it. The cc crate finds the matching `ar` from its prefix.
tu=$(echo "$triple" | tr 'a-z-' 'A-Z_')
export "CARGO_TARGET_${tu}_LINKER=$gcc"
export "CC_${triple//-/_}=$gcc"

cargo build --locked --profile "$profile" --target "$triple" --bin edge-gateway >&2
dir=$([ "$profile" = dev ] && echo debug || echo release)
bin="${CARGO_TARGET_DIR:-target}/$triple/$dir/edge-gateway"
echo "$bin"
if [ "$deb" = 1 ]; then
    # The binary is built above; cargo-deb only packages it (the release
    # profile strips already). It prints the .deb's path.
    cargo deb --no-build --target "$triple" --profile "$profile" --no-strip --locked | tail -1
fi
