//! "Call one cluster": pick an endpoint within its limits, send, and try again where that is
//! safe, with passive health fed from every failed attempt. The proxy core calls this once per
//! request; retries, per-try timeouts and (later) budgets and breakers are this step's policy,
//! not filters (Envoy's router filter and Pingora's `proxy_to_upstream` loop own them too).
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use http::{Response, Uri};
use hyper::body::Body as _;

use super::body::{Replay, RequestBody};
use super::cluster::{ClusterRuntime, Picked};
use super::conn::ConnInfo;
use super::downstream::DownstreamBody;
use super::grpc;
use super::log::RequestLog;
use super::reason::Reason;
use super::upstream::{UpstreamBody, UpstreamError};
use crate::balance::PickContext;

/// Upper bound on attempts per request, whatever the config says: a request must not walk a
/// large cluster endpoint by endpoint.
pub const MAX_ATTEMPTS: usize = 8;

/// Why a cluster call produced no upstream answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// What lbd answers.
    pub reason: Reason,
    /// The client connection must close after the answer (its body was not read to its end).
    pub close: bool,
}

impl From<Reason> for Failure {
    fn from(reason: Reason) -> Self {
        Failure {
            reason,
            close: false,
        }
    }
}

/// One request's call of a cluster.
pub struct Call<'a> {
    /// The cluster to call.
    pub cluster: &'a ClusterRuntime,
    /// The downstream connection (the client address feeds hash balancing).
    pub conn: &'a ConnInfo,
    /// The path and query to send (after rewrites).
    pub path: &'a Uri,
    /// Time allowed for the upstream's answer head.
    pub deadline: Duration,
    /// A gRPC call's deadline, when the client set one or the configured one applies.
    pub grpc_deadline: Option<&'a grpc::CallDeadline>,
    /// `max_body_bytes` of the listener; 0 = unlimited.
    pub body_limit: u64,
}

impl Call<'_> {
    /// Sends `head` and `body` to an endpoint of the cluster, retrying on another endpoint
    /// where nothing can be done twice. Fills in the attempt fields of `log`; on success, the
    /// endpoint's in-flight guard is in `log` until the response ends.
    pub async fn send(
        &self,
        head: &mut http::request::Parts,
        body: DownstreamBody,
        log: &mut RequestLog,
    ) -> Result<Response<UpstreamBody>, Failure> {
        let cluster = self.cluster;
        // When a failed attempt may be repeated elsewhere:
        // - nothing reached a backend (connect failed, the stream was refused or left out by
        //   a GOAWAY): always, whatever the method or body (gRPC clients retry these
        //   transparently too), as long as the body can still be sent whole;
        // - the connection broke after the request went out, before any answer: only for
        //   idempotent methods (RFC 9110 §9.2.2; nginx `proxy_next_upstream error`);
        // - a gRPC answer whose status is in `retry.grpc_status`.
        // A body is kept for another attempt up to REPLAY_BYTES when a retry after sending
        // is possible; otherwise only until its first byte is read.
        let grpc_retry = log.grpc && !cluster.config.retry.grpc_status.is_empty();
        let idempotent = head.method.is_idempotent();
        let max_attempts = (cluster.config.retry.attempts as usize + 1).min(MAX_ATTEMPTS);
        let limit = self.body_limit;
        let (mut body, replay) = if body.is_end_stream() {
            // Nothing to stream or count (most requests): no shared counter to allocate.
            (Some(RequestBody::Empty), None)
        } else if max_attempts == 1 {
            let seen = Arc::clone(log.bytes_in.insert(Arc::new(AtomicU64::new(0))));
            let inner = body;
            (Some(RequestBody::Stream { inner, limit, seen }), None)
        } else {
            let seen = Arc::clone(log.bytes_in.insert(Arc::new(AtomicU64::new(0))));
            let keep = if grpc_retry || idempotent {
                grpc::RETRY_BUFFER_BYTES
            } else {
                0
            };
            (None, Some(Replay::new(body, limit, seen, keep)))
        };
        let mut held = None;
        let mut tried = [usize::MAX; MAX_ATTEMPTS];
        let mut last_error = None;
        let mut at_limit = false;
        // The endpoint the client's sticky cookie names; it is asked for first, and an answer
        // from any other endpoint (re)sets the cookie.
        let wanted = cluster.sticky.as_ref().map(|s| s.wanted(&head.headers));
        for attempt in 0..max_attempts {
            let kept = match wanted {
                Some(Some(i)) if attempt == 0 => cluster.take(i, &[]).map(|g| (i, g)),
                _ => None,
            };
            let (idx, guard) = match kept {
                Some(picked) => picked,
                None => {
                    let ctx = PickContext {
                        client_ip: self.conn.client.ip(),
                        headers: &head.headers,
                    };
                    match cluster.pick_within_limit(&ctx, &tried[..attempt]) {
                        Picked::Endpoint(i, guard) => (i, guard),
                        Picked::None => break,
                        Picked::AllAtLimit => {
                            at_limit = true;
                            break;
                        }
                    }
                }
            };
            tried[attempt] = idx;
            if attempt > 0 {
                metrics::counter!(crate::telemetry::metrics::RETRIES, "cluster" => cluster.name.to_string())
                    .increment(1);
            }
            log.attempts = attempt as u32 + 1;
            log.endpoint = cluster.config.endpoints.get(idx).map(|e| e.address);
            let Some(uri) = cluster.upstream.uri(idx, self.path.path_and_query()) else {
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
            let budget = self.grpc_deadline.map_or(self.deadline, |c| c.remaining());
            match tokio::time::timeout(budget, cluster.upstream.send(idx, head, req_body, last))
                .await
            {
                Ok(Ok(resp)) => {
                    if grpc_retry
                        && attempt + 1 < max_attempts
                        && replay.as_ref().is_some_and(Replay::can_replay)
                        && let Some(code) =
                            grpc::retry_status(resp.headers(), &cluster.config.retry.grpc_status)
                    {
                        // Trailers-only, nothing sent downstream yet: try another endpoint,
                        // but keep this answer for the client in case no attempt does better.
                        tracing::info!(cluster = %cluster.name, endpoint = log.endpoint.map(tracing::field::display),
                            grpc_status = code, attempt = attempt + 1, "retrying gRPC call");
                        held = Some(resp);
                        continue;
                    }
                    log.upstream = Some(sent.elapsed());
                    log.in_flight = Some(guard);
                    let mut resp = resp;
                    if let (Some(wanted), Some(sticky)) = (wanted, &cluster.sticky)
                        && wanted != Some(idx)
                        && let Some(v) = sticky.set_cookie(idx)
                    {
                        resp.headers_mut()
                            .append(http::header::SET_COOKIE, v.clone());
                    }
                    return Ok(resp);
                }
                Ok(Err((kind, err))) => {
                    // Like nginx's "connect() failed (111: Connection refused) while
                    // connecting to upstream": one line per failed attempt, with the whole
                    // cause chain.
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
                            return Err(Failure {
                                reason: Reason::BodyTooLarge,
                                close: true,
                            });
                        }
                        UpstreamError::ClientBody => {
                            return Err(Failure {
                                reason: Reason::ClientBody,
                                close: true,
                            });
                        }
                        UpstreamError::Connect | UpstreamError::Tls => {
                            cluster.passive_failure(idx);
                            last_error = Some(kind);
                        }
                        UpstreamError::Reset => {
                            cluster.passive_failure(idx);
                            last_error = Some(kind);
                            if !idempotent {
                                break;
                            }
                        }
                    }
                }
                Err(_elapsed) => {
                    log.upstream = Some(sent.elapsed());
                    if self.grpc_deadline.is_some_and(|c| c.client_set) {
                        // The client's deadline, not a slow endpoint: no passive-health
                        // strike. Dropping the send future resets the upstream stream.
                        return Err(Reason::DeadlineExceeded.into());
                    }
                    cluster.passive_failure(idx);
                    return Err(Reason::UpstreamTimeout.into());
                }
            }
        }
        if let Some(resp) = held {
            return Ok(resp);
        }
        Err(match last_error {
            None if at_limit => Reason::EndpointLimit,
            None => Reason::NoHealthyEndpoint,
            Some(UpstreamError::Connect) => Reason::UpstreamConnect,
            Some(UpstreamError::Tls) => Reason::UpstreamTls,
            Some(_) => Reason::UpstreamReset,
        }
        .into())
    }
}
