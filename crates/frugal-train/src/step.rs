//! One micro-batch's forward and backward pass, block by block when asked, so that:
//! - with **per-layer updates** (`optim.layerwise`), each block's gradients are handed to the
//!   optimizer the moment they exist and then dropped: they are computed with
//!   `torch::autograd::grad` (never stored in `.grad`), so at most one block's gradients are
//!   alive at a time;
//! - with **activation checkpointing** (`train.checkpointing`), the forward pass keeps only each
//!   block's input, and the block is recomputed (with its graph) during the backward pass;
//! - with a **chunked cross-entropy** (`train.ce_chunk`), the logits exist for `ce_chunk` tokens
//!   at a time, never for the whole batch.
//!
//! The backward pass runs from the output: the head chunk by chunk (its rows: every position
//! for the language models, the first token of each example for a classifier), then the
//! blocks from last to first (for block i: the gradient of `sum(output_i · upstream)` with
//! respect to its parameters and its input), then the embedding. Without any of the three
//! options, it is the plain `loss.backward()`.
//!
//! The models run through [`BlockModel`]: the decoders (llama, hgrn-bit) and the encoder's
//! masked-LM and classification forms. Parameters more than one part reads (HGRN-bit's lower
//! bounds in every block; the encoder's word table, which its masked-LM head reads too) are
//! [`Groups::shared`]: their gradient is summed over every part and handed over last.

use frugal_core::{Error, Result};
use tch::{Kind, Tensor};

/// A model as the block-by-block step runs it: an embedding, blocks, and a head over rows of
/// the last hidden states, scored by a cross-entropy against targets (-100: not scored).
pub trait BlockModel {
    /// Number of blocks.
    fn num_blocks(&self) -> usize;
    /// The mean loss of the micro-batch `inputs` in one plain forward pass, and where the model
    /// [counts](BlockModel::counts_correct) them, the examples it got right (0-dim).
    fn loss(&self, inputs: &[Tensor]) -> (Tensor, Option<Tensor>);
    /// Whether the step counts the rows whose highest logit is their target (a classifier's
    /// training accuracy).
    fn counts_correct(&self) -> bool {
        false
    }
    /// The embedding's output `(B, T, d)` of the micro-batch `inputs`.
    fn embed(&self, inputs: &[Tensor]) -> Tensor;
    /// Block `i` over `h` (the inputs give what a block needs besides, as a padding mask).
    fn block(&self, i: usize, h: &Tensor, inputs: &[Tensor]) -> Tensor;
    /// The rows of the last hidden states `h` `(B, T, d)` the head scores, `(N, d)`, and their
    /// targets `(N,)`.
    fn head_rows(&self, h: &Tensor, inputs: &[Tensor]) -> (Tensor, Tensor) {
        let d = h.size()[2];
        (h.reshape([-1, d]), inputs[inputs.len() - 1].reshape([-1]))
    }
    /// The gradient of `h` (of size `h_size`) from the gradient `g` of its head rows.
    fn rows_to_hidden(&self, g: &Tensor, h_size: &[i64]) -> Tensor {
        g.reshape(h_size)
    }
    /// The head's logits `(n, classes)` of `n` rows.
    fn head(&self, rows: &Tensor) -> Tensor;
    /// The groups of the optimizer's parameters `names` (embedding, blocks, head, shared).
    fn groups(&self, names: &[String]) -> Result<Groups>;
}

impl BlockModel for frugal_models::decoder::Decoder {
    fn num_blocks(&self) -> usize {
        frugal_models::decoder::Decoder::num_blocks(self)
    }

    fn loss(&self, inputs: &[Tensor]) -> (Tensor, Option<Tensor>) {
        let loss = frugal_models::decoder::Decoder::loss(self, &inputs[0], &inputs[1]);
        (loss, None)
    }

    fn embed(&self, inputs: &[Tensor]) -> Tensor {
        frugal_models::decoder::Decoder::embed(self, &inputs[0])
    }

    fn block(&self, i: usize, h: &Tensor, _inputs: &[Tensor]) -> Tensor {
        frugal_models::decoder::Decoder::block(self, i, h)
    }

    fn head(&self, rows: &Tensor) -> Tensor {
        frugal_models::decoder::Decoder::head(self, rows)
    }

    fn groups(&self, names: &[String]) -> Result<Groups> {
        Groups::of(names, frugal_models::decoder::Decoder::num_blocks(self))
    }
}

/// How a micro-batch runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Plan {
    /// Hand each group's gradients to the sink as soon as they exist (per-layer updates).
    pub layerwise: bool,
    /// Recompute each block in the backward pass instead of keeping its activations.
    pub checkpointing: bool,
    /// Tokens per cross-entropy chunk (0: all at once).
    pub ce_chunk: i64,
    /// Without per-layer updates: run the backward pass block by block all the same, and tell
    /// the sink (with no gradients) as each group's `.grad` is complete, so that averaging them
    /// across ranks overlaps the rest of the backward pass.
    pub blockwise: bool,
}

impl Plan {
    /// Whether the plain `loss.backward()` does.
    fn plain(&self) -> bool {
        !self.layerwise && !self.checkpointing && self.ce_chunk == 0 && !self.blockwise
    }

    /// Whether the sink hears of each group whose `.grad` is complete.
    fn tells_ready(&self) -> bool {
        self.blockwise && !self.layerwise
    }
}

/// Parameter indices (positions in the optimizer's list) by where they sit in the model, in
/// the order the backward pass reaches them: head, blocks last to first, embedding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Groups {
    /// `model.embed_tokens.*`.
    pub embed: Vec<usize>,
    /// `model.layers.I.*`, per block.
    pub blocks: Vec<Vec<usize>>,
    /// Everything else: `model.norm.*`, `lm_head.*`.
    pub head: Vec<usize>,
    /// Parameters every block reads (HGRN-bit's `model.lower_bounds`): their gradient is the
    /// sum over the blocks, complete only after the first block, so it comes last.
    pub shared: Vec<usize>,
}

impl Groups {
    /// Sorts the parameter `names` of a model of `layers` blocks into groups.
    pub fn of(names: &[String], layers: usize) -> Result<Self> {
        Self::by(names, layers, |name| {
            if name.starts_with("model.embed_tokens.") || name.starts_with("model.embeddings.") {
                Part::Embed
            } else if name == "model.lower_bounds" {
                Part::Shared
            } else if let Some(rest) = name.strip_prefix("model.layers.") {
                Part::Block(rest.split('.').next().and_then(|b| b.parse().ok()))
            } else {
                Part::Head
            }
        })
    }

    /// The groups of parameters `names` of a model of `layers` blocks, each placed by `part`.
    /// A block number that is missing or out of range is an error naming the parameter.
    pub fn by(names: &[String], layers: usize, part: impl Fn(&str) -> Part) -> Result<Self> {
        let mut g = Groups {
            embed: Vec::new(),
            blocks: vec![Vec::new(); layers],
            head: Vec::new(),
            shared: Vec::new(),
        };
        for (i, name) in names.iter().enumerate() {
            match part(name) {
                Part::Embed => g.embed.push(i),
                Part::Shared => g.shared.push(i),
                Part::Head => g.head.push(i),
                Part::Block(b) => {
                    let block = b.filter(|&b| b < layers).ok_or_else(|| {
                        Error::Msg(format!("parameter '{name}': no block of that number"))
                    })?;
                    g.blocks[block].push(i);
                }
            }
        }
        Ok(g)
    }

    /// Every group in backward order: head, blocks from last to first, embedding, then the
    /// shared parameters (when the model has any).
    pub fn backward_order(&self) -> Vec<&[usize]> {
        let mut v: Vec<&[usize]> = vec![&self.head];
        v.extend(self.blocks.iter().rev().map(|b| b.as_slice()));
        v.push(&self.embed);
        if !self.shared.is_empty() {
            v.push(&self.shared);
        }
        v
    }
}

/// Where a parameter sits in a block-by-block model ([`Groups::by`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The embedding.
    Embed,
    /// Block `i` (None: a name without a block number, an error).
    Block(Option<usize>),
    /// The head.
    Head,
    /// Read by several parts: the gradient is summed over them and handed over last.
    Shared,
}

/// One micro-batch: the model's inputs (their last: the targets) and the factor on its loss
/// (`1 / grad_accum`).
#[derive(Debug)]
pub struct Batch<'a> {
    /// The inputs (causal LM `[ids, targets]`, masked LM `[ids, labels]`, classification
    /// `[ids, types, mask, labels]`).
    pub inputs: &'a [Tensor],
    /// Factor on the loss before the backward pass.
    pub scale: f64,
}

/// Receives a group's gradients (indices, and one gradient per index, in order) during a
/// per-layer backward pass; with [`Plan::blockwise`] (and no per-layer updates), the group's
/// indices with `None` once their `.grad` is complete.
pub type Sink<'a> = dyn FnMut(&[usize], Option<Vec<Tensor>>) -> Result<()> + 'a;

/// Runs one micro-batch: forward, mean next-token cross-entropy of its targets, and backward of
/// the loss times its scale. Returns the (unscaled) mean loss. With `plan.layerwise`, every
/// group's gradients go to `sink` in backward order and none is kept; otherwise they
/// accumulate in the parameters' `.grad` as `loss.backward()` would leave them (and with
/// `plan.blockwise`, `sink` hears of each group once its `.grad` is complete).
pub fn micro_step(
    model: &dyn BlockModel,
    params: &[Tensor],
    groups: &Groups,
    plan: &Plan,
    batch: &Batch<'_>,
    sink: &mut Sink<'_>,
) -> Result<MicroOut> {
    let (inputs_, scale) = (batch.inputs, batch.scale);
    if plan.plain() {
        let (loss, correct) = model.loss(inputs_);
        let value = loss.double_value(&[]);
        (loss * scale).backward();
        return Ok(MicroOut {
            loss: value,
            correct: correct.map(|c| c.int64_value(&[])),
        });
    }

    // Forward: keep each block's input (a leaf that takes a gradient), and its output graph
    // unless the block is to be recomputed.
    let embedded = model.embed(inputs_);
    let blocks = model.num_blocks();
    let mut inputs = Vec::with_capacity(blocks);
    let mut outputs = Vec::with_capacity(blocks);
    let mut h = embedded.detach();
    // Each block draws its random numbers (adapter dropout) from a seed of its own, taken from
    // torch's generator once per micro-batch, so that a recomputed block draws the masks of its
    // forward pass.
    let base_seed =
        Tensor::randint(i64::MAX, [1], (Kind::Int64, tch::Device::Cpu)).int64_value(&[0]);
    let seed_block = |i: usize| tch::manual_seed(block_seed(base_seed, i));
    for i in 0..blocks {
        let input = h.detach().set_requires_grad(true);
        seed_block(i);
        let out = if plan.checkpointing {
            tch::no_grad(|| model.block(i, &input, inputs_))
        } else {
            model.block(i, &input, inputs_)
        };
        h = out.shallow_clone();
        inputs.push(input);
        outputs.push(Some(out));
    }

    // Head and loss, chunk by chunk.
    let h_size = h.size();
    let (flat, flat_targets) = model.head_rows(&h.detach(), inputs_);
    let rows = flat.size()[0];
    // Targets of -100 (prompt tokens of instruction data) are not scored: the mean is over
    // the others, as the plain loss computes it.
    let scored = flat_targets
        .ne(-100)
        .sum(Kind::Int64)
        .int64_value(&[])
        .max(1);
    let chunk = if plan.ce_chunk > 0 {
        plan.ce_chunk.min(rows)
    } else {
        rows
    };
    let head_params: Vec<&Tensor> = groups.head.iter().map(|&i| &params[i]).collect();
    let mut head_grads: Vec<Option<Tensor>> = (0..head_params.len()).map(|_| None).collect();
    let shared: Vec<&Tensor> = groups.shared.iter().map(|&i| &params[i]).collect();
    // The shared parameters' gradients, summed over the parts that read them.
    let mut shared_grads: Option<Vec<Tensor>> = None;
    let mut add_shared = |gs: Vec<Tensor>| {
        shared_grads = Some(match shared_grads.take() {
            Some(acc) => acc.into_iter().zip(gs).map(|(a, b)| a + b).collect(),
            None => gs,
        });
    };
    let mut upstream_parts = Vec::new();
    let mut loss_sum = 0.0;
    let mut correct = model.counts_correct().then_some(0i64);
    let mut start = 0;
    while start < rows {
        let n = chunk.min(rows - start);
        let leaf = flat.narrow(0, start, n).set_requires_grad(true);
        let logits = model.head(&leaf);
        if let Some(c) = &mut correct {
            let targets = flat_targets.narrow(0, start, n);
            *c += tch::no_grad(|| logits.argmax(1, false).eq_tensor(&targets).sum(Kind::Int64))
                .int64_value(&[]);
        }
        let loss = logits.cross_entropy_loss::<Tensor>(
            &flat_targets.narrow(0, start, n),
            None,
            tch::Reduction::Sum,
            -100,
            0.0,
        );
        loss_sum += loss.double_value(&[]);
        let loss = loss * (scale / scored as f64);
        if plan.layerwise {
            let mut wrt: Vec<&Tensor> = head_params.clone();
            wrt.extend(&shared);
            wrt.push(&leaf);
            let mut g = grads_of(&loss, &wrt)?;
            upstream_parts.push(g.pop().expect("input gradient"));
            add_shared(g.split_off(head_params.len()));
            for (acc, gi) in head_grads.iter_mut().zip(g) {
                *acc = Some(match acc.take() {
                    Some(a) => a + gi,
                    None => gi,
                });
            }
        } else {
            loss.backward();
            upstream_parts.push(leaf.grad());
        }
        start += n;
    }
    if plan.layerwise {
        let g = head_grads
            .into_iter()
            .zip(&head_params)
            .map(|(g, p)| g.unwrap_or_else(|| p.zeros_like()))
            .collect();
        sink(&groups.head, Some(g))?;
    } else if plan.tells_ready() {
        sink(&groups.head, None)?;
    }
    let mut upstream = model.rows_to_hidden(&Tensor::cat(&upstream_parts, 0), &h_size);
    drop(upstream_parts);

    // Blocks, last to first.
    for i in (0..blocks).rev() {
        let input = &inputs[i];
        let out = match outputs[i].take() {
            Some(out) if !plan.checkpointing => out,
            _ => {
                seed_block(i);
                model.block(i, input, inputs_)
            }
        };
        let s = (&out * &upstream).sum(Kind::Float);
        if plan.layerwise {
            let mut wrt: Vec<&Tensor> = groups.blocks[i].iter().map(|&j| &params[j]).collect();
            wrt.extend(&shared);
            wrt.push(input);
            let mut g = grads_of(&s, &wrt)?;
            upstream = g.pop().expect("input gradient");
            add_shared(g.split_off(groups.blocks[i].len()));
            sink(&groups.blocks[i], Some(g))?;
        } else {
            s.backward();
            upstream = input.grad();
            if plan.tells_ready() {
                sink(&groups.blocks[i], None)?;
            }
        }
    }
    drop(inputs);

    // Embedding (nothing to do when it is frozen, as in an adapter run).
    if embedded.requires_grad() {
        let s = (&embedded * &upstream).sum(Kind::Float);
        if plan.layerwise {
            let mut wrt: Vec<&Tensor> = groups.embed.iter().map(|&j| &params[j]).collect();
            wrt.extend(&shared);
            let mut g = grads_of(&s, &wrt)?;
            add_shared(g.split_off(groups.embed.len()));
            sink(&groups.embed, Some(g))?;
        } else {
            s.backward();
        }
    }
    if plan.tells_ready() {
        sink(&groups.embed, None)?;
    }
    if let Some(g) = shared_grads.filter(|_| !groups.shared.is_empty()) {
        sink(&groups.shared, Some(g))?;
    } else if plan.tells_ready() && !groups.shared.is_empty() {
        sink(&groups.shared, None)?;
    }
    Ok(MicroOut {
        loss: loss_sum / scored as f64,
        correct,
    })
}

/// What a micro-batch's step reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MicroOut {
    /// The (unscaled) mean loss.
    pub loss: f64,
    /// The examples classified right (classifiers).
    pub correct: Option<i64>,
}

/// The seed of block `i`'s random numbers in a micro-batch whose seed is `base`.
fn block_seed(base: i64, i: usize) -> i64 {
    base ^ (i as i64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15_u64 as i64)
}

/// The gradients of scalar `y` with respect to `wrt` (zeros for a tensor `y` does not reach),
/// without touching any `.grad`.
fn grads_of(y: &Tensor, wrt: &[&Tensor]) -> Result<Vec<Tensor>> {
    if wrt.is_empty() {
        return Ok(Vec::new());
    }
    let g = Tensor::f_run_backward(&[y], wrt, false, false)?;
    Ok(g.into_iter()
        .zip(wrt)
        .map(|(g, w)| if g.defined() { g } else { w.zeros_like() })
        .collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use frugal_models::decoder::Decoder;
    use frugal_models::llama::{Llama, LlamaConfig};
    use frugal_models::{EmbeddingKind, LinearKind};
    use tch::{nn::VarStore, Device};

    /// A tiny HGRN-bit (BitLinear projections, reference mixer: lower bounds shared by the
    /// blocks), its lower bounds random.
    fn tiny_hgrn() -> (VarStore, Decoder, Vec<(String, Tensor)>) {
        use frugal_models::hgrn_bit::{HgrnBit, HgrnBitConfig, Mixer};
        tch::manual_seed(4);
        let cfg = HgrnBitConfig {
            vocab_size: 96,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 3,
            rms_norm_eps: 1e-6,
            mixer: Mixer::Reference,
            initializer_range: 0.02,
        };
        let vs = VarStore::new(Device::Cpu);
        let kind = LinearKind::BitLinear { eps: 1e-8 };
        let model = HgrnBit::new(&vs.root(), &cfg, &kind, Kind::Float).unwrap();
        tch::no_grad(|| {
            let lb = &vs.variables()["model.lower_bounds"];
            lb.shallow_clone().copy_(&lb.randn_like());
        });
        let params = frugal_models::weights::named_variables(&vs);
        (vs, Decoder::HgrnBit(model), params)
    }

    fn tiny() -> (VarStore, Decoder, Vec<(String, Tensor)>) {
        tiny_with(&EmbeddingKind::Dense)
    }

    /// The tiny LLaMA (grouped-query attention: 4 query heads, 2 key/value heads) with a word
    /// table of kind `embedding`.
    fn tiny_with(embedding: &EmbeddingKind) -> (VarStore, Decoder, Vec<(String, Tensor)>) {
        tch::manual_seed(3);
        let mut cfg = LlamaConfig::preset("tiny").unwrap();
        cfg.vocab_size = 96;
        cfg.hidden_size = 32;
        cfg.intermediate_size = 48;
        cfg.num_hidden_layers = 3;
        cfg.num_attention_heads = 4;
        cfg.num_key_value_heads = 2;
        let vs = VarStore::new(Device::Cpu);
        let model =
            Llama::new(&vs.root(), &cfg, &LinearKind::Dense, embedding, Kind::Float).unwrap();
        let params = frugal_models::weights::named_variables(&vs);
        (vs, Decoder::Llama(model), params)
    }

    fn decoder_batch() -> [Tensor; 2] {
        let ids = Tensor::randint(96, [2, 10], (Kind::Int64, Device::Cpu));
        [
            ids.narrow(1, 0, 9).contiguous(),
            ids.narrow(1, 1, 9).contiguous(),
        ]
    }

    fn take_grads(params: &[(String, Tensor)]) -> Vec<Tensor> {
        params
            .iter()
            .map(|(_, p)| {
                let g = p.grad().copy();
                let mut p = p.shallow_clone();
                p.zero_grad();
                g
            })
            .collect()
    }

    fn max_diff(a: &[Tensor], b: &[Tensor]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs().max().double_value(&[]))
            .fold(0.0, f64::max)
    }

    /// Guarantee: every plan gives the gradients (and loss) of the plain `loss.backward()`:
    /// checkpointing and chunking in `.grad`, per-layer updates through the sink, each group
    /// once, in backward order; for the LLaMA (with grouped-query attention), the LLaMA with a
    /// tensor-train word table (its
    /// cores and rank variables, `model.embed_tokens.*`, in the embedding group), and HGRN-bit,
    /// whose lower bounds every block reads (their gradient summed over the blocks, handed over
    /// last).
    #[test]
    fn every_plan_gives_the_plain_gradients() {
        let (_vs, model, params) = tiny();
        let names: Vec<String> = params.iter().map(|(n, _)| n.clone()).collect();
        let groups = Groups::of(&names, 3).unwrap();
        assert_eq!(groups.embed.len(), 1);
        assert_eq!(groups.head.len(), 2);
        assert!(groups.shared.is_empty());
        assert!(groups.blocks.iter().all(|b| b.len() == 9));
        plans_give_the_plain_gradients(&model, &params, &groups, &decoder_batch());

        let table = EmbeddingKind::Tt {
            rank: 4,
            order: 2,
            eps: None,
        };
        let (_vs, model, params) = tiny_with(&table);
        let names: Vec<String> = params.iter().map(|(n, _)| n.clone()).collect();
        let groups = Groups::of(&names, 3).unwrap();
        let embed: Vec<&str> = groups.embed.iter().map(|&i| names[i].as_str()).collect();
        assert_eq!(
            embed,
            [
                "model.embed_tokens.cores.0",
                "model.embed_tokens.cores.1",
                "model.embed_tokens.rank_vars.0"
            ]
        );
        assert_eq!(groups.head.len(), 2);
        plans_give_the_plain_gradients(&model, &params, &groups, &decoder_batch());

        let (_vs, model, params) = tiny_hgrn();
        let names: Vec<String> = params.iter().map(|(n, _)| n.clone()).collect();
        let groups = Groups::of(&names, 3).unwrap();
        assert_eq!(groups.shared.len(), 1);
        assert_eq!(names[groups.shared[0]], "model.lower_bounds");
        plans_give_the_plain_gradients(&model, &params, &groups, &decoder_batch());
    }

    /// Checks every plan against the plain pass of `model` on micro-batch `inputs` (see
    /// [`every_plan_gives_the_plain_gradients`]).
    pub(crate) fn plans_give_the_plain_gradients(
        model: &dyn BlockModel,
        params: &[(String, Tensor)],
        groups: &Groups,
        inputs: &[Tensor],
    ) {
        let tensors: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
        let b = Batch { inputs, scale: 0.5 };
        let mut none = |_: &[usize], _: Option<Vec<Tensor>>| -> Result<()> { panic!("no sink") };
        let plain = Plan::default();
        let out0 = micro_step(model, &tensors, groups, &plain, &b, &mut none).unwrap();
        let l0 = out0.loss;
        let want = take_grads(params);
        assert!(want
            .iter()
            .all(|g| g.abs().sum(Kind::Float).double_value(&[]) > 0.0));
        for plan in [
            Plan {
                checkpointing: true,
                ..Plan::default()
            },
            Plan {
                ce_chunk: 7,
                ..Plan::default()
            },
            Plan {
                checkpointing: true,
                ce_chunk: 5,
                ..Plan::default()
            },
        ] {
            let out = micro_step(model, &tensors, groups, &plan, &b, &mut none).unwrap();
            assert_eq!(out.correct, out0.correct, "{plan:?}");
            let l = out.loss;
            assert!((l - l0).abs() < 1e-6, "{plan:?}");
            let got = take_grads(params);
            assert!(
                max_diff(&got, &want) < 1e-6,
                "{plan:?}: {}",
                max_diff(&got, &want)
            );
        }
        // Block by block: each group is announced once, in backward order, when its `.grad`
        // is already the plain one.
        for plan in [
            Plan {
                blockwise: true,
                ..Plan::default()
            },
            Plan {
                blockwise: true,
                checkpointing: true,
                ce_chunk: 6,
                ..Plan::default()
            },
        ] {
            let mut order = Vec::new();
            let mut ready = |idx: &[usize], g: Option<Vec<Tensor>>| -> Result<()> {
                assert!(
                    g.is_none(),
                    "no gradients handed over without per-layer updates"
                );
                for &i in idx {
                    let d = (params[i].1.grad() - &want[i])
                        .abs()
                        .max()
                        .double_value(&[]);
                    assert!(d < 1e-6, "{}: announced before complete ({d})", params[i].0);
                }
                order.push(idx.to_vec());
                Ok(())
            };
            let out = micro_step(model, &tensors, groups, &plan, &b, &mut ready).unwrap();
            assert_eq!(out.correct, out0.correct, "{plan:?}");
            let l = out.loss;
            assert!((l - l0).abs() < 1e-6, "{plan:?}");
            let order_want: Vec<Vec<usize>> = groups
                .backward_order()
                .into_iter()
                .map(|g| g.to_vec())
                .collect();
            assert_eq!(order, order_want, "{plan:?}");
            let got = take_grads(params);
            assert!(max_diff(&got, &want) < 1e-6, "{plan:?}");
        }
        for plan in [
            Plan {
                layerwise: true,
                ..Plan::default()
            },
            Plan {
                layerwise: true,
                checkpointing: true,
                ce_chunk: 4,
                ..Plan::default()
            },
        ] {
            let mut got: Vec<Option<Tensor>> = (0..params.len()).map(|_| None).collect();
            let mut order = Vec::new();
            let mut sink = |idx: &[usize], g: Option<Vec<Tensor>>| -> Result<()> {
                order.push(idx.to_vec());
                for (&i, g) in idx.iter().zip(g.expect("per-layer gradients")) {
                    assert!(got[i].replace(g).is_none(), "parameter {i} twice");
                }
                Ok(())
            };
            let out = micro_step(model, &tensors, groups, &plan, &b, &mut sink).unwrap();
            assert_eq!(out.correct, out0.correct, "{plan:?}");
            let l = out.loss;
            assert!((l - l0).abs() < 1e-6);
            let order_want: Vec<Vec<usize>> = groups
                .backward_order()
                .into_iter()
                .map(|g| g.to_vec())
                .collect();
            assert_eq!(order, order_want);
            let got: Vec<Tensor> = got.into_iter().map(|g| g.unwrap()).collect();
            assert!(
                max_diff(&got, &want) < 1e-6,
                "{plan:?}: {}",
                max_diff(&got, &want)
            );
            // Nothing went into `.grad` (zeroed by the plain runs above).
            for (n, p) in params {
                let g = p.grad();
                assert!(
                    g.abs().sum(Kind::Float).double_value(&[]) == 0.0,
                    "{n} got a .grad"
                );
            }
        }
    }
}
