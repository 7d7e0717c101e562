//! The `file` source: a services file, or a directory of `*.toml` services
//! files, watched with `notify` and re-read on change and on SIGHUP.
//!
//! Only files whose content changed are parsed (one file per service keeps
//! a change cheap at 100k endpoints): events that cannot change content
//! (opens, reads) are ignored, a file is read once its writer is done
//! (see [`file_watch`](super::file_watch)), and a re-read whose size and
//! hash are those of the last read is skipped. Reads and parses run off
//! the async runtime (`spawn_blocking`). A file that fails to parse or
//! validate (an empty or cut file among them: a file that means "no
//! services" says `service = []`) keeps its last good services in force;
//! the error is logged with its position and counted in
//! `beacon_config_reloads_total{result="error"}`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{self, ConfigErrors, ServiceDefaults, ServicesIndex};
use crate::model::{ServiceKey, ServiceSpec, SourceId};
use crate::registry::{self, Update};

use super::file_watch::{Pending, Seen, classify};
use super::{Source, SourceError, SourceFuture, count_error};

/// Quiet time after the last file event before re-reading.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// Longest wait under a stream of events.
const DEBOUNCE_MAX: Duration = Duration::from_millis(250);

/// What a file held when it was last read: a re-read with the same length
/// and hash changes nothing and is skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    hash: u64,
}

impl Stamp {
    fn of(bytes: &[u8]) -> Self {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut h);
        Stamp {
            len: bytes.len() as u64,
            hash: h.finish(),
        }
    }
}

/// One read of one file.
enum Read {
    /// Gone (removed or renamed away).
    Gone,
    /// Same content as the last read.
    Unchanged,
    /// Changed while it was read: read again once it is quiet.
    Moving,
    /// Its text and stamp.
    Text(String, Stamp),
    /// It cannot be read (or is not UTF-8).
    Unreadable(ConfigErrors),
}

pub struct FileSource {
    id: SourceId,
    path: PathBuf,
    defaults: ServiceDefaults,
    /// `path` is a directory of `*.toml` files (else one file).
    dir_mode: bool,
    files: BTreeMap<PathBuf, Vec<ServiceSpec>>,
    stamps: HashMap<PathBuf, Stamp>,
    index: ServicesIndex,
}

impl FileSource {
    /// Reads `path` once. A missing path starts empty (with a warning) and
    /// is picked up when it appears; a broken file is an error.
    pub fn load(path: &Path, defaults: ServiceDefaults) -> Result<Self, ConfigErrors> {
        let mut me = Self {
            id: format!("file:{}", path.display()).into(),
            path: path.to_path_buf(),
            defaults,
            dir_mode: path.is_dir(),
            files: BTreeMap::new(),
            stamps: HashMap::new(),
            index: ServicesIndex::default(),
        };
        if !me.path.exists() {
            tracing::warn!(path = %me.path.display(), "services path does not exist yet; serving no services from it until it appears");
            return Ok(me);
        }
        me.files = config::load_services_path(&me.path, &me.defaults, &mut me.index)?;
        for file in me.files.keys() {
            if let Ok(bytes) = std::fs::read(file) {
                me.stamps.insert(file.clone(), Stamp::of(&bytes));
            }
        }
        Ok(me)
    }

    /// What this source's files claim (service names, listen addresses).
    pub fn index(&self) -> &ServicesIndex {
        &self.index
    }

    pub fn services(&self) -> Vec<ServiceSpec> {
        self.files.values().flatten().cloned().collect()
    }

    /// Whether a watched event path concerns this source.
    fn concerns(&self, p: &Path) -> bool {
        if self.dir_mode {
            p.parent() == Some(self.path.as_path()) && p.extension().is_some_and(|x| x == "toml")
        } else {
            p.file_name() == self.path.file_name()
        }
    }

    /// Every file a full re-read (SIGHUP) looks at: those on disk now and
    /// those read before (which may be gone).
    fn all_files(&self) -> BTreeSet<PathBuf> {
        let mut all: BTreeSet<PathBuf> = self.files.keys().cloned().collect();
        if self.dir_mode {
            all.extend(config::services_files(&self.path).unwrap_or_default());
        } else {
            all.insert(self.path.clone());
        }
        all
    }

    /// Reads one file, comparing it with its last read.
    fn read(&self, file: &Path) -> Read {
        let stat = |f: &Path| std::fs::metadata(f).map(|m| (m.len(), m.modified().ok()));
        let before = match stat(file) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Read::Gone,
            Err(e) => return Read::Unreadable(unreadable(file, &e)),
        };
        let bytes = match std::fs::read(file) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Read::Gone,
            Err(e) => return Read::Unreadable(unreadable(file, &e)),
        };
        // A size or mtime that moved under the read: a writer is at work.
        let after: Option<(u64, Option<SystemTime>)> = stat(file).ok();
        if after != Some(before) || before.0 != bytes.len() as u64 {
            return Read::Moving;
        }
        let stamp = Stamp::of(&bytes);
        if self.stamps.get(file) == Some(&stamp) && self.files.contains_key(file) {
            return Read::Unchanged;
        }
        match String::from_utf8(bytes) {
            Ok(text) => Read::Text(text, stamp),
            Err(e) => Read::Unreadable(unreadable(file, &e)),
        }
    }

    /// Re-reads the changed files; returns the updates to send and the
    /// files that were still being written (to read again later). A broken
    /// file keeps its previous services. Blocking: run it off the runtime.
    fn reload(&mut self, changed: BTreeSet<PathBuf>) -> (Vec<Update>, Vec<PathBuf>) {
        let mut before: BTreeMap<ServiceKey, ServiceSpec> = BTreeMap::new();
        let mut after: BTreeMap<ServiceKey, ServiceSpec> = BTreeMap::new();
        let mut moving = Vec::new();
        for file in changed {
            let text = match self.read(&file) {
                Read::Gone => {
                    self.index.take_file(&file);
                    self.stamps.remove(&file);
                    if let Some(old) = self.files.remove(&file) {
                        before.extend(old.into_iter().map(|s| (s.key.clone(), s)));
                        tracing::info!(file = %file.display(), "services file removed");
                    }
                    continue;
                }
                Read::Unchanged => {
                    tracing::debug!(file = %file.display(), "services file unchanged; not re-parsed");
                    continue;
                }
                Read::Moving => {
                    moving.push(file);
                    continue;
                }
                Read::Unreadable(errors) => {
                    self.rejected(&errors);
                    continue;
                }
                Read::Text(text, stamp) => (text, stamp),
            };
            if let Some((old, new)) = self.parse(&file, &text.0, text.1) {
                before.extend(old.into_iter().map(|s| (s.key.clone(), s)));
                after.extend(new.into_iter().map(|s| (s.key.clone(), s)));
            }
        }
        (diff(before, after), moving)
    }

    /// Parses one changed file; `Some((old, new))` services when it is good.
    fn parse(
        &mut self,
        file: &Path,
        text: &str,
        stamp: Stamp,
    ) -> Option<(Vec<ServiceSpec>, Vec<ServiceSpec>)> {
        let previous = self.index.take_file(file);
        match config::parse_services(text, file, &self.defaults, &mut self.index) {
            Ok(specs) => {
                metrics::counter!(crate::telemetry::CONFIG_RELOADS, "result" => "ok").increment(1);
                tracing::info!(file = %file.display(), services = specs.len(), "services file reloaded");
                self.stamps.insert(file.to_path_buf(), stamp);
                let old = self.files.insert(file.to_path_buf(), specs.clone());
                Some((old.unwrap_or_default(), specs))
            }
            Err(errors) => {
                self.rejected(&errors);
                self.index.take_file(file);
                self.index.merge(previous);
                None
            }
        }
    }

    fn rejected(&self, errors: &ConfigErrors) {
        metrics::counter!(crate::telemetry::CONFIG_RELOADS, "result" => "error").increment(1);
        count_error(&self.id);
        for e in &errors.0 {
            tracing::error!(position = %e, "services file rejected; the last good version stays in force");
        }
    }

    /// Watches the directory that holds the files (following editors that
    /// replace a file by rename). Events that can change content go to `tx`.
    fn watch(
        &self,
        tx: mpsc::UnboundedSender<(PathBuf, Seen)>,
    ) -> notify::Result<notify::RecommendedWatcher> {
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                if let Ok(event) = res
                    && let Some(seen) = classify(&event.kind)
                {
                    for p in event.paths {
                        let _ = tx.send((p, seen));
                    }
                }
            })?;
        let dir = if self.dir_mode {
            self.path.clone()
        } else {
            match self.path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            }
        };
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        Ok(watcher)
    }

    async fn send(&self, registry: &registry::Handle, update: Update) -> Result<(), SourceError> {
        super::send(registry, &self.id, update).await
    }

    /// Reloads `changed` on a blocking thread and sends the updates; files
    /// still being written go back to `pending`.
    async fn apply(
        mut self: Box<Self>,
        changed: BTreeSet<PathBuf>,
        pending: &mut Pending,
        registry: &registry::Handle,
    ) -> Result<Box<Self>, SourceError> {
        let (me, (updates, moving)) = tokio::task::spawn_blocking(move || {
            let out = self.reload(changed);
            (self, out)
        })
        .await
        .map_err(|e| SourceError::Failed(format!("services reload panicked: {e}")))?;
        for file in moving {
            tracing::debug!(file = %file.display(), "services file changed while read; waiting for the writer");
            pending.note(file, Seen::Writing, Instant::now());
        }
        for update in updates {
            me.send(registry, update).await?;
        }
        Ok(me)
    }

    async fn run_loop(
        self: Box<Self>,
        registry: registry::Handle,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let mut me = self;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _watcher = match me.watch(tx) {
            Ok(w) => Some(w),
            Err(e) => {
                count_error(&me.id);
                tracing::warn!(path = %me.path.display(), error = %e, "cannot watch services path; changes apply on SIGHUP only");
                None
            }
        };
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        me.send(&registry, Update::Reset(me.services())).await?;
        // Without a watcher the channel is closed at once: SIGHUP still works.
        let mut watching = _watcher.is_some();
        let mut pending = Pending::default();
        loop {
            let settle = pending.next_settle();
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                Some(_) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    tracing::info!(path = %me.path.display(), "SIGHUP: re-reading services files");
                    let all = me.all_files();
                    me = me.apply(all, &mut pending, &registry).await?;
                    continue;
                }
                _ = async { match settle { Some(at) => tokio::time::sleep_until(at).await, None => std::future::pending().await } } => {}
                e = rx.recv(), if watching => match e {
                    Some((p, seen)) => me.note(&mut pending, p, seen),
                    None => {
                        watching = false;
                        continue;
                    }
                },
            }
            if !pending.settle(Instant::now()) {
                continue;
            }
            // Debounce: gather what else arrives before reading.
            let deadline = Instant::now() + DEBOUNCE_MAX;
            loop {
                let quiet = Instant::now() + DEBOUNCE;
                tokio::select! {
                    _ = tokio::time::sleep_until(quiet.min(deadline)) => break,
                    e = rx.recv() => match e { Some((p, seen)) => me.note(&mut pending, p, seen), None => break },
                }
            }
            if pending.has_done() {
                let done = pending.take_done();
                me = me.apply(done, &mut pending, &registry).await?;
            }
        }
    }

    /// Notes an event that concerns this source (in file mode under the
    /// configured name: an editor's rename names the file's new path).
    fn note(&self, pending: &mut Pending, p: PathBuf, seen: Seen) {
        if !self.concerns(&p) {
            return;
        }
        let p = if self.dir_mode { p } else { self.path.clone() };
        pending.note(p, seen, Instant::now());
    }
}

fn unreadable(file: &Path, e: &dyn std::fmt::Display) -> ConfigErrors {
    ConfigErrors(vec![config::ConfigError {
        path: file.to_path_buf(),
        line: 1,
        col: 1,
        message: format!("cannot read file: {e}"),
    }])
}

/// The updates that turn `before` into `after`.
fn diff(
    before: BTreeMap<ServiceKey, ServiceSpec>,
    after: BTreeMap<ServiceKey, ServiceSpec>,
) -> Vec<Update> {
    let mut updates = Vec::new();
    for key in before.keys() {
        if !after.contains_key(key) {
            updates.push(Update::Remove(key.clone()));
        }
    }
    for (key, spec) in after {
        if before.get(&key) != Some(&spec) {
            updates.push(Update::Upsert(Box::new(spec)));
        }
    }
    updates
}

impl Source for FileSource {
    fn id(&self) -> SourceId {
        self.id.clone()
    }

    fn run(
        self: Box<Self>,
        registry: registry::Handle,
        shutdown: CancellationToken,
    ) -> SourceFuture {
        Box::pin(self.run_loop(registry, shutdown))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServiceKey;
    use std::sync::Arc;

    fn write(p: &Path, text: &str) {
        std::fs::write(p, text).unwrap();
    }

    fn svc(name: &str, ip: &str) -> String {
        format!("[[service]]\nname = \"{name}\"\n[[service.endpoint]]\nip = \"{ip}\"\n")
    }

    async fn wait_for(
        reader: &mut registry::Reader,
        what: &str,
        f: impl Fn(&crate::model::Snapshot) -> bool,
    ) -> Arc<crate::model::Snapshot> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        loop {
            let snap = reader.latest();
            if f(&snap) {
                return snap;
            }
            match tokio::time::timeout_at(deadline, reader.changed()).await {
                Ok(Some(_)) => {}
                _ => panic!(
                    "not within 1 s: {what}; snapshot: {:?}",
                    reader.current().services.keys().collect::<Vec<_>>()
                ),
            }
        }
    }

    fn has(s: &crate::model::Snapshot, name: &str, ip: &str) -> bool {
        s.service(&ServiceKey::new("default", name))
            .is_some_and(|svc| {
                svc.endpoints
                    .iter()
                    .any(|e| e.endpoint.ip.to_string() == ip)
            })
    }

    #[tokio::test]
    async fn single_file_reload_keeps_last_good_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("services.toml");
        write(&file, &svc("web", "10.0.0.1"));
        let src = FileSource::load(&file, ServiceDefaults::default()).unwrap();
        let id = src.id();
        let shutdown = CancellationToken::new();
        let (handle, mut reader, _t) =
            registry::spawn(vec![id], Duration::from_secs(60), shutdown.clone());
        tokio::spawn(Box::new(src).run(handle, shutdown.clone()));
        wait_for(&mut reader, "initial", |s| {
            s.ready && has(s, "web", "10.0.0.1")
        })
        .await;
        // Editors replace files by rename: do the same.
        let tmp = dir.path().join(".services.toml.swp");
        write(&tmp, &svc("web", "10.0.0.2"));
        std::fs::rename(&tmp, &file).unwrap();
        wait_for(&mut reader, "rename-replace", |s| has(s, "web", "10.0.0.2")).await;
        // A broken edit keeps the previous state.
        write(
            &file,
            "[[service]]\nname = \"web\"\n[[service.endpoint]]\nip = \"nope\"\n",
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(has(&reader.current(), "web", "10.0.0.2"));
        // Fixing it applies.
        write(&file, &(svc("web", "10.0.0.3") + &svc("api", "10.0.0.4")));
        wait_for(&mut reader, "fixed", |s| {
            has(s, "web", "10.0.0.3") && has(s, "api", "10.0.0.4")
        })
        .await;
        shutdown.cancel();
    }

    #[tokio::test]
    async fn directory_mode_reads_only_changed_files() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("a.toml"), &svc("a", "10.0.0.1"));
        write(&dir.path().join("b.toml"), &svc("b", "10.0.0.2"));
        write(&dir.path().join("README"), "not toml");
        let src = FileSource::load(dir.path(), ServiceDefaults::default()).unwrap();
        assert_eq!(src.services().len(), 2);
        let shutdown = CancellationToken::new();
        let (handle, mut reader, _t) =
            registry::spawn(vec![src.id()], Duration::from_secs(60), shutdown.clone());
        tokio::spawn(Box::new(src).run(handle, shutdown.clone()));
        wait_for(&mut reader, "initial", |s| {
            has(s, "a", "10.0.0.1") && has(s, "b", "10.0.0.2")
        })
        .await;
        write(&dir.path().join("c.toml"), &svc("c", "10.0.0.3"));
        wait_for(&mut reader, "new file", |s| has(s, "c", "10.0.0.3")).await;
        std::fs::remove_file(dir.path().join("a.toml")).unwrap();
        wait_for(&mut reader, "removed file", |s| {
            s.service(&ServiceKey::new("default", "a")).is_none()
        })
        .await;
        // A duplicate across files is rejected; the rest stays.
        write(&dir.path().join("d.toml"), &svc("b", "10.0.0.9"));
        tokio::time::sleep(Duration::from_millis(400)).await;
        let s = reader.current();
        assert!(has(&s, "b", "10.0.0.2") && !has(&s, "b", "10.0.0.9"));
        shutdown.cancel();
    }

    #[test]
    fn reload_diff_sends_only_changes() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.toml");
        write(&a, &(svc("a", "10.0.0.1") + &svc("x", "10.0.0.5")));
        let mut src = FileSource::load(dir.path(), ServiceDefaults::default()).unwrap();
        write(&a, &(svc("a", "10.0.0.2") + &svc("x", "10.0.0.5")));
        let (updates, _) = src.reload(BTreeSet::from([a.clone()]));
        assert_eq!(updates.len(), 1);
        assert!(matches!(&updates[0], Update::Upsert(s) if s.key.name.as_ref() == "a"));
        write(&a, &svc("x", "10.0.0.5"));
        let (updates, _) = src.reload(BTreeSet::from([a]));
        assert!(matches!(&updates[..], [Update::Remove(k)] if k.name.as_ref() == "a"));
    }

    #[test]
    fn missing_path_starts_empty_and_broken_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let src =
            FileSource::load(&dir.path().join("nope.toml"), ServiceDefaults::default()).unwrap();
        assert!(src.services().is_empty());
        let bad = dir.path().join("bad.toml");
        write(&bad, "[[service]]\nnam = 1\n");
        let err = FileSource::load(&bad, ServiceDefaults::default())
            .err()
            .unwrap();
        assert_eq!(err.0[0].line, 2);
    }
}
