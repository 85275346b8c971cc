//! Driving a feature flag to *degraded* from a component's health.
//!
//! A [`DegradedFlagDriver`] watches one component and calls `on_degraded(reason)`
//! when it stops being `up` (and again when the reason changes), and
//! `on_recovered()` when it is `up` again. [`DegradedFlagDriver::drive_flag`]
//! wires it to a soma-config [`FeatureFlags`] flag; [`DegradedFlagDriver::spawn`]
//! takes two closures for any other flag store.
//!
//! ```
//! use soma_config::{FeatureFlags, FlagDescriptor, FlagState, FlagsConfig};
//! use soma_observability::health::flags::DegradedFlagDriver;
//! use soma_observability::health::{Criticality, HealthRegistry};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let flags = FeatureFlags::new(
//!     [FlagDescriptor::new("semantic_cache", "Serve recalls from the Redis cache").default_on(true)],
//!     FlagsConfig::default(),
//!     None,
//! )
//! .unwrap();
//! let health = HealthRegistry::new();
//! let redis = health.reporter("redis", Criticality::Optional);
//! redis.set_up();
//! let _driver = DegradedFlagDriver::new(&health, "redis").drive_flag(&flags, "semantic_cache").unwrap();
//!
//! redis.set_down("connection refused");
//! # for _ in 0..2000 {
//! #     if flags.lookup("semantic_cache").unwrap().state == FlagState::Degraded { break }
//! #     tokio::time::sleep(std::time::Duration::from_millis(5)).await;
//! # }
//! assert_eq!(flags.lookup("semantic_cache").unwrap().state, FlagState::Degraded);
//! # }
//! ```
//!
//! Delivery: the driver sees the *latest* state (a [`watch`](tokio::sync::watch)
//! channel), so quick flaps in between may be coalesced; the final state is
//! always delivered. The initial state is delivered at start.

use soma_config::{ConfigError, FeatureFlags};
use tokio::task::JoinHandle;

use super::{ComponentStatus, HealthRegistry};

/// Watches one component and drives a degraded flag. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct DegradedFlagDriver {
    health: HealthRegistry,
    component: String,
    degrade_on: DegradeOn,
}

/// Which statuses count as degraded for the flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DegradeOn {
    /// `degraded` and `down` (the default).
    NotUp,
    /// Only `down`.
    Down,
}

impl DegradedFlagDriver {
    /// A driver for `component` (which need not be registered yet; an absent
    /// component counts as `up`, so removing a component clears the flag).
    pub fn new(health: &HealthRegistry, component: impl Into<String>) -> Self {
        Self {
            health: health.clone(),
            component: component.into(),
            degrade_on: DegradeOn::NotUp,
        }
    }

    /// Chooses which statuses drive the flag.
    pub fn degrade_on(mut self, on: DegradeOn) -> Self {
        self.degrade_on = on;
        self
    }

    /// Drives soma-config flag `flag`: `set_degraded(flag, reason)` while the
    /// component is not up, `clear_degraded(flag)` when it is up again.
    ///
    /// # Errors
    ///
    /// [`ConfigError::UnknownFlag`] (checked up front) when `flags` has no such flag.
    ///
    /// # Panics
    ///
    /// Panics if called outside a tokio runtime (like `tokio::spawn`).
    pub fn drive_flag(
        self,
        flags: &FeatureFlags,
        flag: &str,
    ) -> Result<JoinHandle<()>, ConfigError> {
        flags.lookup(flag)?;
        let (degrade, clear) = (flags.clone(), flags.clone());
        let (name_d, name_c) = (flag.to_owned(), flag.to_owned());
        Ok(self.spawn(
            move |reason| {
                if let Err(err) = degrade.set_degraded(&name_d, reason) {
                    tracing::error!(flag = %name_d, error = %err, "could not mark flag degraded");
                }
            },
            move || {
                if let Err(err) = clear.clear_degraded(&name_c) {
                    tracing::error!(flag = %name_c, error = %err, "could not clear flag degradation");
                }
            },
        ))
    }

    /// Spawns the watcher on the current tokio runtime. It runs until the
    /// returned handle is aborted or the health registry is dropped.
    ///
    /// # Panics
    ///
    /// Panics if called outside a tokio runtime (like `tokio::spawn`).
    pub fn spawn<D, R>(self, on_degraded: D, on_recovered: R) -> JoinHandle<()>
    where
        D: Fn(&str) + Send + 'static,
        R: Fn() + Send + 'static,
    {
        let mut rx = self.health.subscribe();
        // Do not keep the registry alive through the driver.
        drop(self.health);
        tokio::spawn(async move {
            let mut last: Option<Option<String>> = None; // Some(None) = recovered, Some(Some(r)) = degraded(r)
            loop {
                let current = {
                    let report = rx.borrow_and_update();
                    match report.components.get(&self.component) {
                        Some(c) if is_degraded(c.status, self.degrade_on) => Some(
                            c.reason
                                .clone()
                                .unwrap_or_else(|| c.status.as_str().to_owned()),
                        ),
                        _ => None,
                    }
                };
                if last.as_ref() != Some(&current) {
                    match &current {
                        Some(reason) => on_degraded(&format!("{}: {reason}", self.component)),
                        None => on_recovered(),
                    }
                    last = Some(current);
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
    }
}

fn is_degraded(status: ComponentStatus, on: DegradeOn) -> bool {
    match on {
        DegradeOn::NotUp => status != ComponentStatus::Up,
        DegradeOn::Down => status == ComponentStatus::Down,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::health::Criticality;

    #[tokio::test]
    async fn drives_flag() {
        let h = HealthRegistry::new();
        let r = h.reporter("redis", Criticality::Required);
        r.set_up();
        let log = Arc::new(Mutex::new(Vec::<String>::new()));
        let (l1, l2) = (log.clone(), log.clone());
        let task = DegradedFlagDriver::new(&h, "redis").spawn(
            move |reason| l1.lock().unwrap().push(format!("degraded {reason}")),
            move || l2.lock().unwrap().push("recovered".into()),
        );
        let wait_len = |n: usize| {
            let log = log.clone();
            async move {
                for _ in 0..2000 {
                    if log.lock().unwrap().len() >= n {
                        return;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                panic!("flag driver did not fire: {:?}", log.lock().unwrap());
            }
        };
        wait_len(1).await;
        r.set_down("connection refused");
        wait_len(2).await;
        r.set_up();
        wait_len(3).await;
        assert_eq!(
            *log.lock().unwrap(),
            vec![
                "recovered",
                "degraded redis: connection refused",
                "recovered"
            ]
        );
        task.abort();
    }

    #[tokio::test]
    async fn drives_soma_config_flag() {
        use soma_config::{FlagDescriptor, FlagState, FlagsConfig};
        let flags = FeatureFlags::new(
            [FlagDescriptor::new("semantic_cache", "cache").default_on(true)],
            FlagsConfig::default(),
            None,
        )
        .unwrap();
        let h = HealthRegistry::new();
        let r = h.reporter("redis", Criticality::Optional);
        r.set_up();
        assert!(
            DegradedFlagDriver::new(&h, "redis")
                .drive_flag(&flags, "no_such_flag")
                .is_err()
        );
        let task = DegradedFlagDriver::new(&h, "redis")
            .drive_flag(&flags, "semantic_cache")
            .unwrap();
        let wait_state = |want: FlagState| {
            let flags = flags.clone();
            async move {
                for _ in 0..2000 {
                    if flags.lookup("semantic_cache").unwrap().state == want {
                        return flags.lookup("semantic_cache").unwrap();
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                panic!(
                    "flag never became {want:?}: {:?}",
                    flags.lookup("semantic_cache")
                );
            }
        };
        wait_state(FlagState::On).await;
        r.set_degraded("p99 latency 2s");
        let lookup = wait_state(FlagState::Degraded).await;
        assert_eq!(lookup.reason.as_deref(), Some("redis: p99 latency 2s"));
        r.set_up();
        wait_state(FlagState::On).await;
        task.abort();
    }
}
