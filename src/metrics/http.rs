//! `GET /metrics` (Prometheus text) and `GET /status` (the
//! [`GatewayStatus`] JSON `edge-gateway status` reads) over HTTP/1.1: one request per connection, a few at a time,
//! bounded reads and timeouts. A web framework would be most of the binary
//! for two routes.

use super::config::MetricsConfig;
use super::status::{GatewayStatus, Probe};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

/// At most this many scrapes at once; more wait in the accept backlog.
const MAX_CONNECTIONS: usize = 32;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The request line and headers must arrive within this: idle sockets must
/// not hold the slots for the whole `REQUEST_TIMEOUT` (a scraper sends its
/// request at once).
const HEADER_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_REQUEST: usize = 8 * 1024;

/// Serve until `stop` fires.
pub async fn serve(listener: TcpListener, probe: Probe, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = crate::shutdown::wait(&mut stop) => return,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let conn = tokio::select! {
            _ = crate::shutdown::wait(&mut stop) => return,
            c = listener.accept() => c,
        };
        let Ok((stream, _)) = conn else {
            // EMFILE and friends: do not spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let probe = probe.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, probe)).await;
            drop(permit);
        });
    }
}

async fn answer(mut stream: TcpStream, probe: Probe) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let headers_by = tokio::time::Instant::now() + HEADER_TIMEOUT;
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let Ok(n) = tokio::time::timeout_at(headers_by, stream.read(&mut chunk)).await else {
            return Ok(());
        };
        let n = n?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST {
            return respond(&mut stream, "431 Request Header Fields Too Large", "text/plain", "").await;
        }
    }
    let line = String::from_utf8_lossy(&buf);
    let mut parts = line.lines().next().unwrap_or_default().split_whitespace();
    let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let path = path.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/metrics") => {
            let body = probe.page();
            respond(&mut stream, "200 OK", "text/plain; version=0.0.4; charset=utf-8", &body).await
        }
        ("GET", "/status") => {
            let body = serde_json::to_string(&probe.take()).unwrap_or_default();
            respond(&mut stream, "200 OK", "application/json", &body).await
        }
        ("GET", "/") => respond(&mut stream, "200 OK", "text/plain", "edge-gateway: see /metrics and /status\n").await,
        ("GET", _) => respond(&mut stream, "404 Not Found", "text/plain", "not found\n").await,
        _ => respond(&mut stream, "405 Method Not Allowed", "text/plain", "GET only\n").await,
    }
}

async fn respond(stream: &mut TcpStream, status: &str, kind: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Fetch `/metrics` from a running gateway.
pub fn fetch(addr: std::net::SocketAddr, timeout: Duration) -> std::io::Result<String> {
    get(addr, "/metrics", timeout)
}

/// Fetch `/status` from a running gateway (for `edge-gateway status`).
pub fn fetch_status(addr: std::net::SocketAddr, timeout: Duration) -> std::io::Result<GatewayStatus> {
    let body = get(addr, "/status", timeout)?;
    serde_json::from_str(&body).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

fn get(addr: std::net::SocketAddr, path: &str, timeout: Duration) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no HTTP header end"))?;
    if !head.starts_with("HTTP/1.1 200") {
        let status = head.lines().next().unwrap_or_default().to_string();
        return Err(std::io::Error::other(format!("answered {status}")));
    }
    Ok(body.to_string())
}

/// Bind `[metrics] listen` and serve. A taken port is logged, not fatal:
/// collecting readings matters more than being scraped.
pub async fn start(cfg: &MetricsConfig, probe: Probe, stop: watch::Receiver<bool>) -> Option<JoinHandle<()>> {
    if !cfg.enabled {
        return None;
    }
    let listener = match tokio::net::TcpListener::bind(cfg.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("metrics: cannot listen on {}: {e}; /metrics is off until restart", cfg.listen);
            return None;
        }
    };
    tracing::info!("metrics on http://{}/metrics", listener.local_addr().unwrap_or(cfg.listen));
    if !cfg.listen.ip().is_loopback() {
        tracing::warn!(
            "metrics: {} is not loopback: /metrics has no authentication and names workers' devices; \
             anyone on that network can read it (bind 127.0.0.1 and scrape through SSH or a proxy)",
            cfg.listen
        );
    }
    Some(tokio::spawn(serve(listener, probe, stop)))
}
