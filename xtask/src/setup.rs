//! `cargo xtask setup`: libtorch 2.11.0 from the PyPI wheel `torch==2.11.0`, in a cached venv.
//!
//! The venv lives in `$FRUGAL_HOME` (default `~/.cache/frugal/torch-2.11.0`). A marker file is
//! written only after the install is complete and checked, so an interrupted install is redone
//! and a finished one makes later calls instant. A `LIBTORCH` or `LIBTORCH_USE_PYTORCH` that the
//! user set is respected as it is.

use crate::{Failure, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The torch wheel that carries the libtorch tch 0.24 wants.
pub const TORCH_SPEC: &str = "torch==2.11.0";
/// The CUDA compiler headers (`crt/host_config.h`) that `cuda_runtime_api.h` includes and the
/// wheel's CUDA runtime package leaves out; the version of the wheel's nvrtc (CUDA 13.0).
/// Frugal's libtorch extension needs them to compile its CUDA parts.
pub const CRT_SPEC: &str = "nvidia-cuda-crt==13.0.88";
const MARKER: &str = "frugal-setup.ok";
/// Space the wheel and its CUDA dependencies take once installed, with some margin.
const NEEDED_BYTES: u64 = 6 << 30;

/// What the other commands pass to cargo and to the programs they run.
pub struct TorchEnv {
    /// libtorch's root (`.../site-packages/torch`), or empty when the user chose
    /// `LIBTORCH_USE_PYTORCH`.
    pub libtorch: PathBuf,
    /// A Python that can `import torch`, for the reference scripts of tests and benchmarks.
    pub python: PathBuf,
    user_set: bool,
}

impl TorchEnv {
    /// Environment variables for cargo and for the programs it builds.
    pub fn vars(&self) -> Vec<(String, String)> {
        let mut v = vec![(
            "FRUGAL_PYTHON".to_string(),
            self.python.display().to_string(),
        )];
        if !self.user_set {
            v.push(("LIBTORCH".into(), self.libtorch.display().to_string()));
            v.push(("LIBTORCH_CXX11_ABI".into(), "1".into()));
        }
        v
    }
}

fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("FRUGAL_HOME") {
        return PathBuf::from(h);
    }
    let base = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join(".cache/frugal/torch-2.11.0")
}

/// Makes sure libtorch is there (installing it once) and returns the environment to use.
pub fn ensure() -> Result<TorchEnv> {
    if let Some(dir) = std::env::var_os("LIBTORCH") {
        let dir = PathBuf::from(dir);
        if !dir.join("lib").is_dir() {
            return Err(Failure::new(format!(
                "LIBTORCH={} has no lib/ folder: point it at a libtorch 2.11.0 root",
                dir.display()
            )));
        }
        let python = std::env::var_os("FRUGAL_PYTHON")
            .map(PathBuf::from)
            .unwrap_or("python3".into());
        return Ok(TorchEnv {
            libtorch: dir,
            python,
            user_set: true,
        });
    }
    if std::env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        let python = std::env::var_os("FRUGAL_PYTHON")
            .map(PathBuf::from)
            .unwrap_or("python3".into());
        return Ok(TorchEnv {
            libtorch: PathBuf::new(),
            python,
            user_set: true,
        });
    }
    let venv = home();
    let python = venv.join("bin/python");
    if venv.join(MARKER).is_file() {
        if let Some(torch) = find_torch(&venv) {
            ensure_cuda_headers(&python, &torch);
            return Ok(TorchEnv {
                libtorch: torch,
                python,
                user_set: false,
            });
        }
    }
    install(&venv)?;
    let torch = find_torch(&venv).ok_or_else(|| {
        Failure::new(format!(
            "pip finished but {} holds no torch/lib/libtorch.so",
            venv.display()
        ))
    })?;
    std::fs::write(venv.join(MARKER), format!("{}\n", torch.display()))
        .map_err(|e| Failure::new(format!("cannot write {}: {e}", venv.join(MARKER).display())))?;
    ensure_cuda_headers(&python, &torch);
    Ok(TorchEnv {
        libtorch: torch,
        python,
        user_set: false,
    })
}

/// Installs [`CRT_SPEC`] beside the wheel's CUDA runtime headers where they lack it (once;
/// small). Without it the extension builds without its CUDA parts, so a failure only warns.
fn ensure_cuda_headers(python: &Path, torch: &Path) {
    let Some(include) = torch.parent().map(|site| site.join("nvidia/cu13/include")) else {
        return;
    };
    if !include.join("cuda_runtime_api.h").is_file() || include.join("crt/host_config.h").is_file()
    {
        return;
    }
    eprintln!("xtask setup: installing {CRT_SPEC} (the CUDA headers the libtorch extension needs)");
    let ok = Command::new(python)
        .args(["-m", "pip", "install", "--quiet", "--no-deps", CRT_SPEC])
        .status()
        .is_ok_and(|s| s.success());
    if !ok || !include.join("crt/host_config.h").is_file() {
        eprintln!(
            "xtask setup: warning: could not install {CRT_SPEC}; Frugal's libtorch extension \
             will be built without its CUDA parts (streams, CUDA graphs, allocator statistics)"
        );
    }
}

fn find_torch(venv: &Path) -> Option<PathBuf> {
    let lib = venv.join("lib");
    let mut entries: Vec<_> = std::fs::read_dir(&lib).ok()?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    entries.into_iter().find_map(|e| {
        let torch = e.path().join("site-packages/torch");
        torch.join("lib/libtorch.so").is_file().then_some(torch)
    })
}

fn install(venv: &Path) -> Result<()> {
    eprintln!(
        "xtask setup: installing libtorch ({TORCH_SPEC} from PyPI) into {}",
        venv.display()
    );
    eprintln!("xtask setup: this happens once; it downloads about 3 GB and takes a few minutes");
    let python3 = which("python3").ok_or_else(|| {
        Failure::new("python3 not found on PATH: install Python 3.9 or newer (with pip and venv)")
    })?;
    let parent = venv.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent)
        .map_err(|e| Failure::new(format!("cannot create {}: {e}", parent.display())))?;
    if let Some(free) = free_bytes(parent) {
        if free < NEEDED_BYTES {
            return Err(Failure::new(format!(
                "not enough disk space in {}: {:.1} GB free, libtorch needs about {:.0} GB \
                 (set FRUGAL_HOME to a folder on a larger disk)",
                parent.display(),
                free as f64 / 1e9,
                NEEDED_BYTES as f64 / 1e9
            )));
        }
    }
    if !venv.join("bin/python").is_file() {
        let ok = Command::new(&python3)
            .args(["-m", "venv"])
            .arg(venv)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return Err(Failure::new(format!(
                "'{} -m venv {}' failed: install Python's venv module (Debian: apt-get install python3-venv)",
                python3.display(),
                venv.display()
            )));
        }
    }
    let pip_ok = Command::new(venv.join("bin/python"))
        .args(["-m", "pip", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !pip_ok {
        return Err(Failure::new(format!(
            "the venv at {} has no pip: install pip for python3 (Debian: apt-get install python3-pip python3-venv)",
            venv.display()
        )));
    }
    let st = Command::new(venv.join("bin/python"))
        .args(["-m", "pip", "install", "--progress-bar", "on", TORCH_SPEC])
        .stdout(std::io::stderr())
        .status()
        .map_err(|e| Failure::new(format!("could not run pip: {e}")))?;
    if !st.success() {
        return Err(Failure::new(format!(
            "pip install {TORCH_SPEC} failed ({st}); see pip's output above"
        )));
    }
    Ok(())
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Free bytes on the file system holding `dir`, from `df` (None when it cannot tell).
fn free_bytes(dir: &Path) -> Option<u64> {
    let out = Command::new("df").arg("-Pk").arg(dir).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let line = text.lines().nth(1)?;
    let kb: u64 = line.split_whitespace().nth(3)?.parse().ok()?;
    Some(kb * 1024)
}

/// The Python packages the cross-checks of `cargo xtask test` run (an adapter Frugal saved must
/// load in PEFT), pinned to the versions the fixtures were made with.
pub const TEST_PACKAGES: &[&str] = &["peft==0.21.2", "transformers==5.25.0"];

/// Makes sure `env`'s Python can import PEFT and transformers, installing [`TEST_PACKAGES`]
/// once (torch pinned, so pip never replaces it). Returns whether they are there: a machine
/// without the network still runs the tests, which then skip the cross-check and say so.
pub fn ensure_test_packages(env: &TorchEnv) -> bool {
    ensure_packages(
        env,
        "peft, transformers",
        TEST_PACKAGES,
        "the PEFT cross-check",
    )
}

/// The Python packages of the benchmarks' PEFT + bitsandbytes sides (QLoRA), pinned.
pub const BENCH_PACKAGES: &[&str] = &[
    "peft==0.21.2",
    "transformers==5.25.0",
    "bitsandbytes==0.50.2",
];

/// Makes sure `env`'s Python can import PEFT, transformers and bitsandbytes, installing
/// [`BENCH_PACKAGES`] once (torch pinned). Returns whether they are there.
pub fn ensure_bench_packages(env: &TorchEnv) -> bool {
    ensure_packages(
        env,
        "peft, transformers, bitsandbytes",
        BENCH_PACKAGES,
        "the bitsandbytes side",
    )
}

/// Makes sure `env`'s Python can `import {modules}`, installing `packages` once with torch
/// pinned; `purpose` names what goes without them in the warning.
fn ensure_packages(env: &TorchEnv, modules: &str, packages: &[&str], purpose: &str) -> bool {
    let importable = || {
        Command::new(&env.python)
            .args(["-c", &format!("import {modules}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if importable() {
        return true;
    }
    eprintln!(
        "xtask: installing {} for {purpose} (once)",
        packages.join(" ")
    );
    let ok = Command::new(&env.python)
        .args(["-m", "pip", "install", "--quiet", TORCH_SPEC])
        .args(packages)
        .status()
        .is_ok_and(|s| s.success());
    if !ok || !importable() {
        eprintln!(
            "xtask: warning: could not install {}; {purpose} will be skipped",
            packages.join(" ")
        );
        return false;
    }
    true
}

/// Debian's packages that build and run the MPI backend (`--features mpi`): Open MPI's
/// launcher and headers, and libclang for the bindings' generator.
pub const MPI_PACKAGES: &[&str] = &["openmpi-bin", "libopenmpi-dev", "libclang-dev"];

/// Makes sure Open MPI (`mpirun`, `mpicc`) and libclang are there, installing
/// [`MPI_PACKAGES`] with apt-get where they are missing and this process may (root). Returns
/// whether they are there: elsewhere the tests build without MPI and the MPI tests are not run.
pub fn ensure_mpi() -> bool {
    let present = || {
        let runs = |cmd: &str, arg: &str| {
            Command::new(cmd)
                .arg(arg)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        // libclang where clang-sys looks: LIBCLANG_PATH, or Debian's /usr/lib/llvm-N/lib.
        let libclang = std::env::var("LIBCLANG_PATH")
            .ok()
            .map(PathBuf::from)
            .into_iter()
            .chain(
                std::fs::read_dir("/usr/lib")
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("llvm-"))
                    .map(|e| e.path().join("lib")),
            )
            .any(|d| d.join("libclang.so").exists());
        runs("mpirun", "--version") && runs("mpicc", "--showme:version") && libclang
    };
    if present() {
        return true;
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        eprintln!(
            "xtask: warning: Open MPI or libclang is missing and this is not root: the MPI tests \
             will not run (install {})",
            MPI_PACKAGES.join(" ")
        );
        return false;
    }
    eprintln!("xtask: installing {} (once)", MPI_PACKAGES.join(" "));
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(MPI_PACKAGES)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let ok = install()
        || (Command::new("apt-get")
            .args(["update", "-q"])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
            && install());
    if !ok || !present() {
        eprintln!(
            "xtask: warning: could not install {}: the MPI tests will not run",
            MPI_PACKAGES.join(" ")
        );
        return false;
    }
    true
}
