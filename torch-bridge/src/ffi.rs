//! The extern "C" functions the C++ shim calls, and the two it provides.
//!
//! Nothing here may unwind into C++: every entry point catches panics and answers "no"
//! (not supported / guard failed), which sends the call to TorchScript's own nodes.

use crate::aten::dtype_from_code;
use crate::runtime::RUNTIME;
use kiln_profiler::{Device, TensorView};
use std::ffi::{c_char, CStr};
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

unsafe fn views<'a>(t: *const KilnTensor, n: usize) -> Option<Vec<TensorView<'a>>> {
    let ts = if n == 0 { &[][..] } else { std::slice::from_raw_parts(t, n) };
    ts.iter()
        .map(|t| {
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
        })
        .collect()
}

fn guarded<T>(default: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(default)
}

/// 1 if the single node in `dump` can be compiled by Kiln, else 0 and the reason.
#[no_mangle]
pub unsafe extern "C" fn kiln_rs_node_supported(dump: *const c_char, len: usize, reason: *mut c_char, cap: usize) -> i32 {
    let dump = text(dump, len);
    let verdict = guarded(Err("internal error (panic) while checking".to_string()), || {
        crate::ts_dump::parse(dump).and_then(|r| crate::aten::lower(&r)).map(|_| ())
    });
    match verdict {
        Ok(()) => 1,
        Err(e) => {
            write_reason(&e, reason, cap);
            0
        }
    }
}

/// Compiles the region in `dump`; its group id, or -1 and the reason.
#[no_mangle]
pub unsafe extern "C" fn kiln_rs_prepare_group(dump: *const c_char, len: usize, reason: *mut c_char, cap: usize) -> i64 {
    let dump = text(dump, len);
    let result = guarded(Err("internal error (panic) while compiling".to_string()), || RUNTIME.prepare(dump).map(|g| g.id as i64));
    result.unwrap_or_else(|e| {
        write_reason(&e, reason, cap);
        -1
    })
}

/// 1 if the inputs match what group `id` was compiled for.
#[no_mangle]
pub unsafe extern "C" fn kiln_rs_guard(id: i64, inputs: *const KilnTensor, n: usize) -> i32 {
    guarded(0, || {
        let (Some(g), Some(views)) = (RUNTIME.group(id as usize), views(inputs, n)) else { return 0 };
        RUNTIME.guard(g, &views) as i32
    })
}

/// Runs group `id` on inputs its guard accepted; outputs are allocated by the caller with the
/// sizes and dtypes from `kiln_rs_output_spec`. 0 on success.
#[no_mangle]
pub unsafe extern "C" fn kiln_rs_run(id: i64, inputs: *const KilnTensor, n: usize, outputs: *const *mut u8, n_out: usize) -> i32 {
    guarded(1, || {
        let Some(g) = RUNTIME.group(id as usize) else { return 1 };
        if n != g.program.num_inputs || n_out != g.program.num_outputs {
            return 1;
        }
        let ins: Vec<*const u8> = (0..n).map(|i| (*inputs.add(i)).data as *const u8).collect();
        let outs = if n_out == 0 { &[][..] } else { std::slice::from_raw_parts(outputs, n_out) };
        g.program.run(&ins, outs);
        RUNTIME.count_run(g);
        0
    })
}

#[no_mangle]
pub extern "C" fn kiln_rs_output_count(id: i64) -> i64 {
    guarded(0, || RUNTIME.group(id as usize).map_or(0, |g| g.outputs.len() as i64))
}

/// Writes output `i`'s dtype and up to `cap` sizes; returns its rank.
#[no_mangle]
pub unsafe extern "C" fn kiln_rs_output_spec(id: i64, i: usize, dtype: *mut i32, sizes: *mut i64, cap: usize) -> i64 {
    guarded(0, || {
        let Some((code, s)) = RUNTIME.group(id as usize).and_then(|g| g.outputs.get(i)) else { return 0 };
        *dtype = *code;
        for (j, &n) in s.iter().take(cap).enumerate() {
            *sizes.add(j) = n;
        }
        s.len() as i64
    })
}

/// Records why a node stayed in TorchScript; returns the reason's id (the C++ side stamps it
/// on the node for `explain`).
#[no_mangle]
pub unsafe extern "C" fn kiln_rs_reason(kind: *const c_char, reason: *const c_char) -> i64 {
    guarded(-1, || {
        let kind = CStr::from_ptr(kind).to_string_lossy();
        let reason = CStr::from_ptr(reason).to_string_lossy();
        RUNTIME.note(&format!("{kind}: {reason}")) as i64
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
