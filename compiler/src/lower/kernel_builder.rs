//! Builds one loop-IR kernel from graph values: pointwise producers inlined as expressions at
//! the coordinates their consumer reads (broadcast right-aligned), reductions and softmax as
//! loop nests with accumulators, stores into the value's buffer.

use crate::dtype::{DType, Scalar};
use crate::graph::ir::{BinaryOp, Dim, Graph, Op, ReduceOp, UnaryOp, ValueId};
use crate::lower::loop_ir::*;
use crate::lower::views::{is_view, only_unit_dims, Layout};
use std::collections::{HashMap, HashSet};

/// Where a value is stored: a buffer and the element strides of its dims.
pub type Target = (BufId, Vec<i64>);

/// A coordinate of a value inside a kernel: a loop variable, or 0 (a broadcast dim).
pub type Coords = Vec<Option<VarId>>;

/// The element index of `coords` in memory with these strides from `offset`: a broadcast
/// coordinate (None) and a stride of 0 step nothing.
fn index_at(coords: &Coords, strides: &[i64], offset: i64) -> Index {
    let terms = coords.iter().zip(strides).filter_map(|(c, &s)| c.filter(|_| s != 0).map(|var| (var, s))).collect();
    Index { terms, offset, params: vec![] }
}

pub struct KernelBuilder<'a> {
    g: &'a Graph,
    bufs: &'a HashMap<ValueId, Target>,
    /// Pointwise values read from their buffer instead of recomputed (`materialize`).
    materialised: &'a HashSet<ValueId>,
    name: String,
    arena: ExprArena,
    memo: HashMap<(ValueId, Coords), ExprId>,
    accs: Vec<DType>,
    num_vars: u32,
    /// In a GEMM kernel's epilogue: the product's value, read as this accumulator.
    product: Option<(ValueId, AccId)>,
    /// Each value's strided layout over a buffer, where it has one (`views.rs`).
    layouts: &'a [Option<Layout>],
}

impl<'a> KernelBuilder<'a> {
    pub fn new(g: &'a Graph, bufs: &'a HashMap<ValueId, Target>, materialised: &'a HashSet<ValueId>, layouts: &'a [Option<Layout>], name: String) -> Self {
        KernelBuilder { g, bufs, materialised, name, arena: ExprArena::default(), memo: HashMap::new(), accs: vec![], num_vars: 0, product: None, layouts }
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
        let e = if let Some((_, acc)) = self.product.filter(|p| p.0 == v) {
            self.arena.add(Expr::Acc(acc), node.ty.dtype)
        } else if !node.op.is_pointwise() || self.materialised.contains(&v) {
            let (buf, strides) = &self.bufs[&v];
            self.arena.add(Expr::Load { buf: *buf, index: index_at(coords, strides, 0) }, node.ty.dtype)
        } else if let Some((buf, strides, offset)) = self.strided(v).filter(|_| is_view(&node.op)) {
            // A view of a stored value: index arithmetic over its buffer.
            self.arena.add(Expr::Load { buf, index: index_at(coords, &strides, offset) }, node.ty.dtype)
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
        if let Op::Permute(dims) = &node.op {
            // Output dim i is input dim dims[i]: the input is read where the output is.
            let mut c = vec![None; dims.len()];
            for (i, &d) in dims.iter().enumerate() {
                c[d] = coords[i];
            }
            return self.value(node.inputs[0], &c);
        }
        if matches!(node.op, Op::Expand | Op::Reshape | Op::Slice { .. } | Op::Unfold { .. }) {
            // A stored view (an output, say) is computed from its input's buffer where the
            // input has one, else remapped.
            let x = node.inputs[0];
            let through = self.layouts[x.0 as usize].as_ref().and_then(|l| crate::lower::views::view_layout(self.g, v, l));
            if let Some(l) = through {
                if let Some((buf, _)) = self.bufs.get(&l.base) {
                    return self.arena.add(Expr::Load { buf: *buf, index: index_at(coords, &l.strides, l.offset) }, dtype);
                }
            }
            return self.remap(v, coords);
        }
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
                Op::Iota { dim } => {
                    let mut unit = vec![0; shape.len()];
                    unit[*dim] = 1;
                    Expr::Index(index_at(coords, &unit, 0))
                }
                Op::Unary(u) => Expr::Unary(*u, args[0]),
                Op::Binary(b) => Expr::Binary(*b, args[0], args[1]),
                Op::Compare(c) => Expr::Compare(*c, args[0], args[1]),
                Op::Where => Expr::Select(args[0], args[1], args[2]),
                Op::Cast => Expr::Cast(args[0]),
                Op::Quantize(p) => Expr::Quantize { x: args[0], inverse_scale: crate::kernels::quantized::inverse(p.scale), zero_point: p.zero_point as f32 },
                Op::QuantizedProduct { .. } | Op::Input(_) | Op::Reduce { .. } | Op::Softmax { .. } | Op::MatMul { .. } | Op::QuantizedMatMul { .. } | Op::Cat { .. } | Op::Conv2d { .. } | Op::Permute(_) | Op::Slice { .. } | Op::Reshape | Op::Expand | Op::Unfold { .. } => {
                    unreachable!("not pointwise, or handled above")
                }
            };
            self.arena.add(expr, dtype)
        }
    }

    fn store(&mut self, v: ValueId, coords: &Coords, value: ExprId) -> Stmt {
        Self::store_to(&self.bufs[&v], coords, value)
    }

    fn store_to((buf, strides): &Target, coords: &Coords, value: ExprId) -> Stmt {
        Stmt::Store { buf: *buf, index: index_at(coords, strides, 0), value }
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
        Kernel { name: self.name, root, exprs: self.arena.exprs, accs: self.accs, num_vars, work_per_iter, gemm: None }
    }

    /// One kernel over `shape` computing each value into its target buffer, its loops nested
    /// in `order` (outermost first): the order its targets are laid out in.
    pub fn pointwise(mut self, shape: &[i64], order: &[usize], targets: &[(ValueId, Target)]) -> Kernel {
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

    /// Part `part` of a concatenation: its input computed (producers fused) and stored into
    /// the output's buffer from `start` along the concatenated dim.
    pub fn cat_part(mut self, out: ValueId, part: usize, dim: usize, start: i64) -> Kernel {
        let x = self.g.node(out).inputs[part];
        let shape = self.g.ty(x).static_shape().unwrap();
        let vars: Vec<VarId> = shape.iter().map(|_| self.var()).collect();
        let coords: Coords = vars.iter().zip(&shape).map(|(&v, &n)| if n == 1 { None } else { Some(v) }).collect();
        let value = self.value(x, &coords);
        let (buf, strides) = self.bufs[&out].clone();
        let store = Stmt::Store { buf, index: index_at(&coords, &strides, start * strides[dim]), value };
        // Loops in the output's memory order (outermost the largest stride), so the part is
        // written contiguously in any layout (a channels-last pad's copy was 20× slower
        // in row-major loops).
        let mut order: Vec<usize> = (0..shape.len()).collect();
        order.sort_by_key(|&d| std::cmp::Reverse(strides[d]));
        let (loop_vars, extents): (Vec<VarId>, Vec<i64>) = order.iter().map(|&d| (vars[d], shape[d])).unzip();
        let body = Self::nest(&loop_vars, &extents, vec![store]);
        self.finish(body, 1)
    }

    pub fn reduction(mut self, out: ValueId, op: ReduceOp, dims: &[usize], keepdim: bool) -> Kernel {
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

    /// Where `v`'s elements are read from without computing: a buffer, the element strides of
    /// v's dims and an offset (its own buffer, or a view's base). None for a value computed
    /// inline.
    pub fn strided(&self, v: ValueId) -> Option<(BufId, Vec<i64>, i64)> {
        let layout = self.layouts[v.0 as usize].as_ref()?;
        let (buf, _) = self.bufs.get(&layout.base)?;
        Some((*buf, layout.strides.clone(), layout.offset))
    }

    /// An expand or a unit-dim reshape of a value computed inline: its input at the
    /// coordinates these map to. (Slices and other reshapes always have a layout: `views.rs`
    /// stores their input.)
    fn remap(&mut self, v: ValueId, coords: &Coords) -> ExprId {
        let node = self.g.node(v);
        let x = node.inputs[0];
        let xshape = self.g.ty(x).static_shape().unwrap();
        let shape = node.ty.static_shape().unwrap();
        let c: Coords = match &node.op {
            Op::Expand => {
                let skip = shape.len() - xshape.len();
                xshape.iter().enumerate().map(|(d, &n)| if n == 1 { None } else { coords[d + skip] }).collect()
            }
            Op::Reshape if only_unit_dims(&xshape, &shape) => {
                // The dims longer than 1 keep their order: pair them up.
                let mut long = coords.iter().zip(&shape).filter(|(_, &n)| n != 1).map(|(c, _)| *c);
                xshape.iter().map(|&n| if n == 1 { None } else { long.next().flatten() }).collect()
            }
            _ => panic!("{} %{} of a value without a layout (views.rs stores its input)", self.g.node(v).op.name_for_errors(), v.0),
        };
        self.value(x, &c)
    }

    /// Coordinates of a matmul operand of `shape` (batch dims right-aligned to the output's
    /// `batch` vars, then its two matrix dims), a size-1 dim broadcast.
    fn operand_coords(shape: &[i64], batch: &[VarId], row: VarId, col: VarId) -> Coords {
        let nb = shape.len() - 2;
        let mut c: Coords = batch[batch.len() - nb..].iter().map(|&v| Some(v)).collect();
        c.push(Some(row));
        c.push(Some(col));
        c.iter().zip(shape).map(|(&v, &n)| if n == 1 { None } else { v }).collect()
    }

    /// A matmul as a loop nest: each output element one accumulation over k, innermost (a
    /// vectorised dot product when k is contiguous: the GEMV path, and any matmul the GEMM
    /// kernel does not take). Accumulates in the dtype, as BLAS does.
    pub fn matmul_loops(mut self, out: ValueId) -> Kernel {
        let (a, b) = (self.g.node(out).inputs[0], self.g.node(out).inputs[1]);
        let (ashape, bshape) = (self.g.ty(a).static_shape().unwrap(), self.g.ty(b).static_shape().unwrap());
        let shape = self.g.ty(out).static_shape().unwrap();
        let dtype = self.g.ty(out).dtype;
        let r = shape.len();
        let vars: Vec<VarId> = shape.iter().map(|_| self.var()).collect();
        let kvar = self.var();
        let k = ashape[ashape.len() - 1];
        let av = self.value(a, &Self::operand_coords(&ashape, &vars[..r - 2], vars[r - 2], kvar));
        let bv = self.value(b, &Self::operand_coords(&bshape, &vars[..r - 2], kvar, vars[r - 1]));
        let prod = self.arena.add(Expr::Binary(BinaryOp::Mul, av, bv), dtype);
        let acc = self.acc(dtype);
        let zero = self.konst(Scalar::Int(0), dtype);
        let result = self.arena.add(Expr::Acc(acc), dtype);
        let coords: Coords = vars.iter().zip(&shape).map(|(&v, &n)| if n == 1 { None } else { Some(v) }).collect();
        let store = self.store(out, &coords, result);
        let mut inner = vec![Stmt::Init { acc, value: zero }];
        inner.extend(Self::nest(&[kvar], &[k], vec![Stmt::Update { acc, combine: Combine::Add, value: prod }]));
        inner.push(store);
        let body = Self::nest(&vars[..r - 1], &shape[..r - 1], vec![Stmt::Loop(Loop { var: vars[r - 1], extent: Dim::Const(shape[r - 1]), kind: LoopKind::Serial, body: inner })]);
        self.finish(body, k.max(1))
    }

    /// A matmul or convolution on the GEMM kernel: the loop nest over the output is the epilogue (storing the
    /// product; `lower::epilogue` fuses pointwise consumers into it later).
    pub fn gemm(mut self, out: ValueId, shape: crate::kernels::gemm::GemmShape) -> Kernel {
        let dims = self.g.ty(out).static_shape().unwrap();
        let vars: Vec<VarId> = dims.iter().map(|_| self.var()).collect();
        let acc = self.acc(DType::F32);
        self.product = Some((out, acc));
        let coords: Coords = vars.iter().zip(&dims).map(|(&v, &n)| if n == 1 { None } else { Some(v) }).collect();
        let value = self.value(out, &coords);
        let store = self.store(out, &coords, value);
        let body = Self::nest(&vars, &dims, vec![store]);
        let spec = crate::kernels::gemm::GemmSpec::for_product(shape, &vars, acc);
        let work = spec.shape.flops();
        let mut k = self.finish(body, work);
        k.gemm = Some(Box::new(spec));
        k
    }

    pub fn softmax(mut self, out: ValueId, dim: usize, log: bool) -> Kernel {
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
        // As ATen's vectorised softmax: the sum of exp(x - max) in the dtype (the vectoriser
        // keeps a partial sum per lane, combined pairwise), exp stored in phase 2 and scaled by
        // the sum's reciprocal in phase 3; log_softmax writes (x - max) - log(sum).
        let (m, s) = (self.acc(dtype), self.acc(dtype));
        let n = xshape[dim];
        let (v1, v2, v3) = (self.var(), self.var(), self.var());
        let x1 = self.value(x, &coords_with(&ovars, v1));
        let x2 = self.value(x, &coords_with(&ovars, v2));
        let neg_inf = self.konst(Scalar::Float(f64::NEG_INFINITY), dtype);
        let zero = self.konst(Scalar::Int(0), dtype);
        let mv = self.arena.add(Expr::Acc(m), dtype);
        let sv = self.arena.add(Expr::Acc(s), dtype);
        let d2 = self.arena.add(Expr::Binary(BinaryOp::Sub, x2, mv), dtype);
        let e2 = self.arena.add(Expr::Unary(UnaryOp::Exp, d2), dtype);
        let mut inner = vec![Stmt::Init { acc: m, value: neg_inf }];
        inner.extend(Self::nest(&[v1], &[n], vec![Stmt::Update { acc: m, combine: Combine::Max, value: x1 }]));
        inner.push(Stmt::Init { acc: s, value: zero });
        let out3 = coords_with(&ovars, v3);
        if log {
            inner.extend(Self::nest(&[v2], &[n], vec![Stmt::Update { acc: s, combine: Combine::Add, value: e2 }]));
            let x3 = self.value(x, &out3);
            let d3 = self.arena.add(Expr::Binary(BinaryOp::Sub, x3, mv), dtype);
            let logs = self.arena.add(Expr::Unary(UnaryOp::Log, sv), dtype);
            let value = self.arena.add(Expr::Binary(BinaryOp::Sub, d3, logs), dtype);
            let store = self.store(out, &out3, value);
            inner.extend(Self::nest(&[v3], &[n], vec![store]));
        } else {
            let keep = self.store(out, &coords_with(&ovars, v2), e2);
            inner.extend(Self::nest(&[v2], &[n], vec![keep, Stmt::Update { acc: s, combine: Combine::Add, value: e2 }]));
            let (buf, strides) = self.bufs[&out].clone();
            let e3 = self.arena.add(Expr::Load { buf, index: index_at(&out3, &strides, 0) }, dtype);
            let r = self.arena.add(Expr::Unary(UnaryOp::Reciprocal, sv), dtype);
            let value = self.arena.add(Expr::Binary(BinaryOp::Mul, e3, r), dtype);
            let store = self.store(out, &out3, value);
            inner.extend(Self::nest(&[v3], &[n], vec![store]));
        }
        let oext: Vec<i64> = outer.iter().map(|&d| xshape[d]).collect();
        let body = Self::nest(&ovars, &oext, inner);
        self.finish(body, 3 * n.max(1))
    }
}
