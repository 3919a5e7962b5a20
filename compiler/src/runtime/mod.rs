//! The runtime stage: object code loaded into the process (`jit`), a compiled program's kernels
//! run on caller-provided memory with per-thread scratch (`program`), on a persistent
//! spin-then-park pool (`thread_pool`) or the frontend's (`parallel`).

pub mod gemm;
pub mod jit;
pub mod parallel;
pub mod program;
pub mod qgemm;
pub mod thread_pool;
