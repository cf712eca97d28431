//! Collectives for data-parallel training, behind one trait ([`Collective`]) so that the trainer
//! is written once for one process and for many:
//! - [`Single`]: one process; every collective is the identity.
//! - `Mpi` (cargo feature `mpi`): the processes of an `mpirun` (Open MPI or MPICH), over the
//!   MPI library's own transports (shared memory on one machine, TCP or InfiniBand across).
//! - [`Nccl`]: one process per GPU over NCCL, found at run time (the torch wheel's, which a CUDA
//!   libtorch has loaded); it also reduces GPU memory in place ([`DeviceCollective`]).
//!
//! Every collective that waits on other ranks has a deadline ([`Collective::timeout`]): a rank
//! that died or stalled makes the others stop with an error naming the operation, instead of
//! hanging. Each backend counts the payload bytes it reduced or broadcast, so that benchmarks can
//! report the traffic of full against projected gradients.
//!
//! [`from_env`] picks the backend from the launcher's environment (`OMPI_COMM_WORLD_SIZE`,
//! `PMI_SIZE`): more than one process without the `mpi` feature is an error that says so.

#[cfg(feature = "mpi")]
mod mpi_backend;

#[cfg(feature = "mpi")]
pub use mpi_backend::Mpi;

mod nccl_backend;
pub use nccl_backend::Nccl;

use std::path::Path;
use std::time::Duration;

/// What a collective can fail with.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// Another rank did not join within the deadline (it died, stalled or diverged).
    #[error(
        "rank {rank} of {size}: {op} did not complete within {} s (another rank stopped or \
         stalled)",
        timeout.as_secs_f64()
    )]
    Timeout {
        /// This rank.
        rank: usize,
        /// Number of ranks.
        size: usize,
        /// The operation, with its size.
        op: String,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// The launcher's environment asks for something this build or machine cannot do.
    #[error("{0}")]
    Setup(String),
}

/// Result of a collective.
pub type Result<T> = std::result::Result<T, DistError>;

/// Collective operations over the ranks of one job. Every rank must call the same operations in
/// the same order with buffers of the same length.
pub trait Collective {
    /// This process's rank, 0..size.
    fn rank(&self) -> usize;

    /// Number of processes.
    fn size(&self) -> usize;

    /// Replaces `buf` on every rank by its element-wise sum over the ranks.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()>;

    /// Replaces `buf` on every rank by rank `root`'s.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()>;

    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()>;

    /// How long an operation waits for the other ranks before it fails.
    fn timeout(&self) -> Duration;

    /// Payload bytes this rank has passed to all-reduces so far (4 per f32 element; what the
    /// transport moves is a multiple of it that depends on the algorithm).
    fn bytes_reduced(&self) -> u64;

    /// Payload bytes this rank has passed to broadcasts so far.
    fn bytes_broadcast(&self) -> u64;

    /// Starts the all-reduce (sum) of `buf` and returns without waiting for it where the
    /// backend can (MPI's `MPI_Iallreduce`), so that the caller computes meanwhile;
    /// [`Collective::progress`] advances started operations and
    /// [`Collective::finish_all_reduce`] waits for one and gives its buffer back. Every rank
    /// must start the same operations in the same order. The default reduces at once.
    fn start_all_reduce_sum(&mut self, mut buf: Vec<f32>) -> Result<InFlight> {
        self.all_reduce_sum(&mut buf)?;
        Ok(InFlight::done(buf))
    }

    /// Lets started operations advance (MPI progresses them only inside its calls).
    fn progress(&mut self, _started: &mut [InFlight]) -> Result<()> {
        Ok(())
    }

    /// Waits (within the deadline) for `op`, started by [`Collective::start_all_reduce_sum`] of
    /// this backend, and returns its reduced buffer.
    fn finish_all_reduce(&mut self, op: InFlight) -> Result<Vec<f32>> {
        op.into_done()
    }

    /// The in-place collectives on GPU memory, for backends that have them (NCCL); None where
    /// the backend works on host memory only.
    fn device_collective(&mut self) -> Option<&mut dyn DeviceCollective> {
        None
    }

    /// Whether this rank writes the run's files (rank 0).
    fn is_main(&self) -> bool {
        self.rank() == 0
    }

    /// Replaces `buf` by its mean over the ranks.
    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce_sum(buf)?;
        let n = self.size() as f32;
        if n > 1.0 {
            for v in buf.iter_mut() {
                *v /= n;
            }
        }
        Ok(())
    }
}

/// An all-reduce started by [`Collective::start_all_reduce_sum`]: finished already, or the
/// backend's operation in flight.
pub struct InFlight {
    done: Option<Vec<f32>>,
    op: Option<Box<dyn std::any::Any>>,
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight")
            .field("done", &self.done.as_ref().map(Vec::len))
            .field("in_flight", &self.op.is_some())
            .finish()
    }
}

impl InFlight {
    /// An operation that has completed with `buf`.
    pub fn done(buf: Vec<f32>) -> Self {
        Self {
            done: Some(buf),
            op: None,
        }
    }

    /// A backend's operation in flight (the backend downcasts it back).
    pub fn pending(op: Box<dyn std::any::Any>) -> Self {
        Self {
            done: None,
            op: Some(op),
        }
    }

    /// The backend's operation, if still in flight.
    pub fn op_mut(&mut self) -> Option<&mut Box<dyn std::any::Any>> {
        self.op.as_mut()
    }

    /// Takes the backend's operation out (None once completed).
    pub fn take_op(&mut self) -> Option<Box<dyn std::any::Any>> {
        self.op.take()
    }

    /// The completed buffer; an error for an operation still in flight (another backend's).
    pub fn into_done(self) -> Result<Vec<f32>> {
        self.done.ok_or_else(|| {
            DistError::Setup("an all-reduce in flight was finished by another backend".into())
        })
    }
}

/// Collectives on GPU memory, queued on a CUDA stream and waited for (with the deadline of
/// [`Collective::timeout`]). Every rank must call the same operations in the same order.
pub trait DeviceCollective {
    /// The CUDA device (ordinal) of this rank's buffers.
    fn device(&self) -> usize;

    /// Replaces the `len` f32 values at device address `ptr` by their sum over the ranks,
    /// queued on `stream` (a `cudaStream_t`, e.g. libtorch's current stream) after the work
    /// already there.
    ///
    /// # Safety
    /// `ptr` addresses `len` f32 values on [`DeviceCollective::device`], which stay allocated
    /// until the call returns; `stream` is a live stream of that device.
    unsafe fn all_reduce_sum_device(
        &mut self,
        ptr: u64,
        len: usize,
        stream: *mut std::ffi::c_void,
    ) -> Result<()>;

    /// Replaces the `len` f32 values at `ptr` by rank `root`'s, on `stream`.
    ///
    /// # Safety
    /// As for [`DeviceCollective::all_reduce_sum_device`].
    unsafe fn broadcast_device(
        &mut self,
        ptr: u64,
        len: usize,
        root: usize,
        stream: *mut std::ffi::c_void,
    ) -> Result<()>;
}

/// One process: every collective leaves its buffer as it is.
#[derive(Debug, Default, Clone)]
pub struct Single {
    reduced: u64,
    broadcast: u64,
}

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        self.reduced += 4 * buf.len() as u64;
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut [f32], _root: usize) -> Result<()> {
        self.broadcast += 4 * buf.len() as u64;
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }

    fn timeout(&self) -> Duration {
        Duration::MAX
    }

    fn bytes_reduced(&self) -> u64 {
        self.reduced
    }

    fn bytes_broadcast(&self) -> u64 {
        self.broadcast
    }
}

/// The number of processes and this one's rank as the launcher set them (Open MPI's
/// `OMPI_COMM_WORLD_SIZE` / `_RANK`, else PMI's `PMI_SIZE` / `PMI_RANK` of MPICH and Slurm, else
/// `WORLD_SIZE` / `RANK` of torchrun); None outside a launcher.
pub fn launcher_world() -> Option<(usize, usize)> {
    let get = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
    };
    for (size, rank) in [
        ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
        ("PMI_SIZE", "PMI_RANK"),
        // torchrun and other launchers of one process per GPU (NCCL backend only).
        ("WORLD_SIZE", "RANK"),
    ] {
        if let (Some(s), Some(r)) = (get(size), get(rank)) {
            return Some((s, r));
        }
    }
    None
}

/// This process's rank among the processes of its machine, as the launcher set it (Open MPI,
/// MPICH, Slurm, torchrun); 0 outside a launcher. Each rank of the NCCL backend takes the GPU of
/// this ordinal.
pub fn local_rank() -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
        "LOCAL_RANK",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
    .unwrap_or(0)
}

/// Which library carries a job's collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// MPI for several processes, one process alone otherwise ([`from_env`]).
    Mpi,
    /// NCCL, one GPU per process (also for a single process, which then runs NCCL's path).
    Nccl,
}

/// The collectives of this process for `backend`: [`from_env`] for MPI; for NCCL, the
/// launcher's world ([`launcher_world`], one process outside a launcher) on the GPU of
/// [`local_rank`], meeting through a file in `rendezvous_dir`.
pub fn connect(
    backend: Backend,
    timeout: Duration,
    rendezvous_dir: &Path,
) -> Result<Box<dyn Collective>> {
    match backend {
        Backend::Mpi => from_env(timeout),
        Backend::Nccl => {
            let (size, rank) = launcher_world().unwrap_or((1, 0));
            Ok(Box::new(Nccl::init(
                rank,
                size,
                local_rank(),
                rendezvous_dir,
                timeout,
            )?))
        }
    }
}

/// Whether this build has the MPI backend.
pub const HAS_MPI: bool = cfg!(feature = "mpi");

/// The collectives of this process: MPI's when a launcher started more than one process (the
/// `mpi` feature), else [`Single`]. `timeout` bounds every wait on other ranks.
pub fn from_env(timeout: Duration) -> Result<Box<dyn Collective>> {
    match launcher_world() {
        Some((size, _)) if size > 1 => {
            #[cfg(feature = "mpi")]
            {
                Ok(Box::new(Mpi::init(timeout)?))
            }
            #[cfg(not(feature = "mpi"))]
            {
                let _ = timeout;
                Err(DistError::Setup(format!(
                    "started as one of {size} processes, but this frugal was built without MPI: \
                     build it with `--features mpi` (Open MPI's libopenmpi-dev and libclang \
                     needed)"
                )))
            }
        }
        _ => Ok(Box::new(Single::default())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guarantee: one process leaves buffers as they are, counts their bytes, and is rank 0 of 1.
    #[test]
    fn single_is_the_identity() {
        let mut c = Single::default();
        let mut v = vec![1.0f32, -2.0, 3.5];
        c.all_reduce_sum(&mut v).unwrap();
        c.all_reduce_mean(&mut v).unwrap();
        c.broadcast(&mut v, 0).unwrap();
        c.barrier().unwrap();
        assert_eq!(v, vec![1.0, -2.0, 3.5]);
        assert_eq!((c.rank(), c.size(), c.is_main()), (0, 1, true));
        assert_eq!((c.bytes_reduced(), c.bytes_broadcast()), (24, 12));
        let mut started = vec![c.start_all_reduce_sum(vec![4.0, 5.0]).unwrap()];
        c.progress(&mut started).unwrap();
        let op = started.pop().unwrap();
        assert_eq!(c.finish_all_reduce(op).unwrap(), vec![4.0, 5.0]);
    }

    /// Guarantee: the NCCL backend either runs (one rank: collectives are the identity, on host
    /// and via its device path) or says what is missing, without panicking, on any machine.
    #[test]
    fn nccl_runs_or_says_what_is_missing() {
        let dir = std::env::temp_dir().join(format!("frugal-nccl-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        match Nccl::init(0, 1, 0, &dir, Duration::from_secs(30)) {
            Ok(mut c) => {
                let mut v = vec![1.5f32, -2.0];
                c.all_reduce_sum(&mut v).unwrap();
                c.broadcast(&mut v, 0).unwrap();
                assert_eq!(v, vec![1.5, -2.0]);
                assert!(c.device_collective().is_some());
                assert!(!id_left(&dir), "rendezvous file removed");
            }
            Err(DistError::Setup(msg)) => {
                assert!(
                    msg.contains("NCCL backend") || msg.contains("CUDA"),
                    "{msg}"
                );
            }
            Err(e) => panic!("unexpected: {e}"),
        }
        assert!(
            Nccl::init(2, 2, 0, &dir, Duration::from_secs(1)).is_err(),
            "rank 2 of 2"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Whether a rendezvous file is left in `dir`.
    fn id_left(dir: &Path) -> bool {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(".nccl-id"))
            })
            .unwrap_or(false)
    }
}
