//! A real OTLP trace receiver: the `TraceService` gRPC server generated from the published
//! OTLP protos (`opentelemetry-proto`, served by tonic), or the OTLP/HTTP protobuf endpoint
//! (`POST /v1/traces`). It keeps every span it is sent, with its resource's `service.name`.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};

/// One span as received.
#[derive(Debug, Clone)]
pub struct Received {
    /// The `service.name` of the resource it came under.
    pub service: String,
    /// The span.
    pub span: Span,
}

impl Received {
    /// An attribute's value as text (strings as they are, integers in decimal).
    pub fn attr(&self, key: &str) -> Option<String> {
        let kv = self.span.attributes.iter().find(|kv| kv.key == key)?;
        match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            Value::IntValue(i) => Some(i.to_string()),
            Value::BoolValue(b) => Some(b.to_string()),
            Value::DoubleValue(d) => Some(d.to_string()),
            other => Some(format!("{other:?}")),
        }
    }

    /// The trace id as lowercase hex.
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    /// The span id as lowercase hex.
    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    /// The parent span id as lowercase hex (empty for a root span).
    pub fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, Default)]
struct Store {
    spans: Mutex<Vec<Received>>,
    exports: Mutex<u64>,
    arrived: Notify,
}

impl Store {
    fn add(&self, req: ExportTraceServiceRequest) {
        let mut spans = self.spans.lock().expect("lock");
        for rs in req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push(Received {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        *self.exports.lock().expect("lock") += 1;
        self.arrived.notify_waiters();
    }
}

struct Service(Arc<Store>);

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.add(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A running receiver; stops when dropped.
#[derive(Debug)]
pub struct OtlpReceiver {
    /// Where it listens.
    pub addr: SocketAddr,
    store: Arc<Store>,
    _stop: oneshot::Sender<()>,
}

impl OtlpReceiver {
    /// Starts the gRPC `TraceService` on an ephemeral loopback port.
    pub async fn grpc() -> OtlpReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let store = Arc::new(Store::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let svc = TraceServiceServer::new(Service(Arc::clone(&store)));
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await;
        });
        OtlpReceiver {
            addr,
            store,
            _stop: stop,
        }
    }

    /// Starts an OTLP/HTTP receiver (`POST /v1/traces`, binary protobuf) on an ephemeral
    /// loopback port.
    pub async fn http() -> OtlpReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let store = Arc::new(Store::default());
        let (stop, mut stopped) = oneshot::channel::<()>();
        let st = Arc::clone(&store);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = &mut stopped => return,
                };
                let Ok((stream, _)) = accepted else { continue };
                let st = Arc::clone(&st);
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let st = Arc::clone(&st);
                        async move { Ok::<_, Infallible>(http_export(&st, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        OtlpReceiver {
            addr,
            store,
            _stop: stop,
        }
    }

    /// `http://addr`, the value for `tracing.endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Received> {
        self.store.spans.lock().expect("lock").clone()
    }

    /// Export requests received so far.
    pub fn exports(&self) -> u64 {
        *self.store.exports.lock().expect("lock")
    }

    /// Waits until at least `n` spans arrived or `timeout` passed; returns what arrived.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let end = Instant::now() + timeout;
        loop {
            let arrived = self.store.arrived.notified();
            let spans = self.spans();
            if spans.len() >= n {
                return spans;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return spans;
            }
            let _ = tokio::time::timeout(left, arrived).await;
        }
    }
}

async fn http_export(store: &Store, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let status = |s: StatusCode| {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = s;
        r
    };
    if req.method() != http::Method::POST || req.uri().path() != "/v1/traces" {
        return status(StatusCode::NOT_FOUND);
    }
    let is_proto = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v == "application/x-protobuf");
    if !is_proto {
        return status(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
    let Ok(body) = req.into_body().collect().await else {
        return status(StatusCode::BAD_REQUEST);
    };
    match ExportTraceServiceRequest::decode(body.to_bytes()) {
        Ok(r) => {
            store.add(r);
            let mut resp = Response::new(Full::new(
                ExportTraceServiceResponse::default().encode_to_vec().into(),
            ));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/x-protobuf"),
            );
            resp
        }
        Err(_) => status(StatusCode::BAD_REQUEST),
    }
}
