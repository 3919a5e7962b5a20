//! Memory layouts: the order of a tensor's dims in memory, and PyTorch's rule for the layout of
//! an elementwise op's output.
//!
//! Kiln writes every graph output in the layout the frontend asks for (`Graph::output_orders`),
//! whatever kind of kernel computes it; intermediates are Kiln's own business (row-major).
//! Frontends that reproduce PyTorch ask for what eager would return: for elementwise ops that
//! is [`elementwise_order`], TensorIterator's rule.
//!
//! What must match eager are the *significant* strides, as PyTorch's own
//! `torch._prims_common.check_significant_strides` defines them: those of dims longer than 1
//! in tensors with elements. A dim of size 1 is never stepped along, and its stride is
//! whatever the layout's order gives it.

/// A tensor's dims from outermost (largest stride) to innermost (stride 1).
pub type DimOrder = Vec<usize>;

/// The order of a contiguous tensor of `rank` dims.
pub fn row_major(rank: usize) -> DimOrder {
    (0..rank).collect()
}

pub fn is_row_major(order: &[usize]) -> bool {
    order.iter().copied().eq(0..order.len())
}

/// Element strides of a dense tensor of `sizes` whose dims are laid out in `order`.
pub fn dense_strides(sizes: &[i64], order: &[usize]) -> Vec<i64> {
    let mut strides = vec![0; sizes.len()];
    let mut step = 1;
    for &d in order.iter().rev() {
        strides[d] = step;
        step *= sizes[d].max(1);
    }
    strides
}

/// Element strides of a contiguous (row-major) tensor of `sizes`.
pub fn contiguous_strides(sizes: &[i64]) -> Vec<i64> {
    dense_strides(sizes, &row_major(sizes.len()))
}

/// PyTorch's `is_non_overlapping_and_dense`: the dims longer than 1, by their strides, lay the
/// elements out one after another (a tensor with no elements is dense).
pub fn is_non_overlapping_and_dense(sizes: &[i64], strides: &[i64]) -> bool {
    if sizes.contains(&0) {
        return true;
    }
    let mut dims: Vec<usize> = (0..sizes.len()).filter(|&d| sizes[d] != 1).collect();
    dims.sort_by_key(|&d| strides[d]);
    let mut expected = 1;
    for d in dims {
        if strides[d] != expected {
            return false;
        }
        expected *= sizes[d];
    }
    true
}

/// PyTorch's `is_contiguous()`: row-major, size-1 dims aside (a tensor with no elements is).
pub fn is_contiguous(sizes: &[i64], strides: &[i64]) -> bool {
    sizes.contains(&0) || dense_but_size_1(sizes, strides, &row_major(sizes.len()))
}

/// The order of a channels-last 4-D tensor (N, C, H, W laid out N, H, W, C).
pub const CHANNELS_LAST: [usize; 4] = [0, 2, 3, 1];

/// PyTorch's `is_contiguous(memory_format=torch.channels_last)` (4-D only), size-1 dims aside.
pub fn is_channels_last(sizes: &[i64], strides: &[i64]) -> bool {
    sizes.len() == 4 && dense_but_size_1(sizes, strides, &CHANNELS_LAST)
}

/// Whether the dims longer than 1 are dense in `order` (PyTorch's contiguity tests).
fn dense_but_size_1(sizes: &[i64], strides: &[i64], order: &[usize]) -> bool {
    let mut expected = 1;
    for &d in order.iter().rev() {
        if sizes[d] != 1 {
            if strides[d] != expected {
                return false;
            }
            expected *= sizes[d];
        }
    }
    true
}

/// The dims of any strided tensor by falling stride: the order it is laid out in if it is
/// dense. A size-1 dim sharing its stride with a longer dim sits just inside it (where
/// `dense_strides` of the order gives it that stride); ties otherwise by index.
pub fn order_of(sizes: &[i64], strides: &[i64]) -> DimOrder {
    let mut order = row_major(sizes.len());
    order.sort_by_key(|&d| (std::cmp::Reverse(strides[d]), sizes[d] == 1, d));
    order
}

/// The strides PyTorch's TensorIterator gives the output of an elementwise op over `operands`
/// (sizes and element strides, in argument order) of `shape`. `wrapped_scalar`: a Python
/// number is among its operands (eager wraps it as a 0-dim tensor, so the operands' shapes
/// differ). First its fast set-up (`compute_fast_setup_type`): operands all of the output's
/// shape and all contiguous give a contiguous output, all channels-last a channels-last one,
/// all dense with equal strides those strides; else [`elementwise_order`]. Eager's strides,
/// size-1 dims included: they are what the next op's rule reads.
pub fn elementwise_strides(shape: &[i64], operands: &[(&[i64], &[i64])], wrapped_scalar: bool) -> Vec<i64> {
    let same_shape = !wrapped_scalar && !operands.is_empty() && operands.iter().all(|(sizes, _)| *sizes == shape);
    if same_shape {
        if operands.iter().all(|(sizes, strides)| is_contiguous(sizes, strides)) {
            return contiguous_strides(shape);
        }
        if operands.iter().all(|(sizes, strides)| is_channels_last(sizes, strides)) {
            return dense_strides(shape, &CHANNELS_LAST);
        }
        let first = operands[0].1;
        if operands.iter().all(|(sizes, strides)| is_non_overlapping_and_dense(sizes, strides) && *strides == first) {
            return first.to_vec();
        }
    }
    dense_strides(shape, &elementwise_order(shape, operands))
}

/// The order of the output of an elementwise op whose operands are `operands` (sizes and
/// element strides, in the op's argument order), broadcast right-aligned to `shape`: PyTorch's
/// `TensorIteratorBase::reorder_dimensions` (its general path: [`elementwise_strides`] has the
/// fast ones; `infer_dense_strides`, which `to` uses, is this alone), step for step.
///
/// Dims are ordered by the strides of the first operand that has an opinion about a pair: an
/// operand broadcast along either dim (stride 0) has none; equal strides put the shorter dim
/// inside. Where no operand has an opinion, dims keep row-major order. The insertion sort
/// below is TensorIterator's own, ambiguous comparisons included: a sort by a key would
/// differ from eager where operands disagree. Size-1 dims of inputs must come with their real
/// strides, as eager sees them: a size-1 dim's stride, never stepped along, can decide the
/// order of the others.
pub fn elementwise_order(shape: &[i64], operands: &[(&[i64], &[i64])]) -> DimOrder {
    let n = shape.len();
    if n <= 1 {
        return row_major(n);
    }
    // Each operand's stride along each output dim: 0 where it broadcasts.
    let strides: Vec<Vec<i64>> = operands
        .iter()
        .map(|(sizes, strides)| {
            let offset = n - sizes.len();
            (0..n)
                .map(|d| match d.checked_sub(offset) {
                    Some(i) if !(sizes[i] == 1 && shape[d] != 1) => strides[i],
                    _ => 0,
                })
                .collect()
        })
        .collect();
    // 1 if `a` should sit outside `b` (TensorIterator: "dim0 after dim1"), -1 if inside, 0 if
    // no operand says.
    let should_swap = |a: usize, b: usize| -> i32 {
        for s in &strides {
            let (sa, sb) = (s[a], s[b]);
            if sa == 0 || sb == 0 {
                continue;
            }
            if sa != sb {
                return if sa < sb { -1 } else { 1 };
            }
            if shape[a] > shape[b] {
                return 1;
            }
        }
        0
    };
    // perm[0] is the innermost dim, as in TensorIterator.
    let mut perm: Vec<usize> = (0..n).rev().collect();
    for i in 1..n {
        let mut moving = i;
        for j in (0..i).rev() {
            match should_swap(perm[j], perm[moving]) {
                c if c > 0 => {
                    perm.swap(j, moving);
                    moving = j;
                }
                c if c < 0 => break,
                _ => {}
            }
        }
    }
    perm.reverse();
    perm
}

/// The strides a view of `new_sizes` over memory laid out as (`sizes`, `strides`) has, or None
/// when no view can express it (a copy is needed): PyTorch's `computeStride`, the rule of
/// `view` and of `reshape`'s view case.
pub fn view_strides(sizes: &[i64], strides: &[i64], new_sizes: &[i64]) -> Option<Vec<i64>> {
    let numel: i64 = sizes.iter().product();
    if numel == 0 || sizes.is_empty() {
        // Nothing to address, or one element: any strides do; contiguous ones, as PyTorch.
        return (new_sizes.iter().product::<i64>() == numel.max(sizes.is_empty() as i64)).then(|| contiguous_strides(new_sizes));
    }
    let mut new_strides = vec![0; new_sizes.len()];
    let mut view_d = new_sizes.len() as i64 - 1;
    let mut chunk_base_stride = *strides.last().unwrap();
    let (mut tensor_numel, mut view_numel) = (1i64, 1i64);
    for tensor_d in (0..sizes.len()).rev() {
        tensor_numel *= sizes[tensor_d];
        // A chunk ends where the next dim out is not laid out right after this one.
        if tensor_d == 0 || (sizes[tensor_d - 1] != 1 && strides[tensor_d - 1] != tensor_numel * chunk_base_stride) {
            while view_d >= 0 && (view_numel < tensor_numel || new_sizes[view_d as usize] == 1) {
                new_strides[view_d as usize] = view_numel * chunk_base_stride;
                view_numel *= new_sizes[view_d as usize];
                view_d -= 1;
            }
            if view_numel != tensor_numel {
                return None;
            }
            if tensor_d > 0 {
                chunk_base_stride = strides[tensor_d - 1];
                tensor_numel = 1;
                view_numel = 1;
            }
        }
    }
    (view_d == -1).then_some(new_strides)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_means_pytorchs_non_overlapping_and_dense() {
        assert!(is_non_overlapping_and_dense(&[2, 3, 4, 5], &[60, 1, 15, 3]));
        assert!(is_non_overlapping_and_dense(&[3, 1, 4], &[1, 99, 3]));
        assert!(!is_non_overlapping_and_dense(&[4, 3], &[6, 2]));
        assert!(!is_non_overlapping_and_dense(&[4, 3], &[0, 1]));
        assert!(is_non_overlapping_and_dense(&[0, 3], &[7, 7]));
    }

    #[test]
    fn tensor_iterators_fast_set_up_comes_first() {
        // (3, 1, 1) with strides (1, 1, 3) is contiguous: its result is too (the general
        // path would put dim 2 outermost, and the next op would read that).
        assert_eq!(elementwise_strides(&[3, 1, 1], &[(&[3, 1, 1], &[1, 1, 3])], false), vec![1, 1, 1]);
        assert_eq!(elementwise_strides(&[3, 1, 1], &[(&[3, 1, 1], &[1, 1, 3])], true), vec![1, 1, 3]);
        let cl: (&[i64], &[i64]) = (&[2, 3, 4, 5], &[60, 1, 15, 3]);
        assert_eq!(elementwise_strides(&[2, 3, 4, 5], &[cl, cl], false), vec![60, 1, 15, 3]);
        // Dense, equal strides: copied, size-1 strides included.
        let odd: (&[i64], &[i64]) = (&[3, 1, 4], &[1, 99, 3]);
        assert_eq!(elementwise_strides(&[3, 1, 4], &[odd, odd], false), vec![1, 99, 3]);
        assert_eq!(order_of(&[3, 1, 4], &[1, 99, 3]), vec![1, 2, 0]);
        assert_eq!(order_of(&[3, 1, 4], &[4, 4, 1]), vec![0, 1, 2]);
    }

    #[test]
    fn dense_strides_follow_the_order() {
        assert_eq!(dense_strides(&[2, 3, 4, 5], &[0, 2, 3, 1]), vec![60, 1, 15, 3]);
        assert_eq!(dense_strides(&[3, 4], &[1, 0]), vec![1, 3]);
        assert_eq!(dense_strides(&[5, 1, 4], &row_major(3)), vec![4, 4, 1]);
    }

    #[test]
    fn elementwise_outputs_follow_their_inputs() {
        // rand(3, 4).t(): shape (4, 3), strides (1, 4) -> output strides (1, 4).
        assert_eq!(elementwise_order(&[4, 3], &[(&[4, 3], &[1, 4])]), vec![1, 0]);
        // Channels-last (2, 3, 4, 5): strides (60, 1, 15, 3).
        assert_eq!(elementwise_order(&[2, 3, 4, 5], &[(&[2, 3, 4, 5], &[60, 1, 15, 3])]), vec![0, 2, 3, 1]);
        // The first operand with an opinion wins: contiguous first, transposed second.
        assert_eq!(elementwise_order(&[4, 3], &[(&[4, 3], &[3, 1]), (&[4, 3], &[1, 4])]), vec![0, 1]);
        assert_eq!(elementwise_order(&[4, 3], &[(&[4, 3], &[1, 4]), (&[4, 3], &[3, 1])]), vec![1, 0]);
        // A broadcast operand has no opinion on its broadcast dims; the next one decides.
        assert_eq!(elementwise_order(&[4, 3], &[(&[3], &[1]), (&[4, 3], &[1, 4])]), vec![1, 0]);
        assert_eq!(elementwise_order(&[4, 3], &[(&[4, 1], &[0, 0]), (&[4, 3], &[1, 4])]), vec![1, 0]);
        // A size-1 dim's stride counts (TensorIterator compares it; its insertion sort swaps
        // dims that are not neighbours): (3, 1, 2, 5) with strides (5, 1, 0, 1) comes out
        // with strides (10, 1, 1, 2) in eager.
        assert_eq!(dense_strides(&[3, 1, 2, 5], &elementwise_order(&[3, 1, 2, 5], &[(&[3, 1, 2, 5], &[5, 1, 0, 1])])), vec![10, 1, 1, 2]);
        // No opinion at all: row-major. Scalars (rank 0) never have one.
        assert_eq!(elementwise_order(&[4, 3], &[(&[], &[]), (&[4, 3], &[0, 0])]), vec![0, 1]);
        // A slice keeps its order: (4, 6)[:, ::2].t() has shape (3, 4), strides (2, 6).
        assert_eq!(elementwise_order(&[3, 4], &[(&[3, 4], &[2, 6])]), vec![1, 0]);
    }

    #[test]
    fn views_follow_pytorchs_compute_stride() {
        // Merging and splitting contiguous dims.
        assert_eq!(view_strides(&[2, 3, 4], &[12, 4, 1], &[6, 4]), Some(vec![4, 1]));
        assert_eq!(view_strides(&[6, 4], &[4, 1], &[2, 3, 2, 2]), Some(vec![12, 4, 2, 1]));
        // A transposed matrix cannot be flattened, but its dims can be split.
        assert_eq!(view_strides(&[4, 3], &[1, 4], &[12]), None);
        assert_eq!(view_strides(&[4, 3], &[1, 4], &[2, 2, 3]), Some(vec![2, 1, 4]));
        // Size-1 dims come and go anywhere.
        assert_eq!(view_strides(&[3, 1, 5], &[5, 5, 1], &[1, 3, 5, 1]), Some(vec![15, 5, 1, 1]));
        // Heads of a packed qkv row: [b, s, 3e] sliced to e, split into [b, s, h, d].
        assert_eq!(view_strides(&[2, 7, 8], &[168, 24, 1], &[2, 7, 2, 4]), Some(vec![168, 24, 4, 1]));
        assert_eq!(view_strides(&[0, 3], &[3, 1], &[3, 0]), Some(contiguous_strides(&[3, 0])));
        assert_eq!(view_strides(&[], &[], &[1, 1]), Some(vec![1, 1]));
    }
}
