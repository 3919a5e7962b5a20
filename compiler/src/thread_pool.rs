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

struct Shared {
    epoch: AtomicUsize,
    /// A pointer to the current job (a `&Job` with its lifetime erased; valid while
    /// `pending > 0`, because `run` waits for every worker before returning).
    job: Mutex<Option<(usize, usize)>>,
    pending: AtomicUsize,
    /// How many parts the current job has; workers with a higher index sit it out.
    parts: AtomicUsize,
    park: Mutex<()>,
    wake: Condvar,
    shutdown: AtomicBool,
}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: usize,
    /// Serialises callers: one job at a time runs on the pool.
    busy: Mutex<()>,
}

impl ThreadPool {
    /// A pool with `threads - 1` workers (the caller is the other thread).
    pub fn new(threads: usize) -> ThreadPool {
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            job: Mutex::new(None),
            pending: AtomicUsize::new(0),
            parts: AtomicUsize::new(0),
            park: Mutex::new(()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
        });
        let workers = threads.max(1) - 1;
        for w in 0..workers {
            let s = shared.clone();
            std::thread::Builder::new().name(format!("kiln-worker-{w}")).spawn(move || worker(s, w + 1)).expect("spawn kiln worker");
        }
        ThreadPool { shared, workers, busy: Mutex::new(()) }
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
        *self.shared.job.lock().unwrap() = Some(raw);
        self.shared.pending.store(helpers, Ordering::SeqCst);
        self.shared.parts.store(parts, Ordering::SeqCst);
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        {
            let _l = self.shared.park.lock().unwrap();
            self.shared.wake.notify_all();
        }
        f(0);
        while self.shared.pending.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        *self.shared.job.lock().unwrap() = None;
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        let _l = self.shared.park.lock().unwrap();
        self.shared.wake.notify_all();
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
        seen = s.epoch.load(Ordering::Acquire);
        if s.shutdown.load(Ordering::Acquire) {
            return;
        }
        let job = *s.job.lock().unwrap();
        if let Some(raw) = job {
            if index < s.parts.load(Ordering::Acquire) {
                let f: &Job = unsafe { std::mem::transmute::<(usize, usize), &Job>(raw) };
                f(index);
                s.pending.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}
