//! LLVM codegen: loop IR kernels → one LLVM module → `default<O3>` for the target CPU → an
//! object file in memory. `loops` emits loop-IR kernels, `math` the float32 approximations
//! they call, `target` says which CPU the code is for.
//!
//! Each kernel becomes `void NAME(ptr bufs, i64 start, i64 end)`: `bufs` is the program's
//! buffer table, [start, end) the slice of the root loop this call runs (the runtime splits it
//! across threads). The body is a separate function taking each buffer it touches as a
//! `noalias` pointer, so the vectoriser needs no runtime alias checks; O3 inlines it.
//! Loop counters and accumulators start as allocas; mem2reg turns them into SSA.

use crate::codegen::target::Target;
use crate::dtype::DType;
use crate::lower::loop_ir::*;
use crate::CompileOptions;
use inkwell::builder::BuilderError;
use inkwell::context::Context;
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{CodeModel, FileType, RelocMode, Target as LlvmTarget, TargetMachine, TargetTriple};
use inkwell::OptimizationLevel;

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

/// Machine code for a set of kernels, with the symbol of each.
pub struct ObjectCode {
    pub bytes: Vec<u8>,
    pub symbols: Vec<String>,
}

fn target_machine(target: &Target) -> Result<TargetMachine, CodegenError> {
    let triple = TargetTriple::create(&target.triple);
    let t = LlvmTarget::from_triple(&triple).map_err(|e| CodegenError::Llvm(e.to_string()))?;
    t.create_target_machine(&triple, &target.cpu, &target.features, OptimizationLevel::Aggressive, RelocMode::PIC, CodeModel::Default)
        .ok_or_else(|| CodegenError::Llvm("cannot create target machine".into()))
}

/// Compiles kernels to an object file. Symbols are `{prefix}_{kernel.name}`.
pub fn compile(kernels: &[Kernel], buffer_dtypes: &[DType], target: &Target, prefix: &str, opts: &CompileOptions) -> Result<ObjectCode, CodegenError> {
    let ctx = Context::create();
    let module = ctx.create_module(prefix);
    let tm = target_machine(target)?;
    module.set_triple(&tm.get_triple());
    module.set_data_layout(&tm.get_target_data().get_data_layout());
    let mut symbols = vec![];
    for k in kernels {
        let name = format!("{prefix}_{}", k.name);
        emit(&ctx, &module, k, buffer_dtypes, target, opts, &name)?;
        symbols.push(name);
    }
    module.verify().map_err(|e| CodegenError::Llvm(format!("invalid module: {e}")))?;
    module
        .run_passes(&opts.pipeline, &tm, PassBuilderOptions::create())
        .map_err(|e| CodegenError::Llvm(e.to_string()))?;
    let buf = tm.write_to_memory_buffer(&module, FileType::Object).map_err(|e| CodegenError::Llvm(e.to_string()))?;
    Ok(ObjectCode { bytes: buf.as_slice().to_vec(), symbols })
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

