//! `train.cuda_graph`: the forward and backward pass of a training step captured once as a CUDA
//! graph and replayed for every later step, so that the step costs one graph launch instead of
//! a kernel launch per operation (what CoMERA does for its small-batch TT training).
//!
//! The captured work reads the batch from two tensors of fixed shape, which each step refills
//! in place, zeroes the gradients, computes the loss and runs the backward pass into the
//! parameters' `.grad` (the same tensors every replay). The loss is read from its tensor after
//! the replay. The optimizer step, clipping and all-reduces run eagerly after it.
//!
//! Capture needs the work to be warm: the kernels compiled and loaded, the gradients allocated,
//! the allocator's blocks in place. So the trainer runs two eager steps first.

use frugal_core::{Error, Result};
use frugal_kernels::torch_cuda::CudaGraph;
use frugal_models::decoder::Decoder;
use tch::Tensor;

/// Eager steps before the capture.
pub const WARMUP_STEPS: u64 = 2;

/// A captured forward and backward pass.
pub struct StepGraph {
    graph: CudaGraph,
    ids: Tensor,
    targets: Tensor,
    loss: Tensor,
    /// The gradients the captured pass zeroes. Kept alive with the graph, which writes into
    /// their memory at every replay. Autograd may have given the parameters new `.grad` tensors
    /// during the capture (it accumulates out of place into a gradient that is shared).
    _zeroed: Vec<Tensor>,
}

impl std::fmt::Debug for StepGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepGraph")
            .field("batch", &self.ids.size())
            .finish()
    }
}

fn graph_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Msg(format!("train.cuda_graph: {what}: {e}"))
}

impl StepGraph {
    /// Captures `model`'s loss on batches shaped like `ids` and `targets` (on the model's GPU),
    /// times `scale`, and its backward pass into the `.grad` of `params`, which the eager steps
    /// before have allocated.
    pub fn capture(
        model: &Decoder,
        params: &[Tensor],
        ids: &Tensor,
        targets: &Tensor,
        scale: f64,
    ) -> Result<Self> {
        let tch::Device::Cuda(device) = ids.device() else {
            return Err(graph_err("capture", "the batch is not on a CUDA device"));
        };
        let grads: Vec<Tensor> = params
            .iter()
            .map(Tensor::grad)
            .filter(Tensor::defined)
            .collect();
        let (ids, targets) = (ids.copy(), targets.copy());
        tch::Cuda::synchronize(device as i64);
        let mut graph = CudaGraph::new(device).map_err(|e| graph_err("new graph", e))?;
        let loss = graph
            .capture(|| {
                for g in &grads {
                    let _ = g.shallow_clone().zero_();
                }
                let loss = model.loss(&ids, &targets);
                (&loss * scale).backward();
                Ok(loss.detach())
            })
            .map_err(|e| graph_err("capture", e))?;
        Ok(Self {
            graph,
            ids,
            targets,
            loss,
            _zeroed: grads,
        })
    }

    /// Runs the captured pass on a new batch (of the captured shape) and returns its loss.
    pub fn replay(&mut self, ids: &Tensor, targets: &Tensor) -> Result<f64> {
        if ids.size() != self.ids.size() || targets.size() != self.targets.size() {
            return Err(graph_err(
                "replay",
                format!(
                    "a batch of shape {:?} where the graph was captured for {:?}",
                    ids.size(),
                    self.ids.size()
                ),
            ));
        }
        self.ids.copy_(ids);
        self.targets.copy_(targets);
        self.graph.replay().map_err(|e| graph_err("replay", e))?;
        Ok(self.loss.double_value(&[]))
    }
}
