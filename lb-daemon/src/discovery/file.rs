//! Endpoint files: a JSON array or a TOML `[[endpoints]]` list of `{ address, weight, backup }`,
//! as an orchestrator would write them. Any problem is reported as `file:line:column: what`.
use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;
use serde::de::{self, Deserializer};

use crate::config::discovery::Origin;
use crate::config::model::Endpoint;

/// One entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    address: Address,
    #[serde(default)]
    weight: Weight,
    #[serde(default)]
    backup: bool,
}

/// `ip:port`, checked while parsing so that the parser's error carries the position.
#[derive(Debug)]
struct Address(SocketAddr);

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.parse::<SocketAddr>() {
            Ok(a) if a.port() != 0 => Ok(Address(a)),
            Ok(_) => Err(de::Error::custom(format!("invalid address {s:?}: port 0"))),
            Err(_) => Err(de::Error::custom(format!(
                "invalid address {s:?}: expected ip:port (names are not resolved in endpoint files)"
            ))),
        }
    }
}

/// 1..=1000, like `weight` in `lb.toml`.
#[derive(Debug)]
struct Weight(u32);

impl Default for Weight {
    fn default() -> Self {
        Weight(1)
    }
}

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        match u32::try_from(n) {
            Ok(w @ 1..=1000) => Ok(Weight(w)),
            _ => Err(de::Error::custom(format!(
                "weight must be between 1 and 1000, got {n}"
            ))),
        }
    }
}

/// A TOML endpoints file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlFile {
    #[serde(default)]
    endpoints: Vec<Entry>,
}

/// Parses `text`, read from `path`: TOML when the name ends in `.toml`, JSON otherwise.
pub(super) fn parse(path: &Path, text: &str, origin: &Origin) -> Result<Vec<Endpoint>, String> {
    let at = |line: usize, column: usize, msg: &str| {
        format!("{}:{line}:{column}: {msg}", path.display())
    };
    if text.trim().is_empty() {
        // Most likely a writer caught between truncating and writing; an empty list is `[]`.
        return Err(at(1, 1, "empty file (write [] for no endpoints)"));
    }
    let toml = path.extension().is_some_and(|e| e == "toml");
    let entries: Vec<Entry> = if toml {
        toml::from_str::<TomlFile>(text)
            .map(|f| f.endpoints)
            .map_err(|e| {
                let (line, column) = line_col(text, e.span().map_or(0, |s| s.start));
                at(line, column, e.message().trim())
            })?
    } else {
        serde_json::from_str::<Vec<Entry>>(text).map_err(|e| {
            let msg = e.to_string();
            let suffix = format!(" at line {} column {}", e.line(), e.column());
            at(
                e.line(),
                e.column(),
                msg.strip_suffix(&suffix).unwrap_or(&msg),
            )
        })?
    };
    let mut out: Vec<Endpoint> = Vec::with_capacity(entries.len());
    for e in entries {
        let address = e.address.0;
        if out.iter().any(|o| o.address == address) {
            let (line, column) = second_occurrence(text, &address.to_string());
            return Err(at(line, column, &format!("duplicate endpoint {address}")));
        }
        out.push(Endpoint {
            address,
            weight: e.weight.0,
            backup: e.backup,
            origin: origin.clone(),
            server_name: None,
        });
    }
    out.sort_by_key(|e| e.address);
    Ok(out)
}

/// 1-based line and column of byte `offset`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |n| before.len() - n - 1)
        + 1;
    (line, column)
}

/// Where `needle` is written the second time (the duplicate), or 1:1.
fn second_occurrence(text: &str, needle: &str) -> (usize, usize) {
    text.match_indices(needle)
        .nth(1)
        .map_or((1, 1), |(i, _)| line_col(text, i))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_as(name: &str, text: &str) -> Result<Vec<Endpoint>, String> {
        parse(Path::new(name), text, &Origin::File(name.into()))
    }

    #[test]
    fn json_and_toml_lists() {
        let j = parse_as(
            "e.json",
            r#"[{"address":"127.0.0.1:2","weight":3},{"address":"127.0.0.1:1","backup":true}]"#,
        )
        .expect("json");
        assert_eq!(j.len(), 2);
        assert_eq!((j[0].address.port(), j[0].backup), (1, true));
        assert_eq!((j[1].address.port(), j[1].weight), (2, 3));
        let t = parse_as(
            "e.toml",
            "[[endpoints]]\naddress = \"[::1]:80\"\nweight = 2\n",
        )
        .expect("toml");
        assert_eq!(t[0].weight, 2);
        assert_eq!(parse_as("e.json", "[]").expect("empty").len(), 0);
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let e = parse_as(
            "e.json",
            "[\n  {\"address\": \"127.0.0.1:1\"},\n  {\"address\": 7\n]",
        )
        .expect_err("bad");
        assert!(e.starts_with("e.json:3:"), "{e}");
        let e = parse_as("e.json", "[\n {\"address\": \"web:80\"}\n]").expect_err("bad");
        assert!(
            e.starts_with("e.json:2:") && e.contains("expected ip:port"),
            "{e}"
        );
        let e = parse_as(
            "e.toml",
            "[[endpoints]]\naddress = \"127.0.0.1:1\"\nweight = 0\n",
        )
        .expect_err("bad");
        assert!(
            e.starts_with("e.toml:3:") && e.contains("between 1 and 1000"),
            "{e}"
        );
        let e = parse_as(
            "e.json",
            "[{\"address\":\"127.0.0.1:1\"},\n{\"address\":\"127.0.0.1:1\"}]",
        )
        .expect_err("dup");
        assert!(e.starts_with("e.json:2:") && e.contains("duplicate"), "{e}");
        let e = parse_as("e.json", "").expect_err("empty");
        assert!(e.contains("empty file"), "{e}");
    }
}
