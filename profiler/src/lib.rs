//! What live runs showed about the inputs of a group: dtype, device, sizes, strides and
//! requires_grad of each tensor, and across runs which dims stayed put and which moved.
//!
//! Frontend-neutral: a frontend turns its tensors into [`TensorView`]s (borrowed, no copies).

use kiln_compiler::DType;
use std::fmt;

/// Where a tensor lives. Kiln generates code for the host CPU only today.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    /// Any other device, by the frontend's own code for it.
    Other(i32),
}

/// One tensor of a live call, borrowed from the frontend's tensor.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    /// `None`: an element type Kiln does not support (the frontend's name is lost here).
    pub dtype: Option<DType>,
    pub device: Device,
    pub sizes: &'a [i64],
    pub strides: &'a [i64],
    pub requires_grad: bool,
}

/// An owned record of one tensor's metadata.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorMeta {
    pub dtype: Option<DType>,
    pub device: Device,
    pub sizes: Vec<i64>,
    pub strides: Vec<i64>,
    pub requires_grad: bool,
}

impl From<&TensorView<'_>> for TensorMeta {
    fn from(v: &TensorView<'_>) -> Self {
        TensorMeta { dtype: v.dtype, device: v.device, sizes: v.sizes.to_vec(), strides: v.strides.to_vec(), requires_grad: v.requires_grad }
    }
}

impl TensorMeta {
    pub fn view(&self) -> TensorView<'_> {
        TensorView { dtype: self.dtype, device: self.device, sizes: &self.sizes, strides: &self.strides, requires_grad: self.requires_grad }
    }
}

impl fmt::Display for TensorMeta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.dtype {
            Some(d) => write!(f, "{d}")?,
            None => f.write_str("unsupported-dtype")?,
        }
        write!(f, "{:?} strides={:?}", self.sizes, self.strides)?;
        if let Device::Other(d) = self.device {
            write!(f, " device={d}")?;
        }
        if self.requires_grad {
            f.write_str(" requires_grad")?;
        }
        Ok(())
    }
}

/// Strides as the generated code uses them: a dim of size 1 is never stepped along, so its
/// stride is meaningless and becomes 0; a tensor with no elements is never read, so all
/// its strides become 0. Two tensors with the same canonical strides run the same code.
pub fn canonical_strides(sizes: &[i64], strides: &[i64]) -> Vec<i64> {
    if sizes.contains(&0) {
        return vec![0; sizes.len()];
    }
    sizes.iter().zip(strides).map(|(&n, &s)| if n == 1 { 0 } else { s }).collect()
}

/// Whether each dim of one group input was the same in every observation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DimStability {
    Stable(i64),
    /// Seen with these sizes (in order of first sight).
    Varies(Vec<i64>),
}

/// All input signatures one group was seen with (one entry per distinct signature).
#[derive(Clone, Debug, Default)]
pub struct GroupProfile {
    pub signatures: Vec<Vec<TensorMeta>>,
}

impl GroupProfile {
    /// Records a signature; returns true if it had not been seen before.
    pub fn observe(&mut self, inputs: &[TensorView<'_>]) -> bool {
        let metas: Vec<TensorMeta> = inputs.iter().map(TensorMeta::from).collect();
        if self.signatures.contains(&metas) {
            return false;
        }
        self.signatures.push(metas);
        true
    }

    /// Per input, per dim: stable or varying across the recorded signatures of the same rank.
    pub fn dim_stability(&self) -> Vec<Vec<DimStability>> {
        let Some(first) = self.signatures.first() else { return vec![] };
        first
            .iter()
            .enumerate()
            .map(|(i, m)| {
                (0..m.sizes.len())
                    .map(|d| {
                        let mut seen: Vec<i64> = vec![];
                        for sig in &self.signatures {
                            if let Some(s) = sig.get(i).filter(|t| t.sizes.len() == m.sizes.len()).map(|t| t.sizes[d]) {
                                if !seen.contains(&s) {
                                    seen.push(s);
                                }
                            }
                        }
                        if seen.len() == 1 { DimStability::Stable(seen[0]) } else { DimStability::Varies(seen) }
                    })
                    .collect()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(sizes: &'a [i64], strides: &'a [i64]) -> TensorView<'a> {
        TensorView { dtype: Some(DType::F32), device: Device::Cpu, sizes, strides, requires_grad: false }
    }

    #[test]
    fn canonical_strides_ignore_unit_and_empty_dims() {
        assert_eq!(canonical_strides(&[4, 1, 3], &[3, 99, 1]), vec![3, 0, 1]);
        assert_eq!(canonical_strides(&[4, 0, 3], &[3, 3, 1]), vec![0, 0, 0]);
        assert_eq!(canonical_strides(&[], &[]), Vec::<i64>::new());
    }

    #[test]
    fn stability_tracks_varying_dims() {
        let mut p = GroupProfile::default();
        assert!(p.observe(&[view(&[2, 8], &[8, 1])]));
        assert!(!p.observe(&[view(&[2, 8], &[8, 1])]));
        assert!(p.observe(&[view(&[5, 8], &[8, 1])]));
        assert_eq!(p.dim_stability(), vec![vec![DimStability::Varies(vec![2, 5]), DimStability::Stable(8)]]);
    }
}
