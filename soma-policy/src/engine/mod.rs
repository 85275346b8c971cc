//! Policy engines behind one trait: [`RemoteOpa`] and `EmbeddedRego`, and
//! [`ConfiguredEngine`], whichever of them the `policy` settings name.

mod configured;
#[cfg(feature = "rego")]
mod embedded;
#[cfg(feature = "rego")]
mod negation_check;
#[cfg(feature = "rego")]
mod rego_walk;
mod remote;
#[cfg(feature = "rego")]
mod vm_check;

use async_trait::async_trait;
use serde_json::Value;

pub use configured::{ConfiguredEngine, ConfiguredEngineBuilder, EngineInputs};
#[cfg(feature = "rego")]
pub use embedded::{EmbeddedRego, MAX_VM_INSTRUCTIONS};
#[allow(deprecated)]
pub use remote::CircuitState;
pub use remote::RemoteOpa;

use crate::{AuthzInput, EngineError};

/// What an engine decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineDecision {
    /// Whether the action is allowed.
    pub allow: bool,
    /// The policy's reasons (empty when it returned a bare boolean).
    pub reasons: Vec<String>,
}

/// Something that decides on an [`AuthzInput`].
#[async_trait]
pub trait PolicyEngine: Send + Sync + 'static {
    /// Short name for metrics and audit (`remote`, `embedded`).
    fn name(&self) -> &'static str;

    /// Decides. A denial is `Ok(EngineDecision { allow: false, .. })`; an
    /// `Err` means no decision could be had.
    async fn evaluate(&self, input: &AuthzInput) -> Result<EngineDecision, EngineError>;

    /// The generation of the policy in force: changes whenever the policy
    /// does (`EmbeddedRego` bumps it after every successful reload). The
    /// [`Authorizer`](crate::Authorizer)'s decision cache keys on it, so a
    /// reload is seen by the very next request. Engines that cannot tell
    /// (a remote OPA, whose bundles change without telling us) keep the
    /// default `0`; their cached decisions live at most the cache's
    /// `ttl_ms`.
    fn generation(&self) -> u64 {
        0
    }
}

/// Interprets a decision document: `true`/`false`, or an object with a
/// boolean `allow` and optional `reasons` (array of strings). Anything else is
/// [`EngineError::MalformedResponse`].
pub fn decision_from_value(v: &Value) -> Result<EngineDecision, EngineError> {
    match v {
        Value::Bool(allow) => Ok(EngineDecision {
            allow: *allow,
            reasons: Vec::new(),
        }),
        Value::Object(m) => {
            let allow = m.get("allow").and_then(Value::as_bool).ok_or_else(|| {
                EngineError::MalformedResponse("`allow` must be a boolean".into())
            })?;
            let reasons = match m.get("reasons") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|r| r.as_str().map(str::to_owned))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| {
                        EngineError::MalformedResponse("`reasons` must be strings".into())
                    })?,
                Some(_) => {
                    return Err(EngineError::MalformedResponse(
                        "`reasons` must be an array".into(),
                    ));
                }
            };
            Ok(EngineDecision { allow, reasons })
        }
        _ => Err(EngineError::MalformedResponse(
            "decision must be a boolean or an object".into(),
        )),
    }
}
