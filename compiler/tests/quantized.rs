//! The int8 GEMM (`kernels::quantized`) against the reference interpreter, bit for bit: random
//! shapes with remainders of every tile and of k's quads (1, 2, 3, 5, 7, 13, 17, 33 ...),
//! per-tensor and per-column scales and zero points (weights' zero points need not be 0),
//! activations of one sign, all zeros, a tiny range and large values, a bias and a relu fused
//! after it, B packed per call and packed once. (That the reference is PyTorch's arithmetic is
//! checked against PyTorch itself in tests/test_quantized.py.)

mod common;
use common::Rng;
use kiln_compiler::dtype::{DType, Scalar};
use kiln_compiler::graph::ir::parse_graph;
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

#[test]
fn int8_gemm_matches_the_reference_bit_for_bit() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let sizes = [1i64, 2, 3, 4, 5, 7, 8, 13, 16, 17, 33];
    for case in 0..80 {
        let pick = |rng: &mut Rng| sizes[(rng.next_u64() % sizes.len() as u64) as usize];
        let (m, n, k) = (pick(&mut rng), pick(&mut rng) + if case % 3 == 0 { 16 } else { 0 }, pick(&mut rng) * if case % 4 == 0 { 9 } else { 1 });
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
