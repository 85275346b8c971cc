//! The release checks of `cargo xtask test`: what a user of the published
//! crates meets (`cargo add`, docs.rs, their own compiler, their own tests).
//!
//! - `msrv`: no locked dependency needs a newer compiler than the declared
//!   `rust-version` (README: Minimum supported Rust version).
//! - `docs`: the docs build as docs.rs builds them (nightly, all features,
//!   `--cfg docsrs`), with warnings, missing docs and broken intra-doc links
//!   denied.
//! - `package`: `cargo package` on every published crate, which builds each
//!   from its tarball against the others' packaged versions.
//! - `downstream`: `examples/downstream`, a crate outside the workspace that
//!   depends on the crates by registry version, tested against the packages
//!   the `package` step left in `target/package/`.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

use crate::{root, run};

/// `cargo metadata` for this workspace, with the lockfile as it is.
fn metadata() -> Result<Value, String> {
    let out = Command::new("cargo")
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(root())
        .output()
        .map_err(|e| format!("could not start `cargo metadata`: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`cargo metadata --locked` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("cargo metadata output: {e}"))
}

/// The workspace members that are published (no `publish = false`).
pub(crate) fn published_crates() -> Result<Vec<String>, String> {
    let meta = metadata()?;
    let members = string_set(&meta["workspace_members"]);
    Ok(meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["id"].as_str().is_some_and(|id| members.contains(&id)))
        .filter(|p| p["publish"].as_array().is_none_or(|r| !r.is_empty()))
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect())
}

fn string_set(v: &Value) -> Vec<&str> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

/// `1.88.0` / `1.88` as `(1, 88, 0)`.
fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let mut parts = v.trim().split('.').map(|p| p.parse::<u64>().ok());
    let major = parts.next()??;
    let minor = parts.next().flatten().unwrap_or(0);
    let patch = parts.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

/// Fails when a locked dependency declares a `rust-version` above ours.
///
/// Every package of the resolved graph counts, for every target platform and
/// every kind of dependency (`cargo metadata` without `--filter-platform`):
/// the MSRV promises that `cargo build` of any crate here works on that
/// compiler with this lockfile. Our own code is held to it by clippy's
/// `incompatible_msrv` lint (std APIs newer than `rust-version`), which runs
/// in the `clippy` step; language features are held to it only when the
/// declared version is the installed stable one (see README).
pub(crate) fn msrv() -> Result<(), String> {
    let meta = metadata()?;
    let members = string_set(&meta["workspace_members"]);
    let packages = meta["packages"].as_array().cloned().unwrap_or_default();
    let declared = packages
        .iter()
        .filter(|p| p["id"].as_str().is_some_and(|id| members.contains(&id)))
        .filter_map(|p| p["rust_version"].as_str())
        .filter_map(|v| parse_version(v).map(|pv| (pv, v.to_owned())))
        .min()
        .ok_or("no workspace member declares a rust-version")?;
    let mut above: Vec<((u64, u64, u64), String)> = packages
        .iter()
        .filter(|p| p["id"].as_str().is_some_and(|id| !members.contains(&id)))
        .filter_map(|p| {
            let rv = p["rust_version"].as_str()?;
            let pv = parse_version(rv)?;
            let who = format!(
                "{} {} (rust-version {rv})",
                p["name"].as_str()?,
                p["version"].as_str()?
            );
            Some((pv, who))
        })
        .filter(|(pv, _)| *pv > declared.0)
        .collect();
    above.sort();
    let highest = packages
        .iter()
        .filter(|p| p["id"].as_str().is_some_and(|id| !members.contains(&id)))
        .filter_map(|p| parse_version(p["rust_version"].as_str()?))
        .max();
    println!(
        "declared rust-version {}; highest among {} locked packages: {}",
        declared.1,
        packages.len() - members.len(),
        highest.map_or("none".to_owned(), |(a, b, c)| format!("{a}.{b}.{c}"))
    );
    let rustc = Command::new("rustc")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let installed = rustc.split_whitespace().nth(1).and_then(parse_version);
    match installed {
        Some((a, b, _)) if (a, b) == (declared.0.0, declared.0.1) => println!(
            "{rustc} is the declared minor version: this pipeline's build is the MSRV build"
        ),
        _ => println!(
            "{rustc} is newer than the declared version: our own code is held to it by \
             clippy's incompatible_msrv lint only (std APIs, not language features)"
        ),
    }
    if above.is_empty() {
        return Ok(());
    }
    for (_, who) in &above {
        eprintln!("  needs a newer compiler: {who}");
    }
    Err(format!(
        "{} locked package(s) need a compiler newer than rust-version {}: raise \
         `workspace.package.rust-version` (and say so in CHANGELOG.md) or pin them lower \
         with `cargo update -p NAME --precise VERSION`",
        above.len(),
        declared.1
    ))
}

/// The published crates' docs as docs.rs builds them.
pub(crate) fn docs() -> Result<(), String> {
    let crates = published_crates()?;
    let mut args = vec!["+nightly", "doc", "--no-deps", "--all-features", "--locked"];
    for c in &crates {
        args.extend(["-p", c.as_str()]);
    }
    let status = Command::new("cargo")
        .args(&args)
        .env(
            "RUSTDOCFLAGS",
            "--cfg docsrs -D warnings -D missing_docs -D rustdoc::broken_intra_doc_links",
        )
        .current_dir(root())
        .status()
        .map_err(|e| format!("could not start `cargo +nightly doc`: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`cargo {}` failed ({status})", args.join(" ")))
    }
}

/// `cargo package` on every published crate: each is built from its tarball,
/// with its dependencies on the others resolved to their packaged versions.
///
/// Cargo verifies a crate against the others through a temporary local
/// registry whose sources it extracts under `$CARGO_HOME/registry/src/` and
/// never extracts again while the directory is there (its `.cargo-ok`
/// marker): a second run would verify against the *first* run's sources of
/// the other crates. Those extracted copies are removed first. Cargo also
/// takes a registry crate's build as immutable (fingerprinted by name and
/// version, not by its sources), so the verification builds of our crates
/// as registry dependencies are forgotten too.
pub(crate) fn package() -> Result<(), String> {
    let meta = metadata()?;
    let versions = published_versions(&meta);
    remove_extracted_sources(&versions)?;
    if let Some(target) = meta["target_directory"].as_str() {
        forget_registry_builds(&PathBuf::from(target), &versions)?;
    }
    let crates = published_crates()?;
    let mut args = vec!["package", "--locked", "--allow-dirty"];
    for c in &crates {
        args.extend(["-p", c.as_str()]);
    }
    run("cargo", &args)
}

/// Removes `$CARGO_HOME/registry/src/*/<crate>-<version>` of our own
/// crates (left by an earlier `package` run; none of them comes from
/// crates.io here, and a registry's copy would be re-extracted anyway).
fn remove_extracted_sources(crates: &[(String, String)]) -> Result<(), String> {
    let src = crate::cargo_bin_dir()
        .parent()
        .map(|home| home.join("registry").join("src"))
        .ok_or("no cargo home")?;
    let Ok(registries) = std::fs::read_dir(&src) else {
        return Ok(());
    };
    for registry in registries.flatten() {
        for (name, version) in crates {
            let dir = registry.path().join(format!("{name}-{version}"));
            if dir.is_dir() {
                std::fs::remove_dir_all(&dir)
                    .map_err(|e| format!("removing stale {}: {e}", dir.display()))?;
            }
        }
    }
    Ok(())
}

/// Removes the fingerprints of our crates built from a registry source (the
/// package verification's temporary registry): `deps/<crate>-<hash>.d`
/// naming a `registry/src/*/<crate>-<version>/` file marks such a build, and
/// without its `.fingerprint/<crate>-<hash>` cargo rebuilds it.
fn forget_registry_builds(
    target: &std::path::Path,
    crates: &[(String, String)],
) -> Result<(), String> {
    let deps = target.join("debug").join("deps");
    let Ok(entries) = std::fs::read_dir(&deps) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = file.strip_suffix(".d") else {
            continue;
        };
        for (name, version) in crates {
            let Some(hash) = stem.strip_prefix(&format!("{}-", name.replace('-', "_"))) else {
                continue;
            };
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            if text.contains("/registry/src/") && text.contains(&format!("/{name}-{version}/")) {
                let fingerprint = target
                    .join("debug")
                    .join(".fingerprint")
                    .join(format!("{name}-{hash}"));
                if fingerprint.is_dir() {
                    std::fs::remove_dir_all(&fingerprint)
                        .map_err(|e| format!("removing {}: {e}", fingerprint.display()))?;
                }
            }
        }
    }
    Ok(())
}

/// The published crates with their versions.
fn published_versions(meta: &Value) -> Vec<(String, String)> {
    let members = string_set(&meta["workspace_members"]);
    meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["id"].as_str().is_some_and(|id| members.contains(&id)))
        .filter(|p| p["publish"].as_array().is_none_or(|r| !r.is_empty()))
        .filter_map(|p| {
            Some((
                p["name"].as_str()?.to_owned(),
                p["version"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

/// `cargo test` in `examples/downstream` (outside the workspace) against the
/// crates the `package` step verified: each published crate is patched to
/// its `target/package/<crate>-<version>/` directory on the command line, so
/// the example's manifest stays what a user writes (`soma-bus = "0.1"`).
///
/// The example's lockfile is seeded from the workspace's (same versions of
/// every shared dependency) and the build shares the workspace's target
/// directory, so only the example and the packaged soma crates compile.
pub(crate) fn downstream() -> Result<(), String> {
    let meta = metadata()?;
    let target = meta["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .ok_or("cargo metadata names no target directory")?;
    let example = root().join("examples").join("downstream");
    let mut args: Vec<String> = vec!["test".into()];
    for (name, version) in published_versions(&meta) {
        let dir = target.join("package").join(format!("{name}-{version}"));
        if !dir.join("Cargo.toml").exists() {
            return Err(format!(
                "{} is missing: run the package step first \
                 (`cargo xtask test --step package --step downstream`)",
                dir.display()
            ));
        }
        args.push("--config".into());
        args.push(format!(
            "patch.crates-io.{name}.path={:?}",
            dir.display().to_string()
        ));
    }
    std::fs::copy(root().join("Cargo.lock"), example.join("Cargo.lock"))
        .map_err(|e| format!("seeding examples/downstream/Cargo.lock: {e}"))?;
    let status = Command::new("cargo")
        .args(&args)
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(&example)
        .status()
        .map_err(|e| format!("could not start `cargo test` in examples/downstream: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "`cargo test` in examples/downstream failed ({status})"
        ))
    }
}
