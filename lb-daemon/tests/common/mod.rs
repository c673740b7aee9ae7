//! Helpers shared by the namespace tests (each test file compiles this module on its own and
//! uses a different subset of it).
#![allow(dead_code, reason = "each test crate uses only part of the helpers")]

pub mod netns;
