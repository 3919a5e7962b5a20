//! A persistent spin-then-park thread pool for the root loops of kernels.
//!
//! Waking a parked thread costs 15–30 µs on these VMs while a kernel on 1M floats takes
//! ~100 µs, so workers spin on an epoch counter for a short while after each job before
//! parking. The caller always runs the first chunk itself.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_micros(50);

type Job = dyn Fn(usize) + Sync;

/// What a worker reads, all at once: the epoch a job was posted in, the job, and how many
/// parts it has. Read together, so a worker runs each posted job at most once even when it
/// wakes late and a newer job is already there.
#[derive(Clone, Copy)]
struct Posted {
    epoch: usize,
    /// A pointer to the job (a `&Job` with its lifetime erased; valid while `pending > 0`,
    /// because `run` waits for every participating worker before returning).
    job: Option<(usize, usize)>,
    /// Workers with an index at or above this sit the job out.
    parts: usize,
}

struct Shared {
    /// Mirrors `posted.epoch`, for spinning without the lock.
    epoch: AtomicUsize,
    posted: Mutex<Posted>,
    pending: AtomicUsize,
    park: Mutex<()>,
    wake: Condvar,
    shutdown: AtomicBool,
}

impl Shared {
    /// Posts a job (None: wake up to see the shutdown) under a new epoch and wakes parked
    /// workers.
    fn post(&self, job: Option<(usize, usize)>, parts: usize) {
        let epoch = {
            let mut posted = self.posted.lock().unwrap();
            *posted = Posted { epoch: posted.epoch + 1, job, parts };
            posted.epoch
        };
        self.epoch.store(epoch, Ordering::SeqCst);
        let _l = self.park.lock().unwrap();
        self.wake.notify_all();
    }
}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: usize,
    /// Serialises callers: one job at a time runs on the pool.
    busy: Mutex<()>,
}

impl ThreadPool {
    /// A pool with `threads - 1` workers (the caller is the other thread), or as many as the
    /// system would start, with the error that stopped it.
    pub fn new(threads: usize) -> (ThreadPool, Option<std::io::Error>) {
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            posted: Mutex::new(Posted { epoch: 0, job: None, parts: 0 }),
            pending: AtomicUsize::new(0),
            park: Mutex::new(()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
        });
        let mut workers = 0;
        let mut error = None;
        for w in 0..threads.max(1) - 1 {
            let s = shared.clone();
            match std::thread::Builder::new().name(format!("kiln-worker-{w}")).spawn(move || worker(s, w + 1)) {
                Ok(_) => workers += 1,
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        (ThreadPool { shared, workers, busy: Mutex::new(()) }, error)
    }

    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// Runs `f(0) .. f(threads-1)` in parallel, f(0) on the calling thread. If another caller
    /// holds the pool, runs every part on this thread instead of waiting.
    pub fn run(&self, parts: usize, f: &(dyn Fn(usize) + Sync + '_)) {
        let parts = parts.min(self.threads());
        let guard = if parts > 1 { self.busy.try_lock().ok() } else { None };
        let Some(_guard) = guard else {
            (0..parts).for_each(f);
            return;
        };
        let helpers = parts - 1;
        let raw: (usize, usize) = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync + '_), (usize, usize)>(f) };
        self.shared.pending.store(helpers, Ordering::SeqCst);
        self.shared.post(Some(raw), parts);
        f(0);
        while self.shared.pending.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        self.shared.posted.lock().unwrap().job = None;
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.post(None, 0);
    }
}

fn worker(s: Arc<Shared>, index: usize) {
    // The epoch at creation (0), not a fresh load: a job may be posted before this thread runs.
    let mut seen = 0;
    loop {
        // Spin, then park until the epoch moves.
        let start = Instant::now();
        while s.epoch.load(Ordering::Acquire) == seen && start.elapsed() < SPIN {
            std::hint::spin_loop();
        }
        if s.epoch.load(Ordering::Acquire) == seen {
            let mut l = s.park.lock().unwrap();
            while s.epoch.load(Ordering::Acquire) == seen {
                l = s.wake.wait(l).unwrap();
            }
        }
        if s.shutdown.load(Ordering::Acquire) {
            return;
        }
        let posted = *s.posted.lock().unwrap();
        seen = posted.epoch;
        if let Some(raw) = posted.job {
            if index < posted.parts {
                let f: &Job = unsafe { std::mem::transmute::<(usize, usize), &Job>(raw) };
                f(index);
                s.pending.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_part_runs_exactly_once_per_job() {
        // More workers than parts, jobs back to back: a worker waking late must neither run
        // a job twice nor miss one it takes part in.
        let pool = ThreadPool::new(4).0;
        for job in 0..20_000u64 {
            let parts = 1 + (job % 4) as usize;
            let counts: Vec<AtomicU64> = (0..4).map(|_| AtomicU64::new(0)).collect();
            pool.run(parts, &|p| {
                counts[p].fetch_add(1, Ordering::Relaxed);
            });
            for (p, c) in counts.iter().enumerate() {
                assert_eq!(c.load(Ordering::Relaxed), (p < parts) as u64, "job {job} part {p}");
            }
        }
    }

    #[test]
    fn callers_on_several_threads_share_the_pool() {
        let pool = Arc::new(ThreadPool::new(3).0);
        let total = Arc::new(AtomicU64::new(0));
        let callers: Vec<_> = (0..4)
            .map(|_| {
                let (pool, total) = (pool.clone(), total.clone());
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        pool.run(3, &|p| {
                            total.fetch_add(p as u64 + 1, Ordering::Relaxed);
                        });
                    }
                })
            })
            .collect();
        for c in callers {
            c.join().unwrap();
        }
        assert_eq!(total.load(Ordering::Relaxed), 4 * 2000 * 6);
    }
}
