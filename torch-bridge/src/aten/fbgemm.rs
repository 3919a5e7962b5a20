//! Which of fbgemm's int8 kernels PyTorch runs on this host, where the choice shows in the
//! result: a static product's 8-bit activations saturate the AVX2 and AVX-512 kernels' pair
//! sums (`vpmaddubsw`) and not the VNNI kernels' (`vpdpbusd`), so Kiln must sum as the kernel
//! PyTorch picks does (`ProductSums`).
//!
//! fbgemm picks its instruction set once per process (`fbgemmInstructionSet`, read in FBGEMM's
//! `src/Utils.cc`): AVX-512 VNNI where cpuinfo reports it, else AVX-512, else AVX2; the
//! environment variable `FBGEMM_ENABLE_INSTRUCTIONS` forces an older set the host supports
//! (`AVX2`, `AVX512`, `AVX512_256`; `AVX512_E1` and `AVX512_E1_256` are VNNI's), anything else
//! is ignored. Its depthwise convolutions of the common shapes run one AVX2 kernel on every
//! host (`GenerateI8Depthwise`, pairs); the others go through im2col and the GEMM kernel of
//! the set (`ConvFastPath`, `src/FbgemmConv.cc`).

use kiln_compiler::codegen::target::Target;
use kiln_compiler::graph::ir::{ConvWindow, ProductSums};

/// How fbgemm's GEMM kernels sum in this process.
pub(super) fn gemm_sums() -> ProductSums {
    static SUMS: once_cell::sync::Lazy<ProductSums> = once_cell::sync::Lazy::new(|| {
        let forced = std::env::var("FBGEMM_ENABLE_INSTRUCTIONS").map(|s| s.to_ascii_uppercase());
        let older = matches!(forced.as_deref(), Ok("AVX2" | "AVX512" | "AVX512_256"));
        if Target::host().has_feature("avx512vnni") && !older { ProductSums::Exact } else { ProductSums::SaturatedPairs }
    });
    *SUMS
}

/// How fbgemm sums a depthwise convolution of `channels` groups, `multiplier` output channels
/// each, over `window`: its depthwise kernel (pairs) where `takeDepthWiseFastPath` takes it —
/// 8k channels, 1 or 2 outputs each, a square 3, 5 or 7 window, stride 1 or 2, no dilation,
/// the padding (K − 1) / 2 on every side —, the GEMM's sums otherwise.
pub(super) fn depthwise_sums(channels: i64, multiplier: i64, window: &ConvWindow) -> ProductSums {
    let [kh, kw] = window.kernel;
    let fast = channels % 8 == 0
        && (multiplier == 1 || multiplier == 2)
        && kh == kw
        && [3, 5, 7].contains(&kh)
        && window.stride.iter().all(|&s| s == 1 || s == 2)
        && window.dilation == [1, 1]
        && window.padding.iter().all(|&p| p == (kh - 1) / 2);
    if fast { ProductSums::SaturatedPairs } else { gemm_sums() }
}
