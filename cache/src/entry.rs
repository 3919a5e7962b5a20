//! One cache entry as bytes: a header that says what the code was built for, the program
//! image, and a blake3 checksum of everything before it.
//!
//! ```text
//! "KILNCODE" | format: u32 | header length: u32 | header | body length: u64 | body | blake3: 32 bytes
//! header: text lines "field value"  (key, kiln, llvm, triple, cpu, features)
//! body:   text lines "arena N" "inputs N" "outputs N" "buffer DTYPE input|output|temp N SIZES ORDER"
//!         per kernel "kernel NAME SYMBOL EXTENT PARALLEL WORK [BUFFERS]", maybe "gemm …", and
//!         "object LEN"; then "loop_ir LEN"; each LEN followed by LEN raw bytes
//! ```
//! Nothing is trusted before the checksum matches, and nothing is loaded unless every header
//! field equals this process's: a truncated, corrupted, foreign-version or foreign-CPU entry is
//! an [`EntryError`], never code.

use crate::CacheKey;
use kiln_compiler::lower::{BufferDecl, BufferKind};
use kiln_compiler::kernels::gemm::{GemmOperand, GemmShape, GemmTile, Im2col};
use kiln_compiler::kernels::quantized::ProductSums;
use kiln_compiler::kernels::sparse::SparseFormat;
use kiln_compiler::lower::loop_ir::BufId;
use kiln_compiler::runtime::program::KernelDecl;
use kiln_compiler::{DType, ProgramImage, Target};

const MAGIC: &[u8; 8] = b"KILNCODE";
/// Bumped whenever the layout above or the kernels' calling convention changes; older
/// entries are then foreign. 3: kernels read the program's parameters after the buffers.
/// 4: buffers carry their layout order (outputs follow eager's layout). 6: GEMMs pack into
/// the runtime's scratch (no pack buffers). 7: an object per kernel, each kernel reading a
/// table of its own buffers.
pub const FORMAT: u32 = 9;
const CHECKSUM: usize = 32;

#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum EntryError {
    #[error("truncated ({0} bytes)")]
    Truncated(usize),
    #[error("not a Kiln cache entry")]
    NotAnEntry,
    #[error("entry format {0}, this Kiln reads format {FORMAT}")]
    Format(u32),
    #[error("checksum mismatch (the file is corrupted)")]
    Checksum,
    #[error("built for {field} {theirs:?}, this process has {ours:?}")]
    Foreign { field: &'static str, theirs: String, ours: String },
    #[error("malformed entry: {0}")]
    Malformed(String),
}

/// What the code in an entry was built for. An entry loads only where every field matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryHeader {
    pub key: String,
    pub kiln: String,
    pub llvm: String,
    pub triple: String,
    pub cpu: String,
    pub features: String,
}

impl EntryHeader {
    /// The header of an entry built here, now, for `key`.
    pub fn current(key: &CacheKey, target: &Target) -> EntryHeader {
        EntryHeader {
            key: key.hex(),
            kiln: kiln_compiler::VERSION.into(),
            llvm: kiln_compiler::codegen::target::LLVM_VERSION.into(),
            triple: target.triple.clone(),
            cpu: target.cpu.clone(),
            features: target.features.clone(),
        }
    }

    fn fields(&self) -> [(&'static str, &String); 6] {
        [("key", &self.key), ("kiln", &self.kiln), ("llvm", &self.llvm), ("triple", &self.triple), ("cpu", &self.cpu), ("features", &self.features)]
    }

    /// The first field where an entry built for `self` cannot run as `ours`.
    pub fn mismatch(&self, ours: &EntryHeader) -> Option<EntryError> {
        self.fields().into_iter().zip(ours.fields()).find(|((_, a), (_, b))| a != b).map(|((field, theirs), (_, ours))| EntryError::Foreign {
            field,
            theirs: theirs.clone(),
            ours: ours.clone(),
        })
    }
}

/// The bytes of an entry holding `image`.
pub fn encode(header: &EntryHeader, image: &ProgramImage) -> Vec<u8> {
    let mut head = String::new();
    for (field, value) in header.fields() {
        head.push_str(&format!("{field} {value}\n"));
    }
    let mut body = format!("arena {}\ninputs {}\noutputs {}\n", image.arena_bytes, image.num_inputs, image.num_outputs).into_bytes();
    for b in &image.buffers {
        let (kind, n) = match b.kind {
            BufferKind::Input(i) => ("input", i),
            BufferKind::Output(i) => ("output", i),
            BufferKind::Temp { offset } => ("temp", offset),
        };
        let list = |xs: Vec<String>| format!("[{}]", xs.join(","));
        let sizes = list(b.sizes.iter().map(i64::to_string).collect());
        let order = list(b.order.iter().map(usize::to_string).collect());
        body.extend(format!("buffer {} {kind} {n} {sizes} {order}\n", b.dtype).bytes());
    }
    let list = |xs: &[i64]| format!("[{}]", xs.iter().map(i64::to_string).collect::<Vec<_>>().join(","));
    for k in &image.kernels {
        let buffers: Vec<i64> = k.buffers.iter().map(|&b| b as i64).collect();
        body.extend(format!("kernel {} {} {} {} {} {}\n", k.name, k.symbol, k.extent, k.parallel as u8, k.work_per_iter, list(&buffers)).bytes());
        if let Some(g) = &k.gemm {
            let operand = |o: &GemmOperand| format!("{} {} {} {} {}", o.buf.0, o.offset, list(&o.batch_strides), o.rows, o.cols);
            let sparse = g.sparse_b.map_or(String::new(), |f| format!(" {f}"));
            let line = format!("gemm {} {} {} {} {} {} {} {}{sparse}\n", list(&g.batch), g.m, g.n, g.k, operand(&g.a), operand(&g.b), g.tile.mr, g.tile.nr);
            body.extend(line.bytes());
            if let Some(q) = &g.quant {
                let bias = q.bias.map_or(String::new(), |b| format!(" {}", b.0));
                body.extend(format!("quant {} {} {} {} {}{bias}\n", q.scale.0, q.zero_point.0, q.per_column as u8, q.reduce_range as u8, q.sums.name()).bytes());
                if let Some(p) = &q.requantize {
                    body.extend(format!("requantize {} {} {} {} {}\n", p.a.scale_bits, p.a.zero_point, p.out.scale_bits, p.out.zero_point, p.relu as u8).bytes());
                }
                if let Some(w) = &q.windows {
                    let mut nums = vec![w.channels];
                    for pair in [w.kernel, w.out_size, w.in_size, w.pad, w.stride, w.dilation] {
                        nums.extend(pair);
                    }
                    nums.extend(w.strides);
                    body.extend(format!("qwindows {}\n", nums.iter().map(i64::to_string).collect::<Vec<_>>().join(" ")).bytes());
                }
            }
            if let Some(w) = &g.im2col {
                let mut nums = vec![w.channels, w.out_h, w.out_w];
                for pair in [w.kernel, w.in_size, w.pad, w.stride, w.dilation] {
                    nums.extend(pair);
                }
                nums.extend(w.strides);
                let line = format!("im2col {}\n", nums.iter().map(i64::to_string).collect::<Vec<_>>().join(" "));
                body.extend(line.bytes());
            }
        }
        body.extend(format!("object {}\n", k.object.len()).bytes());
        body.extend_from_slice(&k.object);
    }
    body.extend(format!("loop_ir {}\n", image.loop_ir.len()).bytes());
    body.extend_from_slice(image.loop_ir.as_bytes());
    let mut out = Vec::with_capacity(head.len() + body.len() + 64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT.to_le_bytes());
    out.extend_from_slice(&(head.len() as u32).to_le_bytes());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// The header of an entry, after checking its framing and checksum.
pub fn read_header(bytes: &[u8]) -> Result<EntryHeader, EntryError> {
    let (head, _) = split(bytes)?;
    parse_header(head)
}

/// The program image of an entry built for exactly `ours`.
pub fn decode(bytes: &[u8], ours: &EntryHeader) -> Result<ProgramImage, EntryError> {
    let (head, body) = split(bytes)?;
    if let Some(e) = parse_header(head)?.mismatch(ours) {
        return Err(e);
    }
    parse_body(body).map_err(EntryError::Malformed)
}

/// Header and body of a well-framed entry whose checksum matches.
fn split(bytes: &[u8]) -> Result<(&[u8], &[u8]), EntryError> {
    let truncated = || EntryError::Truncated(bytes.len());
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(if MAGIC.starts_with(bytes) { truncated() } else { EntryError::NotAnEntry });
    }
    let mut r = Reader { bytes, at: MAGIC.len() };
    let format = u32::from_le_bytes(r.take(4).ok_or_else(truncated)?.try_into().unwrap());
    if format != FORMAT {
        return Err(EntryError::Format(format));
    }
    let head_len = u32::from_le_bytes(r.take(4).ok_or_else(truncated)?.try_into().unwrap()) as usize;
    let head = r.take(head_len).ok_or_else(truncated)?;
    let body_len = u64::from_le_bytes(r.take(8).ok_or_else(truncated)?.try_into().unwrap());
    let body = r.take(usize::try_from(body_len).map_err(|_| truncated())?).ok_or_else(truncated)?;
    let end = r.at;
    let sum = r.take(CHECKSUM).ok_or_else(truncated)?;
    if r.at != bytes.len() {
        return Err(EntryError::Malformed(format!("{} bytes after the checksum", bytes.len() - r.at)));
    }
    if blake3::hash(&bytes[..end]).as_bytes() != sum {
        return Err(EntryError::Checksum);
    }
    Ok((head, body))
}

fn parse_header(head: &[u8]) -> Result<EntryHeader, EntryError> {
    let text = std::str::from_utf8(head).map_err(|_| EntryError::Malformed("header is not text".into()))?;
    let get = |want: &str| -> Result<String, EntryError> {
        text.lines()
            .find_map(|l| l.strip_prefix(want).and_then(|v| v.strip_prefix(' ')))
            .map(str::to_string)
            .ok_or_else(|| EntryError::Malformed(format!("header has no {want}")))
    };
    Ok(EntryHeader { key: get("key")?, kiln: get("kiln")?, llvm: get("llvm")?, triple: get("triple")?, cpu: get("cpu")?, features: get("features")? })
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len())?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Some(s)
    }

    fn line(&mut self) -> Result<&'a str, String> {
        let rest = &self.bytes[self.at..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or("unterminated line")?;
        self.at += n + 1;
        std::str::from_utf8(&rest[..n]).map_err(|_| "a line is not text".to_string())
    }
}

fn num<T: std::str::FromStr>(s: Option<&str>, what: &str) -> Result<T, String> {
    s.and_then(|s| s.parse().ok()).ok_or_else(|| format!("bad {what}"))
}

/// "[a,b,c]" as numbers.
fn list<T: std::str::FromStr>(s: Option<&str>, what: &str) -> Result<Vec<T>, String> {
    let items = s.and_then(|s| s.strip_prefix('[')).and_then(|s| s.strip_suffix(']')).ok_or_else(|| format!("bad {what}"))?;
    if items.is_empty() {
        return Ok(vec![]);
    }
    items.split(',').map(|d| num(Some(d), what)).collect()
}

fn parse_body(body: &[u8]) -> Result<ProgramImage, String> {
    let mut r = Reader { bytes: body, at: 0 };
    let mut image = ProgramImage { buffers: vec![], kernels: vec![], arena_bytes: 0, num_inputs: 0, num_outputs: 0, loop_ir: String::new() };
    loop {
        let line = r.line()?;
        let mut w = line.split(' ');
        match w.next() {
            Some("arena") => image.arena_bytes = num(w.next(), "arena")?,
            Some("inputs") => image.num_inputs = num(w.next(), "inputs")?,
            Some("outputs") => image.num_outputs = num(w.next(), "outputs")?,
            Some("buffer") => {
                let dtype = w.next().and_then(DType::parse).ok_or("bad buffer dtype")?;
                let kind = w.next();
                let n = num(w.next(), "buffer index")?;
                let kind = match kind {
                    Some("input") => BufferKind::Input(n),
                    Some("output") => BufferKind::Output(n),
                    Some("temp") => BufferKind::Temp { offset: n },
                    _ => return Err("bad buffer kind".into()),
                };
                let sizes = list(w.next(), "buffer sizes")?;
                let order = list(w.next(), "buffer order")?;
                image.buffers.push(BufferDecl { dtype, sizes, kind, order });
            }
            Some("kernel") => {
                let name = w.next().ok_or("kernel without a name")?.to_string();
                let symbol = w.next().ok_or("kernel without a symbol")?.to_string();
                let extent = num(w.next(), "kernel extent")?;
                let parallel = num::<u8>(w.next(), "kernel parallel flag")? == 1;
                let work_per_iter = num(w.next(), "kernel work")?;
                let buffers = list(w.next(), "kernel buffers")?;
                image.kernels.push(KernelDecl { name, symbol, object: Default::default(), buffers, extent, parallel, work_per_iter, gemm: None });
            }
            Some("gemm") => {
                let operand = |w: &mut std::str::Split<'_, char>, what: &str| -> Result<GemmOperand, String> {
                    let buf = BufId(num(w.next(), what)?);
                    let offset = num(w.next(), what)?;
                    Ok(GemmOperand { buf, offset, batch_strides: list(w.next(), what)?, rows: num(w.next(), what)?, cols: num(w.next(), what)? })
                };
                let batch = list(w.next(), "gemm batch")?;
                let (m, n, k) = (num(w.next(), "gemm m")?, num(w.next(), "gemm n")?, num(w.next(), "gemm k")?);
                let (a, b) = (operand(&mut w, "gemm operand a")?, operand(&mut w, "gemm operand b")?);
                // The vector width is the host's (the target, in the key, compiled this code),
                // except over a sparse B: its format's.
                let (mr, nr) = (num(w.next(), "gemm tile")?, num(w.next(), "gemm tile")?);
                let sparse_b = match w.next() {
                    None => None,
                    Some(f) => Some(SparseFormat::parse(f).ok_or("a gemm line with a bad B format")?),
                };
                let tile = GemmTile { mr, nr, lanes: sparse_b.map_or_else(kiln_compiler::kernels::gemm::host_lanes, |f| f.lanes()) };
                let kernel = image.kernels.last_mut().ok_or("a gemm line before any kernel")?;
                kernel.gemm = Some(GemmShape { batch, m, n, k, a, b, tile, im2col: None, sparse_b, quant: None });
            }
            Some("quant") => {
                let scale = BufId(num(w.next(), "quant scale buffer")?);
                let zero_point = BufId(num(w.next(), "quant zero point buffer")?);
                let per_column = num::<u8>(w.next(), "quant per-column flag")? == 1;
                let reduce_range = num::<u8>(w.next(), "quant range flag")? == 1;
                let sums = w.next().and_then(ProductSums::parse).ok_or("a quant line without its sums")?;
                let bias = match w.next() {
                    None => None,
                    Some(b) => Some(BufId(b.parse().map_err(|_| "a quant line with a bad bias buffer")?)),
                };
                let g = image.kernels.last_mut().and_then(|k| k.gemm.as_mut()).ok_or("a quant line before any gemm")?;
                g.quant = Some(kiln_compiler::kernels::quantized::QuantizedB { scale, zero_point, per_column, reduce_range, sums, bias, requantize: None, windows: None });
                g.tile.lanes = GemmTile::int8(g.m, g.n, sums).lanes;
            }
            Some("requantize") => {
                use kiln_compiler::kernels::quantized::{QuantParamBits, StaticProduct};
                let a = QuantParamBits { scale_bits: num(w.next(), "requantize")?, zero_point: num(w.next(), "requantize")? };
                let out = QuantParamBits { scale_bits: num(w.next(), "requantize")?, zero_point: num(w.next(), "requantize")? };
                let relu = num::<u8>(w.next(), "requantize relu")? == 1;
                let q = image.kernels.last_mut().and_then(|k| k.gemm.as_mut()).and_then(|g| g.quant.as_mut()).ok_or("a requantize line before any quant line")?;
                q.requantize = Some(StaticProduct { a, out, relu });
            }
            Some("qwindows") => {
                let mut next = || num::<i64>(w.next(), "qwindows");
                let channels = next()?;
                let mut pair = || -> Result<[i64; 2], String> { Ok([next()?, next()?]) };
                let (kernel, out_size, in_size, pad, stride, dilation) = (pair()?, pair()?, pair()?, pair()?, pair()?, pair()?);
                let strides = [next()?, next()?, next()?, next()?];
                let q = image.kernels.last_mut().and_then(|k| k.gemm.as_mut()).and_then(|g| g.quant.as_mut()).ok_or("a qwindows line before any quant line")?;
                q.windows = Some(kiln_compiler::kernels::quantized::QuantizedWindows { channels, kernel, out_size, in_size, pad, stride, dilation, strides });
            }
            Some("im2col") => {
                let mut next = || num::<i64>(w.next(), "im2col");
                let (channels, out_h, out_w) = (next()?, next()?, next()?);
                let mut pair = || -> Result<[i64; 2], String> { Ok([next()?, next()?]) };
                let (kernel, in_size, pad, stride, dilation) = (pair()?, pair()?, pair()?, pair()?, pair()?);
                let strides = [next()?, next()?, next()?];
                let g = image.kernels.last_mut().and_then(|k| k.gemm.as_mut()).ok_or("an im2col line before any gemm")?;
                g.im2col = Some(Im2col { channels, kernel, out_h, out_w, in_size, pad, stride, dilation, strides });
            }
            Some("object") => {
                let n = num(w.next(), "object length")?;
                let kernel = image.kernels.last_mut().ok_or("an object before any kernel")?;
                kernel.object = r.take(n).ok_or("object runs past the end")?.into();
            }
            Some("loop_ir") => {
                let n = num(w.next(), "loop_ir length")?;
                let text = r.take(n).ok_or("loop_ir runs past the end")?;
                image.loop_ir = String::from_utf8(text.to_vec()).map_err(|_| "loop_ir is not text")?;
                break;
            }
            _ => return Err(format!("unknown line {line:?}")),
        }
    }
    if r.at != body.len() {
        return Err("bytes after the loop IR".into());
    }
    check_consistent(&image)?;
    Ok(image)
}

/// The buffer table must be what the runtime can fill: every input and output exactly once,
/// temporaries inside the arena. (The checksum already rules out accidents; this keeps an
/// entry written by a buggy Kiln from making the runtime read out of bounds.)
fn check_consistent(image: &ProgramImage) -> Result<(), String> {
    let mut inputs = vec![0; image.num_inputs];
    let mut outputs = vec![0; image.num_outputs];
    for b in &image.buffers {
        let mut order = b.order.clone();
        order.sort_unstable();
        if !order.iter().copied().eq(0..b.sizes.len()) {
            return Err("a buffer's order is not a permutation of its dims".into());
        }
        match b.kind {
            BufferKind::Input(i) => *inputs.get_mut(i).ok_or("input index out of range")? += 1,
            BufferKind::Output(i) => *outputs.get_mut(i).ok_or("output index out of range")? += 1,
            BufferKind::Temp { offset } => {
                let elems = b.sizes.iter().try_fold(1i64, |a, &d| if d < 0 { None } else { a.checked_mul(d) }).ok_or("bad temporary sizes")?;
                let bytes = (elems as usize).checked_mul(b.dtype.size_bytes()).ok_or("temporary too large")?;
                if offset.checked_add(bytes).is_none_or(|end| end > image.arena_bytes) {
                    return Err("a temporary lies outside the arena".into());
                }
            }
        }
    }
    if inputs.iter().chain(&outputs).any(|&n| n != 1) {
        return Err("inputs and outputs must each have one buffer".into());
    }
    if image.kernels.is_empty() && image.num_outputs > 0 {
        return Err("no kernels".into());
    }
    for k in &image.kernels {
        if k.object.is_empty() || k.buffers.iter().any(|&b| b as usize >= image.buffers.len()) {
            return Err("a kernel without code, or handed a buffer the program lacks".into());
        }
        if let Some(g) = &k.gemm {
            check_gemm(image, k, g)?;
        }
    }
    Ok(())
}

/// A GEMM's description must keep the runtime's loops inside its buffers: operands float32
/// buffers of the program, sizes that are not negative, a tile the microkernel has.
fn check_gemm(image: &ProgramImage, k: &KernelDecl, g: &GemmShape) -> Result<(), String> {
    let buf = |b: BufId| k.buffers.get(b.0 as usize).and_then(|&b| image.buffers.get(b as usize)).ok_or_else(|| "a gemm buffer index out of range".to_string());
    let b_dtype = if g.quant.is_some() { DType::I32 } else { DType::F32 };
    for (o, dtype) in [(&g.a, DType::F32), (&g.b, b_dtype)] {
        if buf(o.buf)?.dtype != dtype || o.batch_strides.len() != g.batch.len() || o.offset < 0 {
            return Err("a gemm operand that is not a buffer of its dtype and of the batch's rank".into());
        }
    }
    if let Some(q) = &g.quant {
        let n = if q.per_column { g.n } else { 1 };
        let vector = |b: BufId, dtype: DType| buf(b).map(|d| d.dtype == dtype && d.sizes == [n]);
        let bias_ok = match q.bias {
            None => true,
            Some(b) => buf(b).map(|d| d.dtype == DType::F32 && d.sizes == [g.n])?,
        };
        if !bias_ok || !vector(q.scale, DType::F32)? || !vector(q.zero_point, DType::I32)? || g.tile != GemmTile::int8(g.m, g.n, q.sums) || !q.sums.runs_on(&Target::host()) || g.im2col.is_some() || g.sparse_b.is_some() || !g.batch.is_empty() {
            return Err("an int8 gemm with bad scales, zero points or tile".into());
        }
        if let Some(w) = &q.windows {
            let positive = [w.kernel, w.out_size, w.in_size, w.stride, w.dilation].iter().flatten().all(|&n| n > 0) && w.pad.iter().chain(&w.strides).all(|&n| n >= 0);
            let consistent = w.channels * w.kernel[0] * w.kernel[1] == g.k && g.m % (w.out_size[0] * w.out_size[1]) == 0 && q.requantize.is_some();
            let weight = buf(g.b.buf)?.sizes.iter().product::<i64>() == g.n * g.k;
            if !positive || !consistent || !weight {
                return Err("a quantized convolution's windows that do not match its gemm".into());
            }
        }
    }
    let sparse_ok = match g.sparse_b {
        None => true,
        Some(SparseFormat::Panels(l)) => g.im2col.is_none() && g.tile.nr == l && l <= kiln_compiler::kernels::gemm::host_lanes(),
        Some(SparseFormat::Rows(_)) => g.im2col.is_none() && g.tile == GemmTile::sparse_rows(),
        Some(SparseFormat::InCode { lanes, .. }) => g.im2col.is_none() && g.tile == GemmTile::in_code(g.tile.mr, lanes) && lanes <= kiln_compiler::kernels::gemm::host_lanes(),
    };
    if !sparse_ok {
        return Err("a sparse B of a bad format".into());
    }
    if g.tile.mr <= 0 || g.tile.nr <= 0 || g.tile.nr % g.tile.lanes != 0 || [g.m, g.n, g.k].iter().any(|&d| d < 0) || g.batch.iter().any(|&d| d < 0) || g.batch.len() > kiln_compiler::runtime::gemm::MAX_BATCH_DIMS {
        return Err("a gemm of bad sizes".into());
    }
    if let Some(w) = &g.im2col {
        let positive = [w.kernel, w.in_size, w.stride, w.dilation].iter().flatten().all(|&n| n > 0) && w.pad.iter().chain(&w.strides).all(|&n| n >= 0);
        let consistent = w.channels * w.kernel[0] * w.kernel[1] == g.k && w.out_w > 0 && w.out_h * w.out_w == g.m && g.batch.len() == 1;
        if !consistent || !positive || g.tile.mr > kiln_compiler::runtime::gemm::MAX_WINDOW_ROWS {
            return Err("a convolution's windows that do not match its gemm".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ProgramImage {
        ProgramImage {
            buffers: vec![
                BufferDecl { dtype: DType::F32, sizes: vec![4, 2], kind: BufferKind::Input(0), order: vec![0, 1] },
                BufferDecl { dtype: DType::F32, sizes: vec![8], kind: BufferKind::Temp { offset: 0 }, order: vec![0] },
                BufferDecl { dtype: DType::Bool, sizes: vec![3, 2], kind: BufferKind::Output(0), order: vec![1, 0] },
            ],
            kernels: vec![KernelDecl {
                name: "k0".into(),
                symbol: "kiln_kab".into(),
                object: (0..=255u8).collect::<Vec<u8>>().into(),
                buffers: vec![0, 2, 1],
                extent: 4,
                parallel: true,
                work_per_iter: 2,
                gemm: None,
            }],
            arena_bytes: 32,
            num_inputs: 1,
            num_outputs: 1,
            loop_ir: "for i in 0..4 {\n}\n".into(),
        }
    }

    fn header() -> EntryHeader {
        let t = Target { triple: "x86_64-unknown-linux-gnu".into(), cpu: "znver4".into(), features: "+avx512f,+fma".into() };
        EntryHeader::current(&CacheKey([7; 32]), &t)
    }

    #[test]
    fn round_trips() {
        let bytes = encode(&header(), &image());
        assert_eq!(decode(&bytes, &header()), Ok(image()));
        assert_eq!(read_header(&bytes), Ok(header()));
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let bytes = encode(&header(), &image());
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x20;
            assert!(decode(&bad, &header()).is_err(), "flipping byte {i} went unnoticed");
        }
    }

    #[test]
    fn every_truncation_is_detected() {
        let bytes = encode(&header(), &image());
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n], &header()).is_err(), "truncated to {n} bytes went unnoticed");
        }
        assert_eq!(decode(&bytes[..20], &header()), Err(EntryError::Truncated(20)));
    }

    #[test]
    fn foreign_entries_are_refused_by_field() {
        let bytes = encode(&header(), &image());
        let ours = |f: fn(&mut EntryHeader)| {
            let mut h = header();
            f(&mut h);
            decode(&bytes, &h).unwrap_err()
        };
        assert!(matches!(ours(|h| h.cpu = "skylake".into()), EntryError::Foreign { field: "cpu", .. }));
        assert!(matches!(ours(|h| h.features = "+avx2".into()), EntryError::Foreign { field: "features", .. }));
        assert!(matches!(ours(|h| h.kiln = "9.9.9".into()), EntryError::Foreign { field: "kiln", .. }));
        assert!(matches!(ours(|h| h.llvm = "20.1".into()), EntryError::Foreign { field: "llvm", .. }));
        assert!(matches!(ours(|h| h.key = "00".into()), EntryError::Foreign { field: "key", .. }));
    }

    #[test]
    fn other_formats_and_files_are_refused() {
        let mut bytes = encode(&header(), &image());
        bytes[8] = FORMAT as u8 + 1;
        assert_eq!(decode(&bytes, &header()), Err(EntryError::Format(FORMAT + 1)));
        assert_eq!(decode(b"\x7fELF\x02\x01\x01\0\0\0\0\0", &header()), Err(EntryError::NotAnEntry));
    }

    #[test]
    fn inconsistent_images_are_refused_even_with_a_good_checksum() {
        let mut bad = image();
        bad.buffers[1].sizes = vec![9];
        assert!(matches!(decode(&encode(&header(), &bad), &header()), Err(EntryError::Malformed(_))));
        let mut bad = image();
        bad.buffers.remove(0);
        assert!(matches!(decode(&encode(&header(), &bad), &header()), Err(EntryError::Malformed(_))));
        let mut bad = image();
        bad.buffers[2].order = vec![1, 1];
        assert!(matches!(decode(&encode(&header(), &bad), &header()), Err(EntryError::Malformed(_))));
        let mut bad = image();
        bad.kernels[0].buffers = vec![0, 3];
        assert!(matches!(decode(&encode(&header(), &bad), &header()), Err(EntryError::Malformed(_))));
    }
}
