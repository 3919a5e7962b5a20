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
//! then per quad `mr` rows × 4 uint8. A column panel of B is `nr` int32 column sums Σₖ qb,
//! then per quad `nr` columns × 4 int8: one 32-byte vector holds 8 columns' quad, so
//! `vpmaddubsw` against a row's quad broadcast gives each column's pair sums.

use crate::lower::loop_ir::BufId;

/// What the GEMM needs besides A and B to run a dynamically quantized product: the
/// buffers of B's scales and zero points (1 or n elements each) and whether A takes 7 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuantizedB {
    pub scale: BufId,
    pub zero_point: BufId,
    pub per_column: bool,
    pub reduce_range: bool,
    /// The bias buffer (n float32), added by the fused multiply-add.
    pub bias: Option<BufId>,
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

/// An activation's scale and zero point for one call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ActivationParams {
    pub scale: f32,
    pub zero_point: i32,
}

/// PyTorch's choice of uint8 parameters for values in [min, max] (qmin 0, qmax 255, or 0..127
/// with `reduce_range`; no sparsity preserving, no power-of-two scale): the range widened to
/// hold 0, its scale in double then float, a scale too small cut off at 6.1e-5 (the range
/// widened to match), the zero point from whichever end loses less to rounding, nudged into
/// [qmin, qmax] and rounded to nearest even.
pub fn choose_activation_params(min: f32, max: f32, reduce_range: bool) -> ActivationParams {
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
    ActivationParams { scale: scale as f32, zero_point }
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
pub fn dequantize(dot: i32, a: ActivationParams, a_sum: i32, b_sum: i32, k: i64, b_scale: f32, b_zero_point: i32, bias: Option<f32>) -> f32 {
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
        assert_eq!(p, ActivationParams { scale: (4.0f64 / 127.0) as f32, zero_point: 32 });
        // All zeros: scale 0.1, zero point 0.
        assert_eq!(choose_activation_params(0.0, 0.0, true), ActivationParams { scale: 0.1, zero_point: 0 });
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
