//! Packed copies of a specialisation's weights, kept between calls.
//!
//! A GEMM packs its B operand into panels before it multiplies; for a weight (a program input
//! that is the same matrix for every batch: a Linear's weight, frozen or not) that costs a
//! read and a strided write of the whole weight on every call, as much as the product itself
//! at batch 64. So the first call packs each weight into a slot of its specialisation, and
//! later calls use the copy while the input is the same data:
//! - the same StorageImpl (a weak reference to it is held while the copy is kept, so no other
//!   storage can be made at its address),
//! - the same data pointer (the view's offset into it),
//! - the same version counter (every in-place op on the tensor or a view of it bumps it).
//!
//! A tensor without a version counter (an inference tensor) is packed on every call. As for
//! autograd's saved tensors, writes that bypass the version counter (through `.data`) are
//! not seen. Disk entries never hold packed data: code stays weight-independent.

use crate::ffi::{kiln_cpp_storage_hold, kiln_cpp_storage_release, KilnTensor};
use kiln_compiler::CompiledProgram;
use std::sync::{Arc, Mutex};

/// float32s, 64-byte aligned (a packed panel is read with aligned vector loads).
pub struct PackedBuffer {
    ptr: *mut f32,
    layout: std::alloc::Layout,
}

// Written once, under the slot's lock, before it is shared; read-only afterwards.
unsafe impl Send for PackedBuffer {}
unsafe impl Sync for PackedBuffer {}

impl PackedBuffer {
    fn new(elems: usize) -> Option<PackedBuffer> {
        let layout = std::alloc::Layout::from_size_align(elems.max(1).checked_mul(4)?, 64).ok()?;
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) } as *mut f32;
        (!ptr.is_null()).then_some(PackedBuffer { ptr, layout })
    }
    pub fn as_ptr(&self) -> *const f32 {
        self.ptr
    }
}

impl Drop for PackedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated by `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr as *mut u8, self.layout) };
    }
}

struct Packed {
    data: usize,
    storage: usize,
    version: i64,
    buffer: Arc<PackedBuffer>,
}

impl Drop for Packed {
    fn drop(&mut self) {
        // SAFETY: `hold` took this weak reference when the copy was made.
        unsafe { kiln_cpp_storage_release(self.storage as *mut _) };
    }
}

/// One slot per packable weight of a program (`CompiledProgram::packable_weights`).
pub struct PackedWeights {
    slots: Vec<Mutex<Option<Packed>>>,
    /// Per weight: whether a copy is kept (code for symbolic sizes keeps only weights whose
    /// packed layout does not move with the sizes).
    kept: Vec<bool>,
}

impl PackedWeights {
    pub fn new(program: &CompiledProgram, keep: impl Fn(&kiln_compiler::runtime::program::PackableWeight) -> bool) -> PackedWeights {
        let kept: Vec<bool> = program.packable_weights().iter().map(keep).collect();
        PackedWeights { slots: kept.iter().map(|_| Mutex::new(None)).collect(), kept }
    }

    pub fn is_empty(&self) -> bool {
        !self.kept.contains(&true)
    }

    /// The packed copy of each weight for this call's inputs, packing those missing or stale;
    /// None where a weight cannot be kept (no version counter, no memory): the call packs it.
    ///
    /// # Safety
    /// `inputs` are the call's admitted tensors, laid out as `program` was specialised for.
    pub unsafe fn for_call(&self, program: &CompiledProgram, inputs: &[KilnTensor]) -> Vec<Option<Arc<PackedBuffer>>> {
        program
            .packable_weights()
            .iter()
            .zip(&self.slots)
            .zip(&self.kept)
            .map(|((w, slot), &kept)| {
                let t = &inputs[w.input];
                if !kept || t.version < 0 || t.storage.is_null() {
                    return None;
                }
                let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
                let current = slot.as_ref().is_some_and(|p| p.data == t.data as usize && p.storage == t.storage as usize && p.version == t.version);
                if !current {
                    let buffer = PackedBuffer::new(w.elems)?;
                    program.pack_weight(w, t.data as *const u8, buffer.ptr);
                    kiln_cpp_storage_hold(t.storage);
                    // The old copy (if any) lets go of its storage as it is replaced.
                    *slot = Some(Packed { data: t.data as usize, storage: t.storage as usize, version: t.version, buffer: Arc::new(buffer) });
                }
                slot.as_ref().map(|p| p.buffer.clone())
            })
            .collect()
    }
}
