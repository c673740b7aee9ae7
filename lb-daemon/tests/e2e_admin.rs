//! Admin API, metrics, drain and sd_notify end to end through the real `lbd` binary.
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use lb_tests::client::{H1, Reply};
use lb_tests::prom::{self, Exposition};
use lb_tests::{Backend, Lbd, closed_addr, free_addr};
use serde_json::Value;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
}

/// One admin request; `token` is sent as `Authorization: Bearer <token>`.
async fn admin(
    client: &H1,
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
) -> Reply {
    let mut b = Request::builder().method(method.clone()).uri(path);
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    let req = b.body(Full::new(Bytes::new())).expect("request");
    client
        .send(addr, req)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn json(r: &Reply) -> Value {
    let ct = r
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(ct.starts_with("application/json"), "content-type {ct:?}");
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.text()))
}

async fn get_json(client: &H1, addr: SocketAddr, path: &str) -> Value {
    let r = admin(client, addr, Method::GET, path, None).await;
    assert_eq!(r.status, 200, "GET {path}: {}", r.text());
    json(&r)
}

/// Scrapes and parses `/metrics` strictly (any malformed line fails the test).
async fn scrape(client: &H1, addr: SocketAddr, token: Option<&str>) -> Exposition {
    let r = admin(client, addr, Method::GET, "/metrics", token).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let ct = r
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(ct.starts_with("text/plain"), "content-type {ct:?}");
    prom::parse(&r.text()).unwrap_or_else(|e| panic!("bad exposition: {e}\n{}", r.text()))
}

/// Polls `/metrics` until `ok` holds (bounded); returns the last scrape either way.
async fn scrape_until(
    client: &H1,
    addr: SocketAddr,
    ok: impl Fn(&Exposition) -> bool,
) -> Exposition {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let e = scrape(client, addr, None).await;
        if ok(&e) || Instant::now() > deadline {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `GET /clusters` until `ok` holds for cluster `name` (bounded); returns it either way.
async fn cluster_until(
    client: &H1,
    addr: SocketAddr,
    name: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = get_json(client, addr, "/clusters").await;
        let c = all
            .as_array()
            .and_then(|a| a.iter().find(|c| c["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no cluster {name} in {all}"));
        if ok(&c) || Instant::now() > deadline {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn available(e: &Exposition, cluster: &str, endpoint: &str) -> Option<f64> {
    e.value(
        "lbd_endpoint_available",
        &[("cluster", cluster), ("endpoint", endpoint)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_the_requests_sent() {
    let web = Backend::start("web").await;
    let dead = closed_addr();
    let (listen, admin_addr) = (free_addr(), free_addr());
    let cfg = format!(
        r#"
[admin]
bind = "{admin_addr}"

[[listeners]]
name = "main"
bind = "{listen}"

[[routes]]
name = "a"
cluster = "web"
[routes.match]
path_prefix = "/a"

[[routes]]
name = "dead"
cluster = "dead"
[routes.match]
path_prefix = "/dead"

[[clusters]]
name = "web"
[[clusters.endpoints]]
address = "{web}"

[[clusters]]
name = "dead"
[[clusters.endpoints]]
address = "{dead}"
[clusters.health_check]
kind = "tcp"
interval = "100ms"
timeout = "50ms"
unhealthy_threshold = 1
"#,
        web = web.addr
    );
    let _lbd = Lbd::start(bin(), &cfg);
    let client = H1::new();
    let c = cluster_until(&client, admin_addr, "dead", |c| {
        c["endpoints"][0]["health"] == "unhealthy"
    })
    .await;
    assert_eq!(c["endpoints"][0]["health"], "unhealthy", "{c}");

    for i in 0..37 {
        let r = client
            .get(listen, &format!("/a/private-path-{i}?q=secret"), None)
            .await
            .expect("route a");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.backend(), "web");
    }
    for i in 0..5 {
        let r = client
            .get(listen, &format!("/nowhere-{i}"), None)
            .await
            .expect("unrouted");
        assert_eq!(r.status, 404);
        assert_eq!(r.lbd_error(), "no_route");
    }
    for _ in 0..3 {
        let r = client.get(listen, "/dead/x", None).await.expect("dead");
        assert_eq!(r.status, 503);
        assert_eq!(r.lbd_error(), "no_healthy_endpoint");
    }

    // Request metrics are written when the response body ends, which can trail the client's
    // last read by a moment: wait for the total, then demand exact numbers.
    let e = scrape_until(&client, admin_addr, |e| {
        e.sum("lbd_requests_total", &[]) >= 45.0
    })
    .await;
    let req = |route: &str, cluster: &str, class: &str| {
        e.value(
            "lbd_requests_total",
            &[
                ("listener", "main"),
                ("route", route),
                ("cluster", cluster),
                ("status_class", class),
            ],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(req("a", "web", "2xx"), 37.0);
    assert_eq!(req("-", "-", "4xx"), 5.0);
    assert_eq!(req("dead", "dead", "5xx"), 3.0);
    assert_eq!(e.sum("lbd_requests_total", &[]), 45.0, "no other requests");
    let count = |route: &str| {
        e.value(
            "lbd_request_duration_seconds_count",
            &[("listener", "main"), ("route", route)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(count("a"), 37.0);
    assert_eq!(count("-"), 5.0);
    assert_eq!(count("dead"), 3.0);
    let inf = e
        .value(
            "lbd_request_duration_seconds_bucket",
            &[("listener", "main"), ("route", "a"), ("le", "+Inf")],
        )
        .expect("+Inf bucket");
    assert_eq!(inf, 37.0);
    assert!(
        e.sum(
            "lbd_downstream_connections_accepted_total",
            &[("listener", "main")]
        ) > 0.0
    );

    for (family, kind) in [
        ("lbd_requests_total", "counter"),
        ("lbd_request_duration_seconds", "histogram"),
        ("lbd_downstream_connections_accepted_total", "counter"),
        ("lbd_endpoint_available", "gauge"),
        ("lbd_config_info", "gauge"),
    ] {
        assert_eq!(
            e.types.get(family).map(String::as_str),
            Some(kind),
            "{family}"
        );
        assert!(e.helps.contains_key(family), "{family} has no HELP");
    }

    let status = get_json(&client, admin_addr, "/status").await;
    let hash = status["config_hash"].as_str().expect("config_hash");
    assert!(!hash.is_empty());
    assert_eq!(e.value("lbd_config_info", &[("hash", hash)]), Some(1.0));

    let (web_ep, dead_ep) = (web.addr.to_string(), dead.to_string());
    assert_eq!(available(&e, "web", &web_ep), Some(1.0));
    assert_eq!(available(&e, "dead", &dead_ep), Some(0.0));

    // Labels are bounded by the config: no client address, no request path or query.
    for s in &e.samples {
        for (k, v) in &s.labels {
            assert!(
                !["client", "ip", "path", "uri", "peer", "remote", "query"].contains(&k.as_str()),
                "unbounded label {k} in {s:?}"
            );
            assert!(
                !v.contains("private-path")
                    && !v.contains("nowhere")
                    && !v.contains("secret")
                    && !v.contains("/dead/x"),
                "request path in label {k}={v:?}"
            );
            if v.contains("127.0.0.1") {
                assert!(
                    *v == web_ep || *v == dead_ep,
                    "address label {k}={v:?} is not a configured endpoint"
                );
            }
        }
    }
}
