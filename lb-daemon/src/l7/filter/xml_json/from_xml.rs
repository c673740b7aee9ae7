//! XML → JSON, by the mapping in `docs/xml-json.md`: the root element becomes the one member of
//! the top object; attributes `@name`, text `#text`, repeated children arrays, an element with
//! text only a string, an empty one `null`.
use std::collections::HashMap;

use quick_xml::escape::resolve_predefined_entity;
use quick_xml::events::{BytesStart, Event};
use quick_xml::reader::Reader;

use super::MAX_DEPTH;
use super::node::Node;

/// Why a document has no JSON form.
#[derive(Debug, PartialEq, Eq)]
pub struct XmlError(pub String);

/// Converts a whole XML document (UTF-8) to JSON text.
pub fn convert(input: &[u8]) -> Result<Vec<u8>, XmlError> {
    let root = parse(input)?;
    serde_json::to_vec(&root).map_err(|e| XmlError(e.to_string()))
}

/// Reads a whole XML document into its JSON value.
pub fn parse(input: &[u8]) -> Result<Node, XmlError> {
    let doc = std::str::from_utf8(input).map_err(|_| err("not UTF-8"))?;
    let mut reader = Reader::from_str(doc);
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<(String, Node)> = None;
    loop {
        let event = reader
            .read_event()
            .map_err(|e| XmlError(format!("at byte {}: {e}", reader.error_position())))?;
        match event {
            Event::Start(start) => {
                if root.is_some() {
                    return Err(err("more than one root element"));
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(err("elements nested too deep"));
                }
                if let Some(parent) = stack.last_mut() {
                    parent.child_starts();
                }
                stack.push(Element::open(&start)?);
            }
            Event::Empty(start) => {
                if root.is_some() {
                    return Err(err("more than one root element"));
                }
                if let Some(parent) = stack.last_mut() {
                    parent.child_starts();
                }
                let e = Element::open(&start)?;
                close(e, &mut stack, &mut root);
            }
            Event::End(_) => {
                // quick-xml checks that the end tag matches its start tag.
                let e = stack.pop().ok_or_else(|| err("end tag without start"))?;
                close(e, &mut stack, &mut root);
            }
            Event::Text(t) => text(&mut stack, &t.xml10_content())?,
            Event::CData(c) => {
                let Some(e) = stack.last_mut() else {
                    return Err(err("CDATA outside the root element"));
                };
                e.segment.push_str(&c.into_inner());
                e.significant = true;
            }
            Event::GeneralRef(r) => {
                let resolved = match r.resolve_char_ref() {
                    Ok(Some(c)) => c.to_string(),
                    Ok(None) => resolve_predefined_entity(&r)
                        .ok_or_else(|| XmlError(format!("unknown entity &{};", &*r)))?
                        .to_owned(),
                    Err(e) => return Err(XmlError(e.to_string())),
                };
                let Some(e) = stack.last_mut() else {
                    return Err(err("text outside the root element"));
                };
                e.segment.push_str(&resolved);
                e.significant = true;
            }
            Event::Decl(d) => {
                if let Some(enc) = d.encoding() {
                    let enc = enc.map_err(|e| XmlError(e.to_string()))?;
                    if !enc.eq_ignore_ascii_case("utf-8") {
                        return Err(XmlError(format!("encoding {enc:?}: only UTF-8 is taken")));
                    }
                }
            }
            // A DTD could declare entities (and entity expansion bombs): refused outright.
            Event::DocType(_) => return Err(err("a DOCTYPE is not accepted")),
            Event::Comment(_) | Event::PI(_) => {}
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(err("document ends inside an element"));
    }
    let (name, value) = root.ok_or_else(|| err("no root element"))?;
    Ok(Node::Object(vec![(name, value)]))
}

fn err(s: &str) -> XmlError {
    XmlError(s.to_owned())
}

/// Character data: kept in the open element; outside the root only whitespace may appear.
fn text(stack: &mut [Element], t: &str) -> Result<(), XmlError> {
    match stack.last_mut() {
        Some(e) => {
            e.segment.push_str(t);
            Ok(())
        }
        None if t.chars().all(|c| c.is_ascii_whitespace()) => Ok(()),
        None => Err(err("text outside the root element")),
    }
}

/// Ends element `e`: its value goes to its parent, or becomes the root.
fn close(mut e: Element, stack: &mut [Element], root: &mut Option<(String, Node)>) {
    let name = std::mem::take(&mut e.name);
    let value = e.finish();
    match stack.last_mut() {
        Some(parent) => parent.add(name, value),
        None => *root = Some((name, value)),
    }
}

/// An element being read.
struct Element {
    name: String,
    /// `@name` members, then children in order (repeated names gathered into one array).
    members: Vec<(String, Node)>,
    attributes: usize,
    /// Member index by name, once there are enough members for a scan to cost.
    index: Option<HashMap<String, usize>>,
    /// Text kept so far.
    text: String,
    /// Text since the last child element started.
    segment: String,
    /// The segment has CDATA or a reference: kept even if it is whitespace.
    significant: bool,
    children: bool,
}

/// Members scanned linearly before an index is built.
const SCAN: usize = 8;

impl Element {
    fn open(start: &BytesStart<'_>) -> Result<Element, XmlError> {
        let mut members = Vec::new();
        for a in start.attributes() {
            let a = a.map_err(|e| XmlError(e.to_string()))?;
            let value = a
                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map_err(|e| XmlError(e.to_string()))?;
            members.push((
                format!("@{}", a.key.as_ref()),
                Node::String(value.into_owned()),
            ));
        }
        Ok(Element {
            name: start.name().as_ref().to_owned(),
            attributes: members.len(),
            members,
            index: None,
            text: String::new(),
            segment: String::new(),
            significant: false,
            children: false,
        })
    }

    /// A child element starts: the text before it is kept unless it is only indentation.
    fn child_starts(&mut self) {
        self.flush(true);
        self.children = true;
    }

    fn flush(&mut self, before_child: bool) {
        let blank = !self.significant && self.segment.chars().all(|c| c.is_ascii_whitespace());
        // Whitespace between child elements is layout, not content; an element without
        // children keeps its text exactly.
        if !(blank && (before_child || self.children)) {
            self.text.push_str(&self.segment);
        }
        self.segment.clear();
        self.significant = false;
    }

    fn add(&mut self, name: String, value: Node) {
        let found = match &self.index {
            Some(index) => index.get(&name).copied(),
            None => self.members[self.attributes..]
                .iter()
                .position(|(k, _)| *k == name)
                .map(|i| i + self.attributes),
        };
        match found {
            Some(i) => match &mut self.members[i].1 {
                Node::Array(items) => items.push(value),
                other => {
                    let first = std::mem::replace(other, Node::Null);
                    *other = Node::Array(vec![first, value]);
                }
            },
            None => {
                if let Some(index) = &mut self.index {
                    index.insert(name.clone(), self.members.len());
                }
                self.members.push((name, value));
                if self.index.is_none() && self.members.len() - self.attributes > SCAN {
                    let index = self.members[self.attributes..]
                        .iter()
                        .enumerate()
                        .map(|(i, (k, _))| (k.clone(), i + self.attributes))
                        .collect();
                    self.index = Some(index);
                }
            }
        }
    }

    fn finish(mut self) -> Node {
        self.flush(false);
        if self.members.is_empty() {
            return if self.text.is_empty() {
                Node::Null
            } else {
                Node::String(self.text)
            };
        }
        if !self.text.is_empty() {
            self.members.insert(
                self.attributes,
                ("#text".to_owned(), Node::String(self.text)),
            );
        }
        Node::Object(self.members)
    }
}
