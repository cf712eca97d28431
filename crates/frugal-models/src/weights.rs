//! Loading and saving a model's weights as safetensors, with shape checks that name the tensor
//! and the file: the variables of its `VarStore`, the frozen quantized weights of its quantized
//! linear layers (stored in their format's layout, see `docs/formats.md`), and the cores of its
//! tensor-train layers.
//!
//! A TT layer `NAME` is stored as its variables `NAME.cores.{k}` (shape `(r_k, n_k, r_{k+1})`,
//! the input modes first) and `NAME.rank_vars.{i}`, and described in the file's metadata under
//! [`TT_METADATA_KEY`] (a JSON object from layer name to [`TtInfo`]: modes, ranks), so that
//! `frugal decompress` and `frugal inspect` need no model. Loading into a TT layer takes the
//! file's cores whatever their ranks (a pruned checkpoint has smaller ones), or converts a dense
//! `NAME.weight` by TT-SVD at the layer's ranks.

use crate::embedding::WordEmbedding;
use crate::linear::Linear;
use frugal_core::safetensors_io::{self, SafetensorsFile};
use frugal_core::{Error, Result};
use frugal_quant::layer::QuantizedWeight;
use frugal_tt::{RankedCores, TtEmbedding, TtLinear};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use tch::{nn::VarStore, Device, Kind, Tensor};

/// The safetensors metadata key that describes the file's TT layers: a JSON object from layer
/// name (`model.layers.0.mlp.up_proj`) to its [`TtInfo`].
pub const TT_METADATA_KEY: &str = "tt_layers";

/// A TT layer as a file describes it: `W` `(out, in)` with `Wᵀ` reshaped to
/// `(in_modes..., out_modes...)` a tensor train of the given ranks; or, with `vocab` set, a
/// TT-matrix word table `(vocab, dim)` whose core `k` has shape `(r_k, m_k, n_k, r_{k+1})`,
/// `m` the padded vocabulary's modes (`in_modes`) and `n` the dimension's (`out_modes`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtInfo {
    /// The input modes (they multiply to `in`); of a table, the padded vocabulary's modes.
    pub in_modes: Vec<i64>,
    /// The output modes (they multiply to `out`); of a table, the dimension's modes.
    pub out_modes: Vec<i64>,
    /// The TT ranks `[1, r_1, ..., 1]`, one more than the cores.
    pub ranks: Vec<i64>,
    /// The dtype of the dense weight the cores replace (`f32`, `bf16`, `f16`, `f64`), which
    /// `frugal decompress` restores; absent: `f32`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// Set for a TT-matrix embedding table: its vocabulary (rows past it are padding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab: Option<i64>,
}

impl TtInfo {
    /// The description of `layer` (its current ranks).
    pub fn of(layer: &TtLinear) -> Self {
        TtInfo {
            in_modes: layer.in_modes().to_vec(),
            out_modes: layer.out_modes().to_vec(),
            ranks: layer.ranks(),
            dtype: None,
            vocab: None,
        }
    }

    /// The description of TT table `table` (its current ranks).
    pub fn of_table(table: &TtEmbedding) -> Self {
        TtInfo {
            in_modes: table.vocab_modes(),
            out_modes: table.dim_modes(),
            ranks: table.ranks(),
            dtype: None,
            vocab: Some(table.vocab()),
        }
    }

    /// The number of cores.
    pub fn n_cores(&self) -> usize {
        match self.vocab {
            Some(_) => self.in_modes.len(),
            None => self.in_modes.len() + self.out_modes.len(),
        }
    }

    /// The modes, input then output (one per core of a layer; of a table, the vocabulary's then
    /// the dimension's).
    pub fn modes(&self) -> Vec<i64> {
        self.in_modes
            .iter()
            .chain(&self.out_modes)
            .copied()
            .collect()
    }

    /// The dense shape: `(out, in)`, or a table's `(vocab, dim)`.
    pub fn dense_shape(&self) -> Vec<i64> {
        let (rows, cols) = (
            self.in_modes.iter().product(),
            self.out_modes.iter().product(),
        );
        match self.vocab {
            Some(vocab) => vec![vocab, cols],
            None => vec![cols, rows],
        }
    }

    /// The shape of core `k`: `(r_k, n_k, r_{k+1})`, or a table's `(r_k, m_k, n_k, r_{k+1})`.
    pub fn core_shape(&self, k: usize) -> Vec<i64> {
        match self.vocab {
            Some(_) => vec![
                self.ranks[k],
                self.in_modes[k],
                self.out_modes[k],
                self.ranks[k + 1],
            ],
            None => vec![self.ranks[k], self.modes()[k], self.ranks[k + 1]],
        }
    }

    /// The number of core parameters `sum_k r_k n_k r_{k+1}`.
    pub fn num_params(&self) -> i64 {
        (0..self.n_cores())
            .map(|k| self.core_shape(k).iter().product::<i64>())
            .sum()
    }

    /// Checks that the modes and ranks fit together (at least 2 modes per side, as many of
    /// each for a table, whose vocabulary fits its modes; one rank more than the cores, end
    /// ranks 1); the error names `what`.
    pub fn check(&self, what: &str) -> Result<()> {
        let d = self.n_cores();
        let table_ok = match self.vocab {
            Some(v) => {
                self.in_modes.len() == self.out_modes.len()
                    && v >= 1
                    && v <= self.in_modes.iter().product::<i64>()
            }
            None => true,
        };
        let ok = table_ok
            && self.in_modes.len() >= 2
            && self.out_modes.len() >= 2
            && self.ranks.len() == d + 1
            && self.ranks.first() == Some(&1)
            && self.ranks.last() == Some(&1)
            && self.modes().iter().chain(&self.ranks).all(|&x| x >= 1);
        if ok {
            Ok(())
        } else {
            Err(Error::Msg(format!(
                "{what}: TT description with input modes {:?}, output modes {:?}, ranks {:?}{} \
                 is inconsistent (at least 2 modes per side, one rank more than the cores, end \
                 ranks 1; a table has as many vocabulary as dimension modes and a vocabulary \
                 that fits them)",
                self.in_modes,
                self.out_modes,
                self.ranks,
                self.vocab
                    .map(|v| format!(" and vocabulary {v}"))
                    .unwrap_or_default()
            )))
        }
    }
}

/// The name of core `k` of TT layer `prefix`: `{prefix}.cores.{k}`.
pub fn tt_core_name(prefix: &str, k: usize) -> String {
    format!("{prefix}.cores.{k}")
}

/// The name of rank variable `i` of TT layer `prefix`: `{prefix}.rank_vars.{i}`.
pub fn tt_rank_var_name(prefix: &str, i: usize) -> String {
    format!("{prefix}.rank_vars.{i}")
}

/// The metadata entry that describes `layers` (name, description), to pass to
/// `safetensors_io::save`.
pub fn tt_metadata(layers: &BTreeMap<String, TtInfo>) -> HashMap<String, String> {
    let mut meta = HashMap::new();
    if !layers.is_empty() {
        meta.insert(
            TT_METADATA_KEY.to_string(),
            serde_json::to_string(layers).expect("TT metadata serializes"),
        );
    }
    meta
}

/// The TT layers `file` describes in its metadata (empty when it has none). A description
/// that does not parse, or whose cores are missing or of other shapes, is an error naming the
/// file and the tensor.
pub fn read_tt_metadata(file: &SafetensorsFile) -> Result<BTreeMap<String, TtInfo>> {
    let Some(text) = file.metadata().remove(TT_METADATA_KEY) else {
        return Ok(BTreeMap::new());
    };
    let layers: BTreeMap<String, TtInfo> = serde_json::from_str(&text).map_err(|e| {
        Error::Msg(format!(
            "{}: metadata '{TT_METADATA_KEY}' is not a valid TT description ({e})",
            file.path().display()
        ))
    })?;
    for (prefix, info) in &layers {
        info.check(&format!("{}: {prefix}", file.path().display()))?;
        for k in 0..info.ranks.len() - 1 {
            let name = tt_core_name(prefix, k);
            let (shape, _) = file.info(&name)?;
            if shape != info.core_shape(k) {
                return Err(Error::Shape {
                    name: format!("{}: {name}", file.path().display()),
                    expected: info.core_shape(k),
                    got: shape,
                });
            }
        }
    }
    Ok(layers)
}

/// The layer prefixes of `names` that hold TT cores (`{prefix}.cores.0`).
pub fn tt_prefixes(names: &[String]) -> Vec<String> {
    names
        .iter()
        .filter_map(|n| n.strip_suffix(".cores.0").map(str::to_string))
        .collect()
}

/// Reads TT layer `prefix` of `file` into a [`TtLinear`] on the CPU (in a throw-away var
/// store), rank variables applied when the file has them; its `to_dense()` is the weight.
pub fn read_tt_layer(file: &SafetensorsFile, prefix: &str, info: &TtInfo) -> Result<TtLinear> {
    let (cores, rank_vars) = read_tt_cores(file, prefix, info)?;
    let vs = VarStore::new(Device::Cpu);
    TtLinear::from_cores(
        &vs.root(),
        info.in_modes.len(),
        cores,
        rank_vars,
        None,
        Kind::Float,
    )
    .map_err(|e| Error::Msg(format!("{}: {prefix}: {e}", file.path().display())))
}

/// The cores and rank variables (when the file has them) of TT layer or table `prefix`.
fn read_tt_cores(
    file: &SafetensorsFile,
    prefix: &str,
    info: &TtInfo,
) -> Result<(Vec<Tensor>, Option<Vec<Tensor>>)> {
    let d = info.n_cores();
    let cores = (0..d)
        .map(|k| file.tensor(&tt_core_name(prefix, k), Device::Cpu))
        .collect::<Result<Vec<_>>>()?;
    Ok((cores, read_rank_vars(file, prefix, d)?))
}

/// The dense weight `(out, in)` (or table `(vocab, dim)`) that TT layer `prefix` of `file`
/// stands for, f32, rank variables applied when the file has them.
pub fn read_tt_dense(file: &SafetensorsFile, prefix: &str, info: &TtInfo) -> Result<Tensor> {
    let Some(vocab) = info.vocab else {
        let layer = read_tt_layer(file, prefix, info)?;
        return Ok(tch::no_grad(|| layer.to_dense()));
    };
    let (cores, rank_vars) = read_tt_cores(file, prefix, info)?;
    let vs = VarStore::new(Device::Cpu);
    let table = TtEmbedding::from_cores(&vs.root(), vocab, cores, rank_vars, Kind::Float)
        .map_err(|e| Error::Msg(format!("{}: {prefix}: {e}", file.path().display())))?;
    Ok(tch::no_grad(|| table.to_dense()))
}

/// The rank variables of a `d`-core layer `prefix` in `file`: all `d - 1`, or None when the
/// file has none (ones); some but not all is an error naming the missing one.
fn read_rank_vars(file: &SafetensorsFile, prefix: &str, d: usize) -> Result<Option<Vec<Tensor>>> {
    let names = file.names();
    let has = |n: &str| names.binary_search_by(|x| x.as_str().cmp(n)).is_ok();
    let present: Vec<bool> = (0..d - 1)
        .map(|i| has(&tt_rank_var_name(prefix, i)))
        .collect();
    if !present.iter().any(|&p| p) {
        return Ok(None);
    }
    (0..d - 1)
        .map(|i| file.tensor(&tt_rank_var_name(prefix, i), Device::Cpu))
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// The variables of `vs`, sorted by name.
pub fn named_variables(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Makes `dst` hold every variable of `src` under its name: a variable `src` has under a name
/// `dst` also has, but as another tensor (a TT layer that loading into `src`, a view of `dst`'s
/// tensors, replaced by one of other ranks), replaces `dst`'s, which is dropped from its
/// trainable variables; names only `src` has are added, trainable.
pub fn adopt_variables(dst: &VarStore, src: VarStore) -> Result<()> {
    let poisoned = |_| Error::Msg("var store lock poisoned".into());
    let mut theirs = src.variables_.lock().map_err(poisoned)?;
    let mut trainable = std::mem::take(&mut theirs.trainable_variables);
    let mut ours = dst.variables_.lock().map_err(poisoned)?;
    for (name, t) in &theirs.named_variables {
        let same = ours
            .named_variables
            .get(name)
            .is_some_and(|o| o.data_ptr() == t.data_ptr() && o.size() == t.size());
        if same {
            continue;
        }
        forget_variable(&mut ours, name);
        ours.named_variables.insert(name.clone(), t.shallow_clone());
        if let Some(i) = trainable
            .iter()
            .position(|v| v.tensor.data_ptr() == t.data_ptr())
        {
            ours.trainable_variables.push(trainable.swap_remove(i));
        }
    }
    Ok(())
}

/// Saves every variable of `vs` to `path` (atomically, f32 as held).
pub fn save(vs: &VarStore, path: &Path) -> Result<()> {
    safetensors_io::save(path, &named_variables(vs), None)
}

/// Saves every variable of `vs` and the packed weights of the quantized layers among
/// `linears` (name, layer) to `path`, atomically; the TT layers among them are described in
/// the metadata ([`TT_METADATA_KEY`]).
pub fn save_model(vs: &VarStore, linears: &[(String, &dyn Linear)], path: &Path) -> Result<()> {
    save_model_with_tables(vs, linears, &[], path)
}

/// [`save_model`] of a model that also has word tables (name, table): the TT ones among them
/// are described in the metadata too.
pub fn save_model_with_tables(
    vs: &VarStore,
    linears: &[(String, &dyn Linear)],
    tables: &[(String, &WordEmbedding)],
    path: &Path,
) -> Result<()> {
    let mut tensors = named_variables(vs);
    let mut tt: BTreeMap<String, TtInfo> = tables
        .iter()
        .filter_map(|(n, t)| Some((n.clone(), TtInfo::of_table(t.tt()?))))
        .collect();
    for (name, layer) in linears {
        if let Some(q) = layer.quantized() {
            tensors.extend(q.weight.to_tensors(name));
        }
        if let Some(t) = layer.tt() {
            tt.insert(name.clone(), TtInfo::of(t));
        }
    }
    safetensors_io::save(path, &tensors, Some(tt_metadata(&tt)))
}

/// Copies every variable of `vs` from `path`. A missing tensor or another shape is an error
/// naming the tensor, the file and both shapes; nothing is half-loaded on a shape error
/// (shapes are checked before any copy).
pub fn load(vs: &mut VarStore, path: &Path) -> Result<()> {
    let file = SafetensorsFile::open(path)?;
    let vars = named_variables(vs);
    check_variables(&vars, &file, path)?;
    copy_variables(&vars, &file, vs.device())
}

/// Checks that `file` holds every variable of `vars` with its shape; the error names the
/// tensor, the file and both shapes, with a hint when the file holds the weight in another
/// form (quantized, or TT cores).
fn check_variables(vars: &[(String, Tensor)], file: &SafetensorsFile, path: &Path) -> Result<()> {
    let names = file.names();
    for (name, var) in vars {
        if let Some(module) = name.strip_suffix(".weight") {
            let core0 = tt_core_name(module, 0);
            if names.binary_search(&core0).is_ok() && names.binary_search(name).is_err() {
                let cores = names
                    .iter()
                    .filter(|n| n.starts_with(&format!("{module}.cores.")))
                    .count();
                let table = file.info(&core0)?.0.len() == 4;
                let set = if table {
                    format!("model.embedding = {{ kind = \"tt\", order = {cores} }}")
                } else {
                    format!("model.linear = {{ kind = \"tt\", order = {} }}", cores / 2)
                };
                return Err(Error::Msg(format!(
                    "{}: '{module}' is stored as {cores} tensor-train cores ('{core0}', ...), \
                     not as '{name}': set {set} to load it as it is, or restore dense weights \
                     with `frugal decompress`",
                    path.display(),
                )));
            }
        }
        let (shape, _) = file.info(name)?;
        if shape != var.size() {
            let quantized = name
                .strip_suffix(".weight")
                .is_some_and(|m| quantized_in(&names, m));
            let hint = if quantized {
                " (the file holds a quantized weight: set model.linear.kind = \"quantized\")"
            } else {
                " (checkpoint of a different model shape?)"
            };
            return Err(Error::Msg(format!(
                "{}: tensor '{name}' has shape {shape:?}, the model expects {:?}{hint}",
                path.display(),
                var.size()
            )));
        }
    }
    Ok(())
}

/// Copies `vars` from `file` (shapes checked before).
fn copy_variables(vars: &[(String, Tensor)], file: &SafetensorsFile, device: Device) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        for (name, var) in vars {
            let t = file.tensor(name, device)?;
            var.shallow_clone().f_copy_(&t)?;
        }
        Ok(())
    })
}

/// Whether `names` holds a quantized weight for module `module` (a 4-bit or ternary quant
/// state, GPTQ's `qweight`, or LLM.int8's `SCB`).
fn quantized_in(names: &[String], module: &str) -> bool {
    names.iter().any(|n| {
        n.strip_prefix(module).is_some_and(|rest| {
            rest.starts_with(".weight.quant_state.") || rest == ".qweight" || rest == ".SCB"
        })
    })
}

/// New cores and rank variables for a TT layer, read or converted before anything is replaced.
struct TtSource {
    cores: Vec<Tensor>,
    rank_vars: Vec<Tensor>,
}

impl TtSource {
    /// Copies of `ranked`'s cores and rank variables.
    fn of(ranked: &RankedCores) -> Self {
        let copy = |v: &[Tensor]| v.iter().map(|c| c.detach().copy()).collect();
        TtSource {
            cores: copy(ranked.cores()),
            rank_vars: copy(ranked.rank_vars()),
        }
    }
}

/// Reads (or converts) the cores that TT layer `name` gets from `file`: the file's cores and
/// rank variables (ones when absent) whatever their ranks, as long as their modes are the
/// layer's; else a dense `name.weight`, by TT-SVD capped at the layer's largest rank and its
/// `eps` (`model.linear.eps`).
fn tt_source(
    file: &SafetensorsFile,
    names: &[String],
    name: &str,
    layer: &TtLinear,
    eps: Option<f64>,
    path: &Path,
) -> Result<TtSource> {
    let modes: Vec<i64> = layer
        .in_modes()
        .iter()
        .chain(layer.out_modes())
        .copied()
        .collect();
    let d = modes.len();
    if let Some(cores) = stored_cores(file, names, name)? {
        let in_file = cores.len();
        let file_modes: Vec<i64> = cores
            .iter()
            .map(|c| if c.dim() == 3 { c.size()[1] } else { -1 })
            .collect();
        if file_modes != modes {
            return Err(Error::Msg(format!(
                "{}: '{name}' has {in_file} TT cores over modes {file_modes:?}, the model's layer \
                 has {d} over modes {:?} | {:?} (model.linear.order = {} per side)",
                path.display(),
                layer.in_modes(),
                layer.out_modes(),
                layer.in_modes().len()
            )));
        }
        let rank_vars = rank_vars_or_ones(file, name, &cores)?;
        return Ok(TtSource { cores, rank_vars });
    }
    let dense = dense_source(file, names, name, &[layer.out_dim(), layer.in_dim()], path)?;
    let max_rank = layer.ranks().into_iter().max().unwrap_or(1);
    let tmp = VarStore::new(Device::Cpu);
    let converted = TtLinear::from_dense(
        &tmp.root(),
        &dense,
        None,
        layer.in_modes(),
        layer.out_modes(),
        Some(max_rank),
        eps,
        Kind::Float,
    )
    .map_err(|e| conversion_error(path, name, e))?;
    Ok(TtSource::of(converted.ranked()))
}

/// The TT cores `name.cores.0`, `name.cores.1`, ... that `file` (whose sorted tensor names are
/// `names`) holds, in order; None when it has no `name.cores.0`.
fn stored_cores(
    file: &SafetensorsFile,
    names: &[String],
    name: &str,
) -> Result<Option<Vec<Tensor>>> {
    let has = |n: &str| names.binary_search_by(|x| x.as_str().cmp(n)).is_ok();
    if !has(&tt_core_name(name, 0)) {
        return Ok(None);
    }
    (0..)
        .take_while(|&k| has(&tt_core_name(name, k)))
        .map(|k| file.tensor(&tt_core_name(name, k), Device::Cpu))
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// The error of converting `path`'s dense `name.weight` to TT cores.
fn conversion_error(path: &Path, name: &str, e: Error) -> Error {
    Error::Msg(format!(
        "{}: converting dense '{name}.weight' to TT cores: {e}",
        path.display()
    ))
}

/// The rank variables of the `cores.len()`-core layer `name` in `file`, ones when it has none.
fn rank_vars_or_ones(file: &SafetensorsFile, name: &str, cores: &[Tensor]) -> Result<Vec<Tensor>> {
    Ok(match read_rank_vars(file, name, cores.len())? {
        Some(v) => v,
        None => cores[1..]
            .iter()
            .map(|c| Tensor::ones([c.size()[0]], (Kind::Float, Device::Cpu)))
            .collect(),
    })
}

/// The dense `name.weight` of `file` (f32) that a TT layer or table of dense shape `want` is
/// converted from; missing (the error names the TT core the model looked for first) or of
/// another shape: an error.
fn dense_source(
    file: &SafetensorsFile,
    names: &[String],
    name: &str,
    want: &[i64],
    path: &Path,
) -> Result<Tensor> {
    let key = format!("{name}.weight");
    if names.binary_search(&key).is_err() {
        return Err(Error::MissingTensor {
            path: path.to_path_buf(),
            name: tt_core_name(name, 0),
        });
    }
    let dense = file.tensor(&key, Device::Cpu)?;
    if dense.size() != want {
        return Err(Error::Msg(format!(
            "{}: tensor '{key}' has shape {:?}, the model's TT layer expects {want:?}",
            path.display(),
            dense.size()
        )));
    }
    Ok(dense.to_kind(Kind::Float))
}

/// Copies `src` into `ranked`'s variables when the shapes are the same (returns true);
/// otherwise removes `ranked`'s variables and the variable named `extra` from `vs` (returns
/// false: the caller registers new ones, of the new shapes, under the same names).
fn copy_or_forget(
    vs: &VarStore,
    ranked: &RankedCores,
    src: &TtSource,
    extra: Option<String>,
) -> Result<bool> {
    let same = ranked.cores().len() == src.cores.len()
        && ranked.rank_vars().len() == src.rank_vars.len()
        && ranked
            .cores()
            .iter()
            .zip(&src.cores)
            .all(|(a, b)| a.size() == b.size())
        && ranked
            .rank_vars()
            .iter()
            .zip(&src.rank_vars)
            .all(|(a, b)| a.size() == b.size());
    if same {
        tch::no_grad(|| -> Result<()> {
            for (var, t) in ranked.cores().iter().zip(&src.cores) {
                var.shallow_clone().f_copy_(t)?;
            }
            for (var, t) in ranked.rank_vars().iter().zip(&src.rank_vars) {
                var.shallow_clone().f_copy_(t)?;
            }
            Ok(())
        })?;
        return Ok(true);
    }
    let mut vars = vs
        .variables_
        .lock()
        .map_err(|_| Error::Msg("var store lock poisoned".into()))?;
    for name in ranked_names(ranked).chain(extra) {
        forget_variable(&mut vars, &name);
    }
    Ok(false)
}

/// Removes the variables `names` from `vs` (names it does not have are skipped).
pub fn forget_variables(vs: &VarStore, names: &[String]) -> Result<()> {
    let mut vars = vs
        .variables_
        .lock()
        .map_err(|_| Error::Msg("var store lock poisoned".into()))?;
    for n in names {
        forget_variable(&mut vars, n);
    }
    Ok(())
}

/// Removes variable `name` from `vars`: from its names and, by tensor, from its trainable
/// variables. Nothing when there is no such name.
fn forget_variable(vars: &mut tch::nn::Variables, name: &str) {
    if let Some(old) = vars.named_variables.remove(name) {
        let (ptr, size) = (old.data_ptr(), old.size());
        vars.trainable_variables
            .retain(|v| !(v.tensor.data_ptr() == ptr && v.tensor.size() == size));
    }
}

/// The var-store names of `ranked`'s cores and rank variables.
fn ranked_names(ranked: &RankedCores) -> impl Iterator<Item = String> + '_ {
    ranked
        .core_names()
        .iter()
        .chain(ranked.rank_var_names())
        .cloned()
}

/// The var-store path of the dotted name `name`.
pub(crate) fn path_of<'a>(vs: &'a VarStore, name: &str) -> tch::nn::Path<'a> {
    let mut path = vs.root();
    for part in name.split('.') {
        path = path.sub(part);
    }
    path
}

/// Gives TT layer `name` the cores and rank variables of `src`: copied into its variables when
/// the shapes are the same, else the layer's variables are replaced in `vs` by new ones of the
/// new shapes, under the same names (a pruned checkpoint; the new variables are trainable and
/// come after the others among `vs`'s trainable variables).
fn apply_tt(vs: &VarStore, name: &str, layer: &mut TtLinear, src: TtSource) -> Result<()> {
    let bias = layer.bias().map(|b| b.detach().copy());
    let extra = layer.bias().map(|_| format!("{name}.bias"));
    if copy_or_forget(vs, layer.ranked(), &src, extra)? {
        return Ok(());
    }
    let threshold = layer.ranked().threshold();
    let mut new = TtLinear::from_cores(
        &path_of(vs, name),
        layer.in_modes().len(),
        src.cores,
        Some(src.rank_vars),
        bias,
        layer.compute_kind(),
    )?;
    new.ranked_mut().set_threshold(threshold);
    *layer = new;
    Ok(())
}

/// [`apply_tt`] for a TT table.
fn apply_tt_table(vs: &VarStore, name: &str, table: &mut TtEmbedding, src: TtSource) -> Result<()> {
    if copy_or_forget(vs, table.ranked(), &src, None)? {
        return Ok(());
    }
    let threshold = table.ranked().threshold();
    let mut new = TtEmbedding::from_cores(
        &path_of(vs, name),
        table.vocab(),
        src.cores,
        Some(src.rank_vars),
        table.compute_kind(),
    )?;
    new.ranked_mut().set_threshold(threshold);
    *table = new;
    Ok(())
}

/// Reads (or converts) the cores that TT table `name` gets from `file`: the file's cores and
/// rank variables (ones when absent) whatever their ranks, as long as their modes are the
/// table's; else a dense `name.weight` `(vocab, dim)`, by TT-SVD capped at the table's largest
/// rank and `eps` (`model.embedding.eps`).
fn tt_table_source(
    file: &SafetensorsFile,
    names: &[String],
    name: &str,
    table: &TtEmbedding,
    eps: Option<f64>,
    path: &Path,
) -> Result<TtSource> {
    let (vm, dm) = (table.vocab_modes(), table.dim_modes());
    let d = vm.len();
    if let Some(cores) = stored_cores(file, names, name)? {
        let in_file = cores.len();
        let file_modes: Vec<(i64, i64)> = cores
            .iter()
            .map(|c| match c.size()[..] {
                [_, m, n, _] => (m, n),
                _ => (-1, -1),
            })
            .collect();
        let want: Vec<(i64, i64)> = vm.iter().copied().zip(dm.iter().copied()).collect();
        if file_modes != want {
            return Err(Error::Msg(format!(
                "{}: '{name}' has {in_file} TT cores over (vocabulary, dimension) modes \
                 {file_modes:?}, the model's table has {d} over {want:?} (model.embedding.order \
                 = {d})",
                path.display(),
            )));
        }
        let rank_vars = rank_vars_or_ones(file, name, &cores)?;
        return Ok(TtSource { cores, rank_vars });
    }
    let dense = dense_source(file, names, name, &[table.vocab(), table.dim()], path)?;
    let max_rank = table.ranks().into_iter().max().unwrap_or(1);
    let tmp = VarStore::new(Device::Cpu);
    let converted = TtEmbedding::from_dense(
        &tmp.root(),
        &dense,
        &vm,
        &dm,
        Some(max_rank),
        eps,
        Kind::Float,
    )
    .map_err(|e| conversion_error(path, name, e))?;
    Ok(TtSource::of(converted.ranked()))
}

/// Loads a model: the variables of `vs` (as [`load`]); for every quantized layer among
/// `linears`, its weight: read as stored when the file holds a quantized weight for it (any
/// supported format, whatever the layer was built with), else quantized from the file's dense
/// `NAME.weight` in the layer's format; for every TT layer, its cores: the file's, whatever
/// their ranks (a pruned checkpoint's are smaller: the layer's variables are then replaced by
/// ones of the file's shapes), or converted from a dense `NAME.weight` by TT-SVD at the layer's
/// ranks (and `model.linear.eps`). Every layer is read and every shape checked before anything
/// is replaced or copied, so an error leaves the model as it was.
pub fn load_model(
    vs: &mut VarStore,
    linears: &mut [(String, &mut Box<dyn Linear>)],
    path: &Path,
) -> Result<()> {
    load_model_with_tables(vs, linears, &mut [], path)
}

/// [`load_model`] of a model that also has word tables (name, table): a TT table takes the
/// file's cores whatever their ranks (modes must match), or is converted from a dense
/// `NAME.weight` by TT-SVD at its ranks (and `model.embedding.eps`); a dense one is an ordinary
/// variable. Tensors of the file the model does not use are skipped: see
/// [`load_model_exact`] for a load that refuses them.
pub fn load_model_with_tables(
    vs: &mut VarStore,
    linears: &mut [(String, &mut Box<dyn Linear>)],
    tables: &mut [(String, &mut WordEmbedding)],
    path: &Path,
) -> Result<()> {
    load_into(vs, linears, tables, path, false)
}

/// [`load_model_with_tables`] that also refuses, before anything is copied, a file that does
/// not hold exactly the model: a layer count other than the model's (`model.layers.N`: both
/// numbers named), and any tensor the model does not consume (named, with a hint: a bias, a
/// q/k norm, an output head the config ties to the embeddings). What the model consumes is its
/// variables, its quantized layers' stored weights (every companion tensor of their format),
/// and its TT layers' and tables' cores and rank variables, or the dense weights they are
/// converted from. Tensors that hold no weights are accepted by name ([`IGNORED_TENSORS`]).
pub fn load_model_exact(
    vs: &mut VarStore,
    linears: &mut [(String, &mut Box<dyn Linear>)],
    tables: &mut [(String, &mut WordEmbedding)],
    path: &Path,
) -> Result<()> {
    load_into(vs, linears, tables, path, true)
}

/// Suffixes of tensors that checkpoints carry without weights in them, which an exact load
/// accepts and ignores: the rotary frequencies old transformers versions saved as a buffer
/// (`model.layers.N.self_attn.rotary_emb.inv_freq`).
pub const IGNORED_TENSORS: &[&str] = &[".rotary_emb.inv_freq"];

/// The stacks of numbered layers among `names`: the prefix before a `layers.N` or `layer.N`
/// segment (`model.layers`), with the number of layers (the largest N plus one).
fn layer_stacks<'a>(names: impl Iterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut stacks = BTreeMap::new();
    for name in names {
        let parts: Vec<&str> = name.split('.').collect();
        for (i, w) in parts.windows(2).enumerate() {
            let Ok(n) = w[1].parse::<usize>() else {
                continue;
            };
            if w[0] == "layers" || w[0] == "layer" {
                let count = stacks.entry(parts[..=i].join(".")).or_insert(0);
                *count = (*count).max(n + 1);
                break;
            }
        }
    }
    stacks
}

/// Checks that every stack of numbered layers of the model has as many layers in the file.
fn check_layer_counts(model: &[String], file: &[String], path: &Path) -> Result<()> {
    let in_file = layer_stacks(file.iter().map(String::as_str));
    for (prefix, n) in layer_stacks(model.iter().map(String::as_str)) {
        let f = in_file.get(&prefix).copied().unwrap_or(0);
        if f != n {
            return Err(Error::Msg(format!(
                "{}: the file holds {f} layers ({prefix}.0 to {prefix}.{}), the model {n} \
                 (num_hidden_layers = {n})",
                path.display(),
                f.saturating_sub(1)
            )));
        }
    }
    Ok(())
}

/// The error of a tensor `name` of `path` that the model does not use, with what it likely is.
fn unused_tensor(path: &Path, name: &str, model: &HashSet<String>) -> Error {
    let hint = if name == "lm_head.weight" && !model.contains(name) {
        "the config ties the output head to the word embeddings (tie_word_embeddings = true), \
         but the file holds an output head of its own"
    } else if name.ends_with(".bias") {
        "the config declares no bias there: attention_bias and mlp_bias are off, or the family \
         has none; Qwen2's are on q/k/v only"
    } else if name.contains(".q_norm.") || name.contains(".k_norm.") {
        "per-head q/k norms are Qwen3's and Gemma 3's; this config's family has none"
    } else {
        "a checkpoint of another model?"
    };
    Error::Msg(format!(
        "{}: tensor '{name}' is not used by the model ({hint})",
        path.display()
    ))
}

/// [`load_model_with_tables`], or with `exact` [`load_model_exact`]: every tensor it reads is
/// recorded as consumed, and the rest of the file is refused before anything is copied.
fn load_into(
    vs: &mut VarStore,
    linears: &mut [(String, &mut Box<dyn Linear>)],
    tables: &mut [(String, &mut WordEmbedding)],
    path: &Path,
    exact: bool,
) -> Result<()> {
    let file = SafetensorsFile::open(path)?;
    let names = file.names();
    let all_vars: Vec<String> = named_variables(vs).into_iter().map(|(n, _)| n).collect();
    if exact {
        check_layer_counts(&all_vars, &names, path)?;
    }
    let consumed = std::cell::RefCell::new(HashSet::new());
    let has = |key: &str| names.binary_search_by(|n| n.as_str().cmp(key)).is_ok();
    // What a TT layer or table `name` of `n_cores` cores took from the file.
    let tt_consumed = |name: &str, n_cores: usize| {
        let mut c = consumed.borrow_mut();
        if has(&tt_core_name(name, 0)) {
            c.extend((0..n_cores).map(|k| tt_core_name(name, k)));
            c.extend((0..n_cores.saturating_sub(1)).map(|i| tt_rank_var_name(name, i)));
        } else {
            c.insert(format!("{name}.weight"));
        }
    };
    let mut replacements = Vec::new();
    let mut tt_sources = Vec::new();
    let mut tt_vars = HashSet::new();
    let mut table_sources = Vec::new();
    for (i, (name, emb)) in tables.iter().enumerate() {
        if let Some(t) = emb.tt() {
            let src = tt_table_source(&file, &names, name, t, emb.tt_eps(), path)?;
            tt_consumed(name, src.cores.len());
            table_sources.push((i, src));
            tt_vars.extend(ranked_names(t.ranked()));
        }
    }
    for (i, (name, layer)) in linears.iter().enumerate() {
        if let Some(t) = layer.tt() {
            let src = tt_source(&file, &names, name, t, layer.tt_eps(), path)?;
            tt_consumed(name, src.cores.len());
            tt_sources.push((i, src));
            tt_vars.extend(ranked_names(t.ranked()));
            continue;
        }
        let Some(q) = layer.quantized() else {
            continue;
        };
        let want = vec![q.out_features as i64, q.in_features as i64];
        let get = |key: &str| {
            consumed.borrow_mut().insert(key.to_string());
            file.tensor(key, tch::Device::Cpu).ok()
        };
        // The weight, dense or packed, and its format's companions (`NAME.weight.absmax`,
        // `NAME.weight.quant_state.*`, LLM.int8's `NAME.weight_format`, the float-zero int4's
        // `NAME.quant_state.*`).
        consumed.borrow_mut().extend(
            names
                .iter()
                .filter(|n| {
                    n.strip_prefix(name.as_str()).is_some_and(|r| {
                        r == ".weight"
                            || r.starts_with(".weight.")
                            || r == ".weight_format"
                            || r.starts_with(".quant_state.")
                    })
                })
                .cloned(),
        );
        let weight = match QuantizedWeight::read(name, &has, get)
            .map_err(|e| Error::Msg(format!("{}: {name}: {e}", path.display())))?
        {
            Some(w) => w,
            None => {
                let key = format!("{name}.weight");
                let dense = file.tensor(&key, tch::Device::Cpu)?;
                if !dense.is_floating_point() {
                    return Err(Error::Msg(format!(
                        "{}: '{key}' is {:?}, neither a float weight nor a known quantized layout",
                        path.display(),
                        dense.kind()
                    )));
                }
                QuantizedWeight::quantize(&dense.to_kind(Kind::Float), &q.weight.format())
                    .map_err(|e| Error::Msg(format!("{}: {key}: {e}", path.display())))?
            }
        };
        if weight.shape() != want {
            return Err(Error::Shape {
                name: format!("{}: {name}", path.display()),
                expected: want,
                got: weight.shape(),
            });
        }
        layer
            .accepts(&weight)
            .map_err(|e| Error::Msg(format!("{}: {name}: {e}", path.display())))?;
        replacements.push((i, weight));
    }
    let vars: Vec<(String, Tensor)> = named_variables(vs)
        .into_iter()
        .filter(|(n, _)| !tt_vars.contains(n))
        .collect();
    check_variables(&vars, &file, path)?;
    if exact {
        let mut consumed = consumed.into_inner();
        consumed.extend(vars.iter().map(|(n, _)| n.clone()));
        let model: HashSet<String> = all_vars.into_iter().collect();
        let unused = names
            .iter()
            .find(|n| !consumed.contains(*n) && !IGNORED_TENSORS.iter().any(|s| n.ends_with(s)));
        if let Some(n) = unused {
            return Err(unused_tensor(path, n, &model));
        }
    }
    for (i, src) in tt_sources {
        let (name, layer) = &mut linears[i];
        if let Some(t) = layer.tt_mut() {
            apply_tt(vs, name, t, src)?;
        }
    }
    for (i, src) in table_sources {
        let (name, emb) = &mut tables[i];
        if let Some(t) = emb.tt_mut() {
            apply_tt_table(vs, name, t, src)?;
        }
    }
    copy_variables(&vars, &file, vs.device())?;
    for (i, weight) in replacements {
        if let Some(q) = linears[i].1.quantized_mut() {
            q.weight = weight;
        }
    }
    Ok(())
}
