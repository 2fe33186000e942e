//! The private directory of one model's disk tier, and its cleanup: removed when dropped
//! (normal exit, error, panic), on Ctrl-C by [`install_interrupt_cleanup`], and, when its
//! process was killed (`SIGKILL`, the OOM killer), by the next [`OffloadDir::create`] in the
//! same parent.
//!
//! A directory is owned while its process holds an exclusive lock on its `.lock` file; the OS
//! drops the lock when the process dies, however it dies. A directory whose lock can be taken
//! (and that is older than [`STALE_AFTER`], so one being created right now is never taken for
//! dead) belongs to no live process and is removed.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::error::{Error, Result};

/// Name prefix of offload directories: `flexgen-<pid>-<n>`.
const PREFIX: &str = "flexgen-";

/// The lock file inside each offload directory.
const LOCK_FILE: &str = ".lock";

/// Age below which a directory is never considered stale (it may be being created).
pub const STALE_AFTER: Duration = Duration::from_secs(60);

/// Offload directories alive in this process, removed by the interrupt handler.
fn live_dirs() -> &'static Mutex<Vec<PathBuf>> {
    static DIRS: OnceLock<Mutex<Vec<PathBuf>>> = OnceLock::new();
    DIRS.get_or_init(|| Mutex::new(Vec::new()))
}

/// FlexGen's default offload location: `flexgen_offload_dir` under the system temp dir.
pub fn default_offload_dir() -> PathBuf {
    std::env::temp_dir().join("flexgen_offload_dir")
}

/// A private directory for one model's disk tier, `<parent>/flexgen-<pid>-<n>`, removed with
/// everything in it when dropped (normal exit, error or panic), by the handler of
/// [`install_interrupt_cleanup`] on Ctrl-C, and by a later process if this one is killed.
#[derive(Debug)]
pub struct OffloadDir {
    path: PathBuf,
    /// Holds the exclusive lock that marks the directory as owned.
    _lock: File,
}

impl OffloadDir {
    /// Creates `parent` if needed and a fresh private directory inside it, after removing the
    /// directories of dead processes there ([`remove_stale_offload_dirs`]).
    pub fn create(parent: &Path) -> Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        std::fs::create_dir_all(parent).map_err(|e| Error::io("create directory", parent, e))?;
        remove_stale_offload_dirs(parent, STALE_AFTER);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = parent.join(format!("{PREFIX}{}-{n}", std::process::id()));
        std::fs::create_dir(&path).map_err(|e| Error::io("create directory", &path, e))?;
        let lock_path = path.join(LOCK_FILE);
        let lock = File::create(&lock_path)
            .and_then(|f| f.try_lock().map_err(std::io::Error::from).map(|()| f))
            .map_err(|e| {
                let _ = std::fs::remove_dir_all(&path);
                Error::io("lock", &lock_path, e)
            })?;
        live_dirs()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(path.clone());
        Ok(OffloadDir { path, _lock: lock })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for OffloadDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
        live_dirs()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|p| p != &self.path);
    }
}

/// Removes the offload directories in `parent` that no live process owns: named
/// `flexgen-*`, with a `.lock` file nobody holds, last modified at least `min_age` ago.
/// Directories without a lock file (older versions, foreign ones) are left alone. Returns
/// how many were removed; errors (permissions, races with another cleaner) are skipped.
pub fn remove_stale_offload_dirs(parent: &Path, min_age: Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let named = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(PREFIX));
        let old = entry
            .metadata()
            .ok()
            .filter(|m| m.is_dir())
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= min_age);
        if !named || !old {
            continue;
        }
        // Taking the lock proves the owner is gone; it is released when `lock` drops.
        let Ok(lock) = File::open(path.join(LOCK_FILE)) else {
            continue;
        };
        if lock.try_lock().is_ok() && std::fs::remove_dir_all(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Removes every live offload directory (what the Ctrl-C handler does before exiting).
pub fn remove_live_offload_dirs() {
    let dirs = std::mem::take(&mut *live_dirs().lock().unwrap_or_else(|p| p.into_inner()));
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Installs a Ctrl-C (SIGINT) handler that removes the live offload directories and exits
/// with status 130. Programs call it once; libraries never install it themselves.
pub fn install_interrupt_cleanup() -> Result<()> {
    ctrlc::set_handler(|| {
        remove_live_offload_dirs();
        std::process::exit(130);
    })
    .map_err(|e| Error::Worker(format!("cannot install the Ctrl-C handler: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offload_dir_is_removed_on_drop() {
        let parent = tempfile::tempdir().unwrap();
        let a = OffloadDir::create(parent.path()).unwrap();
        let b = OffloadDir::create(&parent.path().join("nested")).unwrap();
        std::fs::write(a.path().join("x"), b"1").unwrap();
        let (pa, pb) = (a.path().to_path_buf(), b.path().to_path_buf());
        assert!(pa.is_dir() && pb.is_dir() && pa != pb);
        drop(a);
        assert!(!pa.exists() && pb.is_dir());
        drop(b);
        assert!(!pb.exists());
    }

    /// A dead process's directory (lock file nobody holds) goes; a live one (this process's,
    /// its lock held), a fresh one and a foreign one stay.
    #[test]
    fn stale_dirs_of_dead_processes_are_removed() {
        let parent = tempfile::tempdir().unwrap();
        let live = OffloadDir::create(parent.path()).unwrap();
        let dead = parent.path().join("flexgen-4194999-0");
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join(LOCK_FILE), b"").unwrap();
        std::fs::write(dead.join("weights"), vec![7u8; 4096]).unwrap();
        let foreign = parent.path().join("flexgen-notes");
        std::fs::create_dir(&foreign).unwrap();
        // Fresh: nothing is old enough yet.
        assert_eq!(remove_stale_offload_dirs(parent.path(), STALE_AFTER), 0);
        assert!(dead.is_dir());
        // Old enough: only the unowned directory with a lock file goes.
        assert_eq!(remove_stale_offload_dirs(parent.path(), Duration::ZERO), 1);
        assert!(!dead.exists() && live.path().is_dir() && foreign.is_dir());
        assert!(live.path().join(LOCK_FILE).is_file());
    }
}
