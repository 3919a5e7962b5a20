//! The GEMM microkernel with its epilogue, as LLVM IR:
//!
//! `void NAME(ptr table, ptr a_panel, ptr b_panel, i64 k, ptr coords, i64 rows, i64 cols, ptr a_steps, ptr partial, i64 flags)`
//!
//! computes the `mr × nr` tile Σₚ a_panel[p][r] · b_panel[p][c] in `mr × nr/16` vector
//! accumulators (one float32 FMA chain per element, p increasing), then runs the kernel's
//! epilogue on the first `rows × cols` elements of the tile: `coords` holds the tile's batch
//! coordinates, its first row and its first column, and the epilogue's loads and stores
//! address the program's buffers (`table`) at those absolute coordinates. Panels are packed
//! by the runtime (`runtime::gemm`): `a_panel` is k × mr floats, `b_panel` k × nr floats, 64-byte
//! aligned, zero past the matrix edge, so the k loop never branches on the edge.
//!
//! A convolution's microkernel also reads A straight from the image (direct convolution:
//! nothing packed) when `a_steps` is not null: element (p, r) of A is then
//! `a_panel[a_steps[p] + r · RS]`, `a_steps[p]` the image offset of window element p
//! (c, kh, kw) and RS the image step between the tile's output pixels, consecutive in one
//! output row (`Im2col::row_step`). The runtime takes this path for tiles whose windows lie
//! inside the image.
//!
//! A product whose k is too long for a B panel to stay in L2 runs in chunks of k (`flags`):
//! bit 0, the tile starts from the sums in `partial` (mr × nr floats) instead of zero; bit 1,
//! the sums are stored back there and the epilogue is left for the last chunk. 0 is the
//! whole product in one call.
//!
//! Over a sparse B (`GemmShape::sparse_b`, `kernels::sparse`): in sparse panels the k loop
//! walks the panel's kept rows (step i reads B's row i of the panel's values and A at the
//! row's k index), and a tile of few rows keeps `sparse_chains` sums per element (the kept
//! rows taken in turn), added pairwise before the epilogue, so that the FMAs' latency is
//! hidden by independent chains rather than by rows; in sparse rows each of the tile's
//! columns is a dot product of A's row with the column's kept runs (`ROW_CHAINS` sums),
//! inserted into the register tile's vector; over a weight in code (`weights_in_code`) the
//! tile's panel of features is a switch case of unrolled steps, and `b_panel` is unused.
//! Each way the epilogue is the dense one. Flag
//! `DENSE_B` takes the dense loop instead (a call the runtime packed dense: its A holds an
//! inf or a NaN).
//!
//! An int8 product (`GemmShape::quant`, `kernels::quantized`): the panels hold quads of k (A
//! uint8, B int8, each with its header of sums), `k` is the number of quads, the tile sums in
//! int32 vectors, and before the epilogue the tile is dequantized to float32 (`dequantize`):
//! from there on it is the float32 epilogue.

use super::{GemmSpec, DENSE_B, FROM_PARTIAL, TO_PARTIAL};
use crate::kernels::sparse::{SparseFormat, SparsePanel};
use crate::codegen::loops::{llvm_type, num_params, set_target_attrs, used_buffers, Emitter, R};
use crate::codegen::target::Target;
use crate::codegen::CodegenError;
use crate::dtype::DType;
use crate::lower::loop_ir::{Kernel, Stmt, VarId};

use crate::CompileOptions;
use inkwell::context::Context;
use inkwell::intrinsics::Intrinsic;
use inkwell::module::Module;
use inkwell::types::VectorType;
use inkwell::values::{BasicValue, BasicMetadataValueEnum, FunctionValue, IntValue, PointerValue, VectorValue};
use inkwell::{AddressSpace, IntPredicate};
use std::collections::HashMap;

/// k steps per iteration of the main loop (a remainder loop takes the rest): enough
/// independent work between loop branches; LLVM does not unroll a runtime trip count itself.
const UNROLL: i64 = 4;

/// Independent sums per output element over sparse rows: FMA latency 4, and each step's
/// three loads (its k, a run of B, a run of A) allow about one step a cycle.
const ROW_CHAINS: usize = 4;

/// The epilogue's innermost statements: the body of the loop over the output's columns.
/// Its loops, in any order, are dims of the product (a dim of size 1 may have none): the
/// microkernel sets their variables.
fn epilogue_body<'k>(k: &'k Kernel, spec: &GemmSpec) -> Result<&'k [Stmt], CodegenError> {
    let expected = spec.vars();
    let mut l = &k.root;
    let mut seen = vec![l.var];
    while let [Stmt::Loop(inner)] = l.body.as_slice() {
        l = inner;
        seen.push(l.var);
    }
    let distinct = expected.iter().enumerate().all(|(i, v)| !expected[..i].contains(v));
    if !distinct || !seen.iter().all(|v| expected.contains(v)) || l.body.iter().any(|s| matches!(s, Stmt::Loop(_))) {
        return Err(CodegenError::Unsupported(format!("GEMM epilogue of {} is not a loop nest over its output", k.name)));
    }
    Ok(&l.body)
}

pub fn emit<'ctx>(ctx: &'ctx Context, module: &Module<'ctx>, k: &Kernel, spec: &GemmSpec, buffer_dtypes: &[DType], target: &Target, opts: &CompileOptions, name: &str) -> R<()> {
    let body_stmts = epilogue_body(k, spec)?;
    let tile = spec.shape.tile;
    let (mr, nv, lanes) = (tile.mr, tile.vectors(), tile.lanes);
    // B panels and the stack tile are 64-byte aligned; a vector at v · lanes floats into a
    // row of them is aligned to its own size.
    let vector_align = (4 * lanes) as u32;
    let ptr = ctx.ptr_type(AddressSpace::default());
    let i64t = ctx.i64_type();
    let f32t = ctx.f32_type();
    let vt = f32t.vec_type(lanes as u32);
    // An int8 product's tile sums in int32 (`kernels::quantized`).
    let acc_type = if spec.shape.quant.is_some() { ctx.i32_type().vec_type(lanes as u32) } else { vt };
    let fn_type = ctx.void_type().fn_type(&[ptr.into(), ptr.into(), ptr.into(), i64t.into(), ptr.into(), i64t.into(), i64t.into(), ptr.into(), ptr.into(), i64t.into()], false);
    let f = module.add_function(name, fn_type, None);
    set_target_attrs(ctx, f, target);
    let b = ctx.create_builder();
    b.position_at_end(ctx.append_basic_block(f, "entry"));
    let param = |i: u32| f.get_nth_param(i).unwrap();
    let (table, pa, pb) = (param(0).into_pointer_value(), param(1).into_pointer_value(), param(2).into_pointer_value());
    let kc = param(3).into_int_value();
    let coords = param(4).into_pointer_value();
    let (rows, cols) = (param(5).into_int_value(), param(6).into_int_value());
    let a_steps = param(7).into_pointer_value();
    let (partial, flags) = (param(8).into_pointer_value(), param(9).into_int_value());

    // The epilogue's view of the program: its buffers from the table, a slot per variable.
    let mut bufs = HashMap::new();
    for buf in used_buffers(k) {
        let slot = unsafe { b.build_in_bounds_gep(ptr, table, &[i64t.const_int(buf.0 as u64, false)], "")? };
        bufs.insert(buf, (b.build_load(ptr, slot, "")?.into_pointer_value(), buffer_dtypes[buf.0 as usize]));
    }
    // Parameters (code for symbolic sizes: strides of the output and of what the epilogue
    // reads) follow the buffers in the table.
    let mut params = vec![];
    if num_params(k) > 0 {
        let slot = unsafe { b.build_in_bounds_gep(ptr, table, &[i64t.const_int(buffer_dtypes.len() as u64, false)], "")? };
        let base = b.build_load(ptr, slot, "")?.into_pointer_value();
        for p in 0..num_params(k) {
            let slot = unsafe { b.build_in_bounds_gep(i64t, base, &[i64t.const_int(p as u64, false)], "")? };
            params.push(b.build_load(i64t, slot, &format!("p{p}"))?.into_int_value());
        }
    }
    let mut vars = HashMap::new();
    for v in 0..k.num_vars {
        vars.insert(VarId(v), b.build_alloca(i64t, &format!("i{v}"))?);
    }
    let mut accs = vec![];
    for d in &k.accs {
        accs.push(b.build_alloca(llvm_type(ctx, *d), "acc")?);
    }
    let coord = |i: usize| -> R<IntValue<'ctx>> {
        let slot = unsafe { b.build_in_bounds_gep(i64t, coords, &[i64t.const_int(i as u64, false)], "")? };
        Ok(b.build_load(i64t, slot, "")?.into_int_value())
    };
    for (i, v) in spec.batch_vars.iter().enumerate() {
        b.build_store(vars[v], coord(i)?)?;
    }
    let row0 = coord(spec.batch_vars.len())?;
    let col0 = coord(spec.batch_vars.len() + 1)?;

    // The register tile (one set of accumulators per chain of sums).
    let chains = if matches!(spec.shape.sparse_b, Some(SparseFormat::Panels(_))) { tile.sparse_chains() } else { 1 };
    let chain_accs: Vec<Vec<PointerValue>> = (0..chains).map(|_| (0..mr * nv).map(|_| b.build_alloca(acc_type, "c")).collect::<Result<_, _>>()).collect::<Result<_, _>>()?;
    for a in chain_accs.iter().flatten() {
        b.build_store(*a, acc_type.const_zero())?;
    }
    let tile_accs = &chain_accs[0];
    // Every alloca in the entry block, where SROA promotes them to registers (a k counter or
    // a sum left in memory puts a store-to-load forward into each step).
    let p_slot = b.build_alloca(i64t, "p")?;
    let row_type: inkwell::types::BasicTypeEnum = match spec.shape.sparse_b {
        Some(SparseFormat::Rows(block)) if block > 1 => f32t.vec_type(block as u32).into(),
        _ => f32t.into(),
    };
    let row_slots: Vec<PointerValue> = (0..ROW_CHAINS).map(|_| b.build_alloca(row_type, "s")).collect::<Result<_, _>>()?;
    let (r_slot, j_slot) = (b.build_alloca(i64t, "r")?, b.build_alloca(i64t, "j")?);
    // The stack tile the epilogue reads.
    let tile_mem = b.build_array_alloca(f32t, i64t.const_int((mr * tile.nr) as u64, false), "tile")?;
    tile_mem.as_instruction().unwrap().set_alignment(64).map_err(|e| CodegenError::Llvm(e.to_string()))?;
    let flag = |bit: i64| -> R<IntValue<'ctx>> {
        let set = b.build_and(flags, i64t.const_int(bit as u64, false), "")?;
        Ok(b.build_int_compare(IntPredicate::NE, set, i64t.const_zero(), "")?)
    };
    // The partial tile, r-major like the stack tile: vector v of row r at r · nr + v · lanes.
    let partial_at = |i: i64| unsafe { b.build_in_bounds_gep(f32t, partial, &[i64t.const_int((i * lanes) as u64, false)], "") };
    let (resume, start) = (ctx.append_basic_block(f, "resume"), ctx.append_basic_block(f, "start"));
    b.build_conditional_branch(flag(FROM_PARTIAL)?, resume, start)?;
    b.position_at_end(resume);
    // (The runtime's partial tiles are float-aligned only.)
    for (i, a) in tile_accs.iter().enumerate() {
        let v = b.build_load(vt, partial_at(i as i64)?, "")?;
        v.as_instruction_value().unwrap().set_alignment(4).map_err(|e| CodegenError::Llvm(e.to_string()))?;
        b.build_store(*a, v)?;
    }
    b.build_unconditional_branch(start)?;
    b.position_at_end(start);
    let fma = Intrinsic::find("llvm.fma").and_then(|i| i.get_declaration(module, &[vt.into()])).expect("llvm.fma");
    // Where A's element (p, r) is: the packed panel's k × mr floats, or the image (direct).
    let a_addr = |p: IntValue<'ctx>, r: i64, direct: Option<i64>| -> R<PointerValue<'ctx>> {
        let off = match direct {
            None => b.build_int_add(b.build_int_mul(p, i64t.const_int(mr as u64, false), "")?, i64t.const_int(r as u64, false), "")?,
            Some(row_step) => {
                let slot = unsafe { b.build_in_bounds_gep(i64t, a_steps, &[p], "")? };
                let base = b.build_load(i64t, slot, "")?.into_int_value();
                b.build_int_add(base, i64t.const_int((r * row_step) as u64, true), "")?
            }
        };
        Ok(unsafe { b.build_in_bounds_gep(f32t, pa, &[off], "")? })
    };
    // One k step into chain `chain`: B's row `b_row` of `b_values` times A's column `p`.
    let step = |b_values: PointerValue<'ctx>, b_row: IntValue<'ctx>, p: IntValue<'ctx>, direct: Option<i64>, chain: usize| -> R<()> {
        let b_row = b.build_int_mul(b_row, i64t.const_int(tile.nr as u64, false), "")?;
        let mut bv: Vec<VectorValue> = vec![];
        for v in 0..nv {
            let off = b.build_int_add(b_row, i64t.const_int((v * lanes) as u64, false), "")?;
            let addr = unsafe { b.build_in_bounds_gep(f32t, b_values, &[off], "")? };
            let load = b.build_load(vt, addr, "")?;
            load.as_instruction_value().unwrap().set_alignment(vector_align).map_err(|e| CodegenError::Llvm(e.to_string()))?;
            bv.push(load.into_vector_value());
        }
        for r in 0..mr {
            let addr = a_addr(p, r, direct)?;
            let a = b.build_load(f32t, addr, "")?;
            let splat = splat(&b, ctx, vt, a.into_float_value())?;
            for v in 0..nv {
                let slot = chain_accs[chain][(r * nv + v) as usize];
                let c = b.build_load(vt, slot, "")?;
                let args: [BasicMetadataValueEnum; 3] = [splat.into(), bv[v as usize].into(), c.into()];
                let inkwell::values::ValueKind::Basic(sum) = b.build_call(fma, &args, "")?.try_as_basic_value() else { unreachable!("fma returns a value") };
                b.build_store(slot, sum)?;
            }
        }
        Ok(())
    };
    // Main loop, UNROLL steps at a time, then the remainder one step at a time.
    let k_loop = |direct: Option<i64>| -> R<()> {
        b.build_store(p_slot, i64t.const_zero())?;
        let main_end = b.build_int_sub(kc, i64t.const_int(UNROLL as u64 - 1, false), "")?;
        counted_loop(ctx, &b, f, p_slot, main_end, UNROLL, |p| {
            for u in 0..UNROLL {
                let p = b.build_int_add(p, i64t.const_int(u as u64, false), "")?;
                step(pb, p, p, direct, 0)?;
            }
            Ok(())
        })?;
        counted_loop(ctx, &b, f, p_slot, kc, 1, |p| step(pb, p, p, direct, 0))
    };
    // The kept rows of a sparse panel, a chain a row in turn, then the chains added.
    let sparse_loop = || -> R<()> {
        let i32t = ctx.i32_type();
        let count = b.build_int_s_extend(b.build_load(i32t, pb, "count")?.into_int_value(), i64t, "")?;
        let index = unsafe { b.build_in_bounds_gep(f32t, pb, &[i64t.const_int(SparsePanel::HEADER as u64, false)], "")? };
        // The values follow the header and the kept rows' indices, padded to a whole vector.
        let padded_count = b.build_and(b.build_int_add(count, i64t.const_int((super::LANES - 1) as u64, false), "")?, i64t.const_int((-super::LANES) as u64, true), "")?;
        let values_at = b.build_int_add(padded_count, i64t.const_int(SparsePanel::HEADER as u64, false), "")?;
        let values = unsafe { b.build_in_bounds_gep(f32t, pb, &[values_at], "")? };
        let row_k = |i: IntValue<'ctx>| -> R<IntValue<'ctx>> {
            let slot = unsafe { b.build_in_bounds_gep(i32t, index, &[i], "")? };
            Ok(b.build_int_s_extend(b.build_load(i32t, slot, "")?.into_int_value(), i64t, "")?)
        };
        b.build_store(p_slot, i64t.const_zero())?;
        let main_end = b.build_int_sub(count, i64t.const_int(chains as u64 - 1, false), "")?;
        counted_loop(ctx, &b, f, p_slot, main_end, chains, |i| {
            for c in 0..chains {
                let i = b.build_int_add(i, i64t.const_int(c as u64, false), "")?;
                step(values, i, row_k(i)?, None, c as usize)?;
            }
            Ok(())
        })?;
        counted_loop(ctx, &b, f, p_slot, count, 1, |i| step(values, i, row_k(i)?, None, 0))?;
        // Pairwise: chain c += chain c + w for widths 1, 2, 4, ...
        let (chains, mut width) = (chains as usize, 1usize);
        while width < chains {
            for c in (0..chains).step_by(2 * width).filter(|c| c + width < chains) {
                for (x, y) in chain_accs[c].iter().zip(&chain_accs[c + width]) {
                    let sum = b.build_float_add(b.build_load(vt, *x, "")?.into_vector_value(), b.build_load(vt, *y, "")?.into_vector_value(), "")?;
                    b.build_store(*x, sum)?;
                }
            }
            width *= 2;
        }
        Ok(())
    };
    // Sparse rows: each of the tile's columns (one row of A) a dot product over its kept runs,
    // `ROW_CHAINS` sums in turn; the sums go into the register tile's vector.
    let rows_loop = |block: i64| -> R<()> {
        let i32t = ctx.i32_type();
        let c64 = |x: i64| i64t.const_int(x as u64, true);
        let (rt, chain_slots) = (row_type, &row_slots);
        let row_fma = Intrinsic::find("llvm.fma").and_then(|i| i.get_declaration(module, &[rt])).expect("llvm.fma");
        let mut tile_vector = vt.get_undef();
        for c in 0..tile.nr {
            let count = b.build_int_s_extend(b.build_load(i32t, unsafe { b.build_in_bounds_gep(i32t, pb, &[c64(c)], "")? }, "")?.into_int_value(), i64t, "")?;
            // The column's runs: their k, then their values (`SparseRows`).
            let column_at = b.build_int_s_extend(b.build_load(i32t, unsafe { b.build_in_bounds_gep(i32t, pb, &[c64(tile.nr + c)], "")? }, "")?.into_int_value(), i64t, "")?;
            let column = unsafe { b.build_in_bounds_gep(f32t, pb, &[column_at], "")? };
            let values = unsafe { b.build_in_bounds_gep(f32t, column, &[count], "")? };
            for slot in chain_slots {
                b.build_store(*slot, rt.const_zero())?;
            }
            let step = |i: IntValue<'ctx>, chain: usize| -> R<()> {
                let p = b.build_int_s_extend(b.build_load(i32t, unsafe { b.build_in_bounds_gep(i32t, column, &[i], "")? }, "")?.into_int_value(), i64t, "")?;
                let w = b.build_load(rt, unsafe { b.build_in_bounds_gep(f32t, values, &[b.build_int_mul(i, c64(block), "")?], "")? }, "")?;
                let x = b.build_load(rt, unsafe { b.build_in_bounds_gep(f32t, pa, &[p], "")? }, "")?;
                for v in [w, x] {
                    v.as_instruction_value().unwrap().set_alignment(4).map_err(|e| CodegenError::Llvm(e.to_string()))?;
                }
                let acc = b.build_load(rt, chain_slots[chain], "")?;
                let args: [BasicMetadataValueEnum; 3] = [w.into(), x.into(), acc.into()];
                let inkwell::values::ValueKind::Basic(sum) = b.build_call(row_fma, &args, "")?.try_as_basic_value() else { unreachable!("fma returns a value") };
                b.build_store(chain_slots[chain], sum)?;
                Ok(())
            };
            b.build_store(p_slot, i64t.const_zero())?;
            let main_end = b.build_int_sub(count, c64(ROW_CHAINS as i64 - 1), "")?;
            counted_loop(ctx, &b, f, p_slot, main_end, ROW_CHAINS as i64, |i| {
                for u in 0..ROW_CHAINS {
                    step(b.build_int_add(i, c64(u as i64), "")?, u)?;
                }
                Ok(())
            })?;
            counted_loop(ctx, &b, f, p_slot, count, 1, |i| step(i, 0))?;
            // (s0 + s1) + (s2 + s3), then a vector's lanes in order.
            let load = |i: usize| b.build_load(rt, chain_slots[i], "");
            let pair = |x: usize, y: usize| -> R<inkwell::values::BasicValueEnum<'ctx>> {
                Ok(if block == 1 {
                    b.build_float_add(load(x)?.into_float_value(), load(y)?.into_float_value(), "")?.into()
                } else {
                    b.build_float_add(load(x)?.into_vector_value(), load(y)?.into_vector_value(), "")?.into()
                })
            };
            let (lo, hi) = (pair(0, 1)?, pair(2, 3)?);
            let sum = if block == 1 {
                b.build_float_add(lo.into_float_value(), hi.into_float_value(), "")?
            } else {
                let v = b.build_float_add(lo.into_vector_value(), hi.into_vector_value(), "")?;
                let mut total = b.build_extract_element(v, ctx.i32_type().const_zero(), "")?.into_float_value();
                for lane in 1..block {
                    let x = b.build_extract_element(v, ctx.i32_type().const_int(lane as u64, false), "")?.into_float_value();
                    total = b.build_float_add(total, x, "")?;
                }
                total
            };
            tile_vector = b.build_insert_element(tile_vector, sum, ctx.i32_type().const_int(c as u64, false), "")?;
        }
        b.build_store(chain_accs[0][0], tile_vector)?;
        Ok(())
    };
    // A weight in code (`kernels::weights_in_code`): the tile's panel of features, chosen by
    // its first column, is a run of straight-line steps over the chunks of A's rows (packed
    // row-major), each row's sums in `chains` in turn (FMA latency × 2 pipes over the
    // rows), added pairwise at the end. A step's picks and values serve every row.
    // Each step's picks and values are constants of the kernel's own tables, at addresses
    // fixed in the code. (Not LLVM constants: as those, a permute by a constant mask went
    // through the shuffle combiner and each vector through the constant pool's search for
    // its duplicate, and a 256² layer at 90% zeros took 3–4 s to compile, 2000 steps 17 s.
    // The tables are externally initialised so that no pass folds their loads back.)
    let in_code_loop = |key: crate::kernels::weights_in_code::WeightKey| -> R<()> {
        use crate::kernels::weights_in_code as wic;
        let weight = wic::lookup(key).ok_or_else(|| CodegenError::Unsupported(format!("weight {key} in code: its values were not registered in this process")))?;
        if weight.rows != spec.shape.n || weight.cols != spec.shape.k || mr > super::MAX_IN_CODE_ROWS || nv != 1 {
            return Err(CodegenError::Unsupported(format!("weight {key} in code is {}x{}, not the product's {}x{} on a {mr} x {lanes} tile", weight.rows, weight.cols, spec.shape.n, spec.shape.k)));
        }
        let row_elems = wic::a_row_elems(spec.shape.k, lanes);
        let plan = wic::plan(&weight, lanes);
        let i32t = ctx.i32_type();
        // Picks are bytes (zero-extended as they load: `vpmovzxbd`), 16 bytes a step
        // beside the values' 64 where their i32 were 64 too.
        let (i8t, it) = (ctx.i8_type(), i32t.vec_type(lanes as u32));
        let bt = i8t.vec_type(lanes as u32);
        let steps: Vec<&wic::Step> = plan.iter().flatten().flat_map(|c| &c.steps).collect();
        let table = |name: &str, ty: VectorType<'ctx>, init: inkwell::values::ArrayValue<'ctx>| -> PointerValue<'ctx> {
            let g = module.add_global(ty.array_type(steps.len() as u32), None, &format!("{name}_{}", f.get_name().to_string_lossy()));
            g.set_linkage(inkwell::module::Linkage::Internal);
            g.set_externally_initialized(true);
            g.set_alignment(64);
            g.set_constant(false);
            g.set_initializer(&init);
            g.as_pointer_value()
        };
        let picks: Vec<VectorValue> = steps.iter().map(|s| VectorType::const_vector(&s.pick.iter().map(|p| i8t.const_int(p.unwrap_or(0) as u64, false)).collect::<Vec<_>>())).collect();
        let values: Vec<VectorValue> = steps.iter().map(|s| VectorType::const_vector(&s.values.iter().map(|&v| f32t.const_float(v as f64)).collect::<Vec<_>>())).collect();
        let (pick_table, value_table) = (table("picks", bt, bt.const_array(&picks)), table("values", vt, vt.const_array(&values)));
        // A chunk of two vectors picked from by `vpermi2ps` (AVX-512), or of one by `vpermps`.
        let two = wic::chunk_width(lanes) == 2 * lanes;
        let permute_name = if two { "llvm.x86.avx512.vpermi2var.ps.512" } else { "llvm.x86.avx2.permps" };
        let permute = Intrinsic::find(permute_name).and_then(|i| i.get_declaration(module, &[])).unwrap_or_else(|| panic!("intrinsic {permute_name}"));
        // Chains of sums per row: 8 in flight over all rows (4 on 16 ymm registers), two at
        // least per row.
        let chains = ((if lanes == 16 { 8 } else { 4 }) / mr as usize).max(2);
        let panel = b.build_int_signed_div(col0, i64t.const_int(lanes as u64, false), "panel")?;
        let (none_bb, done_bb) = (ctx.append_basic_block(f, "no_panel"), ctx.append_basic_block(f, "in_code_done"));
        let blocks: Vec<_> = plan.iter().map(|_| ctx.append_basic_block(f, "panel")).collect();
        let cases: Vec<_> = blocks.iter().enumerate().map(|(p, bb)| (i64t.const_int(p as u64, false), *bb)).collect();
        b.build_switch(panel, none_bb, &cases)?;
        b.position_at_end(none_bb);
        for r in 0..mr as usize {
            b.build_store(chain_accs[0][r], vt.const_zero())?;
        }
        b.build_unconditional_branch(done_bb)?;
        let call = |f: FunctionValue<'ctx>, args: &[BasicMetadataValueEnum<'ctx>]| -> R<VectorValue<'ctx>> {
            let inkwell::values::ValueKind::Basic(r) = b.build_call(f, args, "")?.try_as_basic_value() else { unreachable!("a value") };
            Ok(r.into_vector_value())
        };
        let mut t = 0u64;
        for (chunks, bb) in plan.iter().zip(&blocks) {
            b.position_at_end(*bb);
            let mut sums = vec![vec![vt.const_zero(); chains]; mr as usize];
            let at = |table: PointerValue<'ctx>, ty: VectorType<'ctx>, step: u64, align: u32| -> R<VectorValue<'ctx>> {
                let addr = unsafe { b.build_in_bounds_gep(ty.array_type(steps.len() as u32), table, &[i64t.const_zero(), i64t.const_int(step, false)], "")? };
                let load = b.build_load(ty, addr, "")?;
                load.as_instruction_value().unwrap().set_alignment(align).map_err(|e| CodegenError::Llvm(e.to_string()))?;
                Ok(load.into_vector_value())
            };
            let mut i = 0;
            for c in chunks {
                // Each row's chunk of x, loaded once for the chunk's steps.
                let mut xs = vec![];
                for r in 0..mr {
                    for half in 0..(wic::chunk_width(lanes) / lanes) {
                        let at = r * row_elems + c.chunk * wic::chunk_width(lanes) + half * lanes;
                        let addr = unsafe { b.build_in_bounds_gep(f32t, pa, &[i64t.const_int(at as u64, false)], "")? };
                        let x = b.build_load(vt, addr, "x")?;
                        x.as_instruction_value().unwrap().set_alignment(4).map_err(|e| CodegenError::Llvm(e.to_string()))?;
                        xs.push(x.into_vector_value());
                    }
                }
                let per_row = xs.len() / mr as usize;
                for _ in &c.steps {
                    let pick = b.build_int_z_extend(at(pick_table, bt, t, lanes as u32)?, it, "")?;
                    let values = at(value_table, vt, t, vector_align)?;
                    for (r, sums) in sums.iter_mut().enumerate() {
                        let x = &xs[r * per_row..(r + 1) * per_row];
                        let picked = if two { call(permute, &[x[0].into(), pick.into(), x[1].into()])? } else { call(permute, &[x[0].into(), pick.into()])? };
                        sums[i % chains] = call(fma, &[picked.into(), values.into(), sums[i % chains].into()])?;
                    }
                    (i, t) = (i + 1, t + 1);
                }
            }
            for (r, sums) in sums.iter_mut().enumerate() {
                let mut width = 1;
                while width < chains {
                    for c in (0..chains).step_by(2 * width).filter(|c| c + width < chains) {
                        sums[c] = b.build_float_add(sums[c], sums[c + width], "")?;
                    }
                    width *= 2;
                }
                b.build_store(chain_accs[0][r], sums[0])?;
            }
            b.build_unconditional_branch(done_bb)?;
        }
        b.position_at_end(done_bb);
        Ok(())
    };
    // An int8 product: per quad of k, each row's four uint8 of A (from its row of the panel)
    // broadcast against each vector of B's columns × four int8. Pairs
    // (`ProductSums::SaturatedPairs`, 8 lanes): `vpmaddubsw` (u8 × s8 pair sums saturated to
    // int16), `vpmaddwd` by ones (the pairs' sums in int32), added to the tile. Exact: `vpdpbusd`, the four products of each lane added to
    // it in one instruction (8 or 16 lanes).
    let int8_loop = |sums: crate::kernels::quantized::ProductSums| -> R<()> {
        let i32t = ctx.i32_type();
        let (bytes, pairs) = (ctx.i8_type().vec_type(32), ctx.i16_type().vec_type(16));
        let intrinsic = |name: &str| Intrinsic::find(name).and_then(|i| i.get_declaration(module, &[])).unwrap_or_else(|| panic!("intrinsic {name}"));
        let exact = sums == crate::kernels::quantized::ProductSums::Exact;
        let (maddubs, maddwd) = (intrinsic("llvm.x86.avx2.pmadd.ub.sw"), intrinsic("llvm.x86.avx2.pmadd.wd"));
        let dpbusd = intrinsic(if lanes == 16 { "llvm.x86.avx512.vpdpbusd.512" } else { "llvm.x86.avx512.vpdpbusd.256" });
        assert!(exact || lanes == 8, "the pairs' tile is AVX2's");
        let ones = VectorType::const_vector(&vec![ctx.i16_type().const_int(1, false); pairs.get_size() as usize]);
        let c64 = |x: i64| i64t.const_int(x as u64, true);
        // A's rows lie one after the other, kc quads each, past the panel's header.
        let mut a_rows = vec![];
        for r in 0..mr {
            let at = b.build_int_add(b.build_int_mul(kc, c64(r), "")?, c64(crate::kernels::quantized::A_HEADER), "")?;
            a_rows.push(unsafe { b.build_in_bounds_gep(i32t, pa, &[at], "")? });
        }
        let step = |q: IntValue<'ctx>| -> R<()> {
            let b_at = b.build_int_add(b.build_int_mul(q, c64(tile.nr), "")?, c64(tile.nr), "")?;
            let mut bv = vec![];
            for v in 0..nv {
                let addr = unsafe { b.build_in_bounds_gep(i32t, pb, &[b.build_int_add(b_at, c64(v * lanes), "")?], "")? };
                let load = b.build_load(acc_type, addr, "")?;
                load.as_instruction_value().unwrap().set_alignment(vector_align).map_err(|e| CodegenError::Llvm(e.to_string()))?;
                bv.push(load);
            }
            let call = |f: FunctionValue<'ctx>, args: &[BasicMetadataValueEnum<'ctx>]| -> R<inkwell::values::BasicValueEnum<'ctx>> {
                let inkwell::values::ValueKind::Basic(r) = b.build_call(f, args, "")?.try_as_basic_value() else { unreachable!("a value") };
                Ok(r)
            };
            for r in 0..mr {
                let addr = unsafe { b.build_in_bounds_gep(i32t, a_rows[r as usize], &[q], "")? };
                let quad = b.build_load(i32t, addr, "")?.into_int_value();
                let a = splat(&b, ctx, acc_type, quad)?;
                for v in 0..nv {
                    let slot = chain_accs[0][(r * nv + v) as usize];
                    let acc = b.build_load(acc_type, slot, "")?;
                    let sum = if exact {
                        call(dpbusd, &[acc.into(), a.into(), bv[v as usize].into()])?.into_vector_value()
                    } else {
                        let (a, bytes_of_b) = (b.build_bit_cast(a, bytes, "")?, b.build_bit_cast(bv[v as usize], bytes, "")?);
                        let p16 = call(maddubs, &[a.into(), bytes_of_b.into()])?;
                        let p32 = call(maddwd, &[p16.into(), ones.into()])?.into_vector_value();
                        b.build_int_add(acc.into_vector_value(), p32, "")?
                    };
                    b.build_store(slot, sum)?;
                }
            }
            Ok(())
        };
        b.build_store(p_slot, i64t.const_zero())?;
        let main_end = b.build_int_sub(kc, c64(UNROLL - 1), "")?;
        counted_loop(ctx, &b, f, p_slot, main_end, UNROLL, |q| {
            for u in 0..UNROLL {
                step(b.build_int_add(q, c64(u), "")?)?;
            }
            Ok(())
        })?;
        counted_loop(ctx, &b, f, p_slot, kc, 1, step)
    };
    match &spec.shape.im2col {
        _ if spec.shape.quant.is_some() => int8_loop(spec.shape.quant.expect("an int8 product").sums)?,
        Some(w) => {
            let (packed_bb, direct_bb, done_bb) = (ctx.append_basic_block(f, "packed"), ctx.append_basic_block(f, "direct"), ctx.append_basic_block(f, "product"));
            b.build_conditional_branch(b.build_is_null(a_steps, "")?, packed_bb, direct_bb)?;
            b.position_at_end(packed_bb);
            k_loop(None)?;
            b.build_unconditional_branch(done_bb)?;
            b.position_at_end(direct_bb);
            k_loop(Some(w.over_copy().row_step()))?;
            b.build_unconditional_branch(done_bb)?;
            b.position_at_end(done_bb);
        }
        None if spec.shape.sparse_b.is_some() => {
            let (sparse_bb, dense_bb, done_bb) = (ctx.append_basic_block(f, "sparse"), ctx.append_basic_block(f, "dense"), ctx.append_basic_block(f, "product"));
            b.build_conditional_branch(flag(DENSE_B)?, dense_bb, sparse_bb)?;
            b.position_at_end(sparse_bb);
            match spec.shape.sparse_b {
                Some(SparseFormat::Rows(block)) => rows_loop(block)?,
                Some(SparseFormat::InCode { key, .. }) => in_code_loop(key)?,
                _ => sparse_loop()?,
            }
            b.build_unconditional_branch(done_bb)?;
            b.position_at_end(dense_bb);
            k_loop(None)?;
            b.build_unconditional_branch(done_bb)?;
            b.position_at_end(done_bb);
        }
        None => k_loop(None)?,
    }

    // A chunk that is not the last keeps its sums for the next.
    let (keep, finish) = (ctx.append_basic_block(f, "keep"), ctx.append_basic_block(f, "finish"));
    b.build_conditional_branch(flag(TO_PARTIAL)?, keep, finish)?;
    b.position_at_end(keep);
    for (i, a) in tile_accs.iter().enumerate() {
        let v = b.build_load(vt, *a, "")?;
        b.build_store(partial_at(i as i64)?, v)?.set_alignment(4).map_err(|e| CodegenError::Llvm(e.to_string()))?;
    }
    b.build_return(None)?;
    b.position_at_end(finish);

    // Epilogue: the tile goes through memory on the stack (L1), so the epilogue is scalar
    // code over a column loop the vectoriser widens, the same expression code as any kernel.
    let dequantized = match &spec.shape.quant {
        Some(q) => Some(dequantize(ctx, module, &b, &spec.shape, q, table, pa, pb, col0, cols, tile_accs)?),
        None => None,
    };
    for r in 0..mr {
        for v in 0..nv {
            let addr = unsafe { b.build_in_bounds_gep(f32t, tile_mem, &[i64t.const_int((r * tile.nr + v * lanes) as u64, false)], "")? };
            let c = match &dequantized {
                Some(tile) => tile[(r * nv + v) as usize].into(),
                None => b.build_load(vt, tile_accs[(r * nv + v) as usize], "")?,
            };
            b.build_store(addr, c)?.set_alignment(vector_align).map_err(|e| CodegenError::Llvm(e.to_string()))?;
        }
    }
    let mut e = Emitter { ctx, module, b: &b, k, f, bufs, vars, accs, memo: HashMap::new(), params, interleave: opts.interleave, eager_avx512: target.eager_avx512() };
    // One loop over the tile's rows around the column loop: the epilogue's code exists once
    // (unrolled per row, a gelu over an 8-row tile was 50 KB of code and ~100 ms of LLVM).
    b.build_store(r_slot, i64t.const_zero())?;
    let row_end = b.build_select(b.build_int_compare(IntPredicate::SLT, rows, i64t.const_int(mr as u64, false), "")?, rows, i64t.const_int(mr as u64, false), "")?.into_int_value();
    counted_loop(ctx, &b, f, r_slot, row_end, 1, |r| {
        let row = b.build_int_add(row0, r, "")?;
        let mut skip = None;
        match (spec.ow_var, &spec.shape.im2col) {
            // A convolution's row is the pixel (oh, ow) = (row / W, row % W) of rows W wide
            // (`Im2col::row_width`); on wide rows, the indices past OW are dropped.
            (Some(ow_var), Some(w)) => {
                let width = i64t.const_int(w.row_width(mr) as u64, false);
                let ow = b.build_int_signed_rem(row, width, "")?;
                b.build_store(e.vars[&spec.row_var], b.build_int_signed_div(row, width, "")?)?;
                b.build_store(e.vars[&ow_var], ow)?;
                if w.row_width(mr) != w.out_w {
                    let (keep, next) = (ctx.append_basic_block(f, "pixel"), ctx.append_basic_block(f, "next_row"));
                    let past = b.build_int_compare(IntPredicate::SGE, ow, i64t.const_int(w.out_w as u64, false), "")?;
                    b.build_conditional_branch(past, next, keep)?;
                    b.position_at_end(keep);
                    skip = Some(next);
                }
            }
            _ => {
                b.build_store(e.vars[&spec.row_var], row)?;
            }
        }
        b.build_store(j_slot, i64t.const_zero())?;
        let row_mem = unsafe { b.build_in_bounds_gep(f32t, tile_mem, &[b.build_int_mul(r, i64t.const_int(tile.nr as u64, false), "")?], "")? };
        // Not interleaved: a tile row (nr columns, a few vectors) is shorter than the
        // vectoriser's default step of four vectors, which left every element of the
        // epilogue to the scalar remainder loop.
        counted_loop_interleaved(ctx, &b, f, j_slot, cols, 1, Some(1), |j| {
            b.build_store(e.vars[&spec.col_var], b.build_int_add(col0, j, "")?)?;
            let addr = unsafe { b.build_in_bounds_gep(f32t, row_mem, &[j], "")? };
            b.build_store(e.accs[spec.acc.0 as usize], b.build_load(f32t, addr, "")?)?;
            e.memo.clear();
            for s in body_stmts {
                e.emit_stmt(s)?;
            }
            Ok(())
        })?;
        if let Some(next) = skip {
            b.build_unconditional_branch(next)?;
            b.position_at_end(next);
        }
        Ok(())
    })?;
    b.build_return(None)?;
    Ok(())
}

/// An int8 tile's sums dequantized (`kernels::quantized`): the offsets of A's zero point
/// (times B's column sums less zb·k) and of B's (times A's row sums) taken off in int32, the
/// result converted and multiplied by sa·sb in float32 (with a bias: one fused multiply-add)
/// — fbgemm's `ReQuantizeForFloat` as PyTorch's build computes it.
/// A's zero point, scale, k and row sums head its panel; B's column sums its; B's scales and zero
/// points are read from their buffers (one for all columns, or one a column: clamped to the
/// last column past the matrix edge).
#[allow(clippy::too_many_arguments)]
fn dequantize<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    b: &inkwell::builder::Builder<'ctx>,
    shape: &crate::kernels::gemm::GemmShape,
    q: &crate::kernels::quantized::QuantizedB,
    table: PointerValue<'ctx>,
    pa: PointerValue<'ctx>,
    pb: PointerValue<'ctx>,
    col0: IntValue<'ctx>,
    cols: IntValue<'ctx>,
    accs: &[PointerValue<'ctx>],
) -> R<Vec<VectorValue<'ctx>>> {
    let (i64t, i32t, f32t) = (ctx.i64_type(), ctx.i32_type(), ctx.f32_type());
    let tile = shape.tile;
    let (mr, nv, lanes) = (tile.mr, tile.vectors(), tile.lanes);
    let (iv, fv) = (i32t.vec_type(lanes as u32), f32t.vec_type(lanes as u32));
    let c64 = |x: i64| i64t.const_int(x as u64, true);
    let splat_int = |x: IntValue<'ctx>| splat(b, ctx, iv, x);
    let word = |base: PointerValue<'ctx>, i: i64| -> R<IntValue<'ctx>> {
        let addr = unsafe { b.build_in_bounds_gep(i32t, base, &[c64(i)], "")? };
        Ok(b.build_load(i32t, addr, "")?.into_int_value())
    };
    let buffer = |buf: crate::lower::loop_ir::BufId| -> R<PointerValue<'ctx>> {
        let slot = unsafe { b.build_in_bounds_gep(ctx.ptr_type(AddressSpace::default()), table, &[c64(buf.0 as i64)], "")? };
        Ok(b.build_load(ctx.ptr_type(AddressSpace::default()), slot, "")?.into_pointer_value())
    };
    // Columns v·lanes.. of B's scales or zero points (as int32 bits): one masked load (`vpmaskmovd`)
    // of the tile's columns, zero past its last (lanes the tile does not store).
    let lane_index = VectorType::const_vector(&(0..lanes).map(|l| i64t.const_int(l as u64, false)).collect::<Vec<_>>());
    let masked_load = Intrinsic::find("llvm.masked.load").and_then(|i| i.get_declaration(module, &[iv.into(), ctx.ptr_type(AddressSpace::default()).into()])).expect("llvm.masked.load");
    let per_column = |base: PointerValue<'ctx>, v: i64, per_column: bool| -> R<VectorValue<'ctx>> {
        if !per_column {
            return splat_int(word(base, 0)?);
        }
        let left = splat(b, ctx, i64t.vec_type(lanes as u32), b.build_int_sub(cols, c64(v * lanes), "")?)?;
        let mask = b.build_int_compare(IntPredicate::SLT, lane_index, left, "")?;
        let addr = unsafe { b.build_in_bounds_gep(i32t, base, &[b.build_int_add(col0, c64(v * lanes), "")?], "")? };
        let args: [BasicMetadataValueEnum; 4] = [addr.into(), i32t.const_int(4, false).into(), mask.into(), iv.const_zero().into()];
        let inkwell::values::ValueKind::Basic(x) = b.build_call(masked_load, &args, "")?.try_as_basic_value() else { unreachable!("a load returns a value") };
        Ok(x.into_vector_value())
    };
    let a_zero_point = splat_int(word(pa, 0)?)?;
    let a_scale = b.build_bit_cast(splat_int(word(pa, 1)?)?, fv, "")?.into_vector_value();
    let (scales, zero_points) = (buffer(q.scale)?, buffer(q.zero_point)?);
    let k = splat_int(word(pa, 2)?)?;
    let fma = Intrinsic::find("llvm.fma").and_then(|i| i.get_declaration(module, &[fv.into()])).expect("llvm.fma");
    let mut out = vec![None; (mr * nv) as usize];
    for v in 0..nv {
        let addr = unsafe { b.build_in_bounds_gep(i32t, pb, &[c64(v * lanes)], "")? };
        let col_sums = b.build_load(iv, addr, "")?.into_vector_value();
        let zb = per_column(zero_points, v, q.per_column)?;
        let sb = b.build_bit_cast(per_column(scales, v, q.per_column)?, fv, "")?.into_vector_value();
        let bias = match q.bias {
            Some(buf) => Some(b.build_bit_cast(per_column(buffer(buf)?, v, true)?, fv, "")?.into_vector_value()),
            None => None,
        };
        let col_offsets = b.build_int_sub(col_sums, b.build_int_mul(zb, k, "")?, "")?;
        let a_offsets = b.build_int_mul(a_zero_point, col_offsets, "")?;
        let multiplier = b.build_float_mul(a_scale, sb, "")?;
        let requantization = match q.requantize {
            Some(p) => Some(Requantization::of_columns(ctx, module, b, multiplier, bias, q.per_column, p)?),
            None => None,
        };
        for r in 0..mr {
            let row_sum = splat_int(word(pa, 3 + r)?)?;
            let acc = b.build_load(iv, accs[(r * nv + v) as usize], "")?.into_vector_value();
            let raw = b.build_int_sub(b.build_int_sub(acc, a_offsets, "")?, b.build_int_mul(row_sum, zb, "")?, "")?;
            let x = b.build_signed_int_to_float(raw, fv, "")?;
            if let Some(rq) = &requantization {
                out[(r * nv + v) as usize] = Some(rq.apply(ctx, b, x)?);
                continue;
            }
            out[(r * nv + v) as usize] = Some(match bias {
                Some(bias) => {
                    let args: [BasicMetadataValueEnum; 3] = [x.into(), multiplier.into(), bias.into()];
                    let inkwell::values::ValueKind::Basic(y) = b.build_call(fma, &args, "")?.try_as_basic_value() else { unreachable!("fma returns a value") };
                    y.into_vector_value()
                }
                None => b.build_float_mul(x, multiplier, "")?,
            });
        }
    }
    Ok(out.into_iter().map(|x| x.expect("every vector of the tile")).collect())
}

/// How a statically quantized tile's float sums become uint8 values (as float32), as
/// `kernels::quantized::requantize`, for one vector of columns (computed once, applied to each
/// row): the bias divided by sa · sb (per column) or its reciprocal for a fused multiply-add (per
/// tensor), and the multiplier sa · sb / so.
struct Requantization<'ctx> {
    bias: BiasTerm<'ctx>,
    multiplier: VectorValue<'ctx>,
    convert: Convert<'ctx>,
    p: crate::kernels::quantized::StaticProduct,
}

/// x86's float32 to int32 conversion (`cvtps2dq`: ties to even, −2³¹ out of range) of 8 or
/// 16 lanes.
#[derive(Clone, Copy)]
enum Convert<'ctx> {
    Avx(FunctionValue<'ctx>),
    Avx512(FunctionValue<'ctx>),
}

enum BiasTerm<'ctx> {
    None,
    /// Added: bias / (sa · sb).
    Add(VectorValue<'ctx>),
    /// fma(bias, 1 / (sa · sb), x), with `llvm.fma`.
    Fma(VectorValue<'ctx>, VectorValue<'ctx>, FunctionValue<'ctx>),
}

impl<'ctx> Requantization<'ctx> {
    /// `scale` is sa · sb of the vector's columns.
    #[allow(clippy::too_many_arguments)]
    fn of_columns(ctx: &'ctx Context, module: &Module<'ctx>, b: &inkwell::builder::Builder<'ctx>, scale: VectorValue<'ctx>, bias: Option<VectorValue<'ctx>>, per_column: bool, p: crate::kernels::quantized::StaticProduct) -> R<Requantization<'ctx>> {
        let fv = scale.get_type();
        let fconst = |v: f32| splat(b, ctx, fv, ctx.f32_type().const_float(v as f64));
        let intrinsic = |name: &str, types: &[inkwell::types::BasicTypeEnum<'ctx>]| Intrinsic::find(name).and_then(|i| i.get_declaration(module, types)).unwrap_or_else(|| panic!("intrinsic {name}"));
        let bias = match bias {
            Some(bias) if per_column => BiasTerm::Add(b.build_float_div(bias, scale, "")?),
            Some(bias) => BiasTerm::Fma(bias, b.build_float_div(fconst(1.0)?, scale, "")?, intrinsic("llvm.fma", &[fv.into()])),
            None => BiasTerm::None,
        };
        let multiplier = b.build_float_div(scale, fconst(p.out.params().scale)?, "")?;
        let convert = match fv.get_size() {
            16 => Convert::Avx512(intrinsic("llvm.x86.avx512.mask.cvtps2dq.512", &[])),
            _ => Convert::Avx(intrinsic("llvm.x86.avx.cvt.ps2dq.256", &[])),
        };
        Ok(Requantization { bias, multiplier, convert, p })
    }

    /// One row's vector `x`: the bias, the multiplier, x86's conversion (ties to even), int16
    /// saturation, the zero point, the uint8 clamp (from the zero point with a relu).
    fn apply(&self, ctx: &'ctx Context, b: &inkwell::builder::Builder<'ctx>, x: VectorValue<'ctx>) -> R<VectorValue<'ctx>> {
        let i32t = ctx.i32_type();
        let (fv, iv) = (x.get_type(), i32t.vec_type(x.get_type().get_size()));
        let iconst = |v: i32| splat(b, ctx, iv, i32t.const_int(v as u32 as u64, true));
        let call = |f: FunctionValue<'ctx>, args: &[BasicMetadataValueEnum<'ctx>]| -> R<VectorValue<'ctx>> {
            let inkwell::values::ValueKind::Basic(y) = b.build_call(f, args, "")?.try_as_basic_value() else { unreachable!("an intrinsic with a value") };
            Ok(y.into_vector_value())
        };
        let x = match self.bias {
            BiasTerm::None => x,
            BiasTerm::Add(term) => b.build_float_add(x, term, "")?,
            BiasTerm::Fma(bias, reciprocal, fma) => call(fma, &[bias.into(), reciprocal.into(), x.into()])?,
        };
        let scaled = b.build_float_mul(x, self.multiplier, "")?;
        let q = match self.convert {
            Convert::Avx(f) => call(f, &[scaled.into()])?,
            // (Every lane, the current rounding mode: `_MM_FROUND_CUR_DIRECTION`.)
            Convert::Avx512(f) => call(f, &[scaled.into(), iv.const_zero().into(), ctx.i16_type().const_all_ones().into(), i32t.const_int(4, false).into()])?,
        };
        let clamp = |v: VectorValue<'ctx>, lo: i32, hi: i32| -> R<VectorValue<'ctx>> {
            let (lo, hi) = (iconst(lo)?, iconst(hi)?);
            let v = b.build_select(b.build_int_compare(IntPredicate::SLT, v, lo, "")?, lo, v, "")?.into_vector_value();
            Ok(b.build_select(b.build_int_compare(IntPredicate::SGT, v, hi, "")?, hi, v, "")?.into_vector_value())
        };
        let out = self.p.out.params();
        let q = clamp(q, -32768, 32767)?;
        let q = b.build_int_add(q, iconst(out.zero_point)?, "")?;
        let q = clamp(q, if self.p.relu { out.zero_point } else { 0 }, 255)?;
        Ok(b.build_signed_int_to_float(q, fv, "")?)
    }
}

/// `x` (a float or an int of `vt`'s element type) in every lane of a `vt`.
fn splat<'ctx>(b: &inkwell::builder::Builder<'ctx>, ctx: &'ctx Context, vt: VectorType<'ctx>, x: impl BasicValue<'ctx>) -> R<VectorValue<'ctx>> {
    let i32t = ctx.i32_type();
    let one = b.build_insert_element(vt.get_undef(), x.as_basic_value_enum(), i32t.const_zero(), "")?;
    let mask = i32t.vec_type(vt.get_size()).const_zero();
    Ok(b.build_shuffle_vector(one, vt.get_undef(), mask, "")?)
}

/// `while *slot < end { body(*slot); *slot += step }`, leaving the builder after the loop.
fn counted_loop<'ctx>(ctx: &'ctx Context, b: &inkwell::builder::Builder<'ctx>, f: FunctionValue<'ctx>, slot: PointerValue<'ctx>, end: IntValue<'ctx>, step: i64, body: impl FnMut(IntValue<'ctx>) -> R<()>) -> R<()> {
    counted_loop_interleaved(ctx, b, f, slot, end, step, None, body)
}

/// [`counted_loop`] with the vectoriser's interleave count set (`llvm.loop.interleave.count`).
#[allow(clippy::too_many_arguments)]
fn counted_loop_interleaved<'ctx>(ctx: &'ctx Context, b: &inkwell::builder::Builder<'ctx>, f: FunctionValue<'ctx>, slot: PointerValue<'ctx>, end: IntValue<'ctx>, step: i64, interleave: Option<u32>, mut body: impl FnMut(IntValue<'ctx>) -> R<()>) -> R<()> {
    let i64t = ctx.i64_type();
    let header = ctx.append_basic_block(f, "loop");
    let body_bb = ctx.append_basic_block(f, "body");
    let exit = ctx.append_basic_block(f, "exit");
    b.build_unconditional_branch(header)?;
    b.position_at_end(header);
    let i = b.build_load(i64t, slot, "")?.into_int_value();
    let more = b.build_int_compare(IntPredicate::SLT, i, end, "")?;
    b.build_conditional_branch(more, body_bb, exit)?;
    b.position_at_end(body_bb);
    body(i)?;
    let next = b.build_int_add(i, i64t.const_int(step as u64, false), "")?;
    b.build_store(slot, next)?;
    let latch = b.build_unconditional_branch(header)?;
    if let Some(n) = interleave {
        crate::codegen::loops::set_interleave_count(ctx, latch, n);
    }
    b.position_at_end(exit);
    Ok(())
}
