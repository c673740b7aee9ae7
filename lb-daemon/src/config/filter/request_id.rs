//! `request_id`: make sure every request carries an id, pass it on, log it, echo it.
use http::HeaderName;

use super::super::check::Checker;
use super::super::raw::S;

/// `{ header = "x-request-id", echo = true }`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub header: Option<S<String>>,
    pub echo: Option<S<bool>>,
}

/// A validated `request_id` filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// The field that carries the id (default `x-request-id`).
    pub header: HeaderName,
    /// Also send the id back in the response (default true).
    pub echo: bool,
}

/// Checks one `request_id` table.
pub(crate) fn check(c: &mut Checker<'_>, raw: &S<Raw>, key: &str) -> Option<Spec> {
    let r = raw.get_ref();
    let header = match &r.header {
        Some(h) => c.header_name(h, &format!("{key}.header"))?,
        None => HeaderName::from_static("x-request-id"),
    };
    Some(Spec {
        header,
        echo: r.echo.as_ref().is_none_or(|e| *e.get_ref()),
    })
}
