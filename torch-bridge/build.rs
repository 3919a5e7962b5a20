//! Builds the C++ shim against the headers of the libtorch that torch-sys links (the pip
//! wheel's, with LIBTORCH_USE_PYTORCH=1). torch-sys has `links = "tch"`, so its lib dir
//! arrives as DEP_TCH_LIBTORCH_LIB; the headers sit beside it in `../include`.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=cpp/kiln_bridge.cpp");
    let lib = PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports its libtorch lib dir"));
    let include = lib.parent().expect("torch/lib has a parent").join("include");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        // torch's own cpp_extension builds with C++20 and the C++11 ABI (shared/notes).
        .flag("-std=c++20")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("cpp/kiln_bridge.cpp")
        .compile("kiln_bridge");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
