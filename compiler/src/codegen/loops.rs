//! Emits one loop-IR kernel as LLVM IR: an entry that unpacks the buffer table and a body over
//! `noalias` buffer pointers; expressions are scalar code the loop vectoriser widens.

use crate::codegen::math::Math;
use crate::codegen::target::Target;
use crate::codegen::CodegenError;
use crate::dtype::{DType, Scalar};
use crate::graph::ir::{BinaryOp, CmpOp, Dim, UnaryOp};
use crate::lower::loop_ir::*;
use crate::CompileOptions;
use inkwell::attributes::{Attribute, AttributeLoc};
use inkwell::builder::Builder;
use inkwell::context::Context;
use inkwell::module::{Linkage, Module};
use inkwell::types::BasicTypeEnum;
use inkwell::values::{BasicValueEnum, FloatValue, FunctionValue, IntValue, PointerValue};
use inkwell::{AddressSpace, FloatPredicate, IntPredicate};
use std::collections::HashMap;

pub(crate) fn used_buffers(k: &Kernel) -> Vec<BufId> {
    let mut bufs = vec![];
    for (e, _) in &k.exprs {
        if let Expr::Load { buf, .. } = e {
            bufs.push(*buf);
        }
    }
    fn stores(l: &Loop, out: &mut Vec<BufId>) {
        for s in &l.body {
            match s {
                Stmt::Loop(i) => stores(i, out),
                Stmt::Store { buf, .. } => out.push(*buf),
                _ => {}
            }
        }
    }
    stores(&k.root, &mut bufs);
    bufs.sort_by_key(|b| b.0);
    bufs.dedup();
    bufs
}

/// How many parameters the kernel reads: one past the highest it names.
pub(crate) fn num_params(k: &Kernel) -> usize {
    let mut n = 0;
    let mut see = |p: u32| n = n.max(p as usize + 1);
    let index = |ix: &Index, see: &mut dyn FnMut(u32)| ix.params.iter().for_each(|&(_, p)| see(p));
    for (e, _) in &k.exprs {
        match e {
            Expr::Load { index: ix, .. } | Expr::Index(ix) => index(ix, &mut see),
            Expr::Param(p) => see(*p),
            _ => {}
        }
    }
    fn walk(l: &Loop, see: &mut dyn FnMut(u32)) {
        if let Dim::Sym(p) = l.extent {
            see(p);
        }
        for s in &l.body {
            match s {
                Stmt::Loop(inner) => walk(inner, see),
                Stmt::Store { index, .. } => index.params.iter().for_each(|&(_, p)| see(p)),
                _ => {}
            }
        }
    }
    walk(&k.root, &mut see);
    n
}

pub fn set_target_attrs<'ctx>(ctx: &'ctx Context, f: FunctionValue<'ctx>, target: &Target) {
    f.add_attribute(AttributeLoc::Function, ctx.create_string_attribute("target-cpu", &target.cpu));
    f.add_attribute(AttributeLoc::Function, ctx.create_string_attribute("target-features", &target.features));
    let nounwind = Attribute::get_named_enum_kind_id("nounwind");
    f.add_attribute(AttributeLoc::Function, ctx.create_enum_attribute(nounwind, 0));
}

pub fn emit_kernel<'ctx>(ctx: &'ctx Context, module: &Module<'ctx>, k: &Kernel, buffer_dtypes: &[DType], target: &Target, opts: &CompileOptions, name: &str) -> Result<(), CodegenError> {
    let ptr = ctx.ptr_type(AddressSpace::default());
    let i64t = ctx.i64_type();
    let used = used_buffers(k);

    // Body: (noalias ptr per used buffer..., ptr to the program's parameters, i64 start,
    // i64 end). The parameters follow the buffers in the table (null unless symbolic).
    let mut params: Vec<_> = used.iter().map(|_| ptr.into()).collect();
    params.push(ptr.into());
    params.push(i64t.into());
    params.push(i64t.into());
    let body_fn = module.add_function(&format!("{name}_body"), ctx.void_type().fn_type(&params, false), Some(Linkage::Internal));
    set_target_attrs(ctx, body_fn, target);
    let noalias = Attribute::get_named_enum_kind_id("noalias");
    for i in 0..used.len() {
        body_fn.add_attribute(AttributeLoc::Param(i as u32), ctx.create_enum_attribute(noalias, 0));
    }
    let builder = ctx.create_builder();
    let entry = ctx.append_basic_block(body_fn, "entry");
    builder.position_at_end(entry);
    let mut e = Emitter {
        ctx,
        module,
        b: &builder,
        k,
        f: body_fn,
        bufs: used.iter().enumerate().map(|(i, b)| (*b, (body_fn.get_nth_param(i as u32).unwrap().into_pointer_value(), buffer_dtypes[b.0 as usize]))).collect(),
        vars: HashMap::new(),
        accs: vec![],
        memo: HashMap::new(),
        params: vec![],
        interleave: opts.interleave,
        eager_avx512: target.eager_avx512(),
    };
    // Parameters are loaded once, at entry: they dominate every use.
    let param_base = body_fn.get_nth_param(used.len() as u32).unwrap().into_pointer_value();
    for p in 0..num_params(k) {
        let slot = unsafe { builder.build_in_bounds_gep(i64t, param_base, &[i64t.const_int(p as u64, false)], "")? };
        e.params.push(builder.build_load(i64t, slot, &format!("p{p}"))?.into_int_value());
    }
    for v in 0..k.num_vars {
        let slot = builder.build_alloca(i64t, &format!("i{v}"))?;
        e.vars.insert(VarId(v), slot);
    }
    for (i, d) in k.accs.iter().enumerate() {
        e.accs.push(builder.build_alloca(llvm_type(ctx, *d), &format!("acc{i}"))?);
    }
    let start = body_fn.get_nth_param(used.len() as u32 + 1).unwrap().into_int_value();
    let end = body_fn.get_nth_param(used.len() as u32 + 2).unwrap().into_int_value();
    e.emit_loop(&k.root, Some((start, end)))?;
    builder.build_return(None)?;

    // Entry: unpack the buffer table and call the body.
    let entry_fn = module.add_function(name, ctx.void_type().fn_type(&[ptr.into(), i64t.into(), i64t.into()], false), None);
    set_target_attrs(ctx, entry_fn, target);
    let bb = ctx.append_basic_block(entry_fn, "entry");
    builder.position_at_end(bb);
    let table = entry_fn.get_nth_param(0).unwrap().into_pointer_value();
    let mut args: Vec<inkwell::values::BasicMetadataValueEnum> = vec![];
    for b in &used {
        let slot = unsafe { builder.build_in_bounds_gep(ptr, table, &[i64t.const_int(b.0 as u64, false)], "")? };
        args.push(builder.build_load(ptr, slot, "")?.into());
    }
    let slot = unsafe { builder.build_in_bounds_gep(ptr, table, &[i64t.const_int(buffer_dtypes.len() as u64, false)], "")? };
    args.push(builder.build_load(ptr, slot, "")?.into());
    args.push(entry_fn.get_nth_param(1).unwrap().into());
    args.push(entry_fn.get_nth_param(2).unwrap().into());
    builder.build_call(body_fn, &args, "")?;
    builder.build_return(None)?;
    Ok(())
}

/// Whether every access in the innermost loop `l` steps by 0 or 1 element per iteration.
/// Interleaving gathers (a transposed input) measured slower: 1024x1024 transposed spine,
/// 2 threads, 2.2 ms without, 3.3 ms with.
fn unit_stride(k: &Kernel, l: &Loop) -> bool {
    let ok = |ix: &Index| ix.terms.iter().filter(|t| t.0 == l.var).all(|t| t.1 == 0 || t.1 == 1) && !ix.params.iter().any(|t| t.0 == l.var);
    let loads = k.exprs.iter().all(|(e, _)| !matches!(e, Expr::Load { index, .. } if !ok(index)));
    let stores = l.body.iter().all(|s| !matches!(s, Stmt::Store { index, .. } if !ok(index)));
    loads && stores
}

/// Whether the values `body` stores or accumulates compute a transcendental function (or a
/// division or power): long dependent chains that fill the vector registers.
fn transcendental(k: &Kernel, body: &[Stmt]) -> bool {
    let mut stack: Vec<ExprId> = body
        .iter()
        .filter_map(|s| match s {
            Stmt::Store { value, .. } | Stmt::Update { value, .. } | Stmt::Init { value, .. } => Some(*value),
            Stmt::Loop(_) => None,
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    while let Some(e) = stack.pop() {
        if !seen.insert(e) {
            continue;
        }
        match k.expr(e) {
            Expr::Unary(op, x) => {
                if !matches!(op, UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Relu | UnaryOp::Not) {
                    return true;
                }
                stack.push(*x);
            }
            Expr::Binary(BinaryOp::Div | BinaryOp::Pow, _, _) => return true,
            Expr::Binary(_, a, b) | Expr::Compare(_, a, b) => stack.extend([*a, *b]),
            Expr::Select(c, a, b) => stack.extend([*c, *a, *b]),
            Expr::Cast(x) | Expr::Quantize { x, .. } => stack.push(*x),
            Expr::Load { .. } | Expr::Const(_) | Expr::Param(_) | Expr::Acc(_) | Expr::Index(_) => {}
        }
    }
    false
}

/// Attaches `llvm.loop !{!self, !{"llvm.loop.interleave.count", i32 n}}` to a loop's latch
/// branch. A loop ID must refer to itself, which inkwell cannot build: a temporary node
/// stands in for the self reference and is then replaced.
pub(crate) fn set_interleave_count(ctx: &Context, latch: inkwell::values::InstructionValue<'_>, n: u32) {
    use inkwell::context::AsContextRef;
    use inkwell::llvm_sys::core::*;
    use inkwell::values::AsValueRef;
    use inkwell::llvm_sys::debuginfo::{LLVMMetadataReplaceAllUsesWith, LLVMTemporaryMDNode};
    // SAFETY: every pointer comes from this context and the instruction is in its module.
    unsafe {
        let c = ctx.as_ctx_ref();
        let key = "llvm.loop.interleave.count";
        let name = LLVMMDStringInContext2(c, key.as_ptr() as *const _, key.len());
        let count = LLVMValueAsMetadata(LLVMConstInt(LLVMInt32TypeInContext(c), n as u64, 0));
        let mut hint = [name, count];
        let hint = LLVMMDNodeInContext2(c, hint.as_mut_ptr(), 2);
        let tmp = LLVMTemporaryMDNode(c, std::ptr::null_mut(), 0);
        let mut ops = [tmp, hint];
        let id = LLVMMDNodeInContext2(c, ops.as_mut_ptr(), 2);
        LLVMMetadataReplaceAllUsesWith(tmp, id);
        let kind = "llvm.loop";
        let kind = LLVMGetMDKindIDInContext(c, kind.as_ptr() as *const _, kind.len() as u32);
        LLVMSetMetadata(latch.as_value_ref(), kind, LLVMMetadataAsValue(c, id));
    }
}

pub(crate) fn llvm_type<'ctx>(ctx: &'ctx Context, d: DType) -> BasicTypeEnum<'ctx> {
    match d {
        DType::Bool => ctx.bool_type().into(),
        DType::I32 => ctx.i32_type().into(),
        DType::I64 => ctx.i64_type().into(),
        DType::F32 => ctx.f32_type().into(),
        DType::F64 => ctx.f64_type().into(),
    }
}

/// How an element is stored in memory: bool is a byte.
fn mem_type<'ctx>(ctx: &'ctx Context, d: DType) -> BasicTypeEnum<'ctx> {
    match d {
        DType::Bool => ctx.i8_type().into(),
        _ => llvm_type(ctx, d),
    }
}

/// Emits a kernel's statements and expressions into the function `f`. Other kernel
/// generators (GEMM's epilogue) use it for the expression DAG of a loop-IR kernel.
pub(crate) struct Emitter<'a, 'ctx> {
    pub ctx: &'ctx Context,
    pub module: &'a Module<'ctx>,
    pub b: &'a Builder<'ctx>,
    pub k: &'a Kernel,
    pub f: FunctionValue<'ctx>,
    pub bufs: HashMap<BufId, (PointerValue<'ctx>, DType)>,
    /// A stack slot per loop variable (mem2reg makes them SSA).
    pub vars: HashMap<VarId, PointerValue<'ctx>>,
    pub accs: Vec<PointerValue<'ctx>>,
    /// Expressions already computed in the current straight-line block.
    pub memo: HashMap<ExprId, BasicValueEnum<'ctx>>,
    /// The program's parameters, loaded at entry.
    pub params: Vec<IntValue<'ctx>>,
    pub interleave: u32,
    /// See `Target::eager_avx512`.
    pub eager_avx512: bool,
}

pub(crate) type R<T> = Result<T, CodegenError>;

impl<'a, 'ctx> Emitter<'a, 'ctx> {
    fn math(&self) -> Math<'a, 'ctx> {
        Math { ctx: self.ctx, module: self.module, b: self.b, eager_avx512: self.eager_avx512 }
    }

    fn emit_loop(&mut self, l: &Loop, range: Option<(IntValue<'ctx>, IntValue<'ctx>)>) -> R<()> {
        let i64t = self.ctx.i64_type();
        let (start, end) = match range {
            Some(r) => r,
            None => match l.extent {
                Dim::Const(n) => (i64t.const_zero(), i64t.const_int(n as u64, true)),
                Dim::Sym(p) => (i64t.const_zero(), self.params[p as usize]),
            },
        };
        let slot = self.vars[&l.var];
        self.b.build_store(slot, start)?;
        let header = self.ctx.append_basic_block(self.f, "loop");
        let body = self.ctx.append_basic_block(self.f, "body");
        let exit = self.ctx.append_basic_block(self.f, "exit");
        self.b.build_unconditional_branch(header)?;
        self.b.position_at_end(header);
        let i = self.b.build_load(i64t, slot, "")?.into_int_value();
        let more = self.b.build_int_compare(IntPredicate::SLT, i, end, "")?;
        self.b.build_conditional_branch(more, body, exit)?;
        self.b.position_at_end(body);
        let saved = std::mem::take(&mut self.memo);
        for s in &l.body {
            self.emit_stmt(s)?;
        }
        self.memo = saved;
        let i = self.b.build_load(i64t, slot, "")?.into_int_value();
        let next = self.b.build_int_add(i, i64t.const_int(1, false), "")?;
        self.b.build_store(slot, next)?;
        let latch = self.b.build_unconditional_branch(header)?;
        // Not on a reduction over transcendental math: its vector registers run out (a row
        // softmax's exp-and-sum pass, 256 x 1024, 1 thread: 140 µs with 4, 74.5 without). A
        // cheap reduction (amax, sum) gains: amax 21.6 → 11.6 µs.
        let heavy_reduction = l.body.iter().any(|s| matches!(s, Stmt::Update { .. })) && transcendental(self.k, &l.body);
        if self.interleave > 1 && !heavy_reduction && !l.body.iter().any(|s| matches!(s, Stmt::Loop(_))) && unit_stride(self.k, l) {
            set_interleave_count(self.ctx, latch, self.interleave);
        }
        self.b.position_at_end(exit);
        Ok(())
    }

    pub(crate) fn emit_stmt(&mut self, s: &Stmt) -> R<()> {
        match s {
            Stmt::Loop(l) => {
                self.emit_loop(l, None)?;
                // Values computed before the loop do not dominate code after its exit block
                // in every case we care about (accumulators change): start afresh.
                self.memo.clear();
            }
            Stmt::Store { buf, index, value } => {
                let v = self.expr(*value)?;
                let (ptr, dtype) = self.bufs[buf];
                let addr = self.address(ptr, dtype, index)?;
                let v = if dtype == DType::Bool { self.b.build_int_z_extend(v.into_int_value(), self.ctx.i8_type(), "")?.into() } else { v };
                self.b.build_store(addr, v)?;
            }
            Stmt::Init { acc, value } => {
                let v = self.expr(*value)?;
                self.b.build_store(self.accs[acc.0 as usize], v)?;
                self.memo.clear();
            }
            Stmt::Update { acc, combine, value } => {
                let v = self.expr(*value)?;
                let d = self.k.accs[acc.0 as usize];
                let slot = self.accs[acc.0 as usize];
                let cur = self.b.build_load(llvm_type(self.ctx, d), slot, "")?;
                let new = match (combine, d.is_float()) {
                    (Combine::Add, true) => {
                        let r = self.b.build_float_add(cur.into_float_value(), v.into_float_value(), "")?;
                        // Reassociation lets the vectoriser keep one partial sum per lane.
                        let flags = inkwell::values::FastMathFlags::AllowReassoc;
                        r.as_instruction().unwrap().set_fast_math_flags(flags).ok();
                        r.into()
                    }
                    (Combine::Add, false) => self.b.build_int_add(cur.into_int_value(), v.into_int_value(), "")?.into(),
                    (Combine::Max, _) => self.binary(BinaryOp::Max, d, cur, v)?,
                    (Combine::Min, _) => self.binary(BinaryOp::Min, d, cur, v)?,
                };
                self.b.build_store(slot, new)?;
                self.memo.clear();
            }
        }
        Ok(())
    }

    /// The value of `index` at the loop variables' current values.
    fn index_value(&self, index: &Index) -> R<IntValue<'ctx>> {
        let i64t = self.ctx.i64_type();
        let mut off = i64t.const_int(index.offset as u64, true);
        for (v, stride) in &index.terms {
            let i = self.b.build_load(i64t, self.vars[v], "")?.into_int_value();
            let t = self.b.build_int_mul(i, i64t.const_int(*stride as u64, true), "")?;
            off = self.b.build_int_add(off, t, "")?;
        }
        for (v, p) in &index.params {
            let i = self.b.build_load(i64t, self.vars[v], "")?.into_int_value();
            let t = self.b.build_int_mul(i, self.params[*p as usize], "")?;
            off = self.b.build_int_add(off, t, "")?;
        }
        Ok(off)
    }

    fn address(&self, base: PointerValue<'ctx>, dtype: DType, index: &Index) -> R<PointerValue<'ctx>> {
        let off = self.index_value(index)?;
        Ok(unsafe { self.b.build_in_bounds_gep(mem_type(self.ctx, dtype), base, &[off], "")? })
    }

    fn constant(&self, s: Scalar, d: DType) -> BasicValueEnum<'ctx> {
        match (d, s.cast(d)) {
            (DType::Bool, Scalar::Bool(b)) => self.ctx.bool_type().const_int(b as u64, false).into(),
            (DType::I32, Scalar::Int(i)) => self.ctx.i32_type().const_int(i as u64, true).into(),
            (DType::I64, Scalar::Int(i)) => self.ctx.i64_type().const_int(i as u64, true).into(),
            (DType::F32, Scalar::Float(f)) => self.ctx.f32_type().const_float(f).into(),
            (DType::F64, Scalar::Float(f)) => self.ctx.f64_type().const_float(f).into(),
            _ => unreachable!("Scalar::cast returns the dtype's kind"),
        }
    }

    fn expr(&mut self, id: ExprId) -> R<BasicValueEnum<'ctx>> {
        if let Some(v) = self.memo.get(&id) {
            return Ok(*v);
        }
        let d = self.k.dtype(id);
        let v: BasicValueEnum<'ctx> = match self.k.expr(id).clone() {
            Expr::Load { buf, index } => {
                let (ptr, dtype) = self.bufs[&buf];
                let addr = self.address(ptr, dtype, &index)?;
                let v = self.b.build_load(mem_type(self.ctx, dtype), addr, "")?;
                if dtype == DType::Bool {
                    self.b.build_int_compare(IntPredicate::NE, v.into_int_value(), self.ctx.i8_type().const_zero(), "")?.into()
                } else {
                    v
                }
            }
            Expr::Const(s) => self.constant(s, d),
            Expr::Param(_) | Expr::Index(_) => {
                let v = match self.k.expr(id) {
                    Expr::Param(p) => self.params[*p as usize],
                    Expr::Index(ix) => self.index_value(ix)?,
                    _ => unreachable!(),
                };
                match d {
                    DType::F32 | DType::F64 => self.b.build_signed_int_to_float(v, llvm_type(self.ctx, d).into_float_type(), "")?.into(),
                    DType::I64 => v.into(),
                    DType::I32 => self.b.build_int_truncate(v, self.ctx.i32_type(), "")?.into(),
                    DType::Bool => self.b.build_int_compare(IntPredicate::NE, v, self.ctx.i64_type().const_zero(), "")?.into(),
                }
            }
            Expr::Acc(a) => self.b.build_load(llvm_type(self.ctx, d), self.accs[a.0 as usize], "")?,
            Expr::Unary(op, x) => {
                let xv = self.expr(x)?;
                self.unary(op, d, xv)?
            }
            Expr::Binary(BinaryOp::Pow, x, y) => self.pow(x, y, d)?,
            Expr::Binary(op, x, y) => {
                let (xv, yv) = (self.expr(x)?, self.expr(y)?);
                self.binary(op, d, xv, yv)?
            }
            Expr::Compare(op, x, y) => {
                let od = self.k.dtype(x);
                let (xv, yv) = (self.expr(x)?, self.expr(y)?);
                self.compare(op, od, xv, yv)?.into()
            }
            Expr::Select(c, x, y) => {
                let (cv, xv, yv) = (self.expr(c)?, self.expr(x)?, self.expr(y)?);
                self.b.build_select(cv.into_int_value(), xv, yv, "")?
            }
            Expr::Cast(x) => {
                let from = self.k.dtype(x);
                let xv = self.expr(x)?;
                self.cast(xv, from, d)?
            }
            Expr::Quantize { x, inverse_scale, zero_point } => {
                let xv = self.expr(x)?.into_float_value();
                self.quantize(xv, inverse_scale, zero_point)?.into()
            }
        };
        self.memo.insert(id, v);
        Ok(v)
    }

    /// `kernels::quantized::quantize` on a float32: fma(x, 1/scale, zp), capped below 2³¹ (a NaN
    /// too: `vminps` returns the cap), to nearest even, clamped to 0..=255 (what converts to
    /// −2³¹ clamps to 0).
    fn quantize(&self, x: FloatValue<'ctx>, inverse_scale: f32, zero_point: f32) -> R<FloatValue<'ctx>> {
        let m = self.math();
        let c = |v: f32| x.get_type().const_float(v as f64);
        let t = m.intrinsic("llvm.fma", &[x, c(inverse_scale), c(zero_point)])?;
        let below = self.b.build_float_compare(FloatPredicate::OLT, t, c(2147483520.0), "")?;
        let t = self.b.build_select(below, t, c(2147483520.0), "")?.into_float_value();
        let r = m.intrinsic("llvm.roundeven", &[t])?;
        // (−0, what rounds to zero from below, is 0 as well)
        let pos = self.b.build_float_compare(FloatPredicate::OGT, r, c(0.0), "")?;
        let r = self.b.build_select(pos, r, c(0.0), "")?.into_float_value();
        let big = self.b.build_float_compare(FloatPredicate::OGT, r, c(255.0), "")?;
        Ok(self.b.build_select(big, c(255.0), r, "")?.into_float_value())
    }

    fn cast(&self, v: BasicValueEnum<'ctx>, from: DType, to: DType) -> R<BasicValueEnum<'ctx>> {
        use DType::*;
        let ty = llvm_type(self.ctx, to);
        Ok(match (from, to) {
            _ if from == to => v,
            (F32, F64) => self.b.build_float_ext(v.into_float_value(), self.ctx.f64_type(), "")?.into(),
            (F64, F32) => self.b.build_float_trunc(v.into_float_value(), self.ctx.f32_type(), "")?.into(),
            (Bool, F32 | F64) => self.b.build_unsigned_int_to_float(v.into_int_value(), ty.into_float_type(), "")?.into(),
            (I32 | I64, F32 | F64) => self.b.build_signed_int_to_float(v.into_int_value(), ty.into_float_type(), "")?.into(),
            (F32 | F64, Bool) => {
                let zero = v.get_type().into_float_type().const_zero();
                self.b.build_float_compare(FloatPredicate::UNE, v.into_float_value(), zero, "")?.into()
            }
            (I32 | I64, Bool) => {
                let zero = v.get_type().into_int_type().const_zero();
                self.b.build_int_compare(IntPredicate::NE, v.into_int_value(), zero, "")?.into()
            }
            (F32 | F64, I32 | I64) => {
                // As eager on x86 (cvtt*2si): toward zero, and NaN or a value outside the
                // integer's range gives its minimum ("integer indefinite"); see
                // `dtype::float_to_int`. fptosi of such a value is poison: select explicitly.
                let x = v.into_float_value();
                let int = ty.into_int_type();
                let limit = x.get_type().const_float(if to == I32 { 2f64.powi(31) } else { 2f64.powi(63) });
                let below = self.b.build_float_compare(FloatPredicate::OLT, x, limit, "")?;
                let above = self.b.build_float_compare(FloatPredicate::OGE, x, self.b.build_float_neg(limit, "")?, "")?;
                let in_range = self.b.build_and(below, above, "")?;
                let t = self.b.build_float_to_signed_int(x, int, "")?;
                let min = int.const_int(if to == I32 { i32::MIN as u32 as u64 } else { i64::MIN as u64 }, false);
                self.b.build_select(in_range, t, min, "")?
            }
            (Bool, I32 | I64) => self.b.build_int_z_extend(v.into_int_value(), ty.into_int_type(), "")?.into(),
            (I64, I32) => self.b.build_int_truncate(v.into_int_value(), ty.into_int_type(), "")?.into(),
            (I32, I64) => self.b.build_int_s_extend(v.into_int_value(), ty.into_int_type(), "")?.into(),
            _ => return Err(CodegenError::Unsupported(format!("cast {from} -> {to}"))),
        })
    }

    fn f64_via_libm(&self, name: &str, args: &[FloatValue<'ctx>], d: DType) -> R<FloatValue<'ctx>> {
        let f64t = self.ctx.f64_type();
        let wide: Vec<FloatValue> = args
            .iter()
            .map(|a| if d == DType::F32 { self.b.build_float_ext(*a, f64t, "") } else { Ok(*a) })
            .collect::<Result<_, _>>()?;
        let r = self.math().libm(name, &wide)?;
        Ok(if d == DType::F32 { self.b.build_float_trunc(r, self.ctx.f32_type(), "")? } else { r })
    }

    fn unary(&self, op: UnaryOp, d: DType, v: BasicValueEnum<'ctx>) -> R<BasicValueEnum<'ctx>> {
        if !d.is_float() {
            let x = v.into_int_value();
            let zero = x.get_type().const_zero();
            return Ok(match op {
                UnaryOp::Neg => self.b.build_int_neg(x, "")?.into(),
                UnaryOp::Abs => {
                    let neg = self.b.build_int_compare(IntPredicate::SLT, x, zero, "")?;
                    self.b.build_select(neg, self.b.build_int_neg(x, "")?, x, "")?
                }
                UnaryOp::Relu => {
                    let pos = self.b.build_int_compare(IntPredicate::SGT, x, zero, "")?;
                    self.b.build_select(pos, x, zero, "")?
                }
                UnaryOp::Not => self.b.build_not(x, "")?.into(),
                _ => return Err(CodegenError::Unsupported(format!("{} on {d}", op.name()))),
            });
        }
        let x = v.into_float_value();
        let m = self.math();
        let one = x.get_type().const_float(1.0);
        let f32_ = d == DType::F32;
        let r = match op {
            UnaryOp::Neg => self.b.build_float_neg(x, "")?,
            UnaryOp::Abs => m.intrinsic("llvm.fabs", &[x])?,
            UnaryOp::Reciprocal => self.b.build_float_div(one, x, "")?,
            UnaryOp::Relu => {
                let neg = self.b.build_float_compare(FloatPredicate::OLT, x, x.get_type().const_zero(), "")?;
                self.b.build_select(neg, x.get_type().const_zero(), x, "")?.into_float_value()
            }
            UnaryOp::Sqrt => m.intrinsic("llvm.sqrt", &[x])?,
            UnaryOp::Round => m.intrinsic("llvm.roundeven", &[x])?,
            UnaryOp::Rsqrt => self.b.build_float_div(one, m.intrinsic("llvm.sqrt", &[x])?, "")?,
            UnaryOp::Exp if f32_ => m.exp_f32(x)?,
            UnaryOp::Log if f32_ => m.log_f32(x)?,
            UnaryOp::Log1p if f32_ => m.log1p_f32(x)?,
            UnaryOp::Tanh if f32_ => m.tanh_f32(x)?,
            UnaryOp::Erf if f32_ => m.erf_f32(x)?,
            UnaryOp::Sigmoid if f32_ => m.sigmoid_f32(x)?,
            UnaryOp::Gelu if f32_ => m.gelu_f32(x)?,
            UnaryOp::GeluTanh if f32_ => m.gelu_tanh_f32(x)?,
            UnaryOp::Silu if f32_ => {
                // x / (1 + exp(-x)), PyTorch's form (silu(-inf) is NaN there too).
                let e = m.exp_f32_plus_one_use(self.b.build_float_neg(x, "")?)?;
                self.b.build_float_div(x, self.b.build_float_add(one, e, "")?, "")?
            }
            UnaryOp::Exp => m.libm("exp", &[x])?,
            UnaryOp::Log => m.libm("log", &[x])?,
            UnaryOp::Log1p => m.libm("log1p", &[x])?,
            UnaryOp::Tanh => m.libm("tanh", &[x])?,
            UnaryOp::Erf => m.libm("erf", &[x])?,
            UnaryOp::Sigmoid => {
                let e = m.libm("exp", &[self.b.build_float_neg(x, "")?])?;
                self.b.build_float_div(one, self.b.build_float_add(one, e, "")?, "")?
            }
            UnaryOp::Silu => {
                let e = m.libm("exp", &[self.b.build_float_neg(x, "")?])?;
                self.b.build_float_div(x, self.b.build_float_add(one, e, "")?, "")?
            }
            UnaryOp::Gelu => {
                let u = self.b.build_float_mul(x, x.get_type().const_float(std::f64::consts::FRAC_1_SQRT_2), "")?;
                let e = m.libm("erf", &[u])?;
                let half = self.b.build_float_mul(x, x.get_type().const_float(0.5), "")?;
                self.b.build_float_mul(half, self.b.build_float_add(one, e, "")?, "")?
            }
            UnaryOp::GeluTanh => {
                let c = x.get_type().const_float((2.0 / std::f64::consts::PI).sqrt());
                let k = x.get_type().const_float(0.044715);
                let x3 = self.b.build_float_mul(x, self.b.build_float_mul(x, x, "")?, "")?;
                let inner = self.b.build_float_mul(c, self.b.build_float_add(x, self.b.build_float_mul(k, x3, "")?, "")?, "")?;
                let t = m.libm("tanh", &[inner])?;
                let half = self.b.build_float_mul(x, x.get_type().const_float(0.5), "")?;
                self.b.build_float_mul(half, self.b.build_float_add(one, t, "")?, "")?
            }
            UnaryOp::Not => return Err(CodegenError::Unsupported("not on float".into())),
        };
        Ok(r.into())
    }

    fn binary(&self, op: BinaryOp, d: DType, a: BasicValueEnum<'ctx>, c: BasicValueEnum<'ctx>) -> R<BasicValueEnum<'ctx>> {
        let b = self.b;
        if d.is_float() {
            let (x, y) = (a.into_float_value(), c.into_float_value());
            return Ok(match op {
                BinaryOp::Add => b.build_float_add(x, y, "")?.into(),
                BinaryOp::Sub => b.build_float_sub(x, y, "")?.into(),
                BinaryOp::Mul => b.build_float_mul(x, y, "")?.into(),
                BinaryOp::Div => b.build_float_div(x, y, "")?.into(),
                BinaryOp::Max => self.math().intrinsic("llvm.maximum", &[x, y])?.into(),
                BinaryOp::Min => self.math().intrinsic("llvm.minimum", &[x, y])?.into(),
                BinaryOp::Pow => self.f64_via_libm("pow", &[x, y], d)?.into(),
                BinaryOp::And | BinaryOp::Or => return Err(CodegenError::Unsupported("logical op on float".into())),
            });
        }
        let (x, y) = (a.into_int_value(), c.into_int_value());
        Ok(match op {
            BinaryOp::Add => b.build_int_add(x, y, "")?.into(),
            BinaryOp::Sub => b.build_int_sub(x, y, "")?.into(),
            BinaryOp::Mul => b.build_int_mul(x, y, "")?.into(),
            BinaryOp::And => b.build_and(x, y, "")?.into(),
            BinaryOp::Or => b.build_or(x, y, "")?.into(),
            BinaryOp::Max | BinaryOp::Min => {
                let pred = if op == BinaryOp::Max { IntPredicate::SGT } else { IntPredicate::SLT };
                let take_x = b.build_int_compare(pred, x, y, "")?;
                b.build_select(take_x, x, y, "")?
            }
            BinaryOp::Div | BinaryOp::Pow => return Err(CodegenError::Unsupported(format!("{} on {d}", op.name()))),
        })
    }

    /// pow with a constant exponent uses PyTorch's special cases (x*x, sqrt, ...); others libm.
    fn pow(&mut self, x: ExprId, y: ExprId, d: DType) -> R<BasicValueEnum<'ctx>> {
        let xv = self.expr(x)?.into_float_value();
        let t = xv.get_type();
        let one = t.const_float(1.0);
        let b = self.b;
        if let Expr::Const(s) = self.k.expr(y) {
            let e = s.as_f64();
            let sq = || b.build_float_mul(xv, xv, "");
            let r = match e {
                0.0 => Some(one),
                1.0 => Some(xv),
                2.0 => Some(sq()?),
                3.0 => Some(b.build_float_mul(sq()?, xv, "")?),
                0.5 => Some(self.math().intrinsic("llvm.sqrt", &[xv])?),
                -0.5 => Some(b.build_float_div(one, self.math().intrinsic("llvm.sqrt", &[xv])?, "")?),
                -1.0 => Some(b.build_float_div(one, xv, "")?),
                -2.0 => Some(b.build_float_div(one, sq()?, "")?),
                _ => None,
            };
            if let Some(r) = r {
                return Ok(r.into());
            }
        }
        let yv = self.expr(y)?.into_float_value();
        Ok(self.f64_via_libm("pow", &[xv, yv], d)?.into())
    }

    fn compare(&self, op: CmpOp, d: DType, a: BasicValueEnum<'ctx>, c: BasicValueEnum<'ctx>) -> R<IntValue<'ctx>> {
        if d.is_float() {
            let p = match op {
                CmpOp::Eq => FloatPredicate::OEQ,
                CmpOp::Ne => FloatPredicate::UNE,
                CmpOp::Lt => FloatPredicate::OLT,
                CmpOp::Le => FloatPredicate::OLE,
                CmpOp::Gt => FloatPredicate::OGT,
                CmpOp::Ge => FloatPredicate::OGE,
            };
            return Ok(self.b.build_float_compare(p, a.into_float_value(), c.into_float_value(), "")?);
        }
        let signed = d != DType::Bool;
        let p = match (op, signed) {
            (CmpOp::Eq, _) => IntPredicate::EQ,
            (CmpOp::Ne, _) => IntPredicate::NE,
            (CmpOp::Lt, true) => IntPredicate::SLT,
            (CmpOp::Le, true) => IntPredicate::SLE,
            (CmpOp::Gt, true) => IntPredicate::SGT,
            (CmpOp::Ge, true) => IntPredicate::SGE,
            (CmpOp::Lt, false) => IntPredicate::ULT,
            (CmpOp::Le, false) => IntPredicate::ULE,
            (CmpOp::Gt, false) => IntPredicate::UGT,
            (CmpOp::Ge, false) => IntPredicate::UGE,
        };
        Ok(self.b.build_int_compare(p, a.into_int_value(), c.into_int_value(), "")?)
    }
}
