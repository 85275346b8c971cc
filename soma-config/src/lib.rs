//! Typed, layered, live-reloadable settings and feature flags for Soma
//! platform services.
//!
//! (Crate documentation is being written; see the README.)

mod secret;

pub use secret::{REDACTED, Secret};
