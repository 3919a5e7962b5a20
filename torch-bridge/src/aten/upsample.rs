//! ATen's `upsample_nearest2d` and `upsample_bilinear2d` (`F.interpolate`, `nn.Upsample`) as
//! views of the input and pointwise ops, with eager's own source indices and weights.
//!
//! Along one dim, each output index reads one input index (nearest) or two with weights
//! (linear). ATen computes those in float arithmetic from the scale (`nearest_idx`,
//! `area_pixel_compute_source_index`, `guard_index_and_lambda`); [`nearest_taps`] and
//! [`linear_taps`] compute the same numbers here, at compile time, so the borders clamp
//! where eager's do and the weights are eager's to the bit.
//!
//! Where out / in = p / q in lowest terms, output index r + p·m reads input indices that
//! grow by q with m, with the same weights, for each residue r < p — except near the
//! borders, where the indices clamp. So a dim is resampled as p planes, each a cat of
//! runs of m with equal taps, each run a weighted sum of strided views of the input; the
//! planes are stacked after the dim and merged into it. Bilinear is two such passes, W
//! then H: eager's contiguous kernel computes `(x[h0,w0]·a0 + x[h0,w1]·a1)·b0 +
//! (x[h1,w0]·a0 + x[h1,w1]·a1)·b1`, the same operations in the same order.
//!
//! Taps whose period p is above [`MAX_PERIOD`], or that make more than [`MAX_RUNS`] runs
//! (align_corners=True at most sizes), are refused: the node stays in TorchScript.

use super::windows::gcd;
use super::{Arg, Lower, R};
use crate::ts_dump::Const;
use kiln_compiler::graph::ir::{BinaryOp, IrError};
use kiln_compiler::{DType, Scalar, ValueId};

/// The largest period of a dim's taps Kiln builds (an output / input ratio of p / q in
/// lowest terms with p at most this): 2× and 4× upsampling are 2 and 4, 1.5× is 3.
const MAX_PERIOD: i64 = 16;

/// The most runs of equal taps a dim may make (each a few graph nodes).
const MAX_RUNS: usize = 64;

fn e(r: Result<ValueId, IrError>) -> R<ValueId> {
    r.map_err(|e| e.0)
}

/// What one output index reads: input indices with their weights; nearest's one tap has no
/// weight (no multiply).
type Taps = Vec<(i64, Option<f64>)>;

/// How an upsample op gives its output: sizes, or scale factors (the output is
/// ⌊in · scale⌋ and eager indexes with 1 / scale).
pub(super) enum UpsampleSize<'a> {
    Sizes(&'a [i64]),
    Scales(&'a [f64]),
}

/// Rounds to float32 where the arithmetic is float32's (one f64 operation on two float32
/// values rounds to the same float32 as the float32 operation would).
fn rounder(f32: bool) -> impl Fn(f64) -> f64 {
    move |x| if f32 { x as f32 as f64 } else { x }
}

/// ATen's `compute_scales_value`: 1 / scale where a scale was given, else in / out.
fn scale_value(scale: Option<f64>, input: i64, output: i64, r: &impl Fn(f64) -> f64) -> f64 {
    match scale {
        Some(s) if s > 0.0 => r(1.0 / s),
        _ => r(r(input as f64) / r(output as f64)),
    }
}

/// ATen's `nearest_idx` (float arithmetic whatever the dtype).
fn nearest_taps(input: i64, output: i64, scale: Option<f64>) -> Vec<Taps> {
    let r = rounder(true);
    let s = scale_value(scale, input, output, &r);
    (0..output)
        .map(|i| {
            let index = if output == input {
                i
            } else if output == 2 * input {
                i >> 1
            } else {
                (r(r(i as f64) * s).floor() as i64).min(input - 1)
            };
            vec![(index, None)]
        })
        .collect()
}

/// ATen's `compute_source_index_and_lambda` in the input's float type (float32 for float32).
fn linear_taps(input: i64, output: i64, align_corners: bool, scale: Option<f64>, f32: bool) -> Vec<Taps> {
    let r = rounder(f32);
    let ratio = if align_corners {
        if output > 1 {
            r(r((input - 1) as f64) / r((output - 1) as f64))
        } else {
            0.0
        }
    } else {
        scale_value(scale, input, output, &r)
    };
    (0..output)
        .map(|i| {
            if output == input {
                return vec![(i, Some(1.0)), (i, Some(0.0))];
            }
            let src = if align_corners { r(ratio * i as f64) } else { r(r(ratio * r(i as f64 + 0.5)) - 0.5).max(0.0) };
            let i0 = (src.floor() as i64).min(input - 1);
            let lambda1 = r(src - i0 as f64).clamp(0.0, 1.0);
            let i1 = i0 + (i0 < input - 1) as i64;
            vec![(i0, Some(r(1.0 - lambda1))), (i1, Some(lambda1))]
        })
        .collect()
}

impl Lower<'_> {
    /// upsample_nearest2d / upsample_bilinear2d of a [N, C, H, W] float tensor (see the
    /// module comment). `linear`: Some(align_corners) for bilinear.
    pub(super) fn upsample2d(&mut self, x: &Arg, size: UpsampleSize, scales: [Option<f64>; 2], linear: Option<bool>) -> R<ValueId> {
        let v = self.float_only(x)?;
        let sizes = self.sizes(v)?;
        if sizes.len() != 4 || sizes[2..].contains(&0) {
            return Err("upsampling of an input that is not N, C, H, W with H, W > 0 (eager raises)".into());
        }
        let (out, scales) = match size {
            UpsampleSize::Sizes(&[oh, ow]) => ([oh, ow], scales),
            UpsampleSize::Scales(&[sh, sw]) => {
                let out = |n: i64, s: f64| (n as f64 * s) as i64;
                ([out(sizes[2], sh), out(sizes[3], sw)], [Some(sh), Some(sw)])
            }
            _ => return Err("upsampling to sizes or scales that are not 2 numbers (eager raises)".into()),
        };
        if out.iter().any(|&o| o < 1) {
            return Err("an upsampling output of size 0 (eager raises)".into());
        }
        let f32 = self.g.ty(v).dtype == DType::F32;
        let taps = |d: usize| match linear {
            None => nearest_taps(sizes[2 + d], out[d], scales[d]),
            Some(align) => linear_taps(sizes[2 + d], out[d], align, scales[d], f32),
        };
        let (th, tw) = (taps(0), taps(1));
        let t = self.resample(v, 3, &tw)?;
        let t = self.resample(t, 2, &th)?;
        // (Nearest at the input's own size is the input itself.)
        Ok(if t == v { self.g.copy(v) } else { self.fresh(t) })
    }

    /// `v` along `dim` resampled by `taps` (one per output index; see the module comment).
    fn resample(&mut self, v: ValueId, dim: usize, taps: &[Taps]) -> R<ValueId> {
        let sizes = self.sizes(v)?;
        let (input, output) = (sizes[dim], taps.len() as i64);
        let g = gcd(input, output);
        let (p, q) = (output / g, input / g);
        if p > MAX_PERIOD {
            return Err(format!("upsampling {input} to {output}: weights that repeat every {p} outputs (Kiln takes up to {MAX_PERIOD})"));
        }
        let planes_len = output / p;
        // Per residue, the runs of m with the same taps relative to q·m.
        let mut planes = vec![];
        let mut runs = 0;
        for r in 0..p {
            let relative = |m: i64| -> Taps { taps[(r + p * m) as usize].iter().map(|&(i, w)| (i - q * m, w)).collect() };
            let mut parts = vec![];
            let mut start = 0;
            while start < planes_len {
                let first = relative(start);
                let mut end = start + 1;
                while end < planes_len && relative(end) == first {
                    end += 1;
                }
                runs += 1;
                if runs > MAX_RUNS {
                    return Err(format!("upsampling {input} to {output}: weights that change along the dim (more than {MAX_RUNS} runs)"));
                }
                parts.push(self.weighted_views(v, dim, &first, q, start, end - start)?);
                start = end;
            }
            planes.push(if parts.len() == 1 { parts[0] } else { e(self.g.cat(&parts, dim))? });
        }
        self.interleave(&planes, dim)
    }

    /// Σ weight · v[base + q·m] along `dim` for m in start..start + len, one term per tap in
    /// eager's order.
    fn weighted_views(&mut self, v: ValueId, dim: usize, taps: &Taps, q: i64, start: i64, len: i64) -> R<ValueId> {
        let dtype = self.g.ty(v).dtype;
        let mut sum: Option<ValueId> = None;
        for &(base, weight) in taps {
            let (first, span) = (base + q * start, q * (len - 1) + 1);
            let mut t = if (first, span) == (0, self.sizes(v)?[dim]) { v } else { e(self.g.slice(v, dim, first, span))? };
            if q > 1 {
                // Every q-th element: windows of one at step q, the window dim dropped.
                let mut shape = self.sizes(t)?;
                shape[dim] = len;
                t = e(self.g.unfold(t, dim, 1, q, 1))?;
                t = e(self.g.reshape(t, &shape))?;
            }
            if let Some(w) = weight {
                let w = self.g.constant(Scalar::Float(w), dtype);
                t = e(self.g.binary(BinaryOp::Mul, t, w))?;
            }
            sum = Some(match sum {
                None => t,
                Some(s) => e(self.g.binary(BinaryOp::Add, s, t))?,
            });
        }
        sum.ok_or_else(|| "an output index that reads nothing".into())
    }
}

/// An upsample op's `float?` scale argument.
fn optional_scale(a: &Arg) -> R<Option<f64>> {
    match a {
        Arg::Const(Const::None) => Ok(None),
        Arg::Const(Const::Float(s)) => Ok(Some(*s)),
        _ => Err("an upsampling scale given at run time".into()),
    }
}

impl Lower<'_> {
    /// upsample_nearest2d / upsample_bilinear2d in their two overloads: `.vec` (output
    /// sizes or scale factors, as `F.interpolate` calls it) and the one with sizes and a
    /// scale per dim.
    pub(super) fn upsample_op(&mut self, kind: &str, args: &[Arg]) -> R<ValueId> {
        let (x, rest) = args.split_first().ok_or("upsampling without an input")?;
        let (align, rest) = if kind == "aten::upsample_bilinear2d" {
            match rest {
                [size, Arg::Const(Const::Bool(a)), more @ ..] => (Some(*a), [std::slice::from_ref(size), more].concat()),
                _ => return Err("upsample_bilinear2d's align_corners given at run time".into()),
            }
        } else {
            (None, rest.to_vec())
        };
        match &rest[..] {
            [Arg::Const(Const::Ints(sizes)), Arg::Const(Const::None)] => self.upsample2d(x, UpsampleSize::Sizes(sizes), [None, None], align),
            [Arg::Const(Const::None), Arg::Const(Const::Floats(scales))] => self.upsample2d(x, UpsampleSize::Scales(scales), [None, None], align),
            [Arg::Const(Const::Ints(sizes)), sh, sw] => {
                let scales = [optional_scale(sh)?, optional_scale(sw)?];
                self.upsample2d(x, UpsampleSize::Sizes(sizes), scales, align)
            }
            [Arg::Const(Const::Ints(_)), Arg::Const(Const::Floats(_))] => Err("upsampling given both sizes and scale factors (eager raises)".into()),
            _ => Err("upsampling sizes or scales given at run time".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_taps_follow_atens_float_index() {
        let idx = |input, output, scale| nearest_taps(input, output, scale).iter().map(|t| t[0].0).collect::<Vec<_>>();
        assert_eq!(idx(3, 6, None), [0, 0, 1, 1, 2, 2]);
        assert_eq!(idx(4, 2, None), [0, 2]);
        assert_eq!(idx(2, 5, None), [0, 0, 0, 1, 1]);
        // A scale factor given: indexed by 1 / scale, not by in / out.
        assert_eq!(idx(3, 4, Some(1.5)), [0, 0, 1, 2]);
    }

    #[test]
    fn linear_taps_clamp_at_the_borders() {
        let t = linear_taps(3, 6, false, None, true);
        assert_eq!(t[0], vec![(0, Some(1.0)), (1, Some(0.0))]);
        assert_eq!(t[1], vec![(0, Some(0.75)), (1, Some(0.25))]);
        assert_eq!(t[2], vec![(0, Some(0.25)), (1, Some(0.75))]);
        assert_eq!(t[5], vec![(2, Some(0.75)), (2, Some(0.25))]);
        let a = linear_taps(3, 5, true, None, true);
        assert_eq!(a[2], vec![(1, Some(1.0)), (2, Some(0.0))]);
        assert_eq!(a[4], vec![(2, Some(1.0)), (2, Some(0.0))]);
    }
}
