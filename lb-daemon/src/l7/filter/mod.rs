//! The per-route filter seam: policies that look at or change a request and its response, or
//! answer in lbd's place.
//!
//! A route's [`Chain`] is built once per config generation (never per request) from its
//! `[[routes.filters]]`. The proxy core runs it in two phases:
//!
//! - **request**: in config order, after routing and before an endpoint is picked. A filter
//!   may change the head (path, headers), note values for later phases ([`Notes`]), or end
//!   the exchange with [`Flow::Answer`] (a response of its own) or [`Flow::Refuse`] (one of
//!   lbd's [`Reason`]s, answered as HTTP or gRPC). Ending skips the later filters and the
//!   upstream.
//! - **response**: on the response head (the upstream's, or an answer from the request
//!   phase), in reverse order, for the filters whose request phase ran (Envoy's encode path).
//!
//! A filter that needs a whole body says so when the chain is built ([`Filter::buffers`]);
//! only such chains have a **body phase** (Pingora's `request_body_filter` /
//! `response_body_filter`, Envoy's `decodeData`/`encodeData` with buffering, reduced to one
//! call with the whole body). Per exchange the filter then names the bound it buffers up to
//! (`None`: not this one, say for another content type); the proxy core (`buffered.rs`)
//! reads the body within the smallest bound asked and hands it to each filter in phase
//! order (request: config order, after every request head phase; response: reverse order,
//! before the response head phases), each returning the body that goes on or a [`Reason`].
//! Bodies of every other route, and of exchanges no filter asks for, stream as before.
//!
//! Example, filters `[request_id, access, response_headers]`: a denied client gets the 403
//! from `access`, which then passes `request_id`'s response phase (the id is echoed) but not
//! `response_headers`'s (its request phase never ran).
//!
//! Dispatch is a `match` over the closed [`Filter`] enum: no boxing, no allocation for routes
//! without filters (the chain is empty and both phases return at once).
//!
//! Retries, timeouts, budgets and breakers are not filters: they are the forward step's
//! policy (`forward.rs`).
//!
//! Adding a filter: `config/filter/<name>.rs` (Raw, check, Spec) + a `RawFilter` field and a
//! `FilterSpec` variant; `l7/filter/<name>.rs` + a [`Filter`] variant and its arms here; its
//! keys in `configs/lb.toml`; an e2e test when it touches the wire.
pub mod access;
pub mod api_key;
pub mod cors;
pub mod header_num;
pub mod headers;
pub mod jwks;
pub mod jwt;
pub mod jwt_cache;
pub mod jwt_sig;
pub mod mirror;
pub mod prehashed;
pub mod rate_limit;
pub mod rate_limit_redis;
pub mod redirect;
pub mod request_id;
pub mod rewrite;
pub mod vars;
pub mod xml_json;

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response};

use super::cluster::ClusterRuntime;
use super::conn::ConnInfo;
use super::log::RequestLog;
use super::reason::Reason;
use crate::config::filter::FilterSpec;
use crate::config::model::Route;
use crate::l7::h1::codec::RawFields;

/// What a request phase decided.
#[derive(Debug)]
pub enum Flow {
    /// Go on with the next filter, then the upstream.
    Next,
    /// Answer with this response; later filters and the upstream are skipped.
    Answer(Response<Bytes>),
    /// Answer with lbd's answer for this reason.
    Refuse(Reason),
    /// Answer with lbd's answer for this reason, with this `WWW-Authenticate` challenge
    /// (RFC 9110 §11.6.1; the `jwt` filter's 401 and 403).
    Challenge(Reason, HeaderValue),
}

/// Values a request phase leaves for response phases and the log.
#[derive(Debug, Default)]
pub struct Notes {
    /// The request's id (`request_id` filter).
    pub request_id: Option<HeaderValue>,
    /// The request's host without port, as routed (kept only for chains with response
    /// templates: [`Chain::keeps_host`]).
    pub host: Option<Bytes>,
    /// The `rate_limit` decision, for its response headers.
    pub rate_limit: Option<rate_limit::RateState>,
    /// The request's origin decision (`cors` filter).
    pub cors: cors::Note,
    /// Who the credentials name (`jwt`'s consumer claim, `api_key`'s consumer), for later
    /// filters (a limiter keyed by consumer) and the log.
    pub consumer: Option<Arc<str>>,
    /// A verified token's claims (`jwt`).
    pub claims: Option<Arc<serde_json::Map<String, serde_json::Value>>>,
    /// A mirror to start once the upstream head is final (`mirror` filter).
    pub mirror: Option<Box<mirror::Ticket>>,
    /// What the client accepts, for the `xml_json` response conversion.
    pub xml_json: xml_json::Note,
}

/// One request as the filters see it: the head they may change, and what they may read.
pub struct Exchange<'a> {
    /// The request head (the URI's path is what goes upstream).
    pub head: &'a mut http::request::Parts,
    /// The downstream connection.
    pub conn: &'a ConnInfo,
    /// The matched route.
    pub route: &'a Route,
    /// The route's name (shared).
    pub route_name: &'a str,
    /// Per-request notes for later phases.
    pub notes: &'a mut Notes,
    /// The access-log record.
    pub log: &'a mut RequestLog,
}

/// A running filter, built from its spec when a config generation is built.
#[derive(Debug)]
pub enum Filter {
    /// `request_headers`.
    RequestHeaders(headers::HeaderEdits),
    /// `response_headers`.
    ResponseHeaders(headers::HeaderEdits),
    /// `request_id`.
    RequestId(request_id::RequestId),
    /// `path_rewrite`.
    PathRewrite(rewrite::PathRegex),
    /// `redirect`.
    Redirect(redirect::Redirect),
    /// `direct_response`.
    DirectResponse(redirect::Direct),
    /// `access`.
    Access(access::Access),
    /// `rate_limit`.
    RateLimit(rate_limit::RateLimit),
    /// `cors`.
    Cors(cors::Cors),
    /// `jwt` (boxed: its key sets and challenges make it the largest filter by far).
    Jwt(Box<jwt::Jwt>),
    /// `api_key`.
    ApiKey(api_key::ApiKey),
    /// `mirror`.
    Mirror(mirror::Mirror),
    /// `xml_json`.
    XmlJson(xml_json::XmlJson),
}

/// What filters are built with besides their spec: the generation's running parts they may
/// call at request time.
pub struct Deps<'a> {
    /// The generation's clusters, in model order (clusters are built before routes).
    pub clusters: &'a [Arc<ClusterRuntime>],
    /// The route's name.
    pub route: &'a Arc<str>,
}

impl Filter {
    /// Builds the running filter for `spec`.
    pub fn build(spec: &FilterSpec, deps: &Deps<'_>) -> Filter {
        match spec {
            FilterSpec::RequestHeaders(s) => Filter::RequestHeaders(headers::HeaderEdits::new(s)),
            FilterSpec::ResponseHeaders(s) => Filter::ResponseHeaders(headers::HeaderEdits::new(s)),
            FilterSpec::RequestId(s) => Filter::RequestId(request_id::RequestId::new(s)),
            FilterSpec::PathRewrite(s) => Filter::PathRewrite(rewrite::PathRegex::new(s)),
            FilterSpec::Redirect(s) => Filter::Redirect(redirect::Redirect::new(s)),
            FilterSpec::DirectResponse(s) => Filter::DirectResponse(redirect::Direct::new(s)),
            FilterSpec::Access(s) => Filter::Access(access::Access::new(s)),
            FilterSpec::RateLimit(s) => {
                Filter::RateLimit(rate_limit::RateLimit::new(s, deps.route))
            }
            FilterSpec::Cors(s) => Filter::Cors(cors::Cors::new(s)),
            FilterSpec::Jwt(s) => Filter::Jwt(Box::new(jwt::Jwt::new(s))),
            FilterSpec::ApiKey(s) => Filter::ApiKey(api_key::ApiKey::new(s)),
            FilterSpec::Mirror(s) => match deps.clusters.get(s.cluster) {
                Some(c) => Filter::Mirror(mirror::Mirror::new(s, Arc::clone(c), deps.route)),
                // A validated model names only clusters it has; should one be missing
                // anyway, the route goes on without its shadow rather than failing.
                None => Filter::RequestHeaders(headers::HeaderEdits::default()),
            },
            FilterSpec::XmlJson(s) => Filter::XmlJson(xml_json::XmlJson::new(s)),
        }
    }

    /// Which bodies this filter may need whole (request, response): fixed when the chain is
    /// built, so that other chains never enter the body phase.
    fn buffers(&self) -> (bool, bool) {
        match self {
            Filter::XmlJson(x) => x.buffers(),
            _ => (false, false),
        }
    }

    /// The bound up to which this filter takes this request's body whole (`None`: it does
    /// not need it).
    fn request_body_limit(&self, head: &http::request::Parts) -> Option<u64> {
        match self {
            Filter::XmlJson(x) => x.request_body_limit(head),
            _ => None,
        }
    }

    /// The body phase of a request: the whole body in, the body that goes on out.
    fn request_body(&self, head: &mut http::request::Parts, body: Bytes) -> Result<Bytes, Reason> {
        match self {
            Filter::XmlJson(x) => x.request_body(head, body),
            _ => Ok(body),
        }
    }

    /// The bound up to which this filter takes this response's body whole.
    fn response_body_limit(
        &self,
        head: &http::response::Parts,
        rx: &ResponseView<'_>,
    ) -> Option<u64> {
        match self {
            Filter::XmlJson(x) => x.response_body_limit(head, rx),
            _ => None,
        }
    }

    /// The body phase of a response.
    fn response_body(
        &self,
        head: &mut http::response::Parts,
        body: Bytes,
    ) -> Result<Bytes, Reason> {
        match self {
            Filter::XmlJson(x) => x.response_body(head, body),
            _ => Ok(body),
        }
    }

    /// Whether a filter of the last generation can serve this one (its spec being equal):
    /// not when a part it calls was rebuilt.
    fn still_current(&self, spec: &FilterSpec, deps: &Deps<'_>) -> bool {
        match (self, spec) {
            (Filter::Mirror(m), FilterSpec::Mirror(s)) => m.sends_to(deps.clusters.get(s.cluster)),
            _ => true,
        }
    }

    /// The request phase. Async because some policies wait on the network (`jwt` refetching
    /// a key set for an unknown `kid`, shared limits); most answer at once.
    async fn request(&self, ex: &mut Exchange<'_>) -> Flow {
        match self {
            Filter::RequestHeaders(h) => {
                h.apply_request(ex);
                Flow::Next
            }
            Filter::ResponseHeaders(_) => Flow::Next,
            Filter::RequestId(r) => {
                r.request(ex);
                Flow::Next
            }
            Filter::PathRewrite(p) => {
                p.request(ex);
                Flow::Next
            }
            Filter::Redirect(r) => Flow::Answer(r.answer(ex)),
            Filter::DirectResponse(d) => Flow::Answer(d.answer()),
            Filter::Access(a) => a.request(ex),
            Filter::RateLimit(r) => r.request(ex).await,
            Filter::Cors(c) => c.request(ex),
            Filter::Jwt(j) => {
                // Boxed: a token check that may wait for a key-set fetch is ~3.5 KiB of
                // state; inline it would size every filtered request's future.
                let checking = crate::l7::box_in_place!(j.request(ex));
                checking.await
            }
            Filter::ApiKey(k) => k.request(ex),
            Filter::Mirror(m) => {
                m.request(ex);
                Flow::Next
            }
            Filter::XmlJson(x) => {
                x.request(ex);
                Flow::Next
            }
        }
    }

    /// Whether the response phase does anything (the arms of [`Filter::response`] that are
    /// not empty): a chain whose filters have none leaves an HTTP/1.1 upstream's header
    /// fields as bytes instead of building a map for nothing.
    fn has_response_phase(&self) -> bool {
        match self {
            Filter::ResponseHeaders(_)
            | Filter::RequestId(_)
            | Filter::RateLimit(_)
            | Filter::Cors(_)
            | Filter::XmlJson(_)
            | Filter::Mirror(_) => true,
            Filter::RequestHeaders(_)
            | Filter::PathRewrite(_)
            | Filter::Redirect(_)
            | Filter::DirectResponse(_)
            | Filter::Access(_)
            | Filter::Jwt(_)
            | Filter::ApiKey(_) => false,
        }
    }

    /// The fields this filter's response phase sets, replacing the upstream's: the only
    /// fields it touches, when it can work on a response whose upstream fields are still
    /// bytes (they are then dropped from those bytes, and the filter adds its own to the
    /// head's map, written after them). `None`: it needs the whole head as a map.
    fn replaces_only(&self) -> Option<&[HeaderName]> {
        match self {
            Filter::RateLimit(_) => Some(&rate_limit::FIELDS),
            Filter::ResponseHeaders(h) => Some(h.replaced()),
            _ => None,
        }
    }

    /// The response phase.
    fn response(&self, head: &mut http::response::Parts, rx: &ResponseView<'_>) {
        match self {
            Filter::ResponseHeaders(h) => h.apply_response(head, rx),
            Filter::RequestId(r) => r.response(head, rx),
            Filter::RateLimit(r) => r.response(head, rx),
            Filter::Cors(c) => c.response(head, rx),
            Filter::RequestHeaders(_)
            | Filter::PathRewrite(_)
            | Filter::Redirect(_)
            | Filter::DirectResponse(_)
            | Filter::Access(_)
            | Filter::Jwt(_)
            | Filter::ApiKey(_)
            | Filter::XmlJson(_) => {}
            Filter::Mirror(_) => {}
        }
    }
}

/// What response phases may read: the request's notes and log record.
pub struct ResponseView<'a> {
    /// The downstream connection.
    pub conn: &'a ConnInfo,
    /// The route's name.
    pub route_name: &'a str,
    /// Notes from the request phase.
    pub notes: &'a Notes,
    /// The access-log record (method, original URI, …).
    pub log: &'a RequestLog,
}

/// A route's filters in config order. Filters are shared (`Arc`) so that a reload whose spec
/// for a filter is unchanged keeps the very same filter and whatever state it holds.
#[derive(Debug, Default)]
pub struct Chain {
    filters: Box<[(FilterSpec, Arc<Filter>)]>,
    /// Some filter may need the request body whole.
    request_bodies: bool,
    /// Some filter may need the response body whole.
    response_bodies: bool,
    /// Some filter renders templates in its response phase (which may name `${host}`).
    response_templates: bool,
}

impl Chain {
    /// Builds the chain for `specs`, reusing filters of `previous` (the route's chain in the
    /// last generation) whose spec is unchanged.
    pub fn build(specs: &[FilterSpec], previous: Option<&Chain>, deps: &Deps<'_>) -> Chain {
        let filters = specs
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let reused = previous
                    .and_then(|p| p.filters.get(i))
                    .filter(|(s, f)| s == spec && f.still_current(spec, deps))
                    .map(|(_, f)| Arc::clone(f));
                let f = reused.unwrap_or_else(|| Arc::new(Filter::build(spec, deps)));
                (spec.clone(), f)
            })
            .collect::<Box<[(FilterSpec, Arc<Filter>)]>>();
        let (request_bodies, response_bodies) = filters
            .iter()
            .map(|(_, f)| f.buffers())
            .fold((false, false), |a, b| (a.0 || b.0, a.1 || b.1));
        let response_templates = filters
            .iter()
            .any(|(_, f)| matches!(**f, Filter::ResponseHeaders(_)));
        Chain {
            filters,
            request_bodies,
            response_bodies,
            response_templates,
        }
    }

    /// Whether a response phase may need the request's host ([`Notes::host`]), copied
    /// for it only then.
    pub fn keeps_host(&self) -> bool {
        self.response_templates
    }

    /// Whether the request body phase may run on this chain (fixed at build).
    pub fn buffers_requests(&self) -> bool {
        self.request_bodies
    }

    /// Whether the response body phase may run on this chain (fixed at build).
    pub fn buffers_responses(&self) -> bool {
        self.response_bodies
    }

    /// The bound for this request's body phase: the smallest any of the first `ran` filters
    /// asks for, `None` when none asks.
    pub fn request_body_limit(&self, ran: usize, head: &http::request::Parts) -> Option<u64> {
        self.ran(ran)
            .iter()
            .filter_map(|(_, f)| f.request_body_limit(head))
            .min()
    }

    /// Runs the request body phase of the first `ran` filters, in config order.
    pub fn request_body(
        &self,
        ran: usize,
        head: &mut http::request::Parts,
        mut body: Bytes,
    ) -> Result<Bytes, Reason> {
        for (_, f) in self.ran(ran) {
            if f.request_body_limit(head).is_some() {
                body = f.request_body(head, body)?;
            }
        }
        Ok(body)
    }

    /// The bound for this response's body phase (see [`Chain::request_body_limit`]).
    pub fn response_body_limit(
        &self,
        ran: usize,
        head: &http::response::Parts,
        rx: &ResponseView<'_>,
    ) -> Option<u64> {
        self.ran(ran)
            .iter()
            .filter_map(|(_, f)| f.response_body_limit(head, rx))
            .min()
    }

    /// Runs the response body phase of the first `ran` filters, last first.
    pub fn response_body(
        &self,
        ran: usize,
        head: &mut http::response::Parts,
        rx: &ResponseView<'_>,
        mut body: Bytes,
    ) -> Result<Bytes, Reason> {
        for (_, f) in self.ran(ran).iter().rev() {
            if f.response_body_limit(head, rx).is_some() {
                body = f.response_body(head, body)?;
            }
        }
        Ok(body)
    }

    fn ran(&self, ran: usize) -> &[(FilterSpec, Arc<Filter>)] {
        &self.filters[..ran.min(self.filters.len())]
    }

    /// Whether the response phases of the first `ran` filters may read or change the
    /// response head.
    pub fn reads_response(&self, ran: usize) -> bool {
        self.ran(ran).iter().any(|(_, f)| f.has_response_phase())
    }

    /// Whether the response phases of the first `ran` filters need the upstream's fields in
    /// the head's map; when not, they are kept as bytes (no map built and encoded again).
    pub fn needs_response_map(&self, ran: usize) -> bool {
        self.ran(ran)
            .iter()
            .any(|(_, f)| f.has_response_phase() && f.replaces_only().is_none())
    }

    /// Drops from an upstream's fields still held as bytes those that the first `ran`
    /// filters' response phases replace.
    pub fn drop_replaced(&self, ran: usize, raw: &mut RawFields) {
        for (_, f) in self.ran(ran) {
            for name in f.replaces_only().unwrap_or_default() {
                raw.remove(name.as_str());
            }
        }
    }

    /// Whether the route has no filters (both phases are then no-ops).
    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// The filter at `i` (for tests and the admin view).
    pub fn get(&self, i: usize) -> Option<&Arc<Filter>> {
        self.filters.get(i).map(|(_, f)| f)
    }

    /// Runs the request phases; returns how many ran (the response phase runs those) and
    /// the answer if one ended the exchange.
    pub async fn request(&self, ex: &mut Exchange<'_>) -> (usize, Option<Flow>) {
        for (i, (_, f)) in self.filters.iter().enumerate() {
            match f.request(ex).await {
                Flow::Next => {}
                flow => return (i + 1, Some(flow)),
            }
        }
        (self.filters.len(), None)
    }

    /// Runs the response phases of the first `ran` filters, last first.
    pub fn response(&self, ran: usize, head: &mut http::response::Parts, rx: &ResponseView<'_>) {
        for (_, f) in self.filters[..ran.min(self.filters.len())].iter().rev() {
            f.response(head, rx);
        }
    }
}
