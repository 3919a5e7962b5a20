"""Differential tests driven by PyTorch's own OpInfo database: every sample (and its
reference inputs: extremal values, non-contiguous, broadcast, empty) of every op Kiln claims,
scripted, run past profiling and compared with eager; and the final call must have run a
Kiln group, for every dtype the op is claimed for."""

import math

import pytest
import torch
from torch.testing._internal.common_methods_invocations import op_db

from kiln_check import close, no_worse_than_float32, run_compiled, script_source

F, D, I, L, B = torch.float32, torch.float64, torch.int32, torch.int64, torch.bool
NUMERIC = (F, D, I, L)
ALL = (F, D, I, L, B)
FLOAT = (F, D)

# OpInfo name (variant) -> dtypes Kiln claims. Every sample of a claimed dtype must compile,
# except those matching the op's entry in UNCLAIMED_SAMPLES (a documented gap).
CLAIMS = {
    "add": ALL, "sub": NUMERIC, "rsub": NUMERIC, "mul": ALL,
    "div.no_rounding_mode": ALL, "true_divide": ALL,
    "maximum": NUMERIC, "minimum": NUMERIC,
    "neg": NUMERIC, "abs": NUMERIC, "nn.functional.relu": NUMERIC,
    "reciprocal": NUMERIC, "sigmoid": NUMERIC, "tanh": NUMERIC, "exp": NUMERIC, "log": NUMERIC,
    "log1p": NUMERIC, "sqrt": NUMERIC, "rsqrt": NUMERIC, "erf": NUMERIC,
    "pow": FLOAT, "nn.functional.leaky_relu": FLOAT, "nn.functional.gelu": FLOAT,
    "nn.functional.silu": FLOAT, "round": FLOAT,
    "clamp": NUMERIC, "clamp_min": NUMERIC, "clamp_max": NUMERIC, "where": ALL,
    "eq": ALL, "ne": ALL, "lt": NUMERIC, "le": NUMERIC, "gt": NUMERIC, "ge": NUMERIC,
    "logical_not": ALL,
    "sum": ALL, "mean": FLOAT, "amax": NUMERIC, "amin": NUMERIC,
    "softmax": FLOAT, "softmax.with_dtype": FLOAT, "log_softmax": FLOAT, "log_softmax.with_dtype": FLOAT,
    "mm": FLOAT, "bmm": FLOAT, "addmm": FLOAT, "matmul": FLOAT, "nn.functional.linear": FLOAT,
    "t": NUMERIC, "transpose": NUMERIC, "permute": NUMERIC,
    "view": NUMERIC, "reshape": NUMERIC, "flatten": NUMERIC, "unflatten": NUMERIC, "unsqueeze": NUMERIC,
    "squeeze": NUMERIC, "squeeze.multiple": NUMERIC, "select": NUMERIC, "narrow": NUMERIC, "expand": NUMERIC,
    "cat": NUMERIC, "stack": NUMERIC, "nn.functional.layer_norm": FLOAT, "baddbmm": FLOAT,
    "masked_fill": ALL, "triu": ALL, "tril": ALL, "nn.functional.scaled_dot_product_attention": FLOAT,
    # Splits, unpacked into their parts (PARTS below).
    "chunk": NUMERIC, "unsafe_chunk": NUMERIC, "split": NUMERIC, "split.list_args": NUMERIC,
    "unsafe_split": NUMERIC, "split_with_sizes": NUMERIC,
    # The convolutional networks' pointwise ops (issue 12).
    "nn.functional.hardswish": FLOAT, "nn.functional.hardsigmoid": FLOAT, "nn.functional.hardtanh": FLOAT,
    "nn.functional.relu6": FLOAT, "nn.functional.mish": FLOAT, "nn.functional.batch_norm": FLOAT,
    "nn.functional.adaptive_avg_pool2d": FLOAT, "constant_pad_nd": NUMERIC, "nn.functional.pad.constant": NUMERIC,
    "nn.functional.channel_shuffle": NUMERIC, "nn.functional.max_pool2d": FLOAT, "nn.functional.avg_pool2d": FLOAT,
    "nn.functional.conv2d": FLOAT, "nn.functional.conv1d": FLOAT,
    "nn.functional.adaptive_max_pool2d": FLOAT,
    "nn.functional.interpolate.nearest": FLOAT, "nn.functional.interpolate.bilinear": FLOAT,
    "nn.functional.upsample_nearest": FLOAT, "nn.functional.upsample_bilinear": FLOAT,
}

# Ops checked traced rather than scripted: a scripted F.interpolate builds its sizes and
# scales at run time (a loop over the input's rank), where Kiln takes constants; a traced
# one calls upsample_* with them, as a traced or frozen model does.
TRACED = {"nn.functional.interpolate.nearest", "nn.functional.interpolate.bilinear", "nn.functional.upsample_nearest",
          "nn.functional.upsample_bilinear"}

# Ops returning a list of tensors: the function unpacks it (`p0, p1 = torch.split(...)`), as
# models do; Kiln takes each part as a slice.
PARTS = {"chunk", "unsafe_chunk", "split", "split.list_args", "unsafe_split", "split_with_sizes"}

# In-place variants on a tensor the function made (`x = t0.clone(); x.add_(t1); return x`):
# Kiln computes them as their functional op, with in-place semantics (x's dtype and shape).
IN_PLACE_CLAIMS = {
    "add": NUMERIC, "sub": NUMERIC, "mul": NUMERIC, "div.no_rounding_mode": FLOAT, "neg": NUMERIC, "abs": NUMERIC,
    "nn.functional.relu": NUMERIC, "sigmoid": FLOAT, "tanh": FLOAT, "exp": FLOAT, "sqrt": FLOAT, "clamp": NUMERIC,
    "nn.functional.leaky_relu": FLOAT, "nn.functional.hardswish": FLOAT, "nn.functional.hardsigmoid": FLOAT,
    "nn.functional.hardtanh": FLOAT, "nn.functional.relu6": FLOAT, "nn.functional.mish": FLOAT,
}

# In-place forms OpInfo lists no variant for: (TorchScript spelling, eager function).
FUNCTIONAL_IN_PLACE = {
    "nn.functional.relu": ("torch.relu_", torch.relu_),
    "nn.functional.leaky_relu": ("torch.nn.functional.leaky_relu_", torch.nn.functional.leaky_relu_),
    **{f"nn.functional.{n}": (f"torch._C._nn.{n}_", getattr(torch._C._nn, f"{n}_")) for n in ("hardswish", "hardsigmoid", "hardtanh", "relu6", "mish")},
}

# Calls that are not `torch.<name>(input, *args, **kwargs)`.
CALL = {
    "where": "torch.where({args[0]}, {input}, {args[1]})",
    "nn.functional.relu": "torch.relu({input})",
    "nn.functional.leaky_relu": "torch.nn.functional.leaky_relu({input}{rest})",
    "nn.functional.gelu": "torch.nn.functional.gelu({input}{rest})",
    "nn.functional.silu": "torch.nn.functional.silu({input}{rest})",
    "nn.functional.linear": "torch.nn.functional.linear({input}{rest})",
    # A view alone is no computation (Kiln returns new tensors, never views): read through it.
    "t": "torch.t({input}) * 1",
    "transpose": "torch.transpose({input}{rest}) * 1",
    "permute": "torch.permute({input}{rest}) * 1",
    "view": "{input}.view({args_joined}) * 1",
    "reshape": "torch.reshape({input}{rest}) * 1",
    "flatten": "torch.flatten({input}{rest}) * 1",
    "unflatten": "torch.unflatten({input}{rest}) * 1",
    "unsqueeze": "torch.unsqueeze({input}{rest}) * 1",
    "squeeze": "torch.squeeze({input}{rest}) * 1",
    "squeeze.multiple": "torch.squeeze({input}{rest}) * 1",
    "select": "torch.select({input}{rest}) * 1",
    "narrow": "torch.narrow({input}{rest}) * 1",
    "expand": "{input}.expand({args_joined}) * 1",
    "cat": "torch.cat({input}{rest}) * 1",
    "stack": "torch.stack({input}{rest}) * 1",
    "masked_fill": "torch.masked_fill({input}{rest})",
    "nn.functional.scaled_dot_product_attention": "torch.nn.functional.scaled_dot_product_attention({input}{rest})",
    "nn.functional.layer_norm": "torch.nn.functional.layer_norm({input}{rest})",
    "nn.functional.pad.constant": "torch.nn.functional.pad({input}{rest})",
    "nn.functional.channel_shuffle": "torch.nn.functional.channel_shuffle({input}{rest})",
    "nn.functional.max_pool2d": "torch.nn.functional.max_pool2d({input}{rest})",
    "nn.functional.avg_pool2d": "torch.nn.functional.avg_pool2d({input}{rest})",
    "nn.functional.conv2d": "torch.nn.functional.conv2d({input}{rest})",
    "nn.functional.conv1d": "torch.nn.functional.conv1d({input}{rest})",
    "nn.functional.adaptive_max_pool2d": "torch.nn.functional.adaptive_max_pool2d({input}{rest})",
    "nn.functional.interpolate.nearest": "torch.nn.functional.interpolate({input}{rest})",
    "nn.functional.interpolate.bilinear": "torch.nn.functional.interpolate({input}{rest})",
    "nn.functional.upsample_nearest": "torch.nn.functional.upsample_nearest({input}{rest})",
    "nn.functional.upsample_bilinear": "torch.nn.functional.upsample_bilinear({input}{rest})",
    **{f"nn.functional.{n}": f"torch.nn.functional.{n}({{input}}{{rest}})"
       for n in ("hardswish", "hardsigmoid", "hardtanh", "relu6", "mish", "batch_norm", "adaptive_avg_pool2d")},
}

# Samples a claimed op leaves to TorchScript on purpose: (op, predicate on the sample, why).
def _ranks(s):
    return [t.dim() for t in [s.input, *s.args] if isinstance(t, torch.Tensor)]


def _resample_period(s):
    """The longest period of an upsampling's weights over the sample's spatial dims: out /
    gcd(in, out) (Kiln builds each residue of the period as views)."""
    size = s.args[0] if s.args else s.kwargs.get("size")
    ins = s.input.shape[2:]
    if size is None:
        outs = [int(n * s.kwargs["scale_factor"]) for n in ins]
    else:
        outs = list(size) if isinstance(size, (list, tuple, torch.Size)) else [size] * len(ins)
    return max(o // math.gcd(n, o) for n, o in zip(ins, outs))


UNCLAIMED_SAMPLES = [
    ("nn.functional.max_pool2d", lambda s: dict(zip(["kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"], s.args), **s.kwargs).get("return_indices"),
     "the indices of the maxima (a second output Kiln does not compute)"),
    ("pow", lambda s: any(isinstance(a, torch.Tensor) and a.dtype != s.input.dtype for a in s.args),
     "a tensor exponent of another dtype"),
    ("matmul", lambda s: _ranks(s)[0] == 2 and _ranks(s)[1] > 2, "a matrix times a batch (eager returns that transposed)"),
    ("nn.functional.linear", lambda s: min(_ranks(s)[:2]) < 2, "a vector input or weight"),
    ("t", lambda s: s.input.dim() < 2, "t() of a vector is the vector itself"),
    ("cat", lambda s: any(t.dtype != s.input[0].dtype or not t.is_contiguous() or t.shape == (0,) for t in s.input),
     "mixed dtypes, non-contiguous inputs (eager picks the layout), or the legacy skipped empty vector"),
    ("narrow", lambda s: any(isinstance(a, torch.Tensor) for a in s.args), "a start given as a tensor (a size computed at run time)"),
    ("nn.functional.batch_norm", lambda s: s.kwargs.get("training", len(s.args) > 4 and s.args[4]) or s.args[0] is None or s.input.dim() < 2,
     "training mode or no running statistics (batch statistics: Kiln computes inference), or no channel dim"),
    ("nn.functional.adaptive_max_pool2d", lambda s: len(s.args) > 1 and s.args[1],
     "the indices of the maxima (a second output Kiln does not compute)"),
    *[(name, lambda s: s.input.dim() != 4, "1-d and 3-d upsampling (upsample_*1d / *3d)")
      for name in ("nn.functional.interpolate.nearest", "nn.functional.upsample_nearest")],
    *[(name, lambda s: s.kwargs.get("antialias") or _resample_period(s) > 16,
       "antialiasing (another op), or a ratio of sizes whose weights repeat only every 17 outputs or more")
      for name in ("nn.functional.interpolate.bilinear", "nn.functional.upsample_bilinear")],
    *[(name, lambda s: all(p <= 0 for p in s.args[0]), "a pad that only crops (eager clones the view in the input's layout)")
      for name in ("constant_pad_nd", "nn.functional.pad.constant")],
    ("transpose", lambda s: s.input.dim() == 0 or len(set(a % max(s.input.dim(), 1) for a in s.args)) == 1,
     "a transpose of one dim with itself is the tensor itself"),
]

MAX_SAMPLES = 40

# Ops whose float32 result depends on the order of a long computation more than the default
# tolerance allows, for eager as much as for Kiln: attention over OpInfo's inputs (|x| up to
# 9: scores of hundreds, where one rounding of a score moves exp() by 1e-5) differs from the
# float64 result by up to 2e-5 in eager itself, and eager's kernel and PyTorch's own math
# formula evaluated op by op in float32 differ from each other by as much. For these, Kiln's
# result is checked against float64: no further from it than twice the worse of those two
# float32 evaluations at their worst over the tensor, or than the default tolerance.
def sdpa_formula(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The math reference of scaled_dot_product_attention, op by op (a fully masked row is 0,
    as eager's CPU kernel returns it)."""
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    if is_causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    p = torch.softmax(scores, -1)
    p = torch.where(scores.amax(-1, keepdim=True) == float("-inf"), torch.zeros_like(p), p)
    return p @ v


FLOAT64_CHECKED = {"nn.functional.scaled_dot_product_attention": sdpa_formula}


def key(op):
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


OPS = {key(op): op for op in op_db if key(op) in CLAIMS or key(op) in IN_PLACE_CLAIMS}


def literal(v, tensors):
    if isinstance(v, torch.Tensor):
        tensors.append(v)
        return f"t{len(tensors) - 1}"
    if isinstance(v, bool) or v is None:
        return repr(v)
    if isinstance(v, int):
        return repr(v)
    if isinstance(v, float):
        return f"float('{v}')" if not math.isfinite(v) else repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(literal(x, tensors) for x in v) + "]"
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, torch.dtype):
        return str(v)
    raise NotImplementedError(type(v))


def source(name, sample, parts=None, in_place=False):
    """The function calling `name` on the sample; `parts`: the number of tensors a split
    returns (unpacked); `in_place`: the in-place variant on a copy of the input."""
    tensors = []
    inp = literal(sample.input, tensors)
    args = [literal(a, tensors) for a in sample.args]
    kwargs = [f"{k}={literal(v, tensors)}" for k, v in sample.kwargs.items()]
    params = ", ".join(f"t{i}" for i in range(len(tensors)))
    if in_place:
        rest = ", ".join(args + kwargs)
        call = f"{FUNCTIONAL_IN_PLACE[name][0]}(x{', ' if rest else ''}{rest})" if name in FUNCTIONAL_IN_PLACE else f"x.{name.split('.')[0]}_({rest})"
        return f"def fn({params}):\n    x = {inp}.clone()\n    {call}\n    return x\n", tensors
    template = CALL.get(name, "torch.{op}({input}{rest})")
    rest = "".join(", " + a for a in args + kwargs)
    call = template.format(op=name.split(".")[0], input=inp, args=args, rest=rest, args_joined=", ".join(args + kwargs))
    if parts is not None:
        if parts < 2:
            raise NotImplementedError("a split into one part")  # `p0, = ...` is no TorchScript
        names = [f"p{i}" for i in range(parts)]
        return f"def fn({params}):\n    {', '.join(names)} = {call}\n    return {', '.join(n + ' * 1' for n in names)}\n", tensors
    return f"def fn({params}):\n    return {call}\n", tensors


def traced_source(src, tensors):
    """`src`'s function, traced on the sample's tensors."""
    scope = {"torch": torch, "__name__": __name__}
    exec(src, scope)  # noqa: S102 (test source, not input)
    return torch.jit.trace(scope["fn"], tuple(tensors), check_trace=False)


def samples(op, dtype):
    seen = 0
    for s in op.reference_inputs("cpu", dtype, requires_grad=False):
        if seen >= MAX_SAMPLES:
            return
        seen += 1
        yield s


@pytest.mark.parametrize("name,dtype", [(n, d) for n in CLAIMS for d in CLAIMS[n]], ids=lambda x: str(x).replace("torch.", ""))
def test_opinfo(name, dtype):
    check_samples(name, dtype, in_place=False)


@pytest.mark.parametrize("name,dtype", [(n, d) for n in IN_PLACE_CLAIMS for d in IN_PLACE_CLAIMS[n]], ids=lambda x: str(x).replace("torch.", ""))
def test_opinfo_in_place(name, dtype):
    check_samples(name, dtype, in_place=True)


def check_samples(name, dtype, in_place):
    op = OPS.get(name)
    assert op is not None, f"{name} is not in this torch's OpInfo database"
    if dtype not in op.supported_dtypes("cpu"):
        pytest.skip(f"{name} does not support {dtype} in eager")
    variant = (op.inplace_variant or FUNCTIONAL_IN_PLACE.get(name, (None, None))[1]) if in_place else op
    assert variant is not None, f"{name} has no in-place variant"
    checked, deviations, failures = 0, 0, []
    for sample in samples(op, dtype):
        first = sample.input.clone() if in_place else sample.input
        try:
            expected = variant(first, *sample.args, **sample.kwargs)
        except Exception:
            continue  # eager rejects the sample; not Kiln's business
        try:
            src, tensors = source(name, sample, parts=len(expected) if name in PARTS else None, in_place=in_place)
        except NotImplementedError:
            continue  # an argument TorchScript source cannot spell (e.g. a complex scalar)
        try:
            fn = traced_source(src, tensors) if name in TRACED else script_source(src)
        except RuntimeError:
            continue  # TorchScript's schema refuses the call (`output_size=[None, 7]`): Kiln never sees it
        try:
            # The profiling call never runs Kiln: where TorchScript itself disagrees with
            # eager (e.g. `bool_tensor + True` is int64 in TorchScript), Kiln has to follow
            # TorchScript, so the sample says nothing about Kiln.
            close(fn(*tensors), expected)
        except AssertionError:
            deviations += 1
            continue
        unclaimed = [why for o, pred, why in UNCLAIMED_SAMPLES if o == name and pred(sample)]
        check = None
        if name in FLOAT64_CHECKED:
            wide = lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
            exact = variant(wide(first), *[wide(a) for a in sample.args], **{k: wide(v) for k, v in sample.kwargs.items()})
            formula = FLOAT64_CHECKED[name](first, *sample.args, **sample.kwargs)
            check = lambda out: no_worse_than_float32(out, [expected, formula], exact)  # noqa: E731
        try:
            run_compiled(fn, tensors, expected=expected, must_compile=not unclaimed, check=check)
            checked += 1
        except AssertionError as e:
            failures.append(f"{src}  inputs: {[(t.dtype, tuple(t.shape), t.stride()) for t in tensors]}\n  {e}")
    assert not failures, f"{len(failures)} of {checked + len(failures)} samples failed:\n" + "\n".join(failures[:5])
    assert checked > 0, f"no sample was checked ({deviations} where TorchScript differs from eager)"
