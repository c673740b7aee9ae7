//! `xml_json`: convert request and/or response bodies between XML and JSON, chosen by their
//! content type (the mapping is in `docs/xml-json.md`).
use super::super::check::Checker;
use super::super::raw::S;

/// `{ request = "off", response = "off", max_body_bytes = 1048576, root = "root" }`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub request: Option<S<String>>,
    pub response: Option<S<String>>,
    pub max_body_bytes: Option<S<i64>>,
    pub root: Option<S<String>>,
}

/// Default `max_body_bytes`: bodies up to 1 MiB are converted.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 1024 * 1024;
/// Largest `max_body_bytes` allowed: the body is held whole in memory, twice while converted.
pub const MAX_MAX_BODY_BYTES: i64 = 64 * 1024 * 1024;
/// Default `root`: the element that wraps JSON without a single top-level member.
pub const DEFAULT_ROOT: &str = "root";

/// Which way one direction's bodies are converted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conversion {
    /// Left alone.
    Off,
    /// XML bodies (`application/xml`, `text/xml`, `*/*+xml`) become JSON.
    XmlToJson,
    /// JSON bodies (`application/json`, `*/*+json`) become XML.
    JsonToXml,
}

/// A validated `xml_json` filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// What happens to request bodies (default off).
    pub request: Conversion,
    /// What happens to response bodies (default off).
    pub response: Conversion,
    /// Largest body converted; a longer one is refused (413 / 502). Default 1 MiB.
    pub max_body_bytes: u64,
    /// Name of the element wrapping JSON that is not an object with one member.
    pub root: String,
}

const CHOICES: &[(&str, Conversion)] = &[
    ("off", Conversion::Off),
    ("xml_to_json", Conversion::XmlToJson),
    ("json_to_xml", Conversion::JsonToXml),
];

/// Checks one `xml_json` table.
pub(crate) fn check(c: &mut Checker<'_>, raw: &S<Raw>, key: &str) -> Option<Spec> {
    let r = raw.get_ref();
    let request = c.choice(
        r.request.as_ref(),
        &format!("{key}.request"),
        Conversion::Off,
        CHOICES,
    );
    let response = c.choice(
        r.response.as_ref(),
        &format!("{key}.response"),
        Conversion::Off,
        CHOICES,
    );
    if r.request.is_none() && r.response.is_none() {
        c.err(
            raw.span(),
            key,
            "xml_json needs request and/or response (\"xml_to_json\" or \"json_to_xml\")",
        );
        return None;
    }
    let max_body_bytes = c.int(
        r.max_body_bytes.as_ref(),
        &format!("{key}.max_body_bytes"),
        DEFAULT_MAX_BODY_BYTES as i64,
        1,
        MAX_MAX_BODY_BYTES,
    ) as u64;
    let root = match &r.root {
        None => DEFAULT_ROOT.to_owned(),
        Some(v) if is_xml_name(v.get_ref()) => v.get_ref().clone(),
        Some(v) => {
            c.err(
                v.span(),
                &format!("{key}.root"),
                format!("{:?} is not an XML element name", v.get_ref()),
            );
            return None;
        }
    };
    Some(Spec {
        request,
        response,
        max_body_bytes,
        root,
    })
}

/// Whether `s` is an XML `Name` (XML 1.0 §2.3; the ranges above ASCII are taken whole).
pub fn is_xml_name(s: &str) -> bool {
    let mut chars = s.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    let start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':' || !c.is_ascii();
    start(first) && chars.all(|c| start(c) || c.is_ascii_digit() || c == '-' || c == '.')
}
