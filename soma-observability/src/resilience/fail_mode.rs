//! [`FailMode`]: what a component does when it cannot decide.

use serde::{Deserialize, Serialize};

/// What a component on the request path does when the dependency it needs
/// to decide (the policy engine, the rate limiter's Redis) cannot be
/// reached. One name for one choice in every soma crate; each component
/// documents what its two answers look like.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    /// Reject the request (`503`). Nothing is let through unchecked, at the
    /// cost of availability while the dependency is down. The default.
    #[default]
    Closed,
    /// Let the request through unchecked, logging (and, where the component
    /// has metrics, counting) each one. Availability first. Must be chosen
    /// explicitly.
    Open,
}

#[cfg(test)]
mod tests {
    use super::FailMode;

    #[test]
    fn closed_by_default_and_snake_case_in_config() {
        assert_eq!(FailMode::default(), FailMode::Closed);
        assert_eq!(serde_json::to_string(&FailMode::Open).unwrap(), "\"open\"");
        let m: FailMode = serde_json::from_str("\"closed\"").unwrap();
        assert_eq!(m, FailMode::Closed);
    }
}
