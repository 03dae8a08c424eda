//! The pipeline thread: its loop and where the acks it produces go.
//!
//! One OS thread with a single-threaded runtime of its own, because the
//! pipeline fsyncs and an fsync must not stall the sources' runtime. It also
//! sends systemd's `WATCHDOG=1` (see [`crate::service::Watchdog`]).

use super::Pipeline;
use crate::fatal::{Fatal, FatalTx};
use crate::reading::{Ack, Incoming, Origin, now_ms};
use crate::route::{RouteTable, ToDevice};
use crate::service::Watchdog;
use crate::shutdown;
use std::time::Instant;
use tokio::sync::watch;

/// After a burst of fewer readings than this, the loop lingers [`LINGER`].
const LINGER_BELOW: usize = 64;
const LINGER: std::time::Duration = std::time::Duration::from_micros(500);
/// Readings taken off the channel per wake-up, at most.
const TAKE_MAX: usize = 1024;
/// Readings per second from which the loop lingers (see [`crate::busy`]).
const BUSY_RATE: u64 = 2_000;

/// The pipeline thread's loop: take readings as they come, wake for batch
/// ages, group commits and watchdog pings, and route acks back to their ports.
pub fn run(
    mut p: Pipeline,
    mut rx: crate::channel::Receiver<Incoming>,
    routes: RouteTable,
    mut stop: watch::Receiver<bool>,
    mut watchdog: Watchdog,
    fatal: FatalTx,
) -> anyhow::Result<crate::channel::Receiver<Incoming>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
    let r = rt.block_on(async move {
        let mut load = crate::busy::Busy::new(BUSY_RATE, Instant::now());
        let mut taken = Vec::new();
        loop {
            let deadline = tokio::time::Instant::from_std(p.next_deadline().min(watchdog.next_due()));
            tokio::select! {
                biased;
                _ = shutdown::wait(&mut stop) => break,
                // What is already queued comes along without waking again.
                n = rx.recv_many(&mut taken, TAKE_MAX) => match n {
                    0 => break,
                    n => {
                        let (now, ms) = (Instant::now(), now_ms());
                        for inc in taken.drain(..) {
                            p.ingest(inc, now, ms)?;
                        }
                        // A short burst under load (more than BUSY_RATE
                        // readings/s so far in this tenth of a second): let
                        // more gather before the next wake-up (one per
                        // reading cost the CPU most of its time in context
                        // switches, issue 18). At a site's pace (a few
                        // hundred readings/s) it would only shift commits
                        // (+7 % bytes written in the sdwear bench).
                        if load.add(now, n) && n < LINGER_BELOW {
                            let until = (now + LINGER).min(p.next_deadline()).min(watchdog.next_due());
                            tokio::time::sleep_until(tokio::time::Instant::from_std(until)).await;
                        }
                    }
                },
                _ = tokio::time::sleep_until(deadline) => {}
            }
            send_acks(&routes, p.tick(Instant::now())?);
            crate::crashpoint::stall("pipeline-loop");
            watchdog.alive(Instant::now());
        }
        // Whatever the sources handed over is the pipeline's to keep.
        let (now, ms) = (Instant::now(), now_ms());
        while let Ok(inc) = rx.try_recv() {
            p.ingest(inc, now, ms)?;
        }
        send_acks(&routes, p.close()?);
        // The channel goes back to `run`, alive: a port whose channel closed
        // would stop at once, before writing the final acks.
        Ok::<_, Fatal>(rx)
    });
    // A fatal error stops the loop before anything more is acked; `run`
    // exits on it.
    r.map_err(|f| {
        fatal.raise(f.clone());
        f.into()
    })
}

fn send_acks(routes: &RouteTable, acks: Vec<(Origin, Ack)>) {
    // A link that is busy, or gone, drops its ack: the device resends, and
    // its duplicate triggers a fresh cumulative ack.
    for (origin, ack) in acks {
        routes.try_send(origin, ToDevice::Ack(ack));
    }
}
