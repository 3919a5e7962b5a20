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
//!   refreshed on every load) are removed until the entries fit.

use crate::entry::{self, EntryError, EntryHeader};
use crate::CacheKey;
use kiln_compiler::ProgramImage;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

const SUFFIX: &str = ".kiln";
const TEMP_PREFIX: &str = ".tmp-";

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

/// One file of the cache directory.
#[derive(Clone, Debug)]
pub struct EntryFile {
    pub path: PathBuf,
    pub bytes: u64,
    pub last_used: SystemTime,
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

    pub fn contains(&self, key: &CacheKey) -> bool {
        self.path(key).exists()
    }

    /// The program stored for `key`, if there is one and it was built for exactly `ours`.
    /// A hit counts as a use for eviction.
    pub fn load(&self, key: &CacheKey, ours: &EntryHeader) -> Result<Option<ProgramImage>, LoadError> {
        let path = self.path(key);
        // The directory is checked again on every load: it may have changed since `open`.
        self.check_dir().map_err(|e| LoadError::Unsafe { path: path.clone(), why: e.to_string() })?;
        let bytes = match fs::File::open(&path) {
            Ok(mut f) => {
                let meta = f.metadata().map_err(|source| LoadError::Io { path: path.clone(), source })?;
                if let Some(why) = unsafe_owner_or_mode(&meta) {
                    return Err(LoadError::Unsafe { path, why });
                }
                let mut bytes = Vec::with_capacity(meta.len() as usize);
                std::io::Read::read_to_end(&mut f, &mut bytes).map_err(|source| LoadError::Io { path: path.clone(), source })?;
                // Refreshing the time may fail on a read-only cache; eviction order is all it is for.
                let _ = f.set_modified(SystemTime::now());
                bytes
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(LoadError::Io { path, source }),
        };
        entry::decode(&bytes, ours).map(Some).map_err(|source| LoadError::Entry { path, source })
    }

    /// Stores `image` for `key` atomically, then evicts entries past the size limit.
    pub fn store(&self, key: &CacheKey, header: &EntryHeader, image: &ProgramImage) -> std::io::Result<()> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let bytes = entry::encode(header, image);
        let temp = self.dir.join(format!("{TEMP_PREFIX}{}-{}-{}", key.hex(), std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
        let written = (|| {
            let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp)?;
            f.write_all(&bytes)?;
            // Data before name: after a crash the name never points at a partly written file.
            f.sync_data()?;
            fs::rename(&temp, self.path(key))
        })();
        if written.is_err() {
            let _ = fs::remove_file(&temp);
        }
        written?;
        self.evict();
        Ok(())
    }

    /// Entries (not temporaries), least recently used first.
    pub fn entries(&self) -> Vec<EntryFile> {
        let mut out: Vec<EntryFile> = self
            .files()
            .filter(|(name, _)| name.ends_with(SUFFIX) && !name.starts_with(TEMP_PREFIX))
            .filter_map(|(_, path)| {
                let meta = fs::metadata(&path).ok()?;
                Some(EntryFile { path, bytes: meta.len(), last_used: meta.modified().ok()? })
            })
            .collect();
        out.sort_by(|a, b| a.last_used.cmp(&b.last_used).then_with(|| a.path.cmp(&b.path)));
        out
    }

    fn files(&self) -> impl Iterator<Item = (String, PathBuf)> {
        fs::read_dir(&self.dir).into_iter().flatten().flatten().filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
    }

    /// Removes least recently used entries until the rest fit in the size limit.
    pub fn evict(&self) -> usize {
        let entries = self.entries();
        let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
        let mut removed = 0;
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

    /// Removes every entry and every temporary file left by an interrupted write.
    pub fn clear(&self) -> std::io::Result<usize> {
        let mut removed = 0;
        for (name, path) in self.files() {
            if name.ends_with(SUFFIX) || name.starts_with(TEMP_PREFIX) {
                fs::remove_file(&path)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Checks every entry's framing and checksum, that it is named after its key, and whether
    /// it was built for this process (`ours` without a key): Ok(true) loadable here,
    /// Ok(false) sound but built for another CPU or version.
    pub fn verify(&self, ours: &EntryHeader) -> Vec<(EntryFile, Result<bool, String>)> {
        self.entries()
            .into_iter()
            .map(|e| {
                let verdict = (|| {
                    let bytes = fs::read(&e.path).map_err(|err| err.to_string())?;
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
