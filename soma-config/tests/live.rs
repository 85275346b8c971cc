//! The live registry: versions, checksums, reload, updates, keep-last-good.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{AppSettings, no_env, strict_live, toml_file};
use serde_json::json;
use soma_config::{Change, ConfigUpdate, Live, Loader, Origin, checksum};

fn live_with_file(body: &str) -> (tempfile::TempDir, std::path::PathBuf, Live<AppSettings>) {
    let (dir, path) = toml_file(body);
    let live = strict_live(&path, [("SOMA_BUS__PARTITIONS", "4")]);
    (dir, path, live)
}

#[test]
fn first_load_is_version_one_with_a_stable_checksum() {
    let (_d, _p, a) = live_with_file("[redis]\npool_size = 3\n");
    let (_d2, _p2, b) = live_with_file("[redis]\n\npool_size = 3 # same value\n");
    assert_eq!(a.load().version(), 1);
    assert_eq!(a.load().checksum().len(), 64);
    assert_eq!(
        a.load().checksum(),
        b.load().checksum(),
        "same inputs, same checksum"
    );
    let (_d3, _p3, c) = live_with_file("[redis]\npool_size = 4\n");
    assert_ne!(a.load().checksum(), c.load().checksum());
}

#[test]
fn reload_picks_up_changes_and_only_bumps_on_change() {
    let (_d, path, live) = live_with_file("[redis]\npool_size = 3\n");
    assert_eq!(live.reload().unwrap(), Change::Unchanged);
    assert_eq!(live.load().version(), 1);
    std::fs::write(&path, "[redis]\npool_size = 5\n").unwrap();
    assert_eq!(live.reload().unwrap(), Change::Updated { version: 2 });
    assert_eq!(live.load().redis.pool_size, 5);
    assert_eq!(
        live.load().bus.partitions,
        4,
        "env still applies after reload"
    );
}

#[test]
fn broken_reload_keeps_last_good() {
    let (_d, path, live) = live_with_file("[redis]\npool_size = 3\n");
    let before = live.get();
    for (body, check) in [
        ("[redis\n", "parse"),
        ("[redis]\npool_size = \"x\"\n", "type"),
        ("[redis]\npool_sise = 4\n", "unknown"),
        ("[redis]\npool_size = 0\n", "validation"),
    ] {
        std::fs::write(&path, body).unwrap();
        let err = live.reload().unwrap_err();
        match check {
            "parse" => assert!(err.is_parse()),
            "type" => assert!(err.is_invalid_value()),
            "unknown" => assert!(err.is_unknown_key()),
            _ => assert!(err.is_validation()),
        }
        assert_eq!(err.origin(), Some(Origin::File(path.clone())), "{err}");
        let now = live.get();
        assert!(
            Arc::ptr_eq(&before, &now),
            "last good value kept after {check}"
        );
        assert_eq!(now.redis.pool_size, 3);
    }
}

#[test]
fn apply_verifies_checksum_version_and_validation() {
    let (_d, _p, live) = live_with_file("[redis]\npool_size = 3\n");
    let ok = ConfigUpdate::new(
        10,
        json!({"redis": {"pool_size": 12}, "service_name": "remote"}),
    );
    assert_eq!(live.apply(&ok).unwrap(), Change::Updated { version: 2 });
    let cur = live.get();
    assert_eq!(
        (cur.redis.pool_size, cur.service_name.as_str()),
        (12, "remote")
    );
    assert_eq!(cur.update_version(), Some(10));
    assert_eq!(cur.bus.partitions, 4, "env below the update still applies");

    // Redelivery is a no-op.
    assert_eq!(live.apply(&ok).unwrap(), Change::AlreadyApplied);

    // Tampered document.
    let mut bad = ConfigUpdate::new(11, json!({"redis": {"pool_size": 13}}));
    bad.document["redis"]["pool_size"] = json!(99);
    let err = live.apply(&bad).unwrap_err();
    assert!(err.is_checksum_mismatch(), "{err}");
    assert_eq!(err.origin(), Some(Origin::Update { version: 11 }));

    // Older or equal version with a different body.
    for v in [9, 10] {
        let err = live
            .apply(&ConfigUpdate::new(v, json!({"redis": {"pool_size": 1}})))
            .unwrap_err();
        assert!(err.is_version_regression(), "{err}");
    }

    // Validation failure names the update and key.
    let err = live
        .apply(&ConfigUpdate::new(12, json!({"redis": {"pool_size": 0}})))
        .unwrap_err();
    assert!(err.is_validation());
    assert_eq!(err.origin(), Some(Origin::Update { version: 12 }));
    assert_eq!(err.key(), Some("redis.pool_size"));

    // Unknown key and wrong type in an update.
    let err = live
        .apply(&ConfigUpdate::new(13, json!({"redis": {"poolsize": 2}})))
        .unwrap_err();
    assert!(err.is_unknown_key());
    assert_eq!(
        (err.key(), err.origin()),
        (Some("redis.poolsize"), Some(Origin::Update { version: 13 }))
    );
    let err = live
        .apply(&ConfigUpdate::new(
            14,
            json!({"bus": {"partitions": "six"}}),
        ))
        .unwrap_err();
    assert!(err.is_invalid_value());
    assert_eq!(
        (err.key(), err.origin()),
        (Some("bus.partitions"), Some(Origin::Update { version: 14 }))
    );

    // Not an object.
    let err = live
        .apply(&ConfigUpdate::new(15, json!([1, 2])))
        .unwrap_err();
    assert!(err.is_parse());

    // Through all of that, version 2 stayed.
    assert!(Arc::ptr_eq(&cur, &live.get()));

    // A rejected version number may be retried with a good body (it was never applied).
    assert_eq!(
        live.apply(&ConfigUpdate::new(12, json!({"redis": {"pool_size": 7}})))
            .unwrap(),
        Change::Updated { version: 3 }
    );
    assert_eq!(live.load().redis.pool_size, 7);
}

#[test]
fn update_survives_reload_and_override_beats_update() {
    let (_d, path) = toml_file("[redis]\npool_size = 3\n");
    let live = Loader::<AppSettings>::new()
        .env_from(no_env())
        .file(&path)
        .set("service_name", "pinned")
        .into_live()
        .unwrap();
    live.apply(&ConfigUpdate::new(
        1,
        json!({"redis": {"pool_size": 9}, "service_name": "remote"}),
    ))
    .unwrap();
    assert_eq!(live.load().service_name, "pinned");
    std::fs::write(&path, "[redis]\npool_size = 4\nurl = \"redis://new\"\n").unwrap();
    live.reload().unwrap();
    let cur = live.load();
    assert_eq!(
        cur.redis.pool_size, 9,
        "the applied update stays above the file"
    );
    assert_eq!(cur.redis.url, "redis://new");
}

#[test]
fn checksum_matches_the_public_function_over_canonical_json() {
    let doc = json!({"b": [1, 2], "a": {"z": true, "y": "s"}});
    let u = ConfigUpdate::new(1, doc.clone());
    assert_eq!(u.checksum, checksum(&doc));
    assert!(u.verify().is_ok());
    let wire = serde_json::to_string(&u).unwrap();
    let back: ConfigUpdate = serde_json::from_str(&wire).unwrap();
    assert!(back.verify().is_ok());
}

#[test]
fn snapshot_redacts_secrets_and_reports_sources() {
    let (_d, path) = toml_file("[redis]\npool_size = 3\npassword = \"file-secret\"\n");
    let live = Loader::<AppSettings>::new()
        .env_from([
            ("SOMA_BUS__PARTITIONS", "4"),
            ("SOMA_LABELS__API_TOKEN", "tok-123"),
        ])
        .file(&path)
        .set("service_name", "svc")
        .into_live()
        .unwrap();
    live.apply(&ConfigUpdate::new(
        3,
        json!({"auth": {"issuer": "https://remote"}}),
    ))
    .unwrap();
    let snap = live.snapshot();
    let text = snap.to_string();
    assert!(
        !text.contains("file-secret") && !text.contains("tok-123"),
        "{text}"
    );
    assert_eq!(snap["config"]["redis"]["password"], "[REDACTED]");
    assert_eq!(snap["config"]["labels"]["api_token"], "[REDACTED]");
    assert_eq!(snap["config"]["redis"]["pool_size"], 3);
    assert_eq!(snap["sources"]["redis"]["kind"], "file");
    assert_eq!(
        snap["sources"]["redis"]["detail"],
        path.display().to_string()
    );
    assert_eq!(snap["sources"]["bus"]["kind"], "env");
    assert_eq!(snap["sources"]["bus"]["detail"], "SOMA_BUS__PARTITIONS");
    assert_eq!(snap["sources"]["auth"]["kind"], "update");
    assert_eq!(snap["sources"]["service_name"]["kind"], "override");
    assert_eq!(snap["sources"]["flags"]["kind"], "default");
    assert_eq!(snap["version"], 2);
    assert_eq!(snap["update_version"], 3);
    assert_eq!(snap["checksum"], live.load().checksum());
    // The real value is still there for the code that needs it.
    assert_eq!(live.load().redis.password.expose_secret(), "file-secret");
}

#[test]
fn snapshot_never_shows_a_secret_from_any_place_or_layer() {
    // A secret in every place soma-config takes one, from every layer: a
    // `Secret` (file), a secret-named plain string (env), URL credentials
    // (user info and a secret-named query parameter) in a file, an env var
    // and a remote update, a list under a secret-named key, a URL in a list.
    let (_d, path) = toml_file(
        "[redis]\npassword = \"file-secret-1\"\nurl = \"redis://:url-secret-2@cache:6379/0\"\n\
         [bus]\ntopics = [\"kafka://svc:list-url-secret-3@broker/x\"]\n",
    );
    let live = Loader::<AppSettings>::new()
        .env_from([
            ("SOMA_LABELS__API_TOKEN", "env-token-4"),
            (
                "SOMA_LABELS__DSN",
                "postgres://app:env-url-secret-5@db/app?sslmode=require&password=query-secret-6",
            ),
        ])
        .file(&path)
        .set("labels.signing_secrets", "override-secret-7")
        .into_live()
        .unwrap();
    live.apply(&ConfigUpdate::new(
        2,
        json!({"auth": {"issuer": "https://user:update-url-secret-8@issuer.example/"}}),
    ))
    .unwrap();
    let snap = live.snapshot();
    let text = snap.to_string();
    for secret in [
        "file-secret-1",
        "url-secret-2",
        "list-url-secret-3",
        "env-token-4",
        "env-url-secret-5",
        "query-secret-6",
        "override-secret-7",
        "update-url-secret-8",
    ] {
        assert!(!text.contains(secret), "{secret} shows: {text}");
    }
    let c = &snap["config"];
    assert_eq!(c["redis"]["password"], "[REDACTED]");
    assert_eq!(c["redis"]["url"], "redis://***@cache:6379/0");
    assert_eq!(c["bus"]["topics"][0], "kafka://***@broker/x");
    assert_eq!(c["labels"]["api_token"], "[REDACTED]");
    assert_eq!(
        c["labels"]["dsn"],
        "postgres://***@db/app?sslmode=require&password=***"
    );
    assert_eq!(c["labels"]["signing_secrets"], "[REDACTED]");
    assert_eq!(c["auth"]["issuer"], "https://***@issuer.example/");
    // Version and checksum come with it; the values in use are intact.
    assert_eq!(snap["checksum"], live.load().checksum());
    assert!(snap["version"].as_u64().is_some());
    assert_eq!(
        live.load().redis.url,
        "redis://:url-secret-2@cache:6379/0",
        "redaction is for display only"
    );
}

#[test]
fn secret_rotation_changes_the_checksum() {
    let (_d, path) = toml_file("[redis]\npassword = \"one\"\n");
    let live = Loader::<AppSettings>::new()
        .env_from(no_env())
        .file(&path)
        .into_live()
        .unwrap();
    let before = live.load().checksum().to_owned();
    std::fs::write(&path, "[redis]\npassword = \"two\"\n").unwrap();
    assert_eq!(live.reload().unwrap(), Change::Updated { version: 2 });
    assert_ne!(live.load().checksum(), before);
}

#[tokio::test]
async fn subscribers_see_each_published_version() {
    let (_d, path, live) = live_with_file("[redis]\npool_size = 3\n");
    let mut rx = live.subscribe();
    assert_eq!(rx.borrow_and_update().version(), 1);
    let writer = {
        let live = live.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::write(&path, "[redis]\npool_size = 6\n").unwrap();
            live.reload().unwrap();
        })
    };
    // Bounded: a reload that publishes nothing fails here, not by hanging.
    tokio::time::timeout(std::time::Duration::from_secs(10), rx.changed())
        .await
        .expect("the reload publishes version 2 within 10 s")
        .unwrap();
    let v = rx.borrow_and_update().clone();
    assert_eq!((v.version(), v.redis.pool_size), (2, 6));
    writer.await.unwrap();
    // A rejected update publishes nothing.
    live.apply(&ConfigUpdate::new(1, json!({"redis": {"pool_size": 0}})))
        .unwrap_err();
    assert!(!rx.has_changed().unwrap());
}

#[test]
fn versions_are_monotonic_under_concurrent_writers() {
    let (_d, _p, live) = live_with_file("[redis]\npool_size = 3\n");
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (live, stop) = (live.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                let v = live.load().version();
                assert!(v >= last, "version went from {last} to {v}");
                last = v;
            }
        })
    };
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let live = live.clone();
            std::thread::spawn(move || {
                for i in 0..25u64 {
                    let version = w * 1000 + i + 1;
                    // Interleaved writers: some are regressions, all must be
                    // rejected or applied atomically.
                    let _ = live.apply(&ConfigUpdate::new(
                        version,
                        json!({"redis": {"pool_size": version}}),
                    ));
                }
            })
        })
        .collect();
    writers.into_iter().for_each(|w| w.join().unwrap());
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    let cur = live.get();
    assert_eq!(cur.redis.pool_size as u64, cur.update_version().unwrap());
}

#[test]
fn signed_updates_reject_forgeries_and_count_them() {
    use soma_config::{Secret, SignatureProblem};
    let (_d, _p, live) = live_with_file("[redis]\npool_size = 3\n");
    let key = Secret::new("k".repeat(32));
    assert!(
        live.require_signed_updates(Secret::new("short"))
            .unwrap_err()
            .is_invalid_value(),
        "a short key is refused"
    );
    live.require_signed_updates(key.clone()).unwrap();

    // Anyone on the topic can compute a checksum; without the key they
    // cannot freeze the config with version u64::MAX.
    let forged = ConfigUpdate::new(u64::MAX, json!({"redis": {"pool_size": 1}}));
    let err = live.apply(&forged).unwrap_err();
    assert!(
        matches!(
            err,
            soma_config::ConfigError::UpdateSignature {
                problem: SignatureProblem::Missing,
                ..
            }
        ),
        "{err}"
    );
    let other_key = Secret::new("x".repeat(32));
    let err = live.apply(&forged.clone().sign(&other_key)).unwrap_err();
    assert!(err.is_update_signature(), "{err}");
    let mut garbled = ConfigUpdate::new(3, json!({"redis": {"pool_size": 1}})).sign(&key);
    garbled.signature = Some("zz".into());
    assert!(live.apply(&garbled).unwrap_err().is_update_signature());
    // A signature does not carry over to another version or document.
    let good = ConfigUpdate::new(2, json!({"redis": {"pool_size": 9}})).sign(&key);
    let mut moved = good.clone();
    moved.version = u64::MAX;
    assert!(live.apply(&moved).unwrap_err().is_update_signature());
    assert_eq!(live.load().redis.pool_size, 3, "nothing applied yet");

    assert_eq!(live.apply(&good).unwrap(), Change::Updated { version: 2 });
    assert_eq!(live.load().redis.pool_size, 9);
    assert_eq!(live.load().update_version(), Some(2));
    assert_eq!(live.apply(&good).unwrap(), Change::AlreadyApplied);
    // The wire form carries the signature.
    let back: ConfigUpdate = serde_json::from_str(&serde_json::to_string(&good).unwrap()).unwrap();
    back.verify_signature(&key).unwrap();

    let stats = live.update_stats();
    assert_eq!(
        (
            stats.applied,
            stats.redelivered,
            stats.rejected_unsigned,
            stats.rejected_bad_signature,
            stats.rejected_other
        ),
        (1, 1, 1, 3, 0),
        "{stats:?}"
    );
}

#[tokio::test]
async fn a_mapped_section_changes_only_when_it_does() {
    let (_d, _path, live) = live_with_file("[redis]\npool_size = 3\n");
    let mut redis = live.map(|s| s.redis.clone());
    assert_eq!(
        redis.borrow_and_update().pool_size,
        3,
        "the current value at once"
    );

    // Another section changes: the whole settings move, the section does not.
    let mut whole = live.subscribe();
    whole.borrow_and_update();
    live.apply(&ConfigUpdate::new(1, json!({"service_name": "other"})))
        .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), whole.changed())
        .await
        .expect("the update is published within 10 s")
        .unwrap();
    // The forwarding task saw that version too before the next one lands:
    // give it the chance to (wrongly) publish.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(
        !redis.has_changed().unwrap(),
        "a change elsewhere woke the section"
    );

    // The section changes: one notification, with the new value.
    live.apply(&ConfigUpdate::new(2, json!({"redis": {"pool_size": 7}})))
        .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), redis.changed())
        .await
        .expect("the section's change is seen")
        .unwrap();
    assert_eq!(redis.borrow_and_update().pool_size, 7);

    // A published version equal in the section is no change.
    live.apply(&ConfigUpdate::new(
        3,
        json!({"redis": {"pool_size": 7}, "service_name": "again"}),
    ))
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!redis.has_changed().unwrap());
}

#[test]
fn a_version_reports_its_profile_and_where_each_section_came_from() {
    let (_dir, path) = toml_file("profile = \"prod\"\n[redis]\npool_size = 3\n");
    let live = strict_live(&path, [("SOMA_BUS__PARTITIONS", "4")]);
    let v = live.load();
    assert_eq!(v.profile(), soma_config::DeploymentProfile::Prod);
    assert_eq!(v.sources().get("redis"), Some(&Origin::File(path.clone())));
    assert_eq!(
        v.sources().get("bus"),
        Some(&Origin::Env {
            var: "SOMA_BUS__PARTITIONS".into()
        })
    );
}

#[test]
fn live_and_reader_print_the_version_and_checksum_and_nothing_else() {
    let (_d, _p, live) = live_with_file("[redis]\npool_size = 3\nurl = \"redis://:hunter2@h\"\n");
    let printed = format!("{live:?}");
    let checksum = live.load().checksum().to_owned();
    assert!(
        printed.starts_with("Live")
            && printed.contains("version: 1")
            && printed.contains(&checksum),
        "{printed}"
    );
    assert!(!printed.contains("hunter2"), "{printed}");
    assert_eq!(format!("{:?}", live.reader()), "Reader { .. }");
}
