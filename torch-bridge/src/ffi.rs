//! The extern "C" functions the C++ shim calls, and the two it provides.
//!
//! Nothing here may unwind into C++: every entry point catches panics and answers "no"
//! (not supported / guard failed), which sends the call to TorchScript's own nodes.

use crate::aten::dtype_from_code;
use crate::runtime::RUNTIME;
use kiln_profiler::{Device, TensorView};
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
    pub defined: i32,
}

extern "C" {
    pub fn kiln_cpp_enable() -> i32;
    pub fn kiln_cpp_disable();
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

unsafe fn view<'a>(t: &KilnTensor) -> Option<TensorView<'a>> {
    if t.defined == 0 {
        return None;
    }
    let nd = t.ndim as usize;
    let slice = |p: *const i64| if nd == 0 { &[][..] } else { std::slice::from_raw_parts(p, nd) };
    Some(TensorView {
        dtype: dtype_from_code(t.dtype),
        device: if t.device == DEVICE_CPU { Device::Cpu } else { Device::Other(t.device) },
        sizes: slice(t.sizes),
        strides: slice(t.strides),
        requires_grad: t.requires_grad != 0,
    })
}

/// Calls `f` with views of the `n` tensors (None if one is undefined). Up to 16 tensors
/// live on the stack: this runs on every call of every group.
unsafe fn with_views<R>(t: *const KilnTensor, n: usize, f: impl FnOnce(Option<&[TensorView<'_>]>) -> R) -> R {
    const INLINE: usize = 16;
    let ts = if n == 0 { &[][..] } else { std::slice::from_raw_parts(t, n) };
    if n <= INLINE {
        let empty = TensorView { dtype: None, device: Device::Cpu, sizes: &[], strides: &[], requires_grad: false };
        let mut buf = [empty; INLINE];
        for (slot, t) in buf.iter_mut().zip(ts) {
            match view(t) {
                Some(v) => *slot = v,
                None => return f(None),
            }
        }
        f(Some(&buf[..n]))
    } else {
        let views: Option<Vec<TensorView>> = ts.iter().map(|t| view(t)).collect();
        f(views.as_deref())
    }
}

fn guarded<T>(default: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(default)
}

/// 1 if Kiln lowers some overload of the op `kind` (e.g. "aten::add").
#[no_mangle]
pub unsafe extern "C" fn kiln_rs_known_op(kind: *const c_char) -> i32 {
    let kind = CStr::from_ptr(kind).to_string_lossy();
    crate::aten::KINDS.contains(&kind.as_ref()) as i32
}

/// 1 if Kiln can take the single node in `dump` (or, where TorchScript did not profile its
/// inputs, knows the op and decides when it runs), else 0 and the reason.
#[no_mangle]
pub unsafe extern "C" fn kiln_rs_node_supported(dump: *const c_char, len: usize, reason: *mut c_char, cap: usize) -> i32 {
    let dump = text(dump, len);
    let verdict = guarded(Err("internal error (panic) while checking".to_string()), || {
        let region = crate::ts_dump::parse(dump)?;
        if region.inputs().all(Option::is_some) {
            return crate::aten::lower(&region).map(|_| ());
        }
        match region.node_kinds().first() {
            Some(kind) if crate::aten::KINDS.contains(&kind.as_str()) => Ok(()),
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
pub unsafe extern "C" fn kiln_rs_guard(id: i64, inputs: *const KilnTensor, n: usize) -> i32 {
    guarded(0, || {
        let Some(r) = RUNTIME.region(id as usize) else { return 0 };
        with_views(inputs, n, |views| views.is_some_and(|v| RUNTIME.guard(r, v)) as i32)
    })
}

/// Allocates output `index` (c10::ScalarType `dtype`, `ndim` sizes) and returns its data.
pub type AllocFn = unsafe extern "C" fn(ctx: *mut c_void, index: usize, dtype: i32, sizes: *const i64, ndim: usize) -> *mut u8;

/// Runs group `id` on inputs its guard accepted, allocating the outputs through `alloc`.
/// 0 on success; nonzero (nothing run) if no specialisation accepts the inputs.
#[no_mangle]
pub unsafe extern "C" fn kiln_rs_run(id: i64, inputs: *const KilnTensor, n: usize, alloc: AllocFn, ctx: *mut c_void) -> i32 {
    guarded(1, || {
        let Some(r) = RUNTIME.region(id as usize) else { return 1 };
        // Views are built only when the guard's choice is not at hand (the rare case).
        let chosen = RUNTIME.chosen_by_guard(r).or_else(|| with_views(inputs, n, |views| views.and_then(|v| RUNTIME.first_accepting(r, v))));
        let Some(spec) = chosen else { return 1 };
        let ts = if n == 0 { &[][..] } else { std::slice::from_raw_parts(inputs, n) };
        match &spec.symbolic {
            None => spec.program.run_with(
                |i| ts[i].data as *const u8,
                |i| {
                    let (dtype, sizes) = &spec.outputs[i];
                    alloc(ctx, i, *dtype, sizes.as_ptr(), sizes.len())
                },
            ),
            Some(run) => {
                // The guard passed: every symbol's dims agree, so its first one gives its value.
                let symbols = spec.guards.bind(|i, d| *ts[i].sizes.add(d));
                let symbols = &symbols[..spec.guards.symbols.len()];
                spec.program.run_symbolic(&run.shapes, symbols, |i| ts[i].data as *const u8, |i| {
                    let (dtype, dims) = &run.outputs[i];
                    let sizes: Vec<i64> = dims.iter().map(|m| m.eval(symbols)).collect();
                    alloc(ctx, i, *dtype, sizes.as_ptr(), sizes.len())
                })
            }
        }
        RUNTIME.count_run(&spec);
        0
    })
}

/// Records why a node stayed in TorchScript; returns the reason's id (the C++ side stamps it
/// on the node for `explain`).
#[no_mangle]
pub unsafe extern "C" fn kiln_rs_reason(kind: *const c_char, reason: *const c_char) -> i64 {
    guarded(-1, || {
        let kind = CStr::from_ptr(kind).to_string_lossy();
        let reason = CStr::from_ptr(reason).to_string_lossy();
        // Lowering errors already name the op they are about.
        let text = if reason.starts_with(&*kind) { reason.into_owned() } else { format!("{kind}: {reason}") };
        RUNTIME.note(&text) as i64
    })
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
