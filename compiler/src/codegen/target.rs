//! The code generation target, as data: what the cache key and codegen need to know.

use inkwell::targets::{InitializationConfig, Target as LlvmTarget, TargetMachine};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub triple: String,
    pub cpu: String,
    pub features: String,
}

impl Target {
    /// The CPU this process runs on. Code compiled for it may not run on another CPU.
    pub fn host() -> Target {
        LlvmTarget::initialize_native(&InitializationConfig::default()).expect("LLVM native target");
        Target {
            triple: TargetMachine::get_default_triple().as_str().to_string_lossy().into_owned(),
            cpu: TargetMachine::get_host_cpu_name().to_string(),
            features: TargetMachine::get_host_cpu_features().to_string(),
        }
    }

    /// Whether eager's float32 kernels on this target are PyTorch's AVX-512 ones: ATen picks
    /// its CPU kernels by ISA at run time, and a few special values differ between them
    /// (gelu: [`crate::codegen::math::Math::gelu_f32`]). Kiln computes what eager computes on
    /// the machine it compiles for.
    pub fn eager_avx512(&self) -> bool {
        ["avx512f", "avx512bw", "avx512vl", "avx512dq"].iter().all(|f| self.has_feature(f))
    }

    /// Whether LLVM's feature string enables `feature` ("avx512f": "+avx512f" in the list).
    pub fn has_feature(&self, feature: &str) -> bool {
        self.features.split(',').any(|x| x.strip_prefix('+') == Some(feature))
    }
}

/// The LLVM this crate is linked against; part of every cache key.
pub const LLVM_VERSION: &str = "19.1";
