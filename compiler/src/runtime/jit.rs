//! Loads object code into the process with LLVM's ORC LLJIT (one per process). Object files,
//! not IR, are the unit: the same path will load cached objects from disk without compiling.

use inkwell::llvm_sys::error::{LLVMDisposeErrorMessage, LLVMErrorRef, LLVMGetErrorMessage};
use inkwell::llvm_sys::orc2::lljit::*;
use inkwell::llvm_sys::orc2::*;
use once_cell::sync::{Lazy, OnceCell};
use std::collections::HashMap;
use std::sync::Mutex;
use std::ffi::{CStr, CString};

struct Jit(LLVMOrcLLJITRef);
// LLJIT is thread-safe for adding objects and looking up symbols.
unsafe impl Send for Jit {}
unsafe impl Sync for Jit {}

static JIT: OnceCell<Result<Jit, String>> = OnceCell::new();

fn check(err: LLVMErrorRef) -> Result<(), String> {
    if err.is_null() {
        return Ok(());
    }
    unsafe {
        let msg = LLVMGetErrorMessage(err);
        let s = CStr::from_ptr(msg).to_string_lossy().into_owned();
        LLVMDisposeErrorMessage(msg);
        Err(s)
    }
}

fn jit() -> Result<LLVMOrcLLJITRef, String> {
    JIT.get_or_init(|| unsafe {
        crate::codegen::target::Target::host(); // initialises the native target
        let mut j: LLVMOrcLLJITRef = std::ptr::null_mut();
        check(LLVMOrcCreateLLJIT(&mut j, LLVMOrcCreateLLJITBuilder()))?;
        // Resolve libm and friends (pow, erf, ...) from the process.
        let mut gen: LLVMOrcDefinitionGeneratorRef = std::ptr::null_mut();
        check(LLVMOrcCreateDynamicLibrarySearchGeneratorForProcess(&mut gen, LLVMOrcLLJITGetGlobalPrefix(j), None, std::ptr::null_mut()))?;
        LLVMOrcJITDylibAddGenerator(LLVMOrcLLJITGetMainJITDylib(j), gen);
        Ok(Jit(j))
    })
    .as_ref()
    .map(|j| j.0)
    .map_err(Clone::clone)
}

/// Symbols loaded so far, with their addresses.
static LOADED: Lazy<Mutex<HashMap<String, usize>>> = Lazy::new(Default::default);

/// Adds an object file and returns the address of each symbol; the code stays loaded for the
/// life of the process. A symbol name stands for one piece of code in the process: when every
/// symbol is loaded already (two threads or two caches met the same program) the loaded code
/// is reused, as adding it again would fail on duplicate definitions.
pub fn load(object: &[u8], symbols: &[String]) -> Result<Vec<usize>, String> {
    let j = jit()?;
    let mut loaded = LOADED.lock().unwrap();
    if let Some(addrs) = symbols.iter().map(|s| loaded.get(s).copied()).collect::<Option<Vec<usize>>>() {
        return Ok(addrs);
    }
    if let Some(s) = symbols.iter().find(|s| loaded.contains_key(*s)) {
        return Err(format!("symbol {s} is already defined by other code"));
    }
    let addrs = unsafe {
        let name = CString::new("kiln-object").unwrap();
        let buf = inkwell::llvm_sys::core::LLVMCreateMemoryBufferWithMemoryRangeCopy(object.as_ptr() as *const _, object.len(), name.as_ptr());
        check(LLVMOrcLLJITAddObjectFile(j, LLVMOrcLLJITGetMainJITDylib(j), buf))?;
        symbols
            .iter()
            .map(|s| {
                let c = CString::new(s.as_str()).unwrap();
                let mut addr: LLVMOrcExecutorAddress = 0;
                check(LLVMOrcLLJITLookup(j, &mut addr, c.as_ptr()))?;
                Ok(addr as usize)
            })
            .collect::<Result<Vec<usize>, String>>()?
    };
    for (s, &a) in symbols.iter().zip(&addrs) {
        loaded.insert(s.clone(), a);
    }
    Ok(addrs)
}
