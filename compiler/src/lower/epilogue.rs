//! Epilogue fusion: a pointwise kernel that reads a GEMM's product where the product is
//! (same shape, each element at its own coordinates, in any loop order) becomes the GEMM's
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
            // The product's buffer is no longer written or read: it takes no scratch (one dim
            // of none, its order with it: a disk entry's buffer table is checked for that).
            buffers[product.0 as usize].sizes = vec![0];
            buffers[product.0 as usize].order = vec![0];
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
    // The product read at the consumer's own coordinates: each dim of the product (a
    // matmul's [batch…, m, n], a convolution's [N, Cout, OH, OW]) is one loop of the
    // consumer's nest, in whatever order the consumer's output is laid out, and every load of
    // the product steps the product's strides (its buffer's order) by those loops.
    let decl = &buffers[product.0 as usize];
    let strides = decl.strides().unwrap_or_else(|| crate::graph::layout::contiguous_strides(&decl.sizes));
    if vars.len() > decl.sizes.len() {
        return None;
    }
    let mut reads = loads(consumer).filter(|(b, _)| *b == product).map(|(_, ix)| ix);
    let first = reads.next()?;
    if first.offset != 0 || !first.params.is_empty() {
        return None;
    }
    let mut var_of_dim: Vec<Option<VarId>> = vec![None; decl.sizes.len()];
    for (d, (&n, &stride)) in decl.sizes.iter().zip(&strides).enumerate() {
        if n == 1 {
            continue;
        }
        let at = first.terms.iter().find(|t| t.1 == stride)?;
        let pos = vars.iter().position(|&v| v == at.0)?;
        if extents[pos] != crate::graph::ir::Dim::Const(n) {
            return None;
        }
        var_of_dim[d] = Some(at.0);
    }
    if first.terms.len() != var_of_dim.iter().flatten().count() {
        return None;
    }
    // Size-1 dims take the nest's remaining loops (of extent 1), or a variable of their own
    // where the consumer has no loop for them (it dropped the dim: a conv1d's result, an
    // unbatched convolution's): the microkernel sets it to 0 and nothing reads it.
    let spare: Vec<(VarId, crate::graph::ir::Dim)> = vars.iter().zip(&extents).filter(|(v, _)| !var_of_dim.contains(&Some(**v))).map(|(v, e)| (*v, *e)).collect();
    if spare.iter().any(|(_, e)| *e != crate::graph::ir::Dim::Const(1)) {
        return None;
    }
    let mut spare = spare.into_iter().map(|(v, _)| v);
    let mut fresh = consumer.num_vars;
    let var_of_dim: Vec<VarId> = var_of_dim
        .iter()
        .map(|v| {
            v.or_else(|| spare.next()).unwrap_or_else(|| {
                fresh += 1;
                VarId(fresh - 1)
            })
        })
        .collect();
    let same = |ix: &Index| {
        let mut t = ix.terms.clone();
        t.sort_by_key(|x| x.0 .0);
        let mut o = first.terms.clone();
        o.sort_by_key(|x| x.0 .0);
        t == o && ix.offset == 0 && ix.params.is_empty()
    };
    if !reads.all(same) {
        return None;
    }
    // Everything else the consumer reads exists before the GEMM runs.
    let writer: HashMap<BufId, usize> = kernels.iter().enumerate().flat_map(|(k, kern)| stores(kern).into_iter().map(move |b| (b, k))).collect();
    if loads(consumer).any(|(b, _)| b != product && writer.get(&b).is_some_and(|&w| w >= i)) {
        return None;
    }
    let mut fused = consumer.clone();
    fused.num_vars = fresh;
    fused.name = kernels[i].name.clone();
    fused.accs.push(crate::dtype::DType::F32);
    let acc = AccId(fused.accs.len() as u32 - 1);
    for (e, _) in &mut fused.exprs {
        if matches!(e, Expr::Load { buf, .. } if *buf == product) {
            *e = Expr::Acc(acc);
        }
    }
    let spec = crate::kernels::gemm::GemmSpec::for_product(g.shape.clone(), &var_of_dim, acc);
    fused.work_per_iter = kernels[i].work_per_iter;
    fused.gemm = Some(Box::new(spec));
    Some((*j, fused))
}
