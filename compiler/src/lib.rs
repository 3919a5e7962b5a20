//! Kiln's compiler: graph IR → passes → loop IR → schedule → LLVM codegen → a loaded program.
//!
//! One folder a stage, data flowing down:
//! - [`graph`]: the graph IR, its passes, the layout rules and the reference interpreter;
//! - [`lower`]: graph → loop IR (fusion, memory plan), schedules, code for symbolic sizes;
//! - [`kernels`]: generators for kernel families that are not plain loop nests (GEMM);
//! - [`codegen`]: loop IR and kernel descriptions → LLVM IR → object code, and its math;
//! - [`runtime`]: object code loaded into the process and run on the thread pool.
//!
//! Nothing here knows about TorchScript or any other frontend: a frontend builds an
//! [`graph::ir::Graph`] and the input strides, and gets back a [`runtime::program::CompiledProgram`].

pub mod codegen;
pub mod dtype;
pub mod graph;
pub mod kernels;
pub mod lower;
pub mod phases;
pub mod runtime;

pub use dtype::{DType, Scalar};
pub use codegen::target::Target;
pub use graph::ir::{Graph, TensorType, ValueId};
pub use runtime::program::{CompiledProgram, ProgramImage};

use std::time::Instant;

/// Kiln's version, part of every cache key: the package version and a fingerprint of the
/// compiler's sources (`build.rs`), so code cached by another build is never taken for this
/// one's.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "+", env!("KILN_SOURCE_HASH"));

#[derive(thiserror::Error, Debug)]
pub enum CompileError {
    #[error("lowering: {0}")]
    Lower(#[from] lower::LowerError),
    #[error("codegen: {0}")]
    Codegen(#[from] codegen::CodegenError),
    #[error("loading object code: {0}")]
    Load(String),
}

/// Options that change the generated code (and so belong in the cache key).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CompileOptions {
    /// LLVM new-pass-manager pipeline.
    pub pipeline: String,
    /// Interleave count asked of the loop vectoriser for innermost loops: independent vector
    /// iterations in flight hide the latency of long dependent chains (exp feeding a division
    /// feeding exp). Measured on the spine (2^20 f32, 1 thread): 1 → 1.61 ms, 4 → 1.32 ms;
    /// LLVM's own choice for such bodies is 1.
    pub interleave: u32,
}

/// The LLVM pipeline of `opt_level` 3: what Kiln's IR needs and no more. Kernels arrive as
/// scalar loops over allocas with the body in a function of its own; they need inlining,
/// SROA, simplification, LICM and loop rotation so that the vectoriser sees canonical loops,
/// the vectoriser, and a clean-up. `default<O3>` runs ~80 passes more, which on Kiln's
/// kernels took twice as long for the same code speed (measured on the spine, the
/// normalisation stack and the encoder: ARCHITECTURE.md, "Compile time").
///
/// InstCombine runs as `default<O3>` runs it: without its fixpoint check, which in LLVM 19
/// is on for a pipeline written out and *aborts the process* when one iteration does not
/// reach a fixpoint (found by the differential fuzzer).
pub const KILN_PIPELINE: &str = "cgscc(inline),function(sroa,early-cse,instcombine<no-verify-fixpoint>,simplifycfg,loop-mssa(licm),loop(loop-rotate),loop(indvars),loop-vectorize,loop-mssa(licm),instcombine<no-verify-fixpoint>,simplifycfg)";

impl CompileOptions {
    /// Level 3 is [`KILN_PIPELINE`]; 0–2 are LLVM's `default<On>` (below 2 nothing is
    /// vectorised).
    pub fn at_level(opt_level: u8) -> CompileOptions {
        let pipeline = if opt_level >= 3 { KILN_PIPELINE.to_string() } else { format!("default<O{opt_level}>") };
        CompileOptions { pipeline, ..CompileOptions::default() }
    }
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions { pipeline: KILN_PIPELINE.into(), interleave: 4 }
    }
}

/// Lowers a graph to loop IR after the graph passes; what `compile` generates code for.
pub fn lower_graph(graph: &Graph, input_strides: &[Vec<i64>]) -> Result<lower::LoopProgram, CompileError> {
    phases::Phase::Lower.time(|| {
        let g = graph::passes::optimize(graph);
        Ok(lower::lower(&g, input_strides)?)
    })
}

/// Compiles `graph` for inputs with the given strides, for `target`, to an image. Kernels
/// this process compiled before (in this program or another) are not compiled again.
pub fn compile_image(graph: &Graph, input_strides: &[Vec<i64>], target: &Target, options: &CompileOptions) -> Result<ProgramImage, CompileError> {
    compile_loop_program(&lower_graph(graph, input_strides)?, target, options)
}

/// Compiles a lowered program (say, one `symbolic::infer` rewrote) to an image; see
/// [`compile_image`].
pub fn compile_loop_program(lp: &lower::LoopProgram, target: &Target, options: &CompileOptions) -> Result<ProgramImage, CompileError> {
    let (locals, buffers): (Vec<lower::loop_ir::Kernel>, Vec<Vec<lower::loop_ir::BufId>>) = lp.kernels.iter().map(|k| k.with_local_buffers()).unzip();
    let jobs: Vec<(lower::loop_ir::Kernel, Vec<DType>)> =
        locals.into_iter().zip(&buffers).map(|(k, bufs)| (k, bufs.iter().map(|b| lp.buffers[b.0 as usize].dtype).collect())).collect();
    let code = codegen::kernel_cache::compile_kernels(&jobs, target, options)?;
    let kernels = jobs
        .into_iter()
        .zip(code)
        .zip(buffers)
        .map(|(((k, _), code), buffers)| runtime::program::KernelDecl {
            name: k.name.clone(),
            symbol: code.symbol,
            object: code.object,
            buffers: buffers.iter().map(|b| b.0).collect(),
            extent: k.outer_extent(),
            parallel: k.root.kind == lower::loop_ir::LoopKind::Parallel,
            work_per_iter: k.work_per_iter,
            gemm: k.gemm.as_ref().map(|g| g.shape.clone()),
        })
        .collect();
    Ok(ProgramImage {
        buffers: lp.buffers.clone(),
        kernels,
        arena_bytes: lp.arena_bytes,
        num_inputs: lp.num_inputs,
        num_outputs: lp.num_outputs,
        loop_ir: lp.kernels.iter().map(|k| k.to_string()).collect(),
    })
}

/// Compiles `graph` (see [`compile_image`]) and loads it.
pub fn compile(graph: &Graph, input_strides: &[Vec<i64>], target: &Target, options: &CompileOptions) -> Result<CompiledProgram, CompileError> {
    let start = Instant::now();
    let image = compile_image(graph, input_strides, target, options)?;
    let kernels = image.kernels.len();
    let mut program = image.load().map_err(CompileError::Load)?;
    program.compile_time = start.elapsed();
    tracing::debug!(kernels, ms = program.compile_time.as_secs_f64() * 1e3, "compiled program");
    Ok(program)
}
