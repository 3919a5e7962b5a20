//! Kiln's GEMM over a sparse B (every format) against its own dense kernel, on pruned
//! weights: `cargo run --release -p kiln-compiler --example sparse_speed -- [threads [n
//! [batch]]]` sweeps square layers 256² and 1024² (or n) at batch 1 and 16 (or batch),
//! blocks 1×1, 1×4, 1×8, 4×4, 16×1 and 50–95%
//! zeros, and prints one line per case: `n batch block zeros dense=µs` then µs per sparse
//! format (`code16`: the weight in code, where it is small enough, with its compile time),
//! `best=` the format the cost model predicts fastest (`kernels::sparse::choose`),
//! `predicted=` its time over dense's, `chosen=` what the frontend picks, the weight's
//! nonzero blocks and its steps in code. Both programs compute
//! `x · Wᵀ` with W a kept weight packed once, as a frozen model's is. `bench/sparse.py` runs
//! it and makes the table and chart.
use kiln_compiler::graph::ir::parse_graph;
use kiln_compiler::kernels::gemm::host_lanes;
use kiln_compiler::kernels::sparse::{choose, SparseFormat, WeightFacts};
use kiln_compiler::{compile, CompileOptions, CompiledProgram, Target};
use std::time::Instant;

#[derive(Clone, Copy)]
#[repr(align(64))]
#[allow(dead_code)] // storage only
struct Line([f32; 16]);

fn program(m: i64, n: i64, k: i64, sparse: Option<SparseFormat>) -> CompiledProgram {
    let attr = sparse.map_or(String::new(), |l| format!(" sparse_b={l}"));
    let ir = format!("graph(%0: f32[{m}, {k}], %1: f32[{n}, {k}]) {{\n  %2 = permute(%1) dims=[1, 0] : f32[{k}, {n}]\n  %3 = matmul(%0, %2){attr} : f32[{m}, {n}]\n  return (%3)\n}}\n");
    compile(&parse_graph(&ir).unwrap(), &[vec![k, 1], vec![k, 1]], &Target::host(), &CompileOptions::default()).unwrap()
}

/// µs per call with `w` packed once (the dense GEMV's loop nest reads it in place): the
/// best of 9 runs of ~10 ms (this VM's neighbours slow whole runs down now and then).
fn time(p: &CompiledProgram, x: &[f32], w: &[f32], out: &mut [f32]) -> f64 {
    let weights = p.packable_weights().to_vec();
    let mut packed = vec![Line([0.0; 16]); weights.first().map_or(0, |w| w.elems.div_ceil(16))];
    if let Some(weight) = weights.first() {
        unsafe { p.pack_weight(weight, w.as_ptr() as _, packed.as_mut_ptr() as *mut f32) };
    }
    let ptr = packed.as_ptr() as *const f32;
    let mut run = || unsafe {
        let ins = [x.as_ptr() as *const u8, w.as_ptr() as *const u8];
        let mut o = Some(out.as_mut_ptr() as *mut u8);
        p.run_packed(|i| ins[i], |_| o.take(), &|_| Some(ptr)).unwrap()
    };
    let t = Instant::now();
    run();
    let reps = ((0.01 / t.elapsed().as_secs_f64().max(1e-7)) as usize).clamp(5, 100_000);
    let mut best = f64::MAX;
    for _ in 0..9 {
        let t = Instant::now();
        for _ in 0..reps {
            run();
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    best * 1e6
}

/// xorshift, for reproducible weights.
struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// A format's name without a weight's key (`code16`, not `code16.<hash>`).
fn short(f: SparseFormat) -> String {
    f.to_string().split('.').next().unwrap_or_default().to_string()
}

/// The format of `w` in code where the frontend would offer it (one to three rows, at most
/// `weights_in_code::MAX_STEPS` steps), its values registered.
fn in_code_format(facts: &WeightFacts, w: &[f32], m: i64, n: i64, k: i64) -> Option<SparseFormat> {
    let fits = m <= 3 && facts.code_steps(host_lanes()) <= kiln_compiler::kernels::weights_in_code::MAX_STEPS;
    fits.then(|| SparseFormat::InCode { lanes: host_lanes(), key: kiln_compiler::kernels::weights_in_code::register(n, k, w.to_vec()) })
}

fn main() {
    let threads = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    kiln_compiler::runtime::program::set_num_threads(threads).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    println!("# threads {threads}, host lanes {}", host_lanes());
    let only = |i: usize| std::env::args().nth(i).and_then(|s| s.parse::<i64>().ok());
    for n in [256i64, 1024].into_iter().filter(|&n| only(2).is_none_or(|o| o == n)) {
        let k = n;
        for m in only(3).map_or(vec![1i64, 16], |b| vec![b]) {
            let x: Vec<f32> = (0..m * k).map(|_| rng.uniform() - 0.5).collect();
            let mut out = vec![0f32; (m * n) as usize];
            let dense = program(m, n, k, None);
            let mut formats: Vec<SparseFormat> = [8, 16].into_iter().filter(|&l| l <= host_lanes()).map(SparseFormat::Panels).collect();
            if m <= 3 {
                formats.extend([1, 4, 8].map(SparseFormat::Rows));
            }
            let sparse: Vec<(SparseFormat, CompiledProgram)> = formats.iter().map(|&f| (f, program(m, n, k, Some(f)))).collect();
            for block in [(1i64, 1i64), (1, 4), (1, 8), (4, 4), (16, 1)] {
                for zeros in [0.5f32, 0.7, 0.8, 0.9, 0.95] {
                    let per_row = k / block.1;
                    let keep: Vec<bool> = (0..(n / block.0) * per_row).map(|_| rng.uniform() >= zeros).collect();
                    let w: Vec<f32> = (0..n * k).map(|i| if keep[((i / k / block.0) * per_row + (i % k) / block.1) as usize] { rng.uniform() - 0.5 } else { 0.0 }).collect();
                    let mut facts = unsafe { WeightFacts::measure(w.as_ptr(), n, k, k, 1) };
                    if let Some(SparseFormat::InCode { key, .. }) = in_code_format(&facts, &w, m, n, k) {
                        facts.key = Some(key);
                    }
                    let choice = choose(&facts, true, host_lanes(), m);
                    // Every format's time, and the model's pick (taken or not).
                    // Dense beside the sparse kernels, at the same moments (this VM's speed drifts
                    // by a third over minutes: a dense time from elsewhere in the run would
                    // skew the ratio).
                    let d = time(&dense, &x, &w, &mut out);
                    let mut times: Vec<String> = sparse.iter().map(|(f, p)| format!("{f}={:.2}", time(p, &x, &w, &mut out))).collect();
                    // The weight in code, where it is small enough (a program per weight).
                    if let Some(SparseFormat::InCode { lanes, key }) = in_code_format(&facts, &w, m, n, k) {
                        let t = Instant::now();
                        let p = program(m, n, k, Some(SparseFormat::InCode { lanes, key }));
                        let ms = t.elapsed().as_secs_f64() * 1e3;
                        times.push(format!("code{lanes}={:.2} code_compile_ms={ms:.0}", time(&p, &x, &w, &mut out)));
                    }
                    let blocks: Vec<String> = facts.nonzero_blocks.iter().map(|b| b.to_string()).collect();
                    let chosen = choice.format.map_or("dense".to_string(), short);
                    println!("{n} {m} {}x{} {zeros} dense={d:.2} {} best={} predicted={:.3} chosen={chosen} blocks={} steps={}", block.0, block.1, times.join(" "), short(choice.best), choice.work, blocks.join(","), facts.code_steps(host_lanes()));
                }
            }
        }
    }
}
