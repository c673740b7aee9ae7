//! lbd's own answers, named: why lbd answered a request itself (or why a stream ended early).
//!
//! One value per cause, the L7 twin of `lb_common::l4::Reason`. Each carries the HTTP status
//! a client gets, the gRPC status a gRPC client gets instead, a sentence for humans, and the
//! short name written in `x-lbd-error` and the access log. Adding a reason means adding it
//! here once; every answer (HTTP text or gRPC trailers-only) is built from it in `answer.rs`.
use http::StatusCode;

use crate::l7::grpc::Code;
use crate::l7::h1::codec::HeadError;

/// Why lbd answered (or ended) a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No route matches the request.
    NoRoute,
    /// The route's cluster has no available endpoint.
    NoHealthyEndpoint,
    /// Endpoints are available but every one is at its connection limit.
    EndpointLimit,
    /// A circuit breaker of the cluster is at its threshold (`[clusters.circuit_breakers]`).
    CircuitOpen,
    /// No attempt could connect to an endpoint.
    UpstreamConnect,
    /// The upstream connection or stream failed after the request went out.
    UpstreamReset,
    /// The TLS handshake with every endpoint tried failed (certificate not verified, ...).
    UpstreamTls,
    /// The upstream did not answer within the configured timeout.
    UpstreamTimeout,
    /// The gRPC client's own deadline passed.
    DeadlineExceeded,
    /// The request body exceeds the listener's `max_body_bytes`.
    BodyTooLarge,
    /// The request target exceeds the URI limit.
    UriTooLong,
    /// The request head exceeds `max_header_bytes` or has too many fields.
    HeaderTooLarge,
    /// The client's request body stream failed (malformed framing, cut off).
    ClientBody,
    /// The listener was removed by a reload while the connection stayed open.
    ListenerRemoved,
    /// `CONNECT` tunnels are not offered.
    ConnectUnsupported,
    /// The client went away before the response ended (logged, never sent).
    DownstreamClosed,
    /// The client's address is not allowed on this route (`access` filter).
    AccessDenied,
    /// The client is over a `rate_limit`.
    RateLimited,
    /// A CORS preflight asked for something the route's `cors` filter does not allow.
    CorsDenied(CorsDenial),
    /// No credentials, or credentials that do not verify (`jwt`, `api_key` filters).
    Unauthorized,
    /// Verified credentials that do not allow this request (claims, scopes).
    Forbidden,
    /// The request is malformed; the detail names the rule it broke (`bad_framing`, …).
    Malformed(&'static str),
    /// The request body a filter needs whole (the body phase) is over its bound, or cannot
    /// be transformed.
    RequestBody(BodyFault),
    /// The upstream's response body a filter needs whole is over its bound, or cannot be
    /// transformed.
    ResponseBody(BodyFault),
}

/// What is wrong with a body the body phase holds whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFault {
    /// Longer than the filter's `max_body_bytes`.
    TooLarge,
    /// Not well-formed XML, or XML the mapping does not take (a DTD, another encoding).
    Xml,
    /// Not valid JSON, or JSON with no XML form (a key that is not an XML name, …).
    Json,
}

impl Reason {
    /// The HTTP status of lbd's answer.
    pub fn status(self) -> StatusCode {
        match self {
            Reason::NoRoute => StatusCode::NOT_FOUND,
            Reason::NoHealthyEndpoint
            | Reason::EndpointLimit
            | Reason::CircuitOpen
            | Reason::ListenerRemoved => StatusCode::SERVICE_UNAVAILABLE,
            Reason::UpstreamConnect | Reason::UpstreamReset | Reason::UpstreamTls => {
                StatusCode::BAD_GATEWAY
            }
            Reason::UpstreamTimeout | Reason::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Reason::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reason::UriTooLong => StatusCode::URI_TOO_LONG,
            Reason::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Reason::ClientBody | Reason::Malformed(_) => StatusCode::BAD_REQUEST,
            Reason::ConnectUnsupported => StatusCode::METHOD_NOT_ALLOWED,
            Reason::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Reason::AccessDenied | Reason::CorsDenied(_) | Reason::Forbidden => {
                StatusCode::FORBIDDEN
            }
            Reason::Unauthorized => StatusCode::UNAUTHORIZED,
            Reason::RequestBody(BodyFault::TooLarge) => StatusCode::PAYLOAD_TOO_LARGE,
            Reason::RequestBody(_) => StatusCode::BAD_REQUEST,
            Reason::ResponseBody(_) => StatusCode::BAD_GATEWAY,
            // nginx's 499: never sent, only logged.
            Reason::DownstreamClosed => {
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
            }
        }
    }

    /// The gRPC status a gRPC client gets for this reason. UNAVAILABLE means "safe to retry
    /// elsewhere" to gRPC clients, so it is kept for failures where nothing was processed.
    pub fn grpc_code(self) -> Code {
        match self {
            Reason::NoRoute | Reason::ConnectUnsupported => Code::Unimplemented,
            Reason::NoHealthyEndpoint
            | Reason::EndpointLimit
            | Reason::CircuitOpen
            | Reason::UpstreamConnect
            | Reason::UpstreamReset
            | Reason::UpstreamTls
            | Reason::ListenerRemoved => Code::Unavailable,
            Reason::UpstreamTimeout | Reason::DeadlineExceeded => Code::DeadlineExceeded,
            Reason::BodyTooLarge
            | Reason::UriTooLong
            | Reason::HeaderTooLarge
            | Reason::RateLimited => Code::ResourceExhausted,
            Reason::ClientBody | Reason::DownstreamClosed => Code::Cancelled,
            Reason::Malformed(_) => Code::Internal,
            Reason::AccessDenied | Reason::CorsDenied(_) | Reason::Forbidden => {
                Code::PermissionDenied
            }
            Reason::Unauthorized => Code::Unauthenticated,
            Reason::RequestBody(BodyFault::TooLarge) => Code::ResourceExhausted,
            Reason::RequestBody(_) | Reason::ResponseBody(_) => Code::Internal,
        }
    }

    /// The name in `x-lbd-error` and the access log's `error` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoRoute => "no_route",
            Reason::NoHealthyEndpoint => "no_healthy_endpoint",
            Reason::EndpointLimit => "endpoint_limit",
            Reason::CircuitOpen => "circuit_open",
            Reason::UpstreamConnect => "upstream_connect",
            Reason::UpstreamReset => "upstream_reset",
            Reason::UpstreamTls => "upstream_tls",
            Reason::UpstreamTimeout => "upstream_timeout",
            Reason::DeadlineExceeded => "deadline_exceeded",
            Reason::BodyTooLarge => "body_too_large",
            Reason::UriTooLong => "uri_too_long",
            Reason::HeaderTooLarge => "header_too_large",
            Reason::ClientBody => "client_body",
            Reason::ListenerRemoved => "listener_removed",
            Reason::ConnectUnsupported => "connect_unsupported",
            Reason::DownstreamClosed => "downstream_closed",
            Reason::AccessDenied => "access_denied",
            Reason::RateLimited => "rate_limited",
            Reason::CorsDenied(CorsDenial::Origin) => "cors_origin_denied",
            Reason::CorsDenied(CorsDenial::Method) => "cors_method_denied",
            Reason::CorsDenied(CorsDenial::Headers) => "cors_headers_denied",
            Reason::Unauthorized => "unauthorized",
            Reason::Forbidden => "forbidden",
            Reason::Malformed(detail) => detail,
            Reason::RequestBody(BodyFault::TooLarge) => "buffer_too_large",
            Reason::RequestBody(BodyFault::Xml) => "malformed_xml",
            Reason::RequestBody(BodyFault::Json) => "malformed_json",
            Reason::ResponseBody(BodyFault::TooLarge) => "upstream_buffer_too_large",
            Reason::ResponseBody(BodyFault::Xml) => "upstream_malformed_xml",
            Reason::ResponseBody(BodyFault::Json) => "upstream_malformed_json",
        }
    }

    /// A short sentence for the answer's body or `grpc-message`.
    pub fn message(self) -> &'static str {
        match self {
            Reason::NoRoute => "no route matches this request",
            Reason::NoHealthyEndpoint => "no healthy endpoint",
            Reason::EndpointLimit => "every endpoint is at its connection limit",
            Reason::CircuitOpen => "the cluster's circuit breaker is open",
            Reason::UpstreamConnect => "could not connect to any endpoint",
            Reason::UpstreamReset => "upstream connection reset",
            Reason::UpstreamTls => "TLS handshake with the upstream failed",
            Reason::UpstreamTimeout => "upstream did not answer in time",
            Reason::DeadlineExceeded => "deadline exceeded",
            Reason::BodyTooLarge => "request exceeds the listener's max_body_bytes",
            Reason::UriTooLong => "request target too long",
            Reason::HeaderTooLarge => "request header fields too large",
            Reason::ClientBody => "client request stream failed",
            Reason::ListenerRemoved => "listener removed by a reload",
            Reason::ConnectUnsupported => "CONNECT is not supported",
            Reason::DownstreamClosed => "client closed the connection",
            Reason::AccessDenied => "access denied",
            Reason::RateLimited => "rate limit exceeded",
            Reason::CorsDenied(CorsDenial::Origin) => "CORS preflight refused: origin not allowed",
            Reason::CorsDenied(CorsDenial::Method) => "CORS preflight refused: method not allowed",
            Reason::CorsDenied(CorsDenial::Headers) => {
                "CORS preflight refused: a requested header is not allowed"
            }
            Reason::Unauthorized => "missing or invalid credentials",
            Reason::Forbidden => "the credentials do not allow this request",
            Reason::Malformed(_) => "malformed request",
            Reason::RequestBody(BodyFault::TooLarge) => {
                "request body exceeds the route's max_body_bytes for transformation"
            }
            Reason::RequestBody(BodyFault::Xml) => "request body is not XML lbd can convert",
            Reason::RequestBody(BodyFault::Json) => "request body is not JSON lbd can convert",
            Reason::ResponseBody(BodyFault::TooLarge) => {
                "upstream response body exceeds the route's max_body_bytes for transformation"
            }
            Reason::ResponseBody(BodyFault::Xml) => "upstream sent XML lbd cannot convert",
            Reason::ResponseBody(BodyFault::Json) => "upstream sent JSON lbd cannot convert",
        }
    }
}

/// What a refused CORS preflight asked for that its route does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CorsDenial {
    /// The `Origin`.
    Origin,
    /// The `Access-Control-Request-Method`.
    Method,
    /// A name in `Access-Control-Request-Headers`.
    Headers,
}

impl From<HeadError> for Reason {
    fn from(e: HeadError) -> Self {
        match e {
            HeadError::Bad(detail) => Reason::Malformed(detail),
            HeadError::TooLarge => Reason::HeaderTooLarge,
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_maps_to_a_client_or_gateway_error() {
        let all = [
            Reason::NoRoute,
            Reason::NoHealthyEndpoint,
            Reason::EndpointLimit,
            Reason::CircuitOpen,
            Reason::UpstreamConnect,
            Reason::UpstreamReset,
            Reason::UpstreamTls,
            Reason::UpstreamTimeout,
            Reason::DeadlineExceeded,
            Reason::BodyTooLarge,
            Reason::UriTooLong,
            Reason::HeaderTooLarge,
            Reason::ClientBody,
            Reason::ListenerRemoved,
            Reason::ConnectUnsupported,
            Reason::DownstreamClosed,
            Reason::AccessDenied,
            Reason::RateLimited,
            Reason::CorsDenied(CorsDenial::Origin),
            Reason::CorsDenied(CorsDenial::Method),
            Reason::CorsDenied(CorsDenial::Headers),
            Reason::Unauthorized,
            Reason::Forbidden,
            Reason::Malformed("bad_framing"),
            Reason::RequestBody(BodyFault::TooLarge),
            Reason::RequestBody(BodyFault::Xml),
            Reason::RequestBody(BodyFault::Json),
            Reason::ResponseBody(BodyFault::TooLarge),
            Reason::ResponseBody(BodyFault::Xml),
            Reason::ResponseBody(BodyFault::Json),
        ];
        for r in all {
            let s = r.status().as_u16();
            assert!((400..600).contains(&s), "{r:?} -> {s}");
            assert!(
                r.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{r:?} name {:?}",
                r.as_str()
            );
        }
        // The two that used to fall through to INTERNAL.
        assert_eq!(Reason::UriTooLong.grpc_code(), Code::ResourceExhausted);
        assert_eq!(Reason::ConnectUnsupported.grpc_code(), Code::Unimplemented);
        assert_eq!(Reason::Malformed("bad_uri").as_str(), "bad_uri");
        assert_eq!(Reason::Unauthorized.grpc_code() as u8, 16);
        assert_eq!(Reason::Forbidden.grpc_code() as u8, 7);
    }
}
