//! `request_headers` / `response_headers`: add, set and remove header fields.
use http::HeaderName;

use super::super::check::Checker;
use super::super::raw::{RawNameValue, S};
use super::template::{self, Template};

/// `{ add = [...], set = [...], remove = [...] }`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub add: Option<Vec<S<RawNameValue>>>,
    pub set: Option<Vec<S<RawNameValue>>>,
    pub remove: Option<Vec<S<String>>>,
}

/// Header edits, applied in the order remove → set → add.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Spec {
    /// Appended (an existing field keeps its values).
    pub add: Vec<(HeaderName, Template)>,
    /// Replace every existing value.
    pub set: Vec<(HeaderName, Template)>,
    /// Removed.
    pub remove: Vec<HeaderName>,
}

impl Spec {
    /// Whether any value needs the route's path captures.
    pub fn uses_captures(&self) -> bool {
        self.add
            .iter()
            .chain(&self.set)
            .any(|(_, t)| t.uses_captures())
    }
}

/// Fields lbd owns on every hop: editing them would break message framing or routing.
pub(crate) const MANAGED: [&str; 6] = [
    "connection",
    "content-length",
    "transfer-encoding",
    "host",
    "upgrade",
    "te",
];

fn name(c: &mut Checker<'_>, v: &S<String>, key: &str) -> Option<HeaderName> {
    let n = c.header_name(v, key)?;
    if MANAGED.contains(&n.as_str()) || n.as_str().starts_with(':') {
        c.err(
            v.span(),
            key,
            format!("{n} is managed by lbd (message framing and routing) and cannot be edited"),
        );
        return None;
    }
    Some(n)
}

/// Checks one `request_headers` / `response_headers` table.
pub(crate) fn check(c: &mut Checker<'_>, raw: &S<Raw>, key: &str) -> Option<Spec> {
    let r = raw.get_ref();
    let mut spec = Spec::default();
    let mut ok = true;
    for (field, list, out) in [
        ("add", &r.add, &mut spec.add),
        ("set", &r.set, &mut spec.set),
    ] {
        for (i, nv) in list.iter().flatten().enumerate() {
            let k = format!("{key}.{field}[{i}]");
            let nv = nv.get_ref();
            let n = name(c, &nv.name, &format!("{k}.name"));
            let Some(value) = &nv.value else {
                c.err(nv.name.span(), &k, "needs a value");
                ok = false;
                continue;
            };
            let t = template::parse(c, value, &format!("{k}.value"));
            match (n, t) {
                (Some(n), Some(t)) => out.push((n, t)),
                _ => ok = false,
            }
        }
    }
    for (i, n) in r.remove.iter().flatten().enumerate() {
        match name(c, n, &format!("{key}.remove[{i}]")) {
            Some(n) => spec.remove.push(n),
            None => ok = false,
        }
    }
    if spec.add.is_empty() && spec.set.is_empty() && spec.remove.is_empty() && ok {
        c.err(raw.span(), key, "set at least one of add, set, remove");
        return None;
    }
    ok.then_some(spec)
}
