//! TEMPORARY signature stub; replaced by the real queue (branch `queue`).
#![allow(unused)]
use crate::config::WhenFull;
use std::path::Path;
pub struct QueueOptions { pub max_bytes: u64, pub when_full: WhenFull, pub segment_bytes: u64 }
#[derive(Debug, Clone, Copy)]
pub struct RecordMeta { pub id: u64, pub readings: u32, pub created_ms: u64 }
#[derive(Debug, Default, Clone)]
pub struct OpenReport { pub records: u64, pub truncated_bytes: u64, pub corrupt_records: u64, pub repaired_segments: u64 }
#[derive(Debug, Default, Clone)]
pub struct QueueStatus { pub batches: u64, pub readings: u64, pub bytes: u64, pub oldest_created_ms: Option<u64> }
pub enum AppendOutcome { Appended { dropped_records: u64, dropped_readings: u64 } }
#[derive(Debug, thiserror::Error)]
pub enum QueueError { #[error("io")] Io(std::io::Error), #[error("full")] Full { needed: u64, max: u64 }, #[error("locked")] Locked }
pub struct Queue;
impl Queue {
    pub fn open(dir: &Path, opts: QueueOptions) -> Result<(Queue, OpenReport), QueueError> { todo!() }
    pub fn open_readonly(dir: &Path) -> Result<(Queue, OpenReport), QueueError> { todo!() }
    pub fn next_id(&self) -> u64 { todo!() }
    pub fn append(&mut self, readings: u32, created_ms: u64, payload: &[u8]) -> Result<AppendOutcome, QueueError> { todo!() }
    pub fn commit(&mut self) -> Result<(), QueueError> { todo!() }
    pub fn committed_id(&self) -> u64 { todo!() }
    pub fn read_from(&self, after_id: u64, max: usize) -> Result<Vec<(RecordMeta, Vec<u8>)>, QueueError> { todo!() }
    pub fn ack_through(&mut self, id: u64) -> Result<(), QueueError> { todo!() }
    pub fn reclaimable(&self) -> bool { todo!() }
    pub fn reclaim(&mut self) -> Result<u64, QueueError> { todo!() }
    pub fn status(&self) -> QueueStatus { todo!() }
    pub fn read_all_on_disk_after(&self, after_id: u64) -> Result<Vec<(RecordMeta, Vec<u8>)>, QueueError> { todo!() }
    pub fn disk_bytes(&self) -> u64 { todo!() }
    pub fn fsyncs(&self) -> u64 { todo!() }
}
