//! The platform in-process for a test: a gateway and the workers it asks
//! for, on [`Env`]'s isolated settings (plus overrides).

use serde_json::Value;
use soma_example_platform::{Gateway, Worker, conversation, memory, tools};

use super::{Env, listener};

/// Which services to start, with which settings; see [`Env::platform`].
pub struct PlatformBuilder<'a> {
    env: &'a Env,
    overrides: Vec<(&'static str, Value)>,
    workers: Vec<&'static str>,
}

/// The running services.
pub struct Platform {
    /// The gateway.
    pub gateway: Gateway,
    /// The workers, in start order, by name (`conversation`, `memory`, `tools`).
    pub workers: Vec<(&'static str, Worker)>,
    /// `http://<gateway API>`.
    pub base: String,
}

impl Env {
    /// A gateway (and the workers added) on this test's settings.
    pub fn platform(&self) -> PlatformBuilder<'_> {
        PlatformBuilder {
            env: self,
            overrides: Vec::new(),
            workers: Vec::new(),
        }
    }
}

impl PlatformBuilder<'_> {
    /// Overrides one setting (a dotted key) of every service.
    pub fn set(mut self, key: &'static str, value: Value) -> Self {
        self.overrides.push((key, value));
        self
    }

    /// Adds the conversation worker.
    pub fn conversation_worker(mut self) -> Self {
        self.workers.push("conversation");
        self
    }

    /// Adds the memory replicator.
    pub fn memory_replicator(mut self) -> Self {
        self.workers.push("memory");
        self
    }

    /// Adds the tool executor.
    pub fn tool_executor(mut self) -> Self {
        self.workers.push("tools");
        self
    }

    /// Starts the gateway, then the workers.
    pub async fn start(self) -> Platform {
        let live = self.env.settings(&self.overrides);
        let gateway = Gateway::start(live.clone(), listener().await, listener().await)
            .await
            .expect("gateway starts");
        let mut workers = Vec::new();
        for name in self.workers {
            let admin = listener().await;
            let worker = match name {
                "conversation" => conversation::start(live.clone(), admin).await,
                "memory" => memory::start(live.clone(), admin).await,
                _ => tools::start(live.clone(), admin).await,
            };
            workers.push((
                name,
                worker.unwrap_or_else(|e| panic!("{name} worker starts: {e}")),
            ));
        }
        let base = format!("http://{}", gateway.addr());
        Platform {
            gateway,
            workers,
            base,
        }
    }
}

impl Platform {
    /// The worker started as `name`.
    pub fn worker(&self, name: &str) -> &Worker {
        &self
            .workers
            .iter()
            .find(|(n, _)| *n == name)
            .expect("started")
            .1
    }

    /// Stops the workers (last started first), then the gateway.
    pub async fn shutdown(mut self) {
        while let Some((_, w)) = self.workers.pop() {
            w.shutdown().await;
        }
        self.gateway.shutdown().await;
    }
}
