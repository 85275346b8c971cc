//! In-process Rego with regorus (feature `rego`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use regorus::languages::rego::compiler::Compiler;
use regorus::rvm::program::Program;
use regorus::rvm::vm::RegoVM;
use regorus::{CompiledPolicy, PolicyModule, Value};

use super::{EngineDecision, PolicyEngine, decision_from_value};
use soma_observability::HealthRegistry;
use soma_observability::health::{Criticality, HealthReporter};

use crate::metrics::PolicyMetrics;
use crate::{AuthzInput, EngineError, RegoEvaluator};

/// Most VM instructions one decision may execute; a policy that needs more
/// (a runaway loop over a large data document) gets an evaluation error,
/// which the authorizer treats as "no decision" (503 in fail-closed mode).
pub const MAX_VM_INSTRUCTIONS: usize = 1_000_000;

/// Idle VMs kept per loaded policy; more concurrent evaluations than this
/// create VMs that are dropped afterwards.
const MAX_IDLE_VMS: usize = 64;

/// Rego policies evaluated in-process by regorus.
///
/// Policies (`*.rego`, except `*_test.rego`) and data (`data.json`, merged at
/// the root) are loaded from a directory, recursively. [`EmbeddedRego::reload`]
/// (or a reload signal, see [`EmbeddedRego::spawn_reloader`]) compiles the
/// directory again and swaps the new policy in atomically; when the new
/// policy fails to load or compile, the last good one stays in force, the
/// failure is logged and counted (`soma_policy_reloads_total{result="error"}`).
///
/// # How a decision is evaluated
///
/// The input is built directly as a regorus value (no JSON round trip).
/// By default ([`RegoEvaluator::Auto`]) a policy eligible for regorus' Rego
/// VM (see [`RegoEvaluator::Vm`] for the checks) has its entry point
/// compiled at (re)load to VM bytecode, evaluated on VMs kept in a small
/// pool (regorus resets a VM before every run; the input is dropped after
/// it); any other policy is evaluated by regorus' interpreter.
/// [`EmbeddedRego::with_evaluator`] forces one or the other, and
/// [`EmbeddedRego::active_evaluator`] tells which one is in force.
pub struct EmbeddedRego {
    dir: PathBuf,
    entrypoint: String,
    evaluator: RegoEvaluator,
    current: RwLock<Arc<Loaded>>,
    /// Bumped after every policy swap (see [`PolicyEngine::generation`]).
    generation: AtomicU64,
    metrics: PolicyMetrics,
    health: Option<HealthReporter>,
}

impl std::fmt::Debug for EmbeddedRego {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedRego")
            .field("dir", &self.dir)
            .field("entrypoint", &self.entrypoint)
            .field("evaluator", &self.evaluator)
            .finish_non_exhaustive()
    }
}

impl EmbeddedRego {
    /// Loads and compiles the policies in `dir`; `entrypoint` is the rule to
    /// evaluate, e.g. `data.soma.authz.decision`. Fails when nothing loads.
    /// `metrics` as in [`EmbeddedRego::metrics`].
    pub fn from_dir(
        dir: impl Into<PathBuf>,
        entrypoint: &str,
        metrics: impl Into<PolicyMetrics>,
    ) -> Result<Self, EngineError> {
        Self::from_dir_on(
            dir.into(),
            entrypoint,
            metrics.into(),
            RegoEvaluator::default(),
        )
    }

    /// [`EmbeddedRego::from_dir`] then [`EmbeddedRego::with_evaluator`],
    /// loading the policy once.
    pub(crate) fn from_dir_on(
        dir: PathBuf,
        entrypoint: &str,
        metrics: PolicyMetrics,
        evaluator: RegoEvaluator,
    ) -> Result<Self, EngineError> {
        let compiled = compile_dir(&dir, entrypoint, evaluator)?;
        Ok(Self {
            dir,
            entrypoint: entrypoint.to_owned(),
            evaluator,
            current: RwLock::new(Arc::new(compiled)),
            generation: AtomicU64::new(0),
            metrics,
            health: None,
        })
    }

    /// Compiles policies given as `(file name, source)` pairs (no directory;
    /// [`EmbeddedRego::reload`] then fails and keeps these). `metrics` as in
    /// [`EmbeddedRego::metrics`].
    pub fn from_sources(
        sources: &[(&str, &str)],
        entrypoint: &str,
        metrics: impl Into<PolicyMetrics>,
    ) -> Result<Self, EngineError> {
        let metrics = metrics.into();
        let modules: Vec<PolicyModule> = sources
            .iter()
            .map(|(id, content)| PolicyModule {
                id: (*id).into(),
                content: (*content).into(),
            })
            .collect();
        let evaluator = RegoEvaluator::default();
        let compiled = compile(Vec::new(), &modules, entrypoint, evaluator)?;
        Ok(Self {
            dir: PathBuf::new(),
            entrypoint: entrypoint.to_owned(),
            evaluator,
            current: RwLock::new(Arc::new(compiled)),
            generation: AtomicU64::new(0),
            metrics,
            health: None,
        })
    }

    /// Switches the evaluator for the policy in force and every reload.
    /// Fails (and nothing changes) when `evaluator` is
    /// [`RegoEvaluator::Vm`] and the policy is not eligible for the VM.
    pub fn with_evaluator(mut self, evaluator: RegoEvaluator) -> Result<Self, EngineError> {
        if evaluator != self.evaluator {
            let current = self.current.read().clone();
            let loaded = Loaded::new(
                current.policy.clone(),
                current.data.clone(),
                &self.entrypoint,
                evaluator,
                Some(current.divergences.clone()),
            )?;
            *self.current.write() = Arc::new(loaded);
            self.evaluator = evaluator;
        }
        Ok(self)
    }

    /// The evaluator chosen (possibly [`RegoEvaluator::Auto`]).
    pub fn evaluator(&self) -> RegoEvaluator {
        self.evaluator
    }

    /// The evaluator the policy in force runs on:
    /// [`RegoEvaluator::Vm`] or [`RegoEvaluator::Interpreter`] (with
    /// [`RegoEvaluator::Auto`], whichever the policy was eligible for).
    pub fn active_evaluator(&self) -> RegoEvaluator {
        self.current.read().active()
    }

    /// Where the policy in force negates an operand that may be undefined
    /// (`not actions[input.action]`, `not is_string(input.x)`, `not "a" in
    /// input.xs`), each as `file:line:col: what`; empty for the reference
    /// policy. Real OPA evaluates such an operand before the negation, so
    /// with the field missing the body fails there and holds here: a policy
    /// meant to decide the same on an OPA sidecar must negate a rule instead
    /// (`known if actions[input.action]`, then `not known`). Each finding is
    /// also logged at warn when the policy loads. The check is syntactic: it
    /// also flags an operand an earlier expression of the same body already
    /// requires to be defined.
    pub fn opa_divergences(&self) -> Vec<String> {
        self.current.read().divergences.clone()
    }

    /// Records the engine's reloads (`soma_policy_reloads_total`) on
    /// `metrics`: a [`MetricsRegistry`](soma_observability::MetricsRegistry)
    /// (`.metrics(&registry)`) or [`PolicyMetrics`] handles shared with the
    /// authorizer. Replaces the handles given to the constructor.
    pub fn metrics(mut self, metrics: impl Into<PolicyMetrics>) -> Self {
        self.metrics = metrics.into();
        self
    }

    /// Reports the health component `policy` (required: policy decisions
    /// gate traffic) in `registry`: `up` after a successful (re)load,
    /// `degraded` while a failed reload leaves the last good policy in force.
    pub fn health(self, registry: &HealthRegistry) -> Self {
        self.health_reporter(registry.reporter("policy", Criticality::Required))
    }

    fn health_reporter(mut self, reporter: HealthReporter) -> Self {
        reporter.set_up();
        self.health = Some(reporter);
        self
    }

    /// Reports health through `reporter`: `degraded` while a failed reload
    /// leaves the last good policy in force, `up` after a successful (re)load.
    #[deprecated(
        since = "0.2.0",
        note = "use `EmbeddedRego::health(&HealthRegistry)`, which registers the component `policy`"
    )]
    pub fn with_health(self, reporter: HealthReporter) -> Self {
        self.health_reporter(reporter)
    }

    /// Reloads the directory. On error the previous policy stays in force
    /// and the error is returned.
    pub fn reload(&self) -> Result<(), EngineError> {
        match compile_dir(&self.dir, &self.entrypoint, self.evaluator) {
            Ok(compiled) => {
                *self.current.write() = Arc::new(compiled);
                // After the swap: a caller that reads the new generation
                // evaluates the new policy.
                self.generation.fetch_add(1, Ordering::AcqRel);
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
        self.evaluate_value(to_rego(input)?)
    }

    /// Evaluates an arbitrary input document: one this crate's
    /// [`AuthzInput`] cannot express (a missing field, a field of another
    /// type), as a caller other than this crate may send to an OPA
    /// sidecar. Use it to test a policy against such inputs, or to replay
    /// logged inputs. The layers and [`EmbeddedRego::evaluate_sync`] build
    /// the document from an [`AuthzInput`] instead.
    pub fn evaluate_document(
        &self,
        input: &serde_json::Value,
    ) -> Result<EngineDecision, EngineError> {
        use serde::Deserialize as _;
        let value =
            Value::deserialize(input).map_err(|e| EngineError::Evaluation(e.to_string()))?;
        self.evaluate_value(value)
    }

    fn evaluate_value(&self, input: Value) -> Result<EngineDecision, EngineError> {
        let loaded = self.current.read().clone();
        let out = loaded.eval(input)?;
        decision_from_rego(&out)
    }
}

/// A compiled policy, with its VM program when the VM evaluates it.
struct Loaded {
    policy: CompiledPolicy,
    data: Value,
    vm: Option<VmPool>,
    /// Negations OPA decides differently (`file:line:col: what`).
    divergences: Vec<String>,
}

impl Loaded {
    fn new(
        policy: CompiledPolicy,
        data: Value,
        entrypoint: &str,
        evaluator: RegoEvaluator,
        // The policy's divergences when they are known (and were logged).
        divergences: Option<Vec<String>>,
    ) -> Result<Self, EngineError> {
        // The entry point must evaluate on an empty input: a policy that
        // errors there would error on every request.
        let reference = policy
            .eval_with_input(Value::new_object())
            .map_err(|e| EngineError::Load(e.to_string()))?;
        let vm = match evaluator {
            RegoEvaluator::Interpreter => None,
            RegoEvaluator::Vm => Some(VmPool::eligible(&policy, &data, entrypoint, &reference)?),
            RegoEvaluator::Auto => match VmPool::eligible(&policy, &data, entrypoint, &reference) {
                Ok(pool) => Some(pool),
                Err(e) => {
                    tracing::warn!(
                        reason = %e,
                        "policy is not eligible for the Rego VM; evaluating it with \
                         regorus' interpreter"
                    );
                    None
                }
            },
        };
        let divergences = divergences.unwrap_or_else(|| {
            let found: Vec<String> = super::negation_check::divergent_negations(&policy)
                .iter()
                .map(ToString::to_string)
                .collect();
            for d in &found {
                tracing::warn!(
                    finding = %d,
                    "the policy negates an operand that may be undefined: real OPA decides \
                     this differently from regorus"
                );
            }
            found
        });
        Ok(Self {
            policy,
            data,
            vm,
            divergences,
        })
    }

    /// The evaluator this policy runs on: `Vm` or `Interpreter`.
    fn active(&self) -> RegoEvaluator {
        if self.vm.is_some() {
            RegoEvaluator::Vm
        } else {
            RegoEvaluator::Interpreter
        }
    }

    fn eval(&self, input: Value) -> Result<Value, EngineError> {
        let out = match &self.vm {
            Some(pool) => pool.eval(input)?,
            None => self
                .policy
                .eval_with_input(input)
                .map_err(|e| EngineError::Evaluation(e.to_string()))?,
        };
        if out == Value::Undefined {
            return Err(EngineError::Undefined);
        }
        Ok(out)
    }
}

/// The entry point compiled for the Rego VM, and idle VMs loaded with it.
struct VmPool {
    program: Arc<Program>,
    data: Value,
    idle: Mutex<Vec<RegoVM>>,
}

impl VmPool {
    /// A pool for `policy` if it is eligible for the VM (see
    /// [`RegoEvaluator::Vm`]); `reference` is the interpreter's result on
    /// an empty input.
    fn eligible(
        policy: &CompiledPolicy,
        data: &Value,
        entrypoint: &str,
        reference: &Value,
    ) -> Result<Self, EngineError> {
        let hazards = super::vm_check::hazards(policy);
        if !hazards.is_empty() {
            let list: Vec<String> = hazards.iter().map(ToString::to_string).collect();
            return Err(EngineError::Load(format!(
                "the policy is not eligible for the Rego VM: {}; use evaluator = \
                 \"interpreter\" or \"auto\" for this policy",
                list.join("; ")
            )));
        }
        let pool = Self::new(policy, data, entrypoint)?;
        let on_empty = pool.eval(Value::new_object()).map_err(|e| {
            EngineError::Load(format!("the Rego VM cannot evaluate {entrypoint}: {e}"))
        })?;
        if on_empty != *reference {
            return Err(EngineError::Load(format!(
                "the Rego VM and the interpreter disagree on {entrypoint} for an empty \
                 input (vm: {on_empty}, interpreter: {reference}); use evaluator = \
                 \"interpreter\" or \"auto\" for this policy"
            )));
        }
        Ok(pool)
    }

    fn new(policy: &CompiledPolicy, data: &Value, entrypoint: &str) -> Result<Self, EngineError> {
        let program = Compiler::compile_from_policy(policy, &[entrypoint]).map_err(|e| {
            EngineError::Load(format!("the Rego VM cannot compile {entrypoint}: {e}"))
        })?;
        let pool = Self {
            program,
            data: data.clone(),
            idle: Mutex::new(Vec::new()),
        };
        // Fail here, not on the first request, if the data does not fit.
        let vm = pool.new_vm()?;
        pool.idle.lock().push(vm);
        Ok(pool)
    }

    fn new_vm(&self) -> Result<RegoVM, EngineError> {
        let mut vm = RegoVM::new();
        vm.load_program(self.program.clone());
        vm.set_max_instructions(MAX_VM_INSTRUCTIONS);
        // The VM's default (non-strict) mode, which orders values of
        // different types as OPA does. Its strict mode makes `"a" > 1` an
        // error, and the VM drops a rule body that errs, which in a deny-set
        // rule (`deny contains … if input.size > 100`) would allow. Builtin
        // errors, which the VM also drops, are kept off it by the VM check.
        vm.set_data(self.data.clone())
            .map_err(|e| EngineError::Load(format!("data: {e}")))?;
        Ok(vm)
    }

    fn eval(&self, input: Value) -> Result<Value, EngineError> {
        let idle = self.idle.lock().pop();
        let mut vm = match idle {
            Some(vm) => vm,
            // The data was checked when the pool was built; this cannot
            // fail unless regorus changes its mind.
            None => self
                .new_vm()
                .map_err(|e| EngineError::Evaluation(e.to_string()))?,
        };
        vm.set_input(input);
        let out = vm.execute();
        // Keep no reference to this request's input in the idle VM.
        vm.set_input(Value::Null);
        match out {
            Ok(v) => {
                let mut idle = self.idle.lock();
                if idle.len() < MAX_IDLE_VMS {
                    idle.push(vm);
                }
                Ok(v)
            }
            // A VM that failed mid-run is dropped rather than reused.
            Err(e) => Err(EngineError::Evaluation(e.to_string())),
        }
    }
}

/// Object keys of the input document, allocated once.
struct Keys {
    subject: Value,
    tenant: Value,
    roles: Value,
    scopes: Value,
    action: Value,
    resource: Value,
    kind: Value,
    id: Value,
    request: Value,
    method: Value,
    route: Value,
    request_id: Value,
    context: Value,
    allow: Value,
    reasons: Value,
}

fn keys() -> &'static Keys {
    static KEYS: std::sync::OnceLock<Keys> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| Keys {
        subject: "subject".into(),
        tenant: "tenant".into(),
        roles: "roles".into(),
        scopes: "scopes".into(),
        action: "action".into(),
        resource: "resource".into(),
        kind: "kind".into(),
        id: "id".into(),
        request: "request".into(),
        method: "method".into(),
        route: "route".into(),
        request_id: "request_id".into(),
        context: "context".into(),
        allow: "allow".into(),
        reasons: "reasons".into(),
    })
}

/// The input document, exactly as `serde_json::to_value(input)` would give
/// it (a `None` is `null`), built without a JSON round trip.
fn to_rego(input: &AuthzInput) -> Result<Value, EngineError> {
    use serde::Deserialize as _;
    use std::collections::BTreeMap;
    let k = keys();
    let strings = |xs: &[String]| {
        Value::from(
            xs.iter()
                .map(|x| Value::from(x.as_str()))
                .collect::<Vec<_>>(),
        )
    };
    let opt = |x: &Option<String>| x.as_deref().map_or(Value::Null, Value::from);
    let mut context = BTreeMap::new();
    for (key, v) in &input.context {
        // serde_json's own deserializer into regorus' value: the same
        // conversion `Value::from_json_str` applies to JSON text.
        let v = Value::deserialize(v).map_err(|e| EngineError::Evaluation(e.to_string()))?;
        context.insert(Value::from(key.as_str()), v);
    }
    let resource = BTreeMap::from([
        (k.kind.clone(), Value::from(input.resource.kind.as_str())),
        (k.id.clone(), opt(&input.resource.id)),
    ]);
    let request = BTreeMap::from([
        (k.method.clone(), Value::from(input.request.method.as_str())),
        (k.route.clone(), Value::from(input.request.route.as_str())),
        (k.request_id.clone(), opt(&input.request.request_id)),
    ]);
    Ok(Value::from(BTreeMap::from([
        (k.subject.clone(), Value::from(input.subject.as_str())),
        (k.tenant.clone(), Value::from(input.tenant.as_str())),
        (k.roles.clone(), strings(&input.roles)),
        (k.scopes.clone(), strings(&input.scopes)),
        (k.action.clone(), Value::from(input.action.as_str())),
        (k.resource.clone(), Value::from(resource)),
        (k.request.clone(), Value::from(request)),
        (k.context.clone(), Value::from(context)),
    ])))
}

/// [`decision_from_value`] on a regorus value. The common shapes (a
/// boolean, or `{allow: bool, reasons: [string]}`) are read in place;
/// anything else goes through JSON, so its outcome (and error) is exactly
/// what a remote engine's answer of the same shape would give.
fn decision_from_rego(v: &Value) -> Result<EngineDecision, EngineError> {
    match v {
        Value::Bool(allow) => {
            return Ok(EngineDecision {
                allow: *allow,
                reasons: Vec::new(),
            });
        }
        Value::Object(o) => {
            let k = keys();
            if let Some(Value::Bool(allow)) = o.get(&k.allow) {
                let reasons = match o.get(&k.reasons) {
                    None | Some(Value::Null) => Some(Vec::new()),
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|r| match r {
                            Value::String(s) => Some(s.to_string()),
                            _ => None,
                        })
                        .collect(),
                    Some(_) => None,
                };
                if let Some(reasons) = reasons {
                    return Ok(EngineDecision {
                        allow: *allow,
                        reasons,
                    });
                }
            }
        }
        _ => {}
    }
    let json = serde_json::to_value(v).map_err(|e| EngineError::Evaluation(e.to_string()))?;
    decision_from_value(&json)
}
#[async_trait]
impl PolicyEngine for EmbeddedRego {
    fn name(&self) -> &'static str {
        "embedded"
    }

    async fn evaluate(&self, input: &AuthzInput) -> Result<EngineDecision, EngineError> {
        self.evaluate_sync(input)
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

fn compile(
    data: Vec<Value>,
    modules: &[PolicyModule],
    entrypoint: &str,
    evaluator: RegoEvaluator,
) -> Result<Loaded, EngineError> {
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
    let data = engine.get_data();
    let compiled = engine
        .compile_with_entrypoint(&entrypoint.into())
        .map_err(|e| EngineError::Load(e.to_string()))?;
    Loaded::new(compiled, data, entrypoint, evaluator, None)
}

fn compile_dir(
    dir: &Path,
    entrypoint: &str,
    evaluator: RegoEvaluator,
) -> Result<Loaded, EngineError> {
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
    compile(data, &modules, entrypoint, evaluator)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AuthKind, Principal, RequestInfo, Resource};
    use serde_json::json;

    fn input() -> AuthzInput {
        let p = Principal {
            subject: "alice".into(),
            tenant: "t1".into(),
            roles: vec!["user".into(), "ünïcode".into()],
            scopes: vec![],
            auth_kind: AuthKind::ApiKey { key_id: "k".into() },
        };
        AuthzInput::new(&p, "conversation.send", Resource::default())
    }

    /// The VM pool hands a VM back after an evaluation (VMs are reused,
    /// not built per request) and keeps at most `MAX_IDLE_VMS` idle.
    #[test]
    fn the_vm_pool_reuses_its_vms_and_keeps_at_most_max_idle() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policy");
        let engine =
            EmbeddedRego::from_dir(dir, "data.soma.authz.decision", PolicyMetrics::default())
                .unwrap()
                .with_evaluator(RegoEvaluator::Vm)
                .unwrap();
        let loaded = engine.current.read().clone();
        let pool = loaded
            .vm
            .as_ref()
            .expect("the reference policy runs on the VM");
        let idle = || pool.idle.lock().len();
        assert_eq!(idle(), 1, "built with one VM");
        engine.evaluate_sync(&input()).unwrap();
        assert_eq!(idle(), 1, "the VM went back to the pool");
        // More idle VMs than the bound (as after a burst): one evaluation
        // takes one and does not hand it back.
        let extra: Vec<_> = (0..MAX_IDLE_VMS).map(|_| pool.new_vm().unwrap()).collect();
        pool.idle.lock().extend(extra);
        assert_eq!(idle(), MAX_IDLE_VMS + 1);
        engine.evaluate_sync(&input()).unwrap();
        assert_eq!(idle(), MAX_IDLE_VMS);
    }

    #[test]
    fn the_input_value_is_exactly_the_json_one() {
        let cases = [
            input(),
            input()
                .with_request(RequestInfo {
                    method: "POST".into(),
                    route: "/v1/x/{id}".into(),
                    request_id: Some("r1".into()),
                })
                .with_context("resource_tenant", "t1")
                .with_context("n", json!([1, -2, 3.5, 1e300, u64::MAX, null, true]))
                .with_context("o", json!({"b": {"c": []}, "a": "x\"y"})),
            {
                let mut i = input();
                i.resource = Resource {
                    kind: "session".into(),
                    id: Some("s1".into()),
                };
                i.with_context("", json!({}))
            },
        ];
        for i in cases {
            let via_json = Value::from_json_str(&serde_json::to_string(&i).unwrap()).unwrap();
            assert_eq!(to_rego(&i).unwrap(), via_json, "{i:?}");
        }
    }

    #[test]
    fn decisions_read_in_place_match_the_json_reading() {
        let cases = [
            "true",
            "false",
            r#"{"allow": true, "reasons": []}"#,
            r#"{"allow": false, "reasons": ["a", "b"]}"#,
            r#"{"allow": false}"#,
            r#"{"allow": false, "reasons": null}"#,
            r#"{"allow": false, "reasons": [1]}"#,
            r#"{"allow": "yes"}"#,
            r#"{"allow": true, "reasons": "a"}"#,
            r#"[true]"#,
            r#""allow""#,
        ];
        for c in cases {
            let ours = decision_from_rego(&Value::from_json_str(c).unwrap());
            let json = decision_from_value(&serde_json::from_str(c).unwrap());
            assert_eq!(ours, json, "{c}");
        }
        // A set of reasons (a policy that does not sort them) reads as an array.
        let set = Value::from(std::collections::BTreeSet::from([
            Value::from("b"),
            Value::from("a"),
        ]));
        let mut obj = std::collections::BTreeMap::new();
        obj.insert(Value::from("allow"), Value::Bool(false));
        obj.insert(Value::from("reasons"), set);
        let d = decision_from_rego(&Value::from(obj)).unwrap();
        assert_eq!(d.reasons, ["a", "b"]);
    }
}
