//! Keeps process-environment access inside allowed crates.
