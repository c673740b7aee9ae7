//! The OTLP span exporter: one task per `[tracing]` config that batches finished spans and
//! sends them to the collector, over gRPC or HTTP/protobuf.
//!
//! The request path only `try_send`s into the bounded queue (`l7/trace.rs`); everything here
//! (building protobuf, connecting, waiting on the collector) happens in this task. While an
//! export is on its way the queue fills; past its bound spans are dropped and counted, so a
//! slow or dead collector costs requests nothing. A batch the collector refuses, or that
//! fails or times out, is dropped and counted too (no retry: the next batch is already
//! waiting).
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderValue, Request, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use metrics::Counter;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span, status,
};
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use super::metrics as m;
use crate::config::otlp::{Protocol, Tracing};
use crate::l7::trace::SpanRecord;

/// The gRPC method of OTLP trace export.
const GRPC_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// `SpanFlags`: bits 8 and 9 say whether the parent is remote (it always is for lbd).
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

/// A request to send everything queued now; answered when it is sent (or dropped).
pub type Flush = oneshot::Sender<()>;

/// Starts the exporter task for `config`; it ends, after sending what it holds, when every
/// sender of `rx` is gone (the tracer's generations are all retired). `flushes` asks it to
/// send the whole queue at once (at shutdown).
pub fn spawn(config: &Tracing, rx: mpsc::Receiver<SpanRecord>, flushes: mpsc::Receiver<Flush>) {
    let exporter = Exporter::new(config);
    tokio::spawn(exporter.run(rx, flushes));
}

struct Exporter {
    client: Client<HttpConnector, Full<Bytes>>,
    uri: Uri,
    protocol: Protocol,
    timeout: Duration,
    batch_size: usize,
    flush_interval: Duration,
    resource: Resource,
    exported: Counter,
    failed: Counter,
}

impl Exporter {
    fn new(config: &Tracing) -> Exporter {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.timeout));
        let mut builder = Client::builder(TokioExecutor::new());
        builder.pool_idle_timeout(Duration::from_secs(90));
        if config.protocol == Protocol::Grpc {
            builder.http2_only(true);
        }
        let uri = match config.protocol {
            Protocol::Grpc => {
                let authority = config.endpoint.authority().map_or("", |a| a.as_str());
                format!("http://{authority}{GRPC_PATH}")
                    .parse()
                    .unwrap_or_else(|_| config.endpoint.clone())
            }
            Protocol::HttpProtobuf => config.endpoint.clone(),
        };
        Exporter {
            client: builder.build(connector),
            uri,
            protocol: config.protocol,
            timeout: config.timeout,
            batch_size: config.batch_size,
            flush_interval: config.flush_interval,
            resource: Resource {
                attributes: vec![
                    kv_str("service.name", config.service_name.clone()),
                    kv_str("telemetry.sdk.name", "lbd".to_owned()),
                    kv_str("telemetry.sdk.language", "rust".to_owned()),
                    kv_str(
                        "telemetry.sdk.version",
                        env!("CARGO_PKG_VERSION").to_owned(),
                    ),
                ],
                ..Default::default()
            },
            exported: metrics::counter!(m::TRACING_SPANS_EXPORTED),
            failed: metrics::counter!(m::TRACING_SPANS_DROPPED, "reason" => "export_failed"),
        }
    }

    async fn run(self, mut rx: mpsc::Receiver<SpanRecord>, mut flushes: mpsc::Receiver<Flush>) {
        let mut batch = Vec::with_capacity(self.batch_size);
        loop {
            // A batch starts with its first span and is sent when full or `flush_interval`
            // after that span, whichever comes first.
            let mut flush = None;
            tokio::select! {
                first = rx.recv() => match first {
                    Some(s) => batch.push(s),
                    None => return,
                },
                Some(f) = flushes.recv() => flush = Some(f),
            }
            let timer = tokio::time::sleep(self.flush_interval);
            tokio::pin!(timer);
            let mut closed = false;
            while flush.is_none() && batch.len() < self.batch_size {
                let room = self.batch_size - batch.len();
                tokio::select! {
                    n = rx.recv_many(&mut batch, room) => {
                        if n == 0 {
                            closed = true;
                            break;
                        }
                    }
                    () = &mut timer => break,
                    Some(f) = flushes.recv() => flush = Some(f),
                }
            }
            if let Some(done) = flush {
                loop {
                    while batch.len() < self.batch_size {
                        match rx.try_recv() {
                            Ok(s) => batch.push(s),
                            Err(_) => break,
                        }
                    }
                    if batch.is_empty() {
                        break;
                    }
                    self.export(&mut batch).await;
                }
                let _ = done.send(());
                continue;
            }
            self.export(&mut batch).await;
            if closed {
                return;
            }
        }
    }

    /// Sends `batch` (emptying it) within the timeout; counts what came of it.
    async fn export(&self, batch: &mut Vec<SpanRecord>) {
        let n = batch.len() as u64;
        let request = self.request(batch.drain(..));
        match tokio::time::timeout(self.timeout, self.send(request)).await {
            Ok(Ok(())) => self.exported.increment(n),
            Ok(Err(e)) => {
                self.failed.increment(n);
                tracing::warn!(target: "lbd::tracing", spans = n, error = %e, "span export failed");
            }
            Err(_) => {
                self.failed.increment(n);
                tracing::warn!(target: "lbd::tracing", spans = n, timeout = ?self.timeout, "span export timed out");
            }
        }
    }

    fn request(&self, spans: impl Iterator<Item = SpanRecord>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "lbd".to_owned(),
                        version: env!("CARGO_PKG_VERSION").to_owned(),
                        ..Default::default()
                    }),
                    spans: spans.map(to_span).collect(),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }

    async fn send(&self, request: ExportTraceServiceRequest) -> Result<(), String> {
        let len = request.encoded_len();
        let (body, content_type) = match self.protocol {
            Protocol::Grpc => {
                // gRPC message framing: uncompressed flag, 4-byte big-endian length.
                let mut b = BytesMut::with_capacity(5 + len);
                b.put_u8(0);
                b.put_u32(u32::try_from(len).map_err(|_| "batch too large")?);
                request.encode(&mut b).map_err(|e| e.to_string())?;
                (b.freeze(), "application/grpc")
            }
            Protocol::HttpProtobuf => {
                let mut b = BytesMut::with_capacity(len);
                request.encode(&mut b).map_err(|e| e.to_string())?;
                (b.freeze(), "application/x-protobuf")
            }
        };
        let mut req = Request::post(self.uri.clone())
            .header(header::CONTENT_TYPE, HeaderValue::from_static(content_type))
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        if self.protocol == Protocol::Grpc {
            req.headers_mut()
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }
        let resp = self.client.request(req).await.map_err(|e| {
            use std::error::Error as _;
            match e.source() {
                Some(s) => format!("{e}: {s}"),
                None => e.to_string(),
            }
        })?;
        let status = resp.status();
        let (parts, body) = resp.into_parts();
        let collected = body.collect().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("collector answered {status}"));
        }
        if self.protocol == Protocol::Grpc {
            // The status is in the trailers, or in the head of a trailers-only answer.
            let grpc_status = collected
                .trailers()
                .and_then(|t| t.get("grpc-status"))
                .or_else(|| parts.headers.get("grpc-status"))
                .map(HeaderValue::as_bytes);
            match grpc_status {
                Some(b"0") => {}
                Some(s) => {
                    let msg = collected
                        .trailers()
                        .and_then(|t| t.get("grpc-message"))
                        .or_else(|| parts.headers.get("grpc-message"))
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    return Err(format!("grpc-status {} {msg}", String::from_utf8_lossy(s)));
                }
                None => return Err("answer without grpc-status".into()),
            }
        }
        Ok(())
    }
}

fn kv_str(key: &str, v: String) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v)),
        }),
        ..Default::default()
    }
}

fn kv_int(key: &str, v: i64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(v)),
        }),
        ..Default::default()
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn protocol_version(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "0.9",
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

/// One finished request as an OTLP server span, named and attributed after the stable HTTP
/// semantic conventions (lbd's own parts under `lbd.*`).
fn to_span(r: SpanRecord) -> Span {
    let mut attributes = vec![
        kv_str("http.request.method", r.method.as_str().to_owned()),
        kv_str("url.path", r.uri.path().to_owned()),
        kv_str("network.protocol.name", "http".to_owned()),
        kv_str(
            "network.protocol.version",
            protocol_version(r.version).to_owned(),
        ),
        kv_str("network.peer.address", r.client.ip().to_string()),
        kv_int("network.peer.port", i64::from(r.client.port())),
        kv_str("lbd.route", r.route.to_string()),
        kv_str("lbd.cluster", r.cluster.to_string()),
    ];
    if let Some(q) = r.uri.query() {
        attributes.push(kv_str("url.query", q.to_owned()));
    }
    if r.status != 0 {
        attributes.push(kv_int("http.response.status_code", i64::from(r.status)));
    }
    if let Some(h) = &r.host {
        attributes.push(kv_str(
            "server.address",
            String::from_utf8_lossy(h).into_owned(),
        ));
    }
    if let Some(e) = r.endpoint {
        attributes.push(kv_str("lbd.endpoint", e.to_string()));
    }
    if r.attempts > 1 {
        attributes.push(kv_int("lbd.attempts", i64::from(r.attempts)));
    }
    if let Some(reason) = r.error {
        attributes.push(kv_str("lbd.error", reason.to_owned()));
    }
    // Server spans: 5xx is an error, 4xx is the client's (semantic conventions, HTTP spans).
    let failed = r.status >= 500 || (r.status == 0 && r.error.is_some());
    let status = if failed {
        let why = r.error.map_or_else(|| r.status.to_string(), str::to_owned);
        attributes.push(kv_str("error.type", why.clone()));
        Some(Status {
            message: why,
            code: status::StatusCode::Error as i32,
        })
    } else {
        None
    };
    let flags = 0x01 | HAS_IS_REMOTE | if r.parent.is_some() { IS_REMOTE } else { 0 };
    Span {
        trace_id: r.trace_id.to_vec(),
        span_id: r.span_id.to_vec(),
        parent_span_id: r.parent.map(|p| p.to_vec()).unwrap_or_default(),
        flags,
        name: r.method.as_str().to_owned(),
        kind: span::SpanKind::Server as i32,
        start_time_unix_nano: unix_nanos(r.start),
        end_time_unix_nano: unix_nanos(r.end),
        attributes,
        status,
        ..Default::default()
    }
}
