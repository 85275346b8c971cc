//! File watching (feature `watch`): reload on change, debounced,
//! keep-last-good.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};

use crate::error::ConfigError;
use crate::live::Live;
use crate::loader::Settings;

/// Counters of a running watcher.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchStats {
    /// Reloads attempted (one per debounced burst of file events).
    pub reloads: u64,
    /// Reloads rejected (the last good config stayed).
    pub failures: u64,
    /// The last rejection's message.
    pub last_error: Option<String>,
}

/// Stops watching when dropped.
pub struct WatchHandle {
    watcher: Option<notify::RecommendedWatcher>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<Mutex<WatchStats>>,
}

impl std::fmt::Debug for WatchHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchHandle")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl WatchHandle {
    /// Reload counters so far.
    pub fn stats(&self) -> WatchStats {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        // Dropping the watcher closes the event channel; the thread exits.
        self.watcher.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl<T: Settings> Live<T> {
    /// Watches the loader's files and reloads when one changes.
    ///
    /// Events are debounced: a reload runs once no event has arrived for
    /// `debounce` (editors write a file in several steps). The parent
    /// directories are watched, so replace-by-rename saves and files created
    /// later are seen. A broken edit is rejected like any reload: the last
    /// good config keeps being served, the error is logged at `warn` and
    /// counted in [`WatchHandle::stats`].
    ///
    /// # Errors
    /// [`ConfigError::Watch`] when a directory cannot be watched.
    pub fn watch_files(&self, debounce: Duration) -> Result<WatchHandle, ConfigError> {
        let files: Vec<PathBuf> = self.loader().file_paths();
        let (tx, rx) = mpsc::channel::<()>();
        let names = files.clone();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(event) = res {
                if event
                    .paths
                    .iter()
                    .any(|p| names.iter().any(|f| same_file(p, f)))
                {
                    let _ = tx.send(());
                }
            }
        })
        .map_err(|source| ConfigError::Watch {
            path: PathBuf::new(),
            source,
        })?;
        let mut dirs: Vec<PathBuf> = files
            .iter()
            .map(|f| {
                f.parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(std::path::Path::new("."))
                    .to_owned()
            })
            .collect();
        dirs.sort();
        dirs.dedup();
        for dir in &dirs {
            watcher
                .watch(dir, RecursiveMode::NonRecursive)
                .map_err(|source| ConfigError::Watch {
                    path: dir.clone(),
                    source,
                })?;
        }
        let stats = Arc::new(Mutex::new(WatchStats::default()));
        let live = self.clone();
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("soma-config-watch".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    // Debounce: wait for a quiet period.
                    loop {
                        match rx.recv_timeout(debounce) {
                            Ok(()) => continue,
                            Err(mpsc::RecvTimeoutError::Timeout) => break,
                            Err(mpsc::RecvTimeoutError::Disconnected) => return,
                        }
                    }
                    // Counted before the reload publishes: whoever sees
                    // the new settings sees the reload counted too.
                    thread_stats
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .reloads += 1;
                    if let Err(e) = live.reload() {
                        let mut s = thread_stats.lock().unwrap_or_else(|p| p.into_inner());
                        s.failures += 1;
                        s.last_error = Some(e.to_string());
                    }
                }
            })
            .map_err(|e| ConfigError::Watch {
                path: PathBuf::new(),
                source: notify::Error::io(e),
            })?;
        Ok(WatchHandle {
            watcher: Some(watcher),
            thread: Some(thread),
            stats,
        })
    }
}

fn same_file(event_path: &std::path::Path, file: &std::path::Path) -> bool {
    event_path == file || (file.file_name().is_some() && event_path.file_name() == file.file_name())
}
