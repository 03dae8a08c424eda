//! The one signal every task listens to.
//!
//! A `watch` channel rather than a broadcast: a task that subscribes late
//! (a serial port reconnecting) still sees that shutdown already began.

use tokio::sync::watch;

#[derive(Clone)]
pub struct Shutdown {
    tx: watch::Sender<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown { tx: watch::channel(false).0 }
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }
    /// A receiver that becomes `true` once shutdown starts.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }
    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }
}

/// Wait until `rx` says shutdown (or its sender is gone, which means the same).
pub async fn wait(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}
