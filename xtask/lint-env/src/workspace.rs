//! Reads Cargo manifests: finds the workspace root, its members (globs,
//! `exclude`, path dependencies), each package's source files and
//! dependency renames. No `cargo` subprocess is needed.

use std::collections::{BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};

use globset::GlobBuilder;
use walkdir::WalkDir;

use crate::LintError;
use crate::config::Config;

/// A package to lint.
#[derive(Debug, Clone)]
pub(crate) struct Package {
    pub(crate) name: String,
    pub(crate) dir: PathBuf,
    /// Extern crate name -> real crate name (both with `_`), from
    /// `dep = { package = "real" }`.
    pub(crate) renames: HashMap<String, String>,
}

/// The loaded workspace.
#[derive(Debug)]
pub(crate) struct Workspace {
    pub(crate) root: PathBuf,
    pub(crate) packages: Vec<Package>,
    pub(crate) config: Config,
}

fn read_manifest(path: &Path) -> Result<toml::Table, LintError> {
    let text = std::fs::read_to_string(path).map_err(|source| LintError::ManifestRead {
        path: path.to_path_buf(),
        source,
    })?;
    text.parse::<toml::Table>()
        .map_err(|e| LintError::ManifestParse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// Lexically normalizes `a/./b/../c` to `a/c`.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

fn absolute(path: &Path) -> Result<PathBuf, LintError> {
    let p = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|source| LintError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .join(path)
    };
    Ok(normalize(&p))
}

/// The manifest a path names: `Cargo.toml` itself, or a directory holding
/// one.
pub(crate) fn manifest_of(path: &Path) -> Result<PathBuf, LintError> {
    let path = absolute(path)?;
    let manifest = if path.is_dir() {
        path.join("Cargo.toml")
    } else {
        path
    };
    if !manifest.is_file() {
        return Err(LintError::ManifestNotFound { path: manifest });
    }
    Ok(manifest)
}

/// The nearest `Cargo.toml` at or above `dir` (what cargo uses without
/// `--manifest-path`).
pub(crate) fn discover(dir: &Path) -> Result<PathBuf, LintError> {
    let dir = absolute(dir)?;
    dir.ancestors()
        .map(|d| d.join("Cargo.toml"))
        .find(|m| m.is_file())
        .ok_or(LintError::ManifestNotFound {
            path: dir.join("Cargo.toml"),
        })
}

fn lint_table<'a>(manifest: &'a toml::Table, section: &str) -> Option<&'a toml::Value> {
    manifest.get(section)?.get("metadata")?.get("lint-env")
}

fn config_from(manifest: &toml::Table, section: &str, path: &Path) -> Result<Config, LintError> {
    match lint_table(manifest, section) {
        None => Ok(Config::default()),
        Some(toml::Value::Table(t)) => Config::from_table(
            t,
            &format!("{}: [{section}.metadata.lint-env]", path.display()),
        ),
        Some(_) => Err(LintError::InvalidConfig {
            source_name: path.display().to_string(),
            key: format!("{section}.metadata.lint-env"),
            message: "expected a table".to_string(),
        }),
    }
}

fn strings(v: Option<&toml::Value>, key: &str, path: &Path) -> Result<Vec<String>, LintError> {
    match v {
        None => Ok(Vec::new()),
        Some(toml::Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| LintError::ManifestParse {
                        path: path.to_path_buf(),
                        message: format!("`{key}` must be an array of strings"),
                    })
            })
            .collect(),
        Some(_) => Err(LintError::ManifestParse {
            path: path.to_path_buf(),
            message: format!("`{key}` must be an array of strings"),
        }),
    }
}

fn package_name(manifest: &toml::Table, path: &Path) -> Result<String, LintError> {
    manifest
        .get("package")
        .and_then(|p| p.get("name"))
        .and_then(|n| n.as_str())
        .map(str::to_string)
        .ok_or_else(|| LintError::ManifestParse {
            path: path.to_path_buf(),
            message: "[package] has no `name`".to_string(),
        })
}

/// All dependency tables of a manifest, including `[target.'cfg'.*]`.
fn dependency_tables(manifest: &toml::Table) -> Vec<&toml::Table> {
    const KINDS: [&str; 3] = ["dependencies", "dev-dependencies", "build-dependencies"];
    let mut out = Vec::new();
    for k in KINDS {
        if let Some(t) = manifest.get(k).and_then(|v| v.as_table()) {
            out.push(t);
        }
    }
    if let Some(targets) = manifest.get("target").and_then(|v| v.as_table()) {
        for t in targets.values() {
            for k in KINDS {
                if let Some(d) = t.get(k).and_then(|v| v.as_table()) {
                    out.push(d);
                }
            }
        }
    }
    out
}

struct Dep {
    name: String,
    package: Option<String>,
    /// Absolute path for path dependencies.
    path: Option<PathBuf>,
}

fn dependencies(
    manifest: &toml::Table,
    dir: &Path,
    root: Option<(&toml::Table, &Path)>,
) -> Vec<Dep> {
    let ws_deps = root.and_then(|(m, _)| m.get("workspace")?.get("dependencies")?.as_table());
    let mut out = Vec::new();
    for table in dependency_tables(manifest) {
        for (name, spec) in table {
            let mut dep = Dep {
                name: name.clone(),
                package: None,
                path: None,
            };
            if let Some(spec) = spec.as_table() {
                dep.package = spec
                    .get("package")
                    .and_then(|v| v.as_str())
                    .map(str::to_string);
                if let Some(p) = spec.get("path").and_then(|v| v.as_str()) {
                    dep.path = Some(normalize(&dir.join(p)));
                }
                if spec.get("workspace").and_then(|v| v.as_bool()) == Some(true) {
                    if let (Some(ws), Some((_, root_dir))) = (ws_deps, root) {
                        if let Some(w) = ws.get(name).and_then(|v| v.as_table()) {
                            if dep.package.is_none() {
                                dep.package = w
                                    .get("package")
                                    .and_then(|v| v.as_str())
                                    .map(str::to_string);
                            }
                            if let Some(p) = w.get("path").and_then(|v| v.as_str()) {
                                dep.path = Some(normalize(&root_dir.join(p)));
                            }
                        }
                    }
                }
            }
            out.push(dep);
        }
    }
    out
}

fn renames(deps: &[Dep]) -> HashMap<String, String> {
    deps.iter()
        .filter_map(|d| {
            let real = d.package.as_ref()?;
            Some((d.name.replace('-', "_"), real.replace('-', "_")))
        })
        .collect()
}

fn is_glob(p: &str) -> bool {
    p.contains(['*', '?', '[', '{'])
}

/// Directories to skip while walking: hidden ones and cargo target dirs.
fn skip_dir(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name.starts_with('.') {
        return true;
    }
    if path.join("CACHEDIR.TAG").is_file() {
        return true;
    }
    // `target` next to a manifest is cargo's build directory.
    name == "target"
        && path
            .parent()
            .is_some_and(|p| p.join("Cargo.toml").is_file())
}

/// Expands the `members` globs of a workspace.
fn expand_glob(root: &Path, pattern: &str) -> Result<Vec<PathBuf>, LintError> {
    let glob = GlobBuilder::new(pattern.trim_start_matches("./").trim_end_matches('/'))
        .literal_separator(true)
        .build()
        .map_err(|e| LintError::InvalidGlob {
            pattern: pattern.to_string(),
            message: e.kind().to_string(),
        })?
        .compile_matcher();
    let mut out = Vec::new();
    let walker = WalkDir::new(root)
        .min_depth(1)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| e.file_type().is_dir() && !skip_dir(e.path()));
    for entry in walker.flatten() {
        let rel = entry.path().strip_prefix(root).unwrap_or(entry.path());
        if glob.is_match(rel) && entry.path().join("Cargo.toml").is_file() {
            out.push(entry.path().to_path_buf());
        }
    }
    Ok(out)
}

/// Member directories of the workspace rooted at `root`.
fn member_dirs(
    root: &Path,
    manifest: &toml::Table,
    manifest_path: &Path,
) -> Result<Vec<PathBuf>, LintError> {
    let ws = manifest.get("workspace");
    let members = strings(
        ws.and_then(|w| w.get("members")),
        "workspace.members",
        manifest_path,
    )?;
    let exclude: Vec<PathBuf> = strings(
        ws.and_then(|w| w.get("exclude")),
        "workspace.exclude",
        manifest_path,
    )?
    .iter()
    .map(|e| normalize(&root.join(e)))
    .collect();
    let excluded = |d: &Path| exclude.iter().any(|e| d.starts_with(e));

    let mut found: BTreeSet<PathBuf> = BTreeSet::new();
    let mut queue: Vec<PathBuf> = Vec::new();
    if manifest.contains_key("package") {
        queue.push(root.to_path_buf());
    }
    for m in &members {
        if is_glob(m) {
            queue.extend(expand_glob(root, m)?.into_iter().filter(|d| !excluded(d)));
        } else {
            let dir = normalize(&root.join(m));
            if !dir.join("Cargo.toml").is_file() {
                return Err(LintError::ManifestNotFound {
                    path: dir.join("Cargo.toml"),
                });
            }
            queue.push(dir);
        }
    }
    // Path dependencies inside the workspace are members too (cargo's rule).
    while let Some(dir) = queue.pop() {
        if !found.insert(dir.clone()) {
            continue;
        }
        let path = dir.join("Cargo.toml");
        let m = read_manifest(&path)?;
        for dep in dependencies(&m, &dir, Some((manifest, root))) {
            if let Some(p) = dep.path {
                if p.starts_with(root)
                    && !excluded(&p)
                    && p.join("Cargo.toml").is_file()
                    && !found.contains(&p)
                {
                    queue.push(p);
                }
            }
        }
    }
    Ok(found.into_iter().collect())
}

/// Is `dir` a member of the workspace whose root manifest is `root_manifest`?
fn is_member(dir: &Path, root_manifest: &Path) -> Result<bool, LintError> {
    let root = root_manifest.parent().unwrap_or(Path::new("/"));
    let m = read_manifest(root_manifest)?;
    if !m.contains_key("workspace") {
        return Ok(false);
    }
    Ok(member_dirs(root, &m, root_manifest)?
        .iter()
        .any(|d| d == dir))
}

/// Loads the workspace a manifest belongs to. A workspace root lints all
/// members; a member (or stand-alone package) manifest lints that package,
/// with the allowlist of its workspace root.
pub(crate) fn load(manifest_path: &Path) -> Result<Workspace, LintError> {
    let manifest_path = manifest_of(manifest_path)?;
    let dir = manifest_path
        .parent()
        .unwrap_or(Path::new("/"))
        .to_path_buf();
    let manifest = read_manifest(&manifest_path)?;
    if manifest.contains_key("workspace") {
        return load_root(dir, &manifest, &manifest_path);
    }
    if !manifest.contains_key("package") {
        return Err(LintError::ManifestParse {
            path: manifest_path,
            message: "neither [package] nor [workspace] found".to_string(),
        });
    }
    load_package(dir, &manifest, &manifest_path)
}

/// The package a manifest `m` in `dir` declares; `root` is its workspace
/// root's manifest and directory, if it has one.
fn package_of(
    m: &toml::Table,
    dir: &Path,
    root: Option<(&toml::Table, &Path)>,
    path: &Path,
) -> Result<Package, LintError> {
    Ok(Package {
        name: package_name(m, path)?,
        dir: dir.to_path_buf(),
        renames: renames(&dependencies(m, dir, root)),
    })
}

/// A workspace root's manifest: every member, with the root's allowlist.
fn load_root(
    dir: PathBuf,
    manifest: &toml::Table,
    manifest_path: &Path,
) -> Result<Workspace, LintError> {
    let config = config_from(manifest, "workspace", manifest_path)?;
    let mut packages = Vec::new();
    for d in member_dirs(&dir, manifest, manifest_path)? {
        let path = d.join("Cargo.toml");
        let m = if d == dir {
            manifest.clone()
        } else {
            read_manifest(&path)?
        };
        packages.push(package_of(&m, &d, Some((manifest, &dir)), &path)?);
    }
    Ok(Workspace {
        root: dir,
        packages,
        config,
    })
}

/// A package's manifest: that package, with the allowlist of the
/// workspace it belongs to, or its own when it belongs to none.
fn load_package(
    dir: PathBuf,
    manifest: &toml::Table,
    manifest_path: &Path,
) -> Result<Workspace, LintError> {
    match root_manifest_of(&dir, manifest)? {
        Some(rm) => {
            let root = rm.parent().unwrap_or(Path::new("/")).to_path_buf();
            let rmanifest = read_manifest(&rm)?;
            let config = config_from(&rmanifest, "workspace", &rm)?;
            let package = package_of(manifest, &dir, Some((&rmanifest, &root)), manifest_path)?;
            Ok(Workspace {
                root,
                packages: vec![package],
                config,
            })
        }
        None => {
            let config = config_from(manifest, "package", manifest_path)?;
            let package = package_of(manifest, &dir, None, manifest_path)?;
            Ok(Workspace {
                root: dir,
                packages: vec![package],
                config,
            })
        }
    }
}

/// The root manifest of the workspace the package in `dir` belongs to,
/// found the way cargo does: `package.workspace` when given, else the
/// nearest ancestor manifest that lists it as a member.
fn root_manifest_of(dir: &Path, manifest: &toml::Table) -> Result<Option<PathBuf>, LintError> {
    let explicit = manifest
        .get("package")
        .and_then(|p| p.get("workspace"))
        .and_then(|w| w.as_str())
        .map(|w| normalize(&dir.join(w)).join("Cargo.toml"));
    if explicit.is_some() {
        return Ok(explicit);
    }
    for anc in dir.ancestors().skip(1) {
        let cand = anc.join("Cargo.toml");
        if cand.is_file() && is_member(dir, &cand)? {
            return Ok(Some(cand));
        }
    }
    Ok(None)
}

/// The `.rs` files of a package: everything under its directory except
/// hidden and target directories and nested packages (directories with
/// their own `Cargo.toml`, which are other members or not ours).
pub(crate) fn package_files(dir: &Path) -> Result<Vec<PathBuf>, LintError> {
    let mut out = Vec::new();
    let walker = WalkDir::new(dir)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| {
            e.depth() == 0
                || !e.file_type().is_dir()
                || !(skip_dir(e.path()) || e.path().join("Cargo.toml").is_file())
        });
    for entry in walker {
        let entry = entry.map_err(|e| LintError::Io {
            path: e
                .path()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| dir.to_path_buf()),
            source: e
                .into_io_error()
                .unwrap_or_else(|| std::io::Error::other("filesystem loop")),
        })?;
        if entry.file_type().is_file() && entry.path().extension().is_some_and(|x| x == "rs") {
            out.push(entry.path().to_path_buf());
        }
    }
    Ok(out)
}

/// `path` relative to `root`, `/`-separated.
pub(crate) fn relative(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}
