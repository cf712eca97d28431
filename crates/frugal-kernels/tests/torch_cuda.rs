//! The extension's CUDA parts: compiled where the set-up has the headers (CI), errors without a
//! GPU, and with a GPU the allocator's statistics and a CUDA graph replay.

use std::path::PathBuf;

use frugal_kernels::torch_cuda::{self, CudaGraph};
use frugal_kernels::{cpu, KernelError, Kernels};
use tch::{Device, Kind, Tensor};

/// Where `cargo xtask setup` left CUDA's runtime and compiler headers beside the torch wheel,
/// the CUDA parts must have been compiled.
#[test]
fn cuda_parts_are_compiled_where_the_headers_are() {
    let Some(torch) = std::env::var_os("LIBTORCH").map(PathBuf::from) else {
        println!("skipped: LIBTORCH is not set");
        return;
    };
    let include = torch.join("../nvidia/cu13/include");
    let has_headers = include.join("crt/host_config.h").is_file();
    let has_cuda_lib = torch.join("lib/libc10_cuda.so").is_file();
    if has_headers && has_cuda_lib {
        assert!(
            torch_cuda::built_with_cuda(),
            "libc10_cuda and the CUDA headers are there, but the extension lacks its CUDA parts"
        );
    } else {
        println!("skipped: this libtorch set-up has no CUDA headers");
    }
}

#[test]
fn without_a_gpu_each_call_says_no_cuda() {
    if tch::Cuda::is_available() {
        println!("skipped: a CUDA GPU is present");
        return;
    }
    let no_cuda = |r: Result<(), KernelError>, what: &str| match r {
        Err(KernelError::NoCuda(_)) => {}
        other => panic!("{what}: expected NoCuda, got {other:?}"),
    };
    no_cuda(torch_cuda::current_stream(0).map(drop), "current_stream");
    no_cuda(torch_cuda::memory_stats(0).map(drop), "memory_stats");
    no_cuda(torch_cuda::reset_peak(0), "reset_peak");
    no_cuda(torch_cuda::empty_cache(), "empty_cache");
    no_cuda(CudaGraph::new(0).map(drop), "CudaGraph::new");
}

#[test]
fn allocator_statistics_follow_allocations() {
    if !tch::Cuda::is_available() {
        println!("skipped: no CUDA GPU");
        return;
    }
    let dev = Device::Cuda(0);
    let _warm = Tensor::zeros([1], (Kind::Float, dev));
    tch::Cuda::synchronize(0);
    torch_cuda::reset_peak(0).unwrap();
    let before = torch_cuda::memory_stats(0).unwrap();
    assert_eq!(before.peak_allocated, before.allocated, "reset_peak");

    let bytes = 64i64 << 20;
    let big = Tensor::zeros([bytes / 4], (Kind::Float, dev));
    let during = torch_cuda::memory_stats(0).unwrap();
    assert!(
        during.allocated >= before.allocated + bytes,
        "{before:?} -> {during:?}"
    );
    assert!(during.reserved >= during.allocated);
    drop(big);
    let after = torch_cuda::memory_stats(0).unwrap();
    assert_eq!(after.allocated, before.allocated, "freed");
    assert!(
        after.peak_allocated >= before.allocated + bytes,
        "the peak stays"
    );
    assert!(after.reserved >= bytes, "the allocator caches the block");
    torch_cuda::empty_cache().unwrap();
    let emptied = torch_cuda::memory_stats(0).unwrap();
    assert!(
        emptied.reserved <= after.reserved - bytes,
        "{after:?} -> {emptied:?}"
    );
    assert!(
        matches!(
            torch_cuda::memory_stats(1 << 20),
            Err(KernelError::Invalid(_))
        ),
        "a device that does not exist"
    );
}

#[test]
fn a_replayed_graph_equals_eager_work_with_frugal_kernels_inside() {
    if !tch::Cuda::is_available() {
        println!("skipped: no CUDA GPU");
        return;
    }
    let dev = Device::Cuda(0);
    tch::manual_seed(3);
    let (rows, cols) = (96usize, 160usize);
    let values: Vec<i8> = (0..rows * cols)
        .map(|i| ((i * 7 + i / 5) % 3) as i8 - 1)
        .collect();
    let packed = cpu::pack_ternary(&values).unwrap();
    let packed_gpu = Tensor::from_slice(&packed).to_device(dev);
    let w = Tensor::randn([cols as i64, cols as i64], (Kind::Float, dev));
    let mut x = Tensor::randn([cols as i64], (Kind::Float, dev));
    let k = Kernels::global();
    let step = |x: &Tensor| -> Tensor {
        let h = w.mv(x).relu();
        k.gemv_ternary_f32(&packed_gpu, 0.5, &h, rows).unwrap() + 1.0
    };
    // Warm-up, as torch.cuda.graph does, then capture.
    let _ = step(&x);
    tch::Cuda::synchronize(0);
    let mut graph = CudaGraph::new(0).unwrap();
    let out = graph.capture(|| Ok(step(&x))).unwrap();
    for trial in 0..3 {
        let fresh = Tensor::randn([cols as i64], (Kind::Float, dev)) * (trial + 1) as f64;
        x.copy_(&fresh);
        graph.replay().unwrap();
        let eager = step(&fresh);
        let diff = (&out - &eager).abs().max().double_value(&[]);
        assert!(
            diff < 1e-4,
            "trial {trial}: replay differs from eager by {diff}"
        );
    }
    // The stream before the capture is current again.
    assert!(
        graph.capture_end().is_err(),
        "ending a capture that is not running is an error"
    );
}
