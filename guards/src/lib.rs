//! The checks run before each compiled group: does this call's input match what the compiled
//! code assumed? Exactly what the code relies on is checked, nothing more: dtype, device,
//! rank, every size, the strides of dims the code steps along (see
//! `kiln_profiler::canonical_strides`), and requires_grad (Kiln computes no gradients).
//!
//! A failed check is not an error: the frontend runs its original code and may ask for a new
//! specialisation. `check` allocates nothing; it runs on every call.

use kiln_profiler::{canonical_strides, Device, TensorMeta, TensorView};

/// Why a call did not match its group's guard.
#[derive(thiserror::Error, Clone, Debug, PartialEq, Eq)]
pub enum GuardFailure {
    #[error("{got} tensor inputs, compiled for {want}")]
    Arity { want: usize, got: usize },
    #[error("input {0}: dtype differs")]
    Dtype(usize),
    #[error("input {0}: not on the CPU")]
    Device(usize),
    #[error("input {0}: rank differs")]
    Rank(usize),
    #[error("input {0}: sizes differ")]
    Sizes(usize),
    #[error("input {0}: strides differ")]
    Strides(usize),
    #[error("input {0}: requires grad")]
    RequiresGrad(usize),
}

impl GuardFailure {
    /// A short name for counters: which kind of check failed.
    pub fn kind(&self) -> &'static str {
        match self {
            GuardFailure::Arity { .. } => "arity",
            GuardFailure::Dtype(_) => "dtype",
            GuardFailure::Device(_) => "device",
            GuardFailure::Rank(_) => "rank",
            GuardFailure::Sizes(_) => "sizes",
            GuardFailure::Strides(_) => "strides",
            GuardFailure::RequiresGrad(_) => "requires_grad",
        }
    }
}

/// What one input must look like.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorGuard {
    pub dtype: kiln_compiler::DType,
    pub sizes: Vec<i64>,
    /// Canonical strides: 0 where the code never steps (size-1 dims, empty tensors).
    pub strides: Vec<i64>,
}

/// The guards of every tensor input of one compiled group, in order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GuardSet {
    pub tensors: Vec<TensorGuard>,
}

impl GuardSet {
    /// Guards for inputs exactly like `metas`. None if an input can never be compiled for
    /// (unknown dtype, not on the CPU, requires grad).
    pub fn for_inputs(metas: &[TensorMeta]) -> Option<GuardSet> {
        let tensors = metas
            .iter()
            .map(|m| {
                if m.device != Device::Cpu || m.requires_grad {
                    return None;
                }
                Some(TensorGuard { dtype: m.dtype?, sizes: m.sizes.clone(), strides: canonical_strides(&m.sizes, &m.strides) })
            })
            .collect::<Option<_>>()?;
        Some(GuardSet { tensors })
    }

    pub fn check(&self, inputs: &[TensorView<'_>]) -> Result<(), GuardFailure> {
        if inputs.len() != self.tensors.len() {
            return Err(GuardFailure::Arity { want: self.tensors.len(), got: inputs.len() });
        }
        for (i, (g, t)) in self.tensors.iter().zip(inputs).enumerate() {
            if t.dtype != Some(g.dtype) {
                return Err(GuardFailure::Dtype(i));
            }
            if t.device != Device::Cpu {
                return Err(GuardFailure::Device(i));
            }
            if t.requires_grad {
                return Err(GuardFailure::RequiresGrad(i));
            }
            if t.sizes.len() != g.sizes.len() {
                return Err(GuardFailure::Rank(i));
            }
            if t.sizes != g.sizes.as_slice() {
                return Err(GuardFailure::Sizes(i));
            }
            let empty = g.sizes.contains(&0);
            for ((&n, &want), &got) in g.sizes.iter().zip(&g.strides).zip(t.strides) {
                if !empty && n != 1 && want != got {
                    return Err(GuardFailure::Strides(i));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_compiler::DType;

    fn meta(sizes: &[i64], strides: &[i64]) -> TensorMeta {
        TensorMeta { dtype: Some(DType::F32), device: Device::Cpu, sizes: sizes.to_vec(), strides: strides.to_vec(), requires_grad: false }
    }

    #[test]
    fn accepts_what_it_was_built_for_and_ignores_unused_strides() {
        let g = GuardSet::for_inputs(&[meta(&[4, 1, 3], &[3, 3, 1])]).unwrap();
        assert_eq!(g.check(&[meta(&[4, 1, 3], &[3, 3, 1]).view()]), Ok(()));
        assert_eq!(g.check(&[meta(&[4, 1, 3], &[3, 77, 1]).view()]), Ok(()));
        let empty = GuardSet::for_inputs(&[meta(&[0, 3], &[3, 1])]).unwrap();
        assert_eq!(empty.check(&[meta(&[0, 3], &[1, 5]).view()]), Ok(()));
    }

    #[test]
    fn rejects_each_difference() {
        let g = GuardSet::for_inputs(&[meta(&[4, 3], &[3, 1])]).unwrap();
        assert_eq!(g.check(&[]), Err(GuardFailure::Arity { want: 1, got: 0 }));
        assert_eq!(g.check(&[meta(&[4, 3], &[1, 4]).view()]), Err(GuardFailure::Strides(0)));
        assert_eq!(g.check(&[meta(&[4, 4], &[4, 1]).view()]), Err(GuardFailure::Sizes(0)));
        assert_eq!(g.check(&[meta(&[12], &[1]).view()]), Err(GuardFailure::Rank(0)));
        let mut m = meta(&[4, 3], &[3, 1]);
        m.dtype = Some(DType::F64);
        assert_eq!(g.check(&[m.view()]), Err(GuardFailure::Dtype(0)));
        let mut m = meta(&[4, 3], &[3, 1]);
        m.requires_grad = true;
        assert_eq!(g.check(&[m.view()]), Err(GuardFailure::RequiresGrad(0)));
        let mut m = meta(&[4, 3], &[3, 1]);
        m.device = Device::Other(1);
        assert_eq!(g.check(&[m.view()]), Err(GuardFailure::Device(0)));
    }

    #[test]
    fn never_built_for_grad_or_other_devices() {
        let mut m = meta(&[2], &[1]);
        m.requires_grad = true;
        assert_eq!(GuardSet::for_inputs(&[m]), None);
    }
}
