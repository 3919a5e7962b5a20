//! GFLOP/s of the GEMM kernel on one shape: `cargo run --release --example gemm_speed -- M N K
//! [threads] [bt|bt-packed]` (bt: B read transposed, as a Linear weight; bt-packed: and packed
//! once, as a kept weight is). `bench/gemm.py` is the
//! benchmark beside torch.mm; this is the quick loop for tuning the tile.
use kiln_compiler::graph::ir::parse_graph;
use kiln_compiler::{compile, CompileOptions, Target};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize, d: i64| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (m, n, k) = (num(1, 2048), num(2, 2048), num(3, 2048));
    kiln_compiler::runtime::program::set_num_threads(num(4, 1) as usize).unwrap();
    let bt = args.get(5).is_some_and(|s| s.starts_with("bt"));
    let prepack = args.get(5).is_some_and(|s| s == "bt-packed");
    let ir = format!("graph(%0: f32[{m}, {k}], %1: f32[{k}, {n}]) {{\n  %2 = matmul(%0, %1) : f32[{m}, {n}]\n  return (%2)\n}}\n");
    let b_strides = if bt { vec![1, k] } else { vec![n, 1] };
    let p = compile(&parse_graph(&ir).unwrap(), &[vec![k, 1], b_strides], &Target::host(), &CompileOptions::default()).unwrap();
    let a = vec![1.0f32; (m * k) as usize];
    let b = vec![1.0f32; (k * n) as usize];
    let mut c = vec![0f32; (m * n) as usize];
    let weights = p.packable_weights().to_vec();
    // 64-byte aligned storage for the packed copy (panels are read with aligned loads).
    #[derive(Clone, Copy)]
    #[repr(align(64))]
    #[allow(dead_code)] // storage only
    struct Line([f32; 16]);
    let mut packed = vec![Line([0.0; 16]); weights.first().map_or(0, |w| w.elems.div_ceil(16))];
    if prepack {
        unsafe { p.pack_weight(&weights[0], b.as_ptr() as _, packed.as_mut_ptr() as *mut f32) };
    }
    let packed_ptr = packed.as_ptr() as *const f32;
    let run = |c: &mut Vec<f32>| unsafe {
        let ins = [a.as_ptr() as *const u8, b.as_ptr() as *const u8];
        let mut out = Some(c.as_mut_ptr() as *mut u8);
        p.run_packed(|i| ins[i], |_| out.take(), &|_| prepack.then_some(packed_ptr)).unwrap()
    };
    run(&mut c);
    assert_eq!(c[0], k as f32);
    let flops = 2.0 * (m * n * k) as f64;
    let reps = ((2e10 / flops) as usize).clamp(3, 10000);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..reps {
            run(&mut c);
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    println!("{m}x{n}x{k}: {:.1} us, {:.1} GFLOP/s", best * 1e6, flops / best / 1e9);
}
