//! Channels between tasks that carry readings, bounded twice: in items, like
//! any tokio channel, and in bytes, by what each item holds ([`Weigh`]).
//!
//! A count alone does not bound memory: a jsonl line of 4 KiB carries ~2,000
//! numbers (16 KiB as `f64`), a LAN payload of 256 KiB ~128,000 (1 MiB), so
//! 8,192 readings could hold from ~1 MiB to gigabytes. Here a sender waits
//! (or `try_send` says `Full`) until both an item's place and its bytes are
//! free; the receiver gives the bytes back as it takes the item. An item
//! heavier than the whole budget waits for all of it, so it travels alone.
//! Waiting is first come, first served: readings sent behind a heavy one
//! that waits for bytes wait too (they are delayed, never lost).
//!
//! A sender that waits is the back-pressure the sources want: a serial
//! device waits for its ack, a LAN publisher is held back over TCP, a BLE
//! device's notifications wait in BlueZ.

use std::fmt;
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc};

pub use tokio::sync::mpsc::error::{SendError, TryRecvError, TrySendError};

/// What an item holds in memory, its own size included, in bytes.
pub trait Weigh {
    fn weight(&self) -> usize;
}

/// A channel of at most `items` items holding at most `bytes` bytes.
pub fn channel<T: Weigh>(items: usize, bytes: usize) -> (Sender<T>, Receiver<T>) {
    let budget = bytes.clamp(1, u32::MAX as usize) as u32;
    let free = Arc::new(Semaphore::new(budget as usize));
    let (tx, rx) = mpsc::channel(items);
    (Sender { tx, free: free.clone(), budget }, Receiver { rx, free, taken: Vec::new() })
}

struct Held<T> {
    item: T,
    weight: u32,
}

pub struct Sender<T> {
    tx: mpsc::Sender<Held<T>>,
    /// Bytes not taken by items in the channel.
    free: Arc<Semaphore>,
    budget: u32,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender { tx: self.tx.clone(), free: self.free.clone(), budget: self.budget }
    }
}

impl<T> fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender").field("budget", &self.budget).field("free", &self.free.available_permits()).finish()
    }
}

impl<T: Weigh> Sender<T> {
    fn cost(&self, item: &T) -> u32 {
        item.weight().min(self.budget as usize) as u32
    }

    /// Send now if there is room for the item and its bytes.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        let slot = match self.tx.try_reserve() {
            Ok(slot) => slot,
            Err(TrySendError::Full(())) => return Err(TrySendError::Full(item)),
            Err(TrySendError::Closed(())) => return Err(TrySendError::Closed(item)),
        };
        let weight = self.cost(&item);
        match self.free.try_acquire_many(weight) {
            Ok(bytes) => bytes.forget(),
            Err(tokio::sync::TryAcquireError::NoPermits) => return Err(TrySendError::Full(item)),
            Err(tokio::sync::TryAcquireError::Closed) => return Err(TrySendError::Closed(item)),
        }
        slot.send(Held { item, weight });
        Ok(())
    }

    /// Send all of `items` now if there is room for every one and their
    /// bytes (`items` is left empty, `Ok(true)`); otherwise send none
    /// (`Ok(false)`: the caller sends them one by one, waiting). One
    /// reservation for a serial read's readings instead of one each (issue
    /// 18's CPU per reading).
    pub fn try_send_all(&self, items: &mut Vec<T>) -> Result<bool, Closed> {
        let total: u64 = items.iter().map(|i| u64::from(self.cost(i))).sum();
        let Ok(total) = u32::try_from(total) else { return Ok(false) };
        if total > self.budget {
            return Ok(false);
        }
        let slots = match self.tx.try_reserve_many(items.len()) {
            Ok(slots) => slots,
            Err(TrySendError::Full(())) => return Ok(false),
            Err(TrySendError::Closed(())) => return Err(Closed),
        };
        match self.free.try_acquire_many(total) {
            Ok(bytes) => bytes.forget(),
            // The places reserved go back as `slots` drops.
            Err(tokio::sync::TryAcquireError::NoPermits) => return Ok(false),
            Err(tokio::sync::TryAcquireError::Closed) => return Err(Closed),
        }
        for (slot, item) in slots.zip(items.drain(..)) {
            let weight = self.cost(&item);
            slot.send(Held { item, weight });
        }
        Ok(true)
    }

    /// Wait for room, then send. Dropped while waiting, it takes nothing
    /// (the item is dropped, as with tokio's `send`).
    pub async fn send(&self, item: T) -> Result<(), SendError<T>> {
        match self.reserve(&item).await {
            Ok(permit) => {
                permit.send(item);
                Ok(())
            }
            Err(Closed) => Err(SendError(item)),
        }
    }

    /// Wait for room for `item` (its place and its bytes). Dropped while
    /// waiting, it holds nothing; the permit, dropped unused, gives both back.
    pub async fn reserve(&self, item: &T) -> Result<Permit<'_, T>, Closed> {
        let weight = self.cost(item);
        // Bytes first: a heavy item waiting for bytes does not sit on a
        // place that lighter items behind it would use no better.
        let bytes = self.free.acquire_many(weight).await.map_err(|_| Closed)?;
        let slot = self.tx.reserve().await.map_err(|_| Closed)?;
        Ok(Permit { slot, bytes, weight })
    }

    /// Bytes taken by the items in the channel and by reservations (a
    /// waiting sender gathers bytes as they come back).
    pub fn held_bytes(&self) -> usize {
        self.budget as usize - self.free.available_permits()
    }
}

/// The receiver is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

/// Room for one item, reserved by [`Sender::reserve`].
pub struct Permit<'a, T> {
    slot: mpsc::Permit<'a, Held<T>>,
    bytes: tokio::sync::SemaphorePermit<'a>,
    weight: u32,
}

impl<T: Weigh> Permit<'_, T> {
    /// Send the item the room was reserved for (its weight is the one
    /// reserved, so the receiver gives back what was taken).
    pub fn send(self, item: T) {
        self.bytes.forget();
        self.slot.send(Held { item, weight: self.weight });
    }
}

pub struct Receiver<T> {
    rx: mpsc::Receiver<Held<T>>,
    free: Arc<Semaphore>,
    /// [`Self::recv_many`]'s hand-over, kept between calls.
    taken: Vec<Held<T>>,
}

impl<T> Receiver<T> {
    pub async fn recv(&mut self) -> Option<T> {
        let held = self.rx.recv().await?;
        Some(self.release(held))
    }

    /// Wait for an item, then move it and up to `limit - 1` more that are
    /// already there into `buf`; 0 once every sender is gone. Their places
    /// and bytes are given back at once, not one by one (the channel's
    /// places, like its bytes, are a semaphore taken under a lock). Cancel
    /// safe: dropped while waiting, it took nothing.
    pub async fn recv_many(&mut self, buf: &mut Vec<T>, limit: usize) -> usize {
        let n = self.rx.recv_many(&mut self.taken, limit).await;
        let mut bytes = 0;
        buf.extend(self.taken.drain(..).map(|h| {
            bytes += h.weight as usize;
            h.item
        }));
        if bytes > 0 {
            self.free.add_permits(bytes);
        }
        n
    }

    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        self.rx.try_recv().map(|held| self.release(held))
    }

    fn release(&self, held: Held<T>) -> T {
        self.free.add_permits(held.weight as usize);
        held.item
    }
}

impl<T> Drop for Receiver<T> {
    /// Senders waiting for bytes learn that nobody will give them back.
    fn drop(&mut self) {
        self.free.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    struct Blob(usize);
    impl Weigh for Blob {
        fn weight(&self) -> usize {
            self.0
        }
    }

    /// Planted: try_send not taking the bytes → the third blob goes in;
    /// recv not giving them back → the blob after it stays Full.
    #[test]
    fn try_send_is_full_when_the_bytes_are_taken_and_free_again_once_received() {
        let (tx, mut rx) = channel::<Blob>(100, 1000);
        tx.try_send(Blob(400)).unwrap();
        tx.try_send(Blob(400)).unwrap();
        assert_eq!(tx.held_bytes(), 800);
        assert!(
            matches!(tx.try_send(Blob(400)), Err(TrySendError::Full(Blob(400)))),
            "1,200 bytes in a 1,000-byte channel"
        );
        tx.try_send(Blob(200)).unwrap();
        assert_eq!(rx.try_recv().unwrap().0, 400);
        assert_eq!(tx.held_bytes(), 600);
        tx.try_send(Blob(400)).unwrap();
        assert!(matches!(tx.try_send(Blob(1)), Err(TrySendError::Full(_))));
        // The item bound still holds on its own.
        let (tx, _rx) = channel::<Blob>(2, 1000);
        tx.try_send(Blob(1)).unwrap();
        tx.try_send(Blob(1)).unwrap();
        assert!(matches!(tx.try_send(Blob(1)), Err(TrySendError::Full(_))));
        assert_eq!(tx.held_bytes(), 2, "a refused item takes no bytes");
    }

    /// Planted: try_send_all sending the prefix that fits → the refused
    /// batch's first blobs arrive; recv_many not giving bytes or places back
    /// → the last batch stays refused.
    #[test]
    fn all_or_nothing_batches_and_recv_many_gives_everything_back_at_once() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let (tx, mut rx) = channel::<Blob>(4, 1000);
            let mut batch = vec![Blob(100), Blob(200), Blob(300)];
            assert_eq!(tx.try_send_all(&mut batch), Ok(true));
            assert!(batch.is_empty());
            assert_eq!(tx.held_bytes(), 600);
            // Two places left, but three blobs: none goes.
            let mut batch = vec![Blob(1), Blob(2), Blob(3)];
            assert_eq!(tx.try_send_all(&mut batch), Ok(false));
            assert_eq!(batch.len(), 3, "a refused batch is left as it was");
            // Places enough, bytes not: none goes either.
            let mut batch = vec![Blob(300), Blob(300)];
            assert_eq!(tx.try_send_all(&mut batch), Ok(false));
            assert_eq!(batch.len(), 2);
            assert_eq!(tx.held_bytes(), 600, "a refused batch takes no bytes");
            let mut got = Vec::new();
            assert_eq!(rx.recv_many(&mut got, 2).await, 2);
            assert_eq!(got.iter().map(|b| b.0).collect::<Vec<_>>(), [100, 200]);
            assert_eq!(tx.held_bytes(), 300);
            assert_eq!(rx.recv_many(&mut got, 10).await, 1);
            assert_eq!(got.len(), 3, "appended");
            assert_eq!(tx.held_bytes(), 0);
            // All four places and the whole budget are back.
            let mut batch = vec![Blob(250), Blob(250), Blob(250), Blob(250)];
            assert_eq!(tx.try_send_all(&mut batch), Ok(true));
            drop(rx);
            assert_eq!(tx.try_send_all(&mut vec![Blob(1)]), Err(Closed));
        });
    }

    /// A blob heavier than the budget travels alone, and a sender waits
    /// (back-pressure) until the receiver has taken enough.
    #[test]
    fn a_sender_waits_for_bytes_and_a_giant_travels_alone() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            let (tx, mut rx) = channel::<Blob>(100, 1000);
            tx.send(Blob(10)).await.unwrap();
            let tx2 = tx.clone();
            let giant = tokio::spawn(async move { tx2.send(Blob(5_000)).await.is_ok() });
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(!giant.is_finished(), "the giant waits for the whole budget");
            assert!(matches!(tx.try_send(Blob(1)), Err(TrySendError::Full(_))), "first come, first served");
            assert_eq!(rx.recv().await.unwrap().0, 10);
            let sent = tokio::time::timeout(Duration::from_secs(10), giant).await;
            assert!(sent.expect("the giant is sent once the bytes are back").unwrap());
            assert_eq!(tx.held_bytes(), 1000, "the giant holds the whole budget");
            assert!(matches!(tx.try_send(Blob(1)), Err(TrySendError::Full(_))));
            assert_eq!(rx.recv().await.unwrap().0, 5_000);
            assert_eq!(tx.held_bytes(), 0);
        });
    }

    /// A reservation dropped while it waits, or unused, gives everything
    /// back; a closed receiver wakes a sender waiting for bytes.
    #[test]
    fn dropped_reservations_give_back_and_a_gone_receiver_ends_waiting() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            let (tx, rx) = channel::<Blob>(100, 1000);
            tx.try_send(Blob(900)).unwrap();
            let waiting = tokio::time::timeout(Duration::from_millis(20), tx.reserve(&Blob(500))).await;
            assert!(waiting.is_err(), "no room for 500");
            let permit = tx.reserve(&Blob(100)).await.unwrap();
            assert_eq!(tx.held_bytes(), 1000);
            drop(permit);
            assert_eq!(tx.held_bytes(), 900, "an unused permit gives its bytes back");
            let tx2 = tx.clone();
            let blocked = tokio::spawn(async move { tx2.send(Blob(500)).await.is_err() });
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(rx);
            let ended = tokio::time::timeout(Duration::from_secs(10), blocked).await;
            assert!(ended.expect("the sender learns the receiver is gone").unwrap());
        });
    }
}
