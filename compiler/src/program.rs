//! A compiled program: loaded kernels, the buffer table layout and the memory plan, and the
//! code that runs them on caller-provided input and output memory.

use crate::lower::{BufferDecl, BufferKind};
use crate::thread_pool::ThreadPool;
use once_cell::sync::Lazy;
use std::cell::RefCell;
use std::sync::{Arc, RwLock};
use std::time::Duration;

pub type KernelFn = unsafe extern "C" fn(*const *mut u8, i64, i64);

pub struct CompiledKernel {
    pub name: String,
    pub f: KernelFn,
    pub extent: i64,
    pub parallel: bool,
}

pub struct CompiledProgram {
    pub buffers: Vec<BufferDecl>,
    pub kernels: Vec<CompiledKernel>,
    pub arena_bytes: usize,
    pub num_inputs: usize,
    pub num_outputs: usize,
    /// The loop IR, printed: what `explain` shows.
    pub loop_ir: String,
    pub compile_time: Duration,
    pub object_bytes: usize,
}

/// The pool and the process it was made in: a forked child (a DataLoader worker, a server
/// worker) inherits the pool but none of its threads, so it makes its own.
static POOL: Lazy<RwLock<(u32, Arc<ThreadPool>)>> = Lazy::new(|| RwLock::new((std::process::id(), Arc::new(ThreadPool::new(default_threads())))));

fn pool() -> Arc<ThreadPool> {
    let pid = std::process::id();
    {
        let p = POOL.read().unwrap();
        if p.0 == pid {
            return p.1.clone();
        }
    }
    let mut p = POOL.write().unwrap();
    if p.0 != pid {
        let threads = p.1.threads();
        // The parent's pool is leaked, not dropped: its Drop takes a lock that one of the
        // parent's threads may have held at the fork.
        std::mem::forget(std::mem::replace(&mut p.1, Arc::new(ThreadPool::new(threads))));
        p.0 = pid;
    }
    p.1.clone()
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Sets the number of threads parallel kernels use (the caller counts as one).
pub fn set_num_threads(n: usize) {
    let current = pool();
    if current.threads() != n.max(1) {
        POOL.write().unwrap().1 = Arc::new(ThreadPool::new(n.max(1)));
    }
}

pub fn num_threads() -> usize {
    pool().threads()
}

thread_local! {
    /// Scratch for intermediates, reused across calls on this thread.
    static ARENA: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

struct Table(*const *mut u8);
// The table only carries addresses the caller vouches for for the duration of `run`.
unsafe impl Sync for Table {}

impl CompiledProgram {
    /// Output sizes and dtypes, in order.
    pub fn outputs(&self) -> impl Iterator<Item = &BufferDecl> {
        self.buffers.iter().filter(|b| matches!(b.kind, BufferKind::Output(_)))
    }

    /// Runs the program.
    ///
    /// # Safety
    /// `inputs[i]` must point to memory laid out as the program was specialised for (sizes,
    /// strides, dtype of input i); `outputs[i]` to contiguous memory of output i's size.
    pub unsafe fn run(&self, inputs: &[*const u8], outputs: &[*mut u8]) {
        assert_eq!(inputs.len(), self.num_inputs);
        assert_eq!(outputs.len(), self.num_outputs);
        self.run_with(|i| inputs[i], |i| outputs[i]);
    }

    /// Runs the program, asking for input `i`'s data with `input(i)` and for output `i`'s
    /// memory with `output(i)` (called once each, in order: outputs may be allocated there).
    ///
    /// # Safety
    /// As for `run`, for the pointers the two functions return.
    pub unsafe fn run_with(&self, input: impl Fn(usize) -> *const u8, mut output: impl FnMut(usize) -> *mut u8) {
        // The buffer table lives on the stack for the common case: this runs on every call.
        const INLINE: usize = 32;
        let mut inline = [std::ptr::null_mut::<u8>(); INLINE];
        let mut heap = vec![];
        let table: &mut [*mut u8] = if self.buffers.len() <= INLINE {
            &mut inline[..self.buffers.len()]
        } else {
            heap.resize(self.buffers.len(), std::ptr::null_mut());
            &mut heap
        };
        ARENA.with(|arena| {
            let mut arena = arena.borrow_mut();
            let need = self.arena_bytes + 64;
            if arena.len() < need {
                arena.resize(need, 0);
            }
            let base = arena.as_mut_ptr();
            let base = base.add(base.align_offset(64));
            for (slot, b) in table.iter_mut().zip(&self.buffers) {
                *slot = match b.kind {
                    BufferKind::Input(i) => input(i) as *mut u8,
                    BufferKind::Output(i) => output(i),
                    BufferKind::Temp { offset } => base.add(offset),
                };
            }
            let table = Table(table.as_ptr());
            for k in &self.kernels {
                if k.parallel {
                    let pool = pool();
                    let parts = pool.threads().min(k.extent.max(1) as usize);
                    let chunk = (k.extent + parts as i64 - 1) / parts as i64;
                    let table = &table;
                    pool.run(parts, &|p| {
                        let start = p as i64 * chunk;
                        let end = (start + chunk).min(k.extent);
                        if start < end {
                            (k.f)(table.0, start, end);
                        }
                    });
                } else {
                    (k.f)(table.0, 0, k.extent);
                }
            }
        });
    }
}
