//! Configuration: `lb.toml` → raw serde structs → validation → [`Model`].
pub mod model;

pub use model::Model;
