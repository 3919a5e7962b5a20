//! Convolution on the GEMM kernel (windows packed straight from the image, `Im2col`) against
//! a float64 reference, over random shapes: odd images (1, 3, 7, 17), channels that fill no
//! tile, every tile remainder, stride and dilation, NCHW and channels-last images, a
//! transposed (non-contiguous) weight, and the epilogues a network fuses (bias, ReLU,
//! residual add). Windows of pooling (`unfold` and a reduction) are checked the same way.
//!
//! Bound as in `gemm.rs`: |computed − exact| ≤ γ(k+2) · Σ|xᵢ wᵢ|, k = C·KH·KW.

mod common;
use common::{lay, Rng};
use kiln_compiler::graph::ir::parse_graph;
use kiln_compiler::graph::layout::dense_strides;
use kiln_compiler::graph::reference::{eval, Tensor};
use kiln_compiler::{compile, lower_graph, CompileOptions, Scalar, Target};

#[derive(Debug, Clone)]
struct Case {
    n: i64,
    c: i64,
    h: i64,
    w: i64,
    cout: i64,
    kernel: [i64; 2],
    stride: [i64; 2],
    dilation: [i64; 2],
    /// Zeros around the image: top, bottom, left, right.
    padding: [i64; 4],
    channels_last: bool,
    /// The weight given as [Cout, K] memory transposed (a non-contiguous operand).
    weight_t: bool,
    epilogue: usize,
}

impl Case {
    fn out(&self) -> [i64; 2] {
        let o = |i: usize, n: i64| (n + self.padding[2 * i] + self.padding[2 * i + 1] - self.dilation[i] * (self.kernel[i] - 1) - 1).div_euclid(self.stride[i]) + 1;
        [o(0, self.h), o(1, self.w)]
    }
    fn k(&self) -> i64 {
        self.c * self.kernel[0] * self.kernel[1]
    }
}

fn fmt(s: &[i64]) -> String {
    s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
}

/// The graph, its input sizes and strides. Inputs: image, weight [Cout, K], bias [Cout, 1, 1],
/// residual [N, Cout, OH, OW].
fn ir_of(c: &Case, absolute: bool) -> (String, Vec<Vec<i64>>, Vec<Vec<i64>>) {
    let [oh, ow] = c.out();
    let (xs, ws, bs, os) = (vec![c.n, c.c, c.h, c.w], vec![c.cout, c.k()], vec![c.cout, 1, 1], vec![c.n, c.cout, oh, ow]);
    let mut ir = format!("graph(%0: f32[{}], %1: f32[{}], %2: f32[{}], %3: f32[{}]) {{\n", fmt(&xs), fmt(&ws), fmt(&bs), fmt(&os));
    let (x, w) = if absolute {
        ir += &format!("  %4 = abs(%0) : f32[{}]\n  %5 = abs(%1) : f32[{}]\n", fmt(&xs), fmt(&ws));
        ("%4", "%5")
    } else {
        ("%0", "%1")
    };
    ir += &format!("  %6 = permute({w}) dims=[1, 0] : f32[{}, {}]\n", c.k(), c.cout);
    ir += &format!("  %7 = conv2d({x}, %6) kernel={:?} stride={:?} dilation={:?} padding={:?} : f32[{}]\n", c.kernel, c.stride, c.dilation, c.padding, fmt(&os));
    let mut last = 7;
    let tail: &[&str] = if absolute { &[] } else { EPILOGUES[c.epilogue] };
    for line in tail {
        last += 1;
        ir += &format!("  %{last} = {} : f32[{}]\n", line.replace("%prev", &format!("%{}", last - 1)), fmt(&os));
    }
    ir += &format!("  return (%{last})\n}}\n");
    let x_order: Vec<usize> = if c.channels_last { vec![0, 2, 3, 1] } else { vec![0, 1, 2, 3] };
    let w_order: Vec<usize> = if c.weight_t { vec![1, 0] } else { vec![0, 1] };
    let strides = vec![dense_strides(&xs, &x_order), dense_strides(&ws, &w_order), vec![1, 1, 1], dense_strides(&os, &[0, 1, 2, 3])];
    (ir, vec![xs, ws, bs, os], strides)
}

const EPILOGUES: &[&[&str]] = &[&[], &["add(%prev, %2)"], &["add(%prev, %2)", "relu(%prev)"], &["add(%prev, %2)", "add(%prev, %3)", "relu(%prev)"]];

fn tensor(v: &[f32], sizes: &[i64]) -> Tensor {
    Tensor { dtype: kiln_compiler::DType::F32, sizes: sizes.to_vec(), data: v.iter().map(|&x| Scalar::Float(x as f64)).collect() }
}

fn check(c: &Case, rng: &mut Rng) {
    let (ir, sizes, strides) = ir_of(c, false);
    let g = parse_graph(&ir).unwrap_or_else(|e| panic!("{e}\n{ir}"));
    let loops = lower_graph(&g, &strides).unwrap().to_string();
    assert!(loops.contains("gemm acc"), "{c:?} is not on the GEMM kernel:\n{loops}");
    if c.epilogue > 0 {
        assert_eq!(loops.matches("kernel ").count(), 1, "the epilogue was not fused:\n{loops}");
    }
    let values: Vec<Vec<f32>> = sizes.iter().map(|s| (0..s.iter().product::<i64>()).map(|_| rng.uniform(-1.0, 1.0)).collect()).collect();
    let laid: Vec<Vec<f32>> = values.iter().zip(&sizes).zip(&strides).map(|((v, s), st)| lay(v, s, st)).collect();
    let program = compile(&g, &strides, &Target::host(), &CompileOptions::default()).unwrap_or_else(|e| panic!("{e}\n{ir}"));
    let out_len: i64 = sizes[3].iter().product();
    let mut out = vec![f32::NAN; out_len as usize];
    let ins: Vec<*const u8> = laid.iter().map(|v| v.as_ptr() as *const u8).collect();
    unsafe { program.run(&ins, &[out.as_mut_ptr() as *mut u8]) }.unwrap();
    let inputs: Vec<Tensor> = values.iter().zip(&sizes).map(|(v, s)| tensor(v, s)).collect();
    let want = &eval(&g, &inputs)[0];
    let (abs_ir, _, _) = ir_of(c, true);
    let mags = &eval(&parse_graph(&abs_ir).unwrap(), &inputs)[0];
    let u = 2f64.powi(-24);
    let n = (c.k() + 2) as f64 * u;
    let gamma = n / (1.0 - n);
    for i in 0..out.len() {
        let (got, exact) = (out[i] as f64, want.data[i].as_f64());
        let bound = 2.0 * gamma * mags.data[i].as_f64() + 4.0 * u * exact.abs() + 1e-30;
        assert!((got - exact).abs() <= bound, "{c:?} element {i}: {got} vs {exact} (bound {bound})\n{ir}\n{loops}");
    }
}

#[test]
fn convolution_matches_float64_on_random_shapes() {
    let mut rng = Rng(0x2545f4914f6cdd1d);
    let images = [1, 3, 7, 17];
    let channels = [1, 3, 5, 16, 17];
    let outs = [1, 5, 16, 17, 33, 48, 64, 96];
    let pick = |rng: &mut Rng, xs: &[i64]| xs[(rng.next_u64() % xs.len() as u64) as usize];
    let mut checked = 0;
    while checked < 80 {
        let kernel = [pick(&mut rng, &[1, 2, 3, 5]), pick(&mut rng, &[1, 3, 4])];
        let c = Case {
            n: pick(&mut rng, &[1, 2, 3]),
            c: pick(&mut rng, &channels),
            h: pick(&mut rng, &images),
            w: pick(&mut rng, &images),
            cout: pick(&mut rng, &outs),
            kernel,
            stride: [pick(&mut rng, &[1, 2]), pick(&mut rng, &[1, 2, 3])],
            dilation: [pick(&mut rng, &[1, 1, 2]), pick(&mut rng, &[1, 2])],
            padding: if rng.next_u64() % 3 == 0 { [0; 4] } else { [0, 0, 0, 0].map(|_: i64| pick(&mut rng, &[0, 1, 2, 3])) },
            channels_last: rng.next_u64() % 3 == 0,
            weight_t: rng.next_u64() % 4 == 0,
            epilogue: (rng.next_u64() % EPILOGUES.len() as u64) as usize,
        };
        let span = |i: usize| c.dilation[i] * (c.kernel[i] - 1);
        if c.out().iter().any(|&o| o < 1) || span(0) >= c.h + c.padding[0] + c.padding[1] || span(1) >= c.w + c.padding[2] + c.padding[3] {
            continue;
        }
        check(&c, &mut rng);
        checked += 1;
    }
    // ResNet's shapes, scaled down in the image: a stem of 3 channels, a 3×3 block and a
    // strided 1×1 projection; k past the microkernel's unrolled loop, many row panels;
    // ResNet's 7 × 7 stage: rows of 7 × 48 tiles, k in chunks, threads over column panels.
    for (c, h, cout, kernel, stride, pad) in [
        (3, 23, 64, [7, 7], [2, 2], 3),
        (64, 14, 64, [3, 3], [1, 1], 1),
        (128, 9, 256, [1, 1], [2, 2], 0),
        (256, 5, 512, [3, 3], [1, 1], 1),
        (256, 7, 512, [3, 3], [1, 1], 1),
        (128, 14, 256, [3, 3], [2, 2], 1),
    ] {
        let case = Case { n: 2, c, h, w: h, cout, kernel, stride, dilation: [1, 1], padding: [pad; 4], channels_last: false, weight_t: false, epilogue: 3 };
        check(&case, &mut rng);
    }
}

#[test]
fn pooling_windows_match_the_reference() {
    // max over 3×3 windows, stride 2, of an image read through its strides (channels-last).
    let ir = "graph(%0: f32[2, 5, 9, 8]) {\n  %1 = unfold(%0) dim=2 size=3 step=2 dilation=1 : f32[2, 5, 4, 8, 3]\n  %2 = unfold(%1) dim=3 size=3 step=2 dilation=2 : f32[2, 5, 4, 2, 3, 3]\n  %3 = amax(%2) dims=[4, 5] keepdim=false : f32[2, 5, 4, 2]\n  %4 = tanh(%1) : f32[2, 5, 4, 8, 3]\n  return (%3, %4)\n}\n";
    let g = parse_graph(ir).unwrap();
    let sizes = [2i64, 5, 9, 8];
    let strides = vec![dense_strides(&sizes, &[0, 2, 3, 1])];
    let p = compile(&g, &strides, &Target::host(), &CompileOptions::default()).unwrap();
    let mut rng = Rng(11);
    let mut x: Vec<f32> = (0..sizes.iter().product::<i64>()).map(|_| rng.uniform(-4.0, 4.0)).collect();
    x[7] = f32::NAN;
    x[100] = f32::INFINITY;
    let laid = lay(&x, &sizes, &strides[0]);
    let mut outs: Vec<Vec<f32>> = p.outputs().map(|b| vec![0.0; b.sizes.iter().product::<i64>() as usize]).collect();
    let outp: Vec<*mut u8> = outs.iter_mut().map(|v| v.as_mut_ptr() as *mut u8).collect();
    unsafe { p.run(&[laid.as_ptr() as *const u8], &outp) }.unwrap();
    let want = eval(&g, &[tensor(&x, &sizes)]);
    assert_eq!(outs[0].len(), 2 * 5 * 4 * 2);
    for (got, want) in outs[0].iter().zip(&want[0].data) {
        let w = want.as_f64() as f32;
        assert!(got.to_bits() == w.to_bits() || (got.is_nan() && w.is_nan()), "{got} vs {w}");
    }
    for (got, want) in outs[1].iter().zip(&want[1].data) {
        let w = want.as_f64() as f32;
        assert!((got - w).abs() <= 2e-7 * w.abs().max(1.0) || (got.is_nan() && w.is_nan()), "{got} vs {w}");
    }
}
