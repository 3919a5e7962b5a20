//! The loops around the GEMM microkernel (`kernels::gemm::microkernel`): pack A into panels of
//! `mr` rows and B into panels of `nr` columns (k-major, zero past the edge), then run the
//! microkernel on every `mr × nr` tile of the output. Target-independent: the tile shape is
//! data from the program.
//!
//! Blocking: each microkernel call takes the whole of k (no k blocking: the B panel,
//! k × nr floats, is 192 KB at k = 1024 and stays in L2 while a thread walks its tiles down
//! one panel; the A panels stream from L2/L3). Threads split the tiles in contiguous runs in
//! (batch, column panel, row panel) order, so a thread reuses its B panel across the rows.

use crate::kernels::gemm::{GemmOperand, GemmShape, Im2col};
use crate::runtime::parallel;
use std::cell::RefCell;

/// The microkernel's signature (see `kernels::gemm::microkernel`).
pub type MicrokernelFn = unsafe extern "C" fn(table: *const *mut u8, a_panel: *const f32, b_panel: *const f32, k: i64, coords: *const i64, rows: i64, cols: i64, a_steps: *const i64);

/// Below this many flops a GEMM runs on the calling thread: waking the pool costs more.
const PARALLEL_MIN_FLOPS: i64 = 1 << 18;

/// Below this many packed floats the packing runs on the calling thread.
const PARALLEL_MIN_PACK: i64 = 1 << 15;

/// The most batch dims a GEMM has (the lowering refuses more).
pub const MAX_BATCH_DIMS: usize = 8;

/// The most rows a convolution's tile has (`GemmTile::for_columns` stays below).
pub const MAX_WINDOW_ROWS: i64 = 32;

struct Shared<T>(T);
// Raw pointers into buffers the caller vouches for for the duration of `run`; threads write
// disjoint panels and tiles.
unsafe impl<T> Sync for Shared<T> {}
impl<T: Copy> Shared<T> {
    fn get(&self) -> T {
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

/// Splits `0..n` into `parts` contiguous runs and returns run `p`.
fn run_of(n: i64, parts: usize, p: usize) -> (i64, i64) {
    let chunk = (n + parts as i64 - 1) / parts as i64;
    ((p as i64 * chunk).min(n), ((p as i64 + 1) * chunk).min(n))
}

/// Packs a batch-invariant B (a weight) whole: the layout `run` packs B into.
///
/// # Safety
/// `src` is B's buffer, laid out as `s.b` says; `dst` writable for `s.packed_b_elems()` floats.
pub unsafe fn pack_b(s: &GemmShape, src: *const f32, dst: *mut f32) {
    let src = src.offset(s.b.offset as isize);
    debug_assert!(s.b.batch_invariant());
    for jp in 0..s.n_panels() {
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
    let pb = prepacked_b.map_or(scratch.offset(s.packed_b_offset() as isize), |p| p as *mut f32);
    let a_count = if s.a.batch_invariant() { 1 } else { batches };
    let b_count = if s.b.batch_invariant() { 1 } else { batches };
    let (a_panel, b_panel) = (tile.mr * s.k, tile.nr * s.k);
    let parts = if s.flops() < PARALLEL_MIN_FLOPS { 1 } else { parallel::threads().min(tiles as usize) };
    let shared = Shared((a_src, b_src, pa, pb, table));

    // Packing: A's panels, then B's, split evenly across the threads.
    let b_tasks = if prepacked_b.is_some() { 0 } else { b_count * np };
    let pack_tasks = a_count * mp + b_tasks;
    // Packing a little (one row of A beside a kept weight) is not worth a parallel region.
    let pack_elems = a_count * mp * a_panel + if prepacked_b.is_some() { 0 } else { b_count * np * b_panel };
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
                pack_a_panel(&s.a, a_src.offset(off as isize), s.m, s.k, ip * tile.mr, tile.mr, pa.offset((t * a_panel) as isize));
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
            let b = pb.offset((((if b_count == 1 { 0 } else { bi }) * np + jp) * b_panel) as isize);
            let rows = (s.m - ip * tile.mr).min(tile.mr);
            let cols = (s.n - jp * tile.nr).min(tile.nr);
            ukr(table, a, b, s.k, coords.as_ptr(), rows, cols, std::ptr::null());
        }
    };
    parallel::run(pack_parts, &pack);
    parallel::run(parts, &compute);
}

thread_local! {
    /// The row panel of a convolution's windows this thread is working on.
    static WINDOWS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Packs output pixels [r0, r0 + mr) × all of k of a convolution's windows (the image's batch
/// offset applied) as k × mr floats, zero past the last pixel and in the padding. k is
/// (c, kh, kw) row-major, walked outermost so that each k step writes mr consecutive floats.
/// A panel whose windows all lie inside the image is copied without bounds checks, and where
/// its pixels are consecutive in one image row (stride 1, unit column stride: an NCHW
/// image) each k step is one contiguous copy.
unsafe fn pack_window_panel(w: &Im2col, src: *const f32, m: i64, r0: i64, mr: i64, dst: *mut f32) {
    const MAX: usize = MAX_WINDOW_ROWS as usize;
    assert!(mr <= MAX_WINDOW_ROWS, "a convolution tile of at most MAX_WINDOW_ROWS rows");
    let live = (m - r0).clamp(0, mr) as usize;
    let (mut ih0, mut iw0) = ([0i64; MAX], [0i64; MAX]);
    for r in 0..live {
        let q = r0 + r as i64;
        ih0[r] = (q / w.out_w) * w.stride[0] - w.pad[0];
        iw0[r] = (q % w.out_w) * w.stride[1] - w.pad[1];
    }
    let [sc, sh, sw] = w.strides;
    let (dh, dw) = (w.dilation[0], w.dilation[1]);
    let [h, wd] = w.in_size;
    let interior = (0..live).all(|r| ih0[r] >= 0 && ih0[r] + w.span(0) <= h && iw0[r] >= 0 && iw0[r] + w.span(1) <= wd);
    let mut d = dst;
    if interior {
        let mut base = [0i64; MAX];
        for r in 0..live {
            base[r] = ih0[r] * sh + iw0[r] * sw;
        }
        let run = live > 0 && ih0[live - 1] == ih0[0] && w.stride[1] * sw == 1;
        for c in 0..w.channels {
            for kh in 0..w.kernel[0] {
                for kw in 0..w.kernel[1] {
                    let s = src.offset((c * sc + kh * dh * sh + kw * dw * sw) as isize);
                    if run {
                        std::ptr::copy_nonoverlapping(s.offset(base[0] as isize), d, live);
                    } else {
                        for r in 0..live {
                            *d.add(r) = *s.offset(base[r] as isize);
                        }
                    }
                    std::ptr::write_bytes(d.add(live), 0, mr as usize - live);
                    d = d.add(mr as usize);
                }
            }
        }
        return;
    }
    for c in 0..w.channels {
        let s = src.offset((c * sc) as isize);
        for kh in 0..w.kernel[0] {
            for kw in 0..w.kernel[1] {
                for r in 0..live {
                    let (ih, iw) = (ih0[r] + kh * dh, iw0[r] + kw * dw);
                    let inside = ih >= 0 && ih < h && iw >= 0 && iw < wd;
                    *d.add(r) = if inside { *s.offset((ih * sh + iw * sw) as isize) } else { 0.0 };
                }
                std::ptr::write_bytes(d.add(live), 0, mr as usize - live);
                d = d.add(mr as usize);
            }
        }
    }
}

/// Whether a convolution's tiles run direct (A read from the image, `microkernel`): tiles
/// then hold pixels of one output row, so a row that fills them badly (7 pixels in tiles of
/// 6) would waste more than the packing costs.
fn runs_direct(w: &Im2col, mr: i64) -> bool {
    let per_row = (w.out_w + mr - 1) / mr;
    per_row * mr * 8 <= w.out_w * 9
}

/// A convolution: B (the weight) packed first (unless it is kept packed), then the output in
/// tasks of one row tile against every column panel. Direct tiles (`runs_direct`) read the
/// image in place where their windows lie inside it; every other tile packs its pixels'
/// windows into its thread's buffer first, writing the padding's zeros. The windows are
/// never packed whole (they are KH·KW times the image: 7 MB for a 3×3 convolution over
/// 64 × 56 × 56), nor is a padded image stored.
unsafe fn run_im2col(s: &GemmShape, w: &Im2col, ukr: MicrokernelFn, table: *const *mut u8, scratch: *mut f32, prepacked_b: Option<*const f32>) {
    let tile = s.tile;
    let np = s.n_panels();
    let batches = s.batch_count();
    let out_h = if w.out_w > 0 { s.m / w.out_w } else { 0 };
    let direct = runs_direct(w, tile.mr);
    // Row tiles per image: per output row when direct, else over the flattened pixels.
    let per_row = (w.out_w + tile.mr - 1) / tile.mr;
    let row_tiles = if direct { out_h * per_row } else { s.m_panels() };
    let tasks = batches * row_tiles;
    if tasks == 0 || np == 0 {
        return;
    }
    let a_src = (*table.add(s.a.buf.0 as usize) as *const f32).offset(s.a.offset as isize);
    let b_src = (*table.add(s.b.buf.0 as usize) as *const f32).offset(s.b.offset as isize);
    let b_panel = tile.nr * s.k;
    let pb = match prepacked_b {
        Some(p) => p,
        None => {
            let pb = scratch.offset(s.packed_b_offset() as isize);
            let parts = if np * b_panel < PARALLEL_MIN_PACK { 1 } else { parallel::threads().min(np as usize) };
            let shared = Shared((b_src, pb));
            parallel::run(parts, &|p| {
                let (b_src, pb) = shared.get();
                let (lo, hi) = run_of(np, parts, p);
                for jp in lo..hi {
                    pack_b_panel(&s.b, b_src, s.n, s.k, jp * tile.nr, tile.nr, pb.offset((jp * b_panel) as isize));
                }
            });
            pb as *const f32
        }
    };
    let steps = if direct { w.steps() } else { vec![] };
    let [sc, sh, sw] = w.strides;
    let _ = sc;
    let parts = if s.flops() < PARALLEL_MIN_FLOPS { 1 } else { parallel::threads().min(tasks as usize) };
    let shared = Shared((a_src, pb, table, steps.as_ptr()));
    parallel::run(parts, &|p| {
        let (a_src, pb, table, steps) = shared.get();
        WINDOWS.with(|buf| {
            let mut buf = buf.borrow_mut();
            let need = (tile.mr * s.k) as usize;
            if buf.len() < need {
                buf.resize(need, 0.0);
            }
            let pa = buf.as_mut_ptr();
            let mut coords = [0i64; 3];
            let (lo, hi) = run_of(tasks, parts, p);
            for t in lo..hi {
                let (bi, rt) = (t / row_tiles, t % row_tiles);
                let image = a_src.offset((bi * s.a.batch_strides[0]) as isize);
                // The tile's first pixel and its pixel count.
                let (q0, rows) = if direct {
                    let (oh, ow0) = (rt / per_row, (rt % per_row) * tile.mr);
                    (oh * w.out_w + ow0, (w.out_w - ow0).min(tile.mr))
                } else {
                    (rt * tile.mr, (s.m - rt * tile.mr).min(tile.mr))
                };
                let (ih0, iw0) = ((q0 / w.out_w) * w.stride[0] - w.pad[0], (q0 % w.out_w) * w.stride[1] - w.pad[1]);
                // In place: a full tile of one row whose windows lie inside the image (a
                // short tile would read past its pixels).
                let in_place = direct
                    && rows == tile.mr
                    && ih0 >= 0
                    && ih0 + w.span(0) <= w.in_size[0]
                    && iw0 >= 0
                    && iw0 + (rows - 1) * w.stride[1] + w.span(1) <= w.in_size[1];
                let (a, a_steps) = if in_place {
                    (image.offset((ih0 * sh + iw0 * sw) as isize), steps)
                } else {
                    pack_window_panel(w, image, q0 + rows, q0, tile.mr, pa);
                    (pa as *const f32, std::ptr::null())
                };
                coords[0] = bi;
                coords[1] = q0;
                for jp in 0..np {
                    coords[2] = jp * tile.nr;
                    let cols = (s.n - jp * tile.nr).min(tile.nr);
                    ukr(table, a, pb.offset((jp * b_panel) as isize), s.k, coords.as_ptr(), rows, cols, a_steps);
                }
            }
        });
    });
}
