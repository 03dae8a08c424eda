//! The power-cut rig (docs/testing.md "Power-cut rig"): the real binary in a VM whose
//! disk keeps exactly what was flushed, its power cut at random moments.
//!
//! Run it with `tests/powercut/run.sh --cycles N`, which builds the guest
//! (kernel, initramfs with the debug binary) and then runs this ignored test.
//!
//! Per cycle: boot the VM (QEMU, TCG) with its data disk behind nbdkit's
//! cache filter in writeback mode, so a write the guest has not flushed
//! lives only in nbdkit's memory; let the simulated wearable on the host
//! stream readings to the gateway over a virtio console port, while the
//! uplink delivers to a Mosquitto on the host; then cut the power: SIGKILL
//! nbdkit first (the unflushed writes are gone) and QEMU second. The wearable
//! keeps running across cycles, holding what was not acked and resending it,
//! as a real one does. After the last cycle the gateway runs until every
//! reading is acked and delivered and its queue is empty, is stopped, and the
//! run checks: every reading reached the upstream subscriber exactly once.
//!
//! Disk models at a cut: "lose" (every write since the last flush is gone),
//! "subset" (a random subset of the 4 KiB blocks written since the last
//! flush survives, out of order, as an SD card's FTL may keep some and not
//! others), and the "eio" phase, where every flush fails with EIO from some
//! moment on (the cache filter's write-back goes through nbdkit's error
//! filter): the gateway must exit with status 75 (`Pipeline::commit`), and
//! the cut comes after that exit. Half the runs use `store.when_full =
//! "reject_new"` with a 16 KiB queue, so cuts also land while it is full.

#[path = "../common/mod.rs"]
mod common;

use common::mosquitto::{Mosquitto, Received, Subscriber, decode_all, make_certs};
use common::{need, wait_until};
use edge_gateway::config::Framing;
use edge_gateway::demo::sim::{SimConfig, SimDevice, XorShift, open_pty};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DEVICE: &str = "wrist-01";
/// The gateway's log line once every task runs.
const READY: &str = "running with";
const TOPIC: &str = "gateways/powercut-gw/readings";
/// Where `--rules` routes heart rates over 100, and their second copy.
const ALARMS_TOPIC: &str = "gateways/powercut-gw/alarms";
const COPY_TOPIC: &str = "gateways/powercut-gw/alarms-copy";
/// Longest a boot may take until the gateway says it runs (TCG is slow, and
/// the machine may be busy building).
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// After the last cut: how long the gateway gets to take and deliver the rest.
const FINAL_TIMEOUT: Duration = Duration::from_secs(180);

struct Settings {
    kernel: PathBuf,
    initrd: PathBuf,
    cycles: u32,
    rate: f64,
    seed: u64,
    work: PathBuf,
    /// `store.when_full = "reject_new"` with a small queue (pc.full=1).
    full: bool,
    /// The gateway runs tests/powercut/rules.toml (`run.sh --rules`).
    rules: bool,
}

impl Settings {
    fn from_env() -> Settings {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let path = |k: &str| {
            PathBuf::from(var(k).unwrap_or_else(|| panic!("{k} is not set: run the rig with tests/powercut/run.sh")))
        };
        let seed = var("POWERCUT_SEED").map(|s| s.parse().expect("POWERCUT_SEED is a number")).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
                % 1_000_000_007
        });
        Settings {
            kernel: path("POWERCUT_KERNEL"),
            initrd: path("POWERCUT_INITRD"),
            cycles: var("POWERCUT_CYCLES").map_or(30, |c| c.parse().expect("POWERCUT_CYCLES is a number")),
            rate: var("POWERCUT_RATE").map_or(40.0, |r| r.parse().expect("POWERCUT_RATE is a number")),
            seed,
            work: path("POWERCUT_WORK"),
            // Half the runs: by the seed, unless chosen. Not with rules: a
            // batch a full queue refuses was already counted by its
            // aggregate (docs/rules.md, limits), which the rig would flag.
            full: match var("POWERCUT_WHEN_FULL").as_deref() {
                Some("reject_new") => true,
                Some("drop_oldest") => false,
                Some(other) => panic!("POWERCUT_WHEN_FULL is reject_new or drop_oldest, not {other}"),
                None => seed % 2 == 1 && var("POWERCUT_RULES").is_none(),
            },
            rules: var("POWERCUT_RULES").is_some(),
        }
    }
}

/// What the wearable knows, as of its last step.
#[derive(Clone, Copy, Debug, Default)]
struct DeviceView {
    /// Readings acked: seqs `0..acked` (the simulator counts from 0).
    acked: u64,
    /// Readings created: seqs `0..created`.
    created: u64,
    pending: usize,
    /// `produce` as this step saw it: false means no reading is created
    /// after this view (a view taken just after `produce` was cleared may
    /// still be from a step that created one: the last run saw it as a
    /// reading "nobody sent").
    producing: bool,
}

/// The simulated wearable on its own thread: it keeps creating readings at
/// `rate` (while `produce` is set) and resends what is not acked, whether or
/// not a gateway is there. Its writes block while the VM is off and the PTY's
/// buffer is full, as a UART's would stall; hence the thread.
struct Wearable {
    view: Arc<Mutex<DeviceView>>,
    produce: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    dock: PathBuf,
}

impl Wearable {
    fn start(rate: f64, seed: u64) -> Wearable {
        let pty = open_pty().expect("openpty");
        let dock = pty.slave_path.clone();
        let mut cfg = SimConfig::new(DEVICE, Framing::Jsonl);
        cfg.seed = seed;
        // Long enough not to flood a gateway that is still booting, short
        // enough that a lost ack is repaired within a cycle.
        cfg.resend_after = Duration::from_secs(1);
        let mut dev = SimDevice::on_pty(cfg, pty).expect("sim device");
        let view = Arc::new(Mutex::new(DeviceView::default()));
        let produce = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let (v, p, s) = (view.clone(), produce.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let every = Duration::from_secs_f64(1.0 / rate);
            let mut next = Instant::now();
            while !s.load(Ordering::Relaxed) {
                let producing = p.load(Ordering::Relaxed);
                if producing && Instant::now() >= next {
                    dev.send_next().expect("device write");
                    next += every;
                    // After a stall (blocked write) do not burst to catch up.
                    next = next.max(Instant::now() - every);
                }
                dev.resend_if_stalled().expect("device resend");
                let st = dev.stats();
                *v.lock().unwrap() = DeviceView {
                    acked: st.acked_through.map_or(0, |a| a + 1),
                    created: dev.next_seq(),
                    pending: st.pending,
                    producing,
                };
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Wearable { view, produce, stop, thread: Some(thread), dock }
    }

    fn view(&self) -> DeviceView {
        *self.view.lock().unwrap()
    }
}

impl Drop for Wearable {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Its thread may be blocked writing to a PTY nobody reads: leave it.
        if let Some(t) = self.thread.take()
            && t.is_finished()
        {
            let _ = t.join();
        }
    }
}

/// One boot of the VM: nbdkit serving the data disk through its writeback
/// cache, and QEMU.
struct Vm {
    nbd: Child,
    qemu: Child,
    booted: Instant,
    serial: PathBuf,
    /// When the gateway said it runs (since power-on), once seen.
    ready: Option<Duration>,
    /// The guest's control port (see tests/powercut/init): "hup", "term".
    ctl: PathBuf,
    /// The host's end of the port forward to the gateway's /metrics.
    metrics_port: u16,
    /// While it exists, every write the cache filter passes down (its
    /// write-back at a flush) fails with EIO.
    eio_file: PathBuf,
    work: PathBuf,
    /// The gateway may exit (status 75, after EIO) without failing the run.
    exit_expected: bool,
}

/// What a flush-less cut leaves of the writes since the last flush.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Disk {
    /// All of them vanish.
    Lose,
    /// Each 4 KiB block written since the last flush survives with a
    /// probability drawn per cut (0.1-0.9), independently of the others.
    Subset,
}

/// Figures of one cut's disk model: blocks written since the last flush,
/// and how many of them were kept.
#[derive(Clone, Copy, Default, Debug)]
struct CutDisk {
    dirty: u64,
    kept: u64,
}

/// The gateway's queue as /metrics shows it.
#[derive(Clone, Copy, Debug, Default)]
struct QueueGauge {
    batches: u64,
    bytes: u64,
    max_bytes: u64,
    /// Since this boot: commits that wrote their records with one direct
    /// write, and payload bytes records did not take, stored deflated.
    direct_commits: u64,
    deflate_saved: u64,
}

/// `store.segment_bytes` for a cycle: 64 KiB (cuts land in segment
/// rotation and deletion) and, every other cycle, 1 MiB, where the queue
/// pads commits and, with the backlog small, writes them directly with its
/// small records stored deflated (docs/performance.md, "Deflated records").
/// With `pc.full` the queue's 16 KiB bound keeps segments smaller anyway.
fn segment_bytes(cycle: u32) -> &'static str {
    if cycle % 2 == 1 { "1MiB" } else { "64KiB" }
}

fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let v = rest.strip_prefix(' ')?;
        v.trim().parse::<f64>().ok().map(|f| f as u64)
    })
}

/// Markers the guest's console shows, with when each first appeared.
#[derive(Default, Debug, Clone)]
struct Console {
    text: String,
}

impl Console {
    fn has(&self, s: &str) -> bool {
        self.text.contains(s)
    }
    /// "queue repaired at start-up: cut N torn bytes, skipped M corrupt records"
    fn repaired(&self) -> (u64, u64) {
        let Some(i) = self.text.find("queue repaired at start-up: cut ") else { return (0, 0) };
        let words: Vec<&str> = self.text[i..].split_whitespace().collect();
        // queue repaired at start-up: cut N torn bytes, skipped M corrupt
        (words.get(5).and_then(|w| w.parse().ok()).unwrap_or(0), words.get(9).and_then(|w| w.parse().ok()).unwrap_or(0))
    }
}

impl Vm {
    fn boot(s: &Settings, disk: &Path, dock: &Path, port: u16, cycle: u32, eager: bool) -> Vm {
        let sock = s.work.join("nbd.sock");
        let _ = std::fs::remove_file(&sock);
        let eio_file = s.work.join("eio");
        let _ = std::fs::remove_file(&eio_file);
        // Client → cache → delay → error → file: writes stay in the cache until a
        // flush writes them back; with the error file present that write-back
        // fails, so the guest's flush fails with EIO and the blocks stay
        // unflushed. (nbdkit 1.32's error filter has no flush error of its
        // own; a failed write-back is how a flush fails on a real disk too.)
        // 4 KiB cache blocks, ext4's block size, for the subset model. The
        // write-back takes 4 ms a block (the delay filter), as an SD card's
        // flush takes its time: without it a flush is instant, and a cut
        // almost never finds a write the guest has not flushed yet.
        let nbd = Command::new("nbdkit")
            .args(["-f", "--exit-with-parent", "-U"])
            .arg(&sock)
            .args(["--filter=cache", "--filter=delay", "--filter=error", "file"])
            .arg(disk)
            .args(["cache=writeback", "cache-min-block-size=4096", "delay-write=4ms"])
            .args(["error=EIO", "error-pwrite-rate=100%"])
            .arg(format!("error-pwrite-file={}", eio_file.display()))
            // The cache filter keeps its (unflushed) blocks in a temp file here.
            .env("TMPDIR", &s.work)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nbdkit");
        assert!(wait_until(Duration::from_secs(10), || sock.exists()), "nbdkit did not create {}", sock.display());
        let serial = s.work.join(format!("console-{cycle:04}.log"));
        let ctl = s.work.join("ctl.sock");
        let _ = std::fs::remove_file(&ctl);
        let metrics_port = common::free_port();
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-m", "256", "-smp", "1", "-display", "none", "-monitor", "none"])
            .args(["-nodefaults", "-no-user-config"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-kernel")
            .arg(&s.kernel)
            .arg("-initrd")
            .arg(&s.initrd)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 quiet panic=-1 pc.port={port} pc.eager={} pc.full={} pc.seg={}",
                eager as u8,
                s.full as u8,
                segment_bytes(cycle)
            ))
            .arg("-drive")
            .arg(format!("file=nbd+unix:///?socket={},format=raw,if=virtio,cache=writeback", sock.display()))
            .arg("-netdev")
            .arg(format!("user,id=n0,hostfwd=tcp:127.0.0.1:{metrics_port}-:9898"))
            .args(["-device", "virtio-net-pci,netdev=n0"])
            .args(["-device", "virtio-serial-pci", "-chardev"])
            .arg(format!("serial,id=dock,path={}", dock.display()))
            .args(["-device", "virtconsole,chardev=dock", "-chardev"])
            .arg(format!("socket,id=ctl,path={},server=on,wait=off", ctl.display()))
            .args(["-device", "virtconsole,chardev=ctl"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // QEMU goes when this test does, however it ends.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let booted = Instant::now();
        let qemu = cmd.spawn().expect("spawn qemu-system-x86_64");
        Vm {
            nbd,
            qemu,
            booted,
            serial,
            ready: None,
            ctl,
            metrics_port,
            eio_file,
            work: s.work.clone(),
            exit_expected: false,
        }
    }

    /// A line to the guest's control port (tests/powercut/init).
    fn control(&self, cmd: &str) {
        let mut c = std::os::unix::net::UnixStream::connect(&self.ctl).expect("connect to the VM's control port");
        c.write_all(format!("{cmd}\n").as_bytes()).expect("write to the VM's control port");
    }

    /// The gateway's queue from its /metrics, if it answers.
    fn queue(&self) -> Option<QueueGauge> {
        let t = edge_gateway::metrics::http::fetch(([127, 0, 0, 1], self.metrics_port).into(), Duration::from_secs(2))
            .ok()?;
        Some(QueueGauge {
            batches: metric(&t, "edge_gateway_queue_batches")?,
            bytes: metric(&t, "edge_gateway_queue_bytes")?,
            max_bytes: metric(&t, "edge_gateway_queue_max_bytes")?,
            direct_commits: metric(&t, "edge_gateway_queue_direct_commits_total")?,
            deflate_saved: metric(&t, "edge_gateway_queue_deflate_saved_bytes_total")?,
        })
    }

    fn console(&self) -> Console {
        let raw = std::fs::read(&self.serial).unwrap_or_default();
        Console { text: String::from_utf8_lossy(&raw).into_owned() }
    }

    /// Read the console; fail on what must never happen after a cut.
    fn poll(&mut self) -> Console {
        let c = self.console();
        if self.ready.is_none() && c.has(READY) {
            self.ready = Some(self.booted.elapsed());
        }
        assert!(!c.has("POWERCUT: MOUNT FAILED"), "the data disk did not mount after a cut:\n{}", c.text);
        if !self.exit_expected {
            assert!(!c.has("POWERCUT: GATEWAY EXITED"), "the gateway exited:\n{}", c.text);
        }
        if let Ok(Some(st)) = self.qemu.try_wait() {
            panic!("qemu exited ({st}):\n{}", c.text);
        }
        c
    }

    /// Wait until `f(console)` holds; returns when (since power-on).
    fn wait(&mut self, timeout: Duration, f: impl Fn(&Console) -> bool) -> Option<Duration> {
        let end = Instant::now() + timeout;
        loop {
            if f(&self.poll()) {
                return Some(self.booted.elapsed());
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_for(&mut self, marker: &str, timeout: Duration) -> Option<Duration> {
        self.wait(timeout, |c| c.has(marker))
    }

    /// Sleep until `at` after power-on, watching the console.
    fn until(&mut self, at: Duration) {
        let _ = self.wait(at.saturating_sub(self.booted.elapsed()), |_| false);
    }

    /// The power cut: the disk's volatile cache goes first (all of it, or
    /// all but a random subset of its unflushed blocks), then the machine.
    fn cut(mut self, disk_model: Disk, disk: &Path, rng: &mut XorShift) -> (Console, CutDisk) {
        let mut fig = CutDisk::default();
        if disk_model == Disk::Subset {
            let pid = nix::unistd::Pid::from_raw(self.nbd.id() as i32);
            // Frozen: nothing is written back while the subset is drawn.
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP nbdkit");
            let p = 0.1 + rng.below(801) as f64 / 1000.0;
            fig = keep_subset(pid.as_raw() as u32, &self.work, disk, p, rng);
        }
        let _ = self.nbd.kill();
        let _ = self.nbd.wait();
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        let _ = std::fs::remove_file(&self.eio_file);
        (self.console(), fig)
    }
}

/// Write a random subset of nbdkit's dirty cache blocks to the disk image.
///
/// The cache filter keeps every block it holds in an unlinked temp file (in
/// TMPDIR, our work dir), reachable through /proc/PID/fd. A block there is
/// either clean (read from, or flushed to, the disk: the same bytes as in the
/// image) or written since the last flush, so the blocks that differ from the
/// image are exactly the unflushed writes (a write of the bytes already there
/// changes nothing either way). Each survives with probability `p`.
fn keep_subset(pid: u32, work: &Path, disk: &Path, p: f64, rng: &mut XorShift) -> CutDisk {
    use nix::unistd::{Whence, lseek};
    use std::os::unix::fs::FileExt;
    const BLOCK: u64 = 4096;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("nbdkit's fds");
    let cache = fds
        .filter_map(|e| e.ok())
        .find(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| {
                let t = t.to_string_lossy().into_owned();
                t.starts_with(&*work.to_string_lossy()) && t.ends_with(" (deleted)")
            })
        })
        .expect("nbdkit's cache file (an unlinked file in the work dir)");
    let cache = std::fs::File::open(cache.path()).expect("open nbdkit's cache file");
    let img = std::fs::OpenOptions::new().read(true).write(true).open(disk).expect("open the disk image");
    let size = img.metadata().unwrap().len();
    let mut fig = CutDisk::default();
    let (mut a, mut b) = (vec![0u8; BLOCK as usize], vec![0u8; BLOCK as usize]);
    let mut off = 0u64;
    while off < size {
        // Only the blocks the cache holds (its file is sparse).
        let Ok(data) = lseek(&cache, off as i64, Whence::SeekData) else { break };
        let end = lseek(&cache, data, Whence::SeekHole).expect("SEEK_HOLE") as u64;
        let mut blk = data as u64 / BLOCK * BLOCK;
        while blk < end.min(size) {
            cache.read_exact_at(&mut a, blk).expect("read cache block");
            img.read_exact_at(&mut b, blk).expect("read image block");
            if a != b {
                fig.dirty += 1;
                if rng.below(1_000_000) < (p * 1_000_000.0) as u64 {
                    img.write_all_at(&a, blk).expect("write image block");
                    fig.kept += 1;
                }
            }
            blk += BLOCK;
        }
        off = end;
    }
    fig
}

/// With rules: the aggregate's output batches (no `seq`) apart from the
/// device's readings (each with its seq, on the readings or the alarms topic).
fn split_derived(msgs: Vec<(String, Vec<u8>)>) -> (Vec<(String, Vec<u8>)>, Vec<edge_gateway::Reading>) {
    let mut raw = Vec::new();
    let mut derived = Vec::new();
    for (t, p) in msgs {
        let b = edge_gateway::Batch::decode(&p).expect("payload is a batch");
        if b.readings.iter().all(|r| r.seq.is_none()) {
            derived.extend(b.readings);
        } else {
            raw.push((t, p));
        }
    }
    (raw, derived)
}

/// The aggregate every window must have: heart rates are the seqs divisible
/// by 3 (the simulator rotates three sensors), ts = SIM_EPOCH + seq, windows
/// of 100 ms.
fn expected_counts(created: u64) -> std::collections::BTreeMap<u64, f64> {
    let mut m = std::collections::BTreeMap::new();
    for seq in (0..created).filter(|s| s % 3 == 0) {
        let ts = SIM_EPOCH + seq;
        *m.entry(ts - ts % 100).or_default() += 1.0;
    }
    m
}

/// `ts` of the simulator's reading 0.
const SIM_EPOCH: u64 = 1_764_000_000_000;

/// `seq` → how many times the subscriber got it.
fn counts(r: &Received) -> std::collections::HashMap<u64, usize> {
    let mut m = std::collections::HashMap::new();
    for ((dev, _, seq), n) in &r.readings {
        assert_eq!(dev, DEVICE, "a reading of an unknown device arrived");
        *m.entry(*seq).or_default() += n;
    }
    m
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Cut {
    /// Anywhere from power-on to shortly after the gateway runs: kernel,
    /// journal replay, queue open and repair, dedup replay.
    Boot,
    /// Within the gateway's start-up proper (after the mount).
    Startup,
    /// While the gateway runs and the uplink keeps up.
    Running,
    /// The broker was down for a while (a backlog built up) and has just
    /// come back: cut while the backlog drains.
    Drain,
    /// Just after a SIGHUP: the reloaded config restarts the serial port
    /// and the uplink (tests/powercut/init switches two variants).
    Reload,
    /// Every flush fails with EIO from a random moment on; the gateway must
    /// exit with status 75, and the power goes after that.
    Eio,
}

impl Cut {
    fn name(self) -> &'static str {
        match self {
            Cut::Boot => "boot",
            Cut::Startup => "startup",
            Cut::Running => "running",
            Cut::Drain => "drain",
            Cut::Reload => "reload",
            Cut::Eio => "eio",
        }
    }
}

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[((s.len() - 1) as f64 * p).round() as usize]
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[test]
#[ignore = "the power-cut rig: run it with tests/powercut/run.sh --cycles N"]
fn power_cuts_lose_and_double_nothing() {
    for (tool, pkg) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("nbdkit", "nbdkit"),
        ("mkfs.ext4", "e2fsprogs"),
        ("mosquitto", "mosquitto"),
        ("mosquitto_sub", "mosquitto-clients"),
    ] {
        need(tool, pkg);
    }
    let s = Settings::from_env();
    std::fs::create_dir_all(&s.work).unwrap();
    println!(
        "power-cut rig: seed {} (repeat with --seed {}), {} cycles, {} readings/s, work dir {}",
        s.seed,
        s.seed,
        s.cycles,
        s.rate,
        s.work.display()
    );
    let mut rng = XorShift::new(s.seed);

    let disk = s.work.join("disk.raw");
    let ok = Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&disk).arg("64M").status().expect("mkfs.ext4");
    assert!(ok.success(), "mkfs.ext4 failed");

    let certs = make_certs(&s.work);
    let mut broker = Mosquitto::start(&s.work.join("mosquitto"), &certs, false);
    let sub = Subscriber::start(broker.plain_port, "powercut-sub", TOPIC, &s.work.join("received.txt"));
    let alarms = s
        .rules
        .then(|| Subscriber::start(broker.plain_port, "powercut-alarms", ALARMS_TOPIC, &s.work.join("alarms.txt")));
    let copies = s
        .rules
        .then(|| Subscriber::start(broker.plain_port, "powercut-copies", COPY_TOPIC, &s.work.join("copies.txt")));
    // Every batch on both topics; the aggregate's outputs apart.
    let all = || {
        let mut m = sub.messages();
        if let Some(a) = &alarms {
            m.extend(a.messages());
        }
        split_derived(m)
    };
    let dev = Wearable::start(s.rate, s.seed);

    let mut table = std::fs::File::create(s.work.join("cycles.tsv")).unwrap();
    let header = "cycle\tcut\tdisk\tat_s\twriteback\tbroker\tqueue_bytes\tfull\tdirty_blocks\tkept_blocks\tacked\tdelivered\tdup\trepaired_bytes\tcorrupt_records\tstartup_s";
    writeln!(table, "{header}").unwrap();
    println!("{header}");

    let mut startups = Vec::new();
    let mut repaired = Vec::new();
    let mut ready_estimate = Duration::from_secs(12);
    let mut dups_seen = 0usize;
    let mut per_phase: std::collections::BTreeMap<&str, u32> = Default::default();
    let (mut subset_cuts, mut dirty_total, mut kept_total) = (0u32, 0u64, 0u64);
    let (mut eio_exits, mut reloads_done, mut full_cuts) = (0u32, 0u32, 0u32);
    // Direct commits and bytes saved by deflated records, as /metrics said
    // before each cut (each boot counts from 0).
    let (mut direct_total, mut deflated_total, mut big_segment_reads) = (0u64, 0u64, 0u32);
    for cycle in 1..=s.cycles {
        let mode = match rng.below(100) {
            // The first cut comes after the device's first ack (see below).
            _ if cycle == 1 => Cut::Running,
            0..16 => Cut::Boot,
            16..28 => Cut::Startup,
            28..52 => Cut::Running,
            52..70 => Cut::Drain,
            70..86 => Cut::Reload,
            _ => Cut::Eio,
        };
        let disk_model = if rng.chance(0.5) { Disk::Subset } else { Disk::Lose };
        // Now and then the broker is away for a whole cycle: the queue keeps
        // a backlog across the cut, drained after the next boot (and with
        // the small reject_new queue, fills it). Not in an EIO cycle: with
        // a full queue refusing every batch there is nothing to commit, so
        // no failing flush.
        let broker_away = !matches!(mode, Cut::Drain | Cut::Eio) && rng.chance(if s.full { 0.3 } else { 0.15 });
        if broker_away || mode == Cut::Drain {
            broker.stop();
        }
        // Half the boots write back eagerly (see tests/powercut/init).
        let eager = rng.chance(0.5);
        let mut vm = Vm::boot(&s, &disk, &dev.dock, broker.plain_port, cycle, eager);
        let running = |vm: &mut Vm| {
            let t = vm.wait_for(READY, BOOT_TIMEOUT);
            t.unwrap_or_else(|| panic!("the gateway did not start within {BOOT_TIMEOUT:?}:\n{}", vm.console().text))
        };
        match mode {
            Cut::Boot => {
                let frac = 0.1 + rng.below(1000) as f64 / 1000.0;
                vm.until(Duration::from_secs_f64(secs(ready_estimate) * frac));
            }
            Cut::Startup => {
                let t = vm.wait_for("POWERCUT: starting gateway", BOOT_TIMEOUT);
                let t = t.unwrap_or_else(|| panic!("no gateway start within {BOOT_TIMEOUT:?}:\n{}", vm.console().text));
                vm.until(t + Duration::from_millis(rng.below(600)));
            }
            Cut::Drain => {
                let t = running(&mut vm);
                // A backlog first, then the broker returns; cut once the
                // uplink is connected again and draining.
                vm.until(t + Duration::from_millis(1500 + rng.below(3000)));
                broker.restart();
                // The broker was away since boot, so any connect is the
                // reconnect (src/uplink/mod.rs logs "connected (MQTT ..").
                let back = vm.wait(Duration::from_secs(20), |c| c.has(": connected (MQTT"));
                let back = back.unwrap_or_else(|| panic!("the uplink did not reconnect:\n{}", vm.console().text));
                vm.until(back + Duration::from_millis(rng.below(1200)));
            }
            Cut::Running => {
                let t = running(&mut vm);
                if cycle == 1 {
                    // A cut before the first run's first checkpoint
                    // names the device would hold its acks for
                    // ack_gap_timeout (30 s) of talking, longer than a
                    // cycle, after every later boot.
                    let acked = wait_until(BOOT_TIMEOUT, || dev.view().acked > 0);
                    assert!(acked, "the device got no ack:\n{}", vm.console().text);
                    vm.until(vm.booted.elapsed() + Duration::from_secs(2));
                }
                vm.until(vm.booted.elapsed().max(t) + Duration::from_millis(100 + rng.below(6000)));
            }
            Cut::Reload => {
                let t = running(&mut vm);
                vm.until(t + Duration::from_millis(300 + rng.below(3000)));
                vm.control("hup");
                let sent = vm.wait_for("POWERCUT: sighup 1 sent", Duration::from_secs(10));
                let sent = sent.unwrap_or_else(|| panic!("the guest did not send SIGHUP:\n{}", vm.console().text));
                // Cut in the middle of the reload (serial port and uplink
                // restarting) or shortly after it.
                vm.until(sent + Duration::from_millis(rng.below(1500)));
                let c = vm.console();
                if c.text[c.text.find("POWERCUT: sighup 1 sent").unwrap()..].contains("reload: ") {
                    reloads_done += 1;
                }
            }
            Cut::Eio => {
                let t = running(&mut vm);
                vm.until(t + Duration::from_millis(200 + rng.below(4000)));
                std::fs::write(&vm.eio_file, b"").unwrap();
                vm.exit_expected = true;
                let gone = vm.wait(Duration::from_secs(30), |c| c.has("POWERCUT: GATEWAY EXITED"));
                let c = vm.console();
                let gone = gone.unwrap_or_else(|| {
                    panic!("the gateway kept running 30 s after its flushes began to fail with EIO:\n{}", c.text)
                });
                // Whichever fsync fails first ends it: the queue's commit,
                // the uplink's PUBREC log or the dead-letter store.
                assert!(
                    c.has("POWERCUT: GATEWAY EXITED 75") && c.has("exiting with status 75"),
                    "a failed flush must end the gateway through the exit-75 path:\n{}",
                    c.text
                );
                eio_exits += 1;
                vm.until(gone + Duration::from_millis(rng.below(1000)));
            }
        }
        let at = vm.booted.elapsed();
        let startup = vm.ready;
        // The queue at the cut (not during boot: nothing listens yet).
        let gauge = if startup.is_some() && mode != Cut::Eio { vm.queue() } else { None };
        // Full: the next batch (at most batch_max_bytes, 2 KiB in these
        // runs) would not fit.
        let full = s.full && gauge.is_some_and(|q| q.bytes + 2048 + 30 > q.max_bytes);
        if let Some(q) = gauge {
            direct_total += q.direct_commits;
            deflated_total += q.deflate_saved;
            big_segment_reads += (segment_bytes(cycle) == "1MiB") as u32;
        }
        let (console, fig) = vm.cut(disk_model, &disk, &mut rng);
        assert!(!console.has("reload refused"), "a reload was refused:\n{}", console.text);
        if broker_away {
            broker.restart();
        }
        *per_phase.entry(mode.name()).or_default() += 1;
        full_cuts += full as u32;
        if disk_model == Disk::Subset {
            subset_cuts += 1;
            dirty_total += fig.dirty;
            kept_total += fig.kept;
        }
        if let Some(t) = startup {
            startups.push(secs(t));
            // Boot cuts aim at the whole start-up, so track its length.
            ready_estimate = Duration::from_secs_f64(percentile(&startups, 0.5));
        }
        let (torn, corrupt) = console.repaired();
        if console.has("queue open:") {
            repaired.push(torn);
        }
        let view = dev.view();
        let got = counts(&decode_all(&all().0));
        let dup = got.values().filter(|&&n| n > 1).count();
        if dup > dups_seen {
            println!("DUPLICATE: {} readings arrived more than once so far (cycle {cycle})", dup);
            dups_seen = dup;
        }
        let row = format!(
            "{cycle}\t{}\t{}\t{:.2}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{dup}\t{torn}\t{corrupt}\t{}",
            mode.name(),
            if disk_model == Disk::Subset { "subset" } else { "lose" },
            secs(at),
            if eager { "eager" } else { "default" },
            if broker_away {
                "away"
            } else if mode == Cut::Drain {
                "back"
            } else {
                "up"
            },
            gauge.map_or("-".into(), |q| q.bytes.to_string()),
            if full { "full" } else { "-" },
            fig.dirty,
            fig.kept,
            view.acked,
            got.len(),
            startup.map_or("-".into(), |t| format!("{:.2}", secs(t))),
        );
        writeln!(table, "{row}").unwrap();
        println!("{row}");
    }

    // The last boot: no cut. The wearable stops creating readings, the
    // gateway gets everything acked and delivered, reports an empty queue
    // and is stopped (SIGTERM, exit 0); only then the count.
    let mut vm = Vm::boot(&s, &disk, &dev.dock, broker.plain_port, s.cycles + 1, false);
    let ready = vm.wait_for(READY, BOOT_TIMEOUT);
    assert!(ready.is_some(), "the gateway did not start after the last cut:\n{}", vm.console().text);
    let (torn, _) = vm.console().repaired();
    repaired.push(torn);
    startups.push(secs(ready.unwrap()));
    dev.produce.store(false, Ordering::Relaxed);
    let all_acked = wait_until(FINAL_TIMEOUT, || {
        let v = dev.view();
        !v.producing && v.pending == 0
    });
    let view = dev.view();
    assert!(all_acked, "readings still unacked after {FINAL_TIMEOUT:?}: {view:?}\n{}", vm.console().text);
    let empty = wait_until(FINAL_TIMEOUT, || vm.queue().is_some_and(|q| q.batches == 0));
    assert!(empty, "the queue is not empty after {FINAL_TIMEOUT:?}: {:?}\n{}", vm.queue(), vm.console().text);
    // Delivered to the broker (PUBCOMP) is not yet printed by the
    // subscriber: wait for it, bounded, then stop the gateway.
    let want_windows = if s.rules { expected_counts(view.created).len() } else { 0 };
    let _ = wait_until(Duration::from_secs(30), || {
        let (raw, derived) = all();
        decode_all(&raw).total_readings as u64 >= view.created && derived.len() >= want_windows
    });
    vm.control("term");
    vm.exit_expected = true;
    let stopped = vm.wait_for("POWERCUT: GATEWAY EXITED", Duration::from_secs(30));
    let console = vm.console();
    assert!(stopped.is_some(), "the gateway did not stop on SIGTERM:\n{}", console.text);
    assert!(console.has("POWERCUT: GATEWAY EXITED 0"), "the gateway's stop was not clean:\n{}", console.text);
    // A late duplicate has its chance to show up.
    std::thread::sleep(Duration::from_secs(1));
    let _ = vm.cut(Disk::Lose, &disk, &mut rng);
    let (raw, derived) = all();
    let received = decode_all(&raw);
    let got = counts(&received);
    sub.stop();
    let copied = copies.as_ref().map(|c| decode_all(&c.messages()));
    if let Some(a) = alarms {
        a.stop();
    }
    if let Some(c) = copies {
        c.stop();
    }
    drop(broker);

    let lost: Vec<u64> = (0..view.acked).filter(|q| !got.contains_key(q)).collect();
    let mut dup: Vec<(u64, usize)> = got.iter().filter(|(_, n)| **n > 1).map(|(q, n)| (*q, *n)).collect();
    dup.sort();
    let unknown = got.keys().filter(|q| **q >= view.created).count();
    let cut_cycles = repaired.iter().filter(|b| **b > 0).count();
    let phases: Vec<String> = per_phase.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!(
        "power-cut rig: {} cycles, seed {}, when_full {}: cuts per phase: {}",
        s.cycles,
        s.seed,
        if s.full { "reject_new (16 KiB)" } else { "drop_oldest (32 MiB)" },
        phases.join(", ")
    );
    println!(
        "power-cut rig: disk: {} subset cuts kept {} of {} unflushed 4 KiB blocks, the rest lost everything unflushed; {} EIO cycles ended in exit 75; {} reload cuts after the reload finished; {} cuts with the queue full",
        subset_cuts, kept_total, dirty_total, eio_exits, reloads_done, full_cuts
    );
    println!(
        "power-cut rig: queue: {direct_total} direct commits and {deflated_total} bytes saved by deflated records before the cuts ({})",
        if s.full {
            "the 16 KiB queue keeps segments small: none can be direct"
        } else {
            "1 MiB segments every other cycle"
        }
    );
    println!(
        "power-cut rig: {} readings created, {} acked, {} delivered ({} in total), lost {}, duplicated {}, unknown {}",
        view.created,
        view.acked,
        got.len(),
        received.total_readings,
        lost.len(),
        dup.len(),
        unknown
    );
    println!(
        "power-cut rig: torn tails repaired at {} of {} boots (bytes: total {}, median {}, max {}); start-up after cut (qemu start → gateway running): median {:.1} s, p90 {:.1} s",
        cut_cycles,
        repaired.len(),
        repaired.iter().sum::<u64>(),
        percentile(&repaired.iter().filter(|b| **b > 0).map(|b| *b as f64).collect::<Vec<_>>(), 0.5),
        repaired.iter().max().copied().unwrap_or(0),
        percentile(&startups, 0.5),
        percentile(&startups, 0.9),
    );
    assert!(lost.is_empty(), "acked readings lost (seed {}): {:?}", s.seed, &lost[..lost.len().min(50)]);
    assert!(dup.is_empty(), "readings delivered twice (seed {}): {:?}", s.seed, &dup[..dup.len().min(50)]);
    assert_eq!(unknown, 0, "readings nobody sent arrived");
    // Every reading the wearable created was acked (pending 0), so exactly
    // those arrived, each once.
    assert_eq!(
        received.total_readings as u64, view.created,
        "after an empty queue and a clean stop, the subscriber must hold every created reading exactly once"
    );
    assert_eq!(got.len() as u64, view.created, "not every created reading was delivered");
    // The 1 MiB cycles must have reached the paths they are there for (where
    // /metrics was read before a cut in one of them at least: boot, start-up
    // and EIO cuts read none).
    if !s.full && big_segment_reads > 0 {
        assert!(
            direct_total > 0 && deflated_total > 0,
            "no direct commit or no deflated record before any cut ({direct_total} / {deflated_total}): the guest \
             kernel or file system offers no direct I/O (statx DIO alignment, Linux >= 6.1, ext4), so the rig \
             did not test them"
        );
    }
    if s.rules {
        // The alarms' second topic got exactly the alarms, each once.
        let copied = counts(&copied.expect("rules"));
        let alarms: std::collections::HashMap<u64, usize> =
            decode_all(&raw.iter().filter(|(t, _)| t == ALARMS_TOPIC).cloned().collect::<Vec<_>>())
                .readings
                .iter()
                .map(|((_, _, q), n)| (*q, *n))
                .collect();
        println!("power-cut rig: rules: {} alarms, {} second copies", alarms.len(), copied.len());
        assert_eq!(copied, alarms, "the second topic must get exactly the alarms, once each (seed {})", s.seed);
        // Every window's count exactly once, equal to the acked readings'.
        let want = expected_counts(view.created);
        let mut windows: std::collections::BTreeMap<u64, Vec<f64>> = Default::default();
        for r in &derived {
            assert_eq!(r.sensor, "heart_rate.count_100ms", "an output no rule makes: {r:?}");
            let edge_gateway::Value::Number(n) = r.value else { panic!("a count is a number: {r:?}") };
            windows.entry(r.ts).or_default().push(n);
        }
        let wrong: Vec<String> = want
            .iter()
            .filter(|(k, v)| windows.get(k).map(|g| g.as_slice()) != Some(&[**v][..]))
            .map(|(k, v)| format!("window {k}: want [{v}], got {:?}", windows.get(k)))
            .collect();
        let extra: Vec<&u64> = windows.keys().filter(|k| !want.contains_key(k)).collect();
        println!(
            "power-cut rig: rules: {} aggregate windows, {} wrong or missing, {} extra",
            want.len(),
            wrong.len(),
            extra.len()
        );
        assert!(
            wrong.is_empty() && extra.is_empty(),
            "aggregate outputs wrong (seed {}): {:?} extra {:?}",
            s.seed,
            &wrong[..wrong.len().min(20)],
            extra
        );
    }
    // The disk image is the bulk of the work dir; the logs stay.
    let _ = std::fs::remove_file(&disk);
}
