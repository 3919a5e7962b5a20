// The TorchScript side of Kiln: a post-pass that groups supported nodes into
// kiln::CompilationGroup nodes guarded by kiln::Guard, and the two operators.
//
// Everything Kiln-specific (which ops are supported, lowering, compiling, guard checks, stats)
// is in Rust behind the extern "C" functions below; this file only walks and rewrites
// TorchScript graphs and moves tensors across. Facts relied on are in ARCHITECTURE.md.

#include <dlfcn.h>

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <ATen/native/quantized/PackedParams.h>
#include <c10/core/DefaultDtype.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/SmallVector.h>
#include <torch/csrc/jit/ir/alias_analysis.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/passes/pass_manager.h>
#include <torch/csrc/jit/passes/utils/subgraph_utils.h>
#include <torch/csrc/jit/runtime/operator.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <sstream>
#include <typeinfo>
#include <unordered_map>
#include <unordered_set>

using namespace torch::jit;

extern "C" {
// One tensor as Rust sees it. Pointers borrow the TensorImpl's own arrays: no copies.
struct KilnTensor {
  void* data;
  const int64_t* sizes;
  const int64_t* strides;
  int64_t ndim;
  int32_t dtype;  // c10::ScalarType
  int32_t device; // c10::DeviceType
  int32_t requires_grad;
  // 0: generated code may read this tensor; else why not (see `admission`).
  int32_t refusal;
  // Identity of the data, for packed copies kept between calls: the StorageImpl and the
  // version counter (bumped by every in-place op); -1 when the tensor has none (an
  // inference tensor).
  void* storage;
  int64_t version;
};

// What a call's semantics depend on besides its tensors (see `call_state`).
struct KilnCallState {
  int32_t default_dtype;  // c10::ScalarType of torch.get_default_dtype()
  int32_t autocast;       // c10::ScalarType CPU autocast casts to, or -1 when it is off
  int32_t refusal;        // 0, or why no Kiln code may run on this thread now
};

// Implemented in Rust (torch-bridge/src/ffi.rs).
int32_t kiln_rs_known_op(const char* kind);
int32_t kiln_rs_node_supported(const char* dump, size_t len, char* reason, size_t cap);
int64_t kiln_rs_prepare_group(const char* dump, size_t len, char* reason, size_t cap);
int32_t kiln_rs_weight_facts(const float* data, int64_t rows, int64_t cols, int64_t s0, int64_t s1, char* out, size_t cap);
int32_t kiln_rs_guard(int64_t group, const KilnTensor* inputs, size_t n, const KilnCallState* state);
// Allocates an output (strides: null for contiguous); 0 and its data in *data, or nonzero.
typedef int32_t (*KilnAlloc)(void* ctx, size_t index, int32_t dtype, const int64_t* sizes, const int64_t* strides, size_t ndim, void** data);
// 0: ran; else nothing ran and `error` says why. Reads the call's state (kiln_cpp_call_state)
// only where the guard's choice is not at hand.
int32_t kiln_rs_run(int64_t group, const KilnTensor* inputs, size_t n, KilnAlloc alloc, void* ctx, char* error, size_t cap);
int64_t kiln_rs_reason(const char* kind, const char* reason, int32_t counted);
// A block's fallbacks (reason ids, one per node): the marker's id, or -1.
int64_t kiln_rs_fallback_block(const int64_t* reasons, size_t n);
void kiln_rs_fallback_block_ran(int64_t marker);
void kiln_rs_pass_started();
void kiln_rs_pass_error(const char* what);
}

namespace {

std::atomic<bool> g_enabled{false};
std::mutex g_mutex;
bool g_registered_ops = false;
bool g_pass_registered = false;
GraphPassNameType g_pass_id = 0;

Symbol group_kind() { static Symbol s = Symbol::fromQualString("kiln::CompilationGroup"); return s; }
Symbol guard_kind() { static Symbol s = Symbol::fromQualString("kiln::Guard"); return s; }
Symbol group_attr() { static Symbol s = Symbol::attr("kiln_group"); return s; }
// On nodes left in TorchScript: the id of the reason (Rust keeps the text) for explain().
Symbol reason_attr() { static Symbol s = Symbol::attr("kiln_reason"); return s; }
// On the nodes of a group's fallback copy. The executor optimises that copy as a graph of its
// own, and the pass must leave it alone: grouping it again would guard the same inputs again
// (a refused call would be refused once per nesting level, up to the bailout depth) and would
// give the group fresh specialisation slots past its limit.
Symbol fallback_attr() { static Symbol s = Symbol::attr("kiln_fallback"); return s; }
// At the start of a block with nodes left in TorchScript: counts them as fallbacks when the
// block first runs.
Symbol ran_kind() { static Symbol s = Symbol::fromQualString("kiln::FallbacksRan"); return s; }
Symbol marker_attr() { static Symbol s = Symbol::attr("kiln_marker"); return s; }
// On a functional node that stands for an in-place one during the pass: that op's kind.
Symbol inplace_attr() { static Symbol s = Symbol::attr("kiln_inplace"); return s; }
// On a group: the outputs it returns undefined, as eager does (Rust computes the others).
Symbol undefined_attr() { static Symbol s = Symbol::attr("kiln_undefined"); return s; }
// A dynamically quantized linear or RNN cell as the pass sees it (unpack_quantized_ops), and on
// it the quantized op it stands for.
Symbol quantized_linear_kind() { static Symbol s = Symbol::fromQualString("kiln::linear_dynamic"); return s; }
Symbol quantized_attr() { static Symbol s = Symbol::attr("kiln_quantized"); return s; }
Symbol quantized_gru_kind() { static Symbol s = Symbol::fromQualString("kiln::gru_cell_dynamic"); return s; }
Symbol quantized_lstm_kind() { static Symbol s = Symbol::fromQualString("kiln::lstm_cell_dynamic"); return s; }
// The whole-sequence `aten::quantized_lstm` / `quantized_gru` with their cells' weights unpacked.
Symbol quantized_lstm_sequence_kind() { static Symbol s = Symbol::fromQualString("kiln::lstm_dynamic"); return s; }
Symbol quantized_gru_sequence_kind() { static Symbol s = Symbol::fromQualString("kiln::gru_dynamic"); return s; }
// On it: how many of its inputs Kiln reads, and where the quantized op's own inputs are.
Symbol args_attr() { static Symbol s = Symbol::attr("kiln_args"); return s; }
Symbol original_attr() { static Symbol s = Symbol::attr("kiln_original"); return s; }
Symbol static_linear_kind() { static Symbol s = Symbol::fromQualString("kiln::linear_quantized"); return s; }
Symbol static_conv_kind() { static Symbol s = Symbol::fromQualString("kiln::conv2d_quantized"); return s; }
Symbol quantized_cat_kind() { static Symbol s = Symbol::fromQualString("quantized::cat"); return s; }
bool is_unpacked_quantized(const Node* n) {
  return n->kind() == quantized_linear_kind() || n->kind() == quantized_gru_kind() || n->kind() == quantized_lstm_kind() ||
         n->kind() == static_linear_kind() || n->kind() == static_conv_kind() || n->kind() == quantized_lstm_sequence_kind() ||
         n->kind() == quantized_gru_sequence_kind();
}

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kBool: return "bool";
    case at::kInt: return "i32";
    case at::kLong: return "i64";
    case at::kFloat: return "f32";
    case at::kDouble: return "f64";
    default: return std::string("unsupported:") + c10::toString(t);
  }
}

void tensor_type_text(const Value* v, std::ostream& os, bool with_strides);

// Declares a tensor input: its profiled type when TorchScript recorded a complete one, else
// "?" (TorchScript profiles only inputs of ops its own fuser knows; Kiln then specialises on
// the live tensors). Inputs known to be off the CPU or to require grad are refused.
bool tensor_input_text(const Value* v, std::ostream& os, std::string* why) {
  auto t = v->type()->cast<TensorType>();
  if (t->device() && !t->device()->is_cpu()) { *why = "not on CPU"; return false; }
  if (t->requiresGrad().value_or(false)) { *why = "input requires grad"; return false; }
  if (!t->scalarType() || !t->device() || !t->requiresGrad().has_value() || !t->sizes().concrete_sizes() ||
      !t->strides().concrete_sizes()) {
    os << "?";
    return true;
  }
  tensor_type_text(v, os, true);
  return true;
}

// A tracer's constant for a Python number (`x * 2.0` traced): a 0-d tensor that promotes like
// the number it was, so Kiln takes it as that number.
bool wrapped_number_text(const at::Tensor& t, std::ostream& os) {
  if (!t.defined() || !t.unsafeGetTensorImpl()->is_wrapped_number() || t.dim() != 0 || !t.device().is_cpu()) return false;
  switch (t.scalar_type()) {
    case at::kDouble: os.precision(17); os << "float " << t.item<double>(); return true;
    case at::kLong: os << "int " << t.item<int64_t>(); return true;
    case at::kBool: os << "bool " << (t.item<bool>() ? 1 : 0); return true;
    default: return false;
  }
}

// Non-tensor arguments must be constants known at compile time.
bool constant_text(const Value* v, std::ostream& os) {
  const Node* p = v->node();
  if (p->kind() == prim::Constant) {
    auto iv = toIValue(v);
    if (!iv) return false;
    if (iv->isNone()) { os << "none"; return true; }
    if (iv->isBool()) { os << "bool " << (iv->toBool() ? 1 : 0); return true; }
    if (iv->isInt()) { os << "int " << iv->toInt(); return true; }
    if (iv->isDouble()) { os.precision(17); os << "float " << iv->toDouble(); return true; }
    if (iv->isString()) { os << "str " << iv->toStringRef(); return true; }
    if (iv->isIntList()) {
      os << "ints";
      for (auto x : iv->toIntVector()) os << " " << x;
      return true;
    }
    if (iv->isDoubleList()) {
      os.precision(17);
      os << "floats";
      for (auto x : iv->toDoubleVector()) os << " " << x;
      return true;
    }
    if (iv->isTensor()) return wrapped_number_text(iv->toTensor(), os);
    return false;
  }
  if (p->kind() == prim::ListConstruct) {
    // A list of int constants, or of float constants (upsampling's scale factors).
    std::ostringstream items;
    items.precision(17);
    bool ints = true, floats = true;
    for (auto* in : p->inputs()) {
      auto iv = toIValue(in);
      ints = ints && iv && iv->isInt();
      floats = floats && iv && iv->isDouble();
      if (!ints && !floats) return false;
      if (ints) items << " " << iv->toInt(); else items << " " << iv->toDouble();
    }
    os << (ints ? "ints" : "floats") << items.str();
    return true;
  }
  return false;
}

void tensor_type_text(const Value* v, std::ostream& os, bool with_strides) {
  auto t = v->type()->expect<TensorType>();
  os << dtype_name(*t->scalarType()) << " [";
  auto sizes = *t->sizes().concrete_sizes();
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? "," : "") << sizes[i];
  os << "]";
  if (with_strides) {
    os << " [";
    auto strides = *t->strides().concrete_sizes();
    for (size_t i = 0; i < strides.size(); ++i) os << (i ? "," : "") << strides[i];
    os << "]";
  }
}

constexpr const char* kDynamicScalar = "a non-numeric argument is computed at run time (Kiln takes constants)";

// How a group input reaches Rust: a tensor; a number computed at run time, passed as a 0-d
// float64 / int64 tensor that Rust promotes as a Python number (a kernel parameter: code does
// not depend on its value); a constant, written into the dump; an optional computed at run
// time, which Kiln specialises as None (the dump says `none`, and the guard fails the call
// when it is not: a scripted module's `mask=None` paths, e.g. the merged attention mask a
// scripted TransformerEncoderLayer computes in Python); or something Kiln cannot take.
enum class InputKind { Tensor, Float, Int, Constant, ExpectNone, Unsupported };

InputKind input_kind(const Value* v) {
  if (v->type()->cast<TensorType>()) return InputKind::Tensor;
  std::ostringstream c;
  if (constant_text(v, c)) return InputKind::Constant;
  if (v->type()->kind() == TypeKind::FloatType) return InputKind::Float;
  if (v->type()->kind() == TypeKind::IntType) return InputKind::Int;
  if (v->type()->kind() == TypeKind::OptionalType) return InputKind::ExpectNone;
  return InputKind::Unsupported;
}

// Declares a group input that is no tensor in the dump (`input ... scalar`, or `const`).
bool non_tensor_text(const Value* v, const std::string& name, std::ostream& os, std::string* why) {
  InputKind kind = input_kind(v);
  if (kind == InputKind::Float || kind == InputKind::Int) {
    os << "input " << name << " scalar " << (kind == InputKind::Float ? "f64" : "i64") << "\n";
    return true;
  }
  if (kind == InputKind::ExpectNone) {
    os << "const " << name << " none\n";
    return true;
  }
  std::ostringstream c;
  if (!constant_text(v, c)) { *why = kDynamicScalar; return false; }
  os << "const " << name << " " << c.str() << "\n";
  return true;
}

// What the guard and the group op pass to Rust: tensors and run-time numbers, in order.
bool passed_to_rust(InputKind k) { return k == InputKind::Tensor || k == InputKind::Float || k == InputKind::Int; }

// Ops with one tensor output are what Kiln groups.
bool is_tensor_op(const Node* n) {
  return n->outputs().size() == 1 && n->output()->type()->cast<TensorType>();
}

bool holds_tensors(const TypePtr& t) {
  if (t->cast<TensorType>()) return true;
  for (const auto& c : t->containedTypes())
    if (holds_tensors(c)) return true;
  return false;
}

bool is_shape_op(const Node* n);
bool size_constant_text(const Value* v, std::ostream& os);

// Nodes that only move values around: not reported (explain lists what computes).
bool is_plumbing(const Node* n) {
  static const std::unordered_set<Symbol> kinds = {prim::Constant, prim::ListConstruct, prim::ListUnpack, prim::TupleConstruct,
                                                  prim::TupleUnpack, prim::TupleIndex, prim::GetAttr, prim::If, prim::Loop,
                                                  prim::unchecked_cast, prim::Uninitialized, prim::FallbackGraph, prim::DictConstruct,
                                                  prim::profile, prim::TypeCheck, prim::RequiresGradCheck, prim::BailOut};
  return kinds.count(n->kind()) > 0 || n->kind() == group_kind() || n->kind() == guard_kind() || n->kind() == ran_kind();
}

// What explain() lists, with why it stayed in TorchScript: every aten op and every other
// computing node that makes tensors (several outputs too: split, unsafe_chunk, lstm,
// _native_multi_head_attention, prim::ConstantChunk). Ops on scalars, lists and strings
// (size, dim, __not__, format...) are not candidates at all.
bool is_reported(const Node* n) {
  if (is_plumbing(n) || is_shape_op(n)) return false;
  for (const Value* o : n->outputs())
    if (holds_tensors(o->type())) return true;
  return false;
}

// The text form Rust lowers (torch-bridge/src/ts_dump.rs documents it).
// A list of tensors joins a group with its cat, and only then (see view_used_outside).
bool is_tensor_list(const Node* n);
bool is_split(const Node* n);
bool is_unpack(const Node* n);
bool is_view(const Node* n);
bool is_shape_op(const Node* n);

// Output `i` of `n` is a tensor eager leaves undefined: `_native_multi_head_attention`'s
// attention weights when need_weights is false.
bool leaves_undefined(const Node* n, size_t i) {
  if (n->kind() != Symbol::fromQualString("aten::_native_multi_head_attention") || i != 1 || n->inputs().size() < 11) return false;
  auto need = toIValue(n->input(10));
  return need && need->isBool() && !need->toBool();
}

struct Dumper {
  std::ostringstream os;
  std::unordered_map<const Value*, std::string> names;
  // The types TorchScript recorded hold under the default dtype of now (integer → float).
  Dumper() { os << "default_dtype " << dtype_name(c10::get_default_dtype_as_scalartype()) << "\n"; }
  std::string name(const Value* v) {
    auto it = names.find(v);
    if (it != names.end()) return it->second;
    std::string n = "%" + std::to_string(names.size());
    names.emplace(v, n);
    return n;
  }
  // Declares an outside value: a tensor input, or a constant. Returns false if neither.
  bool declare(const Value* v, std::string* why) {
    if (names.count(v)) return true;
    // Sizes computed from tensors Kiln sees (traced sizes are 0-d tensors too): evaluated
    // from their types while lowering.
    if (is_shape_op(v->node())) return shape_node(v->node(), why);
    if (v->type()->cast<TensorType>()) {
      os << "input " << name(v) << " ";
      if (!tensor_input_text(v, os, why)) return false;
      os << "\n";
      return true;
    }
    if (is_tensor_list(v->node())) return tensor_list(v->node(), why);
    return non_tensor_text(v, name(v), os, why);
  }
  // A list of tensors built for a cat: `list %k %a %b ...`.
  bool tensor_list(const Node* n, std::string* why) {
    for (auto* in : n->inputs()) if (!declare(in, why)) return false;
    os << "list " << name(n->output());
    for (auto* in : n->inputs()) os << " " << name(in);
    os << "\n";
    return true;
  }
  bool node(const Node* n, std::string* why) {
    if (!is_tensor_op(n)) { *why = "not a tensor op"; return false; }
    // An unpacked quantized op's inputs past `kiln_args` (the packed weights) are
    // TorchScript's; Kiln reads the unpacked tensors before them.
    size_t count = is_unpacked_quantized(n) ? static_cast<size_t>(n->i(args_attr())) : n->inputs().size();
    for (size_t i = 0; i < count; ++i) if (!declare(n->input(i), why)) return false;
    os << "node " << name(n->output()) << " " << (n->hasAttribute(inplace_attr()) ? n->s(inplace_attr()) : std::string(n->kind().toQualString()));
    for (size_t i = 0; i < count; ++i) os << " " << name(n->input(i));
    recorded_type(n->output());
    os << "\n";
    return true;
  }
  // The parts of a split (a ListUnpack of chunk/split, or a ConstantChunk), or the outputs of
  // an op with several (lstm_cell), one `node` each: the op and its arguments, then the
  // part's index and the number of parts (eager raises when a split makes another number).
  bool parts(const Node* n, std::string* why) {
    std::string kind;
    std::vector<std::string> args;
    if (n->kind() == prim::ConstantChunk) {
      if (!declare(n->input(), why)) return false;
      kind = "aten::chunk";
      args = {name(n->input()), constant("int " + std::to_string(n->i(attr::chunks))), constant("int " + std::to_string(n->i(attr::dim)))};
    } else {
      // A ListUnpack's parts are its split's; an op with several outputs is its own.
      const Node* op = n->kind() == prim::ListUnpack ? n->input()->node() : n;
      size_t count = is_unpacked_quantized(op) ? static_cast<size_t>(op->i(args_attr())) : op->inputs().size();
      for (size_t i = 0; i < count; ++i) if (!declare(op->input(i), why)) return false;
      kind = op->kind().toQualString();
      for (size_t i = 0; i < count; ++i) args.push_back(name(op->input(i)));
    }
    std::string count = constant("int " + std::to_string(n->outputs().size()));
    for (size_t i = 0; i < n->outputs().size(); ++i) {
      // An output nothing reads is not computed; one eager leaves undefined is not either.
      if (n->outputs()[i]->uses().empty()) continue;
      if (leaves_undefined(n, i)) {
        undefined.insert(n->outputs()[i]);
        continue;
      }
      std::string index = constant("int " + std::to_string(i));
      os << "node " << name(n->outputs()[i]) << " " << kind;
      for (const auto& a : args) os << " " << a;
      os << " " << index << " " << count;
      recorded_type(n->outputs()[i]);
      os << "\n";
    }
    return true;
  }
  // A shape op (is_shape_op): `shape %k kind args...`; an unpacked list of ints one `shape`
  // per item, with its index and count appended.
  bool shape_node(const Node* n, std::string* why) {
    for (auto* in : n->inputs()) {
      std::ostringstream number;
      if (!names.count(in) && size_constant_text(in, number)) {
        os << "const " << name(in) << " " << number.str() << "\n";
        continue;
      }
      if (!declare(in, why)) return false;
    }
    if (n->kind() == prim::ListUnpack) {
      std::string count = constant("int " + std::to_string(n->outputs().size()));
      for (size_t i = 0; i < n->outputs().size(); ++i) {
        std::string index = constant("int " + std::to_string(i));  // (its line first)
        os << "shape " << name(n->outputs()[i]) << " prim::ListUnpack " << name(n->input()) << " " << index << " " << count << "\n";
      }
      return true;
    }
    os << "shape " << name(n->output()) << " " << n->kind().toQualString();
    for (auto* in : n->inputs()) os << " " << name(in);
    os << "\n";
    return true;
  }
  // A constant the dump makes up (a ConstantChunk's attributes, a part's index).
  std::string constant(const std::string& text) {
    std::string n = "%c" + std::to_string(made_up++);
    os << "const " << n << " " << text << "\n";
    return n;
  }
  // The output type TorchScript profiled, when complete: Rust checks its own inference.
  void recorded_type(const Value* v) {
    auto t = v->type()->cast<TensorType>();
    if (t && t->scalarType() && t->sizes().concrete_sizes()) {
      os << " : " << dtype_name(*t->scalarType()) << " [";
      auto sizes = *t->sizes().concrete_sizes();
      for (size_t i = 0; i < sizes.size(); ++i) os << (i ? "," : "") << sizes[i];
      os << "]";
    }
  }
  size_t made_up = 0;
  // Outputs eager leaves undefined (see leaves_undefined): the group op returns them so.
  std::unordered_set<const Value*> undefined;
};

// A split of a tensor into a list (chunk, split and their unsafe_ forms) that only a
// ListUnpack takes apart: each part is a slice, and the split joins a group with its parts.
bool is_split(const Node* n) {
  static const std::unordered_set<std::string> kinds = {"aten::chunk", "aten::unsafe_chunk", "aten::split", "aten::unsafe_split",
                                                        "aten::split_with_sizes", "aten::unsafe_split_with_sizes"};
  if (n->outputs().size() != 1 || !kinds.count(n->kind().toQualString())) return false;
  auto list = n->output()->type()->cast<ListType>();
  if (!list || !list->getElementType()->cast<TensorType>() || n->output()->uses().empty()) return false;
  for (const Use& u : n->output()->uses())
    if (u.user->kind() != prim::ListUnpack && u.user->kind() != group_kind()) return false;
  return true;
}

// The parts of a split as tensors: a ListUnpack of a split, or a prim::ConstantChunk.
bool is_unpack(const Node* n) {
  if (n->kind() == prim::ConstantChunk) return true;
  return n->kind() == prim::ListUnpack && is_split(n->input()->node());
}

bool is_size_tensor(const Value* v);

// Traced code computes with sizes as 0-d tensors: `prim::NumToTensor(x.size(d))`, a number
// constant (`{4}`), integer arithmetic on those (`aten::floor_divide`), back with `aten::Int`.
bool is_size_arithmetic(const Node* n) {
  if (n->kind() != aten::mul && n->kind() != aten::add && n->kind() != aten::sub && n->kind() != aten::floor_divide) return false;
  if (n->outputs().size() != 1 || !n->output()->type()->cast<TensorType>()) return false;
  bool from_a_size = false;
  for (const Value* in : n->inputs()) {
    if (in->type()->cast<TensorType>()) {
      if (!is_size_tensor(in)) return false;
      from_a_size |= in->node()->kind() != prim::Constant;
    } else if (in->type()->kind() != TypeKind::IntType) {
      return false;
    }
  }
  return from_a_size;
}

// A 0-d integer tensor constant (the tracer's `{4}` for a module's int attribute): in size
// arithmetic, the number it holds.
bool size_constant_text(const Value* v, std::ostream& os) {
  if (v->node()->kind() != prim::Constant || !v->type()->cast<TensorType>()) return false;
  auto iv = toIValue(v);
  if (!iv || !iv->isTensor()) return false;
  const at::Tensor& t = iv->toTensor();
  if (!t.defined() || t.dim() != 0 || !t.device().is_cpu() || !c10::isIntegralType(t.scalar_type(), false)) return false;
  os << "int " << t.item<int64_t>();
  return true;
}

// Whether every user of `v` is a shape op (then a tensor constant is a number to them).
bool only_shape_ops_use(const Value* v) {
  for (const Use& u : v->uses())
    if (!is_shape_op(u.user)) return false;
  return !v->uses().empty();
}

// A constant Kiln takes as a number inside a group: any constant_text takes, and a 0-d
// integer tensor that only size arithmetic reads.
bool number_constant_text(const Value* v, std::ostream& os) {
  return constant_text(v, os) || (only_shape_ops_use(v) && size_constant_text(v, os));
}

bool is_size_tensor(const Value* v) {
  const Node* p = v->node();
  if (p->kind() == prim::NumToTensor) return p->input()->type()->kind() == TypeKind::IntType;
  std::ostringstream number;
  if (p->kind() == prim::Constant) return size_constant_text(v, number);
  return is_size_arithmetic(p);
}

// Integer arithmetic on sizes: x.size(d), x.shape and its items, products and quotients
// of sizes, the int lists views take (`x.view(b, s, h, -1)`). A group takes it with its
// users and Rust evaluates it while lowering, where every size is known (the guard checks
// them); alone it stays in TorchScript (it computes no tensor).
bool is_shape_op(const Node* n) {
  auto is_int = [](const Value* v) { return v->type()->kind() == TypeKind::IntType; };
  auto is_ints = [](const Value* v) {
    auto l = v->type()->cast<ListType>();
    return l && l->getElementType()->kind() == TypeKind::IntType;
  };
  auto all = [](auto vs, auto pred) { return std::all_of(vs.begin(), vs.end(), pred); };
  if (n->kind() == aten::size)
    return n->outputs().size() == 1 && n->input(0)->type()->cast<TensorType>() && (n->inputs().size() == 1 ? is_ints(n->output()) : is_int(n->output()));
  if (n->kind() == aten::dim || n->kind() == prim::dtype || n->kind() == prim::device) return n->inputs().size() == 1 && n->input(0)->type()->cast<TensorType>();
  if ((n->kind() == aten::mul || n->kind() == aten::add || n->kind() == aten::sub || n->kind() == aten::floordiv) && n->inputs().size() == 2 &&
      all(n->inputs(), is_int) && is_int(n->output()))
    return true;
  if (n->kind() == aten::__getitem__) return n->inputs().size() == 2 && is_ints(n->input(0)) && is_int(n->input(1));
  if (n->kind() == prim::ListConstruct) return all(n->inputs(), is_int) && is_ints(n->output());
  if (n->kind() == prim::ListUnpack) return is_ints(n->input()) && all(n->outputs(), is_int);
  if (n->kind() == prim::NumToTensor) return n->outputs().size() == 1 && is_size_tensor(n->output());
  if (n->kind() == aten::Int) return n->inputs().size() == 1 && is_size_tensor(n->input());
  return is_size_arithmetic(n);
}

// An aten op with several tensor outputs (lstm_cell): dumped as its parts, as a split is.
bool is_multi_output_op(const Node* n) {
  if (n->outputs().size() < 2 || (n->kind().ns() != c10::Symbol::fromQualString("namespaces::aten") && !is_unpacked_quantized(n))) return false;
  for (const Value* o : n->outputs())
    if (!o->type()->cast<TensorType>()) return false;
  return true;
}

// add_, sigmoid_, ...: an aten op that writes its first argument.
bool is_inplace(const Node* n) {
  std::string k = n->kind().toQualString();
  return n->kind().ns() == c10::Symbol::fromQualString("namespaces::aten") && k.size() > 7 && k.back() == '_' && k.compare(6, 2, "__") != 0;
}

// Composite ops whose schema promises a new tensor but which return their input as it is
// (type_as to the same dtype, dropouts in eval).
bool may_return_input(const Node* n) {
  static const std::unordered_set<std::string> kinds = {"aten::type_as", "aten::dropout", "aten::feature_dropout", "aten::alpha_dropout",
                                                        "aten::feature_alpha_dropout"};
  return kinds.count(n->kind().toQualString()) > 0;
}

// Whether nothing but `n` can see what the in-place op `n` writes: then Kiln computes its
// functional form (traced GRU/LSTM cells are chains of add_, sigmoid_, mul_). True when the
// tensor it writes, and every tensor that one is a view, a part (of a chunk or split: parts
// do not overlap) or an in-place result of, has one use (the next link of the chain), down
// to a tensor an op made new (not an input of the graph, not a constant).
bool makes_new_tensor(const Node* p);

bool writes_unobserved(const Node* n) {
  const Value* v = n->inputs()[0];
  for (;;) {
    if (v->uses().size() != 1) return false;
    const Node* p = v->node();
    if (p->kind() == prim::ListUnpack || p->kind() == prim::ConstantChunk || is_split(p) || is_view(p) || is_inplace(p)) {
      v = p->inputs()[0];
      continue;
    }
    return makes_new_tensor(p);
  }
}

// An aten op whose one output is a tensor no other value shares memory with: not a view,
// not an in-place op, not an input or constant of the graph.
bool makes_new_tensor(const Node* p) {
  if (p->kind() == prim::Param || p->kind() == prim::Constant || may_return_input(p) || is_view(p) || is_split(p)) return false;
  const FunctionSchema* schema = p->maybeSchema();
  if (!schema || schema->is_mutable() || p->outputs().size() != 1) return false;
  for (const auto& r : schema->returns())
    if (r.alias_info()) return false;
  return true;
}

// The scripted form of the same: `a = x * 2; a.add_(y); a.sigmoid_(); return a` writes a
// value that later nodes read by its name. Kiln computes the op functionally and renames the
// later uses when the value is new (makes_new_tensor), made in the op's own block, and every
// use of it before the op only reads it (no view, list or other alias of it exists to see
// the write).
bool writes_renamable(const Node* n) {
  const Value* x = n->inputs()[0];
  const Node* p = x->node();
  if (p->owningBlock() != n->owningBlock() || !makes_new_tensor(p)) return false;
  for (const Use& u : x->uses()) {
    if (u.user == n || u.user->isAfter(n)) continue;
    // Before the op: a read that makes nothing sharing x's memory.
    if (!makes_new_tensor(u.user)) return false;
  }
  return true;
}

// `n` replaced by a node of `kind` on the same inputs (its output's uses, type and
// attributes move over).
Node* with_kind(Node* n, Symbol kind) {
  Node* m = n->owningGraph()->create(kind, n->inputs(), 1);
  m->copyAttributes(*n);
  m->setSourceRange(n->sourceRange());
  if (n->scope()) m->setScope(n->scope());
  m->insertBefore(n);
  m->output()->copyMetadata(n->output());
  n->output()->replaceAllUsesWith(m->output());
  n->destroy();
  return m;
}

// Whether only unpacked quantized nodes read `v`, each among the original op's inputs past
// the `kiln_args` Kiln reads (a whole-sequence RNN's `CellParamsBase[]`, built at run time).
bool read_by_torchscript_only(const Value* v) {
  for (const Use& u : v->uses())
    if (!is_unpacked_quantized(u.user) || u.offset < static_cast<size_t>(u.user->i(args_attr()))) return false;
  return !v->uses().empty();
}

// The dynamically quantized ops of `torch.ao.quantization.quantize_dynamic`, frozen, whose
// packed weights are constants: `quantized::linear_dynamic(x, packed, reduce_range)` (and
// `linear_relu_dynamic`), and the cells `quantized::quantized_gru_cell_dynamic(x, h, packed_ih,
// packed_hh, b_ih, b_hh)` and `quantized_lstm_cell_dynamic(x, [h, c], ...)` (which take their
// biases from the packed weights, as ATen's `QuantizedCellParamsDynamic` does, with
// reduce_range). For the pass each becomes a Kiln node
// (`kiln::linear_dynamic(x, w, w_scale, w_zero_point, bias, reduce_range, relu, ...)`,
// `kiln::gru_cell_dynamic(x, h, w, s, z, b of ih, the same of hh, ...)`): each packed weight
// unpacked (fbgemm's own `unpack()`) into tensor constants that the pass lifts into group inputs
// like any frozen weight — the int8 values widened to int32 (Kiln has no int8 tensors), the
// scales as float32 as fbgemm keeps them, the zero points as int32, per tensor (1 element) or
// per output channel, the bias — and after those (`kiln_args` of them Kiln reads) the original
// op's inputs Kiln does not read. Whatever is left outside a group, and every fallback copy,
// gets the quantized op back (restore_quantized, from `kiln_original`: where the original
// inputs are).

// Whether a packed weight is fbgemm's (`PackedLinearWeight`, `PackedConvWeight<2>`): what
// Kiln computes is fbgemm's arithmetic. oneDNN's (the x86 engine's choice on a host with
// VNNI for symmetric weights) and qnnpack's round otherwise: TorchScript runs those.
// (`type`: the packed weight's dynamic C++ type name, `packed_weight_type`.)
bool is_fbgemm_packed(const std::string& type, const char* name) {
  return type.find(name) != std::string::npos && type.find("Onednn") == std::string::npos && type.find("Fp16") == std::string::npos;
}

// The dynamic C++ type name of a packed conv or linear weight (it says which library packed
// it), or "" for any other value.
std::string packed_weight_type(const IValue& iv) {
  if (!iv.isObject()) return "";
  try {
    return typeid(*iv.toCustomClass<ConvPackedParamsBase<2>>()).name();
  } catch (const std::exception&) {
  }
  try {
    return typeid(*iv.toCustomClass<LinearPackedParamsBase>()).name();
  } catch (const std::exception&) {
  }
  return "";
}

// [w (int32), scale, zero point] of a quantized int8 weight (dim dims), per tensor or per
// output channel; empty where it is neither.
std::vector<at::Tensor> int8_weight(at::Tensor w, int64_t dim) {
  if (!w.is_quantized() || w.scalar_type() != at::kQInt8 || w.dim() != dim) return {};
  at::Tensor scale, zero_point;
  if (w.qscheme() == at::kPerTensorAffine) {
    scale = at::full({1}, static_cast<float>(w.q_scale()), at::kFloat);
    zero_point = at::full({1}, w.q_zero_point(), at::kInt);
  } else if (w.qscheme() == at::kPerChannelAffine && w.q_per_channel_axis() == 0) {
    scale = w.q_per_channel_scales().to(at::kFloat).contiguous();
    zero_point = w.q_per_channel_zero_points().to(at::kInt).contiguous();
  } else {
    return {};
  }
  return {w.int_repr().to(at::kInt).contiguous(), scale, zero_point};
}

// A packed weight's float bias as a float32 constant tensor (undefined where it has none: the
// bias is the float module's parameter).
at::Tensor float_bias(const std::optional<at::Tensor>& bias) {
  return bias && bias->defined() ? bias->detach().to(at::kFloat).contiguous() : at::Tensor();
}

// A constant fbgemm packed conv weight (not transposed) as [w, scale, zero point, bias]
// (int8_weight's, and the float bias, undefined if none) with its stride, padding, dilation
// and {groups, 1 if every zero point of the weight is 0}; empty where it is none.
std::vector<at::Tensor> unpacked_conv_weight(Value* packed, std::vector<std::vector<int64_t>>* window) {
  auto iv = toIValue(packed);
  if (packed->node()->kind() != prim::Constant || !iv || !iv->isObject()) return {};
  try {
    auto params = iv->toCustomClass<ConvPackedParamsBase<2>>();
    if (!is_fbgemm_packed(typeid(*params).name(), "PackedConvWeight") || params->transpose()) return {};
    auto [w, bias] = params->unpack();
    auto out = int8_weight(w, 4);
    if (out.empty()) return {};
    out.push_back(float_bias(bias));
    int64_t symmetric = out[2].eq(0).all().item<bool>();
    *window = {params->stride().vec(), params->padding().vec(), params->dilation().vec(), {params->groups(), symmetric}};
    return out;
  } catch (const std::exception&) {
    return {};
  }
}

// A constant fbgemm packed weight as [w (int32), scale, zero point, bias (undefined if none)];
// empty where it is none.
std::vector<at::Tensor> unpacked_weight(const IValue& iv) {
  if (!iv.isObject()) return {};
  try {
    auto params = iv.toCustomClass<LinearPackedParamsBase>();
    if (!is_fbgemm_packed(typeid(*params).name(), "PackedLinearWeight")) return {};
    auto [w, bias] = params->unpack();
    auto out = int8_weight(w, 2);
    if (out.empty()) return {};
    out.push_back(float_bias(bias));
    return out;
  } catch (const std::exception&) {
    return {};  // not a packed linear weight
  }
}

std::vector<at::Tensor> unpacked_weight(Value* packed) {
  auto iv = toIValue(packed);
  if (packed->node()->kind() != prim::Constant || !iv) return {};
  return unpacked_weight(*iv);
}

// The constant objects of a list `rnn` reads: a ListConstruct of constants, or (as a scripted
// quantized RNN builds its `CellParamsBase[]`) an empty ListConstruct filled by `aten::append`s
// of constants before `rnn` and used by nothing else. Empty where it is neither.
std::vector<IValue> constant_objects(Value* list, const Node* rnn) {
  Node* n = list->node();
  if (n->kind() != prim::ListConstruct) return {};
  std::vector<Node*> appends;
  for (const Use& u : list->uses()) {
    if (u.user == rnn) continue;
    if (u.user->kind() != aten::append || u.offset != 0 || u.user->owningBlock() != rnn->owningBlock() || !u.user->isBefore(rnn)) return {};
    appends.push_back(u.user);
  }
  if (!appends.empty() && n->inputs().size() > 0) return {};
  std::sort(appends.begin(), appends.end(), [](Node* a, Node* b) { return a->isBefore(b); });
  std::vector<Value*> items(n->inputs().begin(), n->inputs().end());
  for (Node* a : appends) items.push_back(a->input(1));
  std::vector<IValue> out;
  for (Value* v : items) {
    auto iv = toIValue(v);
    if (v->node()->kind() != prim::Constant || !iv || !iv->isObject()) return {};
    out.push_back(*iv);
  }
  return out;
}

// A dynamically quantized RNN's cell parameters (ATen's `QuantizedCellParamsDynamic`, seen
// through its TorchScript class's `__getstate__`: ("quantized_dynamic", [b_ih, b_hh], [],
// [reduce_range], [packed ih, packed hh])) as the two projections' [w, scale, zero point,
// bias] (the packed biases: what `apply_dynamic` adds) and reduce_range; empty where the
// cell is another kind (fp16, the legacy `quantized`) or a projection has no bias.
std::vector<at::Tensor> unpacked_cell(const IValue& cell, bool* reduce_range) {
  try {
    auto& type = *cell.toObjectRef().type();
    auto* getstate = type.findMethod("__getstate__");
    if (!getstate) return {};
    Stack stack{cell};
    getstate->run(stack);
    auto state = stack.back().toTuple();
    const auto& parts = state->elements();
    if (parts.size() != 5 || !parts[0].isString() || parts[0].toStringRef() != "quantized_dynamic") return {};
    auto longs = parts[3].toIntVector();
    *reduce_range = !longs.empty() && longs[0] != 0;
    auto packed = parts[4].toList();
    if (packed.size() != 2) return {};
    std::vector<at::Tensor> out;
    for (size_t i = 0; i < 2; ++i) {
      auto w = unpacked_weight(packed.get(i));
      if (w.size() != 4 || !w[3].defined()) return {};
      out.insert(out.end(), w.begin(), w.end());
    }
    return out;
  } catch (const std::exception&) {
    return {};
  }
}

// Those tensors as constants at the current insertion point (None for no bias).
std::vector<Value*> weight_constants(Graph* g, const std::vector<at::Tensor>& ts) {
  std::vector<Value*> out;
  for (const at::Tensor& t : ts) {
    if (!t.defined()) {
      out.push_back(g->insertNode(g->createNone())->output());
      continue;
    }
    Node* c = g->insertNode(g->create(prim::Constant));
    c->t_(attr::value, t);
    c->output()->inferTypeFrom(t);
    out.push_back(c->output());
  }
  return out;
}

// Puts `m` (not yet in a block) where `n` is, its outputs for n's, and destroys n.
void replace_node(Node* n, Node* m) {
  m->setSourceRange(n->sourceRange());
  if (n->scope()) m->setScope(n->scope());
  m->insertBefore(n);
  for (size_t i = 0; i < n->outputs().size(); ++i) {
    m->outputs()[i]->copyMetadata(n->outputs()[i]);
    n->outputs()[i]->replaceAllUsesWith(m->outputs()[i]);
  }
  n->destroy();
}

void unpack_quantized_ops(Block* b) {
  static const Symbol plain = Symbol::fromQualString("quantized::linear_dynamic");
  static const Symbol relu = Symbol::fromQualString("quantized::linear_relu_dynamic");
  static const Symbol gru = Symbol::fromQualString("quantized::quantized_gru_cell_dynamic");
  static const Symbol lstm = Symbol::fromQualString("quantized::quantized_lstm_cell_dynamic");
  static const Symbol static_linear = Symbol::fromQualString("quantized::linear");
  static const Symbol static_linear_relu = Symbol::fromQualString("quantized::linear_relu");
  static const Symbol static_conv = Symbol::fromQualString("quantized::conv2d");
  static const Symbol static_conv_relu = Symbol::fromQualString("quantized::conv2d_relu");
  static const Symbol lstm_sequence = Symbol::fromQualString("aten::quantized_lstm");
  static const Symbol gru_sequence = Symbol::fromQualString("aten::quantized_gru");
  for (auto it = b->nodes().begin(); it != b->nodes().end();) {
    Node* n = *it;
    ++it;
    for (Block* sub : n->blocks()) unpack_quantized_ops(sub);
    if (n->hasAttribute(fallback_attr())) continue;
    Graph* g = n->owningGraph();
    WithInsertPoint guard(n);
    std::vector<Value*> inputs;
    std::vector<int64_t> original;
    int64_t args = 0;
    Symbol kind;
    if ((n->kind() == plain || n->kind() == relu) && n->inputs().size() == 3 && n->outputs().size() == 1) {
      auto rr = toIValue(n->input(2));
      if (!rr || !rr->isBool()) continue;
      auto unpacked = unpacked_weight(n->input(1));
      if (unpacked.empty()) continue;
      auto w = weight_constants(g, unpacked);
      inputs = {n->input(0), w[0], w[1], w[2], w[3], n->input(2), g->insertConstant(n->kind() == relu), n->input(1)};
      kind = quantized_linear_kind(), args = 7, original = {0, 7, 5};
    } else if ((n->kind() == static_linear || n->kind() == static_linear_relu) && n->inputs().size() == 4 && n->outputs().size() == 1) {
      // quantized::linear(x, packed, output scale, output zero point)
      auto unpacked = unpacked_weight(n->input(1));
      if (unpacked.empty()) continue;
      auto w = weight_constants(g, unpacked);
      inputs = {n->input(0), w[0], w[1], w[2], w[3], n->input(2), n->input(3), g->insertConstant(n->kind() == static_linear_relu), n->input(1)};
      kind = static_linear_kind(), args = 8, original = {0, 8, 5, 6};
    } else if ((n->kind() == static_conv || n->kind() == static_conv_relu) && n->inputs().size() == 4 && n->outputs().size() == 1) {
      // quantized::conv2d(x, packed, output scale, output zero point)
      std::vector<std::vector<int64_t>> window;
      auto unpacked = unpacked_conv_weight(n->input(1), &window);
      if (unpacked.empty() || window.size() != 4) continue;
      auto w = weight_constants(g, unpacked);
      inputs = {n->input(0), w[0], w[1], w[2], w[3], g->insertConstant(window[0]), g->insertConstant(window[1]), g->insertConstant(window[2]),
                g->insertConstant(window[3][0]), g->insertConstant(window[3][1] == 1), n->input(2), n->input(3), g->insertConstant(n->kind() == static_conv_relu), n->input(1)};
      kind = static_conv_kind(), args = 13, original = {0, 13, 10, 11};
    } else if ((n->kind() == gru || n->kind() == lstm) && n->inputs().size() == 6 && n->outputs().size() == (n->kind() == gru ? 1 : 2)) {
      auto ih_tensors = unpacked_weight(n->input(2)), hh_tensors = unpacked_weight(n->input(3));
      if (ih_tensors.empty() || hh_tensors.empty()) continue;
      auto ih = weight_constants(g, ih_tensors), hh = weight_constants(g, hh_tensors);
      inputs = {n->input(0), n->input(1), ih[0], ih[1], ih[2], ih[3], hh[0], hh[1], hh[2], hh[3], n->input(2), n->input(3), n->input(4), n->input(5)};
      kind = n->kind() == gru ? quantized_gru_kind() : quantized_lstm_kind(), args = 10, original = {0, 1, 10, 11, 12, 13};
    } else if (((n->kind() == lstm_sequence && n->inputs().size() == 11 && n->outputs().size() == 3) ||
                (n->kind() == gru_sequence && n->inputs().size() == 9 && n->outputs().size() == 2)) &&
               n->maybeSchema() && n->maybeSchema()->overload_name() == "input") {
      // quantized_lstm(x, hx, params, has_biases, num_layers, dropout, train, bidirectional,
      // batch_first, dtype, use_dynamic) and quantized_gru (without the last two), in eval.
      // Becomes kiln::lstm_dynamic(x, hx, [w, s, z, b of ih, the same of hh, per cell],
      // num_layers, bidirectional, batch_first, reduce_range, the op's inputs...).
      auto layers = toIValue(n->input(4)), dropout = toIValue(n->input(5)), train = toIValue(n->input(6));
      if (!layers || !layers->isInt() || !dropout || !train || !train->isBool() || (train->toBool() && dropout->toDouble() != 0.0)) continue;
      if (n->kind() == lstm_sequence) {
        auto dtype = toIValue(n->input(9));
        if (!dtype || !(dtype->isNone() || dtype->toInt() == static_cast<int64_t>(at::kQInt8) || dtype->toInt() == static_cast<int64_t>(at::kChar))) continue;
      }
      auto cells = constant_objects(n->input(2), n);
      if (cells.empty()) continue;
      std::vector<at::Tensor> tensors;
      bool first_rr = false, same = true;
      for (size_t i = 0; i < cells.size() && same; ++i) {
        bool rr = false;
        auto unpacked = unpacked_cell(cells[i], &rr);
        if (i == 0) first_rr = rr;
        same = !unpacked.empty() && rr == first_rr;
        tensors.insert(tensors.end(), unpacked.begin(), unpacked.end());
      }
      if (!same) continue;
      auto w = weight_constants(g, tensors);
      Node* list = g->insertNode(g->createList(TensorType::get(), w));
      inputs = {n->input(0), n->input(1), list->output(), n->input(4), n->input(7), n->input(8), g->insertConstant(first_rr)};
      for (size_t i = 0; i < n->inputs().size(); ++i) original.push_back(static_cast<int64_t>(inputs.size() + i));
      inputs.insert(inputs.end(), n->inputs().begin(), n->inputs().end());
      kind = n->kind() == lstm_sequence ? quantized_lstm_sequence_kind() : quantized_gru_sequence_kind(), args = 7;
    } else {
      continue;
    }
    Node* q = g->create(kind, inputs, n->outputs().size());
    q->s_(quantized_attr(), n->kind().toQualString());
    q->i_(args_attr(), args);
    q->is_(original_attr(), original);
    replace_node(n, q);
  }
}

// A float32 `aten::lstm` / `aten::gru` (input form) reads its weights as one `Tensor[]`
// constant (a frozen module's `_flat_weights`); the dump takes tensors one by one. The constant
// becomes a list of tensor constants (the pass lifts them into group inputs like any frozen
// weight): the same tensors, so TorchScript's semantics do not change.
void list_rnn_weights(Block* b) {
  for (Node* n : b->nodes()) {
    for (Block* sub : n->blocks()) list_rnn_weights(sub);
    if (n->kind() != aten::lstm && n->kind() != aten::gru) continue;
    if (!n->maybeSchema() || n->maybeSchema()->overload_name() != "input" || n->inputs().size() < 3) continue;
    Value* params = n->input(2);
    auto iv = toIValue(params);
    if (params->node()->kind() != prim::Constant || !iv || !iv->isList()) continue;
    std::vector<at::Tensor> tensors;
    for (const IValue& t : iv->toListRef()) {
      if (!t.isTensor()) break;
      tensors.push_back(t.toTensor());
    }
    if (tensors.size() != iv->toListRef().size()) continue;
    WithInsertPoint guard(n);
    auto constants = weight_constants(n->owningGraph(), tensors);
    Node* list = n->owningGraph()->insertNode(n->owningGraph()->createList(TensorType::get(), constants));
    n->replaceInput(2, list->output());
  }
}

void restore_quantized(Block* b) {
  for (auto it = b->nodes().begin(); it != b->nodes().end();) {
    Node* n = *it;
    ++it;
    for (Block* sub : n->blocks()) restore_quantized(sub);
    if (!is_unpacked_quantized(n)) continue;
    std::vector<Value*> inputs;
    for (int64_t i : n->is(original_attr())) inputs.push_back(n->input(i));
    Node* m = n->owningGraph()->create(Symbol::fromQualString(n->s(quantized_attr())), inputs, n->outputs().size());
    for (Symbol a : {reason_attr(), fallback_attr()})
      if (n->hasAttribute(a)) m->i_(a, n->i(a));
    replace_node(n, m);
  }
}

// An unpacked quantized node as TorchScript would run it (restore_quantized leaves none in a
// graph that runs; this is for one that escapes it): the original op, on its original inputs.
Operation unpacked_quantized_op(const Node* node) {
  // (The whole-sequence RNNs' overload is `input`; the others have one.)
  bool sequence = node->kind() == quantized_lstm_sequence_kind() || node->kind() == quantized_gru_sequence_kind();
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow(node->s(quantized_attr()).c_str(), sequence ? "input" : "");
  std::vector<int64_t> original = node->is(original_attr());
  size_t n = node->inputs().size();
  return [op, original, n](Stack& stack) {
    auto in = last(stack, n);
    Stack call;
    for (int64_t i : original) call.push_back(in[i]);
    drop(stack, n);
    op.callBoxed(call);
    for (auto& v : call) stack.push_back(std::move(v));
  };
}

// In-place ops whose write nothing else sees (writes_unobserved) become their functional op
// for the pass, remembering their kind. TorchScript's alias analysis cannot tell that such a
// write is private: a write to a part of a list (a traced GRU cell's unsafe_chunk) would keep
// it from moving past every read of a module's weights, and groups would stop at each. The
// dump names the in-place op, so Kiln lowers it with in-place semantics (x's dtype and shape);
// whatever stays in TorchScript, and every group's fallback copy, gets the in-place op back
// (restore_in_place), so TorchScript's own semantics never change.
void functionalize(Block* b) {
  for (auto it = b->nodes().begin(); it != b->nodes().end();) {
    Node* n = *it;
    ++it;
    for (Block* sub : n->blocks()) functionalize(sub);
    if (!is_inplace(n) || n->outputs().size() != 1 || !kiln_rs_known_op(n->kind().toQualString())) continue;
    bool rename = false;
    if (!writes_unobserved(n)) {
      if (!writes_renamable(n)) continue;
      rename = true;
    }
    Value* x = n->inputs()[0];
    std::string kind = n->kind().toQualString();
    Node* f = with_kind(n, Symbol::fromQualString(kind.substr(0, kind.size() - 1)));
    f->s_(inplace_attr(), kind);
    if (rename) x->replaceAllUsesAfterNodeWith(f, f->output());
  }
}

// Gives every shape op (is_shape_op) one user, cloning it for each other: a size read once
// and used by two groups, or by a group and TorchScript, then joins each group that needs
// it (a group takes a shape op only with all its users). Cloning from the last node up
// clones a clone's own shape-op inputs in turn. Shape ops cost next to nothing, so those left
// in TorchScript may run twice.
void unshare_shape_ops(Block* b) {
  std::vector<Node*> nodes(b->nodes().begin(), b->nodes().end());
  for (auto it = nodes.rbegin(); it != nodes.rend(); ++it) {
    Node* n = *it;
    for (Block* sub : n->blocks()) unshare_shape_ops(sub);
    if (!is_shape_op(n)) continue;
    for (size_t o = 0; o < n->outputs().size(); ++o) {
      std::vector<Use> uses = n->outputs()[o]->uses();
      for (size_t u = 1; u < uses.size(); ++u) {
        Node* c = n->owningGraph()->createClone(n, [](Value* v) { return v; });
        c->insertAfter(n);
        for (size_t k = 0; k < c->outputs().size(); ++k) c->outputs()[k]->copyMetadata(n->outputs()[k]);
        uses[u].user->replaceInput(uses[u].offset, c->outputs()[o]);
      }
    }
  }
}

void restore_in_place(Block* b) {
  for (auto it = b->nodes().begin(); it != b->nodes().end();) {
    Node* n = *it;
    ++it;
    for (Block* sub : n->blocks()) restore_in_place(sub);
    if (!n->hasAttribute(inplace_attr())) continue;
    Node* m = with_kind(n, Symbol::fromQualString(n->s(inplace_attr())));
    m->removeAttribute(inplace_attr());
  }
}

// Why a quantized op's constant packed weight is not one Kiln reads, where it is another
// library's (`is_fbgemm_packed`): oneDNN's (on a host with AVX-512 VNNI the x86 engine packs
// symmetric weights so; measured there: one element in one step off fbgemm's result in 9 of
// 768 random convolutions, in no float32 order of the requantization tried) or QNNPACK's.
// Empty for any other node.
std::string foreign_packing(const Node* n) {
  if (n->inputs().size() < 2 || n->input(1)->node()->kind() != prim::Constant) return "";
  auto iv = toIValue(n->input(1));
  if (!iv) return "";
  std::string name = packed_weight_type(*iv);
  if (name.find("Onednn") != std::string::npos)
    return "its weight is packed for oneDNN (PyTorch's x86 engine packs symmetric weights so on a host with AVX-512 VNNI), which rounds otherwise than the fbgemm arithmetic Kiln computes; the fbgemm engine packs for fbgemm";
  if (name.find("Qnnp") != std::string::npos) return "its weight is packed for QNNPACK, which rounds otherwise than the fbgemm arithmetic Kiln computes";
  return "";
}

std::string ask_node(const Node* n) {
  if (n->hasAttribute(fallback_attr())) return "fallback copy of a Kiln group";
  if (is_tensor_list(n) || is_split(n) || is_shape_op(n)) return "";  // they go with their users
  if (is_unpack(n) || (is_multi_output_op(n) && kiln_rs_known_op(n->kind().toQualString()))) {
    Dumper d;
    std::string why;
    if (!d.parts(n, &why)) return why;
    for (const Value* o : n->outputs())
      if (!o->uses().empty() && !d.undefined.count(o)) d.os << "output " << d.name(o) << "\n";
    std::string text = d.os.str();
    char reason[512] = {0};
    return kiln_rs_node_supported(text.data(), text.size(), reason, sizeof(reason)) ? "" : reason;
  }
  // (quantized::add and add_relu are ops on quantized tensors Kiln computes.)
  static const Symbol quantized_ns = c10::Symbol::fromQualString("namespaces::quantized");
  if (n->kind().ns() != c10::Symbol::fromQualString("namespaces::aten") && n->kind().ns() != quantized_ns && !is_unpacked_quantized(n)) return "not an aten op";
  if (n->outputs().size() != 1)
    return "has " + std::to_string(n->outputs().size()) + " outputs: not an op Kiln supports yet";
  if (n->kind().ns() == quantized_ns) {
    std::string packing = foreign_packing(n);
    if (!packing.empty()) return packing;
  }
  if (!kiln_rs_known_op(n->kind().toQualString())) return "not an op Kiln supports yet";
  if (is_inplace(n))  // functionalize turned those Kiln may compute into functional ops
    return "writes a tensor other ops can see (Kiln computes an in-place op only where nothing else reads what it writes)";
  Dumper d;
  std::string why;
  if (!d.node(n, &why)) return why;
  d.os << "output " << d.name(n->output()) << "\n";
  std::string text = d.os.str();
  char reason[512] = {0};
  if (kiln_rs_node_supported(text.data(), text.size(), reason, sizeof(reason))) return "";
  return reason;
}

// A view op returns memory shared with its input (contiguous and dropout in eval may return
// the input itself); Kiln's outputs are new tensors. So a view joins a group only once every
// user of it is in the group: it is then index arithmetic inside the group, never a group
// output.
bool is_view(const Node* n) {
  static const std::unordered_set<std::string> views = {
      "aten::t",       "aten::transpose", "aten::permute", "aten::view",   "aten::reshape",    "aten::flatten",
      "aten::unflatten", "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice",      "aten::narrow",
      "aten::expand",  "aten::contiguous", "aten::dropout"};
  return views.count(n->kind().toQualString()) > 0;
}

// A prim::ListConstruct of tensors whose every user is an op Kiln takes lists for (cat,
// stack, lstm_cell's state) or a group one was merged into: a group takes it with its users.
bool is_tensor_list(const Node* n) {
  if (n->kind() != prim::ListConstruct) return false;
  auto list = n->output()->type()->cast<ListType>();
  if (!list || !list->getElementType()->cast<TensorType>()) return false;
  for (const Use& u : n->output()->uses())
    if (u.user->kind() != aten::cat && u.user->kind() != aten::stack && u.user->kind() != aten::lstm_cell && u.user->kind() != quantized_lstm_kind() &&
        u.user->kind() != quantized_lstm_sequence_kind() && u.user->kind() != quantized_gru_sequence_kind() && u.user->kind() != aten::lstm &&
        u.user->kind() != aten::gru &&
        u.user->kind() != quantized_cat_kind() && u.user->kind() != group_kind())
      return false;
  return true;
}

// Nodes that compute nothing of their own (views, lists, splits and their parts, size
// arithmetic): they never start a group and join one only with all their users.
bool goes_with_users(const Node* n) { return is_view(n) || is_tensor_list(n) || is_split(n) || is_unpack(n) || is_shape_op(n); }

bool view_used_outside(const Node* p, const Node* group) {
  if (!goes_with_users(p)) return false;
  for (const Value* o : p->outputs())
    for (const Use& u : o->uses())
      if (u.user != group) return true;
  return false;
}

struct Fuser {
  std::shared_ptr<Graph> graph;
  std::unique_ptr<AliasDb> db;
  std::unordered_map<const Node*, std::string> verdicts;  // "" = supported

  bool supported(Node* n) {
    if (n->kind() == group_kind()) return false;
    auto it = verdicts.find(n);
    if (it == verdicts.end()) it = verdicts.emplace(n, ask_node(n)).first;
    return it->second.empty();
  }

  void fuse_block(Block* b) {
    for (Node* n : b->nodes())
      for (Block* sub : n->blocks()) fuse_block(sub);
    // Merging a producer may move its group before nodes the scan has not visited yet (a
    // consumer of that producer): scan again until a scan starts no group.
    while (scan_block(b)) {
    }
  }

  // One scan from the last node up; whether it started a group.
  bool scan_block(Block* b) {
    bool started = false;
    for (auto it = b->nodes().rbegin(); it != b->nodes().rend();) {
      Node* n = *it;
      // A view never starts a group: alone it computes nothing.
      if (!supported(n) || goes_with_users(n)) { ++it; continue; }
      started = true;
      Node* group = SubgraphUtils::createSingletonSubgraphAndUpdateAliasing(n, group_kind(), *db);
      bool grew = true;
      while (grew) {
        grew = false;
        // Latest producer first, as the TensorExpr fuser does.
        std::vector<Node*> producers;
        for (Value* in : group->inputs()) {
          Node* p = in->node();
          if (p->owningBlock() == b && p->kind() != prim::Param && supported(p) && !view_used_outside(p, group))
            producers.push_back(p);
        }
        std::sort(producers.begin(), producers.end(), [](Node* a, Node* c) { return c->isBefore(a); });
        for (Node* p : producers) {
          if (!db->moveBeforeTopologicallyValid(p, group)) continue;
          SubgraphUtils::mergeNodeIntoSubgraphAndUpdateAliasing(p, group, *db);
          grew = true;
          break;
        }
      }
      it = group->reverseIterator();
      ++it;
    }
    return started;
  }

  void collect_groups(Block* b, std::vector<Node*>& out) {
    for (Node* n : b->nodes()) {
      if (n->kind() == group_kind()) out.push_back(n);
      for (Block* sub : n->blocks()) collect_groups(sub, out);
    }
  }

  // A constant float32 matrix (a frozen module's weight, lifted to an input): what its zeros
  // look like, for the GEMM's choice of a sparse format (`weight` line; counted in Rust).
  static void weight_facts(const Value* v, const std::string& name, std::ostream& os) {
    if (v->node()->kind() != prim::Constant) return;
    auto iv = toIValue(v);
    if (!iv || !iv->isTensor()) return;
    const at::Tensor& t = iv->toTensor();
    if (!t.defined() || t.dim() != 2 || t.scalar_type() != at::kFloat || !t.device().is_cpu() || t.layout() != at::kStrided ||
        t.numel() < 256 || !t.has_storage())
      return;
    char facts[512] = {0};
    if (kiln_rs_weight_facts(t.const_data_ptr<float>(), t.size(0), t.size(1), t.stride(0), t.stride(1), facts, sizeof(facts)))
      os << "weight " << name << " " << facts << "\n";
  }

  std::string dump_group(Node* group, std::string* why) {
    auto sub = group->g(attr::Subgraph);
    Dumper d;
    // Subgraph inputs stand for the group's inputs: declare them with the outside types.
    for (size_t i = 0; i < group->inputs().size(); ++i) {
      d.names.emplace(sub->inputs()[i], "%" + std::to_string(d.names.size()));
      Value* outer = group->inputs()[i];
      if (outer->type()->cast<TensorType>()) {
        d.os << "input " << d.names[sub->inputs()[i]] << " ";
        if (!tensor_input_text(outer, d.os, why)) return "";
        d.os << "\n";
        weight_facts(outer, d.names[sub->inputs()[i]], d.os);
      } else if (input_kind(outer) == InputKind::Unsupported && read_by_torchscript_only(sub->inputs()[i])) {
        continue;  // (not passed to Rust either: passed_to_rust)
      } else if (!non_tensor_text(outer, d.names[sub->inputs()[i]], d.os, why)) {
        return "";
      }
    }
    for (Node* n : sub->nodes()) {
      if (is_tensor_list(n)) {
        if (!d.tensor_list(n, why)) return "";
        continue;
      }
      if (is_split(n)) continue;  // its parts say what it is
      if (is_shape_op(n)) {
        if (!d.shape_node(n, why)) return "";
        continue;
      }
      if (is_unpack(n) || is_multi_output_op(n)) {
        if (!d.parts(n, why)) return "";
        continue;
      }
      // A packed weight merged in with its kiln::linear_dynamic: TorchScript's, never dumped.
      if (n->kind() == prim::Constant && n->output()->type()->kind() == TypeKind::ClassType) continue;
      if (n->kind() == prim::Constant || n->kind() == prim::ListConstruct) {
        // Constants merged into the subgraph: a tracer's wrapped numbers (tensor constants
        // that are not are inputs by now, see lift_tensor_constants).
        std::ostringstream c;
        if (!number_constant_text(n->output(), c)) {
          *why = "a tensor or non-integer constant inside the group";
          return "";
        }
        d.os << "const " << d.name(n->output()) << " " << c.str() << "\n";
        continue;
      }
      if (!d.node(n, why)) return "";
    }
    std::vector<int64_t> undefined;
    for (size_t i = 0; i < sub->outputs().size(); ++i) {
      if (d.undefined.count(sub->outputs()[i])) {
        undefined.push_back(static_cast<int64_t>(i));
        continue;
      }
      d.os << "output " << d.name(sub->outputs()[i]);
      // Read outside only by shape ops (a scripted quantized module's rank check): Kiln may
      // return its quantized values held as float32 there.
      const auto& uses = group->outputs()[i]->uses();
      bool shape_only = !uses.empty() && std::all_of(uses.begin(), uses.end(), [](const Use& u) {
        return u.user->kind() == aten::size || u.user->kind() == aten::dim;
      });
      d.os << (shape_only ? " shape_only\n" : "\n");
    }
    if (!undefined.empty()) group->is_(undefined_attr(), undefined);
    return d.os.str();
  }

  // Undoes a group that could not be compiled; its nodes remember why.
  void unmerge(Node* group, const std::string& why) {
    Block* b = group->owningBlock();
    std::unordered_set<Node*> before(b->nodes().begin(), b->nodes().end());
    SubgraphUtils::unmergeSubgraph(group);
    for (Node* n : b->nodes())
      if (!before.count(n)) verdicts[n] = "its group was not compiled: " + why;
  }

  // prim::If(kiln::Guard(tensors)) { group } else { prim::FallbackGraph } — the TensorExpr
  // fuser's shape; the executor turns the FallbackGraph into a function it profiles anew.
  void guard(Node* group, int64_t id) {
    Graph* g = group->owningGraph();
    WithInsertPoint wip(group);
    std::vector<Value*> tensors;
    for (Value* in : group->inputs())
      if (passed_to_rust(input_kind(in)) || input_kind(in) == InputKind::ExpectNone) tensors.push_back(in);
    Node* check = g->insertNode(g->create(guard_kind(), tensors, 1));
    check->i_(group_attr(), id);
    check->output()->setType(BoolType::get());
    Node* if_node = g->create(prim::If, {check->output()}, 0);
    if_node->insertAfter(group);
    Block* then_b = if_node->addBlock();
    Block* else_b = if_node->addBlock();
    for (Value* o : group->outputs()) {
      Value* io = if_node->addOutput()->setType(o->type());
      o->replaceAllUsesWith(io);
    }
    group->moveBefore(then_b->return_node());
    for (Value* o : group->outputs()) then_b->registerOutput(o);
    WithInsertPoint wip2(else_b->return_node());
    Node* fb = g->create(prim::FallbackGraph, group->inputs(), group->outputs().size());
    auto fallback = group->g(attr::Subgraph)->copy();
    restore_in_place(fallback->block());
    restore_quantized(fallback->block());
    // A None merged in as an optional's constant (`Tensor? = prim::Constant()`) is a value
    // TorchScript's interpreter cannot emit in a graph of its own: it is None.
    for (Node* n : fallback->nodes())
      if (n->kind() == prim::Constant && !n->hasAttribute(attr::value) && n->output()->type()->kind() == TypeKind::OptionalType)
        n->output()->setType(NoneType::get());
    for (Node* n : fallback->nodes()) n->i_(fallback_attr(), id);
    fb->g_(attr::Subgraph, fallback);
    for (size_t i = 0; i < group->outputs().size(); ++i) fb->outputs()[i]->setType(group->outputs()[i]->type());
    g->insertNode(fb);
    for (Value* o : fb->outputs()) else_b->registerOutput(o);
    group->i_(group_attr(), id);
  }

  // Stamps each node left in TorchScript with why, for explain(). A fallback is counted when
  // its block first runs (a kiln::FallbacksRan at the block's start), not when the pass sees
  // it: a scripted module's Python control flow leaves whole branches that never run (a
  // TransformerEncoderLayer's slow path, the masks' checks), and stats() reports what ran.
  void record_rest(Block* b) {
    std::vector<int64_t> counted;
    for (Node* n : b->nodes()) {
      for (Block* sub : n->blocks()) record_rest(sub);
      if (!is_reported(n) || n->hasAttribute(fallback_attr())) continue;
      auto it = verdicts.find(n);
      std::string why = it == verdicts.end() ? "not reached by the pass" : it->second;
      // A view (or a split into views) left alone computes nothing: it shares its input's
      // memory. explain says so, but it is no fallback.
      bool idle_view = why.empty() && (is_view(n) || is_split(n) || is_unpack(n));
      if (why.empty()) why = idle_view ? "a view outside any group (computes nothing)" : "supported, but not part of a compiled group";
      int64_t rid = kiln_rs_reason(n->kind().toQualString(), why.c_str(), 0);
      if (rid < 0) continue;
      n->i_(reason_attr(), rid);
      if (!idle_view) counted.push_back(rid);
    }
    if (counted.empty()) return;
    int64_t marker = kiln_rs_fallback_block(counted.data(), counted.size());
    if (marker < 0) return;
    Node* ran = b->owningGraph()->create(ran_kind(), {}, 0);
    ran->i_(marker_attr(), marker);
    b->prependNode(ran);
  }

  // Merging clones constants into the subgraph; tensor constants (a frozen module's weights)
  // become inputs of the group instead: Kiln's code takes every tensor from the call, so
  // cache entries stay code, never data (ARCHITECTURE.md, "weights").
  void lift_tensor_constants(Node* group) {
    auto sub = group->g(attr::Subgraph);
    std::vector<Node*> constants;
    for (Node* n : sub->nodes())
      if (n->kind() == prim::Constant && n->output()->type()->cast<TensorType>()) {
        // A wrapped number stays a number, and so does a size constant of shape ops.
        std::ostringstream number;
        if (!number_constant_text(n->output(), number)) constants.push_back(n);
      }
    for (Node* n : constants) {
      Node* outer = group->owningGraph()->createClone(n, [](Value* v) { return v; });
      outer->insertBefore(group);
      outer->output()->setType(n->output()->type());
      group->addInput(outer->output());
      Value* in = sub->addInput()->setType(n->output()->type());
      n->output()->replaceAllUsesWith(in);
      n->destroy();
    }
  }

  void run() {
    functionalize(graph->block());
    unpack_quantized_ops(graph->block());
    list_rnn_weights(graph->block());
    unshare_shape_ops(graph->block());
    db = std::make_unique<AliasDb>(graph);
    fuse_block(graph->block());
    std::vector<Node*> groups;
    collect_groups(graph->block(), groups);
    for (Node* group : groups) {
      lift_tensor_constants(group);
      std::string why;
      std::string text = dump_group(group, &why);
      int64_t id = -1;
      if (!text.empty()) {
        char reason[512] = {0};
        id = kiln_rs_prepare_group(text.data(), text.size(), reason, sizeof(reason));
        if (id < 0) why = reason;
      }
      if (id < 0) {
        unmerge(group, why);
      } else {
        guard(group, id);
      }
    }
    // Nodes outside groups: say why they stayed in TorchScript.
    record_rest(graph->block());
    restore_in_place(graph->block());
    restore_quantized(graph->block());
  }
};

void unmerge_all(Block* b) {
  std::vector<Node*> groups;
  for (Node* n : b->nodes()) {
    for (Block* sub : n->blocks()) unmerge_all(sub);
    if (n->kind() == group_kind() && !n->hasAttribute(group_attr())) groups.push_back(n);
  }
  for (Node* n : groups) SubgraphUtils::unmergeSubgraph(n);
}

void kiln_pass(std::shared_ptr<Graph>& graph) {
  if (!g_enabled.load()) return;
  kiln_rs_pass_started();
  try {
    Fuser f{graph};
    f.run();
  } catch (const std::exception& e) {
    // Never break the user's program: undo unguarded groups and run the graph as it was.
    kiln_rs_pass_error(e.what());
    try {
      unmerge_all(graph->block());
      restore_in_place(graph->block());
      restore_quantized(graph->block());
    } catch (...) {}
  }
}

// Why generated code must not read a tensor (0: it may). Rust turns the codes into reasons
// (ffi.rs, `refusal_reason`, which repeats these numbers); a dispatch key that makes a tensor more than plain memory is passed as
// kRefusedKey + its c10::DispatchKey number.
// kNotNone is a call's: an optional input the group was specialised on as None is not.
enum : int32_t { kAdmitted = 0, kUndefined = 1, kWrappedNumber = 2, kNotCpu = 3, kNotStrided = 4, kNoMemory = 5, kNotNone = 6, kRefusedKey = 1000 };

// The dispatch keys of a plain CPU tensor. Any other key means its bytes are not what its
// sizes, strides and dtype say, or that eager would run other code on it: a tensor subclass
// or wrapper (Python: DTensor, torchao's tensors, TwoTensor), a ZeroTensor, a lazy conj/neg
// bit, functorch and functionalization wrappers, sparse/quantized/mkldnn/other backends.
const c10::DispatchKeySet kPlainKeys({c10::DispatchKey::CPU, c10::DispatchKey::ADInplaceOrView, c10::DispatchKey::AutogradCPU,
                                      c10::DispatchKey::AutocastCPU});

int32_t admission(const at::Tensor& t) {
  if (!t.defined()) return kUndefined;
  auto* impl = t.unsafeGetTensorImpl();
  if (impl->device_type() != c10::DeviceType::CPU) return kNotCpu;
  if (auto ks = impl->key_set(); (ks | kPlainKeys) != kPlainKeys)
    // (Set difference keeps backend bits: the CPU bit stays, which is why the test is `|`.)
    return kRefusedKey + static_cast<int32_t>((ks - kPlainKeys).highestPriorityTypeId());
  // A Python scalar turned tensor promotes like a scalar, not like a tensor.
  if (impl->is_wrapped_number()) return kWrappedNumber;
  if (impl->layout() != at::kStrided || impl->is_nested() || !impl->has_storage()) return kNotStrided;
  // Every byte the view reaches must lie in its storage (a storage freed or resized under it
  // has no memory there). Strides are never negative in PyTorch.
  int64_t last = impl->storage_offset();
  for (int64_t d = 0; d < impl->dim(); ++d) {
    int64_t n = impl->sizes()[d];
    if (n == 0) return kAdmitted;  // no element is ever read
    last += (n - 1) * impl->strides()[d];
  }
  const auto& storage = impl->unsafe_storage();
  if (storage.data() == nullptr || (last + 1) * static_cast<int64_t>(impl->itemsize()) > static_cast<int64_t>(storage.nbytes()))
    return kNoMemory;
  return kAdmitted;
}

// Describes a tensor the guard admitted for Rust.
void fill_admitted(KilnTensor& d, const at::Tensor& t) {
  d.refusal = kAdmitted;
  auto* impl = t.unsafeGetTensorImpl();
  // const_data_ptr: never materialises a copy-on-write storage; Kiln only reads inputs.
  d.data = const_cast<void*>(t.const_data_ptr());
  d.ndim = impl->dim();
  d.sizes = impl->sizes().data();
  d.strides = impl->strides().data();
  d.dtype = static_cast<int32_t>(impl->dtype().toScalarType());
  d.device = static_cast<int32_t>(impl->device_type());
  // Under no_grad/inference_mode nothing is recorded for autograd, so an input that requires
  // grad (a module's parameter) is just data: computing without autograd is what eager does.
  d.requires_grad = impl->requires_grad() && c10::GradMode::is_enabled();
  d.storage = impl->storage().unsafeGetStorageImpl();
  d.version = impl->version_counter().enabled() ? static_cast<int64_t>(impl->version_counter().current_version()) : -1;
}

// Describes a tensor for Rust; `refusal` says whether generated code may read it.
void fill(KilnTensor& d, const at::Tensor& t) {
  d.refusal = admission(t);
  if (d.refusal == kAdmitted) fill_admitted(d, t);
}

// The thread's dispatch state outside any mode or transform: BackendSelect and (outside
// inference mode) ADInplaceOrView are always included.
const c10::DispatchKeySet kPlainIncluded({c10::DispatchKey::BackendSelect, c10::DispatchKey::ADInplaceOrView});

// The global and thread-local state eager's result depends on, read on every call (a few
// loads). A TorchDispatchMode (Python key) or a functorch transform included in this thread's
// dispatch means eager would hand each op to user code: then no Kiln code runs.
KilnCallState call_state() {
  KilnCallState s;
  s.default_dtype = static_cast<int32_t>(c10::get_default_dtype_as_scalartype());
  s.autocast = at::autocast::is_autocast_enabled(at::kCPU) ? static_cast<int32_t>(at::autocast::get_autocast_dtype(at::kCPU)) : -1;
  c10::DispatchKeySet included = c10::impl::tls_local_dispatch_key_set().included_;
  s.refusal = (included | kPlainIncluded) == kPlainIncluded ? kAdmitted
                                                            : kRefusedKey + static_cast<int32_t>((included - kPlainIncluded).highestPriorityTypeId());
  return s;
}

// The kinds of a node's inputs, decided once when the op is created.
std::vector<InputKind> input_kinds(const Node* node) {
  std::vector<InputKind> kinds;
  for (auto* in : node->inputs()) kinds.push_back(input_kind(in));
  return kinds;
}

// A number computed at run time, for Rust: a 0-d float64 or int64 tensor over `slot`.
void fill_number(KilnTensor& d, const IValue& v, InputKind kind, int64_t* slot) {
  static const int64_t kNoDims[1] = {0};
  if (kind == InputKind::Float) {
    double x = v.toDouble();
    std::memcpy(slot, &x, sizeof(x));
  } else {
    *slot = v.toInt();
  }
  d.data = slot;
  d.sizes = kNoDims;
  d.strides = kNoDims;
  d.ndim = 0;
  d.dtype = static_cast<int32_t>(kind == InputKind::Float ? at::ScalarType::Double : at::ScalarType::Long);
  d.device = static_cast<int32_t>(c10::DeviceType::CPU);
  d.requires_grad = 0;
  d.refusal = kAdmitted;
  d.storage = nullptr;
  d.version = -1;
}

// The inputs Rust takes (tensors, described by `fill_tensor`: admitted or not; numbers), in
// order: on the stack for up to 16, else on the heap. `numbers` holds the numbers' values.
struct Descriptions {
  KilnTensor inline_descs[16];
  int64_t inline_numbers[16];
  std::vector<KilnTensor> heap_descs;
  std::vector<int64_t> heap_numbers;
  KilnTensor* d = inline_descs;
  int64_t* numbers = inline_numbers;
  size_t count = 0;

  // `d` and `numbers` may point into this object.
  Descriptions(const Descriptions&) = delete;
  Descriptions& operator=(const Descriptions&) = delete;

  template <typename FillTensor>
  Descriptions(c10::ArrayRef<IValue> ins, const std::vector<InputKind>& kinds, FillTensor fill_tensor) {
    if (ins.size() > 16) {
      heap_descs.resize(ins.size());
      heap_numbers.resize(ins.size());
      d = heap_descs.data();
      numbers = heap_numbers.data();
    }
    for (size_t i = 0; i < ins.size(); ++i) {
      if (kinds[i] == InputKind::Tensor) {
        fill_tensor(d[count++], ins[i].toTensor());
      } else if (kinds[i] == InputKind::Float || kinds[i] == InputKind::Int) {
        fill_number(d[count], ins[i], kinds[i], &numbers[count]);
        ++count;
      }
    }
  }
};

Operation guard_op(const Node* node) {
  int64_t id = node->i(group_attr());
  size_t n = node->inputs().size();
  std::vector<InputKind> kinds = input_kinds(node);
  return [id, n, kinds](Stack& stack) {
    auto ins = last(stack, n);
    Descriptions in(ins, kinds, [](KilnTensor& t, const at::Tensor& x) { fill(t, x); });
    KilnCallState state = call_state();
    for (size_t i = 0; i < n; ++i)
      if (kinds[i] == InputKind::ExpectNone && !ins[i].isNone()) state.refusal = kNotNone;
    bool ok = kiln_rs_guard(id, in.d, in.count, &state) != 0;
    drop(stack, n);
    push(stack, ok);
  };
}

// The outputs of one group call, and the exception allocating one of them threw (rethrown
// once Rust has returned: it must not unwind through Rust frames).
struct OutputSink {
  c10::SmallVector<at::Tensor, 4> results;
  std::exception_ptr error;
};

// Outputs are plain CPU tensors in the layout eager would give them (Rust says which):
// at::detail::empty_cpu / empty_strided_cpu skip the dispatcher (this runs on every call of
// every group).
int32_t alloc_output(void* ctx, size_t index, int32_t dtype, const int64_t* sizes, const int64_t* strides, size_t ndim, void** data) {
  auto& sink = *static_cast<OutputSink*>(ctx);
  try {
    auto type = static_cast<at::ScalarType>(dtype);
    c10::IntArrayRef shape(sizes, ndim);
    if (strides == nullptr)
      sink.results.emplace_back(at::detail::empty_cpu(shape, type, false, std::nullopt));
    else
      sink.results.emplace_back(at::detail::empty_strided_cpu(shape, c10::IntArrayRef(strides, ndim), type, false));
    *data = sink.results.back().data_ptr();
    return 0;
  } catch (...) {
    sink.error = std::current_exception();
    return 1;
  }
}

// Counts its block's fallbacks once, the first time the block runs; later runs cost a load.
Operation fallbacks_ran_op(const Node* node) {
  int64_t marker = node->i(marker_attr());
  auto ran = std::make_shared<std::atomic<bool>>(false);
  return [marker, ran](Stack&) {
    if (!ran->load(std::memory_order_relaxed) && !ran->exchange(true)) kiln_rs_fallback_block_ran(marker);
  };
}

Operation group_op(const Node* node) {
  int64_t id = node->i(group_attr());
  size_t n = node->inputs().size();
  std::vector<InputKind> kinds = input_kinds(node);
  std::vector<int64_t> undefined = node->hasAttribute(undefined_attr()) ? node->is(undefined_attr()) : std::vector<int64_t>{};
  size_t outputs = node->outputs().size();
  return [id, n, kinds, undefined, outputs](Stack& stack) {
    // The guard just before this op admitted these very tensors (it takes the group's
    // tensors and numbers, and the group runs only where it passed).
    Descriptions in(last(stack, n), kinds, [](KilnTensor& t, const at::Tensor& x) { fill_admitted(t, x); });
    OutputSink sink;
    char error[256] = {0};
    if (kiln_rs_run(id, in.d, in.count, alloc_output, &sink, error, sizeof(error)) != 0) {
      // Out of memory, as eager would be, or a guard/group mismatch (a bug): the user's call
      // raises like an eager op would.
      if (sink.error) std::rethrow_exception(sink.error);
      throw std::runtime_error(std::string("kiln: ") + error);
    }
    drop(stack, n);
    size_t next = 0;
    for (size_t i = 0; i < outputs; ++i) {
      if (std::find(undefined.begin(), undefined.end(), static_cast<int64_t>(i)) != undefined.end())
        push(stack, at::Tensor());
      else
        push(stack, std::move(sink.results[next++]));
    }
  };
}

}  // namespace

extern "C" {

int32_t kiln_cpp_enable() {
  std::lock_guard<std::mutex> lock(g_mutex);
  try {
    if (!g_registered_ops) {
      registerOperator(Operator(group_kind(), group_op, c10::AliasAnalysisKind::PURE_FUNCTION));
      registerOperator(Operator(guard_kind(), guard_op, c10::AliasAnalysisKind::PURE_FUNCTION));
      // CONSERVATIVE: an op with a side effect (dead-code elimination keeps it); it has no
      // inputs or outputs, so it orders nothing else.
      registerOperator(Operator(ran_kind(), fallbacks_ran_op, c10::AliasAnalysisKind::CONSERVATIVE));
      for (Symbol k : {quantized_linear_kind(), quantized_gru_kind(), quantized_lstm_kind(), static_linear_kind(), static_conv_kind(),
                       quantized_lstm_sequence_kind(), quantized_gru_sequence_kind()})
        registerOperator(Operator(k, unpacked_quantized_op, c10::AliasAnalysisKind::PURE_FUNCTION));
      g_registered_ops = true;
    }
    if (!g_pass_registered) {
      g_pass_id = registerPostPass(kiln_pass);
      g_pass_registered = true;
    }
  } catch (const std::exception& e) {
    kiln_rs_pass_error(e.what());
    return 0;
  }
  g_enabled = true;
  return 1;
}

void kiln_cpp_disable() {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_enabled = false;
  if (g_pass_registered) {
    clearPostPass(g_pass_id);
    g_pass_registered = false;
  }
}

int32_t kiln_cpp_torch_threads() { return at::get_num_threads(); }

void kiln_cpp_call_state(KilnCallState* state) { *state = call_state(); }

// torch's intra-op pool for Kiln's parallel kernels (see compiler/src/runtime/parallel.rs): one
// set of threads for Kiln groups and TorchScript's own ops, instead of two that spin against
// each other. at::parallel_for is inline and parallel only in code compiled with OpenMP, and
// this shim must not bring an OpenMP runtime of its own (a second pool): it calls the
// GOMP_parallel entry of the libgomp libtorch_cpu was linked with, found through libtorch_cpu.
using GompParallel = void (*)(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);

GompParallel torch_gomp_parallel() {
  static GompParallel f = [] {
    void* torch = dlopen("libtorch_cpu.so", RTLD_NOW | RTLD_NOLOAD);
    return torch ? reinterpret_cast<GompParallel>(dlsym(torch, "GOMP_parallel")) : nullptr;
  }();
  return f;
}

typedef void (*KilnJob)(const void* ctx, size_t part);

struct ParallelJob {
  KilnJob job;
  const void* ctx;
  size_t parts;
  std::atomic<size_t> next{0};
};

void run_parts(void* data) {
  auto* j = static_cast<ParallelJob*>(data);
  for (size_t p = j->next.fetch_add(1); p < j->parts; p = j->next.fetch_add(1)) j->job(j->ctx, p);
}

// Whether torch's pool can be lent (an OpenMP build of libtorch).
int32_t kiln_cpp_has_torch_pool() { return torch_gomp_parallel() != nullptr; }

// Runs job(ctx, p) for p in [0, parts) on torch's OpenMP team (team size: torch's thread
// count, as at::parallel_for does; threads take parts from a shared counter).
void kiln_cpp_parallel(size_t parts, KilnJob job, const void* ctx) {
  ParallelJob j{job, ctx, parts};
  GompParallel gomp = torch_gomp_parallel();
  if (gomp == nullptr || parts <= 1 || at::in_parallel_region()) {
    run_parts(&j);
    return;
  }
  gomp(run_parts, &j, 0, 0);
}

// A weak reference to a StorageImpl: while held, no other storage can be made at its address,
// so (address, version) names one storage's data for as long as a packed copy is kept.
void kiln_cpp_storage_hold(void* storage) {
  c10::raw::weak_intrusive_ptr::incref(static_cast<c10::StorageImpl*>(storage));
}

void kiln_cpp_storage_release(void* storage) {
  c10::raw::weak_intrusive_ptr::decref(static_cast<c10::StorageImpl*>(storage));
}

// The name of a c10::ScalarType (a default dtype Kiln has no code for).
const char* kiln_cpp_scalar_type_name(int32_t type) { return c10::toString(static_cast<c10::ScalarType>(type)); }

// The name of a c10::DispatchKey, for the reason a tensor or call was refused.
const char* kiln_cpp_dispatch_key_name(int32_t key) { return c10::toString(static_cast<c10::DispatchKey>(key)); }

}  // extern "C"
