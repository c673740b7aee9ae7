//! Distributed tracing through the real binary: W3C `traceparent`/`tracestate` as the backend
//! sees them, and the spans a real OTLP receiver (the published protos' gRPC service, or
//! OTLP/HTTP) gets from lbd; sampling by ratio and by the caller's flag; a dead collector
//! leaves requests alone and its losses are counted.
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use lb_tests::client::{H1, Reply};
use lb_tests::otlp::{OtlpReceiver, Received};
use lb_tests::prom::{self, Exposition};
use lb_tests::{Backend, Lbd, closed_addr, free_addr};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
}

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// A config with one listener, a route `api` to `backend` and a route `dead` (path `/dead`)
/// to a cluster nobody listens on; `tracing` is the `[tracing]` table's body (none when
/// empty).
fn config(listen: SocketAddr, admin: SocketAddr, backend: SocketAddr, tracing: &str) -> String {
    let tracing = if tracing.is_empty() {
        String::new()
    } else {
        format!("[tracing]\n{tracing}\n")
    };
    format!(
        r#"
{tracing}
[admin]
bind = "{admin}"

[[listeners]]
name = "main"
bind = "{listen}"

[[routes]]
name = "dead"
cluster = "dead"
[routes.match]
path_prefix = "/dead"

[[routes]]
name = "api"
cluster = "web"

[[clusters]]
name = "web"
[[clusters.endpoints]]
address = "{backend}"

[[clusters]]
name = "dead"
[[clusters.endpoints]]
address = "{dead}"
"#,
        dead = closed_addr()
    )
}

/// `GET path` with these extra headers.
async fn get(c: &H1, addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut b = Request::get(path).header("host", "svc.test");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    c.send(addr, b.body(Full::new(Bytes::new())).expect("request"))
        .await
        .expect("request through lbd")
}

/// The values of header `name` in the backend's `/headers` answer.
fn seen(reply: &Reply, name: &str) -> Vec<String> {
    reply
        .text()
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(": "))
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.to_owned())
        .collect()
}

/// The one `traceparent` the backend got, as (trace id, parent id, flags).
fn upstream_traceparent(reply: &Reply) -> (String, String, String) {
    let tp = seen(reply, "traceparent");
    assert_eq!(tp.len(), 1, "backend saw {tp:?}\n{}", reply.text());
    let parts: Vec<&str> = tp[0].split('-').collect();
    assert_eq!(parts.len(), 4, "{tp:?}");
    assert_eq!(parts[0], "00", "{tp:?}");
    assert_eq!(parts[1].len(), 32, "{tp:?}");
    assert_eq!(parts[2].len(), 16, "{tp:?}");
    assert_ne!(parts[1], "0".repeat(32));
    assert_ne!(parts[2], "0".repeat(16));
    (
        parts[1].to_owned(),
        parts[2].to_owned(),
        parts[3].to_owned(),
    )
}

async fn scrape(c: &H1, admin: SocketAddr) -> Exposition {
    let r = c.get(admin, "/metrics", None).await.expect("metrics");
    assert_eq!(r.status, 200, "{}", r.text());
    prom::parse(&r.text()).unwrap_or_else(|e| panic!("bad exposition: {e}"))
}

/// Polls `/metrics` (≤ 10 s) until `ok` holds; returns the last scrape either way.
async fn scrape_until(c: &H1, admin: SocketAddr, ok: impl Fn(&Exposition) -> bool) -> Exposition {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let e = scrape(c, admin).await;
        if ok(&e) || Instant::now() > deadline {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn find<'a>(spans: &'a [Received], span_id: &str) -> &'a Received {
    spans
        .iter()
        .find(|s| s.span_id() == span_id)
        .unwrap_or_else(|| panic!("no span {span_id} among {spans:#?}"))
}

/// The caller's trace goes on upstream with lbd's span as the parent; a request without a
/// `traceparent`, or with a malformed one, starts a new trace; the receiver gets each span
/// with the stable HTTP attributes, lbd's route, cluster and endpoint, and the right parent;
/// the access log names the trace.
#[tokio::test]
async fn traces_are_propagated_and_spans_exported_over_grpc() {
    let backend = Backend::start("b1").await;
    let receiver = OtlpReceiver::grpc().await;
    let (listen, admin) = (free_addr(), free_addr());
    let tracing = format!(
        "endpoint = \"{}\"\nservice_name = \"edge\"\nflush_interval = \"50ms\"",
        receiver.endpoint()
    );
    let lbd = Lbd::start_logging(
        bin(),
        &config(listen, admin, backend.addr, &tracing),
        "info,lbd::access=info",
    );
    let c = H1::new();

    // 1. The caller's trace, sampled, with vendor state.
    let caller = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    let r = get(
        &c,
        listen,
        "/headers?x=1",
        &[
            ("traceparent", &caller),
            ("tracestate", "congo=t61rcWkgMzE, rojo=00f067aa0ba902b7"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let (trace, lbd_span, flags) = upstream_traceparent(&r);
    assert_eq!(trace, CALLER_TRACE, "same trace upstream");
    assert_ne!(
        lbd_span, CALLER_SPAN,
        "lbd's own span is the parent upstream"
    );
    assert_eq!(flags, "01");
    assert_eq!(
        seen(&r, "tracestate"),
        ["congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"]
    );

    // 2. No traceparent: a new trace, lbd's span its root.
    let r = get(&c, listen, "/headers", &[]).await;
    let (new_trace, root_span, flags) = upstream_traceparent(&r);
    assert_ne!(new_trace, CALLER_TRACE);
    assert_eq!(flags, "01", "ratio 1 samples every new trace");
    assert!(seen(&r, "tracestate").is_empty());

    // 3. Malformed (upper-case hex): treated as absent; its tracestate goes with it.
    let bad = format!("00-{}-{CALLER_SPAN}-01", CALLER_TRACE.to_uppercase());
    let r = get(
        &c,
        listen,
        "/headers",
        &[("traceparent", &bad), ("tracestate", "congo=t61rcWkgMzE")],
    )
    .await;
    let (bad_trace, bad_root, _) = upstream_traceparent(&r);
    assert_ne!(bad_trace, CALLER_TRACE);
    assert_ne!(bad_trace, new_trace);
    assert!(seen(&r, "tracestate").is_empty(), "{}", r.text());

    // 4. Two traceparent fields: neither is trusted.
    let r = get(
        &c,
        listen,
        "/headers",
        &[("traceparent", &caller), ("traceparent", &caller)],
    )
    .await;
    let (dup_trace, _, _) = upstream_traceparent(&r);
    assert_ne!(dup_trace, CALLER_TRACE);

    // 5. An upstream lbd cannot reach: its reason in the span, which is an error.
    let r = get(&c, listen, "/dead", &[("traceparent", &caller)]).await;
    assert_eq!(r.status, 502, "{}", r.text());

    let spans = receiver.wait_for(5, Duration::from_secs(10)).await;
    assert_eq!(spans.len(), 5, "{spans:#?}");

    let s = find(&spans, &lbd_span);
    assert_eq!(s.service, "edge");
    assert_eq!(s.trace_id(), CALLER_TRACE);
    assert_eq!(s.parent_span_id(), CALLER_SPAN);
    assert_eq!(s.span.kind, 2, "SPAN_KIND_SERVER");
    assert_eq!(s.span.name, "GET");
    assert_eq!(s.span.flags & 0x301, 0x301, "sampled, remote parent");
    assert!(s.span.start_time_unix_nano > 0);
    assert!(s.span.end_time_unix_nano >= s.span.start_time_unix_nano);
    for (k, v) in [
        ("http.request.method", "GET"),
        ("url.path", "/headers"),
        ("url.query", "x=1"),
        ("http.response.status_code", "200"),
        ("server.address", "svc.test"),
        ("network.peer.address", "127.0.0.1"),
        ("network.protocol.version", "1.1"),
        ("lbd.route", "api"),
        ("lbd.cluster", "web"),
    ] {
        assert_eq!(s.attr(k).as_deref(), Some(v), "{k} in {s:#?}");
    }
    assert_eq!(s.attr("lbd.endpoint"), Some(backend.addr.to_string()));
    assert_eq!(s.attr("lbd.error"), None);
    assert!(s.span.status.is_none(), "a 200 leaves the status unset");

    let s = find(&spans, &root_span);
    assert_eq!(s.trace_id(), new_trace);
    assert_eq!(s.parent_span_id(), "", "a new trace's root span");
    assert_eq!(s.span.flags & 0x301, 0x101, "sampled, no remote parent");

    let s = find(&spans, &bad_root);
    assert_eq!(s.trace_id(), bad_trace);
    assert_eq!(s.parent_span_id(), "");

    let dead = spans
        .iter()
        .find(|s| s.attr("lbd.route").as_deref() == Some("dead"))
        .expect("span of the /dead request");
    assert_eq!(dead.trace_id(), CALLER_TRACE);
    assert_eq!(dead.parent_span_id(), CALLER_SPAN);
    assert_eq!(
        dead.attr("http.response.status_code").as_deref(),
        Some("502")
    );
    let reason = dead.attr("lbd.error").expect("lbd.error");
    assert_eq!(r.lbd_error(), reason);
    assert_eq!(dead.attr("error.type"), Some(reason.clone()));
    let status = dead.span.status.as_ref().expect("status");
    assert_eq!(status.code, 2, "STATUS_CODE_ERROR");

    // The access log names the trace of each request.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lbd.logs().contains(&format!("trace_id={new_trace}")) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logs = lbd.logs();
    assert!(logs.contains(&format!("trace_id={CALLER_TRACE}")), "{logs}");
    assert!(logs.contains(&format!("trace_id={new_trace}")), "{logs}");

    // lbd counts a batch once the receiver's answer is back, just after the spans arrived.
    let e = scrape_until(&c, admin, |e| {
        e.sum("lbd_tracing_spans_exported_total", &[]) >= 5.0
    })
    .await;
    assert_eq!(e.sum("lbd_tracing_spans_exported_total", &[]), 5.0);
    assert_eq!(e.sum("lbd_tracing_spans_dropped_total", &[]), 0.0);
}

/// Ratio 0 samples no new trace but follows a caller that sampled; ratio 1 samples every new
/// trace but not a caller's unsampled one (parent-based sampling, both ways).
#[tokio::test]
async fn sampling_by_ratio_honours_the_callers_flag() {
    let backend = Backend::start("b1").await;
    let c = H1::new();
    for (ratio, fresh_sampled) in [("0.0", false), ("1.0", true)] {
        let receiver = OtlpReceiver::grpc().await;
        let (listen, admin) = (free_addr(), free_addr());
        let tracing = format!(
            "endpoint = \"{}\"\nsample_ratio = {ratio}\nflush_interval = \"50ms\"",
            receiver.endpoint()
        );
        let _lbd = Lbd::start(bin(), &config(listen, admin, backend.addr, &tracing));
        let mut fresh = HashSet::new();
        for _ in 0..20 {
            let r = get(&c, listen, "/headers", &[]).await;
            let (trace, _, flags) = upstream_traceparent(&r);
            assert_eq!(flags == "01", fresh_sampled, "ratio {ratio}: {flags}");
            fresh.insert(trace);
        }
        assert_eq!(fresh.len(), 20, "a new trace per request");
        let mut parented = HashSet::new();
        for i in 0..5 {
            // Callers that sampled (flag 01) at ratio 0, that did not (00) at ratio 1.
            let flag = if fresh_sampled { "00" } else { "01" };
            let trace = format!("{:032x}", 0xabc0 + i);
            let tp = format!("00-{trace}-{CALLER_SPAN}-{flag}");
            let r = get(&c, listen, "/headers", &[("traceparent", &tp)]).await;
            let (t, _, flags) = upstream_traceparent(&r);
            assert_eq!((t.as_str(), flags.as_str()), (trace.as_str(), flag));
            parented.insert(trace);
        }
        let want = if fresh_sampled { &fresh } else { &parented };
        let spans = receiver.wait_for(want.len(), Duration::from_secs(10)).await;
        // Whatever else would come has had time to: a few flush intervals more.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let spans: HashSet<String> = receiver
            .spans()
            .iter()
            .map(Received::trace_id)
            .chain(spans.iter().map(Received::trace_id))
            .collect();
        assert_eq!(&spans, want, "ratio {ratio}");
        assert_eq!(receiver.spans().len(), want.len(), "ratio {ratio}");
    }
}

/// OTLP/HTTP with protobuf bodies, to `http://host:port` + `/v1/traces`.
#[tokio::test]
async fn spans_are_exported_over_http_protobuf() {
    let backend = Backend::start("b1").await;
    let receiver = OtlpReceiver::http().await;
    let (listen, admin) = (free_addr(), free_addr());
    let tracing = format!(
        "endpoint = \"{}\"\nprotocol = \"http/protobuf\"\nflush_interval = \"50ms\"\nbatch_size = 4",
        receiver.endpoint()
    );
    let _lbd = Lbd::start(bin(), &config(listen, admin, backend.addr, &tracing));
    let c = H1::new();
    let mut ids = HashSet::new();
    for _ in 0..10 {
        let r = get(&c, listen, "/headers", &[]).await;
        ids.insert(upstream_traceparent(&r).1);
    }
    let spans = receiver.wait_for(10, Duration::from_secs(10)).await;
    let got: HashSet<String> = spans.iter().map(Received::span_id).collect();
    assert_eq!(got, ids);
    assert!(
        receiver.exports() >= 3,
        "batches of at most 4: {}",
        receiver.exports()
    );
    assert!(
        spans.iter().all(|s| s.service == "lbd"),
        "default service.name"
    );
}

/// A collector that refuses connections: every request is answered as usual, and every span
/// is accounted for in `/metrics` as dropped (export failed, or the queue was full).
#[tokio::test]
async fn a_dead_collector_leaves_requests_alone_and_drops_are_counted() {
    let backend = Backend::start("b1").await;
    let (listen, admin) = (free_addr(), free_addr());
    let tracing = format!(
        "endpoint = \"http://{}\"\nqueue_size = 8\nbatch_size = 4\nflush_interval = \"20ms\"\ntimeout = \"500ms\"",
        closed_addr()
    );
    let _lbd = Lbd::start(bin(), &config(listen, admin, backend.addr, &tracing));
    let c = H1::new();
    const N: usize = 200;
    for _ in 0..N {
        let r = get(&c, listen, "/", &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "b1");
    }
    let e = scrape_until(&c, admin, |e| {
        e.sum("lbd_tracing_spans_dropped_total", &[]) >= N as f64
    })
    .await;
    let failed = e
        .value(
            "lbd_tracing_spans_dropped_total",
            &[("reason", "export_failed")],
        )
        .unwrap_or(0.0);
    let full = e
        .value(
            "lbd_tracing_spans_dropped_total",
            &[("reason", "queue_full")],
        )
        .unwrap_or(0.0);
    assert!(failed > 0.0, "export failures counted");
    assert_eq!(failed + full, N as f64, "every span accounted for");
    assert_eq!(e.sum("lbd_tracing_spans_exported_total", &[]), 0.0);
}

/// Off by default: no `traceparent` is added and nothing is exported; a reload that adds
/// `[tracing]` turns it on for the next requests, one that removes it turns it off.
#[tokio::test]
async fn tracing_is_off_by_default_and_follows_reloads() {
    let backend = Backend::start("b1").await;
    let receiver = OtlpReceiver::grpc().await;
    let (listen, admin) = (free_addr(), free_addr());
    let mut lbd = Lbd::start(bin(), &config(listen, admin, backend.addr, ""));
    let c = H1::new();
    let r = get(&c, listen, "/headers", &[]).await;
    assert!(seen(&r, "traceparent").is_empty(), "{}", r.text());
    let caller = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    let r = get(&c, listen, "/headers", &[("traceparent", &caller)]).await;
    assert_eq!(
        seen(&r, "traceparent"),
        std::slice::from_ref(&caller),
        "passed as it is"
    );

    let tracing = format!(
        "endpoint = \"{}\"\nflush_interval = \"50ms\"",
        receiver.endpoint()
    );
    lbd.reload(&config(listen, admin, backend.addr, &tracing));
    let r = get(&c, listen, "/headers", &[("traceparent", &caller)]).await;
    let (trace, span, _) = upstream_traceparent(&r);
    assert_eq!(trace, CALLER_TRACE);
    assert_ne!(span, CALLER_SPAN);
    let spans = receiver.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].span_id(), span);

    lbd.reload(&config(listen, admin, backend.addr, ""));
    let r = get(&c, listen, "/headers", &[("traceparent", &caller)]).await;
    assert_eq!(seen(&r, "traceparent"), [caller]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.spans().len(), 1);
}

/// SIGTERM sends the spans still queued before lbd exits (`flush_interval` is far away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_spans_are_sent_at_shutdown() {
    let backend = Backend::start("b1").await;
    let receiver = OtlpReceiver::grpc().await;
    let (listen, admin) = (free_addr(), free_addr());
    let tracing = format!(
        "endpoint = \"{}\"\nflush_interval = \"1h\"",
        receiver.endpoint()
    );
    let mut lbd = Lbd::start(bin(), &config(listen, admin, backend.addr, &tracing));
    let c = H1::new();
    for _ in 0..3 {
        assert_eq!(get(&c, listen, "/", &[]).await.status, 200);
    }
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        receiver.spans().is_empty(),
        "nothing before the flush interval"
    );
    let status = tokio::task::block_in_place(|| lbd.terminate(Duration::from_secs(20)));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert_eq!(receiver.spans().len(), 3);
}
