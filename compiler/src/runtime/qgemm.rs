//! The loops around the int8 microkernel (`kernels::quantized`, `kernels::gemm::microkernel`):
//! per call, A's range and its quantization parameters, A quantized into row panels with
//! their row sums; B (a weight, usually packed once and kept) into column panels of int8
//! quads with their column sums; then the microkernel on every tile, threads splitting the
//! tiles as for float32 (`runtime::gemm`).
//!
//! The quantization runs on AVX2 + FMA vectors, the instructions fbgemm's `QuantizeAvx2`
//! uses, so that every element rounds as PyTorch's does (`kernels::quantized::quantize` is
//! the same arithmetic one element at a time, for the rows' last elements and the reference).

use crate::kernels::gemm::GemmShape;
use crate::kernels::quantized::{self, choose_activation_params, quads, QuantParams, A_HEADER};
use crate::runtime::gemm::{run_of, MicrokernelFn, Shared};
use crate::runtime::parallel;

/// Below this many multiply-adds the product runs on the calling thread.
const PARALLEL_MIN_MACS: i64 = 1 << 18;

/// Whether the host has what the vector paths below use (every x86 host Kiln's int8 code runs
/// on: the microkernel itself is AVX2).
fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// The smallest and largest of `len` floats from `src` (0, 0 for none).
unsafe fn row_min_max(src: *const f32, len: usize, acc: &mut Option<(f32, f32)>) {
    let xs = std::slice::from_raw_parts(src, len);
    let (mut lo, mut hi) = match *acc {
        Some(p) => p,
        None if len > 0 => (xs[0], xs[0]),
        None => return,
    };
    if has_avx2_fma() {
        let (l, h) = min_max_avx(xs);
        lo = if l < lo { l } else { lo };
        hi = if h > hi { h } else { hi };
    } else {
        for &x in xs {
            lo = if x < lo { x } else { lo };
            hi = if x > hi { x } else { hi };
        }
    }
    *acc = Some((lo, hi));
}

#[target_feature(enable = "avx2,fma")]
unsafe fn min_max_avx(xs: &[f32]) -> (f32, f32) {
    use std::arch::x86_64::*;
    let (mut lo, mut hi) = (xs[0], xs[0]);
    let chunks = xs.len() / 8;
    if chunks > 0 {
        let (mut vlo, mut vhi) = (_mm256_set1_ps(lo), _mm256_set1_ps(hi));
        for c in 0..chunks {
            let v = _mm256_loadu_ps(xs.as_ptr().add(c * 8));
            vlo = _mm256_min_ps(vlo, v);
            vhi = _mm256_max_ps(vhi, v);
        }
        let (mut l, mut h) = ([0f32; 8], [0f32; 8]);
        _mm256_storeu_ps(l.as_mut_ptr(), vlo);
        _mm256_storeu_ps(h.as_mut_ptr(), vhi);
        for i in 0..8 {
            lo = if l[i] < lo { l[i] } else { lo };
            hi = if h[i] > hi { h[i] } else { hi };
        }
    }
    for &x in &xs[chunks * 8..] {
        lo = if x < lo { x } else { lo };
        hi = if x > hi { x } else { hi };
    }
    (lo, hi)
}

/// A's range over all of it (rows of `k` floats, `row_stride` apart, columns `col_stride`).
/// A contiguous A is one run of floats, as fbgemm's `FindMinMax` reads the tensor: its vector
/// lanes then hold the same elements as fbgemm's, which matters for a NaN (`vminps` takes its
/// second operand: a NaN enters a lane and the next element replaces it; the lanes' final
/// comparison ignores it) — a strided A is made contiguous by PyTorch first.
unsafe fn a_range(src: *const f32, m: i64, k: i64, row_stride: i64, col_stride: i64) -> (f32, f32) {
    let mut acc = None;
    if col_stride == 1 && (row_stride == k || m == 1) {
        row_min_max(src, (m * k) as usize, &mut acc);
        return acc.unwrap_or((0.0, 0.0));
    }
    let mut row = vec![];
    for i in 0..m {
        let r = src.offset((i * row_stride) as isize);
        if col_stride == 1 {
            row_min_max(r, k as usize, &mut acc);
        } else {
            row.clear();
            row.extend((0..k).map(|p| *r.offset((p * col_stride) as isize)));
            row_min_max(row.as_ptr(), row.len(), &mut acc);
        }
    }
    acc.unwrap_or((0.0, 0.0))
}

/// `len` floats quantized into `dst` (fbgemm's rounding; see the module doc).
unsafe fn quantize_row(src: *const f32, len: usize, p: QuantParams, dst: &mut [u8]) {
    let (inv, zp) = (quantized::inverse(p.scale), p.zero_point as f32);
    let mut i = 0;
    if has_avx2_fma() {
        i = quantize_avx(src, len, inv, zp, dst);
    }
    for j in i..len {
        dst[j] = quantized::quantize(*src.add(j), inv, zp);
    }
}

/// The whole vectors of a row, as `QuantizeAvx2`: fma, capped below 2³¹, converted to nearest
/// even, clamped to 0..=255. Returns how many it did.
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_avx(src: *const f32, len: usize, inv: f32, zp: f32, dst: &mut [u8]) -> usize {
    use std::arch::x86_64::*;
    let (inv, zp, cap) = (_mm256_set1_ps(inv), _mm256_set1_ps(zp), _mm256_set1_ps(2147483520.0));
    let (lo, hi) = (_mm256_setzero_si256(), _mm256_set1_epi32(255));
    let chunks = len / 8;
    for c in 0..chunks {
        let x = _mm256_loadu_ps(src.add(c * 8));
        let t = _mm256_min_ps(_mm256_fmadd_ps(x, inv, zp), cap);
        let q = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(t), lo), hi);
        let mut words = [0i32; 8];
        _mm256_storeu_si256(words.as_mut_ptr() as *mut __m256i, q);
        for (d, w) in dst[c * 8..c * 8 + 8].iter_mut().zip(words) {
            *d = w as u8;
        }
    }
    chunks * 8
}

/// How A's float32 values become its uint8 ones, and what its panels' headers say (the
/// microkernel's offsets and scale).
#[derive(Clone, Copy)]
struct AQuantization {
    header: QuantParams,
    values: AValues,
}

#[derive(Clone, Copy)]
enum AValues {
    /// Quantized per call with its range's parameters (dynamic).
    Rounded(QuantParams),
    /// uint8 values already (static: a quantized tensor's, held as float32): converted.
    Exact,
}

/// Row `i` of A (k floats) into `out`: a row of the matrix, or a convolution's window of an
/// output pixel (`QuantizedWindows`: A's zero point outside the image).
unsafe fn a_row(s: &GemmShape, src: *const f32, i: i64, q: AQuantization, out: &mut [u8], strided: &mut Vec<f32>) {
    let k = s.k as usize;
    let Some(w) = s.quant.and_then(|q| q.windows) else {
        let data = contiguous(src.offset((i * s.a.rows) as isize), s.k, s.a.cols, strided);
        return a_run(data, k, q, &mut out[..k]);
    };
    let [oh_n, ow_n] = w.out_size;
    let (img, oh, ow) = (i / (oh_n * ow_n), i / ow_n % oh_n, i % ow_n);
    let c = w.channels as usize;
    // Channels-last rows: a window row's taps are one run of KW · C floats where it is inside
    // the image.
    let runs = w.strides[1] == 1 && w.strides[3] == w.channels && w.dilation[1] == 1;
    let mut at = 0;
    for kh in 0..w.kernel[0] {
        let ih = oh * w.stride[0] + kh * w.dilation[0] - w.pad[0];
        let iw0 = ow * w.stride[1] - w.pad[1];
        if runs && ih >= 0 && ih < w.in_size[0] && iw0 >= 0 && iw0 + w.kernel[1] <= w.in_size[1] {
            let len = c * w.kernel[1] as usize;
            let pixel = src.offset((img * w.strides[0] + ih * w.strides[2] + iw0 * w.strides[3]) as isize);
            a_run(pixel, len, q, &mut out[at..at + len]);
            at += len;
            continue;
        }
        for kw in 0..w.kernel[1] {
            let iw = ow * w.stride[1] + kw * w.dilation[1] - w.pad[1];
            let dst = &mut out[at..at + c];
            at += c;
            if ih < 0 || iw < 0 || ih >= w.in_size[0] || iw >= w.in_size[1] {
                dst.fill(q.header.zero_point as u8);
                continue;
            }
            let pixel = src.offset((img * w.strides[0] + ih * w.strides[2] + iw * w.strides[3]) as isize);
            a_run(contiguous(pixel, w.channels, w.strides[1], strided), c, q, dst);
        }
    }
}

/// `len` floats `stride` apart from `src`: in place where they are contiguous, else copied into
/// `scratch`.
unsafe fn contiguous(src: *const f32, len: i64, stride: i64, scratch: &mut Vec<f32>) -> *const f32 {
    if stride == 1 {
        return src;
    }
    scratch.clear();
    scratch.extend((0..len).map(|i| *src.offset((i * stride) as isize)));
    scratch.as_ptr()
}

/// `len` floats that are uint8 values already (a statically quantized tensor's: exact
/// integers 0..=255) as bytes.
unsafe fn convert_row(src: *const f32, len: usize, dst: &mut [u8]) {
    let mut i = 0;
    if has_avx2_fma() {
        i = convert_avx(src, len, dst);
    }
    for j in i..len {
        dst[j] = *src.add(j) as u8;
    }
}

/// A row of at least 8 in groups of 32, then of 8 (the last overlapping the one before):
/// conversions to int32, packed to int16 and then to uint8 (`vpackssdw`, `vpackuswb` work
/// within 128-bit halves: a permutation puts the groups of 4 back in order). Returns how many
/// it did.
#[target_feature(enable = "avx2")]
unsafe fn convert_avx(src: *const f32, len: usize, dst: &mut [u8]) -> usize {
    use std::arch::x86_64::*;
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let int = |at: usize| _mm256_cvttps_epi32(_mm256_loadu_ps(src.add(at)));
    let out = dst.as_mut_ptr();
    let mut i = 0;
    while i + 32 <= len {
        let (ab, cd) = (_mm256_packs_epi32(int(i), int(i + 8)), _mm256_packs_epi32(int(i + 16), int(i + 24)));
        let bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), order);
        _mm256_storeu_si256(out.add(i) as *mut __m256i, bytes);
        i += 32;
    }
    let eight = |at: usize| {
        let a = _mm256_packs_epi32(int(at), int(at));
        let bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(a, a), order);
        _mm_storel_epi64(out.add(at) as *mut __m128i, _mm256_castsi256_si128(bytes));
    };
    while i + 8 <= len {
        eight(i);
        i += 8;
    }
    // The last few again with the 8 before them (a window row's run of 21 is 8 + 8 + 8).
    if i < len && len >= 8 {
        eight(len - 8);
        i = len;
    }
    i
}

/// `len` floats of A into bytes: quantized (dynamic) or converted (static).
unsafe fn a_run(src: *const f32, len: usize, q: AQuantization, dst: &mut [u8]) {
    match q.values {
        AValues::Exact => convert_row(src, len, dst),
        AValues::Rounded(p) => quantize_row(src, len, p, dst),
    }
}

/// The sum of a row's bytes (`vpsadbw` against zero sums 8 bytes a lane).
unsafe fn byte_sum(xs: &[u8]) -> i32 {
    if has_avx2_fma() {
        return byte_sum_avx(xs);
    }
    xs.iter().map(|&x| x as i32).sum()
}

#[target_feature(enable = "avx2")]
unsafe fn byte_sum_avx(xs: &[u8]) -> i32 {
    use std::arch::x86_64::*;
    let (mut acc, zero) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    let chunks = xs.len() / 32;
    for c in 0..chunks {
        acc = _mm256_add_epi64(acc, _mm256_sad_epu8(_mm256_loadu_si256(xs.as_ptr().add(c * 32) as *const __m256i), zero));
    }
    let mut lanes = [0u64; 4];
    _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, acc);
    let tail: u64 = xs[chunks * 32..].iter().map(|&x| x as u64).sum();
    (lanes.iter().sum::<u64>() + tail) as i32
}

/// Packs and quantizes rows [r0, r0 + mr) of A into one panel (`kernels::quantized`: header,
/// then each row's k bytes and zeros to a whole quad; rows past the last zero).
unsafe fn pack_a_panel(s: &GemmShape, src: *const f32, q: AQuantization, r0: i64, dst: *mut i32, strided: &mut Vec<f32>) {
    let (mr, k) = (s.tile.mr, s.k as usize);
    let row_bytes = quads(s.k) as usize * 4;
    std::ptr::write_bytes(dst, 0, A_HEADER as usize);
    *dst = q.header.zero_point;
    *dst.add(1) = q.header.scale.to_bits() as i32;
    *dst.add(2) = k as i32;
    let bytes = dst.add(A_HEADER as usize) as *mut u8;
    for r in 0..mr {
        let row = std::slice::from_raw_parts_mut(bytes.add(r as usize * row_bytes), row_bytes);
        if r0 + r >= s.m {
            row.fill(0);
            continue;
        }
        a_row(s, src, r0 + r, q, &mut row[..k], strided);
        row[k..].fill(0);
        *dst.add(3 + r as usize) = byte_sum(&row[..k]);
    }
}

/// Packs column panel `jp` of B (int8 values held as int32): its column sums, then per quad
/// nr columns × 4 int8, zero past k and past the last column.
unsafe fn pack_b_panel(s: &GemmShape, src: *const i32, jp: i64, dst: *mut i32) {
    let (nr, k) = (s.tile.nr, s.k);
    std::ptr::write_bytes(dst, 0, quantized::b_panel_words(k, nr) as usize);
    let bytes = dst.add(nr as usize) as *mut i8;
    // B's element (p, j): a matrix's, or a convolution's weight [O, C, KH, KW] in its k order.
    let windows = s.quant.and_then(|q| q.windows);
    let at = |p: i64, j: i64| match windows {
        Some(w) => j * k + w.weight_offset(p),
        None => p * s.b.rows + j * s.b.cols,
    };
    for c in 0..nr.min(s.n - jp * nr) {
        let mut sum = 0i32;
        for p in 0..k {
            let w = *src.offset(at(p, jp * nr + c) as isize);
            sum = sum.wrapping_add(w);
            *bytes.add(((p / 4 * nr + c) * 4 + p % 4) as usize) = w as i8;
        }
        *dst.add(c as usize) = sum;
    }
}

/// Packs the whole of B (a weight): the layout `run` reads.
///
/// # Safety
/// `src` is B's buffer, laid out as `s.b` says; `dst` writable for `s.packed_b_elems()` words.
pub unsafe fn pack_b(s: &GemmShape, src: *const i32, dst: *mut i32) {
    let src = src.offset(s.b.offset as isize);
    for jp in 0..s.n_panels() {
        pack_b_panel(s, src, jp, dst.offset((jp * s.b_panel_elems()) as isize));
    }
}

/// Runs one int8 GEMM kernel. `prepacked_b`: B already packed by [`pack_b`] from this call's
/// data.
///
/// # Safety
/// As `runtime::gemm::run`.
pub unsafe fn run(s: &GemmShape, ukr: MicrokernelFn, table: *const *mut u8, scratch: *mut f32, prepacked_b: Option<*const f32>) {
    let (mp, np) = (s.m_panels(), s.n_panels());
    let tiles = mp * np;
    if tiles == 0 {
        return;
    }
    let a_src = (*table.add(s.a.buf.0 as usize) as *const f32).offset(s.a.offset as isize);
    let b_src = (*table.add(s.b.buf.0 as usize) as *const i32).offset(s.b.offset as isize);
    let params = match s.quant.and_then(|q| q.requantize) {
        Some(p) => AQuantization { header: p.a.params(), values: AValues::Exact },
        None => {
            let (lo, hi) = a_range(a_src, s.m, s.k, s.a.rows, s.a.cols);
            let p = choose_activation_params(lo, hi, s.quant.is_some_and(|q| q.reduce_range));
            AQuantization { header: p, values: AValues::Rounded(p) }
        }
    };
    let pa = scratch as *mut i32;
    let pb = prepacked_b.map_or(scratch.offset(s.packed_b_offset() as isize) as *mut i32, |p| p as *mut i32);
    let (a_panel, b_panel) = (s.a_panel_elems(), s.b_panel_elems());
    let macs = s.m * s.n * s.k;
    let parts = if macs < PARALLEL_MIN_MACS { 1 } else { parallel::threads().min(tiles as usize) };
    let b_tasks = if prepacked_b.is_some() { 0 } else { np };
    let pack_tasks = mp + b_tasks;
    // (A row or two with B packed already is one task: a second thread would only wait.)
    let pack_parts = parts.min(pack_tasks.max(1) as usize);
    let shared = Shared((a_src, b_src, pa, pb, table));
    let pack = |p: usize| {
        let (a_src, b_src, pa, pb, _) = shared.get();
        let mut strided = vec![];
        let (lo, hi) = run_of(pack_tasks, pack_parts, p);
        for t in lo..hi {
            if t < mp {
                pack_a_panel(s, a_src, params, t * s.tile.mr, pa.offset((t * a_panel) as isize), &mut strided);
            } else {
                let jp = t - mp;
                pack_b_panel(s, b_src, jp, pb.offset((jp * b_panel) as isize));
            }
        }
    };
    let compute = |p: usize| {
        let (_, _, pa, pb, table) = shared.get();
        let (lo, hi) = run_of(tiles, parts, p);
        let mut coords = [0i64; 2];
        for t in lo..hi {
            let (jp, ip) = (t / mp, t % mp);
            coords[0] = ip * s.tile.mr;
            coords[1] = jp * s.tile.nr;
            let rows = (s.m - ip * s.tile.mr).min(s.tile.mr);
            let cols = (s.n - jp * s.tile.nr).min(s.tile.nr);
            let a = pa.offset((ip * a_panel) as isize) as *const f32;
            let b = pb.offset((jp * b_panel) as isize) as *const f32;
            ukr(table, a, b, quads(s.k), coords.as_ptr(), rows, cols, std::ptr::null(), std::ptr::null_mut(), 0);
        }
    };
    parallel::run(pack_parts, &pack);
    parallel::run(parts, &compute);
}
