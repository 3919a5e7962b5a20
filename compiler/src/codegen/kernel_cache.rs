//! Machine code per kernel, compiled once per process for each distinct kernel and in
//! parallel across kernels.
//!
//! A kernel is compiled in its local form (`Kernel::with_local_buffers`): buffers numbered
//! by first use, so the same loop nest over other buffers of another program — the next
//! layer of a model, another group, another specialisation — is the same kernel. Its key is
//! a blake3 hash of everything codegen reads: the local kernel (its name aside), the dtypes
//! of its buffers, the target, the options and the LLVM and Kiln versions. The symbol is
//! named after the key, so a symbol always stands for one piece of code, in any process.
//!
//! Each kernel is its own LLVM module in its own context, so independent kernels compile on
//! several threads at once (LLVM contexts are not shared between threads).

use crate::codegen::target::Target;
use crate::codegen::CodegenError;
use crate::dtype::DType;
use crate::lower::loop_ir::Kernel;
use crate::CompileOptions;
use once_cell::sync::{Lazy, OnceCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A kernel's machine code: a relocatable object defining `symbol`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelCode {
    pub symbol: String,
    pub object: Arc<[u8]>,
}

type Key = [u8; 32];

static CODE: Lazy<Mutex<HashMap<Key, Arc<OnceCell<Arc<[u8]>>>>>> = Lazy::new(Default::default);
static COMPILED: AtomicU64 = AtomicU64::new(0);
static REUSED: AtomicU64 = AtomicU64::new(0);

/// (kernels compiled, kernels whose code this process had already compiled) so far.
pub fn counts() -> (u64, u64) {
    (COMPILED.load(Ordering::Relaxed), REUSED.load(Ordering::Relaxed))
}

pub fn reset_counts() {
    COMPILED.store(0, Ordering::Relaxed);
    REUSED.store(0, Ordering::Relaxed);
}

/// The key of a kernel in local form with the dtypes of its local buffers.
pub fn kernel_key(k: &Kernel, dtypes: &[DType], target: &Target, opts: &CompileOptions) -> Key {
    let mut h = blake3::Hasher::new();
    let mut field = |tag: &str, bytes: &[u8]| {
        h.update(tag.as_bytes());
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    let unnamed = Kernel { name: String::new(), ..k.clone() };
    field("kernel", format!("{unnamed:?}").as_bytes());
    field("dtypes", format!("{dtypes:?}").as_bytes());
    field("target", format!("{target:?}").as_bytes());
    field("options", format!("{opts:?}").as_bytes());
    field("llvm", crate::codegen::target::LLVM_VERSION.as_bytes());
    field("kiln", crate::VERSION.as_bytes());
    *h.finalize().as_bytes()
}

fn symbol(key: &Key) -> String {
    let hex: String = key[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("kiln_k{hex}")
}

thread_local! {
    /// Threads a compile started on this thread may use; 0: one per core.
    static THREADS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Limits the threads compiles started on this thread use (a background compile thread takes
/// one core, leaving the others to the program it compiles for); 0: one per core.
pub fn set_threads_for_this_thread(n: usize) {
    THREADS.with(|t| t.set(n));
}

/// Threads compiling one program's kernels: one per core unless this thread was limited (a
/// compile is CPU-bound and the caller waits for all of its kernels).
fn compile_threads() -> usize {
    match THREADS.with(|t| t.get()) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// The code of each kernel (each in local form, with its local buffers' dtypes): what this
/// process compiled before is reused, the rest is compiled on up to one thread per core.
pub fn compile_kernels(kernels: &[(Kernel, Vec<DType>)], target: &Target, opts: &CompileOptions) -> Result<Vec<KernelCode>, CodegenError> {
    let keys: Vec<Key> = kernels.iter().map(|(k, d)| kernel_key(k, d, target, opts)).collect();
    let cells: Vec<Arc<OnceCell<Arc<[u8]>>>> = {
        let mut code = CODE.lock().unwrap_or_else(|e| e.into_inner());
        keys.iter().map(|key| code.entry(*key).or_default().clone()).collect()
    };
    // The first kernel of each key not compiled yet is this call's to compile.
    let mut todo: Vec<usize> = vec![];
    for (i, cell) in cells.iter().enumerate() {
        if cell.get().is_none() && !todo.iter().any(|&j| keys[j] == keys[i]) {
            todo.push(i);
        }
    }
    // A cell another thread is filling blocks `get_or_try_init` until it is done, and is
    // tried here if that thread failed: no kernel waits on code that never comes.
    let code_of = |i: usize| {
        let (k, dtypes) = &kernels[i];
        cells[i].get_or_try_init(|| {
            COMPILED.fetch_add(1, Ordering::Relaxed);
            crate::codegen::compile_kernel(k, dtypes, target, opts, &symbol(&keys[i])).map(Arc::from)
        })
    };
    // The longest first (a GEMM's unrolled register tile, then the larger loop bodies), so
    // that no thread starts a long compile when the others are about to finish.
    todo.sort_by_key(|&i| std::cmp::Reverse((kernels[i].0.gemm.is_some(), kernels[i].0.exprs.len())));
    let next = AtomicUsize::new(0);
    let first_error: Mutex<Option<CodegenError>> = Mutex::new(None);
    let work = || {
        while let Some(&i) = todo.get(next.fetch_add(1, Ordering::Relaxed)) {
            if let Err(e) = code_of(i) {
                first_error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
                return;
            }
        }
    };
    let threads = compile_threads().min(todo.len());
    if threads <= 1 {
        work();
    } else {
        std::thread::scope(|s| {
            for _ in 1..threads {
                s.spawn(work);
            }
            work();
        });
    }
    if let Some(e) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    REUSED.fetch_add((kernels.len() - todo.len()) as u64, Ordering::Relaxed);
    (0..kernels.len()).map(|i| Ok(KernelCode { symbol: symbol(&keys[i]), object: code_of(i)?.clone() })).collect()
}
