//! Symbolic sizes without symbolic lowering: code compiled once for every size of some dims.
//!
//! A region is lowered at several assignments of its symbols (the input dims that vary). If
//! the loop programs have the same structure and differ only in integers that are monomials
//! in the symbols (`c × Π sᵏ`: a loop extent, a stride, a mean's count), the program is
//! rewritten to read those integers from parameters at run time (`Dim::Sym`,
//! `Index::params`, `Expr::Param`) and compiled once. Kernels run on `[start, end)` slices of
//! their root loop, so root extents, buffer sizes and a GEMM's shape (the runtime's loops
//! read it, not generated code) need no parameter: the runtime evaluates them and lays
//! temporaries out for the sizes at hand
//! ([`CompiledProgram::run_symbolic`](crate::CompiledProgram::run_symbolic)). A region whose
//! lowering changes shape with the sizes, or whose integers are no monomials, keeps code per
//! size.
//!
//! The samples are primes ≥ 17 that no static size equals, so that no comparison the lowering
//! makes (broadcast, contiguity, coalescing) holds at the samples by coincidence, and every
//! sample is past the lowering's size thresholds (a matmul of fewer than 16 columns takes
//! the loop nest, not the GEMM: samples on both sides would lower differently); one extra
//! sample with every symbol moved checks the inferred monomials. Symbols are ≥ 2 at run time
//! (the guard's job): sizes 0 and 1 change broadcasting and get code of their own.

use crate::dtype::Scalar;
use crate::graph::ir::Dim;
use crate::lower::loop_ir::{Expr, Index, Kernel, Loop, LoopKind, Stmt};
use crate::lower::{BufferKind, LoopProgram};

/// `coeff × Π symbols[k]^powers[k]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Monomial {
    pub coeff: i64,
    pub powers: Vec<u8>,
}

impl Monomial {
    pub fn eval(&self, symbols: &[i64]) -> i64 {
        self.powers.iter().zip(symbols).fold(self.coeff, |acc, (&p, &s)| acc.saturating_mul(s.saturating_pow(p as u32)))
    }
    pub fn is_constant(&self) -> bool {
        self.powers.iter().all(|&p| p == 0)
    }
    fn times(&self, other: &Monomial) -> Monomial {
        let powers = self.powers.iter().zip(&other.powers).map(|(a, b)| a + b).collect();
        Monomial { coeff: self.coeff.saturating_mul(other.coeff), powers }
    }
}

/// A sum of monomials.
pub type Polynomial = Vec<Monomial>;

pub fn eval_sum(p: &Polynomial, symbols: &[i64]) -> i64 {
    p.iter().fold(0i64, |acc, m| acc.saturating_add(m.eval(symbols)))
}

/// How a symbolic program's sizes follow its symbols.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SymbolicShapes {
    pub num_symbols: usize,
    /// Per buffer, per dim.
    pub buffers: Vec<Vec<Monomial>>,
    /// Per kernel: the root extent.
    pub extents: Vec<Monomial>,
    /// Per kernel: element operations per root iteration (the parallel grain), as
    /// `schedule` counts them, with parameters for loop extents.
    pub work: Vec<Polynomial>,
    /// The program's parameters, as the rewritten kernels number them.
    pub params: Vec<Monomial>,
    /// Per kernel that is a GEMM: its shape's integers (`GemmShape::integers`), which the
    /// runtime's GEMM loops read (the microkernel takes k, rows and columns as arguments).
    pub gemms: Vec<Option<Vec<Monomial>>>,
}

impl SymbolicShapes {
    /// Whether kernel `k`, a GEMM of `shape` (the base sample's), reads a B whose packed layout
    /// is the same at every size: only then may a packed copy of it be kept between calls.
    pub fn gemm_b_is_static(&self, k: usize, shape: &crate::kernels::gemm::GemmShape) -> bool {
        self.gemms.get(k).and_then(Option::as_ref).is_some_and(|ms| shape.b_integer_positions().iter().all(|&i| ms[i].is_constant()))
    }
}

const PRIMES: [i64; 24] = [17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97, 101, 103, 107, 109, 113];

/// The assignments to lower a region at for [`infer`]: a base, the base with each symbol moved
/// in turn, and every symbol moved at once. No value equals a size in `avoid` (static sizes).
pub fn sample_points(num_symbols: usize, avoid: &[i64]) -> Vec<Vec<i64>> {
    let mut primes = PRIMES.iter().copied().filter(|p| !avoid.contains(p));
    let mut take = || (0..num_symbols).map(|_| primes.next().expect("enough primes for the symbols")).collect::<Vec<i64>>();
    let (base, moved, check) = (take(), take(), take());
    let mut points = vec![base.clone()];
    for k in 0..num_symbols {
        let mut p = base.clone();
        p[k] = moved[k];
        points.push(p);
    }
    points.push(check);
    points
}

/// The most symbols one region may have: each costs a lowering per sample.
pub const MAX_SYMBOLS: usize = 4;

/// Infers the shapes of a region from its programs lowered at `sample_points(n, _)` (in that
/// order), with the first program rewritten to read size-dependent integers from parameters;
/// or says why its code depends on the sizes in another way.
pub fn infer(samples: &[(Vec<i64>, LoopProgram)]) -> Result<(SymbolicShapes, LoopProgram), String> {
    let n = samples[0].0.len();
    assert_eq!(samples.len(), n + 2, "samples are sample_points()");
    let points: Vec<&[i64]> = samples.iter().map(|s| s.0.as_slice()).collect();
    let base = &samples[0].1;
    for (_, p) in samples {
        if p.buffers.len() != base.buffers.len() || p.kernels.len() != base.kernels.len() || (p.num_inputs, p.num_outputs) != (base.num_inputs, base.num_outputs) {
            return Err("its lowering has a different number of buffers or kernels at other sizes".into());
        }
        for (x, y) in p.buffers.iter().zip(&base.buffers) {
            let same_kind = matches!((&x.kind, &y.kind), (BufferKind::Temp { .. }, BufferKind::Temp { .. })) || x.kind == y.kind;
            if !same_kind || x.dtype != y.dtype || x.sizes.len() != y.sizes.len() {
                return Err("its buffers differ at other sizes".into());
            }
        }
        for (x, y) in p.kernels.iter().zip(&base.kernels) {
            if skeleton(x) != skeleton(y) {
                return Err(format!("kernel {} has loops of another shape at other sizes", x.name));
            }
        }
    }
    let values = |f: &dyn Fn(&LoopProgram) -> i64| -> Vec<i64> { samples.iter().map(|(_, p)| f(p)).collect() };
    let buffers = (0..base.buffers.len())
        .map(|b| (0..base.buffers[b].sizes.len()).map(|d| fit(&points, &values(&|p| p.buffers[b].sizes[d]))).collect())
        .collect::<Result<Vec<Vec<_>>, _>>()?;
    let extents = (0..base.kernels.len()).map(|k| fit(&points, &values(&|p| extent(&p.kernels[k].root)))).collect::<Result<Vec<_>, _>>()?;
    // Integers inside kernels: equal at every sample, or a parameter.
    let mut params: Vec<Monomial> = vec![];
    let mut kernels = vec![];
    for k in 0..base.kernels.len() {
        let per_sample: Vec<Vec<Int>> = samples.iter().map(|(_, p)| integers(&p.kernels[k])).collect();
        let mut decisions = vec![];
        for site in 0..per_sample[0].len() {
            let vals: Vec<Int> = per_sample.iter().map(|ints| ints[site]).collect();
            if vals.iter().all(|v| *v == vals[0]) {
                decisions.push(None);
                continue;
            }
            let as_int: Option<Vec<i64>> = vals.iter().map(|v| v.as_i64()).collect();
            let what = || format!("kernel {}: a {} is not a product of symbols", base.kernels[k].name, vals[0].what());
            let m = fit(&points, &as_int.ok_or_else(what)?).map_err(|_| what())?;
            let p = params.iter().position(|q| *q == m).unwrap_or_else(|| {
                params.push(m);
                params.len() - 1
            });
            decisions.push(Some(p as u32));
        }
        let mut kernel = base.kernels[k].clone();
        parameterise(&mut kernel, &decisions);
        kernels.push(kernel);
    }
    let gemms = (0..base.kernels.len())
        .map(|k| match &base.kernels[k].gemm {
            None => Ok(None),
            Some(spec) => (0..spec.shape.integers().len())
                .map(|i| fit(&points, &values(&|p| p.kernels[k].gemm.as_ref().expect("same skeleton").shape.integers()[i])))
                .collect::<Result<Vec<_>, _>>()
                .map(Some)
                .map_err(|e| format!("kernel {}: a GEMM size {e}", base.kernels[k].name)),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let work = kernels.iter().map(|k| work(&k.root.body, &params, n)).collect();
    let shapes = SymbolicShapes { num_symbols: n, buffers, extents, work, params, gemms };
    Ok((shapes, LoopProgram { kernels, ..base.clone() }))
}

/// The monomial through `values` at `points` (the `sample_points` layout): its powers from the
/// base and the samples moving one symbol, checked at every sample.
fn fit(points: &[&[i64]], values: &[i64]) -> Result<Monomial, String> {
    let n = points[0].len();
    let x0 = values[0] as i128;
    let mut powers = vec![0u8; n];
    for k in 0..n {
        let (b0, bk, xk) = (points[0][k] as i128, points[1 + k][k] as i128, values[1 + k] as i128);
        powers[k] = (0..=4u32)
            .find(|&p| xk * b0.pow(p) == x0 * bk.pow(p))
            .ok_or_else(|| format!("{} at {:?} and {} at {:?} are no product of symbols", values[0], points[0], values[1 + k], points[1 + k]))?
            as u8;
    }
    let unit = Monomial { coeff: 1, powers: powers.clone() }.eval(points[0]);
    if values[0] % unit != 0 {
        return Err(format!("{} at {:?} is no multiple of its symbols", values[0], points[0]));
    }
    let m = Monomial { coeff: values[0] / unit, powers };
    match points.iter().zip(values).find(|(p, &v)| m.eval(p) != v) {
        Some((p, v)) => Err(format!("{v} at {p:?} is not the product of symbols found at {:?}", points[0])),
        None => Ok(m),
    }
}

/// `schedule::work` of a rewritten loop body (at least 1), with each parameter extent `p` as
/// `params[p]`.
fn work(body: &[Stmt], params: &[Monomial], n: usize) -> Polynomial {
    let constant = |c: i64| Monomial { coeff: c, powers: vec![0; n] };
    let mut sum: Polynomial = vec![];
    for s in body {
        match s {
            Stmt::Loop(l) => {
                let extent = match l.extent {
                    Dim::Const(c) => constant(c),
                    Dim::Sym(p) => params[p as usize].clone(),
                };
                sum.extend(work(&l.body, params, n).iter().map(|m| m.times(&extent)));
            }
            _ => sum.push(constant(1)),
        }
    }
    if sum.is_empty() {
        sum.push(constant(1));
    }
    sum
}

/// A loop's extent; lowered programs have no parameters yet (`i64::MIN` never fits).
fn extent(l: &Loop) -> i64 {
    match l.extent {
        Dim::Const(n) => n,
        Dim::Sym(_) => i64::MIN,
    }
}

/// One integer of a kernel that the lowering may derive from sizes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Int {
    Extent(i64),
    Stride(i64),
    Offset(i64),
    Const(Scalar),
}

impl Int {
    fn as_i64(&self) -> Option<i64> {
        match *self {
            Int::Extent(v) | Int::Stride(v) => Some(v),
            // The lowering's offsets are 0; one that moved is no size.
            Int::Offset(_) => None,
            Int::Const(Scalar::Int(v)) => Some(v),
            Int::Const(Scalar::Float(f)) if f.fract() == 0.0 && f.abs() < (1u64 << 53) as f64 => Some(f as i64),
            Int::Const(_) => None,
        }
    }
    fn what(&self) -> &'static str {
        match self {
            Int::Extent(_) => "loop extent",
            Int::Stride(_) => "stride",
            Int::Offset(_) => "offset",
            Int::Const(_) => "constant",
        }
    }
}

/// The kernel's integers below its root extent, in a fixed order: loop extents, index
/// strides and offsets (statements first, then the expression arena), constants.
fn integers(k: &Kernel) -> Vec<Int> {
    fn index(ix: &Index, out: &mut Vec<Int>) {
        out.extend(ix.terms.iter().map(|t| Int::Stride(t.1)));
        out.push(Int::Offset(ix.offset));
    }
    fn walk(l: &Loop, out: &mut Vec<Int>) {
        for s in &l.body {
            match s {
                Stmt::Loop(inner) => {
                    out.push(Int::Extent(extent(inner)));
                    walk(inner, out);
                }
                Stmt::Store { index: ix, .. } => index(ix, out),
                _ => {}
            }
        }
    }
    let mut out = vec![];
    walk(&k.root, &mut out);
    for (e, _) in &k.exprs {
        match e {
            Expr::Load { index: ix, .. } | Expr::Index(ix) => index(ix, &mut out),
            Expr::Const(s) => out.push(Int::Const(*s)),
            _ => {}
        }
    }
    out
}

/// Replaces the integers `integers(k)` lists by the parameters `decisions` names (in the same
/// order; None keeps the integer).
fn parameterise(k: &mut Kernel, decisions: &[Option<u32>]) {
    let mut next = decisions.iter().copied();
    fn index(ix: &mut Index, next: &mut dyn Iterator<Item = Option<u32>>) {
        let mut kept = vec![];
        for &(v, s) in &ix.terms {
            match next.next().unwrap() {
                Some(p) => ix.params.push((v, p)),
                None => kept.push((v, s)),
            }
        }
        ix.terms = kept;
        assert_eq!(next.next().unwrap(), None, "offsets are never parameters");
    }
    fn walk(l: &mut Loop, next: &mut dyn Iterator<Item = Option<u32>>) {
        for s in &mut l.body {
            match s {
                Stmt::Loop(inner) => {
                    if let Some(p) = next.next().unwrap() {
                        inner.extent = Dim::Sym(p);
                    }
                    walk(inner, next);
                }
                Stmt::Store { index: ix, .. } => index(ix, next),
                _ => {}
            }
        }
    }
    walk(&mut k.root, &mut next);
    for (e, _) in &mut k.exprs {
        match e {
            Expr::Load { index: ix, .. } | Expr::Index(ix) => index(ix, &mut next),
            Expr::Const(_) => {
                if let Some(p) = next.next().unwrap() {
                    *e = Expr::Param(p);
                }
            }
            _ => {}
        }
    }
    assert!(next.next().is_none(), "parameterise walks what integers() walked");
}

/// A kernel with every integer `integers` lists, and what the runtime decides per call (root
/// extent, parallel or not, work per iteration), blanked: what must be equal at every sample.
fn skeleton(k: &Kernel) -> Kernel {
    let mut k = k.clone();
    k.root.extent = Dim::Const(0);
    k.root.kind = LoopKind::Serial;
    k.work_per_iter = 0;
    if let Some(g) = &mut k.gemm {
        g.shape = g.shape.with_integers(&vec![0; g.shape.integers().len()]);
    }
    fn index(ix: &mut Index) {
        ix.terms.iter_mut().for_each(|t| t.1 = 0);
        ix.offset = 0;
    }
    fn walk(l: &mut Loop) {
        for s in &mut l.body {
            match s {
                Stmt::Loop(inner) => {
                    inner.extent = Dim::Const(0);
                    walk(inner);
                }
                Stmt::Store { index: ix, .. } => index(ix),
                _ => {}
            }
        }
    }
    walk(&mut k.root);
    for (e, _) in &mut k.exprs {
        match e {
            Expr::Load { index: ix, .. } | Expr::Index(ix) => index(ix),
            Expr::Const(s) => *s = Scalar::Int(0),
            _ => {}
        }
    }
    k
}
