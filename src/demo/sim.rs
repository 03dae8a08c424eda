//! A simulated wearable on the far side of a serial link, for tests,
//! benchmarks and the demo.
//!
//! It behaves like the firmware we ask vendors to write: every reading gets
//! the next `seq`, stays pending until a cumulative ack covers it, and all
//! pending readings are resent when acks stop making progress. It can also
//! misbehave on purpose (duplicates, malformed frames) so the gateway's
//! counters can be checked exactly.
//!
//! Plain threads and blocking I/O: a test drives it from a `std::thread`
//! while the gateway runs on tokio, which keeps the two honest about
//! concurrency. Deterministic for a given seed.

use crate::reading::{Reading, Value};
use crate::route::{CommandAck, DeviceCommand};
use crate::wire::Framing;
use crate::wire::{self, FrameSplitter};
use nix::poll::{PollFd, PollFlags, poll};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use crate::rng::XorShift;

/// A PTY pair whose slave end looks like a dock's `/dev/ttyACM*`.
#[derive(Debug)]
pub struct Pty {
    /// The device's side.
    pub master: File,
    /// What the gateway opens.
    pub slave_path: PathBuf,
    /// Kept open for the PTY's lifetime: with no slave fd open at all, Linux
    /// fails master reads with EIO and data written before the gateway opens
    /// the port would have nowhere to wait. A real dock's USB device also
    /// exists whether or not the host has it open.
    pub slave: OwnedFd,
}

/// Open a PTY pair with the slave in raw mode. Raw matters: by default a
/// tty echoes input back to the master and turns `\n` into `\r\n`, which
/// would feed the device its own readings and mangle COBS frames.
pub fn open_pty() -> io::Result<Pty> {
    use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
    let pair = nix::pty::openpty(None, None)?;
    // openpty(3) makes inheritable fds: without CLOEXEC every child process
    // (the gateway under test!) would hold the master open, and closing it
    // here would never look like an unplug.
    for fd in [&pair.master, &pair.slave] {
        use nix::fcntl::{FcntlArg, FdFlag, fcntl};
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    }
    let mut t = tcgetattr(&pair.slave)?;
    cfmakeraw(&mut t);
    tcsetattr(&pair.slave, SetArg::TCSANOW, &t)?;
    let slave_path = nix::unistd::ttyname(&pair.slave)?;
    Ok(Pty { master: File::from(pair.master), slave_path, slave: pair.slave })
}

/// Make `link` point at `target`, replacing an existing link atomically
/// (symlink beside it, then rename), as udev does when a dock is replugged.
pub fn point_symlink(link: &Path, target: &Path) -> io::Result<()> {
    let mut tmp = link.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, link)
}

/// Ways a device can send rubbish; each produces exactly one malformed frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// Random bytes (no delimiter inside).
    Garbage,
    /// jsonl: a truncated JSON object; cobs: a valid frame with a wrong CRC.
    Corrupt,
    /// A frame well past the 4 KiB limit.
    Overlong,
    /// Well-formed but without a sensor id.
    MissingSensor,
}

impl Malformed {
    pub const ALL: [Malformed; 4] =
        [Malformed::Garbage, Malformed::Corrupt, Malformed::Overlong, Malformed::MissingSensor];
}

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub device: String,
    pub sensors: Vec<String>,
    /// `seq` of the first reading (a device that rebooted continues its
    /// count). 0 by default: nothing can be below it, so the gateway acks the
    /// first reading at once (any other first seq waits `ack_gap_timeout` of
    /// talking, since lower ones may exist that never arrived).
    pub first_seq: u64,
    pub framing: Framing,
    /// Resend everything pending after this long without ack progress.
    pub resend_after: Duration,
    /// After each new reading, resend a random earlier one with this probability.
    pub duplicate_probability: f64,
    /// After each new reading, send a malformed frame with this probability.
    pub malformed_probability: f64,
    pub seed: u64,
}

impl SimConfig {
    pub fn new(device: &str, framing: Framing) -> Self {
        SimConfig {
            device: device.to_string(),
            sensors: vec!["heart_rate".into(), "skin_temp".into(), "accel".into()],
            first_seq: 0,
            framing,
            resend_after: Duration::from_millis(500),
            duplicate_probability: 0.0,
            malformed_probability: 0.0,
            seed: 1,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Distinct readings created and sent.
    pub sent_unique: u64,
    /// Reading frames written: unique + injected duplicates + resends.
    pub sent_total: u64,
    pub duplicates_injected: u64,
    pub resent: u64,
    pub malformed_sent: u64,
    pub acks_received: u64,
    /// Ack frames the device could not parse.
    pub bad_acks: u64,
    /// Highest seq covered by an ack.
    pub acked_through: Option<u64>,
    /// Readings sent and not yet covered by an ack.
    pub pending: usize,
}

#[derive(Debug)]
struct AckState {
    pending: BTreeMap<u64, Reading>,
    acked_through: Option<u64>,
    acks_received: u64,
    bad_acks: u64,
    /// Last ack that covered something new (or when pending became non-empty).
    last_progress: Instant,
    /// Commands from the gateway not answered yet, in arrival order (a
    /// retry of one already here is kept once).
    commands: Vec<DeviceCommand>,
    /// Every command line received, retries included.
    commands_received: u64,
    /// The last time line from the gateway (unix ms).
    time_ms: Option<u64>,
}

/// Wraps a PTY master so the reader thread can be told to stop: a plain
/// blocking `read` on a master cannot be interrupted while the gateway keeps
/// the slave open.
struct StoppableReader {
    file: File,
    stop: Arc<AtomicBool>,
}

impl Read for StoppableReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Ok(0);
            }
            let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, 50u16) {
                Ok(0) => continue,
                Ok(_) => return self.file.read(buf),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

pub struct SimDevice {
    cfg: SimConfig,
    writer: Box<dyn Write + Send>,
    state: Arc<Mutex<AckState>>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    /// Only readers that honour `stop` can be joined without hanging.
    reader_stoppable: bool,
    rng: XorShift,
    next_seq: u64,
    created: Vec<Reading>,
    stats: SimStats,
    last_resend: Instant,
    pty: Option<(PathBuf, OwnedFd)>,
    /// Inside [`SimDevice::send_burst`]: frames collected for one write.
    held: Option<Vec<u8>>,
}

impl SimDevice {
    /// A device speaking over any byte pipe (`reader` carries acks to it).
    /// The reader thread ends at EOF; it cannot be interrupted otherwise.
    pub fn new<R, W>(cfg: SimConfig, reader: R, writer: W) -> SimDevice
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let mut d = SimDevice::unstarted(cfg, Box::new(writer));
        d.start_reader(reader);
        d
    }

    /// A device on the master side of `pty`; the gateway opens `pty.slave_path`.
    pub fn on_pty(cfg: SimConfig, pty: Pty) -> io::Result<SimDevice> {
        let reader_file = pty.master.try_clone()?;
        let mut d = SimDevice::unstarted(cfg, Box::new(pty.master));
        let reader = StoppableReader { file: reader_file, stop: d.stop.clone() };
        d.start_reader(reader);
        d.reader_stoppable = true;
        d.pty = Some((pty.slave_path, pty.slave));
        Ok(d)
    }

    fn unstarted(cfg: SimConfig, writer: Box<dyn Write + Send>) -> SimDevice {
        SimDevice {
            rng: XorShift::new(cfg.seed),
            next_seq: cfg.first_seq,
            writer,
            state: Arc::new(Mutex::new(AckState {
                pending: BTreeMap::new(),
                acked_through: None,
                acks_received: 0,
                bad_acks: 0,
                last_progress: Instant::now(),
                commands: Vec::new(),
                commands_received: 0,
                time_ms: None,
            })),
            stop: Arc::new(AtomicBool::new(false)),
            reader: None,
            reader_stoppable: false,
            created: Vec::new(),
            stats: SimStats::default(),
            last_resend: Instant::now(),
            pty: None,
            held: None,
            cfg,
        }
    }

    fn start_reader<R: Read + Send + 'static>(&mut self, mut reader: R) {
        let state = self.state.clone();
        let framing = self.cfg.framing;
        let device = self.cfg.device.clone();
        self.reader = Some(std::thread::spawn(move || {
            let mut splitter = FrameSplitter::new(framing);
            let mut buf = [0u8; 1024];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // EIO once the link is gone: the device is unplugged.
                    Err(_) => return,
                };
                let mut st = lock(&state);
                splitter.feed(&buf[..n], |frame| {
                    match frame.and_then(|f| wire::parse_from_gateway(framing, f)) {
                        Ok(wire::FromGateway::Ack(ack)) if ack.device == device => {
                            st.acks_received += 1;
                            if st.acked_through.is_none_or(|a| ack.seq > a) {
                                st.acked_through = Some(ack.seq);
                                st.last_progress = Instant::now();
                            }
                            st.pending = st.pending.split_off(&ack.seq.saturating_add(1));
                            if ack.seq == u64::MAX {
                                st.pending.clear();
                            }
                        }
                        // Acks for another device share a bus in the real
                        // world; they are not ours to act on.
                        Ok(wire::FromGateway::Ack(_)) => st.acks_received += 1,
                        Ok(wire::FromGateway::Command(c)) if c.device == device => {
                            st.commands_received += 1;
                            if !st.commands.iter().any(|x| x.id == c.id) {
                                st.commands.push(c);
                            }
                        }
                        Ok(wire::FromGateway::Command(_)) => {}
                        Ok(wire::FromGateway::Time(ms)) => st.time_ms = Some(ms),
                        Err(_) => st.bad_acks += 1,
                    }
                });
            }
        }));
    }

    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    /// The PTY slave path the gateway should open, when on a PTY.
    pub fn slave_path(&self) -> Option<&Path> {
        self.pty.as_ref().map(|(p, _)| p.as_path())
    }

    fn make_reading(&mut self) -> Reading {
        let seq = self.next_seq;
        self.next_seq += 1;
        let sensor = if self.cfg.sensors.is_empty() {
            "value".to_string()
        } else {
            self.cfg.sensors[(seq % self.cfg.sensors.len() as u64) as usize].clone()
        };
        let value = match sensor.as_str() {
            "heart_rate" => Value::Number(55.0 + self.rng.below(60) as f64),
            "accel" => Value::Array((0..3).map(|_| (self.rng.below(2000) as f64 - 1000.0) / 100.0).collect()),
            _ => Value::Number(self.rng.below(10_000) as f64 / 100.0),
        };
        // A fixed epoch plus seq keeps runs reproducible and resends identical.
        Reading {
            device: self.cfg.device.clone(),
            sensor,
            seq: Some(seq),
            ts: 1_764_000_000_000 + seq,
            value,
            boot: None,
        }
    }

    fn write_reading(&mut self, r: &Reading) -> io::Result<()> {
        let bytes = wire::encode_reading(self.cfg.framing, r).map_err(io::Error::other)?;
        self.emit(&bytes)?;
        self.stats.sent_total += 1;
        Ok(())
    }

    /// Write `bytes` now, or hold them for the burst being built.
    fn emit(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.held {
            Some(h) => {
                h.extend_from_slice(bytes);
                Ok(())
            }
            None => self.writer.write_all(bytes),
        }
    }

    /// [`SimDevice::send_next`] `n` times, every frame in one write: a dock
    /// handing over what it stored, back to back (and a bench's writer
    /// paying one system call per burst instead of one per reading).
    pub fn send_burst(&mut self, n: usize) -> io::Result<Vec<Reading>> {
        self.held = Some(Vec::new());
        let sent: io::Result<Vec<Reading>> = (0..n).map(|_| self.send_next()).collect();
        let bytes = self.held.take().unwrap_or_default();
        let sent = sent?;
        self.writer.write_all(&bytes)?;
        Ok(sent)
    }

    /// Create and send the next reading, then maybe a duplicate and/or a
    /// malformed frame (per the configured probabilities).
    pub fn send_next(&mut self) -> io::Result<Reading> {
        let r = self.make_reading();
        {
            let mut st = lock(&self.state);
            if st.pending.is_empty() {
                st.last_progress = Instant::now();
            }
            st.pending.insert(r.seq.unwrap_or_default(), r.clone());
        }
        self.created.push(r.clone());
        self.stats.sent_unique += 1;
        self.write_reading(&r)?;
        if self.rng.chance(self.cfg.duplicate_probability) {
            let i = self.rng.below(self.created.len() as u64) as usize;
            let dup = self.created[i].clone();
            self.write_reading(&dup)?;
            self.stats.duplicates_injected += 1;
        }
        if self.rng.chance(self.cfg.malformed_probability) {
            let kind = Malformed::ALL[self.rng.below(Malformed::ALL.len() as u64) as usize];
            self.send_malformed(kind)?;
        }
        Ok(r)
    }

    /// Send one malformed frame of the given kind.
    pub fn send_malformed(&mut self, kind: Malformed) -> io::Result<()> {
        let bytes = match (self.cfg.framing, kind) {
            (Framing::Jsonl, Malformed::Garbage) => {
                // Starts with '#', so it can never be valid JSON.
                let mut b = vec![b'#'];
                b.extend((0..1 + self.rng.below(40)).map(|_| b' ' + 1 + self.rng.below(94) as u8));
                b.push(b'\n');
                b
            }
            (Framing::Cobs, Malformed::Garbage) => {
                let mut b: Vec<u8> = (0..1 + self.rng.below(40)).map(|_| 1 + self.rng.below(255) as u8).collect();
                b.push(0);
                b
            }
            (Framing::Jsonl, Malformed::Corrupt) => {
                format!("{{\"device\":\"{}\",\"sensor\":\n", self.cfg.device).into_bytes()
            }
            (Framing::Cobs, Malformed::Corrupt) => {
                let r = Reading { seq: None, ..self.make_probe() };
                let mut b = wire::encode_reading_cobs(&r).map_err(io::Error::other)?;
                // Change a byte near the end but never to 0x00: the frame
                // stays one frame and fails its CRC (or COBS) check.
                let i = b.len() - 3;
                b[i] = if b[i] == 0x01 { 0x02 } else { 0x01 };
                b
            }
            (framing, Malformed::Overlong) => {
                let (fill, delim) = match framing {
                    Framing::Jsonl => (b'x', b'\n'),
                    Framing::Cobs => (0x01, 0x00),
                };
                let mut b = vec![fill; wire::MAX_FRAME_LEN + 1000];
                b.push(delim);
                b
            }
            (Framing::Jsonl, Malformed::MissingSensor) => {
                format!("{{\"device\":\"{}\",\"value\":1}}\n", self.cfg.device).into_bytes()
            }
            (Framing::Cobs, Malformed::MissingSensor) => {
                let f = wire::frame::Frame::Reading(wire::frame::WireReading {
                    device: heapless::String::try_from(self.cfg.device.as_str()).ok(),
                    sensor: heapless::String::new(),
                    seq: None,
                    ts: None,
                    value: heapless::Vec::new(),
                });
                let mut out = [0u8; wire::frame::MAX_ENCODED_LEN];
                let n = wire::frame::encode(&f, &mut out).map_err(io::Error::other)?;
                out[..n].to_vec()
            }
        };
        self.emit(&bytes)?;
        self.stats.malformed_sent += 1;
        Ok(())
    }

    fn make_probe(&self) -> Reading {
        Reading {
            device: self.cfg.device.clone(),
            sensor: "probe".into(),
            seq: None,
            ts: 0,
            value: Value::Number(1.0),
            boot: None,
        }
    }

    /// The last time the gateway told this device (unix ms), if any.
    pub fn time_told(&self) -> Option<u64> {
        lock(&self.state).time_ms
    }

    /// Commands received from the gateway and not answered yet.
    pub fn commands(&self) -> Vec<DeviceCommand> {
        lock(&self.state).commands.clone()
    }

    /// Command lines received so far, retries included.
    pub fn commands_received(&self) -> u64 {
        lock(&self.state).commands_received
    }

    /// Answer every command received so far (`ok`, with `{"done": name}`
    /// as the result); returns them.
    pub fn answer_commands(&mut self, ok: bool) -> io::Result<Vec<DeviceCommand>> {
        let cmds = std::mem::take(&mut lock(&self.state).commands);
        for c in &cmds {
            let a = CommandAck {
                device: c.device.clone(),
                id: c.id.clone(),
                ok,
                result: Some(serde_json::json!({ "done": c.name })),
            };
            let b = wire::encode_command_ack(self.cfg.framing, &a).map_err(|e| io::Error::other(e.to_string()))?;
            self.writer.write_all(&b)?;
        }
        self.writer.flush()?;
        Ok(cmds)
    }

    /// Resend every pending reading if acks made no progress for
    /// `resend_after`; returns how many were resent.
    pub fn resend_if_stalled(&mut self) -> io::Result<usize> {
        let now = Instant::now();
        let todo: Vec<Reading> = {
            let st = lock(&self.state);
            let quiet = now.duration_since(st.last_progress.max(self.last_resend));
            if st.pending.is_empty() || quiet < self.cfg.resend_after {
                return Ok(0);
            }
            st.pending.values().cloned().collect()
        };
        self.last_resend = now;
        for r in &todo {
            self.write_reading(r)?;
        }
        self.stats.resent += todo.len() as u64;
        Ok(todo.len())
    }

    /// Keep resending until every reading is acked or `timeout` passes;
    /// returns whether everything got acked.
    pub fn wait_all_acked(&mut self, timeout: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if lock(&self.state).pending.is_empty() {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            self.resend_if_stalled()?;
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn stats(&self) -> SimStats {
        let st = lock(&self.state);
        SimStats {
            acks_received: st.acks_received,
            bad_acks: st.bad_acks,
            acked_through: st.acked_through,
            pending: st.pending.len(),
            ..self.stats.clone()
        }
    }

    /// Every distinct reading created, in order.
    pub fn created(&self) -> &[Reading] {
        &self.created
    }

    /// The `seq` the next reading will get (pass it as `first_seq` to a
    /// replacement device to continue the count after a replug).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Pull the plug: close every handle on the link (the gateway sees EOF
    /// or EIO) and return the final counters.
    pub fn unplug(mut self) -> SimStats {
        self.shut();
        self.stats()
    }

    fn shut(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Close our write side now, so a PTY master is gone once the
        // reader thread (holding the other fd) exits.
        self.writer = Box::new(io::sink());
        // A reader that ignores `stop` is left detached; it ends at EOF.
        if let Some(h) = self.reader.take()
            && self.reader_stoppable
        {
            let _ = h.join();
        }
        self.pty = None;
    }
}

impl Drop for SimDevice {
    fn drop(&mut self) {
        self.shut();
    }
}

fn lock(m: &Mutex<AckState>) -> MutexGuard<'_, AckState> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::Ack;

    #[test]
    fn xorshift_is_deterministic_and_spreads() {
        let a: Vec<u64> = (0..5).scan(XorShift::new(7), |r, _| Some(r.next_u64())).collect();
        let b: Vec<u64> = (0..5).scan(XorShift::new(7), |r, _| Some(r.next_u64())).collect();
        assert_eq!(a, b);
        let mut r = XorShift::new(3);
        let hits = (0..10_000).filter(|_| r.chance(0.25)).count();
        assert!((2000..3000).contains(&hits), "{hits}");
        assert!(!XorShift::new(3).chance(0.0));
    }

    #[test]
    fn acks_over_a_pty_clear_pending_and_resend_works() {
        for framing in [Framing::Jsonl, Framing::Cobs] {
            let pty = open_pty().unwrap();
            let mut gw = std::fs::OpenOptions::new().read(true).write(true).open(&pty.slave_path).unwrap();
            let mut cfg = SimConfig::new("w1", framing);
            cfg.resend_after = Duration::from_millis(50);
            cfg.first_seq = 1;
            let mut dev = SimDevice::on_pty(cfg, pty).unwrap();
            for _ in 0..3 {
                dev.send_next().unwrap();
            }
            // Gateway side: read the three frames back.
            let mut got = Vec::new();
            let mut splitter = FrameSplitter::new(framing);
            let mut buf = [0u8; 512];
            while got.len() < 3 {
                let n = gw.read(&mut buf).unwrap();
                splitter.feed(&buf[..n], |f| got.push(wire::parse_reading(framing, f.unwrap(), None, 0).unwrap().0));
            }
            assert_eq!(got, dev.created());
            gw.write_all(&wire::encode_ack(framing, &Ack { device: "w1".into(), seq: 2, boot: None }).unwrap())
                .unwrap();
            let t = Instant::now();
            while dev.stats().pending != 1 {
                assert!(t.elapsed() < Duration::from_secs(5));
                std::thread::sleep(Duration::from_millis(5));
            }
            // No progress for resend_after: seq 3 goes out again.
            std::thread::sleep(Duration::from_millis(60));
            assert_eq!(dev.resend_if_stalled().unwrap(), 1);
            let stats = dev.unplug();
            assert_eq!((stats.sent_unique, stats.sent_total, stats.acked_through), (3, 4, Some(2)));
        }
    }

    #[test]
    fn symlink_can_be_repointed() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("dock");
        point_symlink(&link, Path::new("/a")).unwrap();
        point_symlink(&link, Path::new("/b")).unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("/b"));
    }
}
