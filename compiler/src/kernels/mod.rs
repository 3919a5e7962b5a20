//! Kernel generators for families that are not plain loop nests over one output: each one takes
//! a description the lowering makes (shapes, strides, a fused epilogue) and emits LLVM IR for
//! the target's register tile, with the blocking as data.

pub mod gemm;
pub mod quantized;
pub mod sparse;
pub mod weights_in_code;
