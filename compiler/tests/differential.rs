//! Differential fuzzing, Cranelift-style: random graphs (pointwise chains over broadcast
//! shapes, every dtype, casts, comparisons, where, reductions, softmax) on random data laid out
//! with random strides, compiled and run, checked against `kiln_compiler::graph::reference`.
//!
//! Exact ops (+ - * / on floats, everything on ints and bools, max/min, casts, compares)
//! must match bit for bit (NaN matches NaN); transcendentals, float sums and softmax within a
//! few ulps (their own bounds are in math_accuracy.rs). KILN_FUZZ_GRAPHS=N runs N graphs
//! (default 300); a failure prints the graph and the seed to replay it with KILN_FUZZ_SEED.
//!
//! Outputs are laid out in random dim orders (`Graph::output_orders`) and read back through
//! their strides.
//!
//! The same graphs with one dim made symbolic (`kiln_compiler::lower::symbolic`): lowered at the
//! sample sizes with each input's layout recipe (dim order, gap) applied at each size, compiled
//! once, and run at other sizes against the interpreter at those sizes.

mod common;
use common::Rng;
use kiln_compiler::dtype::{DType, Scalar};
use kiln_compiler::graph::ir::{BinaryOp, CmpOp, Graph, Op, ReduceOp, UnaryOp, ValueId};
use kiln_compiler::graph::ir::parse_graph;
use kiln_compiler::graph::layout::dense_strides;
use kiln_compiler::runtime::program::RunError;
use kiln_compiler::graph::reference::{self, Tensor};
use kiln_compiler::lower::symbolic::{infer, sample_points};
use kiln_compiler::{compile, compile_loop_program, lower_graph, CompileOptions, Target};

const SIZES: [i64; 6] = [1, 2, 3, 5, 8, 17];

/// How a value of a random graph is checked against the interpreter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Trust {
    /// Bit for bit.
    Exact,
    /// Through a transcendental or a float sum: within a few ulps.
    Approximate,
    /// A comparison (or an integer cast) of approximate values, which the last ulp can flip,
    /// or anything computed from one: not compared.
    Flippable,
}

struct Gen {
    rng: Rng,
    g: Graph,
    shape: Vec<i64>,
    /// How exactly each value can be checked.
    trust: Vec<Trust>,
}

impl Gen {
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[(self.rng.next_u64() % xs.len() as u64) as usize]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.rng.next_u64() % 100 < percent
    }
    fn values(&self) -> Vec<ValueId> {
        (0..self.g.nodes.len() as u32).map(ValueId).collect()
    }
    fn value_of(&mut self, pred: impl Fn(&Graph, ValueId) -> bool) -> Option<ValueId> {
        let vs: Vec<ValueId> = self.values().into_iter().filter(|&v| pred(&self.g, v)).collect();
        (!vs.is_empty()).then(|| self.pick(&vs))
    }
    /// Marks `v` as inexact (or not) and every node added since the last mark (casts made
    /// on the way) by its inputs: the least trusted input, and a comparison of inexact
    /// values or their cast to an integer becomes flippable.
    fn mark(&mut self, v: ValueId, inexact: bool) -> ValueId {
        for i in self.trust.len()..self.g.nodes.len() {
            let node = &self.g.nodes[i];
            let mut t = node.inputs.iter().map(|x| self.trust[x.0 as usize]).max().unwrap_or(Trust::Exact);
            let discontinuous = matches!(node.op, Op::Compare(_)) || (matches!(node.op, Op::Cast) && !node.ty.dtype.is_float());
            if t == Trust::Approximate && discontinuous {
                t = Trust::Flippable;
            }
            self.trust.push(t);
        }
        let t = &mut self.trust[v.0 as usize];
        if inexact && *t == Trust::Exact {
            *t = Trust::Approximate;
        }
        v
    }
    /// An input broadcastable to the graph's shape: a suffix of it with some dims set to 1.
    fn input(&mut self) -> ValueId {
        let keep = (self.rng.next_u64() % (self.shape.len() as u64 + 1)) as usize;
        let sizes: Vec<i64> = self.shape[self.shape.len() - keep..].iter().map(|&n| if self.rng.next_u64() % 4 == 0 { 1 } else { n }).collect();
        let dtype = self.pick(&DType::ALL);
        let v = self.g.input(kiln_compiler::TensorType::new(dtype, &sizes));
        self.mark(v, false)
    }

    fn step(&mut self) -> Option<()> {
        use DType::*;
        let choice = self.rng.next_u64() % 16;
        let v = match choice {
            0 => Some(self.input()),
            1 | 2 => {
                // Binary op of one dtype: cast the second operand to the first's.
                let a = self.value_of(|g, v| g.ty(v).dtype != Bool).unwrap_or_else(|| self.input());
                let b = self.value_of(|_, _| true).unwrap();
                let d = self.g.ty(a).dtype;
                let b = self.g.cast(b, d);
                let ops: &[BinaryOp] = if d.is_float() {
                    &[BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Max, BinaryOp::Min]
                } else {
                    &[BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Max, BinaryOp::Min]
                };
                let op = self.pick(ops);
                self.g.binary(op, a, b).ok()
            }
            3 => {
                let a = self.value_of(|g, v| g.ty(v).dtype.is_float())?;
                let op = self.pick(&[UnaryOp::Neg, UnaryOp::Abs, UnaryOp::Relu, UnaryOp::Exp, UnaryOp::Tanh, UnaryOp::Sigmoid, UnaryOp::Log1p, UnaryOp::Sqrt, UnaryOp::Erf, UnaryOp::Silu, UnaryOp::Gelu, UnaryOp::Reciprocal, UnaryOp::Round]);
                let v = self.g.unary(op, a).ok()?;
                let inexact = !matches!(op, UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Relu | UnaryOp::Reciprocal | UnaryOp::Sqrt);
                return self.finish(v, inexact);
            }
            4 => {
                let a = self.value_of(|g, v| g.ty(v).dtype.is_int())?;
                let op = self.pick(&[UnaryOp::Neg, UnaryOp::Abs, UnaryOp::Relu]);
                self.g.unary(op, a).ok()
            }
            5 => {
                let a = self.value_of(|g, v| g.ty(v).dtype != Bool).unwrap_or_else(|| self.input());
                let b = self.value_of(|_, _| true).unwrap();
                let b = self.g.cast(b, self.g.ty(a).dtype);
                let op = self.pick(&[CmpOp::Eq, CmpOp::Ne, CmpOp::Lt, CmpOp::Le, CmpOp::Gt, CmpOp::Ge]);
                self.g.compare(op, a, b).ok()
            }
            6 => {
                let c = self.value_of(|g, v| g.ty(v).dtype == Bool)?;
                let a = self.value_of(|_, _| true).unwrap();
                let b = self.value_of(|_, _| true).unwrap();
                let b = self.g.cast(b, self.g.ty(a).dtype);
                self.g.where_(c, a, b).ok()
            }
            7 => {
                let a = self.value_of(|_, _| true).unwrap();
                let to = self.pick(&DType::ALL);
                let v = self.g.cast(a, to);
                // f32 -> i32 of NaN or a value outside i32's range is INT_MIN in both.
                Some(v)
            }
            8 => {
                let a = self.value_of(|g, v| g.ty(v).rank() > 0 && g.ty(v).dtype != Bool)?;
                let rank = self.g.ty(a).rank();
                let dims: Vec<usize> = (0..rank).filter(|_| self.chance(50)).collect();
                let d = self.g.ty(a).dtype;
                let op = if d.is_float() {
                    self.pick(&[ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min])
                } else {
                    self.pick(&[ReduceOp::Max, ReduceOp::Min, ReduceOp::Sum])
                };
                let a = if op == ReduceOp::Sum && d == I32 { self.g.cast(a, I64) } else { a };
                let keepdim = self.chance(50);
                let v = self.g.reduce(op, a, &dims, keepdim).ok()?;
                return self.finish(v, matches!(op, ReduceOp::Sum | ReduceOp::Mean) && d.is_float());
            }
            10 | 11 => {
                // A permute and its inverse: a view read through another view.
                let a = self.value_of(|g, v| g.ty(v).rank() > 1)?;
                let p = Layout::random(&mut self.rng, self.g.ty(a).rank()).order;
                let mut inv = vec![0; p.len()];
                for (i, &d) in p.iter().enumerate() {
                    inv[d] = i;
                }
                let t = self.g.permute(a, &p).ok()?;
                self.g.permute(t, &inv).ok()
            }
            12 | 13 => {
                // A value broadcast to the full shape explicitly.
                let a = self.value_of(|_, _| true)?;
                let shape = self.shape.clone();
                self.g.expand(a, &shape).ok()
            }
            14 => {
                // Flattened through a permute and split back: a reshape no view expresses,
                // so the lowering stores the permuted value first.
                let a = self.value_of(|g, v| g.ty(v).rank() > 1)?;
                let p = Layout::random(&mut self.rng, self.g.ty(a).rank()).order;
                let t = self.g.permute(a, &p).ok()?;
                let tshape = self.g.ty(t).static_shape()?;
                let flat = self.g.reshape(t, &[tshape.iter().product()]).ok()?;
                let back = self.g.reshape(flat, &tshape).ok()?;
                let mut inv = vec![0; p.len()];
                for (i, &d) in p.iter().enumerate() {
                    inv[d] = i;
                }
                self.g.permute(back, &inv).ok()
            }
            15 => {
                // Split along a dim and joined again: slices at offsets, cat's parts.
                let a = self.value_of(|g, v| g.ty(v).static_shape().is_some_and(|s| s.iter().any(|&n| n >= 2)))?;
                let shape = self.g.ty(a).static_shape()?;
                let d = shape.iter().position(|&n| n >= 2)?;
                let k = 1 + (self.rng.next_u64() % (shape[d] as u64 - 1)) as i64;
                let x = self.g.slice(a, d, 0, k).ok()?;
                let y = self.g.slice(a, d, k, shape[d] - k).ok()?;
                let y = if self.chance(50) { self.g.unary(UnaryOp::Neg, y).ok().filter(|_| self.g.ty(y).dtype != Bool).unwrap_or(y) } else { y };
                self.g.cat(&[x, y], d).ok()
            }
            _ => {
                let a = self.value_of(|g, v| g.ty(v).dtype.is_float() && g.ty(v).rank() > 0)?;
                let dim = (self.rng.next_u64() % self.g.ty(a).rank() as u64) as usize;
                let log = self.chance(50);
                let v = self.g.softmax(a, dim, log).ok()?;
                return self.finish(v, true);
            }
        };
        if let Some(v) = v {
            self.mark(v, false);
        }
        Some(())
    }

    fn finish(&mut self, v: ValueId, inexact: bool) -> Option<()> {
        self.mark(v, inexact);
        Some(())
    }
}

/// A random graph with 1–3 outputs among its last values, how each output can be checked,
/// and the shape its inputs broadcast to.
fn random_graph(seed: u64) -> (Graph, Vec<Trust>, Vec<i64>) {
    let mut rng = Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1);
    let rank = (rng.next_u64() % 4) as usize;
    let shape: Vec<i64> = (0..rank).map(|_| SIZES[(rng.next_u64() % SIZES.len() as u64) as usize]).collect();
    let mut gen = Gen { rng, g: Graph::new(), shape: shape.clone(), trust: vec![] };
    gen.input();
    gen.input();
    let steps = 3 + gen.rng.next_u64() % 10;
    for _ in 0..steps {
        let _ = Gen::step(&mut gen);
    }
    let last = ValueId(gen.g.nodes.len() as u32 - 1);
    gen.mark(last, false);
    let computed: Vec<ValueId> = gen.values().into_iter().filter(|&v| !gen.g.inputs.contains(&v) && !matches!(gen.g.node(v).op, kiln_compiler::graph::ir::Op::Constant(_))).collect();
    let mut outputs = vec![];
    for &v in computed.iter().rev().take(3) {
        if gen.chance(70) || outputs.is_empty() {
            outputs.push(v);
        }
    }
    let trust = outputs.iter().map(|v| gen.trust[v.0 as usize]).collect();
    gen.g.set_outputs(outputs.clone());
    for (i, v) in outputs.iter().enumerate() {
        if gen.chance(50) {
            let order = Layout::random(&mut gen.rng, gen.g.ty(*v).rank()).order;
            gen.g.set_output_order(i, order).unwrap();
        }
    }
    (gen.g, trust, shape)
}

fn random_scalar(rng: &mut Rng, d: DType) -> Scalar {
    let special = [0.0, -0.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1.0, -1.0];
    match d {
        DType::Bool => Scalar::Bool(rng.next_u64() % 2 == 0),
        DType::I32 | DType::I64 => Scalar::Int((rng.next_u64() % 21) as i64 - 10),
        _ if rng.next_u64() % 10 == 0 => Scalar::Float(special[(rng.next_u64() % special.len() as u64) as usize]),
        _ => Scalar::Float(rng.uniform(-4.0, 4.0) as f64).cast(d),
    }
}

/// How an input is laid out in memory: its dims from outermost to innermost in `order`, and a
/// gap of 1 or 2 elements between innermost elements. The same recipe applies at any size.
struct Layout {
    order: Vec<usize>,
    gap: i64,
}

impl Layout {
    fn random(rng: &mut Rng, rank: usize) -> Layout {
        let mut order: Vec<usize> = (0..rank).collect();
        for i in (1..rank).rev() {
            order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        Layout { order, gap: 1 + (rng.next_u64() % 3) as i64 / 2 }
    }

    fn strides(&self, sizes: &[i64]) -> Vec<i64> {
        let mut strides = vec![0i64; sizes.len()];
        let mut step = self.gap;
        for &d in self.order.iter().rev() {
            strides[d] = step;
            step *= sizes[d].max(1);
        }
        strides
    }

    /// `t`'s bytes laid out this way, and their element strides.
    fn lay(&self, t: &Tensor) -> (Vec<u8>, Vec<i64>) {
        let strides = self.strides(&t.sizes);
        let size = t.dtype.size_bytes();
        let span = t.sizes.iter().zip(&strides).map(|(&n, &s)| (n - 1).max(0) * s).sum::<i64>() as usize + 1;
        let mut bytes = vec![0u8; span * size + 8];
        for (i, &v) in t.data.iter().enumerate() {
            write(&mut bytes[offset(i, &t.sizes, &strides) * size..], v, t.dtype);
        }
        (bytes, strides)
    }
}

fn write(b: &mut [u8], v: Scalar, d: DType) {
    match (d, v.cast(d)) {
        (DType::Bool, Scalar::Bool(x)) => b[0] = x as u8,
        (DType::I32, Scalar::Int(x)) => b[..4].copy_from_slice(&(x as i32).to_le_bytes()),
        (DType::I64, Scalar::Int(x)) => b[..8].copy_from_slice(&x.to_le_bytes()),
        (DType::F32, Scalar::Float(x)) => b[..4].copy_from_slice(&(x as f32).to_le_bytes()),
        (DType::F64, Scalar::Float(x)) => b[..8].copy_from_slice(&x.to_le_bytes()),
        _ => unreachable!(),
    }
}

fn read(b: &[u8], d: DType) -> Scalar {
    match d {
        DType::Bool => Scalar::Bool(b[0] != 0),
        DType::I32 => Scalar::Int(i32::from_le_bytes(b[..4].try_into().unwrap()) as i64),
        DType::I64 => Scalar::Int(i64::from_le_bytes(b[..8].try_into().unwrap())),
        DType::F32 => Scalar::Float(f32::from_le_bytes(b[..4].try_into().unwrap()) as f64),
        DType::F64 => Scalar::Float(f64::from_le_bytes(b[..8].try_into().unwrap())),
    }
}

fn same(got: Scalar, want: Scalar, d: DType, trust: Trust) -> bool {
    let inexact = match trust {
        Trust::Exact => false,
        Trust::Approximate => true,
        Trust::Flippable => return true,
    };
    match (got, want) {
        (Scalar::Float(a), Scalar::Float(b)) => {
            if a.is_nan() || b.is_nan() {
                return a.is_nan() && b.is_nan();
            }
            if !inexact {
                return a == b;
            }
            if a == b {
                return true;
            }
            // Chains of float32 approximations compound (and carry into float64 through casts):
            // allow 64 float32 ulps relative, absolute near zero, where a few ulps of an O(1)
            // intermediate cancel.
            let _ = d;
            (a - b).abs() <= 64.0 * f32::EPSILON as f64 * b.abs().max(1.0)
        }
        _ => got == want,
    }
}

fn random_inputs(g: &Graph, rng: &mut Rng) -> Vec<Tensor> {
    g.inputs
        .iter()
        .map(|&v| {
            let ty = g.ty(v);
            let sizes = ty.static_shape().unwrap();
            let n = sizes.iter().product::<i64>() as usize;
            Tensor { dtype: ty.dtype, sizes, data: (0..n).map(|_| random_scalar(rng, ty.dtype)).collect() }
        })
        .collect()
}

/// The memory offset of row-major element `i` of a tensor of `sizes` with `strides`.
fn offset(mut i: usize, sizes: &[i64], strides: &[i64]) -> usize {
    let mut off = 0;
    for d in (0..sizes.len()).rev() {
        let n = sizes[d].max(1) as usize;
        off += (i % n) * strides[d] as usize;
        i /= n;
    }
    off
}

/// Runs compiled code (`run(inputs, outputs)`) on `inputs` laid out by `layouts` and checks
/// each output, read in the layout the graph asks for, against the interpreter.
fn compare(what: &str, g: &Graph, trust: &[Trust], inputs: &[Tensor], layouts: &[Layout], loop_ir: &str, run: impl FnOnce(&[*const u8], &[*mut u8]) -> Result<(), RunError>) {
    let want = reference::eval(g, inputs);
    let laid: Vec<(Vec<u8>, Vec<i64>)> = inputs.iter().zip(layouts).map(|(t, l)| l.lay(t)).collect();
    let strides: Vec<Vec<i64>> = laid.iter().map(|l| l.1.clone()).collect();
    let mut outs: Vec<Vec<u8>> = want.iter().map(|t| vec![0u8; t.data.len() * t.dtype.size_bytes() + 8]).collect();
    let ins: Vec<*const u8> = laid.iter().map(|l| l.0.as_ptr()).collect();
    let outp: Vec<*mut u8> = outs.iter_mut().map(|o| o.as_mut_ptr()).collect();
    run(&ins, &outp).unwrap_or_else(|e| panic!("{what}: {e}"));
    for (k, (t, bytes)) in want.iter().zip(&outs).enumerate() {
        let size = t.dtype.size_bytes();
        let out_strides = dense_strides(&t.sizes, &g.output_orders[k]);
        for (i, &w) in t.data.iter().enumerate() {
            let got = read(&bytes[offset(i, &t.sizes, &out_strides) * size..], t.dtype);
            assert!(
                same(got, w, t.dtype, trust[k]),
                "{what}: output {k}[{i}] = {got:?}, reference {w:?}\n{g}inputs: {:?}\nstrides: {strides:?}\nloop ir:\n{loop_ir}",
                inputs.iter().map(|t| &t.data).collect::<Vec<_>>(),
            );
        }
    }
}

fn check(seed: u64) {
    let (g, trust, _) = random_graph(seed);
    let mut rng = Rng(seed ^ 0xD1B54A32D192ED03);
    let inputs = random_inputs(&g, &mut rng);
    let layouts: Vec<Layout> = inputs.iter().map(|t| Layout::random(&mut rng, t.sizes.len())).collect();
    let strides: Vec<Vec<i64>> = inputs.iter().zip(&layouts).map(|(t, l)| l.strides(&t.sizes)).collect();
    let p = match compile(&g, &strides, &Target::host(), &CompileOptions::default()) {
        Ok(p) => p,
        Err(e) => panic!("seed {seed}: compile failed: {e}\n{g}"),
    };
    compare(&format!("seed {seed}"), &g, &trust, &inputs, &layouts, &p.image.loop_ir, |ins, outs| unsafe { p.run(ins, outs) });
}

/// The graph's text with every size `from` in a type replaced by `to` (dims lists and
/// constants are not types).
fn resized(text: &str, from: i64, to: i64) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        let is_type = ["f32", "f64", "i32", "i64", "bool"].iter().any(|t| rest[..open].ends_with(t));
        let close = open + rest[open..].find(']').unwrap();
        out.push_str(&rest[..=open]);
        let inside = &rest[open + 1..close];
        if is_type && !inside.is_empty() {
            let dims: Vec<String> = inside.split(", ").map(|d| if d.parse() == Ok(from) { to.to_string() } else { d.to_string() }).collect();
            out.push_str(&dims.join(", "));
        } else {
            out.push_str(inside);
        }
        rest = &rest[close..];
    }
    out.push_str(rest);
    out
}

/// `seed`'s graph with one dim of its shape symbolic: compiled once from its lowerings at the
/// sample sizes and run at other sizes. False if the shape has no dim to make symbolic (a size
/// ≥ 2 no other dim has).
fn check_symbolic(seed: u64) -> bool {
    let (g, trust, shape) = random_graph(seed);
    // Reshapes, slices and cats name sizes that are sums or products of the shape's: the text
    // cannot be resized by substituting one size.
    if g.nodes.iter().any(|n| matches!(n.op, kiln_compiler::graph::ir::Op::Reshape | kiln_compiler::graph::ir::Op::Slice { .. } | kiln_compiler::graph::ir::Op::Cat { .. })) {
        return false;
    }
    let mut rng = Rng(seed ^ 0x2545F4914F6CDD1D);
    let dims: Vec<i64> = shape.iter().copied().filter(|&n| n >= 2 && shape.iter().filter(|&&m| m == n).count() == 1).collect();
    if dims.is_empty() {
        return false;
    }
    let v = dims[(rng.next_u64() % dims.len() as u64) as usize];
    let text = g.to_string();
    let at = |s: i64| parse_graph(&resized(&text, v, s)).unwrap_or_else(|e| panic!("seed {seed}: {e}\n{}", resized(&text, v, s)));
    let layouts: Vec<Layout> = g.inputs.iter().map(|&i| Layout::random(&mut rng, g.ty(i).rank())).collect();
    let strides_of = |g: &Graph| -> Vec<Vec<i64>> { g.inputs.iter().zip(&layouts).map(|(&i, l)| l.strides(&g.ty(i).static_shape().unwrap())).collect() };
    let avoid: Vec<i64> = shape.iter().copied().filter(|&n| n != v).collect();
    let samples: Vec<_> = sample_points(1, &avoid)
        .into_iter()
        .map(|p| {
            let gp = at(p[0]);
            let lp = lower_graph(&gp, &strides_of(&gp)).unwrap();
            (p, lp)
        })
        .collect();
    let (shapes, program) = infer(&samples).unwrap_or_else(|why| panic!("seed {seed}: not symbolic in the dim of size {v}: {why}\n{g}"));
    let image = compile_loop_program(&program, &Target::host(), &CompileOptions::default()).unwrap();
    let loop_ir = image.loop_ir.clone();
    let p = image.load().unwrap();
    for s in [2, 3, v, 4 + (rng.next_u64() % 60) as i64] {
        let gs = at(s);
        let inputs = random_inputs(&gs, &mut rng);
        let what = format!("seed {seed}, symbolic dim of size {v}, run at {s}");
        compare(&what, &gs, &trust, &inputs, &layouts, &loop_ir, |ins, outs| unsafe { p.run_symbolic(&shapes, &[s], |i| ins[i], |i, _, _| Some(outs[i]), &|_| None) });
    }
    true
}

/// The seeds to run: KILN_FUZZ_SEED alone (a replay), else 0..KILN_FUZZ_GRAPHS (300).
fn seeds() -> Vec<u64> {
    if let Ok(seed) = std::env::var("KILN_FUZZ_SEED") {
        return vec![seed.parse().expect("KILN_FUZZ_SEED is a number")];
    }
    let n: u64 = std::env::var("KILN_FUZZ_GRAPHS").ok().and_then(|s| s.parse().ok()).unwrap_or(300);
    (0..n).collect()
}

#[test]
fn random_graphs_match_the_reference_interpreter() {
    seeds().into_iter().for_each(check);
}

#[test]
fn random_graphs_compiled_for_a_symbolic_dim_match_the_reference_at_other_sizes() {
    let seeds = seeds();
    let n = seeds.len();
    let symbolic = seeds.into_iter().filter(|&seed| check_symbolic(seed)).count();
    println!("{symbolic} of {n} graphs compiled for a symbolic dim, each run at 4 sizes");
    // Ranks 0 and shapes without a unique size >= 2 have no dim to make symbolic.
    assert!(n == 1 || symbolic >= n / 3, "{symbolic} of {n} graphs had a dim to make symbolic");
}
