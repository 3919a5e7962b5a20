//! Loop IR: what one kernel does, as loops over index variables, loads, stores and
//! accumulators. Expressions live in an arena (a DAG), so a value used twice in a fused chain
//! is one expression, computed once per iteration.
//!
//! Indices are affine in the loop variables (`Index`), which is what strides, broadcasting and
//! later packing/tiling need. Code for symbolic sizes (`symbolic`) reads the integers that
//! follow the sizes from the program's parameters at run time: loop extents `Dim::Sym(p)`,
//! strides `Index::params`, constants `Expr::Param` (a mean's count).

use crate::dtype::{DType, Scalar};
use crate::graph::ir::{BinaryOp, CmpOp, Dim, UnaryOp};
use std::fmt::{self, Write};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VarId(pub u32);
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExprId(pub u32);
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AccId(pub u32);
/// An index into the program's buffer table (inputs, then outputs, then intermediates).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BufId(pub u32);

/// Element offset = offset + sum(var * stride) + sum(var * parameter).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Index {
    pub terms: Vec<(VarId, i64)>,
    pub offset: i64,
    /// Strides that are the program's parameter `p` (symbolic code only).
    pub params: Vec<(VarId, u32)>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Load { buf: BufId, index: Index },
    Const(Scalar),
    /// The program's integer parameter `p`, converted to the expression's dtype.
    Param(u32),
    Acc(AccId),
    Unary(UnaryOp, ExprId),
    Binary(BinaryOp, ExprId, ExprId),
    Compare(CmpOp, ExprId, ExprId),
    Select(ExprId, ExprId, ExprId),
    Cast(ExprId),
    /// A float32 rounded to a uint8 value (as float32), `kernels::quantized::quantize`.
    Quantize { x: ExprId, inverse_scale: f32, zero_point: f32 },
    /// The value of an index expression (int64): an iota's coordinate.
    Index(Index),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combine {
    Add,
    Max,
    Min,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Stmt {
    Loop(Loop),
    Store { buf: BufId, index: Index, value: ExprId },
    /// acc = value
    Init { acc: AccId, value: ExprId },
    /// acc = combine(acc, value)
    Update { acc: AccId, combine: Combine, value: ExprId },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoopKind {
    Serial,
    /// Iterations are split across the thread pool; only the outermost loop of a kernel.
    Parallel,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Loop {
    pub var: VarId,
    pub extent: Dim,
    pub kind: LoopKind,
    pub body: Vec<Stmt>,
}

/// One kernel: a single outermost loop (the unit the runtime parallelises over).
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub name: String,
    pub root: Loop,
    pub exprs: Vec<(Expr, DType)>,
    pub accs: Vec<DType>,
    pub num_vars: u32,
    /// Rough element operations per outer iteration; the runtime's parallel grain.
    pub work_per_iter: i64,
    /// A GEMM: the loop nest is its epilogue, run by the microkernel on each register tile
    /// (`kernels::gemm`), and the runtime's GEMM loops drive it instead of the root loop.
    pub gemm: Option<Box<crate::kernels::gemm::GemmSpec>>,
}

impl Kernel {
    pub fn expr(&self, e: ExprId) -> &Expr {
        &self.exprs[e.0 as usize].0
    }
    pub fn dtype(&self, e: ExprId) -> DType {
        self.exprs[e.0 as usize].1
    }
    /// This kernel with its buffers numbered 0, 1, … in order of first use (GEMM operands,
    /// then the expression arena, then stores in loop order), and the buffer of the program
    /// each number stands for. Kernels that differ only in which buffers of their programs
    /// they touch have the same local form, so they can share code: the runtime hands each
    /// kernel a table of its own buffers (`KernelDecl::buffers`).
    pub fn with_local_buffers(&self) -> (Kernel, Vec<BufId>) {
        let mut order: Vec<BufId> = vec![];
        let mut local = |b: &mut BufId| {
            let i = order.iter().position(|x| x == b).unwrap_or_else(|| {
                order.push(*b);
                order.len() - 1
            });
            *b = BufId(i as u32);
        };
        let mut k = self.clone();
        if let Some(g) = &mut k.gemm {
            local(&mut g.shape.a.buf);
            local(&mut g.shape.b.buf);
            if let Some(q) = &mut g.shape.quant {
                local(&mut q.scale);
                local(&mut q.zero_point);
                if let Some(b) = &mut q.bias {
                    local(b);
                }
            }
        }
        for (e, _) in &mut k.exprs {
            if let Expr::Load { buf, .. } = e {
                local(buf);
            }
        }
        fn stores(l: &mut Loop, local: &mut dyn FnMut(&mut BufId)) {
            for s in &mut l.body {
                match s {
                    Stmt::Loop(inner) => stores(inner, local),
                    Stmt::Store { buf, .. } => local(buf),
                    _ => {}
                }
            }
        }
        stores(&mut k.root, &mut local);
        (k, order)
    }

    pub fn outer_extent(&self) -> i64 {
        match self.root.extent {
            Dim::Const(n) => n,
            Dim::Sym(_) => panic!("a root extent is never a parameter: the runtime passes its range"),
        }
    }
}

/// Builds a kernel's expression arena, sharing identical expressions.
#[derive(Default)]
pub struct ExprArena {
    pub exprs: Vec<(Expr, DType)>,
}

impl ExprArena {
    pub fn add(&mut self, e: Expr, dtype: DType) -> ExprId {
        if let Some(i) = self.exprs.iter().position(|(x, d)| *x == e && *d == dtype) {
            return ExprId(i as u32);
        }
        self.exprs.push((e, dtype));
        ExprId(self.exprs.len() as u32 - 1)
    }
}

// ---------------------------------------------------------------------------------------------
// Text form, for tests and `explain`.

impl fmt::Display for Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self
            .terms
            .iter()
            .map(|(v, s)| if *s == 1 { format!("i{}", v.0) } else { format!("i{}*{}", v.0, s) })
            .chain(self.params.iter().map(|(v, p)| format!("i{}*p{}", v.0, p)))
            .collect();
        if self.offset != 0 || parts.is_empty() {
            parts.push(self.offset.to_string());
        }
        f.write_str(&parts.join(" + "))
    }
}

impl Kernel {
    fn fmt_expr(&self, e: ExprId, out: &mut String) {
        let (expr, dtype) = &self.exprs[e.0 as usize];
        match expr {
            Expr::Load { buf, index } => write!(out, "b{}[{}]", buf.0, index).unwrap(),
            Expr::Const(s) => write!(out, "{s}:{dtype}").unwrap(),
            Expr::Param(p) => write!(out, "p{p}:{dtype}").unwrap(),
            Expr::Index(index) => write!(out, "index({index})").unwrap(),
            Expr::Acc(a) => write!(out, "acc{}", a.0).unwrap(),
            Expr::Unary(op, x) => {
                write!(out, "{}(", op.name()).unwrap();
                self.fmt_expr(*x, out);
                out.push(')');
            }
            Expr::Binary(op, a, b) => self.fmt_call(op.name(), &[*a, *b], out),
            Expr::Compare(op, a, b) => self.fmt_call(op.name(), &[*a, *b], out),
            Expr::Select(c, a, b) => self.fmt_call("select", &[*c, *a, *b], out),
            Expr::Quantize { x, inverse_scale, zero_point } => {
                out.push_str("quantize(");
                self.fmt_expr(*x, out);
                write!(out, ", {inverse_scale}, {zero_point})").unwrap();
            }
            Expr::Cast(x) => {
                write!(out, "cast<{dtype}>(").unwrap();
                self.fmt_expr(*x, out);
                out.push(')');
            }
        }
    }
    fn fmt_call(&self, name: &str, args: &[ExprId], out: &mut String) {
        out.push_str(name);
        out.push('(');
        for (i, a) in args.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            self.fmt_expr(*a, out);
        }
        out.push(')');
    }
    fn fmt_stmt(&self, s: &Stmt, depth: usize, out: &mut String) {
        let pad = "  ".repeat(depth);
        match s {
            Stmt::Loop(l) => self.fmt_loop(l, depth, out),
            Stmt::Store { buf, index, value } => {
                write!(out, "{pad}b{}[{}] = ", buf.0, index).unwrap();
                self.fmt_expr(*value, out);
                out.push('\n');
            }
            Stmt::Init { acc, value } => {
                write!(out, "{pad}acc{} = ", acc.0).unwrap();
                self.fmt_expr(*value, out);
                out.push('\n');
            }
            Stmt::Update { acc, combine, value } => {
                write!(out, "{pad}acc{} {:?}= ", acc.0, combine).unwrap();
                self.fmt_expr(*value, out);
                out.push('\n');
            }
        }
    }
    fn fmt_loop(&self, l: &Loop, depth: usize, out: &mut String) {
        let pad = "  ".repeat(depth);
        let kind = if l.kind == LoopKind::Parallel { "parallel " } else { "" };
        let extent = match l.extent {
            Dim::Const(n) => n.to_string(),
            Dim::Sym(p) => format!("p{p}"),
        };
        writeln!(out, "{pad}{kind}for i{} in 0..{extent} {{", l.var.0).unwrap();
        for s in &l.body {
            self.fmt_stmt(s, depth + 1, out);
        }
        writeln!(out, "{pad}}}").unwrap();
    }
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::new();
        writeln!(out, "kernel {}:", self.name).unwrap();
        if let Some(g) = &self.gemm {
            let s = &g.shape;
            let operand = |o: &crate::kernels::gemm::GemmOperand| {
                let at = if o.offset != 0 { format!("{} + ", o.offset) } else { String::new() };
                format!("b{}[{at}batch {:?}, rows {}, cols {}]", o.buf.0, o.batch_strides, o.rows, o.cols)
            };
            writeln!(
                out,
                "  gemm acc{} = {} x {}{}: batch {:?} m {} n {} k {}, tile {}x{}, epilogue per element:",
                g.acc.0, operand(&s.a), operand(&s.b), s.sparse_b.map_or(String::new(), |f| format!(" (sparse {f})")) + &s.quant.map_or(String::new(), |q| format!(" (int8, scales b{}, zero points b{})", q.scale.0, q.zero_point.0)), s.batch, s.m, s.n, s.k, s.tile.mr, s.tile.nr
            )
            .unwrap();
        }
        self.fmt_loop(&self.root, 1, &mut out);
        f.write_str(&out)
    }
}
