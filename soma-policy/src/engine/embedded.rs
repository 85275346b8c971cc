//! In-process Rego with regorus (feature `rego`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::RwLock;
use regorus::{CompiledPolicy, PolicyModule, Value};

use super::{EngineDecision, PolicyEngine, decision_from_value};
use soma_observability::health::HealthReporter;

use crate::metrics::PolicyMetrics;
use crate::{AuthzInput, EngineError};

/// Rego policies evaluated in-process by regorus.
///
/// Policies (`*.rego`, except `*_test.rego`) and data (`data.json`, merged at
/// the root) are loaded from a directory, recursively. [`EmbeddedRego::reload`]
/// (or a reload signal, see [`EmbeddedRego::spawn_reloader`]) compiles the
/// directory again and swaps the new policy in atomically; when the new
/// policy fails to load or compile, the last good one stays in force, the
/// failure is logged and counted (`soma_policy_reloads_total{result="error"}`).
pub struct EmbeddedRego {
    dir: PathBuf,
    entrypoint: String,
    current: RwLock<Arc<CompiledPolicy>>,
    metrics: PolicyMetrics,
    health: Option<HealthReporter>,
}

impl std::fmt::Debug for EmbeddedRego {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedRego")
            .field("dir", &self.dir)
            .field("entrypoint", &self.entrypoint)
            .finish_non_exhaustive()
    }
}

impl EmbeddedRego {
    /// Loads and compiles the policies in `dir`; `entrypoint` is the rule to
    /// evaluate, e.g. `data.soma.authz.decision`. Fails when nothing loads.
    pub fn from_dir(
        dir: impl Into<PathBuf>,
        entrypoint: &str,
        metrics: PolicyMetrics,
    ) -> Result<Self, EngineError> {
        let dir = dir.into();
        let compiled = compile_dir(&dir, entrypoint)?;
        Ok(Self {
            dir,
            entrypoint: entrypoint.to_owned(),
            current: RwLock::new(Arc::new(compiled)),
            metrics,
            health: None,
        })
    }

    /// Compiles policies given as `(file name, source)` pairs (no directory;
    /// [`EmbeddedRego::reload`] then fails and keeps these).
    pub fn from_sources(
        sources: &[(&str, &str)],
        entrypoint: &str,
        metrics: PolicyMetrics,
    ) -> Result<Self, EngineError> {
        let modules: Vec<PolicyModule> = sources
            .iter()
            .map(|(id, content)| PolicyModule {
                id: (*id).into(),
                content: (*content).into(),
            })
            .collect();
        let compiled = compile(Vec::new(), &modules, entrypoint)?;
        Ok(Self {
            dir: PathBuf::new(),
            entrypoint: entrypoint.to_owned(),
            current: RwLock::new(Arc::new(compiled)),
            metrics,
            health: None,
        })
    }

    /// Reports health: `degraded` while a failed reload leaves the last good
    /// policy in force, `up` after a successful (re)load.
    pub fn with_health(mut self, reporter: HealthReporter) -> Self {
        reporter.set_up();
        self.health = Some(reporter);
        self
    }

    /// Reloads the directory. On error the previous policy stays in force
    /// and the error is returned.
    pub fn reload(&self) -> Result<(), EngineError> {
        match compile_dir(&self.dir, &self.entrypoint) {
            Ok(compiled) => {
                *self.current.write() = Arc::new(compiled);
                self.metrics.reload(true);
                if let Some(h) = &self.health {
                    h.set_up();
                }
                tracing::info!(dir = %self.dir.display(), "policy reloaded");
                Ok(())
            }
            Err(e) => {
                self.metrics.reload(false);
                if let Some(h) = &self.health {
                    h.set_degraded(format!(
                        "policy reload failed, serving the last good policy: {e}"
                    ));
                }
                tracing::error!(dir = %self.dir.display(), error = %e, "policy reload failed; keeping last good policy");
                Err(e)
            }
        }
    }

    /// Reloads every time `signal` changes (e.g. soma-config's
    /// `Live::subscribe()`), until the sender is dropped.
    pub fn spawn_reloader<T>(
        self: &Arc<Self>,
        mut signal: tokio::sync::watch::Receiver<T>,
    ) -> tokio::task::JoinHandle<()>
    where
        T: Send + Sync + 'static,
    {
        let this = self.clone();
        tokio::spawn(async move {
            while signal.changed().await.is_ok() {
                let engine = this.clone();
                // Compiling reads files and is CPU work: keep it off the reactor.
                let _ = tokio::task::spawn_blocking(move || engine.reload()).await;
            }
        })
    }

    /// Evaluates synchronously (what [`PolicyEngine::evaluate`] does).
    pub fn evaluate_sync(&self, input: &AuthzInput) -> Result<EngineDecision, EngineError> {
        let bytes =
            serde_json::to_vec(input).map_err(|e| EngineError::Evaluation(e.to_string()))?;
        let value: Value =
            serde_json::from_slice(&bytes).map_err(|e| EngineError::Evaluation(e.to_string()))?;
        let policy = self.current.read().clone();
        let out = policy
            .eval_with_input(value)
            .map_err(|e| EngineError::Evaluation(e.to_string()))?;
        if out == Value::Undefined {
            return Err(EngineError::Undefined);
        }
        let json =
            serde_json::to_value(&out).map_err(|e| EngineError::Evaluation(e.to_string()))?;
        decision_from_value(&json)
    }
}

#[async_trait]
impl PolicyEngine for EmbeddedRego {
    fn name(&self) -> &'static str {
        "embedded"
    }

    async fn evaluate(&self, input: &AuthzInput) -> Result<EngineDecision, EngineError> {
        self.evaluate_sync(input)
    }
}

fn compile(
    data: Vec<Value>,
    modules: &[PolicyModule],
    entrypoint: &str,
) -> Result<CompiledPolicy, EngineError> {
    if modules.is_empty() {
        return Err(EngineError::Load("no .rego policies found".into()));
    }
    let mut engine = regorus::Engine::new();
    for d in data {
        engine
            .add_data(d)
            .map_err(|e| EngineError::Load(format!("data: {e}")))?;
    }
    for m in modules {
        engine
            .add_policy(m.id.to_string(), m.content.to_string())
            .map_err(|e| EngineError::Load(e.to_string()))?;
    }
    let compiled = engine
        .compile_with_entrypoint(&entrypoint.into())
        .map_err(|e| EngineError::Load(e.to_string()))?;
    // The entry point must evaluate on an empty input: a policy that errors
    // there would error on every request.
    compiled
        .eval_with_input(Value::new_object())
        .map_err(|e| EngineError::Load(e.to_string()))?;
    Ok(compiled)
}

fn compile_dir(dir: &Path, entrypoint: &str) -> Result<CompiledPolicy, EngineError> {
    let mut modules = Vec::new();
    let mut data = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = std::fs::read_dir(&d)
            .map_err(|e| EngineError::Load(format!("{}: {e}", d.display())))?;
        let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for p in entries {
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            if p.is_dir() {
                stack.push(p);
            } else if name.ends_with(".rego") && !name.ends_with("_test.rego") {
                let src = std::fs::read_to_string(&p)
                    .map_err(|e| EngineError::Load(format!("{}: {e}", p.display())))?;
                let id = p.strip_prefix(dir).unwrap_or(&p).display().to_string();
                modules.push(PolicyModule {
                    id: id.into(),
                    content: src.into(),
                });
            } else if name == "data.json" {
                let src = std::fs::read_to_string(&p)
                    .map_err(|e| EngineError::Load(format!("{}: {e}", p.display())))?;
                let v = Value::from_json_str(&src)
                    .map_err(|e| EngineError::Load(format!("{}: {e}", p.display())))?;
                data.push(v);
            }
        }
    }
    compile(data, &modules, entrypoint)
}
