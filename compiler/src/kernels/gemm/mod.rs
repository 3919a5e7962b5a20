//! GEMM, in the manner of BLIS/Goto: the runtime's loops (`runtime::gemm`) pack the operands
//! into panels and walk the output in register tiles; the microkernel (`microkernel`) is the
//! only code that depends on the target, and it is generated per program so the fused
//! epilogue (bias, residual, activation, any pointwise chain the lowering fuses) runs on the
//! register tile before it is stored.
//!
//! What is data, not code: the tile shape ([`GemmTile`], chosen per target by measurement),
//! the operands' strides, the batch dims and their broadcasting ([`GemmShape`]).
//!
//! Accumulation order (stated, since results are not bit-identical to MKL's): each output
//! element is one float32 sum over k in increasing order, fused multiply-adds, starting from
//! zero; the epilogue then applies to that sum. Thread count does not change it (threads split
//! the output, never k).

pub mod microkernel;

use crate::kernels::quantized::{self, QuantizedB};
use crate::kernels::sparse::{SparseFormat, SparsePanel, SparseRows};

use crate::lower::loop_ir::{AccId, BufId, VarId};

/// The register tile: `mr` rows × `nr` columns of the output, `nr` a multiple of the vector
/// width `lanes` (floats per register: 16 on AVX-512, 8 on AVX2). Packed A panels are `mr`
/// rows wide, packed B panels `nr` columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmTile {
    pub mr: i64,
    pub nr: i64,
    pub lanes: i64,
}

/// Packing and scratch alignment in floats (one AVX-512 register, 64 bytes), whatever the
/// tile's vector width.
pub const LANES: i64 = 16;

/// The float32 lanes of the host's vector registers: 16 with AVX-512, else 8 (AVX2). Kiln
/// compiles for the host, so lowering picks tiles for it (the target is in every cache key,
/// so code with one width is never served to a host of the other). `KILN_VECTOR_LANES=8`
/// picks the AVX2 tiles on an AVX-512 host too (they run there): the test command runs the
/// GEMM and convolution kernel tests so, whatever machine CI has.
pub fn host_lanes() -> i64 {
    static LANES_OF_HOST: once_cell::sync::Lazy<i64> = once_cell::sync::Lazy::new(|| {
        let avx512 = crate::codegen::target::Target::host().has_feature("avx512f");
        if !avx512 || std::env::var("KILN_VECTOR_LANES").as_deref() == Ok("8") { 8 } else { 16 }
    });
    *LANES_OF_HOST
}

impl GemmTile {
    /// The tile for AVX-512 (32 zmm registers). Measured on Zen 5 (`bench/gemm.py`): see
    /// ARCHITECTURE.md, "GEMM". 8 × 48 keeps 24 accumulators, 3 B vectors and a broadcast in
    /// registers.
    pub fn avx512() -> GemmTile {
        GemmTile { mr: 8, nr: 48, lanes: 16 }
    }
    /// The tile for AVX2 (16 ymm registers): 6 × 16 keeps 12 accumulators, 2 B vectors and a
    /// broadcast in registers (the AVX-512 tiles, split into ymm halves, spill).
    pub fn avx2() -> GemmTile {
        GemmTile { mr: 6, nr: 16, lanes: 8 }
    }
    /// The host's general tile.
    pub fn host() -> GemmTile {
        if host_lanes() == 16 { GemmTile::avx512() } else { GemmTile::avx2() }
    }
    /// The tile for an output of `m` rows: the general one from 4 rows on; a thinner output
    /// gets a tile of its own height, wide enough for 8 or 9 accumulators (FMA latency × 2
    /// pipes). On the 8-row tile a single row wasted 7/8 of the work: 1×1024×1024, 1 thread,
    /// 31 GFLOP/s (torch.mm 41); see ARCHITECTURE.md, "GEMM". (AVX2: the same accumulator
    /// counts in 8-float registers; B is then read by the FMAs from L1.)
    pub fn for_rows(m: i64) -> GemmTile {
        let l = host_lanes();
        match m {
            1 => GemmTile { mr: 1, nr: 8 * l, lanes: l },
            2 => GemmTile { mr: 2, nr: 4 * l, lanes: l },
            3 => GemmTile { mr: 3, nr: if l == 16 { 48 } else { 32 }, lanes: l },
            _ => GemmTile::host(),
        }
    }

    /// The tile for a product of `n` columns (a convolution's output channels): the widest
    /// of 64, 48, 32 and 16 columns that `n` fills, rows to keep 24 accumulators (16 for
    /// the thinnest), so that no column panel is mostly padding (64 channels in 48-wide
    /// panels wasted a third of the work). AVX2: 6 × 16, or 12 × 8 for 8 columns or fewer.
    pub fn for_columns(n: i64) -> GemmTile {
        if host_lanes() == 8 {
            return if n <= 8 { GemmTile { mr: 12, nr: 8, lanes: 8 } } else { GemmTile::avx2() };
        }
        match n {
            _ if n % 64 == 0 => GemmTile { mr: 6, nr: 64, lanes: 16 },
            _ if n % 48 == 0 => GemmTile { mr: 8, nr: 48, lanes: 16 },
            _ if n % 32 == 0 || (17..32).contains(&n) => GemmTile { mr: 12, nr: 32, lanes: 16 },
            _ if n <= 16 => GemmTile { mr: 16, nr: 16, lanes: 16 },
            _ => GemmTile::avx512(),
        }
    }

    /// The tile over sparse B panels (`kernels::sparse`) of one vector, `lanes` columns: every
    /// row of the output up to 12 (AVX2: 12 accumulators, the B vector and a broadcast in
    /// 16 registers), else 8 (a row panel of 12 over 16 rows would be a third padding).
    pub fn sparse(m: i64, lanes: i64) -> GemmTile {
        GemmTile { mr: if m <= 12 { m.max(1) } else { 8 }, nr: lanes, lanes }
    }

    /// The tile over sparse rows (`SparseFormat::Rows`): one row of the output, 8 columns
    /// (each a dot product of its own; the vectors are the dense loop's, `DENSE_B`).
    pub fn sparse_rows() -> GemmTile {
        GemmTile { mr: 1, nr: 8, lanes: 8 }
    }

    /// The tile of the unrolled product over a weight in code (`SparseFormat::InCode`): the
    /// output's rows, up to `MAX_IN_CODE_ROWS` (each step's picks and values are read once
    /// for all of them), one vector of its features (each call runs its panel's code).
    pub fn in_code(m: i64, lanes: i64) -> GemmTile {
        GemmTile { mr: m.clamp(1, MAX_IN_CODE_ROWS), nr: lanes, lanes }
    }

    /// The tile of an int8 product of m × n (`kernels::quantized`) summed as `sums` says.
    /// Pairs (AVX2 integer vectors of 8 int32 sums): 4 × 16 keeps 8 accumulators, 2 B vectors,
    /// the broadcast quad of A, the ones of `vpmaddwd` and a product in 16 registers. Exact
    /// sums (`vpdpbusd`, one instruction a vector, 32 zmm registers): 6 × 64 (24 accumulators,
    /// 4 B vectors; each row of A is read from its own run of the panel, a general register
    /// each, so tall tiles spill them — measured on quantized ResNet-18 at 2 threads on a
    /// Sapphire-Rapids-class Xeon: 6 × 64 5.0 ms, 5 × 64 5.3, 4 × 64 5.3, 8 × 32 6.1, 8 × 48
    /// 6.7, 10 × 32 7.0, 12 × 32 7.9), 8 × 16 for 16 columns or fewer, one or two rows 64 wide;
    /// AVX2's 4 × 16 on 8 lanes (`KILN_VECTOR_LANES=8`). A thinner output gets a tile of its
    /// own height.
    pub fn int8(m: i64, n: i64, sums: quantized::ProductSums) -> GemmTile {
        let tile = |rows: i64, nr: i64, lanes: i64| GemmTile { mr: m.clamp(1, rows).min(quantized::MAX_ROWS), nr, lanes };
        match sums {
            quantized::ProductSums::Exact if host_lanes() == 16 => match (m, n) {
                (..=2, _) => tile(2, 64, 16),
                (_, ..=16) => tile(8, 16, 16),
                _ => tile(6, 64, 16),
            },
            _ => tile(4, 16, 8),
        }
    }

    pub fn vectors(&self) -> i64 {
        self.nr / self.lanes
    }

    /// Independent sums per element over a sparse panel: enough accumulators in flight for
    /// the FMA latency × 2 pipes (8) however few rows the tile has; the chains take the kept
    /// rows in turn and are added (pairwise) before the epilogue.
    pub fn sparse_chains(&self) -> i64 {
        (8 + self.mr - 1) / self.mr
    }
}

/// One GEMM operand: element (batch…, row, col) is at `buf[offset + Σ batch·batch_strides +
/// row·rows + col·cols]` (a view of a buffer: a slice's offset, permuted strides). A
/// broadcast batch dim has stride 0.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GemmOperand {
    pub buf: BufId,
    pub offset: i64,
    pub batch_strides: Vec<i64>,
    pub rows: i64,
    pub cols: i64,
}

impl GemmOperand {
    /// Whether every batch of the operand is the same matrix (packed once, not per batch).
    pub fn batch_invariant(&self) -> bool {
        self.batch_strides.iter().all(|&s| s == 0)
    }
}

/// A convolution's A operand: the windows of an image (im2col), packed straight from the
/// image. Row `q` of A is output pixel (oh, ow) = (q / out_w, q % out_w); column `p` is
/// (c, kh, kw) in row-major order over (channels, kernel); the element is the image at
/// (c, oh·stride₀ + kh·dilation₀ − pad₀, ow·stride₁ + kw·dilation₁ − pad₁), zero outside
/// `in_size` (the padding is never stored), at `offset + batch + Σ coordinate · strides`.
/// Never part of [`GemmShape::integers`]: code for symbolic sizes takes convolutions whose
/// image sizes do not move (only the batch does); another image size is another
/// specialisation.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Im2col {
    pub channels: i64,
    pub kernel: [i64; 2],
    pub out_h: i64,
    pub out_w: i64,
    pub in_size: [i64; 2],
    /// Zeros before the image's first row and column.
    pub pad: [i64; 2],
    pub stride: [i64; 2],
    pub dilation: [i64; 2],
    /// The image's element strides along (c, h, w).
    pub strides: [i64; 3],
}

impl Im2col {
    /// The image rows or columns (dim 0 or 1) one window spans.
    pub fn span(&self, d: usize) -> i64 {
        self.dilation[d] * (self.kernel[d] - 1) + 1
    }
    /// The image step between output pixels next to each other in one row.
    pub fn row_step(&self) -> i64 {
        self.stride[1] * self.strides[2]
    }
    /// Rows and columns of the padded copy each call makes of each image: what the windows
    /// reach, the padding's zeros included.
    pub fn padded(&self) -> [i64; 2] {
        let out = [self.out_h, self.out_w];
        [0, 1].map(|d| (out[d] - 1) * self.stride[d] + self.span(d))
    }
    /// Whether tiles of `mr` rows run along the copy's rows as if they were one long row
    /// ("wide rows", stride 1): output pixel (oh, ow) is tile-row index oh·W + ow of the
    /// copy's width W, the W − OW indices past each row's end are computed and dropped, and
    /// every tile reads the copy in place. Where tiles fill output rows exactly, or with a
    /// stride, tiles hold pixels of one output row.
    pub fn wide_rows(&self, mr: i64) -> bool {
        self.stride == [1, 1] && self.out_w % mr != 0
    }
    /// Tile-row indices per output row (see [`wide_rows`](Self::wide_rows)).
    pub fn row_width(&self, mr: i64) -> i64 {
        if self.wide_rows(mr) { self.padded()[1] } else { self.out_w }
    }
    /// How tiles of `mr` rows cover one image's output.
    pub fn tiling(&self, mr: i64) -> ConvTiling {
        let per_row = (self.out_w + mr - 1) / mr;
        if self.wide_rows(mr) {
            ConvTiling::WideRows
        } else if per_row * mr * 8 <= self.out_w * 9 {
            // Rows that fill their tiles well (at most 1/8 wasted): 7 pixels in tiles of 6
            // would waste more than packing costs.
            ConvTiling::PerRow
        } else {
            ConvTiling::Packed
        }
    }
    /// Row tiles of `mr` rows per image.
    pub fn row_tiles(&self, mr: i64) -> i64 {
        match self.tiling(mr) {
            ConvTiling::WideRows => (self.out_h * self.row_width(mr) + mr - 1) / mr,
            ConvTiling::PerRow => self.out_h * ((self.out_w + mr - 1) / mr),
            ConvTiling::Packed => (self.out_h * self.out_w + mr - 1) / mr,
        }
    }
    /// Whether every tile reads the image copy in place (none packs its windows).
    pub fn all_in_place(&self, mr: i64) -> bool {
        match self.tiling(mr) {
            ConvTiling::WideRows => true,
            ConvTiling::PerRow => self.out_w % mr == 0,
            ConvTiling::Packed => false,
        }
    }
    /// This convolution over the padded copy: channels-last, no padding.
    pub fn over_copy(&self) -> Im2col {
        let [h, w] = self.padded();
        Im2col { in_size: [h, w], pad: [0, 0], strides: [1, w * self.channels, self.channels], ..self.clone() }
    }
    /// Floats of one image's copy: its pixels, then zeros that the last tile's dropped
    /// indices read (at most a tile and a window row past the end), a whole number of vectors.
    pub fn copy_elems(&self, mr: i64) -> i64 {
        let [h, w] = self.padded();
        ((h * w + mr + w) * self.channels + LANES - 1) / LANES * LANES
    }
    /// The image offset of each window element p = (c, kh, kw), row-major.
    pub fn steps(&self) -> Vec<i64> {
        let mut out = Vec::with_capacity((self.channels * self.kernel[0] * self.kernel[1]) as usize);
        for c in 0..self.channels {
            for kh in 0..self.kernel[0] {
                for kw in 0..self.kernel[1] {
                    out.push(c * self.strides[0] + kh * self.dilation[0] * self.strides[1] + kw * self.dilation[1] * self.strides[2]);
                }
            }
        }
        out
    }
}

/// How a convolution's output pixels are cut into row tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvTiling {
    /// Along the copy's rows as one long row, every tile in place (`Im2col::wide_rows`).
    WideRows,
    /// Pixels of one output row a tile; full tiles in place, a row's last short one packed.
    PerRow,
    /// Over the flattened pixels, each tile's windows packed.
    Packed,
}

/// The most rows a product over a weight in code takes (`GemmTile::in_code`).
pub const MAX_IN_CODE_ROWS: i64 = 3;

/// Microkernel flags (its last argument): the tile starts from `partial`; the tile is stored
/// to `partial` and the epilogue skipped (a chunk of k that is not the last).
pub const FROM_PARTIAL: i64 = 1;
pub const TO_PARTIAL: i64 = 2;
/// For a microkernel over sparse B panels: this call's B panel is dense (k × nr) after all.
/// The runtime packs B dense for a call whose A holds an inf or a NaN, since a skipped zero
/// of B times it is NaN in eager's product (and in Kiln's dense one).
pub const DENSE_B: i64 = 4;

/// The most bytes of one B panel a convolution reads per pass over its tiles (a quarter of a
/// Zen core's L2: the chunk stays there while the thread's tiles use it).
pub const B_CHUNK_BYTES: i64 = 256 << 10;

/// What the runtime needs to run a GEMM: C[batch…, m, n] = A[batch…, m, k] · B[batch…, k, n],
/// then the epilogue. The packed panels live in scratch the runtime sets aside per call
/// ([`GemmShape::scratch_elems`] floats), not in the program's buffers: their size is no
/// product of the sizes (whole panels), and code for symbolic sizes evaluates every integer
/// here per call ([`GemmShape::integers`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GemmShape {
    pub batch: Vec<i64>,
    pub m: i64,
    pub n: i64,
    pub k: i64,
    pub a: GemmOperand,
    pub b: GemmOperand,
    pub tile: GemmTile,
    /// A convolution: A is these windows of the image in `a.buf` (`a.rows`, `a.cols`
    /// unused), packed one row panel at a time as the tiles need it.
    pub im2col: Option<Im2col>,
    /// B is packed sparse (`kernels::sparse`): panels of `tile.nr` columns keeping their k
    /// rows with a nonzero, or each column's nonzero runs; the microkernel walks them.
    pub sparse_b: Option<SparseFormat>,
    /// An int8 product (`kernels::quantized`): A is quantized per call, B holds int8
    /// values (as int32) with these scales and zero points; panels are packed in quads of k.
    pub quant: Option<QuantizedB>,
}

impl GemmShape {
    /// This shape with what packing B does not read cleared (A, m, the buffer numbers, which
    /// are the kernel's own): two GEMMs of one program whose B is the same input and whose
    /// `b_packing` is equal read one packed copy (an unrolled RNN's steps, each multiplying by
    /// the same W_hh).
    pub fn b_packing(&self) -> GemmShape {
        let none = BufId(0);
        GemmShape {
            m: 0,
            a: GemmOperand { buf: none, offset: 0, batch_strides: vec![], rows: 0, cols: 0 },
            b: GemmOperand { buf: none, ..self.b.clone() },
            quant: self.quant.map(|q| QuantizedB { scale: none, zero_point: none, bias: q.bias.map(|_| none), ..q }),
            ..self.clone()
        }
    }
    pub fn batch_count(&self) -> i64 {
        self.batch.iter().product()
    }
    pub fn m_panels(&self) -> i64 {
        (self.m + self.tile.mr - 1) / self.tile.mr
    }
    pub fn n_panels(&self) -> i64 {
        (self.n + self.tile.nr - 1) / self.tile.nr
    }
    fn packed_count(&self, op: &GemmOperand) -> i64 {
        if op.batch_invariant() {
            1
        } else {
            self.batch_count()
        }
    }
    /// Floats of A's packed panels in the call's scratch (none for a convolution: each
    /// thread packs the row panel it works on into a buffer of its own).
    pub fn packed_a_elems(&self) -> i64 {
        if self.im2col.is_some() {
            return 0;
        }
        self.packed_count(&self.a) * self.m_panels() * self.a_panel_elems()
    }
    /// Floats of one packed B panel (dense: k × nr; sparse: room for every row kept).
    pub fn b_panel_elems(&self) -> i64 {
        if self.quant.is_some() {
            return quantized::b_panel_words(self.k, self.tile.nr);
        }
        match self.sparse_b {
            Some(SparseFormat::Panels(_)) => SparsePanel { k: self.k, nr: self.tile.nr }.elems(),
            Some(SparseFormat::Rows(block)) => SparseRows { k: self.k, nr: self.tile.nr, block }.elems(),
            // Nothing is packed for the code; room for B packed dense (`DENSE_B`).
            Some(SparseFormat::InCode { .. }) | None => self.tile.nr * self.k,
        }
    }
    /// Floats of one packed A panel: mr × k, and for sparse rows k rounded up to whole runs
    /// (zeros past k: a run's last vector of A reads them).
    pub fn a_panel_elems(&self) -> i64 {
        if self.quant.is_some() {
            return quantized::a_panel_words(self.k, self.tile.mr);
        }
        match self.sparse_b {
            Some(SparseFormat::Rows(block)) => self.tile.mr * SparseRows { k: self.k, nr: self.tile.nr, block }.runs() * block,
            Some(SparseFormat::InCode { lanes, .. }) => self.tile.mr * crate::kernels::weights_in_code::a_row_elems(self.k, lanes),
            _ => self.tile.mr * self.k,
        }
    }
    pub fn packed_b_elems(&self) -> i64 {
        let table = if matches!(self.sparse_b, Some(SparseFormat::Panels(_) | SparseFormat::Rows(_))) { crate::kernels::sparse::table_elems(self.n_panels()) } else { 0 };
        table + self.packed_count(&self.b) * self.n_panels() * self.b_panel_elems()
    }
    /// Floats of the copy of B a caller keeps between calls (`runtime::gemm::pack_b`): its
    /// packing; for a weight in code, the verdict that the input is that weight.
    pub fn kept_b_elems(&self) -> i64 {
        match self.sparse_b {
            Some(SparseFormat::InCode { .. }) => LANES,
            _ => self.packed_b_elems(),
        }
    }
    /// Where B's panels start in the scratch (after A's, 64-byte aligned: the microkernel's
    /// loads of B are aligned).
    pub fn packed_b_offset(&self) -> i64 {
        (self.packed_a_elems() + LANES - 1) / LANES * LANES
    }
    /// Where a convolution's padded image copies start in the scratch (after B's panels).
    pub fn image_copy_offset(&self) -> i64 {
        (self.packed_b_offset() + self.packed_b_elems() + LANES - 1) / LANES * LANES
    }
    /// Chunks of k a convolution runs in: a B panel past `B_CHUNK_BYTES` (k long: ResNet's
    /// last stages) is taken a chunk at a time over all of a thread's tiles, the register
    /// tile's sums kept between chunks (`partial_offset`); only where every tile reads the
    /// image in place.
    pub fn k_chunks(&self) -> i64 {
        match &self.im2col {
            Some(w) if w.all_in_place(self.tile.mr) => ((self.k * self.tile.nr * 4 + B_CHUNK_BYTES - 1) / B_CHUNK_BYTES).max(1),
            _ => 1,
        }
    }
    /// Where a chunked convolution's partial tiles start in the scratch (after the image
    /// copies): one mr × nr tile per row tile and column panel.
    pub fn partial_offset(&self) -> i64 {
        let copies = self.im2col.as_ref().map_or(0, |w| self.batch_count() * w.copy_elems(self.tile.mr));
        self.image_copy_offset() + copies
    }
    /// Floats of scratch a call packs A and B into (B's part unused when it is prepacked),
    /// and a convolution's padded copies of its images and partial tiles.
    pub fn scratch_elems(&self) -> i64 {
        match &self.im2col {
            Some(w) => {
                let partials = if self.k_chunks() > 1 { self.batch_count() * w.row_tiles(self.tile.mr) * self.n_panels() * self.tile.mr * self.tile.nr } else { 0 };
                self.partial_offset() + partials
            }
            None => self.packed_b_offset() + self.packed_b_elems(),
        }
    }
    /// The integers that follow the sizes, in a fixed order: batch sizes, m, n, k, then each
    /// operand's offset, batch strides, row and column strides. (Code for symbolic sizes
    /// fits each to a product of symbols, `lower::symbolic`.)
    pub fn integers(&self) -> Vec<i64> {
        let mut out = self.batch.clone();
        out.extend([self.m, self.n, self.k]);
        for op in [&self.a, &self.b] {
            out.push(op.offset);
            out.extend(&op.batch_strides);
            out.extend([op.rows, op.cols]);
        }
        out
    }
    /// The positions in [`integers`](Self::integers) that B's packed layout depends on: n, k
    /// and B's offset and strides (a B packed once must have them fixed).
    pub fn b_integer_positions(&self) -> Vec<usize> {
        let nb = self.batch.len();
        let b_start = nb + 3 + 1 + nb + 2;
        let mut out = vec![nb + 1, nb + 2];
        out.extend(b_start..b_start + 1 + nb + 2);
        out
    }
    /// This shape with `integers` (in [`integers`](Self::integers)' order) in place of its own.
    pub fn with_integers(&self, integers: &[i64]) -> GemmShape {
        let mut next = integers.iter().copied();
        let mut take = || next.next().expect("as many integers as `integers` gives");
        let batch = self.batch.iter().map(|_| take()).collect();
        let (m, n, k) = (take(), take(), take());
        let mut operand = |op: &GemmOperand| {
            let offset = take();
            let batch_strides = op.batch_strides.iter().map(|_| take()).collect();
            GemmOperand { buf: op.buf, offset, batch_strides, rows: take(), cols: take() }
        };
        let (a, b) = (operand(&self.a), operand(&self.b));
        GemmShape { batch, m, n, k, a, b, tile: self.tile, im2col: self.im2col.clone(), sparse_b: self.sparse_b, quant: self.quant }
    }
    /// Multiply-adds, for the parallel grain.
    pub fn flops(&self) -> i64 {
        2 * self.batch_count() * self.m * self.n * self.k
    }
}

/// A GEMM kernel in the loop IR: the shape, and which loop variables and accumulator of the
/// kernel's loop nest stand for the output coordinates and the product. The kernel's loop
/// nest (over batch…, m, n, in that order, unscheduled) is the epilogue: its stores are what
/// the microkernel does with each element of the tile, the product read as `Acc(acc)`.
#[derive(Clone, Debug, PartialEq)]
pub struct GemmSpec {
    pub shape: GemmShape,
    pub batch_vars: Vec<VarId>,
    /// A convolution's output row is a pixel: this is its oh, and `ow_var` its ow.
    pub row_var: VarId,
    pub ow_var: Option<VarId>,
    pub col_var: VarId,
    pub acc: AccId,
}

impl GemmSpec {
    /// The spec whose product has the loop variable `vars[d]` for dim d: a matmul's product
    /// is [batch…, m, n]; a convolution's [N, Cout, OH, OW], its rows the pixels (OH, OW)
    /// and its columns the channels.
    pub fn for_product(shape: GemmShape, vars: &[VarId], acc: AccId) -> GemmSpec {
        let r = vars.len();
        match shape.im2col {
            Some(_) => GemmSpec { shape, batch_vars: vec![vars[0]], row_var: vars[2], ow_var: Some(vars[3]), col_var: vars[1], acc },
            None => GemmSpec { shape, batch_vars: vars[..r - 2].to_vec(), row_var: vars[r - 2], ow_var: None, col_var: vars[r - 1], acc },
        }
    }

    /// Every loop variable the microkernel sets for its epilogue.
    pub fn vars(&self) -> Vec<VarId> {
        self.batch_vars.iter().copied().chain([self.row_var]).chain(self.ow_var).chain([self.col_var]).collect()
    }
}
