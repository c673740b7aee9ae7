//! The new-TLS-connection-per-request load generator (`cargo xtask bench-tls-client`, run by
//! the bench pinned to the load CPU). wrk and h2load cannot choose between full and resumed
//! handshakes, so this client does one or the other on purpose: every request is a new TCP
//! connection, a TLS handshake (rustls with ring, certificate verified against the bench CA,
//! SNI `bench.test`), one `GET` with `Connection: close`, and the answer read to its end.
//! With `--resume` the client keeps TLS 1.3 tickets in memory and every connection after a
//! slot's first must resume; one that does not is counted as an error, so a contender whose
//! resumption does not work shows up in the table instead of passing as a full handshake.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};

/// Options of the hidden `bench-tls-client` subcommand.
#[derive(Debug, Args)]
pub struct TlsClientArgs {
    /// Address to connect to.
    #[arg(long)]
    addr: SocketAddr,
    /// PEM certificate the server's must equal (the bench's self-signed one).
    #[arg(long)]
    ca: PathBuf,
    /// Concurrent connections (one thread each).
    #[arg(long, default_value_t = 16)]
    conns: u32,
    /// Seconds to run.
    #[arg(long, default_value_t = 2)]
    duration: u64,
    /// Resume sessions (TLS 1.3 tickets); otherwise every handshake is a full one.
    #[arg(long)]
    resume: bool,
}

/// What one thread saw.
#[derive(Default)]
struct Tally {
    ok: u64,
    errors: u64,
    latencies_us: Vec<u32>,
    first_error: Option<String>,
    negotiated: Option<String>,
}

/// Runs the load and prints one summary line (`parse_summary` reads it).
pub fn run(args: TlsClientArgs) -> Result<()> {
    let ca = CertificateDer::from_pem_file(&args.ca)
        .with_context(|| format!("reading {}", args.ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Each slot keeps its own store, so a slot's tickets are its own and a reused ticket (which
    // TLS 1.3 servers refuse) cannot happen across threads.
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let start = Instant::now();
    let threads: Vec<_> = (0..args.conns)
        .map(|_| {
            let mut c = config.clone();
            c.resumption = if args.resume {
                rustls::client::Resumption::in_memory_sessions(8)
            } else {
                rustls::client::Resumption::disabled()
            };
            let c = Arc::new(c);
            let addr = args.addr;
            let resume = args.resume;
            std::thread::spawn(move || slot(&c, addr, resume, deadline))
        })
        .collect();
    let mut all = Tally::default();
    for t in threads {
        let t = t
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
        all.ok += t.ok;
        all.errors += t.errors;
        all.latencies_us.extend(t.latencies_us);
        all.first_error = all.first_error.or(t.first_error);
        all.negotiated = all.negotiated.or(t.negotiated);
    }
    let wall = start.elapsed().as_secs_f64();
    all.latencies_us.sort_unstable();
    let at = |q: f64| {
        all.latencies_us
            .get(((all.latencies_us.len().saturating_sub(1)) as f64 * q).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    println!(
        "tls-client ok={} errors={} wall_s={wall:.3} p50_us={} p99_us={} negotiated={} first_error={}",
        all.ok,
        all.errors,
        at(0.50),
        at(0.99),
        all.negotiated.as_deref().unwrap_or("-"),
        all.first_error
            .as_deref()
            .unwrap_or("-")
            .replace(char::is_whitespace, "_"),
    );
    Ok(())
}

/// One connection slot: new connection per request until the deadline.
fn slot(
    config: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    resume: bool,
    deadline: Instant,
) -> Tally {
    let mut t = Tally::default();
    let name = ServerName::try_from(super::material::SERVER_NAME).expect("static name is valid");
    let mut first = true;
    while Instant::now() < deadline {
        let t0 = Instant::now();
        match one(config, addr, &name) {
            Ok((kind, negotiated)) => {
                let resumed = kind == Some(rustls::HandshakeKind::Resumed);
                if resume && !first && !resumed {
                    t.errors += 1;
                    t.first_error
                        .get_or_insert_with(|| "handshake not resumed".into());
                } else {
                    t.ok += 1;
                    let us = t0.elapsed().as_micros();
                    t.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                }
                t.negotiated.get_or_insert(negotiated);
            }
            Err(e) => {
                t.errors += 1;
                t.first_error.get_or_insert_with(|| format!("{e:#}"));
                // A refusing server must not turn this into a busy loop.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        first = false;
    }
    t
}

/// One request on a new TLS connection; returns the handshake kind and what was negotiated.
fn one(
    config: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    name: &ServerName<'static>,
) -> Result<(Option<rustls::HandshakeKind>, String)> {
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let conn = rustls::ClientConnection::new(config.clone(), name.clone())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"GET / HTTP/1.1\r\nHost: bench.test\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    loop {
        match tls.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            // Servers that close without close_notify after a complete answer are fine.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => break,
            Err(e) => return Err(e.into()),
        }
        if buf.len() > 1 << 20 {
            anyhow::bail!("answer over 1 MiB");
        }
    }
    if !buf.starts_with(b"HTTP/1.1 200") {
        anyhow::bail!(
            "answer was not 200: {:?}",
            String::from_utf8_lossy(&buf[..buf.len().min(40)])
        );
    }
    let c = &tls.conn;
    let show = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let negotiated = format!(
        "{}/{}/{}",
        show(c.protocol_version().map(|v| format!("{v:?}"))),
        show(
            c.negotiated_cipher_suite()
                .map(|s| format!("{:?}", s.suite()))
        ),
        show(
            c.negotiated_key_exchange_group()
                .map(|g| format!("{:?}", g.name()))
        ),
    )
    .replace(char::is_whitespace, "");
    Ok((c.handshake_kind(), negotiated))
}

/// The summary line's fields: (ok, errors, wall seconds, p50 µs, p99 µs, negotiated, first error).
pub fn parse_summary(text: &str) -> Option<(u64, u64, f64, f64, f64, String, String)> {
    let line = text.lines().find(|l| l.starts_with("tls-client "))?;
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
            .map(str::to_owned)
    };
    Some((
        field("ok")?.parse().ok()?,
        field("errors")?.parse().ok()?,
        field("wall_s")?.parse().ok()?,
        field("p50_us")?.parse().ok()?,
        field("p99_us")?.parse().ok()?,
        field("negotiated")?,
        field("first_error")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::parse_summary;

    #[test]
    fn parses_summary_line() {
        let s = "tls-client ok=10 errors=2 wall_s=2.001 p50_us=300 p99_us=900 negotiated=Some(TLSv1_3) first_error=handshake_not_resumed\n";
        let (ok, err, wall, p50, p99, neg, first) = parse_summary(s).expect("parses");
        assert_eq!((ok, err, p50, p99), (10, 2, 300.0, 900.0));
        assert!((wall - 2.001).abs() < 1e-9);
        assert_eq!(neg, "Some(TLSv1_3)");
        assert_eq!(first, "handshake_not_resumed");
    }
}
