//! OPA's real evaluator behind a minimal Data API, on a free loopback port.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// OPA's real evaluator behind a minimal Data API (`opa_data_api.py` in this
/// crate, over the evaluator `xtask/stack.d/40-opa.sh` unpacks under
/// `.stack/opa/site`); the process is killed when this is dropped.
///
/// It serves `POST /v1/data/{path}` and `GET /health` with OPA's semantics,
/// and `GET /_received`: the request bodies received so far.
pub struct OpaServer {
    child: Child,
    /// The loopback port it listens on.
    pub port: u16,
}

impl OpaServer {
    /// Starts the server on a free loopback port, loading the policies in
    /// `policy_dir`, and waits (up to 20 s) until it listens.
    ///
    /// # Panics
    ///
    /// If the evaluator is not installed (the message says how to install
    /// it), `python3` cannot be started, or the server exits or does not
    /// listen in time.
    pub fn start(policy_dir: &Path) -> Self {
        let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let site = crate_dir.join("../../.stack/opa/site");
        assert!(
            site.join("opa_bindings/libopabridge.so").exists(),
            "OPA evaluator is not installed at {}: run `bash xtask/stack.d/40-opa.sh` \
             (or `cargo xtask stack up`), which unpacks the opa-golib-python-bindings wheel",
            site.display()
        );
        let port = crate::free_port();
        let child = Command::new("python3")
            .arg(crate_dir.join("opa_data_api.py"))
            .arg("--site")
            .arg(&site)
            .arg("--policy-dir")
            .arg(policy_dir)
            .arg("--port")
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 is required to run the OPA Data API test server");
        let mut server = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("OPA Data API server exited early with {status}");
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "OPA Data API server did not listen on 127.0.0.1:{port} within 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Request bodies the server received so far.
    ///
    /// # Panics
    ///
    /// If the server does not answer with JSON.
    pub async fn received(&self) -> Vec<Value> {
        reqwest::get(format!("{}/_received", self.base_url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Evaluates `data.<path>` with `input` directly; the answer as OPA
    /// gives it (`{"result": ...}`, no `result` when undefined).
    ///
    /// # Panics
    ///
    /// If the server does not answer with JSON.
    pub async fn eval(&self, client: &reqwest::Client, path: &str, input: &Value) -> Value {
        client
            .post(format!("{}/v1/data/{path}", self.base_url()))
            .json(&json!({ "input": input }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for OpaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
