//! `xml_json`: converts request and/or response bodies between XML and JSON on the body
//! phase, chosen by content type; the mapping convention is `docs/xml-json.md`.
//!
//! A body is converted whole or not at all: over `max_body_bytes` the exchange is refused
//! (413 / 502), and a body that does not parse is refused (400 / 502), never half converted.
//! Bodies of other types, empty ones and compressed ones (`Content-Encoding` other than
//! `identity`) pass untouched.
mod from_xml;
mod node;
mod to_xml;

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_ENCODING, CONTENT_TYPE, ETAG};
use http::{HeaderMap, HeaderValue, Method, StatusCode};

use super::{Exchange, ResponseView};
use crate::config::filter::xml_json::{Conversion, Spec};
use crate::l7::reason::{BodyFault, Reason};

/// Deepest element (or JSON container) nesting converted: the tree is walked recursively, and
/// 128 is serde_json's own parse limit.
pub const MAX_DEPTH: usize = 128;

/// What the request phase learnt for the response body phase.
#[derive(Debug, Default, Clone, Copy)]
pub struct Note {
    /// The client asked for the upstream's type and not the converted one: pass it as is.
    pub keep_response: bool,
}

/// A running `xml_json` filter.
#[derive(Debug)]
pub struct XmlJson {
    request: Conversion,
    response: Conversion,
    max_body_bytes: u64,
    root: Box<str>,
}

/// The two body syntaxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Syntax {
    Xml,
    Json,
}

impl Syntax {
    /// The media type lbd labels a converted body with.
    fn media_type(self) -> &'static str {
        match self {
            Syntax::Xml => "application/xml",
            Syntax::Json => "application/json",
        }
    }
}

/// (from, to) of a conversion, `None` when off.
fn ends(c: Conversion) -> Option<(Syntax, Syntax)> {
    match c {
        Conversion::Off => None,
        Conversion::XmlToJson => Some((Syntax::Xml, Syntax::Json)),
        Conversion::JsonToXml => Some((Syntax::Json, Syntax::Xml)),
    }
}

/// The syntax a media type (without parameters, lowercase) names, if XML or JSON:
/// `application/xml`, `text/xml`, `*/*+xml`; `application/json`, `*/*+json`.
fn syntax_of(essence: &str) -> Option<Syntax> {
    if essence == "application/xml" || essence == "text/xml" || essence.ends_with("+xml") {
        Some(Syntax::Xml)
    } else if essence == "application/json" || essence.ends_with("+json") {
        Some(Syntax::Json)
    } else {
        None
    }
}

/// The syntax of a message's body by its `Content-Type`, when it is not compressed.
fn body_syntax(headers: &HeaderMap) -> Option<Syntax> {
    if let Some(enc) = headers.get(CONTENT_ENCODING)
        && !enc
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"identity")
    {
        return None;
    }
    let ct = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    let essence = ct.split(';').next()?.trim().to_ascii_lowercase();
    syntax_of(&essence)
}

/// Whether `Accept` lets a client take `s` (wildcards count; `q=0` refuses).
fn accepts(headers: &HeaderMap, s: Syntax) -> bool {
    headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|range| {
            let mut parts = range.split(';');
            let essence = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let refused = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            let matches = match essence.as_str() {
                "*/*" | "application/*" => true,
                "text/*" => s == Syntax::Xml,
                e => syntax_of(e) == Some(s),
            };
            matches && !refused
        })
}

impl XmlJson {
    /// Builds the filter from its spec.
    pub fn new(spec: &Spec) -> XmlJson {
        XmlJson {
            request: spec.request,
            response: spec.response,
            max_body_bytes: spec.max_body_bytes,
            root: spec.root.as_str().into(),
        }
    }

    /// Which bodies this filter may take whole (request, response).
    pub fn buffers(&self) -> (bool, bool) {
        (
            self.request != Conversion::Off,
            self.response != Conversion::Off,
        )
    }

    /// The request phase: `Accept` negotiation for the response conversion. A client that
    /// takes the upstream's type but not the converted one gets the upstream's answer as is;
    /// one that takes only the converted type has the upstream's added to `Accept` (at a
    /// lower weight), so that a negotiating backend answers in a type lbd can convert.
    pub fn request(&self, ex: &mut Exchange<'_>) {
        let Some((from, to)) = ends(self.response) else {
            return;
        };
        let headers = &mut ex.head.headers;
        if !headers.contains_key(ACCEPT) {
            return;
        }
        let (takes_from, takes_to) = (accepts(headers, from), accepts(headers, to));
        if !takes_to && takes_from {
            ex.notes.xml_json.keep_response = true;
        } else if takes_to && !takes_from {
            let extra = match from {
                Syntax::Xml => "application/xml;q=0.9",
                Syntax::Json => "application/json;q=0.9",
            };
            headers.append(ACCEPT, HeaderValue::from_static(extra));
        }
    }

    /// Takes the request body when it is of the type converted.
    pub fn request_body_limit(&self, head: &http::request::Parts) -> Option<u64> {
        let (from, _) = ends(self.request)?;
        (body_syntax(&head.headers) == Some(from)).then_some(self.max_body_bytes)
    }

    /// Converts the request body.
    pub fn request_body(
        &self,
        head: &mut http::request::Parts,
        body: Bytes,
    ) -> Result<Bytes, Reason> {
        self.convert(self.request, &mut head.headers, body)
            .map_err(Reason::RequestBody)
    }

    /// Takes the response body when it is of the type converted and has one.
    pub fn response_body_limit(
        &self,
        head: &http::response::Parts,
        rx: &ResponseView<'_>,
    ) -> Option<u64> {
        let (from, _) = ends(self.response)?;
        let bodiless = rx.log.method == Method::HEAD
            || head.status.is_informational()
            || head.status == StatusCode::NO_CONTENT
            || head.status == StatusCode::NOT_MODIFIED
            // A range of a document is not a document.
            || head.status == StatusCode::PARTIAL_CONTENT;
        (!bodiless && !rx.notes.xml_json.keep_response && body_syntax(&head.headers) == Some(from))
            .then_some(self.max_body_bytes)
    }

    /// Converts the response body.
    pub fn response_body(
        &self,
        head: &mut http::response::Parts,
        body: Bytes,
    ) -> Result<Bytes, Reason> {
        self.convert(self.response, &mut head.headers, body)
            .map_err(Reason::ResponseBody)
    }

    /// Converts `body` one way and labels it; an empty body stays as it is.
    fn convert(
        &self,
        c: Conversion,
        headers: &mut HeaderMap,
        body: Bytes,
    ) -> Result<Bytes, BodyFault> {
        let Some((from, to)) = ends(c) else {
            return Ok(body);
        };
        if body.len() as u64 > self.max_body_bytes {
            return Err(BodyFault::TooLarge);
        }
        if body.is_empty() {
            return Ok(body);
        }
        let out = match from {
            Syntax::Xml => from_xml::convert(&body).map_err(|e| {
                tracing::debug!(error = %e.0, "xml_json: body is not convertible XML");
                BodyFault::Xml
            })?,
            Syntax::Json => to_xml::convert(&body, &self.root).map_err(|e| {
                tracing::debug!(error = %e.0, "xml_json: body is not convertible JSON");
                BodyFault::Json
            })?,
        };
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(to.media_type()));
        // Same meaning, other bytes: a strong validator no longer holds (as nginx's gzip
        // filter does, the tag is kept weak).
        if let Some(tag) = headers.get(ETAG)
            && !tag.as_bytes().starts_with(b"W/")
        {
            let mut weak = b"W/".to_vec();
            weak.extend_from_slice(tag.as_bytes());
            match HeaderValue::from_bytes(&weak) {
                Ok(v) => headers.insert(ETAG, v),
                Err(_) => headers.remove(ETAG),
            };
        }
        Ok(Bytes::from(out))
    }
}

#[cfg(test)]
mod tests;
