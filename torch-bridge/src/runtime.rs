//! Kiln's process-wide state as the TorchScript bridge uses it: options, the regions the pass
//! handed over, their compiled specialisations, the program cache, counters and the reasons
//! code ran in TorchScript.
//!
//! A region is compiled when it first runs, for the input signature (dtype, sizes, strides)
//! it is called with: TorchScript profiles only the inputs of ops its own fuser knows, so
//! Kiln takes types from the live tensors ([`kiln_profiler`]) and guards on exactly those
//! ([`kiln_guards`]). A region holds up to `max_specializations` signatures; any other call
//! runs TorchScript's fallback. Regions are never freed: the graphs that name them by id live
//! as long as the process may call them.

use crate::aten;
use crate::ts_dump::{InputDecl, Region as Dump};
use kiln_cache::{CacheKey, CompileMode, DiskCache, ProgramCache, Request, Source};
use kiln_compiler::{CompileOptions, CompiledProgram, Target};
use kiln_guards::GuardSet;
use kiln_profiler::{GroupProfile, TensorMeta, TensorView};
use once_cell::sync::Lazy;
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Options {
    /// Distinct input signatures one region may be compiled for; other calls run TorchScript.
    pub max_specializations: usize,
    pub compile: CompileOptions,
    pub mode: CompileMode,
    /// Where compiled code is kept across processes; None: in memory only.
    pub disk: Option<Arc<DiskCache>>,
}

impl Default for Options {
    fn default() -> Self {
        Options { max_specializations: 8, compile: CompileOptions::default(), mode: CompileMode::Lazy, disk: None }
    }
}

/// A region compiled for one input signature.
pub struct Specialization {
    pub guards: GuardSet,
    pub program: Arc<CompiledProgram>,
    pub kiln_ir: String,
    pub cache_key: CacheKey,
    pub source: Source,
    /// Time to compile, or to load from disk; zero for a program found in memory.
    pub compile_time: Duration,
    /// (c10::ScalarType number, sizes) of each output, for the C++ side to allocate.
    pub outputs: Vec<(i32, Vec<i64>)>,
    pub runs: AtomicU64,
}

/// Signatures a region will not run in Kiln, and why (bounded: past the bound, any new
/// signature is refused without trying).
const MAX_REJECTED: usize = 64;

/// A signature a region refused, and why. Refusals hold until options change: `generation`
/// is the `enable()` they were made under (compile='never' refuses what a later 'lazy' takes).
pub struct Rejection {
    pub inputs: Vec<TensorMeta>,
    pub why: String,
    pub generation: u64,
}

/// A region of a TorchScript graph that the pass replaced by a guarded Kiln group.
pub struct Region {
    pub id: usize,
    pub dump: Dump,
    /// The ATen ops the region replaces, in graph order.
    pub nodes: Vec<String>,
    pub specs: RwLock<Vec<Arc<Specialization>>>,
    pub rejected: Mutex<Vec<Rejection>>,
    /// Every signature the group was asked to specialise for (bounded), compiled or not:
    /// which dims moved. Dynamic shapes will be decided from it.
    pub profile: Mutex<GroupProfile>,
    pub guard_passes: AtomicU64,
    pub guard_failures: AtomicU64,
}

#[derive(Default)]
struct Counters {
    guard_passes: AtomicU64,
    guard_failures: AtomicU64,
    runs: AtomicU64,
    pass_runs: AtomicU64,
    specializations: AtomicU64,
}

#[derive(Default)]
struct Reasons {
    /// Why code ran in TorchScript, with how often; ids index `texts`.
    texts: Vec<String>,
    ids: HashMap<String, usize>,
    counts: BTreeMap<String, u64>,
    logged: HashSet<String>,
}

pub struct Runtime {
    pub options: RwLock<Options>,
    /// Off after `disable()`: nothing new is compiled.
    pub compiling: std::sync::atomic::AtomicBool,
    /// Counts `enable()` calls; see [`Rejection`].
    pub generation: AtomicU64,
    regions: RwLock<Vec<&'static Region>>,
    pub cache: ProgramCache,
    target: Target,
    counters: Counters,
    reasons: Mutex<Reasons>,
}

pub static RUNTIME: Lazy<Runtime> = Lazy::new(|| Runtime {
    options: RwLock::new(Options::default()),
    compiling: std::sync::atomic::AtomicBool::new(true),
    generation: AtomicU64::new(0),
    regions: RwLock::new(vec![]),
    cache: ProgramCache::default(),
    target: Target::host(),
    counters: Counters::default(),
    reasons: Mutex::new(Reasons::default()),
});

thread_local! {
    /// (region id, specialisation index) chosen by this thread's last passing guard: the
    /// group op runs right after its guard, on the same thread.
    static SELECTED: Cell<(usize, usize)> = const { Cell::new((usize::MAX, 0)) };
}

/// What `stats()` reports.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub groups: usize,
    pub specializations: u64,
    pub compiles: u64,
    pub cache_hits: u64,
    pub disk_hits: u64,
    pub disk_writes: u64,
    /// Problems with the disk cache (none stops a program), with counts.
    pub disk_problems: BTreeMap<String, u64>,
    /// Time spent compiling, and loading code from the disk cache.
    pub compile_time: Duration,
    pub disk_load_time: Duration,
    pub guard_passes: u64,
    pub guard_failures: u64,
    pub runs: u64,
    pub pass_runs: u64,
    /// Why code ran in TorchScript, with counts.
    pub fallbacks: BTreeMap<String, u64>,
}

fn decl(m: &TensorMeta) -> Result<InputDecl, String> {
    if m.device != kiln_profiler::Device::Cpu {
        return Err("an input is not on the CPU".into());
    }
    if m.requires_grad {
        return Err("an input requires grad (Kiln computes no gradients)".into());
    }
    let dtype = m.dtype.ok_or_else(|| "an input's dtype is not supported".to_string())?;
    Ok(InputDecl { dtype: Ok(dtype), sizes: m.sizes.clone(), strides: m.strides.clone() })
}

impl Runtime {
    pub fn region(&self, id: usize) -> Option<&'static Region> {
        self.regions.read().unwrap().get(id).copied()
    }

    /// Registers a region the pass wants to group. Where TorchScript profiled every input,
    /// the region is lowered now so that an unsupported one is never grouped.
    pub fn register(&self, dump_text: &str) -> Result<&'static Region, String> {
        let dump = crate::ts_dump::parse(dump_text)?;
        if dump.inputs().all(Option::is_some) {
            aten::lower(&dump)?;
        }
        let mut regions = self.regions.write().unwrap();
        let region: &'static Region = Box::leak(Box::new(Region {
            id: regions.len(),
            nodes: dump.node_kinds(),
            dump,
            specs: RwLock::new(vec![]),
            rejected: Mutex::new(vec![]),
            profile: Mutex::new(GroupProfile::default()),
            guard_passes: AtomicU64::new(0),
            guard_failures: AtomicU64::new(0),
        }));
        regions.push(region);
        Ok(region)
    }

    /// The guard of one call: true if a specialisation (existing, or compiled now for these
    /// inputs) will run it.
    pub fn guard(&self, r: &Region, inputs: &[TensorView<'_>]) -> bool {
        let found = r.specs.read().unwrap().iter().position(|s| s.guards.check(inputs).is_ok());
        let chosen = match found {
            Some(i) => Some(i),
            None => self.specialize(r, inputs),
        };
        match chosen {
            Some(i) => {
                SELECTED.with(|s| s.set((r.id, i)));
                r.guard_passes.fetch_add(1, Ordering::Relaxed);
                self.counters.guard_passes.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => {
                r.guard_failures.fetch_add(1, Ordering::Relaxed);
                self.counters.guard_failures.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// A call no specialisation accepts: compile one for it, or say why not (once per
    /// signature; later calls with it are refused at once).
    #[cold]
    fn specialize(&self, r: &Region, inputs: &[TensorView<'_>]) -> Option<usize> {
        let metas: Vec<TensorMeta> = inputs.iter().map(TensorMeta::from).collect();
        // Held while compiling: one thread compiles a signature, others wait and reuse it.
        let mut rejected = r.rejected.lock().unwrap();
        if let Some(i) = r.specs.read().unwrap().iter().position(|s| s.guards.check(inputs).is_ok()) {
            return Some(i);
        }
        let generation = self.generation.load(Ordering::Relaxed);
        rejected.retain(|r| r.generation == generation);
        if let Some(r) = rejected.iter().find(|r| r.inputs == metas) {
            self.note(&r.why);
            return None;
        }
        {
            let mut profile = r.profile.lock().unwrap();
            if profile.signatures.len() < MAX_REJECTED {
                profile.observe(inputs);
            }
        }
        if !self.compiling.load(Ordering::Relaxed) {
            // Not remembered as rejected: after enable() this signature may compile.
            self.note("group not run: Kiln is disabled (no new specialisations)");
            return None;
        }
        let max = self.options.read().unwrap().max_specializations;
        let attempt = if rejected.len() >= MAX_REJECTED {
            Err(format!("more than {MAX_REJECTED} input signatures refused for this group"))
        } else if r.specs.read().unwrap().len() >= max {
            Err(format!("specialisation limit ({max}) reached for this group"))
        } else {
            self.compile(r, &metas)
        };
        match attempt {
            Ok(spec) => {
                let mut specs = r.specs.write().unwrap();
                specs.push(Arc::new(spec));
                self.counters.specializations.fetch_add(1, Ordering::Relaxed);
                Some(specs.len() - 1)
            }
            Err(why) => {
                let why = format!("group not run: {why}");
                self.note(&why);
                if rejected.len() < MAX_REJECTED {
                    rejected.push(Rejection { inputs: metas, why, generation });
                }
                None
            }
        }
    }

    fn compile(&self, r: &Region, metas: &[TensorMeta]) -> Result<Specialization, String> {
        let live: Vec<InputDecl> = metas.iter().map(decl).collect::<Result<_, _>>()?;
        let lowered = aten::lower(&r.dump.with_inputs(&live))?;
        let guards = GuardSet::for_inputs(metas).ok_or("an input cannot be guarded")?;
        let options = self.options.read().unwrap().clone();
        let key = CacheKey::new(&lowered.graph, &lowered.input_strides, &self.target, &options.compile);
        let request = Request {
            key,
            graph: &lowered.graph,
            input_strides: &lowered.input_strides,
            target: &self.target,
            options: &options.compile,
            mode: options.mode,
            disk: options.disk.as_deref(),
        };
        let (program, source) = self.cache.fetch(&request).map_err(|e| e.to_string())?;
        let spec = Specialization {
            guards,
            outputs: program.outputs().map(|b| (aten::scalar_type_code(b.dtype), b.sizes.clone())).collect(),
            compile_time: if source == Source::Memory { Duration::ZERO } else { program.compile_time },
            program,
            kiln_ir: lowered.graph.to_string(),
            cache_key: key,
            source,
            runs: AtomicU64::new(0),
        };
        tracing::debug!(group = r.id, ?source, ms = spec.compile_time.as_secs_f64() * 1e3, "specialised group\n{}", spec.kiln_ir);
        Ok(spec)
    }

    /// The specialisation this thread's last passing guard chose for group `r`, if that guard
    /// was `r`'s (the group op runs right after its guard, on the same thread).
    pub fn chosen_by_guard(&self, r: &Region) -> Option<Arc<Specialization>> {
        let (rid, i) = SELECTED.with(Cell::get);
        if rid != r.id {
            return None;
        }
        r.specs.read().unwrap().get(i).cloned()
    }

    /// The first specialisation of `r` that accepts `inputs` (when another group's guard ran
    /// between `r`'s guard and `r`).
    pub fn first_accepting(&self, r: &Region, inputs: &[TensorView<'_>]) -> Option<Arc<Specialization>> {
        r.specs.read().unwrap().iter().find(|s| s.guards.check(inputs).is_ok()).cloned()
    }

    pub fn count_run(&self, s: &Specialization) {
        s.runs.fetch_add(1, Ordering::Relaxed);
        self.counters.runs.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_pass_run(&self) {
        self.counters.pass_runs.fetch_add(1, Ordering::Relaxed);
    }

    /// Records one occurrence of a reason code ran in TorchScript; logs each reason once.
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

    /// Writes the programs of `keys` that `disk` lacks; see [`ProgramCache::persist`].
    pub fn persist(&self, disk: &DiskCache, keys: &[CacheKey]) -> (usize, usize) {
        self.cache.persist(disk, &self.target, |k| keys.contains(k))
    }

    /// (cache key, runs) of every specialisation of every group.
    pub fn specialization_runs(&self) -> Vec<(CacheKey, u64)> {
        let regions = self.regions.read().unwrap();
        regions.iter().flat_map(|r| r.specs.read().unwrap().iter().map(|s| (s.cache_key, s.runs.load(Ordering::Relaxed))).collect::<Vec<_>>()).collect()
    }

    pub fn stats(&self) -> Stats {
        let regions = self.regions.read().unwrap();
        let time_from = |source: Source| -> Duration {
            regions.iter().flat_map(|r| r.specs.read().unwrap().iter().filter(|s| s.source == source).map(|s| s.compile_time).collect::<Vec<_>>()).sum()
        };
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            groups: regions.len(),
            specializations: load(&self.counters.specializations),
            compiles: self.cache.compiles(),
            cache_hits: self.cache.memory_hits(),
            disk_hits: self.cache.disk_hits(),
            disk_writes: self.cache.disk_writes(),
            disk_problems: self.cache.disk_problems(),
            compile_time: time_from(Source::Compiled),
            disk_load_time: time_from(Source::Disk),
            guard_passes: load(&self.counters.guard_passes),
            guard_failures: load(&self.counters.guard_failures),
            runs: load(&self.counters.runs),
            pass_runs: load(&self.counters.pass_runs),
            fallbacks: self.reasons.lock().unwrap().counts.clone(),
        }
    }

    /// Zeroes counters and forgets the reasons' counts. Compiled code stays loaded (graphs in
    /// use may still call it) and cached.
    pub fn reset(&self) {
        let c = &self.counters;
        for a in [&c.guard_passes, &c.guard_failures, &c.runs, &c.pass_runs, &c.specializations] {
            a.store(0, Ordering::Relaxed);
        }
        self.cache.reset_counters();
        let mut r = self.reasons.lock().unwrap();
        r.counts.clear();
        r.logged.clear();
        drop(r);
        for region in self.regions.read().unwrap().iter() {
            region.guard_passes.store(0, Ordering::Relaxed);
            region.guard_failures.store(0, Ordering::Relaxed);
            for s in region.specs.read().unwrap().iter() {
                s.runs.store(0, Ordering::Relaxed);
            }
        }
    }
}
