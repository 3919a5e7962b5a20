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
}

/// The LLVM this crate is linked against; part of every cache key.
pub const LLVM_VERSION: &str = "19.1";
