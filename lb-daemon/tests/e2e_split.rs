//! Weighted splits across clusters and sticky sessions, through the real binary and real
//! backends (each answers `x-backend: <name>`): the 90/10 share over 10,000 requests and what
//! the metrics say about it, one client kept on one side by cookie, header or address, and
//! endpoint cookies that hold until their endpoint goes away.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use lb_tests::client::{H1, H2, Reply};
use lb_tests::{Backend, Lbd, free_addr, prom};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
}

async fn get(c: &H1, addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut b = Request::get(path).header("host", "shop.example.com");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    c.send(addr, b.body(Full::new(Bytes::new())).expect("request"))
        .await
        .expect("reply")
}

fn set_cookie(r: &Reply) -> Option<String> {
    let all: Vec<&str> = r
        .headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert!(all.len() <= 1, "one Set-Cookie at most: {all:?}");
    all.first().map(|s| (*s).to_owned())
}

/// `name=value` of a `Set-Cookie` value.
fn pair(set_cookie: &str) -> String {
    set_cookie
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn split_config(listen: SocketAddr, admin: SocketAddr, v1: &Backend, v2: &Backend) -> String {
    format!(
        r#"
[admin]
bind = "{admin}"

[[listeners]]
name = "main"
bind = "{listen}"

[[routes]]
name = "canary"
split = [{{ cluster = "v1", weight = 90 }}, {{ cluster = "v2", weight = 10 }}]
[routes.match]
path_prefix = "/canary"

[[routes]]
name = "by-cookie"
split = [{{ cluster = "v1", weight = 50 }}, {{ cluster = "v2", weight = 50 }}]
split_sticky = "cookie"
[routes.match]
path_prefix = "/cookie"

[[routes]]
name = "by-user"
split = [{{ cluster = "v1", weight = 50 }}, {{ cluster = "v2", weight = 50 }}]
split_sticky = "header:x-user"
[routes.match]
path_prefix = "/user"

[[routes]]
name = "by-ip"
split = [{{ cluster = "v1", weight = 1 }}, {{ cluster = "v2", weight = 1 }}]
split_sticky = "client_ip"
[routes.match]
path_prefix = "/ip"

[[clusters]]
name = "v1"
[[clusters.endpoints]]
address = "{}"

[[clusters]]
name = "v2"
[[clusters.endpoints]]
address = "{}"
"#,
        v1.addr, v2.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_90_10_holds_within_one_point_over_10000_requests() {
    let (v1, v2) = (Backend::start("v1").await, Backend::start("v2").await);
    let (listen, admin) = (free_addr(), free_addr());
    let _lbd = Lbd::start(bin(), &split_config(listen, admin, &v1, &v2));
    let c = H1::new();

    const TASKS: usize = 8;
    const PER_TASK: usize = 1250;
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut n: HashMap<String, u32> = HashMap::new();
            for _ in 0..PER_TASK {
                let r = get(&c, listen, "/canary/x", &[]).await;
                assert_eq!(r.status, 200, "{r:?}");
                assert!(set_cookie(&r).is_none(), "no stickiness asked: {r:?}");
                *n.entry(r.backend().to_owned()).or_default() += 1;
            }
            n
        }));
    }
    let mut n: HashMap<String, u32> = HashMap::new();
    for t in tasks {
        let part = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("requests finish")
            .expect("task");
        for (k, v) in part {
            *n.entry(k).or_default() += v;
        }
    }
    let (a, b) = (n.get("v1").copied(), n.get("v2").copied());
    assert_eq!(a.unwrap_or(0) + b.unwrap_or(0), 10_000, "{n:?}");
    // ±1 percentage point of 10,000 = ±100 requests.
    assert!(a.unwrap_or(0).abs_diff(9_000) <= 100, "{n:?}");
    assert!(b.unwrap_or(0).abs_diff(1_000) <= 100, "{n:?}");
    eprintln!("10,000 requests in {:?}: {n:?}", started.elapsed());

    // The metrics name the side each request went to (the count is exact).
    let r = c.get(admin, "/metrics", None).await.expect("metrics");
    let m = prom::parse(&r.text()).expect("exposition");
    for (cluster, want) in [("v1", a), ("v2", b)] {
        let got = m.sum(
            "lbd_requests_total",
            &[("route", "canary"), ("cluster", cluster)],
        );
        assert_eq!(got, f64::from(want.unwrap_or(0)), "{cluster}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_split_keeps_one_client_on_one_side() {
    let (v1, v2) = (Backend::start("v1").await, Backend::start("v2").await);
    let (listen, admin) = (free_addr(), free_addr());
    let lbd = Lbd::start_logging(
        bin(),
        &split_config(listen, admin, &v1, &v2),
        "info,lbd::access=info",
    );
    let c = H1::new();

    // Cookie: the first answer names the side; with the cookie, 200 requests stay there and
    // are not told again.
    let first = get(&c, listen, "/cookie", &[]).await;
    let set = set_cookie(&first).expect("split cookie set");
    assert!(set.starts_with("lbd_split_by-cookie="), "{set}");
    assert!(set.contains("Path=/"), "{set}");
    assert!(set.contains("HttpOnly"), "{set}");
    assert!(set.contains("SameSite=Lax"), "{set}");
    let value = pair(&set);
    assert!(
        !value.contains("v1") && !value.contains("v2") && !value.contains("127.0.0.1"),
        "opaque: {value}"
    );
    let side = first.backend().to_owned();
    for i in 0..200 {
        let r = get(
            &c,
            listen,
            "/cookie/x",
            &[("cookie", &format!("a=1; {value}"))],
        )
        .await;
        assert_eq!(r.backend(), side, "request {i} with {value}");
        assert!(set_cookie(&r).is_none(), "{r:?}");
    }
    // New clients spread over both sides, each told its own.
    let mut sides: HashMap<String, String> = HashMap::new();
    for _ in 0..40 {
        let r = get(&c, listen, "/cookie", &[]).await;
        let v = pair(&set_cookie(&r).expect("new client told"));
        if let Some(known) = sides.insert(r.backend().to_owned(), v.clone()) {
            assert_eq!(known, v, "one cookie value per side");
        }
    }
    assert_eq!(sides.len(), 2, "{sides:?}");
    // A value lbd did not make is ignored: drawn anew, and told.
    let r = get(
        &c,
        listen,
        "/cookie",
        &[("cookie", "lbd_split_by-cookie=v2")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(set_cookie(&r).is_some(), "{r:?}");
    // HTTP/2 clients are told too.
    let h2 = H2::connect(listen).await.expect("h2");
    let r = h2
        .get(&listen.to_string(), "/cookie")
        .await
        .expect("h2 get");
    assert_eq!(r.status, 200);
    assert!(
        set_cookie(&r).is_some_and(|s| s.starts_with("lbd_split_by-cookie=")),
        "{r:?}"
    );

    // Header: one user always on one side, users spread.
    let alice: Vec<String> = backends_for(&c, listen, "/user", "alice", 200).await;
    assert!(alice.iter().all(|b| *b == alice[0]), "{alice:?}");
    let mut seen = std::collections::HashSet::new();
    for u in 0..40 {
        let r = get(&c, listen, "/user", &[("x-user", &format!("user-{u}"))]).await;
        assert!(set_cookie(&r).is_none());
        seen.insert(r.backend().to_owned());
    }
    assert_eq!(seen.len(), 2, "{seen:?}");

    // Client address: this client (always 127.0.0.1) always on one side.
    let first = get(&c, listen, "/ip", &[]).await.backend().to_owned();
    for _ in 0..100 {
        assert_eq!(get(&c, listen, "/ip", &[]).await.backend(), first);
    }

    // The access log names the cluster each request went to.
    let logs = lbd.logs();
    let cookie_lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains(r#"route="by-cookie""#))
        .collect();
    assert!(cookie_lines.len() >= 240, "{}", cookie_lines.len());
    let other = if side == "v1" { "v2" } else { "v1" };
    assert!(
        cookie_lines
            .iter()
            .any(|l| l.contains(&format!("cluster=\"{side}\"")))
            && cookie_lines
                .iter()
                .any(|l| l.contains(&format!("cluster=\"{other}\""))),
        "{}",
        cookie_lines.join("\n")
    );
}

/// The backends that answer `n` requests to `path` from user `user`.
async fn backends_for(c: &H1, listen: SocketAddr, path: &str, user: &str, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let r = get(c, listen, path, &[("x-user", user)]).await;
        assert_eq!(r.status, 200, "{r:?}");
        out.push(r.backend().to_owned());
    }
    out
}

fn sticky_config(listen: SocketAddr, admin: SocketAddr, eps: &[&Backend]) -> String {
    let mut endpoints = String::new();
    for b in eps {
        endpoints.push_str(&format!(
            "[[clusters.endpoints]]\naddress = \"{}\"\n",
            b.addr
        ));
    }
    format!(
        r#"
[admin]
bind = "{admin}"

[[listeners]]
name = "main"
bind = "{listen}"

[[routes]]
name = "app"
cluster = "app"

[[clusters]]
name = "app"
policy = "round_robin"
[clusters.sticky]
cookie = "srv"
max_age = "1h"
secure = true
[clusters.retry]
attempts = 2
{endpoints}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_sessions_hold_until_the_endpoint_goes() {
    let (e1, e2, e3) = (
        Backend::start("e1").await,
        Backend::start("e2").await,
        Backend::start("e3").await,
    );
    let (listen, admin) = (free_addr(), free_addr());
    let _lbd = Lbd::start(bin(), &sticky_config(listen, admin, &[&e1, &e2, &e3]));
    let c = H1::new();

    // The first answer names its endpoint, opaquely.
    let first = get(&c, listen, "/", &[]).await;
    assert_eq!(first.status, 200);
    let set = set_cookie(&first).expect("sticky cookie set");
    assert!(set.starts_with("srv="), "{set}");
    for attr in ["Path=/", "Max-Age=3600", "HttpOnly", "Secure"] {
        assert!(set.contains(attr), "{attr} in {set}");
    }
    let cookie = pair(&set);
    let token = cookie.trim_start_matches("srv=");
    assert_eq!(token.len(), 16, "{cookie}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{cookie}");
    let home = first.backend().to_owned();

    // 50 requests with it: all to that endpoint (round robin would spread them), no new cookie.
    for i in 0..50 {
        let r = get(&c, listen, "/", &[("cookie", &cookie)]).await;
        assert_eq!(r.backend(), home, "request {i}");
        assert!(set_cookie(&r).is_none(), "{r:?}");
    }

    // Each endpoint has its own value; the same endpoint always the same value.
    let mut tokens: HashMap<String, String> = HashMap::new();
    tokens.insert(home.clone(), cookie.clone());
    for _ in 0..9 {
        let r = get(&c, listen, "/", &[]).await;
        let v = pair(&set_cookie(&r).expect("no cookie, told"));
        if let Some(known) = tokens.insert(r.backend().to_owned(), v.clone()) {
            assert_eq!(known, v);
        }
    }
    assert_eq!(tokens.len(), 3, "{tokens:?}");

    // A garbage value is ignored: normal balancing (round robin reaches every endpoint), and
    // each answer sets the real cookie of whoever answered.
    let mut reached = std::collections::HashSet::new();
    for garbage in [
        "srv=garbage",
        "srv=",
        "srv=0123456789abcdef",
        "srv=ZZZZZZZZZZZZZZZZ",
    ] {
        for _ in 0..3 {
            let r = get(&c, listen, "/", &[("cookie", garbage)]).await;
            assert_eq!(r.status, 200, "{r:?}");
            let v = pair(&set_cookie(&r).expect("re-set"));
            assert_eq!(tokens[r.backend()], v, "{garbage}");
            reached.insert(r.backend().to_owned());
        }
    }
    assert_eq!(reached.len(), 3, "{reached:?}");

    // HTTP/2 downstream: told as well.
    let h2 = H2::connect(listen).await.expect("h2");
    let r = h2.get(&listen.to_string(), "/").await.expect("h2 get");
    assert_eq!(tokens[r.backend()], pair(&set_cookie(&r).expect("h2 told")));

    // The endpoint stops: the request goes elsewhere, and the cookie is re-set to it.
    let backends = [&e1, &e2, &e3];
    let gone = backends
        .iter()
        .find(|b| b.name == home)
        .expect("home backend");
    gone.stop();
    let r = get(&c, listen, "/", &[("cookie", &cookie)]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_ne!(r.backend(), home);
    let moved = pair(&set_cookie(&r).expect("re-set after the endpoint went"));
    assert_eq!(tokens[r.backend()], moved);
    let new_home = r.backend().to_owned();
    for _ in 0..10 {
        let r = get(&c, listen, "/", &[("cookie", &moved)]).await;
        assert_eq!(r.backend(), new_home);
    }

    // The operator drains the new home: the next request goes to the last one, re-set again.
    let drained = backends
        .iter()
        .find(|b| b.name == new_home)
        .expect("new home");
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("/clusters/app/endpoints/{}/drain", drained.addr))
        .body(Full::new(Bytes::new()))
        .expect("drain request");
    let r = c.send(admin, req).await.expect("drain");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(&c, listen, "/", &[("cookie", &moved)]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.backend() != home && r.backend() != new_home, "{r:?}");
    assert_eq!(
        tokens[r.backend()],
        pair(&set_cookie(&r).expect("re-set after drain"))
    );
}
