//! Kiln's process-wide state as the TorchScript bridge uses it: options, the compiled groups,
//! the program cache, counters and the reasons code stayed in TorchScript.
//!
//! Groups are never freed: the TorchScript graphs that name them by id live as long as the
//! process may call them. `reset` clears counters and reasons only.

use crate::aten;
use crate::ts_dump;
use kiln_cache::{CacheKey, ProgramCache};
use kiln_compiler::{CompileOptions, CompiledProgram, Target};
use kiln_guards::{GuardFailure, GuardSet};
use kiln_profiler::{GroupProfile, TensorMeta, TensorView};
use once_cell::sync::Lazy;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Options {
    /// Distinct specialisations (input signatures) one region may be compiled for; past it the
    /// region stays in TorchScript.
    pub max_specializations: usize,
    pub compile: CompileOptions,
}

impl Default for Options {
    fn default() -> Self {
        Options { max_specializations: 8, compile: CompileOptions::default() }
    }
}

/// One compiled group: a region of a TorchScript graph specialised for one input signature.
pub struct Group {
    pub id: usize,
    pub program: Arc<CompiledProgram>,
    pub guards: GuardSet,
    /// The ATen ops the group replaces, in graph order.
    pub nodes: Vec<String>,
    pub kiln_ir: String,
    pub cache_key: CacheKey,
    pub cache_hit: bool,
    pub compile_time: Duration,
    /// (c10::ScalarType number, sizes) of each output, for the C++ side to allocate.
    pub outputs: Vec<(i32, Vec<i64>)>,
    pub specialization: usize,
    pub guard_passes: AtomicU64,
    pub guard_failures: AtomicU64,
    pub runs: AtomicU64,
    /// Signatures seen at failed guards (bounded), and why each failed.
    pub rejected: Mutex<(GroupProfile, BTreeMap<String, u64>)>,
}

#[derive(Default)]
struct Counters {
    guard_passes: AtomicU64,
    guard_failures: AtomicU64,
    runs: AtomicU64,
    pass_runs: AtomicU64,
}

#[derive(Default)]
struct Reasons {
    /// Why code stayed in TorchScript, with how often; ids index `texts`.
    texts: Vec<String>,
    ids: HashMap<String, usize>,
    counts: BTreeMap<String, u64>,
    logged: HashSet<String>,
}

pub struct Runtime {
    pub options: RwLock<Options>,
    groups: RwLock<Vec<&'static Group>>,
    /// Specialisations compiled per region family (the region without its tensor types).
    families: Mutex<HashMap<String, usize>>,
    pub cache: ProgramCache,
    target: Target,
    counters: Counters,
    reasons: Mutex<Reasons>,
}

pub static RUNTIME: Lazy<Runtime> = Lazy::new(|| Runtime {
    options: RwLock::new(Options::default()),
    groups: RwLock::new(vec![]),
    families: Mutex::new(HashMap::new()),
    cache: ProgramCache::default(),
    target: Target::host(),
    counters: Counters::default(),
    reasons: Mutex::new(Reasons::default()),
});

/// What `stats()` reports.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub groups: usize,
    pub compiles: u64,
    pub cache_hits: u64,
    pub compile_time: Duration,
    pub guard_passes: u64,
    pub guard_failures: u64,
    pub runs: u64,
    pub pass_runs: u64,
    /// Why code stayed in (or went back to) TorchScript, with counts.
    pub fallbacks: BTreeMap<String, u64>,
}

impl Runtime {
    pub fn group(&self, id: usize) -> Option<&'static Group> {
        self.groups.read().unwrap().get(id).copied()
    }

    /// Turns a dumped region into a compiled, guarded group, or says why not.
    pub fn prepare(&self, dump: &str) -> Result<&'static Group, String> {
        let region = ts_dump::parse(dump)?;
        let lowered = aten::lower(&region)?;
        let metas: Vec<TensorMeta> = region
            .items
            .iter()
            .filter_map(|i| match i {
                ts_dump::Item::Input(d) => Some(TensorMeta {
                    dtype: d.dtype.clone().ok(),
                    device: kiln_profiler::Device::Cpu,
                    sizes: d.sizes.clone(),
                    strides: d.strides.clone(),
                    requires_grad: false,
                }),
                _ => None,
            })
            .collect();
        let guards = GuardSet::for_inputs(&metas).ok_or("an input cannot be guarded")?;
        let options = self.options.read().unwrap().clone();
        let specialization = {
            let mut families = self.families.lock().unwrap();
            let n = families.entry(ts_dump::family_key(dump)).or_insert(0);
            if *n >= options.max_specializations {
                return Err(format!("specialisation limit ({}) reached for this region", options.max_specializations));
            }
            *n += 1;
            *n
        };
        let key = CacheKey::new(&lowered.graph, &lowered.input_strides, &self.target, &options.compile);
        let (program, cache_hit) = self
            .cache
            .get_or_compile(key, || kiln_compiler::compile(&lowered.graph, &lowered.input_strides, &self.target, &options.compile))
            .map_err(|e| {
                self.families.lock().unwrap().entry(ts_dump::family_key(dump)).and_modify(|n| *n -= 1);
                format!("compile error: {e}")
            })?;
        let outputs = program.outputs().map(|b| (aten::scalar_type_code(b.dtype), b.sizes.clone())).collect();
        let nodes = region
            .items
            .iter()
            .filter_map(|i| match i {
                ts_dump::Item::Node { kind, .. } => Some(kind.clone()),
                _ => None,
            })
            .collect();
        let mut groups = self.groups.write().unwrap();
        let group: &'static Group = Box::leak(Box::new(Group {
            id: groups.len(),
            compile_time: if cache_hit { Duration::ZERO } else { program.compile_time },
            program,
            guards,
            nodes,
            kiln_ir: lowered.graph.to_string(),
            cache_key: key,
            cache_hit,
            outputs,
            specialization,
            guard_passes: AtomicU64::new(0),
            guard_failures: AtomicU64::new(0),
            runs: AtomicU64::new(0),
            rejected: Mutex::new(Default::default()),
        }));
        groups.push(group);
        tracing::debug!(group = group.id, cache_hit, ms = group.compile_time.as_secs_f64() * 1e3, "compiled group\n{}", group.kiln_ir);
        Ok(group)
    }

    /// The guard of group `g` on one call. Counts, and records why it failed.
    pub fn guard(&self, g: &Group, inputs: &[TensorView<'_>]) -> bool {
        match g.guards.check(inputs) {
            Ok(()) => {
                g.guard_passes.fetch_add(1, Ordering::Relaxed);
                self.counters.guard_passes.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(failure) => {
                g.guard_failures.fetch_add(1, Ordering::Relaxed);
                self.counters.guard_failures.fetch_add(1, Ordering::Relaxed);
                self.guard_failed(g, inputs, &failure);
                false
            }
        }
    }

    #[cold]
    fn guard_failed(&self, g: &Group, inputs: &[TensorView<'_>], failure: &GuardFailure) {
        const MAX_SIGNATURES: usize = 32;
        let mut rejected = g.rejected.lock().unwrap();
        if rejected.0.signatures.len() < MAX_SIGNATURES {
            rejected.0.observe(inputs);
        }
        *rejected.1.entry(failure.to_string()).or_insert(0) += 1;
        drop(rejected);
        self.note(&format!("guard failed ({}), ran TorchScript's nodes", failure.kind()));
    }

    pub fn count_run(&self, g: &Group) {
        g.runs.fetch_add(1, Ordering::Relaxed);
        self.counters.runs.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_pass_run(&self) {
        self.counters.pass_runs.fetch_add(1, Ordering::Relaxed);
    }

    /// Records one occurrence of a reason code stayed in TorchScript; logs each reason once.
    /// Returns the reason's id (stable for the process).
    pub fn note(&self, reason: &str) -> usize {
        let mut r = self.reasons.lock().unwrap();
        *r.counts.entry(reason.to_string()).or_insert(0) += 1;
        if r.logged.insert(reason.to_string()) {
            tracing::info!("kiln fallback: {reason}");
        }
        if let Some(&id) = r.ids.get(reason) {
            return id;
        }
        let id = r.texts.len();
        r.texts.push(reason.to_string());
        r.ids.insert(reason.to_string(), id);
        id
    }

    pub fn reason_text(&self, id: usize) -> Option<String> {
        self.reasons.lock().unwrap().texts.get(id).cloned()
    }

    pub fn stats(&self) -> Stats {
        let groups = self.groups.read().unwrap();
        Stats {
            groups: groups.len(),
            compiles: self.cache.misses(),
            cache_hits: self.cache.hits(),
            compile_time: groups.iter().map(|g| g.compile_time).sum(),
            guard_passes: self.counters.guard_passes.load(Ordering::Relaxed),
            guard_failures: self.counters.guard_failures.load(Ordering::Relaxed),
            runs: self.counters.runs.load(Ordering::Relaxed),
            pass_runs: self.counters.pass_runs.load(Ordering::Relaxed),
            fallbacks: self.reasons.lock().unwrap().counts.clone(),
        }
    }

    /// Zeroes counters and forgets reasons' counts and specialisation counts. Compiled code
    /// stays loaded (graphs in use may still call it) and stays in the cache.
    pub fn reset(&self) {
        for c in [&self.counters.guard_passes, &self.counters.guard_failures, &self.counters.runs, &self.counters.pass_runs] {
            c.store(0, Ordering::Relaxed);
        }
        self.cache.reset_counters();
        let mut r = self.reasons.lock().unwrap();
        r.counts.clear();
        r.logged.clear();
        drop(r);
        self.families.lock().unwrap().clear();
        for g in self.groups.read().unwrap().iter() {
            g.guard_passes.store(0, Ordering::Relaxed);
            g.guard_failures.store(0, Ordering::Relaxed);
            g.runs.store(0, Ordering::Relaxed);
        }
    }
}
