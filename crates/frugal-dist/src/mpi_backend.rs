//! The MPI backend: the processes of an `mpirun`, through the `mpi` crate (rsmpi).
//!
//! Collectives are started non-blocking (`MPI_Iallreduce`, `MPI_Ibcast`, `MPI_Ibarrier`) and
//! polled until they complete or the deadline passes. MPI cannot cancel a started collective
//! nor release the buffers it was given, so a timeout ends the job: the rank says which
//! operation timed out and calls `MPI_Abort`, which makes the launcher stop every rank. The
//! trainer writes its files through a temporary file and a rename, so the last checkpoint
//! stays intact.

use crate::{Collective, DistError, InFlight, Result};
use mpi::collective::SystemOperation;
use mpi::request::{Request, Scope, StaticScope};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::time::{Duration, Instant};

/// Elements per MPI call (MPI counts are C ints).
const CHUNK: usize = 1 << 28;

/// The world of an `mpirun`.
pub struct Mpi {
    _universe: mpi::environment::Universe,
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    timeout: Duration,
    reduced: u64,
    broadcast: u64,
}

impl std::fmt::Debug for Mpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mpi")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Mpi {
    /// Initializes MPI (once per process) with a deadline of `timeout` on every collective.
    pub fn init(timeout: Duration) -> Result<Self> {
        let universe = mpi::initialize().ok_or_else(|| {
            DistError::Setup("MPI could not be initialized (it was initialized already)".into())
        })?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(Self {
            _universe: universe,
            world,
            rank,
            size,
            timeout,
            reduced: 0,
            broadcast: 0,
        })
    }

    /// Polls `req` until it completes; past the deadline, reports `op` and aborts the job.
    fn wait<'a, D: ?Sized, S: Scope<'a>>(
        &self,
        mut req: Request<'a, D, S>,
        op: &dyn Fn() -> String,
    ) {
        let deadline = Instant::now() + self.timeout;
        let mut polls = 0u64;
        loop {
            match req.test() {
                Ok(_) => return,
                Err(r) => req = r,
            }
            if Instant::now() >= deadline {
                let e = DistError::Timeout {
                    rank: self.rank,
                    size: self.size,
                    op: op(),
                    timeout: self.timeout,
                };
                eprintln!("frugal: error: {e}; aborting the job");
                // The request cannot be cancelled: leave it to the abort.
                std::mem::forget(req);
                self.world.abort(3);
            }
            polls += 1;
            if polls < 10_000 {
                std::hint::spin_loop();
            } else {
                // A long wait (another rank is still computing): stop burning its core.
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }
}

/// An `MPI_Iallreduce` in flight: its buffers are leaked for the request's `'static` scope and
/// taken back once it completes.
struct MpiAllReduce {
    send: *mut [f32],
    recv: *mut [f32],
    req: Option<Request<'static, [f32], StaticScope>>,
}

impl MpiAllReduce {
    fn start(world: &SimpleCommunicator, buf: Vec<f32>) -> Self {
        let send: &'static mut [f32] = Box::leak(buf.clone().into_boxed_slice());
        let recv: &'static mut [f32] = Box::leak(buf.into_boxed_slice());
        let (send_ptr, recv_ptr) = (send as *mut [f32], recv as *mut [f32]);
        let req =
            world.immediate_all_reduce_into(StaticScope, &*send, recv, SystemOperation::sum());
        Self {
            send: send_ptr,
            recv: recv_ptr,
            req: Some(req),
        }
    }

    /// Tests the request once; true when complete.
    fn test(&mut self) -> bool {
        match self.req.take() {
            None => true,
            Some(req) => match req.test() {
                Ok(_) => true,
                Err(req) => {
                    self.req = Some(req);
                    false
                }
            },
        }
    }

    /// The reduced buffer of a completed operation.
    fn into_buffer(mut self) -> Vec<f32> {
        assert!(self.req.is_none(), "taken only once complete");
        // SAFETY: both buffers came from `Box::leak` in `start`, and the request that borrowed
        // them has completed; each is taken back once (the pointers are nulled for Drop).
        let (send, recv) = unsafe { (Box::from_raw(self.send), Box::from_raw(self.recv)) };
        self.send = std::ptr::slice_from_raw_parts_mut(std::ptr::null_mut(), 0);
        self.recv = std::ptr::slice_from_raw_parts_mut(std::ptr::null_mut(), 0);
        drop(send);
        recv.into_vec()
    }
}

impl Drop for MpiAllReduce {
    fn drop(&mut self) {
        if let Some(req) = self.req.take() {
            // Dropped while in flight (the job is failing): MPI may still write into the
            // buffers, so leak them with the request.
            std::mem::forget(req);
            return;
        }
        if !self.recv.cast::<f32>().is_null() {
            // SAFETY: as in `into_buffer`, for an operation completed but never taken.
            unsafe {
                drop(Box::from_raw(self.send));
                drop(Box::from_raw(self.recv));
            }
        }
    }
}

impl Collective for Mpi {
    fn start_all_reduce_sum(&mut self, buf: Vec<f32>) -> Result<InFlight> {
        if buf.len() > CHUNK {
            // Larger than one MPI call takes: reduce at once, in chunks.
            let mut buf = buf;
            self.all_reduce_sum(&mut buf)?;
            return Ok(InFlight::done(buf));
        }
        self.reduced += 4 * buf.len() as u64;
        Ok(InFlight::pending(Box::new(MpiAllReduce::start(
            &self.world,
            buf,
        ))))
    }

    fn progress(&mut self, started: &mut [InFlight]) -> Result<()> {
        for op in started {
            if let Some(op) = op.op_mut().and_then(|o| o.downcast_mut::<MpiAllReduce>()) {
                op.test();
            }
        }
        Ok(())
    }

    fn finish_all_reduce(&mut self, mut op: InFlight) -> Result<Vec<f32>> {
        let Some(any) = op.take_op() else {
            return op.into_done();
        };
        let mut mine = any.downcast::<MpiAllReduce>().map_err(|_| {
            DistError::Setup("an all-reduce in flight was started by another backend".into())
        })?;
        let n = mine.recv.len();
        if let Some(req) = mine.req.take() {
            self.wait(req, &|| {
                format!("all-reduce of {n} f32 values (overlapped)")
            });
        }
        Ok(mine.into_buffer())
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        self.reduced += 4 * buf.len() as u64;
        for part in buf.chunks_mut(CHUNK) {
            let send = part.to_vec();
            let n = part.len();
            mpi::request::scope(|scope| {
                let req = self.world.immediate_all_reduce_into(
                    scope,
                    &send[..],
                    &mut part[..],
                    SystemOperation::sum(),
                );
                self.wait(req, &|| format!("all-reduce of {n} f32 values"));
            });
        }
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        self.broadcast += 4 * buf.len() as u64;
        let root_process = self.world.process_at_rank(root as i32);
        for part in buf.chunks_mut(CHUNK) {
            let n = part.len();
            mpi::request::scope(|scope| {
                let req = root_process.immediate_broadcast_into(scope, &mut part[..]);
                self.wait(req, &|| {
                    format!("broadcast of {n} f32 values from rank {root}")
                });
            });
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        let req = self.world.immediate_barrier();
        self.wait(req, &|| "barrier".to_string());
        Ok(())
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
}
