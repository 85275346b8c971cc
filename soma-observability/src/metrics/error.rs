//! Errors from metric registration.

/// Why a metric family could not be registered.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// The name is already registered with another metric type or label type.
    #[error(
        "metric `{name}` is already registered as a {existing}; refused to register it as a {requested}"
    )]
    Conflict {
        /// The metric name.
        name: String,
        /// What the name is registered as.
        existing: String,
        /// What the caller asked for.
        requested: String,
    },
    /// The name is already registered as a histogram with other buckets.
    #[error(
        "histogram `{name}` is already registered with buckets {existing:?}; refused buckets {requested:?}"
    )]
    BucketsMismatch {
        /// The metric name.
        name: String,
        /// Registered bucket bounds.
        existing: Vec<f64>,
        /// Requested bucket bounds.
        requested: Vec<f64>,
    },
    /// The name is not a valid Prometheus metric name.
    #[error("invalid metric name `{name}`: {reason}")]
    InvalidName {
        /// The offending name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl MetricsError {
    /// The name is taken by a family of another type (kind, labels or buckets).
    pub fn is_conflict(&self) -> bool {
        matches!(self, Self::Conflict { .. } | Self::BucketsMismatch { .. })
    }

    /// The name is not a valid metric name.
    pub fn is_invalid_name(&self) -> bool {
        matches!(self, Self::InvalidName { .. })
    }
}
