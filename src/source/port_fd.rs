//! A serial port's nonblocking fd that can step out of the runtime's epoll
//! while its port waits between reads (issue 18).
//!
//! tokio registers an fd edge-triggered, and every write the device makes
//! then wakes the runtime's thread, whether or not a task waits to read: a
//! busy port that reads a millisecond apart (`READ_LINGER` in
//! [`super::serial`]) still cost one wake-up per frame or so, ~14,000 a
//! second across 20 flooded ports in the uplink bench. [`PortFd::pause`]
//! takes the fd out of epoll; the next read or write tries the fd directly
//! and goes back into epoll only when it would block, so a paused port
//! never misses data (registering an fd that is already readable reports it
//! at once) and a quiet port waits on epoll as before.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct PortFd<D: AsRawFd> {
    /// Exactly one of the two is set, except after a failed re-registration
    /// (the port is then broken and its session ends on that error).
    registered: Option<AsyncFd<D>>,
    paused: Option<D>,
}

impl<D: AsRawFd> PortFd<D>
where
    for<'a> &'a D: Read + Write,
{
    /// Register `dev` (a nonblocking fd) with the current runtime.
    pub fn new(dev: D) -> io::Result<PortFd<D>> {
        Ok(PortFd { registered: Some(register(dev)?), paused: None })
    }

    pub fn get_ref(&self) -> Option<&D> {
        self.registered.as_ref().map(AsyncFd::get_ref).or(self.paused.as_ref())
    }

    pub fn get_mut(&mut self) -> Option<&mut D> {
        match (&mut self.registered, &mut self.paused) {
            (Some(a), _) => Some(a.get_mut()),
            (None, p) => p.as_mut(),
        }
    }

    /// Out of epoll until the next read or write would block.
    pub fn pause(&mut self) {
        if let Some(a) = self.registered.take() {
            self.paused = Some(a.into_inner());
        }
    }

    #[cfg(test)]
    pub fn is_paused(&self) -> bool {
        self.paused.is_some()
    }

    fn registered(&mut self) -> io::Result<&AsyncFd<D>> {
        if let Some(d) = self.paused.take() {
            self.registered = Some(register(d)?);
        }
        self.registered.as_ref().ok_or_else(|| io::Error::other("serial port lost its registration"))
    }
}

fn register<D: AsRawFd>(dev: D) -> io::Result<AsyncFd<D>> {
    // SAFETY: `dev` owns its fd for as long as the AsyncFd holds it, and
    // `into_inner` deregisters it before handing it back.
    unsafe { AsyncFd::register(dev) }.map_err(|e| e.into_parts().1)
}

fn would_block(r: &io::Result<usize>) -> bool {
    matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

impl<D: AsRawFd + Unpin> AsyncRead for PortFd<D>
where
    for<'a> &'a D: Read + Write,
{
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if let Some(d) = &me.paused {
            let r = { d }.read(buf.initialize_unfilled());
            if !would_block(&r) {
                return Poll::Ready(r.map(|n| buf.advance(n)));
            }
        }
        let fd = me.registered()?;
        loop {
            let mut guard = ready!(fd.poll_read_ready(cx))?;
            match guard.try_io(|f| f.get_ref().read(buf.initialize_unfilled())) {
                Ok(r) => return Poll::Ready(r.map(|n| buf.advance(n))),
                Err(_would_block) => continue,
            }
        }
    }
}

impl<D: AsRawFd + Unpin> AsyncWrite for PortFd<D>
where
    for<'a> &'a D: Read + Write,
{
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if let Some(d) = &me.paused {
            let r = { d }.write(buf);
            if !would_block(&r) {
                return Poll::Ready(r);
            }
        }
        let fd = me.registered()?;
        loop {
            let mut guard = ready!(fd.poll_write_ready(cx))?;
            match guard.try_io(|f| f.get_ref().write(buf)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    /// Written bytes are already in the kernel's tty buffer.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::sim::open_pty;
    use std::fs::File;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn nonblocking(f: &File) {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let flags = OFlag::from_bits_truncate(fcntl(f, FcntlArg::F_GETFL).unwrap());
        fcntl(f, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).unwrap();
    }

    /// Paused, a port still gets what the device wrote before and after
    /// the pause, and a read that finds nothing goes back to waiting on
    /// epoll (so it wakes for bytes written later); writes go out either way.
    #[tokio::test]
    async fn a_paused_port_misses_nothing_and_waits_on_epoll_again_when_empty() {
        let pty = open_pty().unwrap();
        let slave = std::fs::OpenOptions::new().read(true).write(true).open(&pty.slave_path).unwrap();
        nix::sys::termios::tcgetattr(&slave)
            .map(|mut t| {
                nix::sys::termios::cfmakeraw(&mut t);
                nix::sys::termios::tcsetattr(&slave, nix::sys::termios::SetArg::TCSANOW, &t).unwrap();
            })
            .unwrap();
        nonblocking(&slave);
        let mut port = PortFd::new(slave).unwrap();
        let timeout = std::time::Duration::from_secs(5);
        let mut buf = [0u8; 64];

        (&pty.master).write_all(b"one").unwrap();
        port.pause();
        (&pty.master).write_all(b"two").unwrap();
        let mut got = Vec::new();
        while got.len() < 6 {
            let n = tokio::time::timeout(timeout, port.read(&mut buf)).await.expect("read timed out").unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"onetwo");
        assert!(port.is_paused(), "a read that found data re-registered the fd");

        // Nothing there: the read registers again and wakes for later bytes.
        let master = pty.master.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            (&master).write_all(b"three").unwrap();
        });
        let n = tokio::time::timeout(timeout, port.read(&mut buf)).await.expect("no wake-up after the pause").unwrap();
        assert_eq!(&buf[..n], b"three");
        assert!(!port.is_paused());
        writer.join().unwrap();

        port.pause();
        port.write_all(b"ack").await.unwrap();
        let mut back = [0u8; 3];
        std::io::Read::read_exact(&mut &pty.master, &mut back).unwrap();
        assert_eq!(&back, b"ack");
    }
}
