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

    // Upstream connections: each request either opened a connection or reused a pooled one.
    let opened = e
        .value(
            "lbd_upstream_connections_opened_total",
            &[("cluster", "web"), ("endpoint", &web_ep)],
        )
        .expect("connections opened to web");
    let reused = e
        .value("lbd_upstream_requests_reused_total", &[("cluster", "web")])
        .expect("reused requests on web");
    assert!(opened >= 1.0, "opened {opened}");
    assert!((1.0..=36.0).contains(&reused), "keep-alive reuse: {reused}");
    assert!(opened + reused >= 37.0, "opened {opened} + reused {reused}");
    assert_eq!(
        e.sum(
            "lbd_upstream_connections_opened_total",
            &[("cluster", "dead")]
        ),
        0.0,
        "nothing connects to a cluster with no healthy endpoint"
    );

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

/// Two-endpoint cluster `web` (weights 1 and 3) behind listener `main`, admin without token.
fn two_endpoint_config(
    listen: SocketAddr,
    admin_addr: SocketAddr,
    a: &Backend,
    b: &Backend,
    admin_extra: &str,
    cluster_extra: &str,
) -> String {
    format!(
        r#"
[global]
drain_timeout = "5s"

[admin]
bind = "{admin_addr}"
{admin_extra}

[[listeners]]
name = "main"
bind = "{listen}"

[[routes]]
name = "all"
cluster = "web"

[[clusters]]
name = "web"
{cluster_extra}
[[clusters.endpoints]]
address = "{a}"
weight = 1

[[clusters.endpoints]]
address = "{b}"
weight = 3
"#,
        a = a.addr,
        b = b.addr
    )
}

fn endpoint(cluster: &Value, addr: SocketAddr) -> &Value {
    cluster["endpoints"]
        .as_array()
        .and_then(|eps| eps.iter().find(|e| e["address"] == addr.to_string()))
        .unwrap_or_else(|| panic!("no endpoint {addr} in {cluster}"))
}

async fn post(client: &H1, addr: SocketAddr, path: &str) -> Reply {
    admin(client, addr, Method::POST, path, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_answers_every_endpoint() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let (listen, admin_addr) = (free_addr(), free_addr());
    let health = "[clusters.health_check]\nkind = \"http\"\npath = \"/\"\ninterval = \"100ms\"\ntimeout = \"80ms\"\n";
    let cfg = two_endpoint_config(listen, admin_addr, &a, &b, "", health);
    let mut lbd = Lbd::start(bin(), &cfg);
    let client = H1::new();

    // GET /status
    let status = get_json(&client, admin_addr, "/status").await;
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert!(status["uptime_seconds"].is_u64(), "{status}");
    let hash0 = status["config_hash"].as_str().expect("hash").to_owned();
    assert!(!hash0.is_empty());
    assert_eq!(status["config_path"], lbd.config.display().to_string());
    assert_eq!(status["listeners"][0]["name"], "main");
    assert_eq!(status["listeners"][0]["bind"], listen.to_string());
    assert_eq!(status["listeners"][0]["protocol"], "http");
    assert_eq!(status["listeners"].as_array().map(Vec::len), Some(1));

    // GET /clusters, after some traffic and at least one active check per endpoint.
    for _ in 0..8 {
        let r = client.get(listen, "/", None).await.expect("proxy");
        assert_eq!(r.status, 200);
    }
    let web = cluster_until(&client, admin_addr, "web", |c| {
        c["endpoints"]
            .as_array()
            .is_some_and(|e| e.iter().all(|e| e["last_check"]["ok"] == true))
    })
    .await;
    assert_eq!(web["policy"], "round_robin");
    let (ea, eb) = (endpoint(&web, a.addr), endpoint(&web, b.addr));
    assert_eq!(ea["weight"], 1);
    assert_eq!(eb["weight"], 3);
    for e in [ea, eb] {
        assert_eq!(e["health"], "healthy", "{e}");
        assert_eq!(e["available"], true);
        assert_eq!(e["in_flight"], 0);
        assert_eq!(e["last_check"]["ok"], true, "{e}");
        assert!(e["last_check"]["detail"].is_string(), "{e}");
    }
    let total =
        ea["requests_total"].as_u64().expect("u64") + eb["requests_total"].as_u64().expect("u64");
    assert_eq!(total, 8, "{web}");

    // Drain / enable, by address (plain and percent-encoded) and by index.
    let r = post(
        &client,
        admin_addr,
        &format!("/clusters/web/endpoints/{}/drain", a.addr),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = json(&r);
    assert_eq!(v["address"], a.addr.to_string());
    assert_eq!(v["health"], "drained");
    assert_eq!(v["available"], false);
    let web = get_json(&client, admin_addr, "/clusters").await;
    assert_eq!(endpoint(&web[0], a.addr)["health"], "drained");
    for _ in 0..10 {
        let r = client.get(listen, "/", None).await.expect("proxy");
        assert_eq!(r.backend(), "b", "drained endpoint a got a request");
    }
    let r = post(&client, admin_addr, "/clusters/web/endpoints/0/enable").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(json(&r)["health"], "healthy");
    let r = post(&client, admin_addr, "/clusters/web/endpoints/1/drain").await;
    assert_eq!(r.status, 200);
    assert_eq!(json(&r)["address"], b.addr.to_string());
    let encoded = b.addr.to_string().replace(':', "%3A");
    let r = post(
        &client,
        admin_addr,
        &format!("/clusters/web/endpoints/{encoded}/enable"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = json(&r);
    assert_eq!(v["address"], b.addr.to_string());
    assert_eq!(v["health"], "healthy");
    for path in [
        "/clusters/nope/endpoints/0/drain".to_owned(),
        "/clusters/web/endpoints/2/drain".to_owned(),
        "/clusters/web/endpoints/10.9.9.9:1/enable".to_owned(),
        format!("/clusters/nope/endpoints/{}/enable", a.addr),
    ] {
        let r = post(&client, admin_addr, &path).await;
        assert_eq!(r.status, 404, "{path}: {}", r.text());
        assert!(json(&r)["error"].is_string(), "{path}: {}", r.text());
    }

    // GET /config: the effective config, defaults filled in.
    let c = get_json(&client, admin_addr, "/config").await;
    assert_eq!(c["source"]["hash"], hash0.as_str());
    assert_eq!(c["global"]["admin"]["bind"], admin_addr.to_string());
    assert_eq!(c["global"]["admin"]["token"], Value::Null);
    assert_eq!(c["global"]["drain_timeout_ms"], 5000);
    assert_eq!(c["listeners"][0]["name"], "main");
    assert_eq!(c["routes"][0]["cluster"], "web");
    assert_eq!(c["clusters"][0]["policy"], "round_robin");
    assert_eq!(c["clusters"][0]["endpoints"][1]["weight"], 3);
    assert_eq!(c["clusters"][0]["passive"]["max_fails"], 1);

    // GET /: the status page.
    let r = admin(&client, admin_addr, Method::GET, "/", None).await;
    assert_eq!(r.status, 200);
    let ct = r
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(ct.starts_with("text/html"), "{ct}");
    assert!(r.text().to_lowercase().contains("<html"), "{}", r.text());

    // Unknown paths and wrong methods.
    for path in [
        "/nope",
        "/clusters/web",
        "/clusters/web/endpoints/0/explode",
        "/status/x",
    ] {
        let r = admin(&client, admin_addr, Method::GET, path, None).await;
        assert_eq!(r.status, 404, "{path}");
        assert!(json(&r)["error"].is_string());
    }
    for (method, path, allow) in [
        (Method::DELETE, "/status", "GET"),
        (Method::POST, "/clusters", "GET"),
        (Method::PUT, "/config", "GET"),
        (Method::POST, "/metrics", "GET"),
        (Method::POST, "/", "GET"),
        (Method::GET, "/reload", "POST"),
        (Method::GET, "/clusters/web/endpoints/0/drain", "POST"),
        (Method::DELETE, "/clusters/web/endpoints/0/enable", "POST"),
    ] {
        let r = admin(&client, admin_addr, method.clone(), path, None).await;
        assert_eq!(r.status, 405, "{method} {path}");
        assert_eq!(
            r.headers.get("allow").and_then(|v| v.to_str().ok()),
            Some(allow),
            "{method} {path}"
        );
    }

    // POST /reload after a valid change: new hash, new behaviour.
    let changed = two_endpoint_config(
        listen,
        admin_addr,
        &a,
        &b,
        "",
        "policy = \"least_request\"\n",
    );
    std::fs::write(&lbd.config, &changed).expect("write config");
    let r = post(&client, admin_addr, "/reload").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = json(&r);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["errors"].as_array().map(Vec::len), Some(0));
    let hash1 = v["config_hash"].as_str().expect("hash").to_owned();
    assert_ne!(hash1, hash0);
    let status = get_json(&client, admin_addr, "/status").await;
    assert_eq!(status["config_hash"], hash1.as_str());
    assert_eq!(status["reloads_ok"], 1);
    let web = get_json(&client, admin_addr, "/clusters").await;
    assert_eq!(web[0]["policy"], "least_request");

    // POST /reload of an invalid file: 422 with file:line errors; the old config keeps serving.
    let broken = changed.replace("cluster = \"web\"", "cluster = \"missing\"");
    let line = broken
        .lines()
        .position(|l| l.contains("\"missing\""))
        .expect("line")
        + 1;
    std::fs::write(&lbd.config, &broken).expect("write config");
    let r = post(&client, admin_addr, "/reload").await;
    assert_eq!(r.status, 422, "{}", r.text());
    let v = json(&r);
    assert_eq!(v["ok"], false);
    assert_eq!(v["config_hash"], hash1.as_str());
    let errors: Vec<&str> = v["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let want = format!("{}:{line}:", lbd.config.display());
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with(&want) && e.contains("missing")),
        "want an error starting with {want}: {errors:?}"
    );
    let r = client.get(listen, "/", None).await.expect("still serving");
    assert_eq!(r.status, 200);
    let status = get_json(&client, admin_addr, "/status").await;
    assert_eq!(status["config_hash"], hash1.as_str());
    assert_eq!(status["reloads_failed"], 1);
    assert_eq!(
        lbd.terminate(Duration::from_secs(10)).map(|s| s.success()),
        Some(true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_guards_every_admin_endpoint() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let (listen, admin_addr) = (free_addr(), free_addr());
    let cfg = two_endpoint_config(listen, admin_addr, &a, &b, "token = \"s3cret\"", "");
    let _lbd = Lbd::start(bin(), &cfg);
    let client = H1::new();
    // The status page itself holds no data and must load to show its login form.
    for bad in [None, Some("wrong")] {
        let r = admin(&client, admin_addr, Method::GET, "/", bad).await;
        assert_eq!(r.status, 200, "GET / with {bad:?}");
        assert!(
            !r.text().contains(&listen.to_string()),
            "the page carries no state"
        );
    }
    let calls = [
        (Method::GET, "/status", 200),
        (Method::GET, "/stats", 200),
        (Method::GET, "/session", 200),
        (Method::POST, "/logout", 200),
        (Method::GET, "/clusters", 200),
        (Method::GET, "/config", 200),
        (Method::GET, "/metrics", 200),
        (Method::POST, "/reload", 200),
        (Method::POST, "/clusters/web/endpoints/0/drain", 200),
        (Method::POST, "/clusters/web/endpoints/0/enable", 200),
        (Method::POST, "/clusters/nope/endpoints/0/enable", 404),
        (Method::GET, "/nope", 404),
        (Method::DELETE, "/status", 405),
    ];
    for (method, path, with_token) in calls {
        for bad in [None, Some("wrong"), Some("s3cret2"), Some("")] {
            let r = admin(&client, admin_addr, method.clone(), path, bad).await;
            assert_eq!(r.status, 401, "{method} {path} with {bad:?}: {}", r.text());
            assert!(
                r.headers.contains_key("www-authenticate"),
                "{method} {path}"
            );
            assert!(json(&r)["error"].is_string());
        }
        // Another scheme with the right secret is no bearer token either.
        let req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header("authorization", "Basic s3cret")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let r = client.send(admin_addr, req).await.expect("admin");
        assert_eq!(r.status, 401, "{method} {path} with Basic");
        let r = admin(&client, admin_addr, method.clone(), path, Some("s3cret")).await;
        assert_eq!(r.status, with_token, "{method} {path}: {}", r.text());
    }
    let r = admin(&client, admin_addr, Method::GET, "/config", Some("s3cret")).await;
    assert!(!r.text().contains("s3cret"), "token leaked: {}", r.text());
    assert_eq!(json(&r)["global"]["admin"]["token"], "<redacted>");
    // The proxy listener itself needs no token.
    let r = client.get(listen, "/", None).await.expect("proxy");
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_loopback_admin_without_token_is_refused_unless_allowed() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let listen = free_addr();
    let port = free_addr().port();
    let open: SocketAddr = format!("0.0.0.0:{port}").parse().expect("addr");
    let cfg = two_endpoint_config(listen, open, &a, &b, "", "");

    let mut lbd = Lbd::spawn(bin(), &cfg);
    let status = lbd
        .wait_exit(Duration::from_secs(20))
        .expect("lbd must exit on its own");
    assert!(!status.success(), "{status}");
    let logs = lbd.logs();
    let line = cfg
        .lines()
        .position(|l| l.contains("0.0.0.0"))
        .expect("line")
        + 1;
    let want = format!("{}:{line}:", lbd.config.display());
    assert!(
        logs.contains(&want)
            && logs.contains("admin.bind")
            && logs.contains("admin.token")
            && logs.contains("allow_insecure_non_loopback"),
        "want a clear message at {want}: {logs}"
    );
    assert!(lbd.notifications().is_empty(), "{:?}", lbd.notifications());
    // `lbd check` refuses the same file.
    let out = std::process::Command::new(bin())
        .args(["check", "--config"])
        .arg(&lbd.config)
        .output()
        .expect("lbd check");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("admin.bind")
            || String::from_utf8_lossy(&out.stderr).contains("admin.bind")
    );

    // With explicit consent it starts, warns, and answers (here over loopback).
    let allowed = two_endpoint_config(
        listen,
        open,
        &a,
        &b,
        "allow_insecure_non_loopback = true",
        "",
    );
    let lbd = Lbd::start(bin(), &allowed);
    let client = H1::new();
    let loopback: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let r = admin(&client, loopback, Method::GET, "/status", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(lbd.logs().contains("without a token"), "{}", lbd.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_stops_new_requests_and_lets_in_flight_finish() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let (listen, admin_addr) = (free_addr(), free_addr());
    let cfg = two_endpoint_config(listen, admin_addr, &a, &b, "", "");
    let lbd = Lbd::start(bin(), &cfg);
    let client = H1::new();

    // A long request, then find which endpoint holds it.
    let long_client = H1::new();
    let long = tokio::spawn(async move { long_client.get(listen, "/sleep/1500", None).await });
    let web = cluster_until(&client, admin_addr, "web", |c| {
        c["endpoints"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["in_flight"] == 1))
    })
    .await;
    let busy = web["endpoints"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["in_flight"] == 1))
        .unwrap_or_else(|| panic!("no request in flight: {web}"));
    let busy_addr = busy["address"].as_str().expect("address").to_owned();
    let (drained, other) = if busy_addr == a.addr.to_string() {
        (&a, &b)
    } else {
        (&b, &a)
    };

    let r = post(
        &client,
        admin_addr,
        &format!("/clusters/web/endpoints/{busy_addr}/drain"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = json(&r);
    assert_eq!(v["health"], "drained");
    assert_eq!(v["in_flight"], 1, "the long request is still running: {v}");

    // lbd counts the request in flight before the backend has read it; wait for the backend.
    let deadline = Instant::now() + Duration::from_secs(10);
    while drained.hits() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let hits_before = drained.hits();
    assert_eq!(hits_before, 1, "only the long request reached it");
    for _ in 0..50 {
        let r = client.get(listen, "/", None).await.expect("proxy");
        assert_eq!(r.status, 200);
        assert_eq!(
            r.backend(),
            other.name,
            "a drained endpoint got a new request"
        );
    }
    assert_eq!(
        drained.hits(),
        hits_before,
        "drained backend saw new requests"
    );

    let e = scrape_until(&client, admin_addr, |e| {
        available(e, "web", &busy_addr) == Some(0.0)
    })
    .await;
    assert_eq!(
        available(&e, "web", &busy_addr),
        Some(0.0),
        "gauge after drain"
    );
    assert_eq!(available(&e, "web", &other.addr.to_string()), Some(1.0));

    // The request that started before the drain completes normally on the drained endpoint.
    let r = tokio::time::timeout(Duration::from_secs(20), long)
        .await
        .expect("long request finished")
        .expect("task")
        .expect("long request");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.backend(), drained.name);
    let web = cluster_until(&client, admin_addr, "web", |c| {
        c["endpoints"]
            .as_array()
            .is_some_and(|e| e.iter().all(|e| e["in_flight"] == 0))
    })
    .await;
    assert_eq!(endpoint(&web, drained.addr)["in_flight"], 0, "{web}");
    assert_eq!(endpoint(&web, drained.addr)["health"], "drained");

    // Enable brings it back.
    let r = post(
        &client,
        admin_addr,
        &format!("/clusters/web/endpoints/{busy_addr}/enable"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(json(&r)["health"], "healthy");
    for _ in 0..40 {
        let r = client.get(listen, "/", None).await.expect("proxy");
        assert_eq!(r.status, 200);
    }
    assert!(
        drained.hits() >= hits_before + 5,
        "re-enabled endpoint got {} of 40 requests",
        drained.hits() - hits_before
    );
    let e = scrape_until(&client, admin_addr, |e| {
        available(e, "web", &busy_addr) == Some(1.0)
    })
    .await;
    assert_eq!(
        available(&e, "web", &busy_addr),
        Some(1.0),
        "gauge after enable"
    );
    let transitions = |to: &str| {
        e.value(
            "lbd_endpoint_health_transitions_total",
            &[("cluster", "web"), ("endpoint", &busy_addr), ("to", to)],
        )
    };
    assert_eq!(transitions("down"), Some(1.0));
    assert_eq!(transitions("up"), Some(1.0));

    // An endpoint removed by a reload reads 0, not its last value; the config hash moves.
    let hash0 = get_json(&client, admin_addr, "/status").await["config_hash"]
        .as_str()
        .expect("hash")
        .to_owned();
    let weight = if drained.name == "a" { 1 } else { 3 };
    let only_other = cfg.replace(
        &format!(
            "[[clusters.endpoints]]\naddress = \"{}\"\nweight = {weight}\n",
            drained.addr
        ),
        "",
    );
    assert_ne!(only_other, cfg);
    std::fs::write(&lbd.config, &only_other).expect("write config");
    let r = post(&client, admin_addr, "/reload").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let hash1 = json(&r)["config_hash"].as_str().expect("hash").to_owned();
    let e = scrape(&client, admin_addr, None).await;
    assert_eq!(
        available(&e, "web", &busy_addr),
        Some(0.0),
        "removed endpoint"
    );
    assert_eq!(available(&e, "web", &other.addr.to_string()), Some(1.0));
    assert_eq!(e.value("lbd_config_info", &[("hash", &hash0)]), Some(0.0));
    assert_eq!(e.value("lbd_config_info", &[("hash", &hash1)]), Some(1.0));
    assert_eq!(
        e.value("lbd_config_reloads_total", &[("result", "success")]),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn availability_gauge_follows_passive_ejection_and_its_expiry() {
    let live = Backend::start("live").await;
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
name = "all"
cluster = "web"

[[clusters]]
name = "web"
[clusters.passive]
max_fails = 1
fail_timeout = "3s"
[[clusters.endpoints]]
address = "{live}"
[[clusters.endpoints]]
address = "{dead}"
"#,
        live = live.addr
    );
    let _lbd = Lbd::start(bin(), &cfg);
    let client = H1::new();
    let dead_ep = dead.to_string();
    let e = scrape(&client, admin_addr, None).await;
    assert_eq!(
        available(&e, "web", &dead_ep),
        Some(1.0),
        "starts available"
    );

    // Round robin reaches the dead endpoint within two requests; the connect failure ejects it
    // and the request is retried on the live one.
    for _ in 0..2 {
        let r = client.get(listen, "/", None).await.expect("proxy");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let web = get_json(&client, admin_addr, "/clusters").await;
    assert_eq!(endpoint(&web[0], dead)["health"], "ejected", "{web}");
    let e = scrape_until(&client, admin_addr, |e| {
        available(e, "web", &dead_ep) == Some(0.0)
    })
    .await;
    assert_eq!(
        available(&e, "web", &dead_ep),
        Some(0.0),
        "gauge after ejection"
    );

    // Nothing but the deadline ends the ejection; the gauge must follow.
    let e = scrape_until(&client, admin_addr, |e| {
        available(e, "web", &dead_ep) == Some(1.0)
    })
    .await;
    assert_eq!(
        available(&e, "web", &dead_ep),
        Some(1.0),
        "gauge after expiry"
    );
    assert_eq!(
        e.value(
            "lbd_endpoint_health_transitions_total",
            &[("cluster", "web"), ("endpoint", &dead_ep), ("to", "down")]
        ),
        Some(1.0)
    );
}

/// One HTTP/1.1 request on a fresh connection, no retries: fails if nothing listens yet.
async fn raw_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr} right after READY=1: {e}"));
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("response in time")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_ready_reloading_stopping() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let (listen, admin_addr) = (free_addr(), free_addr());
    let cfg = two_endpoint_config(listen, admin_addr, &a, &b, "", "");
    let mut lbd = Lbd::spawn(bin(), &cfg);
    lbd.wait_notify("READY=1", Duration::from_secs(20));
    // Readiness means serving: the first connection after READY=1 must work, no retry.
    let resp = raw_get(listen, "/").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let resp = raw_get(admin_addr, "/status").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert_eq!(lbd.notifications(), ["READY=1"]);

    // SIGHUP: RELOADING=1, then READY=1 once the new config is active.
    let client = H1::new();
    let hash0 = get_json(&client, admin_addr, "/status").await["config_hash"].clone();
    let changed = two_endpoint_config(listen, admin_addr, &a, &b, "", "policy = \"random\"\n");
    lbd.reload(&changed);
    assert_eq!(lbd.notifications(), ["READY=1", "RELOADING=1", "READY=1"]);
    let status = get_json(&client, admin_addr, "/status").await;
    assert_ne!(status["config_hash"], hash0);
    assert_eq!(status["reloads_ok"], 1);

    // A rejected SIGHUP reload still ends in READY=1 (the old config is serving).
    lbd.reload("this is not toml");
    assert_eq!(lbd.notifications()[3..], ["RELOADING=1", "READY=1"]);
    assert_eq!(
        get_json(&client, admin_addr, "/status").await["reloads_failed"],
        1
    );
    let resp = raw_get(listen, "/").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");

    // POST /reload reports the same way.
    std::fs::write(&lbd.config, &cfg).expect("write config");
    let r = post(&client, admin_addr, "/reload").await;
    assert_eq!(r.status, 200, "{}", r.text());
    lbd.wait_notify("READY=1", Duration::from_secs(20));
    assert_eq!(lbd.notifications()[5..], ["RELOADING=1", "READY=1"]);

    // SIGTERM: STOPPING=1, then a clean exit.
    let status = lbd.terminate(Duration::from_secs(20)).expect("exited");
    assert!(status.success(), "{status}");
    lbd.wait_notify("STOPPING=1", Duration::from_secs(5));
    assert_eq!(lbd.notifications()[7..], ["STOPPING=1"]);
}
