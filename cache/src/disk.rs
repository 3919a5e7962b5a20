//! Cache entries on disk: one file per key, `<key hex>.kiln`, in a directory only its owner can
//! write.
//!
//! - **Executable code**: the directory is created 0700, and entries are read only from a
//!   directory (and files) owned by this user and writable by nobody else. Anyone who can
//!   write there could make this process run their code.
//! - **Atomic writes**: an entry is written to a temporary file in the same directory and
//!   renamed over its name, so a reader sees the old file or the new one, never a partial one;
//!   two processes writing one key each rename a complete file and the last one stays.
//! - **Size limit**: after each write, least recently used entries (by modification time,
//!   refreshed on every load) are removed until the entries fit, and temporary files that
//!   killed writers left behind are removed once they are old.
//! - **Untrusted files**: the directory is checked on every read and every write (it may be
//!   replaced while a process runs); an entry is opened without following links and without
//!   blocking (a FIFO planted as an entry would hang a blocking open), and only a regular file
//!   of a sane size is read. Whatever else sits under an entry's name (a directory, a FIFO, a
//!   link) is reported, replaced by the next write and removed by `clear`.

use crate::entry::{self, EntryError, EntryHeader};
use crate::CacheKey;
use kiln_compiler::ProgramImage;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

const SUFFIX: &str = ".kiln";
const TEMP_PREFIX: &str = ".tmp-";

/// No entry is larger (object code of a whole model is a few MB): a bigger file under an
/// entry's name is refused unread, and a program that would make one is not written.
pub const MAX_ENTRY_BYTES: u64 = 256 << 20;

/// A temporary file older than this belongs to a writer that died (a write takes
/// milliseconds): eviction removes it.
pub const STALE_TEMP_AGE: std::time::Duration = std::time::Duration::from_secs(15 * 60);

#[derive(thiserror::Error, Debug)]
pub enum DiskError {
    #[error("Kiln cache directory {dir}: {why}")]
    Unsafe { dir: PathBuf, why: String },
    #[error("Kiln cache directory {dir}: {source}")]
    Io { dir: PathBuf, source: std::io::Error },
}

#[derive(thiserror::Error, Debug)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("refused {path}: {why}")]
    Unsafe { path: PathBuf, why: String },
    #[error("bad entry {path}: {source}")]
    Entry { path: PathBuf, source: EntryError },
}

/// A cache directory that passed the safety checks when opened.
#[derive(Debug)]
pub struct DiskCache {
    dir: PathBuf,
    size_limit: u64,
}

/// One name of an entry in the cache directory.
#[derive(Clone, Debug)]
pub struct EntryFile {
    pub path: PathBuf,
    pub bytes: u64,
    pub last_used: SystemTime,
    /// False: something else sits under the entry's name (a directory, a FIFO, a link).
    pub regular: bool,
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Why code must not be loaded from a file or directory with this metadata, if so.
fn unsafe_owner_or_mode(meta: &fs::Metadata) -> Option<String> {
    if meta.uid() != euid() {
        return Some(format!("owned by uid {}, not by this user (uid {})", meta.uid(), euid()));
    }
    if meta.mode() & 0o022 != 0 {
        return Some(format!("writable by other users (mode {:o}); run `chmod go-w` on it", meta.mode() & 0o777));
    }
    None
}

impl DiskCache {
    /// Opens `dir`, creating it (mode 0700) if it does not exist. Fails if it is not a
    /// directory, or is owned by another user or writable by others.
    pub fn open(dir: impl Into<PathBuf>, size_limit: u64) -> Result<DiskCache, DiskError> {
        let dir: PathBuf = dir.into();
        if !dir.exists() {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(|source| DiskError::Io { dir: dir.clone(), source })?;
        }
        let cache = DiskCache { dir, size_limit };
        cache.check_dir()?;
        Ok(cache)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn size_limit(&self) -> u64 {
        self.size_limit
    }

    fn check_dir(&self) -> Result<(), DiskError> {
        let meta = fs::metadata(&self.dir).map_err(|source| DiskError::Io { dir: self.dir.clone(), source })?;
        if !meta.is_dir() {
            return Err(DiskError::Unsafe { dir: self.dir.clone(), why: "not a directory".into() });
        }
        match unsafe_owner_or_mode(&meta) {
            Some(why) => Err(DiskError::Unsafe { dir: self.dir.clone(), why }),
            None => Ok(()),
        }
    }

    pub fn path(&self, key: &CacheKey) -> PathBuf {
        self.dir.join(format!("{}{SUFFIX}", key.hex()))
    }

    /// Whether a regular file sits under `key`'s name.
    pub fn contains(&self, key: &CacheKey) -> bool {
        fs::symlink_metadata(self.path(key)).is_ok_and(|m| m.file_type().is_file())
    }

    /// The program stored for `key`, if there is one and it was built for exactly `ours`.
    /// A hit counts as a use for eviction.
    pub fn load(&self, key: &CacheKey, ours: &EntryHeader) -> Result<Option<ProgramImage>, LoadError> {
        let path = self.path(key);
        // The directory is checked again on every load: it may have changed since `open`.
        self.check_dir().map_err(|e| LoadError::Unsafe { path: path.clone(), why: e.to_string() })?;
        let Some(bytes) = read_entry(&path, true)? else { return Ok(None) };
        entry::decode(&bytes, ours).map(Some).map_err(|source| LoadError::Entry { path, source })
    }

    /// Stores `image` for `key` atomically, then evicts entries past the size limit. The
    /// directory is checked first, as for a load; whatever sits under the entry's name that
    /// is not a regular file is removed.
    pub fn store(&self, key: &CacheKey, header: &EntryHeader, image: &ProgramImage) -> std::io::Result<()> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        self.check_dir().map_err(|e| std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.to_string()))?;
        let bytes = entry::encode(header, image);
        if bytes.len() as u64 > MAX_ENTRY_BYTES {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("an entry of {} bytes is larger than any Kiln reads back ({MAX_ENTRY_BYTES})", bytes.len())));
        }
        let path = self.path(key);
        if let Ok(meta) = fs::symlink_metadata(&path) {
            if meta.is_dir() {
                fs::remove_dir_all(&path)?;
            }
        }
        let temp = self.dir.join(format!("{TEMP_PREFIX}{}-{}-{}", key.hex(), std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
        let written = (|| {
            let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp)?;
            f.write_all(&bytes)?;
            // Data before name: after a crash the name never points at a partly written file.
            f.sync_data()?;
            // rename replaces a file, a FIFO or a link under the name (never what a link
            // points to).
            fs::rename(&temp, &path)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&temp);
        }
        written?;
        self.evict();
        Ok(())
    }

    /// Entries (not temporaries), least recently used first; names of entries that are not
    /// regular files count 0 bytes.
    pub fn entries(&self) -> Vec<EntryFile> {
        let mut out: Vec<EntryFile> = self
            .files()
            .filter(|(name, _)| name.ends_with(SUFFIX) && !name.starts_with(TEMP_PREFIX))
            .filter_map(|(_, path)| {
                let meta = fs::symlink_metadata(&path).ok()?;
                let regular = meta.file_type().is_file();
                Some(EntryFile { path, bytes: if regular { meta.len() } else { 0 }, last_used: meta.modified().ok()?, regular })
            })
            .collect();
        out.sort_by(|a, b| a.last_used.cmp(&b.last_used).then_with(|| a.path.cmp(&b.path)));
        out
    }

    fn files(&self) -> impl Iterator<Item = (String, PathBuf)> {
        fs::read_dir(&self.dir).into_iter().flatten().flatten().filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
    }

    /// Removes least recently used entries until the rest fit in the size limit, and
    /// temporary files older than [`STALE_TEMP_AGE`].
    pub fn evict(&self) -> usize {
        let mut removed = 0;
        let now = SystemTime::now();
        for (name, path) in self.files().filter(|(name, _)| name.starts_with(TEMP_PREFIX)) {
            let stale = fs::symlink_metadata(&path).ok().and_then(|m| m.modified().ok()).and_then(|t| now.duration_since(t).ok()).is_some_and(|age| age > STALE_TEMP_AGE);
            if stale && fs::remove_file(&path).is_ok() {
                tracing::debug!("kiln cache: removed {name}, left by a writer that died");
                removed += 1;
            }
        }
        let entries: Vec<EntryFile> = self.entries().into_iter().filter(|e| e.regular).collect();
        let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
        for e in entries {
            if total <= self.size_limit {
                break;
            }
            if fs::remove_file(&e.path).is_ok() {
                total -= e.bytes;
                removed += 1;
            }
        }
        removed
    }

    /// Removes every entry (whatever sits under an entry's name: a directory too) and every
    /// temporary file left by an interrupted write.
    pub fn clear(&self) -> std::io::Result<usize> {
        let mut removed = 0;
        for (name, path) in self.files() {
            if name.ends_with(SUFFIX) || name.starts_with(TEMP_PREFIX) {
                let is_dir = fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
                let gone = if is_dir { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
                gone.map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Checks every entry's framing and checksum, that it is named after its key, and whether
    /// it was built for this process (`ours` without a key): Ok(true) loadable here,
    /// Ok(false) sound but built for another CPU or version. Reads as `load` does: a FIFO,
    /// a directory or an oversized file is bad, never waited for or read.
    pub fn verify(&self, ours: &EntryHeader) -> Vec<(EntryFile, Result<bool, String>)> {
        self.entries()
            .into_iter()
            .map(|e| {
                let verdict = (|| {
                    let bytes = read_entry(&e.path, false).map_err(|err| err.to_string())?.ok_or("removed while verifying")?;
                    let header = entry::read_header(&bytes).map_err(|err| err.to_string())?;
                    let named = e.path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(SUFFIX)).unwrap_or_default();
                    if named != header.key {
                        return Err(format!("holds key {} under another name", header.key));
                    }
                    let ours = EntryHeader { key: header.key.clone(), ..ours.clone() };
                    match entry::decode(&bytes, &ours) {
                        Ok(_) => Ok(true),
                        Err(EntryError::Foreign { .. }) => Ok(false),
                        Err(err) => Err(err.to_string()),
                    }
                })();
                (e, verdict)
            })
            .collect()
    }
}

/// The bytes of the entry file at `path`, None if there is none. Opened without following a
/// link and without blocking; refused unless it is a regular file owned by this user, writable
/// by nobody else, of at most [`MAX_ENTRY_BYTES`]. With `touch`, its time is refreshed (a use,
/// for eviction).
fn read_entry(path: &Path, touch: bool) -> Result<Option<Vec<u8>>, LoadError> {
    let unsafe_file = |why: String| LoadError::Unsafe { path: path.to_path_buf(), why };
    let io = |source| LoadError::Io { path: path.to_path_buf(), source };
    let mut f = match fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(unsafe_file("a symbolic link, not an entry".into())),
        Err(e) => return Err(io(e)),
    };
    let meta = f.metadata().map_err(io)?;
    if !meta.file_type().is_file() {
        let what = if meta.is_dir() { "a directory" } else if meta.file_type().is_fifo() { "a FIFO" } else { "not a regular file" };
        return Err(unsafe_file(format!("{what}, not an entry")));
    }
    if let Some(why) = unsafe_owner_or_mode(&meta) {
        return Err(unsafe_file(why));
    }
    if meta.len() > MAX_ENTRY_BYTES {
        return Err(unsafe_file(format!("{} bytes, more than any entry ({MAX_ENTRY_BYTES})", meta.len())));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // Bounded even if the file grows while it is read.
    std::io::Read::read_to_end(&mut std::io::Read::take(&mut f, MAX_ENTRY_BYTES + 1), &mut bytes).map_err(io)?;
    if bytes.len() as u64 > MAX_ENTRY_BYTES {
        return Err(unsafe_file(format!("grew past {MAX_ENTRY_BYTES} bytes while read")));
    }
    if touch {
        // Refreshing the time may fail on a read-only cache; eviction order is all it is for.
        let _ = f.set_modified(SystemTime::now());
    }
    Ok(Some(bytes))
}
