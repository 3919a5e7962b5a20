//! int8 products as PyTorch's fbgemm backend computes them, bit for bit.
//!
//! Dynamic quantization (`quantize_dynamic`'s `quantized::linear_dynamic`) quantizes each
//! call's activations: the tensor's range gives a scale and a zero point
//! ([`choose_activation_params`], PyTorch's `quant_utils::ChooseQuantizationParams`), every
//! element is rounded to uint8 ([`quantize`], fbgemm's `QuantizeAvx2`: one fused multiply-add
//! by the scale's float reciprocal, ties to even, clamped), the product of those with the int8
//! weight is exact in int32, and the result is dequantized as fbgemm's `ReQuantizeForFloat`
//! vector path does on every x86 host with AVX2 (its scalar loop is for hosts without):
//!
//! ```text
//! raw[i][j] = Σₖ qa[i][k]·qb[k][j] − za·(Σₖ qb[k][j] − zb[j]·K) − zb[j]·Σₖ qa[i][k]   (int32, wrapping)
//! out[i][j] = float(raw[i][j]) · (sa · sb[j])                                            (float32, two roundings)
//! ```
//!
//! and with a bias, `out[i][j] = fma(float(raw[i][j]), sa · sb[j], bias[j])`: the source
//! multiplies and then adds, but PyTorch's build of fbgemm is compiled with contraction on,
//! and what PyTorch returns is the fused multiply-add (measured: a separate add differs from
//! it by an ulp in about a third of the elements). With `reduce_range` (what `quantize_dynamic`'s
//! modules pass) activations take 7 bits, 0..=127, so the AVX2 kernel's 16-bit pair sums
//! (`vpmaddubsw`: 2 · 127 · 128 < 2¹⁵) never saturate and its int32 sums are exact; without
//! it fbgemm's own AVX2 kernel saturates where VNNI does not, a result that depends on the
//! host, which Kiln does not imitate (the frontend leaves those in TorchScript).
//!
//! Packed layouts (the runtime's `runtime::qgemm` packs, the microkernel reads): k is taken in
//! groups of four ("quads", zero past k). A row panel of A is a header of
//! [`A_HEADER`] int32 — the call's zero point, its scale's bits, k, then each row's Σₖ qa — and
//! then its `mr` rows one after the other, each k's uint8 padded to whole quads (row-major, as
//! fbgemm packs A: a row is written by one contiguous conversion or copy, and the microkernel
//! broadcasts a row's quad from its own run). A column panel of B is `nr` int32 column sums Σₖ qb,
//! then per quad `nr` columns × 4 int8: one 32-byte vector holds 8 columns' quad, so
//! `vpmaddubsw` against a row's quad broadcast gives each column's pair sums.
//!
//! Static quantization (`torch.ao.quantization.prepare` / `convert`: `quantize_per_tensor`,
//! `quantized::linear`, `quantized::conv2d`, ...) fixes every activation's scale and zero point
//! when the model is converted ([`QuantParams`], constants of the frozen graph). Inside a Kiln
//! group a quantized tensor is its uint8 values held as float32 (exact integers 0..=255; Kiln
//! has no uint8 tensors, and a quantized tensor never crosses a group's edge). `quantize_per_tensor`
//! rounds as the dynamic path's activations do ([`quantize`]); a product's int32 sum is
//! requantized to uint8 as fbgemm's `requantizeOutputProcessingAvx2` does ([`requantize`]). Its
//! A values take all 8 bits, so the AVX2 pair sums saturate where fbgemm's do: the pairs are
//! k = (2i, 2i + 1) in the same order as fbgemm's (a convolution's k is (kh, kw, c), as its
//! im2col), and the microkernel uses the same instruction (measured against PyTorch: with
//! saturation emulated, every element equal; without, hundreds differ per layer).
//! On a host with AVX-512 VNNI fbgemm's kernels sum exactly (`vpdpbusd`), and so does Kiln's
//! tile there: which of the two a product computes is its [`ProductSums`].

use crate::lower::loop_ir::BufId;

/// What the GEMM needs besides A and B to run a quantized product: the buffers of B's scales
/// and zero points (1 or n elements each) and how A is quantized.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuantizedB {
    pub scale: BufId,
    pub zero_point: BufId,
    pub per_column: bool,
    pub reduce_range: bool,
    /// How the tile sums the products (its instruction): the pairs where fbgemm saturates them
    /// (a static product on a host without VNNI) or where no pair can (7-bit activations) and the
    /// host has no VNNI; exact sums on `vpdpbusd` otherwise.
    pub sums: ProductSums,
    /// The bias buffer (n float32): added by the fused multiply-add (dynamic), or before the
    /// requantization (static).
    pub bias: Option<BufId>,
    /// Static quantization: A holds uint8 values with these parameters, and the product is
    /// requantized to uint8 with `requantize`'s.
    pub requantize: Option<StaticProduct>,
    /// A convolution: A is these windows of an image, packed from it per call.
    pub windows: Option<QuantizedWindows>,
}

/// A quantized convolution's A: row i of A is output pixel (n, oh, ow) (row-major over
/// [N, OH, OW]), column p is (kh, kw, c) row-major over [KH, KW, C] (fbgemm's im2col order,
/// whose pairs of k the AVX2 kernel saturates), the element the image at (n, c,
/// oh·stride₀ + kh·dilation₀ − pad₀, ow·stride₁ + kw·dilation₁ − pad₁), A's zero point outside
/// it. B is the weight [O, C, KH, KW], contiguous, read in the same k order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuantizedWindows {
    pub channels: i64,
    pub kernel: [i64; 2],
    pub out_size: [i64; 2],
    pub in_size: [i64; 2],
    /// The padding before the first row and column.
    pub pad: [i64; 2],
    pub stride: [i64; 2],
    pub dilation: [i64; 2],
    /// The image's element strides along (n, c, h, w).
    pub strides: [i64; 4],
}

impl QuantizedWindows {
    /// The weight's element offset of k index `p` (B is [O, C, KH, KW], contiguous).
    pub fn weight_offset(&self, p: i64) -> i64 {
        let (taps, c) = (p / self.channels, p % self.channels);
        c * self.kernel[0] * self.kernel[1] + taps
    }
}

/// A statically quantized product's parameters: A's (its values are already uint8) and the
/// output's, and a fused relu.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StaticProduct {
    pub a: QuantParamBits,
    pub out: QuantParamBits,
    pub relu: bool,
}

/// [`QuantParams`] with the scale as its bits (hashable, for the GEMM's description).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuantParamBits {
    pub scale_bits: u32,
    pub zero_point: i32,
}

/// A uint8 tensor's scale (float32, as fbgemm takes it) and zero point: a static model's
/// (0..=255), or one call's activations' (`choose_activation_params`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantParams {
    pub scale: f32,
    pub zero_point: i32,
}

impl QuantParams {
    /// Whether these are a static model's parameters: a finite positive scale, a zero point
    /// in 0..=255.
    pub fn is_static(self) -> bool {
        (0..=255).contains(&self.zero_point) && self.scale > 0.0 && self.scale.is_finite()
    }
    pub fn bits(self) -> QuantParamBits {
        QuantParamBits { scale_bits: self.scale.to_bits(), zero_point: self.zero_point }
    }
}

impl QuantParamBits {
    pub fn params(self) -> QuantParams {
        QuantParams { scale: f32::from_bits(self.scale_bits), zero_point: self.zero_point }
    }
}

/// One output element of a statically quantized product from its int32 sum `raw` (both zero
/// points' offsets taken off), as fbgemm's `requantizeOutputProcessingAvx2` computes it in
/// PyTorch's build (measured against PyTorch on random convolutions and linears):
///
/// ```text
/// s   = sa · sw[j]                                 (float32)
/// x   = float(raw) + bias[j] / s                   (per output channel: a division, then the add)
///     = fma(bias, 1 / s, float(raw))               (per tensor: the reciprocal, contracted)
/// q   = cvtps(x · (s / so))                        (float32 multiply, ties to even)
/// out = clamp(clamp(q, int16) + zo, relu ? zo : 0, 255)
/// ```
pub fn requantize(raw: i32, bias: Option<f32>, a_scale: f32, w_scale: f32, per_column: bool, out: QuantParams, relu: bool) -> u8 {
    let s = a_scale * w_scale;
    let x = match bias {
        Some(b) if per_column => raw as f32 + b / s,
        Some(b) => b.mul_add(1.0 / s, raw as f32),
        None => raw as f32,
    };
    let t = x * (s / out.scale);
    let q = cvtps(t).clamp(-32768, 32767) + out.zero_point;
    q.clamp(if relu { out.zero_point } else { 0 }, 255) as u8
}

/// x86's float to int32 conversion (`cvtps2dq`): ties to even; NaN and what is out of range
/// become −2³¹.
pub fn cvtps(t: f32) -> i32 {
    let r = t.round_ties_even();
    if (-2147483648.0..2147483648.0).contains(&r) { r as i32 } else { i32::MIN }
}

/// How an int8 product sums its uint8 × int8 products: what decides whether Kiln's result is
/// fbgemm's where the activations take all 8 bits (static quantization), and which instruction
/// the tile uses. fbgemm takes `SaturatedPairs` on AVX2 and AVX-512 hosts and `Exact` on hosts
/// with AVX-512 VNNI (its `inst_set_t::avx512_vnni` kernels, unless `FBGEMM_ENABLE_INSTRUCTIONS`
/// forces an older set); the frontend says which one the model's kernel computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProductSums {
    /// Pairs (k, k + 1) from k = 0, each pair's sum saturated to int16, the pairs added in
    /// int32: `vpmaddubsw` then `vpmaddwd` by ones ([`saturating_dot`]). Any AVX2 host.
    SaturatedPairs,
    /// The exact sum in int32 (wrapping): `vpdpbusd`, four products a lane in one instruction.
    /// Hosts with AVX-512 VNNI.
    Exact,
}

impl ProductSums {
    pub fn name(self) -> &'static str {
        match self {
            ProductSums::SaturatedPairs => "pairs",
            ProductSums::Exact => "exact",
        }
    }

    pub fn parse(s: &str) -> Option<ProductSums> {
        [ProductSums::SaturatedPairs, ProductSums::Exact].into_iter().find(|p| p.name() == s)
    }

    /// Σₖ a[k]·b[k] summed this way.
    pub fn dot(self, a: impl Iterator<Item = i32>, b: impl Iterator<Item = i32>) -> i32 {
        match self {
            ProductSums::SaturatedPairs => saturating_dot(a, b),
            ProductSums::Exact => a.zip(b).fold(0i32, |s, (x, w)| s.wrapping_add(x * w)),
        }
    }

    /// Whether `host` has the instructions: AVX2 for the pairs, AVX-512 VNNI (with VL, for
    /// the 8-lane tile) for exact sums.
    pub fn runs_on(self, host: &crate::codegen::target::Target) -> bool {
        match self {
            ProductSums::SaturatedPairs => host.has_feature("avx2"),
            ProductSums::Exact => ["avx512f", "avx512vl", "avx512vnni"].iter().all(|f| host.has_feature(f)),
        }
    }
}

/// Σₖ a[k]·b[k] as the AVX2 int8 kernels sum it: uint8 × int8 in pairs (k, k + 1) from k = 0,
/// each pair's sum saturated to int16 (`vpmaddubsw`), the pairs added in int32.
pub fn saturating_dot(a: impl Iterator<Item = i32>, b: impl Iterator<Item = i32>) -> i32 {
    let mut sum = 0i32;
    let mut pair: Option<i32> = None;
    for (x, w) in a.zip(b) {
        match pair.take() {
            None => pair = Some(x * w),
            Some(p) => sum = sum.wrapping_add((p + x * w).clamp(-32768, 32767)),
        }
    }
    if let Some(p) = pair {
        sum = sum.wrapping_add(p);
    }
    sum
}

/// int32 words before A's quads in a row panel: zero point, scale bits, k (the call's: code
/// for symbolic sizes runs at other k than it was lowered with), up to 13 row sums (a whole
/// 64-byte line, so the quads stay aligned).
pub const A_HEADER: i64 = 16;

/// The most rows an int8 tile has (the row sums must fit in [`A_HEADER`]).
pub const MAX_ROWS: i64 = A_HEADER - 3;

/// Quads of a k.
pub fn quads(k: i64) -> i64 {
    (k + 3) / 4
}

/// Floats (4-byte words) of one packed A row panel.
pub fn a_panel_words(k: i64, mr: i64) -> i64 {
    A_HEADER + quads(k) * mr
}

/// Floats (4-byte words) of one packed B column panel.
pub fn b_panel_words(k: i64, nr: i64) -> i64 {
    nr + quads(k) * nr
}

/// PyTorch's choice of uint8 parameters for values in [min, max] (qmin 0, qmax 255, or 0..127
/// with `reduce_range`; no sparsity preserving, no power-of-two scale): the range widened to
/// hold 0, its scale in double then float, a scale too small cut off at 6.1e-5 (the range
/// widened to match), the zero point from whichever end loses less to rounding, nudged into
/// [qmin, qmax] and rounded to nearest even.
pub fn choose_activation_params(min: f32, max: f32, reduce_range: bool) -> QuantParams {
    let (qmin, qmax) = if reduce_range { (0i32, 127i32) } else { (0, 255) };
    let (mut min, mut max) = (min.min(0.0), max.max(0.0));
    let mut scale = (max as f64 - min as f64) / (qmax - qmin) as f64;
    if scale as f32 == 0.0 || (1.0f32 / scale as f32).is_infinite() {
        scale = 0.1;
    }
    const SMALL_SCALE: f32 = 6.1e-5;
    if scale < SMALL_SCALE as f64 {
        let old = scale as f32;
        scale = SMALL_SCALE as f64;
        if min == 0.0 {
            max = SMALL_SCALE * (qmax - qmin) as f32;
        } else if max == 0.0 {
            min = -SMALL_SCALE * (qmax - qmin) as f32;
        } else {
            let amplifier = SMALL_SCALE / old;
            min *= amplifier;
            max *= amplifier;
        }
    }
    let from_min = qmin as f64 - min as f64 / scale;
    let from_max = qmax as f64 - max as f64 / scale;
    let min_error = (qmin as f64).abs() - (min as f64 / scale).abs();
    let max_error = (qmax as f64).abs() - (max as f64 / scale).abs();
    let initial = if min_error < max_error { from_min } else { from_max };
    let zero_point = if initial < qmin as f64 {
        qmin
    } else if initial > qmax as f64 {
        qmax
    } else if initial.is_nan() {
        // (an infinite range: x86 converts NaN to the "integer indefinite", i32::MIN)
        i32::MIN
    } else {
        initial.round_ties_even() as i32
    };
    QuantParams { scale: scale as f32, zero_point }
}

/// One element as fbgemm's `QuantizeAvx2` rounds it: fma(x, 1/scale, zp), capped below 2³¹
/// (NaN caps too, as `vminps` returns its second operand), converted ties-to-even (what is
/// below −2³¹ becomes −2³¹), clamped to 0..=255.
#[inline]
pub fn quantize(x: f32, inverse_scale: f32, zero_point: f32) -> u8 {
    let t = x.mul_add(inverse_scale, zero_point);
    let t = if t < 2147483520.0 { t } else { 2147483520.0 };
    let r = t.round_ties_even();
    let i = if r >= -2147483648.0 { r as i32 } else { i32::MIN };
    i.clamp(0, 255) as u8
}

/// The float32 reciprocal fbgemm quantizes with.
pub fn inverse(scale: f32) -> f32 {
    1.0 / scale
}

/// The smallest and largest element (0, 0 for none), as the activations' range.
pub fn min_max(xs: impl Iterator<Item = f32>) -> (f32, f32) {
    let mut out: Option<(f32, f32)> = None;
    for x in xs {
        out = Some(match out {
            None => (x, x),
            Some((lo, hi)) => (if x < lo { x } else { lo }, if x > hi { x } else { hi }),
        });
    }
    out.unwrap_or((0.0, 0.0))
}

/// The dequantized product of one output element from its int32 parts (see the module doc).
#[allow(clippy::too_many_arguments)]
pub fn dequantize(dot: i32, a: QuantParams, a_sum: i32, b_sum: i32, k: i64, b_scale: f32, b_zero_point: i32, bias: Option<f32>) -> f32 {
    let col_offset = b_sum.wrapping_sub(b_zero_point.wrapping_mul(k as i32));
    let raw = dot.wrapping_sub(a.zero_point.wrapping_mul(col_offset)).wrapping_sub(a_sum.wrapping_mul(b_zero_point));
    match bias {
        Some(bias) => (raw as f32).mul_add(a.scale * b_scale, bias),
        None => raw as f32 * (a.scale * b_scale),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_follow_pytorch() {
        // torch.ops.quantized.linear_dynamic's choice for a tensor spanning [-1, 3]:
        // scale 4/127, zero point round(127/4) = 32 (from the min end).
        let p = choose_activation_params(-1.0, 3.0, true);
        assert_eq!(p, QuantParams { scale: (4.0f64 / 127.0) as f32, zero_point: 32 });
        // All zeros: scale 0.1, zero point 0.
        assert_eq!(choose_activation_params(0.0, 0.0, true), QuantParams { scale: 0.1, zero_point: 0 });
        // Positive only: the range starts at 0.
        assert_eq!(choose_activation_params(2.0, 5.0, false).zero_point, 0);
        // A tiny range: the scale is cut off at 6.1e-5.
        assert_eq!(choose_activation_params(-1e-6, 1e-6, true).scale, 6.1e-5);
    }

    #[test]
    fn quantize_rounds_ties_to_even_and_clamps() {
        assert_eq!(quantize(0.5, 1.0, 0.0), 0);
        assert_eq!(quantize(1.5, 1.0, 0.0), 2);
        assert_eq!(quantize(2.5, 1.0, 0.0), 2);
        assert_eq!(quantize(-3.0, 1.0, 1.0), 0);
        assert_eq!(quantize(1e30, 1.0, 0.0), 255);
        assert_eq!(quantize(f32::NAN, 1.0, 0.0), 255);
        assert_eq!(quantize(f32::NEG_INFINITY, 1.0, 0.0), 0);
    }
}
