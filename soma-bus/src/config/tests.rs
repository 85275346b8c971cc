//! Unit tests of the `bus` section.

use std::sync::atomic::Ordering;

use soma_config::DeploymentProfile;
use soma_observability::resilience::BreakerConfig;

use super::*;

#[test]
fn defaults_validate_and_overrides_are_guarded() {
    BusConfig::default().validate().unwrap();
    let mut c = BusConfig::default();
    c.librdkafka
        .insert("enable.idempotence".into(), "false".into());
    let err = c.validate().unwrap_err();
    assert!(err.is_config());
    let c: BusConfig =
        serde_json::from_str(r#"{"producer": {"linger_ms": 20}, "sasl_password": "hunter2"}"#)
            .unwrap();
    assert_eq!(c.producer.linger_ms, 20);
    assert!(!format!("{c:?}").contains("hunter2"));
}

/// The preset's keys live here, so the proof that each one is a numeric
/// setting of this section does too.
#[test]
fn every_preset_key_is_a_numeric_setting_of_the_section() {
    for profile in DeploymentProfile::ALL {
        BusConfig::preset(profile)
            .check(&BusConfig::default())
            .unwrap();
    }
}

#[test]
fn durability_follows_the_deployment_profile() {
    let local = BusConfig::default();
    local.validate().unwrap();
    assert_eq!(
        (local.replication_factor(), local.min_insync_replicas()),
        (1, None)
    );

    let prod = BusConfig {
        deployment_profile: DeploymentProfile::Prod,
        ..BusConfig::default()
    };
    prod.validate().unwrap();
    assert_eq!(
        (prod.replication_factor(), prod.min_insync_replicas()),
        (3, Some(2))
    );
    for (rf, isr) in [(Some(1), None), (Some(1), Some(1)), (None, Some(1))] {
        let mut c = prod.clone();
        c.topics.replication_factor = rf;
        c.topics.min_insync_replicas = isr;
        let e = c.validate().unwrap_err();
        assert!(
            e.is_weak_durability() && e.is_config(),
            "{rf:?}/{isr:?}: {e}"
        );
    }
    let mut c = prod.clone();
    c.topics.replication_factor = Some(2);
    c.validate().expect("rf 2 with min.insync 2 is allowed");
    c.topics.min_insync_replicas = Some(3);
    assert!(c.validate().unwrap_err().is_config(), "min.insync > rf");

    // An explicit local setting is the operator's call.
    let mut c = BusConfig::default();
    c.topics.replication_factor = Some(3);
    c.topics.min_insync_replicas = Some(2);
    c.validate().unwrap();
    c.topics.replication_factor = Some(0);
    assert!(c.validate().unwrap_err().is_config());
    // The key reads from a config file, nested or by its old flat name.
    let c: BusConfig = serde_json::from_str(r#"{"topics": {"replication_factor": 3}}"#).unwrap();
    assert_eq!(c.replication_factor(), 3);
    let c: BusConfig = serde_json::from_str(r#"{"topic_replication_factor": 3}"#).unwrap();
    assert_eq!(c.replication_factor(), 3);
}

#[test]
fn consumers_read_uncommitted_unless_overridden() {
    let c = BusConfig::default();
    assert_eq!(
        c.consumer_client_config().get("isolation.level"),
        Some("read_uncommitted")
    );
    let mut c = BusConfig::default();
    c.librdkafka
        .insert("isolation.level".into(), "read_committed".into());
    c.validate().unwrap();
    assert_eq!(
        c.consumer_client_config().get("isolation.level"),
        Some("read_committed")
    );
}

#[test]
fn consumers_heartbeat_a_third_of_the_session_at_most_every_3_s() {
    let mut c = BusConfig::default();
    assert_eq!(c.consumer.session_timeout_ms, 10_000);
    assert_eq!(
        c.consumer_client_config().get("heartbeat.interval.ms"),
        Some("3000")
    );
    c.consumer.session_timeout_ms = 6_000;
    assert_eq!(
        c.consumer_client_config().get("heartbeat.interval.ms"),
        Some("2000")
    );
    assert_eq!(
        c.producer_client_config().get("heartbeat.interval.ms"),
        None
    );
    c.librdkafka
        .insert("heartbeat.interval.ms".into(), "500".into());
    assert_eq!(
        c.consumer_client_config().get("heartbeat.interval.ms"),
        Some("500"),
        "an explicit librdkafka property wins"
    );
}

#[test]
fn consumer_fetch_wait_reaches_consumers_only_and_is_bounded() {
    let c = BusConfig::default();
    assert_eq!(c.consumer_client_config().get("fetch.wait.max.ms"), None);
    let mut c = BusConfig::default();
    c.consumer.fetch_wait_ms = Some(50);
    c.validate().unwrap();
    assert_eq!(
        c.consumer_client_config().get("fetch.wait.max.ms"),
        Some("50")
    );
    assert_eq!(c.producer_client_config().get("fetch.wait.max.ms"), None);
    c.librdkafka.insert("fetch.wait.max.ms".into(), "20".into());
    assert_eq!(
        c.consumer_client_config().get("fetch.wait.max.ms"),
        Some("20"),
        "an explicit librdkafka property wins"
    );
    let mut c = BusConfig::default();
    c.consumer.fetch_wait_ms = Some(300_001);
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("consumer.fetch_wait_ms"), "{err}");
}

/// Every flat key of before the nesting, with a value unlike its default.
const FLAT: &str = r#"
    linger_ms = 11
    batch_size_bytes = 12
    batch_num_messages = 13
    max_in_flight = 4
    queue_buffering_max_messages = 15
    flush_timeout_ms = 16
    publish_timeout_ms = 17
    pending_key_poll_interval_ms = 18
    check_outbox_per_message = true
    consumer_group = "flat"
    consumer_concurrency = 3
    consumer_lane_capacity = 19
    auto_offset_reset = "latest"
    session_timeout_ms = 20
    consumer_fetch_wait_ms = 21
    commit_interval_ms = 22
    max_attempts = 23
    retry_backoff_initial_ms = 24
    retry_backoff_max_ms = 25
    dlq_suffix = ".dead"
    dlq_retry_backoff_ms = 26
    shutdown_timeout_ms = 27
    lag_interval_ms = 28
    replay_max = 29
    topic_partitions = 30
    topic_replication_factor = 2
    topic_min_insync_replicas = 2
    admin_timeout_ms = 31

    [breaker]
    failure_threshold = 7
    open_ms = 32
"#;

/// The same values under the nested keys.
const NESTED: &str = r#"
    [producer]
    linger_ms = 11
    batch_size_bytes = 12
    batch_num_messages = 13
    max_in_flight = 4
    queue_buffering_max_messages = 15
    flush_timeout_ms = 16

    [publisher]
    timeout_ms = 17
    pending_key_poll_interval_ms = 18
    check_outbox_per_message = true
    breaker = { failure_threshold = 7, open_ms = 32 }

    [consumer]
    group = "flat"
    concurrency = 3
    lane_capacity = 19
    auto_offset_reset = "latest"
    session_timeout_ms = 20
    fetch_wait_ms = 21
    commit_interval_ms = 22
    max_attempts = 23
    retry_backoff_initial_ms = 24
    retry_backoff_max_ms = 25
    dlq_suffix = ".dead"
    dlq_retry_backoff_ms = 26
    shutdown_timeout_ms = 27
    lag_interval_ms = 28
    replay_max = 29

    [topics]
    partitions = 30
    replication_factor = 2
    min_insync_replicas = 2
    admin_timeout_ms = 31
"#;

fn shape(c: &BusConfig) -> serde_json::Value {
    serde_json::to_value(c).unwrap()
}

#[test]
fn flat_keys_load_to_the_same_values_as_nested_ones() {
    let flat: BusConfig = toml::from_str(FLAT).unwrap();
    let nested: BusConfig = toml::from_str(NESTED).unwrap();
    assert_eq!(shape(&flat), shape(&nested));
    assert_ne!(shape(&nested), shape(&BusConfig::default()));
    flat.validate().unwrap();
    assert_eq!(flat.publisher.breaker, BreakerConfig::new(7, 32));
    assert_eq!(flat.consumer.fetch_wait_ms, Some(21));

    // Every old key is listed, once, in the table's order.
    assert_eq!(flat.deprecated_keys_used(), BusConfig::RENAMED);
    assert!(nested.deprecated_keys_used().is_empty());
    assert!(BusConfig::default().deprecated_keys_used().is_empty());
    // The table names each nested key of the serialized shape.
    let nested_shape = shape(&nested);
    for (old, new) in BusConfig::RENAMED {
        assert!(nested_shape.get(old).is_none(), "{old} is not serialized");
        let value = new
            .split('.')
            .try_fold(&nested_shape, |node, seg| node.get(seg));
        assert!(value.is_some(), "{new} is not a key of the section");
    }
}

#[test]
fn a_nested_key_wins_over_its_flat_alias() {
    let c: BusConfig = toml::from_str(
        r#"
        linger_ms = 1
        consumer_group = "old"
        topic_partitions = 2
        [producer]
        linger_ms = 9
        [consumer]
        group = "new"
        "#,
    )
    .unwrap();
    assert_eq!(c.producer.linger_ms, 9);
    assert_eq!(c.consumer.group, "new");
    assert_eq!(c.topics.partitions, 2, "a flat key alone still applies");
    assert_eq!(
        c.deprecated_keys_used(),
        [
            ("linger_ms", "producer.linger_ms"),
            ("consumer_group", "consumer.group"),
            ("topic_partitions", "topics.partitions"),
        ]
    );
}

#[test]
fn serialization_is_nested_and_round_trips() {
    let flat: BusConfig = toml::from_str(FLAT).unwrap();
    let text = toml::to_string(&flat).unwrap();
    assert!(
        text.contains("[producer]") && !text.contains("consumer_group"),
        "{text}"
    );
    let back: BusConfig = toml::from_str(&text).unwrap();
    assert_eq!(shape(&back), shape(&flat));
    assert!(back.deprecated_keys_used().is_empty());
    let json: BusConfig = serde_json::from_value(shape(&flat)).unwrap();
    assert_eq!(shape(&json), shape(&flat));
}

#[test]
fn validation_rejects_bad_values_under_either_spelling() {
    for bad in [
        "max_in_flight = 6",
        "[producer]\nmax_in_flight = 0",
        "publish_timeout_ms = 0",
        "[publisher]\ntimeout_ms = 0",
        "consumer_concurrency = 0",
        "[consumer]\nlane_capacity = 0",
        "max_attempts = 0",
        "[consumer]\ndlq_suffix = \"\"",
        "auto_offset_reset = \"newest\"",
        "[consumer]\nfetch_wait_ms = 300001",
        "topic_partitions = 0",
        "[topics]\nreplication_factor = 1\nmin_insync_replicas = 2",
    ] {
        let c: BusConfig = toml::from_str(bad).unwrap();
        assert!(c.validate().unwrap_err().is_config(), "{bad}");
    }
}

#[test]
fn deprecated_keys_are_reported_once_per_config_and_its_clones() {
    let c: BusConfig = toml::from_str("linger_ms = 1").unwrap();
    let clone = c.clone();
    assert!(!clone.deprecated.reported.load(Ordering::Relaxed));
    c.warn_deprecated_keys();
    assert!(clone.deprecated.reported.load(Ordering::Relaxed));
    let nested = BusConfig::default();
    nested.warn_deprecated_keys();
    assert!(!nested.deprecated.reported.load(Ordering::Relaxed));
}
