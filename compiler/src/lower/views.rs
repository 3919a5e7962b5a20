//! Views (permute, slice, reshape, expand) as index arithmetic: a view of a value stored in a
//! buffer is read from that buffer through strides and an offset, never copied. What this
//! file decides, before any buffer exists:
//! - which values are read from a buffer of their own: inputs, non-pointwise nodes, and the
//!   values `materialize` chose (a pointwise output is written last, never read back);
//! - the strided layout of every value a buffer holds or a view of one reaches ([`Layout`]);
//! - which further values must be stored so that every view and matmul or convolution operand
//!   has a layout: a slice or window (unfold) of a value computed inline, a reshape PyTorch's view rule cannot express over
//!   its input's strides (a flattened transpose), an operand of a matmul. Each such input
//!   is stored (row-major, so any reshape of it is a view) and the layouts are worked out
//!   again until nothing changes.
//!
//! Views that need no layout stay coordinate remaps of their input (`KernelBuilder::compute`):
//! a permute, an expand, a reshape that only adds or drops size-1 dims.

use crate::graph::ir::{Graph, Op, ValueId};
use crate::graph::layout::{contiguous_strides, dense_strides, view_strides, DimOrder};
use std::collections::{HashMap, HashSet};

/// Element (c₀, c₁, …) of a value is at `buffer_of(base)[offset + Σ cᵢ·strides[i]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub base: ValueId,
    pub strides: Vec<i64>,
    pub offset: i64,
}

/// Whether a reshape only inserts or removes dims of size 1 (a coordinate remap).
pub fn only_unit_dims(from: &[i64], to: &[i64]) -> bool {
    from.iter().filter(|&&n| n != 1).eq(to.iter().filter(|&&n| n != 1))
}

/// The layout of view `v` from its input's layout, or None where no strided view expresses it.
pub fn view_layout(g: &Graph, v: ValueId, input: &Layout) -> Option<Layout> {
    let n = g.node(v);
    let in_shape = g.ty(n.inputs[0]).static_shape()?;
    let out_shape = n.ty.static_shape()?;
    let Layout { base, strides, offset } = input.clone();
    let (strides, offset) = match &n.op {
        Op::Permute(dims) => (dims.iter().map(|&d| strides[d]).collect(), offset),
        Op::Slice { dim, start } => (strides.clone(), offset + start * strides[*dim]),
        Op::Reshape => (view_strides(&in_shape, &strides, &out_shape)?, offset),
        Op::Unfold { dim, step, dilation, .. } => {
            let mut s = strides.clone();
            s[*dim] = strides[*dim] * step;
            s.push(strides[*dim] * dilation);
            (s, offset)
        }
        Op::Expand => {
            let skip = out_shape.len() - in_shape.len();
            let s = (0..out_shape.len()).map(|d| if d < skip || in_shape[d - skip] == 1 { 0 } else { strides[d - skip] }).collect();
            (s, offset)
        }
        _ => return None,
    };
    Some(Layout { base, strides, offset })
}

/// `g` with a copy (a cast to the same dtype, a pointwise node the lowering stores) before
/// each reshape of an input that PyTorch's view rule cannot express over the input's strides
/// (a flattened transpose): an input's memory is the caller's, so the copy is what gets a
/// row-major buffer. Likewise before a reshape of an output stored in another order than
/// row-major (a batch-first RNN's output, time-major in memory, that a linear flattens): its
/// layout is the caller's too. None when no reshape needs one.
pub fn with_input_copies(g: &Graph, input_strides: &[Vec<i64>]) -> Option<Graph> {
    let layouts = layouts(g, input_strides, &HashMap::new(), &HashSet::new());
    let reordered: HashSet<ValueId> = g.outputs.iter().zip(&g.output_orders).filter(|(_, order)| order.iter().enumerate().any(|(i, &d)| i != d)).map(|(&v, _)| v).collect();
    let needs_copy = |n: &crate::graph::ir::Node| {
        let x = n.inputs.first().copied();
        n.op == Op::Reshape
            && x.is_some_and(|x| {
                let from = g.ty(x).static_shape().unwrap_or_default();
                let to = n.ty.static_shape().unwrap_or_default();
                let input_based = layouts[x.0 as usize].as_ref().is_some_and(|l| matches!(g.node(l.base).op, Op::Input(_)));
                let inexpressible = input_based && view_strides(&from, &layouts[x.0 as usize].as_ref().unwrap().strides, &to).is_none();
                !only_unit_dims(&from, &to) && (inexpressible || reordered.contains(&view_root(g, x)))
            })
    };
    if !g.nodes.iter().any(needs_copy) {
        return None;
    }
    let mut out = g.clone();
    out.nodes.clear();
    let mut new_id: Vec<ValueId> = Vec::with_capacity(g.nodes.len());
    for n in &g.nodes {
        let mut n2 = n.clone();
        n2.inputs = n.inputs.iter().map(|x| new_id[x.0 as usize]).collect();
        if needs_copy(n) {
            let x = n2.inputs[0];
            n2.inputs[0] = out.copy(x);
        }
        out.nodes.push(n2);
        new_id.push(ValueId(out.nodes.len() as u32 - 1));
    }
    out.inputs = g.inputs.iter().map(|x| new_id[x.0 as usize]).collect();
    out.outputs = g.outputs.iter().map(|x| new_id[x.0 as usize]).collect();
    Some(out)
}

pub fn is_view(op: &Op) -> bool {
    matches!(op, Op::Permute(_) | Op::Slice { .. } | Op::Reshape | Op::Expand | Op::Unfold { .. })
}

/// The value a chain of views over `x` starts from (`x` itself when it is no view).
pub fn view_root(g: &Graph, x: ValueId) -> ValueId {
    let mut root = x;
    while is_view(&g.node(root).op) {
        root = g.node(root).inputs[0];
    }
    root
}

/// The stored values and every value's layout, storing more values (added to
/// `materialised`) until each slice, each reshape that is no unit-dim remap, and each matmul
/// operand has one.
pub fn plan(g: &Graph, input_strides: &[Vec<i64>], output_orders: &HashMap<ValueId, DimOrder>, materialised: &mut HashSet<ValueId>) -> Vec<Option<Layout>> {
    loop {
        let layouts = layouts(g, input_strides, output_orders, materialised);
        let mut more = vec![];
        // What to store for a view without a layout: the value its chain of views starts
        // from, where that has no buffer (a window of an inline ReLU stores the ReLU, not the
        // windows), else its own input (a reshape that no strides express over a transpose).
        let source = |x: ValueId| {
            let root = view_root(g, x);
            if layouts[root.0 as usize].is_none() { root } else { x }
        };
        for (i, n) in g.nodes.iter().enumerate() {
            let needs: Vec<ValueId> = match &n.op {
                Op::Slice { .. } | Op::Unfold { .. } if layouts[i].is_none() => vec![source(n.inputs[0])],
                Op::Reshape if layouts[i].is_none() => {
                    let (from, to) = (g.ty(n.inputs[0]).static_shape().unwrap_or_default(), n.ty.static_shape().unwrap_or_default());
                    if only_unit_dims(&from, &to) { vec![] } else { vec![source(n.inputs[0])] }
                }
                Op::MatMul { .. } | Op::QuantizedMatMul { .. } | Op::QuantizedProduct { .. } | Op::Conv2d { .. } => n.inputs.iter().copied().filter(|x| layouts[x.0 as usize].is_none()).collect(),
                _ => vec![],
            };
            more.extend(needs.into_iter().filter(|x| !matches!(g.node(*x).op, Op::Input(_))));
        }
        more.retain(|x| !materialised.contains(x));
        if more.is_empty() {
            return layouts;
        }
        materialised.extend(more);
    }
}

/// Whether value `v` is read from a buffer of its own (an input, a non-pointwise node, a
/// materialised value). A pointwise output is not: its buffer is written by the last kernel,
/// and kernels before it recompute the value.
pub fn stored(g: &Graph, v: ValueId, materialised: &HashSet<ValueId>) -> bool {
    let op = &g.node(v).op;
    matches!(op, Op::Input(_)) || !op.is_pointwise() || materialised.contains(&v)
}

fn layouts(g: &Graph, input_strides: &[Vec<i64>], output_orders: &HashMap<ValueId, DimOrder>, materialised: &HashSet<ValueId>) -> Vec<Option<Layout>> {
    let mut out: Vec<Option<Layout>> = Vec::with_capacity(g.nodes.len());
    for (i, n) in g.nodes.iter().enumerate() {
        let v = ValueId(i as u32);
        let shape = n.ty.static_shape().unwrap_or_default();
        let own = |strides: Vec<i64>| Some(Layout { base: v, strides, offset: 0 });
        let layout = match &n.op {
            Op::Input(k) => own(input_strides[*k].clone()),
            _ if stored(g, v, materialised) => own(match output_orders.get(&v) {
                Some(order) => dense_strides(&shape, order),
                None => contiguous_strides(&shape),
            }),
            op if is_view(op) => out[n.inputs[0].0 as usize].as_ref().and_then(|l| view_layout(g, v, l)),
            _ => None,
        };
        out.push(layout);
    }
    out
}
