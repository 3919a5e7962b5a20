//! Fingerprints the compiler's sources: the fingerprint is part of `VERSION`, and so of every
//! cache key and entry header. A change to the lowering or codegen then never meets code an
//! earlier build of the same version number cached on disk (seen: a changed GEMM rule served
//! stale entries until the cache was cleared).

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn main() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = vec![];
    files(&src, &mut paths);
    paths.sort();
    // Each file, and each directory for files added or removed (a directory alone was seen
    // not to rerun this script when a file in a subfolder changed).
    for p in &paths {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    let mut dirs: Vec<_> = paths.iter().filter_map(|p| p.parent().map(|d| d.to_path_buf())).collect();
    dirs.dedup();
    for d in dirs {
        println!("cargo:rerun-if-changed={}", d.display());
    }
    // FNV-1a: stable across toolchains, no build dependency.
    struct Fnv(u64);
    impl Hasher for Fnv {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for b in bytes {
                self.0 = (self.0 ^ *b as u64).wrapping_mul(0x100000001b3);
            }
        }
    }
    let mut h = Fnv(0xcbf29ce484222325);
    for p in &paths {
        p.strip_prefix(&src).unwrap().to_string_lossy().hash(&mut h);
        std::fs::read(p).unwrap_or_default().hash(&mut h);
    }
    println!("cargo:rustc-env=KILN_SOURCE_HASH={:016x}", h.finish());
}
