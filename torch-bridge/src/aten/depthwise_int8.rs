//! A statically quantized depthwise convolution (`quantized::conv2d(_relu)` with one input
//! channel per group: MobileNet's, ShuffleNet's) as a chain of pointwise ops, bit for bit as
//! PyTorch's fbgemm returns it.
//!
//! fbgemm's depthwise kernel (`GenerateI8Depthwise`, AVX2) takes the window's taps in row-major
//! order (kh, kw), the padding as the input's zero point, and sums uint8 × int8 products in
//! pairs of taps (0, 1), (2, 3), ... with `vpmaddubsw`, which saturates each pair's sum to int16
//! (a last odd tap alone), on every host; its other grouped paths (im2col per group) take the
//! GEMM kernel of the host, which pairs the same taps as the dense path's (kh, kw, c) order does
//! for one channel, or sums them exactly on a host with AVX-512 VNNI (`fbgemm::depthwise_sums`
//! says which; exact sums skip the pair clamp). The int32 sum then loses both zero points'
//! offsets and is requantized as a dense product's ([`requantize`]).
//! Measured against PyTorch 2.13 on this host: 3×3 to 7×7 and 2×3 windows, strides 1 and 2,
//! dilation 2, no padding, channel multipliers 1 to 3, channel counts that are and are not
//! multiples of 8, per channel and per tensor, weight zero points 0 and not, relu: every
//! element equal with the saturation, tens to hundreds per layer off without it.
//!
//! Every step is exact in float32 up to the requantization (products ≤ 2¹⁵, sums < 2²⁴ for
//! windows up to 7×7), so the chain computes what the integer kernel does, one vector of
//! channels at a time along a channels-last image. The requantization's two roundings are
//! fbgemm's float32 operations in its order; `cvtps2dq`'s ties-to-even and its out-of-range
//! result (−2³¹) are written out. A per-tensor weight with a bias is refused: fbgemm fuses
//! `bias · (1 / s) + raw` into one multiply-add there, which a chain of float32 ops cannot
//! round the same way.
//!
//! [`requantize`]: kiln_compiler::kernels::quantized::requantize

use super::windows::e;
use super::{fbgemm, Arg, Lower, R};
use crate::ts_dump::Const;
use kiln_compiler::graph::ir::{BinaryOp, CmpOp, ConvWindow, ProductSums, QuantParams, ReduceOp, UnaryOp};
use kiln_compiler::{DType, Scalar, ValueId};

/// The weight of a depthwise convolution and its quantization, as the pass unpacked it.
pub(super) struct DepthwiseWeight {
    /// int8 values as int32, [C·m, 1, KH, KW].
    pub w: ValueId,
    /// [1] (per tensor) or [C·m] float32.
    pub scale: ValueId,
    /// [1] or [C·m] int32; None where every zero point is 0 (the pass checked).
    pub zero_point: Option<ValueId>,
    /// [C·m] float32, the float module's.
    pub bias: Option<ValueId>,
}

impl Lower<'_> {
    /// `x` (uint8 values as float32, [N, C, H, W], parameters `pa`) convolved with each channel's
    /// own m filters (output channel c·m + j reads input channel c), requantized to `out`.
    pub(super) fn depthwise_quantized(&mut self, x: ValueId, pa: QuantParams, wq: DepthwiseWeight, window: ConvWindow, out: QuantParams, relu: bool) -> R<ValueId> {
        let (xs, ws) = (self.sizes(x)?, self.sizes(wq.w)?);
        let (n, c) = (xs[0], xs[1]);
        let (o, [kh, kw]) = (ws[0], window.kernel);
        if ws[1] != 1 || o % c != 0 {
            return Err("a grouped quantized convolution with more than one input channel per group".into());
        }
        let m = o / c;
        // (Every sum exact in float32: |a·w| ≤ 255 · 128 = 32640, 514 of them < 2²⁴.)
        if kh * kw > 514 {
            return Err(format!("a quantized depthwise window of {kh}x{kw} taps (Kiln's chain is exact in float32 up to 514)"));
        }
        let sums = fbgemm::depthwise_sums(c, m, &window);
        let per_channel = self.sizes(wq.scale)? != [1];
        if !per_channel && wq.bias.is_some() {
            return Err("a per-tensor quantized depthwise convolution with a bias (fbgemm fuses its bias into a multiply-add Kiln's chain does not round alike)".into());
        }
        let [oh, ow] = window.output_size(xs[2], xs[3]).ok_or("a window larger than the padded input (eager raises)")?;
        let [top, bottom, left, right] = window.padding;
        let xp = if window.padding.iter().any(|&p| p > 0) {
            self.constant_pad(&Arg::Tensor(x), &[left, right, top, bottom], &Arg::Const(Const::Int(pa.zero_point as i64)))?
        } else {
            x
        };
        let v = e(self.g.unfold(xp, 2, kh, window.stride[0], window.dilation[0]))?;
        let v = e(self.g.unfold(v, 3, kw, window.stride[1], window.dilation[1]))?;
        // Terms are [N, C, OH, OW] (one filter per channel) or [N, C, m, OH, OW]; per-channel
        // values [C, 1, 1] or [C, m, 1, 1].
        let (pixel, channel): (Vec<i64>, Vec<i64>) = if m == 1 { (vec![n, c, oh, ow], vec![c, 1, 1]) } else { (vec![n, c, 1, oh, ow], vec![c, m, 1, 1]) };
        let w = self.g.cast(wq.w, DType::F32);
        let w = e(self.g.reshape(w, &[c, m, kh, kw]))?;
        let taps = self.depthwise_taps(v, w, &pixel, &channel)?;
        let f = |this: &mut Self, v: f64| this.g.constant(Scalar::Float(v), DType::F32);
        let (lo16, hi16) = (f(self, -32768.0), f(self, 32767.0));
        // Σ over pairs of taps of sat16(a·w + a'·w'), or Σ a·w where fbgemm sums exactly.
        let mut sum: Option<ValueId> = None;
        for pair in taps.chunks(2) {
            let mut p = e(self.g.binary(BinaryOp::Mul, pair[0].0, pair[0].1))?;
            if let [_, (a, k)] = pair {
                let q = e(self.g.binary(BinaryOp::Mul, *a, *k))?;
                p = e(self.g.binary(BinaryOp::Add, p, q))?;
                if sums == ProductSums::SaturatedPairs {
                    p = e(self.g.binary(BinaryOp::Max, p, lo16))?;
                    p = e(self.g.binary(BinaryOp::Min, p, hi16))?;
                }
            }
            sum = Some(match sum {
                None => p,
                Some(s) => e(self.g.binary(BinaryOp::Add, s, p))?,
            });
        }
        let sum = sum.expect("a window has a tap");
        // The zero points' offsets: Σ (a − za)(w − zw) = Σ a·w + Σₜ za·(zw − wₜ) − zw·Σ a. The
        // second is per channel: a reduction over the taps, so stored once, not recomputed
        // per pixel; it is 0 where za is (activations after a relu), the third where the
        // weight is symmetric (fbgemm's default).
        let zw = match wq.zero_point {
            Some(z) => {
                let z = self.g.cast(z, DType::F32);
                Some(if per_channel { e(self.g.reshape(z, &[c, m, 1, 1]))? } else { z })
            }
            None => None,
        };
        let mut raw = sum;
        if pa.zero_point != 0 {
            let za = f(self, pa.zero_point as f64);
            let centered = match zw {
                Some(z) => e(self.g.binary(BinaryOp::Sub, z, w))?,
                None => e(self.g.unary(UnaryOp::Neg, w))?,
            };
            let centered = e(self.g.binary(BinaryOp::Mul, centered, za))?;
            let offset = e(self.g.reduce(ReduceOp::Sum, centered, &[2, 3], false))?;
            let offset = e(self.g.reshape(offset, &channel))?;
            raw = e(self.g.binary(BinaryOp::Add, raw, offset))?;
        }
        if let Some(zw) = zw {
            let zw = if per_channel { e(self.g.reshape(zw, &channel))? } else { zw };
            let mut taps_sum = taps[0].0;
            for &(a, _) in &taps[1..] {
                taps_sum = e(self.g.binary(BinaryOp::Add, taps_sum, a))?;
            }
            let row = e(self.g.binary(BinaryOp::Mul, zw, taps_sum))?;
            raw = e(self.g.binary(BinaryOp::Sub, raw, row))?;
        }
        // requantize: s = sa · sw; x = raw + bias / s; q = cvtps(x · (s / so)).
        let sa = f(self, pa.scale as f64);
        let so = f(self, out.scale as f64);
        let scale = if per_channel { e(self.g.reshape(wq.scale, &channel))? } else { wq.scale };
        let s = e(self.g.binary(BinaryOp::Mul, scale, sa))?;
        let mut x = raw;
        if let Some(b) = wq.bias {
            let b = e(self.g.reshape(b, &channel))?;
            let term = e(self.g.binary(BinaryOp::Div, b, s))?;
            let term = self.stored_per_channel(term)?;
            x = e(self.g.binary(BinaryOp::Add, x, term))?;
        }
        let multiplier = e(self.g.binary(BinaryOp::Div, s, so))?;
        let multiplier = self.stored_per_channel(multiplier)?;
        let t = e(self.g.binary(BinaryOp::Mul, x, multiplier))?;
        let r = e(self.g.unary(UnaryOp::Round, t))?;
        // cvtps2dq: what is out of int32's range (or NaN) becomes −2³¹, which the int16 packing
        // saturates to −32768; the packing's clamp to int16 itself changes nothing the clamp
        // to 0..=255 after adding zo does not (below −2³¹ too; NaN fails the comparison).
        let hi32 = f(self, 2147483648.0);
        let inside = e(self.g.compare(CmpOp::Lt, r, hi32))?;
        let q = e(self.g.where_(inside, r, lo16))?;
        let zo = f(self, out.zero_point as f64);
        let q = e(self.g.binary(BinaryOp::Add, q, zo))?;
        let floor = if relu { zo } else { f(self, 0.0) };
        let q = e(self.g.binary(BinaryOp::Max, q, floor))?;
        let ceiling = f(self, 255.0);
        let q = e(self.g.binary(BinaryOp::Min, q, ceiling))?;
        let y = if m == 1 { q } else { e(self.g.reshape(q, &[n, o, oh, ow]))? };
        self.quant.insert(y, out);
        Ok(y)
    }

    /// `v` (a value per channel) stored once rather than recomputed at every pixel: a sum over
    /// one element is a reduction, which the kernels read from its buffer (two float32
    /// divisions per pixel otherwise).
    fn stored_per_channel(&mut self, v: ValueId) -> R<ValueId> {
        let mut shape = self.sizes(v)?;
        let unit = shape.len();
        shape.push(1);
        let v1 = e(self.g.reshape(v, &shape))?;
        e(self.g.reduce(ReduceOp::Sum, v1, &[unit], false))
    }
}
