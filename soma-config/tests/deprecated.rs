//! Renamed settings keep loading under their old key for a deprecation
//! period ([`Loader::deprecated_key`]), and the new key wins.

mod common;

use common::{AppSettings, no_env, toml_file};
use soma_config::{ConfigError, Loader, Origin};

/// `redis.pool_size` was once `bus.redis_pool` (another section, as a key
/// moved between crates' sections).
fn loader() -> Loader<AppSettings> {
    Loader::<AppSettings>::new()
        .strict(true)
        .deprecated_key("bus.redis_pool", "redis.pool_size")
}

#[test]
fn the_old_key_still_loads_from_a_file_the_environment_and_an_override() {
    let (_d, path) = toml_file("[bus]\nredis_pool = 7\n");
    let s = loader().env_from(no_env()).file(&path).load().unwrap();
    assert_eq!(s.redis.pool_size, 7, "old key in a file");

    let s = loader()
        .env_from([("SOMA_BUS__REDIS_POOL", "8")])
        .load()
        .unwrap();
    assert_eq!(s.redis.pool_size, 8, "old key in the environment");

    let s = loader()
        .env_from(no_env())
        .set("bus.redis_pool", 9)
        .load()
        .unwrap();
    assert_eq!(s.redis.pool_size, 9, "old key as an override");
}

#[test]
fn the_new_key_loads_and_wins_over_the_old_one_wherever_each_is_set() {
    let (_d, path) = toml_file("[redis]\npool_size = 5\n");
    let s = loader().env_from(no_env()).file(&path).load().unwrap();
    assert_eq!(s.redis.pool_size, 5, "new key alone");

    let (_d, both) = toml_file("[bus]\nredis_pool = 7\n[redis]\npool_size = 5\n");
    let s = loader().env_from(no_env()).file(&both).load().unwrap();
    assert_eq!(s.redis.pool_size, 5, "both in one file");

    // The old key in a source of higher precedence does not beat the new one.
    let s = loader()
        .env_from([("SOMA_BUS__REDIS_POOL", "8")])
        .file(&path)
        .load()
        .unwrap();
    assert_eq!(
        s.redis.pool_size, 5,
        "new in a file, old in the environment"
    );
}

#[test]
fn without_the_rename_strict_mode_rejects_the_old_key() {
    let (_d, path) = toml_file("[bus]\nredis_pool = 7\n");
    let err = Loader::<AppSettings>::new()
        .strict(true)
        .env_from(no_env())
        .file(&path)
        .load()
        .unwrap_err();
    assert!(err.is_unknown_key(), "{err:?}");
}

#[test]
fn a_bad_value_under_the_old_key_is_reported_with_its_source() {
    let err = loader()
        .env_from([("SOMA_BUS__REDIS_POOL", "0")])
        .validate(|s: &AppSettings, checks| {
            checks.ensure(s.redis.pool_size > 0, "redis.pool_size", "must be > 0")
        })
        .load()
        .unwrap_err();
    let ConfigError::Validation { violations } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(violations[0].key, "redis.pool_size");
    assert_eq!(
        violations[0].origin,
        Origin::Env {
            var: "SOMA_BUS__REDIS_POOL".into()
        }
    );
}
