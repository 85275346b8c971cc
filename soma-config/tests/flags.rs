//! Feature flags: resolution order, provenance, degradation, tenants.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use soma_config::{
    FeatureFlags, FeatureProfile, FlagDescriptor, FlagSource, FlagState, FlagsConfig,
};
use soma_config::{FlagSetting, ResolverError, TenantFlagResolver};

fn descriptors() -> Vec<FlagDescriptor> {
    vec![
        FlagDescriptor::new("audit_log", "Write the audit log")
            .default_on(true)
            .from_profile(FeatureProfile::Minimal),
        FlagDescriptor::new("vector_recall", "Recall from the vector store")
            .from_profile(FeatureProfile::Standard),
        FlagDescriptor::new("semantic_cache", "Cache answers by meaning")
            .from_profile(FeatureProfile::Enhanced)
            .depends_on("vector_recall"),
        FlagDescriptor::new("experimental_planner", "New planner")
            .in_profiles(&[FeatureProfile::Max]),
    ]
}

fn flags(config: FlagsConfig) -> FeatureFlags {
    FeatureFlags::new(descriptors(), config, None).unwrap()
}

#[test]
fn defaults_without_profile() {
    let f = flags(FlagsConfig::default());
    let a = f.lookup("audit_log").unwrap();
    assert_eq!((a.state, a.source), (FlagState::On, FlagSource::Default));
    assert_eq!(f.lookup("vector_recall").unwrap().state, FlagState::Off);
}

#[test]
fn profiles_decide_membership() {
    let expect = [
        (FeatureProfile::Minimal, [true, false, false, false]),
        (FeatureProfile::Standard, [true, true, false, false]),
        (FeatureProfile::Enhanced, [true, true, true, false]),
        (FeatureProfile::Max, [true, true, true, true]),
    ];
    for (profile, on) in expect {
        let f = flags(FlagsConfig::default().with_profile(profile));
        for (name, want) in [
            "audit_log",
            "vector_recall",
            "semantic_cache",
            "experimental_planner",
        ]
        .iter()
        .zip(on)
        {
            let l = f.lookup(name).unwrap();
            assert_eq!(l.state.is_on(), want, "{profile:?} {name}");
        }
        assert_eq!(
            f.lookup("audit_log").unwrap().source,
            FlagSource::Profile { profile }
        );
    }
}

#[test]
fn config_override_beats_profile_and_dependencies_apply() {
    let f = flags(
        FlagsConfig::default()
            .with_profile(FeatureProfile::Max)
            .with_override("vector_recall", FlagSetting::Off),
    );
    let v = f.lookup("vector_recall").unwrap();
    assert_eq!((v.state, v.source), (FlagState::Off, FlagSource::Config));
    let s = f.lookup("semantic_cache").unwrap();
    assert_eq!(s.state, FlagState::Off);
    assert_eq!(
        s.source,
        FlagSource::Dependency {
            flag: "vector_recall".into()
        }
    );
    assert!(s.reason.unwrap().contains("vector_recall"));
}

#[test]
fn unknown_names_are_errors_never_false() {
    let f = flags(FlagsConfig::default());
    assert!(f.lookup("nope").unwrap_err().is_unknown_flag());
    assert!(f.is_on("nope").unwrap_err().is_unknown_flag());
    assert!(f.set_degraded("nope", "x").unwrap_err().is_unknown_flag());
    assert!(f.clear_degraded("nope").unwrap_err().is_unknown_flag());
    let bad = FlagsConfig::default().with_override("nope", FlagSetting::On);
    assert!(f.set_config(bad.clone()).unwrap_err().is_unknown_flag());
    assert!(
        FeatureFlags::new(descriptors(), bad, None)
            .unwrap_err()
            .is_unknown_flag()
    );
}

#[test]
fn registry_rejects_bad_descriptors() {
    let dup = vec![FlagDescriptor::new("a", ""), FlagDescriptor::new("a", "")];
    assert!(FeatureFlags::new(dup, FlagsConfig::default(), None).is_err());
    let missing = vec![FlagDescriptor::new("a", "").depends_on("b")];
    let err = FeatureFlags::new(missing, FlagsConfig::default(), None).unwrap_err();
    assert!(err.to_string().contains("`b`"), "{err}");
    let cycle = vec![
        FlagDescriptor::new("a", "").depends_on("b"),
        FlagDescriptor::new("b", "").depends_on("a"),
    ];
    let err = FeatureFlags::new(cycle, FlagsConfig::default(), None).unwrap_err();
    assert!(err.to_string().contains("cycle"), "{err}");
}

#[test]
fn degraded_is_set_and_cleared_at_runtime_and_propagates() {
    let f = flags(FlagsConfig::default().with_profile(FeatureProfile::Enhanced));
    f.set_degraded("vector_recall", "vector store down")
        .unwrap();
    let v = f.lookup("vector_recall").unwrap();
    assert_eq!(
        (v.state, v.source.clone()),
        (FlagState::Degraded, FlagSource::Runtime)
    );
    assert_eq!(v.reason.as_deref(), Some("vector store down"));
    assert!(v.state.is_available() && !v.state.is_on());
    let s = f.lookup("semantic_cache").unwrap();
    assert_eq!(s.state, FlagState::Degraded);
    assert_eq!(
        s.source,
        FlagSource::Dependency {
            flag: "vector_recall".into()
        }
    );
    // Degrading an off flag leaves it off.
    f.set_degraded("experimental_planner", "x").unwrap();
    assert_eq!(
        f.lookup("experimental_planner").unwrap().state,
        FlagState::Off
    );
    assert!(f.clear_degraded("vector_recall").unwrap());
    assert!(!f.clear_degraded("vector_recall").unwrap());
    assert_eq!(f.lookup("semantic_cache").unwrap().state, FlagState::On);
}

#[derive(Default)]
struct TableResolver {
    table: std::sync::Mutex<HashMap<(String, String), FlagSetting>>,
    calls: AtomicUsize,
    fail_for: Option<String>,
}

#[async_trait]
impl TenantFlagResolver for TableResolver {
    async fn resolve(
        &self,
        tenant: &str,
        flag: &str,
    ) -> Result<Option<FlagSetting>, ResolverError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail_for.as_deref() == Some(tenant) {
            return Err(ResolverError("control plane unreachable".into()));
        }
        Ok(self
            .table
            .lock()
            .unwrap()
            .get(&(tenant.to_owned(), flag.to_owned()))
            .copied())
    }
}

#[tokio::test(start_paused = true)]
async fn tenant_overrides_are_cached_with_ttl_and_bounded() {
    let resolver = Arc::new(TableResolver {
        fail_for: Some("broken".into()),
        ..Default::default()
    });
    resolver
        .table
        .lock()
        .unwrap()
        .insert(("acme".into(), "vector_recall".into()), FlagSetting::On);
    let mut config = FlagsConfig::default().with_profile(FeatureProfile::Minimal);
    config.tenant_cache_ttl_ms = 1_000;
    config.tenant_cache_capacity = 3;
    let f = FeatureFlags::new(
        descriptors(),
        config,
        Some(resolver.clone() as Arc<dyn TenantFlagResolver>),
    )
    .unwrap();

    let l = f.lookup_for("vector_recall", "acme").await.unwrap();
    assert_eq!(l.state, FlagState::On);
    assert_eq!(
        l.source,
        FlagSource::Tenant {
            tenant: "acme".into(),
            cached: false
        }
    );
    let l = f.lookup_for("vector_recall", "acme").await.unwrap();
    assert_eq!(
        l.source,
        FlagSource::Tenant {
            tenant: "acme".into(),
            cached: true
        }
    );
    assert_eq!(resolver.calls.load(Ordering::SeqCst), 1);

    // Other tenants get the profile answer; "no override" is cached too.
    let other = f.lookup_for("vector_recall", "globex").await.unwrap();
    assert_eq!(
        (other.state, other.source),
        (
            FlagState::Off,
            FlagSource::Profile {
                profile: FeatureProfile::Minimal
            }
        )
    );
    f.lookup_for("vector_recall", "globex").await.unwrap();
    assert_eq!(resolver.calls.load(Ordering::SeqCst), 2);

    // TTL: after expiry the resolver is asked again and sees the change.
    resolver
        .table
        .lock()
        .unwrap()
        .insert(("acme".into(), "vector_recall".into()), FlagSetting::Off);
    tokio::time::advance(Duration::from_millis(1_100)).await;
    let l = f.lookup_for("vector_recall", "acme").await.unwrap();
    assert_eq!(l.state, FlagState::Off);
    assert_eq!(
        l.source,
        FlagSource::Tenant {
            tenant: "acme".into(),
            cached: false
        }
    );

    // Bounded: never more than the capacity.
    for t in 0..10 {
        f.lookup_for("audit_log", &format!("t{t}")).await.unwrap();
        assert!(f.tenant_cache_len() <= 3);
    }

    // Resolver failure: tenant-less answer, flagged, not cached.
    let before = resolver.calls.load(Ordering::SeqCst);
    for _ in 0..2 {
        let l = f.lookup_for("audit_log", "broken").await.unwrap();
        assert_eq!(l.state, FlagState::On);
        assert!(l.tenant_error.as_deref().unwrap().contains("unreachable"));
    }
    assert_eq!(resolver.calls.load(Ordering::SeqCst), before + 2);

    // Tenant lookups of unknown flags are errors too.
    assert!(
        f.lookup_for("nope", "acme")
            .await
            .unwrap_err()
            .is_unknown_flag()
    );
}

#[tokio::test]
async fn tenant_override_respects_dependencies() {
    let resolver = Arc::new(TableResolver::default());
    resolver
        .table
        .lock()
        .unwrap()
        .insert(("acme".into(), "semantic_cache".into()), FlagSetting::On);
    let f = FeatureFlags::new(
        descriptors(),
        FlagsConfig::default(),
        Some(resolver as Arc<dyn TenantFlagResolver>),
    )
    .unwrap();
    let l = f.lookup_for("semantic_cache", "acme").await.unwrap();
    assert_eq!(l.state, FlagState::Off, "vector_recall is off for acme");
    assert_eq!(
        l.source,
        FlagSource::Dependency {
            flag: "vector_recall".into()
        }
    );
}
