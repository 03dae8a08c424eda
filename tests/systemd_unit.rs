//! The shipped unit file: `systemd-analyze verify` is clean and
//! `systemd-analyze security` rates its exposure at most 3.0, checked with
//! the real systemd tools against the real file (ExecStart pointed at the
//! binary under test, which verify insists exists).

mod common;

use common::*;

fn unit_for_test(dir: &std::path::Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/edge-gateway.service")).unwrap();
    for want in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "StateDirectory=edge-gateway",
        "ConfigurationDirectory=edge-gateway",
        "User=edge-gateway",
        "SupplementaryGroups=dialout bluetooth",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "ProtectSystem=strict",
        "SystemCallFilter=@system-service",
        "CapabilityBoundingSet=\n",
        // issue 19: bounded memory and tasks, a private queue, TLS after the clock is set.
        "MemoryMax=",
        "TasksMax=",
        "StateDirectoryMode=0700",
        "UMask=0077",
        "time-sync.target",
    ] {
        assert!(text.contains(want), "the unit lacks {want:?}");
    }
    let path = dir.join("edge-gateway.service");
    std::fs::write(&path, text.replace("/usr/bin/edge-gateway", bin())).unwrap();
    path
}

#[test]
fn unit_verifies_and_exposure_is_at_most_3() {
    need("systemd-analyze", "systemd");
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_for_test(dir.path());
    let out = std::process::Command::new("systemd-analyze").arg("verify").arg(&unit).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "systemd-analyze verify failed:\n{said}");
    let ours: Vec<&str> = said.lines().filter(|l| l.contains("edge-gateway.service")).collect();
    assert!(ours.is_empty(), "systemd-analyze verify complains:\n{said}");

    let out = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure line:\n{text}\n{}", String::from_utf8_lossy(&out.stderr)));
    let level: f64 = line.split(": ").nth(1).and_then(|s| s.split_whitespace().next()).unwrap().parse().unwrap();
    eprintln!("{line}");
    assert!(level <= 3.0, "{line}\n{text}");
}
