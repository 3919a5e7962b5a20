//! ATen ops → Kiln IR, with PyTorch's type promotion and argument conventions.
//!
//! TorchScript passes every argument of the chosen overload positionally (defaults included),
//! so an overload is told apart by its argument count and kinds. Anything this file does not
//! recognise, or whose semantics differ from what Kiln computes, is rejected with a reason:
//! the node then stays in TorchScript.

use crate::ts_dump::{Const, Item, Region};
use kiln_compiler::graph::ir::{BinaryOp, CmpOp, ConvWindow, Graph, Op, QuantParams, ReduceOp, UnaryOp};
use kiln_compiler::graph::layout::{contiguous_strides, dense_strides, elementwise_order, elementwise_strides, is_channels_last, is_contiguous, is_non_overlapping_and_dense, order_of};
use kiln_compiler::{DType, Scalar, TensorType, ValueId};
use kiln_compiler::kernels::sparse::WeightFacts;
use kiln_profiler::canonical_strides;
use std::collections::{HashMap, HashSet};

/// A region as Kiln IR, ready to compile.
#[derive(Debug)]
pub struct Lowered {
    pub graph: Graph,
    /// Canonical strides of each tensor input (see `kiln_profiler::canonical_strides`).
    pub input_strides: Vec<Vec<i64>>,
    /// How each constant weight with zeros is multiplied, and why (for `explain()`).
    pub weight_choices: Vec<String>,
}

#[derive(Clone, Debug)]
enum Arg {
    Tensor(ValueId),
    /// A TorchScript float or int computed at run time: a 0-d float64 / int64 input of the
    /// graph (a kernel parameter), promoted as a Python number.
    Number(ValueId),
    Const(Const),
    /// A list of tensors (a cat's argument), with eager's strides of each.
    List(Vec<ValueId>, Vec<Vec<i64>>),
}

type R<T> = Result<T, String>;

mod depthwise_int8;
mod fbgemm;
mod upsample;
mod windows;

/// Lowers a group's region.
pub fn lower(r: &Region) -> R<Lowered> {
    lower_region(r, false)
}

/// Lowers a single node for the "is this supported?" question: a view may be its output
/// there (in a group it is read through, see the pass's `view_used_outside`).
pub fn lower_node(r: &Region) -> R<Lowered> {
    lower_region(r, true)
}

fn lower_region(r: &Region, view_outputs: bool) -> R<Lowered> {
    let mut g = Graph::new();
    let mut input_strides = vec![];
    let mut vals: Vec<Arg> = Vec::with_capacity(r.items.len());
    // Per item, for tensors: the strides eager's result has (size-1 dims included: the layout
    // rule reads them).
    let mut eager: Vec<Option<Vec<i64>>> = Vec::with_capacity(r.items.len());
    // Graph values of the constant weights whose zeros the dump counted.
    let mut weights: HashMap<ValueId, &WeightFacts> = HashMap::new();
    let mut weight_choices = vec![];
    let mut quant: HashMap<ValueId, QuantParams> = HashMap::new();
    let mut explained: HashSet<ValueId> = HashSet::new();
    for (i, item) in r.items.iter().enumerate() {
        let (arg, layout) = match item {
            Item::Input(None) => return Err("input types are not known".into()),
            Item::Input(Some(d)) if d.number => {
                let dtype = d.dtype.clone().map_err(|name| format!("dtype {name} is not supported"))?;
                input_strides.push(vec![]);
                (Arg::Number(g.input(TensorType::new(dtype, &[]))), None)
            }
            // A quantized tensor never enters a group (its values are TorchScript's); asked
            // about one op on one, Kiln answers for the op (`quant_input_placeholder`).
            Item::Input(Some(d)) if view_outputs && d.dtype.as_ref().is_err_and(|n| is_quantized_dtype(n)) => {
                input_strides.push(canonical_strides(&d.sizes, &d.strides));
                let v = g.input(TensorType::new(DType::F32, &d.sizes));
                quant.insert(v, QuantParams { scale: 1.0, zero_point: 0 });
                (Arg::Tensor(v), Some(kiln_guards::guarded_strides(&d.sizes, &d.strides)))
            }
            Item::Input(Some(d)) => {
                let dtype = d.dtype.clone().map_err(|name| format!("dtype {name} is not supported"))?;
                input_strides.push(canonical_strides(&d.sizes, &d.strides));
                // The layout rule reads what the guard checks: size-1 strides too.
                let strides = kiln_guards::guarded_strides(&d.sizes, &d.strides);
                let v = g.input(TensorType::new(dtype, &d.sizes));
                if let Some((_, facts)) = r.weights.iter().find(|(item, f)| *item == i && d.sizes == [f.rows, f.cols]) {
                    weights.insert(v, facts);
                }
                (Arg::Tensor(v), Some(strides))
            }
            Item::Const(c) => (Arg::Const(c.clone()), None),
            Item::List(xs) => {
                let ts = xs.iter().map(|&x| match vals[x] { Arg::Tensor(t) => Ok(t), _ => Err("a list of non-tensors".to_string()) }).collect::<R<Vec<_>>>()?;
                let strides = xs.iter().map(|&x| eager[x].clone().ok_or("a list of non-tensors")).collect::<Result<Vec<_>, _>>()?;
                (Arg::List(ts, strides), None)
            }
            Item::Shape { kind, args } => {
                let arg_vals: Vec<Arg> = args.iter().map(|&a| vals[a].clone()).collect();
                (Arg::Const(shape_value(&g, kind, &arg_vals).map_err(|e| format!("{kind}: {e}"))?), None)
            }
            Item::Node { kind, args, expect } => {
                let arg_vals: Vec<Arg> = args.iter().map(|&a| vals[a].clone()).collect();
                let quantized_in = arg_vals.iter().any(|a| match a {
                    Arg::Tensor(t) => quant.contains_key(t),
                    Arg::List(ts, _) => ts.iter().any(|t| quant.contains_key(t)),
                    _ => false,
                });
                if quantized_in && !QUANTIZED_OPERANDS.contains(&kind.as_str()) {
                    return Err(format!("{kind} of a quantized tensor (Kiln computes quantize_per_tensor, dequantize, the quantized convolutions, linears, adds and cat, relu, max_pool2d, adaptive_avg_pool2d to 1×1 and views on quantized tensors)"));
                }
                let v = Lower { g: &mut g, default_float: &r.default_float, weights: &weights, weight_choices: &mut weight_choices, explained: &mut explained, quant: &mut quant }.node(kind, &arg_vals).map_err(|e| format!("{kind}: {e}"))?;
                if let (true, Some(Arg::Tensor(t))) = (quantized_in && KEEP_PARAMETERS.contains(&kind.as_str()), arg_vals.first()) {
                    if let Some(p) = quant.get(t).copied() {
                        quant.insert(v, p);
                    }
                }
                let ty = g.ty(v);
                if let Some((dtype, sizes)) = expect {
                    // (A quantized value is uint8 values held as float32.)
                    let dtype_same = dtype.as_ref().ok() == Some(&ty.dtype) || (quant.contains_key(&v) && dtype.as_ref().is_err_and(|n| is_quantized_dtype(n)));
                    let same = dtype_same && ty.static_shape().as_deref() == Some(sizes.as_slice());
                    if !same {
                        return Err(format!("{kind}: Kiln infers {ty}, TorchScript recorded {}{sizes:?}", dtype.clone().map(|d| d.to_string()).unwrap_or_else(|n| n)));
                    }
                }
                let shape = ty.static_shape().ok_or_else(|| format!("{kind}: symbolic shape"))?;
                // (A list's tensors are operands too: quantized::cat's layout is its first's.)
                let operand = |t: ValueId, strides: Option<Vec<i64>>| Some(Operand { sizes: g.ty(t).static_shape()?, strides: strides?, dtype: g.ty(t).dtype });
                let operands: Vec<Operand> = args
                    .iter()
                    .flat_map(|&a| match &vals[a] {
                        Arg::Tensor(t) => vec![operand(*t, eager[a].clone())],
                        Arg::List(ts, strides) => ts.iter().zip(strides).map(|(t, s)| operand(*t, Some(s.clone()))).collect(),
                        _ => vec![],
                    })
                    .flatten()
                    .collect();
                let view_of = |x: ValueId| args.iter().find(|&&a| matches!(vals[a], Arg::Tensor(t) if t == x)).and_then(|&a| eager[a].clone());
                let strides = match &g.node(v).op {
                    _ if kind == "aten::contiguous" => contiguous_strides(&shape),
                    // An in-place op's result is the tensor it wrote.
                    _ if in_place_of(kind).is_some() => eager[args[0]].clone().ok_or("an in-place op on a non-tensor")?,
                    // A view: eager's strides of the view over its input's.
                    op if is_view(op) && view_of(g.node(v).inputs[0]).is_some() => view_of_strides(&g, v, &view_of(g.node(v).inputs[0]).unwrap()),
                    // An identity (t of a vector, dropout in eval) is its input.
                    _ if view_of(v).is_some() => view_of(v).unwrap(),
                    _ => sequence_strides(kind, &arg_vals, &shape).unwrap_or_else(|| eager_strides(kind, &shape, ty.dtype, operands, wraps_a_scalar(kind, &arg_vals))),
                };
                (Arg::Tensor(v), Some(strides))
            }
        };
        vals.push(arg);
        eager.push(layout);
    }
    let mut outputs = r
        .outputs
        .iter()
        .map(|&o| match &vals[o] {
            Arg::Tensor(v) => Ok(*v),
            Arg::Const(_) | Arg::Number(_) | Arg::List(..) => Err("an output is a constant, a number or a list".to_string()),
        })
        .collect::<R<Vec<_>>>()?;
    // An output only shape ops read may be a view inside the group (a quantized convolution's
    // channels-last result): a copy of it has its sizes.
    for &i in &r.shape_only {
        if !view_outputs && is_view(&g.node(outputs[i]).op) {
            outputs[i] = g.copy(outputs[i]);
        }
    }
    for (i, o) in outputs.iter().enumerate() {
        // (Where only shape ops read it, the values held as float32 serve: same sizes.)
        if !view_outputs && quant.contains_key(o) && !r.shape_only.contains(&i) {
            return Err("a quantized tensor leaves the group (Kiln's groups take and return float tensors: the op using it stays in TorchScript)".into());
        }
        // (A single view node may be the identity: in a group it is read through.)
        if !view_outputs && (g.inputs.contains(o) || outputs[..i].contains(o)) {
            return Err("an output is an input or another output (nothing to compute)".into());
        }
        if !view_outputs && is_view(&g.node(*o).op) {
            // Eager returns a view sharing its input's memory; a new tensor would not alias.
            return Err("an output is a view (a permute, slice, reshape or expand) of another tensor".into());
        }
    }
    g.set_outputs(outputs);
    for (i, &o) in r.outputs.iter().enumerate() {
        let strides = eager[o].as_ref().expect("outputs are tensors");
        let order = order_of(&g.ty(g.outputs[i]).static_shape().expect("static shapes"), strides);
        g.set_output_order(i, order).map_err(|e| e.0)?;
    }
    Ok(Lowered { graph: g, input_strides, weight_choices })
}

/// The value of integer arithmetic on sizes the pass put in the group (`is_shape_op` in the
/// shim): a constant of the lowering (the guard checks every size it reads).
fn shape_value(g: &Graph, kind: &str, args: &[Arg]) -> R<Const> {
    let sizes = |t: &ValueId| g.ty(*t).static_shape().ok_or_else(|| "a symbolic shape".to_string());
    let int = |a: &Arg| match a {
        Arg::Const(Const::Int(i)) => Ok(*i),
        _ => Err("an argument that is not a known int".to_string()),
    };
    Ok(match (kind, args) {
        ("aten::size", [Arg::Tensor(t)]) => Const::Ints(sizes(t)?),
        ("aten::size", [Arg::Tensor(t), d]) => {
            let s = sizes(t)?;
            Const::Int(s[wrap_dim(int(d)?, s.len())?])
        }
        ("aten::dim", [Arg::Tensor(t)]) => Const::Int(g.ty(*t).rank() as i64),
        // (the guard checks the dtype)
        ("prim::dtype", [Arg::Tensor(t)]) => Const::Int(scalar_type_code(g.ty(*t).dtype) as i64),
        // (A group reads CPU tensors only: the admission check refuses others at run time.)
        ("prim::device", [Arg::Tensor(_)]) => Const::Str("cpu".into()),
        ("aten::__getitem__", [Arg::Const(Const::Ints(xs)), i]) => {
            let i = int(i)?;
            let at = if i < 0 { i + xs.len() as i64 } else { i };
            Const::Int(*xs.get(usize::try_from(at).map_err(|_| "index out of range (eager raises)")?).ok_or("index out of range (eager raises)")?)
        }
        ("prim::ListConstruct", items) => Const::Ints(items.iter().map(int).collect::<R<_>>()?),
        ("prim::ListUnpack", [Arg::Const(Const::Ints(xs)), i, n]) if xs.len() as i64 == int(n)? => Const::Int(xs[int(i)? as usize]),
        ("prim::ListUnpack", _) => return Err("a list of another length than unpacked (eager raises)".into()),
        ("prim::NumToTensor" | "aten::Int", [a]) => Const::Int(int(a)?),
        ("aten::mul", [a, b]) => Const::Int(int(a)?.checked_mul(int(b)?).ok_or("overflow")?),
        ("aten::add", [a, b]) => Const::Int(int(a)?.checked_add(int(b)?).ok_or("overflow")?),
        ("aten::sub", [a, b]) => Const::Int(int(a)?.checked_sub(int(b)?).ok_or("overflow")?),
        ("aten::add" | "aten::sub", [a, b, alpha]) => {
            let b = int(b)?.checked_mul(int(alpha)?).ok_or("overflow")?;
            Const::Int(if kind == "aten::add" { int(a)?.checked_add(b) } else { int(a)?.checked_sub(b) }.ok_or("overflow")?)
        }
        ("aten::floordiv" | "aten::floor_divide", [a, b]) => {
            let (a, b) = (int(a)?, int(b)?);
            if b == 0 {
                return Err("division by zero (eager raises)".into());
            }
            // Python's floor division.
            let q = a / b;
            Const::Int(if a % b != 0 && (a < 0) != (b < 0) { q - 1 } else { q })
        }
        _ => return Err("this overload is not supported".into()),
    })
}

fn is_view(op: &Op) -> bool {
    kiln_compiler::lower::views::is_view(op)
}

impl Lower<'_> {
    /// `v` as a tensor of its own where it is a view (of values an op computed on the way:
    /// the op's result in eager is a new tensor).
    fn fresh(&mut self, v: ValueId) -> ValueId {
        if is_view(&self.g.node(v).op) { self.g.copy(v) } else { v }
    }
}

/// Eager's strides of view `v` (of the graph) over an input with eager strides `input`: a
/// permute permutes them, a slice keeps them, an expand sets broadcast dims to 0, a reshape
/// is a view where PyTorch's rule allows and else a contiguous copy (`reshape` copies).
fn view_of_strides(g: &Graph, v: ValueId, input: &[i64]) -> Vec<i64> {
    let n = g.node(v);
    let from = g.ty(n.inputs[0]).static_shape().unwrap_or_default();
    let to = n.ty.static_shape().unwrap_or_default();
    match &n.op {
        Op::Permute(dims) => dims.iter().map(|&d| input[d]).collect(),
        Op::Slice { .. } => input.to_vec(),
        Op::Expand => {
            let skip = to.len() - from.len();
            (0..to.len()).map(|d| if d < skip || from[d - skip] != to[d] { 0 } else { input[d - skip] }).collect()
        }
        _ => kiln_compiler::graph::layout::view_strides(&from, input, &to).unwrap_or_else(|| contiguous_strides(&to)),
    }
}

/// A tensor argument of an ATen op as its layout rule sees it: eager's strides.
struct Operand {
    sizes: Vec<i64>,
    strides: Vec<i64>,
    dtype: DType,
}

/// The strides eager gives the result of `to(dtype)` of `x`: a dense input's own, else ordered
/// as TensorIterator would (`infer_dense_strides`, without a fast set-up).
fn converted_strides(x: &Operand) -> Vec<i64> {
    if is_non_overlapping_and_dense(&x.sizes, &x.strides) {
        return x.strides.clone();
    }
    dense_strides(&x.sizes, &elementwise_order(&x.sizes, &[(&x.sizes, &x.strides)]))
}

/// The strides eager gives the result (of `shape` and `dtype`) of ATen op `kind` over its
/// tensor `operands`, in argument order (see `kiln_compiler::graph::layout`). Reductions and softmax
/// allocate contiguous results (ATen's `resize_reduction`, `_softmax` meta); `to` / `type_as`
/// are [`converted_strides`]. Every other op Kiln takes is a TensorIterator op over its tensor
/// arguments in order (`rsub(x, y)` is `sub(y, x)`; `where` converts its values to the
/// result's dtype first), with `wrapped_scalar` when a Python number is among them.
fn eager_strides(kind: &str, shape: &[i64], dtype: DType, mut operands: Vec<Operand>, wrapped_scalar: bool) -> Vec<i64> {
    match kind {
        "aten::sum" | "aten::mean" | "aten::amax" | "aten::amin" | "aten::softmax" | "aten::log_softmax" => return contiguous_strides(shape),
        // Products are computed into new contiguous tensors (mm, bmm, and matmul folding its
        // batch dims; `Lower::matmul` refuses the rank combinations eager transposes).
        "aten::linear" | "aten::matmul" | "aten::mm" | "aten::bmm" | "aten::addmm" | "aten::baddbmm" | "aten::scaled_dot_product_attention"
        | "aten::_native_multi_head_attention" | "kiln::linear_dynamic" => return contiguous_strides(shape),
        "kiln::gru_cell_dynamic" | "kiln::lstm_cell_dynamic" | "kiln::linear_quantized" => return contiguous_strides(shape),
        // (A batch-first output is a transpose of the [T, B, H] result: `sequence_strides`,
        // asked first.)
        "kiln::lstm_dynamic" | "kiln::gru_dynamic" | "aten::lstm" | "aten::gru" => return contiguous_strides(shape),
        // fbgemm's quantized convolution computes channels-last.
        "kiln::conv2d_quantized" => return dense_strides(shape, &[0, 2, 3, 1]),
        "aten::layer_norm" | "aten::_transformer_encoder_layer_fwd" | "aten::contiguous" | "aten::cat" | "aten::gru_cell" | "aten::lstm_cell" | "aten::stack" | "aten::zeros" | "aten::ones"
        // (masked_fill clones its broadcast input contiguous, then fills it.)
        | "aten::masked_fill" => {
            return contiguous_strides(shape)
        }

        "aten::to" | "aten::type_as" | "aten::zeros_like" | "aten::ones_like" => return converted_strides(&operands[0]),
        // `empty_like(input, input.suggest_memory_format())`, and a pool's output in the
        // input's memory format.
        "aten::batch_norm" | "aten::adaptive_avg_pool2d" | "aten::constant_pad_nd" | "aten::pad" | "aten::channel_shuffle" | "aten::native_channel_shuffle" | "quantized::cat"
        | "aten::max_pool2d" | "aten::avg_pool2d" | "aten::adaptive_max_pool2d" | "aten::upsample_nearest2d" | "aten::upsample_bilinear2d" => {
            let x = &operands[0];
            return if shape.len() == 4 && is_channels_last(&x.sizes, &x.strides) && !is_contiguous(&x.sizes, &x.strides) {
                dense_strides(shape, &[0, 2, 3, 1])
            } else {
                contiguous_strides(shape)
            };
        }
        // A convolution's output is channels-last where its input or its weight is (ATen's
        // `mkldnn_conv_use_channels_last` / `thnn_conv_use_channels_last`).
        "aten::conv2d" | "aten::conv1d" | "aten::convolution" | "aten::_convolution" => {
            let cl = |x: &Operand| x.sizes.len() == 4 && is_channels_last(&x.sizes, &x.strides) && !is_contiguous(&x.sizes, &x.strides);
            return if shape.len() == 4 && operands.iter().take(2).any(cl) { dense_strides(shape, &[0, 2, 3, 1]) } else { contiguous_strides(shape) };
        }
        "aten::rsub" => operands.reverse(),
        "aten::where" => {
            for x in operands.iter_mut().skip(1).filter(|x| x.dtype != dtype) {
                x.strides = converted_strides(x);
            }
        }
        _ => {}
    }
    let ops: Vec<(&[i64], &[i64])> = operands.iter().map(|x| (x.sizes.as_slice(), x.strides.as_slice())).collect();
    elementwise_strides(shape, &ops, wrapped_scalar)
}

/// Whether eager hands `kind` a Python number among the operands of its TensorIterator, as a
/// 0-dim tensor (`wrapped_scalar_tensor`): binary arithmetic, comparisons and `where` do;
/// `clamp`, `pow`, `leaky_relu` and the like take numbers as parameters of a unary op.
fn wraps_a_scalar(kind: &str, args: &[Arg]) -> bool {
    let operands = match kind {
        "aten::add" | "aten::sub" | "aten::rsub" | "aten::mul" | "aten::div" | "aten::true_divide" | "aten::eq" | "aten::ne" | "aten::lt"
        | "aten::le" | "aten::gt" | "aten::ge" => &args[..args.len().min(2)],
        "aten::where" => &args[1.min(args.len())..],
        _ => return false,
    };
    operands.iter().any(|a| matches!(a, Arg::Const(Const::Int(_) | Const::Float(_) | Const::Bool(_)) | Arg::Number(_)))
}

/// The weights of an RNN cell's projection: float32 (weight, bias), or an unpacked int8 weight
/// (weight, scales, zero points, bias: `kiln::gru_cell_dynamic`, `kiln::lstm_cell_dynamic`).
#[derive(Clone, Copy)]
enum Projection<'a> {
    Float(&'a Arg, &'a Arg),
    /// (and reduce_range)
    Quantized([&'a Arg; 4], bool),
}

/// A whole-sequence RNN's layout: its layers, directions, batch_first, and how its cells'
/// weights are given.
#[derive(Clone, Copy)]
struct Sequence {
    layers: i64,
    bidirectional: bool,
    batch_first: bool,
    weights: CellWeights,
}

/// Per cell, in the op's weight list: float32 `aten::lstm` / `gru`'s w_ih, w_hh (then b_ih,
/// b_hh with biases), or the unpacked int8 projections' [w, scale, zero point, bias] of ih,
/// then of hh (with the cells' reduce_range).
#[derive(Clone, Copy, PartialEq)]
enum CellWeights {
    Float { biases: bool },
    Quantized { reduce_range: bool },
}

impl CellWeights {
    fn per_cell(self) -> usize {
        match self {
            CellWeights::Float { biases } => if biases { 4 } else { 2 },
            CellWeights::Quantized { .. } => 8,
        }
    }
}

/// The recurrence of a whole-sequence RNN op.
#[derive(Clone, Copy, PartialEq)]
enum Recurrence {
    Lstm,
    Gru,
}

/// The most cell steps (sequence length × layers × directions) a group unrolls: each is a
/// product of its own (the state's activation range is the step's) and a fused gate kernel.
const MAX_UNROLLED_STEPS: i64 = 1024;

/// Eager's strides of output `index` of a whole-sequence RNN (shape `shape`): with
/// batch_first, the output is ATen's [T, B, H] result transposed (a view: dims 1, 0, 2 in
/// memory order); the rest are contiguous.
fn sequence_strides(kind: &str, args: &[Arg], shape: &[i64]) -> Option<Vec<i64>> {
    let batch_first = match kind {
        "kiln::lstm_dynamic" | "kiln::gru_dynamic" => 5,
        "aten::lstm" | "aten::gru" => 8,
        _ => return None,
    };
    let (Some(Arg::Const(Const::Bool(true))), Some(Arg::Const(Const::Int(0)))) = (args.get(batch_first), args.get(args.len().wrapping_sub(2))) else { return None };
    (shape.len() == 3).then(|| dense_strides(shape, &[1, 0, 2]))
}

/// The ops `Lower::node` knows, for regions whose types are not known until they run.
pub const KINDS: &[&str] = &[
    "aten::add", "aten::sub", "aten::rsub", "aten::mul", "aten::div", "aten::true_divide", "aten::maximum",
    "aten::minimum", "aten::pow", "aten::neg", "aten::abs", "aten::relu", "aten::reciprocal", "aten::sigmoid",
    "aten::tanh", "aten::exp", "aten::log", "aten::log1p", "aten::sqrt", "aten::rsqrt", "aten::erf", "aten::silu",
    "aten::round", "aten::gelu", "aten::leaky_relu", "aten::clamp", "aten::clamp_min", "aten::clamp_max", "aten::where",
    "aten::eq", "aten::ne", "aten::lt", "aten::le", "aten::gt", "aten::ge", "aten::logical_not", "aten::to",
    "aten::type_as", "aten::sum", "aten::mean", "aten::amax", "aten::amin", "aten::softmax", "aten::log_softmax",
    "aten::linear", "aten::matmul", "aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::t", "aten::transpose", "aten::permute",
    "aten::view", "aten::reshape", "aten::flatten", "aten::unflatten", "aten::unsqueeze", "aten::squeeze", "aten::contiguous",
    "aten::select", "aten::slice", "aten::narrow", "aten::expand", "aten::dropout", "aten::layer_norm",
    "aten::_transformer_encoder_layer_fwd", "aten::cat", "aten::stack", "aten::gru_cell", "aten::lstm_cell", "aten::zeros", "aten::ones",
    "aten::lstm", "aten::gru",
    // A part of a split (the pass dumps a ListUnpack of one, or a ConstantChunk, as its parts).
    "aten::chunk", "aten::unsafe_chunk", "aten::split", "aten::unsafe_split", "aten::split_with_sizes",
    "aten::unsafe_split_with_sizes", "aten::masked_fill", "aten::triu", "aten::tril", "aten::scaled_dot_product_attention",
    "aten::_native_multi_head_attention", "aten::zeros_like", "aten::ones_like",
    "aten::hardswish", "aten::hardsigmoid", "aten::hardtanh", "aten::relu6", "aten::mish",
    "aten::batch_norm", "aten::adaptive_avg_pool2d", "aten::constant_pad_nd", "aten::pad",
    "aten::channel_shuffle", "aten::native_channel_shuffle", "aten::max_pool2d", "aten::avg_pool2d",
    "aten::conv2d", "aten::conv1d", "aten::convolution", "aten::_convolution",
    "aten::adaptive_max_pool2d", "aten::upsample_nearest2d", "aten::upsample_bilinear2d",
    // quantized::linear_dynamic and the quantized RNN cells with their packed weights
    // unpacked by the pass.
    "kiln::linear_dynamic", "kiln::gru_cell_dynamic", "kiln::lstm_cell_dynamic",
    // ... and the whole-sequence aten::quantized_lstm / quantized_gru.
    "kiln::lstm_dynamic", "kiln::gru_dynamic",
    // Static quantization: quantized::linear(_relu) and conv2d(_relu) unpacked by the pass,
    // and the ops on quantized tensors Kiln computes.
    "kiln::linear_quantized", "kiln::conv2d_quantized", "aten::quantize_per_tensor", "aten::dequantize", "quantized::add", "quantized::add_relu",
    "quantized::cat",
];

/// The ops Kiln computes on a statically quantized tensor: those making or reading one, and
/// the ones whose result has its input's parameters (PyTorch's max pooling and views of a
/// quantized tensor keep its scale and zero point; the 1×1 average pool too).
const QUANTIZED_OPERANDS: &[&str] = &[
    "aten::dequantize", "quantized::add", "quantized::add_relu", "quantized::cat", "kiln::linear_quantized", "kiln::conv2d_quantized", "aten::max_pool2d",
    "aten::adaptive_avg_pool2d", "aten::flatten", "aten::view", "aten::reshape", "aten::contiguous", "aten::relu",
];

/// Of those, the ops whose result is computed as for a float tensor and has its input's
/// parameters (max pooling and views of a quantized tensor: ATen's keep its scale and zero
/// point).
const KEEP_PARAMETERS: &[&str] = &["aten::max_pool2d", "aten::flatten", "aten::view", "aten::reshape", "aten::contiguous"];

/// The dtype names (`ts_dump`: those Kiln has no dtype for) of quantized tensors.
fn is_quantized_dtype(name: &str) -> bool {
    ["QUInt8", "QInt8", "QInt32"].iter().any(|q| name.ends_with(q))
}

/// The ops whose in-place form (`aten::add_`...) Kiln computes as the op itself, where the
/// pass found that nothing else reads what it writes (`writes_unobserved` in the shim).
const IN_PLACE: &[&str] = &[
    "aten::add", "aten::sub", "aten::mul", "aten::div", "aten::true_divide", "aten::neg", "aten::abs", "aten::relu",
    "aten::reciprocal", "aten::sigmoid", "aten::tanh", "aten::exp", "aten::log", "aten::log1p", "aten::sqrt",
    "aten::rsqrt", "aten::erf", "aten::silu", "aten::gelu", "aten::leaky_relu", "aten::clamp", "aten::clamp_min",
    "aten::clamp_max", "aten::pow", "aten::masked_fill", "aten::triu", "aten::tril",
    "aten::hardswish", "aten::hardsigmoid", "aten::hardtanh", "aten::relu6", "aten::mish",
];

/// The functional op of an in-place one Kiln computes (`aten::add_` → `aten::add`).
fn in_place_of(kind: &str) -> Option<&str> {
    kind.strip_suffix('_').filter(|f| IN_PLACE.contains(f))
}

/// Whether Kiln lowers some overload of the op `kind`.
pub fn is_known(kind: &str) -> bool {
    KINDS.contains(&kind) || in_place_of(kind).is_some()
}

fn category(d: DType) -> u8 {
    match d {
        DType::Bool => 0,
        DType::I32 | DType::I64 => 1,
        DType::F32 | DType::F64 => 2,
    }
}

/// torch.promote_types on the dtypes Kiln knows.
pub fn promote(a: DType, b: DType) -> DType {
    match category(a).cmp(&category(b)) {
        std::cmp::Ordering::Less => b,
        std::cmp::Ordering::Greater => a,
        std::cmp::Ordering::Equal => a.max(b),
    }
}

/// PyTorch's `combine_categories`: the higher-priority kind of operand wins unless a
/// lower-priority one is of a higher category.
fn combine(higher: Option<DType>, lower: Option<DType>) -> Option<DType> {
    match (higher, lower) {
        (None, l) => l,
        (h, None) => h,
        (Some(h), Some(_)) if h.is_float() => Some(h),
        (Some(h), Some(l)) if h == DType::Bool || l.is_float() => Some(promote(h, l)),
        (h, _) => h,
    }
}

/// The arguments of `_transformer_encoder_layer_fwd`: (weight, bias) pairs and flags.
struct EncoderLayer<'a> {
    heads: i64,
    embed: i64,
    qkv: (&'a Arg, &'a Arg),
    proj: (&'a Arg, &'a Arg),
    norm1: (&'a Arg, &'a Arg),
    norm2: (&'a Arg, &'a Arg),
    ffn1: (&'a Arg, &'a Arg),
    ffn2: (&'a Arg, &'a Arg),
    gelu: bool,
    norm_first: bool,
    eps: f64,
}

struct Lower<'a> {
    g: &'a mut Graph,
    /// `torch.get_default_dtype()` for this call (the region's `default_float`).
    default_float: &'a Result<DType, String>,
    /// The constant weights' zeros (`kernels::sparse`), by graph value.
    weights: &'a HashMap<ValueId, &'a WeightFacts>,
    weight_choices: &'a mut Vec<String>,
    /// The int8 weights `weight_choices` explains already.
    explained: &'a mut HashSet<ValueId>,
    /// The statically quantized values the group computes (uint8 values held as float32,
    /// `kernels::quantized`): their scale and zero point.
    quant: &'a mut HashMap<ValueId, QuantParams>,
}

impl Lower<'_> {
    /// The dtype integer → float promotion and float scalars give.
    fn default_float(&self) -> R<DType> {
        self.default_float.clone().map_err(|name| format!("the default dtype {name} is not supported"))
    }

    fn tensor(&self, a: &Arg) -> R<ValueId> {
        match a {
            Arg::Tensor(v) => Ok(*v),
            Arg::Const(c) => Err(format!("expected a tensor, got constant {c:?}")),
            Arg::Number(_) => Err("expected a tensor, got a number".into()),
            Arg::List(..) => Err("expected a tensor, got a list".into()),
        }
    }

    /// at::result_type over tensors and scalar constants (None arguments are skipped).
    fn result_type(&self, args: &[&Arg]) -> R<DType> {
        let (mut dim, mut zero, mut wrapped) = (None, None, None);
        let up = |slot: &mut Option<DType>, d: DType| *slot = Some(slot.map_or(d, |s| promote(s, d)));
        // A float scalar gives the default dtype only where no tensor is float.
        let float_tensor = args.iter().any(|a| matches!(a, Arg::Tensor(v) if self.g.ty(*v).dtype.is_float()));
        for a in args {
            match a {
                Arg::Tensor(v) if self.g.ty(*v).rank() > 0 => up(&mut dim, self.g.ty(*v).dtype),
                Arg::Tensor(v) => up(&mut zero, self.g.ty(*v).dtype),
                Arg::Const(Const::Bool(_)) => up(&mut wrapped, DType::Bool),
                Arg::Const(Const::Int(_)) => up(&mut wrapped, DType::I64),
                Arg::Number(v) if self.g.ty(*v).dtype == DType::I64 => up(&mut wrapped, DType::I64),
                Arg::Number(_) if float_tensor => up(&mut wrapped, DType::F32),
                Arg::Number(_) => up(&mut wrapped, self.default_float()?),
                Arg::Const(Const::Float(_)) if float_tensor => up(&mut wrapped, DType::F32),
                Arg::Const(Const::Float(_)) => up(&mut wrapped, self.default_float()?),
                Arg::Const(Const::None) => {}
                Arg::Const(c) => return Err(format!("unexpected argument {c:?}")),
                Arg::List(..) => return Err("unexpected list argument".into()),
            }
        }
        combine(dim, combine(zero, wrapped)).ok_or_else(|| "no tensor operand".to_string())
    }

    /// The argument as a value of `dtype`: a cast tensor or a constant.
    fn value(&mut self, a: &Arg, dtype: DType) -> R<ValueId> {
        Ok(match a {
            Arg::Tensor(v) => self.g.cast(*v, dtype),
            Arg::List(..) => return Err("a list where a tensor or number was expected".into()),
            Arg::Number(v) => {
                // As PyTorch converts a Python number to the computation's dtype; a float into
                // an integer computation is an error there.
                if self.g.ty(*v).dtype.is_float() && !dtype.is_float() {
                    return Err(format!("float number with {dtype} result"));
                }
                self.g.cast(*v, dtype)
            }
            Arg::Const(c) => {
                let s = scalar(c)?;
                // PyTorch converts the scalar to the computation's dtype; an out-of-range
                // integer would wrap there and in Kiln alike, a float into an int is an error.
                if matches!(s, Scalar::Float(_)) && !dtype.is_float() {
                    return Err(format!("float scalar with {dtype} result"));
                }
                self.g.constant(s, dtype)
            }
        })
    }

    fn unary_float(&mut self, op: UnaryOp, x: &Arg) -> R<ValueId> {
        let x = self.tensor(x)?;
        let d = self.g.ty(x).dtype;
        let d = if d.is_float() { d } else { self.default_float()? };
        let x = self.g.cast(x, d);
        Ok(self.g.unary(op, x).map_err(|e| e.0)?)
    }

    fn binary(&mut self, op: BinaryOp, a: &Arg, b: &Arg) -> R<ValueId> {
        let d = self.result_type(&[a, b])?;
        let (x, y) = (self.value(a, d)?, self.value(b, d)?);
        let op = match (op, d) {
            (BinaryOp::Add, DType::Bool) => BinaryOp::Or,
            (BinaryOp::Mul, DType::Bool) => BinaryOp::And,
            (op, _) => op,
        };
        Ok(self.g.binary(op, x, y).map_err(|e| e.0)?)
    }

    /// add/sub with alpha: a op (b * alpha). On bools PyTorch's add is `or` and mul `and`.
    fn add_sub(&mut self, op: BinaryOp, a: &Arg, b: &Arg, alpha: &Arg) -> R<ValueId> {
        let alpha = match alpha {
            Arg::Const(c) => scalar(c)?,
            _ => return Err("alpha is not a constant".into()),
        };
        if alpha.as_f64() == 1.0 {
            return self.binary(op, a, b);
        }
        let d = self.result_type(&[a, b])?;
        if matches!(alpha, Scalar::Float(_)) && !d.is_float() {
            return Err(format!("alpha {alpha} with {d} operands"));
        }
        let (x, y) = (self.value(a, d)?, self.value(b, d)?);
        let k = self.g.constant(alpha, d);
        let (mul, op) = if d == DType::Bool { (BinaryOp::And, BinaryOp::Or) } else { (BinaryOp::Mul, op) };
        let y = self.g.binary(mul, y, k).map_err(|e| e.0)?;
        Ok(self.g.binary(op, x, y).map_err(|e| e.0)?)
    }

    fn true_div(&mut self, a: &Arg, b: &Arg) -> R<ValueId> {
        let d = self.result_type(&[a, b])?;
        let d = if d.is_float() { d } else { self.default_float()? };
        let (x, y) = (self.value(a, d)?, self.value(b, d)?);
        Ok(self.g.binary(BinaryOp::Div, x, y).map_err(|e| e.0)?)
    }

    fn compare(&mut self, op: CmpOp, a: &Arg, b: &Arg) -> R<ValueId> {
        let d = self.result_type(&[a, b])?;
        let (x, y) = (self.value(a, d)?, self.value(b, d)?);
        Ok(self.g.compare(op, x, y).map_err(|e| e.0)?)
    }

    fn clamp(&mut self, x: &Arg, lo: &Arg, hi: &Arg) -> R<ValueId> {
        let is_none = |a: &Arg| matches!(a, Arg::Const(Const::None));
        if is_none(lo) && is_none(hi) {
            return Err("clamp needs min or max".into());
        }
        let d = self.result_type(&[x, lo, hi])?;
        if d == DType::Bool {
            return Err("clamp on bool".into());
        }
        let mut v = self.value(x, d)?;
        if !is_none(lo) {
            let l = self.value(lo, d)?;
            v = self.g.binary(BinaryOp::Max, v, l).map_err(|e| e.0)?;
        }
        if !is_none(hi) {
            let h = self.value(hi, d)?;
            v = self.g.binary(BinaryOp::Min, v, h).map_err(|e| e.0)?;
        }
        Ok(v)
    }

    /// min(max(x + 3, 0), 6): the gate of hardsigmoid and hardswish.
    fn relu6_of_x_plus_3(&mut self, v: ValueId) -> R<ValueId> {
        let d = self.g.ty(v).dtype;
        let [three, zero, six] = [3, 0, 6].map(|n| self.g.constant(Scalar::Int(n), d));
        let s = self.g.binary(BinaryOp::Add, v, three).map_err(|e| e.0)?;
        let s = self.g.binary(BinaryOp::Max, s, zero).map_err(|e| e.0)?;
        Ok(self.g.binary(BinaryOp::Min, s, six).map_err(|e| e.0)?)
    }

    fn dims(&self, x: ValueId, dim: &Arg) -> R<Vec<usize>> {
        let rank = self.g.ty(x).rank();
        let all: Vec<usize> = (0..rank).collect();
        match dim {
            Arg::Const(Const::None) => Ok(all),
            Arg::Const(Const::Ints(ds)) if ds.is_empty() => Ok(all),
            Arg::Const(Const::Ints(ds)) => ds.iter().map(|&d| wrap_dim(d, rank)).collect(),
            Arg::Const(Const::Int(d)) => Ok(vec![wrap_dim(*d, rank)?]),
            _ => Err("dim is not a constant".into()),
        }
        .map(|ds: Vec<usize>| ds.into_iter().filter(|&d| d < rank).collect())
    }

    /// sum/mean: `dtype` casts the input first; integer sums accumulate in int64.
    fn sum_mean(&mut self, op: ReduceOp, x: &Arg, dim: &Arg, keepdim: &Arg, dtype: &Arg) -> R<ValueId> {
        let x = self.tensor(x)?;
        let d = match (dtype_arg(dtype)?, self.g.ty(x).dtype) {
            (Some(d), _) => d,
            (None, d) if op == ReduceOp::Sum && !d.is_float() => DType::I64,
            (None, d) => d,
        };
        if op == ReduceOp::Sum && d == DType::I32 {
            return Err("sum to int32".into());
        }
        let dims = self.dims(x, dim)?;
        let x = self.g.cast(x, d);
        Ok(self.g.reduce(op, x, &dims, bool_arg(keepdim)?).map_err(|e| e.0)?)
    }

    fn softmax(&mut self, x: &Arg, dim: &Arg, dtype: &Arg, log: bool) -> R<ValueId> {
        let x = self.tensor(x)?;
        let d = dtype_arg(dtype)?.unwrap_or(self.g.ty(x).dtype);
        let rank = self.g.ty(x).rank();
        let dim = match dim {
            Arg::Const(Const::Int(d)) => wrap_dim(*d, rank)?,
            _ => return Err("dim is not a constant int".into()),
        };
        let x = self.g.cast(x, d);
        Ok(self.g.softmax(x, dim.min(rank.saturating_sub(1)), log).map_err(|e| e.0)?)
    }

    fn cast_to(&mut self, x: &Arg, dtype: DType) -> R<ValueId> {
        let x = self.tensor(x)?;
        if self.g.ty(x).dtype == dtype {
            // A no-op conversion returns its input. Of a value the group computes, that is the
            // value (the `.to(x.dtype)` after a dynamically quantized linear); of a group input,
            // there would be nothing to compute, and `copy=True` semantics are TorchScript's
            // business.
            if !matches!(self.g.node(x).op, Op::Input(_)) {
                return Ok(x);
            }
            return Err("conversion to the same dtype".into());
        }
        Ok(self.g.cast(x, dtype))
    }

    fn node(&mut self, kind: &str, a: &[Arg]) -> R<ValueId> {
        use UnaryOp as U;
        let none = Arg::Const(Const::None);
        match (kind, a) {
            ("aten::add", [x, y, alpha]) => self.add_sub(BinaryOp::Add, x, y, alpha),
            ("aten::sub", [x, y, alpha]) => {
                if self.result_type(&[x, y])? == DType::Bool {
                    return Err("subtraction of bools".into());
                }
                self.add_sub(BinaryOp::Sub, x, y, alpha)
            }
            ("aten::rsub", [x, y, alpha]) => self.add_sub(BinaryOp::Sub, y, x, alpha),
            ("aten::mul", [x, y]) => self.binary(BinaryOp::Mul, x, y),
            ("aten::div" | "aten::true_divide", [x, y]) => self.true_div(x, y),
            ("aten::div", [x, y, Arg::Const(Const::None)]) => self.true_div(x, y),
            ("aten::maximum", [x, y]) => self.binary(BinaryOp::Max, x, y),
            ("aten::minimum", [x, y]) => self.binary(BinaryOp::Min, x, y),
            ("aten::pow", [x, y]) => {
                if matches!(y, Arg::Number(_)) {
                    // Eager special-cases exponents (2: x*x, 0.5: sqrt, ...) by value.
                    return Err("an exponent computed at run time".into());
                }
                let d = self.result_type(&[x, y])?;
                if !d.is_float() {
                    return Err(format!("integer power ({d})"));
                }
                self.binary(BinaryOp::Pow, x, y)
            }
            ("aten::neg", [x]) => self.unary_same(U::Neg, x),
            ("aten::abs", [x]) => self.unary_same(U::Abs, x),
            ("aten::relu", [Arg::Tensor(q)]) if self.quant.contains_key(q) => {
                // A quantized relu: max(q, zero point), in the input's parameters.
                let p = self.quant[q];
                let zp = self.g.constant(Scalar::Int(p.zero_point as i64), DType::F32);
                let v = self.g.binary(BinaryOp::Max, *q, zp).map_err(|e| e.0)?;
                self.quant.insert(v, p);
                Ok(v)
            }
            ("aten::relu", [x]) => self.unary_same(U::Relu, x),
            ("aten::reciprocal", [x]) => self.unary_float(U::Reciprocal, x),
            ("aten::sigmoid", [x]) => self.unary_float(U::Sigmoid, x),
            ("aten::tanh", [x]) => self.unary_float(U::Tanh, x),
            ("aten::exp", [x]) => self.unary_float(U::Exp, x),
            ("aten::log", [x]) => self.unary_float(U::Log, x),
            ("aten::log1p", [x]) => self.unary_float(U::Log1p, x),
            ("aten::sqrt", [x]) => self.unary_float(U::Sqrt, x),
            ("aten::rsqrt", [x]) => self.unary_float(U::Rsqrt, x),
            ("aten::erf", [x]) => self.unary_float(U::Erf, x),
            ("aten::silu", [x]) => self.float_only(x).and_then(|_| self.unary_float(U::Silu, x)),
            // (An integer tensor's round is itself, of its dtype: TorchScript runs it.)
            ("aten::round", [x]) => self.float_only(x).and_then(|_| self.unary_float(U::Round, x)),
            ("aten::gelu", [x, Arg::Const(Const::Str(mode))]) => {
                self.float_only(x)?;
                match mode.as_str() {
                    "none" => self.unary_float(U::Gelu, x),
                    "tanh" => self.unary_float(U::GeluTanh, x),
                    m => Err(format!("approximate={m}")),
                }
            }
            ("aten::leaky_relu", [x, slope]) => {
                let v = self.float_only(x)?;
                let d = self.g.ty(v).dtype;
                let zero = self.g.constant(Scalar::Int(0), d);
                let s = self.value(slope, d)?;
                let pos = self.g.compare(CmpOp::Gt, v, zero).map_err(|e| e.0)?;
                let neg = self.g.binary(BinaryOp::Mul, v, s).map_err(|e| e.0)?;
                Ok(self.g.where_(pos, v, neg).map_err(|e| e.0)?)
            }
            // The activations of mobile networks, in ATen's CPU kernels' order of operations.
            ("aten::hardtanh", [x, lo, hi]) => {
                self.float_only(x)?;
                self.clamp(x, lo, hi)
            }
            ("aten::relu6", [x]) => {
                self.float_only(x)?;
                self.clamp(x, &Arg::Const(Const::Int(0)), &Arg::Const(Const::Int(6)))
            }
            ("aten::hardsigmoid", [x]) => {
                // min(max(x + 3, 0), 6) / 6
                let v = self.float_only(x)?;
                let gate = self.relu6_of_x_plus_3(v)?;
                let six = self.g.constant(Scalar::Int(6), self.g.ty(v).dtype);
                Ok(self.g.binary(BinaryOp::Div, gate, six).map_err(|e| e.0)?)
            }
            ("aten::hardswish", [x]) => {
                // x * min(max(x + 3, 0), 6) / 6
                let v = self.float_only(x)?;
                let gate = self.relu6_of_x_plus_3(v)?;
                let six = self.g.constant(Scalar::Int(6), self.g.ty(v).dtype);
                let p = self.g.binary(BinaryOp::Mul, v, gate).map_err(|e| e.0)?;
                Ok(self.g.binary(BinaryOp::Div, p, six).map_err(|e| e.0)?)
            }
            ("aten::mish", [x]) => {
                // x * tanh(log1p(exp(x)))
                let v = self.float_only(x)?;
                let e = self.g.unary(U::Exp, v).map_err(|e| e.0)?;
                let sp = self.g.unary(U::Log1p, e).map_err(|e| e.0)?;
                let t = self.g.unary(U::Tanh, sp).map_err(|e| e.0)?;
                Ok(self.g.binary(BinaryOp::Mul, v, t).map_err(|e| e.0)?)
            }
            ("aten::clamp", [x, lo, hi]) => self.clamp(x, lo, hi),
            ("aten::clamp_min", [x, lo]) => self.clamp(x, lo, &none),
            ("aten::clamp_max", [x, hi]) => self.clamp(x, &none, hi),
            ("aten::where", [c, x, y]) => {
                let c = self.tensor(c)?;
                if self.g.ty(c).dtype != DType::Bool {
                    return Err("condition is not bool".into());
                }
                let d = self.result_type(&[x, y])?;
                let (x, y) = (self.value(x, d)?, self.value(y, d)?);
                Ok(self.g.where_(c, x, y).map_err(|e| e.0)?)
            }
            ("aten::masked_fill", [x, mask, value]) => {
                // x where the mask is false, else the value (a number, or a 0-d tensor), in x's dtype.
                let (xv, m) = (self.tensor(x)?, self.tensor(mask)?);
                if self.g.ty(m).dtype != DType::Bool {
                    return Err("a mask that is not bool (eager raises)".into());
                }
                if matches!(value, Arg::Tensor(t) if self.g.ty(*t).rank() != 0) {
                    return Err("a fill value that is not a number or 0-d tensor (eager raises)".into());
                }
                let d = self.g.ty(xv).dtype;
                let fill = self.value(value, d)?;
                Ok(self.g.where_(m, fill, xv).map_err(|e| e.0)?)
            }
            ("aten::triu" | "aten::tril", [x, Arg::Const(Const::Int(diagonal))]) => {
                // Kept where column - row ≥ diagonal (triu) or ≤ diagonal (tril), else zero.
                let v = self.tensor(x)?;
                let sizes = self.sizes(v)?;
                let r = sizes.len();
                if r < 2 {
                    return Err("triu/tril of fewer than 2 dims (eager raises)".into());
                }
                let keep = self.band(&sizes[r - 2..], *diagonal, if kind == "aten::triu" { CmpOp::Ge } else { CmpOp::Le })?;
                let zero = self.g.constant(Scalar::Int(0), self.g.ty(v).dtype);
                Ok(self.g.where_(keep, v, zero).map_err(|e| e.0)?)
            }
            (
                "aten::scaled_dot_product_attention",
                [q, k, v, mask, Arg::Const(Const::Float(dropout)), Arg::Const(Const::Bool(causal)), scale, Arg::Const(Const::Bool(false))],
            ) => {
                if *dropout != 0.0 {
                    return Err("attention dropout (Kiln computes inference)".into());
                }
                let scale = match scale {
                    Arg::Const(Const::None) => None,
                    Arg::Const(Const::Float(f)) => Some(*f),
                    _ => return Err("a scale computed at run time".into()),
                };
                self.attention(q, k, v, mask, *causal, scale)
            }
            ("aten::eq", [x, y]) => self.compare(CmpOp::Eq, x, y),
            ("aten::ne", [x, y]) => self.compare(CmpOp::Ne, x, y),
            ("aten::lt", [x, y]) => self.compare(CmpOp::Lt, x, y),
            ("aten::le", [x, y]) => self.compare(CmpOp::Le, x, y),
            ("aten::gt", [x, y]) => self.compare(CmpOp::Gt, x, y),
            ("aten::ge", [x, y]) => self.compare(CmpOp::Ge, x, y),
            ("aten::logical_not", [x]) => {
                let x = self.tensor(x)?;
                let b = self.g.cast(x, DType::Bool);
                Ok(self.g.unary(U::Not, b).map_err(|e| e.0)?)
            }
            // to.dtype(self, dtype, non_blocking, copy, memory_format) and
            // to.prim_dtype(self, dtype?, non_blocking, copy)
            ("aten::to", [x, dtype, _, _, fmt]) if matches!(fmt, Arg::Const(Const::None)) => self.to(x, dtype),
            ("aten::to", [x, dtype, _, _]) => self.to(x, dtype),
            ("aten::type_as", [x, other]) => {
                let d = self.g.ty(self.tensor(other)?).dtype;
                self.cast_to(x, d)
            }
            ("aten::sum", [x, dtype]) => self.sum_mean(ReduceOp::Sum, x, &none, &Arg::Const(Const::Bool(false)), dtype),
            ("aten::sum", [x, dim, keepdim, dtype]) => self.sum_mean(ReduceOp::Sum, x, dim, keepdim, dtype),
            ("aten::mean", [x, dtype]) => self.sum_mean(ReduceOp::Mean, x, &none, &Arg::Const(Const::Bool(false)), dtype),
            ("aten::mean", [x, dim, keepdim, dtype]) => self.sum_mean(ReduceOp::Mean, x, dim, keepdim, dtype),
            ("aten::amax" | "aten::amin", [x, dim, keepdim]) => {
                let op = if kind == "aten::amax" { ReduceOp::Max } else { ReduceOp::Min };
                let x = self.tensor(x)?;
                let dims = self.dims(x, dim)?;
                Ok(self.g.reduce(op, x, &dims, bool_arg(keepdim)?).map_err(|e| e.0)?)
            }
            ("aten::linear", [x, w, bias]) => self.linear(x, w, bias),
            ("kiln::linear_dynamic", [x, w, scale, zero_point, bias, reduce_range, relu]) => self.linear_dynamic(x, [w, scale, zero_point, bias], bool_arg(reduce_range)?, bool_arg(relu)?),
            ("aten::quantize_per_tensor", [x, Arg::Const(scale), Arg::Const(Const::Int(zero_point)), Arg::Const(Const::Int(13))]) => {
                let v = self.tensor(x)?;
                if self.g.ty(v).dtype != DType::F32 {
                    return Err("quantize_per_tensor of a tensor that is not float32".into());
                }
                self.quantized_as(v, quant_params(scale, *zero_point)?)
            }
            ("aten::quantize_per_tensor", _) => Err("quantize_per_tensor to another dtype than quint8, or with parameters computed at run time".into()),
            ("aten::dequantize", [x]) => {
                let q = self.tensor(x)?;
                let p = *self.quant.get(&q).ok_or("dequantize of a tensor the group did not quantize")?;
                self.dequantized(q, p)
            }
            ("quantized::add" | "quantized::add_relu", [a, b, Arg::Const(scale), Arg::Const(Const::Int(zero_point))]) => {
                // As ATen's qadd: both dequantized, added (a relu), quantized.
                let (a, b) = (self.quantized(a)?, self.quantized(b)?);
                let (da, db) = (self.dequantized(a.0, a.1)?, self.dequantized(b.0, b.1)?);
                let mut sum = self.g.binary(BinaryOp::Add, da, db).map_err(|e| e.0)?;
                if kind == "quantized::add_relu" {
                    sum = self.g.unary(UnaryOp::Relu, sum).map_err(|e| e.0)?;
                }
                self.quantized_as(sum, quant_params(scale, *zero_point)?)
            }
            ("kiln::linear_quantized", [x, w, scale, zero_point, bias, Arg::Const(out_scale), Arg::Const(Const::Int(out_zp)), relu]) => {
                self.linear_quantized(x, [w, scale, zero_point, bias], quant_params(out_scale, *out_zp)?, bool_arg(relu)?)
            }
            (
                "kiln::conv2d_quantized",
                [x, w, scale, zero_point, bias, Arg::Const(Const::Ints(stride)), Arg::Const(Const::Ints(padding)), Arg::Const(Const::Ints(dilation)), Arg::Const(Const::Int(groups)), symmetric, Arg::Const(out_scale), Arg::Const(Const::Int(out_zp)), relu],
            ) => {
                let pair = |xs: &[i64]| -> R<[i64; 2]> { xs.try_into().map_err(|_| "a window of other than two dims".to_string()) };
                let (stride, padding, dilation) = (pair(stride)?, pair(padding)?, pair(dilation)?);
                let groups = Groups { count: *groups, symmetric: bool_arg(symmetric)? };
                self.conv2d_quantized(x, [w, scale, zero_point, bias], stride, padding, dilation, groups, quant_params(out_scale, *out_zp)?, bool_arg(relu)?)
            }
            ("aten::matmul", [x, y]) => self.matmul(x, y, None),
            ("aten::mm", [x, y]) => self.matmul(x, y, Some(2)),
            ("aten::bmm", [x, y]) => self.matmul(x, y, Some(3)),
            ("aten::addmm", [bias, x, y, beta, alpha]) => {
                let p = self.matmul(x, y, Some(2))?;
                self.scaled_sum(p, bias, beta, alpha)
            }
            ("aten::baddbmm", [bias, x, y, beta, alpha]) => {
                let p = self.matmul(x, y, Some(3))?;
                self.scaled_sum(p, bias, beta, alpha)
            }
            ("aten::t", [x]) => {
                let v = self.tensor(x)?;
                match self.g.ty(v).rank() {
                    0 | 1 => Ok(v),
                    2 => Ok(self.g.permute(v, &[1, 0]).map_err(|e| e.0)?),
                    r => Err(format!("t() of a {r}-d tensor")),
                }
            }
            ("aten::transpose", [x, Arg::Const(Const::Int(d0)), Arg::Const(Const::Int(d1))]) => {
                let v = self.tensor(x)?;
                let rank = self.g.ty(v).rank();
                let (d0, d1) = (wrap_dim(*d0, rank)?, wrap_dim(*d1, rank)?);
                if rank == 0 || d0 == d1 {
                    return Ok(v);
                }
                let mut dims: Vec<usize> = (0..rank).collect();
                dims.swap(d0, d1);
                Ok(self.g.permute(v, &dims).map_err(|e| e.0)?)
            }
            ("aten::permute", [x, Arg::Const(Const::Ints(dims))]) => {
                let v = self.tensor(x)?;
                let rank = self.g.ty(v).rank();
                let dims = dims.iter().map(|&d| wrap_dim(d, rank)).collect::<R<Vec<_>>>()?;
                if dims.iter().enumerate().all(|(i, &d)| i == d) {
                    return Ok(v);
                }
                Ok(self.g.permute(v, &dims).map_err(|e| e.0)?)
            }
            ("aten::view" | "aten::reshape", [x, Arg::Const(Const::Ints(shape))]) => self.reshape(x, shape),
            ("aten::flatten", [x, Arg::Const(Const::Int(start)), Arg::Const(Const::Int(end))]) => {
                let v = self.tensor(x)?;
                let sizes = self.sizes(v)?;
                if sizes.is_empty() {
                    return self.reshape(x, &[1]);
                }
                let (a, b) = (wrap_dim(*start, sizes.len())?, wrap_dim(*end, sizes.len())?);
                if a > b {
                    return Err("flatten with start_dim after end_dim".into());
                }
                let mut shape: Vec<i64> = sizes[..a].to_vec();
                shape.push(sizes[a..=b].iter().product());
                shape.extend(&sizes[b + 1..]);
                self.reshape(x, &shape)
            }
            ("aten::unflatten", [x, Arg::Const(Const::Int(dim)), Arg::Const(Const::Ints(split))]) => {
                let v = self.tensor(x)?;
                let sizes = self.sizes(v)?;
                let d = wrap_dim(*dim, sizes.len())?;
                let mut shape: Vec<i64> = sizes[..d].to_vec();
                shape.extend(split);
                shape.extend(&sizes[d + 1..]);
                self.reshape(x, &shape)
            }
            ("aten::unsqueeze", [x, Arg::Const(Const::Int(dim))]) => {
                let v = self.tensor(x)?;
                let mut shape = self.sizes(v)?;
                let d = wrap_dim(*dim, shape.len() + 1)?;
                shape.insert(d, 1);
                self.reshape(x, &shape)
            }
            ("aten::squeeze", [x]) => {
                let v = self.tensor(x)?;
                let shape: Vec<i64> = self.sizes(v)?.into_iter().filter(|&n| n != 1).collect();
                self.reshape(x, &shape)
            }
            ("aten::squeeze", [x, dim]) => {
                let v = self.tensor(x)?;
                let sizes = self.sizes(v)?;
                let dims = match dim {
                    Arg::Const(Const::Int(d)) => vec![wrap_dim(*d, sizes.len().max(1))?],
                    Arg::Const(Const::Ints(ds)) => ds.iter().map(|&d| wrap_dim(d, sizes.len().max(1))).collect::<R<_>>()?,
                    _ => return Err("dim is not a constant".into()),
                };
                let shape: Vec<i64> = sizes.iter().enumerate().filter(|(d, &n)| !(n == 1 && dims.contains(d))).map(|(_, &n)| n).collect();
                self.reshape(x, &shape)
            }
            ("aten::contiguous", [x, Arg::Const(Const::Int(_))]) => self.tensor(x),
            ("aten::dropout", [x, _, Arg::Const(Const::Bool(false))]) => self.tensor(x),
            ("aten::select", [x, Arg::Const(Const::Int(dim)), Arg::Const(Const::Int(index))]) => {
                let v = self.tensor(x)?;
                let sizes = self.sizes(v)?;
                let d = wrap_dim(*dim, sizes.len())?;
                let i = if *index < 0 { index + sizes[d] } else { *index };
                if i < 0 || i >= sizes[d] {
                    return Err("select index out of range (eager raises)".into());
                }
                let s = self.g.slice(v, d, i, 1).map_err(|e| e.0)?;
                let mut shape = sizes.clone();
                shape.remove(d);
                Ok(self.g.reshape(s, &shape).map_err(|e| e.0)?)
            }
            ("aten::slice", [x, Arg::Const(Const::Int(dim)), start, end, Arg::Const(Const::Int(1))]) => {
                let v = self.tensor(x)?;
                let sizes = self.sizes(v)?;
                let d = wrap_dim(*dim, sizes.len())?;
                // Python slicing: None, negative and out-of-range bounds clamp.
                let bound = |a: &Arg, default: i64| -> R<i64> {
                    let b = match a {
                        Arg::Const(Const::None) => default,
                        Arg::Const(Const::Int(b)) => *b,
                        _ => return Err("a slice bound that is not a constant".into()),
                    };
                    Ok(if b < 0 { (b + sizes[d]).max(0) } else { b.min(sizes[d]) })
                };
                let (a, b) = (bound(start, 0)?, bound(end, sizes[d])?);
                self.slice(v, d, a, (b - a).max(0))
            }
            ("aten::narrow", [x, Arg::Const(Const::Int(dim)), Arg::Const(Const::Int(start)), Arg::Const(Const::Int(len))]) => {
                let v = self.tensor(x)?;
                let sizes = self.sizes(v)?;
                let d = wrap_dim(*dim, sizes.len())?;
                let a = if *start < 0 { start + sizes[d] } else { *start };
                self.slice(v, d, a, *len)
            }
            ("aten::expand", [x, Arg::Const(Const::Ints(shape)), Arg::Const(Const::Bool(false))]) => {
                let v = self.tensor(x)?;
                let sizes = self.sizes(v)?;
                let skip = shape.len().checked_sub(sizes.len()).ok_or("expand to fewer dims")?;
                let shape: Vec<i64> = shape.iter().enumerate().map(|(d, &n)| if n == -1 && d >= skip { sizes[d - skip] } else { n }).collect();
                if shape == sizes {
                    return Ok(v);
                }
                Ok(self.g.expand(v, &shape).map_err(|e| e.0)?)
            }
            ("aten::batch_norm", [x, weight, bias, mean, var, Arg::Const(Const::Bool(false)), _momentum, Arg::Const(Const::Float(eps)), _]) => {
                let v = self.tensor(x)?;
                self.batch_norm_eval(v, weight, bias, mean, var, *eps)
            }
            ("aten::batch_norm", _) => Err("batch_norm in training mode (Kiln computes inference)".into()),
            ("aten::adaptive_avg_pool2d", [Arg::Tensor(q), Arg::Const(Const::Ints(out))]) if self.quant.contains_key(q) => {
                // ATen's quantized average: the window's sum less its zero points, times
                // 1 / size, to nearest even, plus the zero point, in the input's parameters —
                // the mean of the uint8 values rounded to nearest even (the sum is exact, and
                // a tie is exactly representable).
                let p = self.quant[q];
                let sizes = self.sizes(*q)?;
                let rank = sizes.len();
                if out[..] != [1, 1] || !(3..=4).contains(&rank) || sizes[rank - 2..].contains(&0) {
                    return Err("a quantized adaptive_avg_pool2d to other than 1×1".into());
                }
                let sum = self.g.reduce(ReduceOp::Sum, *q, &[rank - 2, rank - 1], true).map_err(|e| e.0)?;
                let size = self.g.constant(Scalar::Int(sizes[rank - 2] * sizes[rank - 1]), DType::F32);
                let mean = self.g.binary(BinaryOp::Div, sum, size).map_err(|e| e.0)?;
                let v = self.g.quantize(mean, QuantParams { scale: 1.0, zero_point: 0 }).map_err(|e| e.0)?;
                self.quant.insert(v, p);
                Ok(v)
            }
            ("aten::adaptive_avg_pool2d", [x, Arg::Const(Const::Ints(out))]) if out[..] == [1, 1] => {
                // The mean over H and W: eager sums each window, then divides by its size.
                let v = self.float_only(x)?;
                let rank = self.g.ty(v).rank();
                if !(3..=4).contains(&rank) || self.sizes(v)?[rank - 2..].contains(&0) {
                    return Err("adaptive_avg_pool2d of an input that is not [N,] C, H, W with H, W > 0 (eager raises)".into());
                }
                Ok(self.g.reduce(ReduceOp::Mean, v, &[rank - 2, rank - 1], true).map_err(|e| e.0)?)
            }
            ("aten::adaptive_avg_pool2d", [x, Arg::Const(Const::Ints(out))]) => self.adaptive_pool2d(ReduceOp::Mean, x, out),
            ("aten::adaptive_avg_pool2d", _) => Err("adaptive_avg_pool2d to an output size given at run time".into()),
            ("aten::adaptive_max_pool2d", [x, Arg::Const(Const::Ints(out)), Arg::Const(Const::Int(0)), Arg::Const(Const::Int(2))]) => {
                self.adaptive_pool2d(ReduceOp::Max, x, out)
            }
            ("aten::adaptive_max_pool2d", [_, _, Arg::Const(Const::Int(1)), _]) => Err("adaptive_max_pool2d's indices (Kiln computes the values only)".into()),
            ("aten::adaptive_max_pool2d", _) => Err("adaptive_max_pool2d to an output size given at run time".into()),
            ("aten::upsample_nearest2d" | "aten::upsample_bilinear2d", _) => self.upsample_op(kind, a),
            ("aten::constant_pad_nd", [x, Arg::Const(Const::Ints(pad)), value]) => self.constant_pad(x, pad, value),
            ("aten::pad", [x, Arg::Const(Const::Ints(pad)), Arg::Const(Const::Str(mode)), value]) if mode == "constant" => self.constant_pad(x, pad, value),
            ("aten::pad", _) => Err("a pad mode other than constant (reflect, replicate, circular)".into()),
            ("aten::max_pool2d", [x, Arg::Const(Const::Ints(k)), Arg::Const(Const::Ints(stride)), Arg::Const(Const::Ints(pad)), Arg::Const(Const::Ints(dilation)), Arg::Const(Const::Bool(ceil))]) => {
                self.pool2d(ReduceOp::Max, x, k, stride, pad, dilation, *ceil, false, None)
            }
            (
                "aten::avg_pool2d",
                [x, Arg::Const(Const::Ints(k)), Arg::Const(Const::Ints(stride)), Arg::Const(Const::Ints(pad)), Arg::Const(Const::Bool(ceil)), Arg::Const(Const::Bool(include_pad)), divisor],
            ) => {
                let divisor = match divisor {
                    Arg::Const(Const::None) => None,
                    Arg::Const(Const::Int(n)) => Some(*n),
                    _ => return Err("a divisor_override given at run time".into()),
                };
                self.pool2d(ReduceOp::Mean, x, k, stride, pad, &[1], *ceil, *include_pad, divisor)
            }
            ("aten::max_pool2d" | "aten::avg_pool2d", _) => Err("a pooling window given at run time".into()),
            ("aten::conv2d" | "aten::conv1d", [x, w, b, Arg::Const(Const::Ints(stride)), padding, Arg::Const(Const::Ints(dilation)), Arg::Const(Const::Int(groups))]) => {
                let padding = match padding {
                    Arg::Const(Const::Ints(p)) => windows::Padding::Ints(p),
                    Arg::Const(Const::Str(m)) => windows::Padding::Mode(m),
                    _ => return Err("a convolution padding given at run time".into()),
                };
                let a = windows::ConvArgs { stride, padding, dilation, groups: *groups, one_d: kind == "aten::conv1d" };
                self.convolution(x, w, b, &a)
            }
            (
                "aten::convolution" | "aten::_convolution",
                [x, w, b, Arg::Const(Const::Ints(stride)), Arg::Const(Const::Ints(padding)), Arg::Const(Const::Ints(dilation)), Arg::Const(Const::Bool(false)), _, Arg::Const(Const::Int(groups)), ..],
            ) => {
                let one_d = self.g.ty(self.tensor(w)?).rank() == 3;
                let a = windows::ConvArgs { stride, padding: windows::Padding::Ints(padding), dilation, groups: *groups, one_d };
                self.convolution(x, w, b, &a)
            }
            ("aten::conv2d" | "aten::conv1d" | "aten::convolution" | "aten::_convolution", _) => {
                Err("a transposed convolution, or convolution arguments given at run time".into())
            }
            ("aten::channel_shuffle" | "aten::native_channel_shuffle", [x, Arg::Const(Const::Int(groups))]) => {
                // [N, g, C/g, ...] with the two group dims swapped, copied into a new tensor.
                let v = self.tensor(x)?;
                let sizes = self.sizes(v)?;
                let g = *groups;
                if sizes.len() < 3 || g <= 0 || sizes[1] % g != 0 {
                    return Err("channel_shuffle of fewer than 3 dims or channels not a multiple of groups (eager raises)".into());
                }
                let e = |r: Result<ValueId, kiln_compiler::graph::ir::IrError>| r.map_err(|e| e.0);
                let mut split = vec![sizes[0], g, sizes[1] / g];
                split.extend(&sizes[2..]);
                let grouped = e(self.g.reshape(v, &split))?;
                let mut perm: Vec<usize> = (0..split.len()).collect();
                perm.swap(1, 2);
                let swapped = e(self.g.permute(grouped, &perm))?;
                let merged = e(self.g.reshape(swapped, &sizes))?;
                Ok(self.g.copy(merged))
            }
            ("aten::layer_norm", [x, Arg::Const(Const::Ints(normalized)), weight, bias, Arg::Const(Const::Float(eps)), _]) => {
                let v = self.tensor(x)?;
                self.layer_norm(v, normalized.len(), weight, bias, *eps)
            }
            (
                "aten::_transformer_encoder_layer_fwd",
                [src, Arg::Const(Const::Int(e)), Arg::Const(Const::Int(h)), qkv_w, qkv_b, proj_w, proj_b, Arg::Const(Const::Bool(gelu)), Arg::Const(Const::Bool(norm_first)), Arg::Const(Const::Float(eps)), nw1, nb1, nw2, nb2, w1, b1, w2, b2, Arg::Const(Const::None), _],
            ) => {
                let layer = EncoderLayer { heads: *h, embed: *e, qkv: (qkv_w, qkv_b), proj: (proj_w, proj_b), norm1: (nw1, nb1), norm2: (nw2, nb2), ffn1: (w1, b1), ffn2: (w2, b2), gelu: *gelu, norm_first: *norm_first, eps: *eps };
                self.encoder_layer(src, &layer)
            }
            ("aten::zeros" | "aten::ones", [Arg::Const(Const::Ints(size)), dtype, layout, device, pin]) => {
                if !matches!(device, Arg::Const(Const::None)) && !matches!(device, Arg::Const(Const::Str(d)) if d == "cpu") {
                    return Err("a device other than the CPU".into());
                }
                if !matches!(layout, Arg::Const(Const::None | Const::Int(0))) || !matches!(pin, Arg::Const(Const::None | Const::Bool(false))) {
                    return Err("a layout or pinned memory Kiln does not make".into());
                }
                let d = match dtype_arg(dtype)? {
                    Some(d) => d,
                    None => self.default_float()?,
                };
                let value = self.g.constant(Scalar::Int((kind == "aten::ones") as i64), d);
                let filled = self.g.expand(value, size).map_err(|e| e.0)?;
                Ok(self.g.copy(filled))
            }
            (
                "aten::_native_multi_head_attention",
                [q, k, v, Arg::Const(Const::Int(e)), Arg::Const(Const::Int(h)), qkv_w, qkv_b, proj_w, proj_b, Arg::Const(Const::None), _, _, _, Arg::Const(Const::Int(0)), Arg::Const(Const::Int(2))],
            ) => {
                let (q, k, v) = (self.tensor(q)?, self.tensor(k)?, self.tensor(v)?);
                self.multi_head_attention([q, k, v], *h, *e, (qkv_w, qkv_b), (proj_w, proj_b))
            }
            ("aten::_native_multi_head_attention", [.., Arg::Const(Const::Int(1)), _]) => Err("the attention weights (Kiln computes the output only)".into()),
            ("aten::zeros_like" | "aten::ones_like", [x, dtype, layout, _, pin, format]) => {
                if !matches!(layout, Arg::Const(Const::None | Const::Int(0))) || !matches!(pin, Arg::Const(Const::None | Const::Bool(false))) {
                    return Err("a layout or pinned memory Kiln does not make".into());
                }
                // (c10::MemoryFormat::Preserve is 3: the layout follows x, as `to` does.)
                if !matches!(format, Arg::Const(Const::None | Const::Int(3))) {
                    return Err("a memory format other than x's".into());
                }
                let xv = self.tensor(x)?;
                let d = dtype_arg(dtype)?.unwrap_or(self.g.ty(xv).dtype);
                let value = self.g.constant(Scalar::Int((kind == "aten::ones_like") as i64), d);
                let filled = self.g.expand(value, &self.sizes(xv)?).map_err(|e| e.0)?;
                Ok(self.g.copy(filled))
            }
            ("aten::gru_cell", [x, hx, w_ih, w_hh, b_ih, b_hh]) => self.gru_cell(x, hx, Projection::Float(w_ih, b_ih), Projection::Float(w_hh, b_hh)),
            // (The cell ops always quantize with reduce_range: ATen's DEFINE_QUANTIZED_RNN_CELL_DYNAMIC.)
            ("kiln::gru_cell_dynamic", [x, hx, w1, s1, z1, b1, w2, s2, z2, b2]) => {
                self.gru_cell(x, hx, Projection::Quantized([w1, s1, z1, b1], true), Projection::Quantized([w2, s2, z2, b2], true))
            }
            (
                "kiln::lstm_dynamic" | "kiln::gru_dynamic",
                [x, hx, Arg::List(weights, _), Arg::Const(Const::Int(layers)), bidirectional, batch_first, reduce_range, Arg::Const(Const::Int(index)), Arg::Const(Const::Int(count))],
            ) => {
                let layout = Sequence { layers: *layers, bidirectional: bool_arg(bidirectional)?, batch_first: bool_arg(batch_first)?, weights: CellWeights::Quantized { reduce_range: bool_arg(reduce_range)? } };
                self.sequence_output(if kind == "kiln::lstm_dynamic" { Recurrence::Lstm } else { Recurrence::Gru }, x, hx, weights, layout, *index, *count)
            }
            // (dropout applies in training only: eval's is none.)
            (
                "aten::lstm" | "aten::gru",
                [x, hx, Arg::List(weights, _), biases, Arg::Const(Const::Int(layers)), _, Arg::Const(Const::Bool(false)), bidirectional, batch_first, Arg::Const(Const::Int(index)), Arg::Const(Const::Int(count))],
            ) => {
                let layout = Sequence { layers: *layers, bidirectional: bool_arg(bidirectional)?, batch_first: bool_arg(batch_first)?, weights: CellWeights::Float { biases: bool_arg(biases)? } };
                self.sequence_output(if kind == "aten::lstm" { Recurrence::Lstm } else { Recurrence::Gru }, x, hx, weights, layout, *index, *count)
            }
            ("aten::lstm" | "aten::gru", [.., Arg::Const(Const::Bool(true)), _, _, _, _]) => Err("a module in training (dropout between layers)".into()),
            ("aten::lstm_cell", [x, Arg::List(hx, _), w_ih, w_hh, b_ih, b_hh, Arg::Const(Const::Int(index)), Arg::Const(Const::Int(2))]) => {
                let [h, c] = hx[..] else { return Err(format!("an LSTM state of {} tensors (eager raises)", hx.len())) };
                let (hy, cy) = self.lstm_cell(x, h, c, Projection::Float(w_ih, b_ih), Projection::Float(w_hh, b_hh))?;
                match index {
                    0 => Ok(hy),
                    1 => Ok(cy),
                    _ => Err("lstm_cell has two outputs".into()),
                }
            }
            ("kiln::lstm_cell_dynamic", [x, Arg::List(hx, _), w1, s1, z1, b1, w2, s2, z2, b2, Arg::Const(Const::Int(index)), Arg::Const(Const::Int(2))]) => {
                let [h, c] = hx[..] else { return Err(format!("an LSTM state of {} tensors (eager raises)", hx.len())) };
                let (hy, cy) = self.lstm_cell(x, h, c, Projection::Quantized([w1, s1, z1, b1], true), Projection::Quantized([w2, s2, z2, b2], true))?;
                Ok(if *index == 0 { hy } else { cy })
            }
            ("aten::stack", [Arg::List(xs, strides), Arg::Const(Const::Int(dim))]) => {
                let Some(&first) = xs.first() else { return Err("stack of no tensors (eager raises)".into()) };
                let shape = self.sizes(first)?;
                let d = wrap_dim(*dim, shape.len() + 1)?;
                let mut parts = vec![];
                for (&x, s) in xs.iter().zip(strides) {
                    let sizes = self.sizes(x)?;
                    if sizes != shape || self.g.ty(x).dtype != self.g.ty(first).dtype {
                        return Err("stack of tensors of different shapes or dtypes".into());
                    }
                    if !kiln_compiler::graph::layout::is_contiguous(&sizes, s) {
                        return Err("stack of tensors that are not contiguous".into());
                    }
                    let mut up = sizes.clone();
                    up.insert(d, 1);
                    parts.push(self.g.reshape(x, &up).map_err(|e| e.0)?);
                }
                if parts.len() == 1 {
                    return Ok(self.g.copy(parts[0]));
                }
                Ok(self.g.cat(&parts, d).map_err(|e| e.0)?)
            }
            ("aten::cat", [Arg::List(xs, strides), Arg::Const(Const::Int(dim))]) => {
                let Some(&first) = xs.first() else { return Err("cat of no tensors".into()) };
                if xs.iter().any(|&x| self.g.ty(x).dtype != self.g.ty(first).dtype) {
                    return Err("cat of tensors of different dtypes".into());
                }
                // Eager's result layout follows its inputs' memory format: contiguous ones
                // give a contiguous result (the layout rule says so below).
                let contiguous = xs.iter().zip(strides).all(|(&x, s)| kiln_compiler::graph::layout::is_contiguous(&self.g.ty(x).static_shape().unwrap_or_default(), s));
                if !contiguous {
                    return Err("cat of tensors that are not contiguous".into());
                }
                let rank = self.g.ty(first).rank();
                if xs.len() == 1 {
                    return Ok(first);
                }
                Ok(self.g.cat(xs, wrap_dim(*dim, rank)?).map_err(|e| e.0)?)
            }
            ("quantized::cat", [Arg::List(xs, _), Arg::Const(Const::Int(dim)), Arg::Const(scale), Arg::Const(zero_point)]) => {
                // As ATen's qcat: each input requantized to the output's parameters (the first
                // input's where none are given) where its own differ, then concatenated.
                let parts: Vec<(ValueId, QuantParams)> = xs.iter().map(|&x| self.quantized(&Arg::Tensor(x))).collect::<R<_>>()?;
                let Some(&(first, first_params)) = parts.first() else { return Err("cat of no tensors".into()) };
                let out = match (scale, zero_point) {
                    (Const::None, Const::None) => first_params,
                    (scale, Const::Int(zp)) => quant_params(scale, *zp)?,
                    _ => return Err("a scale without a zero point".into()),
                };
                let mut values = vec![];
                for (x, p) in parts {
                    values.push(if p == out { x } else { self.requantized(x, p, out)? });
                }
                let rank = self.g.ty(first).rank();
                let v = if values.len() == 1 { values[0] } else { self.g.cat(&values, wrap_dim(*dim, rank)?).map_err(|e| e.0)? };
                self.quant.insert(v, out);
                Ok(v)
            }
            (
                "aten::chunk" | "aten::unsafe_chunk" | "aten::split" | "aten::unsafe_split" | "aten::split_with_sizes" | "aten::unsafe_split_with_sizes",
                [x, Arg::Const(how), Arg::Const(Const::Int(dim)), Arg::Const(Const::Int(index)), Arg::Const(Const::Int(count))],
            ) => self.part(kind, x, how, *dim, *index, *count),
            (k, [x, ..]) if in_place_of(k).is_some() => {
                // Eager writes the result into x: its shape must be x's, and it is cast to
                // x's dtype where PyTorch allows that cast (it raises otherwise).
                let target = self.g.ty(self.tensor(x)?).clone();
                let y = self.node(in_place_of(k).unwrap(), a)?;
                let got = self.g.ty(y).clone();
                if got.shape != target.shape {
                    return Err(format!("the result has shape {got}, the tensor written {target} (eager raises)"));
                }
                if category(got.dtype) > category(target.dtype) {
                    return Err(format!("a {} result cannot be written into a {} tensor (eager raises)", got.dtype, target.dtype));
                }
                Ok(self.g.cast(y, target.dtype))
            }
            ("aten::softmax", [x, dim, dtype]) => self.softmax(x, dim, dtype, false),
            ("aten::log_softmax", [x, dim, dtype]) => self.softmax(x, dim, dtype, true),
            _ if is_known(kind) => Err(format!("this overload ({} arguments) is not supported", a.len())),
            _ => Err("not an op Kiln supports yet".into()),
        }
    }

    /// Part `index` of `count` of a split of `x` along `dim` (`how`: chunk's number of chunks,
    /// split's size or sizes), as ATen splits: equal parts, the last one shorter.
    fn part(&mut self, kind: &str, x: &Arg, how: &Const, dim: i64, index: i64, count: i64) -> R<ValueId> {
        let v = self.tensor(x)?;
        let sizes = self.sizes(v)?;
        let d = wrap_dim(dim, sizes.len())?;
        let n = sizes[d];
        let equal = |size: i64| -> Vec<i64> {
            let parts = ((n + size - 1) / size).max(1);
            (0..parts).map(|i| size.min(n - i * size)).collect()
        };
        let lens: Vec<i64> = match (kind.trim_start_matches("aten::").trim_start_matches("unsafe_"), how) {
            ("chunk", Const::Int(c)) if *c > 0 => match (n + c - 1) / c {
                0 => vec![0; *c as usize],
                size => equal(size),
            },
            ("split", Const::Int(0)) if n == 0 => vec![0],
            ("split", Const::Int(size)) if *size > 0 => equal(*size),
            ("split" | "split_with_sizes", Const::Ints(ls)) if ls.iter().all(|&l| l >= 0) && ls.iter().sum::<i64>() == n => ls.clone(),
            _ => return Err(format!("a split by {how:?} of {n} elements (eager raises)")),
        };
        if lens.len() as i64 != count || index < 0 || index >= count {
            return Err(format!("the split makes {} parts and {count} are unpacked (eager raises)", lens.len()));
        }
        let start = lens[..index as usize].iter().sum();
        self.slice(v, d, start, lens[index as usize])
    }

    fn sizes(&self, v: ValueId) -> R<Vec<i64>> {
        self.g.ty(v).static_shape().ok_or_else(|| "a symbolic shape".to_string())
    }

    /// view/reshape to `shape` (one -1 inferred).
    fn reshape(&mut self, x: &Arg, shape: &[i64]) -> R<ValueId> {
        let v = self.tensor(x)?;
        let numel: i64 = self.sizes(v)?.iter().product();
        let known: i64 = shape.iter().filter(|&&n| n != -1).product();
        let mut shape = shape.to_vec();
        match shape.iter().filter(|&&n| n == -1).count() {
            0 => {}
            1 if known != 0 && numel % known == 0 => *shape.iter_mut().find(|n| **n == -1).unwrap() = numel / known,
            _ => return Err("a shape eager cannot infer".into()),
        }
        if shape == self.sizes(v)? {
            return Ok(v);
        }
        Ok(self.g.reshape(v, &shape).map_err(|e| e.0)?)
    }

    fn slice(&mut self, v: ValueId, dim: usize, start: i64, len: i64) -> R<ValueId> {
        if start == 0 && Some(len) == self.sizes(v)?.get(dim).copied() {
            return Ok(v);
        }
        Ok(self.g.slice(v, dim, start, len).map_err(|e| e.0)?)
    }

    /// layer_norm over the last `dims` dims: (x - mean) · rsqrt(var + eps) · weight + bias, the
    /// variance biased, as eager.
    fn layer_norm(&mut self, x: ValueId, dims: usize, weight: &Arg, bias: &Arg, eps: f64) -> R<ValueId> {
        let d = self.g.ty(x).dtype;
        if !d.is_float() {
            return Err("layer_norm of an integer tensor".into());
        }
        let rank = self.g.ty(x).rank();
        let axes: Vec<usize> = (rank.checked_sub(dims).ok_or("normalized_shape longer than the input")?..rank).collect();
        let e = |r: Result<ValueId, kiln_compiler::graph::ir::IrError>| r.map_err(|e| e.0);
        let mean = e(self.g.reduce(ReduceOp::Mean, x, &axes, true))?;
        let centred = e(self.g.binary(BinaryOp::Sub, x, mean))?;
        let sq = e(self.g.binary(BinaryOp::Mul, centred, centred))?;
        let var = e(self.g.reduce(ReduceOp::Mean, sq, &axes, true))?;
        let eps = self.g.constant(Scalar::Float(eps), d);
        let var = e(self.g.binary(BinaryOp::Add, var, eps))?;
        let rstd = e(self.g.unary(UnaryOp::Rsqrt, var))?;
        let mut y = e(self.g.binary(BinaryOp::Mul, centred, rstd))?;
        for (arg, op) in [(weight, BinaryOp::Mul), (bias, BinaryOp::Add)] {
            match arg {
                Arg::Const(Const::None) => {}
                Arg::Tensor(t) if self.g.ty(*t).dtype == d => y = e(self.g.binary(op, y, *t))?,
                _ => return Err("a layer_norm weight or bias of another dtype".into()),
            }
        }
        Ok(y)
    }

    /// `constant_pad_nd`: pad (left, right) pairs from the last dim backwards; a negative pad
    /// crops. The padding is the fill value expanded, joined to x by cats.
    fn constant_pad(&mut self, x: &Arg, pad: &[i64], value: &Arg) -> R<ValueId> {
        let mut v = self.tensor(x)?;
        let d = self.g.ty(v).dtype;
        let rank = self.g.ty(v).rank();
        if pad.len() % 2 != 0 || pad.len() > 2 * rank {
            return Err("a pad list of odd length or longer than twice the rank (eager raises)".into());
        }
        if pad.iter().all(|&p| p <= 0) {
            // Eager then clones the cropped view, keeping a dense input's own strides.
            return Err("a pad that only crops (eager returns a clone in the input's layout)".into());
        }
        let fill = match value {
            Arg::Const(Const::None) => self.g.constant(Scalar::Int(0), d),
            // `fill_` converts the value to x's dtype (a float into an integer truncates;
            // eager raises where it does not fit).
            Arg::Const(Const::Float(f)) if !d.is_float() && f.is_finite() && f.abs() < 2f64.powi(31) => self.g.constant(Scalar::Float(*f), d),
            other => self.value(other, d)?,
        };
        let e = |r: Result<ValueId, kiln_compiler::graph::ir::IrError>| r.map_err(|e| e.0);
        let dims: Vec<(usize, i64, i64)> = pad.chunks(2).enumerate().map(|(i, p)| (rank - 1 - i, p[0], p[1])).collect();
        // Crops first (slices of x), so that the last op is a cat: the result is never a view.
        for &(dim, left, right) in &dims {
            let n = self.sizes(v)?[dim];
            if n + left + right < 0 {
                return Err("a pad that leaves a negative size (eager raises)".into());
            }
            let (start, keep) = (-left.min(0), n + left.min(0) + right.min(0));
            if start != 0 || keep != n {
                v = e(self.g.slice(v, dim, start, keep.max(0)))?;
            }
        }
        let mut joined = false;
        for &(dim, left, right) in &dims {
            let side = |this: &mut Self, width: i64| -> R<Option<ValueId>> {
                if width <= 0 {
                    return Ok(None);
                }
                let mut shape = this.sizes(v)?;
                shape[dim] = width;
                Ok(Some(e(this.g.expand(fill, &shape))?))
            };
            let (before, after) = (side(self, left)?, side(self, right)?);
            if before.is_some() || after.is_some() {
                let xs: Vec<ValueId> = before.into_iter().chain([v]).chain(after).collect();
                v = e(self.g.cat(&xs, dim))?;
                joined = true;
            }
        }
        debug_assert!(joined, "some pad is positive");
        Ok(v)
    }

    /// Batch norm with running statistics, as ATen's CPU kernel computes it per channel (dim
    /// 1): alpha = weight / sqrt(var + eps), beta = bias - mean * alpha, out = x * alpha + beta.
    /// (ATen's path for inputs that are neither contiguous nor channels-last computes
    /// ((x - mean) * invstd) * weight + bias: the same value to an ulp or two.)
    fn batch_norm_eval(&mut self, x: ValueId, weight: &Arg, bias: &Arg, mean: &Arg, var: &Arg, eps: f64) -> R<ValueId> {
        let d = self.g.ty(x).dtype;
        let sizes = self.sizes(x)?;
        if !d.is_float() || sizes.len() < 2 {
            return Err("batch_norm of an integer tensor or one without a channel dim".into());
        }
        let e = |r: Result<ValueId, kiln_compiler::graph::ir::IrError>| r.map_err(|e| e.0);
        // A [C] parameter as [C, 1, ...] against x's [N, C, ...].
        let mut per_channel: Vec<i64> = vec![sizes[1]];
        per_channel.extend(std::iter::repeat_n(1, sizes.len() - 2));
        let param = |this: &mut Self, a: &Arg, default: Option<i64>| -> R<ValueId> {
            match a {
                Arg::Const(Const::None) => default.map(|n| this.g.constant(Scalar::Int(n), d)).ok_or_else(|| "batch_norm without running statistics".to_string()),
                Arg::Tensor(t) if this.g.ty(*t).dtype == d && this.sizes(*t)? == [sizes[1]] => e(this.g.reshape(*t, &per_channel)),
                _ => Err("a batch_norm parameter of another dtype or size".into()),
            }
        };
        let (mean, var) = (param(self, mean, None)?, param(self, var, None)?);
        let (w, b) = (param(self, weight, Some(1))?, param(self, bias, Some(0))?);
        let (one, eps) = (self.g.constant(Scalar::Int(1), d), self.g.constant(Scalar::Float(eps), d));
        let std = e(self.g.binary(BinaryOp::Add, var, eps))?;
        let std = e(self.g.unary(UnaryOp::Sqrt, std))?;
        let invstd = e(self.g.binary(BinaryOp::Div, one, std))?;
        let alpha = e(self.g.binary(BinaryOp::Mul, invstd, w))?;
        let shift = e(self.g.binary(BinaryOp::Mul, mean, alpha))?;
        let beta = e(self.g.binary(BinaryOp::Sub, b, shift))?;
        let y = e(self.g.binary(BinaryOp::Mul, x, alpha))?;
        e(self.g.binary(BinaryOp::Add, y, beta))
    }

    /// The fast path's fused encoder layer (`nn.TransformerEncoderLayer` traced in eval), in
    /// Kiln's own ops as PyTorch's `transformer_encoder_layer_forward` computes it:
    /// self-attention (`_native_multi_head_attention` without weights: the packed qkv
    /// projection, heads as views, softmax(q kᵀ · 1/√d) v, the output projection), residual,
    /// layer norm, the feed-forward block, residual, layer norm (norm_first moves the norms
    /// before each block).
    fn encoder_layer(&mut self, src: &Arg, l: &EncoderLayer) -> R<ValueId> {
        let x0 = self.tensor(src)?;
        let sizes = self.sizes(x0)?;
        if !matches!(sizes[..], [_, _, e] if e == l.embed) {
            return Err(format!("an encoder layer input of shape {sizes:?} (Kiln takes batch-first [batch, seq, {}])", l.embed));
        }
        let err = |r: Result<ValueId, kiln_compiler::graph::ir::IrError>| r.map_err(|e| e.0);
        let x = if l.norm_first { self.layer_norm(x0, 1, l.norm1.0, l.norm1.1, l.eps)? } else { x0 };
        let attn = self.multi_head_attention([x, x, x], l.heads, l.embed, l.qkv, l.proj)?;
        let mut x = err(self.g.binary(BinaryOp::Add, attn, x0))?;
        if !l.norm_first {
            x = self.layer_norm(x, 1, l.norm1.0, l.norm1.1, l.eps)?;
        }
        let residual = x;
        if l.norm_first {
            x = self.layer_norm(x, 1, l.norm2.0, l.norm2.1, l.eps)?;
        }
        let hidden = self.linear(&Arg::Tensor(x), l.ffn1.0, l.ffn1.1)?;
        let hidden = err(self.g.unary(if l.gelu { UnaryOp::Gelu } else { UnaryOp::Relu }, hidden))?;
        let ff = self.linear(&Arg::Tensor(hidden), l.ffn2.0, l.ffn2.1)?;
        let mut x = err(self.g.binary(BinaryOp::Add, ff, residual))?;
        if !l.norm_first {
            x = self.layer_norm(x, 1, l.norm2.0, l.norm2.1, l.eps)?;
        }
        Ok(x)
    }

    /// Multi-head attention without a mask, batch first, as `_native_multi_head_attention`
    /// computes it: the packed input projection (one GEMM when query, key and value are one
    /// tensor, else one per weight third), heads as views, `attention` without a mask, the output
    /// projection.
    fn multi_head_attention(&mut self, [q, k, v]: [ValueId; 3], heads: i64, embed: i64, qkv: (&Arg, &Arg), proj: (&Arg, &Arg)) -> R<ValueId> {
        let err = |r: Result<ValueId, kiln_compiler::graph::ir::IrError>| r.map_err(|e| e.0);
        let (qs, ks) = (self.sizes(q)?, self.sizes(k)?);
        if qs.len() != 3 || ks.len() != 3 || self.sizes(v)? != ks || qs[2] != embed || ks[2] != embed || heads <= 0 || embed % heads != 0 || qs[0] != ks[0] {
            return Err(format!("attention over query {qs:?} and key {ks:?} (Kiln takes batch-first [batch, seq, {embed}])"));
        }
        let dh = embed / heads;
        let projected: Vec<ValueId> = if q == k && k == v {
            let packed = self.linear(&Arg::Tensor(q), qkv.0, qkv.1)?;
            (0..3).map(|i| err(self.g.slice(packed, 2, i * embed, embed))).collect::<R<_>>()?
        } else {
            let (w, bias) = (self.tensor(qkv.0)?, self.tensor(qkv.1)?);
            let mut out = vec![];
            for (i, x) in [q, k, v].into_iter().enumerate() {
                let wi = err(self.g.slice(w, 0, i as i64 * embed, embed))?;
                let bi = err(self.g.slice(bias, 0, i as i64 * embed, embed))?;
                out.push(self.linear(&Arg::Tensor(x), &Arg::Tensor(wi), &Arg::Tensor(bi))?);
            }
            out
        };
        // [batch, seq, heads, dh] viewed as [batch, heads, seq, dh].
        let mut hs = vec![];
        for part in projected {
            let sizes = self.sizes(part)?;
            let split = err(self.g.reshape(part, &[sizes[0], sizes[1], heads, dh]))?;
            hs.push(Arg::Tensor(err(self.g.permute(split, &[0, 2, 1, 3]))?));
        }
        let ctx = self.attention(&hs[0], &hs[1], &hs[2], &Arg::Const(Const::None), false, None)?;
        let ctx = err(self.g.permute(ctx, &[0, 2, 1, 3]))?;
        let ctx = err(self.g.reshape(ctx, &[qs[0], qs[1], embed]))?;
        self.linear(&Arg::Tensor(ctx), proj.0, proj.1)
    }

    /// gru_cell as ATen's `GRUCell` computes it: gates from both projections (chunks as
    /// slices), r = σ(h_r + i_r), z = σ(h_z + i_z), n = tanh(i_n + h_n·r), h' = (h - n)·z + n.
    fn gru_cell(&mut self, x: &Arg, hx: &Arg, ih: Projection, hh: Projection) -> R<ValueId> {
        let (xv, h) = (self.tensor(x)?, self.tensor(hx)?);
        if self.g.ty(xv).rank() != 2 || self.g.ty(h).rank() != 2 {
            return Err("an unbatched GRU cell (1-d input)".into());
        }
        let gi = self.project(x, ih)?;
        self.gru_step(gi, h, hh)
    }

    /// A GRU step from its input's projection `gi` (computed for the whole sequence at once,
    /// as ATen's layers on CPU do) and the state `h` [B, H].
    fn gru_step(&mut self, gi: ValueId, h: ValueId, hh: Projection) -> R<ValueId> {
        let n = self.sizes(h)?[1];
        let gh = self.project(&Arg::Tensor(h), hh)?;
        let e = |r: Result<ValueId, kiln_compiler::graph::ir::IrError>| r.map_err(|e| e.0);
        let mut part = |g: ValueId, i: i64| -> R<ValueId> { e(self.g.slice(g, 1, i * n, n)) };
        let (i_r, i_z, i_n) = (part(gi, 0)?, part(gi, 1)?, part(gi, 2)?);
        let (h_r, h_z, h_n) = (part(gh, 0)?, part(gh, 1)?, part(gh, 2)?);
        let r = e(self.g.binary(BinaryOp::Add, h_r, i_r))?;
        let r = e(self.g.unary(UnaryOp::Sigmoid, r))?;
        let z = e(self.g.binary(BinaryOp::Add, h_z, i_z))?;
        let z = e(self.g.unary(UnaryOp::Sigmoid, z))?;
        let hn = e(self.g.binary(BinaryOp::Mul, h_n, r))?;
        let new = e(self.g.binary(BinaryOp::Add, i_n, hn))?;
        let new = e(self.g.unary(UnaryOp::Tanh, new))?;
        let d = e(self.g.binary(BinaryOp::Sub, h, new))?;
        let d = e(self.g.binary(BinaryOp::Mul, d, z))?;
        e(self.g.binary(BinaryOp::Add, d, new))
    }

    /// lstm_cell as ATen's `LSTMCell` computes it: gates = (h·W_hhᵀ + b_hh) + (x·W_ihᵀ + b_ih) in
    /// four chunks i, f, g, o; c' = σ(f)·c + σ(i)·tanh(g), h' = σ(o)·tanh(c'). (h', c').
    fn lstm_cell(&mut self, x: &Arg, h: ValueId, c: ValueId, ih: Projection, hh: Projection) -> R<(ValueId, ValueId)> {
        let xv = self.tensor(x)?;
        if self.g.ty(xv).rank() != 2 {
            return Err("an unbatched LSTM cell (1-d input)".into());
        }
        let gi = self.project(x, ih)?;
        self.lstm_step(gi, h, c, hh)
    }

    /// An LSTM step from its input's projection `gi` and the state (h, c), each [B, H].
    fn lstm_step(&mut self, gi: ValueId, h: ValueId, c: ValueId, hh: Projection) -> R<(ValueId, ValueId)> {
        let hs = self.sizes(h)?;
        if hs.len() != 2 || self.sizes(c)? != hs {
            return Err("an LSTM state of other ranks, or a cell state of another shape".into());
        }
        let n = hs[1];
        let gh = self.project(&Arg::Tensor(h), hh)?;
        let e = |r: Result<ValueId, kiln_compiler::graph::ir::IrError>| r.map_err(|e| e.0);
        let gates = e(self.g.binary(BinaryOp::Add, gh, gi))?;
        let mut gate = |i: i64, op: UnaryOp| -> R<ValueId> {
            let part = e(self.g.slice(gates, 1, i * n, n))?;
            e(self.g.unary(op, part))
        };
        let (i, f, g, o) = (gate(0, UnaryOp::Sigmoid)?, gate(1, UnaryOp::Sigmoid)?, gate(2, UnaryOp::Tanh)?, gate(3, UnaryOp::Sigmoid)?);
        let fc = e(self.g.binary(BinaryOp::Mul, f, c))?;
        let ig = e(self.g.binary(BinaryOp::Mul, i, g))?;
        let cy = e(self.g.binary(BinaryOp::Add, fc, ig))?;
        let t = e(self.g.unary(UnaryOp::Tanh, cy))?;
        let hy = e(self.g.binary(BinaryOp::Mul, o, t))?;
        Ok((hy, cy))
    }

    /// Output `index` (of `count`) of a whole-sequence LSTM or GRU whose state is `hx` (an
    /// LSTM's [h, c] list, a GRU's h).
    #[allow(clippy::too_many_arguments)]
    fn sequence_output(&mut self, recurrence: Recurrence, x: &Arg, hx: &Arg, weights: &[ValueId], layout: Sequence, index: i64, count: i64) -> R<ValueId> {
        // (output and h_n, and an LSTM's c_n)
        let outputs = if recurrence == Recurrence::Lstm { 3 } else { 2 };
        if count != outputs || index < 0 || index >= outputs {
            return Err(format!("output {index} of {count} (the op has {outputs})"));
        }
        let state = match hx {
            Arg::List(hc, _) => hc.clone(),
            _ => vec![self.tensor(hx)?],
        };
        Ok(self.sequence(recurrence, x, &state, weights, layout)?[index as usize])
    }

    /// A whole-sequence RNN (`aten::quantized_lstm` / `quantized_gru`, `aten::lstm` / `gru`,
    /// input form) as ATen's `_lstm_impl` / `_rnn_impl` run it on CPU, unrolled: per layer
    /// and direction, the layer's whole input projected at once ([T, B, in] rows: one
    /// activation range when quantized), then each step's cell on its slice of that (the
    /// reverse direction from the last step), the outputs stacked (both directions
    /// concatenated on the last dim), the next layer reading them. `weights`: per cell
    /// (layer-major, forward before reverse) as `shape.weights` says. Returns (output,
    /// h_n[, c_n]); a batch-first output is the [T, B, H] result transposed
    /// (`sequence_strides`). (Eager's float32 LSTM is oneDNN's: the same math, rounded its
    /// own way.)
    fn sequence(&mut self, recurrence: Recurrence, x: &Arg, state: &[ValueId], weights: &[ValueId], shape: Sequence) -> R<Vec<ValueId>> {
        let per_cell = shape.weights.per_cell();
        let e = |r: Result<ValueId, kiln_compiler::graph::ir::IrError>| r.map_err(|e| e.0);
        let xv = self.tensor(x)?;
        if self.g.ty(xv).dtype != DType::F32 {
            return Err("an input that is not float32 (Kiln's RNNs are float32; a quantized one's eager raises)".into());
        }
        let xs = self.g.ty(xv).static_shape().ok_or("a sequence length or batch that changes between calls (Kiln unrolls the steps)")?;
        if xs.len() != 3 {
            return Err(format!("an input of {} dims (eager raises)", xs.len()));
        }
        let mut input = if shape.batch_first { e(self.g.permute(xv, &[1, 0, 2]))? } else { xv };
        let (steps, batch) = if shape.batch_first { (xs[1], xs[0]) } else { (xs[0], xs[1]) };
        let directions = if shape.bidirectional { 2 } else { 1 };
        let cells = shape.layers * directions;
        let held = if recurrence == Recurrence::Lstm { 2 } else { 1 };
        if steps == 0 {
            return Err("an empty sequence (eager raises)".into());
        }
        if steps * cells > MAX_UNROLLED_STEPS {
            return Err(format!("{steps} steps × {cells} cells (Kiln unrolls at most {MAX_UNROLLED_STEPS} cell steps in a group)"));
        }
        if shape.layers < 1 || weights.len() as i64 != per_cell as i64 * cells || state.len() != held {
            return Err("cell weights or states of another number than the layers need (eager raises)".into());
        }
        // (w_hh is [gates · H, H] either way.)
        let hidden = self.sizes(weights[if per_cell == 8 { 4 } else { 1 }])?[1];
        for &s in state {
            if self.sizes(s)? != [cells, batch, hidden] {
                return Err(format!("a state of shape {:?} (eager raises or broadcasts it)", self.sizes(s)?));
            }
        }
        let arg = |v: ValueId| Arg::Tensor(v);
        let mut finals: Vec<Vec<ValueId>> = vec![vec![]; held];
        for layer in 0..shape.layers {
            let mut outputs = vec![];
            for direction in 0..directions {
                let cell = (layer * directions + direction) as usize;
                let w: Vec<Arg> = weights[per_cell * cell..per_cell * (cell + 1)].iter().map(|&v| arg(v)).collect();
                let none = Arg::Const(Const::None);
                let (ih, hh) = match shape.weights {
                    CellWeights::Quantized { reduce_range } => {
                        (Projection::Quantized([&w[0], &w[1], &w[2], &w[3]], reduce_range), Projection::Quantized([&w[4], &w[5], &w[6], &w[7]], reduce_range))
                    }
                    CellWeights::Float { biases: true } => (Projection::Float(&w[0], &w[2]), Projection::Float(&w[1], &w[3])),
                    CellWeights::Float { biases: false } => (Projection::Float(&w[0], &none), Projection::Float(&w[1], &none)),
                };
                let gi = self.project(&arg(input), ih)?;
                let width = self.sizes(gi)?[2];
                let mut held_state = vec![];
                for &s in state {
                    let one = e(self.g.slice(s, 0, cell as i64, 1))?;
                    held_state.push(e(self.g.reshape(one, &[batch, hidden]))?);
                }
                let mut step_outputs = vec![None; steps as usize];
                let order: Vec<i64> = if direction == 0 { (0..steps).collect() } else { (0..steps).rev().collect() };
                for t in order {
                    let gi_t = e(self.g.slice(gi, 0, t, 1))?;
                    let gi_t = e(self.g.reshape(gi_t, &[batch, width]))?;
                    held_state = match recurrence {
                        Recurrence::Lstm => {
                            let (h, c) = self.lstm_step(gi_t, held_state[0], held_state[1], hh)?;
                            vec![h, c]
                        }
                        Recurrence::Gru => vec![self.gru_step(gi_t, held_state[0], hh)?],
                    };
                    step_outputs[t as usize] = Some(e(self.g.reshape(held_state[0], &[1, batch, hidden]))?);
                }
                let parts: Vec<ValueId> = step_outputs.into_iter().map(|v| v.expect("every step ran")).collect();
                outputs.push(if parts.len() == 1 { parts[0] } else { e(self.g.cat(&parts, 0))? });
                for (f, s) in finals.iter_mut().zip(held_state) {
                    f.push(e(self.g.reshape(s, &[1, batch, hidden]))?);
                }
            }
            input = if outputs.len() == 1 { outputs[0] } else { e(self.g.cat(&outputs, 2))? };
        }
        let output = if shape.batch_first { e(self.g.permute(input, &[1, 0, 2]))? } else { input };
        let mut results = vec![self.fresh(output)];
        for f in finals {
            let stacked = if f.len() == 1 { f[0] } else { e(self.g.cat(&f, 0))? };
            results.push(self.fresh(stacked));
        }
        Ok(results)
    }

    /// A bool [rows, cols] mask: column - row `cmp` diagonal (triu: ≥, tril and causal: ≤).
    fn band(&mut self, rc: &[i64], diagonal: i64, cmp: CmpOp) -> R<ValueId> {
        let e = |r: Result<ValueId, kiln_compiler::graph::ir::IrError>| r.map_err(|e| e.0);
        let row = e(self.g.iota(rc, 0))?;
        let col = e(self.g.iota(rc, 1))?;
        let offset = e(self.g.binary(BinaryOp::Sub, col, row))?;
        let d = self.g.constant(Scalar::Int(diagonal), DType::I64);
        e(self.g.compare(cmp, offset, d))
    }

    /// scaled_dot_product_attention as PyTorch's math reference computes it: softmax(q·kᵀ ·
    /// scale + mask)·v, the scale 1/√E by default; a causal mask keeps column ≤ row; a bool
    /// mask keeps where it is true. A row with nothing kept is zero, as eager's CPU kernels
    /// return it (no NaN).
    fn attention(&mut self, q: &Arg, k: &Arg, v: &Arg, mask: &Arg, causal: bool, scale: Option<f64>) -> R<ValueId> {
        let e = |r: Result<ValueId, kiln_compiler::graph::ir::IrError>| r.map_err(|e| e.0);
        let (qv, kv) = (self.tensor(q)?, self.tensor(k)?);
        let (qs, ks) = (self.sizes(qv)?, self.sizes(kv)?);
        let (r, rk) = (qs.len(), ks.len());
        if r < 2 || rk < 2 || qs[r - 1] != ks[rk - 1] {
            return Err(format!("attention of a query {qs:?} and key {ks:?}"));
        }
        let d = self.g.ty(qv).dtype;
        let mut order: Vec<usize> = (0..rk).collect();
        order.swap(rk - 2, rk - 1);
        let kt = e(self.g.permute(kv, &order))?;
        let scores = self.matmul(q, &Arg::Tensor(kt), None)?;
        let scale = self.g.constant(Scalar::Float(scale.unwrap_or(1.0 / (qs[r - 1] as f64).sqrt())), d);
        let mut scores = e(self.g.binary(BinaryOp::Mul, scores, scale))?;
        let rank = self.g.ty(scores).rank();
        let (l, s) = (qs[r - 2], ks[rk - 2]);
        let ninf = self.g.constant(Scalar::Float(f64::NEG_INFINITY), d);
        let mut may_empty = false;
        match mask {
            Arg::Const(Const::None) => {}
            _ if causal => return Err("a mask with is_causal (eager raises)".into()),
            Arg::Tensor(m) if self.g.ty(*m).dtype == DType::Bool => {
                scores = e(self.g.where_(*m, scores, ninf))?;
                may_empty = true;
            }
            Arg::Tensor(m) if self.g.ty(*m).dtype == d => {
                scores = e(self.g.binary(BinaryOp::Add, scores, *m))?;
                may_empty = true;
            }
            _ => return Err("a mask that is neither bool nor of the query's dtype".into()),
        }
        if self.g.ty(scores).rank() != rank {
            return Err("a mask of more dims than the scores (eager raises)".into());
        }
        if causal {
            let keep = self.band(&[l, s], 0, CmpOp::Le)?;
            scores = e(self.g.where_(keep, scores, ninf))?;
        }
        let mut p = e(self.g.softmax(scores, rank - 1, false))?;
        if may_empty {
            let top = e(self.g.reduce(ReduceOp::Max, scores, &[rank - 1], true))?;
            let empty = e(self.g.compare(CmpOp::Eq, top, ninf))?;
            let zero = self.g.constant(Scalar::Float(0.0), d);
            p = e(self.g.where_(empty, zero, p))?;
        }
        self.matmul(&Arg::Tensor(p), v, None)
    }

    /// torch.matmul of two tensors of rank ≥ 2 (`rank`: mm and bmm's exact rank). Operands
    /// must share a float dtype (eager raises otherwise: left to it).
    fn matmul(&mut self, x: &Arg, y: &Arg, rank: Option<usize>) -> R<ValueId> {
        let (a, b) = (self.tensor(x)?, self.tensor(y)?);
        let (ta, tb) = (self.g.ty(a).clone(), self.g.ty(b).clone());
        if ta.dtype != tb.dtype || !matches!(ta.dtype, DType::F32 | DType::F64) {
            return Err(format!("operands {} and {} (Kiln multiplies float32 or float64 of one dtype)", ta.dtype, tb.dtype));
        }
        if let Some(r) = rank {
            if ta.rank() != r || tb.rank() != r {
                return Err(format!("operands of rank {} and {} (expected {r})", ta.rank(), tb.rank()));
            }
            if r == 3 && ta.shape[0] != tb.shape[0] {
                return Err("bmm of different batch sizes".into());
            }
        }
        if rank.is_none() && (ta.rank() == 1 || tb.rank() == 1) && ta.rank() >= 1 && tb.rank() >= 1 {
            // A vector is a matrix of one row (left) or one column (right), removed from the
            // result again, as torch.matmul does; the result is stored (eager's is new
            // memory, never a view of the product).
            let e = |r: Result<ValueId, kiln_compiler::graph::ir::IrError>| r.map_err(|e| e.0);
            let (sa, sb) = (self.sizes(a)?, self.sizes(b)?);
            let a2 = if sa.len() == 1 { e(self.g.reshape(a, &[1, sa[0]]))? } else { a };
            let b2 = if sb.len() == 1 { e(self.g.reshape(b, &[sb[0], 1]))? } else { b };
            if self.g.ty(a2).rank() == 2 && self.g.ty(b2).rank() > 2 && sa.len() != 1 {
                return Err("a matrix times a batch of matrices is not supported yet".into());
            }
            let p = e(self.g.matmul(a2, b2))?;
            let mut out = self.sizes(p)?;
            let r = out.len();
            if sb.len() == 1 {
                out.remove(r - 1);
            }
            if sa.len() == 1 {
                out.remove(r - 2);
            }
            let v = e(self.g.reshape(p, &out))?;
            return Ok(self.g.copy(v));
        }
        if ta.rank() < 2 || tb.rank() < 2 {
            return Err("a 0-d operand (eager raises)".into());
        }
        if ta.rank() == 2 && tb.rank() > 2 {
            // Eager computes this as a transposed product and returns a transposed result.
            return Err("a matrix times a batch of matrices is not supported yet".into());
        }
        Ok(self.g.matmul(a, b).map_err(|e| e.0)?)
    }

    /// Product `p` (of something and `w`ᵀ) over a sparse B where `w` is a constant weight
    /// whose zeros a sparse format skips faster than the dense kernel runs
    /// (`kernels::sparse::choose`, for all of `p`'s rows); the choice and its reason are kept
    /// for `explain()`.
    fn skip_zeros_of(&mut self, w: ValueId, p: ValueId) {
        let Some(facts) = self.weights.get(&w) else { return };
        if !matches!(self.g.node(p).op, Op::MatMul { .. }) || self.g.ty(p).dtype != DType::F32 {
            return;
        }
        let shape = self.g.ty(p).static_shape().unwrap_or_default();
        let m = shape.iter().rev().skip(1).product::<i64>();
        // `KILN_SPARSE_WEIGHTS=0`: the dense kernel for every weight (what the benchmarks
        // compare the sparse kernels with; read per lowering, and in the graph's text).
        if std::env::var("KILN_SPARSE_WEIGHTS").as_deref() == Ok("0") {
            self.weight_choices.push(format!("weight {}x{} of %{}: dense (KILN_SPARSE_WEIGHTS=0)", facts.rows, facts.cols, p.0));
            return;
        }
        // `KILN_WEIGHTS_IN_CODE=0`: no weight's values in code, so that every entry serves
        // any weights of its shapes and choice (a cache prewarmed to ship with retrained
        // weights).
        let mut facts = kiln_compiler::kernels::sparse::WeightFacts::clone(facts);
        if std::env::var("KILN_WEIGHTS_IN_CODE").as_deref() == Ok("0") {
            facts.key = None;
        }
        let choice = kiln_compiler::kernels::sparse::choose(&facts, true, kiln_compiler::kernels::gemm::host_lanes(), m);
        self.weight_choices.push(format!("weight {}x{} of %{}: {}", facts.rows, facts.cols, p.0, choice.reason));
        if let Some(format) = choice.format {
            self.g.nodes[p.0 as usize].op = Op::MatMul { sparse_b: Some(format) };
        }
    }

    /// linear(x, w, bias) = x · wᵀ + bias.
    fn linear(&mut self, x: &Arg, w: &Arg, bias: &Arg) -> R<ValueId> {
        let wv = self.tensor(w)?;
        if self.g.ty(wv).rank() != 2 {
            return Err("a weight that is not a matrix".into());
        }
        let wt = self.g.permute(wv, &[1, 0]).map_err(|e| e.0)?;
        let p = self.matmul(x, &Arg::Tensor(wt), None)?;
        self.skip_zeros_of(wv, p);
        match bias {
            Arg::Const(Const::None) => Ok(p),
            Arg::Tensor(b) if self.g.ty(*b).dtype == self.g.ty(p).dtype => Ok(self.g.binary(BinaryOp::Add, p, *b).map_err(|e| e.0)?),
            _ => Err("a bias of another dtype".into()),
        }
    }

    /// A statically quantized value of the group and its parameters.
    fn quantized(&self, x: &Arg) -> R<(ValueId, QuantParams)> {
        match x {
            Arg::Tensor(t) => self.quant.get(t).map(|p| (*t, *p)).ok_or_else(|| "an operand that is not a quantized tensor of the group".into()),
            _ => Err("an operand that is not a tensor".into()),
        }
    }

    /// (q − zero point) · scale in float32, as ATen's dequantize.
    fn dequantized(&mut self, q: ValueId, p: QuantParams) -> R<ValueId> {
        let zp = self.g.constant(Scalar::Int(p.zero_point as i64), DType::F32);
        let scale = self.g.constant(Scalar::Float(p.scale as f64), DType::F32);
        let centered = self.g.binary(BinaryOp::Sub, q, zp).map_err(|e| e.0)?;
        Ok(self.g.binary(BinaryOp::Mul, centered, scale).map_err(|e| e.0)?)
    }

    /// x's leading dims flattened into the rows of a matrix (x itself when it is one), and x's
    /// sizes: the rows of a linear's product.
    fn as_rows(&mut self, x: ValueId) -> R<(ValueId, Vec<i64>)> {
        let shape = self.g.ty(x).static_shape().ok_or("symbolic sizes")?;
        if shape.len() < 2 {
            return Err("an input that is not a matrix or batch of them (eager raises)".into());
        }
        let k = shape[shape.len() - 1];
        let rows: i64 = shape[..shape.len() - 1].iter().product();
        let x2 = if shape.len() == 2 { x } else { self.g.reshape(x, &[rows, k]).map_err(|e| e.0)? };
        Ok((x2, shape))
    }

    /// A product `y` of `as_rows(x)` with x's leading dims back (`y` where x is a matrix).
    fn in_rows_of(&mut self, y: ValueId, x_shape: &[i64]) -> R<ValueId> {
        if x_shape.len() == 2 {
            return Ok(y);
        }
        let mut shape = x_shape.to_vec();
        *shape.last_mut().unwrap() = self.sizes(y)?[1];
        Ok(self.g.reshape(y, &shape).map_err(|e| e.0)?)
    }

    /// Float32 `x` quantized with parameters `p`: a quantized value of the group.
    fn quantized_as(&mut self, x: ValueId, p: QuantParams) -> R<ValueId> {
        let q = self.g.quantize(x, p).map_err(|e| e.0)?;
        self.quant.insert(q, p);
        Ok(q)
    }

    /// Quantized `q` (parameters `p`) in the parameters `out`: dequantized, then quantized.
    fn requantized(&mut self, q: ValueId, p: QuantParams, out: QuantParams) -> R<ValueId> {
        let d = self.dequantized(q, p)?;
        self.quantized_as(d, out)
    }

    /// An int8 weight's line in explain(): its sizes, scales and how the activations are
    /// quantized.
    fn explain_weight(&mut self, w: ValueId, scale: ValueId, y: ValueId, activations: &str) -> R<()> {
        // (Once per weight: an unrolled RNN multiplies by its hh weight at every step.)
        if !self.explained.insert(w) {
            return Ok(());
        }
        let sizes = self.sizes(w)?.iter().map(i64::to_string).collect::<Vec<_>>().join("x");
        let per = if self.sizes(scale)? == [1] { "per tensor" } else { "per output channel" };
        self.weight_choices.push(format!("weight {sizes} of %{}: int8 ({per}), {activations}", y.0));
        Ok(())
    }

    /// A statically quantized linear (`quantized::linear(_relu)`, unpacked by the pass:
    /// `kiln::linear_quantized`): x's leading dims the rows of the int8 product, requantized
    /// to the output's parameters.
    fn linear_quantized(&mut self, x: &Arg, [w, scale, zero_point, bias]: [&Arg; 4], out: QuantParams, relu: bool) -> R<ValueId> {
        let (x, pa) = self.quantized(x)?;
        let (w, scale, zero_point) = (self.tensor(w)?, self.tensor(scale)?, self.tensor(zero_point)?);
        let (x2, shape) = self.as_rows(x)?;
        let wt = self.g.permute(w, &[1, 0]).map_err(|e| e.0)?;
        let y = self.g.quantized_product(x2, wt, scale, zero_point, optional_tensor(bias), pa, out, relu, None, fbgemm::gemm_sums()).map_err(|e| e.0)?;
        self.explain_weight(w, scale, y, STATIC_ACTIVATIONS)?;
        let y = self.in_rows_of(y, &shape)?;
        self.quant.insert(y, out);
        Ok(y)
    }

    /// A statically quantized convolution (`quantized::conv2d(_relu)`, unpacked by the pass:
    /// `kiln::conv2d_quantized`): of one group, the int8 product over x's windows (its zero
    /// point as the padding), computed channels-last as fbgemm does, viewed as [N, O, OH, OW];
    /// depthwise (one input channel per group), a chain of pointwise ops (`depthwise_int8`).
    #[allow(clippy::too_many_arguments)]
    fn conv2d_quantized(&mut self, x: &Arg, [w, scale, zero_point, bias]: [&Arg; 4], stride: [i64; 2], padding: [i64; 2], dilation: [i64; 2], groups: Groups, out: QuantParams, relu: bool) -> R<ValueId> {
        let (x, pa) = self.quantized(x)?;
        let (w, scale, zero_point) = (self.tensor(w)?, self.tensor(scale)?, self.tensor(zero_point)?);
        let (xs, ws) = (self.sizes(x)?, self.sizes(w)?);
        if xs.len() != 4 || ws.len() != 4 {
            return Err("an input that is not N, C, H, W (eager raises)".into());
        }
        let window = ConvWindow { kernel: [ws[2], ws[3]], stride, dilation, padding: [padding[0], padding[0], padding[1], padding[1]] };
        let [oh, ow] = window.output_size(xs[2], xs[3]).ok_or("a window larger than the padded input (eager raises)")?;
        if groups.count != 1 {
            if groups.count != xs[1] {
                return Err(format!("a grouped quantized convolution with {} input channels per group (Kiln takes 1 or all)", xs[1] / groups.count.max(1)));
            }
            let weight = depthwise_int8::DepthwiseWeight { w, scale, zero_point: (!groups.symmetric).then_some(zero_point), bias: optional_tensor(bias) };
            let y = self.depthwise_quantized(x, pa, weight, window, out, relu)?;
            self.explain_weight(w, scale, y, "depthwise: a chain of exact integer steps as fbgemm's kernel sums them")?;
            return Ok(y);
        }
        let y = self.g.quantized_product(x, w, scale, zero_point, optional_tensor(bias), pa, out, relu, Some(window), fbgemm::gemm_sums()).map_err(|e| e.0)?;
        self.explain_weight(w, scale, y, STATIC_ACTIVATIONS)?;
        let y = self.g.reshape(y, &[xs[0], oh, ow, ws[0]]).map_err(|e| e.0)?;
        let y = self.g.permute(y, &[0, 3, 1, 2]).map_err(|e| e.0)?;
        self.quant.insert(y, out);
        Ok(y)
    }

    /// A dynamically quantized linear (`quantized::linear_dynamic`, as the pass unpacked it:
    /// `kiln::linear_dynamic` in the shim): x's leading dims flattened into the rows of the
    /// int8 product (the whole tensor shares one scale) with its float bias, then the relu of
    /// `linear_relu_dynamic`, as fbgemm applies them.
    fn linear_dynamic(&mut self, x: &Arg, [w, scale, zero_point, bias]: [&Arg; 4], reduce_range: bool, relu: bool) -> R<ValueId> {
        let (x, w, scale, zero_point) = (self.tensor(x)?, self.tensor(w)?, self.tensor(scale)?, self.tensor(zero_point)?);
        if self.g.ty(x).dtype != DType::F32 {
            return Err("an input that is not float32 (eager raises)".into());
        }
        let (x2, shape) = self.as_rows(x)?;
        let wt = self.g.permute(w, &[1, 0]).map_err(|e| e.0)?;
        let mut y = self.g.qmatmul_dynamic(x2, wt, scale, zero_point, optional_tensor(bias), reduce_range).map_err(|e| e.0)?;
        self.explain_weight(w, scale, y, "activations quantized per call to 7 bits as fbgemm does")?;
        if relu {
            y = self.g.unary(UnaryOp::Relu, y).map_err(|e| e.0)?;
        }
        if shape.len() == 2 {
            return Ok(y);
        }
        // A copy, since a group never returns a view (eager's result is a tensor of its own).
        let y = self.in_rows_of(y, &shape)?;
        Ok(self.g.copy(y))
    }

    /// An RNN cell's x · Wᵀ + b: float32 (`linear`), or dynamically quantized as ATen's
    /// `QuantizedCellParamsDynamic` computes it (`linear_dynamic`, reduce_range).
    fn project(&mut self, x: &Arg, p: Projection) -> R<ValueId> {
        match p {
            Projection::Float(w, b) => self.linear(x, w, b),
            Projection::Quantized(wszb, reduce_range) => self.linear_dynamic(x, wszb, reduce_range, false),
        }
    }

    /// beta · bias + alpha · p (addmm, baddbmm): eager skips the bias when beta is 0 (so a NaN
    /// in it does not propagate).
    fn scaled_sum(&mut self, p: ValueId, bias: &Arg, beta: &Arg, alpha: &Arg) -> R<ValueId> {
        let d = self.g.ty(p).dtype;
        let bias = self.tensor(bias)?;
        if self.g.ty(bias).dtype != d {
            return Err("a bias of another dtype".into());
        }
        let (beta, alpha) = (scalar(const_of(beta)?)?.as_f64(), scalar(const_of(alpha)?)?.as_f64());
        let p = if alpha == 1.0 {
            p
        } else {
            let a = self.g.constant(Scalar::Float(alpha), d);
            self.g.binary(BinaryOp::Mul, p, a).map_err(|e| e.0)?
        };
        if beta == 0.0 {
            return Ok(p);
        }
        let bias = if beta == 1.0 {
            bias
        } else {
            let b = self.g.constant(Scalar::Float(beta), d);
            self.g.binary(BinaryOp::Mul, bias, b).map_err(|e| e.0)?
        };
        Ok(self.g.binary(BinaryOp::Add, bias, p).map_err(|e| e.0)?)
    }

    fn to(&mut self, x: &Arg, dtype: &Arg) -> R<ValueId> {
        match dtype_arg(dtype)? {
            Some(d) => self.cast_to(x, d),
            None => Err("conversion without a dtype".into()),
        }
    }

    /// The op takes floating point only in PyTorch (an integer input is an error there).
    fn float_only(&self, x: &Arg) -> R<ValueId> {
        let v = self.tensor(x)?;
        if !self.g.ty(v).dtype.is_float() {
            return Err(format!("takes floating point, got {}", self.g.ty(v).dtype));
        }
        Ok(v)
    }

    /// Ops that keep their input's dtype (neg, abs, relu); PyTorch rejects them on bool.
    fn unary_same(&mut self, op: UnaryOp, x: &Arg) -> R<ValueId> {
        let x = self.tensor(x)?;
        Ok(self.g.unary(op, x).map_err(|e| e.0)?)
    }
}

fn scalar(c: &Const) -> R<Scalar> {
    match c {
        Const::Bool(b) => Ok(Scalar::Bool(*b)),
        Const::Int(i) => Ok(Scalar::Int(*i)),
        Const::Float(f) => Ok(Scalar::Float(*f)),
        c => Err(format!("expected a number, got {c:?}")),
    }
}

/// How a static product's activations are quantized, for explain().
const STATIC_ACTIVATIONS: &str = "static activations, requantized to uint8 as fbgemm does";

/// A quantized op's scale and zero point, as ATen takes them (the double scale as float).
fn quant_params(scale: &Const, zero_point: i64) -> R<QuantParams> {
    Ok(QuantParams { scale: scalar(scale)?.as_f64() as f32, zero_point: zero_point as i32 })
}

/// A quantized convolution's groups, and whether its weight's zero points are all 0 (the pass
/// looked: the depthwise chain then skips their term).
#[derive(Clone, Copy)]
struct Groups {
    count: i64,
    symmetric: bool,
}

/// An optional tensor argument (a bias): None unless it is a tensor.
fn optional_tensor(a: &Arg) -> Option<ValueId> {
    match a {
        Arg::Tensor(t) => Some(*t),
        _ => None,
    }
}

fn const_of(a: &Arg) -> R<&Const> {
    match a {
        Arg::Const(c) => Ok(c),
        Arg::Tensor(_) => Err("a tensor where a number was expected".into()),
        Arg::Number(_) => Err("a number computed at run time where a constant was expected".into()),
        Arg::List(..) => Err("a list where a number was expected".into()),
    }
}

fn wrap_dim(d: i64, rank: usize) -> R<usize> {
    let r = rank.max(1) as i64;
    if d < -r || d >= r {
        return Err(format!("dim {d} out of range for rank {rank}"));
    }
    Ok(d.rem_euclid(r) as usize)
}

fn bool_arg(a: &Arg) -> R<bool> {
    match a {
        Arg::Const(Const::Bool(b)) => Ok(*b),
        _ => Err("keepdim is not a constant bool".into()),
    }
}

/// A `ScalarType?` argument: None, or c10::ScalarType's number.
fn dtype_arg(a: &Arg) -> R<Option<DType>> {
    match a {
        Arg::Const(Const::None) => Ok(None),
        Arg::Const(Const::Int(code)) => {
            let d = i32::try_from(*code).ok().and_then(dtype_from_code);
            d.map(Some).ok_or_else(|| format!("dtype code {code} is not supported"))
        }
        _ => Err("dtype is not a constant".into()),
    }
}

/// c10::ScalarType's number for a dtype (what the C++ side allocates outputs with).
pub fn scalar_type_code(d: DType) -> i32 {
    match d {
        DType::I32 => 3,
        DType::I64 => 4,
        DType::F32 => 6,
        DType::F64 => 7,
        DType::Bool => 11,
    }
}

/// The dtype for c10::ScalarType's number, if Kiln supports it.
pub fn dtype_from_code(code: i32) -> Option<DType> {
    match code {
        3 => Some(DType::I32),
        4 => Some(DType::I64),
        6 => Some(DType::F32),
        7 => Some(DType::F64),
        11 => Some(DType::Bool),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ts_dump::parse;
    use expect_test::{expect, Expect};

    fn check(dump: &str, want: Expect) {
        let out = match parse(dump).and_then(|r| lower(&r)) {
            Ok(l) => format!("{}", kiln_compiler::graph::passes::optimize(&l.graph)),
            Err(e) => format!("error: {e}\n"),
        };
        want.assert_eq(&out);
    }

    #[test]
    fn promotes_int_tensor_with_float_scalar() {
        check(
            "input %0 i32 [3] [1]\nconst %1 float 0.5\nnode %2 aten::mul %0 %1 : f32 [3]\noutput %2",
            expect![[r#"
                graph(%0: i32[3]) {
                  %1 = cast(%0) : f32[3]
                  %2 = constant(0.5) : f32[]
                  %3 = mul(%1, %2) : f32[3]
                  return (%3)
                }
            "#]],
        );
    }

    #[test]
    fn zero_dim_tensor_does_not_promote_a_dim_tensor() {
        check(
            "input %0 f32 [2] [1]\ninput %1 f64 [] []\nconst %2 int 1\nnode %3 aten::sub %0 %1 %2 : f32 [2]\noutput %3",
            expect![[r#"
                graph(%0: f32[2], %1: f64[]) {
                  %2 = cast(%1) : f32[]
                  %3 = sub(%0, %2) : f32[2]
                  return (%3)
                }
            "#]],
        );
    }

    #[test]
    fn integer_sum_accumulates_in_int64_and_dims_wrap() {
        check(
            "input %0 i32 [2,3] [3,1]\nconst %1 ints -1\nconst %2 bool 1\nconst %3 none\nnode %4 aten::sum %0 %1 %2 %3 : i64 [2,1]\noutput %4",
            expect![[r#"
                graph(%0: i32[2, 3]) {
                  %1 = cast(%0) : i64[2, 3]
                  %2 = sum(%1) dims=[1] keepdim=true : i64[2, 1]
                  return (%2)
                }
            "#]],
        );
    }

    #[test]
    fn static_quantization_stays_inside_the_group() {
        // quantize_per_tensor → relu → dequantize: uint8 values held as float32 in between.
        check(
            "input %0 f32 [4] [1]\nconst %1 float 0.5\nconst %2 int 3\nconst %3 int 13\nnode %4 aten::quantize_per_tensor %0 %1 %2 %3\nnode %5 aten::relu %4\nnode %6 aten::dequantize %5\noutput %6",
            expect![[r#"
                graph(%0: f32[4]) {
                  %1 = quantize(%0) scale=0.5 zero_point=3 : f32[4]
                  %2 = constant(3.0) : f32[]
                  %3 = max(%1, %2) : f32[4]
                  %4 = constant(0.5) : f32[]
                  %5 = sub(%3, %2) : f32[4]
                  %6 = mul(%5, %4) : f32[4]
                  return (%6)
                }
            "#]],
        );
        // A quantized result would leave the group: refused, unless only shape ops read it.
        let dump = "input %0 f32 [4] [1]\nconst %1 float 0.5\nconst %2 int 3\nconst %3 int 13\nnode %4 aten::quantize_per_tensor %0 %1 %2 %3\nnode %5 aten::dequantize %4\noutput %5\noutput %4";
        check(dump, expect![[r#"
            error: a quantized tensor leaves the group (Kiln's groups take and return float tensors: the op using it stays in TorchScript)
        "#]]);
        assert!(parse(&format!("{dump} shape_only")).and_then(|r| lower(&r)).is_ok());
        // Another op on a quantized tensor: not Kiln's.
        check(
            "input %0 f32 [4] [1]\nconst %1 float 0.5\nconst %2 int 3\nconst %3 int 13\nnode %4 aten::quantize_per_tensor %0 %1 %2 %3\nnode %5 aten::sigmoid %4\nnode %6 aten::dequantize %5\noutput %6",
            expect![[r#"
                error: aten::sigmoid of a quantized tensor (Kiln computes quantize_per_tensor, dequantize, the quantized convolutions, linears, adds and cat, relu, max_pool2d, adaptive_avg_pool2d to 1×1 and views on quantized tensors)
            "#]],
        );
    }

    #[test]
    fn disagreement_with_torchscript_types_rejects() {
        check(
            "input %0 f32 [3] [1]\nnode %1 aten::exp %0 : f64 [3]\noutput %1",
            expect![[r#"
                error: aten::exp: Kiln infers f32[3], TorchScript recorded f64[3]
            "#]],
        );
    }

    #[test]
    fn unsupported_things_say_why() {
        check("input %0 f32 [3] [1]\nconst %1 str floor\nnode %2 aten::div %0 %0 %1\noutput %2", expect![[r#"
            error: aten::div: this overload (3 arguments) is not supported
        "#]]);
        check("input %0 Half [3] [1]\nnode %1 aten::exp %0\noutput %1", expect![[r#"
            error: dtype Half is not supported
        "#]]);
        check("input %0 i64 [3] [1]\nnode %1 aten::silu %0\noutput %1", expect![[r#"
            error: aten::silu: takes floating point, got i64
        "#]]);
    }

    #[test]
    fn promote_matches_torch() {
        use DType::*;
        assert_eq!(promote(I32, F32), F32);
        assert_eq!(promote(I64, I32), I64);
        assert_eq!(promote(Bool, I32), I32);
        assert_eq!(promote(F64, I64), F64);
        assert_eq!(promote(F32, F64), F64);
    }
}
