//! `path_rewrite`: rewrite the path by a regex with captures (the query is kept).
use super::super::check::Checker;
use super::super::raw::S;
use super::Pattern;

/// `{ regex = "^/v1/(.*)$", replacement = "/api/$1" }`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub regex: S<String>,
    pub replacement: S<String>,
}

/// A validated `path_rewrite` filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// Matched against the path; a path it does not match is left as is.
    pub regex: Pattern,
    /// `$1`, `${name}` refer to captures (regex crate syntax); must produce a path.
    pub replacement: String,
}

/// Checks one `path_rewrite` table.
pub(crate) fn check(c: &mut Checker<'_>, raw: &S<Raw>, key: &str) -> Option<Spec> {
    let r = raw.get_ref();
    let regex = Pattern::check(c, &r.regex, &format!("{key}.regex"))?;
    let rep = r.replacement.get_ref();
    let k = format!("{key}.replacement");
    if !rep.starts_with('/') && !rep.starts_with('$') {
        c.err(
            r.replacement.span(),
            &k,
            format!("must produce a path starting with '/', got {rep:?}"),
        );
        return None;
    }
    if rep
        .chars()
        .any(|ch| ch.is_control() || ch == ' ' || ch == '?' || ch == '#')
    {
        c.err(
            r.replacement.span(),
            &k,
            "must not contain spaces, control characters, '?' or '#'",
        );
        return None;
    }
    // Every `$N` / `${name}` must name a group the regex has: a typo would silently expand
    // to nothing.
    let groups = regex.0.captures_len();
    let names: Vec<&str> = regex.0.capture_names().flatten().collect();
    let mut rest = rep.as_str();
    while let Some(i) = rest.find('$') {
        let after = &rest[i + 1..];
        let (name, next) = if let Some(b) = after.strip_prefix('{') {
            match b.find('}') {
                Some(e) => (&b[..e], &b[e + 1..]),
                None => {
                    c.err(r.replacement.span(), &k, "unclosed '${'");
                    return None;
                }
            }
        } else if let Some(a) = after.strip_prefix('$') {
            rest = a;
            continue;
        } else {
            let e = after
                .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                .unwrap_or(after.len());
            (&after[..e], &after[e..])
        };
        let known = match name.parse::<usize>() {
            Ok(n) => n < groups,
            Err(_) => names.contains(&name),
        };
        if !known {
            c.err(
                r.replacement.span(),
                &k,
                format!(
                    "${name} names no capture group of the regex ({} groups)",
                    groups - 1
                ),
            );
            return None;
        }
        rest = next;
    }
    Some(Spec {
        regex,
        replacement: rep.clone(),
    })
}
