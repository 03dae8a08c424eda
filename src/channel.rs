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
    (Sender { tx, free: free.clone(), budget }, Receiver { rx, free })
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
}

impl<T> Receiver<T> {
    pub async fn recv(&mut self) -> Option<T> {
        let held = self.rx.recv().await?;
        Some(self.release(held))
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
