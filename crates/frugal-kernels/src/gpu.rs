//! Launching the kernels on tch CUDA tensors.
//!
//! [`Kernels`] retains each device's primary context through `CudaContext::new(ordinal)` (the
//! same context libtorch uses), compiles and loads each kernel family once per device, and
//! launches on libtorch's current stream (from Frugal's extension, [`crate::torch_cuda`]), so
//! launches are ordered with torch's own work and are captured into CUDA graphs. Pointers are passed as `data_ptr() as u64`; outputs are
//! allocated by tch, so torch's caching allocator owns all memory and cudarc frees none of it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg,
};
use tch::{Device, Kind, Tensor};

use crate::error::{KernelError, Result};
use crate::nvrtc::compile_named;
use crate::registry::{KernelSource, QUANT};

/// Threads per block for every launch here.
pub(crate) const THREADS: u32 = 256;
/// Most blocks an elementwise (grid-stride) launch uses.
const MAX_BLOCKS: u64 = 1 << 20;

/// Checks that a CUDA driver and at least one device are present, without panicking.
///
/// Returns [`KernelError::NoCuda`] with the reason otherwise.
pub fn check_cuda() -> Result<()> {
    if !tch::Cuda::is_available() {
        return Err(KernelError::NoCuda(
            "libtorch sees no CUDA device (no GPU, no driver, or a CPU-only libtorch)".into(),
        ));
    }
    // SAFETY: `is_culib_present` only tries to dlopen libcuda by its usual names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(KernelError::NoCuda(
            "the CUDA driver library libcuda could not be loaded".into(),
        ));
    }
    Ok(())
}

/// Kernel modules compiled and loaded per device, and the launchers for each kernel.
///
/// Creating one touches no CUDA library; the first launch on a device retains its context and
/// compiles the kernel family for the device's architecture (`sm_XY`).
#[derive(Default)]
pub struct Kernels {
    contexts: Mutex<HashMap<usize, Arc<CudaContext>>>,
    modules: Mutex<HashMap<(usize, &'static str), Arc<CudaModule>>>,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let loaded: Vec<_> = self
            .modules
            .lock()
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default();
        f.debug_struct("Kernels").field("loaded", &loaded).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The CUDA ordinal of `t`, after checking its dtype and layout.
pub(crate) fn cuda_input(t: &Tensor, name: &str, kind: Kind) -> Result<usize> {
    let Device::Cuda(ordinal) = t.device() else {
        return Err(KernelError::Invalid(format!(
            "{name} must be on a CUDA device, is on {:?}",
            t.device()
        )));
    };
    if t.kind() != kind {
        return Err(KernelError::Invalid(format!(
            "{name} must be {kind:?}, is {:?}",
            t.kind()
        )));
    }
    if !t.is_contiguous() {
        return Err(KernelError::Invalid(format!("{name} must be contiguous")));
    }
    Ok(ordinal)
}

pub(crate) fn same_device(ordinals: &[(usize, &str)]) -> Result<usize> {
    let (first, _) = ordinals[0];
    match ordinals.iter().find(|(o, _)| *o != first) {
        Some((o, name)) => Err(KernelError::Invalid(format!(
            "{name} is on cuda:{o}, the other inputs on cuda:{first}"
        ))),
        None => Ok(first),
    }
}

pub(crate) fn expect_numel(t: &Tensor, name: &str, want: usize) -> Result<()> {
    let have = t.numel();
    if have != want {
        return Err(KernelError::Invalid(format!(
            "{name} must have {want} elements, has {have}"
        )));
    }
    Ok(())
}

pub(crate) fn to_i64(v: usize, name: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| KernelError::Invalid(format!("{name} too large")))
}

/// `blocks` blocks of [`THREADS`] threads, for the matrix-vector kernels (which give each output
/// row a block, or a warp); errors when the grid would be too large.
fn gemv_config(blocks: usize) -> Result<LaunchConfig> {
    let blocks = u32::try_from(blocks)
        .ok()
        .filter(|&b| b < i32::MAX as u32)
        .ok_or_else(|| KernelError::Invalid("out_features too large".into()))?;
    Ok(LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// A scalar kernel argument for [`Kernels::launch_on`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Scalar {
    /// A 64-bit integer (`i64` in the kernels).
    I64(i64),
    /// A 32-bit float.
    F32(f32),
}

/// libtorch's current stream on `ordinal`, borrowed (see [`crate::torch_cuda::current_stream`]),
/// so that launches are ordered with torch's work and can be captured into a CUDA graph; the
/// legacy default stream, libtorch's default, where the extension was built without CUDA.
pub(crate) fn current_stream(ctx: &Arc<CudaContext>, ordinal: usize) -> Result<Arc<CudaStream>> {
    if !crate::torch_cuda::built_with_cuda() {
        return Ok(ctx.default_stream());
    }
    let raw = crate::torch_cuda::current_stream(ordinal)?;
    // SAFETY: `raw` is a stream of libtorch's on this device's primary context (the context
    // `ctx` retains), which libtorch keeps alive for the process (pool and default streams are
    // never destroyed); launches on it are ordered with torch's own work by construction.
    Ok(unsafe { ctx.wrap_borrowed_stream(raw.cast()) })
}

pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    let blocks = (n as u64).div_ceil(u64::from(THREADS)).clamp(1, MAX_BLOCKS);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl Kernels {
    /// An empty registry; nothing is loaded until the first launch.
    pub fn new() -> Self {
        Self::default()
    }

    /// The process-wide registry most callers should use.
    pub fn global() -> &'static Kernels {
        static GLOBAL: OnceLock<Kernels> = OnceLock::new();
        GLOBAL.get_or_init(Kernels::new)
    }

    fn context(&self, ordinal: usize) -> Result<Arc<CudaContext>> {
        let mut contexts = lock(&self.contexts);
        if let Some(ctx) = contexts.get(&ordinal) {
            return Ok(ctx.clone());
        }
        let ctx = CudaContext::new(ordinal)?;
        contexts.insert(ordinal, ctx.clone());
        Ok(ctx)
    }

    /// Loads `entry` of `source` on device `ordinal`, compiling the family the first time.
    pub(crate) fn function(
        &self,
        ordinal: usize,
        source: &KernelSource,
        entry: &str,
    ) -> Result<(Arc<CudaContext>, CudaFunction)> {
        let ctx = self.context(ordinal)?;
        let module = {
            let mut modules = lock(&self.modules);
            match modules.get(&(ordinal, source.name)) {
                Some(m) => m.clone(),
                None => {
                    let (major, minor) = ctx.compute_capability()?;
                    let arch = format!("sm_{major}{minor}");
                    let ptx = compile_named(source.source, &arch, source.name)?;
                    let module = ctx.load_module(ptx)?;
                    modules.insert((ordinal, source.name), module.clone());
                    module
                }
            }
        };
        Ok((ctx, module.load_function(entry)?))
    }

    /// Launches `entry` of `source` on `ordinal`'s current stream with grid `cfg`, passing the
    /// device addresses of `tensors` in order, then `scalars` (for kernels whose pointers all
    /// come first).
    ///
    /// # Safety
    /// The arguments must match the kernel's signature, and each tensor must be contiguous and
    /// hold what the kernel reads or writes through it; they stay alive (torch's allocator
    /// orders reuse after the stream's work).
    pub(crate) unsafe fn launch_on(
        &self,
        ordinal: usize,
        source: &KernelSource,
        entry: &str,
        tensors: &[&Tensor],
        scalars: &[Scalar],
        cfg: LaunchConfig,
    ) -> Result<()> {
        let (ctx, func) = self.function(ordinal, source, entry)?;
        let stream = current_stream(&ctx, ordinal)?;
        let ptrs: Vec<u64> = tensors.iter().map(|t| t.data_ptr() as u64).collect();
        let mut launch = stream.launch_builder(&func);
        for p in &ptrs {
            launch.arg(p);
        }
        for s in scalars {
            match s {
                Scalar::I64(v) => launch.arg(v),
                Scalar::F32(v) => launch.arg(v),
            };
        }
        // SAFETY: per this function's contract.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }

    /// Dequantizes packed NF4 (`packed` uint8, two codes per byte, first element in the high
    /// nibble; `absmax` f32, one per block of `block_size` consecutive elements) to an f32
    /// tensor of `shape` on the inputs' device. See [`crate::cpu::dequant_nf4`].
    pub fn dequant_nf4_f32(
        &self,
        packed: &Tensor,
        absmax: &Tensor,
        shape: &[i64],
        block_size: usize,
    ) -> Result<Tensor> {
        check_cuda()?;
        let n = shape_numel(shape)?;
        if block_size == 0 {
            return Err(KernelError::Invalid("block_size must be positive".into()));
        }
        let ordinal = same_device(&[
            (cuda_input(packed, "packed", Kind::Uint8)?, "packed"),
            (cuda_input(absmax, "absmax", Kind::Float)?, "absmax"),
        ])?;
        expect_numel(packed, "packed", n.div_ceil(2))?;
        expect_numel(absmax, "absmax", n.div_ceil(block_size))?;
        let out = Tensor::empty(shape, (Kind::Float, Device::Cuda(ordinal)));
        if n == 0 {
            return Ok(out);
        }
        let (ctx, func) = self.function(ordinal, &QUANT, "dequant_nf4_f32")?;
        let stream = current_stream(&ctx, ordinal)?;
        let (p, a, o) = (
            packed.data_ptr() as u64,
            absmax.data_ptr() as u64,
            out.data_ptr() as u64,
        );
        let (n64, bs) = (to_i64(n, "numel")?, to_i64(block_size, "block_size")?);
        let mut launch = stream.launch_builder(&func);
        launch.arg(&p).arg(&a).arg(&o).arg(&n64).arg(&bs);
        // SAFETY: the argument list matches the kernel's signature (three device pointers, two
        // i64); the sizes of all three buffers were checked above, and `out` is alive (owned by
        // torch's allocator) until the launch, ordered on torch's current stream, completes.
        unsafe { launch.launch(elementwise(n)) }?;
        Ok(out)
    }

    /// `y = W x` for an NF4 weight `W` of shape `(out_features, in_features)` (row-major, packed
    /// as in [`Kernels::dequant_nf4_f32`]) and an f32 vector `x` of `in_features` elements;
    /// returns `y` of shape `(out_features,)`. See [`crate::cpu::gemv_nf4`].
    pub fn gemv_nf4_f32(
        &self,
        packed: &Tensor,
        absmax: &Tensor,
        x: &Tensor,
        out_features: usize,
        block_size: usize,
    ) -> Result<Tensor> {
        check_cuda()?;
        if block_size == 0 {
            return Err(KernelError::Invalid("block_size must be positive".into()));
        }
        let ordinal = same_device(&[
            (cuda_input(packed, "packed", Kind::Uint8)?, "packed"),
            (cuda_input(absmax, "absmax", Kind::Float)?, "absmax"),
            (cuda_input(x, "x", Kind::Float)?, "x"),
        ])?;
        let in_features = x.numel();
        let n = out_features
            .checked_mul(in_features)
            .ok_or_else(|| KernelError::Invalid("weight too large".into()))?;
        expect_numel(packed, "packed", n.div_ceil(2))?;
        expect_numel(absmax, "absmax", n.div_ceil(block_size))?;
        let y = Tensor::zeros(
            [to_i64(out_features, "out_features")?],
            (Kind::Float, Device::Cuda(ordinal)),
        );
        if out_features == 0 || in_features == 0 {
            return Ok(y);
        }
        let cfg = gemv_config(out_features)?;
        let (ctx, func) = self.function(ordinal, &QUANT, "gemv_nf4_f32")?;
        let stream = current_stream(&ctx, ordinal)?;
        let (p, a) = (packed.data_ptr() as u64, absmax.data_ptr() as u64);
        let (xp, yp) = (x.data_ptr() as u64, y.data_ptr() as u64);
        let (o64, i64_, bs) = (
            to_i64(out_features, "out_features")?,
            to_i64(in_features, "in_features")?,
            to_i64(block_size, "block_size")?,
        );
        let mut launch = stream.launch_builder(&func);
        launch
            .arg(&p)
            .arg(&a)
            .arg(&xp)
            .arg(&yp)
            .arg(&o64)
            .arg(&i64_)
            .arg(&bs);
        // SAFETY: arguments match the kernel's signature (four device pointers, three i64);
        // buffer sizes were checked above; THREADS is a multiple of 32 as the kernel requires;
        // all memory is torch's and stays alive while the launch runs on torch's current stream.
        unsafe { launch.launch(cfg) }?;
        Ok(y)
    }

    /// Dequantizes a GPTQ int4 weight (AutoGPTQ layout: `qweight` int32 `(in/8, out)`, `qzeros`
    /// int32 `(groups, out/8)`, `scales` f32 `(groups, out)`) to f32 `W` of shape `(out, in)`:
    /// `W[o,i] = scales[g,o] * (q[i,o] - z[g,o])`, `g = i / group_size`.
    /// See [`crate::cpu::dequant_int4_gptq`].
    pub fn dequant_int4_gptq_f32(
        &self,
        qweight: &Tensor,
        qzeros: &Tensor,
        scales: &Tensor,
        group_size: usize,
    ) -> Result<Tensor> {
        check_cuda()?;
        if group_size == 0 {
            return Err(KernelError::Invalid("group_size must be positive".into()));
        }
        let ordinal = same_device(&[
            (cuda_input(qweight, "qweight", Kind::Int)?, "qweight"),
            (cuda_input(qzeros, "qzeros", Kind::Int)?, "qzeros"),
            (cuda_input(scales, "scales", Kind::Float)?, "scales"),
        ])?;
        let [rows, out_features] = qweight.size()[..] else {
            return Err(KernelError::Invalid(
                "qweight must be 2-D (in/8, out)".into(),
            ));
        };
        let (in_features, out_features) = (rows as usize * 8, out_features as usize);
        if out_features % 8 != 0 {
            return Err(KernelError::Invalid(format!(
                "out features ({out_features}) must be a multiple of 8"
            )));
        }
        let groups = in_features.div_ceil(group_size);
        expect_numel(qzeros, "qzeros", groups * out_features / 8)?;
        expect_numel(scales, "scales", groups * out_features)?;
        let shape = [to_i64(out_features, "out")?, to_i64(in_features, "in")?];
        let out = Tensor::empty(shape, (Kind::Float, Device::Cuda(ordinal)));
        let n = in_features * out_features;
        if n == 0 {
            return Ok(out);
        }
        let (ctx, func) = self.function(ordinal, &QUANT, "dequant_int4_gptq_f32")?;
        let stream = current_stream(&ctx, ordinal)?;
        let (qw, qz) = (qweight.data_ptr() as u64, qzeros.data_ptr() as u64);
        let (sc, o) = (scales.data_ptr() as u64, out.data_ptr() as u64);
        let (in64, out64, gs) = (shape[1], shape[0], to_i64(group_size, "group_size")?);
        let mut launch = stream.launch_builder(&func);
        launch
            .arg(&qw)
            .arg(&qz)
            .arg(&sc)
            .arg(&o)
            .arg(&in64)
            .arg(&out64)
            .arg(&gs);
        // SAFETY: arguments match the kernel's signature (four device pointers, three i64);
        // buffer sizes were checked above; all memory is torch's and outlives the launch.
        unsafe { launch.launch(elementwise(n)) }?;
        Ok(out)
    }

    /// Dequantizes packed ternary weights (`packed` uint8, 2-bit codes `w + 1` four per byte,
    /// element `4k+j` in bits `2j..2j+1`) times the per-tensor `scale`, to an f32 tensor of
    /// `shape`. See [`crate::cpu::dequant_ternary`].
    pub fn dequant_ternary_f32(
        &self,
        packed: &Tensor,
        scale: f32,
        shape: &[i64],
    ) -> Result<Tensor> {
        check_cuda()?;
        let n = shape_numel(shape)?;
        let ordinal = cuda_input(packed, "packed", Kind::Uint8)?;
        expect_numel(packed, "packed", n.div_ceil(4))?;
        let out = Tensor::empty(shape, (Kind::Float, Device::Cuda(ordinal)));
        if n == 0 {
            return Ok(out);
        }
        let (ctx, func) = self.function(ordinal, &QUANT, "dequant_ternary_f32")?;
        let stream = current_stream(&ctx, ordinal)?;
        let (p, o, n64) = (
            packed.data_ptr() as u64,
            out.data_ptr() as u64,
            to_i64(n, "numel")?,
        );
        let mut launch = stream.launch_builder(&func);
        launch.arg(&p).arg(&scale).arg(&o).arg(&n64);
        // SAFETY: arguments match the kernel's signature (pointer, f32, pointer, i64); sizes were
        // checked above; all memory is torch's and outlives the launch.
        unsafe { launch.launch(elementwise(n)) }?;
        Ok(out)
    }

    /// `y = W x` for a GPTQ int4 weight `W` of shape `(out, in)` in the layout of
    /// [`Kernels::dequant_int4_gptq_f32`] (`qweight` int32 `(in/8, out)`, `qzeros` int32
    /// `(groups, out/8)`, `scales` f32 `(groups, out)`, `g = i / group_size`) and an f32 vector
    /// `x` of `in` elements, without materializing `W`; returns `y` of shape `(out,)`.
    /// See [`crate::cpu::gemv_int4_gptq`].
    pub fn gemv_int4_gptq_f32(
        &self,
        qweight: &Tensor,
        qzeros: &Tensor,
        scales: &Tensor,
        x: &Tensor,
        group_size: usize,
    ) -> Result<Tensor> {
        check_cuda()?;
        if group_size == 0 {
            return Err(KernelError::Invalid("group_size must be positive".into()));
        }
        let ordinal = same_device(&[
            (cuda_input(qweight, "qweight", Kind::Int)?, "qweight"),
            (cuda_input(qzeros, "qzeros", Kind::Int)?, "qzeros"),
            (cuda_input(scales, "scales", Kind::Float)?, "scales"),
            (cuda_input(x, "x", Kind::Float)?, "x"),
        ])?;
        let [rows, out_features] = qweight.size()[..] else {
            return Err(KernelError::Invalid(
                "qweight must be 2-D (in/8, out)".into(),
            ));
        };
        let (in_features, out_features) = (rows as usize * 8, out_features as usize);
        if out_features % 8 != 0 {
            return Err(KernelError::Invalid(format!(
                "out features ({out_features}) must be a multiple of 8"
            )));
        }
        expect_numel(x, "x", in_features)?;
        let groups = in_features.div_ceil(group_size);
        expect_numel(qzeros, "qzeros", groups * out_features / 8)?;
        expect_numel(scales, "scales", groups * out_features)?;
        let y = Tensor::zeros(
            [to_i64(out_features, "out_features")?],
            (Kind::Float, Device::Cuda(ordinal)),
        );
        if out_features == 0 || in_features == 0 {
            return Ok(y);
        }
        // One warp per output, THREADS / 32 outputs per block.
        let cfg = gemv_config(out_features.div_ceil((THREADS / 32) as usize))?;
        let (ctx, func) = self.function(ordinal, &QUANT, "gemv_int4_gptq_f32")?;
        let stream = current_stream(&ctx, ordinal)?;
        let (qw, qz) = (qweight.data_ptr() as u64, qzeros.data_ptr() as u64);
        let (sc, xp, yp) = (
            scales.data_ptr() as u64,
            x.data_ptr() as u64,
            y.data_ptr() as u64,
        );
        let (in64, out64, gs) = (
            to_i64(in_features, "in_features")?,
            to_i64(out_features, "out_features")?,
            to_i64(group_size, "group_size")?,
        );
        let mut launch = stream.launch_builder(&func);
        launch
            .arg(&qw)
            .arg(&qz)
            .arg(&sc)
            .arg(&xp)
            .arg(&yp)
            .arg(&in64)
            .arg(&out64)
            .arg(&gs);
        // SAFETY: arguments match the kernel's signature (five device pointers, three i64);
        // buffer sizes were checked above; THREADS is a multiple of 32 and the grid covers every
        // output at one warp each, as the kernel requires; all memory is torch's and stays alive
        // while the launch runs on torch's current stream.
        unsafe { launch.launch(cfg) }?;
        Ok(y)
    }

    /// `y = scale * C x` for a ternary weight of shape `(out_features, in_features)` (row-major,
    /// packed as in [`Kernels::dequant_ternary_f32`]: 2-bit codes `c + 1` four per byte) and an
    /// f32 vector `x` of `in_features` elements; returns `y` of shape `(out_features,)`.
    /// See [`crate::cpu::gemv_ternary`].
    pub fn gemv_ternary_f32(
        &self,
        packed: &Tensor,
        scale: f32,
        x: &Tensor,
        out_features: usize,
    ) -> Result<Tensor> {
        check_cuda()?;
        let ordinal = same_device(&[
            (cuda_input(packed, "packed", Kind::Uint8)?, "packed"),
            (cuda_input(x, "x", Kind::Float)?, "x"),
        ])?;
        let in_features = x.numel();
        let n = out_features
            .checked_mul(in_features)
            .ok_or_else(|| KernelError::Invalid("weight too large".into()))?;
        expect_numel(packed, "packed", n.div_ceil(4))?;
        let y = Tensor::zeros(
            [to_i64(out_features, "out_features")?],
            (Kind::Float, Device::Cuda(ordinal)),
        );
        if out_features == 0 || in_features == 0 {
            return Ok(y);
        }
        let cfg = gemv_config(out_features)?;
        let (ctx, func) = self.function(ordinal, &QUANT, "gemv_ternary_f32")?;
        let stream = current_stream(&ctx, ordinal)?;
        let (p, xp, yp) = (
            packed.data_ptr() as u64,
            x.data_ptr() as u64,
            y.data_ptr() as u64,
        );
        let (o64, i64_) = (
            to_i64(out_features, "out_features")?,
            to_i64(in_features, "in_features")?,
        );
        let mut launch = stream.launch_builder(&func);
        launch
            .arg(&p)
            .arg(&scale)
            .arg(&xp)
            .arg(&yp)
            .arg(&o64)
            .arg(&i64_);
        // SAFETY: arguments match the kernel's signature (pointer, f32, two pointers, two i64);
        // buffer sizes were checked above; THREADS is a multiple of 32 as the kernel requires;
        // all memory is torch's and stays alive while the launch runs on torch's current stream.
        unsafe { launch.launch(cfg) }?;
        Ok(y)
    }
}

fn shape_numel(shape: &[i64]) -> Result<usize> {
    shape.iter().try_fold(1usize, |acc, &d| {
        usize::try_from(d)
            .ok()
            .and_then(|d| acc.checked_mul(d))
            .ok_or_else(|| KernelError::Invalid(format!("bad shape {shape:?}")))
    })
}
