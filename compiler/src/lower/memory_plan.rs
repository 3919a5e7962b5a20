//! The static memory plan: where each intermediate lives in the program's scratch arena.

use crate::lower::loop_ir::*;
use crate::lower::{BufferDecl, BufferKind};
use std::collections::HashMap;

/// First-fit placement of temps by liveness (kernel index of first and last use).
pub fn plan_memory(buffers: &mut [BufferDecl], kernels: &[Kernel]) -> usize {
    const ALIGN: usize = 64;
    let mut live: HashMap<u32, (usize, usize)> = HashMap::new();
    for (ki, k) in kernels.iter().enumerate() {
        let mut note = |b: BufId| {
            let e = live.entry(b.0).or_insert((ki, ki));
            e.1 = ki;
        };
        for (e, _) in &k.exprs {
            if let Expr::Load { buf, .. } = e {
                note(*buf);
            }
        }
        visit_stores(&k.root, &mut |b| note(b));
        if let Some(g) = &k.gemm {
            // The runtime's GEMM loops read the operands (and pack into scratch of their own).
            for b in [g.shape.a.buf, g.shape.b.buf] {
                note(b);
            }
        }
    }
    let mut placed: Vec<(usize, usize, usize, usize)> = vec![]; // (offset, bytes, first, last)
    let mut arena = 0;
    for (i, b) in buffers.iter_mut().enumerate() {
        if let BufferKind::Temp { offset } = &mut b.kind {
            let bytes = (b.sizes.iter().product::<i64>().max(0) as usize * b.dtype.size_bytes()).div_ceil(ALIGN) * ALIGN;
            let (first, last) = live.get(&(i as u32)).copied().unwrap_or((0, 0));
            let mut candidate = 0;
            let mut conflicts: Vec<_> = placed.iter().filter(|p| p.2 <= last && first <= p.3).collect();
            conflicts.sort_by_key(|p| p.0);
            for p in conflicts {
                if candidate + bytes <= p.0 {
                    break;
                }
                candidate = candidate.max(p.0 + p.1);
            }
            *offset = candidate;
            placed.push((candidate, bytes, first, last));
            arena = arena.max(candidate + bytes);
        }
    }
    arena
}

pub fn visit_stores(l: &Loop, f: &mut impl FnMut(BufId)) {
    for s in &l.body {
        match s {
            Stmt::Loop(inner) => visit_stores(inner, f),
            Stmt::Store { buf, .. } => f(*buf),
            _ => {}
        }
    }
}
