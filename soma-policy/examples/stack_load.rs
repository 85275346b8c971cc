//! HTTP load on loopback against the bare handler, the handler behind
//! authentication, or behind authentication and authorization (the
//! reference policy, no decision cache): 16 requests in flight from one
//! keep-alive client, the client and the server on one 2-worker runtime,
//! as in the crate's benchmark. Prints the wall time per request; run it
//! under `perf stat -e task-clock` for the CPU time per request.
//!
//! ```text
//! cargo run --release -p soma-policy --features axum --example stack_load -- bare|authn|full [N] [POLICY_DIR]
//! ```
//!
//! `N` defaults to 40,000 (after 2,000 to warm up); `POLICY_DIR` to the
//! reference policy.

use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use soma_policy::{Authenticator, Authorizer, CacheConfig, EmbeddedRego, PolicyMetrics, testkit};
use soma_testkit::serve_url;

const IN_FLIGHT: usize = 16;

fn usage() -> ! {
    eprintln!("usage: stack_load bare|authn|full [N > 0] [POLICY_DIR]");
    std::process::exit(2);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| usage());
    let n: u64 = match args.next().map(|a| a.parse()) {
        None => 40_000,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => usage(),
    };
    let dir = args.next().map_or_else(testkit::policy_dir, Into::into);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let authn = || {
        Arc::new(
            Authenticator::builder(&testkit::config_with_static_keys())
                .build()
                .unwrap(),
        )
    };
    let app = match mode.as_str() {
        "bare" => testkit::bare_router(),
        "authn" => testkit::guarded_router(authn(), None),
        "full" => {
            let engine =
                EmbeddedRego::from_dir(&dir, "data.soma.authz.decision", PolicyMetrics::default())
                    .unwrap_or_else(|e| {
                        eprintln!("{}: {e}", dir.display());
                        std::process::exit(1);
                    });
            // No decision cache (on by default): every request is decided.
            let authz = Arc::new(
                Authorizer::builder(Arc::new(engine))
                    .cache({
                        let mut c = CacheConfig::default();
                        c.enabled = false;
                        c
                    })
                    .build(),
            );
            testkit::guarded_router(authn(), Some(authz))
        }
        _ => usage(),
    };
    let token = testkit::long_lived_bearer();
    let client = reqwest::Client::new();
    rt.block_on(async {
        let url = format!("{}{}", serve_url(app).await, testkit::SEND_PATH);
        let (client, url, token, mode) = (&client, &url, &token, &mode);
        let burst = |n: u64| {
            futures_util::stream::iter(0..n)
                .map(move |_| {
                    let req = client.post(url).header("authorization", token);
                    async move {
                        let r = req.send().await.expect("the server answers");
                        assert_eq!(r.status(), 200, "{mode}");
                        r.bytes().await.expect("a body")
                    }
                })
                .buffer_unordered(IN_FLIGHT)
                .for_each(|_| async {})
        };
        burst(2_000).await;
        let start = Instant::now();
        burst(n).await;
        let per = start.elapsed().as_secs_f64() * 1e6 / n as f64;
        println!("{mode}: {per:.2} µs per request (wall), {n} requests, {IN_FLIGHT} in flight");
    });
}
