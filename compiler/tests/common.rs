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
