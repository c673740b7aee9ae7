//! Configuration: `lb.toml` → raw serde structs → validation → [`Model`].
//!
//! Every problem is reported with the file, line, column and dotted key path, all at once, so an
//! operator fixes a config in one pass. Nothing downstream re-validates a [`Model`].
pub mod duration;
pub mod error;
pub mod model;
mod raw;
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
    let Some(raw) = raw::read(text, &mut diags) else {
        // Syntax errors: the tree is a guess, so meaning is not checked.
        diags.finish()?;
        unreachable!("raw::read returns None only after recording an error");
    };
    let model = validate::validate(raw, text, path, &mut diags);
    diags.finish()?;
    Ok(model)
}
