//! The int8 GEMM (`kernels::quantized`) against the reference interpreter, bit for bit: random
//! shapes with remainders of every tile and of k's quads (1, 2, 3, 5, 7, 13, 17, 33 ...),
//! per-tensor and per-column scales and zero points (weights' zero points need not be 0),
//! activations of one sign, all zeros, a tiny range and large values, a bias and a relu fused
//! after it, B packed per call and packed once. (That the reference is PyTorch's arithmetic is
//! checked against PyTorch itself in tests/test_quantized.py.)

mod common;
use common::Rng;
use kiln_compiler::dtype::{DType, Scalar};
use kiln_compiler::graph::ir::{parse_graph, ProductSums};
use kiln_compiler::graph::reference::{eval, Tensor};
use kiln_compiler::{compile, lower_graph, CompileOptions, Target};

fn ir(m: i64, n: i64, k: i64, s: i64, epilogue: bool) -> String {
    let mut ir = format!(
        "graph(%0: f32[{m}, {k}], %1: i32[{n}, {k}], %2: f32[{s}], %3: i32[{s}], %4: f32[{n}]) {{\n  %5 = permute(%1) dims=[1, 0] : i32[{k}, {n}]\n  %6 = qmatmul_dynamic(%0, %5, %2, %3) reduce_range=true : f32[{m}, {n}]\n"
    );
    ir += &if epilogue { format!("  %7 = qmatmul_dynamic(%0, %5, %2, %3, %4) reduce_range=true : f32[{m}, {n}]\n  %8 = relu(%7) : f32[{m}, {n}]\n  return (%8)\n}}\n") } else { "  return (%6)\n}\n".to_string() };
    ir
}

#[allow(clippy::too_many_arguments)]
fn check(rng: &mut Rng, m: i64, n: i64, k: i64, per_column: bool, epilogue: bool, x: Vec<f32>, what: &str) {
    let s = if per_column { n } else { 1 };
    let text = ir(m, n, k, s, epilogue);
    let g = parse_graph(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let strides = [vec![k, 1], vec![k, 1], vec![1], vec![1], vec![1]];
    let loops = lower_graph(&g, &strides).unwrap().to_string();
    assert!(loops.contains("int8"), "not the int8 kernel:\n{loops}");
    let p = compile(&g, &strides, &Target::host(), &CompileOptions::default()).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let w: Vec<i32> = (0..n * k).map(|_| (rng.next_u64() % 256) as i32 - 128).collect();
    let scale: Vec<f32> = (0..s).map(|_| rng.uniform(0.001, 0.05)).collect();
    let zp: Vec<i32> = (0..s).map(|_| if rng.next_u64() % 3 == 0 { 0 } else { (rng.next_u64() % 21) as i32 - 10 }).collect();
    let bias: Vec<f32> = (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect();

    let t = |dtype: DType, sizes: &[i64], data: Vec<Scalar>| Tensor { dtype, sizes: sizes.to_vec(), data };
    let floats = |v: &[f32]| v.iter().map(|&x| Scalar::Float(x as f64)).collect::<Vec<_>>();
    let ints = |v: &[i32]| v.iter().map(|&x| Scalar::Int(x as i64)).collect::<Vec<_>>();
    let expected = eval(&g, &[t(DType::F32, &[m, k], floats(&x)), t(DType::I32, &[n, k], ints(&w)), t(DType::F32, &[s], floats(&scale)), t(DType::I32, &[s], ints(&zp)), t(DType::F32, &[n], floats(&bias))]);
    let expected: Vec<f32> = expected[0].data.iter().map(|v| v.as_f64() as f32).collect();

    let weights = p.packable_weights().to_vec();
    assert_eq!(weights.len(), 1, "the weight is offered for packing once");
    #[derive(Clone, Copy)]
    #[repr(align(64))]
    #[allow(dead_code)] // storage only
    struct Line([u32; 16]);
    let mut packed = vec![Line([0xdead_beef; 16]); weights[0].elems.div_ceil(16)];
    unsafe { p.pack_weight(&weights[0], w.as_ptr() as _, packed.as_mut_ptr() as *mut f32) };
    let ins = [x.as_ptr() as *const u8, w.as_ptr() as *const u8, scale.as_ptr() as *const u8, zp.as_ptr() as *const u8, bias.as_ptr() as *const u8];
    for prepacked in [false, true] {
        let mut out = vec![0f32; (m * n) as usize];
        let mut slot = Some(out.as_mut_ptr() as *mut u8);
        let ptr = packed.as_ptr() as *const f32;
        unsafe { p.run_packed(|i| ins[i], |_| slot.take(), &|_| prepacked.then_some(ptr)) }.unwrap();
        for (i, (g, e)) in out.iter().zip(&expected).enumerate() {
            assert!(g.to_bits() == e.to_bits() || (g.is_nan() && e.is_nan()), "{what} {m}x{n}x{k} per_column={per_column} prepacked={prepacked}: element {i} is {g}, the reference {e}");
        }
    }
}

/// A product's m, n, k for random case `case`: sizes around every tile's and quad's remainder,
/// a third of the cases a column panel of the widest tile (64) wider, a quarter a k nine times
/// longer.
fn random_mnk(rng: &mut Rng, case: u64) -> (i64, i64, i64) {
    let sizes = [1i64, 2, 3, 4, 5, 7, 8, 13, 16, 17, 33];
    let mut pick = || sizes[(rng.next_u64() % sizes.len() as u64) as usize];
    (pick(), pick() + if case % 3 == 0 { 64 } else { 0 }, pick() * if case % 4 == 0 { 9 } else { 1 })
}

#[test]
fn int8_gemm_matches_the_reference_bit_for_bit() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for case in 0..80 {
        let (m, n, k) = random_mnk(&mut rng, case);
        let (per_column, epilogue) = (rng.next_u64() % 2 == 0, rng.next_u64() % 2 == 0);
        let kind = rng.next_u64() % 5;
        let x: Vec<f32> = (0..m * k)
            .map(|_| match kind {
                0 => rng.uniform(0.0, 2.0),      // one sign: the zero point at an end
                1 => 0.0,                        // all zeros: scale 0.1
                2 => rng.uniform(-1e-6, 1e-6),   // a range below the smallest scale
                3 => rng.uniform(-300.0, 300.0), // large values
                _ => rng.uniform(-1.0, 3.0),
            })
            .collect();
        check(&mut rng, m, n, k, per_column, epilogue, x, &format!("case {case} (activations {kind})"));
    }
}

#[test]
fn int8_gemm_of_a_layer() {
    let mut rng = Rng(7);
    let x: Vec<f32> = (0..64 * 512).map(|_| rng.uniform(-2.0, 2.0)).collect();
    check(&mut rng, 64, 1024, 512, false, true, x, "a 64 x 512 -> 1024 layer");
}

/// A statically quantized product (`qlinear`, `qconv2d`) against the reference, bit for bit:
/// A's uint8 values over the whole range (so that the AVX2 pairs saturate, as fbgemm's do),
/// weights with and without zero points, per tensor and per column, with and without a bias
/// and a relu, images contiguous and channels-last; packed once and per call.
#[allow(clippy::too_many_arguments)]
fn check_static(rng: &mut Rng, text: &str, a_sizes: &[i64], a_strides: &[i64], w_sizes: &[i64], n: i64, s: i64, saturate: bool, what: &str) {
    let g = parse_graph(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let w_strides = kiln_compiler::graph::layout::dense_strides(w_sizes, &kiln_compiler::graph::layout::row_major(w_sizes.len()));
    let strides = [a_strides.to_vec(), w_strides, vec![1], vec![1], vec![1]];
    let loops = lower_graph(&g, &strides).unwrap().to_string();
    assert!(loops.contains("int8"), "not the int8 kernel:\n{loops}");
    let p = compile(&g, &strides, &Target::host(), &CompileOptions::default()).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let numel = |s: &[i64]| s.iter().product::<i64>();
    let a: Vec<f32> = (0..numel(a_sizes)).map(|_| if saturate { 200.0 + (rng.next_u64() % 56) as f32 } else { (rng.next_u64() % 256) as f32 }).collect();
    let w: Vec<i32> = (0..numel(w_sizes)).map(|_| if saturate { 100 + (rng.next_u64() % 28) as i32 } else { (rng.next_u64() % 256) as i32 - 128 }).collect();
    let scale: Vec<f32> = (0..s).map(|_| rng.uniform(0.0005, 0.01)).collect();
    let zp: Vec<i32> = (0..s).map(|_| if rng.next_u64() % 2 == 0 { 0 } else { (rng.next_u64() % 21) as i32 - 10 }).collect();
    let bias: Vec<f32> = (0..n).map(|_| rng.uniform(-3.0, 3.0)).collect();
    let t = |dtype: DType, sizes: &[i64], data: Vec<Scalar>| Tensor { dtype, sizes: sizes.to_vec(), data };
    let floats = |v: &[f32]| v.iter().map(|&x| Scalar::Float(x as f64)).collect::<Vec<_>>();
    let ints = |v: &[i32]| v.iter().map(|&x| Scalar::Int(x as i64)).collect::<Vec<_>>();
    let expected = eval(&g, &[t(DType::F32, a_sizes, floats(&a)), t(DType::I32, w_sizes, ints(&w)), t(DType::F32, &[s], floats(&scale)), t(DType::I32, &[s], ints(&zp)), t(DType::F32, &[n], floats(&bias))]);
    let expected: Vec<f32> = expected[0].data.iter().map(|v| v.as_f64() as f32).collect();
    let a_laid = common::lay(&a, a_sizes, a_strides);
    let weights = p.packable_weights().to_vec();
    #[derive(Clone, Copy)]
    #[repr(align(64))]
    #[allow(dead_code)] // storage only
    struct Line([u32; 16]);
    let mut packed = vec![Line([0xdead_beef; 16]); weights.first().map_or(0, |w| w.elems.div_ceil(16))];
    if let Some(weight) = weights.first() {
        unsafe { p.pack_weight(weight, w.as_ptr() as _, packed.as_mut_ptr() as *mut f32) };
    }
    let ins = [a_laid.as_ptr() as *const u8, w.as_ptr() as *const u8, scale.as_ptr() as *const u8, zp.as_ptr() as *const u8, bias.as_ptr() as *const u8];
    for prepacked in [false, !weights.is_empty()] {
        let mut out = vec![0f32; expected.len()];
        let mut slot = Some(out.as_mut_ptr() as *mut u8);
        let ptr = packed.as_ptr() as *const f32;
        unsafe { p.run_packed(|i| ins[i], |_| slot.take(), &|_| prepacked.then_some(ptr)) }.unwrap();
        let wrong = out.iter().zip(&expected).filter(|(g, e)| g.to_bits() != e.to_bits()).count();
        let first = out.iter().zip(&expected).position(|(g, e)| g.to_bits() != e.to_bits());
        assert_eq!(wrong, 0, "{what} prepacked={prepacked}: {wrong} of {} elements differ, first {first:?}: {:?} against {:?}\n{text}", out.len(), first.map(|i| out[i]), first.map(|i| expected[i]));
    }
}

fn static_params(rng: &mut Rng, relu: bool, sums: ProductSums) -> String {
    let a_scale = rng.uniform(0.01, 0.1);
    let a_zp = rng.next_u64() % 256;
    let scale = rng.uniform(0.5, 4.0);
    let zp = rng.next_u64() % 256;
    format!("a_scale={a_scale} a_zero_point={a_zp} scale={scale} zero_point={zp} relu={relu} sums={}", sums.name())
}

/// The ways of summing this host's tiles have: the pairs (AVX2) everywhere, exact sums where
/// the host has AVX-512 VNNI (elsewhere they are not built, and this says so once).
fn sums_of_host() -> Vec<ProductSums> {
    let exact = ProductSums::Exact.runs_on(&Target::host());
    if !exact {
        eprintln!("no AVX-512 VNNI on this host: the exact-sum int8 tile is not tested");
    }
    [ProductSums::SaturatedPairs].into_iter().chain(exact.then_some(ProductSums::Exact)).collect()
}

#[test]
fn static_linear_matches_the_reference_bit_for_bit() {
    for sums in sums_of_host() {
        let mut rng = Rng(0x5151_7a7a_1234_0001);
        for case in 0..60 {
            let (m, n, k) = random_mnk(&mut rng, case);
            let (per_column, bias, relu, saturate) = (rng.next_u64() % 2 == 0, rng.next_u64() % 2 == 0, rng.next_u64() % 2 == 0, case % 5 == 0);
            let s = if per_column { n } else { 1 };
            let b = if bias { ", %4" } else { "" };
            let params = static_params(&mut rng, relu, sums);
            let text = format!("graph(%0: f32[{m}, {k}], %1: i32[{n}, {k}], %2: f32[{s}], %3: i32[{s}], %4: f32[{n}]) {{\n  %5 = permute(%1) dims=[1, 0] : i32[{k}, {n}]\n  %6 = qlinear(%0, %5, %2, %3{b}) {params} : f32[{m}, {n}]\n  return (%6)\n}}\n");
            check_static(&mut rng, &text, &[m, k], &[k, 1], &[n, k], n, s, saturate, &format!("linear case {case} ({sums:?})"));
        }
    }
}

#[test]
fn static_convolution_matches_the_reference_bit_for_bit() {
    for sums in sums_of_host() {
        let mut rng = Rng(0x5151_7a7a_1234_0002);
        for case in 0..60 {
            let r = |rng: &mut Rng, xs: &[i64]| xs[(rng.next_u64() % xs.len() as u64) as usize];
            let (batch, c, o) = (r(&mut rng, &[1, 1, 2]), r(&mut rng, &[1, 3, 4, 5, 8, 16, 19]), r(&mut rng, &[1, 5, 8, 16, 17, 33]));
            let kernel = r(&mut rng, &[1, 1, 2, 3, 3, 5, 7]);
            let (stride, dilation) = (r(&mut rng, &[1, 1, 2, 3]), r(&mut rng, &[1, 1, 1, 2]));
            let pad = [r(&mut rng, &[0, 1, 2, 3]), r(&mut rng, &[0, 1, 2]), r(&mut rng, &[0, 1, 3]), r(&mut rng, &[0, 1])];
            let span = dilation * (kernel - 1) + 1;
            let (h, w) = (r(&mut rng, &[1, 2, 5, 7, 9, 12]).max(span - pad[0] - pad[1]), r(&mut rng, &[1, 3, 6, 8, 11]).max(span - pad[2] - pad[3]));
            let oh = (h + pad[0] + pad[1] - span) / stride + 1;
            let ow = (w + pad[2] + pad[3] - span) / stride + 1;
            let (per_column, bias, relu, saturate, channels_last) = (rng.next_u64() % 2 == 0, rng.next_u64() % 2 == 0, rng.next_u64() % 2 == 0, case % 5 == 0, rng.next_u64() % 2 == 0);
            let s = if per_column { o } else { 1 };
            let b = if bias { ", %4" } else { "" };
            let params = static_params(&mut rng, relu, sums);
            let rows = batch * oh * ow;
            let text = format!(
                "graph(%0: f32[{batch}, {c}, {h}, {w}], %1: i32[{o}, {c}, {kernel}, {kernel}], %2: f32[{s}], %3: i32[{s}], %4: f32[{o}]) {{\n  %5 = qconv2d(%0, %1, %2, %3{b}) kernel=[{kernel}, {kernel}] stride=[{stride}, {stride}] dilation=[{dilation}, {dilation}] padding={pad:?} {params} : f32[{rows}, {o}]\n  return (%5)\n}}\n"
            );
            let strides = if channels_last { vec![c * h * w, 1, w * c, c] } else { vec![c * h * w, h * w, w, 1] };
            check_static(&mut rng, &text, &[batch, c, h, w], &strides, &[o, c, kernel, kernel], o, s, saturate, &format!("convolution case {case} ({sums:?})"));
        }
    }
}

/// 1×1 convolutions without padding over channels-last images: the rows of A are the image's
/// pixels, packed four at a time by the runtime's vector path (`qgemm::pack_four_rows`),
/// strided or not; contiguous images take the general path.
#[test]
fn pointwise_convolution_matches_the_reference_bit_for_bit() {
    for sums in sums_of_host() {
        let mut rng = Rng(0x5151_7a7a_1234_0004);
        for case in 0..24 {
            let r = |rng: &mut Rng, xs: &[i64]| xs[(rng.next_u64() % xs.len() as u64) as usize];
            let (batch, c, o) = (r(&mut rng, &[1, 2]), r(&mut rng, &[1, 3, 8, 12, 16, 19, 33, 64]), r(&mut rng, &[1, 5, 16, 17, 33]));
            let stride = r(&mut rng, &[1, 1, 2, 3]);
            let (h, w) = (r(&mut rng, &[1, 2, 5, 7, 9]), r(&mut rng, &[1, 3, 6, 8, 11]));
            let (oh, ow) = ((h - 1) / stride + 1, (w - 1) / stride + 1);
            let (per_column, bias, relu, saturate, channels_last) = (rng.next_u64() % 2 == 0, rng.next_u64() % 2 == 0, rng.next_u64() % 2 == 0, case % 3 == 0, case % 4 != 3);
            let s = if per_column { o } else { 1 };
            let b = if bias { ", %4" } else { "" };
            let params = static_params(&mut rng, relu, sums);
            let rows = batch * oh * ow;
            let text = format!(
                "graph(%0: f32[{batch}, {c}, {h}, {w}], %1: i32[{o}, {c}, 1, 1], %2: f32[{s}], %3: i32[{s}], %4: f32[{o}]) {{\n  %5 = qconv2d(%0, %1, %2, %3{b}) kernel=[1, 1] stride=[{stride}, {stride}] dilation=[1, 1] padding=[0, 0, 0, 0] {params} : f32[{rows}, {o}]\n  return (%5)\n}}\n"
            );
            let strides = if channels_last { vec![c * h * w, 1, w * c, c] } else { vec![c * h * w, h * w, w, 1] };
            check_static(&mut rng, &text, &[batch, c, h, w], &strides, &[o, c, 1, 1], o, s, saturate, &format!("pointwise convolution case {case} ({sums:?})"));
        }
    }
}

#[test]
fn quantize_rounds_as_fbgemm() {
    let mut rng = Rng(0x5151_7a7a_1234_0003);
    for n in [1i64, 7, 8, 9, 33, 1000] {
        let text = format!("graph(%0: f32[{n}]) {{\n  %1 = quantize(%0) scale=0.0731 zero_point=3 : f32[{n}]\n  return (%1)\n}}\n");
        let g = parse_graph(&text).unwrap();
        let p = common::build(&text, &[vec![1]]);
        let mut x: Vec<f32> = (0..n).map(|_| rng.uniform(-30.0, 30.0)).collect();
        let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30, -1e30, 0.0731 * 0.5, 0.0731 * 2.5, -0.0];
        for (i, s) in specials.iter().enumerate().take(n as usize) {
            x[i] = *s;
        }
        let expected = eval(&g, &[Tensor { dtype: DType::F32, sizes: vec![n], data: x.iter().map(|&v| Scalar::Float(v as f64)).collect() }]);
        let got = common::run_f32(&p, &[&x]);
        for (i, (g, e)) in got[0].iter().zip(&expected[0].data).enumerate() {
            assert_eq!(g.to_bits(), (e.as_f64() as f32).to_bits(), "element {i} ({}) quantized to {g}, the reference {}", x[i], e.as_f64());
        }
    }
}
