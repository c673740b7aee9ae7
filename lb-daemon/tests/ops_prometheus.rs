//! `configs/prometheus/lbd-rules.yml` and `configs/grafana/lbd-dashboard.json` against lbd:
//! `promtool check rules` and `promtool test rules` (Debian's `prometheus` package), the
//! metric names they use against lbd's own metric constants, and a real Prometheus (same
//! package) scraping a real lbd — with traffic, a failed request, a retry, an endpoint going
//! down, a TLS listener, a failed and a good reload and (as root) an XDP VIP — asked for every
//! series the rules and the dashboard name, and for the health of every rule.
mod common;

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lb_tests::certs::{LeafOpts, Pki, toml_path};
use lb_tests::client::H1;
use lb_tests::{Backend, Lbd, closed_addr, free_addr};
use lbd::l4::service as l4m;
use lbd::telemetry::metrics as m;

use common::netns::{Netns, in_netns, ip};

fn configs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

fn rules_path() -> PathBuf {
    configs().join("prometheus/lbd-rules.yml")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Every metric lbd exports (telemetry::metrics and the XDP counters).
fn lbd_metric_names() -> BTreeSet<&'static str> {
    [
        m::CONNECTIONS_ACTIVE,
        m::CONNECTIONS_ACCEPTED,
        m::CONNECTIONS_CLOSED,
        m::REQUESTS,
        m::REQUEST_DURATION,
        m::UPSTREAM_DURATION,
        m::BYTES_IN,
        m::BYTES_OUT,
        m::UPSTREAM_CONNECTS,
        m::UPSTREAM_REUSED,
        m::RETRIES,
        m::ENDPOINT_AVAILABLE,
        m::HEALTH_TRANSITIONS,
        m::GRPC_REQUESTS,
        m::GRPC_DURATION,
        m::MIRROR_SENT,
        m::MIRROR_SKIPPED,
        m::MIRROR_COMPARED,
        m::TLS_HANDSHAKES,
        m::TLS_HANDSHAKE_FAILURES,
        m::TLS_CERT_EXPIRY,
        m::UPSTREAM_TLS_HANDSHAKES,
        m::UPSTREAM_TLS_HANDSHAKE_FAILURES,
        m::RELOADS,
        m::CONFIG_INFO,
        m::RATE_LIMIT_EVICTIONS,
        l4m::L4_PACKETS,
        l4m::L4_VIP_PACKETS,
        l4m::L4_VIP_BYTES,
        l4m::L4_BACKEND_PACKETS,
        l4m::L4_BACKEND_BYTES,
    ]
    .into_iter()
    .collect()
}

/// Series names in PromQL-bearing text: raw `lbd_*` metrics and `level:metric:operation`
/// recorded series. Words of prose (annotations) never have that shape.
fn series_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| {
            (w.starts_with("lbd_") && !w.contains(':'))
                || (w.split(':').count() == 3
                    && w.split(':').nth(1).is_some_and(|m| m.starts_with("lbd_")))
        })
        .map(str::to_owned)
        .collect()
}

/// The PromQL of the rules file: every `expr:` (one line or a `|` block).
fn rule_exprs(rules: &str) -> String {
    let mut out = String::new();
    let mut block_indent: Option<usize> = None;
    for line in rules.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some(i) = block_indent {
            if line.trim().is_empty() || indent > i {
                out.push_str(line);
                out.push('\n');
                continue;
            }
            block_indent = None;
        }
        let t = line.trim_start();
        if let Some(e) = t.strip_prefix("expr:") {
            if e.trim() == "|" {
                block_indent = Some(indent);
            } else {
                out.push_str(e);
                out.push('\n');
            }
        } else if let Some(r) = t.strip_prefix("- record:") {
            out.push_str(r);
            out.push('\n');
        }
    }
    out
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read(&configs().join("grafana/lbd-dashboard.json")))
        .expect("lbd-dashboard.json is JSON")
}

/// Every PromQL string of the dashboard: panel targets and template variable queries.
fn dashboard_exprs(d: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().unwrap_or_default().to_owned());
        }
    }
    for v in d["templating"]["list"].as_array().expect("templating") {
        if let Some(q) = v["query"]["query"].as_str() {
            out.push(q.to_owned());
        }
    }
    out
}

/// Base metric of a series name (`_bucket`/`_sum`/`_count` of a histogram dropped).
fn base_metric(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

#[test]
fn rules_pass_promtool_check_and_unit_tests() {
    if !have("promtool") {
        println!("SKIP: promtool not installed (scripts/setup.sh installs Debian's prometheus)");
        return;
    }
    let dir = configs().join("prometheus");
    let check = Command::new("promtool")
        .args(["check", "rules", "lbd-rules.yml"])
        .current_dir(&dir)
        .output()
        .expect("run promtool");
    let text = String::from_utf8_lossy(&check.stdout).into_owned()
        + &String::from_utf8_lossy(&check.stderr);
    assert!(check.status.success(), "promtool check rules:\n{text}");
    assert!(text.contains("SUCCESS"), "{text}");
    let test = Command::new("promtool")
        .args(["test", "rules", "lbd-rules.test.yml"])
        .current_dir(&dir)
        .output()
        .expect("run promtool");
    let text =
        String::from_utf8_lossy(&test.stdout).into_owned() + &String::from_utf8_lossy(&test.stderr);
    assert!(test.status.success(), "promtool test rules:\n{text}");
    assert!(text.contains("SUCCESS"), "{text}");
}

#[test]
fn rules_and_dashboard_use_only_metrics_lbd_exports() {
    let known = lbd_metric_names();
    let rules = read(&rules_path());
    let exprs = rule_exprs(&rules);
    let d = dashboard();
    let dash = dashboard_exprs(&d).join("\n");
    let recorded: BTreeSet<String> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record:"))
        .map(|r| r.trim().to_owned())
        .collect();
    for (what, text) in [("rules", &exprs), ("dashboard", &dash)] {
        let names = series_names(text);
        assert!(names.len() >= 8, "{what} name lbd metrics: {names:?}");
        for n in &names {
            if n.contains(':') {
                assert!(
                    recorded.contains(n),
                    "{what} use {n}, which no rule records"
                );
            } else {
                assert!(
                    known.contains(base_metric(n)),
                    "{what} use {n}, which lbd does not export (known: {known:?})"
                );
            }
        }
    }
    // What the issue asks the alerts to cover.
    for alert in [
        "LbdRouteErrorRatioHigh",
        "LbdRouteLatencyP99High",
        "LbdEndpointDown",
        "LbdConfigReloadFailed",
        "LbdXdpDropping",
        "LbdTlsCertificateExpiresSoon",
    ] {
        assert!(
            rules.contains(&format!("- alert: {alert}\n")),
            "{alert} in rules"
        );
    }

    // The dashboard is importable: unique panel ids, one datasource variable used by every
    // query, panels on the 24-column grid without overlaps.
    let panels = d["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut cells: Vec<(u64, u64, u64, u64, String)> = Vec::new();
    for p in panels {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} used twice");
        let title = p["title"].as_str().expect("title").to_owned();
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().expect("x"),
            g["y"].as_u64().expect("y"),
            g["w"].as_u64().expect("w"),
            g["h"].as_u64().expect("h"),
        );
        assert!(x + w <= 24 && w > 0 && h > 0, "{title}: gridPos {g}");
        for (x2, y2, w2, h2, t2) in &cells {
            let overlap = x < x2 + w2 && *x2 < x + w && y < y2 + h2 && *y2 < y + h;
            assert!(!overlap, "panels {title} and {t2} overlap");
        }
        cells.push((x, y, w, h, title.clone()));
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has queries");
        for t in targets {
            assert!(
                t["expr"].as_str().is_some_and(|e| e.contains("lbd_")),
                "{title}: {t}"
            );
        }
    }
}

/// The series Prometheus must hold: everything the rules and the dashboard name.
fn required_series() -> BTreeSet<String> {
    let mut names = series_names(&rule_exprs(&read(&rules_path())));
    names.extend(series_names(&dashboard_exprs(&dashboard()).join("\n")));
    names
}

/// A child process (Prometheus) killed by its pid when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A scratch folder removed when dropped (also when an assertion fails).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `GET path` over plain HTTP/1.0; status and body, or the error.
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line: {out:?}"))?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Prometheus' JSON answer to `path`, `data` field.
fn prom_api(addr: SocketAddr, path: &str) -> serde_json::Value {
    let (status, body) = http_get(addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(status, 200, "GET {path}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("Prometheus answers JSON");
    assert_eq!(v["status"], "success", "{v}");
    v["data"].clone()
}

/// The lbd config of the scrape scenario; `vip` adds an XDP VIP on interface vL.
fn scenario_config(
    admin: SocketAddr,
    main: SocketAddr,
    tls: SocketAddr,
    leaf: (&Path, &Path),
    web: SocketAddr,
    dead: SocketAddr,
    vip: bool,
) -> String {
    let mut s = format!(
        r#"[global]
access_log = false

[admin]
bind = "{admin}"

[[listeners]]
name = "main"
bind = "{main}"

[[listeners]]
name = "tls"
bind = "{tls}"
[listeners.tls]
[[listeners.tls.certificates]]
cert = {cert}
key = {key}

[[routes]]
name = "broken"
cluster = "broken"
[routes.match]
path_prefix = "/broken"

[[routes]]
name = "flaky"
cluster = "flaky"
[routes.match]
path_prefix = "/flaky"

[[routes]]
name = "web"
cluster = "web"

[[clusters]]
name = "web"
[[clusters.endpoints]]
address = "{web}"
[[clusters.endpoints]]
address = "{dead}"
[clusters.passive]
max_fails = 0
# The refusing endpoint fails its first check at once; the live one would need a 900 ms
# stall to fail one, so a loaded machine does not take it out.
[clusters.health_check]
kind = "tcp"
interval = "1s"
timeout = "900ms"
healthy_threshold = 1
unhealthy_threshold = 1

# No health checks, so every other request meets the refusing endpoint and is retried.
[[clusters]]
name = "flaky"
[[clusters.endpoints]]
address = "{dead}"
[[clusters.endpoints]]
address = "{web}"
[clusters.passive]
max_fails = 0

[[clusters]]
name = "broken"
[[clusters.endpoints]]
address = "{dead}"
[clusters.retry]
attempts = 0
"#,
        cert = toml_path(leaf.0),
        key = toml_path(leaf.1),
    );
    if vip {
        s.push_str(
            r#"
[[clusters]]
name = "l4"
[[clusters.endpoints]]
address = "198.18.0.3:7777"

[[l4.vips]]
name = "svc"
interfaces = ["vL"]
address = "198.18.1.10:7777"
protocol = "udp"
cluster = "l4"
"#,
        );
    }
    s
}

/// Starts lbd and Prometheus (in the calling thread's network namespace), makes the traffic,
/// and checks Prometheus holds every series in `required`.
fn scrape_scenario(required: BTreeSet<String>, vip: bool) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let web = rt.block_on(Backend::start("web"));
    let dead = closed_addr();
    let (admin, main, tls) = (free_addr(), free_addr(), free_addr());
    let pki = Pki::new("ops-prom");
    let leaf = pki.leaf(
        "lb",
        &LeafOpts {
            names: vec!["lb.test".into()],
            ..LeafOpts::default()
        },
    );
    let config = scenario_config(
        admin,
        main,
        tls,
        (&leaf.cert, &leaf.key),
        web.addr,
        dead,
        vip,
    );
    let mut lbd = Lbd::start(Path::new(env!("CARGO_BIN_EXE_lbd")), &config);

    // Traffic: answered requests (some on reused connections), retries, 5xx from a cluster
    // whose only endpoint refuses connections, and a cleartext request to the TLS listener.
    let client = H1::new();
    rt.block_on(async {
        for _ in 0..20 {
            let r = client.get(main, "/", None).await.expect("GET /");
            assert_eq!(r.status, 200, "{}", r.text());
        }
        for _ in 0..4 {
            let r = client.get(main, "/flaky", None).await.expect("GET /flaky");
            assert_eq!(r.status, 200, "retried on the good endpoint: {}", r.text());
        }
        for _ in 0..3 {
            let r = client
                .get(main, "/broken", None)
                .await
                .expect("GET /broken");
            assert_eq!(r.status, 502, "{}", r.text());
        }
    });
    if let Ok(mut s) = TcpStream::connect(tls) {
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: lb.test\r\n\r\n");
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.read(&mut [0u8; 256]);
    }
    // A rejected reload, then a good one: both results of lbd_config_reloads_total.
    lbd.reload("[[listeners]]\nname = 1\n");
    lbd.reload(&config);

    let dir = std::env::temp_dir().join(format!("lbd-ops-prom-{}-{}", std::process::id(), vip));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("prometheus dir");
    let _scratch = Scratch(dir.clone());
    let prom_cfg = dir.join("prometheus.yml");
    std::fs::write(
        &prom_cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: lbd\n    static_configs:\n      - targets: ['{admin}']\n",
            rules_path().display()
        ),
    )
    .expect("write prometheus.yml");
    let prom_addr = free_addr();
    let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
    let _prom = Proc(
        Command::new("prometheus")
            .arg(format!("--config.file={}", prom_cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={prom_addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn prometheus"),
    );
    let prom_log = || std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();

    // Until every required series is in the TSDB (scrapes every 1 s, rules every 1 s; rates
    // need two scrapes), or 60 s.
    let deadline = Instant::now() + Duration::from_secs(60);
    let missing = loop {
        let names: BTreeSet<String> = match http_get(prom_addr, "/api/v1/label/__name__/values") {
            Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["data"].as_array().cloned())
                .unwrap_or_default()
                .iter()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect(),
            _ => BTreeSet::new(),
        };
        let missing: Vec<&String> = required.iter().filter(|n| !names.contains(*n)).collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing.into_iter().cloned().collect::<Vec<_>>();
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        missing.is_empty(),
        "Prometheus scraping lbd has no series {missing:?}\nprometheus log:\n{}\nlbd /metrics:\n{}",
        prom_log(),
        http_get(admin, "/metrics").map(|r| r.1).unwrap_or_default()
    );

    // The scrape carried the failed requests and the rejected reload, and the target is up.
    let q = |query: &str| -> f64 {
        let enc: String = query
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let data = prom_api(prom_addr, &format!("/api/v1/query?query={enc}"));
        data["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    assert_eq!(q(r#"up{job="lbd"}"#), 1.0);
    assert_eq!(
        q(r#"sum(lbd_requests_total{route="broken",status_class="5xx"})"#),
        3.0
    );
    assert_eq!(q(r#"sum(lbd_config_reloads_total{result="failure"})"#), 1.0);
    assert!(
        q(r#"sum(lbd_retries_total{cluster="flaky"})"#) >= 2.0,
        "retries are scraped"
    );
    assert_eq!(
        q(&format!(
            r#"lbd_endpoint_available{{cluster="web",endpoint="{dead}"}}"#
        )),
        0.0,
        "the endpoint that refuses connections is out"
    );
    assert_eq!(
        q(r#"sum(cluster:lbd_endpoint_available:sum{cluster="web"})"#),
        1.0
    );
    assert!(
        q(r#"lbd_tls_certificate_expiry_seconds{listener="tls"}"#) > 86400.0,
        "certificate expiry is scraped"
    );

    // Every rule evaluates without error against real lbd series.
    let groups = prom_api(prom_addr, "/api/v1/rules");
    let mut rules = 0;
    for g in groups["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            rules += 1;
            assert_eq!(r["health"], "ok", "rule {} is not healthy: {r}", r["name"]);
        }
    }
    assert!(rules >= 19, "Prometheus loaded the rules: {groups}");
    drop(web);
}

/// One namespace with a veth pair (XDP on vL) and a static neighbour for the VIP's backend,
/// so lbd plans and exports the VIP without sending a packet anywhere.
fn xdp_namespace() -> Result<Netns, String> {
    let ns = Netns::new(format!("lbdprom{}", std::process::id()), &["l"]);
    let n = ns.name("l");
    ip(&["netns", "add", &n])?;
    ip(&["-n", &n, "link", "set", "lo", "up"])?;
    ip(&[
        "-n", &n, "link", "add", "vL", "type", "veth", "peer", "name", "vP",
    ])?;
    ip(&["-n", &n, "addr", "add", "198.18.0.2/24", "dev", "vL"])?;
    ip(&["-n", &n, "link", "set", "vL", "up"])?;
    ip(&["-n", &n, "link", "set", "vP", "up"])?;
    ip(&[
        "-n",
        &n,
        "neigh",
        "add",
        "198.18.0.3",
        "lladdr",
        "02:00:00:00:00:03",
        "dev",
        "vL",
        "nud",
        "permanent",
    ])?;
    Ok(ns)
}

#[test]
fn prometheus_scrapes_every_series_the_rules_and_dashboard_use() {
    if !have("prometheus") {
        println!("SKIP: prometheus not installed (scripts/setup.sh installs Debian's prometheus)");
        return;
    }
    let required = required_series();
    let xdp = match lbd::l4::object() {
        Err(e) => Err(format!("XDP object not built: {e}")),
        Ok(_) => xdp_namespace().map_err(|e| {
            format!("cannot create a network namespace (need root and iproute2): {e}")
        }),
    };
    match xdp {
        Ok(ns) => {
            let name = ns.name("l");
            in_netns(&name, move || scrape_scenario(required, true))
                .join()
                .expect("scenario in the namespace");
            let link = ip(&["-n", &name, "link", "show", "vL"]).unwrap_or_default();
            drop(ns);
            assert!(
                !link.contains("xdp"),
                "lbd detached XDP when it exited: {link}"
            );
        }
        Err(reason) => {
            let (l4, l7): (BTreeSet<String>, BTreeSet<String>) =
                required.into_iter().partition(|n| n.contains("lbd_l4_"));
            println!("SKIP: XDP series {l4:?} not checked: {reason}");
            scrape_scenario(l7, false);
        }
    }
}
