//! Links libtorch (the shared `build/link_torch.rs`) and compiles the C++ extension in `csrc/`
//! against the headers of the libtorch that torch-sys found (`DEP_TCH_LIBTORCH_LIB`).
//!
//! Where that libtorch has CUDA (`libc10_cuda.so` beside it) and the CUDA runtime headers are
//! found (the torch wheel's `nvidia/*/include` with PyPI's `nvidia-cuda-crt`, which
//! `cargo xtask setup` installs, or `CUDA_HOME`, or `/usr/local/cuda`), the CUDA parts
//! are compiled too and the `frugal_ext_cuda` cfg is set; otherwise they return an error.

#[path = "../../build/link_torch.rs"]
mod link_torch;

use std::path::{Path, PathBuf};

/// A folder holding `cuda_runtime_api.h` and the compiler headers it includes
/// (`crt/host_config.h`, PyPI's `nvidia-cuda-crt`), looked for beside the torch wheel first.
fn cuda_include(torch_lib: &Path) -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(site) = torch_lib.parent().and_then(Path::parent) {
        if let Ok(entries) = std::fs::read_dir(site.join("nvidia")) {
            let mut found: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path().join("include"))
                .collect();
            found.sort();
            candidates.extend(found);
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(var) {
            candidates.push(PathBuf::from(home).join("include"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    for dir in &candidates {
        if dir.join("cuda_runtime_api.h").is_file() {
            // Rerun once the compiler headers are installed beside the runtime headers.
            println!(
                "cargo:rerun-if-changed={}",
                dir.join("crt/host_config.h").display()
            );
        }
    }
    candidates.into_iter().find(|dir| {
        dir.join("cuda_runtime_api.h").is_file() && dir.join("crt/host_config.h").is_file()
    })
}

fn main() {
    link_torch::main();
    println!("cargo:rerun-if-changed=csrc/ext.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo::rustc-check-cfg=cfg(frugal_ext_cuda)");
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports DEP_TCH_LIBTORCH_LIB"),
    );
    let include = lib
        .parent()
        .expect("libtorch's lib has a parent")
        .join("include");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/ext.cpp");
    let with_cuda = lib.join("libc10_cuda.so").is_file() && lib.join("libtorch_cuda.so").is_file();
    let cuda = with_cuda.then(|| cuda_include(&lib)).flatten();
    if let Some(cuda) = &cuda {
        build.include(cuda).define("FRUGAL_WITH_CUDA", None);
    }
    build.compile("frugal_ext");
    if cuda.is_some() {
        println!("cargo:rustc-cfg=frugal_ext_cuda");
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
    }
}
