//! CI test (no GPU needed): every kernel source compiles through nvrtc for sm_80 and sm_90.

use frugal_kernels::{compile_ptx, registry, KernelError};

#[test]
fn quant_cu_compiles_through_nvrtc() {
    for arch in ["compute_80", "sm_80", "sm_90"] {
        let ptx = match compile_ptx(registry::QUANT.source, arch) {
            Ok(ptx) => ptx.to_src(),
            Err(KernelError::NoNvrtc { searched }) => panic!(
                "libnvrtc could not be loaded (it ships with the torch wheel under \
                 nvidia/cu13/lib; is LIBTORCH set?); searched: {searched:#?}"
            ),
            Err(e) => panic!("quant.cu failed to compile for {arch}: {e}"),
        };
        for entry in registry::QUANT.entries {
            assert!(
                ptx.contains(&format!(".entry {entry}(")),
                "PTX for {arch} lacks the entry {entry}"
            );
        }
        let target = arch
            .trim_start_matches("compute_")
            .trim_start_matches("sm_");
        assert!(
            ptx.contains(&format!(".target sm_{target}")),
            "PTX target for {arch}"
        );
    }
}

#[test]
fn every_registered_source_compiles() {
    for source in registry::ALL {
        for arch in ["sm_80", "sm_90"] {
            let ptx = compile_ptx(source.source, arch)
                .unwrap_or_else(|e| panic!("{} failed to compile for {arch}: {e}", source.name))
                .to_src();
            for entry in source.entries {
                assert!(
                    ptx.contains(&format!(".entry {entry}(")),
                    "{} lacks {entry} for {arch}",
                    source.name
                );
            }
        }
    }
}

#[test]
fn compile_errors_carry_the_log() {
    let err = compile_ptx(
        "extern \"C\" __global__ void k() { not_a_thing(); }",
        "sm_80",
    )
    .expect_err("bad source must not compile");
    match err {
        KernelError::Compile { message, arch, .. } => {
            assert_eq!(arch, "sm_80");
            assert!(message.contains("not_a_thing"), "log: {message}");
        }
        other => panic!("expected a compile error, got {other}"),
    }
}

#[test]
fn cuda_headers_are_found_and_usable() {
    // The wheel's headers let sources include cuda_bf16.h.
    let dir = frugal_kernels::cuda_include_dir().expect("CUDA include folder (torch wheel)");
    assert!(dir.join("cuda_bf16.h").is_file(), "{}", dir.display());
    let src = "#include <cuda_bf16.h>\n\
               extern \"C\" __global__ void to_bf16(const float* x, __nv_bfloat16* y, int n) {\n\
                 int i = blockIdx.x * blockDim.x + threadIdx.x;\n\
                 if (i < n) y[i] = __float2bfloat16(x[i]);\n\
               }\n";
    let ptx = compile_ptx(src, "sm_90")
        .expect("bf16 source compiles")
        .to_src();
    assert!(ptx.contains(".entry to_bf16("));
}
