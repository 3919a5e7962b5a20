//! Symbolic sizes: code compiled at the sample sizes, run at others, gives bit for bit what
//! code compiled for those sizes gives; regions whose code depends on a symbol are refused.

mod common;
use common::*;
use kiln_compiler::graph::ir::parse_graph;
use kiln_compiler::graph::layout::contiguous_strides;
use kiln_compiler::lower::{BufferKind, LoopProgram};
use kiln_compiler::lower::symbolic::{eval_sum, infer, sample_points, SymbolicShapes};
use kiln_compiler::{compile_loop_program, lower_graph, CompileOptions, CompiledProgram, Target};

/// Layer norm, gelu and softmax over rows of [B, S, 24], with a per-column weight: every
/// kernel runs over rows.
fn rows(b: i64, s: i64) -> String {
    format!(
        "graph(%0: f32[{b}, {s}, 24], %1: f32[24]) {{
 %2 = mean(%0) dims=[2] keepdim=true : f32[{b}, {s}, 1]
 %3 = sub(%0, %2) : f32[{b}, {s}, 24]
 %4 = mul(%3, %3) : f32[{b}, {s}, 24]
 %5 = mean(%4) dims=[2] keepdim=true : f32[{b}, {s}, 1]
 %6 = rsqrt(%5) : f32[{b}, {s}, 1]
 %7 = mul(%3, %6) : f32[{b}, {s}, 24]
 %8 = mul(%7, %1) : f32[{b}, {s}, 24]
 %9 = gelu(%8) : f32[{b}, {s}, 24]
 %10 = softmax(%9) dim=2 : f32[{b}, {s}, 24]
 %11 = mul(%10, %9) : f32[{b}, {s}, 24]
 return (%11, %2)
}}"
    )
}

fn contiguous(text: &str) -> Vec<Vec<i64>> {
    let g = parse_graph(text).unwrap();
    g.inputs.iter().map(|&v| contiguous_strides(&g.ty(v).static_shape().unwrap())).collect()
}

/// The region `text(symbols)` with input strides `strides(symbols)` (contiguous by default).
struct Region<'a> {
    text: &'a dyn Fn(&[i64]) -> String,
    strides: &'a dyn Fn(&[i64]) -> Vec<Vec<i64>>,
}

impl Region<'_> {
    fn lowered(&self, symbols: &[i64]) -> LoopProgram {
        lower_graph(&parse_graph(&(self.text)(symbols)).unwrap(), &(self.strides)(symbols)).unwrap()
    }

    /// Its shapes and code compiled once, from its lowerings at the sample points.
    fn symbolic(&self, num_symbols: usize, avoid: &[i64]) -> Result<(SymbolicShapes, CompiledProgram), String> {
        let samples: Vec<(Vec<i64>, LoopProgram)> = sample_points(num_symbols, avoid).into_iter().map(|p| (p.clone(), self.lowered(&p))).collect();
        let (shapes, program) = infer(&samples)?;
        let image = compile_loop_program(&program, &Target::host(), &CompileOptions::default()).unwrap();
        Ok((shapes, image.load().unwrap()))
    }

    /// Runs the symbolic code at `symbols` and code compiled for exactly those sizes on the
    /// same random inputs: they must agree bit for bit.
    fn check(&self, shapes: &SymbolicShapes, code: &CompiledProgram, symbols: &[i64], seed: u64) {
        let per_size = build(&(self.text)(symbols), &(self.strides)(symbols));
        let mut rng = Rng(seed);
        let inputs: Vec<Vec<f32>> = per_size
            .image
            .buffers
            .iter()
            .filter(|b| matches!(b.kind, BufferKind::Input(_)))
            .map(|b| (0..b.sizes.iter().product::<i64>()).map(|_| rng.uniform(-3.0, 3.0)).collect())
            .collect();
        let ins: Vec<&[f32]> = inputs.iter().map(|v| v.as_slice()).collect();
        let want = run_f32(&per_size, &ins);
        let mut got: Vec<Vec<f32>> = want.iter().map(|w| vec![f32::NAN; w.len()]).collect();
        let outs: Vec<*mut u8> = got.iter_mut().map(|v| v.as_mut_ptr() as *mut u8).collect();
        let ptrs: Vec<*const u8> = inputs.iter().map(|v| v.as_ptr() as *const u8).collect();
        unsafe { code.run_symbolic(shapes, symbols, |i| ptrs[i], |i, _, _| Some(outs[i]), &|_| None) }.unwrap();
        assert_eq!(got, want, "at {symbols:?}");
    }
}

fn contiguous_of(text: &dyn Fn(&[i64]) -> String) -> impl Fn(&[i64]) -> Vec<Vec<i64>> + '_ {
    move |s| contiguous(&text(s))
}

#[test]
fn code_for_the_samples_serves_other_batch_and_sequence_sizes_bit_for_bit() {
    let text = |s: &[i64]| rows(s[0], s[1]);
    let region = Region { text: &text, strides: &contiguous_of(&text) };
    let (shapes, code) = region.symbolic(2, &[24]).expect("rows are symbolic in batch and sequence");
    assert_eq!(shapes.buffers[1].iter().map(|m| m.is_constant()).collect::<Vec<_>>(), [true], "the weight does not scale");
    assert!(shapes.params.is_empty(), "rows need no parameter: {:?}", shapes.params);
    for (i, s) in [[2i64, 2], [3, 64], [11, 5], [64, 2], [300, 3]].iter().enumerate() {
        region.check(&shapes, &code, s, i as u64 + 1);
    }
}

#[test]
fn reductions_over_a_symbol_and_strides_that_follow_one_read_parameters() {
    // Mean over the sequence: the loop over it, the batch stride and the count follow it.
    let text = |s: &[i64]| {
        let (b, t) = (s[0], s[1]);
        format!("graph(%0: f32[{b}, {t}, 8]) {{\n %1 = tanh(%0) : f32[{b}, {t}, 8]\n %2 = mean(%1) dims=[1] keepdim=false : f32[{b}, 8]\n %3 = amax(%0) dims=[0] keepdim=true : f32[1, {t}, 8]\n return (%2, %3)\n}}")
    };
    let region = Region { text: &text, strides: &contiguous_of(&text) };
    let (shapes, code) = region.symbolic(2, &[8]).unwrap();
    assert!(!shapes.params.is_empty());
    for (i, s) in [[2i64, 2], [3, 512], [64, 7], [5, 100]].iter().enumerate() {
        region.check(&shapes, &code, s, i as u64 + 10);
        // The parallel grain follows the sizes as the per-size schedule counts it.
        let per_size: Vec<i64> = region.lowered(s).kernels.iter().map(|k| k.work_per_iter).collect();
        assert_eq!(shapes.work.iter().map(|w| eval_sum(w, s)).collect::<Vec<_>>(), per_size, "at {s:?}");
    }
    // Column-major input: the row stride is the batch.
    let text = |s: &[i64]| format!("graph(%0: f32[{0}, 8]) {{\n %1 = exp(%0) : f32[{0}, 8]\n %2 = sum(%0) dims=[0] keepdim=false : f32[8]\n return (%1, %2)\n}}", s[0]);
    let strides = |s: &[i64]| vec![vec![1, s[0]]];
    let region = Region { text: &text, strides: &strides };
    let (shapes, code) = region.symbolic(1, &[8]).unwrap();
    for (i, b) in [2i64, 3, 64, 1000].iter().enumerate() {
        region.check(&shapes, &code, &[*b], i as u64 + 20);
    }
}

#[test]
fn a_symbol_used_twice_in_one_tensor_scales_as_its_square() {
    let text = |s: &[i64]| format!("graph(%0: f32[{0}, {0}]) {{\n %1 = exp(%0) : f32[{0}, {0}]\n return (%1)\n}}", s[0]);
    let region = Region { text: &text, strides: &contiguous_of(&text) };
    let (shapes, code) = region.symbolic(1, &[]).unwrap();
    assert_eq!(shapes.extents[0].powers, [2]);
    region.check(&shapes, &code, &[5], 30);
}

#[test]
fn lowerings_of_another_shape_are_refused() {
    // Stands in for a lowering whose structure follows the sizes: another op past 20.
    let text = |s: &[i64]| {
        let op = if s[0] > 20 { "exp" } else { "neg" };
        format!("graph(%0: f32[{0}, 8]) {{\n %1 = {op}(%0) : f32[{0}, 8]\n %2 = sum(%1) dims=[1] keepdim=false : f32[{0}]\n return (%2)\n}}", s[0])
    };
    let region = Region { text: &text, strides: &contiguous_of(&text) };
    let why = region.symbolic(1, &[8]).err().expect("refused");
    assert!(why.contains("loops of another shape"), "{why}");
}

#[test]
fn samples_avoid_static_sizes_and_each_moves_one_symbol() {
    let points = sample_points(2, &[17, 23]);
    assert_eq!(points, vec![vec![19, 29], vec![31, 29], vec![19, 37], vec![41, 43]]);
}
