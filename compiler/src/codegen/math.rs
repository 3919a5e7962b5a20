//! Transcendental functions emitted inline as LLVM IR.
//!
//! f32: polynomial/rational approximations written as scalar IR that the loop vectoriser
//! widens (16 lanes on AVX-512) — no libm calls in hot loops. Error bounds are measured by
//! `tests/math_accuracy.rs` against f64 libm over sweeps including the special values.
//! f64: calls to libm (correctly rounded to ~1 ulp, not vectorised) — accuracy first until
//! f64 polynomials of the same quality are written.

use inkwell::builder::Builder;
use inkwell::context::Context;
use inkwell::intrinsics::Intrinsic;
use inkwell::module::Module;
use inkwell::values::{BasicMetadataValueEnum, FloatValue, IntValue};
use inkwell::FloatPredicate as P;

pub struct Math<'a, 'ctx> {
    pub ctx: &'ctx Context,
    pub module: &'a Module<'ctx>,
    pub b: &'a Builder<'ctx>,
    /// Eager's kernels on the target are PyTorch's AVX-512 ones (`Target::eager_avx512`).
    pub eager_avx512: bool,
}

type R<'ctx> = Result<FloatValue<'ctx>, inkwell::builder::BuilderError>;

impl<'a, 'ctx> Math<'a, 'ctx> {
    fn f32c(&self, v: f64) -> FloatValue<'ctx> {
        self.ctx.f32_type().const_float(v)
    }
    fn i32c(&self, v: i64) -> IntValue<'ctx> {
        self.ctx.i32_type().const_int(v as u64, true)
    }
    pub fn intrinsic(&self, name: &str, x: &[FloatValue<'ctx>]) -> R<'ctx> {
        let f = Intrinsic::find(name)
            .and_then(|i| i.get_declaration(self.module, &[x[0].get_type().into()]))
            .unwrap_or_else(|| panic!("intrinsic {name}"));
        let args: Vec<BasicMetadataValueEnum> = x.iter().map(|v| (*v).into()).collect();
        let call = self.b.build_call(f, &args, name)?;
        match call.try_as_basic_value() {
            inkwell::values::ValueKind::Basic(v) => Ok(v.into_float_value()),
            _ => unreachable!(),
        }
    }
    /// A call to a libm function of one or two doubles.
    pub fn libm(&self, name: &str, x: &[FloatValue<'ctx>]) -> R<'ctx> {
        let f64t = self.ctx.f64_type();
        let f = self.module.get_function(name).unwrap_or_else(|| {
            let params: Vec<_> = x.iter().map(|_| f64t.into()).collect();
            self.module.add_function(name, f64t.fn_type(&params, false), None)
        });
        let args: Vec<BasicMetadataValueEnum> = x.iter().map(|v| (*v).into()).collect();
        match self.b.build_call(f, &args, name)?.try_as_basic_value() {
            inkwell::values::ValueKind::Basic(v) => Ok(v.into_float_value()),
            _ => unreachable!(),
        }
    }
    fn poly(&self, x: FloatValue<'ctx>, coeffs: &[f64]) -> R<'ctx> {
        // Horner with fused multiply-adds: one rounding a step, half the instructions.
        let mut acc = self.f32c(coeffs[0]);
        for &c in &coeffs[1..] {
            acc = self.intrinsic("llvm.fma", &[acc, x, self.f32c(c)])?;
        }
        Ok(acc)
    }
    fn select(&self, c: IntValue<'ctx>, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> R<'ctx> {
        Ok(self.b.build_select(c, a, b, "")?.into_float_value())
    }
    fn mul(&self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> R<'ctx> {
        self.b.build_float_mul(a, b, "")
    }
    fn add(&self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> R<'ctx> {
        self.b.build_float_add(a, b, "")
    }
    fn sub(&self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> R<'ctx> {
        self.b.build_float_sub(a, b, "")
    }
    fn div(&self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> R<'ctx> {
        self.b.build_float_div(a, b, "")
    }
    fn is_nan(&self, x: FloatValue<'ctx>) -> Result<IntValue<'ctx>, inkwell::builder::BuilderError> {
        self.b.build_float_compare(P::UNO, x, x, "")
    }
    /// 2^n for n in [-126, 127], built from exponent bits.
    fn pow2i(&self, n: IntValue<'ctx>) -> R<'ctx> {
        let e = self.b.build_int_add(n, self.i32c(127), "")?;
        let bits = self.b.build_left_shift(e, self.i32c(23), "")?;
        Ok(self.b.build_bit_cast(bits, self.ctx.f32_type(), "")?.into_float_value())
    }

    /// exp(x), Cephes-style: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial, 2^n applied in
    /// two halves so results down to the subnormal range round once.
    pub fn exp_f32(&self, x: FloatValue<'ctx>) -> R<'ctx> {
        self.exp_f32_with(x, true)
    }

    /// exp(x) for uses that add it to 1 (sigmoid, silu, tanh): below 2^-125 the result is
    /// absorbed by the 1 anyway, so x is clamped at -86.6 (exp = 2.4e-38, normal) and 2^n is
    /// applied without the two-step subnormal scaling.
    pub fn exp_f32_plus_one_use(&self, x: FloatValue<'ctx>) -> R<'ctx> {
        self.exp_f32_with(x, false)
    }

    /// n comes from the "magic number" trick: t = x log2(e) + 1.5·2^23 rounds the product to
    /// an integer held in t's low mantissa bits, so n as a float is t - 1.5·2^23 and as an
    /// integer is bits(t) - bits(1.5·2^23): no float-to-int conversion. NaN needs no special
    /// case: the clamps keep it, and every later float op propagates it (the integer path only
    /// scales a NaN).
    fn exp_f32_with(&self, x: FloatValue<'ctx>, subnormals: bool) -> R<'ctx> {
        const MAGIC: f64 = 12582912.0; // 1.5 * 2^23
        let hi = self.f32c(89.0);
        let lo = self.f32c(if subnormals { -104.0 } else { -86.6 });
        let xc = self.select(self.b.build_float_compare(P::OGT, x, hi, "")?, hi, x)?;
        let xc = self.select(self.b.build_float_compare(P::OLT, xc, lo, "")?, lo, xc)?;
        let t = self.intrinsic("llvm.fma", &[xc, self.f32c(std::f64::consts::LOG2_E), self.f32c(MAGIC)])?;
        let n = self.sub(t, self.f32c(MAGIC))?;
        let r = self.intrinsic("llvm.fma", &[n, self.f32c(-0.693359375), xc])?;
        let r = self.intrinsic("llvm.fma", &[n, self.f32c(2.12194440e-4), r])?;
        let p = self.poly(r, &[1.9875691500E-4, 1.3981999507E-3, 8.3334519073E-3, 4.1665795894E-2, 1.6666665459E-1, 5.0000001201E-1])?;
        let y = self.add(self.intrinsic("llvm.fma", &[p, self.mul(r, r)?, r])?, self.f32c(1.0))?;
        let tbits = self.b.build_bit_cast(t, self.ctx.i32_type(), "")?.into_int_value();
        let ni = self.b.build_int_sub(tbits, self.i32c(0x4B40_0000), "")?;
        if !subnormals {
            // n in [-125, 128]: 2^(n-1) is a normal float; the doubling overflows to inf
            // exactly where exp does.
            let half = self.pow2i(self.b.build_int_sub(ni, self.i32c(1), "")?)?;
            return self.mul(self.mul(y, half)?, self.f32c(2.0));
        }
        let n1 = self.b.build_right_shift(ni, self.i32c(1), true, "")?;
        let n2 = self.b.build_int_sub(ni, n1, "")?;
        self.mul(self.mul(y, self.pow2i(n1)?)?, self.pow2i(n2)?)
    }

    /// log(x), Cephes-style: x = m 2^e with m in [sqrt(1/2), sqrt(2)), degree-8 polynomial in m-1.
    pub fn log_f32(&self, x: FloatValue<'ctx>) -> R<'ctx> {
        let i32t = self.ctx.i32_type();
        let f32t = self.ctx.f32_type();
        // Subnormals: scale into the normal range first.
        let tiny = self.b.build_float_compare(P::OLT, x, self.f32c(1.17549435e-38), "")?;
        let xs = self.select(tiny, self.mul(x, self.f32c(8388608.0))?, x)?;
        let bits = self.b.build_bit_cast(xs, i32t, "")?.into_int_value();
        let e = self.b.build_right_shift(bits, self.i32c(23), false, "")?;
        let e = self.b.build_and(e, self.i32c(0xff), "")?;
        let e = self.b.build_int_sub(e, self.i32c(126), "")?;
        let e = self.b.build_int_sub(e, self.b.build_select(tiny, self.i32c(23), self.i32c(0), "")?.into_int_value(), "")?;
        let mbits = self.b.build_or(self.b.build_and(bits, self.i32c(0x807fffff), "")?, self.i32c(0x3f000000), "")?;
        let m = self.b.build_bit_cast(mbits, f32t, "")?.into_float_value();
        let small = self.b.build_float_compare(P::OLT, m, self.f32c(std::f64::consts::FRAC_1_SQRT_2), "")?;
        let e = self.b.build_int_sub(e, self.b.build_int_z_extend(small, i32t, "")?, "")?;
        let m = self.select(small, self.add(m, m)?, m)?;
        let m = self.sub(m, self.f32c(1.0))?;
        let ef = self.b.build_signed_int_to_float(e, f32t, "")?;
        let z = self.mul(m, m)?;
        let p = self.poly(m, &[7.0376836292E-2, -1.1514610310E-1, 1.1676998740E-1, -1.2420140846E-1, 1.4249322787E-1, -1.6668057665E-1, 2.0000714765E-1, -2.4999993993E-1, 3.3333331174E-1])?;
        let y = self.mul(self.mul(p, m)?, z)?;
        let y = self.add(y, self.mul(ef, self.f32c(-2.12194440e-4))?)?;
        let y = self.sub(y, self.mul(z, self.f32c(0.5))?)?;
        let r = self.add(self.add(m, y)?, self.mul(ef, self.f32c(0.693359375))?)?;
        // Special values: log(0) = -inf, log(inf) = inf, log(<0) = NaN, log(NaN) = NaN.
        let r = self.select(self.b.build_float_compare(P::OEQ, x, self.f32c(0.0), "")?, self.f32c(f64::NEG_INFINITY), r)?;
        let r = self.select(self.b.build_float_compare(P::OEQ, x, self.f32c(f64::INFINITY), "")?, x, r)?;
        let bad = self.b.build_float_compare(P::ULT, x, self.f32c(0.0), "")?;
        self.select(bad, self.f32c(f64::NAN), r)
    }

    /// log1p(x) = log(u) * x / (u - 1) with u = 1 + x (exact correction of the rounding in u).
    pub fn log1p_f32(&self, x: FloatValue<'ctx>) -> R<'ctx> {
        let u = self.add(self.f32c(1.0), x)?;
        let l = self.log_f32(u)?;
        let r = self.mul(l, self.div(x, self.sub(u, self.f32c(1.0))?)?)?;
        let r = self.select(self.b.build_float_compare(P::OEQ, u, self.f32c(1.0), "")?, x, r)?;
        let r = self.select(self.b.build_float_compare(P::OEQ, x, self.f32c(f64::INFINITY), "")?, x, r)?;
        // u == 0 (x == -1): log gives -inf and x/(u-1) = 1.
        Ok(r)
    }

    /// tanh: odd Taylor polynomial below 0.4 (no cancellation), 1 - 2/(exp(2|x|)+1) above.
    pub fn tanh_f32(&self, x: FloatValue<'ctx>) -> R<'ctx> {
        let ax = self.intrinsic("llvm.fabs", &[x])?;
        let z = self.mul(x, x)?;
        let p = self.poly(z, &[21844.0 / 6081075.0, -1382.0 / 155925.0, 62.0 / 2835.0, -17.0 / 315.0, 2.0 / 15.0, -1.0 / 3.0])?;
        let small = self.add(x, self.mul(self.mul(x, z)?, p)?)?;
        let e = self.exp_f32_plus_one_use(self.add(ax, ax)?)?;
        let big = self.sub(self.f32c(1.0), self.div(self.f32c(2.0), self.add(e, self.f32c(1.0))?)?)?;
        let big = self.intrinsic("llvm.copysign", &[big, x])?;
        self.select(self.b.build_float_compare(P::OLT, ax, self.f32c(0.4), "")?, small, big)
    }

    pub fn sigmoid_f32(&self, x: FloatValue<'ctx>) -> R<'ctx> {
        let e = self.exp_f32_plus_one_use(self.b.build_float_neg(x, "")?)?;
        self.div(self.f32c(1.0), self.add(self.f32c(1.0), e)?)
    }

    /// erfc(z) for z = w * s >= 0, where s is 1 or 1/sqrt(2) (`halve`): Numerical Recipes'
    /// erfcc (relative error < 1.2e-7 in exact arithmetic). erfc(z) ~ exp(-z^2) magnifies any
    /// rounding in z^2 by z^2, so -z^2 = -(w^2) s^2 is formed from w split as wh + wl with wh
    /// holding 12 significant bits: wh^2 is exact and so is the halving.
    fn erfc_pos_f32(&self, w: FloatValue<'ctx>, halve: bool) -> R<'ctx> {
        let s2 = if halve { 0.5 } else { 1.0 };
        // erfc(z) underflows f32 beyond z ~ 10.5; clamping keeps inf from making NaN below.
        let w = self.select(self.b.build_float_compare(P::OGT, w, self.f32c(20.0), "")?, self.f32c(20.0), w)?;
        let z = if halve { self.mul(w, self.f32c(std::f64::consts::FRAC_1_SQRT_2))? } else { w };
        let t = self.div(self.f32c(1.0), self.add(self.f32c(1.0), self.mul(self.f32c(0.5), z)?)?)?;
        let p = self.poly(t, &[0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806, 0.09678418, 0.37409196, 1.00002368, -1.26551223])?;
        let i32t = self.ctx.i32_type();
        let wbits = self.b.build_bit_cast(w, i32t, "")?.into_int_value();
        let wh = self.b.build_and(wbits, self.i32c(0xfffff000u32 as i32 as i64), "")?;
        let wh = self.b.build_bit_cast(wh, self.ctx.f32_type(), "")?.into_float_value();
        let hi = self.mul(self.mul(wh, wh)?, self.f32c(-s2))?;
        let lo = self.mul(self.mul(self.sub(wh, w)?, self.add(wh, w)?)?, self.f32c(s2))?;
        let e1 = self.exp_f32(hi)?;
        let e2 = self.exp_f32(self.add(lo, p)?)?;
        self.mul(t, self.mul(e1, e2)?)
    }

    /// erf(w s) with s as in `erfc_pos_f32`: Taylor series below 0.5 (relative accuracy near
    /// 0), 1 - erfc above.
    fn erf_scaled(&self, w: FloatValue<'ctx>, halve: bool) -> R<'ctx> {
        let x = if halve { self.mul(w, self.f32c(std::f64::consts::FRAC_1_SQRT_2))? } else { w };
        let ax = self.intrinsic("llvm.fabs", &[x])?;
        let z = self.mul(x, x)?;
        let c = std::f64::consts::FRAC_2_SQRT_PI;
        let p = self.poly(z, &[c / 75600.0, -c / 9360.0, c / 1320.0, -c / 216.0, c / 42.0, -c / 10.0, c / 3.0])?;
        let small = self.sub(self.mul(x, self.f32c(c))?, self.mul(self.mul(x, z)?, p)?)?;
        let erfc_abs = self.erfc_pos_f32(self.intrinsic("llvm.fabs", &[w])?, halve)?;
        let big = self.sub(self.f32c(1.0), erfc_abs)?;
        let big = self.intrinsic("llvm.copysign", &[big, x])?;
        let r = self.select(self.b.build_float_compare(P::OLT, ax, self.f32c(0.5), "")?, small, big)?;
        self.select(self.is_nan(x)?, x, r)
    }

    pub fn erf_f32(&self, x: FloatValue<'ctx>) -> R<'ctx> {
        self.erf_scaled(x, false)
    }

    /// gelu(x) = x/2 (1 + erf(x/sqrt2)), the way PyTorch's kernels compute it: where 1 + erf
    /// cancels (x << 0) the result is as coarse as theirs and becomes -0 where theirs does
    /// (x below about -5.9). An erfc form is more exact there, but then log(gelu(x)) is NaN
    /// where eager gives -inf, and 0/gelu(x) is 0 where eager gives NaN (graph fuzzer,
    /// tests/fuzz_regressions/case_255582274.json and two more).
    ///
    /// Eager's float32 kernel differs by ISA (measured): on AVX-512 hosts (Zen 4, Zen 5) it
    /// forms x (1 + erf) before halving it, so gelu(x) is inf for x > FLT_MAX/2, and gives
    /// gelu(+inf) = NaN; on AVX2 hosts (Zen 3) it halves x first (finite up to FLT_MAX) and
    /// gives gelu(+inf) = inf. Kiln computes what eager computes on the target.
    pub fn gelu_f32(&self, x: FloatValue<'ctx>) -> R<'ctx> {
        let erf = self.erf_scaled(x, true)?;
        let one_plus = self.add(self.f32c(1.0), erf)?;
        if !self.eager_avx512 {
            return self.mul(self.mul(x, self.f32c(0.5))?, one_plus);
        }
        let r = self.mul(self.mul(x, one_plus)?, self.f32c(0.5))?;
        self.select(self.b.build_float_compare(P::OEQ, x, self.f32c(f64::INFINITY), "")?, self.f32c(f64::NAN), r)
    }

    /// PyTorch's tanh form: x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
    pub fn gelu_tanh_f32(&self, x: FloatValue<'ctx>) -> R<'ctx> {
        let inner = self.mul(self.f32c((2.0 / std::f64::consts::PI).sqrt()), self.add(x, self.mul(self.f32c(0.044715), self.mul(x, self.mul(x, x)?)?)?)?)?;
        let t = self.tanh_f32(inner)?;
        self.mul(self.mul(x, self.f32c(0.5))?, self.add(self.f32c(1.0), t)?)
    }
}
