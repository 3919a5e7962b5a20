//! Schedules: loop transformations on a kernel that keep its meaning. Today: drop unit loops,
//! coalesce perfectly nested loops whose accesses are contiguous across them (so contiguous
//! tensors become one flat, vectorisable loop), and parallelise the root loop when the work
//! pays for waking the pool. Tiling/unrolling/packing slot in here.

use crate::graph::ir::Dim;
use crate::lower::loop_ir::*;

/// Below this many element operations a kernel runs on the calling thread only: waking the
/// pool costs a few µs (measured: 0.13 µs dispatch spinning, 15–30 µs from parked).
pub const PARALLEL_MIN_WORK: i64 = 1 << 15;

pub fn schedule(k: &mut Kernel) {
    let body = std::mem::take(&mut k.root.body);
    k.root.body = drop_unit_loops(body);
    // A unit root (leading size-1 dims) hands the root role to its only child loop.
    while k.root.extent == Dim::Const(1) && matches!(k.root.body.as_slice(), [Stmt::Loop(_)]) {
        let Some(Stmt::Loop(child)) = k.root.body.pop() else { unreachable!() };
        k.root = child;
    }
    while coalesce_once(k) {}
    k.work_per_iter = work(&k.root.body).max(1);
    let extent = match k.root.extent {
        Dim::Const(n) => n,
        Dim::Sym(_) => i64::MAX,
    };
    k.root.kind = if extent >= 2 && extent.saturating_mul(k.work_per_iter) >= PARALLEL_MIN_WORK {
        LoopKind::Parallel
    } else {
        LoopKind::Serial
    };
}

fn drop_unit_loops(body: Vec<Stmt>) -> Vec<Stmt> {
    let mut out = vec![];
    for s in body {
        match s {
            Stmt::Loop(l) if l.extent == Dim::Const(1) => out.extend(drop_unit_loops(l.body)),
            Stmt::Loop(mut l) => {
                l.body = drop_unit_loops(l.body);
                out.push(Stmt::Loop(l));
            }
            s => out.push(s),
        }
    }
    out
}

/// Element operations per iteration of a loop with this body.
fn work(body: &[Stmt]) -> i64 {
    body.iter()
        .map(|s| match s {
            Stmt::Loop(l) => match l.extent {
                Dim::Const(n) => n.saturating_mul(work(&l.body).max(1)),
                Dim::Sym(_) => i64::MAX / 4,
            },
            _ => 1,
        })
        .fold(0i64, |a, b| a.saturating_add(b))
}

fn stride(index: &Index, v: VarId) -> i64 {
    index.terms.iter().filter(|t| t.0 == v).map(|t| t.1).sum()
}

fn for_each_index(k: &mut Kernel, f: &mut impl FnMut(&mut Index)) {
    for (e, _) in &mut k.exprs {
        if let Expr::Load { index, .. } | Expr::Index(index) = e {
            f(index);
        }
    }
    fn walk(l: &mut Loop, f: &mut impl FnMut(&mut Index)) {
        for s in &mut l.body {
            match s {
                Stmt::Loop(inner) => walk(inner, f),
                Stmt::Store { index, .. } => f(index),
                _ => {}
            }
        }
    }
    walk(&mut k.root, f);
}

/// Finds one loop whose whole body is one loop and merges the two if every access allows it.
fn coalesce_once(k: &mut Kernel) -> bool {
    fn candidates(l: &Loop, out: &mut Vec<(VarId, VarId, i64)>) {
        if let [Stmt::Loop(m)] = l.body.as_slice() {
            if let Dim::Const(e) = m.extent {
                out.push((l.var, m.var, e));
            }
        }
        for s in &l.body {
            if let Stmt::Loop(inner) = s {
                candidates(inner, out);
            }
        }
    }
    let mut pairs = vec![];
    candidates(&k.root, &mut pairs);
    for (a, b, eb) in pairs {
        let mut ok = true;
        for_each_index(k, &mut |ix| ok &= stride(ix, a) == stride(ix, b) * eb);
        if !ok {
            continue;
        }
        for_each_index(k, &mut |ix| {
            let sb = stride(ix, b);
            ix.terms.retain(|t| t.0 != a && t.0 != b);
            if sb != 0 {
                ix.terms.push((a, sb));
            }
        });
        merge_loops(&mut k.root, a, eb);
        return true;
    }
    false
}

fn merge_loops(l: &mut Loop, outer: VarId, inner_extent: i64) {
    if l.var == outer {
        let Some(Stmt::Loop(m)) = l.body.pop() else { unreachable!() };
        l.extent = match l.extent {
            Dim::Const(n) => Dim::Const(n * inner_extent),
            d => d,
        };
        l.body = m.body;
        return;
    }
    for s in &mut l.body {
        if let Stmt::Loop(inner) = s {
            merge_loops(inner, outer, inner_extent);
        }
    }
}
