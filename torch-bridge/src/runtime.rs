//! Kiln's process-wide state as the TorchScript bridge uses it: options, the regions the pass
//! handed over, their compiled specialisations, the program cache, counters and the reasons
//! code ran in TorchScript.
//!
//! A region is compiled when it first runs, for the input signature (dtype, sizes, strides)
//! it is called with: TorchScript profiles only the inputs of ops its own fuser knows, so
//! Kiln takes types from the live tensors ([`kiln_profiler`]) and guards on exactly those
//! ([`kiln_guards`]). Once a dim has been seen with two sizes (`dynamic="auto"`), or from the
//! first call (`"always"`), the region is compiled for symbolic sizes where its code allows
//! (`kiln_compiler::lower::symbolic`): one specialisation then serves every size ≥ 2 of those dims.
//! A region holds up to `max_specializations` specialisations; any other call runs
//! TorchScript's fallback. Regions are never freed: the graphs that name them by id live as
//! long as the process may call them.

use crate::aten;
use crate::background::{Job, QUEUE};
use crate::ts_dump::{InputDecl, Region as Dump};
use kiln_cache::{CacheKey, CompileMode, DiskCache, ProgramCache, Request, Source};
use kiln_compiler::lower::symbolic::{self, SymbolicShapes};
use kiln_compiler::lower::LoopProgram;
use kiln_compiler::phases::Phase;
use kiln_compiler::{CompileOptions, CompiledProgram, Target};
use kiln_guards::{DimGuard, GuardSet, StrideGuard};
use kiln_profiler::{DimPlan, GlobalState, GroupProfile, TensorMeta, TensorView};
use once_cell::sync::Lazy;
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// When a region gets code for symbolic sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dynamic {
    /// Once a dim has been seen with two sizes: that dim becomes symbolic.
    Auto,
    /// Never: code for each signature.
    Static,
    /// From the first call: every dim of size ≥ 2 is symbolic where the code allows.
    Always,
}

#[derive(Clone, Debug)]
pub struct Options {
    /// Distinct input signatures one region may be compiled for; other calls run TorchScript.
    pub max_specializations: usize,
    pub compile: CompileOptions,
    pub mode: CompileMode,
    pub dynamic: Dynamic,
    /// Where compiled code is kept across processes; None: in memory only.
    pub disk: Option<Arc<DiskCache>>,
    /// Compile on Kiln's compile thread while the call that needs the code runs TorchScript
    /// (`background.rs`); false: the call waits for its compile.
    pub background: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { max_specializations: 8, compile: CompileOptions::default(), mode: CompileMode::Lazy, dynamic: Dynamic::Auto, disk: None, background: true }
    }
}

/// How a specialisation compiled for symbolic sizes runs at the sizes of a call.
pub struct SymbolicRun {
    pub shapes: SymbolicShapes,
    /// The symbols' values the code was compiled at.
    pub samples: Vec<i64>,
    /// c10::ScalarType number of each output (sizes and strides follow the symbols:
    /// `CompiledProgram::run_symbolic` computes them).
    pub outputs: Vec<i32>,
}

/// Symbolic code found for a region, before it is compiled: its guards, the region lowered at
/// the first sample, how it runs at other sizes, and its loop program reading parameters.
type SymbolicCode = (GuardSet, aten::Lowered, SymbolicRun, LoopProgram);

/// `plan` with the symbols `keep(symbol, size in metas)` rejects made static at their size.
fn restrict(plan: &[Vec<DimPlan>], metas: &[TensorMeta], keep: impl Fn(u32, i64) -> bool) -> Vec<Vec<DimPlan>> {
    plan.iter()
        .zip(metas)
        .map(|(dims, m)| {
            dims.iter()
                .zip(&m.sizes)
                .map(|(p, &n)| match *p {
                    DimPlan::Symbol(k) if keep(k, n) => DimPlan::Symbol(k),
                    _ => DimPlan::Static(n),
                })
                .collect()
        })
        .collect()
}

/// A region compiled for one input signature, or for every signature its symbolic guard
/// accepts.
pub struct Specialization {
    pub guards: GuardSet,
    pub symbolic: Option<SymbolicRun>,
    pub program: Arc<CompiledProgram>,
    pub kiln_ir: String,
    /// How each constant weight with zeros is multiplied, and why (`aten::Lowered`).
    pub weight_choices: Vec<String>,
    pub cache_key: CacheKey,
    pub source: Source,
    /// Time to compile, or to load from disk; zero for a program found in memory.
    pub compile_time: Duration,
    /// (c10::ScalarType number, sizes, strides or None for contiguous) of each output, for
    /// the C++ side to allocate.
    pub outputs: Vec<(i32, Vec<i64>, Option<Vec<i64>>)>,
    pub runs: AtomicU64,
    /// Packed copies of the program's weights, kept between calls (`packed.rs`).
    pub weights: crate::packed::PackedWeights,
}

/// Signatures a region will not run in Kiln, and why (bounded: past the bound, any new
/// signature is refused without trying).
const MAX_REJECTED: usize = 64;

/// A signature a region refused, and why. Refusals hold until options change: `generation`
/// is the `enable()` they were made under (compile='never' refuses what a later 'lazy' takes).
pub struct Rejection {
    pub inputs: Vec<TensorMeta>,
    pub state: GlobalState,
    pub why: String,
    pub generation: u64,
}

/// Why a group past `max_specializations` takes no new signature (both miss paths say it).
fn limit_reached(max: usize) -> String {
    format!("specialisation limit ({max}) reached for this group")
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
    /// which dims moved, from which the dynamic policy makes its plan (`dim_plan`).
    pub profile: Mutex<GroupProfile>,
    /// Dim plans whose symbolic code was refused under a state, and why (not tried again).
    pub symbolic_refused: Mutex<Vec<(Vec<Vec<DimPlan>>, GlobalState, String)>>,
    pub guard_passes: AtomicU64,
    /// Calls no existing specialisation accepted (then specialised for, or failed).
    pub guard_misses: AtomicU64,
    pub guard_failures: AtomicU64,
    /// The signature of the region's compile queued or running on the compile thread.
    pub pending: Mutex<Option<Vec<TensorMeta>>>,
}

impl Region {
    pub fn clear_pending(&self) {
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// Everything `stats()` counts; `reset()` zeroes all of it.
#[derive(Default)]
struct Counters {
    groups: AtomicU64,
    /// Nanoseconds spent compiling, and loading code from the disk cache.
    compile_ns: AtomicU64,
    disk_load_ns: AtomicU64,
    guard_passes: AtomicU64,
    guard_misses: AtomicU64,
    guard_failures: AtomicU64,
    runs: AtomicU64,
    pass_runs: AtomicU64,
    specializations: AtomicU64,
    symbolic_specializations: AtomicU64,
}

#[derive(Default)]
struct Reasons {
    /// Why code ran in TorchScript, with how often; ids index `texts`.
    texts: Vec<String>,
    ids: HashMap<String, usize>,
    counts: BTreeMap<String, u64>,
    logged: HashSet<String>,
    /// Per block with nodes left in TorchScript: their reason ids, and whether it ran (its
    /// fallbacks are counted then, once).
    blocks: Vec<(Vec<usize>, bool)>,
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
    /// Groups the pass made.
    pub groups: usize,
    pub specializations: u64,
    /// Specialisations compiled for symbolic sizes.
    pub symbolic_specializations: u64,
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
    pub guard_misses: u64,
    pub guard_failures: u64,
    pub runs: u64,
    pub pass_runs: u64,
    /// Why code ran in TorchScript, with counts.
    pub fallbacks: BTreeMap<String, u64>,
}

/// `state` in words, with libtorch's names for its dtypes (what `explain` shows).
pub fn state_text(state: &GlobalState) -> String {
    let name = |code: i32| crate::ffi::scalar_type_name(code);
    let default = match state.default_float {
        Ok(d) => name(aten::scalar_type_code(d)),
        Err(code) => name(code),
    };
    match state.autocast {
        Some(code) => format!("default dtype {default}, CPU autocast to {}", name(code)),
        None => format!("default dtype {default}, no autocast"),
    }
}

fn decl(m: &TensorMeta) -> Result<InputDecl, String> {
    if m.device != kiln_profiler::Device::Cpu {
        return Err("an input is not on the CPU".into());
    }
    if m.requires_grad {
        return Err("an input requires grad (Kiln computes no gradients)".into());
    }
    let dtype = m.dtype.ok_or_else(|| "an input's dtype is not supported".to_string())?;
    Ok(InputDecl { dtype: Ok(dtype), sizes: m.sizes.clone(), strides: m.strides.clone(), number: false })
}

impl Runtime {
    pub fn region(&self, id: usize) -> Option<&'static Region> {
        self.regions.read().unwrap_or_else(|e| e.into_inner()).get(id).copied()
    }

    /// Registers a region the pass wants to group. Where TorchScript profiled every input,
    /// the region is lowered now so that an unsupported one is never grouped.
    pub fn register(&self, dump_text: &str) -> Result<&'static Region, String> {
        let dump = crate::ts_dump::parse(dump_text)?;
        if dump.inputs().all(Option::is_some) {
            aten::lower(&dump)?;
        }
        let mut regions = self.regions.write().unwrap_or_else(|e| e.into_inner());
        let region: &'static Region = Box::leak(Box::new(Region {
            id: regions.len(),
            nodes: dump.node_kinds(),
            dump,
            specs: RwLock::new(vec![]),
            rejected: Mutex::new(vec![]),
            profile: Mutex::new(GroupProfile::default()),
            symbolic_refused: Mutex::new(vec![]),
            guard_passes: AtomicU64::new(0),
            guard_misses: AtomicU64::new(0),
            guard_failures: AtomicU64::new(0),
            pending: Mutex::new(None),
        }));
        regions.push(region);
        self.counters.groups.fetch_add(1, Ordering::Relaxed);
        Ok(region)
    }

    /// The guard of one call: true if a specialisation (existing, or compiled now for these
    /// inputs) will run it.
    pub fn guard(&self, r: &'static Region, inputs: &[TensorView<'_>], state: &GlobalState) -> bool {
        let found = r.specs.read().unwrap_or_else(|e| e.into_inner()).iter().position(|s| s.guards.check(inputs, state).is_ok());
        let chosen = match found {
            Some(i) => Some(i),
            None => {
                r.guard_misses.fetch_add(1, Ordering::Relaxed);
                self.counters.guard_misses.fetch_add(1, Ordering::Relaxed);
                self.specialize(r, inputs, state)
            }
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

    /// A call the C++ side refused before any guard (a tensor generated code must not read,
    /// or a state no Kiln code may run under): counted as a guard failure, with its reason.
    /// Returns false (the call runs TorchScript's nodes).
    #[cold]
    pub fn refuse(&self, r: &Region, why: &str) -> bool {
        r.guard_failures.fetch_add(1, Ordering::Relaxed);
        self.counters.guard_failures.fetch_add(1, Ordering::Relaxed);
        self.note(&format!("group not run: {why}"));
        false
    }

    /// A call no specialisation accepts: compile one for it (or, in the background, queue its
    /// compile and return None), or say why not (once per signature; later calls with it are
    /// refused at once).
    #[cold]
    fn specialize(&self, r: &'static Region, inputs: &[TensorView<'_>], state: &GlobalState) -> Option<usize> {
        let metas: Vec<TensorMeta> = inputs.iter().map(TensorMeta::from).collect();
        let (background, mode) = {
            let o = self.options.read().unwrap_or_else(|e| e.into_inner());
            (o.background, o.mode)
        };
        // compile='never' compiles nothing: its misses only look in the caches, at once.
        if background && mode != CompileMode::Never {
            return self.queue_compile(r, inputs, metas, state);
        }
        self.specialize_now(r, inputs, metas, state)
    }

    /// The background path of a miss: the call runs TorchScript now, and its group's compile
    /// is queued unless one is pending already (or the signature was refused before).
    fn queue_compile(&self, r: &'static Region, inputs: &[TensorView<'_>], metas: Vec<TensorMeta>, state: &GlobalState) -> Option<usize> {
        let waiting = || {
            QUEUE.counts.waited.fetch_add(1, Ordering::Relaxed);
            None
        };
        let mut pending = r.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.is_some() {
            drop(pending);
            // The job sees this call's sizes in the profile when it runs.
            self.observe(r, inputs);
            QUEUE.wake();
            return waiting();
        }
        // Not pending, so no job holds the lock for long.
        let rejected = r.rejected.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = r.specs.read().unwrap_or_else(|e| e.into_inner()).iter().position(|s| s.guards.check(inputs, state).is_ok()) {
            return Some(i);
        }
        let generation = self.generation.load(Ordering::Relaxed);
        if let Some(r) = rejected.iter().find(|r| r.generation == generation && r.inputs == metas && r.state == *state) {
            self.note(&r.why);
            return None;
        }
        drop(rejected);
        if !self.compiling.load(Ordering::Relaxed) {
            self.note("group not run: Kiln is disabled (no new specialisations)");
            return None;
        }
        // Past the limit nothing is queued (the job would be dropped, and the next call queue
        // another): the call is refused as a synchronous miss would be.
        let max = self.options.read().unwrap_or_else(|e| e.into_inner()).max_specializations;
        if r.specs.read().unwrap_or_else(|e| e.into_inner()).len() >= max {
            self.observe(r, inputs);
            self.note(&format!("group not run: {}", limit_reached(max)));
            return None;
        }
        // Code a cache holds runs now (this call included); only compiling is queued.
        self.observe(r, inputs);
        if let Some(spec) = self.cached(r, &metas, state) {
            return Some(self.land(r, spec));
        }
        *pending = Some(metas.clone());
        drop(pending);
        if !QUEUE.push(Job { region: r, metas, state: *state, generation }) {
            r.clear_pending();
        }
        waiting()
    }

    /// Runs a queued compile; false if it was no longer wanted (dropped).
    pub fn run_job(&self, job: Job) -> bool {
        let r = job.region;
        let wanted = job.generation == self.generation.load(Ordering::Relaxed) && self.compiling.load(Ordering::Relaxed);
        let views: Vec<TensorView<'_>> = job.metas.iter().map(TensorMeta::view).collect();
        let ran = wanted && {
            let max = self.options.read().unwrap_or_else(|e| e.into_inner()).max_specializations;
            let specs = r.specs.read().unwrap_or_else(|e| e.into_inner());
            // Past its limit, or served by a specialisation that landed since: not wanted.
            specs.len() < max && !specs.iter().any(|s| s.guards.check(&views, &job.state).is_ok())
        };
        if ran {
            self.specialize_now(r, &views, job.metas.clone(), &job.state);
        }
        r.clear_pending();
        ran
    }

    fn observe(&self, r: &Region, inputs: &[TensorView<'_>]) {
        let mut profile = r.profile.lock().unwrap_or_else(|e| e.into_inner());
        if profile.signatures.len() < MAX_REJECTED {
            profile.observe(inputs);
        }
    }

    /// Compiles (or fetches from the caches) code for this signature, in this thread.
    fn specialize_now(&self, r: &Region, inputs: &[TensorView<'_>], metas: Vec<TensorMeta>, state: &GlobalState) -> Option<usize> {
        // Held while compiling: one thread compiles a signature, others wait and reuse it.
        let mut rejected = r.rejected.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = r.specs.read().unwrap_or_else(|e| e.into_inner()).iter().position(|s| s.guards.check(inputs, state).is_ok()) {
            return Some(i);
        }
        let generation = self.generation.load(Ordering::Relaxed);
        rejected.retain(|r| r.generation == generation);
        if let Some(r) = rejected.iter().find(|r| r.inputs == metas && r.state == *state) {
            self.note(&r.why);
            return None;
        }
        self.observe(r, inputs);
        if !self.compiling.load(Ordering::Relaxed) {
            // Not remembered as rejected: after enable() this signature may compile.
            self.note("group not run: Kiln is disabled (no new specialisations)");
            return None;
        }
        let max = self.options.read().unwrap_or_else(|e| e.into_inner()).max_specializations;
        let attempt = if rejected.len() >= MAX_REJECTED {
            Err(format!("more than {MAX_REJECTED} input signatures refused for this group"))
        } else if r.specs.read().unwrap_or_else(|e| e.into_inner()).len() >= max {
            Err(limit_reached(max))
        } else {
            // A bug in lowering or codegen must cost this signature only: the panic becomes its
            // reason (and the locks held here stay usable).
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.compile(r, &metas, state, None))).unwrap_or_else(|p| {
                let what = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                Err(format!("internal error while compiling (please report): {what}"))
            })
        };
        match attempt {
            Ok(spec) => Some(self.land(r, spec)),
            Err(why) => {
                let why = format!("group not run: {why}");
                self.note(&why);
                if rejected.len() < MAX_REJECTED {
                    rejected.push(Rejection { inputs: metas, state: *state, why, generation });
                }
                None
            }
        }
    }

    /// Adds a specialisation to its region (counted); returns its index.
    fn land(&self, r: &Region, spec: Specialization) -> usize {
        let time = match spec.source {
            Source::Compiled => Some(&self.counters.compile_ns),
            Source::Disk => Some(&self.counters.disk_load_ns),
            Source::Memory => None,
        };
        time.map(|t| t.fetch_add(spec.compile_time.as_nanos() as u64, Ordering::Relaxed));
        let mut specs = r.specs.write().unwrap_or_else(|e| e.into_inner());
        if spec.symbolic.is_some() {
            self.counters.symbolic_specializations.fetch_add(1, Ordering::Relaxed);
        }
        specs.push(Arc::new(spec));
        self.counters.specializations.fetch_add(1, Ordering::Relaxed);
        specs.len() - 1
    }

    /// Code for `metas` as [`compile`](Self::compile) finds it with compile='never': from
    /// memory or the disk cache, never compiled. What a background miss tries first, so that
    /// code a cache holds serves the call that asked for it.
    fn cached(&self, r: &Region, metas: &[TensorMeta], state: &GlobalState) -> Option<Specialization> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.compile(r, metas, state, Some(CompileMode::Never)))).ok()?.ok()
    }

    /// Code for `metas`: symbolic where the dynamic policy and the profile say so and the
    /// region's code allows, else for exactly this signature. With compile='never', code a
    /// cache prewarmed under dynamic='always' holds is looked for too: it serves every size
    /// from the first call. `mode` overrides the options' compile mode.
    fn compile(&self, r: &Region, metas: &[TensorMeta], state: &GlobalState, mode: Option<CompileMode>) -> Result<Specialization, String> {
        let live: Vec<InputDecl> = metas.iter().map(decl).collect::<Result<_, _>>()?;
        let default_float = state.default_float.map_err(crate::ffi::scalar_type_name);
        let dump = r.dump.with_inputs(&live, default_float);
        let mut options = self.options.read().unwrap_or_else(|e| e.into_inner()).clone();
        options.mode = mode.unwrap_or(options.mode);
        let mut plans = vec![];
        if options.dynamic != Dynamic::Static {
            plans.push(r.profile.lock().unwrap_or_else(|e| e.into_inner()).dim_plan(options.dynamic == Dynamic::Always));
        }
        if options.dynamic == Dynamic::Auto && options.mode == CompileMode::Never {
            plans.push(r.profile.lock().unwrap_or_else(|e| e.into_inner()).dim_plan(true));
        }
        for plan in plans {
            if let Some((guards, lowered, run, program)) = self.symbolic_plan(&dump, r, metas, &live, &plan, state) {
                match self.build(r, lowered, guards, Some((run, &program)), &options) {
                    Ok(spec) => return Ok(spec),
                    // Not cached under compile='never', or no code: code for this signature may be.
                    Err(why) => tracing::debug!(group = r.id, "kiln: symbolic code not built: {why}"),
                }
            }
        }
        let lowered = Phase::Frontend.time(|| aten::lower(&dump))?;
        let guards = GuardSet::for_inputs(metas, *state).ok_or("an input cannot be guarded")?;
        self.build(r, lowered, guards, None, &options)
    }

    /// The most symbols of `plan` the region's code can be symbolic in, for a call like
    /// `metas`: all of them, else the union of those it is symbolic in one at a time (a
    /// reduction over the sequence must not keep the batch static), else the first of those.
    /// Symbols that are 0 or 1 in this call are static here: such sizes get code of their own.
    fn symbolic_plan(&self, dump: &Dump, r: &Region, metas: &[TensorMeta], live: &[InputDecl], plan: &[Vec<DimPlan>], state: &GlobalState) -> Option<SymbolicCode> {
        let plan = restrict(plan, metas, |_, size| size >= 2);
        let mut symbols: Vec<u32> = plan.iter().flatten().filter_map(|p| if let DimPlan::Symbol(k) = p { Some(*k) } else { None }).collect();
        symbols.sort_unstable();
        symbols.dedup();
        if symbols.is_empty() {
            return None;
        }
        let try_plan = |plan: &[Vec<DimPlan>]| self.try_symbolic(dump, r, metas, live, plan, state);
        let all = try_plan(&plan);
        if all.is_ok() || symbols.len() == 1 {
            return all.ok();
        }
        let mut good: Vec<(u32, SymbolicCode)> =
            symbols.iter().filter_map(|&k| try_plan(&restrict(&plan, metas, |j, _| j == k)).ok().map(|c| (k, c))).collect();
        if good.len() <= 1 {
            return good.pop().map(|(_, c)| c);
        }
        let union = restrict(&plan, metas, |j, _| good.iter().any(|(k, _)| *k == j));
        try_plan(&union).ok().or_else(|| Some(good.swap_remove(0).1))
    }

    /// Symbolic code for `plan`, or why there is none (remembered: a refused plan is not
    /// lowered again).
    fn try_symbolic(&self, dump: &Dump, r: &Region, metas: &[TensorMeta], live: &[InputDecl], plan: &[Vec<DimPlan>], state: &GlobalState) -> Result<SymbolicCode, String> {
        if let Some((_, _, why)) = r.symbolic_refused.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|(p, s, _)| p == plan && s == state) {
            return Err(why.clone());
        }
        let result = GuardSet::symbolic(metas, plan, *state)
            .ok_or_else(|| format!("more than {} symbolic dims that are not tied", kiln_guards::MAX_SYMBOLS))
            .and_then(|guards| self.infer_symbolic(dump, live, guards));
        if let Err(why) = &result {
            tracing::info!(group = r.id, "kiln: no code for symbolic sizes: {why}");
            let mut refused = r.symbolic_refused.lock().unwrap_or_else(|e| e.into_inner());
            if refused.len() < MAX_REJECTED {
                refused.push((plan.to_vec(), *state, why.clone()));
            }
        }
        result
    }

    /// The region lowered at sample sizes of the symbols of `guards`: its guards, its lowering
    /// at the first sample (what is compiled) and how it runs at other sizes, if the lowerings
    /// differ only by products of symbols (`kiln_compiler::lower::symbolic`).
    fn infer_symbolic(&self, dump: &Dump, live: &[InputDecl], guards: GuardSet) -> Result<SymbolicCode, String> {
        let statics: Vec<i64> =
            guards.tensors.iter().flat_map(|t| t.dims.iter().filter_map(|d| if let DimGuard::Size(n) = d { Some(*n) } else { None })).collect();
        let points = symbolic::sample_points(guards.symbols.len(), &statics);
        let mut lowered = vec![];
        let mut samples = vec![];
        for point in &points {
            let decls: Vec<InputDecl> = live
                .iter()
                .zip(&guards.tensors)
                .map(|(d, t)| {
                    let sizes: Vec<i64> = t
                        .dims
                        .iter()
                        .map(|dim| match *dim {
                            DimGuard::Size(n) => n,
                            DimGuard::Symbol(k) => point[k as usize],
                        })
                        .collect();
                    let strides = match &t.strides {
                        StrideGuard::Dense(order) => kiln_compiler::graph::layout::dense_strides(&sizes, order),
                        StrideGuard::Exact(_) => d.strides.clone(),
                    };
                    InputDecl { dtype: d.dtype.clone(), sizes, strides, number: d.number }
                })
                .collect();
            let l = Phase::Frontend.time(|| aten::lower(&dump.with_inputs(&decls, dump.default_float.clone())))?;
            let program = kiln_compiler::lower_graph(&l.graph, &l.input_strides).map_err(|e| e.to_string())?;
            samples.push((point.clone(), program));
            lowered.push(l);
        }
        let (shapes, program) = Phase::Lower.time(|| symbolic::infer(&samples))?;
        let outputs = program.outputs().map(|b| aten::scalar_type_code(b.dtype)).collect();
        let run = SymbolicRun { shapes, samples: points[0].clone(), outputs };
        Ok((guards, lowered.swap_remove(0), run, program))
    }

    /// Fetches the code of `lowered` (memory, disk or compiled) as a specialisation.
    fn build(&self, r: &Region, lowered: aten::Lowered, guards: GuardSet, symbolic: Option<(SymbolicRun, &LoopProgram)>, options: &Options) -> Result<Specialization, String> {
        let mut key = CacheKey::new(&lowered.graph, &lowered.input_strides, &self.target, &options.compile);
        if symbolic.is_some() {
            key = key.symbolic(&guards.tensors.iter().map(|t| t.to_string()).collect::<Vec<_>>().join("; "));
        }
        let (symbolic, program) = symbolic.unzip();
        let request = Request {
            key,
            graph: &lowered.graph,
            input_strides: &lowered.input_strides,
            symbolic: program,
            target: &self.target,
            options: &options.compile,
            mode: options.mode,
            disk: options.disk.as_deref(),
        };
        let (program, source) = self.cache.fetch(&request).map_err(|e| e.to_string())?;
        // Code for symbolic sizes keeps a packed copy only of a B whose layout does not move.
        let weights = crate::packed::PackedWeights::new(&program, |w| match &symbolic {
            None => true,
            Some(run) => w.shared_by.iter().all(|&k| program.packs_at_every_size(k, &run.shapes)),
        });
        let spec = Specialization {
            guards,
            symbolic,
            outputs: program.outputs().map(|b| (aten::scalar_type_code(b.dtype), b.sizes.clone(), b.strides())).collect(),
            compile_time: if source == Source::Memory { Duration::ZERO } else { program.compile_time },
            weights,
            program,
            kiln_ir: lowered.graph.to_string(),
            weight_choices: lowered.weight_choices,
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
        r.specs.read().unwrap_or_else(|e| e.into_inner()).get(i).cloned()
    }

    /// The first specialisation of `r` that accepts `inputs` (when another group's guard ran
    /// between `r`'s guard and `r`).
    pub fn first_accepting(&self, r: &Region, inputs: &[TensorView<'_>], state: &GlobalState) -> Option<Arc<Specialization>> {
        r.specs.read().unwrap_or_else(|e| e.into_inner()).iter().find(|s| s.guards.check(inputs, state).is_ok()).cloned()
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
    /// The id of a reason's text for explain, without counting it as a fallback.
    pub fn reason_id(&self, reason: &str) -> usize {
        let mut r = self.reasons.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&id) = r.ids.get(reason) {
            return id;
        }
        let id = r.texts.len();
        r.texts.push(reason.to_string());
        r.ids.insert(reason.to_string(), id);
        id
    }

    pub fn note(&self, reason: &str) -> usize {
        {
            let mut r = self.reasons.lock().unwrap_or_else(|e| e.into_inner());
            *r.counts.entry(reason.to_string()).or_insert(0) += 1;
            if r.logged.insert(reason.to_string()) {
                tracing::info!("kiln fallback: {reason}");
            }
        }
        self.reason_id(reason)
    }

    /// Registers a block's fallbacks (reason ids, one per node), counted when it first runs.
    pub fn fallback_block(&self, reasons: Vec<usize>) -> usize {
        let mut r = self.reasons.lock().unwrap_or_else(|e| e.into_inner());
        r.blocks.push((reasons, false));
        r.blocks.len() - 1
    }

    /// The block `marker` runs: its fallbacks are counted (the first time only).
    pub fn fallback_block_ran(&self, marker: usize) {
        let texts: Vec<String> = {
            let mut r = self.reasons.lock().unwrap_or_else(|e| e.into_inner());
            let Some((ids, ran)) = r.blocks.get_mut(marker) else { return };
            if std::mem::replace(ran, true) {
                return;
            }
            let ids = ids.clone();
            ids.iter().filter_map(|&i| r.texts.get(i).cloned()).collect()
        };
        for t in texts {
            self.note(&t);
        }
    }

    /// Whether block `marker` has run.
    pub fn fallback_block_has_run(&self, marker: usize) -> bool {
        self.reasons.lock().unwrap_or_else(|e| e.into_inner()).blocks.get(marker).is_some_and(|b| b.1)
    }

    pub fn reason_text(&self, id: usize) -> Option<String> {
        self.reasons.lock().unwrap_or_else(|e| e.into_inner()).texts.get(id).cloned()
    }

    /// Writes the programs of `keys` that `disk` lacks; see [`ProgramCache::persist`].
    pub fn persist(&self, disk: &DiskCache, keys: &[CacheKey]) -> (usize, usize) {
        self.cache.persist(disk, &self.target, |k| keys.contains(k))
    }

    /// (cache key, runs) of every specialisation of every group.
    pub fn specialization_runs(&self) -> Vec<(CacheKey, u64)> {
        let regions = self.regions.read().unwrap_or_else(|e| e.into_inner());
        regions.iter().flat_map(|r| r.specs.read().unwrap_or_else(|e| e.into_inner()).iter().map(|s| (s.cache_key, s.runs.load(Ordering::Relaxed))).collect::<Vec<_>>()).collect()
    }

    pub fn stats(&self) -> Stats {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            groups: load(&self.counters.groups) as usize,
            specializations: load(&self.counters.specializations),
            symbolic_specializations: load(&self.counters.symbolic_specializations),
            compiles: self.cache.compiles(),
            cache_hits: self.cache.memory_hits(),
            disk_hits: self.cache.disk_hits(),
            disk_writes: self.cache.disk_writes(),
            disk_problems: self.cache.disk_problems(),
            compile_time: Duration::from_nanos(load(&self.counters.compile_ns)),
            disk_load_time: Duration::from_nanos(load(&self.counters.disk_load_ns)),
            guard_passes: load(&self.counters.guard_passes),
            guard_misses: load(&self.counters.guard_misses),
            guard_failures: load(&self.counters.guard_failures),
            runs: load(&self.counters.runs),
            pass_runs: load(&self.counters.pass_runs),
            fallbacks: self.reasons.lock().unwrap_or_else(|e| e.into_inner()).counts.clone(),
        }
    }

    /// Zeroes every counter (groups made, compile and load times included) and forgets the
    /// reasons' counts. Compiled code stays loaded (graphs in use may still call it) and cached.
    pub fn reset(&self) {
        let c = &self.counters;
        for a in [&c.groups, &c.compile_ns, &c.disk_load_ns, &c.guard_passes, &c.guard_misses, &c.guard_failures, &c.runs, &c.pass_runs, &c.specializations, &c.symbolic_specializations] {
            a.store(0, Ordering::Relaxed);
        }
        self.cache.reset_counters();
        kiln_compiler::phases::reset();
        kiln_compiler::codegen::kernel_cache::reset_counts();
        kiln_compiler::kernels::weights_in_code::reset_check_counts();
        QUEUE.counts.reset();
        let mut r = self.reasons.lock().unwrap_or_else(|e| e.into_inner());
        r.counts.clear();
        r.logged.clear();
        drop(r);
        for region in self.regions.read().unwrap_or_else(|e| e.into_inner()).iter() {
            region.guard_passes.store(0, Ordering::Relaxed);
            region.guard_misses.store(0, Ordering::Relaxed);
            region.guard_failures.store(0, Ordering::Relaxed);
            for s in region.specs.read().unwrap_or_else(|e| e.into_inner()).iter() {
                s.runs.store(0, Ordering::Relaxed);
            }
        }
    }
}
