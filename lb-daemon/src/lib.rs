//! lbd: an L4 (XDP) and L7 (HTTP/1.1, HTTP/2, gRPC) load balancer and API gateway.
//!
//! Data flows one way: `lb.toml` → [`config`] (raw serde structs → validated [`config::Model`])
//! → [`supervisor`] (running state) → data paths ([`l7`], [`l4`]) that follow [`health`] and
//! pick endpoints through [`balance`].
#![deny(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod config;
pub mod demo;
pub mod discovery;
pub mod health;
pub mod import;
pub mod l4;
pub mod l7;
pub mod memory;
pub mod sdnotify;
pub mod supervisor;
pub mod telemetry;
pub mod thread_cache;
