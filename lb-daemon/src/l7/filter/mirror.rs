//! `mirror`: a share of a route's requests is also sent to a shadow cluster, on a task of its
//! own, and (with `compare`) the shadow's answer is checked against the primary's.
//!
//! The primary never waits for the shadow. The request phase only decides (the share, a free
//! in-flight slot) and leaves a [`Ticket`] in the notes; the core starts it once the upstream
//! head is final (after every rewrite), handing it the body to send to the primary:
//! - no body: the shadow request goes out at once;
//! - a body: it is teed as it streams to the primary (`DownstreamBody::Tee`) and the copy goes
//!   out when the body has ended; a body declared or grown beyond `max_body_bytes`, or one the
//!   primary did not read to its end, is not mirrored (`lbd_mirror_skipped_total`).
//!
//! The shadow request: same method, path and query (after rewrites), the headers the primary
//! gets plus `x-lbd-mirror: 1`, and the Host with `-shadow` appended to its name, as Envoy does
//! (`shop.example.com:8443` → `shop.example.com-shadow:8443`), so that a shared backend can
//! tell shadow traffic apart. Trailers are not mirrored. One attempt, no retry, bounded by the
//! shadow cluster's `timeouts.response` for head and body together.
//!
//! Comparing: the primary's response body is hashed as it streams to the client (never
//! held); both sides' digests (status, and a body hash while the body is within
//! `max_body_bytes`) meet in the mirror's task. A primary answer that did not reach its end
//! (client gone) is not compared.
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderValue, Uri};
use http_body_util::BodyExt as _;
use hyper::body::Body as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use super::Exchange;
use crate::balance::PickContext;
use crate::config::filter::mirror::Spec;
use crate::l7::body::{BodyHasher, Digest, RequestBody};
use crate::l7::cluster::upstream::UpstreamError;
use crate::l7::cluster::{ClusterRuntime, Picked};
use crate::l7::downstream::{DownstreamBody, Tee, TeeLost};
use crate::telemetry::metrics as m;

/// The header that marks a mirrored request.
pub const MIRROR_HEADER: &str = "x-lbd-mirror";

/// At most one mismatch line per this many milliseconds per filter; the rest are counted.
const LOG_EVERY_MS: u64 = 1000;

/// The running `mirror` filter.
#[derive(Debug)]
pub struct Mirror {
    shared: Arc<Shared>,
    /// Share mirrored, in hundredths of a percent.
    per_10k: u64,
    /// Requests seen, for an even, deterministic spread of the share.
    seen: AtomicU64,
    /// In-flight mirrors.
    slots: Arc<Semaphore>,
}

/// What a mirror's tasks share with the filter.
#[derive(Debug)]
struct Shared {
    cluster: Arc<ClusterRuntime>,
    route: Arc<str>,
    max_body: u64,
    compare: bool,
    answered: metrics::Counter,
    failed: metrics::Counter,
    skipped_too_large: metrics::Counter,
    skipped_incomplete: metrics::Counter,
    skipped_in_flight: metrics::Counter,
    /// `match`, `status_mismatch`, `body_mismatch`, `shadow_error`.
    compared: [metrics::Counter; 4],
    /// Mismatch log rate limit: when the last line was written, and lines left out since.
    epoch: Instant,
    last_log_ms: AtomicU64,
    unlogged: AtomicU64,
}

/// A request picked for mirroring, with its in-flight slot; started by the core.
#[derive(Debug)]
pub struct Ticket {
    shared: Arc<Shared>,
    /// Held until the mirror's task ends.
    _permit: OwnedSemaphorePermit,
}

/// Where the shadow's body comes from.
enum Source {
    Ready(Bytes),
    Teed(oneshot::Receiver<Result<Bytes, TeeLost>>),
}

/// How a comparison came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Match = 0,
    StatusMismatch = 1,
    BodyMismatch = 2,
    ShadowError = 3,
}

impl Verdict {
    const LABELS: [&'static str; 4] = ["match", "status_mismatch", "body_mismatch", "shadow_error"];

    fn of(primary: Digest, shadow: Option<Digest>) -> Verdict {
        match shadow {
            None => Verdict::ShadowError,
            Some(s) if s.status != primary.status => Verdict::StatusMismatch,
            Some(s) => match (primary.hash, s.hash) {
                (Some(a), Some(b)) if a != b => Verdict::BodyMismatch,
                _ => Verdict::Match,
            },
        }
    }
}

impl Mirror {
    /// Builds the filter for `spec` on route `route`, sending to `cluster` (the runtime of
    /// `spec.cluster`).
    pub fn new(spec: &Spec, cluster: Arc<ClusterRuntime>, route: &Arc<str>) -> Self {
        let r = route.to_string();
        let skipped = |reason: &'static str| metrics::counter!(m::MIRROR_SKIPPED, "route" => r.clone(), "reason" => reason);
        let sent = |result: &'static str| {
            metrics::counter!(m::MIRROR_SENT, "route" => r.clone(),
                "cluster" => spec.cluster_name.clone(), "result" => result)
        };
        let compared = Verdict::LABELS.map(|result| {
            metrics::counter!(m::MIRROR_COMPARED, "route" => r.clone(), "result" => result)
        });
        Mirror {
            shared: Arc::new(Shared {
                cluster,
                route: Arc::clone(route),
                max_body: spec.max_body_bytes,
                compare: spec.compare,
                answered: sent("answered"),
                failed: sent("failed"),
                skipped_too_large: skipped("body_too_large"),
                skipped_incomplete: skipped("body_incomplete"),
                skipped_in_flight: skipped("in_flight_limit"),
                compared,
                epoch: Instant::now(),
                last_log_ms: AtomicU64::new(0),
                unlogged: AtomicU64::new(0),
            }),
            per_10k: u64::from(spec.per_10k),
            seen: AtomicU64::new(0),
            slots: Arc::new(Semaphore::new(spec.max_in_flight as usize)),
        }
    }

    /// Whether this filter still sends to `cluster` (a reload that rebuilt the shadow
    /// cluster must rebuild the filter too).
    pub fn sends_to(&self, cluster: Option<&Arc<ClusterRuntime>>) -> bool {
        cluster.is_some_and(|c| Arc::ptr_eq(c, &self.shared.cluster))
    }

    /// Picks the request for mirroring or not; a picked one gets a ticket in the notes.
    pub fn request(&self, ex: &mut Exchange<'_>) {
        if !self.pick() {
            return;
        }
        match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(permit) => {
                ex.notes.mirror = Some(Box::new(Ticket {
                    shared: Arc::clone(&self.shared),
                    _permit: permit,
                }));
            }
            Err(_) => self.shared.skipped_in_flight.increment(1),
        }
    }

    /// Request n is picked when the share's running total crosses a whole request: exactly
    /// `per_10k` of every 10,000 requests, spread evenly, with no random draw.
    fn pick(&self) -> bool {
        match self.per_10k {
            0 => false,
            10_000.. => true,
            p => {
                let n = u128::from(self.seen.fetch_add(1, Ordering::Relaxed));
                let p = u128::from(p);
                (n + 1) * p / 10_000 > n * p / 10_000
            }
        }
    }
}

impl Ticket {
    /// Starts the mirror of a request whose upstream head is `head` (hop-by-hop fields
    /// removed, forwarding fields added), path `path`, from `client`. Returns the body to send
    /// to the primary (teed when there is one to copy), and, when comparing, where the
    /// primary's digest goes and up to how many body bytes it hashes.
    pub fn start(
        self,
        head: &http::request::Parts,
        path: &Uri,
        client: IpAddr,
        body: DownstreamBody,
    ) -> (DownstreamBody, Option<(oneshot::Sender<Digest>, u64)>) {
        let shared = &self.shared;
        let (body, source) = if body.is_end_stream() {
            (body, Source::Ready(Bytes::new()))
        } else if body.size_hint().lower() > shared.max_body {
            // Declared too large: not even teed.
            shared.skipped_too_large.increment(1);
            return (body, None);
        } else {
            let (body, rx) = Tee::wrap(body, shared.max_body);
            (body, Source::Teed(rx))
        };
        let (tx, primary) = if shared.compare {
            let (tx, rx) = oneshot::channel();
            (Some((tx, shared.max_body)), Some(rx))
        } else {
            (None, None)
        };
        let shadow_head = shadow_head(head);
        let pq = path.path_and_query().cloned();
        let path = pq.as_ref().map_or("/", |p| p.path()).to_owned();
        tokio::spawn(run(self, shadow_head, pq, path, client, source, primary));
        (body, tx)
    }
}

/// The shadow's copy of the upstream head.
fn shadow_head(head: &http::request::Parts) -> http::request::Parts {
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = head.method.clone();
    parts.headers = head.headers.clone();
    if let Some(h) = parts.headers.get(http::header::HOST)
        && let Some(v) = shadow_host(h.as_bytes())
    {
        parts.headers.insert(http::header::HOST, v);
    }
    parts
        .headers
        .insert(MIRROR_HEADER, HeaderValue::from_static("1"));
    parts
}

/// `host[:port]` → `host-shadow[:port]`.
fn shadow_host(host: &[u8]) -> Option<HeaderValue> {
    let host = std::str::from_utf8(host).ok()?;
    let split = match host.rfind(':') {
        // A colon inside an IPv6 literal is no port separator.
        Some(i) if !host[i..].contains(']') => i,
        _ => host.len(),
    };
    let (name, port) = host.split_at(split);
    HeaderValue::from_str(&format!("{name}-shadow{port}")).ok()
}

/// The mirror's task: wait for the body copy, call the shadow, compare.
async fn run(
    ticket: Ticket,
    mut head: http::request::Parts,
    pq: Option<PathAndQuery>,
    path: String,
    client: IpAddr,
    source: Source,
    primary: Option<oneshot::Receiver<Digest>>,
) {
    let shared = &*ticket.shared;
    let body = match source {
        Source::Ready(b) => b,
        Source::Teed(rx) => match rx.await {
            Ok(Ok(b)) => b,
            Ok(Err(TeeLost::TooLarge)) => {
                shared.skipped_too_large.increment(1);
                return;
            }
            Ok(Err(TeeLost::Incomplete)) | Err(_) => {
                shared.skipped_incomplete.increment(1);
                return;
            }
        },
    };
    let timeout = shared.cluster.config.timeouts.response;
    let shadow = tokio::time::timeout(timeout, call(shared, &mut head, pq, client, body))
        .await
        .ok()
        .flatten();
    if shadow.is_some() {
        shared.answered.increment(1);
    } else {
        shared.failed.increment(1);
    }
    let Some(primary) = primary else { return };
    // Sent when the primary's body has ended; dropped unsent if it did not end well.
    let Ok(primary) = primary.await else { return };
    let verdict = Verdict::of(primary, shadow);
    shared.compared[verdict as usize].increment(1);
    if verdict != Verdict::Match {
        shared.log_mismatch(verdict, &path, primary, shadow);
    }
}

/// One attempt on the shadow cluster; the answer's digest, or `None` if it failed.
async fn call(
    shared: &Shared,
    head: &mut http::request::Parts,
    pq: Option<PathAndQuery>,
    client: IpAddr,
    body: Bytes,
) -> Option<Digest> {
    let cluster = &*shared.cluster;
    let ctx = PickContext {
        client_ip: client,
        headers: &head.headers,
    };
    let Picked::Endpoint(idx, _in_flight) = cluster.pick_within_limit(&ctx, &[]) else {
        return None;
    };
    head.uri = cluster.upstream.uri(idx, pq.as_ref())?;
    head.version = cluster.upstream.version();
    let body = if body.is_empty() {
        RequestBody::Empty
    } else {
        RequestBody::Full(Some(body))
    };
    let resp = match cluster.upstream.send(idx, head, None, body, true).await {
        Ok(r) => {
            // The shadow cluster's endpoints are judged by their answers too (Envoy's shadow
            // requests pass through the same outlier detector).
            cluster.observe_response(idx, &r);
            r
        }
        Err((kind, err)) => {
            if kind == UpstreamError::Connect {
                cluster.passive_failure(idx);
            }
            tracing::debug!(route = %shared.route, cluster = %cluster.name,
                error = %crate::telemetry::logging::chain(&err), "mirror request failed");
            return None;
        }
    };
    // The parts stay alive until the body is read: an HTTP/2 answer's stream slot is in them.
    let (parts, mut body) = resp.into_parts();
    let mut hasher = Some(BodyHasher::default());
    let mut seen = 0u64;
    while let Some(frame) = body.frame().await {
        let Some(d) = frame.ok()?.into_data().ok() else {
            continue;
        };
        seen += d.len() as u64;
        if seen > shared.max_body {
            // Past the bound: compared by status only, and not read further.
            hasher = None;
            break;
        }
        if let Some(h) = &mut hasher {
            h.update(&d);
        }
    }
    Some(Digest {
        status: parts.status.as_u16(),
        hash: hasher.as_ref().map(BodyHasher::finish),
    })
}

impl Shared {
    /// One warning per `LOG_EVERY_MS` at most, naming how many were left out before it.
    fn log_mismatch(&self, verdict: Verdict, path: &str, primary: Digest, shadow: Option<Digest>) {
        let now = self.epoch.elapsed().as_millis() as u64 + LOG_EVERY_MS;
        let last = self.last_log_ms.load(Ordering::Relaxed);
        if now < last + LOG_EVERY_MS
            || self
                .last_log_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let unlogged = self.unlogged.swap(0, Ordering::Relaxed);
        tracing::warn!(
            route = %self.route,
            path,
            result = Verdict::LABELS[verdict as usize],
            primary_status = primary.status,
            shadow_status = shadow.map(|s| s.status),
            unlogged,
            "mirror answer differs from the primary's"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_host_keeps_the_port() {
        let h = |s: &str| shadow_host(s.as_bytes()).map(|v| v.to_str().unwrap_or("").to_owned());
        assert_eq!(
            h("shop.example.com").as_deref(),
            Some("shop.example.com-shadow")
        );
        assert_eq!(h("shop:8443").as_deref(), Some("shop-shadow:8443"));
        assert_eq!(h("[::1]:80").as_deref(), Some("[::1]-shadow:80"));
        assert_eq!(h("[::1]").as_deref(), Some("[::1]-shadow"));
    }

    #[test]
    fn verdicts() {
        let d = |status, hash| Digest { status, hash };
        assert_eq!(Verdict::of(d(200, Some(1)), None), Verdict::ShadowError);
        assert_eq!(
            Verdict::of(d(200, Some(1)), Some(d(500, Some(1)))),
            Verdict::StatusMismatch
        );
        assert_eq!(
            Verdict::of(d(200, Some(1)), Some(d(200, Some(2)))),
            Verdict::BodyMismatch
        );
        assert_eq!(
            Verdict::of(d(200, Some(1)), Some(d(200, Some(1)))),
            Verdict::Match
        );
        // A body past the bound on either side: the status decides.
        assert_eq!(
            Verdict::of(d(200, None), Some(d(200, Some(2)))),
            Verdict::Match
        );
    }

    #[test]
    fn hash_ignores_chunking() {
        let mut a = BodyHasher::default();
        a.update(b"hello world");
        let mut b = BodyHasher::default();
        b.update(b"hel");
        b.update(b"lo wor");
        b.update(b"ld");
        assert_eq!(a.finish(), b.finish());
    }
}
