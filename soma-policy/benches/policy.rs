//! soma-policy benchmarks: embedded vs remote decisions, cache hits, JWT
//! validation, and the full stack vs a bare axum handler.
//!
//! Run: `cargo bench -p soma-policy --bench policy -- --warm-up-time 1 --measurement-time 2`
//! (needs the OPA evaluator: `bash xtask/stack.d/40-opa.sh`). Ratios are
//! printed at the end from criterion's median estimates.

#![allow(missing_docs)]

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use criterion::{Criterion, black_box};
use futures_util::StreamExt;
use http::Request;
use soma_policy::testkit;
use soma_policy::{
    Authenticator, Authorizer, AuthzInput, CacheConfig, EmbeddedRego, JwtAlgorithm, OpaConfig,
    PolicyEngine, PolicyMetrics, RegoEvaluator, RemoteOpa,
};
use soma_testkit::{OpaServer, median, serve_url};
use tower::ServiceExt;

const ENTRY: &str = "data.soma.authz.decision";

fn input() -> AuthzInput {
    testkit::send_input()
}

fn embedded(evaluator: RegoEvaluator) -> Arc<EmbeddedRego> {
    Arc::new(
        EmbeddedRego::from_dir(testkit::policy_dir(), ENTRY, PolicyMetrics::default())
            .unwrap()
            .with_evaluator(evaluator)
            .unwrap(),
    )
}

fn engines(c: &mut Criterion, rt: &tokio::runtime::Runtime, opa: &OpaServer) {
    let embedded_interp = embedded(RegoEvaluator::Interpreter);
    let embedded = embedded(RegoEvaluator::Auto);
    assert_eq!(embedded.active_evaluator(), RegoEvaluator::Vm);
    let remote = {
        let _g = rt.enter();
        Arc::new(
            RemoteOpa::new(&{
                let mut c = OpaConfig::default();
                c.base_url = opa.base_url();
                c.timeout_ms = 2_000;
                c
            })
            .unwrap(),
        )
    };
    let inp = input();
    assert!(embedded.evaluate_sync(&inp).unwrap().allow);
    assert!(embedded_interp.evaluate_sync(&inp).unwrap().allow);
    assert!(rt.block_on(remote.evaluate(&inp)).unwrap().allow);
    let mut g = c.benchmark_group("decision");
    // Engine overhead alone: a constant decision, same input.
    let trivial = EmbeddedRego::from_sources(
        &[(
            "t.rego",
            "package soma.authz\ndecision := {\"allow\": true, \"reasons\": []}\n",
        )],
        ENTRY,
        PolicyMetrics::default(),
    )
    .unwrap();
    g.bench_function("embedded_constant_policy", |b| {
        b.iter(|| black_box(trivial.evaluate_sync(black_box(&inp)).unwrap()))
    });
    // The default evaluator (auto: the reference policy is eligible for the
    // Rego VM) and regorus' interpreter.
    g.bench_function("embedded", |b| {
        b.iter(|| black_box(embedded.evaluate_sync(black_box(&inp)).unwrap()))
    });
    g.bench_function("embedded_interpreter", |b| {
        b.iter(|| black_box(embedded_interp.evaluate_sync(black_box(&inp)).unwrap()))
    });
    g.bench_function("remote_opa_loopback", |b| {
        b.to_async(rt).iter(|| {
            let remote = remote.clone();
            let inp = inp.clone();
            async move { black_box(remote.evaluate(&inp).await.unwrap()) }
        })
    });
    g.finish();

    let authz = Authorizer::builder(embedded.clone() as Arc<dyn PolicyEngine>)
        .cache({
            let mut c = CacheConfig::default();
            c.enabled = true;
            c.ttl_ms = 600_000;
            c.capacity = 10_000;
            c
        })
        .build();
    rt.block_on(authz.check(&inp)).unwrap();
    let mut g = c.benchmark_group("cache");
    g.bench_function("authorizer_check_hit", |b| {
        b.to_async(rt)
            .iter(|| async { black_box(authz.check(&inp).await.unwrap()) })
    });
    g.finish();
}

fn jwt(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    // Full verification every time: the verified-token cache off.
    let mut uncached = testkit::config_with_static_keys();
    uncached.token_cache.enabled = false;
    let auth = Authenticator::builder(&uncached).build().unwrap();
    let cached = Authenticator::builder(&testkit::config_with_static_keys())
        .build()
        .unwrap();
    let mut claims = testkit::claims("alice");
    claims["exp"] = serde_json::json!(testkit::now() + 86_400);
    let mut g = c.benchmark_group("jwt");
    for alg in [
        JwtAlgorithm::HS256,
        JwtAlgorithm::RS256,
        JwtAlgorithm::ES256,
        JwtAlgorithm::EdDSA,
    ] {
        let token = testkit::mint(alg, Some(testkit::kid_for(alg)), &claims);
        rt.block_on(auth.verify_token(&token)).unwrap();
        g.bench_function(alg.as_str(), |b| {
            b.iter(|| {
                // Static keys never await: poll once on this thread.
                black_box(
                    futures_util::FutureExt::now_or_never(auth.verify_token(&token))
                        .unwrap()
                        .unwrap(),
                )
            })
        });
    }
    // The same token again, with the verified-token cache (the default).
    let token = testkit::mint(JwtAlgorithm::RS256, Some("rs"), &claims);
    rt.block_on(cached.verify_token(&token)).unwrap();
    g.bench_function("cached_token", |b| {
        b.iter(|| {
            black_box(
                futures_util::FutureExt::now_or_never(cached.verify_token(&token))
                    .unwrap()
                    .unwrap(),
            )
        })
    });
    g.finish();
}

/// Bare vs full stack over HTTP, measured in alternating blocks so both see
/// the same machine load (criterion measures one after the other, seconds
/// apart, which on a shared machine can skew the ratio either way).
struct Paired {
    bare_us: f64,
    full_us: f64,
    keeps: f64,
}

fn stack(c: &mut Criterion, rt: &tokio::runtime::Runtime) -> Paired {
    let bare: Router = testkit::bare_router();
    let (full, full_interp, full_cached) = guarded_routers();
    let token = testkit::long_lived_bearer();
    // Over real HTTP on loopback (keep-alive client), the way requests reach a service.
    let [url_bare, url_full, url_interp, url_cached] = rt.block_on(send_urls([
        bare.clone(),
        full.clone(),
        full_interp,
        full_cached,
    ]));
    let client = reqwest::Client::new();
    let send = |url: &str| {
        let req = client.post(url).header("authorization", &token);
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 200);
            black_box(r.bytes().await.unwrap())
        }
    };
    rt.block_on(send(&url_full));
    rt.block_on(send(&url_interp));
    rt.block_on(send(&url_cached));
    // `n` requests, `CONCURRENCY` in flight at a time, one client: what a
    // service's requests per second are measured with. Sequential requests
    // (concurrency 1) measure latency instead, and on an idle 2-vCPU
    // machine that is dominated by waking a parked worker thread.
    const CONCURRENCY: usize = 16;
    let burst = |url: &str, n: u64| {
        let url = url.to_owned();
        let send = &send;
        async move {
            futures_util::stream::iter(0..n)
                .map(|_| send(&url))
                .buffer_unordered(CONCURRENCY)
                .for_each(|_| async {})
                .await
        }
    };
    let timed = |url: &str| {
        let burst = &burst;
        let url = url.to_owned();
        move |iters: u64| {
            let url = url.clone();
            async move {
                let start = std::time::Instant::now();
                burst(&url, iters).await;
                start.elapsed()
            }
        }
    };
    let mut g = c.benchmark_group("stack");
    g.bench_function("bare_handler_http", |b| {
        b.to_async(rt).iter(|| send(&url_bare))
    });
    g.bench_function("authn_authz_handler_http", |b| {
        b.to_async(rt).iter(|| send(&url_full))
    });
    g.bench_function("bare_handler_http_c16", |b| {
        b.to_async(rt).iter_custom(timed(&url_bare))
    });
    g.bench_function("authn_authz_handler_http_c16", |b| {
        b.to_async(rt).iter_custom(timed(&url_full))
    });
    g.bench_function("authn_authz_interpreter_handler_http_c16", |b| {
        b.to_async(rt).iter_custom(timed(&url_interp))
    });
    g.bench_function("authn_authz_cached_handler_http_c16", |b| {
        b.to_async(rt).iter_custom(timed(&url_cached))
    });
    in_process(&mut g, rt, &bare, &full, &token);
    g.finish();

    paired_blocks(rt, burst, &url_bare, &url_full)
}

/// Serves each router on loopback; the URL of its send route.
async fn send_urls(routers: [Router; 4]) -> [String; 4] {
    let mut urls: [String; 4] = Default::default();
    for (url, router) in urls.iter_mut().zip(routers) {
        *url = format!("{}{}", serve_url(router).await, testkit::SEND_PATH);
    }
    urls
}

/// In-process (tower oneshot, no network): the layers' own cost, the worst
/// case for the ratio.
fn in_process(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &tokio::runtime::Runtime,
    bare: &Router,
    full: &Router,
    token: &str,
) {
    let req = |t: &str| {
        Request::post(testkit::SEND_PATH)
            .header("authorization", t)
            .body(Body::empty())
            .unwrap()
    };
    g.bench_function("bare_handler_inproc", |b| {
        b.to_async(rt)
            .iter(|| async { black_box(bare.clone().oneshot(req(token)).await.unwrap()) })
    });
    g.bench_function("authn_authz_handler_inproc", |b| {
        b.to_async(rt)
            .iter(|| async { black_box(full.clone().oneshot(req(token)).await.unwrap()) })
    });
}

/// The bare handler's router behind authentication and the reference policy
/// three ways: no decision cache (it is on by default: every request
/// evaluates the policy, the worst case) with the default evaluator, the
/// same with the interpreter, and with the decision cache on at its default
/// TTL and capacity (every request after the first is a hit: one user, one
/// route).
fn guarded_routers() -> (Router, Router, Router) {
    let config = testkit::config_with_static_keys();
    let authn = Arc::new(Authenticator::builder(&config).build().unwrap());
    let no_cache = || {
        let mut c = CacheConfig::default();
        c.enabled = false;
        c
    };
    let authz = Arc::new(
        Authorizer::builder(embedded(RegoEvaluator::Auto))
            .cache(no_cache())
            .build(),
    );
    let authz_interp = Arc::new(
        Authorizer::builder(embedded(RegoEvaluator::Interpreter))
            .cache(no_cache())
            .build(),
    );
    let authz_cached = Arc::new(
        Authorizer::builder(embedded(RegoEvaluator::Auto))
            .cache({
                let mut c = CacheConfig::default();
                c.enabled = true;
                c
            })
            .build(),
    );
    (
        testkit::guarded_router(authn.clone(), Some(authz)),
        testkit::guarded_router(authn.clone(), Some(authz_interp)),
        testkit::guarded_router(authn, Some(authz_cached)),
    )
}

/// 40 rounds of one block of 400 requests (`burst`) to each of `url_bare`
/// and `url_full`, alternating which goes first so neither always follows
/// the other: the medians of the time per request and of the ratio.
fn paired_blocks<F, Fut>(
    rt: &tokio::runtime::Runtime,
    burst: F,
    url_bare: &str,
    url_full: &str,
) -> Paired
where
    F: Fn(&str, u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    const ROUNDS: usize = 40;
    const BLOCK: u64 = 400;
    let (mut bare_t, mut full_t, mut keeps) = (Vec::new(), Vec::new(), Vec::new());
    rt.block_on(async {
        for round in 0..ROUNDS {
            // Alternate which goes first, so neither always follows the other.
            let mut t = [0.0f64; 2];
            for k in 0..2 {
                let which = (k + round) % 2;
                let url = if which == 0 { url_bare } else { url_full };
                let start = std::time::Instant::now();
                burst(url, BLOCK).await;
                t[which] = start.elapsed().as_secs_f64() * 1e6 / BLOCK as f64;
            }
            bare_t.push(t[0]);
            full_t.push(t[1]);
            keeps.push(t[0] / t[1]);
        }
    });
    Paired {
        bare_us: median(&bare_t),
        full_us: median(&full_t),
        keeps: median(&keeps),
    }
}

fn median_ns(group: &str, name: &str) -> Option<f64> {
    // The bench binary lives in <target dir>/release/deps/; criterion writes
    // its estimates to <target dir>/criterion/.
    let exe = std::env::current_exe().ok()?;
    let target = exe.parent()?.parent()?.parent()?;
    let path = target
        .join("criterion")
        .join(group)
        .join(name)
        .join("new/estimates.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    v["median"]["point_estimate"].as_f64()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let opa = OpaServer::start(&testkit::policy_dir());
    let mut c = Criterion::default().configure_from_args();
    engines(&mut c, &rt, &opa);
    jwt(&mut c, &rt);
    let paired = stack(&mut c, &rt);
    c.final_summary();
    print_summary(&paired);
}

/// Prints criterion's medians of this run side by side with their goals,
/// and the ratios between them.
fn print_summary(paired: &Paired) {
    println!("\n== soma-policy summary (criterion medians) ==");
    print_decisions();
    print_jwt();
    print_stack(paired);
}

/// Criterion's median of `group/name` in ns; NaN when it has none.
fn median_of(group: &str, name: &str) -> f64 {
    median_ns(group, name).unwrap_or(f64::NAN)
}

/// Embedded (VM, interpreter) and remote decisions, and a decision-cache hit.
fn print_decisions() {
    let embedded = median_of("decision", "embedded");
    let embedded_interp = median_of("decision", "embedded_interpreter");
    let remote = median_of("decision", "remote_opa_loopback");
    let hit = median_of("cache", "authorizer_check_hit");
    println!(
        "embedded decision        {:>10.2} µs   (default evaluator: auto → VM; goal ≤ 15 µs)",
        embedded / 1e3
    );
    println!(
        "embedded, interpreter    {:>10.2} µs   (evaluator = \"interpreter\")",
        embedded_interp / 1e3
    );
    println!(
        "interpreter, const policy{:>10.2} µs   (engine + input conversion only)",
        median_of("decision", "embedded_constant_policy") / 1e3
    );
    println!("remote OPA (loopback)    {:>10.2} µs", remote / 1e3);
    println!(
        "embedded speed-up        {:>10.1} ×    (goal ≥ 20×)",
        remote / embedded
    );
    println!(
        "speed-up, interpreter    {:>10.1} ×",
        remote / embedded_interp
    );
    println!(
        "cache hit (check)        {:>10.3} µs   (goal ≤ 1 µs)",
        hit / 1e3
    );
}

/// Token validation per algorithm, and a verified-token cache hit.
fn print_jwt() {
    let hs = median_of("jwt", "HS256");
    let rs = median_of("jwt", "RS256");
    println!(
        "HS256 validation         {:>10.2} µs   (goal ≤ 5 µs)",
        hs / 1e3
    );
    println!(
        "RS256 validation         {:>10.2} µs   (goal ≤ 30 µs)",
        rs / 1e3
    );
    println!(
        "cached token (any alg)   {:>10.2} µs   (verified-token cache hit, the default)",
        median_of("jwt", "cached_token") / 1e3
    );
    println!(
        "ES256 validation         {:>10.2} µs",
        median_of("jwt", "ES256") / 1e3
    );
    println!(
        "EdDSA validation         {:>10.2} µs",
        median_of("jwt", "EdDSA") / 1e3
    );
}

/// The handler bare and behind the layers: over HTTP at 16 in flight
/// (criterion and `paired` blocks), sequentially, and in process.
fn print_stack(paired: &Paired) {
    let bare = median_of("stack", "bare_handler_http");
    let full = median_of("stack", "authn_authz_handler_http");
    let bare_c = median_of("stack", "bare_handler_http_c16");
    let full_c = median_of("stack", "authn_authz_handler_http_c16");
    let bare_in = median_of("stack", "bare_handler_inproc");
    let full_in = median_of("stack", "authn_authz_handler_inproc");
    let rps = |ns: f64| 1e9 / ns;
    println!("bare handler (HTTP, c16) {:>10.0} req/s", rps(bare_c));
    println!(
        "authn+authz (c16)        {:>10.0} req/s  keeps {:.2} × of bare (goal ≥ 0.6×)",
        rps(full_c),
        bare_c / full_c
    );
    let interp_c = median_of("stack", "authn_authz_interpreter_handler_http_c16");
    println!(
        "authn+authz, interp (c16){:>10.0} req/s  keeps {:.2} × of bare",
        rps(interp_c),
        bare_c / interp_c
    );
    let cached_c = median_of("stack", "authn_authz_cached_handler_http_c16");
    println!(
        "authn+authz + cache      {:>10.0} req/s  keeps {:.2} × of bare",
        rps(cached_c),
        bare_c / cached_c
    );
    println!(
        "paired blocks (c16)      {:>10.0} vs {:.0} req/s: keeps {:.2} × of bare \
         (median of 40 alternating blocks of 400)",
        1e6 / paired.bare_us,
        1e6 / paired.full_us,
        paired.keeps
    );
    println!(
        "sequential (c1) latency  {:>10.2} vs {:.2} µs/req  ({:.2} × of bare req/s)",
        bare / 1e3,
        full / 1e3,
        bare / full
    );
    println!("bare handler (in-proc)   {:>10.2} µs/req", bare_in / 1e3);
    println!(
        "authn+authz (in-proc)    {:>10.2} µs/req  (layers add {:.2} µs)",
        full_in / 1e3,
        (full_in - bare_in) / 1e3
    );
}
