//! Prints the loop IR and the optimised LLVM IR of a Kiln IR graph read from a file or stdin:
//! `cargo run --release -p kiln-compiler --example dump_ir -- graph.kir`.
use kiln_compiler::codegen::llvm_ir;
use kiln_compiler::graph::ir::parse_graph;
use kiln_compiler::graph::layout::contiguous_strides;
use kiln_compiler::Target;
use std::io::Read;

fn main() {
    let mut text = String::new();
    match std::env::args().nth(1) {
        Some(path) => text = std::fs::read_to_string(path).expect("read graph file"),
        None => drop(std::io::stdin().read_to_string(&mut text)),
    }
    let g = parse_graph(&text).unwrap_or_else(|e| panic!("{e}"));
    let strides: Vec<Vec<i64>> = g.inputs.iter().map(|&v| contiguous_strides(&g.ty(v).static_shape().expect("static shapes"))).collect();
    let lp = kiln_compiler::lower_graph(&g, &strides).unwrap();
    print!("{lp}");
    let dtypes: Vec<_> = lp.buffers.iter().map(|b| b.dtype).collect();
    println!("{}", llvm_ir(&lp.kernels, &dtypes, &Target::host(), &kiln_compiler::CompileOptions::default()).unwrap());
}
