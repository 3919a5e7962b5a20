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

/// What a call's result depends on besides its tensors: process-wide and thread-local
/// settings of the frontend, read on every call. Lowerings read them, so guards compare them
/// (`kiln_guards::GuardSet::state`): code made under one state never runs under another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GlobalState {
    /// The float dtype integer→float promotion and float scalars give (PyTorch's default
    /// dtype); Err: one Kiln has no code for, by the frontend's number for it.
    pub default_float: Result<DType, i32>,
    /// Mixed-precision autocast of CPU ops: the frontend's number of the dtype it casts to,
    /// None when off. No op Kiln compiles today is on autocast's lists, so lowerings ignore
    /// it; a lowering of one that is must read it here.
    pub autocast: Option<i32>,
}

impl Default for GlobalState {
    fn default() -> Self {
        GlobalState { default_float: Ok(DType::F32), autocast: None }
    }
}

impl fmt::Display for GlobalState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.default_float {
            Ok(d) => write!(f, "default dtype {d}")?,
            Err(code) => write!(f, "default dtype #{code}")?,
        }
        match self.autocast {
            Some(code) => write!(f, ", CPU autocast to #{code}"),
            None => Ok(()),
        }
    }
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

/// How the code for a group should treat one dim of one input, from what the profile saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DimPlan {
    /// Always this size: baked into the code.
    Static(i64),
    /// Seen with several sizes: a symbol bound from the runtime size. Dims that were equal to
    /// each other in every observation share a symbol (a batch dim of two inputs). General
    /// code serves sizes ≥ 2 only: a dim of 1 broadcasts and an empty dim reads nothing, so
    /// calls with those sizes get code of their own.
    Symbol(u32),
}

impl GroupProfile {
    /// The plan for each input's dims, from the signatures with the same input ranks as the
    /// latest one (a rank change is another kind of input, with code of its own). With
    /// `assume_dynamic`, dims of size ≥ 2 that never moved are symbols too (tied the same
    /// way: equal in every observation).
    pub fn dim_plan(&self, assume_dynamic: bool) -> Vec<Vec<DimPlan>> {
        let Some(last) = self.signatures.last() else { return vec![] };
        let ranks: Vec<usize> = last.iter().map(|m| m.sizes.len()).collect();
        let sigs: Vec<&Vec<TensorMeta>> =
            self.signatures.iter().filter(|s| s.iter().map(|m| m.sizes.len()).eq(ranks.iter().copied())).collect();
        // The sizes each (input, dim) took, one per signature: equal histories are tied.
        let history = |i: usize, d: usize| -> Vec<i64> { sigs.iter().map(|s| s[i].sizes[d]).collect() };
        let mut symbols: Vec<Vec<i64>> = vec![];
        ranks
            .iter()
            .enumerate()
            .map(|(i, &rank)| {
                (0..rank)
                    .map(|d| {
                        let h = history(i, d);
                        let moved = h.iter().any(|&n| n != h[0]);
                        if !moved && !(assume_dynamic && h[0] >= 2) {
                            return DimPlan::Static(h[0]);
                        }
                        let k = symbols.iter().position(|s| *s == h).unwrap_or_else(|| {
                            symbols.push(h);
                            symbols.len() - 1
                        });
                        DimPlan::Symbol(k as u32)
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

    #[test]
    fn varying_dims_become_symbols_tied_when_always_equal() {
        let mut p = GroupProfile::default();
        for (b, t) in [(2, 8), (5, 8), (9, 16)] {
            p.observe(&[view(&[b, t, 4], &[t * 4, 4, 1]), view(&[b, 1], &[1, 1]), view(&[t], &[1])]);
        }
        use DimPlan::*;
        assert_eq!(p.dim_plan(false), vec![vec![Symbol(0), Symbol(1), Static(4)], vec![Symbol(0), Static(1)], vec![Symbol(1)]]);
        assert_eq!(p.dim_plan(true), vec![vec![Symbol(0), Symbol(1), Symbol(2)], vec![Symbol(0), Static(1)], vec![Symbol(1)]]);
    }

    #[test]
    fn dims_seen_as_0_or_1_still_vary_and_other_ranks_are_ignored() {
        let mut p = GroupProfile::default();
        p.observe(&[view(&[7], &[1])]);
        p.observe(&[view(&[3, 3], &[3, 1])]);
        p.observe(&[view(&[1], &[1])]);
        p.observe(&[view(&[4], &[1])]);
        assert_eq!(p.dim_plan(false), vec![vec![DimPlan::Symbol(0)]]);
        let mut one = GroupProfile::default();
        one.observe(&[view(&[1, 6], &[6, 1])]);
        assert_eq!(one.dim_plan(true), vec![vec![DimPlan::Static(1), DimPlan::Symbol(0)]]);
    }
}
