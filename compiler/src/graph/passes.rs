//! Graph-level passes: dead code elimination, common subexpression elimination, constant
//! folding of casts. Each returns a new, renumbered graph.

use crate::graph::ir::{Graph, Node, Op, ValueId};
use std::collections::HashMap;

/// Runs the graph passes in order.
pub fn optimize(g: &Graph) -> Graph {
    dce(&cse(&fold_casts(g)))
}

/// Rebuilds `g` keeping nodes for which `map` returns a value, renumbering as it goes.
/// `map[i]` says which (old) value node i is replaced by (itself when kept).
fn rebuild(g: &Graph, replace: &[ValueId], keep: &[bool]) -> Graph {
    let mut new_id: Vec<Option<ValueId>> = vec![None; g.nodes.len()];
    let mut out = Graph::new();
    for (i, n) in g.nodes.iter().enumerate() {
        if !keep[i] || replace[i] != ValueId(i as u32) {
            continue;
        }
        let inputs = n.inputs.iter().map(|v| new_id[replace[v.0 as usize].0 as usize].expect("topological order")).collect();
        let id = ValueId(out.nodes.len() as u32);
        if let Op::Input(_) = n.op {
            out.inputs.push(id);
        }
        out.nodes.push(Node { op: n.op.clone(), inputs, ty: n.ty.clone() });
        new_id[i] = Some(id);
    }
    out.outputs = g.outputs.iter().map(|v| new_id[replace[v.0 as usize].0 as usize].unwrap()).collect();
    out.output_orders = g.output_orders.clone();
    out
}

/// Removes nodes no output depends on. Inputs always stay: they are the calling convention.
pub fn dce(g: &Graph) -> Graph {
    let mut live = vec![false; g.nodes.len()];
    let mut stack: Vec<ValueId> = g.outputs.clone();
    stack.extend(g.inputs.iter().copied());
    while let Some(v) = stack.pop() {
        if !std::mem::replace(&mut live[v.0 as usize], true) {
            stack.extend(g.node(v).inputs.iter().copied());
        }
    }
    let identity: Vec<ValueId> = (0..g.nodes.len() as u32).map(ValueId).collect();
    rebuild(g, &identity, &live)
}

/// Merges nodes with the same op and the same (already merged) inputs.
pub fn cse(g: &Graph) -> Graph {
    let mut seen: HashMap<String, ValueId> = HashMap::new();
    let mut replace: Vec<ValueId> = Vec::with_capacity(g.nodes.len());
    for (i, n) in g.nodes.iter().enumerate() {
        let me = ValueId(i as u32);
        if let Op::Input(_) = n.op {
            replace.push(me);
            continue;
        }
        let inputs: Vec<ValueId> = n.inputs.iter().map(|v| replace[v.0 as usize]).collect();
        // Debug text of a Scalar keeps every bit of a float, so equal keys mean equal nodes.
        let key = format!("{:?}|{:?}|{}", n.op, inputs, n.ty);
        replace.push(*seen.entry(key).or_insert(me));
    }
    rebuild(g, &replace, &vec![true; g.nodes.len()])
}

/// cast(constant) becomes a constant of the new dtype.
pub fn fold_casts(g: &Graph) -> Graph {
    let mut g = g.clone();
    for i in 0..g.nodes.len() {
        if g.nodes[i].op == Op::Cast {
            let src = g.nodes[i].inputs[0];
            if let Op::Constant(s) = g.node(src).op {
                let dtype = g.nodes[i].ty.dtype;
                g.nodes[i].op = Op::Constant(s.cast(dtype));
                g.nodes[i].inputs.clear();
            }
        }
    }
    g
}
