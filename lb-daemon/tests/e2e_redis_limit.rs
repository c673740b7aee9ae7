//! Shared rate limits through a real redis-server (started here on a free loopback port, no
//! persistence, stopped by PID): three lbd processes share one limit; Redis killed, restarted
//! and answering errors gives each filter's failure mode within its time bound.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use lb_tests::certs::{LeafOpts, Pki, toml_path};
use lb_tests::client::{H1, Reply};
use lb_tests::{Backend, Lbd, free_addr, prom};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
}

/// A redis-server of our own; killed (by PID) when dropped.
struct Redis {
    child: Child,
    addr: SocketAddr,
}

impl Redis {
    /// Starts redis-server on `addr`; `None` when the program is missing.
    fn start(addr: SocketAddr) -> Option<Redis> {
        Self::start_with(addr, &[])
    }

    /// Like [`Redis::start`] with more arguments (TLS, a password).
    fn start_with(addr: SocketAddr, extra: &[&str]) -> Option<Redis> {
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &addr.port().to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let r = Redis { child, addr };
        let deadline = Instant::now() + Duration::from_secs(10);
        // With a password, PING answers NOAUTH: still up.
        while !r
            .command("PING")
            .is_some_and(|l| l == "+PONG" || l.starts_with("-NOAUTH"))
        {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(r)
    }

    /// One inline command; the first line of the answer.
    fn command(&self, cmd: &str) -> Option<String> {
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(format!("{cmd}\r\n").as_bytes()).ok()?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).ok()?;
        Some(line.trim_end().to_owned())
    }

    /// Sends `sig` (`STOP`, `CONT`) to the server by PID.
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig}");
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have_redis() -> bool {
    let ok = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIP: redis-server is not installed (scripts/setup.sh installs it)");
    }
    ok
}

/// A listener, an admin endpoint and `routes` (TOML) to cluster `web` at `backend`.
fn config(listen: SocketAddr, admin: SocketAddr, backend: SocketAddr, routes: &str) -> String {
    format!(
        r#"
[admin]
bind = "{admin}"

[[listeners]]
name = "main"
bind = "{listen}"

{routes}

[[clusters]]
name = "web"
[[clusters.endpoints]]
address = "{backend}"
"#
    )
}

async fn get(c: &H1, addr: SocketAddr, path: &str) -> Reply {
    let req = Request::get(path)
        .header("host", "a")
        .header("x-tenant", "t1")
        .body(Full::new(Bytes::new()))
        .expect("request");
    c.send(addr, req).await.expect("reply")
}

async fn metrics(c: &H1, admin: SocketAddr) -> prom::Exposition {
    let r = get(c, admin, "/metrics").await;
    assert_eq!(r.status, 200, "{}", r.text());
    prom::parse(&r.text()).expect("exposition")
}

/// Polls `path` until it answers `status` (bounded).
async fn until_status(c: &H1, addr: SocketAddr, path: &str, status: u16) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if get(c, addr, path).await.status == status {
            return;
        }
        assert!(Instant::now() < deadline, "{path} never answered {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_one_limit() {
    if !have_redis() {
        return;
    }
    let redis = Redis::start(free_addr()).expect("redis-server");
    let backend = Backend::start("b1").await;
    // 300 per 10 s with a burst of 300; batches chosen by lbd (burst / 100 = 3 tokens). The
    // timeout is generous: this test is about the count, not about a slow Redis.
    let routes = format!(
        r#"
[[routes]]
name = "shared"
cluster = "web"
[[routes.filters]]
rate_limit = {{ key = "header:x-tenant", limits = [{{ rate = "300/10s", burst = 300 }}], redis = {{ url = "redis://{}", timeout = "1s", failure_mode = "fail_closed" }} }}
"#,
        redis.addr
    );
    let mut lbds = Vec::new();
    let mut listens = Vec::new();
    let mut admins = Vec::new();
    for _ in 0..3 {
        let (listen, admin) = (free_addr(), free_addr());
        lbds.push(Lbd::start(
            bin(),
            &config(listen, admin, backend.addr, &routes),
        ));
        listens.push(listen);
        admins.push(admin);
    }
    // Load spread 60% / 30% / 10% over the three, 1,500 requests on six connections: five
    // times the burst, in well under the 10 s period.
    let per_instance: Vec<Arc<AtomicU64>> = (0..3).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..6u64 {
        let (listens, per_instance, sent) =
            (listens.clone(), per_instance.clone(), Arc::clone(&sent));
        tasks.push(tokio::spawn(async move {
            let c = H1::new();
            for i in 0..250u64 {
                let n = (i * 6 + t) % 10;
                let which = match n {
                    0..=5 => 0,
                    6..=8 => 1,
                    _ => 2,
                };
                let r = get(&c, listens[which], "/x").await;
                sent.fetch_add(1, Ordering::Relaxed);
                match r.status.as_u16() {
                    200 => {
                        per_instance[which].fetch_add(1, Ordering::Relaxed);
                    }
                    429 => {}
                    s => panic!("unexpected status {s}: {r:?}"),
                }
                if start.elapsed() > Duration::from_secs(60) {
                    break;
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let each: Vec<u64> = per_instance
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .collect();
    let total: u64 = each.iter().sum();
    // GCRA keeps refilling at 30/s while the load runs.
    let expected = 300.0 + 30.0 * elapsed;
    let c = H1::new();
    let mut calls = 0.0;
    let mut errors = 0.0;
    for a in &admins {
        let m = metrics(&c, *a).await;
        calls += m.sum("lbd_rate_limit_redis_calls_total", &[]);
        errors += m.sum("lbd_rate_limit_redis_errors_total", &[]);
    }
    eprintln!(
        "three lbd instances, one Redis limit 300/10s: admitted {total} (per instance {each:?}) \
         of {} sent in {elapsed:.2} s; expected {expected:.0}; {calls} Redis round trips, \
         {errors} Redis errors",
        sent.load(Ordering::Relaxed)
    );
    assert!(elapsed < 8.0, "the run must stay well inside one period");
    assert!(
        (total as f64 - expected).abs() <= expected * 0.05,
        "admitted {total}, expected {expected:.0} ± 5%"
    );
    assert_eq!(errors, 0.0, "Redis answered every call");
    assert!(
        calls < total as f64,
        "batches keep Redis off most admitted requests ({calls} calls for {total})"
    );
    for n in &each {
        assert!(*n > 0, "every instance admitted some: {each:?}");
    }
    redis.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_gives_each_failure_mode_within_the_bound_then_recovers() {
    if !have_redis() {
        return;
    }
    let redis_addr = free_addr();
    let redis = Redis::start(redis_addr).expect("redis-server");
    let backend = Backend::start("b1").await;
    // batch = 1: every request asks Redis, so a kill shows at once. connect_timeout is long
    // on purpose: no request may wait for a reconnection attempt.
    let redis_table = |mode: &str| {
        format!(
            r#"{{ url = "redis://{redis_addr}", timeout = "20ms", connect_timeout = "5s", failure_mode = "{mode}", batch = 1 }}"#
        )
    };
    let routes = format!(
        r#"
[[routes]]
name = "open"
cluster = "web"
match.path_prefix = "/open"
[[routes.filters]]
rate_limit = {{ key = "route", limits = [{{ rate = "100000/s" }}], redis = {open} }}

[[routes]]
name = "closed"
cluster = "web"
match.path_prefix = "/closed"
[[routes.filters]]
rate_limit = {{ key = "route", limits = [{{ rate = "100000/s" }}], redis = {closed} }}

[[routes]]
name = "tight"
cluster = "web"
match.path_prefix = "/tight"
[[routes.filters]]
rate_limit = {{ key = "route", limits = [{{ rate = "5/h" }}], redis = {closed} }}
"#,
        open = redis_table("fail_open"),
        closed = redis_table("fail_closed"),
    );
    let (listen, admin) = (free_addr(), free_addr());
    let lbd = Lbd::start(bin(), &config(listen, admin, backend.addr, &routes));
    let c = H1::new();
    until_status(&c, listen, "/closed", 200).await;
    assert_eq!(get(&c, listen, "/open").await.status, 200);

    let bound = Duration::from_millis(20);
    let margin = Duration::from_millis(600);

    // A Redis that stops answering (SIGSTOP: connections stay open, nothing comes back):
    // each request waits at most the timeout.
    redis.signal("STOP");
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        for (path, want) in [("/open", 200), ("/closed", 429)] {
            let t = Instant::now();
            let r = get(&c, listen, path).await;
            let took = t.elapsed();
            slowest = slowest.max(took);
            assert_eq!(r.status, want, "{path} with Redis stopped: {r:?}");
            assert!(took <= bound + margin, "{path} waited {took:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    eprintln!("Redis stopped: slowest answer {slowest:?} (bound {bound:?} + margin {margin:?})");
    let m = metrics(&c, admin).await;
    assert!(
        m.sum("lbd_rate_limit_redis_errors_total", &[("kind", "timeout")]) >= 1.0,
        "late answers are counted as timeouts"
    );
    redis.signal("CONT");
    until_status(&c, listen, "/closed", 200).await;

    redis.kill();
    let mut slowest = Duration::ZERO;
    for _ in 0..40 {
        for (path, want) in [("/open", 200), ("/closed", 429)] {
            let t = Instant::now();
            let r = get(&c, listen, path).await;
            let took = t.elapsed();
            slowest = slowest.max(took);
            assert_eq!(r.status, want, "{path} with Redis down: {r:?}");
            if want == 429 {
                assert_eq!(r.lbd_error(), "rate_limited");
                assert_eq!(r.headers["retry-after"], "1");
            }
            assert!(took <= bound + margin, "{path} waited {took:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    eprintln!("Redis down: slowest answer {slowest:?} (bound {bound:?} + margin {margin:?})");
    let m = metrics(&c, admin).await;
    let errors = m.sum("lbd_rate_limit_redis_errors_total", &[]);
    assert!(errors >= 60.0, "every fallback is counted: {errors}");

    // Restarted on the same port, empty: shared limiting resumes on its own.
    let redis = Redis::start(redis_addr).expect("redis-server restart");
    until_status(&c, listen, "/closed", 200).await;
    let tight: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..8 {
            v.push(get(&c, listen, "/tight").await.status.as_u16());
        }
        v
    };
    assert_eq!(
        tight,
        [200, 200, 200, 200, 200, 429, 429, 429],
        "5/h after recovery"
    );
    let keys = redis.command("DBSIZE").unwrap_or_default();
    assert!(
        keys.starts_with(':') && keys != ":0",
        "state is in Redis: {keys}"
    );
    let logs = lbd.logs();
    let lines = logs.matches("Redis did not decide").count();
    eprintln!("{lines} log line(s) for {errors} fallbacks");
    assert!(
        (1..=3).contains(&lines),
        "the log line is rate-limited: {lines}\n{logs}"
    );
}

/// A server speaking just enough RESP to answer `-ERR` to every command.
fn erring_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in l.incoming().take(64) {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while let Ok(n) = s.read(&mut chunk) {
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(used) = resp_command_len(&buf) {
                        buf.drain(..used);
                        if s.write_all(b"-ERR fake server\r\n").is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// The length of the first complete RESP command (`*N` then N bulk strings) in `b`.
fn resp_command_len(b: &[u8]) -> Option<usize> {
    fn line(b: &[u8], at: usize) -> Option<(&[u8], usize)> {
        let end = b[at..].windows(2).position(|w| w == b"\r\n")? + at;
        Some((&b[at..end], end + 2))
    }
    let (head, mut at) = line(b, 0)?;
    let n: usize = std::str::from_utf8(head.strip_prefix(b"*")?)
        .ok()?
        .parse()
        .ok()?;
    for _ in 0..n {
        let (len, next) = line(b, at)?;
        let len: usize = std::str::from_utf8(len.strip_prefix(b"$")?)
            .ok()?
            .parse()
            .ok()?;
        at = next + len + 2;
        if at > b.len() {
            return None;
        }
    }
    Some(at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_answering_errors_gives_each_failure_mode() {
    let fake = erring_server();
    let backend = Backend::start("b1").await;
    let routes = format!(
        r#"
[[routes]]
name = "open"
cluster = "web"
match.path_prefix = "/open"
[[routes.filters]]
rate_limit = {{ key = "route", limits = [{{ rate = "10/s" }}], redis = {{ url = "redis://{fake}", timeout = "50ms", failure_mode = "fail_open" }} }}

[[routes]]
name = "closed"
cluster = "web"
match.path_prefix = "/closed"
[[routes.filters]]
rate_limit = {{ key = "route", limits = [{{ rate = "10/s" }}], redis = {{ url = "redis://{fake}", timeout = "50ms", failure_mode = "fail_closed" }} }}
"#
    );
    let (listen, admin) = (free_addr(), free_addr());
    let _lbd = Lbd::start(bin(), &config(listen, admin, backend.addr, &routes));
    let c = H1::new();
    // Well past the limit (10/s): a failing Redis limits nothing on the open route.
    for _ in 0..30 {
        let t = Instant::now();
        let open = get(&c, listen, "/open").await;
        assert_eq!(open.status, 200, "{open:?}");
        assert!(!open.headers.contains_key("ratelimit-limit"));
        let closed = get(&c, listen, "/closed").await;
        assert_eq!(closed.status, 429, "{closed:?}");
        assert!(t.elapsed() < Duration::from_millis(50 * 2 + 800));
    }
    let m = metrics(&c, admin).await;
    let errors = m.sum("lbd_rate_limit_redis_errors_total", &[]);
    eprintln!("erring Redis: {errors} fallbacks counted");
    assert!(errors >= 60.0, "{errors}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_password() {
    if !have_redis() {
        return;
    }
    let pki = Pki::new("redis test CA");
    let leaf = pki.leaf(
        "redis",
        &LeafOpts {
            names: vec!["127.0.0.1".into()],
            cn: "redis".into(),
            serial: 2,
            ..LeafOpts::default()
        },
    );
    let pass = pki.write("redis.pass", b"s3cret-for-tests\n");
    let wrong = pki.write("wrong.pass", b"not-it\n");
    let (plain, tls) = (free_addr(), free_addr());
    let tls_port = tls.port().to_string();
    let (cert, key, ca) = (
        leaf.cert.display().to_string(),
        leaf.key.display().to_string(),
        pki.ca_file.display().to_string(),
    );
    let _redis = Redis::start_with(
        plain,
        &[
            "--tls-port",
            &tls_port,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
            "--requirepass",
            "s3cret-for-tests",
        ],
    )
    .expect("redis-server");
    let backend = Backend::start("b1").await;
    let table = |pass: &Path| {
        format!(
            r#"{{ url = "rediss://{tls}", password_file = {}, ca_file = {}, timeout = "500ms", failure_mode = "fail_closed", batch = 1 }}"#,
            toml_path(pass),
            toml_path(&pki.ca_file)
        )
    };
    let routes = format!(
        r#"
[[routes]]
name = "tls"
cluster = "web"
match.path_prefix = "/tls"
[[routes.filters]]
rate_limit = {{ key = "route", limits = [{{ rate = "3/h" }}], redis = {good} }}

[[routes]]
name = "wrong"
cluster = "web"
match.path_prefix = "/wrong"
[[routes.filters]]
rate_limit = {{ key = "route", limits = [{{ rate = "3/h" }}], redis = {bad} }}
"#,
        good = table(&pass),
        bad = table(&wrong),
    );
    let (listen, admin) = (free_addr(), free_addr());
    let _lbd = Lbd::start(bin(), &config(listen, admin, backend.addr, &routes));
    let c = H1::new();
    until_status(&c, listen, "/tls", 200).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(get(&c, listen, "/tls").await.status.as_u16());
    }
    // The probe above took the first of the 3.
    assert_eq!(got, [200, 200, 429], "3/h over TLS with a password");
    for _ in 0..3 {
        let r = get(&c, listen, "/wrong").await;
        assert_eq!(r.status, 429, "a wrong password fails closed: {r:?}");
    }
}
