//! `[tracing]`: W3C trace-context propagation and span export over OTLP, checks and defaults.
use std::time::Duration;

use http::Uri;

use super::check::Checker;
use super::raw::S;

/// Most spans a batch may hold (the OTLP collector's default `max_recv_msg_size` of 4 MiB
/// holds far more; this keeps one export's memory bounded).
pub const MAX_BATCH: usize = 8192;

/// Most spans the queue may hold.
pub const MAX_QUEUE: usize = 1 << 20;

/// `[tracing]` as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub endpoint: S<String>,
    pub protocol: Option<S<String>>,
    pub sample_ratio: Option<S<f64>>,
    pub service_name: Option<S<String>>,
    pub queue_size: Option<S<i64>>,
    pub batch_size: Option<S<i64>>,
    pub flush_interval: Option<S<String>>,
    pub timeout: Option<S<String>>,
}

/// How spans are sent to the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC (`TraceService/Export` over HTTP/2 cleartext), port 4317 by convention.
    Grpc,
    /// OTLP/HTTP with binary protobuf bodies (`POST /v1/traces`), port 4318 by convention.
    HttpProtobuf,
}

/// `[tracing]`, validated. Tracing is on when the table is present.
#[derive(Debug, Clone, PartialEq)]
pub struct Tracing {
    /// The collector: `http://host:port`, and for `http/protobuf` the path when it is not
    /// `/v1/traces`.
    pub endpoint: Uri,
    /// Export protocol.
    pub protocol: Protocol,
    /// Share of new traces sampled (0.0..=1.0); a request that carries a `traceparent`
    /// follows its sampled flag instead (parent-based sampling).
    pub sample_ratio: f64,
    /// `service.name` of the exported resource.
    pub service_name: String,
    /// Finished spans waiting for export; more are dropped and counted.
    pub queue_size: usize,
    /// Most spans in one export request.
    pub batch_size: usize,
    /// Longest a finished span waits before its batch is sent.
    pub flush_interval: Duration,
    /// Bound on one export request, connection included.
    pub timeout: Duration,
}

impl Checker<'_> {
    /// Checks `[tracing]`.
    pub(crate) fn tracing(&mut self, t: &S<Raw>) -> Tracing {
        let t = t.get_ref();
        let protocol = self.choice(
            t.protocol.as_ref(),
            "tracing.protocol",
            Protocol::Grpc,
            &[
                ("grpc", Protocol::Grpc),
                ("http/protobuf", Protocol::HttpProtobuf),
            ],
        );
        let endpoint = self.otlp_endpoint(&t.endpoint, protocol);
        let sample_ratio = match &t.sample_ratio {
            None => 1.0,
            Some(r) => {
                let v = *r.get_ref();
                if !(0.0..=1.0).contains(&v) {
                    self.err(
                        r.span(),
                        "tracing.sample_ratio",
                        format!("must be between 0.0 and 1.0, got {v}"),
                    );
                    1.0
                } else {
                    v
                }
            }
        };
        let service_name = match &t.service_name {
            None => "lbd".to_owned(),
            Some(n) => {
                if n.get_ref().trim().is_empty() {
                    self.err(n.span(), "tracing.service_name", "must not be empty");
                }
                n.get_ref().clone()
            }
        };
        let queue_size = self.int(
            t.queue_size.as_ref(),
            "tracing.queue_size",
            2048,
            1,
            MAX_QUEUE as i64,
        );
        let batch_size = self.int(
            t.batch_size.as_ref(),
            "tracing.batch_size",
            512,
            1,
            MAX_BATCH as i64,
        );
        if batch_size > queue_size
            && let Some(b) = &t.batch_size
        {
            self.err(
                b.span(),
                "tracing.batch_size",
                format!("must not exceed tracing.queue_size ({queue_size})"),
            );
        }
        Tracing {
            endpoint,
            protocol,
            sample_ratio,
            service_name,
            queue_size: usize::try_from(queue_size).unwrap_or(2048),
            batch_size: usize::try_from(batch_size).unwrap_or(512),
            flush_interval: self.positive_duration(
                t.flush_interval.as_ref(),
                "tracing.flush_interval",
                Duration::from_secs(5),
            ),
            timeout: self.positive_duration(
                t.timeout.as_ref(),
                "tracing.timeout",
                Duration::from_secs(10),
            ),
        }
    }

    /// `http://host:port[/path]`. The path is the whole URL only for `http/protobuf`, as
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is; an empty one there means `/v1/traces`.
    fn otlp_endpoint(&mut self, v: &S<String>, protocol: Protocol) -> Uri {
        const KEY: &str = "tracing.endpoint";
        let fallback = Uri::from_static("http://127.0.0.1:4317");
        let uri = match v.get_ref().parse::<Uri>() {
            Ok(u) => u,
            Err(e) => {
                self.err(
                    v.span(),
                    KEY,
                    format!(
                        "invalid URL {:?}: {e}; expected e.g. \"http://127.0.0.1:4317\"",
                        v.get_ref()
                    ),
                );
                return fallback;
            }
        };
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                self.err(
                    v.span(),
                    KEY,
                    "https collectors are not supported yet; use http:// to a local collector \
                     or agent",
                );
                return fallback;
            }
            _ => {
                self.err(
                    v.span(),
                    KEY,
                    format!(
                        "{:?} has no http:// scheme; expected e.g. \"http://127.0.0.1:4317\"",
                        v.get_ref()
                    ),
                );
                return fallback;
            }
        }
        if uri.host().is_none_or(str::is_empty) {
            self.err(v.span(), KEY, format!("{:?} names no host", v.get_ref()));
            return fallback;
        }
        let path = uri.path();
        if protocol == Protocol::Grpc && path != "/" && !path.is_empty() {
            self.err(
                v.span(),
                KEY,
                format!(
                    "a gRPC endpoint has no path (the service's is fixed), got {path:?}; give \
                     \"http://host:port\""
                ),
            );
            return fallback;
        }
        if uri.query().is_some() {
            self.err(v.span(), KEY, "must not have a query");
            return fallback;
        }
        if protocol == Protocol::HttpProtobuf && (path == "/" || path.is_empty()) {
            let with_path = format!(
                "http://{}/v1/traces",
                uri.authority().map_or("", |a| a.as_str())
            );
            return with_path.parse().unwrap_or(uri);
        }
        uri
    }
}
