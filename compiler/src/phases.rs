//! Where compile time goes, summed over the process: each stage of turning a region into
//! loaded code adds its wall time to one counter (`stats()["compile_phases_ms"]`). Counters are
//! atomics so that compiles on several threads add up without locks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The frontend's ops to Kiln's graph IR (a frontend reports it).
    Frontend,
    /// Graph passes, graph → loop IR, schedules, fitting code for symbolic sizes.
    Lower,
    /// Loop IR → LLVM IR.
    Emit,
    /// LLVM's optimisation pipeline.
    Optimize,
    /// LLVM IR → machine code (instruction selection, register allocation, object file).
    MachineCode,
    /// Object code into the process (ORC), from a compile or from a disk entry.
    Load,
}

pub const PHASES: [Phase; 6] = [Phase::Frontend, Phase::Lower, Phase::Emit, Phase::Optimize, Phase::MachineCode, Phase::Load];

static NANOS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Frontend => "frontend",
            Phase::Lower => "lower",
            Phase::Emit => "emit_llvm_ir",
            Phase::Optimize => "llvm_optimize",
            Phase::MachineCode => "machine_code",
            Phase::Load => "load",
        }
    }

    /// Runs `f`, adding its wall time to this phase.
    pub fn time<T>(self, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        self.add(start.elapsed());
        out
    }

    pub fn add(self, d: Duration) {
        NANOS[self as usize].fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn total(self) -> Duration {
        Duration::from_nanos(NANOS[self as usize].load(Ordering::Relaxed))
    }
}

pub fn reset() {
    for n in &NANOS {
        n.store(0, Ordering::Relaxed);
    }
}
