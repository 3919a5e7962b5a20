//! Compiles on a thread of Kiln's own, so that no call waits for a compile: a call whose
//! signature has no code queues a job and runs TorchScript's nodes at once; the job's
//! specialisation serves the calls after it lands (`runtime.rs`, `Runtime::specialize`).
//!
//! One job per region at a time (a region with a job pending queues nothing more: the job
//! reads the region's profile when it runs, so the sizes seen meanwhile shape its plan), a
//! bounded queue, and jobs no longer wanted (`disable()`, another `enable()`, a region past
//! its limit) dropped when their turn comes. `synchronize` waits until the queue is empty and
//! nothing runs.
//!
//! Processes: a `fork()` waits until no job runs (the child must not inherit a compile half
//! done: its locks and cache cells would stay taken for good), and the child starts a thread
//! of its own when it next has work. At interpreter exit `shutdown` drops the queue and waits
//! for the running job, so that no compile is inside LLVM while the process tears down.
//! Disk entries are written to a temporary file and renamed (`disk.rs`), so no reader ever sees
//! half an entry whatever happens to the writer.

use kiln_profiler::{GlobalState, TensorMeta};
use once_cell::sync::Lazy;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

/// A compile asked for by a call: the region, the call's signature, and the `enable()` it was
/// asked under (a job from an earlier generation is dropped).
pub struct Job {
    pub region: &'static crate::runtime::Region,
    pub metas: Vec<TensorMeta>,
    pub state: GlobalState,
    pub generation: u64,
}

/// Threads a background compile uses. One: the program keeps the other cores, and a call
/// that runs TorchScript meanwhile is not slowed down by more than one busy core.
const COMPILE_THREADS: usize = 1;

/// Jobs waiting beyond this are not queued (their calls run TorchScript, and a later call
/// queues them again): a burst of new signatures cannot pile up unbounded work.
pub const MAX_QUEUED: usize = 64;

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    running: usize,
    /// A worker thread exists (false again in a forked child).
    worker: bool,
    /// A fork is under way: no job starts.
    paused: bool,
    /// After `shutdown`: nothing is queued any more.
    closed: bool,
}

/// Counters of `stats()["background"]`.
#[derive(Default)]
pub struct Counts {
    /// Jobs ever queued (`stats()`'s "submitted"; "queued" is the queue's length now).
    pub queued: AtomicU64,
    pub done: AtomicU64,
    pub dropped: AtomicU64,
    /// Calls that ran TorchScript because their group's compile was pending.
    pub waited: AtomicU64,
}

impl Counts {
    pub fn reset(&self) {
        for c in [&self.queued, &self.done, &self.dropped, &self.waited] {
            c.store(0, Ordering::Relaxed);
        }
    }
}

pub struct CompileQueue {
    state: Mutex<State>,
    changed: Condvar,
    pub counts: Counts,
}

pub static QUEUE: Lazy<CompileQueue> = Lazy::new(|| {
    register_fork_handlers();
    CompileQueue { state: Mutex::new(State::default()), changed: Condvar::new(), counts: Counts::default() }
});

impl CompileQueue {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `job`; false if the queue is full or shut down (the job is dropped).
    pub fn push(&'static self, job: Job) -> bool {
        let mut s = self.lock();
        if s.closed || s.jobs.len() >= MAX_QUEUED {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.ensure_worker(&mut s);
        if !s.worker {
            // Nothing would run it: the caller clears its pending mark, a later call tries again.
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        s.jobs.push_back(job);
        self.counts.queued.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_all();
        true
    }

    fn ensure_worker(&'static self, s: &mut State) {
        if s.worker {
            return;
        }
        let spawned = std::thread::Builder::new().name("kiln-compile".into()).spawn(move || self.work());
        match spawned {
            Ok(_) => s.worker = true,
            Err(e) => tracing::warn!("kiln: cannot start the compile thread: {e}"),
        }
    }

    fn work(&'static self) {
        kiln_compiler::codegen::kernel_cache::set_threads_for_this_thread(COMPILE_THREADS);
        let mut s = self.lock();
        loop {
            while s.paused || s.jobs.is_empty() {
                s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            let job = s.jobs.pop_front().expect("a job");
            s.running += 1;
            drop(s);
            // `run_job` catches a compile's panic; a panic here would be Kiln's own bug, and
            // must leave neither `running` counted nor the group pending for good.
            let region = job.region;
            let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| crate::runtime::RUNTIME.run_job(job)));
            if done.is_err() {
                region.clear_pending();
            }
            let counter = if done.unwrap_or(false) { &self.counts.done } else { &self.counts.dropped };
            counter.fetch_add(1, Ordering::Relaxed);
            s = self.lock();
            s.running -= 1;
            self.changed.notify_all();
        }
    }

    /// Starts a worker if jobs wait and none exists (a forked child inherits the queue, not
    /// the thread).
    pub fn wake(&'static self) {
        let mut s = self.lock();
        if !s.worker && !s.jobs.is_empty() {
            self.ensure_worker(&mut s);
        }
    }

    /// (jobs queued, jobs running).
    pub fn pending(&self) -> (usize, usize) {
        let s = self.lock();
        (s.jobs.len(), s.running)
    }

    /// Waits until no job is queued or running (jobs queued meanwhile included).
    pub fn synchronize(&'static self) {
        let mut s = self.lock();
        while !s.jobs.is_empty() || s.running > 0 {
            if !s.jobs.is_empty() && !s.worker {
                self.ensure_worker(&mut s);
                if !s.worker {
                    // No thread can be started (a forked child, say): nothing will run these.
                    self.counts.dropped.fetch_add(s.jobs.len() as u64, Ordering::Relaxed);
                    for job in s.jobs.drain(..) {
                        job.region.clear_pending();
                    }
                    break;
                }
            }
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Drops every queued job (the running one finishes).
    pub fn drop_queued(&self) {
        let mut s = self.lock();
        self.counts.dropped.fetch_add(s.jobs.len() as u64, Ordering::Relaxed);
        for job in s.jobs.drain(..) {
            job.region.clear_pending();
        }
        self.changed.notify_all();
    }

    /// Interpreter exit: nothing more is queued, the queue is dropped, the running job is
    /// waited for.
    pub fn shutdown(&self) {
        self.lock().closed = true;
        self.drop_queued();
        let mut s = self.lock();
        while s.running > 0 {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn before_fork(&self) {
        let mut s = self.lock();
        s.paused = true;
        while s.running > 0 {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn after_fork(&self, child: bool) {
        let mut s = self.lock();
        s.paused = false;
        if child {
            // Only the forking thread lives on in the child.
            s.worker = false;
        }
        self.changed.notify_all();
    }
}

extern "C" {
    fn pthread_atfork(prepare: Option<extern "C" fn()>, parent: Option<extern "C" fn()>, child: Option<extern "C" fn()>) -> i32;
}

extern "C" fn before_fork() {
    QUEUE.before_fork();
}
extern "C" fn after_fork_parent() {
    QUEUE.after_fork(false);
}
extern "C" fn after_fork_child() {
    QUEUE.after_fork(true);
}

fn register_fork_handlers() {
    // SAFETY: the handlers are plain functions that live as long as the process.
    if unsafe { pthread_atfork(Some(before_fork), Some(after_fork_parent), Some(after_fork_child)) } != 0 {
        tracing::warn!("kiln: cannot register fork handlers; fork while a compile runs is unsafe");
    }
}
