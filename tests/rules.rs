//! `[[rules]]` end to end: simulated wearables on PTYs → the real binary →
//! a real Mosquitto over TLS → `mosquitto_sub` on the readings topic and on
//! the alarms topics. Every action is on (a filter with a condition, a unit
//! conversion, a route with a lane, a downsample, an aggregate), and what
//! arrives is compared with what the rules make of the readings the devices
//! sent, computed here offline: each expected output exactly once, nothing
//! else. The second test does it through five SIGKILLs and a broker outage.

mod common;
use common::mosquitto::*;
use common::*;
use edge_gateway::config::Framing;
use edge_gateway::demo::sim::{SimDevice, XorShift};
use edge_gateway::reading::{Reading, Value};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

const PIPELINE: &str =
    "batch_max_age = \"50ms\"\nbatch_max_readings = 200\ndedup_max_per_device = 200000\nack_gap_timeout = \"2s\"";
const STORE: &str = "fsync_interval = \"50ms\"";

/// The sim devices stamp ts = epoch + seq (1 ms apart) and rotate through
/// heart_rate, skin_temp, accel: so 100 ms windows hold ~33 heart rates,
/// and a 10 ms downsample keeps one accel reading per 10 ms of device time.
/// Device time runs at a tenth of real time here (one reading per device
/// per 10 ms), so 300 ms of lateness is 3 s of real time: enough for what a
/// device resends after a gateway restart to count in its window.
const RULES: &str = r#"
[[rules]]
name = "cold-probe"
match = { sensor = "skin_temp" }
when = "value < 10"
filter = true

[[rules]]
name = "skin-c"
match = { sensor = "skin_temp", source = "serial" }
transform = { rename = "skin_c", scale = 0.5, offset = 1.0, round = 2 }

[[rules]]
name = "hr-alarm"
match = { sensor = "heart_rate" }
when = "value > 100"
lane = "alarm"
route = ["gateways/{gateway}/alarms/{device}", "gateways/{gateway}/alarms/all"]

[[rules]]
name = "accel-100hz"
match = { device = "wrist-*", sensor = "accel" }
downsample = { every = "10ms" }

[[rules]]
name = "hr-100ms"
match = { sensor = "heart_rate" }
aggregate = { window = "100ms", emit = ["count", "mean", "max"], lateness = "300ms" }
"#;

fn upstream(m: &Mosquitto, ca: &Path) -> String {
    format!(
        "[upstream]\nurl = \"mqtts://localhost:{}\"\nca_file = {:?}\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\nkeep_alive = \"5s\"\n",
        m.tls_port,
        ca.display().to_string()
    )
}

/// What should arrive: (topic kind, device, sensor, seq or ts) → value.
/// Topic kind: "readings" or "alarms/<device>".
type Outputs = HashMap<(String, String, String, u64), Value>;

fn expected(devices: &[SimDevice]) -> Outputs {
    let mut out = Outputs::new();
    for d in devices {
        let mut windows: std::collections::BTreeMap<u64, Vec<f64>> = Default::default();
        for r in d.created() {
            let seq = r.seq.unwrap();
            let num = |r: &Reading| match r.value {
                Value::Number(n) => n,
                _ => unreachable!(),
            };
            match r.sensor.as_str() {
                "skin_temp" if num(r) < 10.0 => {}
                "skin_temp" => {
                    let v = ((num(r) * 0.5 + 1.0) * 100.0).round() / 100.0;
                    out.insert(("readings".into(), r.device.clone(), "skin_c".into(), seq), Value::Number(v));
                }
                "heart_rate" => {
                    // An alarm goes to both of its topics (one queue record owning two ids).
                    let topics = if num(r) > 100.0 {
                        vec![format!("alarms/{}", r.device), "alarms/all".into()]
                    } else {
                        vec!["readings".into()]
                    };
                    for topic in topics {
                        out.insert((topic, r.device.clone(), r.sensor.clone(), seq), r.value.clone());
                    }
                    windows.entry(r.ts - r.ts % 100).or_default().push(num(r));
                }
                // One per 10 ms interval: which one depends on arrival order.
                "accel" => {
                    out.insert(
                        ("readings".into(), r.device.clone(), r.sensor.clone(), r.ts / 10),
                        Value::Array(vec![]),
                    );
                }
                other => panic!("unexpected sensor {other}"),
            }
        }
        for (start, vals) in windows {
            let n = vals.len() as f64;
            let stats = [
                ("count", n),
                ("mean", vals.iter().sum::<f64>() / n),
                ("max", vals.iter().copied().fold(f64::MIN, f64::max)),
            ];
            for (stat, v) in stats {
                let key = ("readings".into(), d.config().device.clone(), format!("heart_rate.{stat}_100ms"), start);
                out.insert(key, Value::Number(v));
            }
        }
    }
    out
}

/// What arrived: every output with how often it came.
fn arrived(subs: &[&Subscriber]) -> HashMap<(String, String, String, u64), Vec<Value>> {
    let mut got: HashMap<_, Vec<Value>> = HashMap::new();
    for sub in subs {
        for (topic, payload) in sub.messages() {
            let kind = topic.splitn(3, '/').nth(2).unwrap().to_string();
            let b = edge_gateway::Batch::decode(&payload).expect("payload is a batch");
            for r in b.readings {
                // Aggregate outputs have no seq: they are named by window
                // start; kept accel readings by their 10 ms interval.
                let n = if r.sensor == "accel" { r.ts / 10 } else { r.seq.unwrap_or(r.ts) };
                let value = if r.sensor == "accel" { Value::Array(vec![]) } else { r.value };
                got.entry((kind.clone(), r.device, r.sensor, n)).or_default().push(value);
            }
        }
    }
    got
}

fn compare(want: &Outputs, got: &HashMap<(String, String, String, u64), Vec<Value>>) -> Vec<String> {
    let mut problems = Vec::new();
    for (k, v) in want {
        match got.get(k) {
            None => problems.push(format!("missing {k:?}")),
            Some(vs) if vs.len() != 1 => problems.push(format!("{k:?} arrived {} times", vs.len())),
            Some(vs) => {
                let same = match (&vs[0], v) {
                    (Value::Number(a), Value::Number(b)) => (a - b).abs() < 1e-9,
                    (a, b) => a == b,
                };
                if !same {
                    problems.push(format!("{k:?} = {:?}, want {v:?}", vs[0]));
                }
            }
        }
    }
    for k in got.keys() {
        if !want.contains_key(k) {
            problems.push(format!("unexpected {k:?}"));
        }
    }
    problems
}

fn run(dir: &Path, n_devices: usize, steps: usize, kills: u64, outage: bool) {
    let certs = make_certs(dir);
    let mut broker = Mosquitto::start(&dir.join("broker"), &certs, false);
    let readings =
        Subscriber::start(broker.plain_port, "rules-readings", "gateways/test-gw/readings", &dir.join("r.out"));
    let alarms = Subscriber::start(broker.plain_port, "rules-alarms", "gateways/test-gw/alarms/+", &dir.join("a.out"));
    let extra = format!("{}\n{RULES}", upstream(&broker, &certs.ca));
    let (mut devices, cfg) = fleet_with(
        dir,
        n_devices,
        77,
        0.05,
        |i| if i % 2 == 0 { Framing::Jsonl } else { Framing::Cobs },
        PIPELINE,
        STORE,
        &extra,
    );
    let (code, out, err) = cli(&["check-config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let mut gw = Gateway::start(&cfg);
    let seed = std::env::var("EDGE_GATEWAY_TEST_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("kill schedule seed: EDGE_GATEWAY_TEST_SEED={seed}");
    let mut rng = XorShift::new(seed);
    let pace = Duration::from_millis(10);
    let mut kill_at: Vec<usize> = (0..kills).map(|_| 50 + rng.below(steps as u64 - 100) as usize).collect();
    kill_at.sort();
    let mut logs = String::new();
    let mut born = Instant::now();
    for step in 0..steps {
        stream(&mut devices, 1, pace);
        if kill_at.first().is_some_and(|k| step >= *k) && born.elapsed() >= Duration::from_millis(500) {
            kill_at.remove(0);
            logs += &gw.log_text();
            gw.kill9();
            std::thread::sleep(Duration::from_millis(rng.below(200)));
            gw = Gateway::start(&cfg);
            born = Instant::now();
        }
        if outage && step == steps / 4 {
            broker.stop();
        }
        if outage && step == steps / 2 {
            broker.restart();
        }
    }
    all_acked(&mut devices, &gw);
    let want = expected(&devices);
    // Idle windows close 100 ms after their last reading; then the queue drains.
    let ok = wait_until(Duration::from_secs(60), || {
        let got = arrived(&[&readings, &alarms]);
        want.keys().all(|k| got.contains_key(k)) && queue_status(&cfg)["batches"] == 0
    });
    logs += &terminate_ok(gw).0;
    std::thread::sleep(Duration::from_millis(500));
    let got = arrived(&[&readings, &alarms]);
    let problems = compare(&want, &got);
    assert!(
        ok && problems.is_empty(),
        "{} of {} expected outputs wrong (seed {seed}):\n{}\n{}",
        problems.len(),
        want.len(),
        problems.iter().take(20).cloned().collect::<Vec<_>>().join("\n"),
        logs.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).take(20).collect::<Vec<_>>().join("\n")
    );
    let aggregates = want.keys().filter(|k| k.2.contains('.')).count();
    let alarm = want.keys().filter(|k| k.0 == "alarms/all").count();
    assert!(aggregates >= 30 && alarm >= 30, "the run exercised windows ({aggregates}) and alarms ({alarm})");
    eprintln!("{} outputs exactly once ({aggregates} aggregates, {alarm} alarms), {kills} kills", want.len());
}

#[test]
fn every_rule_action_reaches_the_subscriber_as_computed_offline() {
    let dir = tempfile::tempdir().unwrap();
    run(dir.path(), 3, 400, 0, false);
}

#[test]
fn rule_outputs_are_exactly_once_through_five_sigkills_and_a_broker_outage() {
    let dir = tempfile::tempdir().unwrap();
    run(dir.path(), 6, 1000, 5, true);
}

#[test]
fn rules_test_is_the_operators_dry_run_and_bad_rules_name_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("g.toml");
    let base = format!("[gateway]\nid = \"gw\"\ndata_dir = {:?}\n", dir.path().join("data").display().to_string());
    std::fs::write(&cfg, format!("{base}{RULES}")).unwrap();
    let input = [
        r#"{"device":"wrist-1","sensor":"skin_temp","seq":1,"ts":1000,"value":5}"#,
        r#"{"device":"wrist-1","sensor":"skin_temp","seq":2,"ts":1001,"value":70}"#,
        r#"{"device":"wrist-1","sensor":"heart_rate","seq":3,"ts":1002,"value":120}"#,
        r#"{"device":"wrist-1","sensor":"heart_rate","seq":4,"ts":1003,"value":80}"#,
        r#"{"device":"wrist-1","sensor":"skin_temp","seq":5,"ts":1004,"value":70,"source":"lan"}"#,
    ]
    .join("\n");
    let out = std::process::Command::new(bin())
        .args(["rules", "test", "--config", cfg.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(input.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let brief: Vec<(String, String, String, f64)> = lines
        .iter()
        .map(|l| {
            (
                l["sensor"].as_str().unwrap().to_string(),
                l["topic"].as_str().unwrap().to_string(),
                l["lane"].as_str().unwrap().to_string(),
                l["value"].as_f64().unwrap(),
            )
        })
        .collect();
    let s = |a: &str, t: &str, l: &str, v: f64| (a.to_string(), t.to_string(), l.to_string(), v);
    assert_eq!(
        brief,
        [
            s("skin_c", "gateways/gw/readings", "bulk", 36.0),
            s("heart_rate", "gateways/gw/alarms/wrist-1", "alarm", 120.0),
            s("heart_rate", "gateways/gw/alarms/all", "alarm", 120.0),
            s("heart_rate", "gateways/gw/readings", "bulk", 80.0),
            // From the LAN: `source = "serial"` does not match, so no conversion.
            s("skin_temp", "gateways/gw/readings", "bulk", 70.0),
            // Flushed at the end of input.
            s("heart_rate.count_100ms", "gateways/gw/readings", "bulk", 2.0),
            s("heart_rate.mean_100ms", "gateways/gw/readings", "bulk", 100.0),
            s("heart_rate.max_100ms", "gateways/gw/readings", "bulk", 120.0),
        ]
    );
    // A condition that does not compile, a route with a wildcard, two
    // downsample modes: each named at its line.
    for (rule, line, key, says) in [
        ("[[rules]]\nname = \"x\"\nlane = \"alarm\"\nwhen = \"(value > 3\"\n", 9, "rules.0.when", "not an expression"),
        ("[[rules]]\nname = \"x\"\nroute = [\"a/+/b\"]\n", 8, "rules.0.route.0", "without '+'"),
        (
            "[[rules]]\nname = \"x\"\ndownsample = { every = \"1s\", on_change = true }\n",
            8,
            "rules.0.downsample",
            "exactly one",
        ),
        ("[[rules]]\nname = \"x\"\nfilter = true\nlane = \"alarm\"\n", 8, "rules.0.filter", "no other action"),
    ] {
        std::fs::write(&cfg, format!("{base}\n\n{rule}")).unwrap();
        let (code, out, err) = cli(&["check-config", cfg.to_str().unwrap()]);
        let text = format!("{out}{err}");
        assert_eq!(code, 1, "{text}");
        let at = format!("{}:{line}:", cfg.display());
        assert!(text.contains(&at) && text.contains(key) && text.contains(says), "want {at} {key} {says:?} in: {text}");
    }
}

/// The alarm lane: a backlog builds while the broker is down; once it is
/// back and draining, one alarm reading is sent, and it reaches the
/// subscriber ahead of most of what was still queued (its batch is a priority record
/// the uplink pulls ahead of the window). Everything still arrives exactly
/// once. Planted: without the pull-ahead the alarm arrives after the whole
/// backlog and this fails.
#[test]
fn an_alarm_reading_overtakes_a_backlog_and_everything_arrives_once() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let certs = make_certs(dir);
    let mut broker = Mosquitto::start(&dir.join("broker"), &certs, false);
    let sub = Subscriber::start(broker.plain_port, "lanes-sub", "gateways/test-gw/#", &dir.join("s.out"));
    let mut devices = Vec::new();
    let mut docks = Vec::new();
    for i in 0..4 {
        let (d, p) = device(&format!("wrist-{i:02}"), Framing::Jsonl, 90 + i, 0.0);
        devices.push(d);
        docks.push((format!("dock{i}"), p));
    }
    let pty = edge_gateway::demo::sim::open_pty().unwrap();
    let panic_path = pty.slave_path.clone();
    let mut pc = edge_gateway::demo::sim::SimConfig::new("panic-01", Framing::Jsonl);
    pc.sensors = vec!["panic".into()];
    let mut panic = SimDevice::on_pty(pc, pty).unwrap();
    docks.push(("panic-dock".into(), panic_path));
    let ports: Vec<Port> = docks.iter().map(|(n, p)| Port { name: n, path: p, framing: "jsonl" }).collect();
    let rules = r#"
[[rules]]
name = "panic"
match = { device = "panic-*" }
lane = "alarm"
route = ["gateways/{gateway}/alarms"]
"#;
    let extra = format!("{}max_inflight = 1\n{rules}", upstream(&broker, &certs.ca));
    let pipeline = "batch_max_age = \"20ms\"\nbatch_max_readings = 2\ndedup_max_per_device = 200000";
    let cfg = write_config_extra(dir, &ports, pipeline, STORE, &extra);
    let gw = Gateway::start(&cfg);
    // A backlog of 12,000 readings in 6,000 batches while the broker is away,
    // drained one batch in flight at a time (a PUBREC fsync each): seconds.
    broker.stop();
    stream(&mut devices, 3000, Duration::from_millis(1));
    all_acked(&mut devices, &gw);
    let backlog = queue_status(&cfg)["readings"].as_u64().unwrap();
    assert!(backlog >= 11_000, "backlog {backlog}");
    broker.restart();
    assert!(
        wait_until(Duration::from_secs(30), || queue_status(&cfg)["readings"].as_u64().unwrap() < backlog),
        "the drain did not start"
    );
    // What was still queued when the alarm went out: it must overtake most of it.
    let remaining = queue_status(&cfg)["readings"].as_u64().unwrap();
    panic.send_next().unwrap();
    assert!(panic.wait_all_acked(Duration::from_secs(30)).unwrap());
    let want = 12_001;
    // The status topic is under gateways/test-gw/ too.
    let batches =
        || -> Vec<(String, Vec<u8>)> { sub.messages().into_iter().filter(|(t, _)| !t.ends_with("/status")).collect() };
    wait_until(Duration::from_secs(120), || decode_all(&batches()).readings.len() >= want);
    terminate_ok(gw);
    std::thread::sleep(Duration::from_millis(500));
    let msgs = batches();
    let got = decode_all(&msgs);
    // Where the alarm came, in arrival order.
    let at = msgs.iter().position(|(t, _)| t.ends_with("/alarms")).expect("the alarm arrived");
    let before: usize = msgs[..at].iter().map(|(_, p)| edge_gateway::Batch::decode(p).unwrap().readings.len()).sum();
    let overtaken = (before as u64).saturating_sub(backlog - remaining);
    assert!(
        remaining > 2000 && overtaken < remaining / 2,
        "the alarm went out with {remaining} of {backlog} readings still queued and arrived after {overtaken} \
         of them: it did not overtake the backlog"
    );
    assert_eq!(got.readings.len(), want, "every reading arrived");
    assert!(got.readings.values().all(|n| *n == 1), "no reading twice");
    eprintln!("the alarm went out with {remaining} readings queued and arrived after {overtaken} of them");
}

/// A backlog of 6,000 readings (3,000 batches) builds while the broker is
/// down; once it is back and a third has arrived, the gateway is SIGKILLed
/// (what it delivered since its last ack commit is finished but not acked)
/// and restarted. Returns the batch ids in arrival order: before the kill,
/// and all, after checking every reading arrived exactly once.
fn drain_across_a_sigkill(drain: &str) -> (Vec<u64>, Vec<u64>) {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let certs = make_certs(dir);
    let mut broker = Mosquitto::start(&dir.join("broker"), &certs, false);
    let sub = Subscriber::start(broker.plain_port, "drain-sub", "gateways/test-gw/readings", &dir.join("s.out"));
    let mut devices = Vec::new();
    let mut docks = Vec::new();
    for i in 0..4 {
        let (d, p) = device(&format!("wrist-{i:02}"), Framing::Jsonl, 190 + i, 0.0);
        devices.push(d);
        docks.push((format!("dock{i}"), p));
    }
    let ports: Vec<Port> = docks.iter().map(|(n, p)| Port { name: n, path: p, framing: "jsonl" }).collect();
    let extra = format!("{}max_inflight = 1\n[lanes.bulk]\ndrain = \"{drain}\"\n", upstream(&broker, &certs.ca));
    let pipeline = "batch_max_age = \"20ms\"\nbatch_max_readings = 2\ndedup_max_per_device = 200000";
    let cfg = write_config_extra(dir, &ports, pipeline, STORE, &extra);
    let gw = Gateway::start(&cfg);
    broker.stop();
    stream(&mut devices, 1500, Duration::from_millis(1));
    all_acked(&mut devices, &gw);
    let backlog = queue_status(&cfg)["readings"].as_u64().unwrap();
    assert!(backlog >= 5_500, "backlog {backlog}");
    broker.restart();
    let want = devices.len() * 1500;
    let count = || decode_all(&sub.messages()).readings.len();
    assert!(wait_until(Duration::from_secs(60), || count() >= want / 3), "the drain did not get going");
    gw.kill9();
    let ids = |m: Vec<(String, Vec<u8>)>| -> Vec<u64> {
        m.iter().map(|(_, p)| edge_gateway::Batch::decode(p).unwrap().batch).collect()
    };
    let first_run = ids(sub.messages());
    let gw = Gateway::start(&cfg);
    // The restart finds up to a second's worth of batches finished but not
    // acked: they must not hold up the rest (they did, one window per
    // keep-alive, until the uplink let them go at once).
    let done = wait_until(Duration::from_secs(60), || count() >= want);
    let log = gw.log_text();
    assert!(done, "{} of {want} arrived within 60 s of the restart; log:\n{log}", count());
    terminate_ok(gw);
    std::thread::sleep(Duration::from_millis(500));
    let got = decode_all(&sub.messages());
    let twice = got.readings.values().filter(|n| **n > 1).count();
    assert_eq!((got.readings.len(), twice), (want, 0), "every reading once");
    (first_run, ids(sub.messages()))
}

/// The default order: oldest first, before and after the kill.
#[test]
fn oldest_first_drains_in_queue_order_and_exactly_once_across_a_sigkill() {
    let (first_run, all) = drain_across_a_sigkill("oldest_first");
    assert!(first_run.windows(2).all(|w| w[0] < w[1]), "in order before the kill");
    let after = &all[first_run.len()..];
    assert!(after.windows(2).all(|w| w[0] < w[1]), "in order after it");
}

/// `drain = "newest_first"`: the newest batches arrive first and the oldest
/// last, with most of what was delivered before the kill finished ahead of
/// the queue's ack. Planted: with the drain order ignored the first
/// arrivals are the oldest batches and this fails; with the notes of
/// batches completed ahead not honoured after the restart, readings arrive
/// twice.
#[test]
fn newest_first_drains_the_top_of_a_backlog_first_and_exactly_once_across_a_sigkill() {
    let (first_run, all) = drain_across_a_sigkill("newest_first");
    let (lo, hi) = (*all.iter().min().unwrap(), *all.iter().max().unwrap());
    // The first 200 batches to arrive were all in the top tenth of the ids.
    let top = hi - (hi - lo) / 10;
    let early: Vec<u64> = first_run.iter().take(200).copied().filter(|b| *b < top).collect();
    assert!(early.is_empty(), "batches {early:?} (below {top}, of {lo}..={hi}) were among the first 200 to arrive");
    // And the oldest came last: the final 200 arrivals are all in the bottom half.
    let late: Vec<u64> = all.iter().rev().take(200).copied().filter(|b| *b > lo + (hi - lo) / 2).collect();
    assert!(late.is_empty(), "batches {late:?} (of {lo}..={hi}) were among the last 200 to arrive");
    eprintln!(
        "newest first: {} batches {lo}..={hi}, first {:?}, last {:?}",
        all.len(),
        &all[..3],
        &all[all.len() - 3..]
    );
}
