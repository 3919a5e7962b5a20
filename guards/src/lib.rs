//! The checks run before each compiled group: does this call's input match what the compiled
//! code assumed? Exactly what the code and its outputs' layout rely on is checked, nothing
//! more: dtype, device, rank, every static size, the strides (of size-1 dims too: the layout
//! PyTorch gives an elementwise result depends on them; of empty tensors none, see
//! [`guarded_strides`]), requires_grad (Kiln computes no gradients) and the global state.
//!
//! Code compiled for symbolic sizes (see `kiln_compiler::lower::symbolic`) takes any size ≥ 2 for a
//! symbolic dim, as long as dims sharing a symbol agree. A tensor with symbolic dims is either
//! dense in a fixed dim order (contiguous, transposed, channels-last: its strides follow its
//! sizes) or has the exact strides it was seen with (a slice of a fixed-width buffer).
//!
//! A failed check is not an error: the frontend runs its original code and may ask for a new
//! specialisation. `check` allocates nothing; it runs on every call.

use kiln_profiler::{DimPlan, Device, GlobalState, TensorMeta, TensorView};
use std::fmt;

/// The most symbols one guard set binds (see `kiln_compiler::lower::symbolic::MAX_SYMBOLS`).
pub const MAX_SYMBOLS: usize = kiln_compiler::lower::symbolic::MAX_SYMBOLS;

/// Why a call did not match its group's guard.
#[derive(thiserror::Error, Clone, Debug, PartialEq, Eq)]
pub enum GuardFailure {
    #[error("{got} tensor inputs, compiled for {want}")]
    Arity { want: usize, got: usize },
    #[error("input {0}: dtype differs")]
    Dtype(usize),
    #[error("input {0}: not on the CPU")]
    Device(usize),
    #[error("input {0}: rank differs")]
    Rank(usize),
    #[error("input {0}: sizes differ")]
    Sizes(usize),
    #[error("input {0}: a symbolic size is 0 or 1")]
    SmallSymbol(usize),
    #[error("input {0}: a size differs from the size it is tied to")]
    Tie(usize),
    #[error("input {0}: strides differ")]
    Strides(usize),
    #[error("input {0}: requires grad")]
    RequiresGrad(usize),
    #[error("compiled under {want}, called under {got}")]
    State { want: GlobalState, got: GlobalState },
}

impl GuardFailure {
    /// A short name for counters: which kind of check failed.
    pub fn kind(&self) -> &'static str {
        match self {
            GuardFailure::Arity { .. } => "arity",
            GuardFailure::Dtype(_) => "dtype",
            GuardFailure::Device(_) => "device",
            GuardFailure::Rank(_) => "rank",
            GuardFailure::Sizes(_) => "sizes",
            GuardFailure::SmallSymbol(_) => "small_symbol",
            GuardFailure::Tie(_) => "tie",
            GuardFailure::Strides(_) => "strides",
            GuardFailure::RequiresGrad(_) => "requires_grad",
            GuardFailure::State { .. } => "state",
        }
    }
}

/// One dim of one input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DimGuard {
    Size(i64),
    /// Any size ≥ 2, the same for every dim with this symbol.
    Symbol(u32),
}

/// What one input's strides must be.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StrideGuard {
    /// These strides ([`guarded_strides`]: zeros for an empty tensor, which takes any).
    Exact(Vec<i64>),
    /// Dense for the sizes at hand with dims laid out outermost to innermost in this order
    /// (`0..rank`: contiguous), size-1 dims included.
    Dense(Vec<usize>),
}

/// What one input must look like.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorGuard {
    pub dtype: kiln_compiler::DType,
    pub dims: Vec<DimGuard>,
    pub strides: StrideGuard,
}

impl fmt::Display for TensorGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dims: Vec<String> = self
            .dims
            .iter()
            .map(|d| match d {
                DimGuard::Size(n) => n.to_string(),
                DimGuard::Symbol(k) => format!("s{k}"),
            })
            .collect();
        write!(f, "{}[{}] ", self.dtype, dims.join(", "))?;
        match &self.strides {
            StrideGuard::Exact(s) => write!(f, "strides={s:?}"),
            StrideGuard::Dense(order) if order.iter().copied().eq(0..order.len()) => f.write_str("contiguous"),
            StrideGuard::Dense(order) => write!(f, "dense order={order:?}"),
        }
    }
}

/// The guards of every tensor input of one compiled group, in order, and the global state
/// its lowering read.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GuardSet {
    pub tensors: Vec<TensorGuard>,
    /// Where each symbol is read from: (input, dim) of its first occurrence.
    pub symbols: Vec<(usize, usize)>,
    pub state: GlobalState,
}

fn plain(m: &TensorMeta) -> Option<kiln_compiler::DType> {
    if m.device != Device::Cpu || m.requires_grad {
        return None;
    }
    m.dtype
}

/// The strides a guard holds a tensor to: all of them, size-1 dims included, for a tensor
/// with elements (the code never steps along a size-1 dim, but the layout PyTorch gives an
/// elementwise result depends on its stride, and Kiln's outputs follow that layout); none for
/// an empty tensor (zeros: nothing is read, and its result has no elements to lay out).
pub fn guarded_strides(sizes: &[i64], strides: &[i64]) -> Vec<i64> {
    if sizes.contains(&0) {
        return vec![0; sizes.len()];
    }
    strides.to_vec()
}

/// The order in which a dense tensor's dims are laid out (outermost first), or None if it is
/// not dense.
fn dense_order(sizes: &[i64], strides: &[i64]) -> Option<Vec<usize>> {
    let order = kiln_compiler::graph::layout::order_of(sizes, strides);
    is_dense(sizes, strides, &order).then_some(order)
}

/// Whether `strides` are dense for `sizes` in `order`, size-1 dims included; any strides will
/// do for an empty tensor.
fn is_dense(sizes: &[i64], strides: &[i64], order: &[usize]) -> bool {
    if sizes.contains(&0) {
        return true;
    }
    let mut expected = 1;
    for &d in order.iter().rev() {
        if strides[d] != expected {
            return false;
        }
        expected *= sizes[d];
    }
    true
}

impl GuardSet {
    /// Guards for inputs exactly like `metas` under `state`. None if an input can never be
    /// compiled for (unknown dtype, not on the CPU, requires grad).
    pub fn for_inputs(metas: &[TensorMeta], state: GlobalState) -> Option<GuardSet> {
        let tensors = metas
            .iter()
            .map(|m| {
                let dims = m.sizes.iter().map(|&n| DimGuard::Size(n)).collect();
                Some(TensorGuard { dtype: plain(m)?, dims, strides: StrideGuard::Exact(guarded_strides(&m.sizes, &m.strides)) })
            })
            .collect::<Option<_>>()?;
        Some(GuardSet { tensors, symbols: vec![], state })
    }

    /// Guards for inputs like `metas` with the dims `plan` makes symbols free (≥ 2, ties
    /// kept). None as for `for_inputs`, or if a symbol is 0 or 1 in `metas`, or there are more
    /// than [`MAX_SYMBOLS`].
    pub fn symbolic(metas: &[TensorMeta], plan: &[Vec<DimPlan>], state: GlobalState) -> Option<GuardSet> {
        let mut symbols: Vec<(u32, (usize, usize))> = vec![];
        let mut tensors = vec![];
        for (i, (m, dims)) in metas.iter().zip(plan).enumerate() {
            let dtype = plain(m)?;
            if dims.len() != m.sizes.len() {
                return None;
            }
            let mut guards = vec![];
            for (d, p) in dims.iter().enumerate() {
                guards.push(match *p {
                    DimPlan::Static(_) => DimGuard::Size(m.sizes[d]),
                    DimPlan::Symbol(k) => {
                        if m.sizes[d] < 2 {
                            return None;
                        }
                        if !symbols.iter().any(|s| s.0 == k) {
                            symbols.push((k, (i, d)));
                        }
                        DimGuard::Symbol(k)
                    }
                });
            }
            let symbolic = guards.iter().any(|g| matches!(g, DimGuard::Symbol(_)));
            let strides = match dense_order(&m.sizes, &m.strides).filter(|_| symbolic) {
                Some(order) => StrideGuard::Dense(order),
                // Strides that do not follow the sizes: code for exactly these (the lowering at
                // other sizes decides whether that code is symbolic).
                None => StrideGuard::Exact(guarded_strides(&m.sizes, &m.strides)),
            };
            tensors.push(TensorGuard { dtype, dims: guards, strides });
        }
        if symbols.len() > MAX_SYMBOLS {
            return None;
        }
        // Symbols are renumbered 0.. in order of first use, the order `symbols` lists them.
        for t in &mut tensors {
            for g in &mut t.dims {
                if let DimGuard::Symbol(k) = g {
                    *k = symbols.iter().position(|s| s.0 == *k).unwrap() as u32;
                }
            }
        }
        Some(GuardSet { tensors, symbols: symbols.into_iter().map(|s| s.1).collect(), state })
    }

    pub fn is_symbolic(&self) -> bool {
        !self.symbols.is_empty()
    }

    /// The symbols' values in `metas`-like sizes (which passed `check`).
    pub fn bind(&self, sizes: impl Fn(usize, usize) -> i64) -> [i64; MAX_SYMBOLS] {
        let mut values = [0; MAX_SYMBOLS];
        for (v, &(i, d)) in values.iter_mut().zip(&self.symbols) {
            *v = sizes(i, d);
        }
        values
    }

    pub fn check(&self, inputs: &[TensorView<'_>], state: &GlobalState) -> Result<(), GuardFailure> {
        if *state != self.state {
            return Err(GuardFailure::State { want: self.state, got: *state });
        }
        if inputs.len() != self.tensors.len() {
            return Err(GuardFailure::Arity { want: self.tensors.len(), got: inputs.len() });
        }
        let mut bound = [0i64; MAX_SYMBOLS];
        for (i, (g, t)) in self.tensors.iter().zip(inputs).enumerate() {
            if t.dtype != Some(g.dtype) {
                return Err(GuardFailure::Dtype(i));
            }
            if t.device != Device::Cpu {
                return Err(GuardFailure::Device(i));
            }
            if t.requires_grad {
                return Err(GuardFailure::RequiresGrad(i));
            }
            if t.sizes.len() != g.dims.len() {
                return Err(GuardFailure::Rank(i));
            }
            for (dim, &n) in g.dims.iter().zip(t.sizes) {
                match *dim {
                    DimGuard::Size(want) if want != n => return Err(GuardFailure::Sizes(i)),
                    DimGuard::Size(_) => {}
                    DimGuard::Symbol(_) if n < 2 => return Err(GuardFailure::SmallSymbol(i)),
                    DimGuard::Symbol(k) => match &mut bound[k as usize] {
                        b @ 0 => *b = n,
                        b if *b != n => return Err(GuardFailure::Tie(i)),
                        _ => {}
                    },
                }
            }
            match &g.strides {
                StrideGuard::Exact(want) => {
                    if !t.sizes.contains(&0) && want.as_slice() != t.strides {
                        return Err(GuardFailure::Strides(i));
                    }
                }
                StrideGuard::Dense(order) if !is_dense(t.sizes, t.strides, order) => return Err(GuardFailure::Strides(i)),
                StrideGuard::Dense(_) => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_compiler::graph::layout::dense_strides;
    use kiln_compiler::DType;

    const S: GlobalState = GlobalState { default_float: Ok(DType::F32), autocast: None };

    fn meta(sizes: &[i64], strides: &[i64]) -> TensorMeta {
        TensorMeta { dtype: Some(DType::F32), device: Device::Cpu, sizes: sizes.to_vec(), strides: strides.to_vec(), requires_grad: false }
    }

    #[test]
    fn accepts_what_it_was_built_for_with_size_1_strides_and_any_strides_when_empty() {
        let g = GuardSet::for_inputs(&[meta(&[4, 1, 3], &[3, 3, 1])], S).unwrap();
        assert_eq!(g.check(&[meta(&[4, 1, 3], &[3, 3, 1]).view()], &S), Ok(()));
        // Never stepped along, but it decides the layout of an elementwise result in eager.
        assert_eq!(g.check(&[meta(&[4, 1, 3], &[3, 77, 1]).view()], &S), Err(GuardFailure::Strides(0)));
        let empty = GuardSet::for_inputs(&[meta(&[0, 3], &[3, 1])], S).unwrap();
        assert_eq!(empty.check(&[meta(&[0, 3], &[1, 5]).view()], &S), Ok(()));
    }

    #[test]
    fn rejects_each_difference() {
        let g = GuardSet::for_inputs(&[meta(&[4, 3], &[3, 1])], S).unwrap();
        assert_eq!(g.check(&[], &S), Err(GuardFailure::Arity { want: 1, got: 0 }));
        assert_eq!(g.check(&[meta(&[4, 3], &[1, 4]).view()], &S), Err(GuardFailure::Strides(0)));
        assert_eq!(g.check(&[meta(&[4, 4], &[4, 1]).view()], &S), Err(GuardFailure::Sizes(0)));
        assert_eq!(g.check(&[meta(&[12], &[1]).view()], &S), Err(GuardFailure::Rank(0)));
        let mut m = meta(&[4, 3], &[3, 1]);
        m.dtype = Some(DType::F64);
        assert_eq!(g.check(&[m.view()], &S), Err(GuardFailure::Dtype(0)));
        let mut m = meta(&[4, 3], &[3, 1]);
        m.requires_grad = true;
        assert_eq!(g.check(&[m.view()], &S), Err(GuardFailure::RequiresGrad(0)));
        let mut m = meta(&[4, 3], &[3, 1]);
        m.device = Device::Other(1);
        assert_eq!(g.check(&[m.view()], &S), Err(GuardFailure::Device(0)));
    }

    #[test]
    fn symbolic_dims_take_any_size_from_2_with_ties_kept_and_contiguous_strides() {
        use DimPlan::*;
        let plan = vec![vec![Symbol(3), Static(4)], vec![Symbol(3)], vec![Static(4)]];
        let g = GuardSet::symbolic(&[meta(&[5, 4], &[4, 1]), meta(&[5], &[1]), meta(&[4], &[2])], &plan, S).unwrap();
        assert_eq!(g.symbols, vec![(0, 0)]);
        assert_eq!(g.tensors[0].to_string(), "f32[s0, 4] contiguous");
        assert_eq!(g.tensors[2].to_string(), "f32[4] strides=[2]");
        let call = |b: i64, c: i64, row: i64| g.check(&[meta(&[b, 4], &[row, 1]).view(), meta(&[c], &[1]).view(), meta(&[4], &[2]).view()], &S);
        assert_eq!(call(9, 9, 4), Ok(()));
        assert_eq!(call(200, 200, 4), Ok(()));
        assert_eq!(call(9, 8, 4), Err(GuardFailure::Tie(1)));
        assert_eq!(call(1, 1, 4), Err(GuardFailure::SmallSymbol(0)));
        assert_eq!(call(0, 0, 4), Err(GuardFailure::SmallSymbol(0)));
        assert_eq!(call(9, 9, 8), Err(GuardFailure::Strides(0)));
        assert_eq!(g.bind(|i, d| [[7, 4], [7, 0], [4, 0]][i][d])[0], 7);
        // Built only for symbols >= 2.
        assert_eq!(GuardSet::symbolic(&[meta(&[1, 4], &[4, 1])], &[vec![Symbol(0), Static(4)]], S), None);
    }

    #[test]
    fn symbolic_tensors_keep_their_dense_order_or_their_exact_strides() {
        use DimPlan::*;
        let plan = [vec![Symbol(0), Static(4)]];
        // Transposed: dense with dim 1 outermost; any batch, laid out the same way.
        let t = GuardSet::symbolic(&[meta(&[5, 4], &[1, 5])], &plan, S).unwrap();
        assert_eq!(t.tensors[0].to_string(), "f32[s0, 4] dense order=[1, 0]");
        assert_eq!(t.check(&[meta(&[9, 4], &[1, 9]).view()], &S), Ok(()));
        assert_eq!(t.check(&[meta(&[9, 4], &[4, 1]).view()], &S), Err(GuardFailure::Strides(0)));
        // A slice of a wider buffer: the strides it had, whatever the batch.
        let s = GuardSet::symbolic(&[meta(&[5, 4], &[16, 1])], &plan, S).unwrap();
        assert_eq!(s.tensors[0].to_string(), "f32[s0, 4] strides=[16, 1]");
        assert_eq!(s.check(&[meta(&[9, 4], &[16, 1]).view()], &S), Ok(()));
        assert_eq!(s.check(&[meta(&[9, 4], &[4, 1]).view()], &S), Err(GuardFailure::Strides(0)));
        // A size-1 dim sits in the order where its stride puts it (x.unsqueeze(1), a
        // channels-last (N, C, 1, 1)), and keeps its place at other sizes.
        let plan = [vec![Symbol(0), Static(1), Static(4)]];
        let u = GuardSet::symbolic(&[meta(&[5, 1, 4], &[4, 4, 1])], &plan, S).unwrap();
        assert_eq!(u.tensors[0].strides, StrideGuard::Dense(vec![0, 1, 2]));
        assert_eq!(u.check(&[meta(&[3, 1, 4], &[4, 4, 1]).view()], &S), Ok(()));
        assert_eq!(u.check(&[meta(&[3, 1, 4], &[4, 1, 1]).view()], &S), Err(GuardFailure::Strides(0)));
        let cl = GuardSet::symbolic(&[meta(&[5, 8, 1, 1], &[8, 1, 8, 8])], &[vec![Symbol(0), Static(8), Static(1), Static(1)]], S).unwrap();
        assert_eq!(cl.tensors[0].strides, StrideGuard::Dense(vec![0, 2, 3, 1]));
        assert_eq!(dense_strides(&[5, 8, 1, 1], &[0, 2, 3, 1]), vec![8, 1, 8, 8]);
        // A size-1 stride no dense layout has: exact strides.
        let odd = GuardSet::symbolic(&[meta(&[5, 1, 4], &[4, 99, 1])], &plan, S).unwrap();
        assert_eq!(odd.tensors[0].strides, StrideGuard::Exact(vec![4, 99, 1]));
    }

    #[test]
    fn code_runs_only_under_the_state_it_was_made_under() {
        let g = GuardSet::for_inputs(&[meta(&[2], &[1])], S).unwrap();
        let f64_default = GlobalState { default_float: Ok(DType::F64), ..S };
        assert_eq!(g.check(&[meta(&[2], &[1]).view()], &f64_default), Err(GuardFailure::State { want: S, got: f64_default }));
        let autocast = GlobalState { autocast: Some(15), ..S };
        assert_eq!(g.check(&[meta(&[2], &[1]).view()], &autocast).unwrap_err().kind(), "state");
    }

    #[test]
    fn never_built_for_grad_or_other_devices() {
        let mut m = meta(&[2], &[1]);
        m.requires_grad = true;
        assert_eq!(GuardSet::for_inputs(&[m], S), None);
    }
}
