//! The kernel-level cache: a kernel is compiled once per process, whichever program and
//! buffers of it it belongs to. (Its own test binary: the counters are process-wide.)

mod common;
use common::*;
use kiln_compiler::codegen::kernel_cache::counts;
use kiln_compiler::graph::ir::parse_graph;
use kiln_compiler::{compile_image, CompileOptions, Target};

#[test]
fn two_programs_with_one_identical_kernel_compile_it_once() {
    // exp over 37 floats: in `a` it reads buffer 0 and writes buffer 1, in `b` buffers 1 and 3.
    let a = "graph(%0: f32[37]) {\n %1 = exp(%0) : f32[37]\n return (%1)\n}";
    let b = "graph(%0: f32[5], %1: f32[37]) {\n %2 = neg(%0) : f32[5]\n %3 = exp(%1) : f32[37]\n return (%2, %3)\n}";
    let (t, o) = (Target::host(), CompileOptions::default());
    let start = counts();
    let image_a = compile_image(&parse_graph(a).unwrap(), &[vec![1]], &t, &o).unwrap();
    let after_a = counts();
    let image_b = compile_image(&parse_graph(b).unwrap(), &[vec![1], vec![1]], &t, &o).unwrap();
    let after_b = counts();
    assert_eq!((image_a.kernels.len(), image_b.kernels.len()), (1, 2));
    assert_eq!((after_a.0 - start.0, after_a.1 - start.1), (1, 0), "a compiles its one kernel");
    assert_eq!((after_b.0 - after_a.0, after_b.1 - after_a.1), (1, 1), "b compiles neg only and reuses exp");
    let exp_b = image_b.kernels.iter().find(|k| k.symbol == image_a.kernels[0].symbol).expect("b's exp kernel shares a's code");
    assert_ne!(exp_b.buffers, image_a.kernels[0].buffers, "over other buffers of its program");

    // Both programs compute their own results with the shared code.
    let x: Vec<f32> = (0..37).map(|i| i as f32 * 0.1 - 1.0).collect();
    let y: Vec<f32> = (0..5).map(|i| i as f32).collect();
    let pa = image_a.load().unwrap();
    let pb = image_b.load().unwrap();
    let out_a = run_f32(&pa, &[&x]);
    let out_b = run_f32(&pb, &[&y, &x]);
    assert_eq!(out_a[0], out_b[1]);
    assert_eq!(out_b[0], y.iter().map(|v| -v).collect::<Vec<_>>());
    for (v, e) in x.iter().zip(&out_a[0]) {
        assert!((v.exp() - e).abs() <= 1e-6 * v.exp(), "{v} {e}");
    }

    // Compiling `b` again reuses both kernels.
    compile_image(&parse_graph(b).unwrap(), &[vec![1], vec![1]], &t, &o).unwrap();
    assert_eq!(counts().0, after_b.0);
}
