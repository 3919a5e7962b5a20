//! Compiled programs, kept in memory and keyed by a blake3 hash of everything that changes the
//! generated code: the canonical graph text, the input specialisation (strides; sizes and
//! dtypes are in the graph text), the target CPU and its features, the LLVM and Kiln versions
//! and the compile options. Two groups with the same key share one compiled program.

use dashmap::DashMap;
use kiln_compiler::{CompileOptions, CompiledProgram, Graph, Target};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    pub fn new(graph: &Graph, input_strides: &[Vec<i64>], target: &Target, options: &CompileOptions) -> CacheKey {
        let mut h = blake3::Hasher::new();
        // Each field is length-prefixed so that no two different tuples hash the same bytes.
        let mut field = |tag: &str, bytes: &[u8]| {
            h.update(tag.as_bytes());
            h.update(&(bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field("graph", graph.to_string().as_bytes());
        field("strides", format!("{input_strides:?}").as_bytes());
        field("triple", target.triple.as_bytes());
        field("cpu", target.cpu.as_bytes());
        field("features", target.features.as_bytes());
        field("llvm", kiln_compiler::target::LLVM_VERSION.as_bytes());
        field("kiln", kiln_compiler::VERSION.as_bytes());
        field("options", format!("{options:?}").as_bytes());
        CacheKey(*h.finalize().as_bytes())
    }

    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[derive(Default)]
pub struct ProgramCache {
    map: DashMap<CacheKey, Arc<CompiledProgram>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl ProgramCache {
    /// The program for `key`, compiling it with `compile` on a miss. Concurrent misses on one
    /// key may both compile; the first to finish wins and the other's result is dropped.
    pub fn get_or_compile<E>(&self, key: CacheKey, compile: impl FnOnce() -> Result<CompiledProgram, E>) -> Result<(Arc<CompiledProgram>, bool), E> {
        if let Some(p) = self.map.get(&key) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok((p.clone(), true));
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let p = Arc::new(compile()?);
        Ok((self.map.entry(key).or_insert(p).clone(), false))
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    /// Forgets the counters; compiled programs stay (code in use cannot be unloaded).
    pub fn reset_counters(&self) {
        self.hits.store(0, Ordering::Relaxed);
        self.misses.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_compiler::ir::parse_graph;

    const G: &str = "graph(%0: f32[4]) {\n %1 = exp(%0) : f32[4]\n return (%1)\n}";

    #[test]
    fn key_changes_with_each_part() {
        let g = parse_graph(G).unwrap();
        let t = Target { triple: "x86_64-unknown-linux-gnu".into(), cpu: "znver5".into(), features: "+avx512f".into() };
        let o = CompileOptions::default();
        let k = CacheKey::new(&g, &[vec![1]], &t, &o);
        assert_eq!(k, CacheKey::new(&parse_graph(G).unwrap(), &[vec![1]], &t, &o));
        assert_ne!(k, CacheKey::new(&parse_graph(&G.replace("exp", "log")).unwrap(), &[vec![1]], &t, &o));
        assert_ne!(k, CacheKey::new(&g, &[vec![2]], &t, &o));
        assert_ne!(k, CacheKey::new(&g, &[vec![1]], &Target { cpu: "znver4".into(), ..t.clone() }, &o));
        assert_ne!(k, CacheKey::new(&g, &[vec![1]], &Target { features: "-avx512f".into(), ..t.clone() }, &o));
        assert_ne!(k, CacheKey::new(&g, &[vec![1]], &t, &CompileOptions { pipeline: "default<O2>".into(), ..o.clone() }));
        assert_ne!(k, CacheKey::new(&g, &[vec![1]], &t, &CompileOptions { interleave: 1, ..o.clone() }));
    }

    #[test]
    fn compiles_once_per_key() {
        let cache = ProgramCache::default();
        let g = parse_graph(G).unwrap();
        let t = Target::host();
        let o = CompileOptions::default();
        let key = CacheKey::new(&g, &[vec![1]], &t, &o);
        let (a, hit_a) = cache.get_or_compile(key, || kiln_compiler::compile(&g, &[vec![1]], &t, &o)).unwrap();
        let (b, hit_b) = cache.get_or_compile(key, || -> Result<CompiledProgram, kiln_compiler::CompileError> { panic!("compiled twice") }).unwrap();
        assert!(!hit_a && hit_b);
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!((cache.hits(), cache.misses(), cache.len()), (1, 1, 1));
    }
}
