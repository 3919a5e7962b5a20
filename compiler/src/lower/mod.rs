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
//! (`Graph::output_orders`), dense; intermediates are row-major, except the images computed
//! from convolutions, which are channels-last ([`channels_last_temps`]).

use crate::dtype::DType;
use crate::graph::ir::{Graph, Op, ValueId};
use crate::graph::layout::{dense_strides, is_row_major, row_major, DimOrder};
use crate::lower::loop_ir::*;
use kernel_builder::{KernelBuilder, Target};
use std::collections::HashMap;

pub mod epilogue;
pub mod kernel_builder;
pub mod loop_ir;
pub mod materialize;
pub mod memory_plan;
pub mod schedule;
pub mod symbolic;
pub mod views;

#[derive(thiserror::Error, Debug, Clone, PartialEq)]
pub enum LowerError {
    #[error("graph shapes must be concrete (code for symbolic sizes is derived from concrete lowerings: symbolic.rs)")]
    Symbolic,
    #[error("input {0} has {1} strides for rank {2}")]
    BadStrides(usize, usize, usize),
    #[error("{0}")]
    Unsupported(String),
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
    for (i, &v) in g.inputs.iter().enumerate() {
        if input_strides.get(i).map(Vec::len) != Some(g.ty(v).rank()) {
            return Err(LowerError::BadStrides(i, input_strides.get(i).map_or(0, Vec::len), g.ty(v).rank()));
        }
    }
    let copied = views::with_input_copies(g, input_strides);
    let g = copied.as_ref().unwrap_or(g);
    let shape_of = |v: ValueId| g.ty(v).static_shape().ok_or(LowerError::Symbolic);
    for n in &g.nodes {
        n.ty.static_shape().ok_or(LowerError::Symbolic)?;
    }
    let mut buffers = vec![];
    let mut buf_of: HashMap<ValueId, Target> = HashMap::new();
    for (i, &v) in g.inputs.iter().enumerate() {
        let sizes = shape_of(v)?;
        // (Ranks were checked on entry.)
        buf_of.insert(v, (BufId(buffers.len() as u32), input_strides[i].clone()));
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
    // Images computed from convolutions are kept channels-last (an order the stores follow).
    for v in channels_last_temps(g) {
        output_order.entry(v).or_insert_with(|| vec![0, 2, 3, 1]);
    }
    // Non-pointwise nodes and materialised pointwise values that are not outputs become temps;
    // offsets come from the memory plan.
    let mut materialised = crate::lower::materialize::choose(g);
    // Views read their input's buffer; slices, reshapes that copy and matmul operands need
    // one (views.rs).
    let layouts = views::plan(g, input_strides, &output_order, &mut materialised);
    let materialised = materialised;
    let buffered = |v: ValueId| !g.node(v).op.is_pointwise() || materialised.contains(&v);
    for (i, n) in g.nodes.iter().enumerate() {
        let v = ValueId(i as u32);
        if buffered(v) && !buf_of.contains_key(&v) && !matches!(n.op, Op::Input(_)) {
            let sizes = shape_of(v)?;
            let order = output_order.get(&v).cloned().unwrap_or_else(|| row_major(sizes.len()));
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
        let b = KernelBuilder::new(g, &buf_of, &materialised, &layouts, format!("k{}", kernels.len()));
        match &n.op {
            Op::Reduce { op, dims, keepdim } => kernels.push(b.reduction(v, *op, dims, *keepdim)),
            Op::Softmax { dim, log } => kernels.push(b.softmax(v, *dim, *log)),
            Op::Conv2d { kernel, stride, dilation, padding } => {
                let shape = conv_gemm_shape(g, v, &b, *kernel, *stride, *dilation, *padding);
                kernels.push(b.gemm(v, shape))
            }
            Op::MatMul { .. } => match gemm_shape(g, v, &b) {
                Some(shape) => kernels.push(b.gemm(v, shape)),
                None => kernels.push(b.matmul_loops(v)),
            },
            Op::QuantizedMatMul { reduce_range } => {
                let shape = quantized_gemm_shape(g, v, &b, *reduce_range, None, None)?;
                kernels.push(b.gemm(v, shape))
            }
            Op::QuantizedProduct { a, out, relu, conv, sums } => {
                let product = crate::kernels::quantized::StaticProduct { a: a.bits(), out: out.bits(), relu: *relu };
                let mut shape = quantized_gemm_shape(g, v, &b, true, Some(product), Some(*sums))?;
                if let Some(w) = conv {
                    quantized_windows(g, v, &b, w, &mut shape)?;
                }
                kernels.push(b.gemm(v, shape))
            }
            Op::Cat { dim } => {
                let mut start = 0;
                for part in 0..n.inputs.len() {
                    let b = KernelBuilder::new(g, &buf_of, &materialised, &layouts, format!("k{}", kernels.len()));
                    kernels.push(b.cat_part(v, part, *dim, start));
                    start += shape_of(n.inputs[part])?[*dim];
                }
            }
            _ if materialised.contains(&v) => {
                let shape = shape_of(v)?;
                let order = output_order.get(&v).cloned().unwrap_or_else(|| row_major(shape.len()));
                kernels.push(b.pointwise(&shape, &order, &[(v, buf_of[&v].clone())]))
            }
            _ => {}
        }
        if let Some(pos) = pending_pointwise.iter().position(|(_, vs)| vs.iter().max() == Some(&v)) {
            let ((shape, order), vs) = pending_pointwise.remove(pos);
            let b = KernelBuilder::new(g, &buf_of, &materialised, &layouts, format!("k{}", kernels.len()));
            let targets: Vec<(ValueId, Target)> = vs.iter().map(|v| (*v, buf_of[v].clone())).collect();
            kernels.push(b.pointwise(&shape, &order, &targets));
        }
    }
    for ((shape, order), targets) in &copies {
        let b = KernelBuilder::new(g, &buf_of, &materialised, &layouts, format!("k{}", kernels.len()));
        kernels.push(b.pointwise(shape, order, targets));
    }
    epilogue::fuse(&mut kernels, &mut buffers);
    for k in kernels.iter_mut().filter(|k| k.gemm.is_none()) {
        schedule::schedule(k);
    }
    let arena_bytes = memory_plan::plan_memory(&mut buffers, &kernels);
    Ok(LoopProgram { buffers, kernels, arena_bytes, num_inputs: g.inputs.len(), num_outputs: g.outputs.len() })
}

/// The 4-d values that are stored channels-last when they are intermediates: convolutions,
/// and the values computed from one (pointwise values, concatenations such as a pad,
/// reductions, through any views), so that a network's images stay channels-last from one
/// convolution to the next. A convolution's tile is pixels × channels, so its epilogue stores
/// whole vectors along the channels only in that order (row-major, each element of a vector
/// is a row of the image apart: measured on ResNet-18's 7×7 stem, 38% of peak NCHW against
/// 72% channels-last), and the next convolution reads its windows through any strides.
fn channels_last_temps(g: &Graph) -> Vec<ValueId> {
    // Whether a value is computed from a channels-last image (any rank: views of one count).
    let mut from_image = vec![false; g.nodes.len()];
    for (i, n) in g.nodes.iter().enumerate() {
        // (A quantized image, `quantize_per_tensor`'s, is the next quantized convolution's
        // input: its windows are gathered along channel runs.)
        let image = match n.op {
            Op::Conv2d { .. } | Op::QuantizedProduct { conv: Some(_), .. } => true,
            Op::Quantize(_) => n.ty.rank() == 4,
            _ => false,
        };
        from_image[i] = image || n.inputs.iter().any(|x| from_image[x.0 as usize]);
    }
    // A value a reshape flattens (through views) stays row-major: no strides express the
    // flattened channels-last image (a classifier's `flatten`).
    let mut flattened = vec![false; g.nodes.len()];
    for n in &g.nodes {
        let (from, to) = (n.inputs.first().and_then(|x| g.ty(*x).static_shape()), n.ty.static_shape());
        if let (Op::Reshape, Some(from), Some(to)) = (&n.op, from, to) {
            if !views::only_unit_dims(&from, &to) {
                flattened[views::view_root(g, n.inputs[0]).0 as usize] = true;
            }
        }
    }
    let stored_kind = |op: &Op| !views::is_view(op) && !matches!(op, Op::Input(_) | Op::MatMul { .. } | Op::QuantizedMatMul { .. } | Op::QuantizedProduct { .. } | Op::Softmax { .. });
    (0..g.nodes.len())
        .filter(|&i| from_image[i] && !flattened[i] && g.nodes[i].ty.rank() == 4 && stored_kind(&g.nodes[i].op))
        .map(|i| ValueId(i as u32))
        .collect()
}

/// Smallest output a matmul runs on the GEMM kernel with: below, the register tile would be
/// mostly padding and the loop nest (a dot product per element) is faster.
const GEMM_MIN_ROWS: i64 = 4;
const GEMM_MIN_COLS: i64 = 16;

/// The GEMM kernel's description of matmul `v`; None
/// where the loop nest takes it (float64, a thin output, an operand not in memory).
fn gemm_shape(g: &Graph, v: ValueId, b: &KernelBuilder) -> Option<crate::kernels::gemm::GemmShape> {
    use crate::kernels::gemm::{GemmOperand, GemmShape, GemmTile};
    let out = g.ty(v).static_shape()?;
    let r = out.len();
    let (m, n) = (out[r - 2], out[r - 1]);
    let (a, bv) = (g.node(v).inputs[0], g.node(v).inputs[1]);
    let k = g.ty(a).static_shape()?.last().copied()?;
    if g.ty(v).dtype != DType::F32 || n < GEMM_MIN_COLS || r - 2 > crate::runtime::gemm::MAX_BATCH_DIMS {
        return None;
    }
    let operand = |x: ValueId| -> Option<GemmOperand> {
        let (buf, strides, offset) = b.strided(x)?;
        let shape = g.ty(x).static_shape()?;
        let nb = shape.len() - 2;
        let mut batch_strides = vec![0; r - 2 - nb];
        batch_strides.extend((0..nb).map(|d| if shape[d] == 1 { 0 } else { strides[d] }));
        Some(GemmOperand { buf, offset, batch_strides, rows: strides[nb], cols: strides[nb + 1] })
    };
    let (a, bop) = (operand(a)?, operand(bv)?);
    // A sparse B (a weight with zeros, `kernels::sparse`): at any number of rows for panels
    // (the microkernel keeps several sums per element where the tile has few rows), one to
    // three rows for sparse rows and a weight in code (A's rows then read along k in runs:
    // packed contiguous).
    if let Op::MatMul { sparse_b: Some(format) } = g.node(v).op {
        use crate::kernels::sparse::SparseFormat;
        let tile = match format {
            SparseFormat::Panels(lanes) if lanes <= crate::kernels::gemm::host_lanes() => Some(GemmTile::sparse(m, lanes)),
            SparseFormat::Rows(_) if m <= 3 => Some(GemmTile::sparse_rows()),
            SparseFormat::InCode { lanes, .. } if m <= crate::kernels::gemm::MAX_IN_CODE_ROWS && lanes <= crate::kernels::gemm::host_lanes() => Some(GemmTile::in_code(m, lanes)),
            _ => None,
        };
        if let Some(tile) = tile.filter(|_| bop.batch_invariant()) {
            return Some(GemmShape { batch: out[..r - 2].to_vec(), m, n, k, a, b: bop, tile, im2col: None, sparse_b: Some(format), quant: None });
        }
    }
    // The loop nest is a dot product per element, fast only when both operands step by one
    // element along k (x · Wᵀ, the Linear case); a thin product of a row-major B goes to
    // the GEMM with a tile of its rows (`GemmTile::for_rows`), whose packing reads B
    // contiguously (measured 1×1024×1024: 1.3 GFLOP/s as strided dot products).
    if m < GEMM_MIN_ROWS && a.cols == 1 && bop.rows == 1 {
        return None;
    }
    Some(GemmShape { batch: out[..r - 2].to_vec(), m, n, k, a, b: bop, tile: GemmTile::for_rows(m), im2col: None, sparse_b: None, quant: None })
}

/// Quantized product `v` (`kernels::quantized`) on the int8 GEMM: A and B as any matmul's
/// operands, B's scales and zero points read by the microkernel from their buffers
/// (contiguous, as the frontend's constants are). `sums`: how a static product must sum (what
/// the model's kernel computes); a dynamic one's 7-bit activations never saturate a pair, so
/// it takes the host's fastest instruction.
fn quantized_gemm_shape(g: &Graph, v: ValueId, b: &KernelBuilder, reduce_range: bool, requantize: Option<crate::kernels::quantized::StaticProduct>, sums: Option<crate::kernels::quantized::ProductSums>) -> Result<crate::kernels::gemm::GemmShape, LowerError> {
    use crate::kernels::gemm::{GemmOperand, GemmShape, GemmTile};
    use crate::kernels::quantized::ProductSums;
    let ins = &g.node(v).inputs;
    let out = g.ty(v).static_shape().ok_or(LowerError::Symbolic)?;
    let in_shape = g.ty(ins[0]).static_shape().ok_or(LowerError::Symbolic)?;
    // (A convolution's k is its window's: `quantized_windows` sets it.)
    let k = in_shape[1];
    let name = g.node(v).op.name_for_errors();
    let refuse = |what: &str| LowerError::Unsupported(format!("{name}: {what}"));
    let operand = |x: ValueId| -> Result<GemmOperand, LowerError> {
        let (buf, strides, offset) = b.strided(x).ok_or_else(|| refuse("an operand not in memory"))?;
        Ok(GemmOperand { buf, offset, batch_strides: vec![], rows: strides[0], cols: strides[1] })
    };
    let vector = |x: ValueId| -> Result<BufId, LowerError> {
        match b.strided(x) {
            Some((buf, strides, 0)) if strides == [1] || g.ty(x).static_shape() == Some(vec![1]) => Ok(buf),
            _ => Err(refuse("scales or zero points that are not a contiguous vector")),
        }
    };
    let bias = match ins.get(4) {
        Some(&x) => Some(vector(x)?),
        None => None,
    };
    if !reduce_range {
        return Err(refuse("8-bit activations (fbgemm's AVX2 kernel saturates their pair sums; Kiln takes reduce_range=True)"));
    }
    // (Lowering is for the host, as the float32 tiles are: `host_lanes`.)
    let host = crate::codegen::target::Target::host();
    let sums = sums.unwrap_or(if ProductSums::Exact.runs_on(&host) { ProductSums::Exact } else { ProductSums::SaturatedPairs });
    if !sums.runs_on(&host) {
        return Err(refuse(match sums {
            ProductSums::SaturatedPairs => "a host without AVX2 (the int8 tile's instructions)",
            ProductSums::Exact => "exact int8 sums on a host without AVX-512 VNNI",
        }));
    }
    let quant = crate::kernels::quantized::QuantizedB { scale: vector(ins[2])?, zero_point: vector(ins[3])?, per_column: g.ty(ins[2]).static_shape() != Some(vec![1]), reduce_range, sums, bias, requantize, windows: None };
    Ok(GemmShape { batch: vec![], m: out[0], n: out[1], k, a: operand(ins[0])?, b: operand(ins[1])?, tile: GemmTile::int8(out[0], out[1], sums), im2col: None, sparse_b: None, quant: Some(quant) })
}

/// A quantized convolution's A: the windows of its image (`QuantizedWindows`), B the weight
/// [O, C, KH, KW] read in their k order.
fn quantized_windows(g: &Graph, v: ValueId, b: &KernelBuilder, w: &crate::graph::ir::ConvWindow, shape: &mut crate::kernels::gemm::GemmShape) -> Result<(), LowerError> {
    use crate::kernels::quantized::QuantizedWindows;
    let (x, wv) = (g.node(v).inputs[0], g.node(v).inputs[1]);
    let xs = g.ty(x).static_shape().ok_or(LowerError::Symbolic)?;
    let ws = g.ty(wv).static_shape().ok_or(LowerError::Symbolic)?;
    let refuse = |what: &str| LowerError::Unsupported(format!("qconv2d: {what}"));
    let (_, xst, xoff) = b.strided(x).ok_or_else(|| refuse("an image not in memory"))?;
    let (_, wst, woff) = b.strided(wv).ok_or_else(|| refuse("a weight not in memory"))?;
    let dense = crate::graph::layout::dense_strides(&ws, &crate::graph::layout::row_major(4));
    if (0..4).any(|d| ws[d] != 1 && wst[d] != dense[d]) || woff != 0 {
        return Err(refuse("a weight that is not contiguous"));
    }
    let out_size = w.output_size(xs[2], xs[3]).expect("checked by the builder");
    let windows = QuantizedWindows { channels: xs[1], kernel: w.kernel, out_size, in_size: [xs[2], xs[3]], pad: [w.padding[0], w.padding[2]], stride: w.stride, dilation: w.dilation, strides: [xst[0], xst[1], xst[2], xst[3]] };
    shape.k = xs[1] * w.kernel[0] * w.kernel[1];
    shape.a.offset = xoff;
    shape.a.rows = 0;
    shape.a.cols = 0;
    shape.b.rows = 0;
    shape.b.cols = 0;
    if let Some(q) = &mut shape.quant {
        q.windows = Some(windows);
    }
    Ok(())
}

/// Convolution `v` as a GEMM over its image's windows: rows the output pixels, columns the
/// output channels, k the window (c, kh, kw); B is the weight matrix (a weight of the
/// program's inputs is packed once and kept: `PackableWeight`).
fn conv_gemm_shape(g: &Graph, v: ValueId, b: &KernelBuilder, kernel: [i64; 2], stride: [i64; 2], dilation: [i64; 2], padding: [i64; 4]) -> crate::kernels::gemm::GemmShape {
    use crate::kernels::gemm::{GemmOperand, GemmShape, Im2col};
    let (x, w) = (g.node(v).inputs[0], g.node(v).inputs[1]);
    let out = g.ty(v).static_shape().expect("static shapes were checked");
    let xs = g.ty(x).static_shape().expect("static shapes were checked");
    // `views::plan` gives both operands a layout.
    let (xbuf, xst, xoff) = b.strided(x).expect("a convolution's image has a layout");
    let (wbuf, wst, woff) = b.strided(w).expect("a convolution's weight has a layout");
    let im2col = Im2col { channels: xs[1], kernel, out_h: out[2], out_w: out[3], in_size: [xs[2], xs[3]], pad: [padding[0], padding[2]], stride, dilation, strides: [xst[1], xst[2], xst[3]] };
    let a = GemmOperand { buf: xbuf, offset: xoff, batch_strides: vec![if xs[0] == 1 { 0 } else { xst[0] }], rows: 0, cols: 0 };
    let bop = GemmOperand { buf: wbuf, offset: woff, batch_strides: vec![0], rows: wst[0], cols: wst[1] };
    let k = xs[1] * kernel[0] * kernel[1];
    let tile = conv_tile(&im2col, out[1]);
    GemmShape { batch: vec![out[0]], m: out[2] * out[3], n: out[1], k, a, b: bop, tile, im2col: Some(im2col), sparse_b: None, quant: None }
}

/// A convolution's tile: `GemmTile::for_columns`, or 7 × 48 where output rows of 7 or 14
/// pixels fill it exactly and waste less than the wide rows or per-row tiles of the former
/// (ResNet's 7 × 7 stage: 7 × 48 tiles compute 3% that is dropped, 6 × 64 ones on wide rows
/// 35%).
fn conv_tile(w: &crate::kernels::gemm::Im2col, cout: i64) -> crate::kernels::gemm::GemmTile {
    use crate::kernels::gemm::GemmTile;
    // Computed elements per useful one.
    let waste = |t: GemmTile| {
        let columns = ((cout + t.nr - 1) / t.nr * t.nr) as f64 / cout as f64;
        (w.row_tiles(t.mr) * t.mr) as f64 / (w.out_h * w.out_w) as f64 * columns
    };
    let base = GemmTile::for_columns(cout);
    if base.lanes != 16 {
        return base; // (7 × 16 on AVX2 would need 17 registers)
    }
    let seven = GemmTile { mr: 7, nr: 48, lanes: 16 };
    if w.out_w % 7 == 0 && waste(seven) < waste(base) { seven } else { base }
}

/// Appends `item` to the list for `key`, starting one if there is none.
fn add_by_key<K: PartialEq, T>(groups: &mut Vec<(K, Vec<T>)>, key: K, item: T) {
    match groups.iter_mut().find(|(k, _)| *k == key) {
        Some((_, items)) => items.push(item),
        None => groups.push((key, vec![item])),
    }
}

