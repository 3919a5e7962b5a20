//! Epilogue fusion: a pointwise kernel that reads a GEMM's product where the product is
//! (same shape, row-major, each element at its own coordinates) becomes the GEMM's
//! epilogue, run by the microkernel on the register tile; the product is never stored.
//!
//! The lowering already fused the pointwise chain after a matmul into one kernel (bias add,
//! activation, residual add, a layer's whole pointwise tail), so one step fuses all of it.
//! Legal when no other kernel reads the product and everything else the pointwise kernel reads
//! exists before the GEMM runs (inputs, or buffers written by earlier kernels).

use crate::lower::loop_ir::*;
use crate::lower::{BufferDecl, BufferKind};
use std::collections::HashMap;

/// The loop variables and extents of a perfect nest whose innermost body holds only stores.
fn pointwise_nest(k: &Kernel) -> Option<(Vec<VarId>, Vec<crate::graph::ir::Dim>)> {
    let mut l = &k.root;
    let (mut vars, mut extents) = (vec![l.var], vec![l.extent]);
    while let [Stmt::Loop(inner)] = l.body.as_slice() {
        l = inner;
        vars.push(l.var);
        extents.push(l.extent);
    }
    l.body.iter().all(|s| matches!(s, Stmt::Store { .. })).then_some((vars, extents))
}

fn loads(k: &Kernel) -> impl Iterator<Item = (BufId, &Index)> {
    k.exprs.iter().filter_map(|(e, _)| if let Expr::Load { buf, index } = e { Some((*buf, index)) } else { None })
}

fn stores(k: &Kernel) -> Vec<BufId> {
    let mut out = vec![];
    crate::lower::memory_plan::visit_stores(&k.root, &mut |b| out.push(b));
    out
}

/// Fuses pointwise consumers into the GEMM kernels they follow.
pub fn fuse(kernels: &mut Vec<Kernel>, buffers: &mut [BufferDecl]) {
    let mut i = 0;
    while i < kernels.len() {
        if let Some((j, fused)) = candidate(kernels, buffers, i) {
            // `candidate` took only a GEMM whose one store is its product.
            let product = stores(&kernels[i])[0];
            kernels[i] = fused;
            kernels.remove(j);
            // The product's buffer is no longer written or read: it takes no scratch.
            buffers[product.0 as usize].sizes = vec![0];
        }
        i += 1;
    }
}

/// The kernel that would replace GEMM kernel `i` with its consumer fused in, and the
/// consumer's index.
fn candidate(kernels: &[Kernel], buffers: &[BufferDecl], i: usize) -> Option<(usize, Kernel)> {
    let g = kernels[i].gemm.as_ref()?;
    let product = match stores(&kernels[i]).as_slice() {
        [b] if matches!(buffers[b.0 as usize].kind, BufferKind::Temp { .. }) => *b,
        _ => return None,
    };
    // A GEMM reads its operands in the runtime's packing loops, not through loads.
    let reads = |k: &Kernel| loads(k).any(|(b, _)| b == product) || k.gemm.as_ref().is_some_and(|g| g.shape.a.buf == product || g.shape.b.buf == product);
    let readers: Vec<usize> = (0..kernels.len()).filter(|&k| reads(&kernels[k])).collect();
    let [j] = readers.as_slice() else { return None };
    let consumer = &kernels[*j];
    if consumer.gemm.is_some() || *j < i {
        return None;
    }
    let (vars, extents) = pointwise_nest(consumer)?;
    let dims: Vec<i64> = g.shape.batch.iter().copied().chain([g.shape.m, g.shape.n]).collect();
    if extents != dims.iter().map(|&n| crate::graph::ir::Dim::Const(n)).collect::<Vec<_>>() {
        return None;
    }
    // The product read at the consumer's own coordinates (row-major, size-1 dims not stepped).
    let decl = &buffers[product.0 as usize];
    let strides = crate::graph::layout::contiguous_strides(&decl.sizes);
    let own: Vec<(VarId, i64)> = vars.iter().zip(&dims).zip(&strides).filter(|((_, &n), _)| n != 1).map(|((&v, _), &s)| (v, s)).collect();
    let at_own = |ix: &Index| {
        let mut t = ix.terms.clone();
        t.sort_by_key(|x| x.0 .0);
        let mut o = own.clone();
        o.sort_by_key(|x| x.0 .0);
        t == o && ix.offset == 0 && ix.params.is_empty()
    };
    if !loads(consumer).filter(|(b, _)| *b == product).all(|(_, ix)| at_own(ix)) {
        return None;
    }
    // Everything else the consumer reads exists before the GEMM runs.
    let writer: HashMap<BufId, usize> = kernels.iter().enumerate().flat_map(|(k, kern)| stores(kern).into_iter().map(move |b| (b, k))).collect();
    if loads(consumer).any(|(b, _)| b != product && writer.get(&b).is_some_and(|&w| w >= i)) {
        return None;
    }
    let mut fused = consumer.clone();
    fused.name = kernels[i].name.clone();
    fused.accs.push(crate::dtype::DType::F32);
    let acc = AccId(fused.accs.len() as u32 - 1);
    for (e, _) in &mut fused.exprs {
        if matches!(e, Expr::Load { buf, .. } if *buf == product) {
            *e = Expr::Acc(acc);
        }
    }
    let nb = g.batch_vars.len();
    let spec = crate::kernels::gemm::GemmSpec { shape: g.shape.clone(), batch_vars: vars[..nb].to_vec(), row_var: vars[nb], col_var: vars[nb + 1], acc };
    fused.work_per_iter = kernels[i].work_per_iter;
    fused.gemm = Some(Box::new(spec));
    Some((*j, fused))
}
