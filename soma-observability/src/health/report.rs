//! Health statuses and the report served by `/v1/health`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// How much a component matters for readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Criticality {
    /// The service cannot serve without it: not `up` means not ready.
    Required,
    /// The service serves without it, in a degraded mode.
    Optional,
}

impl Criticality {
    /// `"required"` or `"optional"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Required => "required",
            Self::Optional => "optional",
        }
    }
}

/// The status of one component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComponentStatus {
    /// Working normally.
    Up,
    /// Working, with reduced capacity or quality.
    Degraded,
    /// Not working.
    Down,
}

impl ComponentStatus {
    /// `"up"`, `"degraded"` or `"down"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Degraded => "degraded",
            Self::Down => "down",
        }
    }

    /// `true` for [`ComponentStatus::Up`].
    pub fn is_up(self) -> bool {
        self == Self::Up
    }
}

/// The overall status of the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverallStatus {
    /// Every component is up.
    Ok,
    /// Serving, but an optional component is not up or a required one is degraded.
    Degraded,
    /// A required component is down.
    Down,
}

impl OverallStatus {
    /// `"ok"`, `"degraded"` or `"down"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Degraded => "degraded",
            Self::Down => "down",
        }
    }

    /// The HTTP status `/v1/health` answers with: 200 for ok/degraded, 503 for down.
    pub fn http_status(self) -> u16 {
        match self {
            Self::Ok | Self::Degraded => 200,
            Self::Down => 503,
        }
    }
}

/// One component in a [`HealthReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentReport {
    /// Current status.
    pub status: ComponentStatus,
    /// Required or optional.
    pub criticality: Criticality,
    /// Why it is not up (or a note); `None` when there is nothing to say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the status (or reason) last changed.
    pub last_change: DateTime<Utc>,
    /// When the background check last completed, for checked components.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<DateTime<Utc>>,
    /// How long the last background check took (capped at its timeout), in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_latency_ms: Option<f64>,
    /// Optional gauges, e.g. `outbox_backlog`, `dlq_depth`, `replica_lag_seconds`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub gauges: BTreeMap<String, f64>,
}

/// The full health report, as served by `/v1/health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthReport {
    /// Overall status (see the rules in the [module docs](super)).
    pub status: OverallStatus,
    /// When this report was last recomputed.
    pub generated_at: DateTime<Utc>,
    /// Every registered component, by name.
    pub components: BTreeMap<String, ComponentReport>,
}

impl HealthReport {
    pub(crate) fn from_components(components: BTreeMap<String, ComponentReport>) -> Self {
        let status = overall(&components);
        Self {
            status,
            generated_at: Utc::now(),
            components,
        }
    }

    /// Readiness derived from this report.
    pub fn readiness(&self) -> Readiness {
        let failing: Vec<String> = self
            .components
            .iter()
            .filter(|(_, c)| c.criticality == Criticality::Required && !c.status.is_up())
            .map(|(name, _)| name.clone())
            .collect();
        Readiness { failing }
    }

    /// The HTTP status `/v1/health` answers with.
    pub fn http_status(&self) -> u16 {
        self.status.http_status()
    }
}

pub(crate) fn overall(components: &BTreeMap<String, ComponentReport>) -> OverallStatus {
    let mut status = OverallStatus::Ok;
    for c in components.values() {
        match (c.criticality, c.status) {
            (_, ComponentStatus::Up) => {}
            (Criticality::Required, ComponentStatus::Down) => return OverallStatus::Down,
            _ => status = OverallStatus::Degraded,
        }
    }
    status
}

/// Whether the service is ready, and if not, which required components are failing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    /// Required components that are not `up`, sorted by name. Empty when ready.
    pub failing: Vec<String>,
}

impl Readiness {
    /// `true` when every required component is `up`.
    pub fn is_ready(&self) -> bool {
        self.failing.is_empty()
    }

    /// 200 when ready, else 503.
    pub fn http_status(&self) -> u16 {
        if self.is_ready() { 200 } else { 503 }
    }
}
