//! Layered loading, provenance and bad input.

mod common;

use common::{AppSettings, no_env, toml_file};
use soma_config::{ConfigError, DeploymentProfile, Loader, Origin, ProfilePreset, SectionPreset};

#[test]
fn defaults_only() {
    let s = Loader::<AppSettings>::new()
        .env_from(no_env())
        .load()
        .unwrap();
    assert_eq!(s, AppSettings::default());
}

#[test]
fn precedence_default_file_env_override() {
    let (_dir, path) = toml_file(
        r#"
        service_name = "from-file"
        [redis]
        pool_size = 16
        url = "redis://file:6379"
        [bus]
        partitions = 6
        "#,
    );
    let s = Loader::<AppSettings>::new()
        .file(&path)
        .env_from([
            ("SOMA_REDIS__POOL_SIZE", "24"),
            ("SOMA_BUS__BOOTSTRAP_SERVERS", "broker-a:9092,broker-b:9092"),
            ("HOME", "/root"),
        ])
        .set("bus.partitions", 9)
        .load()
        .unwrap();
    assert_eq!(s.service_name, "from-file");
    assert_eq!(s.redis.url, "redis://file:6379");
    assert_eq!(s.redis.pool_size, 24, "env beats file");
    assert_eq!(s.bus.bootstrap_servers, "broker-a:9092,broker-b:9092");
    assert_eq!(s.bus.partitions, 9, "override beats file");
    assert_eq!(
        s.redis.connect_timeout_ms, 1_000,
        "untouched keys keep defaults"
    );
    assert_eq!(s.bus.topics, vec!["events".to_string()]);
}

#[test]
fn later_files_override_earlier_and_optional_files_may_be_missing() {
    let (_d1, base) = toml_file("[redis]\npool_size = 2\nurl = \"redis://base\"\n");
    let (_d2, top) = toml_file("[redis]\npool_size = 3\n");
    let s = Loader::<AppSettings>::new()
        .env_from(no_env())
        .file(&base)
        .file(&top)
        .file_optional(_d2.path().join("missing.toml"))
        .load()
        .unwrap();
    assert_eq!(
        (s.redis.pool_size, s.redis.url.as_str()),
        (3, "redis://base")
    );

    let err = Loader::<AppSettings>::new()
        .env_from(no_env())
        .file(_d1.path().join("nope.toml"))
        .load()
        .unwrap_err();
    assert!(err.is_io(), "{err}");
    assert!(err.to_string().contains("nope.toml"));
}

#[test]
fn secrets_load_from_env_even_when_numeric_and_never_print() {
    let s = Loader::<AppSettings>::new()
        .env_from([("SOMA_REDIS__PASSWORD", "12345")])
        .load()
        .unwrap();
    assert_eq!(s.redis.password.expose_secret(), "12345");
    assert!(!format!("{s:?}").contains("12345"));
}

#[test]
fn malformed_toml_names_the_file() {
    let (_dir, path) = toml_file("[redis\npool_size = 3\n");
    let err = Loader::<AppSettings>::new()
        .env_from(no_env())
        .file(&path)
        .load()
        .unwrap_err();
    assert!(err.is_parse(), "{err}");
    assert_eq!(err.origin(), Some(Origin::File(path.clone())));
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn wrong_type_in_file_names_file_and_key() {
    let (_dir, path) = toml_file("[redis]\npool_size = \"lots\"\n");
    let err = Loader::<AppSettings>::new()
        .env_from(no_env())
        .file(&path)
        .load()
        .unwrap_err();
    assert!(err.is_invalid_value() && err.is_parse(), "{err}");
    assert_eq!(err.key(), Some("redis.pool_size"));
    assert_eq!(err.origin(), Some(Origin::File(path)));
}

#[test]
fn wrong_type_in_env_names_the_variable() {
    let err = Loader::<AppSettings>::new()
        .env_from([("SOMA_BUS__PARTITIONS", "many")])
        .load()
        .unwrap_err();
    assert!(err.is_invalid_value(), "{err}");
    assert_eq!(err.key(), Some("bus.partitions"));
    assert_eq!(
        err.origin(),
        Some(Origin::Env {
            var: "SOMA_BUS__PARTITIONS".into()
        })
    );
    assert!(err.to_string().contains("SOMA_BUS__PARTITIONS"), "{err}");
}

#[test]
fn strict_mode_catches_typos_with_source() {
    let (_dir, path) = toml_file("[redis]\npool_sise = 3\n");
    let loader = Loader::<AppSettings>::new().env_from(no_env()).file(&path);
    // Lenient: loads, the typo is ignored (and logged).
    assert_eq!(loader.clone().load().unwrap().redis.pool_size, 8);
    let err = loader.strict(true).load().unwrap_err();
    assert!(err.is_unknown_key(), "{err}");
    assert_eq!(err.key(), Some("redis.pool_sise"));
    assert_eq!(err.origin(), Some(Origin::File(path)));

    let err = Loader::<AppSettings>::new()
        .strict(true)
        .env_from([("SOMA_REDIS__POOLSIZE", "3")])
        .load()
        .unwrap_err();
    assert!(err.is_unknown_key());
    assert_eq!(err.key(), Some("redis.poolsize"));
    assert_eq!(
        err.origin(),
        Some(Origin::Env {
            var: "SOMA_REDIS__POOLSIZE".into()
        })
    );

    let err = Loader::<AppSettings>::new()
        .strict(true)
        .env_from(no_env())
        .set("redis.pol", 1)
        .load()
        .unwrap_err();
    assert_eq!(
        (err.key(), err.origin()),
        (Some("redis.pol"), Some(Origin::Override))
    );
}

#[test]
fn strict_mode_accepts_map_keys_and_ignores_foreign_soma_variables() {
    let s = Loader::<AppSettings>::new()
        .strict(true)
        .env_from([
            ("SOMA_LABELS__TEAM", "agents"),
            ("SOMA_TEST_REDIS_URL", "redis://elsewhere"),
            ("SOMA_STACK_DIR", "/tmp/x"),
        ])
        .load()
        .unwrap();
    assert_eq!(s.labels["team"], "agents");
}

#[cfg(unix)]
#[test]
fn non_utf8_env_value_is_typed_error() {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;
    let err = Loader::<AppSettings>::new()
        .env_from([(
            OsString::from("SOMA_REDIS__URL"),
            OsString::from_vec(vec![b'r', 0xfe, 0xff]),
        )])
        .load()
        .unwrap_err();
    assert!(err.is_non_utf8_env());
    assert_eq!(
        err.origin(),
        Some(Origin::Env {
            var: "SOMA_REDIS__URL".into()
        })
    );
    assert_eq!(err.key(), Some("redis.url"));
}

#[test]
fn validation_names_key_and_the_source_of_the_bad_value() {
    let (_dir, path) = toml_file("[redis]\npool_size = 0\n");
    let loader = Loader::<AppSettings>::new()
        .file(&path)
        .validate(|s, c| {
            c.ensure(
                s.redis.pool_size > 0,
                "redis.pool_size",
                "must be at least 1",
            )
        })
        .validate(|s, c| {
            c.ensure(
                !s.bus.bootstrap_servers.is_empty(),
                "bus.bootstrap_servers",
                "required",
            )
        });
    let err = loader
        .clone()
        .env_from([("SOMA_BUS__BOOTSTRAP_SERVERS", "\"\"")])
        .load()
        .unwrap_err();
    let ConfigError::Validation { violations } = &err else {
        panic!("{err}")
    };
    assert_eq!(violations.len(), 2);
    assert_eq!(violations[0].key, "redis.pool_size");
    assert_eq!(violations[0].origin, Origin::File(path.clone()));
    assert_eq!(
        violations[1].origin,
        Origin::Env {
            var: "SOMA_BUS__BOOTSTRAP_SERVERS".into()
        }
    );
    assert!(err.is_validation());
    assert!(
        err.to_string().contains("SOMA_BUS__BOOTSTRAP_SERVERS"),
        "{err}"
    );
    // Fixed by env: passes.
    assert!(
        loader
            .env_from([("SOMA_REDIS__POOL_SIZE", "2")])
            .load()
            .is_ok()
    );
}

/// The test settings' composition: the `redis` section's sizes (as a
/// crate would offer them next to its config) mounted at `redis`.
fn redis_sizes(profile: DeploymentProfile) -> SectionPreset {
    let (pool_size, connect_timeout_ms) = match profile {
        DeploymentProfile::Local => (4, 500),
        DeploymentProfile::Prod => (32, 5_000),
    };
    SectionPreset::new(
        profile,
        [
            ("pool_size", pool_size),
            ("connect_timeout_ms", connect_timeout_ms),
        ],
    )
}

fn preset(profile: DeploymentProfile) -> Result<ProfilePreset, ConfigError> {
    ProfilePreset::new(profile)
        .section("redis", redis_sizes(profile))?
        .size("bus.partitions", 1)
}

#[test]
fn profiles_size_but_never_weaken_safety() {
    let base = Loader::<AppSettings>::new().presets(preset);
    let local = base.clone().env_from(no_env()).load().unwrap();
    let prod = base
        .clone()
        .env_from([("SOMA_PROFILE", "prod")])
        .load()
        .unwrap();
    assert_eq!(local.profile, DeploymentProfile::Local);
    assert_eq!(prod.profile, DeploymentProfile::Prod);
    assert_eq!((local.redis.pool_size, prod.redis.pool_size), (4, 32));
    assert!(local.redis.connect_timeout_ms < prod.redis.connect_timeout_ms);
    assert_eq!(prod.bus.partitions, 1);
    for s in [&local, &prod] {
        assert!(s.auth.required, "authentication stays on in every profile");
        assert_eq!(s.bus.acks, "all", "durability stays on in every profile");
    }
    // Explicit sources still beat the preset.
    let s = base
        .clone()
        .env_from([("SOMA_PROFILE", "prod"), ("SOMA_REDIS__POOL_SIZE", "5")])
        .load()
        .unwrap();
    assert_eq!(s.redis.pool_size, 5);

    // A custom preset cannot even express switching auth off or acks down.
    let err = ProfilePreset::new(DeploymentProfile::Local)
        .size("auth.required", 1)
        .unwrap_err();
    assert!(err.is_profile_violation());
    let err = ProfilePreset::new(DeploymentProfile::Local)
        .section(
            "bus",
            SectionPreset::new(DeploymentProfile::Local, [("acks", 1)]),
        )
        .unwrap_err();
    assert!(err.is_profile_violation());
    assert_eq!(err.key(), Some("bus.acks"));
    // What it can do: size. A fixed preset takes the place of the built one.
    let preset = ProfilePreset::new(DeploymentProfile::Local)
        .size("redis.pool_size", 1)
        .unwrap();
    let s = base
        .clone()
        .env_from(no_env())
        .profile_preset(preset)
        .load()
        .unwrap();
    assert_eq!(s.redis.pool_size, 1);

    let err = base
        .env_from([("SOMA_PROFILE", "staging")])
        .load()
        .unwrap_err();
    assert!(err.is_invalid_value());
    assert_eq!(
        err.origin(),
        Some(Origin::Env {
            var: "SOMA_PROFILE".into()
        })
    );
}

/// A preset key the settings do not have would size nothing: every load
/// refuses it, whichever profile is active, as it refuses a preset that
/// cannot be built or is for another profile.
#[test]
fn presets_that_would_size_nothing_fail_every_load() {
    let typo = |profile: DeploymentProfile| {
        let preset = ProfilePreset::new(profile).section("redis", redis_sizes(profile))?;
        match profile {
            DeploymentProfile::Local => Ok(preset),
            DeploymentProfile::Prod => preset.size("redis.pool_sise", 8),
        }
    };
    let err = Loader::<AppSettings>::new()
        .env_from(no_env())
        .presets(typo)
        .load()
        .unwrap_err();
    assert!(err.is_profile_violation(), "{err}");
    assert_eq!(err.key(), Some("redis.pool_sise"));

    // A string setting is not a size either.
    let err = Loader::<AppSettings>::new()
        .env_from(no_env())
        .profile_preset(
            ProfilePreset::new(DeploymentProfile::Prod)
                .size("service_name", 3)
                .unwrap(),
        )
        .load()
        .unwrap_err();
    assert_eq!(err.key(), Some("service_name"));

    // The builder's own error comes out of the load as it was.
    let err = Loader::<AppSettings>::new()
        .env_from(no_env())
        .presets(|profile| ProfilePreset::new(profile).size("redis.tls_enabled", 1))
        .load()
        .unwrap_err();
    assert_eq!(err.key(), Some("redis.tls_enabled"));

    let err = Loader::<AppSettings>::new()
        .env_from(no_env())
        .presets(|_| Ok(ProfilePreset::new(DeploymentProfile::Prod)))
        .load()
        .unwrap_err();
    assert!(err.is_profile_violation(), "{err}");
    assert_eq!(err.key(), Some("profile"));
}

#[test]
fn env_arrays_and_flag_overrides() {
    let s = Loader::<AppSettings>::new()
        .strict(true)
        .env_from([
            ("SOMA_BUS__TOPICS", "[a, b, c]"),
            ("SOMA_FLAGS__PROFILE", "enhanced"),
            ("SOMA_FLAGS__OVERRIDES__SEMANTIC_CACHE", "off"),
        ])
        .load()
        .unwrap();
    assert_eq!(s.bus.topics, vec!["a", "b", "c"]);
    assert_eq!(s.flags.profile, Some(soma_config::FeatureProfile::Enhanced));
    assert_eq!(
        s.flags.overrides["semantic_cache"],
        soma_config::FlagSetting::Off
    );
}

/// A section that wants to know the deployment profile.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
struct Topics {
    deployment_profile: DeploymentProfile,
    partitions: u32,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
struct WithSection {
    profile: DeploymentProfile,
    topics: Topics,
}

#[test]
fn sections_declaring_deployment_profile_receive_the_selected_one() {
    let prod = Loader::<WithSection>::new()
        .env_from([("SOMA_PROFILE", "prod")])
        .strict(true)
        .load()
        .unwrap();
    assert_eq!(prod.topics.deployment_profile, DeploymentProfile::Prod);
    let local = Loader::<WithSection>::new()
        .env_from(no_env())
        .load()
        .unwrap();
    assert_eq!(local.topics.deployment_profile, DeploymentProfile::Local);
    // The same value spelled out is fine.
    Loader::<WithSection>::new()
        .env_from([
            ("SOMA_PROFILE", "prod"),
            ("SOMA_TOPICS__DEPLOYMENT_PROFILE", "prod"),
        ])
        .load()
        .unwrap();

    // A source that gives the section another profile fails, naming it.
    let err = Loader::<WithSection>::new()
        .env_from([
            ("SOMA_PROFILE", "prod"),
            ("SOMA_TOPICS__DEPLOYMENT_PROFILE", "local"),
        ])
        .load()
        .unwrap_err();
    assert_eq!(err.key(), Some("topics.deployment_profile"), "{err}");
    assert_eq!(
        err.origin(),
        Some(Origin::Env {
            var: "SOMA_TOPICS__DEPLOYMENT_PROFILE".into()
        }),
        "{err}"
    );
    let (_dir, path) = toml_file("[topics]\ndeployment_profile = \"prod\"\n");
    let err = Loader::<WithSection>::new()
        .env_from(no_env())
        .file(&path)
        .load()
        .unwrap_err();
    assert_eq!(err.key(), Some("topics.deployment_profile"), "{err}");
}

#[test]
fn a_loader_prints_its_sources_and_switches_never_values() {
    let (_dir, path) = toml_file("[redis]\nurl = \"redis://:hunter2@cache:6379\"\n");
    let printed = format!(
        "{:?}",
        Loader::<AppSettings>::new()
            .file(&path)
            .env_from(no_env())
            .strict(true)
    );
    assert!(printed.starts_with("Loader"), "{printed}");
    assert!(
        printed.contains(&format!("{}", path.display())) && printed.contains("strict: true"),
        "the files and switches an operator debugs with: {printed}"
    );
    assert!(!printed.contains("hunter2"), "{printed}");
}

#[test]
fn without_env_reads_no_variable_and_keeps_every_other_source() {
    let (_dir, path) = toml_file("service_name = \"from-file\"\n[redis]\npool_size = 16\n");
    let s = Loader::<AppSettings>::new()
        .file(&path)
        .env_from([("SOMA_REDIS__POOL_SIZE", "24")])
        .set("bus.partitions", 9)
        .without_env()
        .load()
        .unwrap();
    assert_eq!(s.redis.pool_size, 16, "the variable is not read");
    assert_eq!(s.service_name, "from-file", "the file still is");
    assert_eq!(s.bus.partitions, 9, "and the override");
}

#[test]
fn overrides_under_one_section_keep_each_other() {
    let s = Loader::<AppSettings>::new()
        .env_from(no_env())
        .set("redis.url", "redis://set:6379")
        .set("redis.pool_size", 7)
        .load()
        .unwrap();
    assert_eq!(
        s.redis.url, "redis://set:6379",
        "the second set kept the first"
    );
    assert_eq!(s.redis.pool_size, 7);
}

#[test]
fn a_file_that_is_not_utf8_is_a_parse_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("latin1.toml");
    std::fs::write(&path, b"service_name = \"caf\xe9\"\n").unwrap();
    let err = Loader::<AppSettings>::new()
        .env_from(no_env())
        .file(&path)
        .load()
        .unwrap_err();
    assert!(err.is_parse() && !err.is_io(), "{err:?}");
    assert_eq!(err.origin(), Some(Origin::File(path.clone())), "{err}");
    assert!(err.to_string().contains("not valid UTF-8"), "{err}");
}

#[test]
fn a_toml_syntax_error_names_the_file_and_no_key() {
    let (_dir, path) = toml_file("[redis\npool_size = 3\n");
    let err = Loader::<AppSettings>::new()
        .env_from(no_env())
        .file(&path)
        .load()
        .unwrap_err();
    assert!(err.is_parse(), "{err:?}");
    assert_eq!(
        err.key(),
        None,
        "a syntax error is not about a key: {err:?}"
    );
}

#[test]
fn a_settings_type_that_denies_unknown_fields_names_the_field() {
    #[derive(Debug, Default, serde::Deserialize, serde::Serialize)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        size: u32,
    }
    #[derive(Debug, Default, serde::Deserialize, serde::Serialize)]
    #[serde(default)]
    struct Outer {
        inner: Inner,
    }
    let (_dir, path) = toml_file("[inner]\nsize = 2\nsise = 3\n");
    let err = Loader::<Outer>::new()
        .env_from(no_env())
        .file(&path)
        .load()
        .unwrap_err();
    assert!(err.is_unknown_key(), "{err:?}");
    assert_eq!(err.key(), Some("inner.sise"), "{err:?}");
}
