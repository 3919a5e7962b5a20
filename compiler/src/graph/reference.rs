//! A reference interpreter for the graph IR: slow, obvious, element by element. Generated code
//! is checked against it (tests/differential.rs). Each element is held as a `Scalar` and
//! rounded to its node's dtype after every op, so float32 arithmetic is emulated exactly for
//! + - * / (an f64 result rounded once to f32 is the correctly rounded f32 result).

use crate::dtype::{DType, Scalar};
use crate::graph::ir::{BinaryOp, CmpOp, Graph, Op, ReduceOp, UnaryOp};

/// A dense row-major tensor of the interpreter.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub dtype: DType,
    pub sizes: Vec<i64>,
    pub data: Vec<Scalar>,
}

fn numel(sizes: &[i64]) -> usize {
    sizes.iter().product::<i64>().max(0) as usize
}

/// Row-major coordinates of flat index `i`.
fn coords(mut i: usize, sizes: &[i64]) -> Vec<i64> {
    let mut c = vec![0; sizes.len()];
    for d in (0..sizes.len()).rev() {
        let n = sizes[d].max(1) as usize;
        c[d] = (i % n) as i64;
        i /= n;
    }
    c
}

/// The element of `t` at `c` (coordinates of a broadcast shape, right-aligned).
fn at(t: &Tensor, c: &[i64]) -> Scalar {
    let skip = c.len() - t.sizes.len();
    let mut flat = 0i64;
    for (d, &n) in t.sizes.iter().enumerate() {
        let x = if n == 1 { 0 } else { c[d + skip] };
        flat = flat * n + x;
    }
    t.data[flat as usize]
}

fn round(s: Scalar, d: DType) -> Scalar {
    s.cast(d)
}

fn f(s: Scalar) -> f64 {
    s.as_f64()
}

fn int(s: Scalar) -> i64 {
    match s {
        Scalar::Int(i) => i,
        Scalar::Bool(b) => b as i64,
        Scalar::Float(x) => x as i64,
    }
}

fn truth(s: Scalar) -> bool {
    match s {
        Scalar::Bool(b) => b,
        Scalar::Int(i) => i != 0,
        Scalar::Float(x) => x != 0.0,
    }
}

/// NaN-propagating max/min with -0 < +0, like `llvm.maximum`/`llvm.minimum` and torch.
fn fmax(a: f64, b: f64, max: bool) -> f64 {
    if a.is_nan() || b.is_nan() {
        return f64::NAN;
    }
    if a == b {
        // Only ±0 compare equal with different bits.
        return if (a.is_sign_negative() && max) || (!a.is_sign_negative() && !max) { b } else { a };
    }
    if (a > b) == max { a } else { b }
}

fn unary(op: UnaryOp, x: Scalar, d: DType) -> Scalar {
    if !d.is_float() {
        let v = int(x);
        return match op {
            UnaryOp::Neg => Scalar::Int(v.wrapping_neg()),
            UnaryOp::Abs => Scalar::Int(v.wrapping_abs()),
            UnaryOp::Relu => Scalar::Int(v.max(0)),
            UnaryOp::Not => Scalar::Bool(!truth(x)),
            _ => unreachable!("{} on {d}", op.name()),
        };
    }
    let v = f(x);
    let erf = |z: f64| libm_erf(z);
    Scalar::Float(match op {
        UnaryOp::Neg => -v,
        UnaryOp::Abs => v.abs(),
        UnaryOp::Reciprocal => 1.0 / v,
        UnaryOp::Relu => {
            if v < 0.0 {
                0.0
            } else {
                v
            }
        }
        UnaryOp::Sigmoid => 1.0 / (1.0 + (-v).exp()),
        UnaryOp::Tanh => v.tanh(),
        UnaryOp::Exp => v.exp(),
        UnaryOp::Log => v.ln(),
        UnaryOp::Log1p => v.ln_1p(),
        UnaryOp::Sqrt => v.sqrt(),
        UnaryOp::Rsqrt => 1.0 / v.sqrt(),
        UnaryOp::Erf => erf(v),
        // Eager's float32 kernel on an AVX-512 host gives gelu(+inf) = NaN and forms
        // x (1 + erf(x/√2)) in float32 before halving it (inf from x > FLT_MAX/2 on); on
        // other hosts it halves first (see `Math::gelu_f32`). Kiln follows eager.
        UnaryOp::Gelu if d == DType::F32 && *EAGER_AVX512 && v == f64::INFINITY => f64::NAN,
        UnaryOp::Gelu if d == DType::F32 && *EAGER_AVX512 => (v * (1.0 + erf(v / std::f64::consts::SQRT_2))) as f32 as f64 * 0.5,
        UnaryOp::Gelu => 0.5 * v * (1.0 + erf(v / std::f64::consts::SQRT_2)),
        UnaryOp::GeluTanh => 0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh()),
        UnaryOp::Silu => v / (1.0 + (-v).exp()),
        UnaryOp::Round => v.round_ties_even(),
        UnaryOp::Not => unreachable!("not on float"),
    })
}

extern "C" {
    fn erf(x: f64) -> f64;
}

/// `Target::eager_avx512` of the host, which the reference's results are for.
static EAGER_AVX512: once_cell::sync::Lazy<bool> = once_cell::sync::Lazy::new(|| crate::codegen::target::Target::host().eager_avx512());

fn libm_erf(x: f64) -> f64 {
    // SAFETY: libm's erf is a pure function of one double.
    unsafe { erf(x) }
}

fn binary(op: BinaryOp, a: Scalar, b: Scalar, d: DType) -> Scalar {
    match d {
        DType::Bool => {
            let (x, y) = (truth(a), truth(b));
            Scalar::Bool(match op {
                BinaryOp::And => x && y,
                BinaryOp::Or => x || y,
                _ => unreachable!("{} on bool", op.name()),
            })
        }
        DType::I32 | DType::I64 => {
            let (x, y) = (int(a), int(b));
            Scalar::Int(match op {
                BinaryOp::Add => x.wrapping_add(y),
                BinaryOp::Sub => x.wrapping_sub(y),
                BinaryOp::Mul => x.wrapping_mul(y),
                BinaryOp::Max => x.max(y),
                BinaryOp::Min => x.min(y),
                _ => unreachable!("{} on {d}", op.name()),
            })
        }
        DType::F32 | DType::F64 => {
            let (x, y) = (f(a), f(b));
            Scalar::Float(match op {
                BinaryOp::Add => x + y,
                BinaryOp::Sub => x - y,
                BinaryOp::Mul => x * y,
                BinaryOp::Div => x / y,
                BinaryOp::Pow => x.powf(y),
                BinaryOp::Max => fmax(x, y, true),
                BinaryOp::Min => fmax(x, y, false),
                BinaryOp::And | BinaryOp::Or => unreachable!("logical op on float"),
            })
        }
    }
}

fn compare(op: CmpOp, a: Scalar, b: Scalar, d: DType) -> bool {
    fn ordered<T: PartialOrd>(op: CmpOp, x: T, y: T) -> bool {
        match op {
            CmpOp::Eq => x == y,
            CmpOp::Ne => x != y,
            CmpOp::Lt => x < y,
            CmpOp::Le => x <= y,
            CmpOp::Gt => x > y,
            CmpOp::Ge => x >= y,
        }
    }
    if d.is_float() {
        ordered(op, f(a), f(b))
    } else {
        ordered(op, int(a), int(b))
    }
}

fn reduce(x: &Tensor, op: ReduceOp, dims: &[usize], keepdim: bool, out_sizes: &[i64]) -> Vec<Scalar> {
    let d = x.dtype;
    let kept_sizes: Vec<i64> = x.sizes.iter().enumerate().map(|(i, &n)| if dims.contains(&i) { 1 } else { n }).collect();
    let mut acc: Vec<Option<Scalar>> = vec![None; numel(&kept_sizes)];
    for i in 0..numel(&x.sizes) {
        let c = coords(i, &x.sizes);
        let kc: Vec<i64> = c.iter().enumerate().map(|(j, &v)| if dims.contains(&j) { 0 } else { v }).collect();
        let k = kc.iter().zip(&kept_sizes).fold(0i64, |a, (&v, &n)| a * n + v) as usize;
        let v = x.data[i];
        acc[k] = Some(match (acc[k], op) {
            (None, ReduceOp::Sum | ReduceOp::Mean) if d.is_float() => Scalar::Float(f(v)),
            (None, _) => v,
            // f32 sums accumulate in f64 in generated code too.
            (Some(a), ReduceOp::Sum | ReduceOp::Mean) if d.is_float() => Scalar::Float(f(a) + f(v)),
            (Some(a), ReduceOp::Sum | ReduceOp::Mean) => Scalar::Int(int(a).wrapping_add(int(v))),
            (Some(a), ReduceOp::Max) => binary(BinaryOp::Max, a, v, d),
            (Some(a), ReduceOp::Min) => binary(BinaryOp::Min, a, v, d),
        });
    }
    let count: i64 = dims.iter().map(|&i| x.sizes[i]).product();
    let out: Vec<Scalar> = acc
        .into_iter()
        .map(|a| {
            let a = a.unwrap_or(if d.is_float() { Scalar::Float(0.0) } else { Scalar::Int(0) });
            // A mean is its sum rounded to the result's dtype, divided there (eager's
            // sum().div_(n)): a float32 mean of a sum that overflows float32 is inf.
            let a = round(a, d);
            if op == ReduceOp::Mean { round(Scalar::Float(f(a) / round(Scalar::Float(count as f64), d).as_f64()), d) } else { a }
        })
        .collect();
    debug_assert_eq!(out.len(), numel(out_sizes));
    let _ = keepdim;
    out
}

fn softmax(x: &Tensor, dim: usize, log: bool) -> Vec<Scalar> {
    if x.sizes.is_empty() {
        return x.data.iter().map(|&v| round(Scalar::Float(if log { f(v) - f(v) } else { (f(v) - f(v)).exp() }), x.dtype)).collect();
    }
    let mut out = vec![Scalar::Float(0.0); x.data.len()];
    let n = x.sizes[dim];
    let inner: i64 = x.sizes[dim + 1..].iter().product();
    for i in 0..x.data.len() {
        let c = coords(i, &x.sizes);
        if c[dim] != 0 {
            continue;
        }
        let idx = |k: i64| i + (k * inner) as usize;
        let m = (0..n).map(|k| f(x.data[idx(k)])).fold(f64::NEG_INFINITY, |a, b| fmax(a, b, true));
        let s: f64 = (0..n).map(|k| (f(x.data[idx(k)]) - m).exp()).sum();
        for k in 0..n {
            let v = f(x.data[idx(k)]) - m;
            out[idx(k)] = round(Scalar::Float(if log { v - s.ln() } else { v.exp() / s }), x.dtype);
        }
    }
    out
}

/// Each element the exact-as-f64 sum of its products, rounded once to the dtype.
fn matmul(a: &Tensor, b: &Tensor, out_sizes: &[i64]) -> Vec<Scalar> {
    let r = out_sizes.len();
    let k = a.sizes[a.sizes.len() - 1];
    (0..numel(out_sizes))
        .map(|i| {
            let c = coords(i, out_sizes);
            let (batch, row, col) = (&c[..r - 2], c[r - 2], c[r - 1]);
            let at_batch = |t: &Tensor, x: i64, y: i64| {
                // `at` right-aligns: a lower-rank operand broadcasts over the leading batch dims.
                let mut idx = batch.to_vec();
                idx.push(x);
                idx.push(y);
                f(at(t, &idx))
            };
            let sum: f64 = (0..k).map(|p| at_batch(a, row, p) * at_batch(b, p, col)).sum();
            round(Scalar::Float(sum), a.dtype)
        })
        .collect()
}

/// fbgemm's dynamically quantized product (`kernels::quantized`), element by element.
fn qmatmul_dynamic(a: &Tensor, b: &Tensor, scale: &Tensor, zero_point: &Tensor, bias: Option<&Tensor>, reduce_range: bool) -> Vec<Scalar> {
    use crate::kernels::quantized::{choose_activation_params, dequantize, inverse, min_max, quantize};
    let (m, k, n) = (a.sizes[0], a.sizes[1], b.sizes[1]);
    let (lo, hi) = min_max(a.data.iter().map(|x| f(*x) as f32));
    let p = choose_activation_params(lo, hi, reduce_range);
    let qa: Vec<i32> = a.data.iter().map(|x| quantize(f(*x) as f32, inverse(p.scale), p.zero_point as f32) as i32).collect();
    let qb = |p: i64, j: i64| int(b.data[(p * n + j) as usize]) as i32;
    let per = |t: &Tensor, j: i64| t.data[if t.sizes[0] == 1 { 0 } else { j as usize }];
    let mut out = Vec::with_capacity((m * n) as usize);
    for i in 0..m {
        let a_sum = (0..k).map(|p| qa[(i * k + p) as usize]).fold(0i32, i32::wrapping_add);
        for j in 0..n {
            let dot = (0..k).map(|p| qa[(i * k + p) as usize].wrapping_mul(qb(p, j))).fold(0i32, i32::wrapping_add);
            let b_sum = (0..k).map(|p| qb(p, j)).fold(0i32, i32::wrapping_add);
            let v = dequantize(dot, p, a_sum, b_sum, k, f(per(scale, j)) as f32, int(per(zero_point, j)) as i32, bias.map(|t| f(t.data[j as usize]) as f32));
            out.push(Scalar::Float(v as f64));
        }
    }
    out
}

/// A statically quantized product (`kernels::quantized`), element by element: A's uint8
/// values (a convolution's windows in (kh, kw, c) order, the zero point outside the image)
/// against B's int8 ones, summed as `sums` says (pairs saturated to int16, or exactly), the
/// zero points' offsets taken off and the sum requantized.
#[allow(clippy::too_many_arguments)]
fn quantized_product(a: &Tensor, b: &Tensor, scale: &Tensor, zero_point: &Tensor, bias: Option<&Tensor>, pa: crate::kernels::quantized::QuantParams, out: crate::kernels::quantized::QuantParams, relu: bool, conv: Option<crate::graph::ir::ConvWindow>, sums: crate::kernels::quantized::ProductSums, sizes: &[i64]) -> Vec<Scalar> {
    use crate::kernels::quantized::requantize;
    let (rows, n) = (sizes[0], sizes[1]);
    // Row i of A (its k values) and column j of B, in the same k order.
    type Vector<'a> = Box<dyn Fn(i64) -> Vec<i32> + 'a>;
    let (a_row, b_col): (Vector, Vector) = match conv {
        None => {
            let (k, n) = (a.sizes[1], b.sizes[1]);
            (Box::new(move |i| (0..k).map(|p| int(a.data[(i * k + p) as usize]) as i32).collect()), Box::new(move |j| (0..k).map(|p| int(b.data[(p * n + j) as usize]) as i32).collect()))
        }
        Some(w) => {
            let [oh_n, ow_n] = w.output_size(a.sizes[2], a.sizes[3]).expect("checked by the builder");
            let (c_n, [kh_n, kw_n]) = (a.sizes[1], w.kernel);
            let a_row = move |i: i64| {
                let (img, oh, ow) = (i / (oh_n * ow_n), i / ow_n % oh_n, i % ow_n);
                let mut row = vec![];
                for kh in 0..kh_n {
                    for kw in 0..kw_n {
                        let (ih, iw) = (oh * w.stride[0] + kh * w.dilation[0] - w.padding[0], ow * w.stride[1] + kw * w.dilation[1] - w.padding[2]);
                        let inside = ih >= 0 && iw >= 0 && ih < a.sizes[2] && iw < a.sizes[3];
                        row.extend((0..c_n).map(|c| if inside { int(at(a, &[img, c, ih, iw])) as i32 } else { pa.zero_point }));
                    }
                }
                row
            };
            let b_col = move |j: i64| {
                let mut col = vec![];
                for kh in 0..kh_n {
                    for kw in 0..kw_n {
                        col.extend((0..c_n).map(|c| int(at(b, &[j, c, kh, kw])) as i32));
                    }
                }
                col
            };
            (Box::new(a_row), Box::new(b_col))
        }
    };
    let per = |t: &Tensor, j: i64| t.data[if t.sizes[0] == 1 { 0 } else { j as usize }];
    let per_column = scale.sizes[0] != 1;
    let cols: Vec<Vec<i32>> = (0..n).map(b_col).collect();
    let mut data = Vec::with_capacity((rows * n) as usize);
    for i in 0..rows {
        let row = a_row(i);
        let a_sum = row.iter().fold(0i32, |s, x| s.wrapping_add(*x));
        for (j, col) in cols.iter().enumerate() {
            let j = j as i64;
            let zb = int(per(zero_point, j)) as i32;
            let k = row.len() as i32;
            let b_sum = col.iter().fold(0i32, |s, x| s.wrapping_add(*x));
            let dot = sums.dot(row.iter().copied(), col.iter().copied());
            let raw = dot.wrapping_sub(pa.zero_point.wrapping_mul(b_sum.wrapping_sub(zb.wrapping_mul(k)))).wrapping_sub(a_sum.wrapping_mul(zb));
            let q = requantize(raw, bias.map(|t| f(t.data[j as usize]) as f32), pa.scale, f(per(scale, j)) as f32, per_column, out, relu);
            data.push(Scalar::Float(q as f64));
        }
    }
    data
}

/// Each element the exact-as-f64 sum of its window's products, rounded once to float32.
fn conv2d(x: &Tensor, w: &Tensor, kernel: [i64; 2], stride: [i64; 2], dilation: [i64; 2], padding: [i64; 4], out_sizes: &[i64]) -> Vec<Scalar> {
    let channels = x.sizes[1];
    (0..numel(out_sizes))
        .map(|i| {
            let c = coords(i, out_sizes);
            let (n, co, oh, ow) = (c[0], c[1], c[2], c[3]);
            let mut sum = 0.0;
            for ci in 0..channels {
                for kh in 0..kernel[0] {
                    for kw in 0..kernel[1] {
                        let (ih, iw) = (oh * stride[0] + kh * dilation[0] - padding[0], ow * stride[1] + kw * dilation[1] - padding[2]);
                        if ih < 0 || iw < 0 || ih >= x.sizes[2] || iw >= x.sizes[3] {
                            continue;
                        }
                        let xv = f(at(x, &[n, ci, ih, iw]));
                        sum += xv * f(at(w, &[(ci * kernel[0] + kh) * kernel[1] + kw, co]));
                    }
                }
            }
            round(Scalar::Float(sum), x.dtype)
        })
        .collect()
}

/// Evaluates `g` on dense row-major inputs; returns the outputs in order.
pub fn eval(g: &Graph, inputs: &[Tensor]) -> Vec<Tensor> {
    let mut vals: Vec<Tensor> = Vec::with_capacity(g.nodes.len());
    for n in &g.nodes {
        let sizes = n.ty.static_shape().expect("the interpreter takes static shapes");
        let d = n.ty.dtype;
        let arg = |i: usize| &vals[n.inputs[i].0 as usize];
        let pointwise = |f: &dyn Fn(&[i64]) -> Scalar| (0..numel(&sizes)).map(|i| f(&coords(i, &sizes))).collect::<Vec<_>>();
        let data = match &n.op {
            Op::Input(i) => inputs[*i].data.clone(),
            Op::Constant(s) => vec![*s],
            Op::Iota { dim } => pointwise(&|c| Scalar::Int(c[*dim])),
            Op::Unary(u) => pointwise(&|c| round(unary(*u, at(arg(0), c), d), d)),
            Op::Binary(b) => pointwise(&|c| round(binary(*b, at(arg(0), c), at(arg(1), c), d), d)),
            Op::Compare(op) => pointwise(&|c| Scalar::Bool(compare(*op, at(arg(0), c), at(arg(1), c), arg(0).dtype))),
            Op::Where => pointwise(&|c| if truth(at(arg(0), c)) { at(arg(1), c) } else { at(arg(2), c) }),
            Op::Cast => pointwise(&|c| at(arg(0), c).cast(d)),
            Op::Reduce { op, dims, keepdim } => reduce(arg(0), *op, dims, *keepdim, &sizes),
            Op::Softmax { dim, log } => softmax(arg(0), *dim, *log),
            Op::Permute(dims) => pointwise(&|c| {
                let mut src = vec![0; c.len()];
                for (i, &d) in dims.iter().enumerate() {
                    src[d] = c[i];
                }
                at(arg(0), &src)
            }),
            Op::MatMul { .. } => matmul(arg(0), arg(1), &sizes),
            Op::QuantizedMatMul { reduce_range } => qmatmul_dynamic(arg(0), arg(1), arg(2), arg(3), (n.inputs.len() > 4).then(|| arg(4)), *reduce_range),
            Op::Cat { dim } => pointwise(&|c| {
                let mut c = c.to_vec();
                for i in 0..n.inputs.len() {
                    let len = arg(i).sizes[*dim];
                    if c[*dim] < len {
                        return at(arg(i), &c);
                    }
                    c[*dim] -= len;
                }
                unreachable!("a coordinate inside the concatenation")
            }),
            Op::Slice { dim, start } => pointwise(&|c| {
                let mut src = c.to_vec();
                src[*dim] += start;
                at(arg(0), &src)
            }),
            // Dense row-major tensors: the same elements in the same order.
            Op::Reshape => arg(0).data.clone(),
            Op::Expand => pointwise(&|c| at(arg(0), c)),
            Op::Unfold { dim, size: _, step, dilation } => pointwise(&|c| {
                let mut src = c[..c.len() - 1].to_vec();
                src[*dim] = c[*dim] * step + c[c.len() - 1] * dilation;
                at(arg(0), &src)
            }),
            Op::Conv2d { kernel, stride, dilation, padding } => conv2d(arg(0), arg(1), *kernel, *stride, *dilation, *padding, &sizes),
            Op::Quantize(p) => {
                let inv = crate::kernels::quantized::inverse(p.scale);
                pointwise(&|c| Scalar::Float(crate::kernels::quantized::quantize(f(at(arg(0), c)) as f32, inv, p.zero_point as f32) as f64))
            }
            Op::QuantizedProduct { a, out, relu, conv, sums } => quantized_product(arg(0), arg(1), arg(2), arg(3), (n.inputs.len() > 4).then(|| arg(4)), *a, *out, *relu, *conv, *sums, &sizes),
        };
        vals.push(Tensor { dtype: d, sizes, data });
    }
    g.outputs.iter().map(|o| vals[o.0 as usize].clone()).collect()
}
