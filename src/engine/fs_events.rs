//! One inotify instance per engine, shared by everything that watches a path.
//!
//! Each watched path is watched through its parent directory, so that deletes, renames over
//! it (how editors and atomic writers save) and re-creations are all seen, not only writes to
//! the inode that happened to be there first. One instance for all resources because the
//! per-user limit on inotify instances is small (128 by default) while watches are plentiful.

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Events on a directory entry that may mean its content, mode or existence changed.
fn dir_mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MODIFY
        | WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::ATTRIB
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::ONLYDIR
}

/// A handle on the engine's inotify instance. Clones share it; the reader task ends when the
/// last clone is dropped.
#[derive(Clone)]
pub struct FsEvents {
    inner: Arc<Inner>,
}

struct Inner {
    watches: Mutex<Watches>,
    dirs: Mutex<Dirs>,
    next_id: std::sync::atomic::AtomicU64,
    stop: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[derive(Default)]
struct Dirs {
    by_wd: HashMap<WatchDescriptor, WatchedDir>,
    by_path: HashMap<PathBuf, WatchDescriptor>,
}

struct WatchedDir {
    /// Entry name → subscribers (subscription id, wake-up).
    names: HashMap<OsString, Vec<(u64, Arc<Notify>)>>,
}

impl WatchedDir {
    fn wake_all(&self) {
        self.names
            .values()
            .flatten()
            .for_each(|(_, n)| n.notify_one());
    }
}

/// A live interest in one path. Dropping it ends the interest (and the directory watch, once
/// nobody else needs it).
pub struct Subscription {
    notify: Arc<Notify>,
    id: u64,
    wd: WatchDescriptor,
    name: OsString,
    owner: Weak<Inner>,
}

impl Subscription {
    /// Waits for the next event on the path. Events that arrive while nobody is waiting are
    /// kept as one pending wake-up, so none is lost and bursts coalesce.
    pub async fn changed(&self) {
        self.notify.notified().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(inner) = self.owner.upgrade() {
            inner.unsubscribe(&self.wd, &self.name, self.id);
        }
    }
}

impl FsEvents {
    /// Starts the instance and its reader task; needs a tokio runtime.
    pub fn new() -> io::Result<FsEvents> {
        let inotify = Inotify::init()?;
        let watches = inotify.watches();
        let stream = inotify.into_event_stream(vec![0u8; 64 * 1024])?;
        let inner = Arc::new(Inner {
            watches: Mutex::new(watches),
            dirs: Mutex::new(Dirs::default()),
            next_id: Default::default(),
            stop: CancellationToken::new(),
        });
        tokio::spawn(read_events(
            stream,
            Arc::downgrade(&inner),
            inner.stop.clone(),
        ));
        Ok(FsEvents { inner })
    }

    /// Starts watching `path` (which need not exist) through its parent directory (which
    /// must). If the directory is later removed, the subscription wakes once and then stays
    /// silent: the caller subscribes again (see the file resource's watch).
    pub fn subscribe(&self, path: &Path) -> io::Result<Subscription> {
        let (dir, name) = split(path)?;
        self.subscribe_in(dir, name)
    }

    /// Starts watching every entry of the directory `dir` (which must exist), and the
    /// directory itself going away (a directory resource's tree, one directory at a time).
    pub fn subscribe_all(&self, dir: &Path) -> io::Result<Subscription> {
        self.subscribe_in(dir.to_path_buf(), OsString::new())
    }

    /// `name` empty: any entry.
    fn subscribe_in(&self, dir: PathBuf, name: OsString) -> io::Result<Subscription> {
        let notify = Arc::new(Notify::new());
        let id = self
            .inner
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut dirs = lock(&self.inner.dirs);
        // Always ask the kernel: it returns the same descriptor for a directory already
        // watched, and a new one if the directory was replaced since (new inode).
        let wd = lock(&self.inner.watches)
            .add(&dir, dir_mask())
            .map_err(|e| io::Error::new(e.kind(), format!("inotify on {}: {e}", dir.display())))?;
        dirs.by_path.insert(dir, wd.clone());
        dirs.by_wd
            .entry(wd.clone())
            .or_insert_with(|| WatchedDir {
                names: HashMap::new(),
            })
            .names
            .entry(name.clone())
            .or_default()
            .push((id, notify.clone()));
        Ok(Subscription {
            notify,
            id,
            wd,
            name,
            owner: Arc::downgrade(&self.inner),
        })
    }
}

impl Inner {
    fn unsubscribe(&self, wd: &WatchDescriptor, name: &OsStr, id: u64) {
        let mut dirs = lock(&self.dirs);
        let now_empty = match dirs.by_wd.get_mut(wd) {
            Some(watched) => {
                if let Some(subs) = watched.names.get_mut(name) {
                    subs.retain(|(sid, _)| *sid != id);
                    if subs.is_empty() {
                        watched.names.remove(name);
                    }
                }
                watched.names.is_empty()
            }
            None => false,
        };
        if now_empty {
            dirs.by_wd.remove(wd);
            dirs.by_path.retain(|_, w| w != wd);
            // The directory may already be gone, which removed the watch with it.
            let _ = lock(&self.watches).remove(wd.clone());
        }
    }

    fn dispatch(&self, wd: &WatchDescriptor, mask: EventMask, name: Option<&OsStr>) {
        let mut dirs = lock(&self.dirs);
        if mask.contains(EventMask::Q_OVERFLOW) {
            // Events were lost: everyone re-checks.
            dirs.by_wd.values().for_each(WatchedDir::wake_all);
            return;
        }
        let Some(watched) = dirs.by_wd.get(wd) else {
            return;
        };
        if mask.intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::IGNORED) {
            watched.wake_all();
            if mask.contains(EventMask::IGNORED) {
                // The kernel dropped the watch (directory removed): forget it, so a later
                // subscribe adds a fresh one.
                dirs.by_wd.remove(wd);
                dirs.by_path.retain(|_, w| w != wd);
            }
            return;
        }
        if let Some(subs) = name.and_then(|n| watched.names.get(n)) {
            subs.iter().for_each(|(_, n)| n.notify_one());
        }
        if name.is_some()
            && let Some(subs) = watched.names.get(OsStr::new(""))
        {
            subs.iter().for_each(|(_, n)| n.notify_one());
        }
    }
}

async fn read_events(
    mut stream: inotify::EventStream<Vec<u8>>,
    owner: Weak<Inner>,
    stop: CancellationToken,
) {
    use futures::StreamExt;
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            event = stream.next() => event,
        };
        let Some(event) = event else { return };
        let Some(inner) = owner.upgrade() else { return };
        match event {
            Ok(event) => inner.dispatch(&event.wd, event.mask, event.name.as_deref()),
            Err(e) => {
                tracing::error!("inotify read failed, file watches stop: {e}");
                return;
            }
        }
    }
}

fn split(path: &Path) -> io::Result<(PathBuf, OsString)> {
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) if !dir.as_os_str().is_empty() => {
            Ok((dir.to_path_buf(), name.to_os_string()))
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cannot watch {}: no parent directory", path.display()),
        )),
    }
}

/// A poisoned lock here only means another task panicked mid-update of a map of wake-ups;
/// the maps stay usable, so keep going rather than cascade the panic.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn expect_event(sub: &Subscription) {
        tokio::time::timeout(Duration::from_secs(2), sub.changed())
            .await
            .expect("an inotify event within 2s");
    }

    #[tokio::test]
    async fn create_write_rename_and_delete_are_all_seen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("watched");
        let fs = FsEvents::new().expect("inotify");
        let sub = fs.subscribe(&path).expect("subscribe");

        std::fs::write(&path, "one").expect("write");
        expect_event(&sub).await;
        let other = dir.path().join("other");
        std::fs::write(&other, "two").expect("write other");
        std::fs::rename(&other, &path).expect("rename over");
        expect_event(&sub).await;
        std::fs::remove_file(&path).expect("remove");
        expect_event(&sub).await;
    }

    #[tokio::test]
    async fn events_on_other_names_do_not_wake() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fs = FsEvents::new().expect("inotify");
        let sub = fs.subscribe(&dir.path().join("a")).expect("subscribe");
        std::fs::write(dir.path().join("b"), "x").expect("write");
        let woke = tokio::time::timeout(Duration::from_millis(200), sub.changed()).await;
        assert!(woke.is_err(), "an event on b woke the watcher of a");
    }

    #[tokio::test]
    async fn dropping_the_last_subscription_removes_the_directory_watch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fs = FsEvents::new().expect("inotify");
        let a = fs.subscribe(&dir.path().join("a")).expect("subscribe a");
        let b = fs.subscribe(&dir.path().join("b")).expect("subscribe b");
        assert_eq!(lock(&fs.inner.dirs).by_path.len(), 1);
        drop(a);
        assert_eq!(lock(&fs.inner.dirs).by_path.len(), 1);
        drop(b);
        assert!(lock(&fs.inner.dirs).by_path.is_empty());
    }
}
