//! Lowering: graph → fusion groups → loop nests, plus the buffer table and the static memory
//! plan for intermediates.
//!
//! Fusion rule: pointwise nodes are never materialised unless they are graph outputs; they are
//! inlined (as expressions) into every kernel that reads them. Reductions and softmax own a
//! kernel each, reading their fused pointwise producers inline. Pointwise outputs of one shape
//! and layout share one kernel, whose loops run in that layout's order: the innermost loop
//! steps along the dim the outputs store contiguously.
//!
//! Output layout rule (every kernel kind): an output is written in the order the graph asks for
//! (`Graph::output_orders`), dense; intermediates are row-major.

use crate::dtype::{DType, Scalar};
use crate::ir::{BinaryOp, Dim, Graph, Op, ReduceOp, UnaryOp, ValueId};
use crate::layout::{dense_strides, is_row_major, row_major, DimOrder};
use crate::loop_ir::*;
use crate::schedule;
use std::collections::{HashMap, HashSet};

#[derive(thiserror::Error, Debug, Clone, PartialEq)]
pub enum LowerError {
    #[error("graph shapes must be concrete (code for symbolic sizes is derived from concrete lowerings: symbolic.rs)")]
    Symbolic,
    #[error("input {0} has {1} strides for rank {2}")]
    BadStrides(usize, usize, usize),
}

#[derive(Clone, Debug, PartialEq)]
pub enum BufferKind {
    Input(usize),
    Output(usize),
    /// An intermediate at this byte offset of the program's scratch arena.
    Temp { offset: usize },
}

#[derive(Clone, Debug, PartialEq)]
pub struct BufferDecl {
    pub dtype: DType,
    pub sizes: Vec<i64>,
    pub kind: BufferKind,
    /// How the memory Kiln provides is laid out (dense, dims outermost first): the graph's
    /// order for outputs, row-major for temporaries. Inputs are read through their own strides.
    pub order: DimOrder,
}

impl BufferDecl {
    /// Element strides of the buffer at `sizes`; None where they are row-major (contiguous).
    pub fn strides_at(&self, sizes: &[i64]) -> Option<Vec<i64>> {
        (!is_row_major(&self.order)).then(|| dense_strides(sizes, &self.order))
    }

    /// [`strides_at`](Self::strides_at) the buffer's own sizes.
    pub fn strides(&self) -> Option<Vec<i64>> {
        self.strides_at(&self.sizes)
    }
}

/// A lowered program: what codegen turns into machine code and the runtime executes.
#[derive(Clone, Debug)]
pub struct LoopProgram {
    pub buffers: Vec<BufferDecl>,
    pub kernels: Vec<Kernel>,
    pub arena_bytes: usize,
    pub num_inputs: usize,
    pub num_outputs: usize,
}

impl LoopProgram {
    /// The output buffers, in output order.
    pub fn outputs(&self) -> impl Iterator<Item = &BufferDecl> {
        self.buffers.iter().filter(|b| matches!(b.kind, BufferKind::Output(_)))
    }
}

impl std::fmt::Display for LoopProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, b) in self.buffers.iter().enumerate() {
            writeln!(f, "b{i}: {}{:?} {:?}", b.dtype, b.sizes, b.kind)?;
        }
        for k in &self.kernels {
            write!(f, "{k}")?;
        }
        Ok(())
    }
}

/// Lowers an optimized graph. `input_strides[i]` are the element strides input i will have.
pub fn lower(g: &Graph, input_strides: &[Vec<i64>]) -> Result<LoopProgram, LowerError> {
    let shape_of = |v: ValueId| g.ty(v).static_shape().ok_or(LowerError::Symbolic);
    for n in &g.nodes {
        n.ty.static_shape().ok_or(LowerError::Symbolic)?;
    }
    let mut buffers = vec![];
    let mut buf_of: HashMap<ValueId, Target> = HashMap::new();
    for (i, &v) in g.inputs.iter().enumerate() {
        let sizes = shape_of(v)?;
        let strides = input_strides[i].clone();
        if strides.len() != sizes.len() {
            return Err(LowerError::BadStrides(i, strides.len(), sizes.len()));
        }
        buf_of.insert(v, (BufId(buffers.len() as u32), strides));
        buffers.push(BufferDecl { dtype: g.ty(v).dtype, order: row_major(sizes.len()), sizes, kind: BufferKind::Input(i) });
    }
    // An output that is an input or an earlier output gets its own buffer, filled by a copy
    // kernel after the others. Kernels are keyed by the shape and order of what they store.
    let mut copies: Vec<((Vec<i64>, DimOrder), Vec<(ValueId, Target)>)> = vec![];
    let mut output_order: HashMap<ValueId, DimOrder> = HashMap::new();
    for (i, (&v, order)) in g.outputs.iter().zip(&g.output_orders).enumerate() {
        let sizes = shape_of(v)?;
        let target = (BufId(buffers.len() as u32), dense_strides(&sizes, order));
        buffers.push(BufferDecl { dtype: g.ty(v).dtype, sizes: sizes.clone(), kind: BufferKind::Output(i), order: order.clone() });
        if buf_of.contains_key(&v) {
            add_by_key(&mut copies, (sizes, order.clone()), (v, target));
        } else {
            buf_of.insert(v, target);
            output_order.insert(v, order.clone());
        }
    }
    // Non-pointwise nodes and materialised pointwise values that are not outputs become temps;
    // offsets come from the memory plan.
    let materialised = crate::materialize::choose(g);
    let buffered = |v: ValueId| !g.node(v).op.is_pointwise() || materialised.contains(&v);
    for (i, n) in g.nodes.iter().enumerate() {
        let v = ValueId(i as u32);
        if buffered(v) && !buf_of.contains_key(&v) && !matches!(n.op, Op::Input(_)) {
            let sizes = shape_of(v)?;
            let order = row_major(sizes.len());
            buf_of.insert(v, (BufId(buffers.len() as u32), dense_strides(&sizes, &order)));
            buffers.push(BufferDecl { dtype: n.ty.dtype, order, sizes, kind: BufferKind::Temp { offset: 0 } });
        }
    }

    // Kernels in topological order. Pointwise outputs of one shape and order are emitted
    // together, at the position of the last of them (all their inputs are computed by then).
    let mut kernels = vec![];
    let mut pending_pointwise: Vec<((Vec<i64>, DimOrder), Vec<ValueId>)> = vec![];
    for &v in &g.outputs {
        if !buffered(v) {
            let seen = pending_pointwise.iter().any(|(_, vs)| vs.contains(&v));
            if !seen {
                add_by_key(&mut pending_pointwise, (shape_of(v)?, output_order[&v].clone()), v);
            }
        }
    }
    for (i, n) in g.nodes.iter().enumerate() {
        let v = ValueId(i as u32);
        let b = KernelBuilder::new(g, &buf_of, &materialised, format!("k{}", kernels.len()));
        match &n.op {
            Op::Reduce { op, dims, keepdim } => kernels.push(b.reduction(v, *op, dims, *keepdim)),
            Op::Softmax { dim, log } => kernels.push(b.softmax(v, *dim, *log)),
            _ if materialised.contains(&v) => {
                let shape = shape_of(v)?;
                let order = output_order.get(&v).cloned().unwrap_or_else(|| row_major(shape.len()));
                kernels.push(b.pointwise(&shape, &order, &[(v, buf_of[&v].clone())]))
            }
            _ => {}
        }
        if let Some(pos) = pending_pointwise.iter().position(|(_, vs)| vs.iter().max() == Some(&v)) {
            let ((shape, order), vs) = pending_pointwise.remove(pos);
            let b = KernelBuilder::new(g, &buf_of, &materialised, format!("k{}", kernels.len()));
            let targets: Vec<(ValueId, Target)> = vs.iter().map(|v| (*v, buf_of[v].clone())).collect();
            kernels.push(b.pointwise(&shape, &order, &targets));
        }
    }
    for ((shape, order), targets) in &copies {
        let b = KernelBuilder::new(g, &buf_of, &materialised, format!("k{}", kernels.len()));
        kernels.push(b.pointwise(shape, order, targets));
    }
    for k in &mut kernels {
        schedule::schedule(k);
    }
    let arena_bytes = plan_memory(&mut buffers, &kernels);
    Ok(LoopProgram { buffers, kernels, arena_bytes, num_inputs: g.inputs.len(), num_outputs: g.outputs.len() })
}

/// Appends `item` to the list for `key`, starting one if there is none.
fn add_by_key<K: PartialEq, T>(groups: &mut Vec<(K, Vec<T>)>, key: K, item: T) {
    match groups.iter_mut().find(|(k, _)| *k == key) {
        Some((_, items)) => items.push(item),
        None => groups.push((key, vec![item])),
    }
}

/// First-fit placement of temps by liveness (kernel index of first and last use).
fn plan_memory(buffers: &mut [BufferDecl], kernels: &[Kernel]) -> usize {
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

fn visit_stores(l: &Loop, f: &mut impl FnMut(BufId)) {
    for s in &l.body {
        match s {
            Stmt::Loop(inner) => visit_stores(inner, f),
            Stmt::Store { buf, .. } => f(*buf),
            _ => {}
        }
    }
}

/// Where a value is stored: a buffer and the element strides of its dims.
type Target = (BufId, Vec<i64>);

/// A coordinate of a value inside a kernel: a loop variable, or 0 (a broadcast dim).
type Coords = Vec<Option<VarId>>;

struct KernelBuilder<'a> {
    g: &'a Graph,
    bufs: &'a HashMap<ValueId, Target>,
    /// Pointwise values read from their buffer instead of recomputed (`materialize`).
    materialised: &'a HashSet<ValueId>,
    name: String,
    arena: ExprArena,
    memo: HashMap<(ValueId, Coords), ExprId>,
    accs: Vec<DType>,
    num_vars: u32,
}

impl<'a> KernelBuilder<'a> {
    fn new(g: &'a Graph, bufs: &'a HashMap<ValueId, Target>, materialised: &'a HashSet<ValueId>, name: String) -> Self {
        KernelBuilder { g, bufs, materialised, name, arena: ExprArena::default(), memo: HashMap::new(), accs: vec![], num_vars: 0 }
    }
    fn var(&mut self) -> VarId {
        self.num_vars += 1;
        VarId(self.num_vars - 1)
    }
    fn acc(&mut self, dtype: DType) -> AccId {
        self.accs.push(dtype);
        AccId(self.accs.len() as u32 - 1)
    }
    fn konst(&mut self, s: Scalar, dtype: DType) -> ExprId {
        self.arena.add(Expr::Const(s.cast(dtype)), dtype)
    }

    /// The expression for value `v` at `coords` (one per dim of v): a load when v is an input, a
    /// reduction result or materialised, else v's op applied to its inputs, broadcast
    /// right-aligned.
    fn value(&mut self, v: ValueId, coords: &Coords) -> ExprId {
        if let Some(&e) = self.memo.get(&(v, coords.clone())) {
            return e;
        }
        let node = self.g.node(v);
        // Other pointwise values are recomputed, never read back: their buffer (if they are
        // outputs) is written by the last kernel.
        let e = if !node.op.is_pointwise() || self.materialised.contains(&v) {
            let (buf, strides) = &self.bufs[&v];
            let terms = coords.iter().zip(strides).filter_map(|(c, &s)| c.map(|var| (var, s))).collect();
            self.arena.add(Expr::Load { buf: *buf, index: Index { terms, offset: 0, params: vec![] } }, node.ty.dtype)
        } else {
            self.compute(v, coords)
        };
        self.memo.insert((v, coords.clone()), e);
        e
    }

    /// The expression of pointwise value `v`'s own op at `coords`, over its inputs' values.
    fn compute(&mut self, v: ValueId, coords: &Coords) -> ExprId {
        let node = self.g.node(v);
        let dtype = node.ty.dtype;
        {
            let shape = node.ty.static_shape().unwrap();
            let args: Vec<ExprId> = node
                .inputs
                .iter()
                .map(|&inp| {
                    let ishape = self.g.ty(inp).static_shape().unwrap();
                    let skip = shape.len() - ishape.len();
                    let c = ishape.iter().enumerate().map(|(j, &n)| if n == 1 { None } else { coords[j + skip] }).collect();
                    self.value(inp, &c)
                })
                .collect();
            let expr = match &node.op {
                Op::Constant(s) => Expr::Const(*s),
                Op::Unary(u) => Expr::Unary(*u, args[0]),
                Op::Binary(b) => Expr::Binary(*b, args[0], args[1]),
                Op::Compare(c) => Expr::Compare(*c, args[0], args[1]),
                Op::Where => Expr::Select(args[0], args[1], args[2]),
                Op::Cast => Expr::Cast(args[0]),
                Op::Input(_) | Op::Reduce { .. } | Op::Softmax { .. } => unreachable!("not pointwise"),
            };
            self.arena.add(expr, dtype)
        }
    }

    fn store(&mut self, v: ValueId, coords: &Coords, value: ExprId) -> Stmt {
        Self::store_to(&self.bufs[&v], coords, value)
    }

    fn store_to((buf, strides): &Target, coords: &Coords, value: ExprId) -> Stmt {
        let terms = coords.iter().zip(strides).filter_map(|(c, &s)| c.map(|var| (var, s))).collect();
        Stmt::Store { buf: *buf, index: Index { terms, offset: 0, params: vec![] }, value }
    }

    /// Nests `body` in loops over `vars`/`extents`, outermost first.
    fn nest(vars: &[VarId], extents: &[i64], body: Vec<Stmt>) -> Vec<Stmt> {
        let mut body = body;
        for (&var, &n) in vars.iter().zip(extents).rev() {
            body = vec![Stmt::Loop(Loop { var, extent: Dim::Const(n), kind: LoopKind::Serial, body })];
        }
        body
    }

    fn finish(self, body: Vec<Stmt>, work_per_iter: i64) -> Kernel {
        let mut num_vars = self.num_vars;
        // The runtime parallelises the single root loop; give rank-0 kernels a unit loop.
        let root = match <[Stmt; 1]>::try_from(body) {
            Ok([Stmt::Loop(l)]) => l,
            Ok([s]) => {
                num_vars += 1;
                Loop { var: VarId(num_vars - 1), extent: Dim::Const(1), kind: LoopKind::Serial, body: vec![s] }
            }
            Err(body) => {
                num_vars += 1;
                Loop { var: VarId(num_vars - 1), extent: Dim::Const(1), kind: LoopKind::Serial, body }
            }
        };
        Kernel { name: self.name, root, exprs: self.arena.exprs, accs: self.accs, num_vars, work_per_iter }
    }

    /// One kernel over `shape` computing each value into its target buffer, its loops nested
    /// in `order` (outermost first): the order its targets are laid out in.
    fn pointwise(mut self, shape: &[i64], order: &[usize], targets: &[(ValueId, Target)]) -> Kernel {
        let vars: Vec<VarId> = shape.iter().map(|_| self.var()).collect();
        let coords: Coords = vars.iter().zip(shape).map(|(&v, &n)| if n == 1 { None } else { Some(v) }).collect();
        let mut stores = vec![];
        for (o, target) in targets {
            // A materialised value is computed here, in its own kernel; copies of outputs
            // (targets whose value already has a buffer elsewhere) read it back.
            let own = self.materialised.contains(o) && self.bufs[o] == *target;
            let value = if own { self.compute(*o, &coords) } else { self.value(*o, &coords) };
            stores.push(Self::store_to(target, &coords, value));
        }
        let loop_vars: Vec<VarId> = order.iter().map(|&d| vars[d]).collect();
        let extents: Vec<i64> = order.iter().map(|&d| shape[d]).collect();
        let body = Self::nest(&loop_vars, &extents, stores);
        self.finish(body, 1)
    }

    fn reduction(mut self, out: ValueId, op: ReduceOp, dims: &[usize], keepdim: bool) -> Kernel {
        let x = self.g.node(out).inputs[0];
        let xshape = self.g.ty(x).static_shape().unwrap();
        let dtype = self.g.ty(x).dtype;
        let vars: Vec<VarId> = xshape.iter().map(|_| self.var()).collect();
        let coords: Coords = vars.iter().zip(&xshape).map(|(&v, &n)| if n == 1 { None } else { Some(v) }).collect();
        let (kept, reduced): (Vec<usize>, Vec<usize>) = (0..xshape.len()).partition(|d| !dims.contains(d));
        let acc_dtype = match (op, dtype) {
            (ReduceOp::Sum | ReduceOp::Mean, DType::F32) => DType::F64,
            _ => dtype,
        };
        let acc = self.acc(acc_dtype);
        let init = match (op, acc_dtype.is_float()) {
            (ReduceOp::Sum | ReduceOp::Mean, _) => Scalar::Int(0),
            (ReduceOp::Max, true) => Scalar::Float(f64::NEG_INFINITY),
            (ReduceOp::Min, true) => Scalar::Float(f64::INFINITY),
            (ReduceOp::Max, false) => Scalar::Int(if dtype == DType::I32 { i32::MIN as i64 } else { i64::MIN }),
            (ReduceOp::Min, false) => Scalar::Int(if dtype == DType::I32 { i32::MAX as i64 } else { i64::MAX }),
        };
        let init = self.konst(init, acc_dtype);
        let xv = self.value(x, &coords);
        let xv = if acc_dtype != dtype { self.arena.add(Expr::Cast(xv), acc_dtype) } else { xv };
        let combine = match op {
            ReduceOp::Sum | ReduceOp::Mean => Combine::Add,
            ReduceOp::Max => Combine::Max,
            ReduceOp::Min => Combine::Min,
        };
        let count: i64 = reduced.iter().map(|&d| xshape[d]).product();
        let mut result = self.arena.add(Expr::Acc(acc), acc_dtype);
        if acc_dtype != dtype {
            result = self.arena.add(Expr::Cast(result), dtype);
        }
        if op == ReduceOp::Mean {
            // Eager's mean is its sum in the result's dtype, divided there (sum().div_(n)): a
            // float32 sum that overflows makes the mean inf, as in eager.
            let n = self.konst(Scalar::Int(count), dtype);
            result = self.arena.add(Expr::Binary(BinaryOp::Div, result, n), dtype);
        }
        let out_coords: Coords = if keepdim {
            (0..xshape.len()).map(|d| if dims.contains(&d) { None } else { coords[d] }).collect()
        } else {
            kept.iter().map(|&d| coords[d]).collect()
        };
        let store = self.store(out, &out_coords, result);
        let rvars: Vec<VarId> = reduced.iter().map(|&d| vars[d]).collect();
        let rext: Vec<i64> = reduced.iter().map(|&d| xshape[d]).collect();
        let mut inner = vec![Stmt::Init { acc, value: init }];
        inner.extend(Self::nest(&rvars, &rext, vec![Stmt::Update { acc, combine, value: xv }]));
        inner.push(store);
        let kvars: Vec<VarId> = kept.iter().map(|&d| vars[d]).collect();
        let kext: Vec<i64> = kept.iter().map(|&d| xshape[d]).collect();
        let body = Self::nest(&kvars, &kext, inner);
        self.finish(body, count.max(1))
    }

    fn softmax(mut self, out: ValueId, dim: usize, log: bool) -> Kernel {
        let x = self.g.node(out).inputs[0];
        let xshape = self.g.ty(x).static_shape().unwrap();
        let dtype = self.g.ty(x).dtype;
        if xshape.is_empty() {
            // softmax of a 0-d tensor is 1 (log: 0); x - x keeps NaN/inf behaviour of PyTorch.
            let xv = self.value(x, &vec![]);
            let d = self.arena.add(Expr::Binary(BinaryOp::Sub, xv, xv), dtype);
            let v = if log { d } else { self.arena.add(Expr::Unary(UnaryOp::Exp, d), dtype) };
            let s = self.store(out, &vec![], v);
            return self.finish(vec![s], 1);
        }
        let outer: Vec<usize> = (0..xshape.len()).filter(|&d| d != dim).collect();
        let ovars: Vec<VarId> = outer.iter().map(|_| self.var()).collect();
        let coords_with = |ovars: &[VarId], inner: VarId| -> Coords {
            let mut c = vec![None; xshape.len()];
            for (&d, &v) in outer.iter().zip(ovars) {
                c[d] = (xshape[d] != 1).then_some(v);
            }
            c[dim] = (xshape[dim] != 1).then_some(inner);
            c
        };
        let acc_sum_dtype = DType::F64;
        let (m, s) = (self.acc(dtype), self.acc(acc_sum_dtype));
        let n = xshape[dim];
        // Phase 1: running max. Phase 2: sum of exp(x - max). Phase 3: write.
        let (v1, v2, v3) = (self.var(), self.var(), self.var());
        let x1 = self.value(x, &coords_with(&ovars, v1));
        let x2 = self.value(x, &coords_with(&ovars, v2));
        let x3 = self.value(x, &coords_with(&ovars, v3));
        let neg_inf = self.konst(Scalar::Float(f64::NEG_INFINITY), dtype);
        let zero = self.konst(Scalar::Int(0), acc_sum_dtype);
        let mv = self.arena.add(Expr::Acc(m), dtype);
        let sv = self.arena.add(Expr::Acc(s), acc_sum_dtype);
        let d2 = self.arena.add(Expr::Binary(BinaryOp::Sub, x2, mv), dtype);
        let e2 = self.arena.add(Expr::Unary(UnaryOp::Exp, d2), dtype);
        let e2 = self.arena.add(Expr::Cast(e2), acc_sum_dtype);
        let d3 = self.arena.add(Expr::Binary(BinaryOp::Sub, x3, mv), dtype);
        let value = if log {
            let logs = self.arena.add(Expr::Unary(UnaryOp::Log, sv), acc_sum_dtype);
            let logs = self.arena.add(Expr::Cast(logs), dtype);
            self.arena.add(Expr::Binary(BinaryOp::Sub, d3, logs), dtype)
        } else {
            let e3 = self.arena.add(Expr::Unary(UnaryOp::Exp, d3), dtype);
            let sf = self.arena.add(Expr::Cast(sv), dtype);
            self.arena.add(Expr::Binary(BinaryOp::Div, e3, sf), dtype)
        };
        let store = self.store(out, &coords_with(&ovars, v3), value);
        let mut inner = vec![Stmt::Init { acc: m, value: neg_inf }];
        inner.extend(Self::nest(&[v1], &[n], vec![Stmt::Update { acc: m, combine: Combine::Max, value: x1 }]));
        inner.push(Stmt::Init { acc: s, value: zero });
        inner.extend(Self::nest(&[v2], &[n], vec![Stmt::Update { acc: s, combine: Combine::Add, value: e2 }]));
        inner.extend(Self::nest(&[v3], &[n], vec![store]));
        let oext: Vec<i64> = outer.iter().map(|&d| xshape[d]).collect();
        let body = Self::nest(&ovars, &oext, inner);
        self.finish(body, 3 * n.max(1))
    }
}
