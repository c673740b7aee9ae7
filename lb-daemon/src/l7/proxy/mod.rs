//! The request path, as phases: admit → route → filters (request) → forward → respond →
//! filters (response), and the log record closes when the response body ends.
//!
//! lbd answers by itself only when it must, always naming the [`Reason`] in `x-lbd-error`
//! (see `reason.rs` for every one and its status).
pub mod buffered;
pub mod forward;
pub mod https_redirect;
pub mod retry;
pub mod split;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, Version, header};
use hyper::body::Body as _;

use crate::config::model::{HashKey, Policy};
use crate::l7::answer;
use crate::l7::body::ResponseBody;
use crate::l7::cluster::upstream::{self, UpstreamBody};
use crate::l7::conn::ConnInfo;
use crate::l7::downstream::DownstreamBody;
use crate::l7::filter::vars::request_host;
use crate::l7::filter::{Chain, Exchange, Flow, Notes, ResponseView};
use crate::l7::grpc;
use crate::l7::headers::{self, Forwarding};
use crate::l7::log::RequestLog;
use crate::l7::proxy::forward::{Call, Failure};
use crate::l7::reason::Reason;
use crate::l7::router;
use crate::l7::runtime::{ListenerRuntime, Runtime};
use buffered::Rewritten;

/// Handles one request against the runtime snapshot `rt`.
pub async fn handle(
    rt: Arc<Runtime>,
    conn: ConnInfo,
    req: Request<DownstreamBody>,
) -> Response<ResponseBody> {
    let start = Instant::now();
    let Some(listener) = rt.listener(conn.listener) else {
        // The listener was removed by a reload while this connection stayed open.
        return answer::reply(
            Reason::ListenerRemoved,
            grpc::is_grpc(req.headers()),
            true,
            None,
        );
    };
    let (mut head, mut body) = req.into_parts();
    let mut log = begin_log(&rt, listener, &conn, &head, start);
    if let Some(tracer) = &rt.tracer {
        log.trace = Some(tracer.begin(&mut head, conn.client));
    }

    // Admit.
    if let Err(f) = admit(&head, &body, listener) {
        return fail(log, f);
    }
    if listener.redirect_https {
        let (mut parts, bytes) = https_redirect::answer(&head).into_parts();
        parts.version = log.version;
        log.status = parts.status.as_u16();
        // The body is left unread: the connection cannot carry another request.
        if !body.is_end_stream() {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        return Response::from_parts(parts, ResponseBody::full(bytes, Some(log)));
    }

    // Route.
    let Some(route_idx) = listener.router.route(&rt.model, &head) else {
        return fail(log, Reason::NoRoute.into());
    };
    let route = &rt.model.routes[route_idx];
    let route_rt = &rt.routes[route_idx];
    // A split route draws its cluster here, before filters see the request; a plain route
    // has its one cluster and its one set of metrics.
    let (cluster_idx, side, split_cookie) = match &route_rt.split {
        None => (route.cluster, 0, None),
        Some(split) => {
            let p = split.pick(&head.headers, conn.client.ip());
            (p.cluster, p.side, p.set_cookie)
        }
    };
    let cluster = &rt.clusters[cluster_idx];
    log.route = Arc::clone(&route_rt.name);
    log.cluster = Arc::clone(&cluster.name);
    log.metrics = Arc::clone(&listener.route_metrics[route_idx][side]);

    let deadline = route
        .timeout
        .unwrap_or(listener.limits.request_timeout)
        .min(cluster.config.timeouts.response);
    // A gRPC client's deadline (capped by the configured one) bounds the whole call.
    let grpc_deadline = log
        .grpc
        .then(|| grpc::CallDeadline::new(&head.headers, start, deadline))
        .flatten();
    if route.rewrite.is_some() {
        head.uri = router::rewrite_uri(route, &head.uri);
    }

    // Filters, request phase.
    let mut notes = Notes::default();
    let mut ran = 0;
    if !route_rt.chain.is_empty() {
        if route_rt.chain.keeps_host() {
            notes.host = request_host(&head).map(Bytes::copy_from_slice);
        }
        let mut ex = Exchange {
            head: &mut head,
            conn: &conn,
            route,
            route_name: &route_rt.name,
            notes: &mut notes,
            log: &mut log,
        };
        // Inline: the chain's future is small (~160 bytes) because each filter that may wait
        // on the network boxes its own large state (`jwt`'s key-set fetch, a Redis limit).
        let (n, flow) = route_rt.chain.request(&mut ex).await;
        ran = n;
        let after = After {
            chain: &route_rt.chain,
            ran,
            conn: &conn,
            route_name: &route_rt.name,
            notes: &notes,
        };
        // An answer leaves the request body unread: the connection cannot be reused.
        let close = !body.is_end_stream();
        match flow {
            None => {}
            Some(Flow::Answer(resp)) => {
                let (mut parts, bytes) = resp.into_parts();
                parts.version = log.version;
                log.status = parts.status.as_u16();
                if close {
                    parts
                        .headers
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                let resp = Response::from_parts(parts, ResponseBody::full(bytes, Some(log)));
                return after.response(resp);
            }
            Some(Flow::Refuse(reason)) => {
                return after.response(fail(log, Failure { reason, close }));
            }
            Some(Flow::Challenge(reason, challenge)) => {
                let mut resp = fail(log, Failure { reason, close });
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, challenge);
                return after.response(resp);
            }
            Some(Flow::Next) => {}
        }
        // The body phase, for chains with a filter that may need the whole body (its future
        // is boxed by `buffered`, so that it does not grow every request's future).
        if route_rt.chain.buffers_requests() && !body.is_end_stream() {
            let limit = listener.limits.max_body_bytes;
            body = match buffered::request(&route_rt.chain, ran, &mut head, body, limit).await {
                Ok(b) => b,
                Err(f) => return after.response(fail(log, f)),
            };
        }
    }
    let path = head.uri.clone();
    prepare_head(&mut head, &conn);
    let fwd = Forwarding {
        client: conn.client.ip(),
        scheme: conn.scheme,
        version: head.version,
    };
    // An HTTP/1.1 upstream writes the forwarding headers itself; the map gets them only when
    // something reads it: an HTTP/2 upstream, a mirror, a balancer hashing one of them.
    let forwarding = if cluster.upstream.version() == Version::HTTP_11
        && notes.mirror.is_none()
        && !hashes_forwarding(&cluster.config.policy)
    {
        Some(fwd)
    } else {
        fwd.apply(&mut head.headers);
        None
    };
    if let Some(call) = &grpc_deadline {
        call.propagate(&mut head.headers);
    }
    // A mirror starts now that the head is final; it may tee the body, and waits for the
    // primary's digest when it compares.
    let (body, digest) = match notes.mirror.take() {
        Some(ticket) => ticket.start(&head, &path, conn.client.ip(), body),
        None => (body, None),
    };

    // Forward.
    let call = Call {
        cluster,
        conn: &conn,
        path: &path,
        deadline,
        grpc_deadline: grpc_deadline.as_ref(),
        body_limit: listener.limits.max_body_bytes,
        retry: route.retry.as_ref().unwrap_or(&cluster.config.retry),
        forwarding,
    };
    // Inline, not boxed: the attempt loop's state (~2.7 KiB) is this future's largest part,
    // but a box costs an allocation and a copy of it per request, more than its room in the
    // future that the connection boxes (26.9k → 26.5k instructions per keep-alive request
    // without the box, bench/callgrind.sh, once no unboxed temporary outlived its statement).
    let resp = match call.send(&mut head, body, &mut log).await {
        Ok(mut resp) => {
            if let Some(v) = split_cookie {
                resp.headers_mut().append(header::SET_COOKIE, v.clone());
            }
            // An HTTP/1.1 upstream's header fields stay bytes, copied to the client with the
            // hop-by-hop ones left out, unless something here reads them: response filters,
            // gRPC, a mirror comparing answers, or an HTTP/2 client (hyper's server).
            let copied = !route_rt.chain.needs_response_map(ran)
                && !log.grpc
                && digest.is_none()
                && matches!(log.version, Version::HTTP_10 | Version::HTTP_11);
            if !copied {
                upstream::full_headers(&mut resp);
            }
            let mut resp = if ran > 0 && route_rt.chain.buffers_responses() {
                let view = ResponseView {
                    conn: &conn,
                    route_name: &route_rt.name,
                    notes: &notes,
                    log: &log,
                };
                match buffered::response(&route_rt.chain, ran, resp, &view, deadline).await {
                    Ok(Rewritten::Untouched(resp)) => respond(resp, log),
                    Ok(Rewritten::Whole(parts, bytes)) => respond_whole(parts, bytes, log),
                    Err(reason) => fail(log, reason.into()),
                }
            } else {
                respond(resp, log)
            };
            if let Some((tx, limit)) = digest {
                resp = tap(resp, tx, limit);
            }
            match grpc_deadline {
                Some(c) => grpc::bound_response(resp, c),
                None => resp,
            }
        }
        Err(f) => {
            let resp = fail(log, f);
            match digest {
                Some((tx, limit)) => tap(resp, tx, limit),
                None => resp,
            }
        }
    };
    if ran == 0 {
        return resp;
    }
    After {
        chain: &route_rt.chain,
        ran,
        conn: &conn,
        route_name: &route_rt.name,
        notes: &notes,
    }
    .response(resp)
}

/// The response phase of a route's filters, for whichever response the exchange ends with.
struct After<'a> {
    chain: &'a Chain,
    ran: usize,
    conn: &'a ConnInfo,
    route_name: &'a str,
    notes: &'a Notes,
}

impl After<'_> {
    fn response(&self, resp: Response<ResponseBody>) -> Response<ResponseBody> {
        if !self.chain.reads_response(self.ran) {
            return resp;
        }
        let (mut parts, mut body) = resp.into_parts();
        if let Some(raw) = body.fields_mut() {
            self.chain.drop_replaced(self.ran, raw);
        }
        if let Some(log) = body.log() {
            let view = ResponseView {
                conn: self.conn,
                route_name: self.route_name,
                notes: self.notes,
                log,
            };
            self.chain.response(self.ran, &mut parts, &view);
        }
        Response::from_parts(parts, body)
    }
}

/// The access-log record of a request, before it is routed.
fn begin_log(
    rt: &Runtime,
    listener: &ListenerRuntime,
    conn: &ConnInfo,
    parts: &http::request::Parts,
    start: Instant,
) -> Box<RequestLog> {
    Box::new(RequestLog {
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
        breaker: None,
        grpc: grpc::is_grpc(&parts.headers),
        stream_slot: None,
        grpc_status: None,
        request_id: None,
        consumer: None,
        trace: None,
    })
}

/// Requests lbd refuses before routing. Each refusal leaves the body unread, so it closes.
fn admit(
    parts: &http::request::Parts,
    body: &DownstreamBody,
    listener: &ListenerRuntime,
) -> Result<(), Failure> {
    let refuse = |reason| {
        Err(Failure {
            reason,
            close: true,
        })
    };
    if parts.uri.path_and_query().map_or(0, |p| p.as_str().len()) > max_uri_bytes(&listener.limits)
    {
        return refuse(Reason::UriTooLong);
    }
    if parts.method == Method::CONNECT {
        return refuse(Reason::ConnectUnsupported);
    }
    let limit = listener.limits.max_body_bytes;
    if limit > 0 && body.size_hint().lower() > limit {
        // Declared too large up front: refused without reading it.
        return refuse(Reason::BodyTooLarge);
    }
    Ok(())
}

/// Longest request target accepted (nginx's `large_client_header_buffers` default is 8 KiB);
/// never more than the whole head may be.
fn max_uri_bytes(limits: &crate::config::model::Limits) -> usize {
    limits.max_header_bytes.min(8192)
}

/// Turns the downstream head into the upstream head (minus URI and version, set per attempt).
/// The forwarding headers are added apart (see [`Forwarding`]).
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
    if let Some(h) = &conn.cert_headers {
        h.apply(&mut head.headers);
    }
    // An HTTP/2 upstream gets the host as :authority instead (l7/h2/pool.rs).
}

/// Whether the balancer keys on a field the forwarding headers set (it must see them).
fn hashes_forwarding(policy: &Policy) -> bool {
    let name = match policy {
        Policy::HeaderHash(name) | Policy::Maglev(HashKey::Header(name)) => name,
        _ => return false,
    };
    Forwarding::replaces(name)
}

fn respond(resp: Response<UpstreamBody>, mut log: Box<RequestLog>) -> Response<ResponseBody> {
    let (mut parts, mut body) = resp.into_parts();
    log.stream_slot = body.take_slot();
    downstream_head(&mut parts, &mut log);
    Response::from_parts(parts, ResponseBody::upstream(body, log))
}

/// An upstream answer whose body the response body phase holds whole.
fn respond_whole(
    mut parts: http::response::Parts,
    body: Bytes,
    mut log: Box<RequestLog>,
) -> Response<ResponseBody> {
    downstream_head(&mut parts, &mut log);
    Response::from_parts(parts, ResponseBody::full(body, Some(log)))
}

/// Turns an upstream answer's head into the client's, noting it in the log.
fn downstream_head(parts: &mut http::response::Parts, log: &mut RequestLog) {
    headers::strip_hop_by_hop(&mut parts.headers);
    // The version is per hop: an HTTP/1.0 backend must not turn the client's HTTP/1.1
    // keep-alive connection into an HTTP/1.0 one.
    parts.version = log.version;
    log.status = parts.status.as_u16();
    if log.grpc {
        log.grpc_status = grpc::status_of(&parts.headers);
    }
}

/// Hands the response's digest to a mirror comparing answers, as its body streams.
fn tap(
    resp: Response<ResponseBody>,
    tx: tokio::sync::oneshot::Sender<crate::l7::body::Digest>,
    limit: u64,
) -> Response<ResponseBody> {
    let status = resp.status().as_u16();
    resp.map(|b| b.tapped(status, limit, tx))
}

fn fail(log: Box<RequestLog>, f: Failure) -> Response<ResponseBody> {
    let grpc = log.grpc;
    answer::reply(f.reason, grpc, f.close, Some(log))
}
