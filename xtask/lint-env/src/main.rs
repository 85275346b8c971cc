//! `soma-lint-env [--manifest-path PATH] [--format text|json]`: the linter
//! without an xtask. See the crate README.

fn main() {
    std::process::exit(soma_lint_env::cli(std::env::args().skip(1)));
}
