//! Compiled programs, keyed by a blake3 hash of everything that changes the generated code:
//! the canonical graph text (sizes, dtypes and constants are in it), the input strides, the
//! target CPU and its features, the LLVM and Kiln versions and the compile options. Weights
//! are never baked into code (a graph's tensors are all inputs), so they are not in the key.
//!
//! Programs live in memory (one per key per process) and, when a [`DiskCache`] is given, on
//! disk as [`ProgramImage`]s that a later process loads without compiling.

pub mod disk;
pub mod entry;

pub use disk::DiskCache;
pub use entry::{EntryError, EntryHeader};

use dashmap::DashMap;
use kiln_compiler::{CompileOptions, CompiledProgram, Graph, ProgramImage, Target};
use once_cell::sync::OnceCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    pub fn new(graph: &Graph, input_strides: &[Vec<i64>], target: &Target, options: &CompileOptions) -> CacheKey {
        let mut h = blake3::Hasher::new();
        // Each field is length-prefixed so that no two different tuples hash the same bytes.
        let mut field = |tag: &str, bytes: &[u8]| {
            h.update(tag.as_bytes());
            h.update(&(bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field("graph", graph.to_string().as_bytes());
        field("strides", format!("{input_strides:?}").as_bytes());
        field("triple", target.triple.as_bytes());
        field("cpu", target.cpu.as_bytes());
        field("features", target.features.as_bytes());
        field("llvm", kiln_compiler::codegen::target::LLVM_VERSION.as_bytes());
        field("kiln", kiln_compiler::VERSION.as_bytes());
        field("options", format!("{options:?}").as_bytes());
        CacheKey(*h.finalize().as_bytes())
    }

    /// The key of the code for symbolic sizes compiled at the sizes `self` was made for: the
    /// same graph and strides, other code (it reads sizes from parameters). `symbols` says
    /// which input dims are symbols (the guard set's text).
    pub fn symbolic(&self, symbols: &str) -> CacheKey {
        let mut h = blake3::Hasher::new();
        h.update(b"symbolic");
        h.update(&self.0);
        h.update(&(symbols.len() as u64).to_le_bytes());
        h.update(symbols.as_bytes());
        CacheKey(*h.finalize().as_bytes())
    }

    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// When Kiln may compile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompileMode {
    /// Compile on a miss; cached code (memory, then disk) first. The default.
    Lazy,
    /// Only cached code runs; a miss falls back. For deployments that ship a prewarmed cache.
    Never,
    /// Compile every program this process has not compiled yet, ignoring disk entries (which
    /// are rewritten): refreshes a cache, or measures compiling.
    Always,
}

/// Where a program came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Memory,
    Disk,
    Compiled,
}

#[derive(thiserror::Error, Debug)]
pub enum FetchError {
    #[error("no cached code for this signature and compile='never'")]
    NotCached,
    #[error("compile error: {0}")]
    Compile(#[from] kiln_compiler::CompileError),
    #[error("loading code: {0}")]
    Load(String),
}

#[derive(Default)]
pub struct ProgramCache {
    map: DashMap<CacheKey, Arc<OnceCell<Arc<CompiledProgram>>>>,
    memory_hits: AtomicU64,
    disk_hits: AtomicU64,
    compiles: AtomicU64,
    disk_writes: AtomicU64,
    /// Problems with the disk cache (bad entries, failed writes), with counts; each is logged
    /// once. None of them stops a program from running.
    disk_problems: Mutex<BTreeMap<String, u64>>,
}

/// What [`ProgramCache::fetch`] needs besides the key.
pub struct Request<'a> {
    pub key: CacheKey,
    pub graph: &'a Graph,
    pub input_strides: &'a [Vec<i64>],
    /// The program to compile instead of lowering `graph`: code for symbolic sizes, rewritten
    /// by `kiln_compiler::lower::symbolic::infer` (its key made by [`CacheKey::symbolic`]).
    pub symbolic: Option<&'a kiln_compiler::lower::LoopProgram>,
    pub target: &'a Target,
    pub options: &'a CompileOptions,
    pub mode: CompileMode,
    pub disk: Option<&'a DiskCache>,
}

impl ProgramCache {
    /// The program for `req.key`: from memory, else from disk (unless compile='always'), else
    /// compiled (unless compile='never') and written to disk. One thread per key does the work;
    /// others wait for it. A memory hit also writes the program to a disk cache that lacks it,
    /// so prewarming a new directory works in a process that has already compiled.
    pub fn fetch(&self, req: &Request<'_>) -> Result<(Arc<CompiledProgram>, Source), FetchError> {
        let cell = self.map.entry(req.key).or_default().clone();
        let mut source = Source::Memory;
        let program = cell.get_or_try_init(|| self.produce(req, &mut source))?.clone();
        match source {
            Source::Memory => {
                self.memory_hits.fetch_add(1, Ordering::Relaxed);
                if let Some(disk) = req.disk.filter(|d| req.mode != CompileMode::Never && !d.contains(&req.key)) {
                    self.store(disk, &req.key, req.target, &program.image);
                }
            }
            Source::Disk => {
                self.disk_hits.fetch_add(1, Ordering::Relaxed);
            }
            Source::Compiled => {
                self.compiles.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok((program, source))
    }

    fn produce(&self, req: &Request<'_>, source: &mut Source) -> Result<Arc<CompiledProgram>, FetchError> {
        let header = EntryHeader::current(&req.key, req.target);
        if let Some(disk) = req.disk.filter(|_| req.mode != CompileMode::Always) {
            let start = Instant::now();
            match disk.load(&req.key, &header) {
                Ok(Some(image)) => match image.load() {
                    Ok(mut program) => {
                        program.compile_time = start.elapsed();
                        *source = Source::Disk;
                        return Ok(Arc::new(program));
                    }
                    Err(e) => self.problem(format!("cannot load cached code {}: {e}", disk.path(&req.key).display())),
                },
                Ok(None) => {}
                Err(e) => self.problem(e.to_string()),
            }
        }
        if req.mode == CompileMode::Never {
            return Err(FetchError::NotCached);
        }
        let start = Instant::now();
        let image = match req.symbolic {
            Some(lp) => kiln_compiler::compile_loop_program(lp, req.target, req.options)?,
            None => kiln_compiler::compile_image(req.graph, req.input_strides, req.target, req.options)?,
        };
        if let Some(disk) = req.disk {
            self.store(disk, &req.key, req.target, &image);
        }
        let mut program = image.load().map_err(FetchError::Load)?;
        program.compile_time = start.elapsed();
        *source = Source::Compiled;
        Ok(Arc::new(program))
    }

    /// Writes one entry, counting the write or the problem; true if written.
    fn store(&self, disk: &DiskCache, key: &CacheKey, target: &Target, image: &ProgramImage) -> bool {
        match disk.store(key, &EntryHeader::current(key, target), image) {
            Ok(()) => {
                self.disk_writes.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                self.problem(format!("cannot write to the cache directory {}: {e}", disk.dir().display()));
                false
            }
        }
    }

    fn problem(&self, what: String) {
        let mut p = self.disk_problems.lock().unwrap();
        let n = p.entry(what.clone()).or_insert(0);
        if *n == 0 {
            tracing::warn!("kiln cache: {what}");
        }
        *n += 1;
    }

    pub fn memory_hits(&self) -> u64 {
        self.memory_hits.load(Ordering::Relaxed)
    }
    pub fn disk_hits(&self) -> u64 {
        self.disk_hits.load(Ordering::Relaxed)
    }
    pub fn compiles(&self) -> u64 {
        self.compiles.load(Ordering::Relaxed)
    }
    pub fn disk_writes(&self) -> u64 {
        self.disk_writes.load(Ordering::Relaxed)
    }
    pub fn disk_problems(&self) -> BTreeMap<String, u64> {
        self.disk_problems.lock().unwrap().clone()
    }
    /// Programs in memory.
    pub fn len(&self) -> usize {
        self.map.iter().filter(|c| c.get().is_some()).count()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Every program in memory with its key (what `persist` writes).
    pub fn programs(&self) -> Vec<(CacheKey, Arc<CompiledProgram>)> {
        self.map.iter().filter_map(|c| Some((*c.key(), c.get()?.clone()))).collect()
    }
    /// Writes the programs in memory that `disk` lacks, of the keys `wanted` picks (what
    /// prewarming a directory needs when this process compiled before). Returns (entries
    /// written, entries already there).
    pub fn persist(&self, disk: &DiskCache, target: &Target, wanted: impl Fn(&CacheKey) -> bool) -> (usize, usize) {
        let (mut written, mut present) = (0, 0);
        for (key, program) in self.programs().into_iter().filter(|(k, _)| wanted(k)) {
            if disk.contains(&key) {
                present += 1;
            } else if self.store(disk, &key, target, &program.image) {
                written += 1;
            }
        }
        (written, present)
    }

    /// Forgets the counters; compiled programs stay (code in use cannot be unloaded).
    pub fn reset_counters(&self) {
        for c in [&self.memory_hits, &self.disk_hits, &self.compiles, &self.disk_writes] {
            c.store(0, Ordering::Relaxed);
        }
        self.disk_problems.lock().unwrap().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_compiler::graph::ir::parse_graph;

    const G: &str = "graph(%0: f32[4]) {\n %1 = exp(%0) : f32[4]\n return (%1)\n}";

    #[test]
    fn key_changes_with_each_part() {
        let g = parse_graph(G).unwrap();
        let t = Target { triple: "x86_64-unknown-linux-gnu".into(), cpu: "znver5".into(), features: "+avx512f".into() };
        let o = CompileOptions::default();
        let k = CacheKey::new(&g, &[vec![1]], &t, &o);
        assert_eq!(k, CacheKey::new(&parse_graph(G).unwrap(), &[vec![1]], &t, &o));
        assert_ne!(k, CacheKey::new(&parse_graph(&G.replace("exp", "log")).unwrap(), &[vec![1]], &t, &o));
        assert_ne!(k, k.symbolic("f32[s0] contiguous"));
        assert_ne!(k.symbolic("f32[s0] contiguous"), k.symbolic("f32[4] strides=[1]"));
        assert_ne!(k, CacheKey::new(&g, &[vec![2]], &t, &o));
        assert_ne!(k, CacheKey::new(&g, &[vec![1]], &Target { cpu: "znver4".into(), ..t.clone() }, &o));
        assert_ne!(k, CacheKey::new(&g, &[vec![1]], &Target { features: "-avx512f".into(), ..t.clone() }, &o));
        assert_ne!(k, CacheKey::new(&g, &[vec![1]], &t, &CompileOptions { pipeline: "default<O2>".into(), ..o.clone() }));
        assert_ne!(k, CacheKey::new(&g, &[vec![1]], &t, &CompileOptions { interleave: 1, ..o.clone() }));
    }

    fn request<'a>(g: &'a Graph, strides: &'a [Vec<i64>], t: &'a Target, o: &'a CompileOptions, mode: CompileMode, disk: Option<&'a DiskCache>) -> Request<'a> {
        Request { key: CacheKey::new(g, strides, t, o), graph: g, input_strides: strides, symbolic: None, target: t, options: o, mode, disk }
    }

    #[test]
    fn compiles_once_per_key() {
        let cache = ProgramCache::default();
        let g = parse_graph(G).unwrap();
        let (t, o, strides) = (Target::host(), CompileOptions::default(), [vec![1]]);
        let req = request(&g, &strides, &t, &o, CompileMode::Lazy, None);
        let (a, src_a) = cache.fetch(&req).unwrap();
        let (b, src_b) = cache.fetch(&req).unwrap();
        assert_eq!((src_a, src_b), (Source::Compiled, Source::Memory));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!((cache.memory_hits(), cache.compiles(), cache.len()), (1, 1, 1));
    }

    #[test]
    fn never_mode_compiles_nothing() {
        let cache = ProgramCache::default();
        let g = parse_graph(&G.replace("exp", "sqrt")).unwrap();
        let (t, o, strides) = (Target::host(), CompileOptions::default(), [vec![1]]);
        let req = request(&g, &strides, &t, &o, CompileMode::Never, None);
        assert!(matches!(cache.fetch(&req), Err(FetchError::NotCached)));
        assert_eq!((cache.compiles(), cache.len()), (0, 0));
    }
}
