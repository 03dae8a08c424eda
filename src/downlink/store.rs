//! `data_dir/commands.log`: the commands accepted from the cloud.
//!
//! One record per event, `[len u32 LE][crc32 u32 LE][JSON entry]`:
//!
//! | entry | written | fdatasync |
//! |---|---|---|
//! | `accepted` (the whole command) | before the broker's PUBLISH is acked (PUBREC / PUBACK) | yes |
//! | `attempt` (sent to its device) | after each send | no: only a count |
//! | `replying` (the reply, and the queue id it is appended at) | before the reply is appended to the queue, under the queue's lock | yes |
//! | `finished` | compaction only (ids kept to refuse a repeat) | with the file |
//!
//! A command is finished once its reply is in the queue. After a crash a
//! `replying` entry whose queue id the queue has not reached (the append
//! was lost with the power) is queued again, so a reply is neither lost nor
//! sent twice. A torn or corrupt tail is cut off at open. The file is
//! rewritten (temp + rename) when it passes `COMPACT_AT` bytes.

use crate::queue::{CRC, rewrite_durably};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

pub const FILE_NAME: &str = "commands.log";
const COMPACT_AT: u64 = 256 * 1024;
/// Finished command ids remembered, so a command the cloud sends again
/// (a new message with the same id) is not carried out twice.
const FINISHED_KEPT: usize = 4096;

/// A command as accepted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub id: String,
    pub device: String,
    pub name: String,
    /// JSON text of `args` (`{}` when absent).
    pub args: String,
    pub received_ms: u64,
    pub expires_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "e", rename_all = "snake_case")]
enum Entry {
    Accepted { cmd: Command },
    Attempt { id: String, at_ms: u64 },
    Replying { id: String, reply: String, queue_id: u64 },
    Finished { id: String },
}

/// A command waiting for its device.
#[derive(Clone, Debug, PartialEq)]
pub struct Pending {
    pub cmd: Command,
    pub attempts: u32,
    pub last_attempt_ms: Option<u64>,
}

/// A reply noted before the crash: `(command id, reply JSON, queue id)`.
pub type Replying = (String, String, u64);

pub struct CommandStore {
    path: PathBuf,
    file: File,
    bytes: u64,
    pending: BTreeMap<String, Pending>,
    finished: VecDeque<String>,
    finished_set: HashSet<String>,
    replying: Vec<Replying>,
    pub fsyncs: u64,
}

fn encode(e: &Entry) -> Vec<u8> {
    let body = serde_json::to_vec(e).expect("entries serialize");
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&CRC.checksum(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// The whole entries at the front of `buf`, and the length they take.
fn decode_all(buf: &[u8]) -> (Vec<Entry>, usize) {
    let (mut at, mut out) = (0, Vec::new());
    while let Some(head) = buf.get(at..at + 8) {
        let len = u32::from_le_bytes(head[..4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(head[4..].try_into().unwrap());
        let Some(body) = buf.get(at + 8..at + 8 + len) else { break };
        if CRC.checksum(body) != crc {
            break;
        }
        let Ok(e) = serde_json::from_slice::<Entry>(body) else { break };
        out.push(e);
        at += 8 + len;
    }
    (out, at)
}

impl CommandStore {
    /// The pending commands in `dir`, read only (for `commands list`).
    pub fn read_pending(dir: &Path) -> io::Result<Vec<Pending>> {
        let path = dir.join(FILE_NAME);
        let mut buf = Vec::new();
        let mut file = File::open(&path)?;
        file.read_to_end(&mut buf)?;
        let (entries, valid) = decode_all(&buf);
        Ok(CommandStore::from_entries(path, file, valid, entries).pending.into_values().collect())
    }

    /// Load `dir/commands.log` (created when missing); a torn tail is cut off.
    pub fn open(dir: &Path) -> io::Result<CommandStore> {
        let path = dir.join(FILE_NAME);
        let mut buf = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut buf)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let (entries, valid) = decode_all(&buf);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        if valid < buf.len() {
            tracing::warn!("{}: {} byte(s) of a torn or corrupt tail cut off", path.display(), buf.len() - valid);
            file.set_len(valid as u64)?;
            file.sync_data()?;
        }
        Ok(CommandStore::from_entries(path, file, valid, entries))
    }

    fn from_entries(path: PathBuf, file: File, valid: usize, entries: Vec<Entry>) -> CommandStore {
        let mut s = CommandStore {
            path,
            file,
            bytes: valid as u64,
            pending: BTreeMap::new(),
            finished: VecDeque::new(),
            finished_set: HashSet::new(),
            replying: Vec::new(),
            fsyncs: 0,
        };
        for e in entries {
            s.apply(e);
        }
        s
    }

    fn apply(&mut self, e: Entry) {
        match e {
            Entry::Accepted { cmd } => {
                if !self.knows(&cmd.id) {
                    self.pending.insert(cmd.id.clone(), Pending { cmd, attempts: 0, last_attempt_ms: None });
                }
            }
            Entry::Attempt { id, at_ms } => {
                if let Some(p) = self.pending.get_mut(&id) {
                    p.attempts += 1;
                    p.last_attempt_ms = Some(at_ms);
                }
            }
            Entry::Replying { id, reply, queue_id } => {
                self.pending.remove(&id);
                self.replying.retain(|r| r.0 != id);
                self.replying.push((id.clone(), reply, queue_id));
                self.finish(id);
            }
            Entry::Finished { id } => {
                self.pending.remove(&id);
                self.finish(id);
            }
        }
    }

    fn finish(&mut self, id: String) {
        if self.finished_set.insert(id.clone()) {
            self.finished.push_back(id);
        }
        while self.finished.len() > FINISHED_KEPT {
            if let Some(old) = self.finished.pop_front() {
                self.finished_set.remove(&old);
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Pending, or finished not long ago.
    pub fn knows(&self, id: &str) -> bool {
        self.pending.contains_key(id) || self.finished_set.contains(id)
    }

    pub fn pending(&self) -> impl Iterator<Item = &Pending> {
        self.pending.values()
    }

    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    pub fn get(&self, id: &str) -> Option<&Pending> {
        self.pending.get(id)
    }

    /// Replies noted by an earlier run, to check against the queue once.
    pub fn take_replying(&mut self) -> Vec<Replying> {
        std::mem::take(&mut self.replying)
    }

    /// Keep `cmd`, durably. False (nothing written) when its id is known.
    pub fn accept(&mut self, cmd: Command) -> io::Result<bool> {
        if self.knows(&cmd.id) {
            return Ok(false);
        }
        self.append(&Entry::Accepted { cmd: cmd.clone() }, true)?;
        self.apply(Entry::Accepted { cmd });
        Ok(true)
    }

    /// `id` was sent to its device (not synced: only a count).
    pub fn attempt(&mut self, id: &str, at_ms: u64) {
        let e = Entry::Attempt { id: id.into(), at_ms };
        if let Err(err) = self.append(&e, false) {
            tracing::debug!("{}: cannot note an attempt: {err}", self.path.display());
        }
        self.apply(e);
    }

    /// The reply to `id` is about to be appended to the queue as record
    /// `queue_id`: durable before the append.
    pub fn replying(&mut self, id: &str, reply: &str, queue_id: u64) -> io::Result<()> {
        let e = Entry::Replying { id: id.into(), reply: reply.into(), queue_id };
        self.append(&e, true)?;
        self.apply(e);
        self.replying.clear();
        self.maybe_compact()
    }

    /// From now on every write fails (the file is swapped for a read-only
    /// handle on it), as a disk that went away.
    #[cfg(test)]
    pub(crate) fn fail_writes_for_test(&mut self) {
        self.file = File::open(&self.path).expect("the store's file");
    }

    fn append(&mut self, e: &Entry, sync: bool) -> io::Result<()> {
        let buf = encode(e);
        if let Err(err) = self.file.write_all(&buf) {
            // Cut a partial record off, so later ones stay readable.
            let _ = self.file.set_len(self.bytes);
            return Err(err);
        }
        self.bytes += buf.len() as u64;
        if sync {
            self.file.sync_data()?;
            self.fsyncs += 1;
        }
        Ok(())
    }

    fn maybe_compact(&mut self) -> io::Result<()> {
        if self.bytes < COMPACT_AT {
            return Ok(());
        }
        let mut buf = Vec::new();
        for id in &self.finished {
            buf.extend(encode(&Entry::Finished { id: id.clone() }));
        }
        for p in self.pending.values() {
            buf.extend(encode(&Entry::Accepted { cmd: p.cmd.clone() }));
            if let Some(at_ms) = p.last_attempt_ms {
                for _ in 0..p.attempts {
                    buf.extend(encode(&Entry::Attempt { id: p.cmd.id.clone(), at_ms }));
                }
            }
        }
        self.file = rewrite_durably(&self.path, "log.tmp", &buf, &mut self.fsyncs)?;
        self.bytes = buf.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(id: &str) -> Command {
        Command {
            id: id.into(),
            device: "wrist-07".into(),
            name: "alert".into(),
            args: "{}".into(),
            received_ms: 1,
            expires_ms: 100,
        }
    }

    #[test]
    fn commands_survive_reopen_and_a_repeat_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = CommandStore::open(dir.path()).unwrap();
        assert!(s.accept(cmd("a")).unwrap());
        assert!(s.accept(cmd("b")).unwrap());
        assert!(!s.accept(cmd("a")).unwrap(), "the same id again");
        s.attempt("a", 5);
        s.replying("b", "{\"id\":\"b\"}", 42).unwrap();
        drop(s);
        let mut s = CommandStore::open(dir.path()).unwrap();
        assert_eq!(s.pending().map(|p| (p.cmd.id.as_str(), p.attempts)).collect::<Vec<_>>(), [("a", 1)]);
        assert!(s.knows("b") && !s.accept(cmd("b")).unwrap(), "finished ones stay known");
        assert_eq!(s.take_replying(), [("b".to_string(), "{\"id\":\"b\"}".to_string(), 42)]);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_later_entries_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = CommandStore::open(dir.path()).unwrap();
        s.accept(cmd("a")).unwrap();
        drop(s);
        let p = dir.path().join(FILE_NAME);
        let len = std::fs::metadata(&p).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(&encode(&Entry::Accepted { cmd: cmd("b") })[..20]).unwrap();
        drop(f);
        let mut s = CommandStore::open(dir.path()).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), len);
        s.accept(cmd("c")).unwrap();
        drop(s);
        let s = CommandStore::open(dir.path()).unwrap();
        assert_eq!(s.pending().map(|p| p.cmd.id.as_str()).collect::<Vec<_>>(), ["a", "c"]);
    }

    #[test]
    fn compaction_keeps_pending_and_finished_ids() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = CommandStore::open(dir.path()).unwrap();
        let reply = "x".repeat(1000);
        for i in 0..400 {
            s.accept(cmd(&format!("c{i}"))).unwrap();
            if i % 2 == 0 {
                s.replying(&format!("c{i}"), &reply, i).unwrap();
            }
        }
        assert!(s.bytes < COMPACT_AT, "compacted: {} bytes", s.bytes);
        drop(s);
        let s = CommandStore::open(dir.path()).unwrap();
        assert_eq!(s.pending_count(), 200);
        assert!(s.knows("c0") && s.knows("c399"));
    }
}
