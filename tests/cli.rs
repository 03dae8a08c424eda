//! The CLI's contract: config errors, decode, and shutdown on signals.

mod common;
use common::*;
use std::time::Duration;

fn check(dir: &std::path::Path, body: &str) -> (i32, String, String) {
    let p = dir.join("gw.toml");
    std::fs::write(&p, body).unwrap();
    cli(&["check-config", p.to_str().unwrap()])
}

const BASE: &str = "[gateway]\nid = \"gw\"\ndata_dir = \"/tmp/x\"\n\n[pipeline]\nbatch_max_age = \"200ms\"\n";

#[test]
fn check_config_accepts_the_shipped_configs() {
    for f in ["config/gateway.example.toml", "config/demo.toml", "config/gateway.pi.toml"] {
        let (code, out, err) = cli(&["check-config", f]);
        assert_eq!(code, 0, "{f}: {err}");
        assert!(out.contains(": ok: gateway ") && out.lines().count() == 1, "{out}");
    }
}

#[test]
fn check_config_summarises_the_upstream_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "hunter2-secret\n").unwrap();
    let body = format!(
        "{BASE}\n[upstream]\nurl = \"mqtts://cloud.example:8883\"\nusername = \"gw\"\npassword_file = {:?}\nqos = 1\n",
        pw.display().to_string()
    );
    let (code, out, err) = check(dir.path(), &body);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("upstream mqtts://cloud.example:8883 as edge-gateway-gw (QoS 1, MQTT auto, user + password file)"),
        "{out}"
    );
    assert!(!out.contains("hunter2"));
    let (_, out, _) = check(dir.path(), BASE);
    assert!(out.contains("no upstream (batches stay queued)"), "{out}");
    // Plaintext is refused unless asked for, naming the key.
    let (code, _, err) = check(dir.path(), &body.replace("mqtts://", "mqtt://"));
    assert_eq!(code, 1);
    assert!(err.contains("key `upstream.url`") && err.contains("allow_plaintext"), "{err}");
}

#[test]
fn check_config_names_path_line_col_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let shown = dir.path().join("gw.toml").display().to_string();
    let cases = [
        // unknown key
        (format!("{BASE}batch_size = 3\n"), ":7:1: ", "batch_size"),
        // wrong type
        (format!("{BASE}batch_max_readings = \"many\"\n"), ":7:22: ", "pipeline.batch_max_readings"),
        // bad duration
        (BASE.replace("\"200ms\"", "\"2 fortnights\""), ":6:17: ", "pipeline.batch_max_age"),
    ];
    for (body, at, key) in cases {
        let (code, out, err) = check(dir.path(), &body);
        assert_eq!(code, 1, "should fail: {body}");
        assert!(out.is_empty());
        let line = err.trim();
        assert!(line.starts_with(&format!("{shown}{at}")), "expected {shown}{at}…, got: {line}");
        assert!(line.contains(key), "expected key {key} in: {line}");
    }
}

#[test]
fn decode_reads_both_formats_from_stdin() {
    use edge_gateway::{Batch, Format, Reading, Value};
    use std::io::Write;
    let batch = Batch {
        gateway: "gw".into(),
        batch: 9,
        readings: vec![Reading {
            device: "d1".into(),
            sensor: "hr".into(),
            seq: Some(3),
            ts: 1000,
            value: Value::Number(61.0),
            boot: None,
        }],
    };
    for f in [Format::Json, Format::Postcard] {
        let mut child = std::process::Command::new(bin())
            .arg("decode")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&batch.encode(f)).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8(out.stdout).unwrap().trim(),
            r#"{"gateway":"gw","batch":9,"device":"d1","sensor":"hr","seq":3,"ts":1000,"value":61.0}"#
        );
    }
    let out = std::process::Command::new(bin()).arg("decode").stdin(std::process::Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "empty input is an error");
}

#[test]
fn sigterm_and_sigint_exit_zero_quickly_with_an_empty_queue() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-port");
    let cfg = write_config(dir.path(), &[Port { name: "p0", path: &missing, framing: "jsonl" }], "", "");
    use nix::sys::signal::Signal;
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        let gw = Gateway::start(&cfg);
        assert!(wait_until(Duration::from_secs(10), || gw.log_text().contains("running")), "{}", gw.log_text());
        let (code, took) = gw.stop_with(sig);
        assert_eq!(code, Some(0));
        assert!(took < Duration::from_secs(5), "took {took:?}");
    }
    let st = queue_status(&cfg);
    assert_eq!(st["batches"], 0);
    assert_eq!(st["readings"], 0);
}

#[test]
fn a_second_gateway_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &[], "", "");
    let gw = Gateway::start(&cfg);
    assert!(wait_until(Duration::from_secs(10), || gw.log_text().contains("running")), "{}", gw.log_text());
    let (code, _, err) = cli(&["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.to_lowercase().contains("lock") || err.contains("in use"), "{err}");
    gw.kill9();
}

/// `edge-gateway demo`, the README's first command: devices, gateway and a
/// cloud that goes away half-way; every reading handed over arrives once,
/// and the cloud's command reaches its wearable and is replied once.
#[test]
fn demo_delivers_everything_once_through_an_outage() {
    let out = std::process::Command::new(common::bin())
        .args(["demo", "--duration", "6s", "--outage", "2s"])
        .output()
        .expect("run demo");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("cloud DOWN") && text.contains("the cloud is back"), "{text}");
    let done = text.lines().find(|l| l.starts_with("done:")).unwrap_or_else(|| panic!("{text}"));
    let num = |after: &str| -> u64 {
        let i = done.find(after).unwrap_or_else(|| panic!("{after:?} in {done}")) + after.len();
        done[i..].split_whitespace().next().unwrap().parse().unwrap()
    };
    let (handed, received) = (num("devices handed over "), num("the cloud received "));
    assert!(handed > 300, "{done}");
    assert_eq!(handed, received, "{done}");
    assert!(done.contains(&format!("{handed} acked")) && done.contains(" 0 batches twice"), "{done}");
    // By name, not by count: one reading lost and another doubled would cancel out above.
    assert!(
        done.contains("by (device, sensor, seq): 0 acked readings missing, 0 delivered twice, 0 never sent"),
        "{done}"
    );
    assert!(done.contains("exit status: 0"), "{done}");
    // The cloud's one command reached wrist-01 and came back as one reply.
    assert!(text.contains("wrist-01 got command demo-1"), "{text}");
    assert!(text.contains("commands: 1 sent, 1 replied (delivered)"), "{text}");
}
