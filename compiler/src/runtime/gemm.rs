//! The loops around the GEMM microkernel (`kernels::gemm::microkernel`): pack A into panels of
//! `mr` rows and B into panels of `nr` columns (k-major, zero past the edge), then run the
//! microkernel on every `mr × nr` tile of the output. Target-independent: the tile shape is
//! data from the program.
//!
//! Blocking: each microkernel call takes the whole of k (no k blocking: the B panel,
//! k × nr floats, is 192 KB at k = 1024 and stays in L2 while a thread walks its tiles down
//! one panel; the A panels stream from L2/L3). Threads split the tiles in contiguous runs in
//! (batch, column panel, row panel) order, so a thread reuses its B panel across the rows.

use crate::kernels::gemm::{GemmOperand, GemmShape};
use crate::runtime::parallel;

/// The microkernel's signature (see `kernels::gemm::microkernel`).
pub type MicrokernelFn = unsafe extern "C" fn(table: *const *mut u8, a_panel: *const f32, b_panel: *const f32, k: i64, coords: *const i64, rows: i64, cols: i64);

/// Below this many flops a GEMM runs on the calling thread: waking the pool costs more.
const PARALLEL_MIN_FLOPS: i64 = 1 << 18;

/// Below this many packed floats the packing runs on the calling thread.
const PARALLEL_MIN_PACK: i64 = 1 << 15;

/// The most batch dims a GEMM has (the lowering refuses more).
pub const MAX_BATCH_DIMS: usize = 8;

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
            ukr(table, a, b, s.k, coords.as_ptr(), rows, cols);
        }
    };
    parallel::run(pack_parts, &pack);
    parallel::run(parts, &compute);
}
