//! The `torch_kiln._kiln` extension: thin pyo3 wrappers over the TorchScript bridge. Option
//! checking and `explain` live in the Python package (`pysrc/torch_kiln`), which imports torch
//! first so that libtorch is loaded before this module needs it.

use kiln_cache::{CacheKey, CompileMode, DiskCache, EntryHeader, Source};
use kiln_compiler::{CompileOptions, Target};
use kiln_torch_bridge::{Dynamic, Options, RUNTIME};
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

fn open_cache(dir: &str, size_limit: u64) -> PyResult<DiskCache> {
    DiskCache::open(dir, size_limit).map_err(|e| PyValueError::new_err(e.to_string()))
}

fn compile_mode(mode: &str) -> PyResult<CompileMode> {
    match mode {
        "lazy" => Ok(CompileMode::Lazy),
        "never" => Ok(CompileMode::Never),
        "always" => Ok(CompileMode::Always),
        _ => Err(PyValueError::new_err(format!("compile must be 'lazy', 'never' or 'always', got {mode:?}"))),
    }
}

fn dynamic_policy(dynamic: &str) -> PyResult<Dynamic> {
    match dynamic {
        "auto" => Ok(Dynamic::Auto),
        "static" => Ok(Dynamic::Static),
        "always" => Ok(Dynamic::Always),
        _ => Err(PyValueError::new_err(format!("dynamic must be 'auto', 'static' or 'always', got {dynamic:?}"))),
    }
}

/// `cache_dir`: None keeps compiled code in memory only.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn enable(max_specializations: usize, opt_level: u8, num_threads: usize, compile: &str, dynamic: &str, cache_dir: Option<&str>, cache_size_limit: u64, background: bool) -> PyResult<()> {
    let mode = compile_mode(compile)?;
    let dynamic = dynamic_policy(dynamic)?;
    let disk = cache_dir.map(|d| open_cache(d, cache_size_limit)).transpose()?.map(Arc::new);
    kiln_torch_bridge::set_num_threads(num_threads)
        .map_err(|e| PyValueError::new_err(format!("torch_kiln option 'num_threads'={num_threads}: cannot start that many threads: {e}")))?;
    let options = Options {
        max_specializations,
        compile: CompileOptions::at_level(opt_level),
        mode,
        dynamic,
        disk,
        background,
    };
    kiln_torch_bridge::enable(options).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

fn parse_key(hex: &str) -> PyResult<CacheKey> {
    let bytes: Option<Vec<u8>> = (0..hex.len()).step_by(2).map(|i| hex.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok())).collect();
    bytes.and_then(|b| b.try_into().ok()).map(CacheKey).ok_or_else(|| PyValueError::new_err(format!("not a cache key: {hex:?}")))
}

/// Writes the programs of `keys` (hex) this process holds to `cache_dir`: (entries written,
/// entries already there).
#[pyfunction]
fn persist(cache_dir: &str, cache_size_limit: u64, keys: Vec<String>) -> PyResult<(usize, usize)> {
    let keys = keys.iter().map(|k| parse_key(k)).collect::<PyResult<Vec<_>>>()?;
    Ok(RUNTIME.persist(&open_cache(cache_dir, cache_size_limit)?, &keys))
}

/// (cache key hex, runs) of every specialisation.
#[pyfunction]
fn specialization_runs() -> Vec<(String, u64)> {
    RUNTIME.specialization_runs().into_iter().map(|(k, n)| (k.hex(), n)).collect()
}

/// (path, bytes, seconds since last use) of each entry, least recently used first.
#[pyfunction]
fn cache_entries(cache_dir: &str) -> PyResult<Vec<(String, u64, f64)>> {
    let now = std::time::SystemTime::now();
    Ok(open_cache(cache_dir, u64::MAX)?
        .entries()
        .into_iter()
        .map(|e| (e.path.display().to_string(), e.bytes, now.duration_since(e.last_used).unwrap_or_default().as_secs_f64()))
        .collect())
}

#[pyfunction]
fn cache_clear(cache_dir: &str) -> PyResult<usize> {
    open_cache(cache_dir, u64::MAX)?.clear().map_err(|e| PyOSError::new_err(format!("clearing {cache_dir}: {e}")))
}

/// (path, "ok" | "foreign" | the problem) of each entry.
#[pyfunction]
fn cache_verify(cache_dir: &str) -> PyResult<Vec<(String, String)>> {
    let ours = EntryHeader::current(&CacheKey([0; 32]), &Target::host());
    Ok(open_cache(cache_dir, u64::MAX)?
        .verify(&ours)
        .into_iter()
        .map(|(e, v)| {
            let verdict = match v {
                Ok(true) => "ok".to_string(),
                Ok(false) => "foreign".to_string(),
                Err(why) => why,
            };
            (e.path.display().to_string(), verdict)
        })
        .collect())
}

/// Waits until no compile is queued or running (the GIL is released meanwhile: the calls that
/// queue compiles may be Python threads).
#[pyfunction]
fn synchronize(py: Python<'_>) {
    py.allow_threads(|| kiln_torch_bridge::background::QUEUE.synchronize());
}

/// At interpreter exit: drop queued compiles, wait for the running one.
#[pyfunction]
fn shutdown(py: Python<'_>) {
    py.allow_threads(|| kiln_torch_bridge::background::QUEUE.shutdown());
}

#[pyfunction]
fn disable() {
    kiln_torch_bridge::disable();
}

#[pyfunction]
fn reset() {
    RUNTIME.reset();
}

#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    kiln_torch_bridge::set_num_threads(n).map_err(|e| PyValueError::new_err(format!("cannot start {n} threads: {e}")))
}

/// Bytes of scratch this thread keeps between calls (bounded: see `program::ARENA_KEEP_BYTES`).
#[pyfunction]
fn scratch_bytes_kept() -> (usize, usize) {
    (kiln_compiler::runtime::program::arena_bytes_kept(), kiln_compiler::runtime::program::ARENA_KEEP_BYTES)
}

#[pyfunction]
fn stats(py: Python<'_>) -> PyResult<PyObject> {
    let s = RUNTIME.stats();
    let d = PyDict::new(py);
    d.set_item("groups", s.groups)?;
    d.set_item("specializations", s.specializations)?;
    d.set_item("symbolic_specializations", s.symbolic_specializations)?;
    d.set_item("compiles", s.compiles)?;
    d.set_item("cache_hits", s.cache_hits)?;
    d.set_item("disk_hits", s.disk_hits)?;
    d.set_item("disk_writes", s.disk_writes)?;
    d.set_item("disk_problems", s.disk_problems.into_iter().collect::<Vec<_>>().into_pyobject(py)?.into_any())?;
    let options = RUNTIME.options.read().unwrap();
    d.set_item("compile_mode", format!("{:?}", options.mode).to_lowercase())?;
    d.set_item("dynamic", format!("{:?}", options.dynamic).to_lowercase())?;
    d.set_item("background_compile", options.background)?;
    d.set_item("cache_dir", options.disk.as_ref().map(|d| d.dir().display().to_string()))?;
    drop(options);
    d.set_item("compile_time_ms", s.compile_time.as_secs_f64() * 1e3)?;
    d.set_item("disk_load_time_ms", s.disk_load_time.as_secs_f64() * 1e3)?;
    let phases = PyDict::new(py);
    for p in kiln_compiler::phases::PHASES {
        phases.set_item(p.name(), p.total().as_secs_f64() * 1e3)?;
    }
    d.set_item("compile_phases_ms", phases)?;
    let queue = &kiln_torch_bridge::background::QUEUE;
    let (queued, running) = queue.pending();
    let bg = PyDict::new(py);
    bg.set_item("queued", queued)?;
    bg.set_item("running", running)?;
    bg.set_item("submitted", queue.counts.queued.load(Ordering::Relaxed))?;
    bg.set_item("done", queue.counts.done.load(Ordering::Relaxed))?;
    bg.set_item("dropped", queue.counts.dropped.load(Ordering::Relaxed))?;
    bg.set_item("calls_while_pending", queue.counts.waited.load(Ordering::Relaxed))?;
    d.set_item("background", bg)?;
    let (compiled, reused) = kiln_compiler::codegen::kernel_cache::counts();
    d.set_item("kernels_compiled", compiled)?;
    d.set_item("kernels_reused", reused)?;
    d.set_item("kernel_runs", s.runs)?;
    let (same, other) = kiln_compiler::kernels::weights_in_code::check_counts();
    let in_code = PyDict::new(py);
    in_code.set_item("same", same)?;
    in_code.set_item("other", other)?;
    d.set_item("weights_in_code_checks", in_code)?;
    d.set_item("guard_passes", s.guard_passes)?;
    d.set_item("guard_misses", s.guard_misses)?;
    d.set_item("guard_failures", s.guard_failures)?;
    d.set_item("pass_runs", s.pass_runs)?;
    d.set_item("fallbacks", s.fallbacks.into_iter().collect::<Vec<_>>().into_pyobject(py)?.into_any())?;
    d.set_item("num_threads", kiln_compiler::runtime::program::num_threads())?;
    Ok(d.into_any().unbind())
}

/// What `explain` shows of one group, or None for an unknown id.
#[pyfunction]
fn group_info(py: Python<'_>, id: usize) -> PyResult<Option<PyObject>> {
    let Some(r) = RUNTIME.region(id) else { return Ok(None) };
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let d = PyDict::new(py);
    d.set_item("id", r.id)?;
    d.set_item("nodes", r.nodes.clone())?;
    d.set_item("guard_passes", load(&r.guard_passes))?;
    d.set_item("guard_misses", load(&r.guard_misses))?;
    d.set_item("guard_failures", load(&r.guard_failures))?;
    let specs = PyList::empty(py);
    for s in r.specs.read().unwrap().iter() {
        let sd = PyDict::new(py);
        let guards: Vec<String> = s.guards.tensors.iter().map(|t| t.to_string()).collect();
        sd.set_item("guards", guards)?;
        sd.set_item("state", kiln_torch_bridge::runtime::state_text(&s.guards.state))?;
        let symbols: Vec<String> = s.guards.symbols.iter().enumerate().map(|(k, (i, d))| format!("s{k} = input {i} dim {d}")).collect();
        sd.set_item("symbols", symbols)?;
        sd.set_item("compiled_at", s.symbolic.as_ref().map(|run| run.samples.clone()))?;
        sd.set_item("kiln_ir", s.kiln_ir.clone())?;
        sd.set_item("weights", s.weight_choices.clone())?;
        sd.set_item("loop_ir", s.program.image.loop_ir.clone())?;
        sd.set_item("kernels", s.program.image.kernels.len())?;
        sd.set_item("parallel_kernels", s.program.image.kernels.iter().filter(|k| k.parallel).count())?;
        sd.set_item("arena_bytes", s.program.image.arena_bytes)?;
        sd.set_item("pack_bytes", s.program.pack_bytes())?;
        sd.set_item("object_bytes", s.program.image.kernels.iter().map(|k| k.object.len()).sum::<usize>())?;
        sd.set_item("cache_key", s.cache_key.hex())?;
        sd.set_item("source", match s.source {
            Source::Memory => "memory",
            Source::Disk => "disk",
            Source::Compiled => "compiled",
        })?;
        sd.set_item("compile_time_ms", s.compile_time.as_secs_f64() * 1e3)?;
        sd.set_item("runs", load(&s.runs))?;
        specs.append(sd)?;
    }
    d.set_item("specializations", specs)?;
    let pending = r.pending.lock().unwrap().as_ref().map(|metas| metas.iter().map(|m| m.to_string()).collect::<Vec<_>>().join("; "));
    d.set_item("pending", pending)?;
    let rejected: Vec<(String, String)> = r
        .rejected
        .lock()
        .unwrap()
        .iter()
        .map(|r| (r.inputs.iter().map(|m| m.to_string()).collect::<Vec<_>>().join("; "), r.why.clone()))
        .collect();
    d.set_item("rejected", rejected)?;
    let refused: Vec<String> = r.symbolic_refused.lock().unwrap().iter().map(|(_, _, why)| why.clone()).collect();
    d.set_item("symbolic_refused", refused)?;
    let varying: Vec<String> = r
        .profile
        .lock()
        .unwrap()
        .dim_stability()
        .iter()
        .enumerate()
        .flat_map(|(i, dims)| {
            dims.iter().enumerate().filter_map(move |(d, s)| match s {
                kiln_profiler::DimStability::Varies(seen) => Some(format!("input {i} dim {d}: {seen:?}")),
                kiln_profiler::DimStability::Stable(_) => None,
            })
        })
        .collect();
    d.set_item("varying_dims", varying)?;
    Ok(Some(d.into_any().unbind()))
}

#[pyfunction]
fn reason(id: usize) -> Option<String> {
    RUNTIME.reason_text(id)
}

/// Whether the block a `kiln::FallbacksRan` marker starts has run.
#[pyfunction]
fn fallback_block_ran(marker: usize) -> bool {
    RUNTIME.fallback_block_has_run(marker)
}

/// Logs through `tracing` to stderr, filtered by KILN_LOG (e.g. `info`, `debug`).
fn init_logging() {
    if let Ok(filter) = std::env::var("KILN_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
}

#[pymodule]
fn _kiln(m: &Bound<'_, PyModule>) -> PyResult<()> {
    init_logging();
    m.add_function(wrap_pyfunction!(enable, m)?)?;
    m.add_function(wrap_pyfunction!(disable, m)?)?;
    m.add_function(wrap_pyfunction!(synchronize, m)?)?;
    m.add_function(wrap_pyfunction!(shutdown, m)?)?;
    m.add_function(wrap_pyfunction!(reset, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(stats, m)?)?;
    m.add_function(wrap_pyfunction!(scratch_bytes_kept, m)?)?;
    m.add_function(wrap_pyfunction!(group_info, m)?)?;
    m.add_function(wrap_pyfunction!(reason, m)?)?;
    m.add_function(wrap_pyfunction!(fallback_block_ran, m)?)?;
    m.add_function(wrap_pyfunction!(persist, m)?)?;
    m.add_function(wrap_pyfunction!(specialization_runs, m)?)?;
    m.add_function(wrap_pyfunction!(cache_entries, m)?)?;
    m.add_function(wrap_pyfunction!(cache_clear, m)?)?;
    m.add_function(wrap_pyfunction!(cache_verify, m)?)?;
    m.add("VERSION", kiln_compiler::VERSION)?;
    Ok(())
}
