//! Weights with zeros: what a constant weight's zeros look like ([`WeightFacts`], measured
//! once from its values by the frontend), whether the GEMM skips them ([`choose`]), and the
//! packed layout that skips them ([`SparsePanel`]).
//!
//! The GEMM's B panels are `nr` columns (one vector: `lanes` floats) by k rows; a panel row
//! that is zero in all its columns contributes nothing to any output. A *sparse* B keeps, per
//! panel, only its rows with a nonzero: their k indices and their values. The microkernel
//! (`gemm::microkernel`, `GemmShape::sparse_b`) walks that list instead of 0..k and reads A
//! at each listed k. This is block sparsity with blocks of `lanes` output features × 1 input
//! (16×1 on AVX-512, 8×1 on AVX2): a weight pruned in such blocks loses all the work of its
//! zeros; any other pattern (unstructured, 1×8 along the inputs, 4×4) loses the work of the
//! panel rows it leaves empty, which the facts count exactly, so the choice is made from
//! the weight's own numbers, never guessed from its zero fraction.
//!
//! The code is weight-independent: which rows a panel keeps is data, packed from the call's
//! weight when it is packed (`runtime::gemm::pack_b`), and any weight — another one of the
//! same shape, all zeros or none — runs correctly on it. Only the *choice* (sparse panels of
//! some width, or dense) comes from the weight seen when the frontend lowered, and it is in
//! the graph's text (so in the cache key); the facts themselves are not.

use crate::kernels::gemm::LANES;

/// Block shapes whose nonzero blocks the facts count, (rows, cols) of the weight as the
/// frontend holds it (a Linear's weight: rows are output features, cols inputs). Panels of
/// `w` output features are the `w`×1 blocks; the rest say what structure the zeros have.
pub const BLOCK_SHAPES: [(i64, i64); 8] = [(1, 1), (1, 4), (1, 8), (4, 4), (8, 1), (16, 1), (1, 16), (4, 1)];

/// A constant 2-d weight's zeros, counted per block shape ([`BLOCK_SHAPES`]): a block (a
/// partial one at an edge included) counts if any of its elements is nonzero (NaN counts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightFacts {
    pub rows: i64,
    pub cols: i64,
    /// Nonzero blocks of each shape of `BLOCK_SHAPES`, in that order.
    pub nonzero_blocks: Vec<i64>,
}

impl WeightFacts {
    /// Counts the blocks of a float32 matrix, element (r, c) at `data[r · row_stride + c ·
    /// col_stride]`.
    ///
    /// # Safety
    /// Every element the strides reach is readable.
    pub unsafe fn measure(data: *const f32, rows: i64, cols: i64, row_stride: i64, col_stride: i64) -> WeightFacts {
        let nonzero: Vec<bool> = (0..rows * cols).map(|i| *data.offset(((i / cols) * row_stride + (i % cols) * col_stride) as isize) != 0.0).collect();
        WeightFacts::of_mask(&nonzero, rows, cols)
    }

    /// The facts of a row-major mask of nonzeros.
    pub fn of_mask(nonzero: &[bool], rows: i64, cols: i64) -> WeightFacts {
        let count = |(br, bc): (i64, i64)| -> i64 {
            let (nr, nc) = ((rows + br - 1) / br, (cols + bc - 1) / bc);
            let mut hit = vec![false; (nr * nc) as usize];
            for r in 0..rows {
                for c in 0..cols {
                    if nonzero[(r * cols + c) as usize] {
                        hit[((r / br) * nc + c / bc) as usize] = true;
                    }
                }
            }
            hit.iter().filter(|&&h| h).count() as i64
        };
        WeightFacts { rows, cols, nonzero_blocks: BLOCK_SHAPES.iter().map(|&s| count(s)).collect() }
    }

    pub fn nonzeros(&self) -> i64 {
        self.nonzero_blocks[0]
    }

    fn blocks_of(&self, shape: (i64, i64)) -> Option<i64> {
        BLOCK_SHAPES.iter().position(|&s| s == shape).map(|i| self.nonzero_blocks[i])
    }

    /// The fraction of zeros.
    pub fn zero_fraction(&self) -> f64 {
        let total = (self.rows * self.cols).max(1);
        1.0 - self.nonzeros() as f64 / total as f64
    }

    /// The largest block shape whose nonzero blocks hold no more than 1/8 zeros between them
    /// (the structure a pruner left), or None: unstructured.
    pub fn structure(&self) -> Option<(i64, i64)> {
        let nnz = self.nonzeros();
        BLOCK_SHAPES[1..]
            .iter()
            .filter(|&&s| {
                let stored = self.blocks_of(s).unwrap() * s.0 * s.1;
                nnz > 0 && stored * 7 <= nnz * 8
            })
            .max_by_key(|s| s.0 * s.1)
            .copied()
    }

    /// Text form for the frontend's dump: `rows cols` then the counts of `BLOCK_SHAPES`.
    pub fn to_text(&self) -> String {
        let counts: Vec<String> = self.nonzero_blocks.iter().map(|c| c.to_string()).collect();
        format!("{} {} {}", self.rows, self.cols, counts.join(" "))
    }

    pub fn parse(text: &str) -> Option<WeightFacts> {
        let n: Vec<i64> = text.split_whitespace().map(|x| x.parse().ok()).collect::<Option<_>>()?;
        (n.len() == 2 + BLOCK_SHAPES.len()).then(|| WeightFacts { rows: n[0], cols: n[1], nonzero_blocks: n[2..].to_vec() })
    }
}

/// Work a sparse panel row costs per dense one, from measurement (`bench/sparse.py`: the
/// k-index load and the A element it addresses beside each FMA, the partial sums combined).
pub const SPARSE_ROW_COST: f64 = 1.25;

/// The GEMM's choice for a weight B, from its facts: sparse panels `lanes` columns wide, or
/// dense.
#[derive(Clone, Debug, PartialEq)]
pub struct SparseChoice {
    /// Sparse panels of this many columns; None: dense.
    pub lanes: Option<i64>,
    /// The width of the best sparse panels (taken or not).
    pub panels: i64,
    /// The best sparse panels' predicted work over the dense kernel's (taken where under 1).
    pub work: f64,
    /// Why, for `explain()`.
    pub reason: String,
}

/// Picks the panel width (8 or 16 columns, none wider than the host's vectors) with the least
/// predicted work, and takes it where that is under the dense kernel's work.
/// `n_dim_rows`: B's columns (n, the output features) are the weight's rows (a Linear's
/// `x · Wᵀ`); else its columns (`x · W`).
pub fn choose(facts: &WeightFacts, n_dim_rows: bool, host_lanes: i64) -> SparseChoice {
    let (n, k) = if n_dim_rows { (facts.rows, facts.cols) } else { (facts.cols, facts.rows) };
    // Dense: k rows per panel of the host's width (a vector of 8 costs an instruction as one
    // of 16 does).
    let dense = ((n + host_lanes - 1) / host_lanes * k).max(1) as f64;
    let (lanes, work) = [8, 16]
        .into_iter()
        .filter(|&l| l <= host_lanes)
        .filter_map(|l| facts.blocks_of(if n_dim_rows { (l, 1) } else { (1, l) }).map(|rows| (l, rows as f64 * SPARSE_ROW_COST / dense)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .expect("8-wide panels are always counted");
    let zeros = format!("{:.0}% zeros, {}", 100.0 * facts.zero_fraction(), match facts.structure() {
        Some((r, c)) => format!("in {r}x{c} blocks"),
        None => "unstructured".to_string(),
    });
    let sparse = work < 1.0;
    let reason = if sparse {
        format!("sparse panels {lanes}x1: {:.0}% of the dense work ({zeros})", 100.0 * work)
    } else {
        format!("dense: sparse panels {lanes}x1 would do {:.0}% of the dense work ({zeros})", 100.0 * work)
    };
    SparseChoice { lanes: sparse.then_some(lanes), panels: lanes, work, reason }
}

/// The packed layout of one sparse B panel (`nr` columns over `k` rows), in floats:
/// `HEADER` floats whose first holds the number of kept rows (as an i32's bits), then `k`
/// i32 row indices (the kept rows' k, increasing; padded to a vector), then the kept rows'
/// values, `nr` floats each (the first `count` rows used). Sized for every row kept, so a
/// panel's place does not depend on the weight.
#[derive(Clone, Copy, Debug)]
pub struct SparsePanel {
    pub k: i64,
    pub nr: i64,
}

impl SparsePanel {
    /// Floats before the indices (a vector: the values stay aligned).
    pub const HEADER: i64 = LANES;
    pub fn values_offset(&self) -> i64 {
        Self::HEADER + (self.k + LANES - 1) / LANES * LANES
    }
    pub fn elems(&self) -> i64 {
        self.values_offset() + self.k * self.nr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_count_blocks_and_structure() {
        // 16 × 8, nonzero only in rows 0..4 × cols 0..4 (one 4×4 block).
        let mut mask = vec![false; 16 * 8];
        for r in 0..4 {
            for c in 0..4 {
                mask[r * 8 + c] = true;
            }
        }
        let f = WeightFacts::of_mask(&mask, 16, 8);
        assert_eq!(f.nonzeros(), 16);
        assert_eq!(f.blocks_of((4, 4)), Some(1));
        assert_eq!(f.blocks_of((1, 8)), Some(4));
        assert_eq!(f.blocks_of((16, 1)), Some(4));
        assert_eq!(f.structure(), Some((4, 4)));
        assert_eq!(WeightFacts::parse(&f.to_text()), Some(f.clone()));
        // Sparse panels along the rows (x · Wᵀ): 4 of 8 panel rows of the one 8-wide panel
        // group holding rows 0..8 are kept; rows 8..16 keep none.
        let c = choose(&f, true, 8);
        assert_eq!(c.lanes, Some(8));
        assert!((c.work - 4.0 * SPARSE_ROW_COST / 16.0).abs() < 1e-9, "{c:?}");
        // All zeros: nothing to do; all nonzero: dense.
        assert_eq!(choose(&WeightFacts::of_mask(&[false; 64], 8, 8), true, 16).lanes, Some(8));
        assert_eq!(choose(&WeightFacts::of_mask(&[true; 64], 8, 8), true, 16).lanes, None);
    }
}
