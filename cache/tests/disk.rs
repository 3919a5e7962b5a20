//! The disk cache's safety cases, each on a real directory: a damaged entry is never loaded
//! (the program is compiled again and the entry rewritten), writes are atomic under
//! concurrency, a read-only directory serves `never` mode, eviction keeps the recently used
//! entries, and directories other users can write are refused.

use kiln_cache::{CacheKey, CompileMode, DiskCache, EntryHeader, ProgramCache, Request, Source};
use kiln_compiler::graph::ir::parse_graph;
use kiln_compiler::{CompileOptions, Graph, Target};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!("kiln-cache-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = fs::remove_dir_all(&p);
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::set_permissions(&self.0, fs::Permissions::from_mode(0o700));
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A graph of its own per test: programs are shared process-wide by key, and each test wants
/// to see its own compiles.
fn graph(op: &str, n: usize) -> Graph {
    parse_graph(&format!("graph(%0: f32[{n}]) {{\n %1 = {op}(%0) : f32[{n}]\n %2 = add(%1, %0) : f32[{n}]\n return (%2)\n}}")).unwrap()
}

struct Setup {
    g: Graph,
    strides: Vec<Vec<i64>>,
    target: Target,
    options: CompileOptions,
}

impl Setup {
    fn new(op: &str, n: usize) -> Setup {
        Setup { g: graph(op, n), strides: vec![vec![1]], target: Target::host(), options: CompileOptions::default() }
    }
    fn key(&self) -> CacheKey {
        CacheKey::new(&self.g, &self.strides, &self.target, &self.options)
    }
    fn req<'a>(&'a self, mode: CompileMode, disk: &'a DiskCache) -> Request<'a> {
        Request { key: self.key(), graph: &self.g, input_strides: &self.strides, symbolic: None, target: &self.target, options: &self.options, mode, disk: Some(disk) }
    }
    /// A fresh process's view: an empty memory cache over `disk`.
    fn fetch(&self, mode: CompileMode, disk: &DiskCache) -> (Result<Source, String>, ProgramCache) {
        let cache = ProgramCache::default();
        let got = cache.fetch(&self.req(mode, disk)).map(|(p, s)| {
            check_runs(&p);
            s
        });
        (got.map_err(|e| e.to_string()), cache)
    }
}

/// Every graph here is `op(x) + x` with op(x) >= 0 for x >= 1.
fn check_runs(p: &kiln_compiler::CompiledProgram) {
    let n = p.image.buffers[0].sizes[0] as usize;
    let x: Vec<f32> = (0..n).map(|i| 1.0 + i as f32 * 0.25).collect();
    let mut y = vec![0f32; n];
    unsafe { p.run(&[x.as_ptr() as *const u8], &[y.as_mut_ptr() as *mut u8]) }.unwrap();
    assert!(y.iter().zip(&x).all(|(y, x)| y.is_finite() && *y >= *x), "{y:?}");
}

const LIMIT: u64 = 1 << 30;

#[test]
fn entries_round_trip_through_a_fresh_process() {
    let dir = TempDir::new();
    let disk = DiskCache::open(&dir.0, LIMIT).unwrap();
    let s = Setup::new("exp", 33);
    assert_eq!(s.fetch(CompileMode::Lazy, &disk).0, Ok(Source::Compiled));
    assert!(disk.contains(&s.key()));
    let (got, cache) = s.fetch(CompileMode::Never, &disk);
    assert_eq!(got, Ok(Source::Disk));
    assert_eq!(cache.compiles(), 0);
    // 'always' ignores the entry and rewrites it.
    assert_eq!(s.fetch(CompileMode::Always, &disk).0, Ok(Source::Compiled));
}

#[test]
fn directory_is_created_private() {
    let dir = TempDir::new();
    DiskCache::open(dir.0.join("a/b"), LIMIT).unwrap();
    assert_eq!(fs::metadata(dir.0.join("a/b")).unwrap().permissions().mode() & 0o777, 0o700);
}

/// Damages the entry of `s` with `damage`, then checks a fresh process refuses it: `never`
/// falls back, `lazy` compiles again and rewrites a good entry.
fn damaged_entry_is_never_loaded(op: &str, damage: impl Fn(&mut Vec<u8>)) {
    let dir = TempDir::new();
    let disk = DiskCache::open(&dir.0, LIMIT).unwrap();
    let s = Setup::new(op, 40);
    s.fetch(CompileMode::Lazy, &disk).0.unwrap();
    let path = disk.path(&s.key());
    let mut bytes = fs::read(&path).unwrap();
    let good = bytes.clone();
    damage(&mut bytes);
    fs::write(&path, &bytes).unwrap();

    let (got, cache) = s.fetch(CompileMode::Never, &disk);
    assert!(got.unwrap_err().contains("compile='never'"));
    let problems = cache.disk_problems();
    assert_eq!(problems.len(), 1, "{problems:?}");

    let (got, _) = s.fetch(CompileMode::Lazy, &disk);
    assert_eq!(got, Ok(Source::Compiled));
    assert_eq!(fs::read(&path).unwrap().len(), good.len(), "the entry was not rewritten");
    assert_eq!(s.fetch(CompileMode::Never, &disk).0, Ok(Source::Disk));
}

#[test]
fn a_flipped_byte_in_the_object_code() {
    damaged_entry_is_never_loaded("exp", |b| {
        let i = b.len() - 100;
        b[i] ^= 1;
    });
}

#[test]
fn a_truncated_entry() {
    damaged_entry_is_never_loaded("log", |b| b.truncate(b.len() / 2));
}

#[test]
fn an_empty_entry() {
    damaged_entry_is_never_loaded("sqrt", |b| b.clear());
}

#[test]
fn a_changed_header() {
    damaged_entry_is_never_loaded("tanh", |b| {
        let at = b.windows(4).position(|w| w == b"cpu ").unwrap() + 4;
        b[at] = b'X';
    });
}

/// A well-formed entry (good checksum) for another Kiln version or CPU, stored under this
/// process's key, is refused by its header.
fn foreign_entry(edit: fn(&mut EntryHeader)) {
    let dir = TempDir::new();
    let disk = DiskCache::open(&dir.0, LIMIT).unwrap();
    let s = Setup::new("sigmoid", 41);
    s.fetch(CompileMode::Lazy, &disk).0.unwrap();
    let path = disk.path(&s.key());
    let bytes = fs::read(&path).unwrap();
    let mut header = kiln_cache::entry::read_header(&bytes).unwrap();
    let image = kiln_cache::entry::decode(&bytes, &header).unwrap();
    edit(&mut header);
    fs::write(&path, kiln_cache::entry::encode(&header, &image)).unwrap();
    let (got, cache) = s.fetch(CompileMode::Never, &disk);
    assert!(got.is_err());
    let problems = format!("{:?}", cache.disk_problems());
    assert!(problems.contains("built for"), "{problems}");
    assert_eq!(s.fetch(CompileMode::Lazy, &disk).0, Ok(Source::Compiled));
}

#[test]
fn an_entry_from_another_kiln_version() {
    foreign_entry(|h| h.kiln = "0.0.1-other".into());
}

#[test]
fn an_entry_from_another_cpu() {
    foreign_entry(|h| {
        h.cpu = "cortex-a72".into();
        h.features = "+neon".into();
    });
}

#[test]
fn concurrent_writers_of_one_key_never_leave_a_bad_entry() {
    let dir = TempDir::new();
    let disk = Arc::new(DiskCache::open(&dir.0, LIMIT).unwrap());
    let s = Setup::new("exp", 57);
    let image = kiln_compiler::compile_image(&s.g, &s.strides, &s.target, &s.options).unwrap();
    let header = EntryHeader::current(&s.key(), &s.target);
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let (disk, image, header, key) = (disk.clone(), image.clone(), header.clone(), s.key());
            std::thread::spawn(move || {
                for _ in 0..50 {
                    disk.store(&key, &header, &image).unwrap();
                }
            })
        })
        .collect();
    // Readers during the writes see a whole entry every time.
    let mut seen = 0;
    while writers.iter().any(|w| !w.is_finished()) {
        if let Ok(Some(got)) = disk.load(&s.key(), &header) {
            assert_eq!(got, image);
            seen += 1;
        }
    }
    for w in writers {
        w.join().unwrap();
    }
    assert_eq!(disk.load(&s.key(), &header).unwrap(), Some(image));
    let names: Vec<_> = fs::read_dir(&dir.0).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 1, "temporary files left behind: {names:?} (reads during writes: {seen})");
}

#[test]
fn a_read_only_directory_serves_never_mode() {
    let dir = TempDir::new();
    let s = Setup::new("exp", 65);
    {
        let disk = DiskCache::open(&dir.0, LIMIT).unwrap();
        s.fetch(CompileMode::Lazy, &disk).0.unwrap();
    }
    fs::set_permissions(&dir.0, fs::Permissions::from_mode(0o500)).unwrap();
    let disk = DiskCache::open(&dir.0, LIMIT).unwrap();
    assert_eq!(s.fetch(CompileMode::Never, &disk).0, Ok(Source::Disk));
    // Lazy mode on a miss compiles; the failed write is reported, not raised.
    let other = Setup::new("log", 65);
    let (got, cache) = other.fetch(CompileMode::Lazy, &disk);
    assert_eq!(got, Ok(Source::Compiled));
    // (root ignores permissions: then the write simply succeeds.)
    if unsafe { libc::geteuid() } != 0 {
        assert!(format!("{:?}", cache.disk_problems()).contains("cannot write"));
    }
}

#[test]
fn eviction_keeps_the_most_recently_used_entries() {
    let dir = TempDir::new();
    let setups: Vec<Setup> = [70, 71, 72, 73].into_iter().map(|n| Setup::new("exp", n)).collect();
    let unlimited = DiskCache::open(&dir.0, LIMIT).unwrap();
    for s in &setups[..3] {
        s.fetch(CompileMode::Lazy, &unlimited).0.unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Use the oldest entry: it becomes the most recently used.
    assert_eq!(setups[0].fetch(CompileMode::Never, &unlimited).0, Ok(Source::Disk));
    let sizes: Vec<u64> = unlimited.entries().iter().map(|e| e.bytes).collect();
    let limit = sizes.iter().max().unwrap() * 3 - 1; // room for two entries, not three
    let limited = DiskCache::open(&dir.0, limit).unwrap();
    setups[3].fetch(CompileMode::Lazy, &limited).0.unwrap();
    let kept: Vec<bool> = setups.iter().map(|s| limited.contains(&s.key())).collect();
    assert_eq!(kept, [true, false, false, true]);
    assert!(limited.entries().iter().map(|e| e.bytes).sum::<u64>() <= limit);
}

#[test]
fn a_limit_below_one_entry_evicts_everything_and_code_still_runs() {
    let dir = TempDir::new();
    let disk = DiskCache::open(&dir.0, 10).unwrap();
    let s = Setup::new("exp", 80);
    assert_eq!(s.fetch(CompileMode::Lazy, &disk).0, Ok(Source::Compiled));
    assert!(disk.entries().is_empty());
    assert_eq!(s.fetch(CompileMode::Never, &disk).0.unwrap_err(), "no cached code for this signature and compile='never'");
}

#[test]
fn a_directory_others_can_write_is_refused() {
    let dir = TempDir::new();
    let s = Setup::new("exp", 90);
    let disk = DiskCache::open(&dir.0, LIMIT).unwrap();
    s.fetch(CompileMode::Lazy, &disk).0.unwrap();
    fs::set_permissions(&dir.0, fs::Permissions::from_mode(0o777)).unwrap();
    let err = DiskCache::open(&dir.0, LIMIT).unwrap_err().to_string();
    assert!(err.contains("writable by other users"), "{err}");
    // A cache opened before the change re-checks on every load.
    let (got, cache) = s.fetch(CompileMode::Never, &disk);
    assert!(got.is_err());
    assert!(format!("{:?}", cache.disk_problems()).contains("writable by other users"));
    // An entry file others can write is refused too.
    fs::set_permissions(&dir.0, fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(disk.path(&s.key()), fs::Permissions::from_mode(0o666)).unwrap();
    assert!(s.fetch(CompileMode::Never, &disk).0.is_err());
}

#[test]
fn verify_tells_good_foreign_and_bad_entries_apart() {
    let dir = TempDir::new();
    let disk = DiskCache::open(&dir.0, LIMIT).unwrap();
    let (a, b) = (Setup::new("exp", 100), Setup::new("exp", 101));
    a.fetch(CompileMode::Lazy, &disk).0.unwrap();
    b.fetch(CompileMode::Lazy, &disk).0.unwrap();
    let path = disk.path(&b.key());
    let mut bytes = fs::read(&path).unwrap();
    bytes.truncate(bytes.len() - 1);
    fs::write(&path, bytes).unwrap();
    let ours = EntryHeader::current(&a.key(), &a.target);
    let mut other_cpu = ours.clone();
    other_cpu.cpu = "other".into();
    let report = |ours: &EntryHeader| disk.verify(ours).into_iter().map(|(e, v)| (e.path == path, v.is_ok(), v.unwrap_or(false))).collect::<Vec<_>>();
    let mut r = report(&ours);
    r.sort();
    assert_eq!(r, [(false, true, true), (true, false, false)]);
    let mut r = report(&other_cpu);
    r.sort();
    assert_eq!(r, [(false, true, false), (true, false, false)]);
    assert_eq!(disk.clear().unwrap(), 2);
    assert!(disk.entries().is_empty());
}

/// Runs `f` on another thread and fails the test if it takes more than 20 s (a FIFO opened
/// blocking would hang forever).
fn within_seconds<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(20)).expect("hung (a blocking open of the entry?)")
}

/// A fresh process's fetch in lazy mode over `dir` where `plant` put something odd under the
/// entry's name: it must compile, report the problem and leave a good entry behind.
fn planted(n: usize, plant: impl FnOnce(&std::path::Path), problem: &str) {
    let dir = TempDir::new();
    let disk = DiskCache::open(&dir.0, LIMIT).unwrap();
    let s = Setup::new("tanh", n);
    plant(&disk.path(&s.key()));
    let ours = EntryHeader::current(&s.key(), &s.target);
    let verdicts = within_seconds({
        let dir = dir.0.clone();
        let ours = ours.clone();
        move || DiskCache::open(&dir, LIMIT).unwrap().verify(&ours).into_iter().map(|(_, v)| v).collect::<Vec<_>>()
    });
    assert!(matches!(verdicts.as_slice(), [Err(why)] if why.contains(problem)), "{verdicts:?}");
    let (got, cache) = within_seconds({
        let dir = dir.0.clone();
        move || {
            let disk = DiskCache::open(&dir, LIMIT).unwrap();
            let (got, cache) = Setup::new("tanh", n).fetch(CompileMode::Lazy, &disk);
            (got, format!("{:?}", cache.disk_problems()))
        }
    });
    assert_eq!(got, Ok(Source::Compiled));
    assert!(cache.contains(problem), "{cache}");
    // The write replaced it: the next process loads the entry.
    assert_eq!(s.fetch(CompileMode::Never, &disk).0, Ok(Source::Disk));
    assert_eq!(disk.clear().unwrap(), 1);
}

#[test]
fn a_fifo_planted_as_an_entry_neither_blocks_nor_loads() {
    planted(110, |p| assert_eq!(unsafe { libc::mkfifo(std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap().as_ptr(), 0o600) }, 0), "a FIFO");
}

#[test]
fn a_huge_sparse_file_as_an_entry_is_refused_unread() {
    planted(111, |p| fs::File::create(p).unwrap().set_len(1 << 40).unwrap(), "more than any entry");
}

#[test]
fn a_directory_under_an_entrys_name_is_replaced_and_cleared() {
    planted(
        112,
        |p| {
            fs::create_dir(p).unwrap();
            fs::write(p.join("inside"), b"x").unwrap();
        },
        "a directory",
    );
    let dir = TempDir::new();
    let disk = DiskCache::open(&dir.0, LIMIT).unwrap();
    fs::create_dir(disk.path(&Setup::new("exp", 113).key())).unwrap();
    assert_eq!(disk.clear().unwrap(), 1);
    assert!(fs::read_dir(&dir.0).unwrap().next().is_none());
}

#[test]
fn a_link_under_an_entrys_name_is_not_followed() {
    let target = TempDir::new();
    fs::create_dir_all(&target.0).unwrap();
    let elsewhere = target.0.join("code");
    fs::write(&elsewhere, b"not ours").unwrap();
    planted(114, |p| std::os::unix::fs::symlink(&elsewhere, p).unwrap(), "symbolic link");
    assert_eq!(fs::read(&elsewhere).unwrap(), b"not ours");
}

#[test]
fn writes_check_the_directory_as_loads_do() {
    let dir = TempDir::new();
    let disk = DiskCache::open(&dir.0, LIMIT).unwrap();
    fs::set_permissions(&dir.0, fs::Permissions::from_mode(0o777)).unwrap();
    let s = Setup::new("exp", 115);
    let (got, cache) = s.fetch(CompileMode::Lazy, &disk);
    assert_eq!(got, Ok(Source::Compiled));
    assert_eq!(cache.disk_writes(), 0);
    assert!(format!("{:?}", cache.disk_problems()).contains("writable by other users"));
    assert!(!disk.path(&s.key()).exists());
}

#[test]
fn temporary_files_of_dead_writers_are_evicted_when_old() {
    let dir = TempDir::new();
    let disk = DiskCache::open(&dir.0, LIMIT).unwrap();
    let old = dir.0.join(".tmp-dead-1-0");
    let fresh = dir.0.join(".tmp-writing-2-0");
    fs::write(&old, b"half an entry").unwrap();
    fs::write(&fresh, b"being written").unwrap();
    let long_ago = std::time::SystemTime::now() - kiln_cache::disk::STALE_TEMP_AGE * 2;
    fs::File::options().write(true).open(&old).unwrap().set_modified(long_ago).unwrap();
    Setup::new("exp", 116).fetch(CompileMode::Lazy, &disk).0.unwrap();
    assert!(!old.exists() && fresh.exists());
}
