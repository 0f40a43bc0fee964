//! Files that are still arriving, read while they arrive (cut-through).
//!
//! A relay passes an artifact on to its children while the artifact still crosses the thin
//! link to it, instead of once it holds the whole (docs/remote.md, "Cut-through"):
//!
//! - **The writer** ([`Incoming`]): whatever writes a copy into place (`arbor receive`, a
//!   QUIC copy, `arbor seed-fetch`) writes it under the name [`arriving_path`] of its
//!   destination, `.arbor.arriving.<name>` beside it, holding an exclusive `flock` on it while
//!   it writes; it renames it into place only once the size and sha256 are right. The name is
//!   taken atomically (a hard link of the writer's own temp file, already locked): a second
//!   writer of the same destination finds it held and writes under its own temp name, unseen.
//!   A name left by a writer that died is not locked, and the next writer takes it over.
//! - **The readers** ([`Tail`], [`AsyncTail`]) read a file of a known size from its start;
//!   at its end before that size they wait while the writer holds its lock, and fail once the
//!   writer is gone without having written it all. A complete file is read as it is.
//! - **Nothing is trusted more than before.** What a reader passes on is checked where it
//!   lands (the receiver's sha256, before the rename) and by the reader itself (the sha256 of
//!   what it read, as for a whole file); a copy that went wrong is sent again from the whole,
//!   checked file.

use std::fs::{File, TryLockError};
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// How long a reader at the end of a growing file waits before it looks again.
const POLL: Duration = Duration::from_millis(10);

/// The name under which a copy to `dest` is written while it arrives.
pub fn arriving_path(dest: &Path) -> PathBuf {
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    dest.with_file_name(format!("{ARRIVING}{name}"))
}

/// Whether `path` is an [`arriving_path`]: a copy read while it arrives.
pub fn is_arriving(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with(ARRIVING))
}

const ARRIVING: &str = ".arbor.arriving.";

/// Whether some live writer holds `file` (an open file that is not this process's writer).
fn written(file: &File) -> bool {
    match file.try_lock_shared() {
        Ok(()) => {
            let _ = file.unlock();
            false
        }
        Err(TryLockError::WouldBlock) => true,
        Err(TryLockError::Error(_)) => false,
    }
}

/// The copy of `dest` a live writer is writing now, opened; `None` if there is none.
pub fn open_growing(dest: &Path) -> Option<File> {
    let file = File::open(arriving_path(dest)).ok()?;
    written(&file).then_some(file)
}

/// A copy being written to its destination under [`arriving_path`], locked; removed when
/// dropped unless [`Incoming::finish`] put it into place.
pub struct Incoming {
    pub file: File,
    pub path: PathBuf,
    done: bool,
}

impl Incoming {
    /// Starts a copy to `dest`: in a new file (mode 0600) locked for writing, named for the
    /// readers if no live writer holds that name, else under a temp name of its own (`temp`).
    pub fn create(dest: &Path, temp: &Path) -> Result<Incoming, String> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(temp)
            .map_err(|e| format!("{}: {e}", temp.display()))?;
        let mut incoming = Incoming {
            file,
            path: temp.to_path_buf(),
            done: false,
        };
        if incoming.file.try_lock().is_err() {
            return Ok(incoming);
        }
        let named = arriving_path(dest);
        for _ in 0..2 {
            match std::fs::hard_link(temp, &named) {
                Ok(()) => {
                    let _ = std::fs::remove_file(temp);
                    incoming.path = named;
                    break;
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    // A writer that died left it: take it over; a live one keeps it.
                    match File::open(&named) {
                        Ok(f) if !written(&f) => {
                            let _ = std::fs::remove_file(&named);
                        }
                        _ => break,
                    }
                }
                Err(_) => break,
            }
        }
        Ok(incoming)
    }

    /// Syncs the copy, gives it `mode` and renames it to `dest`.
    pub fn finish(mut self, mode: u32, dest: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        self.file.sync_all()?;
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&self.path, dest)?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if !self.done {
            // Removed before the lock goes (with the file): no reader takes it for a copy
            // whose writer is alive.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// How far a [`Tail`] or an [`AsyncTail`] has read, and what it does at the file's end.
struct Position {
    read: u64,
    size: u64,
    /// The writer was seen gone (or there is none to follow): the next end is the end.
    last: bool,
}

impl Position {
    fn new(size: u64, follow: bool) -> Position {
        Position {
            read: 0,
            size,
            last: !follow,
        }
    }

    /// How many of `room` bytes to read next; 0 once all `size` are read.
    fn want(&self, room: usize) -> usize {
        room.min((self.size - self.read.min(self.size)) as usize)
    }

    /// At the end of `file` before `size` bytes: `Ok(true)` to wait and read again while its
    /// writer holds it, `Ok(false)` to read once more at once (the writer let go, and what it
    /// wrote before is there now), or the error once that last read found nothing either.
    fn at_end(&mut self, file: &File) -> std::io::Result<bool> {
        if self.last {
            return Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                format!(
                    "the file ended after {} of its {} bytes",
                    self.read, self.size
                ),
            ));
        }
        if written(file) {
            Ok(true)
        } else {
            self.last = true;
            Ok(false)
        }
    }
}

/// Reads `size` bytes of a file from its start; when it `follow`s a copy that is arriving,
/// it waits at the file's end while the writer still holds it (see the module docs). A file
/// that is not arriving is read as it is, never waited for (another process may hold a lock
/// on an operator's file for reasons of its own).
pub struct Tail {
    file: File,
    at: Position,
}

impl Tail {
    pub fn new(file: File, size: u64, follow: bool) -> Tail {
        Tail {
            file,
            at: Position::new(size, follow),
        }
    }
}

impl Read for Tail {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let want = self.at.want(buf.len());
            if want == 0 {
                return Ok(0);
            }
            let n = self.file.read(&mut buf[..want])?;
            if n > 0 {
                self.at.read += n as u64;
                return Ok(n);
            }
            if self.at.at_end(&self.file)? {
                std::thread::sleep(POLL);
            }
        }
    }
}

/// [`Tail`] for async readers.
pub struct AsyncTail {
    file: tokio::fs::File,
    /// The same open file, to look at its lock.
    probe: File,
    at: Position,
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl AsyncTail {
    pub fn new(file: File, size: u64, follow: bool) -> std::io::Result<AsyncTail> {
        let probe = file.try_clone()?;
        Ok(AsyncTail {
            file: tokio::fs::File::from_std(file),
            probe,
            at: Position::new(size, follow),
            wait: None,
        })
    }
}

impl tokio::io::AsyncRead for AsyncTail {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            if let Some(wait) = &mut this.wait {
                std::task::ready!(wait.as_mut().poll(cx));
                this.wait = None;
            }
            let want = this.at.want(buf.remaining());
            if want == 0 {
                return Poll::Ready(Ok(()));
            }
            let mut part = buf.take(want);
            std::task::ready!(Pin::new(&mut this.file).poll_read(cx, &mut part))?;
            let n = part.filled().len();
            if n > 0 {
                // SAFETY: `part` filled these bytes of `buf`'s unfilled part.
                unsafe { buf.assume_init(n) };
                buf.advance(n);
                this.at.read += n as u64;
                return Poll::Ready(Ok(()));
            }
            if this.at.at_end(&this.probe)? {
                this.wait = Some(Box::pin(tokio::time::sleep(POLL)));
            }
        }
    }
}

/// Opens `path` for a [`Tail`], and says whether to follow it: an arriving copy is followed;
/// one whose writer has renamed it into place meanwhile is opened there, whole.
pub fn open(path: &Path) -> std::io::Result<(File, bool)> {
    match File::open(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            match name.strip_prefix(ARRIVING) {
                Some(dest) => Ok((File::open(path.with_file_name(dest))?, false)),
                None => Err(e),
            }
        }
        r => Ok((r?, is_arriving(path))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_reader_follows_a_copy_while_it_arrives_and_fails_when_its_writer_gives_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("blob");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();

        // Nothing arriving yet: no reader.
        assert!(open_growing(&dest).is_none());
        let mut incoming = Incoming::create(&dest, &dir.path().join(".t1")).expect("create");
        assert_eq!(incoming.path, arriving_path(&dest));
        // A second writer of the same destination writes unseen, under its own name.
        let second = Incoming::create(&dest, &dir.path().join(".t2")).expect("second");
        assert_eq!(second.path, dir.path().join(".t2"));
        drop(second);
        assert!(!dir.path().join(".t2").exists());

        let file = open_growing(&dest).expect("a live writer");
        let size = data.len() as u64;
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            Tail::new(file, size, true)
                .read_to_end(&mut got)
                .map(|_| got)
        });
        for chunk in data.chunks(40_000) {
            incoming.file.write_all(chunk).expect("write");
            std::thread::sleep(Duration::from_millis(15));
        }
        incoming.finish(0o640, &dest).expect("finish");
        assert_eq!(reader.join().expect("thread").expect("read"), data);
        assert_eq!(std::fs::read(&dest).expect("dest"), data);
        assert!(!arriving_path(&dest).exists());
        // A complete file reads as it is, from the arriving name it had.
        let mut got = Vec::new();
        let (file, follow) = open(&arriving_path(&dest)).expect("open");
        assert!(!follow, "a copy already in place is read whole");
        Tail::new(file, size, follow)
            .read_to_end(&mut got)
            .expect("read");
        assert_eq!(got, data);
        // A file that is not arriving is never waited for, even locked by someone else.
        let short = dir.path().join("short");
        std::fs::write(&short, &data[..10]).expect("write");
        let (file, follow) = open(&short).expect("open");
        let locker = File::open(&short).expect("open");
        locker.lock().expect("lock");
        let err = Tail::new(file, size, follow)
            .read_to_end(&mut Vec::new())
            .expect_err("short");
        assert!(err.to_string().contains("after 10 of its 300000"), "{err}");

        // A writer that gives up: its reader fails, nothing stays.
        let dest2 = dir.path().join("blob2");
        let mut incoming = Incoming::create(&dest2, &dir.path().join(".t3")).expect("create");
        let file = open_growing(&dest2).expect("a live writer");
        incoming.file.write_all(&data[..1000]).expect("write");
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            Tail::new(file, size, true).read_to_end(&mut got)
        });
        std::thread::sleep(Duration::from_millis(50));
        drop(incoming);
        let err = reader.join().expect("thread").expect_err("ended early");
        assert!(
            err.to_string().contains("after 1000 of its 300000"),
            "{err}"
        );
        assert!(!arriving_path(&dest2).exists());
        assert!(open_growing(&dest2).is_none());

        // A name left by a dead writer (not locked) is taken over.
        std::fs::write(arriving_path(&dest2), b"stale").expect("stale");
        assert!(open_growing(&dest2).is_none());
        let incoming = Incoming::create(&dest2, &dir.path().join(".t4")).expect("create");
        assert_eq!(incoming.path, arriving_path(&dest2));
    }

    #[tokio::test]
    async fn the_async_reader_follows_a_copy_while_it_arrives() {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("blob");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 13) as u8).collect();
        let mut incoming = Incoming::create(&dest, &dir.path().join(".t")).expect("create");
        let file = open_growing(&dest).expect("a live writer");
        let size = data.len() as u64;
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut tail = AsyncTail::new(file, size, true).expect("tail");
            tail.read_to_end(&mut got).await.map(|_| got)
        });
        let written = data.clone();
        tokio::task::spawn_blocking(move || {
            for chunk in written.chunks(30_000) {
                incoming.file.write_all(chunk).expect("write");
                std::thread::sleep(Duration::from_millis(10));
            }
            incoming.finish(0o600, &dest).expect("finish");
        })
        .await
        .expect("writer");
        assert_eq!(reader.await.expect("task").expect("read"), data);
    }
}
