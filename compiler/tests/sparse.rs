//! The GEMM over sparse B panels (`kernels::sparse`) and over a weight in code
//! (`kernels::weights_in_code`) against a float64 reference: random sparsity patterns (unstructured and in blocks of every shape the facts count), all-zero
//! rows and columns, an all-zero and a fully dense weight, odd sizes and remainders of every
//! tile and chain, each packed per call and packed once; infs and NaNs in the activations
//! (whose products with the skipped zeros are NaN, as in eager). Bound as in `gemm.rs`:
//! γ(k+2) · Σ|aᵢ bᵢ| (the chains change the order of summation, not the bound).

mod common;
use common::Rng;
use kiln_compiler::graph::ir::parse_graph;
use kiln_compiler::kernels::gemm::host_lanes;
use kiln_compiler::kernels::sparse::{choose, SparseFormat, WeightFacts, BLOCK_SHAPES};
use kiln_compiler::kernels::weights_in_code;
use kiln_compiler::{compile, lower_graph, CompileOptions, CompiledProgram, Target};

/// relu(x · Wᵀ + bias) (or x · Wᵀ alone) with W's zeros skipped in sparse `format`.
fn program(m: i64, n: i64, k: i64, format: SparseFormat, epilogue: bool) -> (CompiledProgram, String) {
    let mut ir = format!("graph(%0: f32[{m}, {k}], %1: f32[{n}, {k}], %2: f32[{n}]) {{\n  %3 = permute(%1) dims=[1, 0] : f32[{k}, {n}]\n  %4 = matmul(%0, %3) sparse_b={format} : f32[{m}, {n}]\n");
    ir += &if epilogue { format!("  %5 = add(%4, %2) : f32[{m}, {n}]\n  %6 = relu(%5) : f32[{m}, {n}]\n  return (%6)\n}}\n") } else { "  return (%4)\n}\n".to_string() };
    let g = parse_graph(&ir).unwrap_or_else(|e| panic!("{e}\n{ir}"));
    let strides = [vec![k, 1], vec![k, 1], vec![1]];
    let loops = lower_graph(&g, &strides).unwrap().to_string();
    assert!(loops.contains("sparse"), "not the sparse kernel:\n{loops}");
    (compile(&g, &strides, &Target::host(), &CompileOptions::default()).unwrap_or_else(|e| panic!("{e}\n{ir}")), loops)
}

/// A weight of `n × k` with nonzeros in `block` blocks kept with probability `density`.
fn weight(rng: &mut Rng, n: i64, k: i64, block: (i64, i64), density: f32) -> Vec<f32> {
    let (br, bc) = block;
    let keep: Vec<bool> = (0..((n + br - 1) / br) * ((k + bc - 1) / bc)).map(|_| rng.uniform(0.0, 1.0) < density).collect();
    let blocks_per_row = (k + bc - 1) / bc;
    (0..n * k).map(|i| if keep[((i / k / br) * blocks_per_row + (i % k) / bc) as usize] { rng.uniform(-1.0, 1.0) } else { 0.0 }).collect()
}

fn run(p: &CompiledProgram, x: &[f32], w: &[f32], bias: &[f32], m: i64, n: i64, prepacked: bool) -> Vec<f32> {
    #[derive(Clone, Copy)]
    #[repr(align(64))]
    #[allow(dead_code)] // storage only
    struct Line([f32; 16]);
    let weights = p.packable_weights().to_vec();
    assert_eq!(weights.len(), 1, "the weight is offered for packing once");
    let mut packed = vec![Line([f32::NAN; 16]); weights[0].elems.div_ceil(16)];
    unsafe { p.pack_weight(&weights[0], w.as_ptr() as _, packed.as_mut_ptr() as *mut f32) };
    let ins = [x.as_ptr() as *const u8, w.as_ptr() as *const u8, bias.as_ptr() as *const u8];
    let mut out = vec![0f32; (m * n) as usize];
    let mut slot = Some(out.as_mut_ptr() as *mut u8);
    let ptr = packed.as_ptr() as *const f32;
    unsafe { p.run_packed(|i| ins[i], |_| slot.take(), &|_| prepacked.then_some(ptr)) }.unwrap();
    out
}

#[allow(clippy::too_many_arguments)]
fn check(rng: &mut Rng, m: i64, n: i64, k: i64, format: SparseFormat, w: &[f32], epilogue: bool, what: &str) {
    let (p, loops) = program(m, n, k, format, epilogue);
    let mut x: Vec<f32> = (0..m * k).map(|_| rng.uniform(-1.0, 1.0)).collect();
    if rng.next_u64() % 4 == 0 && m * k > 0 {
        // An inf or a NaN in the activations: the skipped zeros make NaNs, as eager's do.
        let at = (rng.next_u64() % (m * k) as u64) as usize;
        x[at] = if rng.next_u64() % 2 == 0 { f32::INFINITY } else { f32::NAN };
    }
    let bias: Vec<f32> = (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let u = 2f64.powi(-24);
    let gamma = (k + 2) as f64 * u / (1.0 - (k + 2) as f64 * u);
    for prepacked in [false, true] {
        let got = run(&p, &x, w, &bias, m, n, prepacked);
        for i in 0..m {
            for j in 0..n {
                let (mut exact, mut mag) = (0f64, 0f64);
                for q in 0..k {
                    let (a, b) = (x[(i * k + q) as usize] as f64, w[(j * k + q) as usize] as f64);
                    exact += a * b;
                    mag += (a * b).abs();
                }
                if epilogue {
                    exact = (exact + bias[j as usize] as f64).max(0.0);
                    // (relu of a NaN is NaN in eager; f64::max drops it)
                    if mag.is_nan() {
                        exact = f64::NAN;
                    }
                }
                let g = got[(i * n + j) as usize] as f64;
                let bound = 2.0 * gamma * mag + 4.0 * u * exact.abs() + 1e-30;
                let ok = if exact.is_finite() { (g - exact).abs() <= bound } else { g.to_bits() == exact.to_bits() || (g.is_nan() && exact.is_nan()) };
                assert!(ok, "{what} {m}x{n}x{k} {format} prepacked {prepacked}: ({i}, {j}) {g} vs {exact} (bound {bound})\n{loops}");
            }
        }
    }
}

/// The format of `w` (n × k) in code, its values registered.
fn in_code(n: i64, k: i64, w: &[f32]) -> SparseFormat {
    SparseFormat::InCode { lanes: host_lanes(), key: weights_in_code::register(n, k, w.to_vec()) }
}

#[test]
fn sparse_panels_match_float64_on_random_patterns() {
    // Every format the host has; sparse rows and the weight in code for one to three rows.
    let formats = |m: i64, n: i64, k: i64, w: &[f32]| -> Vec<SparseFormat> {
        let mut f: Vec<SparseFormat> = [8, 16].into_iter().filter(|&l| l <= host_lanes()).map(SparseFormat::Panels).collect();
        if m <= 3 {
            f.extend([1, 4, 8].map(SparseFormat::Rows));
            f.push(in_code(n, k, w));
        }
        f
    };
    let mut rng = Rng(0x5eed_5ba7_5e00_0001);
    let sizes = [1, 2, 3, 5, 7, 8, 9, 12, 13, 16, 17, 31, 33, 64, 100];
    for case in 0..60 {
        let pick = |rng: &mut Rng| sizes[(rng.next_u64() % sizes.len() as u64) as usize];
        let (m, n, k) = (pick(&mut rng), pick(&mut rng).max(16) + (case % 3) as i64, pick(&mut rng));
        let block = BLOCK_SHAPES[case % BLOCK_SHAPES.len()];
        let density = [0.05, 0.1, 0.3, 0.6][case / 2 % 4];
        let w = weight(&mut rng, n, k, block, density);
        let fs = formats(m, n, k, &w);
        check(&mut rng, m, n, k, fs[case % fs.len()], &w, case % 2 == 0, &format!("{block:?} blocks at {density}"));
        if m <= 3 {
            check(&mut rng, m, n, k, in_code(n, k, &w), &w, case % 2 == 1, &format!("{block:?} blocks at {density} in code"));
        }
    }
    // All zeros; fully dense; zero rows (features) and zero columns (inputs); long k.
    let (n, k) = (40, 77);
    let zero_rows: Vec<f32> = (0..n * k).map(|i| if (i / k) % 3 == 0 { 0.0 } else { 0.5 - (i % 7) as f32 * 0.1 }).collect();
    let zero_cols: Vec<f32> = (0..n * k).map(|i| if (i % k) % 4 != 1 { 0.0 } else { 0.25 + (i % 5) as f32 * 0.1 }).collect();
    for (what, w) in [("all-zero", vec![0.0; (n * k) as usize]), ("dense", vec![0.75; (n * k) as usize]), ("zero rows", zero_rows), ("zero cols", zero_cols)] {
        for &m in &[1, 3, 4, 13] {
            for f in formats(m, n, k, &w) {
                check(&mut rng, m, n, k, f, &w, true, what);
            }
        }
    }
    let w = weight(&mut rng, 256, 1024, (1, 1), 0.1);
    for f in formats(3, 256, 1024, &w) {
        check(&mut rng, 3, 256, 1024, f, &w, true, "long k");
    }
}

/// Code with a weight in it computes with that weight only where the call's B is it: B is
/// checked when its copy is kept (`pack_weight`), and a call with another B (or no kept
/// copy) runs the dense loop over the call's B. A forged verdict shows the code really
/// holds the values it was made for.
#[test]
fn a_weight_in_code_runs_for_that_weight_only() {
    let mut rng = Rng(0x1ced);
    let (m, n, k) = (1, 37, 70);
    let w = weight(&mut rng, n, k, (1, 1), 0.1);
    let mut other = w.clone();
    other[5] += 1.0;
    other[(n * k - 1) as usize] = 0.5;
    let format = in_code(n, k, &w);
    let (p, _) = program(m, n, k, format, false);
    let x: Vec<f32> = (0..m * k).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let product = |w: &[f32]| -> Vec<f32> { (0..n).map(|j| (0..k).map(|q| x[q as usize] as f64 * w[(j * k + q) as usize] as f64).sum::<f64>() as f32).collect() };
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + b.abs()));
    let weights = p.packable_weights().to_vec();
    let run_with = |b: &[f32], verdict: f32| -> Vec<f32> {
        #[repr(align(64))]
        struct Line([f32; 16]);
        let kept = Line([verdict; 16]);
        assert_eq!(weights[0].elems, 16, "the kept copy of a weight in code is its verdict");
        let ins = [x.as_ptr() as *const u8, b.as_ptr() as *const u8, std::ptr::null()];
        let mut out = vec![0f32; n as usize];
        let mut slot = Some(out.as_mut_ptr() as *mut u8);
        let ptr = kept.0.as_ptr();
        unsafe { p.run_packed(|i| ins[i], |_| slot.take(), &|_| Some(ptr)) }.unwrap();
        out
    };
    let verdict = |b: &[f32]| -> f32 {
        #[repr(align(64))]
        struct Line([f32; 16]);
        let mut kept = Line([f32::NAN; 16]);
        unsafe { p.pack_weight(&weights[0], b.as_ptr() as _, kept.0.as_mut_ptr()) };
        kept.0[0]
    };
    assert_eq!(verdict(&w), 1.0);
    assert_eq!(verdict(&other), 0.0, "another weight is not the one in code");
    assert!(close(&run_with(&w, 1.0), &product(&w)));
    assert!(close(&run_with(&other, 0.0), &product(&other)), "another weight runs the dense loop over it");
    // Forged: B is `other` but the verdict says it is `w`: the code's own values are used.
    let forged = run_with(&other, 1.0);
    assert!(close(&forged, &product(&w)) && !close(&forged, &product(&other)), "the code holds w's values");
    // Values that were never registered: no code (the frontend falls back).
    let unknown = SparseFormat::InCode { lanes: host_lanes(), key: weights_in_code::key_of(n, k, |r, c| other[(r * k + c) as usize] * 3.0) };
    let ir = format!("graph(%0: f32[{m}, {k}], %1: f32[{n}, {k}]) {{\n  %2 = permute(%1) dims=[1, 0] : f32[{k}, {n}]\n  %3 = matmul(%0, %2) sparse_b={unknown} : f32[{m}, {n}]\n  return (%3)\n}}\n");
    let err = compile(&parse_graph(&ir).unwrap(), &[vec![k, 1], vec![k, 1]], &Target::host(), &CompileOptions::default()).err().expect("no code for unknown values");
    assert!(err.to_string().contains("not registered"), "{err}");
}

#[test]
fn the_choice_follows_the_zeros_a_weight_has() {
    let mut rng = Rng(3);
    let facts = |w: &[f32], n, k| unsafe { WeightFacts::measure(w.as_ptr(), n, k, k, 1) };
    // 90% zeros in 16×1 blocks: panels keep a tenth of their rows, at any batch.
    let w = weight(&mut rng, 256, 256, (16, 1), 0.1);
    for m in [1, 16] {
        let c = choose(&facts(&w, 256, 256), true, 16, m);
        assert!(matches!(c.format, Some(SparseFormat::Panels(_))) && c.work < 0.3, "{c:?}");
        assert!(c.reason.contains("16x1 blocks"), "{c:?}");
    }
    // 90% in 1×8 blocks at batch 1: runs of 8 along k.
    let w = weight(&mut rng, 1024, 1024, (1, 8), 0.1);
    assert_eq!(choose(&facts(&w, 1024, 1024), true, 8, 1).format, Some(SparseFormat::Rows(8)));
    // 90% unstructured at batch 1 (every sparse format within noise of the others here):
    // sparse, and predicted well under dense.
    let w = weight(&mut rng, 1024, 1024, (1, 1), 0.1);
    let c = choose(&facts(&w, 1024, 1024), true, 8, 1);
    assert!(c.format.is_some() && c.work < 0.8, "{c:?}");
    // Half zeros, unstructured, at batch 16: nearly every panel row keeps a nonzero: dense.
    let w = weight(&mut rng, 256, 256, (1, 1), 0.5);
    assert_eq!(choose(&facts(&w, 256, 256), true, 8, 16).format, None);
    // A small weight at 90% unstructured zeros whose values are registered: in code at batch
    // 1 to 3 (the same weight unregistered is not), never at batch 4 or more, nor past
    // MAX_STEPS.
    let w = weight(&mut rng, 256, 256, (1, 1), 0.1);
    let mut f = facts(&w, 256, 256);
    assert!(!matches!(choose(&f, true, 16, 1).format, Some(SparseFormat::InCode { .. })));
    let key = weights_in_code::register(256, 256, w.clone());
    f.key = Some(key);
    for m in 1..=3 {
        let c = choose(&f, true, 16, m);
        assert_eq!(c.format, Some(SparseFormat::InCode { lanes: 16, key }), "{c:?}");
        assert!(c.reason.contains("values in the code"), "{c:?}");
    }
    assert!(!matches!(choose(&f, true, 16, 4).format, Some(SparseFormat::InCode { .. })));
    f.code_steps = [weights_in_code::MAX_STEPS + 1; 2];
    assert!(!matches!(choose(&f, true, 16, 1).format, Some(SparseFormat::InCode { .. })));
}
