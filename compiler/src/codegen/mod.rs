//! LLVM codegen: each loop IR kernel → an LLVM module → Kiln's pipeline for the target CPU →
//! an object file in memory (`kernel_cache` compiles each distinct kernel once, several at a
//! time). `loops` emits loop-IR kernels, `math` the float32 approximations they call,
//! `target` says which CPU the code is for.
//!
//! Each kernel becomes `void NAME(ptr bufs, i64 start, i64 end)`: `bufs` is the kernel's
//! buffer table (its own buffers, in local order, then the parameters), [start, end) the
//! slice of the root loop this call runs (the runtime splits it across threads). The body is
//! a separate function taking each buffer it touches as a `noalias` pointer, so the
//! vectoriser needs no runtime alias checks; the pipeline inlines it.
//! Loop counters and accumulators start as allocas; mem2reg turns them into SSA.

use crate::codegen::target::Target;
use crate::dtype::DType;
use crate::lower::loop_ir::*;
use crate::phases::Phase;
use crate::CompileOptions;
use inkwell::builder::BuilderError;
use inkwell::context::Context;
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{CodeModel, FileType, RelocMode, Target as LlvmTarget, TargetMachine, TargetTriple};
use inkwell::OptimizationLevel;

pub mod kernel_cache;
pub mod loops;
pub mod math;
pub mod target;

/// Emits one kernel of any kind under the symbol `name`.
fn emit<'ctx>(ctx: &'ctx Context, module: &inkwell::module::Module<'ctx>, k: &Kernel, buffer_dtypes: &[DType], target: &Target, opts: &CompileOptions, name: &str) -> Result<(), CodegenError> {
    match &k.gemm {
        Some(spec) => crate::kernels::gemm::microkernel::emit(ctx, module, k, spec, buffer_dtypes, target, opts, name),
        None => loops::emit_kernel(ctx, module, k, buffer_dtypes, target, opts, name),
    }
}

#[derive(thiserror::Error, Debug)]
pub enum CodegenError {
    #[error("LLVM builder: {0}")]
    Builder(#[from] BuilderError),
    #[error("LLVM: {0}")]
    Llvm(String),
    #[error("codegen does not support {0}")]
    Unsupported(String),
}

fn target_machine(target: &Target) -> Result<TargetMachine, CodegenError> {
    let triple = TargetTriple::create(&target.triple);
    let t = LlvmTarget::from_triple(&triple).map_err(|e| CodegenError::Llvm(e.to_string()))?;
    t.create_target_machine(&triple, &target.cpu, &target.features, OptimizationLevel::Aggressive, RelocMode::PIC, CodeModel::Default)
        .ok_or_else(|| CodegenError::Llvm("cannot create target machine".into()))
}

/// Compiles one kernel (in local form: `buffer_dtypes` are its own buffers') to an object
/// file defining `symbol`, in a context of its own (see `kernel_cache`).
pub fn compile_kernel(k: &Kernel, buffer_dtypes: &[DType], target: &Target, opts: &CompileOptions, symbol: &str) -> Result<Vec<u8>, CodegenError> {
    let start = std::time::Instant::now();
    let ctx = Context::create();
    let module = ctx.create_module(symbol);
    let tm = target_machine(target)?;
    module.set_triple(&tm.get_triple());
    module.set_data_layout(&tm.get_target_data().get_data_layout());
    Phase::Emit.time(|| {
        emit(&ctx, &module, k, buffer_dtypes, target, opts, symbol)?;
        module.verify().map_err(|e| CodegenError::Llvm(format!("invalid module: {e}")))
    })?;
    Phase::Optimize.time(|| module.run_passes(&opts.pipeline, &tm, PassBuilderOptions::create()).map_err(|e| CodegenError::Llvm(e.to_string())))?;
    let buf = Phase::MachineCode.time(|| tm.write_to_memory_buffer(&module, FileType::Object).map_err(|e| CodegenError::Llvm(e.to_string())))?;
    let kind = if k.gemm.is_some() { "gemm" } else { "loops" };
    tracing::debug!(symbol, kind, bytes = buf.get_size(), ms = start.elapsed().as_secs_f64() * 1e3, "compiled kernel");
    Ok(buf.as_slice().to_vec())
}

/// The optimised LLVM IR of the kernels, for debugging and tests.
pub fn llvm_ir(kernels: &[Kernel], buffer_dtypes: &[DType], target: &Target, opts: &CompileOptions) -> Result<String, CodegenError> {
    let ctx = Context::create();
    let module = ctx.create_module("kiln");
    let tm = target_machine(target)?;
    for k in kernels {
        emit(&ctx, &module, k, buffer_dtypes, target, opts, &k.name)?;
    }
    module.run_passes(&opts.pipeline, &tm, PassBuilderOptions::create()).map_err(|e| CodegenError::Llvm(e.to_string()))?;
    Ok(module.print_to_string().to_string())
}

