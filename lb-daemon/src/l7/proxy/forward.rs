//! "Call one cluster": pick an endpoint within its limits, send, and try again where the
//! retry policy allows it, with passive health fed from every failed attempt. The proxy core
//! calls this once per request; retries, per-try timeouts, the retry budget and the circuit
//! breakers are this step's policy, not filters (Envoy's router filter and Pingora's
//! `proxy_to_upstream` loop own them too). The decisions themselves live in `retry.rs`,
//! `budget.rs` and `breaker.rs`; this is the loop that asks them.
use std::future::poll_fn;
use std::pin::pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http::{Response, Uri};
use hyper::body::Body as _;

use crate::balance::PickContext;
use crate::config::model::Retry;
use crate::health::InFlightGuard;
use crate::l7::body::{Replay, RequestBody};
use crate::l7::cluster::breaker::Slot;
use crate::l7::cluster::upstream::{UpstreamBody, UpstreamError, UpstreamFailure};
use crate::l7::cluster::{ClusterRuntime, Picked};
use crate::l7::conn::ConnInfo;
use crate::l7::downstream::DownstreamBody;
use crate::l7::grpc;
use crate::l7::log::RequestLog;
use crate::l7::proxy::retry::{self, Outcome};
use crate::l7::reason::Reason;
use crate::l7::timer::{self, TimedOut, Timer};
use crate::telemetry::metrics as m;

/// Upper bound on attempts per request, whatever the config says: a request must not walk a
/// large cluster endpoint by endpoint.
pub const MAX_ATTEMPTS: usize = crate::config::retry::MAX_ATTEMPTS as usize;

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
    /// The route's retry policy, or the cluster's.
    pub retry: &'a Retry,
    /// The forwarding headers, when they are not in the head yet.
    pub forwarding: Option<crate::l7::headers::Forwarding>,
}

/// A retry that may go ahead: the wait before it and its place under `max_retries`.
struct Granted {
    wait: Duration,
    slot: Option<Slot>,
}

/// The request's time, fixed when the first attempt starts.
#[derive(Clone, Copy)]
struct Clock {
    start: Instant,
    deadline: Duration,
}

impl Clock {
    fn remaining(self) -> Duration {
        self.remaining_at(Instant::now())
    }

    /// What is left at `now` (read once per attempt for both its timing and its deadline).
    fn remaining_at(self, now: Instant) -> Duration {
        self.deadline
            .saturating_sub(now.saturating_duration_since(self.start))
    }
}

impl Call<'_> {
    /// Sends `head` and `body` to an endpoint of the cluster, retrying where the policy, the
    /// budget and the breakers allow it. Fills in the attempt fields of `log`; on success, the
    /// endpoint's in-flight guard (and the `max_requests` slot) is in `log` until the
    /// response ends.
    pub async fn send(
        &self,
        head: &mut http::request::Parts,
        body: DownstreamBody,
        log: &mut RequestLog,
    ) -> Result<Response<UpstreamBody>, Failure> {
        let cluster = self.cluster;
        let policy = self.retry;
        // Over a threshold: answered at once, never queued. An unread body closes the
        // connection, as for every refusal before the body is read.
        let open = Failure {
            reason: Reason::CircuitOpen,
            close: !body.is_end_stream(),
        };
        let Ok(request_slot) = cluster.breakers.requests.enter() else {
            return Err(open);
        };
        // Held until the answer head (this function's return).
        let Ok(_pending) = cluster.breakers.pending.enter() else {
            return Err(open);
        };
        // When a failed attempt may be repeated (retry.rs has the rules): nothing reached a
        // backend (connect failed, stream refused or left out by a GOAWAY) whatever the
        // method; after the request went out only for idempotent methods unless the policy
        // says otherwise; gRPC answers with one of `grpc_status`. A body is kept for another
        // attempt up to `max_replay_bytes` when a retry after sending is possible; otherwise
        // only until its first byte is read.
        let grpc_statuses: &[u8] = if log.grpc { &policy.grpc_status } else { &[] };
        let idempotent = head.method.is_idempotent();
        let max_attempts = (policy.attempts as usize + 1).min(MAX_ATTEMPTS);
        if max_attempts > 1 {
            cluster.budget.deposit();
        }
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
            let after_send = ((idempotent || policy.non_idempotent)
                && (policy.on.reset || policy.on.any_status() || policy.per_try_timeout.is_some()))
                || !grpc_statuses.is_empty()
                || (idempotent && policy.hedge_delay.is_some());
            let keep = if after_send {
                policy.max_replay_bytes
            } else {
                0
            };
            (None, Some(Replay::new(body, limit, seen, keep)))
        };
        let clock = Clock {
            start: Instant::now(),
            deadline: self.grpc_deadline.map_or(self.deadline, |c| c.remaining()),
        };
        // An answer a retry may still better, with the endpoint that gave it.
        let mut held: Option<(Response<UpstreamBody>, usize)> = None;
        let mut tried = [usize::MAX; MAX_ATTEMPTS];
        let mut last_error = None;
        let mut at_limit = false;
        // The running retry's place under `max_retries`.
        let mut _retry_slot: Option<Slot> = None;
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
                    let mut picked = cluster.pick_within_limit(&ctx, &tried[..attempt]);
                    if attempt > 0 && matches!(picked, Picked::None) {
                        // Every other endpoint was tried: the same one again beats none.
                        picked = cluster.pick_within_limit(&ctx, &[]);
                    }
                    match picked {
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
                metrics::counter!(m::RETRIES, "cluster" => cluster.name.to_string()).increment(1);
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
            let remaining = clock.remaining_at(sent);
            let per_try = policy.per_try_timeout.filter(|t| *t < remaining);
            let time = per_try.unwrap_or(remaining);
            let hedge = policy
                .hedge_delay
                .filter(|d| attempt == 0 && idempotent && !last && *d < time);
            let (idx, guard, result) = match hedge {
                None => {
                    // Polled in place with its timer: wrapping the send in a deadline future
                    // would move its state (over a kilobyte) once more per request.
                    let mut sending = pin!(cluster.upstream.send(
                        idx,
                        head,
                        self.forwarding.as_ref(),
                        req_body,
                        last
                    ));
                    let mut timer = Timer::at(tokio::time::Instant::from_std(sent) + time);
                    let result = poll_fn(|c| timer.race(sending.as_mut(), c)).await;
                    (idx, guard, result)
                }
                // Boxed: two sends in flight make the hedge's state large, and inline it would
                // grow every request's future (copied whole when the connection task boxes it)
                // for a path few routes take.
                Some(delay) => {
                    let first = Hedged {
                        idx,
                        guard,
                        body: req_body,
                    };
                    let hedging = crate::l7::box_in_place!(self.hedged(
                        head,
                        first,
                        replay.as_ref(),
                        time,
                        delay
                    ));
                    hedging.await
                }
            };
            tried[attempt] = idx;
            log.endpoint = cluster.config.endpoints.get(idx).map(|e| e.address);
            let outcome = match result {
                Ok(Ok(mut resp)) => {
                    if !grpc_statuses.is_empty() {
                        // An HTTP/1.1 answer's fields are bytes until something reads them.
                        crate::l7::cluster::upstream::full_headers(&mut resp);
                    }
                    cluster.observe_response(idx, &resp);
                    let status = resp.status().as_u16();
                    let failed = if policy.on.any_status() && policy.on.status(status) {
                        Some(Outcome::Status(status))
                    } else if !grpc_statuses.is_empty()
                        && grpc::retry_status(resp.headers(), grpc_statuses).is_some()
                    {
                        Some(Outcome::GrpcStatus)
                    } else {
                        None
                    };
                    log.upstream = Some(sent.elapsed());
                    if let Some(outcome) = failed
                        && !last
                    {
                        crate::l7::cluster::upstream::full_headers(&mut resp);
                        let pushback = retry::retry_after(resp.headers(), SystemTime::now());
                        if let Some(g) =
                            self.grant(outcome, attempt, idempotent, &replay, pushback, clock)
                        {
                            // Nothing sent downstream yet: try again, but keep this answer
                            // for the client in case no attempt does better.
                            tracing::debug!(cluster = %cluster.name, endpoint = log.endpoint.map(tracing::field::display),
                                status, grpc_status = grpc::status_of(resp.headers()), attempt = attempt + 1,
                                "retrying after a retriable answer");
                            held = Some((resp, idx));
                            _retry_slot = g.slot;
                            wait(g.wait).await;
                            continue;
                        }
                    }
                    log.in_flight = Some(guard);
                    log.breaker = request_slot;
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
                            last_error = Some(if matches!(kind, UpstreamError::Tls) {
                                Reason::UpstreamTls
                            } else {
                                Reason::UpstreamConnect
                            });
                            Outcome::Connect
                        }
                        UpstreamError::ConnectionLimit => {
                            // Envoy's max_connections: refused at once, no other attempt
                            // (it would meet the same limit), no strike against the endpoint.
                            last_error = Some(Reason::CircuitOpen);
                            break;
                        }
                        UpstreamError::Reset => {
                            cluster.passive_failure(idx);
                            last_error = Some(Reason::UpstreamReset);
                            Outcome::Reset
                        }
                    }
                }
                Err(_elapsed) => {
                    log.upstream = Some(sent.elapsed());
                    if per_try.is_none() {
                        // The request's own deadline: no time for another attempt.
                        if self.grpc_deadline.is_some_and(|c| c.client_set) {
                            // The client's deadline, not a slow endpoint: no passive-health
                            // strike. Dropping the send future resets the upstream stream.
                            return Err(Reason::DeadlineExceeded.into());
                        }
                        cluster.passive_failure(idx);
                        return Err(Reason::UpstreamTimeout.into());
                    }
                    cluster.passive_failure(idx);
                    tracing::warn!(cluster = %cluster.name, endpoint = log.endpoint.map(tracing::field::display),
                        attempt = attempt + 1, per_try_timeout = ?per_try, "upstream attempt timed out");
                    last_error = Some(Reason::UpstreamTimeout);
                    Outcome::Timeout
                }
            };
            if last {
                break;
            }
            match self.grant(outcome, attempt, idempotent, &replay, None, clock) {
                Some(g) => {
                    _retry_slot = g.slot;
                    wait(g.wait).await;
                }
                None => break,
            }
        }
        if let Some((resp, idx)) = held {
            log.endpoint = cluster.config.endpoints.get(idx).map(|e| e.address);
            log.breaker = request_slot;
            return Ok(resp);
        }
        Err(match last_error {
            None if at_limit => Reason::EndpointLimit,
            None => Reason::NoHealthyEndpoint,
            Some(reason) => reason,
        }
        .into())
    }

    /// Whether attempt `attempt` (0-based), failed with `outcome`, is followed by another:
    /// the policy allows it, the body can be sent again, the wait (backoff, or the backend's
    /// `pushback`) fits in the request's time, a `max_retries` place is free and the budget
    /// has a retry left. Refusals other than the policy's are counted.
    fn grant(
        &self,
        outcome: Outcome,
        attempt: usize,
        idempotent: bool,
        replay: &Option<Arc<Mutex<Replay>>>,
        pushback: Option<Duration>,
        clock: Clock,
    ) -> Option<Granted> {
        if !retry::allows(self.retry, outcome, idempotent) {
            return None;
        }
        let cluster = self.cluster;
        let deny = |reason| deny(cluster, reason);
        if replay.as_ref().is_some_and(|r| !Replay::can_replay(r)) {
            deny("body_too_large");
            return None;
        }
        let backoff = retry::backoff(self.retry, attempt as u32 + 1);
        let wait = pushback.map_or(backoff, |p| p.max(backoff));
        if wait >= clock.remaining() {
            // A backend asking for more time than the request has left gets its answer
            // passed on as it is.
            if pushback.is_some() {
                deny("retry_after");
            }
            return None;
        }
        let Ok(slot) = cluster.breakers.retries.enter() else {
            deny("circuit_open");
            return None;
        };
        // A retry of an attempt that reached no backend costs the backends nothing.
        if outcome.reached_backend() && !cluster.budget.withdraw() {
            deny("budget");
            return None;
        }
        Some(Granted { wait, slot })
    }
}

/// What one attempt (or a hedged pair) came to: the endpoint whose result it is, its
/// in-flight guard, and the result (an answer, a failure, or no answer in time).
type Tried = (usize, InFlightGuard, Attempted);
type Attempted = Result<Result<Response<UpstreamBody>, (UpstreamError, UpstreamFailure)>, TimedOut>;

/// The first try of a hedged request: its endpoint, in-flight guard and body.
struct Hedged {
    idx: usize,
    guard: InFlightGuard,
    body: RequestBody,
}

impl Call<'_> {
    /// The first attempt of a hedged request (`hedge_delay`; idempotent): when endpoint
    /// `idx` has not answered after `delay`, a second try goes to another endpoint, within
    /// the budget and `max_retries`; the first answer wins and dropping the other cancels it
    /// (its HTTP/2 stream is reset, its HTTP/1.1 connection closed). A request body is sent
    /// again from the replay copy, so only once the client has sent all of it (within
    /// `max_replay_bytes`): like Envoy's per-try timeout, the hedge clock is about an answer
    /// the backend could have given, not about a client still uploading.
    async fn hedged(
        &self,
        head: &mut http::request::Parts,
        first: Hedged,
        replay: Option<&Arc<Mutex<Replay>>>,
        time: Duration,
        delay: Duration,
    ) -> Tried {
        let Hedged { idx, guard, body } = first;
        let cluster = self.cluster;
        let (mut copy, ()) = http::Request::new(()).into_parts();
        copy.method = head.method.clone();
        copy.version = head.version;
        copy.headers = head.headers.clone();
        let started = Instant::now();
        let first = timer::within(
            time,
            cluster
                .upstream
                .send(idx, head, self.forwarding.as_ref(), body, false),
        );
        tokio::pin!(first);
        tokio::select! {
            r = &mut first => return (idx, guard, r),
            () = tokio::time::sleep(delay) => {}
        }
        let second_body = match replay {
            None => RequestBody::Empty,
            Some(r) => match Replay::complete(r) {
                Some(true) => match Replay::copy(r) {
                    Some(b) => b,
                    None => return (idx, guard, first.await),
                },
                Some(false) => {
                    deny(cluster, "body_too_large");
                    return (idx, guard, first.await);
                }
                // Still uploading: the backend is not late yet.
                None => return (idx, guard, first.await),
            },
        };
        let ctx = PickContext {
            client_ip: self.conn.client.ip(),
            headers: &copy.headers,
        };
        let Picked::Endpoint(other, other_guard) = cluster.pick_within_limit(&ctx, &[idx]) else {
            return (idx, guard, first.await);
        };
        let Some(uri) = cluster.upstream.uri(other, self.path.path_and_query()) else {
            return (idx, guard, first.await);
        };
        let Ok(_slot) = cluster.breakers.retries.enter() else {
            deny(cluster, "circuit_open");
            return (idx, guard, first.await);
        };
        if !cluster.budget.withdraw() {
            deny(cluster, "budget");
            return (idx, guard, first.await);
        }
        metrics::counter!(m::HEDGES, "cluster" => cluster.name.to_string()).increment(1);
        tracing::debug!(cluster = %cluster.name, first = idx, hedge = other, "hedging");
        copy.uri = uri;
        let second = timer::within(
            time.saturating_sub(started.elapsed()),
            cluster.upstream.send(
                other,
                &mut copy,
                self.forwarding.as_ref(),
                second_body,
                true,
            ),
        );
        tokio::pin!(second);
        // The first answer wins; a failure waits for the other try.
        tokio::select! {
            r = &mut first => match r {
                Ok(Ok(_)) => (idx, guard, r),
                _ => {
                    self.strike(idx, &r);
                    (other, other_guard, second.await)
                }
            },
            r = &mut second => match r {
                Ok(Ok(_)) => (other, other_guard, r),
                _ => {
                    self.strike(other, &r);
                    (idx, guard, first.await)
                }
            },
        }
    }

    /// Passive health for the losing half of a hedge that failed.
    fn strike(&self, idx: usize, r: &Attempted) {
        if matches!(
            r,
            Err(_) | Ok(Err((UpstreamError::Connect | UpstreamError::Reset, _)))
        ) {
            self.cluster.passive_failure(idx);
        }
    }
}

/// Counts a retry (or hedge) the policy allowed but that was not made.
fn deny(cluster: &ClusterRuntime, reason: &'static str) {
    metrics::counter!(m::RETRIES_DENIED,
        "cluster" => cluster.name.to_string(), "reason" => reason)
    .increment(1);
    tracing::debug!(cluster = %cluster.name, reason, "retry not made");
}

async fn wait(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}
