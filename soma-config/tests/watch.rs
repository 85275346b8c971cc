//! File watching (feature `watch`).
#![cfg(feature = "watch")]

mod common;

use std::time::{Duration, Instant};

use common::{no_env, strict_live, toml_file};

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn edits_reload_debounced_and_broken_edits_keep_last_good() {
    let (_dir, path) = toml_file("[redis]\npool_size = 3\n");
    let live = strict_live(&path, no_env());
    let handle = live.watch_files(Duration::from_millis(150)).unwrap();

    // A burst of writes becomes one reload with the final content.
    for n in 4..=8 {
        std::fs::write(&path, format!("[redis]\npool_size = {n}\n")).unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    wait_for("the reload", || live.load().redis.pool_size == 8);
    assert_eq!(live.load().version(), 2, "one version for the whole burst");
    assert_eq!(handle.stats().reloads, 1);

    // Broken edit: rejected, last good kept, counted.
    std::fs::write(&path, "[redis\npool_size = ").unwrap();
    wait_for("the failed reload", || handle.stats().failures == 1);
    assert_eq!(live.load().redis.pool_size, 8);
    assert!(handle.stats().last_error.unwrap().contains("app.toml"));

    // Replace by rename (how editors save) is seen too.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, "[redis]\npool_size = 11\n").unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    wait_for("the rename reload", || live.load().redis.pool_size == 11);
    assert_eq!(live.load().version(), 3);

    drop(handle);
    std::fs::write(&path, "[redis]\npool_size = 12\n").unwrap();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        live.load().redis.pool_size,
        11,
        "no reloads after the handle is dropped"
    );
}
