//! A strict parser for the Prometheus text exposition format (version 0.0.4), so tests check
//! what a scraper would accept rather than grepping substrings.
use std::collections::{BTreeMap, HashMap, HashSet};

/// One sample line: `name{labels} value [timestamp]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Series name (with `_bucket`/`_sum`/`_count` for histograms).
    pub name: String,
    /// Label pairs, unescaped.
    pub labels: BTreeMap<String, String>,
    /// The value.
    pub value: f64,
}

/// A whole `/metrics` page.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    /// Samples in page order.
    pub samples: Vec<Sample>,
    /// `# TYPE` per metric family.
    pub types: HashMap<String, String>,
    /// `# HELP` per metric family.
    pub helps: HashMap<String, String>,
}

impl Exposition {
    /// Samples named `name` whose labels include every pair of `labels`.
    pub fn find<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The value of the one sample matching `name` and `labels`; `None` if there is none.
    /// Panics if several match (the caller's labels are not specific enough).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<&Sample> = self.find(name, labels).collect();
        assert!(
            found.len() <= 1,
            "{name} {labels:?} matches {} series: {found:?}",
            found.len()
        );
        found.first().map(|s| s.value)
    }

    /// Sum over every sample matching `name` and `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels).map(|s| s.value).sum()
    }
}

fn is_name(s: &str, colon_ok: bool) -> bool {
    let mut chars = s.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    let ok_first = first.is_ascii_alphabetic() || first == '_' || (colon_ok && first == ':');
    ok_first && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon_ok && c == ':'))
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s
            .parse::<f64>()
            .map_err(|e| format!("bad value {s:?}: {e}")),
    }
}

/// Parses `name{a="x",b="y"}` and returns the rest of the line after it.
fn parse_series(line: &str) -> Result<(String, BTreeMap<String, String>, &str), String> {
    let end = line.find(['{', ' ']).ok_or("no value after the name")?;
    let name = &line[..end];
    if !is_name(name, true) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[end..];
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            rest = rest.trim_start();
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let eq = rest.find('=').ok_or("label without `=`")?;
            let key = rest[..eq].trim();
            if !is_name(key, false) {
                return Err(format!("bad label name {key:?}"));
            }
            rest = rest[eq + 1..]
                .strip_prefix('"')
                .ok_or_else(|| format!("label {key} value is not quoted"))?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let close = loop {
                match chars.next() {
                    None => return Err(format!("label {key} value is not terminated")),
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        other => return Err(format!("bad escape in label {key}: {other:?}")),
                    },
                    Some((_, '\n')) => return Err(format!("raw newline in label {key}")),
                    Some((_, c)) => value.push(c),
                }
            };
            if labels.insert(key.to_owned(), value).is_some() {
                return Err(format!("label {key} given twice"));
            }
            rest = &rest[close + 1..];
            if let Some(r) = rest.strip_prefix(',') {
                rest = r;
            } else if !rest.starts_with('}') {
                return Err(format!("expected `,` or `}}` after label {key}"));
            }
        }
    }
    Ok((name.to_owned(), labels, rest))
}

/// The family a series belongs to given the declared types (`x_bucket` → `x` for histograms).
fn family<'a>(name: &'a str, types: &HashMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && matches!(
                types.get(base).map(String::as_str),
                Some("histogram" | "summary")
            )
        {
            return base;
        }
    }
    name
}

/// Parses a page, rejecting anything a strict scraper would: malformed lines, samples of a
/// family with no `# TYPE` before them, a `TYPE` given twice, duplicate series, histogram
/// buckets without `le`.
pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    let mut seen: HashSet<(String, BTreeMap<String, String>)> = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(c) = line.strip_prefix('#') {
            let mut parts = c.trim_start().splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("TYPE"), Some(name), Some(kind)) => {
                    if !is_name(name, true) {
                        return Err(at(format!("bad name {name:?}")));
                    }
                    if !matches!(
                        kind,
                        "counter" | "gauge" | "histogram" | "summary" | "untyped"
                    ) {
                        return Err(at(format!("unknown type {kind:?}")));
                    }
                    if out.types.insert(name.to_owned(), kind.to_owned()).is_some() {
                        return Err(at("TYPE given twice".into()));
                    }
                }
                (Some("HELP"), Some(name), help) => {
                    if !is_name(name, true) {
                        return Err(at(format!("bad name {name:?}")));
                    }
                    out.helps
                        .insert(name.to_owned(), help.unwrap_or("").to_owned());
                }
                (Some("TYPE"), _, _) => return Err(at("incomplete TYPE".into())),
                _ => {} // Other comments are allowed.
            }
            continue;
        }
        let (name, labels, rest) = parse_series(line).map_err(at)?;
        let mut fields = rest.split_whitespace();
        let value = parse_value(fields.next().ok_or_else(|| at("no value".into()))?).map_err(at)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .map_err(|e| at(format!("bad timestamp: {e}")))?;
        }
        if fields.next().is_some() {
            return Err(at("trailing garbage".into()));
        }
        let fam = family(&name, &out.types);
        let Some(kind) = out.types.get(fam) else {
            return Err(at(format!("family {fam} has no # TYPE before its samples")));
        };
        if kind == "histogram" && name.ends_with("_bucket") && !labels.contains_key("le") {
            return Err(at("histogram bucket without le".into()));
        }
        if kind == "counter" && value < 0.0 {
            return Err(at("negative counter".into()));
        }
        if !seen.insert((name.clone(), labels.clone())) {
            return Err(at("duplicate series".into()));
        }
        out.samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_families_labels_and_escapes() {
        let page = "# HELP a_total Things.\n# TYPE a_total counter\n\
                    a_total{x=\"1\",y=\"q\\\"uo\\\\te\\n\"} 3\n\
                    # TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\nh_count 2\n";
        let e = parse(page).expect("valid page");
        assert_eq!(e.value("a_total", &[("x", "1")]), Some(3.0));
        assert_eq!(e.samples[0].labels["y"], "q\"uo\\te\n");
        assert_eq!(e.value("h_count", &[]), Some(2.0));
        assert_eq!(e.helps["a_total"], "Things.");
    }

    #[test]
    fn rejects_what_a_scraper_would() {
        for bad in [
            "a 1\n",                                 // no TYPE
            "# TYPE a gauge\na{x=1} 1\n",            // unquoted label
            "# TYPE a gauge\na{x=\"1} 1\n",          // unterminated
            "# TYPE a gauge\na{x=\"\\q\"} 1\n",      // bad escape
            "# TYPE a gauge\na one\n",               // bad value
            "# TYPE a gauge\na 1\na 2\n",            // duplicate series
            "# TYPE a gauge\n# TYPE a gauge\na 1\n", // TYPE twice
            "# TYPE h histogram\nh_bucket 1\n",      // bucket without le
            "# TYPE 1a gauge\n",                     // bad name
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
    }
}
