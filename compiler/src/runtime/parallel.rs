//! Where parallel kernels run: Kiln's own spin-then-park pool (`thread_pool`), or the
//! frontend's pool when it lends one (`use_host_pool`). Two pools that both spin after their
//! jobs fight over the cores whenever Kiln groups and the frontend's own parallel ops
//! alternate: measured on 2 cores, six layer-norm/softmax groups separated by TorchScript
//! `add`s at 64 × 1024 took 1682 µs against TorchScript's 438 with both pools, and run on
//! torch's pool they do not fight.

use crate::runtime::thread_pool::ThreadPool;
use once_cell::sync::Lazy;
use std::ffi::c_void;
use std::sync::{Arc, RwLock};

/// A frontend's thread pool: calls `job(ctx, p)` for every p in 0..parts, in parallel, and
/// returns when all have returned.
pub type HostParallel = unsafe extern "C" fn(parts: usize, job: unsafe extern "C" fn(*const c_void, usize), ctx: *const c_void);

/// The host pool in use, its thread count, and the process that lent it, if any.
static HOST: RwLock<Option<(HostParallel, usize, u32)>> = RwLock::new(None);

/// Runs parallel kernels on `host` (its thread count given) instead of Kiln's pool; None goes
/// back to Kiln's pool.
pub fn use_host_pool(host: Option<(HostParallel, usize)>) {
    *HOST.write().unwrap() = host.map(|(f, n)| (f, n, std::process::id()));
}

/// The host pool, in the process that lent it only: a forked child has none of its threads
/// (an OpenMP team waits for them forever), so it runs on a pool of its own.
fn host() -> Option<(HostParallel, usize)> {
    let h = *HOST.read().unwrap();
    h.filter(|h| h.2 == std::process::id()).map(|(f, n, _)| (f, n))
}

/// Threads a parallel kernel is split for.
pub fn threads() -> usize {
    match host() {
        Some((_, n)) => n.max(1),
        None => pool().threads(),
    }
}

/// Runs `f(0) .. f(parts - 1)` in parallel (f(0) on the calling thread when on Kiln's pool).
pub fn run(parts: usize, f: &(dyn Fn(usize) + Sync)) {
    if parts <= 1 {
        (0..parts).for_each(f);
        return;
    }
    match host() {
        Some((host, _)) => {
            unsafe extern "C" fn trampoline(ctx: *const c_void, p: usize) {
                // SAFETY: `ctx` is the `&dyn Fn` below, alive until the host returns. A panic
                // must not unwind into the host's C++ frames.
                let f = unsafe { &*(ctx as *const &(dyn Fn(usize) + Sync)) };
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(p)));
            }
            // SAFETY: the host calls the trampoline with our context only during this call.
            unsafe { host(parts, trampoline, &f as *const &(dyn Fn(usize) + Sync) as *const c_void) };
        }
        None => pool().run(parts, f),
    }
}

/// The pool and the process it was made in: a forked child (a DataLoader worker, a server
/// worker) inherits the pool but none of its threads, so it makes its own.
static POOL: Lazy<RwLock<(u32, Arc<ThreadPool>)>> = Lazy::new(|| RwLock::new((std::process::id(), Arc::new(pool_of(default_threads())))));

/// A pool of `threads`, or of as many as the system would start (kernels run either way).
fn pool_of(threads: usize) -> ThreadPool {
    let (pool, error) = ThreadPool::new(threads);
    if let Some(e) = error {
        tracing::warn!("kiln: started {} of {threads} threads for parallel kernels: {e}", pool.threads());
    }
    pool
}

pub(crate) fn pool() -> Arc<ThreadPool> {
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
        std::mem::forget(std::mem::replace(&mut p.1, Arc::new(pool_of(threads))));
        p.0 = pid;
    }
    p.1.clone()
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Sets the number of threads parallel kernels use (the caller counts as one). If the system
/// will not start that many, the pool stays as it was and the error says why.
pub fn set_num_threads(n: usize) -> std::io::Result<()> {
    let current = pool();
    if current.threads() != n.max(1) {
        match ThreadPool::new(n.max(1)) {
            (new, None) => POOL.write().unwrap().1 = Arc::new(new),
            (_, Some(e)) => return Err(e),
        }
    }
    Ok(())
}

pub fn num_threads() -> usize {
    threads()
}

