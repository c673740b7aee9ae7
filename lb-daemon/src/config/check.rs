//! Check primitives: every value checked records its problem (file:line:col, dotted key,
//! message) and yields a usable default, so checking goes on and one run reports everything.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

use http::HeaderName;

use super::duration::parse_duration;
use super::error::Diagnostics;
use super::raw::S;

/// Records problems while a config is checked; shared by the section checks in `validate.rs`
/// and the filter schemas in `filter/`.
pub(crate) struct Checker<'d> {
    pub(crate) d: &'d mut Diagnostics,
}

impl Checker<'_> {
    pub(crate) fn err(&mut self, span: Range<usize>, key: &str, message: impl Into<String>) {
        self.d.push(span, key, message.into());
    }

    /// Reports a second definition of `name` under `kind`, pointing back at the first.
    pub(crate) fn unique(
        &mut self,
        seen: &mut HashMap<String, Range<usize>>,
        name: &S<String>,
        key: &str,
        kind: &str,
    ) {
        if let Some(first) = seen.get(name.get_ref()) {
            let (line, _) = self.d.line_col(first.start);
            let msg = format!(
                "duplicate {kind} name {:?} (first defined on line {line})",
                name.get_ref()
            );
            self.err(name.span(), key, msg);
        } else {
            seen.insert(name.get_ref().clone(), name.span());
        }
    }

    pub(crate) fn name(&mut self, name: &S<String>, key: &str) {
        let n = name.get_ref();
        if n.is_empty() {
            self.err(name.span(), key, "must not be empty");
        } else if n.chars().any(|c| c.is_control() || c.is_whitespace()) {
            self.err(
                name.span(),
                key,
                "must not contain whitespace or control characters",
            );
        }
    }

    pub(crate) fn duration(
        &mut self,
        v: Option<&S<String>>,
        key: &str,
        default: Duration,
    ) -> Duration {
        let Some(v) = v else { return default };
        match parse_duration(v.get_ref()) {
            Ok(d) => d,
            Err(e) => {
                self.err(v.span(), key, e);
                default
            }
        }
    }

    /// A duration that must be more than zero (a zero deadline or period means nothing).
    pub(crate) fn positive_duration(
        &mut self,
        v: Option<&S<String>>,
        key: &str,
        default: Duration,
    ) -> Duration {
        let d = self.duration(v, key, default);
        if d.is_zero() {
            if let Some(v) = v {
                self.err(v.span(), key, "must be greater than 0");
            }
            return default;
        }
        d
    }

    /// An integer within `min..=max`.
    pub(crate) fn int(
        &mut self,
        v: Option<&S<i64>>,
        key: &str,
        default: i64,
        min: i64,
        max: i64,
    ) -> i64 {
        let Some(v) = v else { return default };
        let n = *v.get_ref();
        if n < min || n > max {
            let msg = if max == i64::MAX {
                format!("must be at least {min}, got {n}")
            } else {
                format!("must be between {min} and {max}, got {n}")
            };
            self.err(v.span(), key, msg);
            return default;
        }
        n
    }

    pub(crate) fn usize(
        &mut self,
        v: Option<&S<i64>>,
        key: &str,
        default: usize,
        min: usize,
    ) -> usize {
        let n = self.int(v, key, default as i64, min as i64, i64::MAX);
        usize::try_from(n).unwrap_or(default)
    }

    pub(crate) fn u32(
        &mut self,
        v: Option<&S<i64>>,
        key: &str,
        default: u32,
        min: u32,
        max: u32,
    ) -> u32 {
        let n = self.int(v, key, default.into(), min.into(), max.into());
        u32::try_from(n).unwrap_or(default)
    }

    /// One of a fixed set of words.
    pub(crate) fn choice<T: Copy>(
        &mut self,
        v: Option<&S<String>>,
        key: &str,
        default: T,
        options: &[(&str, T)],
    ) -> T {
        let Some(v) = v else { return default };
        if let Some((_, t)) = options.iter().find(|(n, _)| n == v.get_ref()) {
            return *t;
        }
        let list: Vec<String> = options.iter().map(|(n, _)| format!("{n:?}")).collect();
        self.err(
            v.span(),
            key,
            format!(
                "unknown value {:?}; expected one of {}",
                v.get_ref(),
                list.join(", ")
            ),
        );
        default
    }

    /// `ip:port`, no host names (resolving them would make the config depend on DNS).
    pub(crate) fn addr(
        &mut self,
        v: &S<String>,
        key: &str,
        allow_port_zero: bool,
    ) -> Option<SocketAddr> {
        match v.get_ref().parse::<SocketAddr>() {
            Ok(a) if a.port() == 0 && !allow_port_zero => {
                self.err(
                    v.span(),
                    key,
                    format!("invalid address {:?}: port 0", v.get_ref()),
                );
                None
            }
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    v.span(),
                    key,
                    format!(
                        "invalid address {:?}: expected ip:port, e.g. \"127.0.0.1:8080\" or \
                         \"[::1]:8080\"",
                        v.get_ref()
                    ),
                );
                None
            }
        }
    }

    pub(crate) fn header_name(&mut self, v: &S<String>, key: &str) -> Option<HeaderName> {
        match HeaderName::from_bytes(v.get_ref().as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.err(
                    v.span(),
                    key,
                    format!("invalid header name {:?}", v.get_ref()),
                );
                None
            }
        }
    }

    /// A path-like value must start with `/`.
    pub(crate) fn path(&mut self, v: &S<String>, key: &str) -> String {
        let p = v.get_ref();
        if !p.starts_with('/') {
            self.err(v.span(), key, format!("must start with '/', got {p:?}"));
        } else if p.chars().any(|c| c.is_control() || c == ' ') {
            self.err(
                v.span(),
                key,
                "must not contain spaces or control characters",
            );
        }
        p.clone()
    }
}
