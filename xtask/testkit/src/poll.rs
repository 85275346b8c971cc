//! Polling a condition until it holds, on tokio's clock.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How often the helpers re-check a condition.
const EVERY: Duration = Duration::from_millis(25);

/// Polls the async condition `cond` every 25 ms until it returns `true`;
/// `false` when `within` passes first.
pub async fn eventually<F, Fut>(within: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(EVERY).await;
    }
}

/// Waits until the async condition `cond` holds; panics naming `what` when
/// `within` passes first.
pub async fn wait_until<F, Fut>(what: &str, within: Duration, cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    assert!(
        eventually(within, cond).await,
        "timed out after {within:?} waiting for: {what}"
    );
}

/// [`wait_until`] for a condition that needs no `.await`.
pub async fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    wait_until(what, within, || std::future::ready(cond())).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_condition_that_turns_true_is_seen() {
        let mut n = 0;
        wait_for("the third poll", Duration::from_secs(2), || {
            n += 1;
            n == 3
        })
        .await;
        assert_eq!(n, 3);
    }

    #[tokio::test]
    async fn a_condition_that_never_holds_times_out() {
        assert!(!eventually(Duration::from_millis(60), || async { false }).await);
    }

    #[tokio::test]
    #[should_panic(expected = "waiting for: never")]
    async fn wait_until_names_what_it_waited_for() {
        wait_until("never", Duration::from_millis(30), || async { false }).await;
    }
}
