//! The TorchScript frontend of Kiln: the only crate that touches libtorch.
//!
//! A C++ shim (`cpp/kiln_bridge.cpp`) registers a TorchScript post-pass that groups the nodes
//! Kiln supports into `kiln::CompilationGroup` nodes behind a `kiln::Guard`, and the two
//! operators that run them. It asks Rust through `extern "C"` functions ([`ffi`]) with a text
//! dump of each region ([`ts_dump`]), which [`aten`] lowers to Kiln IR and [`runtime`]
//! compiles, caches and runs.

pub mod aten;
pub mod background;
pub mod ffi;
pub mod packed;
pub mod runtime;
pub mod ts_dump;

pub use runtime::{Dynamic, Options, Stats, RUNTIME};

#[derive(thiserror::Error, Debug)]
pub enum BridgeError {
    #[error("registering the TorchScript pass or operators failed (see the fallback reasons)")]
    Register,
}

/// Registers the pass and operators (once) and turns the pass on.
/// Sets the threads Kiln's parallel kernels use. At torch's own thread count they run on
/// torch's intra-op pool (no second pool to spin against it: `runtime::parallel`); another
/// count, or a libtorch without OpenMP, gets Kiln's pool of that size.
pub fn set_num_threads(n: usize) -> std::io::Result<()> {
    use kiln_compiler::runtime::parallel;
    let torch = unsafe { ffi::kiln_cpp_torch_threads() }.max(1) as usize;
    if n.max(1) == torch && unsafe { ffi::kiln_cpp_has_torch_pool() } != 0 {
        parallel::use_host_pool(Some((ffi::kiln_cpp_parallel, torch)));
        return Ok(());
    }
    parallel::set_num_threads(n)?;
    parallel::use_host_pool(None);
    Ok(())
}

pub fn enable(options: Options) -> Result<(), BridgeError> {
    *RUNTIME.options.write().unwrap() = options;
    RUNTIME.generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    RUNTIME.compiling.store(true, std::sync::atomic::Ordering::Relaxed);
    if unsafe { ffi::kiln_cpp_enable() } == 0 {
        return Err(BridgeError::Register);
    }
    Ok(())
}

/// Turns the pass off and stops compiling specialisations. Code already compiled keeps
/// running for the signatures it was built for.
pub fn disable() {
    RUNTIME.compiling.store(false, std::sync::atomic::Ordering::Relaxed);
    background::QUEUE.drop_queued();
    unsafe { ffi::kiln_cpp_disable() }
}
