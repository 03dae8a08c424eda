//! The `edge-gateway` command.

use crate::config::Config;
use crate::queue::Queue;
use crate::reading::{Batch, now_ms};
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "edge-gateway", version, about = "Readings from wearables to the cloud, exactly once")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway until SIGTERM or SIGINT.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// The whole story on this machine, no hardware: simulated docks and
    /// Wi-Fi sensors, the gateway, a cloud on loopback that goes away
    /// half-way; a live line per second, a tally at the end.
    Demo {
        /// How long the devices stream.
        #[arg(long, default_value = "40s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// How long the cloud is away (from half-way).
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        outage: std::time::Duration,
        /// Keep the demo's directory (config, queue, gateway log).
        #[arg(long)]
        keep: bool,
    },
    /// Validate a config file: exit 0 with a summary, or 1 with PATH:LINE:COL.
    CheckConfig { path: PathBuf },
    /// Ask a running gateway how it is (its `/metrics`): a small table, exit
    /// 0 when healthy, 1 when not (upstream down, a link down, queue 90 %
    /// full), 2 when it cannot be reached.
    Status {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Ask this address instead of the config's `[metrics] listen`.
        #[arg(long)]
        addr: Option<std::net::SocketAddr>,
    },
    /// Inspect the on-disk queue (safe while the gateway runs).
    Queue {
        #[command(subcommand)]
        cmd: QueueCmd,
    },
    /// Decode one batch payload (json or postcard) from stdin into JSON lines.
    Decode,
    /// The operator's dry run of `[[rules]]`.
    Rules {
        #[command(subcommand)]
        cmd: RulesCmd,
    },
    /// Commands from the cloud (`[commands]`).
    Commands {
        #[command(subcommand)]
        cmd: CommandsCmd,
    },
    /// Read a password from stdin (first line) and print its argon2id PHC
    /// string, for `[[broker.users]] password_hash` or a `password_file`.
    HashPassword,
    /// A simulated dock: creates a PTY, links it at PATH and streams readings
    /// from a simulated wearable that resends until acked (Ctrl-C stops).
    Simulate {
        /// Where to link the PTY (the path a `[[serial]]` entry names).
        #[arg(long)]
        link: PathBuf,
        #[arg(long, default_value = "wrist-01")]
        device: String,
        /// Readings per second.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        #[arg(long, value_enum, default_value = "jsonl")]
        framing: FramingArg,
        /// Stop after this many readings (once all are acked).
        #[arg(long)]
        count: Option<u64>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum FramingArg {
    Jsonl,
    Cobs,
}

#[derive(Subcommand)]
enum QueueCmd {
    /// Print {"batches","readings","bytes","oldest_age_s"} as JSON.
    Status {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print every queued reading as one JSON line.
    Dump {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Batches the upstream broker refused for good (the dead-letter store,
    /// `data_dir/uplink.dead`).
    Dead {
        #[command(subcommand)]
        cmd: DeadCmd,
    },
}

#[derive(Subcommand)]
enum CommandsCmd {
    /// Print each command waiting for its device as one JSON line: id,
    /// device, name, args, age_s, expires_in_s, attempts.
    List {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum RulesCmd {
    /// Read readings as JSON lines on stdin ({"device","sensor","seq"?,"ts",
    /// "value","source"?}, source "serial" by default) and print what the
    /// rules emit: one JSON line per output, the reading plus "topic" and
    /// "lane". Open aggregate windows are flushed at the end of input.
    Test {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum DeadCmd {
    /// Print every dead reading as one JSON line: gateway, batch, device,
    /// sensor, seq, ts, value, reason, reason_code (safe while the gateway runs).
    List {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Put every dead batch back into the queue, unchanged (same gateway and
    /// batch number), once the cause is fixed. Needs the gateway stopped.
    Replay {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Delete every dead batch for good. Needs the gateway stopped.
    Drop {
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// Where the Debian package puts the config.
const DEFAULT_CONFIG: &str = "/etc/edge-gateway/gateway.toml";

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Run { .. }) {
        crate::service::init_logging(None);
    }
    let result = match cli.cmd {
        Cmd::Run { config } => run(&config),
        Cmd::CheckConfig { path } => check_config(&path),
        Cmd::Status { config, addr } => return status(&config, addr),
        Cmd::Demo { duration, outage, keep } => crate::demo::run(crate::demo::DemoOptions { duration, outage, keep }),
        Cmd::Queue { cmd: QueueCmd::Status { config } } => queue_status(&config),
        Cmd::Queue { cmd: QueueCmd::Dump { config } } => queue_dump(&config),
        Cmd::Queue { cmd: QueueCmd::Dead { cmd: DeadCmd::List { config } } } => dead_list(&config),
        Cmd::Queue { cmd: QueueCmd::Dead { cmd: DeadCmd::Replay { config } } } => dead_replay(&config),
        Cmd::Queue { cmd: QueueCmd::Dead { cmd: DeadCmd::Drop { config } } } => dead_drop(&config),
        Cmd::Decode => decode(),
        Cmd::Rules { cmd: RulesCmd::Test { config } } => rules_test(&config),
        Cmd::Commands { cmd: CommandsCmd::List { config } } => commands_list(&config),
        Cmd::HashPassword => hash_password(),
        Cmd::Simulate { link, device, rate, framing, count } => simulate(&link, &device, rate, framing, count),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: &Path) -> anyhow::Result<Config> {
    // The error already reads PATH:LINE:COL: key: message.
    Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))
}

fn run(path: &Path) -> anyhow::Result<()> {
    let cfg = load(path)?;
    crate::service::init_logging(Some(&cfg.log.level));
    // One worker: the ports, the BLE and LAN sources, the downlink and the
    // metrics endpoint are light async work, and a second worker cost more
    // in wake-ups and work stealing than it ran (2.4 vs 3.0 CPU-s per
    // million readings in the uplink bench, issue 18). The pipeline, the
    // uplink and the broker run on threads of their own.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        // Well under the unit's TasksMax=256 (docs/security.md).
        .max_blocking_threads(64)
        .enable_all()
        .thread_name("edge-gateway")
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(crate::app::run(cfg, Some(path.to_path_buf())))
}

fn status(config: &Path, addr: Option<std::net::SocketAddr>) -> ExitCode {
    let addr = match addr {
        Some(a) => a,
        None => match load(config) {
            Ok(c) if c.metrics.enabled => c.metrics.listen,
            Ok(_) => {
                eprintln!("edge-gateway: {}: [metrics] is disabled; nothing to ask", config.display());
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!("edge-gateway: {e:#}");
                return ExitCode::from(2);
            }
        },
    };
    match crate::metrics::http::fetch_status(addr, std::time::Duration::from_secs(3)) {
        Ok(status) => {
            let r = status.report();
            print!("{}", r.text);
            if r.healthy { ExitCode::SUCCESS } else { ExitCode::from(1) }
        }
        Err(e) => {
            eprintln!("edge-gateway: cannot reach the gateway's metrics at http://{addr}/status: {e} (is it running?)");
            ExitCode::from(2)
        }
    }
}

fn hash_password() -> anyhow::Result<()> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).context("cannot read the password from stdin")?;
    let password = line.trim_end_matches(['\n', '\r']);
    anyhow::ensure!(!password.is_empty(), "empty password on stdin");
    println!("{}", crate::broker::auth::hash_password(password));
    Ok(())
}

fn check_config(path: &Path) -> anyhow::Result<()> {
    let c = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let s = &c.store;
    let p = &c.pipeline;
    let when_full = match s.when_full {
        crate::config::WhenFull::DropOldest => "drop_oldest",
        crate::config::WhenFull::RejectNew => "reject_new",
    };
    let fsync = match s.fsync {
        crate::config::FsyncPolicy::Always => "always".to_string(),
        crate::config::FsyncPolicy::Interval => format!("every {}", humantime::format_duration(s.fsync_interval)),
    };
    let format = match p.format {
        crate::reading::Format::Json => "json",
        crate::reading::Format::Postcard => "postcard",
    };
    let b = &c.broker;
    let broker = if b.enabled {
        let listeners: Vec<String> = [("tcp", b.tcp), ("tls", b.tls), ("websocket", b.websocket)]
            .iter()
            .filter_map(|(k, a)| a.map(|a| format!("{k} {a}")))
            .collect();
        let ack = match b.ack {
            crate::config::BrokerAck::Received => "received",
            crate::config::BrokerAck::Durable => "durable",
        };
        format!(
            ", MQTT broker on {} (anonymous {}, ack {ack})",
            listeners.join(", "),
            if b.allow_anonymous { "allowed" } else { "refused" }
        )
    } else {
        String::new()
    };
    // Where batches go (never the password: only whether one is set).
    let upstream = match &c.upstream {
        Some(u) => format!(
            ", upstream {} as {} (QoS {}, MQTT {}, {})",
            u.url,
            u.client_id_for(&c.gateway.id),
            u.qos,
            match u.protocol {
                crate::config::MqttProtocol::Auto => "auto",
                crate::config::MqttProtocol::V5 => "5",
                crate::config::MqttProtocol::V311 => "3.1.1",
            },
            match (&u.cert_file, &u.username) {
                (Some(_), _) => "client certificate",
                (None, Some(_)) => "user + password file",
                (None, None) => "no login",
            }
        ),
        None => ", no upstream (batches stay queued)".to_string(),
    };
    let metrics =
        if c.metrics.enabled { format!(", metrics on http://{}/metrics", c.metrics.listen) } else { String::new() };
    println!(
        "{}: ok: gateway {}, {} serial port(s), {} BLE device(s), data in {}, queue max {} bytes ({when_full}, fsync {fsync}), batches of <= {} readings / {} bytes / {} ({format}){broker}{upstream}{metrics}",
        path.display(),
        c.gateway.id,
        c.serial.len(),
        c.ble.len(),
        c.gateway.data_dir.display(),
        s.max_bytes,
        p.batch_max_readings,
        p.batch_max_bytes,
        humantime::format_duration(p.batch_max_age),
    );
    Ok(())
}

fn commands_list(path: &Path) -> anyhow::Result<()> {
    let c = load(path)?;
    let now = crate::reading::now_ms();
    let pending = crate::downlink::list(&c.gateway.data_dir).with_context(|| {
        format!("cannot read {}", c.gateway.data_dir.join(crate::downlink::store::FILE_NAME).display())
    })?;
    for p in pending {
        let c = &p.cmd;
        let line = serde_json::json!({
            "id": c.id,
            "device": c.device,
            "name": c.name,
            "args": serde_json::from_str::<serde_json::Value>(&c.args).unwrap_or_default(),
            "age_s": now.saturating_sub(c.received_ms) / 1000,
            "expires_in_s": c.expires_ms.saturating_sub(now) / 1000,
            "attempts": p.attempts,
        });
        println!("{line}");
    }
    Ok(())
}

fn rules_test(path: &Path) -> anyhow::Result<()> {
    use crate::reading::{Origin, Reading, RecordKind};
    use crate::rules::{Closed, Dest, Engine, Rules};
    use std::io::{BufRead, Write};
    let c = load(path)?;
    let rules = std::sync::Arc::new(Rules::compile(&c.rules, &c.gateway.id).map_err(anyhow::Error::msg)?);
    let default_topic = c
        .upstream
        .as_ref()
        .map(|u| u.topic.clone())
        .unwrap_or_else(crate::uplink::config::default_topic)
        .replace("{gateway}", &c.gateway.id);
    let mut engine = Engine::new(rules.clone());
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    // One line per message: a reading routed to k topics prints k times.
    let print = |r: &Reading, d: &Dest, out: &mut dyn Write| -> anyhow::Result<()> {
        let default = [default_topic.clone()];
        for topic in if d.topics.is_empty() { &default[..] } else { &d.topics[..] } {
            let mut v = serde_json::to_value(r)?;
            let o = v.as_object_mut().expect("a reading is an object");
            o.insert("topic".into(), topic.clone().into());
            o.insert("lane".into(), d.lane.as_str().into());
            writeln!(out, "{v}")?;
        }
        Ok(())
    };
    let closed_out = |closed: Vec<Closed>, out: &mut dyn Write| -> anyhow::Result<()> {
        for c in closed {
            for (r, d) in &c.outputs {
                print(r, d, out)?;
            }
        }
        Ok(())
    };
    #[derive(serde::Deserialize)]
    struct Line {
        #[serde(flatten)]
        reading: Reading,
        #[serde(default)]
        source: Option<String>,
    }
    for (n, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let l: Line = serde_json::from_str(&line).map_err(|e| anyhow::anyhow!("stdin line {}: {e}", n + 1))?;
        let source = match l.source.as_deref() {
            None => Origin::Serial(0).kind(),
            Some(s) => Origin::KINDS
                .iter()
                .position(|k| *k == s)
                .ok_or_else(|| anyhow::anyhow!("stdin line {}: source {s:?} is not serial, ble or lan", n + 1))?,
        } as u8;
        let outcome = engine.ingest(&l.reading, source, l.reading.ts);
        closed_out(outcome.closed, &mut out)?;
        for d in &outcome.store {
            if d.kind != RecordKind::Raw {
                continue;
            }
            let mut r = l.reading.clone();
            rules.transform_stored(&mut r, source);
            print(&r, d, &mut out)?;
        }
    }
    closed_out(engine.flush(), &mut out)?;
    out.flush()?;
    Ok(())
}

fn open_queue(path: &Path) -> anyhow::Result<Queue> {
    let cfg = load(path)?;
    let dir = crate::pipeline::queue_dir(&cfg.gateway.data_dir);
    let (q, _) = Queue::open_readonly(&dir).with_context(|| format!("cannot read the queue in {}", dir.display()))?;
    Ok(q)
}

fn queue_status(path: &Path) -> anyhow::Result<()> {
    let st = open_queue(path)?.status();
    let age = st.oldest_created_ms.map(|t| now_ms().saturating_sub(t) as f64 / 1000.0).unwrap_or(0.0);
    println!(
        "{}",
        serde_json::json!({"batches": st.batches, "readings": st.readings, "bytes": st.bytes, "oldest_age_s": age})
    );
    Ok(())
}

fn queue_dump(path: &Path) -> anyhow::Result<()> {
    let q = open_queue(path)?;
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    let mut after = 0;
    loop {
        let records = match q.read_from(after, 256) {
            Ok(r) => r,
            // A record that rotted on disk: report it, read around it.
            Err(crate::queue::QueueError::Corrupt { id, path }) => {
                eprintln!("edge-gateway: record {id} in {} fails its CRC; skipped", path.display());
                let mut good = q.read_from(after, (id - after - 1) as usize)?;
                good.retain(|(m, _)| m.id < id);
                after = id;
                print_records(&mut out, &good)?;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let Some((last, _)) = records.last() else { break };
        after = last.id;
        print_records(&mut out, &records)?;
    }
    out.flush()?;
    Ok(())
}

fn print_records(out: &mut impl Write, records: &[crate::queue::Record]) -> anyhow::Result<()> {
    for (meta, payload) in records {
        match Batch::decode(payload) {
            Ok(b) => {
                for line in b.json_lines() {
                    writeln!(out, "{line}")?;
                }
            }
            Err(e) => eprintln!("edge-gateway: record {} is not a batch: {e}", meta.id),
        }
    }
    Ok(())
}

fn dead_list(path: &Path) -> anyhow::Result<()> {
    let cfg = load(path)?;
    let dir = &cfg.gateway.data_dir;
    let dead = crate::uplink::dead::read(dir)
        .with_context(|| format!("cannot read {}", dir.join(crate::uplink::dead::FILE_NAME).display()))?;
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    for d in &dead {
        let batch = match Batch::decode(&d.payload) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("edge-gateway: dead batch (queue record {}) is not a batch: {e}", d.queue_id);
                continue;
            }
        };
        for line in batch.json_lines() {
            let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&line)?;
            v.insert("reason".into(), d.reason.clone().into());
            v.insert("reason_code".into(), d.reason_code.into());
            writeln!(out, "{}", serde_json::Value::Object(v))?;
        }
    }
    out.flush()?;
    Ok(())
}

/// The queue for writing, which only works while the gateway is stopped.
fn open_queue_exclusive(cfg: &Config) -> anyhow::Result<Queue> {
    let dir = crate::pipeline::queue_dir(&cfg.gateway.data_dir);
    match Queue::open(&dir, crate::queue::QueueOptions::from(&cfg.store)) {
        Ok((q, _)) => Ok(q),
        Err(crate::queue::QueueError::Locked) => anyhow::bail!(
            "the gateway is running (it holds {}): stop it first (e.g. `systemctl stop edge-gateway`)",
            dir.join("lock").display()
        ),
        Err(e) => Err(e).with_context(|| format!("cannot open the queue in {}", dir.display())),
    }
}

fn dead_replay(path: &Path) -> anyhow::Result<()> {
    use crate::uplink::dead::DeadStore;
    let cfg = load(path)?;
    let mut q = open_queue_exclusive(&cfg)?;
    let dir = &cfg.gateway.data_dir;
    let mut store =
        DeadStore::open(dir).with_context(|| format!("cannot open the dead-letter store in {}", dir.display()))?;
    let dead = crate::uplink::dead::read(dir)?;
    let mut replayed = 0;
    let mut readings = 0u64;
    for d in &dead {
        // Never let a replay evict live batches (drop_oldest) or fail half-way.
        if q.status().bytes + d.payload.len() as u64 + 64 > cfg.store.max_bytes {
            eprintln!(
                "edge-gateway: the queue is full; {} batch(es) stay in the dead-letter store",
                dead.len() - replayed
            );
            break;
        }
        q.append(d.readings, d.created_ms, &d.payload)?;
        replayed += 1;
        readings += d.readings as u64;
    }
    // Durable in the queue before they leave the store: a crash in between
    // queues them twice, as the same (gateway, batch), which consumers dedup.
    q.commit()?;
    store.clear()?;
    for d in &dead[replayed..] {
        store.append(d).map_err(|e| anyhow::anyhow!("cannot keep the batches not replayed: {e}"))?;
    }
    eprintln!("edge-gateway: {replayed} dead batch(es) ({readings} readings) queued again");
    Ok(())
}

fn dead_drop(path: &Path) -> anyhow::Result<()> {
    use crate::uplink::dead::DeadStore;
    let cfg = load(path)?;
    let _q = open_queue_exclusive(&cfg)?;
    let dir = &cfg.gateway.data_dir;
    let mut store =
        DeadStore::open(dir).with_context(|| format!("cannot open the dead-letter store in {}", dir.display()))?;
    let n = store.batches();
    store.clear()?;
    eprintln!("edge-gateway: dropped {n} dead batch(es)");
    Ok(())
}

fn decode() -> anyhow::Result<()> {
    let mut buf = Vec::new();
    std::io::stdin().read_to_end(&mut buf).context("cannot read stdin")?;
    let batch = Batch::decode(&buf)?;
    let mut out = std::io::stdout().lock();
    for line in batch.json_lines() {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

fn simulate(link: &Path, device: &str, rate: f64, framing: FramingArg, count: Option<u64>) -> anyhow::Result<()> {
    use crate::config::Framing;
    use crate::demo::sim::{SimConfig, SimDevice, open_pty, point_symlink};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    anyhow::ensure!(rate > 0.0, "--rate must be positive");
    let framing = match framing {
        FramingArg::Jsonl => Framing::Jsonl,
        FramingArg::Cobs => Framing::Cobs,
    };
    let pty = open_pty().context("cannot open a PTY")?;
    if let Some(dir) = link.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    point_symlink(link, &pty.slave_path).with_context(|| format!("cannot link {}", link.display()))?;
    eprintln!("simulated dock: {} -> {} ({device}, {rate}/s)", link.display(), pty.slave_path.display());
    let mut cfg = SimConfig::new(device, framing);
    cfg.seed = crate::reading::now_ms();
    let mut dev = SimDevice::on_pty(cfg, pty)?;
    static STOP: AtomicBool = AtomicBool::new(false);
    extern "C" fn on_signal(_: i32) {
        STOP.store(true, Ordering::SeqCst);
    }
    let handler = nix::sys::signal::SigHandler::Handler(on_signal);
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        nix::sys::signal::signal(nix::sys::signal::Signal::SIGINT, handler)?;
        nix::sys::signal::signal(nix::sys::signal::Signal::SIGTERM, handler)?;
    }
    let period = Duration::from_secs_f64(1.0 / rate);
    let (mut next, mut report) = (Instant::now(), Instant::now() + Duration::from_secs(1));
    while !STOP.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= next && count.is_none_or(|c| dev.stats().sent_unique < c) {
            dev.send_next()?;
            next += period;
        }
        dev.resend_if_stalled()?;
        if now >= report {
            let s = dev.stats();
            eprintln!(
                "sent {} (+{} resent), acked through {:?}, pending {}",
                s.sent_unique, s.resent, s.acked_through, s.pending
            );
            report += Duration::from_secs(1);
            if count.is_some_and(|c| s.sent_unique >= c) && s.pending == 0 {
                break;
            }
        }
        std::thread::sleep(
            period
                .min(Duration::from_millis(20))
                .min(next.saturating_duration_since(Instant::now()))
                .max(Duration::from_millis(1)),
        );
    }
    let _ = std::fs::remove_file(link);
    let s = dev.unplug();
    eprintln!("unplugged: {} readings sent, {} pending (unacked)", s.sent_unique, s.pending);
    Ok(())
}
