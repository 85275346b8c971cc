//! [`ConfiguredEngine`]: the engine the `policy` section names, built in
//! one place.

use std::sync::Arc;

use async_trait::async_trait;
use soma_observability::{HealthRegistry, MetricsRegistry};

use super::{EngineDecision, PolicyEngine, RemoteOpa};
use crate::config::{EngineKind, PolicyConfig};
use crate::metrics::PolicyMetrics;
use crate::{AuthzInput, EngineError};

/// The policy engine selected by [`PolicyConfig::engine`]: a [`RemoteOpa`]
/// (`engine = "remote"`, settings `policy.opa`) or an
/// [`EmbeddedRego`](super::EmbeddedRego) (`engine = "embedded"`, feature
/// `rego`, settings `policy.policy_dir`, `policy.entrypoint`,
/// `policy.evaluator`).
///
/// This is the one place where the settings choose an engine;
/// [`Authorizer::from_config`](crate::Authorizer::from_config) builds its
/// engine here too. Build it with [`ConfiguredEngine::from_config`], plug it
/// in with [`metrics`](ConfiguredEngineBuilder::metrics) and
/// [`health`](ConfiguredEngineBuilder::health) (health component `opa` or
/// `policy`), and hand it to
/// [`Authorizer::builder`](crate::Authorizer::builder) as an
/// `Arc<dyn PolicyEngine>`. It decides exactly as the engine it wraps,
/// generation included, so the authorizer's cache sees every reload.
///
/// ```no_run
/// use std::sync::Arc;
/// use soma_observability::{HealthRegistry, MetricsRegistry};
/// use soma_policy::engine::ConfiguredEngine;
/// use soma_policy::{Authorizer, PolicyConfig, PolicyMetrics};
/// # fn run(config: PolicyConfig) -> Result<(), soma_policy::EngineError> {
/// let (metrics, health) = (MetricsRegistry::default(), HealthRegistry::new());
/// let policy_metrics = PolicyMetrics::new(&metrics);
/// let engine = ConfiguredEngine::from_config(&config)
///     .metrics(&metrics)
///     .health(&health)
///     .build()?;
/// let authz = Authorizer::with_engine(Arc::new(engine), &config)
///     .metrics(policy_metrics)
///     .build();
/// # let _ = authz; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ConfiguredEngine {
    inner: Inner,
}

#[derive(Debug, Clone)]
enum Inner {
    Remote(Arc<RemoteOpa>),
    #[cfg(feature = "rego")]
    Embedded(Arc<super::EmbeddedRego>),
}

/// Builds a [`ConfiguredEngine`]; see [`ConfiguredEngine::from_config`].
#[derive(Debug)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct ConfiguredEngineBuilder<'a> {
    config: &'a PolicyConfig,
    metrics: Option<PolicyMetrics>,
    registry: Option<MetricsRegistry>,
    health: Option<HealthRegistry>,
}

impl ConfiguredEngine {
    /// Starts building the engine `config.engine` names, from the rest of
    /// `config`. Nothing is loaded or connected until
    /// [`build`](ConfiguredEngineBuilder::build).
    pub fn from_config(config: &PolicyConfig) -> ConfiguredEngineBuilder<'_> {
        ConfiguredEngineBuilder {
            config,
            metrics: None,
            registry: None,
            health: None,
        }
    }

    /// Which engine this is.
    pub fn kind(&self) -> EngineKind {
        match &self.inner {
            Inner::Remote(_) => EngineKind::Remote,
            #[cfg(feature = "rego")]
            Inner::Embedded(_) => EngineKind::Embedded,
        }
    }

    /// The remote OPA client, when `engine = "remote"`.
    pub fn remote(&self) -> Option<&Arc<RemoteOpa>> {
        match &self.inner {
            Inner::Remote(opa) => Some(opa),
            #[cfg(feature = "rego")]
            Inner::Embedded(_) => None,
        }
    }

    /// The embedded engine, when `engine = "embedded"` (e.g. to
    /// [`reload`](super::EmbeddedRego::reload) it by hand).
    #[cfg(feature = "rego")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rego")))]
    pub fn embedded(&self) -> Option<&Arc<super::EmbeddedRego>> {
        match &self.inner {
            Inner::Embedded(rego) => Some(rego),
            Inner::Remote(_) => None,
        }
    }

    /// Recompiles the embedded engine's policy directory every time `signal`
    /// changes, keeping the last
    /// good policy when the new one fails to load; see
    /// [`EmbeddedRego::spawn_reloader`](super::EmbeddedRego::spawn_reloader).
    /// `None`, and nothing spawned, for a remote OPA: its policy is
    /// reloaded by OPA itself (bundles). Needs a tokio runtime.
    ///
    /// With soma-config, give it the engine's own inputs, so a change to
    /// any other setting (a rate limit) recompiles nothing:
    /// `engine.spawn_reloader(live.map(|s| EngineInputs::of(&s.policy)))`
    /// (`Live::subscribe()` reloads on every settings change).
    pub fn spawn_reloader<T>(
        &self,
        signal: tokio::sync::watch::Receiver<T>,
    ) -> Option<tokio::task::JoinHandle<()>>
    where
        T: Send + Sync + 'static,
    {
        match &self.inner {
            Inner::Remote(_) => {
                drop(signal);
                None
            }
            #[cfg(feature = "rego")]
            Inner::Embedded(rego) => Some(rego.spawn_reloader(signal)),
        }
    }

    fn engine(&self) -> &dyn PolicyEngine {
        match &self.inner {
            Inner::Remote(opa) => opa.as_ref(),
            #[cfg(feature = "rego")]
            Inner::Embedded(rego) => rego.as_ref(),
        }
    }
}

impl ConfiguredEngineBuilder<'_> {
    /// Records the engine's metrics in `registry`: the remote breaker's
    /// `soma_circuit_breaker_state{component="opa"}`, or the embedded
    /// engine's `soma_policy_reloads_total` (on the same series as the
    /// authorizer's [`PolicyMetrics`] built on this registry).
    pub fn metrics(mut self, registry: &MetricsRegistry) -> Self {
        self.metrics = Some(PolicyMetrics::new(registry));
        self.registry = Some(registry.clone());
        self
    }

    /// The embedded engine's handles given directly (what
    /// [`Authorizer::from_config`](crate::Authorizer::from_config) shares).
    pub(crate) fn policy_metrics(mut self, metrics: PolicyMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Reports the engine's health in `registry`: component `opa` for a
    /// remote OPA ([`RemoteOpa::health`]), `policy` for the embedded
    /// engine ([`EmbeddedRego::health`](super::EmbeddedRego::health)), both
    /// required.
    pub fn health(mut self, registry: &HealthRegistry) -> Self {
        self.health = Some(registry.clone());
        self
    }

    /// Builds the engine: connects nothing for a remote OPA (its client is
    /// lazy), loads and compiles the policy directory for the embedded one.
    ///
    /// # Errors
    ///
    /// [`EngineError::Config`] when the settings cannot describe an engine
    /// (`engine = "embedded"` without the `rego` feature, an OPA base URL
    /// that is not `http://` or `https://`, an entry point not under
    /// `data.`); [`EngineError::Load`] when the embedded policy does not
    /// load or compile; [`EngineError::Transport`] when the HTTP client
    /// cannot be created.
    pub fn build(self) -> Result<ConfiguredEngine, EngineError> {
        let config = self.config;
        let inner = match config.engine {
            EngineKind::Remote => {
                let base = config.opa.base_url.trim();
                if !(base.starts_with("http://") || base.starts_with("https://")) {
                    return Err(EngineError::Config(format!(
                        "policy.opa.base_url must be an http:// or https:// URL, got {base:?}"
                    )));
                }
                let mut opa = RemoteOpa::new(&config.opa)?;
                if let Some(registry) = &self.registry {
                    opa = opa.metrics(registry);
                }
                if let Some(health) = &self.health {
                    opa = opa.health(health);
                }
                Inner::Remote(Arc::new(opa))
            }
            #[cfg(feature = "rego")]
            EngineKind::Embedded => {
                if !config.entrypoint.starts_with("data.") {
                    return Err(EngineError::Config(format!(
                        "policy.entrypoint must be a `data.` path, got {:?}",
                        config.entrypoint
                    )));
                }
                let mut rego = super::EmbeddedRego::from_dir_on(
                    config.policy_dir.clone(),
                    &config.entrypoint,
                    self.metrics.unwrap_or_default(),
                    config.evaluator,
                )?;
                if let Some(health) = &self.health {
                    rego = rego.health(health);
                }
                Inner::Embedded(Arc::new(rego))
            }
            #[cfg(not(feature = "rego"))]
            EngineKind::Embedded => {
                return Err(EngineError::Config(
                    "policy.engine = \"embedded\" needs soma-policy's `rego` feature".into(),
                ));
            }
        };
        Ok(ConfiguredEngine { inner })
    }
}

#[async_trait]
impl PolicyEngine for ConfiguredEngine {
    fn name(&self) -> &'static str {
        self.engine().name()
    }

    async fn evaluate(&self, input: &AuthzInput) -> Result<EngineDecision, EngineError> {
        self.engine().evaluate(input).await
    }

    fn generation(&self) -> u64 {
        self.engine().generation()
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn policy_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policy")
    }

    #[test]
    fn remote_is_selected_and_reports_opa_health() {
        let config = PolicyConfig {
            engine: EngineKind::Remote,
            ..PolicyConfig::default()
        };
        let health = HealthRegistry::new();
        let engine = ConfiguredEngine::from_config(&config)
            .metrics(&MetricsRegistry::default())
            .health(&health)
            .build()
            .unwrap();
        assert_eq!(engine.kind(), EngineKind::Remote);
        assert_eq!(engine.name(), "remote");
        assert!(engine.remote().is_some());
        assert!(engine.embedded().is_none());
        assert!(health.component("opa").is_some());
        assert!(health.component("policy").is_none());
        // A remote OPA cannot tell when its bundle changes: generation 0,
        // so the decision cache's TTL alone bounds a stale decision.
        assert_eq!(engine.generation(), 0);
    }

    #[test]
    fn a_remote_url_that_is_not_http_is_a_config_error() {
        let mut config = PolicyConfig {
            engine: EngineKind::Remote,
            ..PolicyConfig::default()
        };
        config.opa.base_url = "opa:8181".into();
        let err = ConfiguredEngine::from_config(&config).build().unwrap_err();
        assert!(err.is_config(), "{err:?}");
        assert!(!err.is_unavailable());
        assert_eq!(err.code(), "config");
    }

    #[tokio::test]
    async fn embedded_is_selected_reports_policy_health_and_reloads_on_a_signal() {
        let dir = tempfile::tempdir().unwrap();
        for f in std::fs::read_dir(policy_dir()).unwrap() {
            let f = f.unwrap().path();
            if f.is_file() {
                std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
            }
        }
        let config = PolicyConfig {
            engine: EngineKind::Embedded,
            policy_dir: dir.path().to_owned(),
            ..PolicyConfig::default()
        };
        let health = HealthRegistry::new();
        let engine = ConfiguredEngine::from_config(&config)
            .health(&health)
            .build()
            .unwrap();
        assert_eq!(engine.kind(), EngineKind::Embedded);
        assert_eq!(engine.name(), "embedded");
        assert!(engine.remote().is_none());
        assert!(engine.embedded().is_some(), "the embedded engine");
        assert!(health.component("policy").is_some());
        assert!(health.component("opa").is_none());

        let (tx, rx) = tokio::sync::watch::channel(0u32);
        let reloader = engine.spawn_reloader(rx).expect("embedded reloads");
        assert_eq!(engine.generation(), 0);
        tx.send(1).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while engine.generation() == 0 {
            assert!(std::time::Instant::now() < deadline, "no reload");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        drop(tx);
        reloader.await.unwrap();
    }

    #[test]
    fn an_embedded_policy_that_does_not_load_is_a_load_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("broken.rego"),
            "package soma.authz\nallow if {",
        )
        .unwrap();
        let config = PolicyConfig {
            engine: EngineKind::Embedded,
            policy_dir: dir.path().to_owned(),
            ..PolicyConfig::default()
        };
        let err = ConfiguredEngine::from_config(&config).build().unwrap_err();
        assert!(matches!(err, EngineError::Load(_)), "{err:?}");
        assert!(!err.is_config());

        let config = PolicyConfig {
            entrypoint: "soma.authz.decision".into(),
            ..config
        };
        let err = ConfiguredEngine::from_config(&config).build().unwrap_err();
        assert!(err.is_config(), "{err:?}");
    }

    #[test]
    fn a_remote_engine_spawns_no_reloader() {
        let config = PolicyConfig {
            engine: EngineKind::Remote,
            ..PolicyConfig::default()
        };
        let engine = ConfiguredEngine::from_config(&config).build().unwrap();
        let (_tx, rx) = tokio::sync::watch::channel(());
        assert!(engine.spawn_reloader(rx).is_none());
    }
}

/// What an engine is built from in the `policy` settings: the engine kind,
/// the embedded engine's policy directory, entrypoint and evaluator, and
/// the operator's `revision` (bumped to re-read the policy files).
/// A change to one of them is a reason to reload; compare two with `==`
/// (soma-config's `Live::map` does, see
/// [`ConfiguredEngine::spawn_reloader`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EngineInputs {
    /// `policy.engine`.
    pub engine: crate::EngineKind,
    /// `policy.policy_dir`.
    pub policy_dir: std::path::PathBuf,
    /// `policy.entrypoint`.
    pub entrypoint: String,
    /// `policy.evaluator`.
    pub evaluator: crate::RegoEvaluator,
    /// `policy.revision`.
    pub revision: u64,
}

impl EngineInputs {
    /// The inputs of `config`.
    pub fn of(config: &PolicyConfig) -> Self {
        Self {
            engine: config.engine,
            policy_dir: config.policy_dir.clone(),
            entrypoint: config.entrypoint.clone(),
            evaluator: config.evaluator,
            revision: config.revision,
        }
    }
}

#[cfg(test)]
mod inputs_tests {
    use super::*;

    #[test]
    fn only_the_engine_settings_make_inputs_differ() {
        let base = PolicyConfig::default();
        let mut other = base.clone();
        other.fail_mode = crate::FailMode::Open;
        other.leeway_secs += 1;
        assert_eq!(EngineInputs::of(&base), EngineInputs::of(&other));
        let changes: [fn(&mut PolicyConfig); 5] = [
            |c: &mut PolicyConfig| c.revision += 1,
            |c: &mut PolicyConfig| c.policy_dir.push("more"),
            |c: &mut PolicyConfig| c.entrypoint.push_str(".x"),
            |c: &mut PolicyConfig| c.evaluator = crate::RegoEvaluator::Vm,
            |c: &mut PolicyConfig| c.engine = crate::EngineKind::Remote,
        ];
        for change in changes {
            let mut changed = base.clone();
            change(&mut changed);
            assert_ne!(EngineInputs::of(&base), EngineInputs::of(&changed));
        }
    }
}
