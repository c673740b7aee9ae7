//! The request path: route, pick an endpoint, forward, stream the answer back.
//!
//! lbd answers by itself only when it must, always with a short text body and an
//! `x-lbd-error` header naming the reason: 404 `no_route`, 503 `no_healthy_endpoint`,
//! 503 `endpoint_limit`, 502 `upstream_connect` / `upstream_reset`, 504 `upstream_timeout`,
//! 413 `body_too_large`, 414 `uri_too_long`.
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Body as _;

use super::body::{Replay, RequestBody, ResponseBody};
use super::downstream::DownstreamBody;
use super::grpc;
use super::headers::{self, Scheme};
use super::log::RequestLog;
use super::router;
use super::upstream::{UpstreamBody, UpstreamError};
use crate::balance::PickContext;
use crate::health::InFlightGuard;
use crate::supervisor::runtime::{ClusterRuntime, Runtime};

/// The downstream connection a request arrived on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// Client address.
    pub client: SocketAddr,
    /// Listener's bound address (identifies the listener across reloads).
    pub listener: SocketAddr,
    /// How the client connected.
    pub scheme: Scheme,
}

/// Upper bound on attempts per request, whatever the config says: a request must not walk a
/// large cluster endpoint by endpoint.
const MAX_ATTEMPTS: usize = 8;

/// Handles one request against the runtime snapshot `rt`.
pub async fn handle(
    rt: Arc<Runtime>,
    conn: ConnInfo,
    req: Request<DownstreamBody>,
) -> Response<ResponseBody> {
    let start = Instant::now();
    let Some(listener) = rt.listener(conn.listener) else {
        // The listener was removed by a reload while this connection stayed open.
        if grpc::is_grpc(req.headers()) {
            return grpc::error_response("listener_removed", None);
        }
        return local(
            StatusCode::SERVICE_UNAVAILABLE,
            "listener_removed",
            None,
            true,
        );
    };
    let (parts, body) = req.into_parts();
    let mut log = Box::new(RequestLog {
        access_log: listener.access_log,
        listener: Arc::clone(&listener.name),
        route: Arc::clone(&rt.unnamed),
        cluster: Arc::clone(&rt.unnamed),
        endpoint: None,
        client: conn.client,
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        version: parts.version,
        status: 0,
        bytes_in: None,
        bytes_out: 0,
        start,
        upstream: None,
        attempts: 0,
        error: None,
        metrics: Arc::clone(&listener.unrouted_metrics),
        in_flight: None,
        grpc: grpc::is_grpc(&parts.headers),
        stream_slot: None,
        grpc_status: None,
    });

    if parts.uri.path_and_query().map_or(0, |p| p.as_str().len()) > max_uri_bytes(&listener.limits)
    {
        return fail(log, StatusCode::URI_TOO_LONG, "uri_too_long", true);
    }
    if parts.method == Method::CONNECT {
        return fail(
            log,
            StatusCode::METHOD_NOT_ALLOWED,
            "connect_unsupported",
            false,
        );
    }
    let limit = listener.limits.max_body_bytes;
    if limit > 0 && body.size_hint().lower() > limit {
        // Declared too large up front: refuse without reading it, and close, since the unread
        // body would otherwise be taken for the next request.
        return fail(log, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", true);
    }
    let Some(route_idx) = listener.router.route(&rt.model, &parts) else {
        return fail(log, StatusCode::NOT_FOUND, "no_route", false);
    };
    let route = &rt.model.routes[route_idx];
    let cluster = &rt.clusters[route.cluster];
    log.route = Arc::clone(&rt.route_names[route_idx]);
    log.cluster = Arc::clone(&cluster.name);
    log.metrics = Arc::clone(&listener.route_metrics[route_idx]);

    let deadline = route
        .timeout
        .unwrap_or(listener.limits.request_timeout)
        .min(cluster.config.timeouts.response);
    // A gRPC client's deadline (capped by the configured one) bounds the whole call.
    let call = log
        .grpc
        .then(|| grpc::CallDeadline::new(&parts.headers, start, deadline))
        .flatten();
    let path = router::rewrite_uri(route, &parts.uri);
    let mut head = parts;
    prepare_head(&mut head, &conn);
    if let Some(call) = &call {
        call.propagate(&mut head.headers);
    }

    // Only a request without a body can be re-sent: a streamed body is consumed by the first
    // attempt. Connect failures send nothing, so such a retry is safe for any method.
    // gRPC calls retried on status keep a bounded copy of their body for the next attempt.
    let grpc_retry = log.grpc && !cluster.config.retry.grpc_status.is_empty();
    let retryable = body.is_end_stream() || grpc_retry;
    let max_attempts = if retryable {
        (cluster.config.retry.attempts as usize + 1).min(MAX_ATTEMPTS)
    } else {
        1
    };
    let (mut body, replay) = if grpc_retry {
        let seen = Arc::clone(log.bytes_in.insert(Arc::new(AtomicU64::new(0))));
        let keep = grpc::RETRY_BUFFER_BYTES;
        (None, Some(Replay::new(body, limit, seen, keep)))
    } else if body.is_end_stream() {
        // Nothing to stream or count (most requests): no shared counter to allocate.
        (Some(RequestBody::Empty), None)
    } else {
        let seen = Arc::clone(log.bytes_in.insert(Arc::new(AtomicU64::new(0))));
        let inner = body;
        (Some(RequestBody::Stream { inner, limit, seen }), None)
    };
    let mut held = None;
    let mut tried = [usize::MAX; MAX_ATTEMPTS];
    let mut last_error = None;
    let mut at_limit = false;
    for attempt in 0..max_attempts {
        let ctx = PickContext {
            client_ip: conn.client.ip(),
            headers: &head.headers,
        };
        let (idx, guard) = match pick_within_limit(cluster, &ctx, &tried[..attempt]) {
            Picked::Endpoint(i, guard) => (i, guard),
            Picked::None => break,
            Picked::AllAtLimit => {
                at_limit = true;
                break;
            }
        };
        tried[attempt] = idx;
        if attempt > 0 {
            metrics::counter!(crate::telemetry::metrics::RETRIES, "cluster" => cluster.name.to_string())
                .increment(1);
        }
        log.attempts = attempt as u32 + 1;
        log.endpoint = cluster.config.endpoints.get(idx).map(|e| e.address);
        let Some(uri) = cluster.upstream.uri(idx, path.path_and_query()) else {
            break;
        };
        let req_body = match &replay {
            Some(r) => match Replay::attempt(r, attempt) {
                Some(b) => b,
                None => break,
            },
            None => body.take().unwrap_or(RequestBody::Empty),
        };
        head.uri = uri;
        head.version = cluster.upstream.version();
        // The head stays here for another attempt (HTTP/1.1 writes it from a reference;
        // HTTP/2 copies it only while another attempt may follow).
        let last = attempt + 1 == max_attempts;
        let sent = Instant::now();
        let budget = call.as_ref().map_or(deadline, |c| c.remaining());
        match tokio::time::timeout(
            budget,
            cluster.upstream.send(idx, &mut head, req_body, last),
        )
        .await
        {
            Ok(Ok(resp)) => {
                if attempt + 1 < max_attempts
                    && replay.as_ref().is_some_and(Replay::can_replay)
                    && let Some(code) =
                        grpc::retry_status(resp.headers(), &cluster.config.retry.grpc_status)
                {
                    // Trailers-only, nothing sent downstream yet: try another endpoint, but
                    // keep this answer for the client in case no attempt does better.
                    tracing::info!(cluster = %cluster.name, endpoint = log.endpoint.map(tracing::field::display),
                        grpc_status = code, attempt = attempt + 1, "retrying gRPC call");
                    held = Some(resp);
                    continue;
                }
                log.upstream = Some(sent.elapsed());
                log.in_flight = Some(guard);
                let resp = respond(resp, log);
                return match call {
                    Some(c) => grpc::bound_response(resp, c),
                    None => resp,
                };
            }
            Ok(Err((kind, err))) => {
                // Like nginx's "connect() failed (111: Connection refused) while connecting
                // to upstream": one line per failed attempt, with the whole cause chain.
                tracing::warn!(
                    cluster = %cluster.name,
                    endpoint = log.endpoint.map(tracing::field::display),
                    attempt = attempt + 1,
                    ?kind,
                    error = %crate::telemetry::logging::chain(&err),
                    "upstream attempt failed"
                );
                match kind {
                    UpstreamError::BodyTooLarge => {
                        return fail(log, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", true);
                    }
                    UpstreamError::ClientBody => {
                        return fail(log, StatusCode::BAD_REQUEST, "client_body", true);
                    }
                    UpstreamError::Connect | UpstreamError::Reset => {
                        passive_failure(cluster, idx);
                        last_error = Some(kind);
                        if kind == UpstreamError::Reset {
                            break;
                        }
                    }
                }
            }
            Err(_elapsed) => {
                log.upstream = Some(sent.elapsed());
                if call.as_ref().is_some_and(|c| c.client_set) {
                    // The client's deadline, not a slow endpoint: no passive-health strike.
                    // Dropping the send future resets the upstream stream (RST_STREAM CANCEL).
                    return fail(log, StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded", false);
                }
                passive_failure(cluster, idx);
                return fail(log, StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", false);
            }
        }
    }
    if let Some(resp) = held {
        return respond(resp, log);
    }
    match last_error {
        None if at_limit => fail(
            log,
            StatusCode::SERVICE_UNAVAILABLE,
            "endpoint_limit",
            false,
        ),
        None => fail(
            log,
            StatusCode::SERVICE_UNAVAILABLE,
            "no_healthy_endpoint",
            false,
        ),
        Some(UpstreamError::Connect) => {
            fail(log, StatusCode::BAD_GATEWAY, "upstream_connect", false)
        }
        Some(_) => fail(log, StatusCode::BAD_GATEWAY, "upstream_reset", false),
    }
}

/// Outcome of choosing an endpoint under the cluster's connection limit.
enum Picked {
    /// The endpoint, with the request already counted in flight on it.
    Endpoint(usize, InFlightGuard),
    /// No available endpoint at all.
    None,
    /// Endpoints are available, but every one is at `pool.max_connections`.
    AllAtLimit,
}

/// Picks an endpoint, passing over those at `pool.max_connections` (nginx `max_conns`: a full
/// server counts as unavailable for this request). HTTP/1.1 only: there one request holds one
/// connection, while the HTTP/2 pool enforces the limit on connections itself.
fn pick_within_limit(cluster: &ClusterRuntime, ctx: &PickContext<'_>, tried: &[usize]) -> Picked {
    let max = cluster.config.pool.max_connections as u64;
    if max == 0 || cluster.upstream.version() != http::Version::HTTP_11 {
        return match cluster.balancer.pick(ctx, tried) {
            Some(i) => Picked::Endpoint(i, cluster.health.endpoints[i].start_request()),
            None => Picked::None,
        };
    }
    const SKIP: usize = 2 * MAX_ATTEMPTS;
    let mut skip = [usize::MAX; SKIP];
    skip[..tried.len()].copy_from_slice(tried);
    let mut n = tried.len();
    loop {
        match cluster.balancer.pick(ctx, &skip[..n]) {
            None if n > tried.len() => return Picked::AllAtLimit,
            None => return Picked::None,
            Some(i) => match cluster.health.endpoints[i].try_start_request(max) {
                Some(guard) => return Picked::Endpoint(i, guard),
                None if n == SKIP => return Picked::AllAtLimit,
                None => {
                    skip[n] = i;
                    n += 1;
                }
            },
        }
    }
}

/// Longest request target accepted (nginx's `large_client_header_buffers` default is 8 KiB);
/// never more than the whole head may be.
fn max_uri_bytes(limits: &crate::config::model::Limits) -> usize {
    limits.max_header_bytes.min(8192)
}

/// Turns the downstream head into the upstream head (minus URI and version, set per attempt).
fn prepare_head(head: &mut http::request::Parts, conn: &ConnInfo) {
    // HTTP/2 clients send :authority instead of Host; an HTTP/1.1 upstream needs Host, and
    // the client's host is what the backend should see (nginx `proxy_set_header Host $host`).
    // The authority first: an HTTP/1.1 request in origin form has none, and then the header
    // lookup is not needed.
    if let Some(a) = head.uri.authority()
        && !head.headers.contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        head.headers.insert(header::HOST, v);
    }
    headers::strip_hop_by_hop(&mut head.headers);
    headers::add_forwarding(
        &mut head.headers,
        conn.client.ip(),
        conn.scheme,
        head.version,
    );
    // An HTTP/2 upstream gets the host as :authority instead (l7/h2pool.rs).
}

fn passive_failure(cluster: &ClusterRuntime, idx: usize) {
    let p = &cluster.config.passive;
    let Some(ep) = cluster.health.endpoints.get(idx) else {
        return;
    };
    // Never eject the last endpoint that could serve (nginx ignores max_fails for a single
    // server and revives all peers when every one has failed): an ejection would turn a
    // struggling service into a dead one for a whole fail_timeout.
    let now = Instant::now();
    let others = cluster
        .health
        .endpoints
        .iter()
        .enumerate()
        .any(|(i, e)| i != idx && e.is_available(now));
    if !others {
        return;
    }
    if let Some(until) = ep.report_failure(now, p.max_fails, p.fail_timeout) {
        tracing::warn!(cluster = %cluster.name, endpoint = %cluster.config.endpoints[idx].address,
            max_fails = p.max_fails, fail_timeout = ?p.fail_timeout, "endpoint ejected by passive health");
        crate::health::schedule_expiry(Arc::clone(ep), until);
    }
}

fn respond(resp: Response<UpstreamBody>, mut log: Box<RequestLog>) -> Response<ResponseBody> {
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    // The version is per hop: an HTTP/1.0 backend must not turn the client's HTTP/1.1
    // keep-alive connection into an HTTP/1.0 one.
    parts.version = log.version;
    log.status = parts.status.as_u16();
    log.stream_slot = parts.extensions.remove();
    if log.grpc {
        log.grpc_status = grpc::status_of(&parts.headers);
    }
    Response::from_parts(parts, ResponseBody::upstream(body, log))
}

fn fail(
    mut log: Box<RequestLog>,
    status: StatusCode,
    reason: &'static str,
    close: bool,
) -> Response<ResponseBody> {
    log.error = Some(reason);
    if log.grpc {
        log.status = StatusCode::OK.as_u16();
        return grpc::error_response(reason, Some(log));
    }
    log.status = status.as_u16();
    local(status, reason, Some(log), close)
}

/// A response generated by lbd itself.
pub fn local(
    status: StatusCode,
    reason: &'static str,
    log: Option<Box<RequestLog>>,
    close: bool,
) -> Response<ResponseBody> {
    let text = format!(
        "{} {}: {}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        reason.replace('_', " ")
    );
    let mut resp = Response::new(ResponseBody::full(Bytes::from(text), log));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert("x-lbd-error", HeaderValue::from_static(reason));
    if close {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}
