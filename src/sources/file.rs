//! The `file` source: a services file, or a directory of `*.toml` services
//! files, watched with `notify` and re-read on change and on SIGHUP.
//!
//! Only changed files are re-read (one file per service keeps a change
//! cheap at 100k endpoints). A file that fails to parse or validate keeps
//! its last good services in force; the error is logged with its position
//! and counted in `beacon_config_reloads_total{result="error"}`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{self, ConfigErrors, ServiceDefaults, ServicesIndex};
use crate::model::{ServiceKey, ServiceSpec, SourceId};
use crate::registry::{self, Update};

use super::{Source, SourceError, SourceFuture, count_error};

/// Quiet time after the last file event before re-reading.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// Longest wait under a stream of events.
const DEBOUNCE_MAX: Duration = Duration::from_millis(250);

pub struct FileSource {
    id: SourceId,
    path: PathBuf,
    defaults: ServiceDefaults,
    /// `path` is a directory of `*.toml` files (else one file).
    dir_mode: bool,
    files: BTreeMap<PathBuf, Vec<ServiceSpec>>,
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
            index: ServicesIndex::default(),
        };
        me.read_all()?;
        Ok(me)
    }

    /// Reads every file from scratch.
    fn read_all(&mut self) -> Result<(), ConfigErrors> {
        let mut index = ServicesIndex::default();
        if !self.path.exists() {
            tracing::warn!(path = %self.path.display(), "services path does not exist yet; serving no services from it until it appears");
            self.files = BTreeMap::new();
            self.index = index;
            return Ok(());
        }
        self.files = config::load_services_path(&self.path, &self.defaults, &mut index)?;
        self.index = index;
        Ok(())
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

    /// Re-reads the changed files; returns the updates to send. A broken
    /// file keeps its previous services.
    fn reload(&mut self, changed: BTreeSet<PathBuf>) -> Vec<Update> {
        let (gone, present): (Vec<PathBuf>, Vec<PathBuf>) =
            changed.into_iter().partition(|p| !p.is_file());
        let mut before: BTreeMap<ServiceKey, ServiceSpec> = BTreeMap::new();
        let mut after: BTreeMap<ServiceKey, ServiceSpec> = BTreeMap::new();
        for file in &gone {
            self.index.take_file(file);
            if let Some(old) = self.files.remove(file) {
                before.extend(old.into_iter().map(|s| (s.key.clone(), s)));
                tracing::info!(file = %file.display(), "services file removed");
            }
        }
        for file in &present {
            let previous = self.index.take_file(file);
            match config::load_services(file, &self.defaults, &mut self.index) {
                Ok(specs) => {
                    metrics::counter!(crate::telemetry::CONFIG_RELOADS, "result" => "ok")
                        .increment(1);
                    tracing::info!(file = %file.display(), services = specs.len(), "services file reloaded");
                    after.extend(specs.iter().map(|s| (s.key.clone(), s.clone())));
                    if let Some(old) = self.files.insert(file.clone(), specs) {
                        before.extend(old.into_iter().map(|s| (s.key.clone(), s)));
                    }
                }
                Err(errors) => {
                    metrics::counter!(crate::telemetry::CONFIG_RELOADS, "result" => "error")
                        .increment(1);
                    count_error(&self.id);
                    for e in &errors.0 {
                        tracing::error!(position = %e, "services file rejected; the last good version stays in force");
                    }
                    self.index.take_file(file);
                    self.index.merge(previous);
                }
            }
        }
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

    /// Watches the directory that holds the files (following editors that
    /// replace a file by rename). Events go to `tx`.
    fn watch(
        &self,
        tx: mpsc::UnboundedSender<PathBuf>,
    ) -> notify::Result<notify::RecommendedWatcher> {
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                if let Ok(event) = res {
                    for p in event.paths {
                        let _ = tx.send(p);
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

    async fn full_reload(&mut self, registry: &registry::Handle) -> Result<(), SourceError> {
        match self.read_all() {
            Ok(()) => {
                metrics::counter!(crate::telemetry::CONFIG_RELOADS, "result" => "ok").increment(1);
                tracing::info!(path = %self.path.display(), "services re-read");
                let all = self.services();
                self.send(registry, Update::Reset(all)).await?;
            }
            Err(errors) => {
                metrics::counter!(crate::telemetry::CONFIG_RELOADS, "result" => "error")
                    .increment(1);
                count_error(&self.id);
                for e in &errors.0 {
                    tracing::error!(position = %e, "services rejected; the last good state stays in force");
                }
            }
        }
        Ok(())
    }

    async fn run_loop(
        mut self,
        registry: registry::Handle,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _watcher = match self.watch(tx) {
            Ok(w) => Some(w),
            Err(e) => {
                count_error(&self.id);
                tracing::warn!(path = %self.path.display(), error = %e, "cannot watch services path; changes apply on SIGHUP only");
                None
            }
        };
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let all = self.services();
        self.send(&registry, Update::Reset(all)).await?;
        // Without a watcher the channel is closed at once: SIGHUP still works.
        let mut watching = _watcher.is_some();
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                Some(_) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    self.full_reload(&registry).await?;
                    continue;
                }
                p = rx.recv(), if watching => match p {
                    Some(p) => p,
                    None => {
                        watching = false;
                        continue;
                    }
                },
            };
            let mut dirty = HashSet::from([first]);
            let deadline = tokio::time::Instant::now() + DEBOUNCE_MAX;
            loop {
                let quiet = tokio::time::Instant::now() + DEBOUNCE;
                tokio::select! {
                    _ = tokio::time::sleep_until(quiet.min(deadline)) => break,
                    p = rx.recv() => match p { Some(p) => { dirty.insert(p); } None => break },
                }
            }
            let changed: BTreeSet<PathBuf> =
                dirty.into_iter().filter(|p| self.concerns(p)).collect();
            if changed.is_empty() {
                continue;
            }
            // In file mode the one file is re-read under its configured name.
            let changed = if self.dir_mode {
                changed
            } else {
                BTreeSet::from([self.path.clone()])
            };
            for update in self.reload(changed) {
                self.send(&registry, update).await?;
            }
        }
    }
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
        let updates = src.reload(BTreeSet::from([a.clone()]));
        assert_eq!(updates.len(), 1);
        assert!(matches!(&updates[0], Update::Upsert(s) if s.key.name.as_ref() == "a"));
        write(&a, &svc("x", "10.0.0.5"));
        let updates = src.reload(BTreeSet::from([a]));
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
