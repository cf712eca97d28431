//! The NCCL backend: one process per GPU, the GPUs' own collectives (NVLink, PCIe, InfiniBand).
//!
//! NCCL and the CUDA runtime are not linked at build time. Their functions are looked up when
//! [`Nccl::init`] runs: first among the libraries already loaded (a program that links libtorch
//! with CUDA has loaded the torch wheel's `libnccl.so.2` and `libcudart`, so Frugal uses the
//! same NCCL as libtorch), then by opening `libnccl.so.2` and `libcudart.so`. Without them, or
//! without a GPU, `init` returns an error that says what is missing. The crate builds on any
//! machine.
//!
//! Ranks meet through a file in a folder every rank can read (the run folder): rank 0 writes
//! NCCL's unique id there, the others wait for it, and rank 0 removes it once the communicator
//! exists.
//!
//! **Timeouts:** every collective is queued on a CUDA stream, then polled until it completes or
//! the deadline passes. Past the deadline the communicator is aborted (`ncclCommAbort`) and the
//! call returns [`DistError::Timeout`]. Creating the communicator waits for every rank too,
//! with the same deadline.
//!
//! **Host buffers** (the [`Collective`] interface) go through a device buffer of this backend.
//! Device memory goes through [`DeviceCollective`] on the caller's stream, without copies.

use crate::{Collective, DeviceCollective, DistError, Result};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; 128],
}

type Comm = *mut c_void;
type Stream = *mut c_void;

const NCCL_FLOAT32: c_int = 7;
const NCCL_SUM: c_int = 0;
const CUDA_SUCCESS: c_int = 0;
const CUDA_NOT_READY: c_int = 600;
const MEMCPY_H2D: c_int = 1;
const MEMCPY_D2H: c_int = 2;
const STREAM_NON_BLOCKING: u32 = 1;

/// The NCCL and CUDA runtime functions this backend calls.
struct Api {
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> c_int,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        Stream,
    ) -> c_int,
    broadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        Stream,
    ) -> c_int,
    comm_abort: unsafe extern "C" fn(Comm) -> c_int,
    comm_destroy: unsafe extern "C" fn(Comm) -> c_int,
    comm_async_error: unsafe extern "C" fn(Comm, *mut c_int) -> c_int,
    error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    set_device: unsafe extern "C" fn(c_int) -> c_int,
    get_device_count: unsafe extern "C" fn(*mut c_int) -> c_int,
    stream_create: unsafe extern "C" fn(*mut Stream, u32) -> c_int,
    stream_query: unsafe extern "C" fn(Stream) -> c_int,
    malloc: unsafe extern "C" fn(*mut *mut c_void, usize) -> c_int,
    free: unsafe extern "C" fn(*mut c_void) -> c_int,
    memcpy_async: unsafe extern "C" fn(*mut c_void, *const c_void, usize, c_int, Stream) -> c_int,
}

/// `name` from the libraries already loaded, else from the first of `libraries` that opens.
fn symbol(name: &str, libraries: &[&str]) -> Option<*mut c_void> {
    let cname = CString::new(name).ok()?;
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name has no other precondition.
    let found = unsafe { libc::dlsym(libc::RTLD_DEFAULT, cname.as_ptr()) };
    if !found.is_null() {
        return Some(found);
    }
    for lib in libraries {
        let clib = CString::new(*lib).ok()?;
        // SAFETY: dlopen of a library name; the handle is kept for the process (never closed).
        let handle = unsafe { libc::dlopen(clib.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if !handle.is_null() {
            // SAFETY: as above, on a live handle.
            let found = unsafe { libc::dlsym(handle, cname.as_ptr()) };
            if !found.is_null() {
                return Some(found);
            }
        }
    }
    None
}

/// The function pointer of type `F` at `ptr`.
///
/// # Safety
/// `F` is a function pointer type whose signature is that of the function at `ptr`.
unsafe fn as_fn<F: Copy>(ptr: *mut c_void) -> F {
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: same size (checked), and per the contract a valid value of `F`.
    unsafe { std::mem::transmute_copy::<*mut c_void, F>(&ptr) }
}

impl Api {
    fn load() -> Result<Self> {
        const NCCL: &[&str] = &["libnccl.so.2", "libnccl.so"];
        const CUDART: &[&str] = &["libcudart.so.13", "libcudart.so.12", "libcudart.so"];
        let missing = |name: &str, libs: &[&str]| {
            DistError::Setup(format!(
                "NCCL backend: {name} was not found among the loaded libraries nor in {libs:?} \
                 (a CUDA build of libtorch brings NCCL and the CUDA runtime; or add their folder \
                 to LD_LIBRARY_PATH)"
            ))
        };
        macro_rules! load {
            ($name:literal, $libs:expr) => {{
                let ptr = symbol($name, $libs).ok_or_else(|| missing($name, $libs))?;
                // SAFETY: the symbol is the C function of that name, whose signature is the
                // field's (NCCL 2.x and CUDA runtime 12/13 APIs).
                unsafe { as_fn(ptr) }
            }};
        }
        Ok(Self {
            get_unique_id: load!("ncclGetUniqueId", NCCL),
            comm_init_rank: load!("ncclCommInitRank", NCCL),
            all_reduce: load!("ncclAllReduce", NCCL),
            broadcast: load!("ncclBroadcast", NCCL),
            comm_abort: load!("ncclCommAbort", NCCL),
            comm_destroy: load!("ncclCommDestroy", NCCL),
            comm_async_error: load!("ncclCommGetAsyncError", NCCL),
            error_string: load!("ncclGetErrorString", NCCL),
            set_device: load!("cudaSetDevice", CUDART),
            get_device_count: load!("cudaGetDeviceCount", CUDART),
            stream_create: load!("cudaStreamCreateWithFlags", CUDART),
            stream_query: load!("cudaStreamQuery", CUDART),
            malloc: load!("cudaMalloc", CUDART),
            free: load!("cudaFree", CUDART),
            memcpy_async: load!("cudaMemcpyAsync", CUDART),
        })
    }

    fn nccl(&self, what: &str, code: c_int) -> Result<()> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
        let text = unsafe { CStr::from_ptr((self.error_string)(code)) }.to_string_lossy();
        Err(DistError::Setup(format!(
            "NCCL {what} failed: {text} (code {code})"
        )))
    }

    fn cuda(what: &str, code: c_int) -> Result<()> {
        if code == CUDA_SUCCESS {
            Ok(())
        } else {
            Err(DistError::Setup(format!(
                "CUDA {what} failed (cudaError {code})"
            )))
        }
    }
}

/// The ranks of a job on one GPU each, over NCCL.
pub struct Nccl {
    api: Api,
    comm: Comm,
    stream: Stream,
    device: usize,
    scratch: *mut c_void,
    scratch_len: usize,
    rank: usize,
    size: usize,
    timeout: Duration,
    reduced: u64,
    broadcast: u64,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("device", &self.device)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The rendezvous file of this job in `dir`: named by the launcher's job id where there is one,
/// so that a file left by another job is not read.
fn id_file(dir: &Path) -> PathBuf {
    let job = [
        "SLURM_JOB_ID",
        "PMIX_NAMESPACE",
        "OMPI_MCA_ess_base_jobid",
        "TORCHELASTIC_RUN_ID",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok())
    .unwrap_or_else(|| "job".into());
    let clean: String = job
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    dir.join(format!(".nccl-id-{clean}"))
}

impl Nccl {
    /// Rank `rank` of `size`, on CUDA device `device`; ranks meet through a file in
    /// `rendezvous_dir` (every rank's view of the same folder). Every wait on other ranks, the
    /// communicator's creation included, ends after `timeout`.
    pub fn init(
        rank: usize,
        size: usize,
        device: usize,
        rendezvous_dir: &Path,
        timeout: Duration,
    ) -> Result<Self> {
        if rank >= size {
            return Err(DistError::Setup(format!("rank {rank} of {size} processes")));
        }
        let api = Api::load()?;
        let mut count = 0;
        // SAFETY: a valid out-pointer.
        Api::cuda("cudaGetDeviceCount", unsafe {
            (api.get_device_count)(&mut count)
        })
        .map_err(|e| DistError::Setup(format!("NCCL backend: no usable GPU ({e})")))?;
        if device >= count as usize {
            return Err(DistError::Setup(format!(
                "NCCL backend: rank {rank} wants cuda:{device}, but this machine has {count} GPUs"
            )));
        }
        // SAFETY: a device index below the count.
        Api::cuda("cudaSetDevice", unsafe {
            (api.set_device)(device as c_int)
        })?;
        let path = id_file(rendezvous_dir);
        let id = if rank == 0 {
            let mut id = UniqueId { internal: [0; 128] };
            // SAFETY: a valid out-pointer.
            api.nccl("ncclGetUniqueId", unsafe { (api.get_unique_id)(&mut id) })?;
            let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, &bytes)
                .and_then(|()| std::fs::rename(&tmp, &path))
                .map_err(|e| {
                    DistError::Setup(format!(
                        "NCCL backend: cannot write {}: {e}",
                        path.display()
                    ))
                })?;
            id
        } else {
            let deadline = Instant::now() + timeout;
            loop {
                match std::fs::read(&path) {
                    Ok(bytes) if bytes.len() == 128 => {
                        let mut id = UniqueId { internal: [0; 128] };
                        for (d, s) in id.internal.iter_mut().zip(&bytes) {
                            *d = *s as c_char;
                        }
                        break id;
                    }
                    _ if Instant::now() > deadline => {
                        return Err(DistError::Timeout {
                            rank,
                            size,
                            op: format!("waiting for rank 0's NCCL id in {}", path.display()),
                            timeout,
                        })
                    }
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        };
        let comm = init_comm(&api, id, rank, size, device, timeout)?;
        if rank == 0 {
            let _ = std::fs::remove_file(&path);
        }
        let mut stream = std::ptr::null_mut();
        // SAFETY: a valid out-pointer; the stream lives as long as the process.
        Api::cuda("cudaStreamCreateWithFlags", unsafe {
            (api.stream_create)(&mut stream, STREAM_NON_BLOCKING)
        })?;
        Ok(Self {
            api,
            comm,
            stream,
            device,
            scratch: std::ptr::null_mut(),
            scratch_len: 0,
            rank,
            size,
            timeout,
            reduced: 0,
            broadcast: 0,
        })
    }

    /// The CUDA device of this rank.
    pub fn device(&self) -> usize {
        self.device
    }

    /// Polls `stream` until its work is done; past the deadline, aborts the communicator.
    fn wait(&mut self, stream: Stream, op: &str) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        loop {
            // SAFETY: a stream of this process.
            match unsafe { (self.api.stream_query)(stream) } {
                CUDA_SUCCESS => return Ok(()),
                CUDA_NOT_READY => {}
                code => return Api::cuda(op, code),
            }
            let mut async_err = 0;
            // SAFETY: a live communicator and a valid out-pointer.
            self.api.nccl("ncclCommGetAsyncError", unsafe {
                (self.api.comm_async_error)(self.comm, &mut async_err)
            })?;
            self.api.nccl(op, async_err)?;
            if Instant::now() > deadline {
                // SAFETY: a live communicator; it is not used again (destroy skips it).
                unsafe { (self.api.comm_abort)(self.comm) };
                self.comm = std::ptr::null_mut();
                return Err(DistError::Timeout {
                    rank: self.rank,
                    size: self.size,
                    op: op.to_string(),
                    timeout: self.timeout,
                });
            }
            std::thread::yield_now();
        }
    }

    fn live(&self) -> Result<Comm> {
        if self.comm.is_null() {
            return Err(DistError::Setup(
                "the NCCL communicator was aborted after a timeout".into(),
            ));
        }
        Ok(self.comm)
    }

    /// A device buffer of at least `len` f32 for host collectives.
    fn scratch(&mut self, len: usize) -> Result<*mut c_void> {
        if self.scratch_len < len {
            if !self.scratch.is_null() {
                // SAFETY: our allocation; no work on it is pending (every use waits).
                unsafe { (self.api.free)(self.scratch) };
                self.scratch = std::ptr::null_mut();
                self.scratch_len = 0;
            }
            let mut ptr = std::ptr::null_mut();
            // SAFETY: a valid out-pointer.
            Api::cuda("cudaMalloc", unsafe {
                (self.api.malloc)(&mut ptr, 4 * len)
            })?;
            self.scratch = ptr;
            self.scratch_len = len;
        }
        Ok(self.scratch)
    }

    /// A host collective through the scratch buffer: copy in, `op` on the device, copy out.
    fn through_device(
        &mut self,
        buf: &mut [f32],
        what: &str,
        op: impl FnOnce(&Api, *mut c_void, Comm, Stream) -> c_int,
    ) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let comm = self.live()?;
        let dev = self.scratch(buf.len())?;
        let bytes = 4 * buf.len();
        let stream = self.stream;
        // SAFETY: `dev` holds `bytes`; `buf` stays borrowed until the stream is drained below.
        unsafe {
            Api::cuda(
                "cudaMemcpyAsync",
                (self.api.memcpy_async)(dev, buf.as_ptr().cast(), bytes, MEMCPY_H2D, stream),
            )?;
        }
        self.api.nccl(what, op(&self.api, dev, comm, stream))?;
        // SAFETY: as above.
        unsafe {
            Api::cuda(
                "cudaMemcpyAsync",
                (self.api.memcpy_async)(buf.as_mut_ptr().cast(), dev, bytes, MEMCPY_D2H, stream),
            )?;
        }
        self.wait(stream, &format!("{what} of {} f32 values", buf.len()))
    }
}

fn init_comm(
    api: &Api,
    id: UniqueId,
    rank: usize,
    size: usize,
    device: usize,
    timeout: Duration,
) -> Result<Comm> {
    // ncclCommInitRank blocks until every rank has called it: run it on a thread and give up
    // after the deadline (the thread stays blocked; the process is about to fail anyway).
    let (tx, rx) = std::sync::mpsc::channel();
    let (init, set_device) = (api.comm_init_rank, api.set_device);
    std::thread::spawn(move || {
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: the same device as the caller's; a valid out-pointer and id.
        let code = unsafe {
            set_device(device as c_int);
            init(&mut comm, size as c_int, id, rank as c_int)
        };
        let _ = tx.send((code, comm as usize));
    });
    match rx.recv_timeout(timeout) {
        Ok((code, comm)) => {
            api.nccl("ncclCommInitRank", code)?;
            Ok(comm as Comm)
        }
        Err(_) => Err(DistError::Timeout {
            rank,
            size,
            op: "creating the NCCL communicator (waiting for every rank)".into(),
            timeout,
        }),
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: our own allocation and communicator, released once.
        unsafe {
            if !self.scratch.is_null() {
                (self.api.free)(self.scratch);
            }
            if !self.comm.is_null() {
                (self.api.comm_destroy)(self.comm);
            }
        }
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        self.reduced += 4 * buf.len() as u64;
        let n = buf.len();
        self.through_device(buf, "all-reduce", |api, dev, comm, stream| {
            // SAFETY: `dev` holds `n` f32 values, in place.
            unsafe { (api.all_reduce)(dev, dev, n, NCCL_FLOAT32, NCCL_SUM, comm, stream) }
        })
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        self.broadcast += 4 * buf.len() as u64;
        let n = buf.len();
        self.through_device(buf, "broadcast", |api, dev, comm, stream| {
            // SAFETY: `dev` holds `n` f32 values, in place.
            unsafe { (api.broadcast)(dev, dev, n, NCCL_FLOAT32, root as c_int, comm, stream) }
        })
    }

    fn barrier(&mut self) -> Result<()> {
        let mut one = [0f32];
        self.all_reduce_sum(&mut one)
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn bytes_reduced(&self) -> u64 {
        self.reduced
    }

    fn bytes_broadcast(&self) -> u64 {
        self.broadcast
    }

    fn device_collective(&mut self) -> Option<&mut dyn DeviceCollective> {
        Some(self)
    }
}

impl DeviceCollective for Nccl {
    fn device(&self) -> usize {
        self.device
    }

    unsafe fn all_reduce_sum_device(
        &mut self,
        ptr: u64,
        len: usize,
        stream: *mut c_void,
    ) -> Result<()> {
        self.reduced += 4 * len as u64;
        let comm = self.live()?;
        let p = ptr as *mut c_void;
        // SAFETY: per the trait's contract, `ptr` holds `len` f32 values on this rank's device,
        // alive until the stream has run the operation.
        let code =
            unsafe { (self.api.all_reduce)(p, p, len, NCCL_FLOAT32, NCCL_SUM, comm, stream) };
        self.api.nccl("all-reduce", code)?;
        self.wait(
            stream,
            &format!("all-reduce of {len} f32 values on the GPU"),
        )
    }

    unsafe fn broadcast_device(
        &mut self,
        ptr: u64,
        len: usize,
        root: usize,
        stream: *mut c_void,
    ) -> Result<()> {
        self.broadcast += 4 * len as u64;
        let comm = self.live()?;
        let p = ptr as *mut c_void;
        // SAFETY: as in `all_reduce_sum_device`.
        let code =
            unsafe { (self.api.broadcast)(p, p, len, NCCL_FLOAT32, root as c_int, comm, stream) };
        self.api.nccl("broadcast", code)?;
        self.wait(stream, &format!("broadcast of {len} f32 values on the GPU"))
    }
}
