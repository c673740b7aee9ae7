//! `request_headers` / `response_headers`: add, set and remove header fields, with values
//! that may use request variables.
use http::{HeaderMap, HeaderName, HeaderValue};

use super::vars::Vars;
use super::{Exchange, ResponseView};
use crate::config::filter::headers::Spec;
use crate::config::filter::template::Template;

/// A value: fixed (built once, at config time) or filled in per request.
#[derive(Debug)]
enum Value {
    Fixed(HeaderValue),
    Template(Template),
}

/// Header edits, applied remove → set → add (the default edits nothing).
#[derive(Debug, Default)]
pub struct HeaderEdits {
    add: Vec<(HeaderName, Value)>,
    set: Vec<(HeaderName, Value)>,
    remove: Vec<HeaderName>,
    /// The names `remove` and `set` replace: on a response, an upstream's fields of these
    /// names are dropped while still bytes, and the edits then need no map of the others.
    replaced: Vec<HeaderName>,
    /// Some value uses the route's path captures.
    captures: bool,
    /// Some value is a template (needs the request's variables).
    templated: bool,
}

fn value(t: &Template) -> Value {
    match t.literal().and_then(|l| HeaderValue::from_str(l).ok()) {
        Some(v) => Value::Fixed(v),
        None => Value::Template(t.clone()),
    }
}

impl HeaderEdits {
    /// Builds the edits of `spec`.
    pub fn new(spec: &Spec) -> Self {
        let conv = |l: &[(HeaderName, Template)]| -> Vec<(HeaderName, Value)> {
            l.iter().map(|(n, t)| (n.clone(), value(t))).collect()
        };
        let add = conv(&spec.add);
        let set = conv(&spec.set);
        let templated = add
            .iter()
            .chain(&set)
            .any(|(_, v)| matches!(v, Value::Template(_)));
        let mut replaced: Vec<HeaderName> = spec.remove.clone();
        for (n, _) in &set {
            if !replaced.contains(n) {
                replaced.push(n.clone());
            }
        }
        HeaderEdits {
            add,
            set,
            remove: spec.remove.clone(),
            replaced,
            captures: spec.uses_captures(),
            templated,
        }
    }

    /// The names whose fields the edits replace or remove (`add` keeps a field's other
    /// values, `set` and `remove` do not; the values never read the response's fields).
    pub fn replaced(&self) -> &[HeaderName] {
        &self.replaced
    }

    /// Applies the edits to the request head.
    pub fn apply_request(&self, ex: &mut Exchange<'_>) {
        if !self.templated {
            return self.apply(&mut ex.head.headers, None);
        }
        let mut rendered = Vec::with_capacity(self.add.len() + self.set.len());
        {
            let vars = Vars::of_request(ex, self.captures);
            for (_, v) in self.set.iter().chain(&self.add) {
                rendered.push(match v {
                    Value::Fixed(f) => Some(f.clone()),
                    Value::Template(t) => vars.render(t),
                });
            }
        }
        self.apply(&mut ex.head.headers, Some(rendered));
    }

    /// Applies the edits to a response head.
    pub fn apply_response(&self, head: &mut http::response::Parts, rx: &ResponseView<'_>) {
        if !self.templated {
            return self.apply(&mut head.headers, None);
        }
        let vars = Vars::of_response(rx);
        let rendered = self
            .set
            .iter()
            .chain(&self.add)
            .map(|(_, v)| match v {
                Value::Fixed(f) => Some(f.clone()),
                Value::Template(t) => vars.render(t),
            })
            .collect();
        self.apply(&mut head.headers, Some(rendered));
    }

    /// `rendered`: values of `set` then `add` when some are templates.
    fn apply(&self, h: &mut HeaderMap, rendered: Option<Vec<Option<HeaderValue>>>) {
        for n in &self.remove {
            h.remove(n);
        }
        let mut rendered = rendered.map(Vec::into_iter);
        let mut next = |v: &Value| -> Option<HeaderValue> {
            match rendered.as_mut() {
                Some(r) => r.next().flatten(),
                None => match v {
                    Value::Fixed(f) => Some(f.clone()),
                    Value::Template(_) => None,
                },
            }
        };
        for (n, v) in &self.set {
            match next(v) {
                Some(v) => {
                    h.insert(n.clone(), v);
                }
                None => {
                    h.remove(n);
                }
            }
        }
        for (n, v) in &self.add {
            if let Some(v) = next(v) {
                h.append(n.clone(), v);
            }
        }
    }
}
