//! ATen's ops over sliding windows of an image: convolution and pooling, built from Kiln IR's
//! window ops (`conv2d`, `unfold`).
//!
//! - A convolution of one group in float32 is `Op::Conv2d` with its padding (the GEMM kernel
//!   reads a padded copy of the image: the padding is never a graph value): the weight
//!   [Cout, C, KH, KW] flattened to [Cout, C·KH·KW] and transposed, the bias a pointwise add
//!   after it (fused into the GEMM's epilogue).
//! - Any other convolution (grouped, depthwise, float64) is the sum over each window of its
//!   products: `unfold` views of the zero-padded image times the weight, reduced over
//!   (channel, kh, kw). Correct for every case eager takes; not fast (a loop nest per output
//!   element).
//! - Pooling: `unfold` views of the input padded with −∞ (max) or 0 (average), each window
//!   reduced: a chain of pointwise max / add for small windows, a reduction for large ones
//!   (those that tile the input as a reshape, no pad).
//! - Adaptive pooling to a size that does not divide the input's: separable, one dim at a
//!   time, each residue of its windows' period one `unfold` (`adaptive_dim`).

use super::{Arg, Lower, R};
use crate::ts_dump::Const;
use kiln_compiler::graph::ir::{BinaryOp, IrError, ReduceOp};
use kiln_compiler::{DType, Scalar, ValueId};

/// Windows of at most this many elements are reduced as a chain of pointwise ops
/// (`window_reduce`).
const SMALL_WINDOW: i64 = 16;

/// Depthwise convolutions over windows of at most this many elements are a chain of
/// multiply-adds (`depthwise_chain`): 3×3, 5×5 and 7×7, as in MobileNet, MnasNet and ConvNeXt.
const SMALL_CONV_WINDOW: i64 = 49;

/// The largest period of adaptive pooling's windows along a dim Kiln builds (a pool of n
/// to o with o / gcd(n, o) at most this; 7 → 3 is 3, 10 → 7 is 7).
const MAX_ADAPTIVE_PERIOD: i64 = 32;

pub(super) fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

pub(super) fn e(r: Result<ValueId, IrError>) -> R<ValueId> {
    r.map_err(|e| e.0)
}

/// An int list of one or two numbers as a pair (PyTorch repeats a single number).
fn pair(xs: &[i64], what: &str) -> R<[i64; 2]> {
    match xs {
        [a] => Ok([*a, *a]),
        [a, b] => Ok([*a, *b]),
        _ => Err(format!("a {what} that is not 1 or 2 numbers")),
    }
}

/// How a convolution pads: numbers per spatial dim, or "same" / "valid".
pub(super) enum Padding<'a> {
    Ints(&'a [i64]),
    Mode(&'a str),
}

/// A convolution's arguments after the op's own spelling of them.
pub(super) struct ConvArgs<'a> {
    pub stride: &'a [i64],
    pub padding: Padding<'a>,
    pub dilation: &'a [i64],
    pub groups: i64,
    /// conv1d: one spatial dim.
    pub one_d: bool,
}

impl Lower<'_> {
    /// conv1d / conv2d / convolution (not transposed), as eager computes it: the image padded
    /// with zeros, each output element the sum over its window (see the module comment).
    pub(super) fn convolution(&mut self, x: &Arg, w: &Arg, bias: &Arg, a: &ConvArgs) -> R<ValueId> {
        let (mut x, mut w) = (self.tensor(x)?, self.tensor(w)?);
        let d = self.g.ty(x).dtype;
        if !d.is_float() || self.g.ty(w).dtype != d {
            return Err("a convolution of integer tensors or of an input and weight of two dtypes (eager raises)".into());
        }
        let spatial = if a.one_d { 1 } else { 2 };
        let (xs, ws) = (self.sizes(x)?, self.sizes(w)?);
        if ws.len() != spatial + 2 || !(spatial + 1..=spatial + 2).contains(&xs.len()) {
            return Err("a convolution whose input or weight has another rank (eager raises)".into());
        }
        let unbatched = xs.len() == spatial + 1;
        let as_2d = |sizes: &[i64], lead: usize| -> Vec<i64> {
            let mut s = sizes[..lead].to_vec();
            if a.one_d {
                s.push(1);
            }
            s.extend(&sizes[lead..]);
            s
        };
        let mut x4 = if unbatched { [vec![1], xs.clone()].concat() } else { xs.clone() };
        x4 = as_2d(&x4, 2);
        let w4 = as_2d(&ws, 2);
        if x4 != self.sizes(x)? {
            x = e(self.g.reshape(x, &x4))?;
        }
        if w4 != ws {
            w = e(self.g.reshape(w, &w4))?;
        }
        let widen = |xs: &[i64], what: &str, fill: i64| -> R<[i64; 2]> {
            match (a.one_d, xs) {
                (true, [n]) => Ok([fill, *n]),
                (true, _) => Err(format!("a conv1d {what} that is not 1 number")),
                (false, _) => pair(xs, what),
            }
        };
        let stride = widen(a.stride, "stride", 1)?;
        let dilation = widen(a.dilation, "dilation", 1)?;
        let kernel = [w4[2], w4[3]];
        let (c, cout, groups) = (x4[1], w4[0], a.groups);
        if groups < 1 || c % groups != 0 || cout % groups != 0 || w4[1] * groups != c {
            return Err("a convolution whose channels do not match its weight and groups (eager raises)".into());
        }
        if stride.iter().chain(&dilation).any(|&s| s < 1) || x4.contains(&0) || w4.contains(&0) {
            return Err("a convolution with a stride or dilation below 1, or an empty input or weight".into());
        }
        // Padding per side: (top, bottom, left, right).
        let span = |i: usize| dilation[i] * (kernel[i] - 1);
        let pads: [i64; 4] = match &a.padding {
            Padding::Ints(p) => {
                let p = widen(p, "padding", 0)?;
                if p.iter().any(|&v| v < 0) {
                    return Err("negative padding (eager raises)".into());
                }
                [p[0], p[0], p[1], p[1]]
            }
            Padding::Mode("valid") => [0; 4],
            Padding::Mode("same") if stride == [1, 1] => {
                // As eager's `_convolution_mode`: the odd element of the padding goes last.
                [span(0) / 2, span(0) - span(0) / 2, span(1) / 2, span(1) - span(1) / 2]
            }
            Padding::Mode(m) => return Err(format!("padding '{m}' (eager takes 'same' with stride 1 and 'valid')")),
        };
        if x4[2] + pads[0] + pads[1] <= span(0) || x4[3] + pads[2] + pads[3] <= span(1) {
            return Err("a convolution window larger than the padded input (eager raises)".into());
        }
        let mut y = if groups == 1 && d == DType::F32 {
            // The padding is the packing's (never stored).
            let k = c * kernel[0] * kernel[1];
            let wm = e(self.g.reshape(w, &[cout, k]))?;
            let wt = e(self.g.permute(wm, &[1, 0]))?;
            e(self.g.conv2d(x, wt, kernel, stride, dilation, pads))?
        } else {
            let xp = if pads.iter().any(|&p| p > 0) {
                self.constant_pad(&Arg::Tensor(x), &[pads[2], pads[3], pads[0], pads[1]], &Arg::Const(Const::None))?
            } else {
                x
            };
            self.windowed_conv(xp, w, groups, kernel, stride, dilation)?
        };
        match bias {
            Arg::Const(Const::None) => {}
            Arg::Tensor(b) if self.g.ty(*b).dtype == d && self.sizes(*b)? == [cout] => {
                let b = e(self.g.reshape(*b, &[cout, 1, 1]))?;
                y = e(self.g.binary(BinaryOp::Add, y, b))?;
            }
            _ => return Err("a convolution bias of another dtype or size (eager raises)".into()),
        }
        let mut out = self.sizes(y)?;
        if a.one_d {
            out.remove(2);
        }
        if unbatched {
            out.remove(0);
        }
        if out != self.sizes(y)? {
            // Dropping the unit dims is a view; its copy is the GEMM's epilogue.
            y = e(self.g.reshape(y, &out))?;
            y = self.g.copy(y);
        }
        Ok(y)
    }

    /// A convolution as sums over windows: x [N, C, H, W] (padded) as [N, G, 1, C/G, OH, OW,
    /// KH, KW] windows, times the weight as [1, G, Cout/G, C/G, 1, 1, KH, KW], summed over
    /// (C/G, KH, KW).
    fn windowed_conv(&mut self, x: ValueId, w: ValueId, groups: i64, kernel: [i64; 2], stride: [i64; 2], dilation: [i64; 2]) -> R<ValueId> {
        let (xs, ws) = (self.sizes(x)?, self.sizes(w)?);
        let (n, c, h, wd) = (xs[0], xs[1], xs[2], xs[3]);
        let (cg, og) = (c / groups, ws[0] / groups);
        if cg == 1 && og == 1 {
            // Depthwise: x [N, C, OH, OW, KH, KW] windows times w as [1, C, 1, 1, KH, KW],
            // summed over the window.
            let v = e(self.g.unfold(x, 2, kernel[0], stride[0], dilation[0]))?;
            let v = e(self.g.unfold(v, 3, kernel[1], stride[1], dilation[1]))?;
            if kernel[0] * kernel[1] <= SMALL_CONV_WINDOW {
                return self.depthwise_chain(v, w, kernel);
            }
            let wv = e(self.g.reshape(w, &[1, c, 1, 1, kernel[0], kernel[1]]))?;
            let p = e(self.g.binary(BinaryOp::Mul, v, wv))?;
            return e(self.g.reduce(ReduceOp::Sum, p, &[4, 5], false));
        }
        let v = e(self.g.reshape(x, &[n, groups, cg, h, wd]))?;
        let v = e(self.g.unfold(v, 3, kernel[0], stride[0], dilation[0]))?;
        let v = e(self.g.unfold(v, 4, kernel[1], stride[1], dilation[1]))?;
        let (oh, ow) = {
            let s = self.sizes(v)?;
            (s[3], s[4])
        };
        let v = e(self.g.reshape(v, &[n, groups, 1, cg, oh, ow, kernel[0], kernel[1]]))?;
        let wv = e(self.g.reshape(w, &[1, groups, og, cg, 1, 1, kernel[0], kernel[1]]))?;
        let p = e(self.g.binary(BinaryOp::Mul, v, wv))?;
        let s = e(self.g.reduce(ReduceOp::Sum, p, &[3, 6, 7], false))?;
        let y = e(self.g.reshape(s, &[n, groups * og, oh, ow]))?;
        // A value of its own, not a view of the sums (a group's result is never a view).
        Ok(self.g.copy(y))
    }

    /// A depthwise convolution over small windows as a chain of multiply-adds, one term per
    /// window element (row by row): a pointwise kernel that runs along the image's innermost
    /// dim (the channels of a channels-last image, a vector at a time), where a reduction
    /// would walk each window on its own. `v` is the windows [N, C, OH, OW, KH, KW], `w` the
    /// weight [C, 1, KH, KW].
    fn depthwise_chain(&mut self, v: ValueId, w: ValueId, kernel: [i64; 2]) -> R<ValueId> {
        let sizes = self.sizes(v)?;
        let c = sizes[1];
        let w = e(self.g.reshape(w, &[c, 1, kernel[0], kernel[1]]))?;
        let mut acc: Option<ValueId> = None;
        for (t, k) in self.depthwise_taps(v, w, &sizes[..4], &[c, 1, 1])? {
            let term = e(self.g.binary(BinaryOp::Mul, t, k))?;
            acc = Some(match acc {
                None => term,
                Some(a) => e(self.g.binary(BinaryOp::Add, a, term))?,
            });
        }
        Ok(acc.expect("a window has an element"))
    }

    /// A depthwise convolution's terms, one per window element row by row: the element of
    /// every window (`v`: [N, C, OH, OW, KH, KW]) as `pixel`, and the weight's element (`w`:
    /// [C, m, KH, KW]) as `channel`. The weight is read from a copy stored taps-first,
    /// [KH, KW, C, m]: each tap's weights are then one contiguous vector along the channels
    /// the chain's kernel runs over (read from [C, m, KH, KW], a vector of them was a gather
    /// of KH·KW-strided floats per tap).
    pub(super) fn depthwise_taps(&mut self, v: ValueId, w: ValueId, pixel: &[i64], channel: &[i64]) -> R<Vec<(ValueId, ValueId)>> {
        let ws = self.sizes(w)?;
        let taps_first = e(self.g.permute(w, &[2, 3, 0, 1]))?;
        let taps_first = self.g.copy(taps_first);
        let mut taps = Vec::new();
        for i in 0..ws[2] {
            for j in 0..ws[3] {
                let a = e(self.g.slice(v, 4, i, 1))?;
                let a = e(self.g.slice(a, 5, j, 1))?;
                let a = e(self.g.reshape(a, pixel))?;
                let k = e(self.g.slice(taps_first, 0, i, 1))?;
                let k = e(self.g.slice(k, 1, j, 1))?;
                taps.push((a, e(self.g.reshape(k, channel))?));
            }
        }
        Ok(taps)
    }

    /// max_pool2d / avg_pool2d as eager computes them (see the module comment). `divisor`:
    /// avg_pool2d's divisor_override.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn pool2d(&mut self, op: ReduceOp, x: &Arg, kernel: &[i64], stride: &[i64], pad: &[i64], dilation: &[i64], ceil: bool, count_include_pad: bool, divisor: Option<i64>) -> R<ValueId> {
        let v = self.float_only(x)?;
        let sizes = self.sizes(v)?;
        let rank = sizes.len();
        let k = pair(kernel, "pooling kernel")?;
        let s = if stride.is_empty() { k } else { pair(stride, "pooling stride")? };
        let p = pair(pad, "pooling padding")?;
        let dl = pair(dilation, "pooling dilation")?;
        if !(3..=4).contains(&rank) || k.iter().chain(&s).chain(&dl).any(|&n| n <= 0) || sizes[rank - 2..].contains(&0) {
            return Err("pooling of an input that is not [N,] C, H, W with H, W > 0, or an empty window or stride (eager raises)".into());
        }
        if (0..2).any(|i| p[i] < 0 || 2 * p[i] > k[i]) || divisor == Some(0) {
            return Err("pooling padding above half the kernel, or a zero divisor (eager raises)".into());
        }
        // Output sizes as ATen's `pooling_output_shape`: a last window that would start in
        // the right padding is dropped.
        let out = |i: usize, len: i64| -> i64 {
            let span = dl[i] * (k[i] - 1) + 1;
            let room = len + 2 * p[i] - span;
            let mut o = if ceil { (room + s[i] - 1).div_euclid(s[i]) } else { room.div_euclid(s[i]) } + 1;
            if ceil && (o - 1) * s[i] >= len + p[i] {
                o -= 1;
            }
            o
        };
        let (h, w) = (sizes[rank - 2], sizes[rank - 1]);
        let (oh, ow) = (out(0, h), out(1, w));
        if oh < 1 || ow < 1 {
            return Err("a pooling output of size 0 (eager raises)".into());
        }
        // Past the input: the left padding, and on the right whatever the last window reaches.
        let reach = |i: usize, o: i64, len: i64| ((o - 1) * s[i] + dl[i] * (k[i] - 1) + 1 - p[i] - len).max(0);
        let (rh, rw) = (reach(0, oh, h), reach(1, ow, w));
        let tiles = s == k && dl == [1, 1] && p == [0, 0] && rh == 0 && rw == 0;
        if tiles && k == [1, 1] && divisor.is_none() {
            // Windows of one element (an adaptive pool to the input's own size).
            return Ok(self.g.copy(v));
        }
        if tiles && divisor.is_none() && k[0] * k[1] > SMALL_WINDOW {
            return self.tiled_pool(op, v, k, [oh, ow]);
        }
        let d = self.g.ty(v).dtype;
        let fill = if op == ReduceOp::Max { Const::Float(f64::NEG_INFINITY) } else { Const::None };
        let windows = |this: &mut Self, t: ValueId, pads: [i64; 4], fill: Const| -> R<ValueId> {
            let r = this.g.ty(t).rank();
            let t = if pads.iter().any(|&q| q > 0) { this.constant_pad(&Arg::Tensor(t), &[pads[2], pads[3], pads[0], pads[1]], &Arg::Const(fill))? } else { t };
            let t = e(this.g.unfold(t, r - 2, k[0], s[0], dl[0]))?;
            e(this.g.unfold(t, r - 1, k[1], s[1], dl[1]))
        };
        let pads = [p[0], rh, p[1], rw];
        let win = windows(self, v, pads, fill)?;
        if op == ReduceOp::Max {
            return self.window_reduce(win, ReduceOp::Max);
        }
        let sum = self.window_reduce(win, ReduceOp::Sum)?;
        // The divisor per window: the override, or the window's elements inside the input
        // (count_include_pad=False), or inside the input and its padding (True): a window
        // sum of ones over those.
        let divisor = match divisor {
            Some(n) => self.g.constant(Scalar::Int(n), d),
            None if p == [0, 0] && rh == 0 && rw == 0 => self.g.constant(Scalar::Int(k[0] * k[1]), d),
            None => {
                let one = self.g.constant(Scalar::Int(1), d);
                let ones = if count_include_pad {
                    let inside = e(self.g.expand(one, &[h + 2 * p[0], w + 2 * p[1]]))?;
                    let extra = [0, (rh - p[0]).max(0), 0, (rw - p[1]).max(0)];
                    let shrink = [0, (p[0] - rh).max(0), 0, (p[1] - rw).max(0)];
                    // Padding past the last window's reach is not read: crop it.
                    let inside = if shrink.iter().any(|&q| q > 0) {
                        let t = e(self.g.slice(inside, 0, 0, h + 2 * p[0] - shrink[1]))?;
                        e(self.g.slice(t, 1, 0, w + 2 * p[1] - shrink[3]))?
                    } else {
                        inside
                    };
                    windows(self, inside, extra, Const::None)?
                } else {
                    let inside = e(self.g.expand(one, &[h, w]))?;
                    windows(self, inside, pads, Const::None)?
                };
                self.window_reduce(ones, ReduceOp::Sum)?
            }
        };
        e(self.g.binary(BinaryOp::Div, sum, divisor))
    }

    /// Each window (the last two dims of `win`) reduced by max or sum. A small window is a
    /// chain of its elements in eager's order (row by row), a pointwise kernel that runs
    /// along the image's innermost dim (the channels of a channels-last image, one vector at
    /// a time); a reduction would walk each window on its own.
    fn window_reduce(&mut self, win: ValueId, op: ReduceOp) -> R<ValueId> {
        let sizes = self.sizes(win)?;
        let r = sizes.len();
        let (kh, kw) = (sizes[r - 2], sizes[r - 1]);
        if kh * kw > SMALL_WINDOW {
            return e(self.g.reduce(op, win, &[r - 2, r - 1], false));
        }
        let combine = if op == ReduceOp::Max { BinaryOp::Max } else { BinaryOp::Add };
        let mut acc: Option<ValueId> = None;
        for i in 0..kh {
            for j in 0..kw {
                let t = e(self.g.slice(win, r - 2, i, 1))?;
                let t = e(self.g.slice(t, r - 1, j, 1))?;
                let t = e(self.g.reshape(t, &sizes[..r - 2]))?;
                acc = Some(match acc {
                    None => t,
                    Some(a) => e(self.g.binary(combine, a, t))?,
                });
            }
        }
        let v = acc.expect("a window has an element");
        // A window of one element is a view of the input: a value of its own.
        Ok(if kh * kw == 1 { self.g.copy(v) } else { v })
    }

    /// adaptive_avg_pool2d / adaptive_max_pool2d of [N,] C, H, W to `out`: eager's windows
    /// along a dim of n to o are [⌊i·n/o⌋, ⌈(i+1)·n/o⌉). Where o divides n they are the
    /// tiles of a pool with stride = kernel; otherwise the pool is separable (a max of maxes,
    /// a sum of sums over its count of elements) and each dim is pooled on its own, see
    /// [`Self::adaptive_dim`].
    pub(super) fn adaptive_pool2d(&mut self, op: ReduceOp, x: &Arg, out: &[i64]) -> R<ValueId> {
        let v = self.float_only(x)?;
        let sizes = self.sizes(v)?;
        let rank = sizes.len();
        let name = if op == ReduceOp::Max { "adaptive_max_pool2d" } else { "adaptive_avg_pool2d" };
        if !(3..=4).contains(&rank) || sizes[rank - 2..].contains(&0) || out.len() != 2 || out.iter().any(|&o| o < 1) {
            return Err(format!("{name} of an input that is not [N,] C, H, W with H, W > 0, or to an empty size (eager raises)"));
        }
        let (h, w) = (sizes[rank - 2], sizes[rank - 1]);
        if h % out[0] == 0 && w % out[1] == 0 {
            let k = [h / out[0], w / out[1]];
            return self.pool2d(op, x, &k, &k, &[0], &[1], false, true, None);
        }
        let reduce = if op == ReduceOp::Max { ReduceOp::Max } else { ReduceOp::Sum };
        let pooled = self.adaptive_dim(v, rank - 1, out[1], reduce)?;
        let pooled = self.adaptive_dim(pooled, rank - 2, out[0], reduce)?;
        if op == ReduceOp::Max {
            return Ok(self.fresh(pooled));
        }
        // Each window's count of elements: the same sums over ones.
        let d = self.g.ty(v).dtype;
        let one = self.g.constant(Scalar::Int(1), d);
        let ones = e(self.g.expand(one, &[h, w]))?;
        let counts = self.adaptive_dim(ones, 1, out[1], ReduceOp::Sum)?;
        let counts = self.adaptive_dim(counts, 0, out[0], ReduceOp::Sum)?;
        e(self.g.binary(BinaryOp::Div, pooled, counts))
    }

    /// `v` reduced along `dim` over adaptive pooling's windows to `out` of them. Where
    /// out / n = p / q in lowest terms, window r + p·m starts q·m after window r and has its
    /// size: per residue r one unfold, reduced; the p results are stacked after the dim and
    /// merged into it.
    fn adaptive_dim(&mut self, v: ValueId, dim: usize, out: i64, op: ReduceOp) -> R<ValueId> {
        let sizes = self.sizes(v)?;
        let n = sizes[dim];
        let g = gcd(n, out);
        let (p, q, per_residue) = (out / g, n / g, g);
        if p > MAX_ADAPTIVE_PERIOD {
            return Err(format!("adaptive pooling of {n} to {out}: windows that repeat every {p} (Kiln takes up to {MAX_ADAPTIVE_PERIOD})"));
        }
        let rank = sizes.len();
        let mut planes = vec![];
        for r in 0..p {
            let start = r * n / out;
            let size = ((r + 1) * n + out - 1) / out - start;
            let t = e(self.g.slice(v, dim, start, q * (per_residue - 1) + size))?;
            let t = e(self.g.unfold(t, dim, size, q, 1))?;
            let t = e(self.g.reduce(op, t, &[rank], false))?;
            planes.push(t);
        }
        self.interleave(&planes, dim)
    }

    /// p tensors of equal shape merged along `dim`: element m of plane r is element r + p·m
    /// of the result (the planes stacked after the dim, then the two dims merged).
    pub(super) fn interleave(&mut self, planes: &[ValueId], dim: usize) -> R<ValueId> {
        if let [one] = planes[..] {
            return Ok(one);
        }
        let mut sizes = self.sizes(planes[0])?;
        let mut stacked = sizes.clone();
        stacked.insert(dim + 1, 1);
        let planes = planes.iter().map(|&t| e(self.g.reshape(t, &stacked))).collect::<R<Vec<_>>>()?;
        let t = e(self.g.cat(&planes, dim + 1))?;
        sizes[dim] *= planes.len() as i64;
        e(self.g.reshape(t, &sizes))
    }

    /// Pooling whose windows tile the input (stride = kernel, no padding): the rows and
    /// columns no whole window covers are dropped (ceil_mode=False: eager drops them too),
    /// each window becomes two dims of a reshape, and those are reduced. The max propagates
    /// NaN as eager's does; the mean is the window's sum over its size.
    fn tiled_pool(&mut self, op: ReduceOp, v: ValueId, k: [i64; 2], [oh, ow]: [i64; 2]) -> R<ValueId> {
        let sizes = self.sizes(v)?;
        let rank = sizes.len();
        let (h, w) = (sizes[rank - 2], sizes[rank - 1]);
        let mut v = v;
        if oh * k[0] != h {
            v = e(self.g.slice(v, rank - 2, 0, oh * k[0]))?;
        }
        if ow * k[1] != w {
            v = e(self.g.slice(v, rank - 1, 0, ow * k[1]))?;
        }
        let mut tiles = sizes[..rank - 2].to_vec();
        tiles.extend([oh, k[0], ow, k[1]]);
        let t = e(self.g.reshape(v, &tiles))?;
        let op = if op == ReduceOp::Sum { ReduceOp::Mean } else { op };
        e(self.g.reduce(op, t, &[rank - 1, rank + 1], false))
    }
}
