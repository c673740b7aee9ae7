//! JSON → XML, the inverse of `from_xml.rs` where one exists (`docs/xml-json.md` says where
//! none does).
use std::borrow::Cow;

use super::MAX_DEPTH;
use super::node::Node;
use crate::config::filter::xml_json::is_xml_name;

/// Why a JSON text has no XML form.
#[derive(Debug, PartialEq, Eq)]
pub struct JsonError(pub String);

/// The XML declaration every converted document starts with.
const DECLARATION: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>";

/// Converts a whole JSON text to an XML document; `root` names the element that wraps a
/// value that is not an object with exactly one member.
pub fn convert(input: &[u8], root: &str) -> Result<Vec<u8>, JsonError> {
    let value: Node = serde_json::from_slice(input).map_err(|e| JsonError(e.to_string()))?;
    let mut out = String::with_capacity(input.len() + input.len() / 2 + DECLARATION.len());
    out.push_str(DECLARATION);
    match &value {
        Node::Object(members)
            if members.len() == 1 && !is_array(&members[0].1) && is_xml_name(&members[0].0) =>
        {
            let (name, v) = &members[0];
            element(&mut out, name, v, 0)?;
        }
        _ => element(&mut out, root, &value, 0)?,
    }
    Ok(out.into_bytes())
}

fn is_array(n: &Node) -> bool {
    matches!(n, Node::Array(_))
}

/// Writes member `name` with value `v`: an array is one element per item.
fn member(out: &mut String, name: &str, v: &Node, depth: usize) -> Result<(), JsonError> {
    match v {
        Node::Array(items) => items.iter().try_for_each(|i| element(out, name, i, depth)),
        _ => element(out, name, v, depth),
    }
}

/// Writes one element `name` holding `v`.
fn element(out: &mut String, name: &str, v: &Node, depth: usize) -> Result<(), JsonError> {
    if depth >= MAX_DEPTH {
        return Err(JsonError("nested too deep".to_owned()));
    }
    if !is_xml_name(name) {
        return Err(JsonError(format!("{name:?} is not an XML element name")));
    }
    out.push('<');
    out.push_str(name);
    match v {
        Node::Null => {
            out.push_str("/>");
            return Ok(());
        }
        Node::Bool(_) | Node::Number(_) | Node::String(_) => {
            out.push('>');
            escape(out, &scalar(v).unwrap_or_default(), false)?;
        }
        // An array inside an array: each item becomes an `item` child.
        Node::Array(items) => {
            out.push('>');
            for i in items {
                element(out, "item", i, depth + 1)?;
            }
        }
        Node::Object(members) => {
            for (k, a) in members {
                let Some(attr) = k.strip_prefix('@') else {
                    continue;
                };
                if !is_xml_name(attr) {
                    return Err(JsonError(format!("{k:?} is not an attribute name")));
                }
                let value = scalar(a)
                    .ok_or_else(|| JsonError(format!("attribute {k:?} is not a scalar")))?;
                out.push(' ');
                out.push_str(attr);
                out.push_str("=\"");
                escape(out, &value, true)?;
                out.push('"');
            }
            let content = members.iter().filter(|(k, _)| !k.starts_with('@'));
            if content.clone().next().is_none() {
                out.push_str("/>");
                return Ok(());
            }
            out.push('>');
            for (k, c) in content {
                if k == "#text" {
                    let text =
                        scalar(c).ok_or_else(|| JsonError("#text is not a scalar".to_owned()))?;
                    escape(out, &text, false)?;
                } else {
                    member(out, k, c, depth + 1)?;
                }
            }
        }
    }
    out.push_str("</");
    out.push_str(name);
    out.push('>');
    Ok(())
}

/// The text of a scalar (`null` as an attribute or `#text` is empty); `None` for a
/// container.
fn scalar(v: &Node) -> Option<Cow<'_, str>> {
    match v {
        Node::Null => Some(Cow::Borrowed("")),
        Node::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
        Node::Number(n) => Some(Cow::Owned(n.to_string())),
        Node::String(s) => Some(Cow::Borrowed(s)),
        Node::Array(_) | Node::Object(_) => None,
    }
}

/// Escapes `s` for character data or (`attr`) a double-quoted attribute value, so that a
/// reader gets `s` back exactly: `\r` (and in attributes `\t`, `\n`) as character references,
/// which line-end and attribute-value normalization would otherwise change. Characters XML
/// 1.0 cannot carry at all are refused.
fn escape(out: &mut String, s: &str, attr: bool) -> Result<(), JsonError> {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' if attr => out.push_str("&quot;"),
            '\r' => out.push_str("&#13;"),
            '\n' if attr => out.push_str("&#10;"),
            '\t' if attr => out.push_str("&#9;"),
            '\t' | '\n' => out.push(c),
            '\u{0}'..='\u{1f}' | '\u{fffe}' | '\u{ffff}' => {
                return Err(JsonError(format!(
                    "U+{:04X} cannot appear in XML 1.0",
                    c as u32
                )));
            }
            c => out.push(c),
        }
    }
    Ok(())
}
