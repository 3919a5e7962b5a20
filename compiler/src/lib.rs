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
pub mod runtime;

pub use dtype::{DType, Scalar};
pub use codegen::target::Target;
pub use graph::ir::{Graph, TensorType, ValueId};
pub use runtime::program::{CompiledProgram, ProgramImage};

use std::sync::atomic::{AtomicU64, Ordering};
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

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions { pipeline: "default<O3>".into(), interleave: 4 }
    }
}

static PROGRAM_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Lowers a graph to loop IR after the graph passes; what `compile` generates code for.
pub fn lower_graph(graph: &Graph, input_strides: &[Vec<i64>]) -> Result<lower::LoopProgram, CompileError> {
    let g = graph::passes::optimize(graph);
    Ok(lower::lower(&g, input_strides)?)
}

/// Compiles `graph` for inputs with the given strides, for `target`, to an image whose symbols
/// start with `symbol_prefix`. Symbols must be unique in a process; a caller that may load
/// images compiled by other processes names them after their cache key.
pub fn compile_image(graph: &Graph, input_strides: &[Vec<i64>], target: &Target, options: &CompileOptions, symbol_prefix: &str) -> Result<ProgramImage, CompileError> {
    compile_loop_program(&lower_graph(graph, input_strides)?, target, options, symbol_prefix)
}

/// Compiles a lowered program (say, one `symbolic::infer` rewrote) to an image; see
/// [`compile_image`].
pub fn compile_loop_program(lp: &lower::LoopProgram, target: &Target, options: &CompileOptions, symbol_prefix: &str) -> Result<ProgramImage, CompileError> {
    let dtypes: Vec<DType> = lp.buffers.iter().map(|b| b.dtype).collect();
    let obj = codegen::compile(&lp.kernels, &dtypes, target, symbol_prefix, options)?;
    let kernels = lp
        .kernels
        .iter()
        .zip(obj.symbols)
        .map(|(k, symbol)| runtime::program::KernelDecl {
            name: k.name.clone(),
            symbol,
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
        object: obj.bytes,
    })
}

/// Compiles an image (see [`compile_image`]) and loads it.
pub fn compile_named(graph: &Graph, input_strides: &[Vec<i64>], target: &Target, options: &CompileOptions, symbol_prefix: &str) -> Result<CompiledProgram, CompileError> {
    let start = Instant::now();
    let image = compile_image(graph, input_strides, target, options, symbol_prefix)?;
    let (kernels, bytes) = (image.kernels.len(), image.object.len());
    let mut program = image.load().map_err(CompileError::Load)?;
    program.compile_time = start.elapsed();
    tracing::debug!(kernels, bytes, ms = program.compile_time.as_secs_f64() * 1e3, "compiled program");
    Ok(program)
}

/// Compiles and loads `graph` under symbols unique to this process.
pub fn compile(graph: &Graph, input_strides: &[Vec<i64>], target: &Target, options: &CompileOptions) -> Result<CompiledProgram, CompileError> {
    let prefix = format!("kiln{}", PROGRAM_COUNTER.fetch_add(1, Ordering::Relaxed));
    compile_named(graph, input_strides, target, options, &prefix)
}
