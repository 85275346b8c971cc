//! Which external paths touch the process environment: the one list both
//! the resolver (to follow glob imports of them) and the walk (to report
//! them) read.

use crate::report::Rule;

/// Functions of `std::env` that read the process environment.
const READS: [&str; 4] = ["var", "var_os", "vars", "vars_os"];
/// Functions of `std::env` that change it.
const WRITES: [&str; 2] = ["set_var", "remove_var"];
/// Crates whose functions load `.env` files into the process environment.
const DOTENV_CRATES: [&str; 2] = ["dotenv", "dotenvy"];

/// Is this external path something the linter reports (or needs to follow
/// through a glob import)?
pub(crate) fn is_interesting(p: &[String]) -> bool {
    classify(p).is_some() || matches!(p, [k, e] if k == "std" && e == "env")
}

/// The rule an external path breaks, if any.
pub(crate) fn classify(path: &[String]) -> Option<Rule> {
    match path {
        [krate, env, f] if krate == "std" && env == "env" => {
            if READS.contains(&f.as_str()) {
                Some(Rule::EnvRead)
            } else if WRITES.contains(&f.as_str()) {
                Some(Rule::EnvWrite)
            } else {
                None
            }
        }
        [krate, _, ..] if DOTENV_CRATES.contains(&krate.as_str()) => Some(Rule::Dotenv),
        _ => None,
    }
}
