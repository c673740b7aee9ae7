//! Configuration: `lb.toml` → raw serde structs → validation → [`Model`].
//!
//! Every problem is reported with the file, line, column and dotted key path, all at once, so an
//! operator fixes a config in one pass. Nothing downstream re-validates a [`Model`].
mod check;
pub mod discovery;
pub mod duration;
pub mod error;
pub mod filter;
pub mod model;
pub mod otlp;
pub mod outlier;
pub mod passthrough;
mod raw;
pub mod retry;
pub mod tls;
pub mod upstream_tls;
mod validate;

use std::path::Path;

pub use error::{ConfigError, ConfigErrors};
pub use model::Model;

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Model, ConfigErrors> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigErrors::single(ConfigError::io(path, &e)))?;
    parse(&text, path)
}

/// Validates `text` as if read from `path` (used in error messages and [`model::Source`]).
pub fn parse(text: &str, path: &Path) -> Result<Model, ConfigErrors> {
    let mut diags = error::Diagnostics::new(path, text);
    // `None` after syntax errors: the tree is a guess, so its meaning is not checked.
    let model =
        raw::read(text, &mut diags).map(|raw| validate::validate(raw, text, path, &mut diags));
    diags.finish()?;
    model.ok_or_else(|| {
        ConfigErrors::single(ConfigError {
            path: path.to_path_buf(),
            line: 1,
            column: 1,
            key: String::new(),
            message: "unreadable TOML".into(),
        })
    })
}
