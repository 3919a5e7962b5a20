//! Kiln's graph IR: a typed SSA graph of tensor ops, one output per node.
//!
//! The IR is strictly typed: binary ops take operands of one dtype (the frontend inserts casts
//! for PyTorch's type promotion) and broadcast shapes numpy-style. Every builder method checks
//! its operands, so a graph that was built is a graph the compiler accepts.

use crate::dtype::{DType, Scalar};
use std::fmt;
use crate::graph::layout::{is_row_major, row_major, DimOrder};

/// An extent: known at compile time, or a symbol bound from the inputs at run time.
/// Codegen takes only `Const` today; `Sym` is where dynamic shapes plug in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Const(i64),
    Sym(u32),
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Const(n) => write!(f, "{n}"),
            Dim::Sym(s) => write!(f, "s{s}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

impl TensorType {
    pub fn new(dtype: DType, shape: &[i64]) -> Self {
        TensorType { dtype, shape: shape.iter().map(|&n| Dim::Const(n)).collect() }
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    /// The sizes, when every dim is known at compile time.
    pub fn static_shape(&self) -> Option<Vec<i64>> {
        self.shape.iter().map(|d| if let Dim::Const(n) = d { Some(*n) } else { None }).collect()
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    Neg,
    Abs,
    Reciprocal,
    Relu,
    Sigmoid,
    Tanh,
    Exp,
    Log,
    Log1p,
    Sqrt,
    Rsqrt,
    Erf,
    Gelu,
    GeluTanh,
    Silu,
    /// To the nearest integer, ties to even (`torch.round`; the quantized kernels' x86
    /// `cvtps2dq`).
    Round,
    Not,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    /// NaN-propagating maximum/minimum (torch.maximum / torch.minimum).
    Max,
    Min,
    And,
    Or,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
    Min,
}

macro_rules! names {
    ($ty:ty { $($v:ident => $s:literal),* $(,)? }) => {
        impl $ty {
            pub fn name(self) -> &'static str { match self { $(Self::$v => $s),* } }
            pub fn parse(s: &str) -> Option<Self> { match s { $($s => Some(Self::$v),)* _ => None } }
        }
    };
}
names!(UnaryOp { Neg => "neg", Abs => "abs", Reciprocal => "reciprocal", Relu => "relu",
    Sigmoid => "sigmoid", Tanh => "tanh", Exp => "exp", Log => "log", Log1p => "log1p",
    Sqrt => "sqrt", Rsqrt => "rsqrt", Erf => "erf", Gelu => "gelu", GeluTanh => "gelu_tanh",
    Silu => "silu", Round => "round", Not => "not" });
names!(BinaryOp { Add => "add", Sub => "sub", Mul => "mul", Div => "div", Pow => "pow",
    Max => "max", Min => "min", And => "and", Or => "or" });
names!(CmpOp { Eq => "eq", Ne => "ne", Lt => "lt", Le => "le", Gt => "gt", Ge => "ge" });
names!(ReduceOp { Sum => "sum", Mean => "mean", Max => "amax", Min => "amin" });

impl UnaryOp {
    /// Ops defined on floating point only (PyTorch promotes integers first; the frontend casts).
    pub fn float_only(self) -> bool {
        !matches!(self, UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Relu | UnaryOp::Not)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// The graph's i-th input.
    Input(usize),
    /// A 0-d constant.
    Constant(Scalar),
    Unary(UnaryOp),
    Binary(BinaryOp),
    Compare(CmpOp),
    /// where(cond, a, b)
    Where,
    /// Convert to the node's dtype.
    Cast,
    Reduce { op: ReduceOp, dims: Vec<usize>, keepdim: bool },
    Softmax { dim: usize, log: bool },
    /// A view with its dims reordered: output dim i is input dim `dims[i]`. Lowered as index
    /// arithmetic (no copy): it reads its input at permuted coordinates.
    Permute(Vec<usize>),
    /// A view of `len` (the output's size) consecutive elements of dim `dim` from `start`.
    Slice { dim: usize, start: i64 },
    /// A view with the output's shape over the same elements in row-major order (`view`,
    /// `reshape`, `flatten`, `unsqueeze`, ...). Read through the input's strides where
    /// PyTorch's view rule allows; the lowering stores the input first where it does not.
    Reshape,
    /// The input broadcast (right-aligned) to the output's shape.
    Expand,
    /// Matrix product of a[batch…, m, k] and b[batch…, k, n], batch dims broadcast
    /// (right-aligned): torch.matmul for operands of rank ≥ 2. `sparse_b`: how to run it, not
    /// what it computes — B (a weight with zeros) packed in that sparse format
    /// (`kernels::sparse`), a choice the frontend made from the weight's values.
    MatMul { sparse_b: Option<crate::kernels::sparse::SparseFormat> },
    /// Matrix product of a float32 a[m, k] and an int8 weight b[k, n] (held as int32) with
    /// its scales and zero points (float32 / int32, one per tensor or one per column), a
    /// quantized per call as fbgemm's dynamic linear does (`kernels::quantized`): a's range
    /// gives its scale and zero point (7 bits with `reduce_range`), a is rounded to uint8,
    /// the product is exact in int32 and dequantized as float(Σ (a − za)(b − zb)) · (sa·sb).
    /// With a fifth input, a float32 bias b[n], each element is fma(float(Σ …), sa·sb, bias):
    /// `quantized::linear_dynamic` as PyTorch's build of fbgemm computes it (its compiler
    /// contracts the dequantizing multiply and the bias add into one fused multiply-add).
    QuantizedMatMul { reduce_range: bool },
    /// The inputs one after another along `dim` (torch.cat): stored, each input written into
    /// its part of the buffer by a kernel of its own.
    Cat { dim: usize },
    /// Each element's coordinate along `dim`, as int64 (no inputs): the index arithmetic of
    /// masks (a causal mask is `iota(dim -1) > iota(dim -2)`), pointwise like a constant.
    Iota { dim: usize },
    /// A sliding-window view (`Tensor.unfold` with a dilation): dim `dim` becomes the window's
    /// position and a new last dim of `size` the step within it,
    /// `out[…, o, …, j] = in[…, o·step + j·dilation, …]`. Read through its input's strides
    /// (the input is stored where it is not a view of a buffer): pooling windows, and the
    /// windows of a grouped or depthwise convolution.
    Unfold { dim: usize, size: i64, step: i64, dilation: i64 },
    /// 2-d convolution of x[N, C, H, W] (one group), zero-padded by `padding` (top, bottom,
    /// left, right), with a weight given as the matrix w[C·KH·KW, Cout], rows in (c, kh, kw)
    /// order (PyTorch's weight flattened and transposed): `out[n, co, oh, ow] = Σ
    /// xpad[n, c, oh·sh + kh·dh, ow·sw + kw·dw] · w[(c·KH + kh)·KW + kw, co]`. Lowered to the GEMM kernel with x's windows packed as A
    /// (`kernels::gemm::Im2col`); bias and activations are pointwise ops after it, fused into
    /// its epilogue.
    Conv2d { kernel: [i64; 2], stride: [i64; 2], dilation: [i64; 2], padding: [i64; 4] },
    /// Float32 to a uint8 tensor's values (held as float32, `kernels::quantized`): each element
    /// rounded as `quantize_per_tensor` (fbgemm) does, fma(x, 1/scale, zero point) to nearest
    /// even, clamped to 0..=255.
    Quantize(QuantParams),
    /// A statically quantized product (`quantized::linear`, `quantized::conv2d`,
    /// `kernels::quantized`): a holds uint8 values with parameters `a`, b an int8 weight (as
    /// int32) with its scales and zero points (one per tensor or per output channel) and an
    /// optional float32 bias; the int32 sum of (a − za)(b − zb), summed as `sums` says (the
    /// AVX2 kernel's pair saturation, or exactly as VNNI's), requantized to uint8 values with
    /// parameters `out` (and a relu). Without
    /// `conv`: a[m, k] · b[k, n] → [m, n]. With it: x[N, C, H, W] convolved with w[O, C, KH, KW]
    /// (padding with a's zero point), the output channels-last as a matrix [N·OH·OW, O].
    QuantizedProduct { a: QuantParams, out: QuantParams, relu: bool, conv: Option<ConvWindow>, sums: ProductSums },
}

pub use crate::kernels::quantized::{ProductSums, QuantParams};

/// A convolution's window: kernel, stride, dilation and padding (top, bottom, left, right).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvWindow {
    pub kernel: [i64; 2],
    pub stride: [i64; 2],
    pub dilation: [i64; 2],
    pub padding: [i64; 4],
}

impl ConvWindow {
    /// The output's height and width for an input of `h` × `w` (None where the window does not fit).
    pub fn output_size(&self, h: i64, w: i64) -> Option<[i64; 2]> {
        let out = |d: usize, n: i64| {
            let span = self.dilation[d] * (self.kernel[d] - 1) + 1;
            let padded = n + self.padding[2 * d] + self.padding[2 * d + 1];
            (padded >= span).then(|| (padded - span) / self.stride[d] + 1)
        };
        Some([out(0, h)?, out(1, w)?])
    }
}

impl Op {
    /// A short name for messages.
    pub fn name_for_errors(&self) -> &'static str {
        match self {
            Op::Input(_) => "input",
            Op::Constant(_) => "constant",
            Op::Unary(u) => u.name(),
            Op::Binary(b) => b.name(),
            Op::Compare(c) => c.name(),
            Op::Where => "where",
            Op::Cast => "cast",
            Op::Reduce { op, .. } => op.name(),
            Op::Softmax { .. } => "softmax",
            Op::Permute(_) => "permute",
            Op::Slice { .. } => "slice",
            Op::Reshape => "reshape",
            Op::Expand => "expand",
            Op::MatMul { .. } => "matmul",
            Op::QuantizedMatMul { .. } => "qmatmul_dynamic",
            Op::Cat { .. } => "cat",
            Op::Iota { .. } => "iota",
            Op::Unfold { .. } => "unfold",
            Op::Conv2d { .. } => "conv2d",
            Op::Quantize(_) => "quantize",
            Op::QuantizedProduct { conv: None, .. } => "qlinear",
            Op::QuantizedProduct { conv: Some(_), .. } => "qconv2d",
        }
    }

    /// Pointwise ops are inlined into their consumers; the others own a kernel. A permute is
    /// "pointwise" in that sense: its consumers read through it.
    pub fn is_pointwise(&self) -> bool {
        !matches!(self, Op::Reduce { .. } | Op::Softmax { .. } | Op::Input(_) | Op::MatMul { .. } | Op::QuantizedMatMul { .. } | Op::QuantizedProduct { .. } | Op::Cat { .. } | Op::Conv2d { .. })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

impl fmt::Display for ValueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub ty: TensorType,
}

#[derive(thiserror::Error, Debug, Clone, PartialEq)]
#[error("{0}")]
pub struct IrError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, IrError> {
    Err(IrError(msg.into()))
}

/// The graph. Node i defines value %i; inputs are nodes too (`Op::Input`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub inputs: Vec<ValueId>,
    pub outputs: Vec<ValueId>,
    /// The memory layout of each output (see `layout`): what the frontend's user gets back.
    /// Row-major unless the frontend says otherwise.
    pub output_orders: Vec<DimOrder>,
}

/// numpy/PyTorch broadcasting of two shapes, right-aligned.
pub fn broadcast_shapes(a: &[Dim], b: &[Dim]) -> Result<Vec<Dim>, IrError> {
    let rank = a.len().max(b.len());
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let da = if i + a.len() >= rank { a[i + a.len() - rank] } else { Dim::Const(1) };
        let db = if i + b.len() >= rank { b[i + b.len() - rank] } else { Dim::Const(1) };
        out.push(match (da, db) {
            (x, y) if x == y => x,
            (Dim::Const(1), y) => y,
            (x, Dim::Const(1)) => x,
            (x, y) => return err(format!("shapes do not broadcast: {x} vs {y}")),
        });
    }
    Ok(out)
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn ty(&self, v: ValueId) -> &TensorType {
        &self.nodes[v.0 as usize].ty
    }
    pub fn node(&self, v: ValueId) -> &Node {
        &self.nodes[v.0 as usize]
    }

    fn push(&mut self, op: Op, inputs: Vec<ValueId>, ty: TensorType) -> ValueId {
        let id = ValueId(self.nodes.len() as u32);
        self.nodes.push(Node { op, inputs, ty });
        id
    }

    pub fn input(&mut self, ty: TensorType) -> ValueId {
        let id = self.push(Op::Input(self.inputs.len()), vec![], ty);
        self.inputs.push(id);
        id
    }

    pub fn constant(&mut self, value: Scalar, dtype: DType) -> ValueId {
        self.push(Op::Constant(value.cast(dtype)), vec![], TensorType { dtype, shape: vec![] })
    }

    /// The coordinates along `dim` of a tensor of `shape` (int64).
    pub fn iota(&mut self, shape: &[i64], dim: usize) -> Result<ValueId, IrError> {
        if dim >= shape.len() {
            return err(format!("iota: dim {dim} of a {}-d shape", shape.len()));
        }
        Ok(self.push(Op::Iota { dim }, vec![], TensorType::new(DType::I64, shape)))
    }

    pub fn unary(&mut self, op: UnaryOp, x: ValueId) -> Result<ValueId, IrError> {
        let ty = self.ty(x).clone();
        let ok = match op {
            UnaryOp::Not => ty.dtype == DType::Bool,
            _ if op.float_only() => ty.dtype.is_float(),
            _ => ty.dtype != DType::Bool,
        };
        if !ok {
            return err(format!("{} does not take {}", op.name(), ty.dtype));
        }
        Ok(self.push(Op::Unary(op), vec![x], ty))
    }

    fn same_dtype(&self, op: &str, a: ValueId, b: ValueId) -> Result<DType, IrError> {
        let (da, db) = (self.ty(a).dtype, self.ty(b).dtype);
        if da != db {
            return err(format!("{op}: operand dtypes differ ({da} vs {db}); the frontend must cast"));
        }
        Ok(da)
    }

    pub fn binary(&mut self, op: BinaryOp, a: ValueId, b: ValueId) -> Result<ValueId, IrError> {
        let dtype = self.same_dtype(op.name(), a, b)?;
        let ok = match op {
            BinaryOp::Div | BinaryOp::Pow => dtype.is_float(),
            BinaryOp::And | BinaryOp::Or => dtype == DType::Bool,
            _ => dtype != DType::Bool,
        };
        if !ok {
            return err(format!("{} does not take {dtype}", op.name()));
        }
        let shape = broadcast_shapes(&self.ty(a).shape, &self.ty(b).shape)?;
        Ok(self.push(Op::Binary(op), vec![a, b], TensorType { dtype, shape }))
    }

    pub fn compare(&mut self, op: CmpOp, a: ValueId, b: ValueId) -> Result<ValueId, IrError> {
        self.same_dtype(op.name(), a, b)?;
        let shape = broadcast_shapes(&self.ty(a).shape, &self.ty(b).shape)?;
        Ok(self.push(Op::Compare(op), vec![a, b], TensorType { dtype: DType::Bool, shape }))
    }

    pub fn where_(&mut self, cond: ValueId, a: ValueId, b: ValueId) -> Result<ValueId, IrError> {
        if self.ty(cond).dtype != DType::Bool {
            return err("where: condition must be bool");
        }
        let dtype = self.same_dtype("where", a, b)?;
        let shape = broadcast_shapes(&self.ty(a).shape, &self.ty(b).shape)?;
        let shape = broadcast_shapes(&self.ty(cond).shape, &shape)?;
        Ok(self.push(Op::Where, vec![cond, a, b], TensorType { dtype, shape }))
    }

    /// A copy of `x` (a cast to its own dtype): a value of its own where `x` is a view (the
    /// lowering stores it; a view of an input must not be returned as a new tensor).
    pub fn copy(&mut self, x: ValueId) -> ValueId {
        let ty = self.ty(x).clone();
        self.push(Op::Cast, vec![x], ty)
    }

    pub fn cast(&mut self, x: ValueId, dtype: DType) -> ValueId {
        if self.ty(x).dtype == dtype {
            return x;
        }
        let shape = self.ty(x).shape.clone();
        self.push(Op::Cast, vec![x], TensorType { dtype, shape })
    }

    pub fn reduce(&mut self, op: ReduceOp, x: ValueId, dims: &[usize], keepdim: bool) -> Result<ValueId, IrError> {
        let ty = self.ty(x).clone();
        let ok = match op {
            ReduceOp::Mean => ty.dtype.is_float(),
            ReduceOp::Sum => matches!(ty.dtype, DType::F32 | DType::F64 | DType::I64),
            ReduceOp::Max | ReduceOp::Min => ty.dtype != DType::Bool,
        };
        if !ok {
            return err(format!("{} does not take {}", op.name(), ty.dtype));
        }
        let mut dims = dims.to_vec();
        dims.sort_unstable();
        dims.dedup();
        if dims.iter().any(|&d| d >= ty.rank()) {
            return err(format!("{}: dim out of range for rank {}", op.name(), ty.rank()));
        }
        if matches!(op, ReduceOp::Max | ReduceOp::Min) && dims.iter().any(|&d| ty.shape[d] == Dim::Const(0)) {
            return err(format!("{}: reducing an empty dim is an error in PyTorch", op.name()));
        }
        let shape = ty
            .shape
            .iter()
            .enumerate()
            .filter_map(|(i, &d)| match (dims.contains(&i), keepdim) {
                (false, _) => Some(d),
                (true, true) => Some(Dim::Const(1)),
                (true, false) => None,
            })
            .collect();
        Ok(self.push(Op::Reduce { op, dims, keepdim }, vec![x], TensorType { dtype: ty.dtype, shape }))
    }

    pub fn softmax(&mut self, x: ValueId, dim: usize, log: bool) -> Result<ValueId, IrError> {
        let ty = self.ty(x).clone();
        if !ty.dtype.is_float() {
            return err("softmax takes floating point only");
        }
        if dim >= ty.rank().max(1) {
            return err("softmax: dim out of range");
        }
        Ok(self.push(Op::Softmax { dim, log }, vec![x], ty))
    }

    pub fn permute(&mut self, x: ValueId, dims: &[usize]) -> Result<ValueId, IrError> {
        let ty = self.ty(x).clone();
        let mut sorted = dims.to_vec();
        sorted.sort_unstable();
        if sorted != row_major(ty.rank()) {
            return err(format!("permute: {dims:?} is not an order of {} dims", ty.rank()));
        }
        let shape = dims.iter().map(|&d| ty.shape[d]).collect();
        Ok(self.push(Op::Permute(dims.to_vec()), vec![x], TensorType { dtype: ty.dtype, shape }))
    }

    pub fn slice(&mut self, x: ValueId, dim: usize, start: i64, len: i64) -> Result<ValueId, IrError> {
        let ty = self.ty(x).clone();
        let Some(&Dim::Const(n)) = ty.shape.get(dim) else {
            return err(format!("slice: dim {dim} of {ty} is not a known size"));
        };
        if start < 0 || len < 0 || start + len > n {
            return err(format!("slice: [{start}, {}) outside 0..{n}", start + len));
        }
        let mut shape = ty.shape.clone();
        shape[dim] = Dim::Const(len);
        Ok(self.push(Op::Slice { dim, start }, vec![x], TensorType { dtype: ty.dtype, shape }))
    }

    pub fn reshape(&mut self, x: ValueId, shape: &[i64]) -> Result<ValueId, IrError> {
        let ty = self.ty(x).clone();
        let numel = ty.static_shape().map(|s| s.iter().product::<i64>());
        if numel != Some(shape.iter().product::<i64>()) || shape.iter().any(|&d| d < 0) {
            return err(format!("reshape: {ty} has not the elements of {shape:?}"));
        }
        Ok(self.push(Op::Reshape, vec![x], TensorType::new(ty.dtype, shape)))
    }

    pub fn expand(&mut self, x: ValueId, shape: &[i64]) -> Result<ValueId, IrError> {
        let ty = self.ty(x).clone();
        let target: Vec<Dim> = shape.iter().map(|&n| Dim::Const(n)).collect();
        if ty.rank() > shape.len() || broadcast_shapes(&ty.shape, &target)? != target {
            return err(format!("expand: {ty} does not broadcast to {shape:?}"));
        }
        Ok(self.push(Op::Expand, vec![x], TensorType::new(ty.dtype, shape)))
    }

    pub fn cat(&mut self, xs: &[ValueId], dim: usize) -> Result<ValueId, IrError> {
        let first = self.ty(*xs.first().ok_or_else(|| IrError("cat of no tensors".into()))?).clone();
        let mut shape = first.shape.clone();
        if dim >= shape.len() {
            return err("cat: dim out of range");
        }
        let mut total = 0;
        for &x in xs {
            let t = self.ty(x);
            let same = t.dtype == first.dtype && t.rank() == first.rank() && (0..t.rank()).all(|d| d == dim || t.shape[d] == first.shape[d]);
            match (same, t.shape[dim]) {
                (true, Dim::Const(n)) => total += n,
                _ => return err(format!("cat: {t} does not join {first} along dim {dim}")),
            }
        }
        shape[dim] = Dim::Const(total);
        Ok(self.push(Op::Cat { dim }, xs.to_vec(), TensorType { dtype: first.dtype, shape }))
    }

    pub fn matmul(&mut self, a: ValueId, b: ValueId) -> Result<ValueId, IrError> {
        let (ta, tb) = (self.ty(a).clone(), self.ty(b).clone());
        if ta.dtype != tb.dtype || !matches!(ta.dtype, DType::F32 | DType::F64) {
            return err(format!("matmul takes two float32 or float64 operands, not {} and {}", ta.dtype, tb.dtype));
        }
        if ta.rank() < 2 || tb.rank() < 2 {
            return err("matmul operands have rank 2 or more (the frontend reshapes vectors)");
        }
        let (ra, rb) = (ta.rank(), tb.rank());
        if ta.shape[ra - 1] != tb.shape[rb - 2] {
            return err(format!("matmul: {} x {} do not match", ta, tb));
        }
        let mut shape = broadcast_shapes(&ta.shape[..ra - 2], &tb.shape[..rb - 2])?;
        shape.push(ta.shape[ra - 2]);
        shape.push(tb.shape[rb - 1]);
        Ok(self.push(Op::MatMul { sparse_b: None }, vec![a, b], TensorType { dtype: ta.dtype, shape }))
    }

    /// See [`Op::QuantizedMatMul`]: `a` f32 [m, k], `b` i32 [k, n] (int8 values), `scale`
    /// f32 and `zero_point` i32, both [1] or [n]; `bias` f32 [n].
    pub fn qmatmul_dynamic(&mut self, a: ValueId, b: ValueId, scale: ValueId, zero_point: ValueId, bias: Option<ValueId>, reduce_range: bool) -> Result<ValueId, IrError> {
        let (ta, tb, ts, tz) = (self.ty(a).clone(), self.ty(b).clone(), self.ty(scale).clone(), self.ty(zero_point).clone());
        let (Some(sa), Some(sb), Some(ss), Some(sz)) = (ta.static_shape(), tb.static_shape(), ts.static_shape(), tz.static_shape()) else {
            return err("qmatmul_dynamic takes static shapes");
        };
        if ta.dtype != DType::F32 || tb.dtype != DType::I32 || ts.dtype != DType::F32 || tz.dtype != DType::I32 {
            return err(format!("qmatmul_dynamic takes f32, i32, f32, i32, not {}, {}, {}, {}", ta.dtype, tb.dtype, ts.dtype, tz.dtype));
        }
        if sa.len() != 2 || sb.len() != 2 || sa[1] != sb[0] || ss.len() != 1 || ss != sz || !(ss[0] == 1 || ss[0] == sb[1]) {
            return err(format!("qmatmul_dynamic: {ta} x {tb} with scales {ts} and zero points {tz} do not match"));
        }
        if let Some(bias) = bias {
            if self.ty(bias).dtype != DType::F32 || self.ty(bias).static_shape() != Some(vec![sb[1]]) {
                return err(format!("qmatmul_dynamic: a bias {} for {} columns", self.ty(bias), sb[1]));
            }
        }
        Ok(self.push(Op::QuantizedMatMul { reduce_range }, [a, b, scale, zero_point].into_iter().chain(bias).collect(), TensorType::new(DType::F32, &[sa[0], sb[1]])))
    }

    /// See [`Op::Quantize`].
    pub fn quantize(&mut self, x: ValueId, p: QuantParams) -> Result<ValueId, IrError> {
        if self.ty(x).dtype != DType::F32 || !p.is_static() {
            return err(format!("quantize takes float32 to scale > 0 and zero point 0..=255, not {} to {p:?}", self.ty(x)));
        }
        let ty = self.ty(x).clone();
        Ok(self.push(Op::Quantize(p), vec![x], ty))
    }

    /// See [`Op::QuantizedProduct`]: `a` f32 [m, k] (or [N, C, H, W] with `conv`), `b` i32
    /// [k, n] (or [O, C, KH, KW]), `scale` f32 and `zero_point` i32, both [1] or [n]; `bias` f32 [n].
    #[allow(clippy::too_many_arguments)]
    pub fn quantized_product(&mut self, a: ValueId, b: ValueId, scale: ValueId, zero_point: ValueId, bias: Option<ValueId>, pa: QuantParams, out: QuantParams, relu: bool, conv: Option<ConvWindow>, sums: ProductSums) -> Result<ValueId, IrError> {
        let name = if conv.is_some() { "qconv2d" } else { "qlinear" };
        let (ta, tb, ts, tz) = (self.ty(a).clone(), self.ty(b).clone(), self.ty(scale).clone(), self.ty(zero_point).clone());
        let (Some(sa), Some(sb), Some(ss), Some(sz)) = (ta.static_shape(), tb.static_shape(), ts.static_shape(), tz.static_shape()) else {
            return err(format!("{name} takes static shapes"));
        };
        if ta.dtype != DType::F32 || tb.dtype != DType::I32 || ts.dtype != DType::F32 || tz.dtype != DType::I32 {
            return err(format!("{name} takes f32, i32, f32, i32, not {}, {}, {}, {}", ta.dtype, tb.dtype, ts.dtype, tz.dtype));
        }
        if let Some(p) = [pa, out].into_iter().find(|p| !p.is_static()) {
            return err(format!("{name}: quantization parameters {p:?}"));
        }
        let (shape, n) = match conv {
            None if sa.len() == 2 && sb.len() == 2 && sa[1] == sb[0] => (vec![sa[0], sb[1]], sb[1]),
            Some(w) if sa.len() == 4 && sb.len() == 4 && sa[1] == sb[1] && sb[2..] == w.kernel && w.kernel.iter().chain(&w.stride).chain(&w.dilation).all(|&x| x > 0) && w.padding.iter().all(|&x| x >= 0) => {
                let [oh, ow] = w.output_size(sa[2], sa[3]).ok_or_else(|| IrError(format!("qconv2d: the window {w:?} does not fit {ta}")))?;
                (vec![sa[0] * oh * ow, sb[0]], sb[0])
            }
            _ => return err(format!("{name}: {ta} and {tb} do not match")),
        };
        if ss.len() != 1 || ss != sz || !(ss[0] == 1 || ss[0] == n) {
            return err(format!("{name}: scales {ts} and zero points {tz} for {n} columns"));
        }
        if let Some(bias) = bias {
            if self.ty(bias).dtype != DType::F32 || self.ty(bias).static_shape() != Some(vec![n]) {
                return err(format!("{name}: a bias {} for {n} columns", self.ty(bias)));
            }
        }
        let inputs = [a, b, scale, zero_point].into_iter().chain(bias).collect();
        Ok(self.push(Op::QuantizedProduct { a: pa, out, relu, conv, sums }, inputs, TensorType::new(DType::F32, &shape)))
    }

    /// [`matmul`](Self::matmul) over B packed in sparse `format`.
    pub fn matmul_sparse_b(&mut self, a: ValueId, b: ValueId, format: crate::kernels::sparse::SparseFormat) -> Result<ValueId, IrError> {
        if !format.valid() || self.ty(a).dtype != DType::F32 {
            return err(format!("a sparse B is float32 in a format the kernels have, not {format}"));
        }
        let v = self.matmul(a, b)?;
        self.nodes[v.0 as usize].op = Op::MatMul { sparse_b: Some(format) };
        Ok(v)
    }

    /// Windows of `size` elements of dim `dim`, `step` apart, their elements `dilation`
    /// apart (see [`Op::Unfold`]).
    pub fn unfold(&mut self, x: ValueId, dim: usize, size: i64, step: i64, dilation: i64) -> Result<ValueId, IrError> {
        let ty = self.ty(x).clone();
        let Some(&Dim::Const(n)) = ty.shape.get(dim) else {
            return err(format!("unfold: dim {dim} of {ty} is not a known size"));
        };
        let span = dilation * (size - 1) + 1;
        if size < 1 || step < 1 || dilation < 1 || span > n {
            return err(format!("unfold: windows of {size} (step {step}, dilation {dilation}) do not fit {n}"));
        }
        let mut shape = ty.shape.clone();
        shape[dim] = Dim::Const((n - span) / step + 1);
        shape.push(Dim::Const(size));
        Ok(self.push(Op::Unfold { dim, size, step, dilation }, vec![x], TensorType { dtype: ty.dtype, shape }))
    }

    /// See [`Op::Conv2d`]: `x` [N, C, H, W], `w` [C·KH·KW, Cout], `padding` (top, bottom,
    /// left, right).
    pub fn conv2d(&mut self, x: ValueId, w: ValueId, kernel: [i64; 2], stride: [i64; 2], dilation: [i64; 2], padding: [i64; 4]) -> Result<ValueId, IrError> {
        let (tx, tw) = (self.ty(x).clone(), self.ty(w).clone());
        if tx.dtype != DType::F32 || tw.dtype != DType::F32 {
            return err(format!("conv2d takes float32 operands, not {} and {}", tx.dtype, tw.dtype));
        }
        let (Some(xs), Some(ws)) = (tx.static_shape(), tw.static_shape()) else {
            return err("conv2d: operand sizes must be known");
        };
        if xs.len() != 4 || ws.len() != 2 || ws[0] != xs[1] * kernel[0] * kernel[1] {
            return err(format!("conv2d: {tx} and a weight {tw} of {kernel:?} windows do not match"));
        }
        if kernel.iter().chain(&stride).chain(&dilation).any(|&n| n < 1) || padding.iter().any(|&p| p < 0) {
            return err("conv2d: kernel, stride and dilation are positive, padding not negative");
        }
        let out = |d: usize| {
            let span = dilation[d] * (kernel[d] - 1) + 1;
            let len = xs[2 + d] + padding[2 * d] + padding[2 * d + 1];
            (len >= span).then(|| (len - span) / stride[d] + 1)
        };
        let (Some(oh), Some(ow)) = (out(0), out(1)) else {
            return err(format!("conv2d: a {kernel:?} window (dilation {dilation:?}) is larger than {tx}"));
        };
        Ok(self.push(Op::Conv2d { kernel, stride, dilation, padding }, vec![x, w], TensorType::new(DType::F32, &[xs[0], ws[1], oh, ow])))
    }

    /// Sets the outputs, laid out row-major.
    pub fn set_outputs(&mut self, outputs: Vec<ValueId>) {
        self.output_orders = outputs.iter().map(|&v| row_major(self.ty(v).rank())).collect();
        self.outputs = outputs;
    }

    /// Lays output `i` out in `order` (a permutation of its dims).
    pub fn set_output_order(&mut self, i: usize, order: DimOrder) -> Result<(), IrError> {
        let rank = self.ty(self.outputs[i]).rank();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        if sorted != row_major(rank) {
            return err(format!("output {i}: {order:?} is not an order of {rank} dims"));
        }
        self.output_orders[i] = order;
        Ok(())
    }

    /// For each value, the nodes that use it.
    pub fn users(&self) -> Vec<Vec<ValueId>> {
        let mut users = vec![vec![]; self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for &inp in &n.inputs {
                users[inp.0 as usize].push(ValueId(i as u32));
            }
        }
        users
    }
}

// ---------------------------------------------------------------------------------------------
// Text form. One node a line, e.g.
//   graph(%0: f32[4, 4], %1: f32[4]) {
//     %2 = mul(%0, %1) : f32[4, 4]
//     %3 = sum(%2) dims=[1] keepdim=false : f32[4]
//     return (%3, %2 order=[1, 0])
//   }
// An output's order is printed where it is not row-major.

impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("graph(")?;
        for (i, v) in self.inputs.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{v}: {}", self.ty(*v))?;
        }
        f.write_str(") {\n")?;
        for (i, n) in self.nodes.iter().enumerate() {
            let args = n.inputs.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ");
            let head = match &n.op {
                Op::Input(_) => continue,
                Op::Constant(s) => format!("constant({s})"),
                Op::Unary(u) => format!("{}({args})", u.name()),
                Op::Binary(b) => format!("{}({args})", b.name()),
                Op::Compare(c) => format!("{}({args})", c.name()),
                Op::Where => format!("where({args})"),
                Op::Cast => format!("cast({args})"),
                Op::Reduce { op, dims, keepdim } => {
                    format!("{}({args}) dims={dims:?} keepdim={keepdim}", op.name())
                }
                Op::Softmax { dim, log } => {
                    format!("{}({args}) dim={dim}", if *log { "log_softmax" } else { "softmax" })
                }
                Op::Permute(dims) => format!("permute({args}) dims={dims:?}"),
                Op::Slice { dim, start } => format!("slice({args}) dim={dim} start={start}"),
                Op::Reshape => format!("reshape({args})"),
                Op::Expand => format!("expand({args})"),
                Op::MatMul { sparse_b: None } => format!("matmul({args})"),
                Op::MatMul { sparse_b: Some(format) } => format!("matmul({args}) sparse_b={format}"),
                Op::QuantizedMatMul { reduce_range } => format!("qmatmul_dynamic({args}) reduce_range={reduce_range}"),
                Op::Cat { dim } => format!("cat({args}) dim={dim}"),
                Op::Iota { dim } => format!("iota() dim={dim}"),
                Op::Unfold { dim, size, step, dilation } => format!("unfold({args}) dim={dim} size={size} step={step} dilation={dilation}"),
                Op::Conv2d { kernel, stride, dilation, padding } => format!("conv2d({args}) kernel={kernel:?} stride={stride:?} dilation={dilation:?} padding={padding:?}"),
                Op::Quantize(p) => format!("quantize({args}) scale={} zero_point={}", p.scale, p.zero_point),
                Op::QuantizedProduct { a, out, relu, conv, sums } => {
                    let window = conv.map_or(String::new(), |w| format!(" kernel={:?} stride={:?} dilation={:?} padding={:?}", w.kernel, w.stride, w.dilation, w.padding));
                    let name = if conv.is_some() { "qconv2d" } else { "qlinear" };
                    format!("{name}({args}){window} a_scale={} a_zero_point={} scale={} zero_point={} relu={relu} sums={}", a.scale, a.zero_point, out.scale, out.zero_point, sums.name())
                }
            };
            writeln!(f, "  %{i} = {head} : {}", n.ty)?;
        }
        let outs = self
            .outputs
            .iter()
            .zip(&self.output_orders)
            .map(|(v, order)| if is_row_major(order) { v.to_string() } else { format!("{v} order={order:?}") })
            .collect::<Vec<_>>()
            .join(", ");
        writeln!(f, "  return ({outs})")?;
        f.write_str("}\n")
    }
}

/// Parses the text form back. Value numbers in the text are names; they are renumbered.
pub fn parse_graph(text: &str) -> Result<Graph, IrError> {
    let mut g = Graph::new();
    let mut names: std::collections::HashMap<String, ValueId> = Default::default();
    let lookup = |names: &std::collections::HashMap<String, ValueId>, s: &str| {
        names.get(s.trim()).copied().ok_or_else(|| IrError(format!("unknown value {s}")))
    };
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("//"));
    let header = lines.next().ok_or_else(|| IrError("empty graph".into()))?;
    let params = header
        .strip_prefix("graph(")
        .and_then(|h| h.strip_suffix(") {"))
        .ok_or_else(|| IrError(format!("bad header: {header}")))?;
    for p in split_top(params) {
        let (name, ty) = p.split_once(':').ok_or_else(|| IrError(format!("bad input: {p}")))?;
        let v = g.input(parse_type(ty.trim())?);
        names.insert(name.trim().to_string(), v);
    }
    for line in lines {
        if line == "}" {
            break;
        }
        if let Some(rest) = line.strip_prefix("return (") {
            let rest = rest.strip_suffix(')').unwrap_or(rest);
            let outs: Vec<(&str, Option<&str>)> = split_top(rest).into_iter().map(|s| s.split_once(" order=").map_or((s, None), |(v, o)| (v, Some(o)))).collect();
            g.set_outputs(outs.iter().map(|(v, _)| lookup(&names, v)).collect::<Result<_, _>>()?);
            for (i, (_, order)) in outs.iter().enumerate() {
                if let Some(order) = order {
                    let order = order.trim_matches(|c| c == '[' || c == ']');
                    let order = order.split(',').map(|d| d.trim().parse().map_err(|_| IrError(format!("bad order in {line}")))).collect::<Result<_, _>>()?;
                    g.set_output_order(i, order)?;
                }
            }
            continue;
        }
        let (name, rhs) = line.split_once(" = ").ok_or_else(|| IrError(format!("bad line: {line}")))?;
        let (call, ty) = rhs.rsplit_once(" : ").ok_or_else(|| IrError(format!("no type: {line}")))?;
        let ty = parse_type(ty)?;
        let open = call.find('(').ok_or_else(|| IrError(format!("bad call: {call}")))?;
        let close = call.find(')').ok_or_else(|| IrError(format!("bad call: {call}")))?;
        let (opname, args, attrs) = (&call[..open], &call[open + 1..close], call[close + 1..].trim());
        // `key=value`, where a value in brackets may hold spaces (`dims=[0, 2]`).
        let attr = |key: &str| -> Option<&str> {
            let start = attrs.match_indices(&format!("{key}=")).find(|(i, _)| *i == 0 || attrs[..*i].ends_with(' '))?.0 + key.len() + 1;
            let value = &attrs[start..];
            let end = if value.starts_with('[') { value.find(']').map_or(value.len(), |e| e + 1) } else { value.find(' ').unwrap_or(value.len()) };
            Some(&value[..end])
        };
        let ins = || -> Result<Vec<ValueId>, IrError> { split_top(args).iter().map(|s| lookup(&names, s)).collect() };
        let v = if opname == "constant" {
            let s = args.trim();
            let value = match s {
                "true" => Scalar::Bool(true),
                "false" => Scalar::Bool(false),
                _ if ty.dtype.is_float() => Scalar::Float(s.parse().map_err(|_| IrError(format!("bad float {s}")))?),
                _ => Scalar::Int(s.parse().map_err(|_| IrError(format!("bad int {s}")))?),
            };
            g.constant(value, ty.dtype)
        } else if let Some(u) = UnaryOp::parse(opname) {
            g.unary(u, ins()?[0])?
        } else if let Some(b) = BinaryOp::parse(opname) {
            let i = ins()?;
            g.binary(b, i[0], i[1])?
        } else if let Some(c) = CmpOp::parse(opname) {
            let i = ins()?;
            g.compare(c, i[0], i[1])?
        } else if let Some(r) = ReduceOp::parse(opname) {
            let dims = attr("dims").ok_or_else(|| IrError("reduce needs dims=".into()))?;
            let dims = dims.trim_matches(|c| c == '[' || c == ']');
            let dims: Vec<usize> = dims.split(',').filter(|s| !s.trim().is_empty()).map(|s| s.trim().parse().unwrap_or(usize::MAX)).collect();
            g.reduce(r, ins()?[0], &dims, attr("keepdim") == Some("true"))?
        } else {
            match opname {
                "where" => {
                    let i = ins()?;
                    g.where_(i[0], i[1], i[2])?
                }
                "cast" => g.cast(ins()?[0], ty.dtype),
                "softmax" | "log_softmax" => {
                    let dim = attr("dim").and_then(|d| d.parse().ok()).ok_or_else(|| IrError("softmax needs dim=".into()))?;
                    g.softmax(ins()?[0], dim, opname == "log_softmax")?
                }
                "permute" => {
                    let dims = attr("dims").ok_or_else(|| IrError("permute needs dims=".into()))?;
                    let dims = dims.trim_matches(|c| c == '[' || c == ']');
                    let dims: Vec<usize> = dims.split(',').filter(|s| !s.trim().is_empty()).map(|s| s.trim().parse().unwrap_or(usize::MAX)).collect();
                    g.permute(ins()?[0], &dims)?
                }
                "matmul" => {
                    let i = ins()?;
                    match attr("sparse_b") {
                        None => g.matmul(i[0], i[1])?,
                        Some(f) => g.matmul_sparse_b(i[0], i[1], crate::kernels::sparse::SparseFormat::parse(f).ok_or_else(|| IrError(format!("bad sparse_b in {line}")))?)?,
                    }
                }
                "qmatmul_dynamic" => {
                    let i = ins()?;
                    if i.len() < 4 {
                        return Err(IrError(format!("qmatmul_dynamic takes 4 or 5 inputs: {line}")));
                    }
                    g.qmatmul_dynamic(i[0], i[1], i[2], i[3], i.get(4).copied(), attr("reduce_range") == Some("true"))?
                }
                "cat" => {
                    let dim = attr("dim").and_then(|d| d.parse().ok()).ok_or_else(|| IrError("cat needs dim=".into()))?;
                    g.cat(&ins()?, dim)?
                }
                "iota" => {
                    let dim = attr("dim").and_then(|d| d.parse().ok()).ok_or_else(|| IrError("iota needs dim=".into()))?;
                    let shape = ty.static_shape().ok_or_else(|| IrError("iota needs a static result type".into()))?;
                    g.iota(&shape, dim)?
                }
                "slice" => {
                    let num = |k: &str| attr(k).and_then(|d| d.parse().ok()).ok_or_else(|| IrError(format!("slice needs {k}=")));
                    let dim: usize = num("dim")?;
                    let len = match ty.shape.get(dim) {
                        Some(Dim::Const(n)) => *n,
                        _ => return err(format!("slice: bad result type {ty}")),
                    };
                    g.slice(ins()?[0], dim, num("start")? as i64, len)?
                }
                "unfold" => {
                    let num = |k: &str| attr(k).and_then(|d| d.parse::<i64>().ok()).ok_or_else(|| IrError(format!("unfold needs {k}=")));
                    g.unfold(ins()?[0], num("dim")? as usize, num("size")?, num("step")?, num("dilation")?)?
                }
                "quantize" => {
                    let p = quant_params(&attr, "")?;
                    g.quantize(ins()?[0], p)?
                }
                "qlinear" | "qconv2d" => {
                    let i = ins()?;
                    if i.len() < 4 {
                        return Err(IrError(format!("{opname} takes 4 or 5 inputs: {line}")));
                    }
                    let conv = if opname == "qconv2d" { Some(conv_window(&attr, opname)?) } else { None };
                    let (pa, out) = (quant_params(&attr, "a_")?, quant_params(&attr, "")?);
                    let sums = attr("sums").map_or(Some(ProductSums::SaturatedPairs), ProductSums::parse).ok_or_else(|| IrError(format!("{opname}: sums= takes pairs or exact: {line}")))?;
                    g.quantized_product(i[0], i[1], i[2], i[3], i.get(4).copied(), pa, out, attr("relu") == Some("true"), conv, sums)?
                }
                "conv2d" => {
                    let w = conv_window(&attr, opname)?;
                    let i = ins()?;
                    g.conv2d(i[0], i[1], w.kernel, w.stride, w.dilation, w.padding)?
                }
                "reshape" | "expand" => {
                    let shape = ty.static_shape().ok_or_else(|| IrError(format!("{opname} needs a static result type")))?;
                    let x = ins()?[0];
                    if opname == "reshape" { g.reshape(x, &shape)? } else { g.expand(x, &shape)? }
                }
                _ => return err(format!("unknown op {opname}")),
            }
        };
        if *g.ty(v) != ty {
            return err(format!("{line}: inferred type {} differs", g.ty(v)));
        }
        names.insert(name.trim().to_string(), v);
    }
    Ok(g)
}

/// `kernel=`, `stride=`, `dilation=` and `padding=` of a convolution's text.
fn conv_window<'a>(attr: &impl Fn(&str) -> Option<&'a str>, op: &str) -> Result<ConvWindow, IrError> {
    let list = |k: &str| -> Result<Vec<i64>, IrError> {
        let v = attr(k).ok_or_else(|| IrError(format!("{op} needs {k}=")))?;
        Ok(v.trim_matches(|c| c == '[' || c == ']').split(',').map(|s| s.trim().parse().unwrap_or(-1)).collect())
    };
    let pair = |k: &str| -> Result<[i64; 2], IrError> { list(k)?.try_into().map_err(|_| IrError(format!("{op}: {k} is two numbers"))) };
    let padding: [i64; 4] = list("padding")?.try_into().map_err(|_| IrError(format!("{op}: padding is four numbers")))?;
    Ok(ConvWindow { kernel: pair("kernel")?, stride: pair("stride")?, dilation: pair("dilation")?, padding })
}

/// `{prefix}scale=` and `{prefix}zero_point=` of a quantized op's text.
fn quant_params<'a>(attr: &impl Fn(&str) -> Option<&'a str>, prefix: &str) -> Result<QuantParams, IrError> {
    let get = |k: &str| attr(&format!("{prefix}{k}")).ok_or_else(|| IrError(format!("needs {prefix}{k}=")));
    let scale = get("scale")?.parse().map_err(|_| IrError(format!("bad {prefix}scale")))?;
    let zero_point = get("zero_point")?.parse().map_err(|_| IrError(format!("bad {prefix}zero_point")))?;
    Ok(QuantParams { scale, zero_point })
}

fn split_top(s: &str) -> Vec<&str> {
    let mut out = vec![];
    let (mut depth, mut start) = (0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '[' | '(' => depth += 1,
            ']' | ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    if !s[start..].trim().is_empty() {
        out.push(s[start..].trim());
    }
    out
}

fn parse_type(s: &str) -> Result<TensorType, IrError> {
    let open = s.find('[').ok_or_else(|| IrError(format!("bad type {s}")))?;
    let dtype = DType::parse(&s[..open]).ok_or_else(|| IrError(format!("bad dtype in {s}")))?;
    let dims = s[open + 1..].trim_end_matches(']');
    let shape = dims
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| match d.strip_prefix('s') {
            Some(sym) => sym.parse().map(Dim::Sym).map_err(|_| IrError(format!("bad dim {d}"))),
            None => d.parse().map(Dim::Const).map_err(|_| IrError(format!("bad dim {d}"))),
        })
        .collect::<Result<_, _>>()?;
    Ok(TensorType { dtype, shape })
}
