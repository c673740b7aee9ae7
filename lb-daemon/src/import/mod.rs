//! `lbd import`: an nginx or HAProxy configuration translated into an `lb.toml`, with every
//! directive that was not carried over listed by file:line.
//!
//! The common subset is translated: upstream/backend blocks (weights, backup, max_fails /
//! fail_timeout, active checks, balancing), listeners, routing by host, path and header,
//! proxy_pass / use_backend, timeouts, and https redirects. The result is checked with lbd's
//! own config loader before it is returned, so what `import` prints `lbd check` accepts.
mod haproxy;
mod nginx;
pub mod plan;

use std::path::Path;

pub use plan::{Plan, Skipped};

/// Which configuration language a file is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `nginx.conf`.
    Nginx,
    /// `haproxy.cfg`.
    Haproxy,
}

impl Format {
    /// Guesses from the file name, then from its first section keywords.
    pub fn detect(path: &Path, text: &str) -> Option<Format> {
        let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
        if name.contains("haproxy") || name.ends_with(".cfg") {
            return Some(Format::Haproxy);
        }
        if name.contains("nginx") || name.ends_with(".conf") {
            return Some(Format::Nginx);
        }
        let first = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))?;
        let kw = first.split_whitespace().next()?;
        match kw {
            "global" | "defaults" | "frontend" | "backend" | "listen" => Some(Format::Haproxy),
            _ => Some(Format::Nginx),
        }
    }
}

/// Why a file could not be imported at all.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The source is not valid nginx/HAProxy syntax.
    #[error("{file}:{line}: {message}")]
    Syntax {
        /// File.
        file: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The translation is not a valid lbd configuration (a bug in the importer).
    #[error("the translated configuration is not valid (please report this):\n{0}")]
    Invalid(String),
}

impl ImportError {
    fn syntax(file: &str, line: usize, message: &str) -> Self {
        ImportError::Syntax {
            file: file.to_string(),
            line,
            message: message.to_string(),
        }
    }
}

/// The result of an import: the `lb.toml` text and what was left out.
#[derive(Debug)]
pub struct Imported {
    /// The configuration, with `# from file:line` comments and the skipped list at its end.
    pub toml: String,
    /// Directives not translated.
    pub skipped: Vec<Skipped>,
}

/// Translates `text` (read from `file`) in the given format.
pub fn translate(text: &str, file: &str, format: Format) -> Result<Imported, ImportError> {
    let plan = match format {
        Format::Nginx => nginx::translate(text, file)?,
        Format::Haproxy => haproxy::translate(text, file)?,
    };
    let toml = plan.render(file);
    if let Err(errors) = crate::config::parse(&toml, Path::new("imported.toml")) {
        let list: Vec<String> = errors.0.iter().map(|e| e.to_string()).collect();
        return Err(ImportError::Invalid(list.join("\n")));
    }
    Ok(Imported {
        toml,
        skipped: plan.skipped,
    })
}

/// Reads and translates a file; the format is detected unless given.
pub fn import_file(path: &Path, format: Option<Format>) -> Result<Imported, ImportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ImportError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let format = format
        .or_else(|| Format::detect(path, &text))
        .unwrap_or(Format::Nginx);
    translate(&text, &path.display().to_string(), format)
}
