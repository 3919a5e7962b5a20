//! The IR's text form and the graph passes, as data-driven tests: `check(input, expect![[..]])`.
//! Re-bless with `UPDATE_EXPECT=1 cargo test`.

use expect_test::{expect, Expect};
use kiln_compiler::graph::ir::parse_graph;
use kiln_compiler::graph::layout::contiguous_strides;
use kiln_compiler::graph::passes::optimize;

fn check(input: &str, want: Expect) {
    let g = parse_graph(input).unwrap_or_else(|e| panic!("{e}"));
    let printed = g.to_string();
    assert_eq!(parse_graph(&printed).unwrap().to_string(), printed, "text form does not round-trip");
    want.assert_eq(&optimize(&g).to_string());
}

fn check_lowered(input: &str, want: Expect) {
    let g = parse_graph(input).unwrap();
    let strides: Vec<Vec<i64>> = g.inputs.iter().map(|&v| contiguous_strides(&g.ty(v).static_shape().unwrap())).collect();
    want.assert_eq(&kiln_compiler::lower_graph(&g, &strides).unwrap().to_string());
}

#[test]
fn cse_dce_and_cast_folding() {
    check(
        "graph(%0: f32[4], %1: f32[4]) {
           %2 = exp(%0) : f32[4]
           %3 = exp(%0) : f32[4]
           %4 = add(%2, %3) : f32[4]
           %5 = constant(2) : i64[]
           %6 = cast(%5) : f32[]
           %7 = mul(%4, %6) : f32[4]
           %8 = log(%1) : f32[4]
           return (%7)
         }",
        expect![[r#"
            graph(%0: f32[4], %1: f32[4]) {
              %2 = exp(%0) : f32[4]
              %3 = add(%2, %2) : f32[4]
              %4 = constant(2.0) : f32[]
              %5 = mul(%3, %4) : f32[4]
              return (%5)
            }
        "#]],
    );
}

#[test]
fn pointwise_chain_fuses_into_its_reduction() {
    check_lowered(
        "graph(%0: f32[8, 16]) {
           %1 = exp(%0) : f32[8, 16]
           %2 = sum(%1) dims=[1] keepdim=true : f32[8, 1]
           %3 = div(%1, %2) : f32[8, 16]
           return (%3)
         }",
        expect![[r#"
            b0: f32[8, 16] Input(0)
            b1: f32[8, 16] Output(0)
            b2: f32[8, 1] Temp { offset: 0 }
            kernel k0:
              for i0 in 0..8 {
                acc0 = 0.0:f64
                for i1 in 0..16 {
                  acc0 Add= cast<f64>(exp(b0[i0*16 + i1]))
                }
                b2[i0] = cast<f32>(acc0)
              }
            kernel k1:
              for i0 in 0..8 {
                for i1 in 0..16 {
                  b1[i0*16 + i1] = div(exp(b0[i0*16 + i1]), b2[i0])
                }
              }
        "#]],
    );
}

#[test]
fn an_expensive_value_two_kernels_need_is_computed_once() {
    // gelu(x) feeds the softmax's three passes and the product after it: computed once into
    // b2; the cheap x * 2 stays inlined into the last kernel.
    check_lowered(
        "graph(%0: f32[4, 8]) {
           %1 = gelu(%0) : f32[4, 8]
           %2 = softmax(%1) dim=1 : f32[4, 8]
           %3 = mul(%2, %1) : f32[4, 8]
           %4 = constant(2.0) : f32[]
           %5 = mul(%0, %4) : f32[4, 8]
           %6 = add(%3, %5) : f32[4, 8]
           return (%6)
         }",
        expect![[r#"
            b0: f32[4, 8] Input(0)
            b1: f32[4, 8] Output(0)
            b2: f32[4, 8] Temp { offset: 0 }
            b3: f32[4, 8] Temp { offset: 128 }
            kernel k0:
              for i0 in 0..32 {
                b2[i0] = gelu(b0[i0])
              }
            kernel k1:
              for i0 in 0..4 {
                acc0 = -inf:f32
                for i1 in 0..8 {
                  acc0 Max= b2[i0*8 + i1]
                }
                acc1 = 0.0:f32
                for i2 in 0..8 {
                  b3[i0*8 + i2] = exp(sub(b2[i0*8 + i2], acc0))
                  acc1 Add= exp(sub(b2[i0*8 + i2], acc0))
                }
                for i3 in 0..8 {
                  b3[i0*8 + i3] = mul(b3[i0*8 + i3], reciprocal(acc1))
                }
              }
            kernel k2:
              for i0 in 0..32 {
                b1[i0] = add(mul(b3[i0], b2[i0]), mul(b0[i0], 2.0:f32))
              }
        "#]],
    );
}

#[test]
fn text_round_trips_attributes_with_spaces() {
    // `dims=[0, 2]` once parsed as dims=[0] (attributes were split at spaces).
    let text = "graph(%0: f32[3, 5, 7]) {\n  %1 = amin(%0) dims=[0, 2] keepdim=true : f32[1, 5, 1]\n  %2 = softmax(%1) dim=1 : f32[1, 5, 1]\n  return (%2)\n}\n";
    assert_eq!(parse_graph(text).unwrap().to_string(), text);
}
