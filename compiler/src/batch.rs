//! Batch polymorphism: when code compiled for one size of the leading (batch) dim serves every
//! size ≥ 2, with no symbolic IR.
//!
//! Kernels run on `[start, end)` slices of their root loop, so the root extent is not baked
//! into code; a contiguous batch dim's stride does not depend on the batch size. A region
//! lowered at two batch sizes whose loop programs are equal except for root extents that are
//! `per_row × batch`, and buffers whose dim 0 is the batch, is batch polymorphic: the
//! runtime scales those extents and lays temporaries out for the batch at hand
//! ([`CompiledProgram::run_batched`](crate::CompiledProgram::run_batched)). Anything else
//! (a reduction over the batch, a stride that depends on it) makes the two programs differ,
//! and the region stays specialised.

use crate::loop_ir::LoopKind;
use crate::lower::{BufferKind, LoopProgram};
use crate::ir::Dim;

/// How a program's buffers and kernels follow the batch size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchScaling {
    /// Per buffer: dim 0 is the batch.
    pub batched: Vec<bool>,
    /// Per kernel: `Some(per_row)` if its root extent is per_row × batch, None if fixed.
    pub per_row: Vec<Option<i64>>,
}

fn extent(d: &Dim) -> Option<i64> {
    match d {
        Dim::Const(n) => Some(*n),
        Dim::Sym(_) => None,
    }
}

/// The scaling that turns `a` (lowered at batch `ba`) into `b` (at batch `bb`), if there is
/// one. `ba` and `bb` must differ and be ≥ 2 (a batch of 1 broadcasts).
pub fn batch_scaling(a: &LoopProgram, ba: i64, b: &LoopProgram, bb: i64) -> Option<BatchScaling> {
    assert!(ba >= 2 && bb >= 2 && ba != bb);
    if a.buffers.len() != b.buffers.len() || a.kernels.len() != b.kernels.len() || (a.num_inputs, a.num_outputs) != (b.num_inputs, b.num_outputs) {
        return None;
    }
    let mut batched = vec![];
    for (x, y) in a.buffers.iter().zip(&b.buffers) {
        let same_kind = match (&x.kind, &y.kind) {
            (BufferKind::Temp { .. }, BufferKind::Temp { .. }) => true,
            (k, l) => k == l,
        };
        if !same_kind || x.dtype != y.dtype || x.sizes.len() != y.sizes.len() {
            return None;
        }
        if x.sizes == y.sizes {
            batched.push(false);
        } else if x.sizes[0] == ba && y.sizes[0] == bb && x.sizes[1..] == y.sizes[1..] {
            batched.push(true);
        } else {
            return None;
        }
    }
    let mut per_row = vec![];
    for (x, y) in a.kernels.iter().zip(&b.kernels) {
        let (ea, eb) = (extent(&x.root.extent)?, extent(&y.root.extent)?);
        let (mut x, mut y) = (x.clone(), y.clone());
        for k in [&mut x, &mut y] {
            k.root.extent = Dim::Const(0);
            k.root.kind = LoopKind::Serial;
        }
        if x != y {
            return None;
        }
        per_row.push(if ea == eb {
            None
        } else if ea % ba == 0 && eb % bb == 0 && ea / ba == eb / bb {
            Some(ea / ba)
        } else {
            return None;
        });
    }
    Some(BatchScaling { batched, per_row })
}
