//! Encrypted BTHome adverts carry a 32-bit counter that the device raises
//! with every advert, and the MIC covers it: a frame recorded off the air
//! and sent again carries its old counter (issue 19, M5). So the last
//! counter accepted per device is kept, and a frame whose counter is not
//! newer is refused: equal is the device repeating its advert (BLE sends
//! each several times) and is dropped quietly; older is a replay, counted.
//!
//! The counters survive restarts in `data_dir/ble-counters.json`, saved at
//! most every `ble_scan.counter_save_interval` (60 s) when one moved, and
//! at shutdown: writing on every advert would wear the SD card. After a
//! power cut the counters may be up to that interval old, so frames from the
//! last interval before the cut could be replayed once; their measurements
//! were real, only their time would be wrong.
//!
//! A device whose counter goes *backwards* for good (a firmware that resets
//! it with the battery) is refused until its counter passes the old one:
//! the log says so, and removing its line from the file (gateway stopped)
//! lets it in again.

use crate::queue::{replace_file, sync_dir};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub const FILE_NAME: &str = "ble-counters.json";

/// What to do with an encrypted advert, by its counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Newer than any accepted: take it.
    Fresh,
    /// The same counter as the last accepted: the device repeating itself.
    Repeat,
    /// Older than the last accepted: a replay (or a counter reset).
    Replay { last: u32 },
}

#[derive(Debug)]
pub struct Counters {
    path: PathBuf,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// BLE address (`AA:BB:..`) → last accepted counter.
    last: BTreeMap<String, u32>,
    dirty: bool,
}

/// Serial-number arithmetic (RFC 1982): `a` is newer than `b` if it is
/// ahead by less than half the space, so the counter may wrap.
fn newer(a: u32, b: u32) -> bool {
    a != b && a.wrapping_sub(b) < 1 << 31
}

impl Counters {
    /// Read the saved counters; a missing file is an empty one. A file that
    /// does not parse is an error: starting empty would accept every replay.
    pub fn open(data_dir: &Path) -> io::Result<Counters> {
        let path = data_dir.join(FILE_NAME);
        let last = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        };
        Ok(Counters { path, state: Mutex::new(State { last, dirty: false }) })
    }

    /// Judge `counter` from `address`, and remember it when fresh.
    pub fn admit(&self, address: &str, counter: u32) -> Verdict {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match st.last.get(address).copied() {
            Some(last) if last == counter => Verdict::Repeat,
            Some(last) if !newer(counter, last) => Verdict::Replay { last },
            _ => {
                st.last.insert(address.to_string(), counter);
                st.dirty = true;
                Verdict::Fresh
            }
        }
    }

    /// Write the counters if any moved since the last save: temp file,
    /// fdatasync, rename, fsync of the directory. Blocking: call it off the
    /// async runtime.
    pub fn save(&self) -> io::Result<bool> {
        let bytes = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if !st.dirty {
                return Ok(false);
            }
            st.dirty = false;
            serde_json::to_vec_pretty(&st.last).map_err(io::Error::other)?
        };
        let res = (|| {
            let mut fsyncs = 0;
            drop(replace_file(&self.path.with_extension("json.tmp"), &self.path, &bytes, &mut fsyncs)?);
            sync_dir(self.path.parent().unwrap_or(Path::new(".")), &mut fsyncs)
        })();
        if res.is_err() {
            // Try again next time.
            self.state.lock().unwrap_or_else(|e| e.into_inner()).dirty = true;
        }
        res.map(|()| true)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_repeat_replay_wrap_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let c = Counters::open(dir.path()).unwrap();
        let a = "A4:C1:38:00:00:03";
        assert_eq!(c.admit(a, 10), Verdict::Fresh);
        assert_eq!(c.admit(a, 10), Verdict::Repeat);
        assert_eq!(c.admit(a, 11), Verdict::Fresh);
        assert_eq!(c.admit(a, 9), Verdict::Replay { last: 11 });
        assert_eq!(c.admit("other", 1), Verdict::Fresh, "per device");
        assert_eq!(c.admit(a, u32::MAX), Verdict::Replay { last: 11 }, "half the space behind is the past");
        assert!(c.save().unwrap());
        assert!(!c.save().unwrap(), "nothing moved: no write");
        let again = Counters::open(dir.path()).unwrap();
        assert_eq!(again.admit(a, 11), Verdict::Repeat, "across a restart");
        assert_eq!(again.admit(a, 5), Verdict::Replay { last: 11 });
        assert_eq!(again.admit(a, 12), Verdict::Fresh);
        // The counter wraps.
        let w = Counters::open(tempfile::tempdir().unwrap().path()).unwrap();
        assert_eq!(w.admit(a, u32::MAX - 1), Verdict::Fresh);
        assert_eq!(w.admit(a, 2), Verdict::Fresh);
        assert_eq!(w.admit(a, u32::MAX), Verdict::Replay { last: 2 });
        // A file that does not parse is an error, not an empty list.
        std::fs::write(dir.path().join(FILE_NAME), b"{garbage").unwrap();
        assert!(Counters::open(dir.path()).is_err());
    }
}
