//! The extern "C" functions the C++ shim calls, and the two it provides.
//!
//! Nothing here may unwind into C++: every entry point catches panics and answers "no"
//! (not supported / guard failed), which sends the call to TorchScript's own nodes.

use crate::aten::dtype_from_code;
use crate::runtime::RUNTIME;
use kiln_profiler::{Device, GlobalState, TensorView};
use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// One tensor as the C++ side describes it; pointers borrow the TensorImpl's arrays.
#[repr(C)]
pub struct KilnTensor {
    pub data: *mut u8,
    pub sizes: *const i64,
    pub strides: *const i64,
    pub ndim: i64,
    pub dtype: i32,
    pub device: i32,
    pub requires_grad: i32,
    /// 0: generated code may read the tensor; else why not, a code of `refusal_reason` (the
    /// other fields are then unset).
    pub refusal: i32,
    /// The tensor's StorageImpl and version counter (-1: it has none), which name its data
    /// for packed copies kept between calls (`runtime::PackedWeights`).
    pub storage: *mut c_void,
    pub version: i64,
}

/// The state of one call besides its tensors, as the C++ side reads it (`call_state`).
#[repr(C)]
pub struct KilnCallState {
    pub default_dtype: i32,
    /// c10::ScalarType CPU autocast casts to; -1 when off.
    pub autocast: i32,
    /// 0, or why no Kiln code may run on this thread now (a code of `refusal_reason`).
    pub refusal: i32,
}

extern "C" {
    pub fn kiln_cpp_enable() -> i32;
    pub fn kiln_cpp_disable();
    fn kiln_cpp_dispatch_key_name(key: i32) -> *const c_char;
    fn kiln_cpp_scalar_type_name(code: i32) -> *const c_char;
    fn kiln_cpp_call_state(state: *mut KilnCallState);
    pub fn kiln_cpp_storage_hold(storage: *mut c_void);
    pub fn kiln_cpp_parallel(parts: usize, job: unsafe extern "C" fn(*const c_void, usize), ctx: *const c_void);
    pub fn kiln_cpp_torch_threads() -> i32;
    pub fn kiln_cpp_has_torch_pool() -> i32;
    pub fn kiln_cpp_storage_release(storage: *mut c_void);
}

/// libtorch's name of c10::ScalarType `code` (e.g. "BFloat16").
pub fn scalar_type_name(code: i32) -> String {
    // SAFETY: the C++ side returns a static string for any number.
    unsafe { CStr::from_ptr(kiln_cpp_scalar_type_name(code)) }.to_string_lossy().into_owned()
}

// Why the C++ side refused a tensor or a call: the numbers of `admission` and `call_state`
// in kiln_bridge.cpp.
const UNDEFINED: i32 = 1;
const WRAPPED_NUMBER: i32 = 2;
const NOT_CPU: i32 = 3;
const NOT_STRIDED: i32 = 4;
const NO_MEMORY: i32 = 5;
/// A call's: an optional argument the group was specialised on as None is not None.
const NOT_NONE: i32 = 6;
/// A dispatch key refused: this plus its c10::DispatchKey number.
const REFUSED_KEY: i32 = 1000;

/// The reason for refusal `code` of input `index` (None: the call's state).
pub fn refusal_reason(code: i32, index: Option<usize>) -> String {
    let what = index.map_or_else(String::new, |i| format!("input {i} "));
    match code {
        UNDEFINED => format!("{what}is not a tensor (undefined)"),
        WRAPPED_NUMBER => format!("{what}is a Python number turned tensor (it promotes like a scalar)"),
        NOT_CPU => format!("{what}is not on the CPU"),
        NOT_STRIDED => format!("{what}is not a strided tensor with storage (sparse, nested, mkldnn or storage-less)"),
        NO_MEMORY => format!("{what}has no memory behind its elements (a null data pointer or a storage smaller than the view)"),
        NOT_NONE => "an optional argument Kiln specialised as None is not None (e.g. an attention mask)".to_string(),
        c if c >= REFUSED_KEY => {
            // SAFETY: the C++ side returns a static string for any key number.
            let key = unsafe { CStr::from_ptr(kiln_cpp_dispatch_key_name(c - REFUSED_KEY)) }.to_string_lossy();
            let why = match key.as_ref() {
                "Python" | "PythonTLSSnapshot" if index.is_none() => "a TorchDispatchMode is active: eager hands each op to it".to_string(),
                "Python" | "PythonTLSSnapshot" => "is a tensor subclass or wrapper (Python dispatch key): its storage is not its data".to_string(),
                "ZeroTensor" => "is a ZeroTensor (no memory behind its elements)".to_string(),
                "Conjugate" => "has its conjugate bit set (a lazy conj() view)".to_string(),
                "Negative" => "has its negative bit set (a lazy negation, e.g. z.conj().imag)".to_string(),
                k if k.starts_with("FuncTorch") && index.is_none() => format!("inside a functorch transform (dispatch key {k})"),
                k if index.is_none() => format!("dispatch key {k} is included on this thread"),
                k => format!("carries dispatch key {k}: not a plain CPU tensor"),
            };
            format!("{what}{why}")
        }
        c => format!("{what}refused (code {c})"),
    }
}

unsafe fn text<'a>(p: *const c_char, len: usize) -> &'a str {
    std::str::from_utf8(std::slice::from_raw_parts(p as *const u8, len)).unwrap_or("")
}

unsafe fn write_reason(reason: &str, out: *mut c_char, cap: usize) {
    if out.is_null() || cap == 0 {
        return;
    }
    let n = reason.len().min(cap - 1);
    std::ptr::copy_nonoverlapping(reason.as_ptr(), out as *mut u8, n);
    *out.add(n) = 0;
}

/// c10::DeviceType::CPU is 0.
const DEVICE_CPU: i32 = 0;

/// A view of an admitted tensor.
unsafe fn view<'a>(t: &KilnTensor) -> TensorView<'a> {
    let nd = t.ndim as usize;
    let slice = |p: *const i64| if nd == 0 { &[][..] } else { std::slice::from_raw_parts(p, nd) };
    TensorView {
        dtype: dtype_from_code(t.dtype),
        device: if t.device == DEVICE_CPU { Device::Cpu } else { Device::Other(t.device) },
        sizes: slice(t.sizes),
        strides: slice(t.strides),
        requires_grad: t.requires_grad != 0,
    }
}

/// The call's global state, or the refusal code of a state no Kiln code may run under.
fn global_state(s: &KilnCallState) -> Result<GlobalState, i32> {
    if s.refusal != 0 {
        return Err(s.refusal);
    }
    let default_float = dtype_from_code(s.default_dtype).filter(|d| d.is_float()).ok_or(s.default_dtype);
    Ok(GlobalState { default_float, autocast: (s.autocast >= 0).then_some(s.autocast) })
}

/// Calls `f` with views of the `n` tensors, or says which one was refused and why (index,
/// refusal code). Up to 16 tensors live on the stack: this runs on every call of every
/// group.
unsafe fn with_views<R>(t: *const KilnTensor, n: usize, f: impl FnOnce(&[TensorView<'_>]) -> R) -> Result<R, (usize, i32)> {
    const INLINE: usize = 16;
    let ts = if n == 0 { &[][..] } else { std::slice::from_raw_parts(t, n) };
    if let Some(i) = ts.iter().position(|t| t.refusal != 0) {
        return Err((i, ts[i].refusal));
    }
    if n <= INLINE {
        let empty = TensorView { dtype: None, device: Device::Cpu, sizes: &[], strides: &[], requires_grad: false };
        let mut buf = [empty; INLINE];
        for (slot, t) in buf.iter_mut().zip(ts) {
            *slot = view(t);
        }
        Ok(f(&buf[..n]))
    } else {
        let views: Vec<TensorView> = ts.iter().map(|t| view(t)).collect();
        Ok(f(&views))
    }
}

fn guarded<T>(default: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(default)
}

/// 1 if Kiln lowers some overload of the op `kind` (e.g. "aten::add").
#[no_mangle]
pub unsafe extern "C" fn kiln_rs_known_op(kind: *const c_char) -> i32 {
    let kind = CStr::from_ptr(kind).to_string_lossy();
    crate::aten::is_known(&kind) as i32
}

/// 1 if Kiln can take the single node in `dump` (or, where TorchScript did not profile its
/// inputs, knows the op and decides when it runs), else 0 and the reason.
#[no_mangle]
pub unsafe extern "C" fn kiln_rs_node_supported(dump: *const c_char, len: usize, reason: *mut c_char, cap: usize) -> i32 {
    let dump = text(dump, len);
    let verdict = guarded(Err("internal error (panic) while checking".to_string()), || {
        let region = crate::ts_dump::parse(dump)?;
        if region.inputs().all(Option::is_some) {
            return crate::aten::lower_node(&region).map(|_| ());
        }
        // (The node asked about comes last: shape ops it reads come first.)
        match region.node_kinds().last() {
            Some(kind) if crate::aten::is_known(kind) => Ok(()),
            _ => Err("not an op Kiln supports yet".to_string()),
        }
    });
    match verdict {
        Ok(()) => 1,
        Err(e) => {
            write_reason(&e, reason, cap);
            0
        }
    }
}

/// The zeros of a constant float32 matrix (a frozen module's weight, element (r, c) at
/// `data[r · s0 + c · s1]`) as `WeightFacts` text in `out`: 1, or 0 where it has too few zeros
/// for a sparse kernel to pay (under a quarter: no blocks counted). A small one's values are
/// registered for code (`weights_in_code::register`) and its key is in the facts.
#[no_mangle]
pub unsafe extern "C" fn kiln_rs_weight_facts(data: *const f32, rows: i64, cols: i64, s0: i64, s1: i64, out: *mut c_char, cap: usize) -> i32 {
    guarded(0, || {
        if data.is_null() || rows <= 0 || cols <= 0 {
            return 0;
        }
        use kiln_compiler::kernels::sparse::WeightFacts;
        let mask = WeightFacts::nonzero_mask(data, rows, cols, s0, s1);
        let zeros = mask.iter().filter(|&&nonzero| !nonzero).count() as i64;
        if zeros * 4 < rows * cols {
            return 0;
        }
        let mut facts = WeightFacts::of_mask(&mask, rows, cols);
        // A weight small enough for its values to go into code is registered for it (by
        // content: the code is for these values only, `weights_in_code`).
        if facts.code_steps(kiln_compiler::kernels::gemm::host_lanes()) <= kiln_compiler::kernels::weights_in_code::MAX_STEPS {
            let values = (0..rows * cols).map(|i| *data.offset(((i / cols) * s0 + (i % cols) * s1) as isize)).collect();
            facts.key = Some(kiln_compiler::kernels::weights_in_code::register(rows, cols, values));
        }
        write_reason(&facts.to_text(), out, cap);
        1
    })
}

/// Registers the region in `dump` as a group; its id, or -1 and the reason.
#[no_mangle]
pub unsafe extern "C" fn kiln_rs_prepare_group(dump: *const c_char, len: usize, reason: *mut c_char, cap: usize) -> i64 {
    let dump = text(dump, len);
    let result = guarded(Err("internal error (panic) while preparing".to_string()), || RUNTIME.register(dump).map(|r| r.id as i64));
    result.unwrap_or_else(|e| {
        write_reason(&e, reason, cap);
        -1
    })
}

/// 1 if group `id` will run these inputs (compiling a specialisation for them if needed).
#[no_mangle]
pub unsafe extern "C" fn kiln_rs_guard(id: i64, inputs: *const KilnTensor, n: usize, state: *const KilnCallState) -> i32 {
    guarded(0, || {
        let Some(r) = RUNTIME.region(id as usize) else { return 0 };
        let state = match global_state(&*state) {
            Ok(s) => s,
            Err(code) => return RUNTIME.refuse(r, &refusal_reason(code, None)) as i32,
        };
        match with_views(inputs, n, |views| RUNTIME.guard(r, views, &state)) {
            Ok(ok) => ok as i32,
            Err((i, code)) => RUNTIME.refuse(r, &refusal_reason(code, Some(i))) as i32,
        }
    })
}

/// Allocates output `index` (c10::ScalarType `dtype`, `ndim` sizes and strides; null strides:
/// contiguous): 0 and its data in `*data`, or nonzero (the C++ side keeps the exception).
pub type AllocFn =
    unsafe extern "C" fn(ctx: *mut c_void, index: usize, dtype: i32, sizes: *const i64, strides: *const i64, ndim: usize, data: *mut *mut u8) -> i32;

/// Runs group `id` on inputs its guard accepted, allocating the outputs through `alloc`.
/// 0 on success; nonzero if nothing ran, with the reason in `error`: no specialisation
/// accepts the inputs (which the guard just checked: a bug), or memory ran out.
#[no_mangle]
pub unsafe extern "C" fn kiln_rs_run(
    id: i64,
    inputs: *const KilnTensor,
    n: usize,
    alloc: AllocFn,
    ctx: *mut c_void,
    error: *mut c_char,
    cap: usize,
) -> i32 {
    let result = guarded(Err("internal error (panic) while running".to_string()), || {
        let r = RUNTIME.region(id as usize).ok_or("unknown group")?;
        // Views are built only when the guard's choice is not at hand (the rare case).
        let chosen = RUNTIME.chosen_by_guard(r).or_else(|| {
            let mut state = KilnCallState { default_dtype: 0, autocast: -1, refusal: 0 };
            kiln_cpp_call_state(&mut state);
            let state = global_state(&state).ok()?;
            with_views(inputs, n, |views| RUNTIME.first_accepting(r, views, &state)).ok().flatten()
        });
        let spec = chosen.ok_or("compiled group called with inputs its guard rejects")?;
        let ts = if n == 0 { &[][..] } else { std::slice::from_raw_parts(inputs, n) };
        let data = |i: usize| ts[i].data as *const u8;
        let allocate = |i: usize, dtype: i32, sizes: &[i64], strides: Option<&[i64]>| {
            let mut out = std::ptr::null_mut();
            let strides = strides.map_or(std::ptr::null(), |s| s.as_ptr());
            (alloc(ctx, i, dtype, sizes.as_ptr(), strides, sizes.len(), &mut out) == 0).then_some(out)
        };
        // (An empty Vec allocates nothing: a program without weights pays nothing here.)
        let kept = if spec.weights.is_empty() { vec![] } else { spec.weights.for_call(&spec.program, ts) };
        let packed = |w: usize| kept.get(w).and_then(Option::as_ref).map(|b| b.as_ptr());
        let ran = match &spec.symbolic {
            None => {
                let output = |i: usize| {
                    let (dtype, sizes, strides) = &spec.outputs[i];
                    allocate(i, *dtype, sizes, strides.as_deref())
                };
                spec.program.run_packed(data, output, &packed)
            }
            Some(run) => {
                // The guard passed: every symbol's dims agree, so its first one gives its value.
                let symbols = spec.guards.bind(|i, d| *ts[i].sizes.add(d));
                let symbols = &symbols[..spec.guards.symbols.len()];
                let output = |i: usize, sizes: &[i64], strides: Option<&[i64]>| allocate(i, run.outputs[i], sizes, strides);
                spec.program.run_symbolic(&run.shapes, symbols, data, output, &packed)
            }
        };
        ran.map_err(|e| e.to_string())?;
        RUNTIME.count_run(&spec);
        Ok(())
    });
    match result {
        Ok(()) => 0,
        Err(why) => {
            write_reason(&why, error, cap);
            1
        }
    }
}

/// Records why a node stayed in TorchScript; returns the reason's id (the C++ side stamps it
/// on the node for `explain`).
#[no_mangle]
pub unsafe extern "C" fn kiln_rs_reason(kind: *const c_char, reason: *const c_char, counted: i32) -> i64 {
    guarded(-1, || {
        let kind = CStr::from_ptr(kind).to_string_lossy();
        let reason = CStr::from_ptr(reason).to_string_lossy();
        // Lowering errors already name the op they are about.
        let text = if reason.starts_with(&*kind) { reason.into_owned() } else { format!("{kind}: {reason}") };
        (if counted != 0 { RUNTIME.note(&text) } else { RUNTIME.reason_id(&text) }) as i64
    })
}

/// Registers a block's fallbacks (`n` reason ids, one per node left in TorchScript): the id
/// of its marker, which counts them when the block first runs.
#[no_mangle]
pub unsafe extern "C" fn kiln_rs_fallback_block(reasons: *const i64, n: usize) -> i64 {
    guarded(-1, || {
        let ids = std::slice::from_raw_parts(reasons, n).iter().map(|&i| i as usize).collect();
        RUNTIME.fallback_block(ids) as i64
    })
}

#[no_mangle]
pub unsafe extern "C" fn kiln_rs_fallback_block_ran(marker: i64) {
    guarded((), || RUNTIME.fallback_block_ran(marker as usize))
}

#[no_mangle]
pub unsafe extern "C" fn kiln_rs_pass_started() {
    RUNTIME.count_pass_run();
}

/// The pass hit an exception and left the graph as it was.
#[no_mangle]
pub unsafe extern "C" fn kiln_rs_pass_error(what: *const c_char) {
    let what = CStr::from_ptr(what).to_string_lossy();
    guarded((), || {
        RUNTIME.note(&format!("pass error: {what}"));
    });
}
