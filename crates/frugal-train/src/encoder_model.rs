//! The BERT-style encoder as the trainer holds it: the network with its masked-LM or
//! classification head and the variables it lives in ([`EncoderModel`]), and the loss of a
//! micro-batch ([`micro_loss`]). Its adapters are in [`crate::encoder_adapter`].

use crate::config::ModelBuild;
use crate::step::{BlockModel, Groups, Part};
use frugal_core::safetensors_io::SafetensorsFile;
use frugal_core::Result;
use frugal_models::embedding::WordEmbedding;
use frugal_models::encoder::{
    Checkpointed, Encoder, EncoderConfig, EncoderForClassification, EncoderForMaskedLm,
    IGNORE_INDEX,
};
use frugal_models::linear::Linear;
use frugal_tt::TtLayer;
use std::path::Path;
use tch::nn::VarStore;
use tch::{Kind, Reduction, Tensor};

/// The network of an encoder run.
#[derive(Debug)]
pub enum Net {
    /// With the masked-LM head.
    Mlm(EncoderForMaskedLm),
    /// With the classification head.
    Cls(EncoderForClassification),
}

/// An encoder and the variables it lives in.
pub struct EncoderModel {
    /// The variables, by Hugging Face name.
    pub vs: VarStore,
    /// The network.
    pub net: Net,
    /// The settings of the adapter trained on the frozen base, in an adapter run.
    pub adapter: Option<frugal_adapters::LoraConfig>,
}

/// The loss of a micro-batch (`inputs` on the model's device: masked-LM `[ids, labels]`,
/// classification `[ids, types, mask, labels]`); for classification also the examples
/// classified right (a 0-dim tensor, not read back, so that a CUDA graph can record it); with
/// `checkpointing` the blocks whose backward pass runs after the loss's. `recordable` computes
/// the masked-LM loss over every position (shapes that do not depend on the masking, no read
/// back to the host: what a CUDA graph records), the same loss.
pub fn micro_loss(
    m: &EncoderModel,
    inputs: &[Tensor],
    checkpointing: bool,
    recordable: bool,
) -> (Tensor, Option<Tensor>, Option<Checkpointed>) {
    let hidden = |ids: &Tensor, types: Option<&Tensor>, mask: Option<&Tensor>| {
        let enc = m.encoder();
        if checkpointing {
            let ck = enc.forward_checkpointed(ids, types, mask);
            (ck.hidden().shallow_clone(), Some(ck))
        } else {
            (enc.forward(ids, types, mask), None)
        }
    };
    match (&m.net, inputs) {
        (Net::Mlm(mlm), [ids, labels]) => {
            let (h, ck) = hidden(ids, None, None);
            let loss = if recordable {
                mlm.loss_of_hidden_all_rows(&h, labels)
            } else {
                mlm.loss_of_hidden(&h, labels)
            };
            (loss, None, ck)
        }
        (Net::Cls(c), [ids, types, mask, labels]) => {
            let (h, ck) = hidden(ids, Some(types), Some(mask));
            let logits = c.head(&h);
            let correct =
                tch::no_grad(|| logits.argmax(1, false).eq_tensor(labels).sum(Kind::Int64));
            let loss = logits.cross_entropy_loss::<Tensor>(
                labels,
                None,
                Reduction::Mean,
                IGNORE_INDEX,
                0.0,
            );
            (loss, Some(correct), ck)
        }
        _ => unreachable!("model and inputs of one objective"),
    }
}

#[allow(clippy::type_complexity)]
pub(crate) fn weights_mut_of(
    net: &mut Net,
) -> (
    Vec<(String, &mut Box<dyn Linear>)>,
    Vec<(String, &mut WordEmbedding)>,
) {
    match net {
        Net::Mlm(m) => m.weights_mut(),
        Net::Cls(m) => m.weights_mut(),
    }
}

impl EncoderModel {
    /// Builds the configured encoder of shape `shape` on `device`, seeded by `train.seed`: with
    /// the masked-LM head, or with a classification head of `num_labels` classes. The blocks'
    /// linear layers are of kind `model.linear`, or the one QLoRA or QA-LoRA chooses for the
    /// frozen base (`adapter.kind`).
    pub fn new(
        build: &ModelBuild,
        shape: &EncoderConfig,
        num_labels: Option<i64>,
        device: tch::Device,
    ) -> Result<Self> {
        let vs = build.var_store(device);
        let root = vs.root();
        let (kind, emb, compute) = (&build.linear, &build.embedding, build.compute);
        let net = match num_labels {
            None => Net::Mlm(EncoderForMaskedLm::new(&root, shape, kind, emb, compute)?),
            Some(n) => Net::Cls(EncoderForClassification::new(
                &root, shape, n, kind, emb, compute,
            )?),
        };
        Ok(Self {
            vs,
            net,
            adapter: None,
        })
    }

    /// The encoder without its head.
    pub fn encoder(&self) -> &Encoder {
        match &self.net {
            Net::Mlm(m) => &m.encoder,
            Net::Cls(m) => &m.encoder,
        }
    }

    /// Every linear layer of the blocks, with its full name.
    pub fn linears(&self) -> Vec<(String, &dyn Linear)> {
        match &self.net {
            Net::Mlm(m) => m.linears(),
            Net::Cls(m) => m.linears(),
        }
    }

    /// [`EncoderModel::linears`], mutable.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Box<dyn Linear>)> {
        weights_mut_of(&mut self.net).0
    }

    /// The word tables, with their full names.
    pub fn tables(&self) -> Vec<(String, &WordEmbedding)> {
        match &self.net {
            Net::Mlm(m) => m.tables(),
            Net::Cls(m) => m.tables(),
        }
    }

    /// Every tensor-train layer (word table, block linears), with its full name.
    pub fn tt_layers(&self) -> Vec<(String, &dyn TtLayer)> {
        match &self.net {
            Net::Mlm(m) => m.tt_layers(),
            Net::Cls(m) => m.tt_layers(),
        }
    }

    /// [`EncoderModel::tt_layers`], mutable, with the variables they live in (to prune them).
    pub fn tt_layers_mut(&mut self) -> (Vec<(String, &mut dyn TtLayer)>, &VarStore) {
        let layers = match &mut self.net {
            Net::Mlm(m) => m.tt_layers_mut(),
            Net::Cls(m) => m.tt_layers_mut(),
        };
        (layers, &self.vs)
    }

    /// Saves the weights (variables, quantized layers, TT descriptions) to `file`, atomically.
    /// In an adapter run, only the adapter (with the modules it saves whole), in PEFT's form,
    /// into `file`'s folder: the base is the pre-trained model's, unchanged.
    pub fn save(&self, file: &Path) -> Result<()> {
        if self.adapter.is_some() {
            return self.save_adapter_into(file.parent().unwrap_or(Path::new(".")));
        }
        frugal_models::weights::save_model_with_tables(
            &self.vs,
            &self.linears(),
            &self.tables(),
            file,
        )
    }

    /// Loads every weight of the model from `file` (a checkpoint of the same model).
    pub fn load(&mut self, file: &Path) -> Result<()> {
        let (mut linears, mut tables) = weights_mut_of(&mut self.net);
        frugal_models::weights::load_model_with_tables(
            &mut self.vs,
            &mut linears,
            &mut tables,
            file,
        )
    }

    /// Loads a pre-trained encoder body from `file`: every `bert.embeddings.*` and
    /// `bert.encoder.*` weight (required), and the masked-LM head when this model has one and
    /// the file too (then returns true). The pooler and classifier keep their fresh
    /// initialisation.
    pub fn load_pretrained(&mut self, file: &Path) -> Result<bool> {
        let names = SafetensorsFile::open(file)?.names();
        let head_in_file = names.iter().any(|n| n.starts_with("cls.predictions."));
        let mlm = matches!(self.net, Net::Mlm(_));
        let mut body = VarStore::new(self.vs.device());
        {
            let mut v = body.variables_.lock().expect("fresh store");
            for (n, t) in frugal_models::weights::named_variables(&self.vs) {
                let wanted = n.starts_with("bert.embeddings.")
                    || n.starts_with("bert.encoder.")
                    || (mlm && head_in_file && n.starts_with("cls.predictions."));
                if wanted {
                    // Shallow: loading into `body` fills this model's tensors.
                    v.named_variables.insert(n, t.shallow_clone());
                }
            }
        }
        let (mut linears, mut tables) = weights_mut_of(&mut self.net);
        frugal_models::weights::load_model_with_tables(&mut body, &mut linears, &mut tables, file)?;
        // TT layers of other ranks (a pruned checkpoint) got new variables in `body`.
        frugal_models::weights::adopt_variables(&self.vs, body)?;
        Ok(mlm && head_in_file)
    }
}

/// The encoder block by block ([`crate::step`]): the embeddings, the blocks (with the padding
/// mask of a classification batch), and the head over every position (masked LM, its decoder
/// reading the word table) or over each example's first token (classification).
impl BlockModel for EncoderModel {
    fn num_blocks(&self) -> usize {
        self.encoder().layers.len()
    }

    fn loss(&self, inputs: &[Tensor]) -> (Tensor, Option<Tensor>) {
        let (loss, correct, _) = micro_loss(self, inputs, false, false);
        (loss, correct)
    }

    fn counts_correct(&self) -> bool {
        matches!(self.net, Net::Cls(_))
    }

    fn embed(&self, inputs: &[Tensor]) -> Tensor {
        let types = match inputs {
            [_, types, _, _] => Some(types),
            _ => None,
        };
        self.encoder().embeddings.forward(&inputs[0], types)
    }

    fn block(&self, i: usize, h: &Tensor, inputs: &[Tensor]) -> Tensor {
        let mask = match inputs {
            [_, _, mask, _] => Some(Encoder::attention_bias(mask)),
            _ => None,
        };
        self.encoder().layers[i].forward(h, mask.as_ref())
    }

    fn head_rows(&self, h: &Tensor, inputs: &[Tensor]) -> (Tensor, Tensor) {
        let labels = &inputs[inputs.len() - 1];
        match self.net {
            Net::Mlm(_) => (h.reshape([-1, h.size()[2]]), labels.reshape([-1])),
            Net::Cls(_) => (h.select(1, 0), labels.shallow_clone()),
        }
    }

    fn rows_to_hidden(&self, g: &Tensor, h_size: &[i64]) -> Tensor {
        match self.net {
            Net::Mlm(_) => g.reshape(h_size),
            Net::Cls(_) => {
                let h = Tensor::zeros(h_size, (g.kind(), g.device()));
                h.select(1, 0).copy_(g);
                h
            }
        }
    }

    fn head(&self, rows: &Tensor) -> Tensor {
        match &self.net {
            Net::Mlm(m) => m.head(rows),
            Net::Cls(c) => c.head(&rows.unsqueeze(1)),
        }
    }

    // `bert.embeddings.*`, each `bert.encoder.layer.N.*`, the head; with the masked-LM head,
    // whose decoder reads the word table, the table is shared (its gradient sums both parts).
    fn groups(&self, names: &[String]) -> Result<Groups> {
        let tied = matches!(self.net, Net::Mlm(_));
        Groups::by(names, self.encoder().layers.len(), |name| {
            if tied && name.starts_with("bert.embeddings.word_embeddings.") {
                Part::Shared
            } else if name.starts_with("bert.embeddings.") {
                Part::Embed
            } else if let Some(rest) = name.strip_prefix("bert.encoder.layer.") {
                Part::Block(rest.split('.').next().and_then(|b| b.parse().ok()))
            } else {
                Part::Head
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// The config and shape of a tiny encoder (vocabulary 50, width 16, 2 blocks).
    fn tiny_encoder() -> (Config, EncoderConfig) {
        let mut cfg = Config::default();
        cfg.model.kind = crate::config::ModelKind::Encoder;
        cfg.model.size = "encoder-tiny".into();
        (cfg, EncoderConfig::new(50, 16, 2, 2, 32, 32))
    }

    /// Guarantee: a classifier built over a masked-LM checkpoint takes its encoder body (every
    /// `bert.embeddings.*` / `bert.encoder.*` tensor, equal to the file's) and keeps its own
    /// fresh pooler and classifier; a file without the body is an error naming a tensor.
    #[test]
    fn pretrained_body_loads_and_the_head_is_new() {
        let dir = tempfile::tempdir().unwrap();
        let (mut cfg, shape) = tiny_encoder();
        let file = dir.path().join("model.safetensors");
        let mlm = EncoderModel::new(&cfg.model_build(), &shape, None, tch::Device::Cpu).unwrap();
        mlm.save(&file).unwrap();
        cfg.train.seed = 9;
        let mut cls =
            EncoderModel::new(&cfg.model_build(), &shape, Some(3), tch::Device::Cpu).unwrap();
        // The classifier's own values before loading (copies: loading writes in place). Not a
        // second model built from the same seed: libtorch's generator is shared with the tests
        // that run beside this one, so two builds need not draw the same values.
        let before: Vec<(String, tch::Tensor)> = frugal_models::weights::named_variables(&cls.vs)
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect();
        cls.load_pretrained(&file).unwrap();
        let want = frugal_models::weights::named_variables(&mlm.vs);
        let mut body = 0;
        for ((n, t), (n0, t0)) in frugal_models::weights::named_variables(&cls.vs)
            .iter()
            .zip(&before)
        {
            assert_eq!(n, n0);
            if n.starts_with("bert.embeddings.") || n.starts_with("bert.encoder.") {
                let (_, w) = want.iter().find(|(m, _)| m == n).unwrap();
                assert!(t.equal(w), "{n} not loaded");
                body += 1;
            } else {
                assert!(
                    n.starts_with("bert.pooler.") || n.starts_with("classifier."),
                    "{n}"
                );
                assert!(t.equal(t0), "{n} changed");
            }
        }
        assert_eq!(body, 5 + 2 * 16);
        let empty = dir.path().join("empty.safetensors");
        frugal_core::safetensors_io::save(
            &empty,
            &[(
                "x".to_string(),
                Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)),
            )],
            None,
        )
        .unwrap();
        let err = cls.load_pretrained(&empty).unwrap_err().to_string();
        assert!(err.contains("bert."), "{err}");
    }

    /// Guarantee: padding a classification batch further (what `train.cuda_graph` does, to
    /// give every batch one shape) changes neither the loss nor the count of right answers:
    /// the padding is masked out of attention and the pooler reads the first token.
    #[test]
    fn longer_padding_keeps_the_classification_loss() {
        let (cfg, shape) = tiny_encoder();
        let m = EncoderModel::new(&cfg.model_build(), &shape, Some(3), tch::Device::Cpu).unwrap();
        // Two examples of 5 and 3 tokens, padded to 5 and to 12 (pad id 0).
        let rows: [&[i64]; 2] = [&[2, 7, 9, 11, 3], &[2, 8, 3]];
        let batch = |len: usize| -> Vec<Tensor> {
            let (mut ids, mut types, mut mask) = (vec![], vec![], vec![]);
            for r in rows {
                for j in 0..len {
                    ids.push(r.get(j).copied().unwrap_or(0));
                    types.push(i64::from(j >= 2 && j < r.len()));
                    mask.push(i64::from(j < r.len()));
                }
            }
            let shape = [2, len as i64];
            vec![
                Tensor::from_slice(&ids).view(shape),
                Tensor::from_slice(&types).view(shape),
                Tensor::from_slice(&mask).view(shape),
                Tensor::from_slice(&[1i64, 2]),
            ]
        };
        let (short, short_ok, _) = micro_loss(&m, &batch(5), false, false);
        let (long, long_ok, _) = micro_loss(&m, &batch(12), false, true);
        let (a, b) = (short.double_value(&[]), long.double_value(&[]));
        assert!(a.is_finite() && (a - b).abs() < 1e-6, "{a} vs {b}");
        assert!(short_ok.unwrap().equal(&long_ok.unwrap()));
    }

    /// Guarantee: the encoder runs block by block ([`crate::step`]) with the plain pass's loss,
    /// gradients and examples right, for masked LM (whose head reads the word table: a shared
    /// gradient summed over head and embedding) and classification (the head over each
    /// example's first token, padding masked), under every plan: checkpointing, a chunked
    /// cross-entropy, gradients announced block by block, and per-layer updates.
    #[test]
    fn block_by_block_gives_the_plain_gradients() {
        let (cfg, shape) = tiny_encoder();
        let ids =
            Tensor::from_slice(&(0..24).map(|i| (i * 7) % 50).collect::<Vec<i64>>()).view([2, 12]);
        let labels = ids.where_self(
            &Tensor::from_slice(&(0..24).map(|i| i % 5 == 1).collect::<Vec<bool>>()).view([2, 12]),
            &Tensor::full([2, 12], IGNORE_INDEX, (Kind::Int64, tch::Device::Cpu)),
        );
        let types =
            Tensor::from_slice(&(0..24).map(|i| i64::from(i % 12 >= 6)).collect::<Vec<_>>())
                .view([2, 12]);
        let mask = Tensor::from_slice(&(0..24).map(|i| i64::from(i < 20)).collect::<Vec<_>>())
            .view([2, 12]);
        for (num_labels, inputs) in [
            (None, vec![ids.shallow_clone(), labels]),
            (
                Some(3),
                vec![ids, types, mask, Tensor::from_slice(&[1i64, 2])],
            ),
        ] {
            let m = EncoderModel::new(&cfg.model_build(), &shape, num_labels, tch::Device::Cpu)
                .unwrap();
            let params = frugal_models::weights::named_variables(&m.vs);
            let names: Vec<String> = params.iter().map(|(n, _)| n.clone()).collect();
            let shared = matches!(m.net, Net::Mlm(_));
            let groups = m.groups(&names).unwrap();
            assert_eq!(groups.shared.len(), usize::from(shared));
            crate::step::tests::plans_give_the_plain_gradients(&m, &params, &groups, &inputs);
        }
    }

    /// Guarantee: the masked-LM loss over every position (the form a CUDA graph records) equals
    /// the loss over the selected positions, and so do the gradients it leaves.
    #[test]
    fn all_rows_mlm_loss_equals_the_selected_rows_loss() {
        let (cfg, shape) = tiny_encoder();
        let m = EncoderModel::new(&cfg.model_build(), &shape, None, tch::Device::Cpu).unwrap();
        let ids =
            Tensor::from_slice(&(0..24).map(|i| (i * 7) % 50).collect::<Vec<i64>>()).view([2, 12]);
        let labels = ids.where_self(
            &Tensor::from_slice(&(0..24).map(|i| i % 5 == 1).collect::<Vec<bool>>()).view([2, 12]),
            &Tensor::full([2, 12], IGNORE_INDEX, (Kind::Int64, tch::Device::Cpu)),
        );
        let params = frugal_models::weights::named_variables(&m.vs);
        let grads = |recordable: bool| -> (f64, Vec<Tensor>) {
            for (_, p) in &params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            let inputs = [ids.shallow_clone(), labels.shallow_clone()];
            let (loss, _, _) = micro_loss(&m, &inputs, false, recordable);
            loss.backward();
            let g = params.iter().map(|(_, p)| p.grad().copy()).collect();
            (loss.double_value(&[]), g)
        };
        let ((a, ga), (b, gb)) = (grads(false), grads(true));
        assert!(a.is_finite() && (a - b).abs() < 1e-6, "{a} vs {b}");
        for ((n, _), (x, y)) in params.iter().zip(ga.iter().zip(&gb)) {
            let d = (x - y).abs().max().double_value(&[]);
            assert!(d < 1e-6, "{n}: gradients differ by {d}");
        }
    }
}
