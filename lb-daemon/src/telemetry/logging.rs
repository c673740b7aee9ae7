//! Log output: `text` or `json` lines on stderr (journald adds timestamps and levels of its
//! own, but lines also carry them so files and pipes stay readable).
use tracing_subscriber::EnvFilter;

use crate::config::model::LogFormat;

/// Installs the global subscriber; `RUST_LOG` overrides `level` when set.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true);
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.with_ansi(false).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// An error and all its causes, `outer: cause: root cause`, for one-line logs.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        // Wrappers often repeat their cause's text; print each distinct message once.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_joins_causes() {
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        #[derive(Debug, thiserror::Error)]
        #[error("connecting to 10.0.0.1:80")]
        struct Outer(#[source] std::io::Error);
        assert_eq!(chain(&Outer(inner)), "connecting to 10.0.0.1:80: refused");
    }
}
