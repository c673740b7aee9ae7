//! Service discovery through the real binary: a real DNS server (dnsmasq on loopback, records
//! rewritten by the test), real backends on several loopback addresses, and endpoint files
//! edited while lbd runs. Endpoints must change without a config reload, removed ones must
//! drain, and a failing source must keep its last good set.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lb_tests::client::{H1, H1Conn, Reply};
use lb_tests::dns::DnsServer;
use lb_tests::{Backend, BackendOpts, Lbd, free_addr, prom};
use serde_json::Value;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lbd-disc-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// Backends on 127.0.0.2, .3, .4 (and so on), all on one port, so that A records alone
/// choose among them.
async fn backends_on_one_port(n: u8) -> (u16, Vec<Backend>) {
    'again: for _ in 0..20 {
        let first = Backend::start_with(
            "b2",
            BackendOpts {
                addr: Some("127.0.0.2:0".parse().expect("addr")),
            },
        )
        .await;
        let port = first.addr.port();
        let mut all = vec![first];
        for i in 3..(2 + n) {
            let addr: SocketAddr = format!("127.0.0.{i}:{port}").parse().expect("addr");
            if std::net::TcpListener::bind(addr).is_err() {
                continue 'again;
            }
            all.push(Backend::start_with(&format!("b{i}"), BackendOpts { addr: Some(addr) }).await);
        }
        return (port, all);
    }
    panic!("no port free on every loopback address");
}

async fn send(c: &H1, lbd: SocketAddr, path: &str) -> Reply {
    c.get(lbd, path, Some("app.example"))
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// `n` requests; which backend answered each (all must be 200).
async fn spread(c: &H1, lbd: SocketAddr, n: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for _ in 0..n {
        let r = send(c, lbd, "/").await;
        assert_eq!(r.status, 200, "{} {}", r.lbd_error(), r.text());
        *seen.entry(r.backend().to_owned()).or_insert(0) += 1;
    }
    seen
}

/// Sends requests until one is answered by a backend in `want` (bounded by `limit`);
/// returns how long that took.
async fn until_answered_by(c: &H1, lbd: SocketAddr, want: &[&str], limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let r = send(c, lbd, "/").await;
        if want.contains(&r.backend()) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "no answer from {want:?} within {limit:?} (last from {:?}, status {})",
            r.backend(),
            r.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn clusters(c: &H1, admin: SocketAddr) -> Value {
    let r = c
        .get(admin, "/clusters", None)
        .await
        .expect("GET /clusters");
    assert_eq!(r.status, 200, "{}", r.text());
    serde_json::from_slice(&r.body).expect("json")
}

fn cluster<'a>(all: &'a Value, name: &str) -> &'a Value {
    all.as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no cluster {name} in {all}"))
}

/// Polls `/clusters` until `ok` holds for cluster `name` (≤ 10 s); returns it either way.
async fn cluster_until(
    c: &H1,
    admin: SocketAddr,
    name: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = clusters(c, admin).await;
        let v = cluster(&all, name).clone();
        if ok(&v) || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metrics(c: &H1, admin: SocketAddr) -> prom::Exposition {
    let r = c.get(admin, "/metrics", None).await.expect("GET /metrics");
    prom::parse(&r.text()).unwrap_or_else(|e| panic!("bad exposition: {e}"))
}

fn config(listen: SocketAddr, admin: SocketAddr, endpoints: &str, discovery: &str) -> String {
    format!(
        r#"
[admin]
bind = "{admin}"

[[listeners]]
name = "main"
bind = "{listen}"

[[routes]]
name = "all"
cluster = "web"

[[clusters]]
name = "web"
policy = "round_robin"
{endpoints}
[clusters.discovery]
{discovery}
"#
    )
}

macro_rules! dns_or_skip {
    ($dir:expr, $hosts:expr, $srv:expr) => {
        match DnsServer::start($dir, $hosts, $srv) {
            Some(d) => d,
            None => {
                println!("SKIP: dnsmasq is not installed (scripts/setup.sh installs it)");
                return;
            }
        }
    };
}

/// A records changed at the DNS server: the new addresses take traffic within TTL + 1 s, the
/// removed one gets no new request while its request in flight completes, no reload happens;
/// then the server stops and the last set keeps serving, with the failure in the admin API,
/// the metrics and (rate-limited) the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_records_follow_the_dns_server_and_survive_its_loss() {
    let (port, b) = backends_on_one_port(3).await;
    let dir = temp_dir("a");
    let mut dns = dns_or_skip!(&dir, &[("web.lbd.test", "127.0.0.2")], &[]);
    let (listen, admin) = (free_addr(), free_addr());
    let cfg = config(
        listen,
        admin,
        &format!("[[clusters.endpoints]]\ndns = \"web.lbd.test:{port}\"\n"),
        &format!(
            "resolver = \"{}\"\nttl_min = \"1s\"\nretry = \"300ms\"\nquery_timeout = \"300ms\"\n",
            dns.addr
        ),
    );
    let lbd = Lbd::start(bin(), &cfg);
    let c = H1::new();

    let seen = spread(&c, listen, 10).await;
    assert_eq!(seen.get("b2"), Some(&10), "{seen:?}\n{}", lbd.logs());
    let web = cluster(&clusters(&c, admin).await, "web").clone();
    assert_eq!(
        web["endpoints"][0]["source"],
        format!("dns:web.lbd.test:{port}")
    );
    assert_eq!(
        web["sources"][0]["source"],
        format!("dns:web.lbd.test:{port}")
    );
    assert!(web["sources"][0]["last_success"].is_string(), "{web}");
    assert!(web["sources"][0]["last_error"].is_null(), "{web}");

    // A slow request on b2, which the change below removes: it must complete.
    let slow = {
        let c = c.clone();
        tokio::spawn(async move { send(&c, listen, "/sleep/2500").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    dns.set_hosts(&[("web.lbd.test", "127.0.0.3"), ("web.lbd.test", "127.0.0.4")]);
    // TTL 1 s (dnsmasq --local-ttl, and the ttl_min floor) + 1 s.
    let took = until_answered_by(&c, listen, &["b3", "b4"], Duration::from_secs(2)).await;
    println!("new A records took traffic after {took:?}");
    let b2_before = b[0].hits();
    let seen = spread(&c, listen, 40).await;
    assert_eq!(
        seen.get("b2"),
        None,
        "removed endpoint got new requests: {seen:?}"
    );
    assert!(seen.get("b3").is_some_and(|n| *n >= 10), "{seen:?}");
    assert!(seen.get("b4").is_some_and(|n| *n >= 10), "{seen:?}");
    assert_eq!(b[0].hits(), b2_before, "b2 got a request after its removal");
    let r = slow.await.expect("slow request task");
    assert_eq!(
        (r.status.as_u16(), r.backend()),
        (200, "b2"),
        "in-flight request on the removed endpoint"
    );

    // Not a reload: the counters did not move.
    let m = metrics(&c, admin).await;
    assert_eq!(m.sum("lbd_config_reloads_total", &[]), 0.0);
    let status: Value =
        serde_json::from_slice(&c.get(admin, "/status", None).await.expect("status").body)
            .expect("json");
    assert_eq!(status["reloads_ok"], 0);

    // The DNS server goes away: the last set keeps serving.
    dns.stop();
    let web = cluster_until(&c, admin, "web", |w| {
        w["sources"][0]["last_error"].is_string()
    })
    .await;
    assert!(
        web["sources"][0]["last_error"].is_string(),
        "no error shown: {web}"
    );
    assert_eq!(web["sources"][0]["endpoints"], 2, "{web}");
    let seen = spread(&c, listen, 20).await;
    assert_eq!(seen.values().sum::<usize>(), 20);
    assert_eq!(seen.get("b2"), None, "{seen:?}");
    // Several failed attempts, fewer log lines: the log is rate-limited.
    let source = format!("dns:web.lbd.test:{port}");
    let labels = [("cluster", "web"), ("source", source.as_str())];
    let failed = [labels[0], labels[1], ("result", "failure")];
    let deadline = Instant::now() + Duration::from_secs(20);
    let (m, failures) = loop {
        let m = metrics(&c, admin).await;
        let failures = m.sum("lbd_discovery_resolutions_total", &failed);
        if failures >= 3.0 || Instant::now() > deadline {
            break (m, failures);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(m.value("lbd_discovery_failing", &labels), Some(1.0));
    assert_eq!(m.value("lbd_discovery_endpoints", &labels), Some(2.0));
    let logged = lbd.logs().matches("keeping its last good set").count();
    assert!(failures >= 3.0, "failures {failures}");
    assert!(
        logged >= 1 && (logged as f64) < failures,
        "logged {logged} times for {failures} failures"
    );
    let seen = spread(&c, listen, 10).await;
    assert_eq!(seen.values().sum::<usize>(), 10);
}

/// SRV records give ports and weights (a weight of 0 a very small share, per RFC 2782) and
/// the backup tier (a higher priority); replacing them moves traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_give_ports_weights_and_backups() {
    let heavy = Backend::start("heavy").await;
    let light = Backend::start("light").await;
    let zero = Backend::start("zero").await;
    let backup = Backend::start("backup").await;
    let srv = |b: &Backend, prio: u16, weight: u16| {
        format!(
            "_http._tcp.web.lbd.test,host.lbd.test,{},{prio},{weight}",
            b.addr.port()
        )
    };
    let dir = temp_dir("srv");
    let mut dns = dns_or_skip!(
        &dir,
        &[("host.lbd.test", "127.0.0.1")],
        &[
            srv(&heavy, 10, 60),
            srv(&light, 10, 20),
            srv(&zero, 10, 0),
            srv(&backup, 20, 5)
        ]
    );
    let (listen, admin) = (free_addr(), free_addr());
    let cfg = config(
        listen,
        admin,
        "[[clusters.endpoints]]\nsrv = \"_http._tcp.web.lbd.test\"\n",
        &format!("resolver = \"{}\"\nttl_min = \"1s\"\n", dns.addr),
    )
    .replace(
        "policy = \"round_robin\"",
        "policy = \"weighted_round_robin\"",
    );
    let lbd = Lbd::start(bin(), &cfg);
    let c = H1::new();

    let web = cluster(&clusters(&c, admin).await, "web").clone();
    let by_port = |p: u16| {
        web["endpoints"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e["address"] == format!("127.0.0.1:{p}")))
            .cloned()
            .unwrap_or_else(|| panic!("no endpoint on port {p}: {web}\n{}", lbd.logs()))
    };
    assert_eq!(
        (
            by_port(heavy.addr.port())["weight"].as_u64(),
            by_port(heavy.addr.port())["backup"].as_bool()
        ),
        (Some(1000), Some(false))
    );
    assert_eq!(by_port(light.addr.port())["weight"], 333);
    assert_eq!(
        by_port(zero.addr.port())["weight"],
        1,
        "weight 0 → a very small share"
    );
    assert_eq!(
        by_port(backup.addr.port())["backup"],
        true,
        "a higher priority is a backup"
    );
    assert_eq!(
        by_port(heavy.addr.port())["source"],
        "srv:_http._tcp.web.lbd.test"
    );

    let seen = spread(&c, listen, 400).await;
    let (h, l) = (
        seen.get("heavy").copied().unwrap_or(0),
        seen.get("light").copied().unwrap_or(0),
    );
    assert!(h > 2 * l && l > 50, "60:20 weights gave {seen:?}");
    assert!(seen.get("zero").copied().unwrap_or(0) <= 2, "{seen:?}");
    assert_eq!(
        seen.get("backup"),
        None,
        "backup used while primaries are up: {seen:?}"
    );

    // New SRV records (dnsmasq restarted on the same port): only `light` on priority 10.
    dns.set_srv(&[srv(&light, 10, 1), srv(&backup, 20, 1)]);
    until_answered_by(&c, listen, &["light"], Duration::from_secs(5)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen = spread(&c, listen, 20).await;
        if seen.get("light") == Some(&20) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "traffic still spread over {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An endpoints file edited while lbd runs: the endpoints follow without a reload; a
/// malformed edit keeps the old set and says where the problem is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_file_edits_apply_and_bad_ones_are_kept_out() {
    let b1 = Backend::start("one").await;
    let b2 = Backend::start("two").await;
    let b3 = Backend::start("three").await;
    let dir = temp_dir("file");
    let file = dir.join("endpoints.json");
    let list = |bs: &[&Backend]| {
        let items: Vec<String> = bs
            .iter()
            .map(|b| format!("  {{ \"address\": \"{}\", \"weight\": 1 }}", b.addr))
            .collect();
        format!("[\n{}\n]\n", items.join(",\n"))
    };
    std::fs::write(&file, list(&[&b1])).expect("write");
    let (listen, admin) = (free_addr(), free_addr());
    let cfg = config(
        listen,
        admin,
        &format!("[[clusters.endpoints]]\nfile = \"{}\"\n", file.display()),
        "file_interval = \"200ms\"\n",
    );
    let mut lbd = Lbd::start(bin(), &cfg);
    let c = H1::new();
    assert_eq!(spread(&c, listen, 5).await.get("one"), Some(&5));

    std::fs::write(&file, list(&[&b2, &b3])).expect("write");
    until_answered_by(&c, listen, &["two", "three"], Duration::from_secs(3)).await;
    let seen = spread(&c, listen, 20).await;
    assert_eq!(seen.get("one"), None, "{seen:?}");
    assert_eq!(
        (seen.get("two"), seen.get("three")),
        (Some(&10), Some(&10)),
        "{seen:?}"
    );
    let web = cluster(&clusters(&c, admin).await, "web").clone();
    assert_eq!(
        web["endpoints"][0]["source"],
        format!("file:{}", file.display())
    );

    // A trailing comma on line 3: rejected with its location, the old set stays.
    std::fs::write(
        &file,
        format!("[\n  {{ \"address\": \"{}\" }},\n]\n", b1.addr),
    )
    .expect("write");
    let web = cluster_until(&c, admin, "web", |w| {
        w["sources"][0]["last_error"].is_string()
    })
    .await;
    let err = web["sources"][0]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        err.starts_with(&format!("{}:3:1:", file.display())),
        "error without its location: {err:?}"
    );
    assert!(
        lbd.logs().contains(&format!("{}:3:1:", file.display())),
        "{}",
        lbd.logs()
    );
    let seen = spread(&c, listen, 20).await;
    assert_eq!(
        (seen.get("two"), seen.get("three")),
        (Some(&10), Some(&10)),
        "{seen:?}"
    );

    // A bad address is reported at its line too.
    std::fs::write(&file, "[\n  { \"address\": \"web:80\" }\n]\n").expect("write");
    let web = cluster_until(&c, admin, "web", |w| {
        w["sources"][0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(":2:"))
    })
    .await;
    assert!(
        web["sources"][0]["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("expected ip:port"),
        "{web}"
    );

    // Fixed: applied, and the error is gone.
    std::fs::write(&file, list(&[&b1])).expect("write");
    until_answered_by(&c, listen, &["one"], Duration::from_secs(3)).await;
    let web = cluster_until(&c, admin, "web", |w| {
        w["sources"][0]["last_error"].is_null()
    })
    .await;
    assert!(web["sources"][0]["last_error"].is_null(), "{web}");
    assert_eq!(
        metrics(&c, admin)
            .await
            .sum("lbd_config_reloads_total", &[]),
        0.0
    );

    // A reload keeps the file's set: unchanged, and with changed discovery settings (a new
    // watch that starts from the old one's set). No request may find the cluster empty.
    lbd.reload(&cfg);
    assert_eq!(spread(&c, listen, 10).await.get("one"), Some(&10));
    lbd.reload(&cfg.replace("file_interval = \"200ms\"", "file_interval = \"300ms\""));
    assert_eq!(spread(&c, listen, 10).await.get("one"), Some(&10));
    assert_eq!(
        metrics(&c, admin)
            .await
            .sum("lbd_config_reloads_total", &[("result", "success")]),
        2.0
    );
}

/// A name that does not resolve at startup: lbd starts with the cluster's other endpoints,
/// shows the error, keeps retrying, and adds the name's addresses once it resolves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unresolvable_name_at_startup_starts_with_the_others() {
    let (port, b) = backends_on_one_port(2).await;
    let dir = temp_dir("late");
    let dns = dns_or_skip!(&dir, &[("other.lbd.test", "127.0.0.9")], &[]);
    let (listen, admin) = (free_addr(), free_addr());
    let cfg = config(
        listen,
        admin,
        &format!(
            "[[clusters.endpoints]]\naddress = \"{}\"\n[[clusters.endpoints]]\ndns = \"late.lbd.test:{port}\"\n",
            b[0].addr
        ),
        &format!(
            "resolver = \"{}\"\nttl_min = \"1s\"\nretry = \"300ms\"\n",
            dns.addr
        ),
    );
    let lbd = Lbd::start(bin(), &cfg);
    let c = H1::new();
    assert_eq!(
        spread(&c, listen, 6).await.get("b2"),
        Some(&6),
        "{}",
        lbd.logs()
    );
    let web = cluster(&clusters(&c, admin).await, "web").clone();
    assert!(
        web["sources"][0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("late.lbd.test")),
        "{web}"
    );
    assert!(web["sources"][0]["endpoints"].is_null(), "{web}");
    assert_eq!(web["endpoints"][0]["source"], "static");

    dns.set_hosts(&[("late.lbd.test", "127.0.0.3")]);
    until_answered_by(&c, listen, &["b3"], Duration::from_secs(3)).await;
    let seen = spread(&c, listen, 10).await;
    assert_eq!(
        (seen.get("b2"), seen.get("b3")),
        (Some(&5), Some(&5)),
        "{seen:?}"
    );
}

/// A TLS backend (HTTP/1.1) with `leaf`'s certificate that answers with the SNI it was sent
/// (`x-sni`); stops when the runtime ends.
async fn tls_backend(leaf: &lb_tests::certs::Leaf) -> SocketAddr {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&leaf.cert)
        .expect("cert file")
        .collect::<Result<_, _>>()
        .expect("cert");
    let key = PrivateKeyDer::from_pem_file(&leaf.key).expect("key");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let sni = tls.get_ref().1.server_name().unwrap_or("none").to_owned();
                let svc = hyper::service::service_fn(move |_req| {
                    let sni = sni.clone();
                    async move {
                        http::Response::builder()
                            .header("x-backend", "tls")
                            .header("x-sni", sni)
                            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"ok")))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

/// Over TLS, an endpoint found by DNS is asked to prove the name it was resolved from (the
/// `dns` host, an SRV record's target), so a certificate issued for that name verifies; a
/// cluster's own `server_name`, or an entry's, still wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_endpoints_are_verified_against_their_dns_name() {
    let pki = lb_tests::certs::Pki::new("discovery CA");
    let leaf = pki.leaf(
        "backend",
        &lb_tests::certs::LeafOpts {
            names: vec![
                "web.lbd.test".into(),
                "node1.lbd.test".into(),
                "alias.lbd.test".into(),
            ],
            cn: "web.lbd.test".into(),
            serial: 1,
            ..Default::default()
        },
    );
    let backend = tls_backend(&leaf).await;
    let port = backend.port();
    let dir = temp_dir("sni");
    let dns = dns_or_skip!(
        &dir,
        &[
            ("web.lbd.test", "127.0.0.1"),
            ("node1.lbd.test", "127.0.0.1")
        ],
        &[format!(
            "_https._tcp.web.lbd.test,node1.lbd.test,{port},10,1"
        )]
    );
    let (listen, admin) = (free_addr(), free_addr());
    let ca = lb_tests::certs::toml_path(&pki.ca_file);
    let resolver = format!(
        "[clusters.discovery]\nresolver = \"{}\"\nttl_min = \"1s\"\nretry = \"300ms\"\n",
        dns.addr
    );
    let cluster = |name: &str, endpoint: &str, tls: &str| {
        let discovery = if endpoint.starts_with("address") {
            ""
        } else {
            resolver.as_str()
        };
        format!(
            "[[routes]]\nname = \"{name}\"\ncluster = \"{name}\"\n[routes.match]\nhosts = [\"{name}.example\"]\n\
             [[clusters]]\nname = \"{name}\"\n[[clusters.endpoints]]\n{endpoint}\n\
             [clusters.tls]\nca = {ca}\n{tls}\n{discovery}\n"
        )
    };
    let cfg = format!(
        "[admin]\nbind = \"{admin}\"\n[[listeners]]\nname = \"main\"\nbind = \"{listen}\"\n{}{}{}{}{}",
        cluster("a", &format!("dns = \"web.lbd.test:{port}\""), ""),
        cluster("srv", "srv = \"_https._tcp.web.lbd.test\"", ""),
        cluster(
            "named",
            &format!("dns = \"web.lbd.test:{port}\""),
            "server_name = \"alias.lbd.test\""
        ),
        cluster(
            "entry",
            &format!("dns = \"web.lbd.test:{port}\"\nserver_name = \"alias.lbd.test\""),
            ""
        ),
        // The address itself: the certificate has no IP SAN, so verification fails.
        cluster("ip", &format!("address = \"127.0.0.1:{port}\""), ""),
    );
    let lbd = Lbd::start(bin(), &cfg);
    let c = H1::new();
    for (host, sni) in [
        ("a.example", "web.lbd.test"),
        ("srv.example", "node1.lbd.test"),
        ("named.example", "alias.lbd.test"),
        ("entry.example", "alias.lbd.test"),
    ] {
        let r = c.get(listen, "/", Some(host)).await.expect("answer");
        assert_eq!(
            r.status,
            200,
            "{host}: {} {}\n{}",
            r.lbd_error(),
            r.text(),
            lbd.logs()
        );
        let got = r.headers.get("x-sni").and_then(|v| v.to_str().ok());
        assert_eq!(got, Some(sni), "{host}");
    }
    let r = c
        .get(listen, "/", Some("ip.example"))
        .await
        .expect("answer");
    assert_eq!(
        (r.status.as_u16(), r.lbd_error()),
        (502, "upstream_tls"),
        "{}",
        r.text()
    );
}

/// A plain HTTP/1.1 backend on `addr` naming itself in `x-backend`; counts the connections
/// it accepted.
async fn counting_backend(
    name: &'static str,
    addr: SocketAddr,
) -> Option<std::sync::Arc<std::sync::atomic::AtomicU64>> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let listener = tokio::net::TcpListener::bind(addr).await.ok()?;
    let conns = std::sync::Arc::new(AtomicU64::new(0));
    let counted = std::sync::Arc::clone(&conns);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    http::Response::builder()
                        .header("x-backend", name)
                        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"ok")))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Some(conns)
}

/// When the endpoint set changes (a new A record, then a reload that adds an endpoint), the
/// endpoint that stays keeps its idle keep-alive connection: its backend sees one
/// connection however often the cluster is rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_stays_keeps_its_pooled_connection() {
    use std::sync::atomic::Ordering;
    // Two counting backends on 127.0.0.2 and 127.0.0.3, one port; a third on 127.0.0.1.
    let mut found = None;
    for _ in 0..20 {
        let port = free_addr().port();
        let a = counting_backend("a", format!("127.0.0.2:{port}").parse().expect("addr")).await;
        let b = counting_backend("b", format!("127.0.0.3:{port}").parse().expect("addr")).await;
        if let (Some(a), Some(b)) = (a, b) {
            found = Some((port, a, b));
            break;
        }
    }
    let (port, conns_a, conns_b) = found.expect("a port free on 127.0.0.2 and .3");
    let c_addr = free_addr();
    let conns_c = counting_backend("c", c_addr).await.expect("bind c");
    let dir = temp_dir("keep");
    let dns = dns_or_skip!(&dir, &[("web.lbd.test", "127.0.0.2")], &[]);
    let (listen, admin) = (free_addr(), free_addr());
    let discovery = format!(
        "resolver = \"{}\"\nttl_min = \"1s\"\nretry = \"300ms\"\n",
        dns.addr
    );
    let endpoints = format!("[[clusters.endpoints]]\ndns = \"web.lbd.test:{port}\"\n");
    let mut lbd = Lbd::start(bin(), &config(listen, admin, &endpoints, &discovery));
    let c = H1::new();
    // One downstream connection, one request at a time: each finds the upstream connection
    // the last one left idle (a second downstream connection could be served by another
    // worker, which has its own idle connections).
    let one = H1Conn::connect(listen).await.expect("connect");
    let spread_one = async |n: usize| {
        let mut seen = HashMap::new();
        for _ in 0..n {
            let r = one.get("/", Some("app.example")).await.expect("GET /");
            assert_eq!(r.status, 200, "{} {}", r.lbd_error(), r.text());
            *seen.entry(r.backend().to_owned()).or_insert(0) += 1;
        }
        seen
    };
    assert_eq!(spread_one(5).await.get("a"), Some(&5));
    assert_eq!(conns_a.load(Ordering::Relaxed), 1);

    // The name gains an address: the cluster is rebuilt, a's connection carried over.
    dns.set_hosts(&[("web.lbd.test", "127.0.0.2"), ("web.lbd.test", "127.0.0.3")]);
    let web = cluster_until(&c, admin, "web", |w| {
        w["endpoints"].as_array().is_some_and(|e| e.len() == 2)
    })
    .await;
    assert_eq!(web["endpoints"].as_array().map(Vec::len), Some(2), "{web}");
    let seen = spread_one(10).await;
    assert_eq!(
        (seen.get("a"), seen.get("b")),
        (Some(&5), Some(&5)),
        "{seen:?}"
    );
    assert_eq!(
        conns_a.load(Ordering::Relaxed),
        1,
        "a's keep-alive connection was dropped by the re-resolution"
    );
    assert_eq!(conns_b.load(Ordering::Relaxed), 1);

    // A reload that adds a fixed endpoint rebuilds the cluster again: a and b keep theirs.
    let endpoints = format!("{endpoints}[[clusters.endpoints]]\naddress = \"{c_addr}\"\n");
    lbd.reload(&config(listen, admin, &endpoints, &discovery));
    let seen = spread_one(9).await;
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(conns_a.load(Ordering::Relaxed), 1);
    assert_eq!(conns_b.load(Ordering::Relaxed), 1);
    assert_eq!(conns_c.load(Ordering::Relaxed), 1);
}
