//! The text form in which the C++ shim hands a TorchScript region to Rust. One item a line:
//!
//! ```text
//! default_dtype f32             torch.get_default_dtype() when the region was dumped: the
//!                               float type integer promotion gave TorchScript's recorded types
//! input %0 f32 [4,4] [4,1]      a tensor input: dtype, sizes, strides as profiled
//! input %0 ?                    a tensor input TorchScript did not profile (types come from
//!                               the live tensors when the group first runs)
//! input %0 scalar f64           a number computed at run time (float: f64, int: i64), passed
//!                               as a 0-d tensor and promoted as a Python number
//! const %1 float 0.5            a constant: none | bool 0/1 | int N | float X | str S | ints N...
//! list %3 %0 %2                 a list of tensors (a cat's argument)
//! node %2 aten::mul %0 %1 : f32 [4,4]   one TorchScript node with one tensor output and
//!                               the output type TorchScript profiled (when it knows it)
//! shape %3 aten::size %0 %2     integer arithmetic on sizes (x.size(d), a view's shape list,
//!                               a tracer's sizes as 0-d tensors): a constant of the lowering
//! weight %1 256 256 6554 ...    what a constant weight's zeros look like (a frozen module's
//!                               tensor constant the pass lifted to an input, %1):
//!                               `kiln_compiler::kernels::sparse::WeightFacts` in text
//!                               (`... code KEY` where its values are registered for code)
//! output %2
//! ```
//!
//! Text, not a C struct graph: it is what the pass logs, what tests write by hand, and the
//! same code path serves the single-node "is this supported?" question and whole groups.

use kiln_compiler::kernels::sparse::WeightFacts;
use kiln_compiler::DType;

#[derive(Clone, Debug, PartialEq)]
pub enum Const {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Ints(Vec<i64>),
    Floats(Vec<f64>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct InputDecl {
    /// Err: a dtype Kiln does not support, by its libtorch name.
    pub dtype: Result<DType, String>,
    pub sizes: Vec<i64>,
    pub strides: Vec<i64>,
    /// A number computed at run time (a TorchScript float or int), not a tensor: it arrives
    /// as a 0-d float64 / int64 tensor and takes part in type promotion as a Python number.
    pub number: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    /// None: not profiled.
    Input(Option<InputDecl>),
    Const(Const),
    /// A list of tensor values (the argument of a cat).
    List(Vec<usize>),
    /// `expect`: the output dtype and sizes TorchScript recorded, checked against Kiln's own
    /// type inference so that a disagreement rejects the node instead of computing wrongly.
    Node { kind: String, args: Vec<usize>, expect: Option<(Result<DType, String>, Vec<i64>)> },
    /// Integer arithmetic on sizes: evaluated while lowering, from the inputs' sizes.
    Shape { kind: String, args: Vec<usize> },
}

/// A parsed region. Values are numbered by their position in `items`.
#[derive(Clone, Debug, PartialEq)]
pub struct Region {
    pub items: Vec<Item>,
    pub outputs: Vec<usize>,
    /// The float dtype integer → float promotion gives (PyTorch's default dtype); Err: one
    /// Kiln does not support, by name. Float32 unless the dump says otherwise.
    pub default_float: Result<DType, String>,
    /// The zeros of inputs that are constant weights, by item.
    pub weights: Vec<(usize, WeightFacts)>,
    /// The outputs (positions in `outputs`) that only shape ops read outside the group
    /// (`output %n shape_only`): a scripted quantized module's rank check.
    pub shape_only: Vec<usize>,
}

impl Default for Region {
    fn default() -> Self {
        Region { items: vec![], outputs: vec![], default_float: Ok(DType::F32), weights: vec![], shape_only: vec![] }
    }
}

fn ints(s: &str) -> Result<Vec<i64>, String> {
    let s = s.trim().strip_prefix('[').and_then(|s| s.strip_suffix(']')).ok_or_else(|| format!("bad list {s}"))?;
    s.split(',').filter(|x| !x.is_empty()).map(|x| x.parse().map_err(|_| format!("bad int {x}"))).collect()
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    DType::parse(s).ok_or_else(|| s.strip_prefix("unsupported:").unwrap_or(s).to_string())
}

impl Region {
    /// The tensor inputs' declarations, in order (None where not profiled).
    pub fn inputs(&self) -> impl Iterator<Item = &Option<InputDecl>> {
        self.items.iter().filter_map(|i| if let Item::Input(d) = i { Some(d) } else { None })
    }

    /// The ATen ops of the region, in order.
    pub fn node_kinds(&self) -> Vec<String> {
        self.items.iter().filter_map(|i| if let Item::Node { kind, .. } = i { Some(kind.clone()) } else { None }).collect()
    }

    /// The region with its inputs declared as `live` under the default float dtype
    /// `default_float`. TorchScript's recorded output types hold only for the profiled input
    /// types under the default dtype of the dump: they are dropped when either differs.
    pub fn with_inputs(&self, live: &[InputDecl], default_float: Result<DType, String>) -> Region {
        let same = default_float == self.default_float
            && self.inputs().zip(live).all(|(d, l)| d.as_ref().is_some_and(|d| d.dtype == l.dtype && d.sizes == l.sizes));
        let mut live = live.iter();
        let items = self
            .items
            .iter()
            .map(|i| match i {
                Item::Input(d) => Item::Input(live.next().cloned().map(|l| InputDecl { number: d.as_ref().is_some_and(|d| d.number), ..l })),
                Item::Node { kind, args, expect } => Item::Node { kind: kind.clone(), args: args.clone(), expect: if same { expect.clone() } else { None } },
                other => other.clone(),
            })
            .collect();
        Region { items, outputs: self.outputs.clone(), default_float, weights: self.weights.clone(), shape_only: self.shape_only.clone() }
    }
}

pub fn parse(text: &str) -> Result<Region, String> {
    let mut r = Region::default();
    let mut names: std::collections::HashMap<&str, usize> = Default::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut words = line.split(' ');
        let head = words.next().unwrap_or("");
        let name = words.next().ok_or_else(|| format!("bad line: {line}"))?;
        let rest: Vec<&str> = words.collect();
        let lookup = |n: &str| names.get(n).copied().ok_or_else(|| format!("unknown value {n}"));
        let item = match head {
            "default_dtype" => {
                r.default_float = parse_dtype(name);
                continue;
            }
            "output" => {
                if rest == ["shape_only"] {
                    r.shape_only.push(r.outputs.len());
                }
                r.outputs.push(lookup(name)?);
                continue;
            }
            "weight" => {
                let facts = WeightFacts::parse(&rest.join(" ")).ok_or_else(|| format!("bad weight facts: {line}"))?;
                r.weights.push((lookup(name)?, facts));
                continue;
            }
            "input" => match rest[..] {
                ["?"] => Item::Input(None),
                ["scalar", dtype @ ("f64" | "i64")] => Item::Input(Some(InputDecl { dtype: parse_dtype(dtype), sizes: vec![], strides: vec![], number: true })),
                [dtype, sizes, strides] => Item::Input(Some(InputDecl { dtype: parse_dtype(dtype), sizes: ints(sizes)?, strides: ints(strides)?, number: false })),
                _ => return Err(format!("bad input: {line}")),
            },
            "const" => {
                let value = rest[1..].join(" ");
                Item::Const(match rest.first().copied() {
                    Some("none") => Const::None,
                    Some("bool") => Const::Bool(value == "1"),
                    Some("int") => Const::Int(value.parse().map_err(|_| format!("bad int: {line}"))?),
                    Some("float") => Const::Float(match value.as_str() {
                        "nan" | "-nan" => f64::NAN,
                        "inf" => f64::INFINITY,
                        "-inf" => f64::NEG_INFINITY,
                        v => v.parse().map_err(|_| format!("bad float: {line}"))?,
                    }),
                    Some("str") => Const::Str(value),
                    Some("ints") => Const::Ints(rest[1..].iter().map(|x| x.parse().map_err(|_| format!("bad int: {line}"))).collect::<Result<_, _>>()?),
                    Some("floats") => Const::Floats(rest[1..].iter().map(|x| x.parse().map_err(|_| format!("bad float: {line}"))).collect::<Result<_, _>>()?),
                    _ => return Err(format!("bad const: {line}")),
                })
            }
            "list" => Item::List(rest.iter().map(|a| lookup(a)).collect::<Result<_, _>>()?),
            "shape" => {
                let (kind, args) = rest.split_first().ok_or_else(|| format!("bad shape: {line}"))?;
                Item::Shape { kind: kind.to_string(), args: args.iter().map(|a| lookup(a)).collect::<Result<_, _>>()? }
            }
            "node" => {
                let (call, ty) = match rest.iter().position(|w| *w == ":") {
                    Some(p) => (&rest[..p], Some(&rest[p + 1..])),
                    None => (&rest[..], None),
                };
                let (kind, args) = call.split_first().ok_or_else(|| format!("bad node: {line}"))?;
                let expect = match ty {
                    Some([dtype, sizes]) => Some((parse_dtype(dtype), ints(sizes)?)),
                    Some(_) => return Err(format!("bad node type: {line}")),
                    None => None,
                };
                Item::Node { kind: kind.to_string(), args: args.iter().map(|a| lookup(a)).collect::<Result<_, _>>()?, expect }
            }
            _ => return Err(format!("bad line: {line}")),
        };
        names.insert(name, r.items.len());
        r.items.push(item);
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_item() {
        let r = parse("input %0 f32 [2,3] [3,1]\ninput %1 unsupported:Half [] []\nconst %2 float -inf\nconst %3 ints 0 1\nconst %4 str tanh\nnode %5 aten::gelu %0 %4\noutput %5\n").unwrap();
        assert_eq!(r.items[0], Item::Input(Some(InputDecl { dtype: Ok(DType::F32), sizes: vec![2, 3], strides: vec![3, 1], number: false })));
        assert_eq!(r.items[1], Item::Input(Some(InputDecl { dtype: Err("Half".into()), sizes: vec![], strides: vec![], number: false })));
        let n = parse("input %0 scalar f64\n").unwrap();
        assert_eq!(n.items[0], Item::Input(Some(InputDecl { dtype: Ok(DType::F64), sizes: vec![], strides: vec![], number: true })));
        assert_eq!(parse("input %0 ?").unwrap().items[0], Item::Input(None));
        assert_eq!(r.items[2], Item::Const(Const::Float(f64::NEG_INFINITY)));
        assert_eq!(r.items[3], Item::Const(Const::Ints(vec![0, 1])));
        assert_eq!(r.items[4], Item::Const(Const::Str("tanh".into())));
        assert_eq!(r.items[5], Item::Node { kind: "aten::gelu".into(), args: vec![0, 4], expect: None });
        assert_eq!(r.outputs, vec![5]);
        assert_eq!(r.default_float, Ok(DType::F32));
        assert_eq!(parse("default_dtype f64\n").unwrap().default_float, Ok(DType::F64));
        assert_eq!(parse("default_dtype unsupported:BFloat16\n").unwrap().default_float, Err("BFloat16".into()));
        let r = parse("input %0 f32 [2] [1]\nnode %1 aten::exp %0 : f32 [2]\n").unwrap();
        assert_eq!(r.items[1], Item::Node { kind: "aten::exp".into(), args: vec![0], expect: Some((Ok(DType::F32), vec![2])) });
        assert!(parse("node %1 aten::exp %0").is_err());
        let r = parse("input %0 f32 [2] [1]\nconst %1 int 0\nshape %2 aten::size %0 %1\n").unwrap();
        assert_eq!(r.items[2], Item::Shape { kind: "aten::size".into(), args: vec![0, 1] });
        assert!(r.node_kinds().is_empty(), "shape arithmetic is no op of the region");
        let r = parse("input %0 f32 [2,2] [2,1]\nweight %0 2 2 1 1 1 1 1 1 1 1 2 2 code 000102030405060708090a0b0c0d0e0f\n").unwrap();
        assert_eq!(r.items.len(), 1);
        let key = kiln_compiler::kernels::weights_in_code::WeightKey(std::array::from_fn(|i| i as u8));
        assert_eq!(r.weights, vec![(0, WeightFacts { rows: 2, cols: 2, nonzero_blocks: vec![1; 8], code_steps: [2, 2], key: Some(key) })]);
    }
}
