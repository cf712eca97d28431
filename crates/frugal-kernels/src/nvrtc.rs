//! Finding libnvrtc and the CUDA headers, and compiling `.cu` sources to PTX.
//!
//! cudarc loads libnvrtc by bare name (`libnvrtc.so`, `libnvrtc.so.13`, ...), which only works
//! when the library is on the loader's search path. The torch wheel ships it under
//! `<site-packages>/nvidia/cu13/lib`, which is not. So before cudarc's first use we `dlopen`
//! the wheel's copy by full path with `RTLD_GLOBAL` and keep it loaded: the loader then answers
//! cudarc's later `dlopen("libnvrtc.so.13")` with the already-loaded object (same soname).
//! The wheel is located from, in order: `FRUGAL_NVRTC` (a file), `LIBTORCH` at run time,
//! `LIBTORCH` at compile time, and the folder of the libtorch this process has loaded.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

use crate::error::{KernelError, Result};
use crate::registry::expand_includes;

/// `LIBTORCH` as it was when this crate was compiled (tch's build needs it, so it is usually set).
const LIBTORCH_AT_BUILD: Option<&str> = option_env!("LIBTORCH");

/// Sub-folders of `site-packages/nvidia` that hold CUDA libraries and headers, newest first.
const NVIDIA_SUBDIRS: &[&str] = &["cu13", "cuda_nvrtc", "cuda_runtime"];

/// libnvrtc file names to try inside a library folder, preferred first.
const NVRTC_NAMES: &[&str] = &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];

/// Torch package folders (`.../site-packages/torch`) this process can know of, in order.
fn torch_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("LIBTORCH") {
        dirs.push(PathBuf::from(dir));
    }
    if let Some(dir) = LIBTORCH_AT_BUILD {
        dirs.push(PathBuf::from(dir));
    }
    if let Some(dir) = loaded_torch_dir() {
        dirs.push(dir);
    }
    dirs.dedup();
    dirs
}

/// The folder `torch` whose `lib/libtorch_cpu.so` is mapped into this process, if any.
fn loaded_torch_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.ends_with("/libtorch_cpu.so"))
        .and_then(|path| Path::new(path).parent()?.parent().map(Path::to_path_buf))
}

/// `<torch>/../nvidia/<sub>/<leaf>` for every known torch folder and NVIDIA sub-folder.
fn wheel_dirs(leaf: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for torch in torch_dirs() {
        let nvidia = torch.join("..").join("nvidia");
        for sub in NVIDIA_SUBDIRS {
            dirs.push(nvidia.join(sub).join(leaf));
        }
    }
    dirs
}

/// Toolkit folders named by `CUDA_PATH` / `CUDA_HOME`, then `/usr/local/cuda`.
fn toolkit_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = ["CUDA_PATH", "CUDA_HOME"]
        .iter()
        .filter_map(std::env::var_os)
        .map(PathBuf::from)
        .collect();
    dirs.push(PathBuf::from("/usr/local/cuda"));
    dirs
}

/// Full paths where libnvrtc may live, in the order they are tried.
pub fn nvrtc_candidates() -> Vec<PathBuf> {
    let mut paths = Vec::new();
    if let Some(file) = std::env::var_os("FRUGAL_NVRTC") {
        paths.push(PathBuf::from(file));
    }
    let mut lib_dirs = wheel_dirs("lib");
    lib_dirs.extend(toolkit_dirs().into_iter().map(|d| d.join("lib64")));
    for dir in lib_dirs {
        for name in NVRTC_NAMES {
            paths.push(dir.join(name));
        }
    }
    paths
}

/// The folder holding the CUDA headers (`cuda_fp16.h`, `cuda_bf16.h`, ...) for nvrtc:
/// `FRUGAL_CUDA_INCLUDE`, else the torch wheel's `nvidia/cu13/include`, else a toolkit's
/// `include`. `None` when no candidate holds `cuda_fp16.h` (sources without includes compile).
pub fn cuda_include_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("FRUGAL_CUDA_INCLUDE") {
        return Some(PathBuf::from(dir));
    }
    let mut dirs = wheel_dirs("include");
    dirs.extend(toolkit_dirs().into_iter().map(|d| d.join("include")));
    dirs.into_iter().find(|d| d.join("cuda_fp16.h").is_file())
}

/// Opens `path` with `RTLD_NOW | RTLD_GLOBAL` and never closes it.
fn dlopen_global(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c_path` is a valid NUL-terminated string; loading libnvrtc runs only its
    // initialisers, and the handle is deliberately leaked so the library stays loaded.
    let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    !handle.is_null()
}

/// Makes libnvrtc loadable by cudarc, once per process; see the module docs.
///
/// Returns [`KernelError::NoNvrtc`] listing everything tried when it cannot be found.
pub fn ensure_nvrtc() -> Result<()> {
    static LOADED: OnceLock<std::result::Result<(), Vec<String>>> = OnceLock::new();
    LOADED
        .get_or_init(load_nvrtc)
        .clone()
        .map_err(|searched| KernelError::NoNvrtc { searched })
}

fn load_nvrtc() -> std::result::Result<(), Vec<String>> {
    let mut searched = Vec::new();
    for path in nvrtc_candidates() {
        searched.push(path.display().to_string());
        if path.is_file() && dlopen_global(&path) {
            // nvrtc dlopens its builtins library by name at compile time; load the sibling
            // copy now so that lookup succeeds without LD_LIBRARY_PATH.
            if let Some(dir) = path.parent() {
                preload_builtins(dir);
            }
            break;
        }
    }
    // SAFETY: `is_culib_present` only tries to dlopen libnvrtc by its usual names.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Ok(());
    }
    searched.extend(cudarc::get_lib_name_candidates("nvrtc"));
    Err(searched)
}

fn preload_builtins(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut builtins: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libnvrtc-builtins.so") && !n.contains(".alt."))
        })
        .collect();
    builtins.sort();
    for path in builtins {
        dlopen_global(&path);
    }
}

/// Whether `arch` looks like an nvrtc `--gpu-architecture` value: `compute_XY` or `sm_XY`
/// (an optional `a`/`f` suffix allowed).
fn valid_arch(arch: &str) -> bool {
    let digits = arch
        .strip_prefix("compute_")
        .or_else(|| arch.strip_prefix("sm_"))
        .map(|rest| rest.trim_end_matches(['a', 'f']));
    digits.is_some_and(|d| d.len() >= 2 && d.bytes().all(|b| b.is_ascii_digit()))
}

/// Compiles CUDA C++ `source` to PTX for `arch` (`"compute_80"`, `"sm_90"`, ...) through nvrtc.
///
/// `#include "common.cuh"` and the other [`crate::registry::HEADERS`] are spliced in first, and
/// [`cuda_include_dir`] is passed as an include path. Needs no GPU, only libnvrtc.
pub fn compile_ptx(source: &str, arch: &str) -> Result<Ptx> {
    compile_named(source, arch, "kernel.cu")
}

/// [`compile_ptx`] with the program name that nvrtc shows in its log.
pub fn compile_named(source: &str, arch: &str, name: &str) -> Result<Ptx> {
    if !valid_arch(arch) {
        return Err(KernelError::Invalid(format!(
            "gpu architecture {arch:?}: expected compute_XY or sm_XY"
        )));
    }
    ensure_nvrtc()?;
    let source = expand_includes(source);
    let opts = CompileOptions {
        include_paths: cuda_include_dir()
            .map(|d| d.display().to_string())
            .into_iter()
            .collect(),
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
        name: Some(name.to_string()),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| KernelError::Compile {
        name: name.to_string(),
        arch: arch.to_string(),
        message: match e {
            CompileError::CompileError { nvrtc, log, .. } => {
                format!("{nvrtc:?}\n{}", log.to_string_lossy())
            }
            other => format!("{other:?}"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names() {
        assert!(valid_arch("compute_80"));
        assert!(valid_arch("sm_90"));
        assert!(valid_arch("sm_90a"));
        assert!(!valid_arch("sm_"));
        assert!(!valid_arch("90"));
        assert!(!valid_arch("sm_9x"));
    }

    #[test]
    fn finds_the_loaded_libtorch_and_the_wheel() {
        // The test binary links libtorch, so its folder is visible in /proc/self/maps.
        let torch = loaded_torch_dir().expect("libtorch_cpu.so is mapped");
        assert!(
            torch.join("lib").join("libtorch_cpu.so").is_file(),
            "{}",
            torch.display()
        );
        assert!(
            nvrtc_candidates().iter().any(|p| p.is_file()),
            "{:?}",
            nvrtc_candidates()
        );
        ensure_nvrtc().expect("libnvrtc loads");
    }

    #[test]
    fn bad_arch_is_an_error() {
        assert!(matches!(
            compile_ptx("", "ampere"),
            Err(KernelError::Invalid(_))
        ));
    }
}
