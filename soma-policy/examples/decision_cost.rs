//! What one embedded decision costs on a policy directory: evaluates the
//! benchmarks' input (alice sends to a session of her tenant) `N` times
//! and prints the evaluator in use and the time per decision.
//!
//! ```text
//! cargo run --release -p soma-policy --example decision_cost -- [POLICY_DIR] [N]
//! ```
//!
//! `POLICY_DIR` defaults to the reference policy, `N` to 200,000. To count
//! instructions per decision, which machine load does not move, build it
//! and run it twice under callgrind, with `N` = 1,000 and 3,000; the
//! difference of the two totals over 2,000 is one decision's count:
//!
//! ```text
//! cargo build --release -p soma-policy --example decision_cost
//! valgrind --tool=callgrind target/release/examples/decision_cost soma-policy/policy 1000
//! ```

use std::hint::black_box;
use std::time::Instant;

use soma_policy::{EmbeddedRego, PolicyMetrics, testkit};

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().map_or_else(testkit::policy_dir, Into::into);
    let n: u32 = match args.next().map(|a| a.parse()) {
        None => 200_000,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("usage: decision_cost [POLICY_DIR] [N > 0]");
            std::process::exit(2);
        }
    };
    let engine = EmbeddedRego::from_dir(&dir, "data.soma.authz.decision", PolicyMetrics::default())
        .unwrap_or_else(|e| {
            eprintln!("{}: {e}", dir.display());
            std::process::exit(1);
        });
    let input = testkit::send_input();
    let first = engine.evaluate_sync(&input).expect("the policy decides");
    let start = Instant::now();
    for _ in 0..n {
        black_box(engine.evaluate_sync(black_box(&input)).unwrap());
    }
    let per = start.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    println!(
        "{}: {:?} evaluator, allow = {}, {per:.2} µs per decision over {n}",
        dir.display(),
        engine.active_evaluator(),
        first.allow,
    );
}
