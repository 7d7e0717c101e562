//! Which file events the `file` source acts on, and when a file is ready
//! to be read.
//!
//! inotify also reports opens and reads, so the source's own re-read (and
//! any `cat`, `beacon check` or backup job) used to look like a change and
//! re-read the file 50 ms later, forever. Only events that can change a
//! file's content count: a write that was closed, a rename, a removal. A
//! create or a plain write means "being written": the file is read once
//! its writer closes it (or, for a writer that keeps it open, once it has
//! been quiet for [`SETTLE`]), never in the middle of the write.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use notify::EventKind;
use notify::event::{AccessKind, AccessMode, ModifyKind};
use tokio::time::Instant;

/// How long a file that is being written (no close seen) must stay quiet
/// before it is read anyway.
pub const SETTLE: Duration = Duration::from_secs(2);

/// What an event says about its paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// The content may have changed and the writer is done: read it.
    Done,
    /// Someone is writing: wait for the close (or [`SETTLE`]).
    Writing,
}

/// What an event means for the files it names; `None` for events that
/// cannot change content (open, read, close after reading, attributes).
pub fn classify(kind: &EventKind) -> Option<Seen> {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => Some(Seen::Done),
        EventKind::Access(_) => None,
        EventKind::Modify(ModifyKind::Name(_)) => Some(Seen::Done),
        EventKind::Modify(ModifyKind::Metadata(_)) => None,
        EventKind::Modify(_) => Some(Seen::Writing),
        EventKind::Create(_) => Some(Seen::Writing),
        EventKind::Remove(_) => Some(Seen::Done),
        EventKind::Any | EventKind::Other => None,
    }
}

/// Files seen changing, waiting to be read.
#[derive(Debug, Default)]
pub struct Pending {
    /// Done: read at the end of the debounce.
    done: BTreeSet<PathBuf>,
    /// Being written, with the time of the last write seen.
    writing: HashMap<PathBuf, Instant>,
}

impl Pending {
    pub fn note(&mut self, path: PathBuf, seen: Seen, now: Instant) {
        match seen {
            Seen::Done => {
                self.writing.remove(&path);
                self.done.insert(path);
            }
            Seen::Writing => {
                self.done.remove(&path);
                self.writing.insert(path, now);
            }
        }
    }

    /// Moves files quiet for [`SETTLE`] to done; says whether any file is done.
    pub fn settle(&mut self, now: Instant) -> bool {
        let quiet: Vec<PathBuf> = self
            .writing
            .iter()
            .filter(|(_, at)| now.duration_since(**at) >= SETTLE)
            .map(|(p, _)| p.clone())
            .collect();
        for p in quiet {
            self.writing.remove(&p);
            self.done.insert(p);
        }
        !self.done.is_empty()
    }

    /// When the next file being written has been quiet long enough.
    pub fn next_settle(&self) -> Option<Instant> {
        self.writing.values().min().map(|at| *at + SETTLE)
    }

    pub fn has_done(&self) -> bool {
        !self.done.is_empty()
    }

    /// The files to read now.
    pub fn take_done(&mut self) -> BTreeSet<PathBuf> {
        std::mem::take(&mut self.done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, MetadataKind, RemoveKind, RenameMode};

    #[test]
    fn reads_and_opens_are_not_changes() {
        for kind in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
            EventKind::Any,
        ] {
            assert_eq!(classify(&kind), None, "{kind:?}");
        }
    }

    #[test]
    fn close_write_rename_and_remove_are_done_writes_and_creates_wait() {
        let done = [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Modify(ModifyKind::Name(RenameMode::From)),
            EventKind::Remove(RemoveKind::File),
        ];
        for kind in done {
            assert_eq!(classify(&kind), Some(Seen::Done), "{kind:?}");
        }
        for kind in [
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
        ] {
            assert_eq!(classify(&kind), Some(Seen::Writing), "{kind:?}");
        }
    }

    #[test]
    fn a_file_being_written_waits_for_its_close_or_settles() {
        let t0 = Instant::now();
        let (a, b) = (PathBuf::from("a.toml"), PathBuf::from("b.toml"));
        let mut p = Pending::default();
        p.note(a.clone(), Seen::Writing, t0);
        assert!(!p.settle(t0 + Duration::from_millis(500)));
        // A later write restarts the quiet time.
        p.note(a.clone(), Seen::Writing, t0 + Duration::from_secs(1));
        assert!(!p.settle(t0 + SETTLE));
        assert_eq!(p.next_settle(), Some(t0 + Duration::from_secs(1) + SETTLE));
        // The close makes it ready at once.
        p.note(b.clone(), Seen::Writing, t0);
        p.note(b.clone(), Seen::Done, t0);
        assert_eq!(p.take_done(), BTreeSet::from([b.clone()]));
        // A write after a close makes it wait again.
        p.note(b.clone(), Seen::Done, t0);
        p.note(b.clone(), Seen::Writing, t0);
        assert!(!p.has_done());
        // Quiet long enough: read anyway.
        assert!(p.settle(t0 + Duration::from_secs(1) + SETTLE));
        assert_eq!(p.take_done(), BTreeSet::from([a, b]));
        assert_eq!(p.next_settle(), None);
    }
}
