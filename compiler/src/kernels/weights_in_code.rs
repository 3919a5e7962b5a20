//! Weights in code: a small sparse weight's nonzeros baked into the microkernel as constants,
//! the product fully unrolled ([`SparseFormat::InCode`](crate::kernels::sparse::SparseFormat)).
//!
//! The one weight-dependent code Kiln makes. Everything else (dense, sparse panels, sparse
//! rows) is code for a shape that any weight runs on; this is code for one weight's values.
//! So:
//! - its format names the weight by the hash of its values ([`WeightKey`], blake3 over the
//!   sizes and every element's bits), and the format is in the graph's text: the cache key
//!   holds the hash, and code for one weight is never served for another;
//! - the values come from [`register`] (the frontend, which sees a frozen model's constants,
//!   registers each small sparse weight as it counts its zeros); the code generator finds
//!   them by key ([`lookup`]), and refuses to generate where this process never saw them;
//! - before the code runs, the runtime checks that the call's B is that weight: it hashes
//!   the input when it keeps a weight's packed copy (`runtime::gemm::pack_b`, once per
//!   storage and version, as any kept weight), and a call whose B is not the baked weight,
//!   or whose A holds an inf or a NaN (a skipped zero times it is NaN in eager's product),
//!   runs the kernel's dense loop over B packed from the input (`DENSE_B`).
//!
//! The unrolled product, for x · Wᵀ of one to three rows of x (each step's tables read once
//! for all of them; shown here for one): the output's features in panels of one
//! vector (lane j: feature j of the panel), k in chunks of one vector. A chunk of x is loaded
//! once, and each step permutes it (by the step's picks: each lane takes the x its next
//! nonzero multiplies) and adds the product with a constant vector of those nonzeros. A
//! lane takes its nonzeros in the chunk in turn, so a chunk costs the most nonzeros any of
//! its panel's features has there ([`steps`]): at 90% unstructured zeros, 16 lanes and 16 k
//! per chunk, about 4 steps for the 26 multiply-adds of a panel's chunk, where a broadcast
//! of x against a column of the panel (the sparse panels' step) would take 13. With
//! AVX-512 a chunk is two vectors of x ([`chunk_width`]), permuted from both at once.

use crate::kernels::sparse::padded;
use once_cell::sync::Lazy;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The most steps ([`steps`]) of a weight whose values go into code: 1.3 MB of tables at 16
/// lanes (16 bytes of picks and 64 of values a step), and LLVM takes ~0.07 s a thousand
/// steps. (At 16 lanes a 256² layer at 90% unstructured zeros takes ~840 steps, at 50%
/// ~2700; a 1024² at 90% ~13000; the pruned WaveRNN step's 1536 × 512 GRU weight ~10000,
/// and its tables stream from L3 at ~2 ns a step where a 256² layer's run at ~1 from L2.)
pub const MAX_STEPS: i64 = 16384;

/// Which weight's values a kernel holds: the first 128 bits of blake3 over its sizes and
/// values ([`key_of`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WeightKey(pub [u8; 16]);

impl std::fmt::Display for WeightKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl WeightKey {
    pub fn parse(hex: &str) -> Option<WeightKey> {
        if hex.len() != 32 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        let mut key = [0u8; 16];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(WeightKey(key))
    }
}

/// A weight `rows` × `cols` (a Linear's: rows are its output features), element (r, c) at
/// `at(r, c)`, hashed row-major: the same key however the matrix is laid out in memory.
pub fn key_of(rows: i64, cols: i64, at: impl Fn(i64, i64) -> f32) -> WeightKey {
    let mut h = blake3::Hasher::new();
    h.update(b"kiln weight f32 v1");
    h.update(&rows.to_le_bytes());
    h.update(&cols.to_le_bytes());
    let mut row = Vec::with_capacity(4 * cols as usize);
    for r in 0..rows {
        row.clear();
        row.extend((0..cols).flat_map(|c| at(r, c).to_bits().to_le_bytes()));
        h.update(&row);
    }
    let mut key = [0u8; 16];
    key.copy_from_slice(&h.finalize().as_bytes()[..16]);
    WeightKey(key)
}

/// A weight's values, row-major (`rows` output features × `cols` inputs).
#[derive(Debug, PartialEq)]
pub struct BakedWeight {
    pub rows: i64,
    pub cols: i64,
    pub values: Vec<f32>,
}

impl BakedWeight {
    fn at(&self, r: i64, c: i64) -> f32 {
        self.values[(r * self.cols + c) as usize]
    }
}

/// The weights this process may bake into code, by key. (Each is small: at most
/// `MAX_STEPS` steps of nonzeros, registered by the frontend only then. They stay for the
/// process's life, as the code does.)
static WEIGHTS: Lazy<Mutex<HashMap<WeightKey, Arc<BakedWeight>>>> = Lazy::new(|| Mutex::new(HashMap::new()));

/// Registers a weight's values (row-major, `rows` × `cols`) for code generation; its key.
pub fn register(rows: i64, cols: i64, values: Vec<f32>) -> WeightKey {
    assert_eq!(values.len() as i64, rows * cols, "a weight's values are rows × cols");
    let key = key_of(rows, cols, |r, c| values[(r * cols + c) as usize]);
    WEIGHTS.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_insert_with(|| Arc::new(BakedWeight { rows, cols, values }));
    key
}

pub fn lookup(key: WeightKey) -> Option<Arc<BakedWeight>> {
    WEIGHTS.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned()
}

/// Checks of a call's B against the weight in its code (`runtime::gemm::pack_b`): found to
/// be that weight, found to be another (its kernel then runs dense over the call's B).
static SAME: AtomicU64 = AtomicU64::new(0);
static OTHER: AtomicU64 = AtomicU64::new(0);

/// Counts a check of B against the weight in code; the first that finds another weight is
/// logged (a frozen model's weight changed in place since it was compiled).
pub fn note_check(key: WeightKey, same: bool) {
    if same {
        SAME.fetch_add(1, Ordering::Relaxed);
    } else if OTHER.fetch_add(1, Ordering::Relaxed) == 0 {
        tracing::info!("kiln: weight {key} in code: a call's weight holds other values; its product runs dense (logged once)");
    }
}

/// (checks that found the weight in code, checks that found another) so far.
pub fn check_counts() -> (u64, u64) {
    (SAME.load(Ordering::Relaxed), OTHER.load(Ordering::Relaxed))
}

pub fn reset_check_counts() {
    SAME.store(0, Ordering::Relaxed);
    OTHER.store(0, Ordering::Relaxed);
}

/// Inputs per chunk of k at `lanes` lanes: two vectors where a permute picks from two
/// registers (AVX-512's `vpermi2ps`: at 90% unstructured zeros a 256² layer takes ~830 steps
/// in chunks of 32 against ~1020 in chunks of 16), else one (AVX2's `vpermps`).
pub fn chunk_width(lanes: i64) -> i64 {
    if lanes == 16 {
        32
    } else {
        lanes
    }
}

/// Steps of the unrolled product over a weight whose nonzeros are `nonzero` (row-major,
/// `rows` features × `cols` inputs) at `lanes` lanes: over each panel of `lanes` features
/// and each chunk of `chunk_width(lanes)` inputs, the most nonzeros one feature has there.
pub fn steps(nonzero: &[bool], rows: i64, cols: i64, lanes: i64) -> i64 {
    let width = chunk_width(lanes);
    let chunks = (cols + width - 1) / width;
    let mut total = 0;
    for p in 0..(rows + lanes - 1) / lanes {
        let mut most = vec![0i64; chunks as usize];
        for r in p * lanes..(rows.min((p + 1) * lanes)) {
            let row = &nonzero[(r * cols) as usize..((r + 1) * cols) as usize];
            for (c, most) in most.iter_mut().enumerate() {
                let lo = c * width as usize;
                let count = row[lo..(lo + width as usize).min(cols as usize)].iter().filter(|&&nz| nz).count() as i64;
                *most = (*most).max(count);
            }
        }
        total += most.iter().sum::<i64>();
    }
    total
}

/// One step of the unrolled product: lane j multiplies x's element `pick[j]` of the chunk
/// (None: the lane idles, its value 0) by `values[j]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub pick: Vec<Option<u32>>,
    pub values: Vec<f32>,
}

/// The steps over one chunk of k (`chunk_width(lanes)` inputs from `chunk · chunk_width`).
#[derive(Clone, Debug, PartialEq)]
pub struct ChunkSteps {
    pub chunk: i64,
    pub steps: Vec<Step>,
}

/// The unrolled product's plan: per panel of `lanes` output features, its chunks with
/// nonzeros and their steps (a NaN or an inf in the weight is a nonzero, kept).
pub fn plan(w: &BakedWeight, lanes: i64) -> Vec<Vec<ChunkSteps>> {
    let width = chunk_width(lanes);
    let chunks = (w.cols + width - 1) / width;
    (0..(w.rows + lanes - 1) / lanes)
        .map(|p| {
            (0..chunks)
                .filter_map(|c| {
                    let features: Vec<Vec<(u32, f32)>> = (0..lanes)
                        .map(|j| {
                            let r = p * lanes + j;
                            let ks = c * width..(w.cols.min((c + 1) * width));
                            if r >= w.rows {
                                return vec![];
                            }
                            ks.filter(|&k| w.at(r, k) != 0.0 || w.at(r, k).is_nan()).map(|k| ((k - c * width) as u32, w.at(r, k))).collect()
                        })
                        .collect();
                    let count = features.iter().map(Vec::len).max().unwrap_or(0);
                    let steps: Vec<Step> = (0..count)
                        .map(|t| Step {
                            pick: features.iter().map(|f| f.get(t).map(|&(k, _)| k)).collect(),
                            values: features.iter().map(|f| f.get(t).map_or(0.0, |&(_, v)| v)).collect(),
                        })
                        .collect();
                    (!steps.is_empty()).then_some(ChunkSteps { chunk: c, steps })
                })
                .collect()
        })
        .collect()
}

/// Floats of A's packed row for the unrolled product: k to whole chunks (zeros past k, which
/// the last chunk's load reads).
pub fn a_row_elems(k: i64, lanes: i64) -> i64 {
    let width = chunk_width(lanes);
    padded((k + width - 1) / width * width)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_steps_and_plan() {
        // 3 × 5, at 2 lanes: panel 0 = rows 0–1, panel 1 = row 2; chunks k 0–1, 2–3, 4.
        let values = vec![
            1.0, 0.0, 2.0, 3.0, 0.0, //
            0.0, 4.0, 0.0, 0.0, 0.0, //
            0.0, 0.0, 0.0, f32::NAN, 5.0,
        ];
        let nonzero: Vec<bool> = values.iter().map(|v: &f32| *v != 0.0 || v.is_nan()).collect();
        // Panel 0: chunk 0 max(1, 1), chunk 1 max(2, 0), chunk 2 0; panel 1: 0, 1, 1.
        assert_eq!(steps(&nonzero, 3, 5, 2), 5);
        let key = register(3, 5, values.clone());
        assert_eq!(WeightKey::parse(&key.to_string()), Some(key));
        assert_eq!(key, key_of(3, 5, |r, c| values[(r * 5 + c) as usize]));
        let mut other = values.clone();
        other[0] = 1.5;
        assert_ne!(key, key_of(3, 5, |r, c| other[(r * 5 + c) as usize]), "another value, another key");
        assert_ne!(key, key_of(5, 3, |r, c| values[(r * 3 + c) as usize]), "another shape, another key");
        let w = lookup(key).unwrap();
        let p = plan(&w, 2);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0][0], ChunkSteps { chunk: 0, steps: vec![Step { pick: vec![Some(0), Some(1)], values: vec![1.0, 4.0] }] });
        assert_eq!(p[0][1].steps.len(), 2);
        assert_eq!(p[0][1].steps[1], Step { pick: vec![Some(1), None], values: vec![3.0, 0.0] });
        assert_eq!(p[1].iter().map(|c| c.chunk).collect::<Vec<_>>(), vec![1, 2]);
        assert!(p[1][0].steps[0].values[0].is_nan());
        assert_eq!(p.iter().flatten().map(|c| c.steps.len() as i64).sum::<i64>(), steps(&nonzero, 3, 5, 2));
    }
}
