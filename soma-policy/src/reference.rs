//! The reference Rego policy this crate ships, as data.

/// The reference authorization policy (`policy/soma.rego`) and its tests
/// (`policy/soma_test.rego`), as shipped with this version of the crate.
///
/// It is a starting point, not a default: it encodes the Soma platform's
/// action table (`conversation.send`, `tool.execute`, `memory.write`,
/// scheduler CRUD, …), denies by default, and answers
/// `data.soma.authz.decision` with `{"allow": bool, "reasons": [string]}`
/// over the [`AuthzInput`](crate::AuthzInput) schema. Copy both files into
/// your service's policy directory (for [`EmbeddedRego::from_dir`] or an OPA
/// sidecar), edit the action table, and keep the tests next to it: `opa test
/// policy/` runs them. Or evaluate it as it is:
///
/// ```
/// # #[cfg(feature = "rego")] {
/// use soma_policy::{EmbeddedRego, PolicyMetrics, reference_policy};
///
/// let policy = reference_policy();
/// let engine = EmbeddedRego::from_sources(
///     &[(policy.file_name, policy.source)],
///     policy.entrypoint,
///     PolicyMetrics::default(),
/// )
/// .expect("the reference policy compiles");
/// # let _ = engine; }
/// ```
///
/// [`EmbeddedRego::from_dir`]: crate::engine::EmbeddedRego::from_dir
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct ReferencePolicy {
    /// The policy's file name, `soma.rego`.
    pub file_name: &'static str,
    /// The policy's Rego source.
    pub source: &'static str,
    /// The tests' file name, `soma_test.rego`.
    pub test_file_name: &'static str,
    /// The tests' Rego source (package `soma.authz_test`, one `test_*` rule
    /// per case).
    pub test_source: &'static str,
    /// The rule to evaluate: `data.soma.authz.decision`.
    pub entrypoint: &'static str,
}

/// The reference policy and its tests; see [`ReferencePolicy`].
pub fn reference_policy() -> ReferencePolicy {
    ReferencePolicy {
        file_name: "soma.rego",
        source: include_str!("../policy/soma.rego"),
        test_file_name: "soma_test.rego",
        test_source: include_str!("../policy/soma_test.rego"),
        entrypoint: "data.soma.authz.decision",
    }
}

#[cfg(test)]
mod tests {
    use super::reference_policy;

    #[test]
    fn names_match_the_sources() {
        let p = reference_policy();
        assert!(p.source.contains("package soma.authz\n"));
        assert!(p.test_source.contains("package soma.authz_test\n"));
        assert!(p.source.contains("decision"));
    }
}
