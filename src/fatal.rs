//! Errors after which only a restart is honest.
//!
//! A failed `fsync`/`fdatasync` leaves the kernel free to have dropped the
//! dirty pages, and a retry could "succeed" over lost data: only a fresh
//! read of the disk after a restart knows what is on it. Library code never
//! exits the process: the component that meets such an error stops acking,
//! returns a [`Fatal`] and reports it through its [`FatalTx`]; [`crate::app`]
//! logs it and exits with [`EXIT_FATAL`] in one place, and the service
//! manager restarts the gateway (`Restart=on-failure`). Nothing was acked for
//! what the failed sync should have covered (the queue refuses every write
//! after a failed commit), so the devices resend it.

/// The exit status after a [`Fatal`]: `EX_TEMPFAIL` ("try again later").
pub const EXIT_FATAL: i32 = 75;

/// What failed, for the one log line before the exit.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Fatal(pub String);

/// Where a component running on its own thread reports a [`Fatal`] to the
/// owner of the process.
#[derive(Debug, Clone)]
pub struct FatalTx(tokio::sync::mpsc::UnboundedSender<Fatal>);

/// The owner's end: [`FatalRx::recv`] resolves with the first fatal error.
#[derive(Debug)]
pub struct FatalRx(tokio::sync::mpsc::UnboundedReceiver<Fatal>);

pub fn channel() -> (FatalTx, FatalRx) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    (FatalTx(tx), FatalRx(rx))
}

impl FatalTx {
    /// Report `f` (a closed owner means the process is on its way out anyway).
    pub fn raise(&self, f: Fatal) {
        let _ = self.0.send(f);
    }
}

impl FatalRx {
    /// The first fatal error; pending forever while every sender lives
    /// without raising one, and when all have gone without one.
    pub async fn recv(&mut self) -> Fatal {
        match self.0.recv().await {
            Some(f) => f,
            None => std::future::pending().await,
        }
    }
}
