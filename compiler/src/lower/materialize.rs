//! Which pointwise values are computed once into a buffer rather than recomputed inside every
//! kernel that needs them.
//!
//! Pointwise values are normally inlined: a kernel recomputes its pointwise producers up to
//! the nearest buffers (inputs, reductions, softmax results). That is free while one kernel
//! needs a value, but a value needed by several kernels (or by the three passes of one
//! softmax) is recomputed by each; through a chain of reductions (layer norm → gelu → softmax,
//! stacked) the recomputation compounds with depth. A value is materialised when the work
//! saved, (kernels that need it - 1) × its cost, reaches [`MIN_SAVED`]; cheap values (x - mean)
//! stay inlined, since writing and reading them back would cost more than recomputing them.

use crate::graph::ir::{BinaryOp, Graph, Op, UnaryOp, ValueId};
use std::collections::{BTreeSet, HashSet};

/// Work (in add-equivalents per element) a materialisation must save: more than one extra
/// exp (a manual softmax's exp(x), needed by its sum and its division, stays inlined: on
/// large tensors re-reading x costs no more memory traffic than writing and reading exp(x)).
const MIN_SAVED: u32 = 24;

/// A place a value is evaluated in: one kernel, or one pass of a softmax kernel.
type Context = (u32, u8);

fn op_cost(op: &Op) -> u32 {
    match op {
        Op::Unary(UnaryOp::Reciprocal | UnaryOp::Sqrt | UnaryOp::Rsqrt) | Op::Binary(BinaryOp::Div) => 4,
        // erf's rational approximation (and gelu on top of it) is about twice exp's work:
        // measured, recomputing gelu once in a softmax's second pass cost more than storing
        // it (six layer-norm/gelu/softmax blocks, 256 x 1024: 1633 µs recomputed, 1050 stored).
        Op::Unary(UnaryOp::Erf | UnaryOp::Gelu | UnaryOp::GeluTanh) => 24,
        Op::Unary(UnaryOp::Sigmoid | UnaryOp::Tanh | UnaryOp::Exp | UnaryOp::Log | UnaryOp::Log1p | UnaryOp::Silu) | Op::Binary(BinaryOp::Pow) => 12,
        // Views are index arithmetic: nothing to save by storing one.
        Op::Constant(_) | Op::Iota { .. } | Op::Input(_) | Op::Permute(_) | Op::Slice { .. } | Op::Reshape | Op::Expand | Op::Unfold { .. } => 0,
        _ => 1,
    }
}

/// The pointwise values of `g` to materialise.
pub fn choose(g: &Graph) -> HashSet<ValueId> {
    let users = g.users();
    let outputs: HashSet<ValueId> = g.outputs.iter().copied().collect();
    let mut chosen = HashSet::new();
    // Costs depend on which producers are materialised and contexts on which consumers are;
    // a second round settles what the first decided from upper bounds.
    for _ in 0..2 {
        let cost = costs(g, &chosen);
        let mut contexts: Vec<BTreeSet<Context>> = vec![BTreeSet::new(); g.nodes.len()];
        let mut next = HashSet::new();
        for i in (0..g.nodes.len()).rev() {
            let v = ValueId(i as u32);
            let op = &g.nodes[i].op;
            if !op.is_pointwise() || matches!(op, Op::Constant(_) | Op::Iota { .. }) {
                continue;
            }
            let mut ctx = BTreeSet::new();
            if outputs.contains(&v) {
                // Pointwise outputs of one shape share a kernel; one context stands for them all.
                ctx.insert((u32::MAX, 0));
            }
            for &u in &users[i] {
                match &g.node(u).op {
                    // softmax reads its input in two passes (max, then exp stored), log_softmax
                    // in three (max, sum of exp, write).
                    Op::Softmax { log, .. } => ctx.extend((0..if *log { 3 } else { 2 }).map(|pass| (u.0, pass))),
                    // A reduction, a product, a convolution... reads it in a kernel of its own
                    // (an RNN's cell state feeds the next step's gates and this step's output,
                    // whose product needs it stored: each step is a kernel of its own).
                    op if !op.is_pointwise() => {
                        ctx.insert((u.0, 0));
                    }
                    _ if next.contains(&u) => {
                        ctx.insert((u.0, 0));
                    }
                    _ => ctx.extend(contexts[u.0 as usize].iter().copied()),
                }
            }
            if (ctx.len() as u32).saturating_sub(1) * cost[i] >= MIN_SAVED {
                next.insert(v);
                ctx = BTreeSet::from([(v.0, 0)]);
            }
            contexts[i] = ctx;
        }
        chosen = next;
    }
    chosen
}

/// Per value, the work of evaluating it once: its op and every inlined producer (each counted
/// once), stopping at buffers.
fn costs(g: &Graph, materialised: &HashSet<ValueId>) -> Vec<u32> {
    let mut cost = vec![0u32; g.nodes.len()];
    for i in 0..g.nodes.len() {
        let mut seen = HashSet::new();
        let mut stack = vec![ValueId(i as u32)];
        let mut total = 0u32;
        while let Some(v) = stack.pop() {
            if !seen.insert(v) {
                continue;
            }
            let n = g.node(v);
            total = total.saturating_add(op_cost(&n.op));
            let inlined = |p: &ValueId| g.node(*p).op.is_pointwise() && !materialised.contains(p);
            stack.extend(n.inputs.iter().filter(|p| inlined(p)));
        }
        cost[i] = total;
    }
    cost
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::ir::parse_graph;

    fn chosen(text: &str) -> Vec<u32> {
        let mut v: Vec<u32> = choose(&parse_graph(text).unwrap()).into_iter().map(|v| v.0).collect();
        v.sort();
        v
    }

    #[test]
    fn a_value_one_kernel_needs_is_inlined() {
        // The spine: `a` is used twice, but inside the one output kernel.
        let g = "graph(%0: f32[8], %1: f32[8]) {
 %2 = sigmoid(%0) : f32[8]
 %3 = mul(%0, %2) : f32[8]
 %4 = tanh(%1) : f32[8]
 %5 = sub(%3, %4) : f32[8]
 %6 = relu(%5) : f32[8]
 %7 = mul(%6, %3) : f32[8]
 return (%7)
}";
        assert_eq!(chosen(g), Vec::<u32>::new());
    }

    #[test]
    fn an_expensive_softmax_input_is_computed_once() {
        // softmax reads its input twice (max, then exp): one recomputation of exp (12) stays
        // below MIN_SAVED, of gelu (24) not; log_softmax reads it three times.
        let g = "graph(%0: f32[4, 8]) {
 %1 = exp(%0) : f32[4, 8]
 %2 = gelu(%0) : f32[4, 8]
 %3 = softmax(%1) dim=1 : f32[4, 8]
 return (%3)
}";
        assert_eq!(chosen(g), Vec::<u32>::new());
        assert_eq!(chosen(&g.replace("softmax(%1)", "softmax(%2)")), vec![2]);
        assert_eq!(chosen(&g.replace("softmax(%1)", "log_softmax(%1)")), vec![1]);
    }

    #[test]
    fn a_value_a_product_also_reads_is_stored_once() {
        // An RNN step's state: read by the next product (a kernel of its own) and by the
        // pointwise output. Counted as one context, it was inlined into every later step.
        let g = "graph(%0: f32[2, 4], %1: f32[4, 4]) {
 %2 = tanh(%0) : f32[2, 4]
 %3 = sigmoid(%2) : f32[2, 4]
 %4 = matmul(%3, %1) : f32[2, 4]
 %5 = add(%4, %3) : f32[2, 4]
 return (%5)
}";
        assert_eq!(chosen(g), vec![3]);
        assert_eq!(chosen(&g.replace("add(%4, %3)", "add(%4, %0)")), Vec::<u32>::new());
    }

    #[test]
    fn a_cheap_value_feeding_two_reductions_is_recomputed() {
        let g = "graph(%0: f32[4, 8]) {
 %1 = neg(%0) : f32[4, 8]
 %2 = sum(%1) dims=[1] keepdim=false : f32[4]
 %3 = amax(%1) dims=[1] keepdim=false : f32[4]
 return (%2, %3)
}";
        assert_eq!(chosen(g), Vec::<u32>::new());
    }
}
