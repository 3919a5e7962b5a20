//! Shared helpers for compiler tests: compile IR text for the host and run it on vectors.
#![allow(dead_code)]

use kiln_compiler::graph::ir::parse_graph;
use kiln_compiler::{compile, CompileOptions, CompiledProgram, Target};

pub fn build(ir: &str, input_strides: &[Vec<i64>]) -> CompiledProgram {
    let g = parse_graph(ir).unwrap_or_else(|e| panic!("{e}\n{ir}"));
    compile(&g, input_strides, &Target::host(), &CompileOptions::default()).unwrap()
}

/// Runs a program whose inputs and outputs are all f32.
pub fn run_f32(p: &CompiledProgram, inputs: &[&[f32]]) -> Vec<Vec<f32>> {
    let mut outs: Vec<Vec<f32>> = p.outputs().map(|b| vec![0.0; b.sizes.iter().product::<i64>() as usize]).collect();
    let ins: Vec<*const u8> = inputs.iter().map(|v| v.as_ptr() as *const u8).collect();
    let outp: Vec<*mut u8> = outs.iter_mut().map(|v| v.as_mut_ptr() as *mut u8).collect();
    unsafe { p.run(&ins, &outp) }.unwrap();
    outs
}

/// A small deterministic generator (xorshift), so failures reproduce.
pub struct Rng(pub u64);
impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
    }
}

/// Fills a tensor laid out with `strides` from row-major `values` (NaN where no element is).
pub fn lay(values: &[f32], sizes: &[i64], strides: &[i64]) -> Vec<f32> {
    let span: i64 = sizes.iter().zip(strides).map(|(n, s)| (n - 1).max(0) * s).sum::<i64>() + 1;
    let mut out = vec![f32::NAN; span as usize];
    for (i, v) in values.iter().enumerate() {
        let (mut rest, mut off) = (i as i64, 0);
        for d in (0..sizes.len()).rev() {
            off += (rest % sizes[d]) * strides[d];
            rest /= sizes[d];
        }
        out[off as usize] = *v;
    }
    out
}
