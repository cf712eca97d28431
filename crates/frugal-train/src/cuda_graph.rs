//! `train.cuda_graph`: a training step captured once as a CUDA graph and replayed for every
//! later step, so that the step costs one graph launch instead of a kernel launch per operation
//! (what CoMERA does for its small-batch TT training).
//!
//! The captured work reads the batch from tensors of fixed shape, which each step refills in
//! place, zeroes the gradients, computes the loss and runs the backward pass into the
//! parameters' `.grad` (the same tensors at every replay). Where the optimizer has a recorded
//! form ([`frugal_optim::RecordedStep`], AdamW) and nothing between the backward pass and the
//! update needs the host (one process, no rank adaptation), the graph also holds the clipping
//! (on the device, [`frugal_optim::clip_grad_norm_on_device`]) and the optimizer step, whose
//! learning rate and bias corrections are written to the device before each replay. Otherwise
//! those run eagerly after the replay. The loss (and the norm) are read after the replay.
//!
//! Capture needs the work to be warm: the kernels compiled and loaded, the gradients and the
//! optimizer state allocated, the allocator's blocks in place. So the trainer runs two eager
//! steps first. A graph is bound to the shapes and the tensors it was captured with: the
//! loop captures again after CoMERA prunes the TT layers (new, smaller cores).

use frugal_core::{Error, Result};
use frugal_kernels::torch_cuda::CudaGraph;
use frugal_optim::Optimizer;
use tch::Tensor;

/// Eager steps before the capture.
pub const WARMUP_STEPS: u64 = 2;

/// A captured step.
pub struct StepGraph {
    graph: CudaGraph,
    inputs: Vec<Tensor>,
    outputs: Vec<Tensor>,
    /// Whether the graph holds the clipping and the optimizer step.
    optimizer: bool,
    /// The gradients the captured step zeroes. Kept alive with the graph, which writes into
    /// their memory at every replay. Autograd may have given the parameters new `.grad` tensors
    /// during the capture (it accumulates out of place into a gradient that is shared).
    _zeroed: Vec<Tensor>,
}

impl std::fmt::Debug for StepGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shapes: Vec<Vec<i64>> = self.inputs.iter().map(Tensor::size).collect();
        f.debug_struct("StepGraph")
            .field("inputs", &shapes)
            .field("optimizer", &self.optimizer)
            .finish()
    }
}

fn graph_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Msg(format!("train.cuda_graph: {what}: {e}"))
}

/// `train.cuda_graph` asks for CUDA: an error naming the key on another device (checked before
/// the run folder is made).
pub fn check_device(train: &crate::config::TrainConfig, device: tch::Device) -> Result<()> {
    if train.cuda_graph && !device.is_cuda() {
        return Err(Error::config(
            "train.cuda_graph",
            format!("captures CUDA work: the run is on {device:?} (set train.device = \"cuda\")"),
        ));
    }
    Ok(())
}

/// Whether the optimizer step goes into the graph, and if so, starts its recording (the
/// parameters with a gradient now take part). It does where `opt` has a recorded form and
/// nothing between the backward pass and the update needs the host: not GaLore's projections
/// (`galore`), nor what `host_between` names (the all-reduce, rank adaptation).
pub fn recordable_optimizer(
    opt: &mut dyn Optimizer,
    galore: bool,
    host_between: bool,
) -> Result<bool> {
    if host_between || galore {
        return Ok(false);
    }
    match opt.recordable() {
        Some(r) => {
            r.begin_recording()?;
            Ok(true)
        }
        None => Ok(false),
    }
}

impl StepGraph {
    /// Captures `step` on copies of `inputs` (tensors on one CUDA device; `step` gets the
    /// copies, which every replay refills, and returns the tensors to read after a replay),
    /// after zeroing the `.grad` of `params`, which the eager steps before have allocated.
    /// With `opt` (whose recording has begun, [`recordable_optimizer`]), the optimizer's
    /// recorded step follows `step` (which then clips on the device). The captured work has
    /// not run yet: [`StepGraph::prepare`] and [`StepGraph::replay`] this step too.
    pub fn capture(
        params: &[Tensor],
        inputs: &[&Tensor],
        opt: Option<&mut dyn Optimizer>,
        step: impl FnOnce(&[Tensor]) -> Result<Vec<Tensor>>,
    ) -> Result<Self> {
        let Some(tch::Device::Cuda(device)) = inputs.first().map(|t| t.device()) else {
            return Err(graph_err("capture", "the batch is not on a CUDA device"));
        };
        let grads: Vec<Tensor> = params
            .iter()
            .map(Tensor::grad)
            .filter(Tensor::defined)
            .collect();
        let inputs: Vec<Tensor> = inputs.iter().map(|t| t.copy()).collect();
        let optimizer = opt.is_some();
        tch::Cuda::synchronize(device as i64);
        let mut graph = CudaGraph::new(device).map_err(|e| graph_err("new graph", e))?;
        // The body's own error (a frugal error) is kept inside the capture's result, which
        // ends the capture either way.
        let outputs = graph
            .capture(|| {
                Ok((|| -> Result<Vec<Tensor>> {
                    for g in &grads {
                        let _ = g.shallow_clone().zero_();
                    }
                    let outputs = step(&inputs)?;
                    if let Some(opt) = opt {
                        recorded(opt)?.recorded_step()?;
                    }
                    Ok(outputs)
                })())
            })
            .map_err(|e| graph_err("capture", e))??;
        Ok(Self {
            graph,
            inputs,
            outputs,
            optimizer,
            _zeroed: grads,
        })
    }

    /// Whether the graph holds the optimizer step (then [`StepGraph::prepare`] comes before
    /// each replay, and no eager step after it).
    pub fn has_optimizer(&self) -> bool {
        self.optimizer
    }

    /// The progress message of the capture at `step`.
    pub fn captured_message(&self, step: u64) -> String {
        let what = if self.optimizer {
            "forward, backward, clipping and optimizer step"
        } else {
            "forward and backward"
        };
        format!("step {step}: {what} captured as a CUDA graph")
    }

    /// Before a replay of a graph that holds the optimizer step: that step's numbers (learning
    /// rate, bias corrections) written to the device, the step counts advanced.
    pub fn prepare(&self, opt: &mut dyn Optimizer) -> Result<()> {
        if self.optimizer {
            recorded(opt)?.prepare_recorded()?;
        }
        Ok(())
    }

    /// Runs the captured step on new inputs (of the captured shapes) and returns the tensors
    /// it computes.
    pub fn replay(&mut self, inputs: &[&Tensor]) -> Result<&[Tensor]> {
        let got: Vec<Vec<i64>> = inputs.iter().map(|t| t.size()).collect();
        let want: Vec<Vec<i64>> = self.inputs.iter().map(Tensor::size).collect();
        if got != want {
            return Err(graph_err(
                "replay",
                format!("inputs of shapes {got:?} where the graph was captured for {want:?}"),
            ));
        }
        for (dst, src) in self.inputs.iter_mut().zip(inputs) {
            dst.copy_(src);
        }
        self.graph.replay().map_err(|e| graph_err("replay", e))?;
        Ok(&self.outputs)
    }
}

fn recorded(opt: &mut dyn Optimizer) -> Result<&mut dyn frugal_optim::RecordedStep> {
    opt.recordable()
        .ok_or_else(|| graph_err("optimizer", "this optimizer has no recorded step"))
}
