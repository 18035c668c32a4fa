//! The manifests source: a file or a directory of Kubernetes manifests, watched live.
//!
//! This is kxp's embedded default source (no API server needed): what `kubectl apply -f`
//! would read, kept in force as the files change. Files are read as
//! [`crate::manifest`] reads them (a directory: its `*.yaml`, `*.yml` and `*.json` files,
//! in name order, not recursive), except that hidden files (names starting with `.`) are
//! skipped: editors' swap and lock files, and the `..data` entries of ConfigMap volumes.
//!
//! # Per-file last good content
//!
//! Every file keeps the content last loaded from it. When a file's new content does not
//! load cleanly (a YAML syntax error, a document that does not decode, an unreadable
//! file), the file's *last good content* (that of its last clean load) stays in force and
//! the view's `errors` carry the new problems plus one line naming the file and saying
//! `keeping last good content`. A file that never loaded cleanly contributes whatever of
//! it loads, as `kxp replay` would. A removed file drops its objects. If the watched path
//! itself cannot be read (removed directory, permissions), every file keeps its content
//! and the view says so: a glitch of the mount must not empty the service table.
//!
//! # Noticing changes
//!
//! Changes are noticed two ways:
//!
//! * **`notify`** (inotify on Linux): the de-facto standard file-watching crate in Rust
//!   (cargo-watch, rust-analyzer, deno, mdBook build on it), maintained, small on Linux
//!   (inotify + libc), and it takes care of inotify's corner cases (queue overflow, watch
//!   descriptors). An event wakes the watch thread, which waits a short settle time to
//!   absorb the rest of a burst (an editor's write-rename-chmod) and rescans.
//! * **A periodic rescan** (every second by default), because events can be lost: the
//!   inotify queue can overflow, a ConfigMap volume swaps a symlink (`..data`) rather than
//!   writing the files, network filesystems send no events at all. A rescan compares every
//!   file's modification time, length and a hash of its content with the last load, so a
//!   same-size rewrite within one mtime tick is still seen.
//!
//! A file modified less than the settle time ago is left for the next rescan (one settle
//! time later), so that a file being rewritten in place is not read half written, or
//! empty.
//!
//! A rescan that changed anything sends the merged view of all files as
//! [`SourceEvent::View`]; the first view is sent as soon as the thread starts, whatever it
//! holds. The channel is a `std::sync::mpsc` channel: unbounded, so the watcher never
//! blocks on a slow controller (views are level-triggered: the controller coalesces them).

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::hash::Hasher;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};

use super::{SourceEvent, SourceView};
use crate::error::ConfigError;
use crate::manifest::ManifestSet;

/// How often the files are rescanned when no event arrives.
pub const DEFAULT_RESCAN_INTERVAL: Duration = Duration::from_secs(1);
/// How long after a filesystem event the watcher waits for the rest of a burst.
pub const DEFAULT_SETTLE: Duration = Duration::from_millis(20);

/// The message naming a file whose new content is not used.
pub const KEEPING_LAST_GOOD: &str = "keeping last good content";

/// What to watch and how.
#[derive(Debug, Clone)]
pub struct ManifestWatchConfig {
    /// A manifest file, or a directory of them.
    pub path: PathBuf,
    /// Rescan period (the fallback for lost events).
    pub rescan_interval: Duration,
    /// Wait after an event before rescanning, to absorb a burst. Also the age a file's
    /// modification time must reach before its content is taken (see
    /// [`ManifestFiles::with_min_age`]).
    pub settle: Duration,
}

impl ManifestWatchConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            rescan_interval: DEFAULT_RESCAN_INTERVAL,
            settle: DEFAULT_SETTLE,
        }
    }
}

/// What a file looked like when it was last read. `None` for a file that could not be read
/// (it is retried on every rescan).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    mtime: Option<SystemTime>,
    len: u64,
    hash: u64,
}

/// A file's objects as the view hands them on: shared, so that a view costs a pointer
/// copy per object and the controller can tell unchanged objects by pointer.
#[derive(Debug, Default)]
struct LiveContent {
    services: Vec<Arc<Service>>,
    slices: Vec<Arc<EndpointSlice>>,
    notices: Vec<String>,
}

impl LiveContent {
    /// The content of a new load; objects equal to the one at the same place in the
    /// previous content keep its `Arc` (an edit of one object among many changes one).
    fn new(set: ManifestSet, previous: Option<&LiveContent>) -> Self {
        fn keep<T: PartialEq>(new: Vec<T>, old: Option<&Vec<Arc<T>>>) -> Vec<Arc<T>> {
            new.into_iter()
                .enumerate()
                .map(|(i, o)| match old.and_then(|old| old.get(i)) {
                    Some(prev) if **prev == o => Arc::clone(prev),
                    _ => Arc::new(o),
                })
                .collect()
        }
        Self {
            services: keep(set.services, previous.map(|p| &p.services)),
            slices: keep(set.slices, previous.map(|p| &p.slices)),
            notices: set.notices,
        }
    }
}

#[derive(Debug)]
struct FileState {
    fingerprint: Option<Fingerprint>,
    /// The content in force.
    live: LiveContent,
    /// Whether `live` came from a clean load (then a broken version never replaces it).
    clean: bool,
    /// Problems with the file's current content.
    errors: Vec<ConfigError>,
}

/// The files under a manifests path and the content in force for each: the watcher's
/// state, usable on its own (`kxp sync --once`, tests) by calling [`ManifestFiles::rescan`].
#[derive(Debug)]
pub struct ManifestFiles {
    root: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// The watched path itself could not be read.
    root_error: Option<ConfigError>,
    min_age: Duration,
    /// The last rescan skipped a file modified less than `min_age` ago.
    unsettled: bool,
}

impl ManifestFiles {
    /// Nothing is read until the first [`rescan`](Self::rescan).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self::with_min_age(root, Duration::ZERO)
    }

    /// Like [`new`](Self::new), but a file whose modification time is less than `min_age`
    /// old is left as it was until a later rescan ([`unsettled`](Self::unsettled) says
    /// so): a file being written in place (truncated, then written) is not read half
    /// written, in particular not read empty, which would withdraw its services for a
    /// moment and purge their flows.
    pub fn with_min_age(root: impl Into<PathBuf>, min_age: Duration) -> Self {
        Self {
            root: root.into(),
            files: BTreeMap::new(),
            root_error: None,
            min_age,
            unsettled: false,
        }
    }

    /// Whether the last rescan left a file that was modified too recently for later.
    pub fn unsettled(&self) -> bool {
        self.unsettled
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The files currently contributing, in name order.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.keys().map(PathBuf::as_path)
    }

    /// Reads the path again; returns true when the view changed (content, errors or the
    /// set of files).
    pub fn rescan(&mut self) -> bool {
        self.unsettled = false;
        let paths = match self.list() {
            Ok(paths) => paths,
            Err(e) => {
                let e = ConfigError::io(
                    self.root.display().to_string(),
                    format!("{}; {KEEPING_LAST_GOOD} of every file", e.message()),
                );
                let changed = self.root_error.as_ref() != Some(&e);
                self.root_error = Some(e);
                return changed;
            }
        };
        let mut changed = self.root_error.take().is_some();
        let before = self.files.len();
        self.files.retain(|p, _| paths.binary_search(p).is_ok());
        changed |= self.files.len() != before;
        for p in paths {
            changed |= self.refresh(p);
        }
        changed
    }

    /// The merged view of every file, in name order.
    pub fn view(&self) -> SourceView {
        let mut view = SourceView::default();
        view.errors.extend(self.root_error.iter().cloned());
        for state in self.files.values() {
            view.services
                .extend(state.live.services.iter().map(Arc::clone));
            view.slices.extend(state.live.slices.iter().map(Arc::clone));
            view.notices.extend(state.live.notices.iter().cloned());
            view.errors.extend(state.errors.iter().cloned());
        }
        view
    }

    /// The manifest files under the root, sorted.
    fn list(&self) -> Result<Vec<PathBuf>, ConfigError> {
        let shown = || self.root.display().to_string();
        let meta = std::fs::metadata(&self.root).map_err(|e| ConfigError::io(shown(), e))?;
        if !meta.is_dir() {
            return Ok(vec![self.root.clone()]);
        }
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(|e| ConfigError::io(shown(), e))? {
            let entry = entry.map_err(|e| ConfigError::io(shown(), e))?;
            let p = entry.path();
            let hidden = entry.file_name().to_string_lossy().starts_with('.');
            let wanted = p
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
            // is_file follows symlinks (ConfigMap volumes are symlinks into ..data).
            if wanted && !hidden && p.is_file() {
                files.push(p);
            }
        }
        files.sort();
        Ok(files)
    }

    /// Re-reads one file if it changed; returns true when its contribution or its errors
    /// changed.
    fn refresh(&mut self, path: PathBuf) -> bool {
        let shown = path.display().to_string();
        let read = std::fs::metadata(&path).and_then(|m| {
            let bytes = std::fs::read(&path)?;
            Ok((m, bytes))
        });
        let (meta, bytes) = match read {
            Ok(r) => r,
            // Gone between the listing and the read: removed.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return self.files.remove(&path).is_some();
            }
            Err(e) => {
                let errors = vec![ConfigError::io(&shown, format!("{e}; {KEEPING_LAST_GOOD}"))];
                let state = self.files.entry(path).or_insert_with(|| FileState {
                    fingerprint: None,
                    live: LiveContent::default(),
                    clean: false,
                    errors: Vec::new(),
                });
                let changed = state.fingerprint.is_some() || state.errors != errors;
                state.fingerprint = None;
                state.errors = errors;
                return changed;
            }
        };
        let too_young = meta
            .modified()
            .ok()
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .is_some_and(|age| age < self.min_age);
        if too_young {
            self.unsettled = true;
            return false;
        }
        let mut hasher = DefaultHasher::new();
        hasher.write(&bytes);
        let fingerprint = Fingerprint {
            mtime: meta.modified().ok(),
            len: bytes.len() as u64,
            hash: hasher.finish(),
        };
        let previous = self.files.get(&path);
        if previous.is_some_and(|s| s.fingerprint == Some(fingerprint)) {
            return false;
        }

        let mut set = ManifestSet::new();
        match String::from_utf8(bytes) {
            Ok(text) if path.extension().is_some_and(|e| e == "json") => {
                set.add_json(&text, &shown)
            }
            Ok(text) => set.add_yaml(&text, &shown),
            Err(e) => set.errors.push(ConfigError::syntax(&shown, e.to_string())),
        }
        let mut errors = std::mem::take(&mut set.errors);
        let state = match self.files.remove(&path) {
            Some(prev) if prev.clean && !errors.is_empty() => {
                let n = errors.len();
                errors.push(ConfigError::syntax(
                    &shown,
                    format!(
                        "{n} error{} in the new content; {KEEPING_LAST_GOOD}",
                        if n == 1 { "" } else { "s" }
                    ),
                ));
                FileState {
                    fingerprint: Some(fingerprint),
                    live: prev.live,
                    clean: true,
                    errors,
                }
            }
            prev => FileState {
                fingerprint: Some(fingerprint),
                clean: errors.is_empty(),
                live: LiveContent::new(set, prev.as_ref().map(|p| &p.live)),
                errors,
            },
        };
        self.files.insert(path, state);
        true
    }
}

#[derive(Debug)]
enum Wake {
    Fs,
    Stop,
}

/// A running manifests watch: a thread sending [`SourceEvent::View`]s. Stopping (or
/// dropping) it stops and joins the thread.
#[derive(Debug)]
pub struct ManifestWatch {
    wake: Sender<Wake>,
    thread: Option<JoinHandle<()>>,
    watcher: Option<RecommendedWatcher>,
}

impl ManifestWatch {
    /// Starts watching `config.path`, sending views to `events`. The filesystem watch is
    /// set up before the first scan, so no change after this returns is missed; if it
    /// cannot be set up (no inotify instances left, say), the periodic rescan still runs
    /// and a warning is logged. The thread ends when stopped or when `events` is closed.
    pub fn spawn(config: ManifestWatchConfig, events: Sender<SourceEvent>) -> io::Result<Self> {
        let (wake_tx, wake_rx) = mpsc::channel();
        let watcher = start_watcher(&config.path, wake_tx.clone());
        let thread = std::thread::Builder::new()
            .name("kxp-manifest-watch".into())
            .spawn(move || watch_loop(config, events, wake_rx))?;
        Ok(Self {
            wake: wake_tx,
            thread: Some(thread),
            watcher,
        })
    }

    /// Whether a filesystem watch is active (else only the periodic rescan runs).
    pub fn has_fs_watch(&self) -> bool {
        self.watcher.is_some()
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.watcher = None;
        let _ = self.wake.send(Wake::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ManifestWatch {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Watches the directory (or the directory holding the file: editors and ConfigMap
/// volumes replace files by renaming, which a watch on the file itself would miss).
fn start_watcher(path: &Path, wake: Sender<Wake>) -> Option<RecommendedWatcher> {
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else {
        match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    };
    let handler = move |res: notify::Result<notify::Event>| {
        let relevant = match res {
            // Our own reads open and close the files: not changes.
            Ok(ev) => !matches!(
                ev.kind,
                EventKind::Access(AccessKind::Open(_) | AccessKind::Read | AccessKind::Other)
                    | EventKind::Access(AccessKind::Close(
                        AccessMode::Read | AccessMode::Execute | AccessMode::Any
                    ))
                    | EventKind::Access(AccessKind::Any)
            ),
            // An error (queue overflow): rescan to be sure.
            Err(_) => true,
        };
        if relevant {
            let _ = wake.send(Wake::Fs);
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch manifests; rescanning periodically only");
            return None;
        }
    };
    match watcher.watch(&dir, RecursiveMode::NonRecursive) {
        Ok(()) => Some(watcher),
        Err(e) => {
            tracing::warn!(
                path = %dir.display(), error = %e,
                "cannot watch manifests; rescanning periodically only"
            );
            None
        }
    }
}

fn watch_loop(
    config: ManifestWatchConfig,
    events: Sender<SourceEvent>,
    wake: mpsc::Receiver<Wake>,
) {
    let mut files = ManifestFiles::with_min_age(&config.path, config.settle);
    files.rescan();
    if events.send(SourceEvent::View(files.view())).is_err() {
        return;
    }
    loop {
        let wait = if files.unsettled() {
            config.settle
        } else {
            config.rescan_interval
        };
        match wake.recv_timeout(wait) {
            Ok(Wake::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Ok(Wake::Fs) => {
                // Absorb the rest of the burst, for at most `settle`.
                let deadline = Instant::now() + config.settle;
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match wake.recv_timeout(left) {
                        Ok(Wake::Fs) => continue,
                        Ok(Wake::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                        Err(RecvTimeoutError::Timeout) => break,
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        if files.rescan() {
            let view = files.view();
            tracing::debug!(
                path = %config.path.display(),
                services = view.services.len(),
                slices = view.slices.len(),
                errors = view.errors.len(),
                "manifests changed"
            );
            if events.send(SourceEvent::View(view)).is_err() {
                return;
            }
        }
    }
}
