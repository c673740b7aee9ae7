//! Memory per idle keep-alive downstream connection: open many HTTP/1.1 connections, make one
//! request on each so the proxy holds a fully set-up keep-alive connection, then read how much
//! the proxy's resident memory grew.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::procstat;

/// What one idle-memory measurement found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IdleSample {
    /// Idle connections held open.
    pub conns: usize,
    /// Proxy RSS with one warm connection, KiB.
    pub rss_before_kib: u64,
    /// Proxy RSS with `conns` idle connections, KiB.
    pub rss_after_kib: u64,
}

impl IdleSample {
    /// Resident memory per idle connection, KiB.
    pub fn kib_per_conn(&self) -> f64 {
        self.rss_after_kib.saturating_sub(self.rss_before_kib) as f64 / self.conns.max(1) as f64
    }
}

/// Opens `conns` keep-alive connections to `addr` (one request each) and measures `pid`'s tree.
pub fn measure(pid: u32, addr: SocketAddr, conns: usize) -> Result<IdleSample> {
    // One warm connection first, so lazily allocated per-process state (pools, buffers of the
    // first upstream connection) is in the baseline and not charged to idle connections.
    let warm = open(addr).context("warm-up connection")?;
    std::thread::sleep(Duration::from_millis(300));
    let rss_before_kib = procstat::rss_kib(pid);
    let mut held = Vec::with_capacity(conns);
    for i in 0..conns {
        held.push(open(addr).with_context(|| format!("connection {i} of {conns}"))?);
    }
    // Let the proxy finish whatever it does after a response (buffer shrinking, pool upkeep).
    std::thread::sleep(Duration::from_millis(500));
    let rss_after_kib = procstat::rss_kib(pid);
    drop(held);
    drop(warm);
    Ok(IdleSample {
        conns,
        rss_before_kib,
        rss_after_kib,
    })
}

/// Connects and completes one keep-alive GET, returning the still-open connection.
fn open(addr: SocketAddr) -> Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed before the response ended");
        }
        buf.extend_from_slice(&chunk[..n]);
        if response_end(&buf).is_some_and(|end| buf.len() >= end) {
            return Ok(s);
        }
    }
}

/// Total length of a response with a Content-Length body, once its headers are complete.
fn response_end(buf: &[u8]) -> Option<usize> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let len = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    })?;
    Some(head_end + len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_end_of_a_content_length_response() {
        let r = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc";
        assert_eq!(response_end(r), Some(r.len()));
        assert_eq!(response_end(b"HTTP/1.1 200 OK\r\ncontent-"), None);
    }
}
