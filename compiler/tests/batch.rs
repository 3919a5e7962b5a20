//! Batch polymorphism: code compiled for one batch size, run at others, gives bit for bit what
//! code compiled for those sizes gives; regions whose code depends on the batch are refused.

mod common;
use common::*;
use kiln_compiler::batch::batch_scaling;
use kiln_compiler::ir::parse_graph;
use kiln_compiler::lower::contiguous_strides;
use kiln_compiler::lower_graph;

/// Layer norm, gelu and softmax over rows of [B, 24], with a per-column weight: every kernel
/// runs over rows.
fn rows(b: i64) -> String {
    format!(
        "graph(%0: f32[{b}, 24], %1: f32[24]) {{
 %2 = mean(%0) dims=[1] keepdim=true : f32[{b}, 1]
 %3 = sub(%0, %2) : f32[{b}, 24]
 %4 = mul(%3, %3) : f32[{b}, 24]
 %5 = mean(%4) dims=[1] keepdim=true : f32[{b}, 1]
 %6 = rsqrt(%5) : f32[{b}, 1]
 %7 = mul(%3, %6) : f32[{b}, 24]
 %8 = mul(%7, %1) : f32[{b}, 24]
 %9 = gelu(%8) : f32[{b}, 24]
 %10 = softmax(%9) dim=1 : f32[{b}, 24]
 %11 = mul(%10, %9) : f32[{b}, 24]
 return (%11, %2)
}}"
    )
}

fn lowered(text: &str) -> kiln_compiler::lower::LoopProgram {
    let g = parse_graph(text).unwrap();
    let strides: Vec<Vec<i64>> = g.inputs.iter().map(|&v| contiguous_strides(&g.ty(v).static_shape().unwrap())).collect();
    lower_graph(&g, &strides).unwrap()
}

#[test]
fn code_for_one_batch_size_serves_others_bit_for_bit() {
    let scaling = batch_scaling(&lowered(&rows(5)), 5, &lowered(&rows(7)), 7).expect("rows are batch polymorphic");
    assert!(scaling.batched[0] && !scaling.batched[1]);
    let p = build(&rows(5), &[vec![24, 1], vec![1]]);
    let mut rng = Rng(7);
    for b in [2i64, 3, 11, 64, 300] {
        let x: Vec<f32> = (0..b * 24).map(|_| rng.uniform(-3.0, 3.0)).collect();
        let w: Vec<f32> = (0..24).map(|_| rng.uniform(0.5, 1.5)).collect();
        let want = run_f32(&build(&rows(b), &[vec![24, 1], vec![1]]), &[&x, &w]);
        let mut got = vec![vec![0f32; (b * 24) as usize], vec![0f32; b as usize]];
        let outs: Vec<*mut u8> = got.iter_mut().map(|v| v.as_mut_ptr() as *mut u8).collect();
        let ins = [x.as_ptr() as *const u8, w.as_ptr() as *const u8];
        unsafe { p.run_batched(&scaling, b, |i| ins[i], |i| outs[i]) };
        assert_eq!(got, want, "batch {b}");
    }
}

#[test]
fn a_reduction_over_the_batch_is_not_polymorphic() {
    let over_batch = |b: i64| format!("graph(%0: f32[{b}, 8]) {{\n %1 = sum(%0) dims=[0] keepdim=false : f32[8]\n return (%1)\n}}");
    assert_eq!(batch_scaling(&lowered(&over_batch(5)), 5, &lowered(&over_batch(7)), 7), None);
    let transposed = |b: i64| {
        let g = parse_graph(&format!("graph(%0: f32[{b}, 8]) {{\n %1 = exp(%0) : f32[{b}, 8]\n return (%1)\n}}")).unwrap();
        lower_graph(&g, &[vec![1, b]]).unwrap() // column-major: the row stride is the batch
    };
    assert_eq!(batch_scaling(&transposed(5), 5, &transposed(7), 7), None);
}
