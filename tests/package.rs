//! The .deb: cargo-deb packages the debug binary `cargo test` has already
//! built (no release build), `dpkg-deb` reads it back, and its maintainer
//! scripts run for real (adduser, deb-systemd-helper) in a throwaway mount
//! namespace whose /etc is a copy, so the host keeps no user or symlink.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const UNIT: &str = "usr/lib/systemd/system/edge-gateway.service";
const CONF: &str = "etc/edge-gateway/gateway.toml";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{cmd:?} failed:\n{text}{}", String::from_utf8_lossy(&out.stderr));
    text
}

/// Build the .deb into `dir` and return its path.
fn build_deb(dir: &Path) -> PathBuf {
    need("dpkg-deb", "dpkg");
    let has_cargo_deb = Command::new("cargo").args(["deb", "--version"]).output().is_ok_and(|o| o.status.success());
    assert!(
        has_cargo_deb,
        "cargo-deb not found: install it with `cargo install cargo-deb --locked --version 3.8.0` (scripts/test.sh does)"
    );
    // Cargo.toml's asset is target/release/edge-gateway, and cargo-deb
    // warns that --profile dev will become an error. So it gets a scratch
    // target dir whose release/ holds the debug binary.
    let target = dir.join("target");
    std::fs::create_dir_all(target.join("release")).unwrap();
    std::os::unix::fs::symlink(bin(), target.join("release/edge-gateway")).unwrap();
    let out = run(Command::new("cargo")
        .args(["deb", "--no-build", "--locked", "--strip", "--fast", "-o"])
        .arg(dir)
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(repo()));
    let deb = PathBuf::from(out.lines().last().expect("cargo deb prints the .deb's path").trim());
    assert!(deb.is_file(), "{out}");
    deb
}

#[test]
fn deb_holds_the_binary_unit_conffile_and_maintainer_scripts() {
    let dir = tempfile::tempdir().unwrap();
    let deb = build_deb(dir.path());

    let fields = run(Command::new("dpkg-deb").args(["-f"]).arg(&deb).args(["Package", "Depends"]));
    assert!(fields.contains("Package: edge-gateway"), "{fields}");
    assert!(fields.contains("adduser") && fields.contains("libc6"), "{fields}");

    // Mode, owner and path of each file.
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    let entry = |path: &str| {
        listing
            .lines()
            .find(|l| l.ends_with(&format!("./{path}")))
            .unwrap_or_else(|| panic!("{path} not in the .deb:\n{listing}"))
            .to_string()
    };
    assert!(entry("usr/bin/edge-gateway").starts_with("-rwxr-xr-x 0/0 "), "{listing}");
    assert!(entry(UNIT).starts_with("-rw-r--r-- 0/0 "), "{listing}");
    assert!(entry(CONF).starts_with("-rw-r--r-- 0/0 "), "{listing}");

    let ctl = dir.path().join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&ctl));
    // dpkg keeps the admin's edits of a conffile across upgrades.
    assert_eq!(std::fs::read_to_string(ctl.join("conffiles")).unwrap(), format!("/{CONF}\n"));
    for script in ["postinst", "prerm", "postrm"] {
        run(Command::new("sh").arg("-n").arg(ctl.join(script)));
    }
    let postinst = std::fs::read_to_string(ctl.join("postinst")).unwrap();
    assert!(postinst.contains("adduser --quiet --system --group --home /var/lib/edge-gateway"), "{postinst}");
    // Enabled at install, started only by the admin; upgrades restart it if running.
    assert!(postinst.contains("deb-systemd-helper enable edge-gateway.service"), "{postinst}");
    assert!(postinst.contains("deb-systemd-invoke try-restart edge-gateway.service"), "{postinst}");
    assert!(!postinst.contains("deb-systemd-invoke start"), "{postinst}");

    // The files are the repository's, and the packaged binary accepts the
    // packaged config.
    let root = dir.path().join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    let same = |packaged: &str, source: &str| {
        assert_eq!(
            std::fs::read(root.join(packaged)).unwrap(),
            std::fs::read(repo().join(source)).unwrap(),
            "{packaged} differs from {source}"
        );
    };
    same(UNIT, "systemd/edge-gateway.service");
    same(CONF, "config/gateway.pi.toml");
    let check = run(Command::new(root.join("usr/bin/edge-gateway")).arg("check-config").arg(root.join(CONF)));
    assert!(check.contains(": ok: gateway pi-gw01"), "{check}");
}

/// postinst, a second postinst (an upgrade), prerm and postrm purge, run by
/// /bin/sh with the real adduser and deb-systemd-helper. In the namespace,
/// /etc is a copy without the user and without a `bluetooth` group, and
/// /var/lib and the unit directory are fresh tmpfs mounts.
#[test]
fn maintainer_scripts_make_the_user_groups_and_data_dir_and_purge_removes_them() {
    need("unshare", "util-linux");
    need("adduser", "adduser");
    need("deb-systemd-helper", "init-system-helpers");
    assert!(
        // SAFETY: geteuid cannot fail.
        unsafe { nix::libc::geteuid() } == 0,
        "needs root for a mount namespace and adduser: run `sudo -E cargo test --test package` (CI runs as root)"
    );
    let dir = tempfile::tempdir().unwrap();
    let deb = build_deb(dir.path());
    let ctl = dir.path().join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&ctl));
    let root = dir.path().join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));

    let script = r#"
        set -eu
        work=$1 ctl=$2 root=$3
        cp -a /etc "$work/etc"
        mount --bind "$work/etc" /etc
        mount -t tmpfs tmpfs /var/lib
        mount -t tmpfs tmpfs /usr/lib/systemd/system
        cp "$root/usr/lib/systemd/system/edge-gateway.service" /usr/lib/systemd/system/
        ! getent passwd edge-gateway
        if getent group bluetooth >/dev/null; then groupdel bluetooth; fi
        # As dpkg runs them (deb-systemd-helper refuses to run otherwise).
        export DPKG_MAINTSCRIPT_PACKAGE=edge-gateway
        # dpkg unpacks the conffile (0644 root:root) before postinst runs.
        mkdir -p /etc/edge-gateway
        install -m 0644 "$root/etc/edge-gateway/gateway.toml" /etc/edge-gateway/gateway.toml
        DPKG_MAINTSCRIPT_NAME=postinst sh "$ctl/postinst" configure
        echo "config: $(stat -c '%U %G %a' /etc/edge-gateway/gateway.toml)"
        echo "passwd: $(getent passwd edge-gateway | cut -d: -f6-)"
        echo "groups: $(id -nG edge-gateway)"
        echo "datadir: $(stat -c '%U %G %a' /var/lib/edge-gateway)"
        echo "wants: $(readlink /etc/systemd/system/multi-user.target.wants/edge-gateway.service)"
        DPKG_MAINTSCRIPT_NAME=postinst sh "$ctl/postinst" configure 0.1.0-1
        echo "upgrade groups: $(id -nG edge-gateway)"
        DPKG_MAINTSCRIPT_NAME=prerm sh "$ctl/prerm" remove
        DPKG_MAINTSCRIPT_NAME=postrm sh "$ctl/postrm" remove
        DPKG_MAINTSCRIPT_NAME=postrm sh "$ctl/postrm" purge
        echo "after purge: $(ls -d /var/lib/edge-gateway /etc/systemd/system/multi-user.target.wants/edge-gateway.service 2>/dev/null | wc -l) left"
    "#;
    let out = run(Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script, "sh"])
        .arg(dir.path())
        .arg(&ctl)
        .arg(&root));
    assert!(out.contains("passwd: /var/lib/edge-gateway:/usr/sbin/nologin\n"), "{out}");
    for line in out.lines().filter(|l| l.contains("groups: ")) {
        let groups: Vec<&str> = line.split_once(": ").unwrap().1.split(' ').collect();
        for g in ["edge-gateway", "dialout", "bluetooth"] {
            assert!(groups.contains(&g), "{g} missing: {out}");
        }
    }
    assert!(out.contains("datadir: edge-gateway edge-gateway 700\n"), "{out}");
    // It holds password hashes and bindkeys: the service's group reads it, nobody else.
    assert!(out.contains("config: root edge-gateway 640\n"), "{out}");
    // Enabled: /lib is /usr/lib on merged-/usr systems, and the helper prefers it.
    let wants = out.lines().find(|l| l.starts_with("wants: ")).unwrap();
    assert!(
        wants.ends_with(" /lib/systemd/system/edge-gateway.service")
            || wants.ends_with(" /usr/lib/systemd/system/edge-gateway.service"),
        "{out}"
    );
    assert!(out.contains("after purge: 0 left"), "{out}");
}
