//! The loops around the GEMM microkernel (`kernels::gemm::microkernel`): pack A into panels of
//! `mr` rows and B into panels of `nr` columns (k-major, zero past the edge), then run the
//! microkernel on every `mr × nr` tile of the output. Target-independent: the tile shape is
//! data from the program.
//!
//! Blocking: each microkernel call takes the whole of k (no k blocking: the B panel,
//! k × nr floats, is 192 KB at k = 1024 and stays in L2 while a thread walks its tiles down
//! one panel; the A panels stream from L2/L3). Threads split the tiles in contiguous runs in
//! (batch, column panel, row panel) order, so a thread reuses its B panel across the rows.

use crate::kernels::gemm::{ConvTiling, GemmOperand, GemmShape, Im2col, DENSE_B, FROM_PARTIAL, TO_PARTIAL};
use crate::kernels::sparse::{padded, table_elems, SparseFormat, SparsePanel, SparseRows};
use crate::runtime::parallel;
use std::cell::RefCell;

/// The microkernel's signature (see `kernels::gemm::microkernel`).
pub type MicrokernelFn =
    unsafe extern "C" fn(table: *const *mut u8, a_panel: *const f32, b_panel: *const f32, k: i64, coords: *const i64, rows: i64, cols: i64, a_steps: *const i64, partial: *mut f32, flags: i64);


/// Below this many flops a GEMM runs on the calling thread: waking the pool costs more.
const PARALLEL_MIN_FLOPS: i64 = 1 << 18;

/// Below this many packed floats the packing runs on the calling thread.
const PARALLEL_MIN_PACK: i64 = 1 << 15;

/// The most batch dims a GEMM has (the lowering refuses more).
pub const MAX_BATCH_DIMS: usize = 8;

/// The most rows a convolution's tile has (`GemmTile::for_columns` stays below).
pub const MAX_WINDOW_ROWS: i64 = 32;

pub(crate) struct Shared<T>(pub(crate) T);
// Raw pointers into buffers the caller vouches for for the duration of `run`; threads write
// disjoint panels and tiles.
unsafe impl<T> Sync for Shared<T> {}
impl<T: Copy> Shared<T> {
    pub(crate) fn get(&self) -> T {
        self.0
    }
}

/// The coordinates of batch `index` (flattened, row-major over `sizes`).
fn unflatten(sizes: &[i64], mut index: i64, coords: &mut [i64]) {
    for d in (0..sizes.len()).rev() {
        coords[d] = index % sizes[d];
        index /= sizes[d];
    }
}

/// Element offset of batch `index` in an operand with these batch strides.
fn batch_offset(sizes: &[i64], strides: &[i64], index: i64, coords: &mut [i64]) -> i64 {
    unflatten(sizes, index, coords);
    coords.iter().zip(strides).map(|(i, s)| i * s).sum()
}

/// Packs rows [r0, r0 + mr) × all of k of A (batch offset applied) as k × mr floats.
unsafe fn pack_a_panel(a: &GemmOperand, src: *const f32, m: i64, k: i64, r0: i64, mr: i64, dst: *mut f32) {
    for r in 0..mr {
        let row = r0 + r;
        if row < m {
            let s = src.offset((row * a.rows) as isize);
            for p in 0..k {
                *dst.offset((p * mr + r) as isize) = *s.offset((p * a.cols) as isize);
            }
        } else {
            for p in 0..k {
                *dst.offset((p * mr + r) as isize) = 0.0;
            }
        }
    }
}

/// Packs rows [r0, r0 + mr) × all of k of A (batch offset applied) row-major, each row
/// `row` floats apart with zeros past k (and rows past m all zeros): the rows a product over
/// a weight in code reads in chunks of k (`weights_in_code::a_row_elems`).
unsafe fn pack_a_rows(a: &GemmOperand, src: *const f32, m: i64, k: i64, r0: i64, mr: i64, row: i64, dst: *mut f32) {
    for r in 0..mr {
        let d = dst.offset((r * row) as isize);
        let live = if r0 + r < m { k } else { 0 };
        if live > 0 {
            let s = src.offset(((r0 + r) * a.rows) as isize);
            for p in 0..live {
                *d.offset(p as isize) = *s.offset((p * a.cols) as isize);
            }
        }
        std::ptr::write_bytes(d.offset(live as isize), 0, (row - live) as usize);
    }
}

/// Packs columns [c0, c0 + nr) × all of k of B as k × nr floats.
unsafe fn pack_b_panel(b: &GemmOperand, src: *const f32, n: i64, k: i64, c0: i64, nr: i64, dst: *mut f32) {
    let live = (n - c0).clamp(0, nr);
    if b.cols == 1 {
        // Row-major B: each k row of the panel is a contiguous run.
        for p in 0..k {
            let s = src.offset((p * b.rows + c0) as isize);
            let d = dst.offset((p * nr) as isize);
            std::ptr::copy_nonoverlapping(s, d, live as usize);
            std::ptr::write_bytes(d.offset(live as isize), 0, (nr - live) as usize);
        }
        return;
    }
    // Otherwise walk each column down k (contiguous when B is a transposed row-major matrix,
    // the weight of a linear layer).
    for c in 0..nr {
        if c < live {
            let s = src.offset(((c0 + c) * b.cols) as isize);
            for p in 0..k {
                *dst.offset((p * nr + c) as isize) = *s.offset((p * b.rows) as isize);
            }
        } else {
            for p in 0..k {
                *dst.offset((p * nr + c) as isize) = 0.0;
            }
        }
    }
}

/// Packs columns [c0, c0 + nr) × all of k of B as a sparse panel (`SparsePanel`): the rows
/// with a nonzero (NaN counts) among the live columns, their k indices and values. Returns
/// the floats written.
unsafe fn pack_sparse_b_panel(b: &GemmOperand, src: *const f32, n: i64, k: i64, c0: i64, nr: i64, dst: *mut f32) -> i64 {
    let live = (n - c0).clamp(0, nr);
    let at = |p: i64, c: i64| *src.offset((p * b.rows + (c0 + c) * b.cols) as isize);
    let kept: Vec<i64> = (0..k).filter(|&p| (0..live).any(|c| at(p, c) != 0.0)).collect();
    let count = kept.len() as i64;
    let (index, values) = (dst.offset(SparsePanel::HEADER as isize) as *mut i32, dst.offset(SparsePanel::values_offset(count) as isize));
    *(dst as *mut i32) = count as i32;
    for (i, &p) in kept.iter().enumerate() {
        *index.add(i) = p as i32;
        for c in 0..nr {
            *values.offset(i as isize * nr as isize + c as isize) = if c < live { at(p, c) } else { 0.0 };
        }
    }
    SparsePanel::values_offset(count) + count * nr
}

/// Packs columns [c0, c0 + nr) × all of k of B as sparse rows (`SparseRows`): each live
/// column's runs of `block` k (starting at multiples of it) with a nonzero, their first k and
/// values (zeros past k); columns past n keep no runs. Returns the floats written.
unsafe fn pack_sparse_b_rows(b: &GemmOperand, src: *const f32, n: i64, k: i64, c0: i64, nr: i64, block: i64, dst: *mut f32) -> i64 {
    let live = (n - c0).clamp(0, nr);
    let layout = SparseRows { k, nr, block };
    let header = dst as *mut i32;
    let mut at_float = SparseRows::HEADER;
    for c in 0..nr {
        let value = |p: i64| if p < k { *src.offset((p * b.rows + (c0 + c) * b.cols) as isize) } else { 0.0 };
        let runs: Vec<i64> = (0..layout.runs()).map(|r| r * block).filter(|&p0| c < live && (p0..p0 + block).any(|p| value(p) != 0.0)).collect();
        let column = dst.offset(at_float as isize);
        *header.offset(c as isize) = runs.len() as i32;
        *header.offset((nr + c) as isize) = at_float as i32;
        let values = column.add(runs.len());
        for (i, &p0) in runs.iter().enumerate() {
            *(column as *mut i32).add(i) = p0 as i32;
            for j in 0..block {
                *values.offset((i as i64 * block + j) as isize) = value(p0 + j);
            }
        }
        at_float += runs.len() as i64 * (1 + block);
    }
    at_float
}

/// Packs a sparse B (`src` at its first element) whole, in its format: the panel table, then
/// each panel where the last one ended (`kernels::sparse::table_elems`).
unsafe fn pack_sparse_b(s: &GemmShape, format: SparseFormat, src: *const f32, dst: *mut f32) {
    let np = s.n_panels();
    let mut at = table_elems(np);
    for jp in 0..np {
        *(dst as *mut i64).offset(jp as isize) = at;
        let panel = dst.offset(at as isize);
        let c0 = jp * s.tile.nr;
        let used = match format {
            SparseFormat::Panels(_) => pack_sparse_b_panel(&s.b, src, s.n, s.k, c0, s.tile.nr, panel),
            SparseFormat::Rows(block) => pack_sparse_b_rows(&s.b, src, s.n, s.k, c0, s.tile.nr, block, panel),
            SparseFormat::InCode { .. } => unreachable!("a weight in code runs without packing (`run`)"),
        };
        at += padded(used);
    }
    assert!(at <= s.packed_b_elems(), "a sparse B past its buffer");
}

/// Column panel `jp` of a sparse B packed by `pack_sparse_b`.
unsafe fn sparse_panel(packed: *const f32, jp: i64) -> *const f32 {
    packed.offset(*(packed as *const i64).offset(jp as isize) as isize)
}

/// Whether any element of A (every batch) is an inf or a NaN: then a B zero that sparse
/// panels skip would have made a NaN (`DENSE_B`). (Exponent bits all set, or-ed over a row
/// without an early exit: the loop over a contiguous row vectorises.)
unsafe fn a_has_non_finite(s: &GemmShape, a_src: *const f32) -> bool {
    const EXPONENT: u32 = 0x7f80_0000;
    let non_finite = |x: f32| (x.to_bits() & EXPONENT == EXPONENT) as u32;
    let a_count = if s.a.batch_invariant() { 1 } else { s.batch_count() };
    let mut coords = [0i64; MAX_BATCH_DIMS];
    (0..a_count).any(|bi| {
        let base = a_src.offset(batch_offset(&s.batch, &s.a.batch_strides, bi, &mut coords[..s.batch.len()]) as isize);
        (0..s.m).any(|r| {
            let row = base.offset((r * s.a.rows) as isize);
            let found = if s.a.cols == 1 {
                std::slice::from_raw_parts(row, s.k as usize).iter().fold(0, |acc, &x| acc | non_finite(x))
            } else {
                (0..s.k).fold(0, |acc, p| acc | non_finite(*row.offset((p * s.a.cols) as isize)))
            };
            found != 0
        })
    })
}

/// Splits `0..n` into `parts` contiguous runs and returns run `p`.
pub(crate) fn run_of(n: i64, parts: usize, p: usize) -> (i64, i64) {
    let chunk = (n + parts as i64 - 1) / parts as i64;
    ((p as i64 * chunk).min(n), ((p as i64 + 1) * chunk).min(n))
}

/// Packs a batch-invariant B (a weight) whole: the layout `run` packs B into.
///
/// # Safety
/// `src` is B's buffer, laid out as `s.b` says; `dst` writable for `s.packed_b_elems()` floats.
pub unsafe fn pack_b(s: &GemmShape, src: *const f32, dst: *mut f32) {
    debug_assert!(s.b.batch_invariant());
    if s.quant.is_some() {
        return crate::runtime::qgemm::pack_b(s, src as *const i32, dst as *mut i32);
    }
    match s.sparse_b {
        Some(SparseFormat::InCode { key, .. }) => *dst = if is_weight(s, src.offset(s.b.offset as isize), key) { 1.0 } else { 0.0 },
        Some(format) => pack_sparse_b(s, format, src.offset(s.b.offset as isize), dst),
        None => pack_b_panels(s, src.offset(s.b.offset as isize), dst, 0, s.n_panels()),
    }
}

/// Whether B (`src` at its first element) is the weight whose values are in the code: W =
/// Bᵀ, n × k, hashed as the frontend hashed it (`weights_in_code::key_of`).
unsafe fn is_weight(s: &GemmShape, src: *const f32, key: crate::kernels::weights_in_code::WeightKey) -> bool {
    let same = crate::kernels::weights_in_code::key_of(s.n, s.k, |r, c| *src.offset((c * s.b.rows + r * s.b.cols) as isize)) == key;
    crate::kernels::weights_in_code::note_check(key, same);
    same
}

/// Packs column panels [lo, hi) of a batch-invariant B (`src` at B's first element) into
/// their places in `dst`.
unsafe fn pack_b_panels(s: &GemmShape, src: *const f32, dst: *mut f32, lo: i64, hi: i64) {
    for jp in lo..hi {
        pack_b_panel(&s.b, src, s.n, s.k, jp * s.tile.nr, s.tile.nr, dst.offset((jp * s.tile.nr * s.k) as isize));
    }
}

/// Runs one GEMM kernel of a program. `prepacked_b`: B already packed (by [`pack_b`], from
/// this call's data); B's packing is then skipped.
///
/// # Safety
/// `table` is the program's buffer table, filled for this call, with the operands laid out as
/// `s` says; `scratch` is writable for `s.scratch_elems()` floats, 64-byte aligned.
pub unsafe fn run(s: &GemmShape, ukr: MicrokernelFn, table: *const *mut u8, scratch: *mut f32, prepacked_b: Option<*const f32>) {
    if let Some(w) = &s.im2col {
        return run_im2col(s, w, ukr, table, scratch, prepacked_b);
    }
    if s.quant.is_some() {
        return crate::runtime::qgemm::run(s, ukr, table, scratch, prepacked_b);
    }
    let tile = s.tile;
    let (mp, np) = (s.m_panels(), s.n_panels());
    let batches = s.batch_count();
    let tiles = batches * mp * np;
    if tiles == 0 {
        return;
    }
    let a_src = (*table.add(s.a.buf.0 as usize) as *const f32).offset(s.a.offset as isize);
    let b_src = (*table.add(s.b.buf.0 as usize) as *const f32).offset(s.b.offset as isize);
    let pa = scratch;
    // A sparse B unless A holds an inf or a NaN: then B is packed dense for this call (the
    // scratch has room: a sparse panel is larger than a dense one). A weight in code runs
    // only where the kept copy says B is that weight (`pack_b`); else B is packed dense too.
    let other_weight = matches!(s.sparse_b, Some(SparseFormat::InCode { .. })) && !prepacked_b.is_some_and(|p| *p == 1.0);
    let dense_b = s.sparse_b.is_some() && (other_weight || a_has_non_finite(s, a_src));
    let prepacked_b = prepacked_b.filter(|_| !dense_b);
    let format = s.sparse_b.filter(|_| !dense_b);
    let flags = if dense_b { DENSE_B } else { 0 };
    let pb = prepacked_b.map_or(scratch.offset(s.packed_b_offset() as isize), |p| p as *mut f32);
    let a_count = if s.a.batch_invariant() { 1 } else { batches };
    let b_count = if s.b.batch_invariant() { 1 } else { batches };
    let (a_panel, b_panel) = (s.a_panel_elems(), tile.nr * s.k);
    let parts = if s.flops() < PARALLEL_MIN_FLOPS { 1 } else { parallel::threads().min(tiles as usize) };
    let shared = Shared((a_src, b_src, pa, pb, table));

    // A sparse B not kept packed (its panels' places depend on the data: one pass), here.
    // (A weight in code is kept: its verdict.)
    if let (Some(format), None) = (format, prepacked_b) {
        pack_sparse_b(s, format, b_src, pb);
    }
    // Packing: A's panels, then dense B's, split evenly across the threads.
    let b_tasks = if prepacked_b.is_some() || format.is_some() { 0 } else { b_count * np };
    let pack_tasks = a_count * mp + b_tasks;
    // Packing a little (one row of A beside a kept weight) is not worth a parallel region.
    let pack_elems = a_count * mp * a_panel + b_tasks * b_panel;
    let pack_parts = if pack_elems < PARALLEL_MIN_PACK { 1 } else { parts };
    let pack = |p: usize| {
        let (a_src, b_src, pa, pb, _) = shared.get();
        let mut coords = [0i64; MAX_BATCH_DIMS];
        let coords = &mut coords[..s.batch.len()];
        let (lo, hi) = run_of(pack_tasks, pack_parts, p);
        for t in lo..hi {
            if t < a_count * mp {
                let (bi, ip) = (t / mp, t % mp);
                let off = batch_offset(&s.batch, &s.a.batch_strides, bi, coords);
                let dst = pa.offset((t * a_panel) as isize);
                match format {
                    Some(SparseFormat::InCode { lanes, .. }) => {
                        let row = crate::kernels::weights_in_code::a_row_elems(s.k, lanes);
                        pack_a_rows(&s.a, a_src.offset(off as isize), s.m, s.k, ip * tile.mr, tile.mr, row, dst)
                    }
                    _ => {
                        pack_a_panel(&s.a, a_src.offset(off as isize), s.m, s.k, ip * tile.mr, tile.mr, dst);
                        // Zeros past k, where a sparse run's last vector reads (`a_panel_elems`).
                        std::ptr::write_bytes(dst.offset((tile.mr * s.k) as isize), 0, (a_panel - tile.mr * s.k) as usize);
                    }
                }
            } else {
                let t = t - a_count * mp;
                let (bi, jp) = (t / np, t % np);
                let off = batch_offset(&s.batch, &s.b.batch_strides, bi, coords);
                pack_b_panel(&s.b, b_src.offset(off as isize), s.n, s.k, jp * tile.nr, tile.nr, pb.offset((t * b_panel) as isize));
            }
        }
    };
    let compute = |p: usize| {
        let (_, _, pa, pb, table) = shared.get();
        let mut coords = [0i64; MAX_BATCH_DIMS + 2];
        let nb = s.batch.len();
        let (lo, hi) = run_of(tiles, parts, p);
        for t in lo..hi {
            let (bi, rest) = (t / (mp * np), t % (mp * np));
            let (jp, ip) = (rest / mp, rest % mp);
            unflatten(&s.batch, bi, &mut coords[..nb]);
            coords[nb] = ip * tile.mr;
            coords[nb + 1] = jp * tile.nr;
            let a = pa.offset((((if a_count == 1 { 0 } else { bi }) * mp + ip) * a_panel) as isize);
            let b = match format {
                Some(SparseFormat::InCode { .. }) => pb,
                Some(_) => sparse_panel(pb, jp),
                None => pb.offset((((if b_count == 1 { 0 } else { bi }) * np + jp) * b_panel) as isize),
            };
            let rows = (s.m - ip * tile.mr).min(tile.mr);
            let cols = (s.n - jp * tile.nr).min(tile.nr);
            ukr(table, a, b, s.k, coords.as_ptr(), rows, cols, std::ptr::null(), std::ptr::null_mut(), flags);
        }
    };
    parallel::run(pack_parts, &pack);
    parallel::run(parts, &compute);
}

thread_local! {
    /// The row panel of a convolution's windows this thread is working on.
    static WINDOWS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Packs output pixels [r0, r0 + mr) × all of k of a convolution's windows over an image
/// copy (no padding left: `Im2col::over_copy`) as k × mr floats, zero past the last pixel.
/// k is (c, kh, kw) row-major, walked outermost so that each k step writes mr consecutive
/// floats.
unsafe fn pack_window_panel(w: &Im2col, src: *const f32, m: i64, r0: i64, mr: i64, dst: *mut f32) {
    const MAX: usize = MAX_WINDOW_ROWS as usize;
    assert!(mr <= MAX_WINDOW_ROWS && w.pad == [0, 0], "a tile of at most MAX_WINDOW_ROWS rows over a padded copy");
    let live = (m - r0).clamp(0, mr) as usize;
    let [_, sh, sw] = w.strides;
    let mut base = [0i64; MAX];
    for (r, b) in base.iter_mut().enumerate().take(live) {
        let q = r0 + r as i64;
        *b = (q / w.out_w) * w.stride[0] * sh + (q % w.out_w) * w.stride[1] * sw;
    }
    let mut d = dst;
    for &step in &w.steps() {
        let s = src.offset(step as isize);
        for r in 0..live {
            *d.add(r) = *s.offset(base[r] as isize);
        }
        std::ptr::write_bytes(d.add(live), 0, mr as usize - live);
        d = d.add(mr as usize);
    }
}

/// Copies image rows [lo, hi) of the padded copy (`Im2col::padded`; row r of image n is task
/// n · rows + r), images `per_image` floats apart: channels-last, zeros in the padding, and
/// zeros past the last row of each image (the slack that the last tile's dropped indices
/// read).
unsafe fn copy_padded_rows(w: &Im2col, src: *const f32, batch_stride: i64, dst: *mut f32, per_image: i64, lo: i64, hi: i64) {
    let [hp, wp] = w.padded();
    let c = w.channels;
    let [sc, sh, sw] = w.strides;
    for t in lo..hi {
        let (n, r) = (t / hp, t % hp);
        let row = dst.offset((n * per_image + r * wp * c) as isize);
        let ih = r - w.pad[0];
        if ih < 0 || ih >= w.in_size[0] {
            std::ptr::write_bytes(row, 0, (wp * c) as usize);
        } else {
            let s = src.offset((n * batch_stride + ih * sh) as isize);
            // The live columns [iw0, iw1) of the copy's row; zeros on either side.
            let iw0 = w.pad[1].min(wp);
            let iw1 = (w.pad[1] + w.in_size[1]).min(wp);
            std::ptr::write_bytes(row, 0, (iw0 * c) as usize);
            if sc <= sw {
                // Channels-last source: each pixel's channels are a contiguous run where sc = 1.
                for iw in iw0..iw1 {
                    let (d, sp) = (row.offset((iw * c) as isize), s.offset(((iw - w.pad[1]) * sw) as isize));
                    for ch in 0..c {
                        *d.offset(ch as isize) = *sp.offset((ch * sc) as isize);
                    }
                }
            } else {
                // NCHW source: read each channel's row along the image, write across pixels.
                for ch in 0..c {
                    let sp = s.offset((ch * sc) as isize);
                    for iw in iw0..iw1 {
                        *row.offset((iw * c + ch) as isize) = *sp.offset(((iw - w.pad[1]) * sw) as isize);
                    }
                }
            }
            std::ptr::write_bytes(row.offset((iw1 * c) as isize), 0, ((wp - iw1) * c) as usize);
        }
        if r == hp - 1 {
            let used = hp * wp * c;
            std::ptr::write_bytes(dst.offset((n * per_image + used) as isize), 0, (per_image - used) as usize);
        }
    }
}

/// A convolution: B (the weight) packed first (unless it is kept packed) and every image
/// copied padded and channels-last into the scratch (`copy_padded_rows`), then the output
/// in tasks of one row tile against every column panel (`Im2col::tiling`). Tiles read the
/// copy in place (direct convolution: `microkernel`'s `a_steps`); a tile short of a row's
/// end, or any tile of rows that fill their tiles badly, packs its windows first. The
/// windows are never packed whole (they are KH·KW times the image: 7 MB for a 3×3
/// convolution over 64 × 56 × 56). Long k runs in chunks (`GemmShape::k_chunks`).
unsafe fn run_im2col(s: &GemmShape, w: &Im2col, ukr: MicrokernelFn, table: *const *mut u8, scratch: *mut f32, prepacked_b: Option<*const f32>) {
    let tile = s.tile;
    let np = s.n_panels();
    let batches = s.batch_count();
    if batches * s.m == 0 || np == 0 {
        return;
    }
    let a_src = (*table.add(s.a.buf.0 as usize) as *const f32).offset(s.a.offset as isize);
    let b_src = (*table.add(s.b.buf.0 as usize) as *const f32).offset(s.b.offset as isize);
    let b_panel = tile.nr * s.k;
    let threads = parallel::threads();
    let pb = match prepacked_b {
        Some(p) => p,
        None => {
            let pb = scratch.offset(s.packed_b_offset() as isize);
            let parts = if np * b_panel < PARALLEL_MIN_PACK { 1 } else { threads.min(np as usize) };
            let shared = Shared((b_src, pb));
            parallel::run(parts, &|p| {
                let (b_src, pb) = shared.get();
                let (lo, hi) = run_of(np, parts, p);
                pack_b_panels(s, b_src, pb, lo, hi);
            });
            pb as *const f32
        }
    };
    // The padded copies.
    let copy = scratch.offset(s.image_copy_offset() as isize);
    let [hp, wp] = w.padded();
    let rows = batches * hp;
    let copy_parts = if rows * wp * w.channels < PARALLEL_MIN_PACK { 1 } else { threads.min(rows as usize) };
    let per_image = w.copy_elems(tile.mr);
    let shared = Shared((a_src, copy));
    parallel::run(copy_parts, &|p| {
        let (a_src, copy) = shared.get();
        let (lo, hi) = run_of(rows, copy_parts, p);
        copy_padded_rows(w, a_src, s.a.batch_strides[0], copy, per_image, lo, hi);
    });
    let over = w.over_copy();
    let tiling = w.tiling(tile.mr);
    let row_w = w.row_width(tile.mr);
    let per_row = (w.out_w + tile.mr - 1) / tile.mr;
    let row_tiles = w.row_tiles(tile.mr);
    let tasks = batches * row_tiles;
    let steps = over.steps();
    let (chunks, partial) = (s.k_chunks(), scratch.offset(s.partial_offset() as isize));
    let kc = (s.k + chunks - 1) / chunks;
    // Threads split the tiles, each reading all of B; or, where B is the larger operand (a
    // deep layer's weights against its small image), the column panels, each reading all
    // of the image copies and its part of B (where every tile is in place: a tile that packs
    // its windows would pack them once per thread).
    let split_columns = w.all_in_place(tile.mr) && np as usize >= threads && s.k * s.n > batches * per_image;
    let parts = match (s.flops() < PARALLEL_MIN_FLOPS, split_columns) {
        (true, _) => 1,
        (false, true) => threads.min(np as usize),
        (false, false) => threads.min(tasks as usize),
    };
    let shared = Shared((copy, pb, table, steps.as_ptr(), partial));
    parallel::run(parts, &|p| {
        let (copy, pb, table, steps, partial) = shared.get();
        WINDOWS.with(|buf| {
            let mut buf = buf.borrow_mut();
            let ((lo, hi), (jlo, jhi)) = if split_columns { ((0, tasks), run_of(np, parts, p)) } else { (run_of(tasks, parts, p), (0, np)) };
            let need = (tile.mr * s.k) as usize;
            if buf.len() < need {
                buf.resize(need, 0.0);
            }
            let pa = buf.as_mut_ptr();
            // Tile t: its batch, first index (in the row space the microkernel's epilogue
            // decodes: `Im2col::row_width` indices per output row), index count, and A.
            let tile_at = |t: i64| -> (i64, i64, i64, *const f32, *const i64) {
                let (bi, rt) = (t / row_tiles, t % row_tiles);
                let image = copy.offset((bi * per_image) as isize) as *const f32;
                let (q0, rows) = match tiling {
                    ConvTiling::WideRows => (rt * tile.mr, (w.out_h * row_w - rt * tile.mr).min(tile.mr)),
                    ConvTiling::PerRow => {
                        let (oh, ow0) = (rt / per_row, (rt % per_row) * tile.mr);
                        (oh * w.out_w + ow0, (w.out_w - ow0).min(tile.mr))
                    }
                    ConvTiling::Packed => (rt * tile.mr, (s.m - rt * tile.mr).min(tile.mr)),
                };
                // In place: wide rows always (the copy's slack covers the last tile); per
                // row, full tiles (a short one would read past its pixels).
                if tiling == ConvTiling::WideRows || (tiling == ConvTiling::PerRow && rows == tile.mr) {
                    let (oh, ow) = (q0 / row_w, q0 % row_w);
                    let at = (oh * w.stride[0] * wp + ow * w.stride[1]) * w.channels;
                    (bi, q0, rows, image.offset(at as isize), steps)
                } else {
                    pack_window_panel(&over, image, q0 + rows, q0, tile.mr, pa);
                    (bi, q0, rows, pa as *const f32, std::ptr::null())
                }
            };
            let cols_of = |jp: i64| (s.n - jp * tile.nr).min(tile.nr);
            if chunks == 1 {
                for t in lo..hi {
                    let (bi, q0, rows, a, a_steps) = tile_at(t);
                    for jp in jlo..jhi {
                        let coords = [bi, q0, jp * tile.nr];
                        ukr(table, a, pb.offset((jp * b_panel) as isize), s.k, coords.as_ptr(), rows, cols_of(jp), a_steps, std::ptr::null_mut(), 0);
                    }
                }
                return;
            }
            // Each chunk of k over this thread's tiles before the next; tile (t, jp)'s sums
            // are kept at its own place in the scratch (every pair is one thread's).
            let tile_elems = (tile.mr * tile.nr) as usize;
            for c in 0..chunks {
                let (k0, klen) = (c * kc, kc.min(s.k - c * kc));
                let flags = if c > 0 { FROM_PARTIAL } else { 0 } | if c + 1 < chunks { TO_PARTIAL } else { 0 };
                for jp in jlo..jhi {
                    let b = pb.offset((jp * b_panel + k0 * tile.nr) as isize);
                    for t in lo..hi {
                        let (bi, q0, rows, a, a_steps) = tile_at(t);
                        let part = partial.add((t * np + jp) as usize * tile_elems);
                        let coords = [bi, q0, jp * tile.nr];
                        ukr(table, a, b, klen, coords.as_ptr(), rows, cols_of(jp), a_steps.add(k0 as usize), part, flags);
                    }
                }
            }
        });
    });
}
