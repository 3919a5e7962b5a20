//! Weights with zeros: what a constant weight's zeros look like ([`WeightFacts`], counted
//! once from its values by the frontend), which kernel skips them best ([`choose`], a cost
//! model), and the packed layouts the GEMM microkernel walks ([`SparseFormat`]).
//!
//! Three formats. Two are packings of B (k × n, n the output features) that the microkernel
//! reads instead of dense panels, the third is code; all three with the same fused epilogue:
//! - [`SparseFormat::Panels`]: B's column panels one vector wide keep only their k rows
//!   with a nonzero ([`SparsePanel`]); blocks of `lanes` features × 1 input lose all their
//!   work, any other pattern the work of the panel rows it leaves empty.
//! - [`SparseFormat::Rows`]: each feature keeps its nonzero runs of 1, 4 or 8 inputs
//!   ([`SparseRows`]), a dot product per output element (batch 1–3).
//! - [`SparseFormat::InCode`]: a small weight's nonzeros as constants of an unrolled product
//!   (`kernels::weights_in_code`), batch 1–3.
//! The facts count exactly the blocks each format keeps, so the choice is made from the
//! weight's own numbers, never guessed from its zero fraction.
//!
//! Panels' and rows' code is weight-independent: what a panel keeps is data, packed from the
//! call's weight when it is packed (`runtime::gemm::pack_b`), and any weight — another one of
//! the same shape, all zeros or none — runs correctly on it. Only the *choice* comes from the
//! weight seen when the frontend lowered, and it is in the graph's text (so in the cache
//! key); the facts themselves are not. Code with the weight in it names the weight's hash in
//! its format, so in the graph's text and the cache key (`kernels::weights_in_code`).

use crate::kernels::gemm::{GemmTile, LANES};
use crate::kernels::weights_in_code::{self, WeightKey};

/// How a sparse B is packed (and so which loop the microkernel runs over it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SparseFormat {
    /// Panels of this many columns (one vector), only their rows with a nonzero
    /// ([`SparsePanel`]): blocks of `lanes` output features × 1 input; any number of A rows.
    Panels(i64),
    /// Each column of B (an output feature) on its own: its nonzero runs of this many k
    /// (1, 4 or 8: blocks of 1 feature × that many inputs) with their k ([`SparseRows`]); a
    /// dot product per output element, for products of one to three rows (batch 1).
    Rows(i64),
    /// The weight's nonzeros in the code, for vectors of `lanes` floats
    /// (`kernels::weights_in_code`): the weight whose values hash to `key`; products of one to
    /// three rows.
    InCode { lanes: i64, key: WeightKey },
}

impl std::fmt::Display for SparseFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SparseFormat::Panels(l) => write!(f, "panels{l}"),
            SparseFormat::Rows(b) => write!(f, "rows{b}"),
            SparseFormat::InCode { lanes, key } => write!(f, "code{lanes}.{key}"),
        }
    }
}

impl SparseFormat {
    pub fn parse(s: &str) -> Option<SparseFormat> {
        let f = if let Some(l) = s.strip_prefix("panels") {
            SparseFormat::Panels(l.parse().ok()?)
        } else if let Some((l, key)) = s.strip_prefix("code").and_then(|c| c.split_once('.')) {
            SparseFormat::InCode { lanes: l.parse().ok()?, key: WeightKey::parse(key)? }
        } else {
            SparseFormat::Rows(s.strip_prefix("rows")?.parse().ok()?)
        };
        f.valid().then_some(f)
    }
    /// The float32 lanes of the microkernel's vectors over this format: a panel's width (and
    /// the unrolled product's); the sparse-rows tile's (its dense loop's, `DENSE_B`).
    pub fn lanes(&self) -> i64 {
        match *self {
            SparseFormat::Panels(l) | SparseFormat::InCode { lanes: l, .. } => l,
            SparseFormat::Rows(_) => GemmTile::sparse_rows().lanes,
        }
    }
    /// Widths the kernels have: panels of one AVX2 or AVX-512 vector, runs of 1, 4 or 8.
    pub fn valid(&self) -> bool {
        match *self {
            SparseFormat::Panels(l) | SparseFormat::InCode { lanes: l, .. } => l == 8 || l == 16,
            SparseFormat::Rows(b) => [1, 4, 8].contains(&b),
        }
    }
}

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
    /// Steps of the unrolled product over the weight (`weights_in_code::steps`) at 8 and
    /// at 16 lanes.
    pub code_steps: [i64; 2],
    /// The weight's key where its values are registered for code (`weights_in_code`).
    pub key: Option<WeightKey>,
}

impl WeightFacts {
    /// Which elements of a float32 matrix are nonzero (NaN counts), row-major; element
    /// (r, c) at `data[r · row_stride + c · col_stride]`.
    ///
    /// # Safety
    /// Every element the strides reach is readable.
    pub unsafe fn nonzero_mask(data: *const f32, rows: i64, cols: i64, row_stride: i64, col_stride: i64) -> Vec<bool> {
        (0..rows * cols).map(|i| *data.offset(((i / cols) * row_stride + (i % cols) * col_stride) as isize) != 0.0).collect()
    }

    /// Counts the blocks of a float32 matrix (see [`nonzero_mask`](Self::nonzero_mask)).
    ///
    /// # Safety
    /// Every element the strides reach is readable.
    pub unsafe fn measure(data: *const f32, rows: i64, cols: i64, row_stride: i64, col_stride: i64) -> WeightFacts {
        WeightFacts::of_mask(&Self::nonzero_mask(data, rows, cols, row_stride, col_stride), rows, cols)
    }

    /// The facts of a row-major mask of nonzeros (one pass over the mask; each block shape
    /// then visits the nonzeros only).
    pub fn of_mask(nonzero: &[bool], rows: i64, cols: i64) -> WeightFacts {
        let at: Vec<(i64, i64)> = (0..rows * cols).filter(|&i| nonzero[i as usize]).map(|i| (i / cols, i % cols)).collect();
        let count = |(br, bc): (i64, i64)| -> i64 {
            let (nr, nc) = ((rows + br - 1) / br, (cols + bc - 1) / bc);
            let mut hit = vec![false; (nr * nc) as usize];
            for &(r, c) in &at {
                hit[((r / br) * nc + c / bc) as usize] = true;
            }
            hit.iter().filter(|&&h| h).count() as i64
        };
        let code_steps = [8, 16].map(|lanes| weights_in_code::steps(nonzero, rows, cols, lanes));
        WeightFacts { rows, cols, nonzero_blocks: BLOCK_SHAPES.iter().map(|&s| count(s)).collect(), code_steps, key: None }
    }

    /// Steps of the unrolled product at `lanes` lanes.
    pub fn code_steps(&self, lanes: i64) -> i64 {
        self.code_steps[(lanes == 16) as usize]
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

    /// Text form for the frontend's dump: `rows cols`, the counts of `BLOCK_SHAPES`, the
    /// code steps at 8 and 16 lanes, and `code KEY` where the values are registered.
    pub fn to_text(&self) -> String {
        let counts: Vec<String> = self.nonzero_blocks.iter().chain(&self.code_steps).map(|c| c.to_string()).collect();
        let key = self.key.map_or(String::new(), |k| format!(" code {k}"));
        format!("{} {} {}{key}", self.rows, self.cols, counts.join(" "))
    }

    pub fn parse(text: &str) -> Option<WeightFacts> {
        let (numbers, key) = match text.split_once(" code ") {
            Some((numbers, key)) => (numbers, Some(WeightKey::parse(key.trim())?)),
            None => (text, None),
        };
        let n: Vec<i64> = numbers.split_whitespace().map(|x| x.parse().ok()).collect::<Option<_>>()?;
        let blocks = BLOCK_SHAPES.len();
        (n.len() == 4 + blocks).then(|| WeightFacts { rows: n[0], cols: n[1], nonzero_blocks: n[2..2 + blocks].to_vec(), code_steps: [n[2 + blocks], n[3 + blocks]], key })
    }
}

/// The cost model's rates, per thread, fitted (least squares on log time) to
/// `compiler/examples/sparse_speed` on Zen 3: one thread, 256² and 1024² layers, batch 1
/// and 16, five block shapes, 50–95% zeros, every format (ARCHITECTURE.md, "Sparse
/// weights"). Vector FMAs per cycle of the dense GEMM's tile, of the GEMV loop nest (and
/// what each of its output elements costs besides: its dot product's lanes summed) and of
/// sparse panels (a broadcast of A and the k index beside each FMA); steps per cycle of
/// sparse rows (a run's k, its values and A's: three loads a step; a run of one is a scalar
/// step); what a microkernel call costs besides (a tile: its epilogue, its loop set-up);
/// bytes per cycle of a weight read from L2 or, past `L2_BYTES`, from L3 and memory; and a
/// call's fixed cost (threads woken, A packed).
const GEMM_FMAS_PER_CYCLE: f64 = 1.4;
const GEMV_FMAS_PER_CYCLE: f64 = 0.85;
const GEMV_ELEMENT_CYCLES: f64 = 20.0;
const PANEL_FMAS_PER_CYCLE: f64 = 1.0;
const ROW_STEPS_PER_CYCLE: f64 = 0.41;
const SCALAR_ROW_STEPS_PER_CYCLE: f64 = 0.46;
const TILE_CYCLES: f64 = 130.0;
const L2_BYTES_PER_CYCLE: f64 = 14.0;
const FAR_BYTES_PER_CYCLE: f64 = 11.0;
const L2_BYTES: f64 = 512.0 * 1024.0;
const CALL_CYCLES: f64 = 1300.0;
/// The unrolled product's steps per cycle (a permute of x, an FMA, two constants loaded:
/// its code and constants stream through once, in order, and the rate holds that) and what
/// a tile costs besides (a switch, its epilogue). Fitted on the AVX-512 VNNI Xeon (not on
/// Zen 3 as the rest: the format came later; dense's time there calibrates the units):
/// `sparse_speed 1 256 1`, 200–4000 steps in 0.3–3.6 µs against dense's 4.9.
const CODE_STEPS_PER_CYCLE: f64 = 0.33;
const CODE_TILE_CYCLES: f64 = 10.0;
/// What each row past the first adds to a step of the unrolled product, as a share of one.
const CODE_ROW_SHARE: f64 = 0.45;

/// The GEMM's choice for a weight B, from its facts: a sparse format, or dense.
#[derive(Clone, Debug, PartialEq)]
pub struct SparseChoice {
    /// None: dense.
    pub format: Option<SparseFormat>,
    /// The sparse format predicted fastest (taken or not), and its time over dense's.
    pub best: SparseFormat,
    pub work: f64,
    /// Why, for `explain()`.
    pub reason: String,
}

/// Predicted cycles of a product that does `steps` at `rate` a cycle and `overhead` cycles
/// besides, reading a weight of `bytes`: whichever bounds it, the arithmetic or the bytes.
fn cycles(steps: f64, rate: f64, overhead: f64, bytes: f64) -> f64 {
    let bandwidth = if bytes <= L2_BYTES { L2_BYTES_PER_CYCLE } else { FAR_BYTES_PER_CYCLE };
    CALL_CYCLES + (steps / rate + overhead).max(bytes / bandwidth)
}

/// Picks the format with the least predicted time for a product of `m` rows (sparse panels
/// 8 or 16 columns wide, none wider than the host's vectors; sparse rows of runs of 1, 4 or 8
/// for one to three rows; the weight in code for one to three rows, where its values are
/// registered and it is small) and takes it where it beats the dense kernel.
/// `n_dim_rows`: B's columns (n, the output features) are the weight's rows (a Linear's
/// `x · Wᵀ`); else its columns (`x · W`, panels only).
pub fn choose(facts: &WeightFacts, n_dim_rows: bool, host_lanes: i64, m: i64) -> SparseChoice {
    let (n, k) = if n_dim_rows { (facts.rows, facts.cols) } else { (facts.cols, facts.rows) };
    let (mf, weight_bytes) = (m.max(1) as f64, (n * k * 4) as f64);
    let dense_fmas = mf * ((n + host_lanes - 1) / host_lanes * k) as f64;
    let dense_tiles = (mf / GemmTile::for_rows(m).mr as f64).ceil() * (n as f64 / GemmTile::for_rows(m).nr as f64).ceil();
    let dense = if m < 4 {
        cycles(dense_fmas, GEMV_FMAS_PER_CYCLE, mf * n as f64 * GEMV_ELEMENT_CYCLES, weight_bytes)
    } else {
        cycles(dense_fmas, GEMM_FMAS_PER_CYCLE, dense_tiles * TILE_CYCLES, weight_bytes)
    };
    let mut candidates = vec![];
    for lanes in [8, 16].into_iter().filter(|&l| l <= host_lanes) {
        let rows = facts.blocks_of(if n_dim_rows { (lanes, 1) } else { (1, lanes) }).expect("panel widths are counted") as f64;
        let tile_rows = GemmTile::sparse(m, lanes).mr as f64;
        let row_panels = (mf / tile_rows).ceil();
        let tiles = row_panels * (n as f64 / lanes as f64).ceil();
        candidates.push((SparseFormat::Panels(lanes), cycles(rows * row_panels * tile_rows, PANEL_FMAS_PER_CYCLE, tiles * TILE_CYCLES, rows * (4 * lanes + 4) as f64)));
    }
    if n_dim_rows && m <= 3 {
        let tiles = mf * (n as f64 / GemmTile::sparse_rows().nr as f64).ceil();
        for block in [1, 4, 8] {
            let runs = facts.blocks_of((1, block)).expect("run lengths are counted") as f64;
            let rate = if block == 1 { SCALAR_ROW_STEPS_PER_CYCLE } else { ROW_STEPS_PER_CYCLE };
            candidates.push((SparseFormat::Rows(block), cycles(runs * mf, rate, tiles * TILE_CYCLES, runs * (4 * block + 4) as f64)));
        }
    }
    let small = facts.code_steps(host_lanes) <= weights_in_code::MAX_STEPS;
    if let Some(key) = facts.key.filter(|_| n_dim_rows && m <= crate::kernels::gemm::MAX_IN_CODE_ROWS && small) {
        // All rows in one pass: a step's tables are read once, each row adds a permute and
        // an FMA (measured at 256², 90% zeros: about 1.6× one row's time for two, 1.9× for
        // three).
        let steps = facts.code_steps(host_lanes) as f64 * (1.0 + CODE_ROW_SHARE * (mf - 1.0));
        let tiles = (n as f64 / host_lanes as f64).ceil();
        candidates.push((SparseFormat::InCode { lanes: host_lanes, key }, cycles(steps, CODE_STEPS_PER_CYCLE, tiles * CODE_TILE_CYCLES, 0.0)));
    }
    let (best, time) = candidates.into_iter().min_by(|a, b| a.1.total_cmp(&b.1)).expect("panels of 8 are always a candidate");
    let work = time / dense;
    let zeros = format!("{:.0}% zeros, {}", 100.0 * facts.zero_fraction(), match facts.structure() {
        Some((r, c)) => format!("in {r}x{c} blocks"),
        None => "unstructured".to_string(),
    });
    let sparse = work < 1.0;
    let shown = match best {
        SparseFormat::InCode { .. } => format!("{best} (the weight's values in the code)"),
        _ => best.to_string(),
    };
    let reason = if sparse {
        format!("sparse {shown}: predicted {:.0}% of the dense kernel's time ({zeros})", 100.0 * work)
    } else {
        format!("dense: sparse {shown} predicted at {:.0}% of its time ({zeros})", 100.0 * work)
    };
    SparseChoice { format: sparse.then_some(best), best, work, reason }
}

/// A sparse B packed whole: a table of each panel's offset (an i64 in two floats' place,
/// `table_elems` floats), then the panels one after another, each at a multiple of a vector
/// and only as long as its kept data: one stream through memory (a layout with room for
/// every row in each panel scattered the data over pages, and the prefetcher never caught
/// up: sparse rows of a 1024² layer ran at 4 GB/s). Sized for every row kept, so the
/// buffer's size does not depend on the weight.
pub fn table_elems(panels: i64) -> i64 {
    padded(2 * panels)
}

/// Rounds a count of floats up to whole vectors.
pub fn padded(n: i64) -> i64 {
    (n + LANES - 1) / LANES * LANES
}

/// One B panel of `nr` columns over `k` rows in [`SparseFormat::Rows`] of runs `block` long,
/// in floats: `HEADER` floats holding each column's number of kept runs and then each
/// column's offset from the panel's start (i32 bits), then per column its runs' first k
/// (i32) followed by their values, `block` floats each (a run past k holds zeros). Runs start
/// at multiples of `block` (the blocks the facts count).
#[derive(Clone, Copy, Debug)]
pub struct SparseRows {
    pub k: i64,
    pub nr: i64,
    pub block: i64,
}

impl SparseRows {
    /// Two i32 per column (count, offset): room for the 8 columns of `GemmTile::sparse_rows`.
    pub const HEADER: i64 = LANES;
    /// Runs a column has room for.
    pub fn runs(&self) -> i64 {
        (self.k + self.block - 1) / self.block
    }
    /// Floats of a panel with every run kept.
    pub fn elems(&self) -> i64 {
        padded(Self::HEADER + self.nr * self.runs() * (1 + self.block))
    }
}

/// One sparse B panel in [`SparseFormat::Panels`] (`nr` columns over `k` rows), in floats:
/// `HEADER` floats whose first holds the number of kept rows (as an i32's bits), then the
/// kept rows' k (i32, increasing; padded to a vector), then their values, `nr` floats each.
#[derive(Clone, Copy, Debug)]
pub struct SparsePanel {
    pub k: i64,
    pub nr: i64,
}

impl SparsePanel {
    /// Floats before the indices (a vector: the values stay aligned).
    pub const HEADER: i64 = LANES;
    /// Where the values start for `count` kept rows.
    pub fn values_offset(count: i64) -> i64 {
        Self::HEADER + padded(count)
    }
    /// Floats of a panel with every row kept, to a whole vector (the next panel's start).
    pub fn elems(&self) -> i64 {
        padded(Self::values_offset(self.k) + self.k * self.nr)
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
        // x · Wᵀ at 64 rows on a 256² weight of one 4×4 block: panels keep 4 rows of one.
        let mut big = vec![false; 256 * 256];
        for r in 0..4 {
            for c in 0..4 {
                big[r * 256 + c] = true;
            }
        }
        let c = choose(&WeightFacts::of_mask(&big, 256, 256), true, 8, 64);
        assert_eq!(c.format, Some(SparseFormat::Panels(8)), "{c:?}");
        // All zeros: nothing to do; all nonzero: dense.
        assert!(choose(&WeightFacts::of_mask(&vec![false; 256 * 256], 256, 256), true, 16, 1).format.is_some());
        assert_eq!(choose(&WeightFacts::of_mask(&vec![true; 256 * 256], 256, 256), true, 16, 1).format, None);
        for f in ["panels8", "panels16", "rows1", "rows4", "rows8"] {
            assert_eq!(SparseFormat::parse(f).unwrap().to_string(), f);
        }
        assert_eq!(SparseFormat::parse("rows3"), None);
    }
}
