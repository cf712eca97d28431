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

use crate::linear::Linear;
use frugal_core::safetensors_io::{self, SafetensorsFile};
use frugal_core::{Error, Result};
use frugal_quant::layer::QuantizedWeight;
use frugal_tt::TtLinear;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use tch::{nn::VarStore, Device, Kind, Tensor};

/// The safetensors metadata key that describes the file's TT layers: a JSON object from layer
/// name (`model.layers.0.mlp.up_proj`) to its [`TtInfo`].
pub const TT_METADATA_KEY: &str = "tt_layers";

/// A TT layer as a file describes it: `W` `(out, in)` with `Wᵀ` reshaped to
/// `(in_modes..., out_modes...)` a tensor train of the given ranks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtInfo {
    /// The input modes (they multiply to `in`).
    pub in_modes: Vec<i64>,
    /// The output modes (they multiply to `out`).
    pub out_modes: Vec<i64>,
    /// The TT ranks `[1, r_1, ..., 1]`, one more than the modes.
    pub ranks: Vec<i64>,
    /// The dtype of the dense weight the cores replace (`f32`, `bf16`, `f16`, `f64`), which
    /// `frugal decompress` restores; absent: `f32`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
}

impl TtInfo {
    /// The description of `layer` (its current ranks).
    pub fn of(layer: &TtLinear) -> Self {
        TtInfo {
            in_modes: layer.in_modes().to_vec(),
            out_modes: layer.out_modes().to_vec(),
            ranks: layer.ranks(),
            dtype: None,
        }
    }

    /// The modes, input then output (one per core).
    pub fn modes(&self) -> Vec<i64> {
        self.in_modes
            .iter()
            .chain(&self.out_modes)
            .copied()
            .collect()
    }

    /// The dense shape `(out, in)`.
    pub fn dense_shape(&self) -> Vec<i64> {
        vec![
            self.out_modes.iter().product(),
            self.in_modes.iter().product(),
        ]
    }

    /// The shape of core `k`: `(r_k, n_k, r_{k+1})`.
    pub fn core_shape(&self, k: usize) -> Vec<i64> {
        vec![self.ranks[k], self.modes()[k], self.ranks[k + 1]]
    }

    /// The number of core parameters `sum_k r_k n_k r_{k+1}`.
    pub fn num_params(&self) -> i64 {
        (0..self.in_modes.len() + self.out_modes.len())
            .map(|k| self.core_shape(k).iter().product::<i64>())
            .sum()
    }

    /// Checks that the modes and ranks fit together (at least 2 modes per side, one rank more
    /// than the modes, end ranks 1); the error names `what`.
    pub fn check(&self, what: &str) -> Result<()> {
        let d = self.in_modes.len() + self.out_modes.len();
        let ok = self.in_modes.len() >= 2
            && self.out_modes.len() >= 2
            && self.ranks.len() == d + 1
            && self.ranks.first() == Some(&1)
            && self.ranks.last() == Some(&1)
            && self.modes().iter().chain(&self.ranks).all(|&x| x >= 1);
        if ok {
            Ok(())
        } else {
            Err(Error::Msg(format!(
                "{what}: TT description with input modes {:?}, output modes {:?} and ranks {:?} \
                 is inconsistent (at least 2 modes per side, one rank more than the modes, end \
                 ranks 1)",
                self.in_modes, self.out_modes, self.ranks
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
    let d = info.ranks.len() - 1;
    let cores = (0..d)
        .map(|k| file.tensor(&tt_core_name(prefix, k), Device::Cpu))
        .collect::<Result<Vec<_>>>()?;
    let rank_vars = read_rank_vars(file, prefix, d)?;
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

/// Saves every variable of `vs` to `path` (atomically, f32 as held).
pub fn save(vs: &VarStore, path: &Path) -> Result<()> {
    safetensors_io::save(path, &named_variables(vs), None)
}

/// Saves every variable of `vs` and the packed weights of the quantized layers among
/// `linears` (name, layer) to `path`, atomically; the TT layers among them are described in
/// the metadata ([`TT_METADATA_KEY`]).
pub fn save_model(vs: &VarStore, linears: &[(String, &dyn Linear)], path: &Path) -> Result<()> {
    let mut tensors = named_variables(vs);
    let mut tt = BTreeMap::new();
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
                return Err(Error::Msg(format!(
                    "{}: '{module}' is stored as {cores} tensor-train cores ('{core0}', ...), \
                     not as '{name}': set model.linear = {{ kind = \"tt\", order = {} }} to load \
                     it as it is, or restore dense weights with `frugal decompress`",
                    path.display(),
                    cores / 2
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
    let has = |n: &str| names.binary_search_by(|x| x.as_str().cmp(n)).is_ok();
    let modes: Vec<i64> = layer
        .in_modes()
        .iter()
        .chain(layer.out_modes())
        .copied()
        .collect();
    let d = modes.len();
    if has(&tt_core_name(name, 0)) {
        let in_file = (0..).take_while(|&k| has(&tt_core_name(name, k))).count();
        let cores = (0..in_file)
            .map(|k| file.tensor(&tt_core_name(name, k), Device::Cpu))
            .collect::<Result<Vec<_>>>()?;
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
        let rank_vars = match read_rank_vars(file, name, d)? {
            Some(v) => v,
            None => (1..d)
                .map(|k| Tensor::ones([cores[k].size()[0]], (Kind::Float, Device::Cpu)))
                .collect(),
        };
        return Ok(TtSource { cores, rank_vars });
    }
    let key = format!("{name}.weight");
    if !has(&key) {
        return Err(Error::MissingTensor {
            path: path.to_path_buf(),
            name: tt_core_name(name, 0),
        });
    }
    let dense = file.tensor(&key, Device::Cpu)?;
    let want = vec![layer.out_dim(), layer.in_dim()];
    if dense.size() != want {
        return Err(Error::Msg(format!(
            "{}: tensor '{key}' has shape {:?}, the model's TT layer expects {want:?}",
            path.display(),
            dense.size()
        )));
    }
    let max_rank = layer.ranks().into_iter().max().unwrap_or(1);
    let tmp = VarStore::new(Device::Cpu);
    let converted = TtLinear::from_dense(
        &tmp.root(),
        &dense.to_kind(Kind::Float),
        None,
        layer.in_modes(),
        layer.out_modes(),
        Some(max_rank),
        eps,
        Kind::Float,
    )
    .map_err(|e| {
        Error::Msg(format!(
            "{}: converting dense '{key}' to TT cores: {e}",
            path.display()
        ))
    })?;
    let ranked = converted.ranked();
    Ok(TtSource {
        cores: ranked.cores().iter().map(|c| c.detach().copy()).collect(),
        rank_vars: ranked
            .rank_vars()
            .iter()
            .map(|c| c.detach().copy())
            .collect(),
    })
}

/// Gives TT layer `name` the cores and rank variables of `src`: copied into its variables when
/// the shapes are the same, else the layer's variables are replaced in `vs` by new ones of the
/// new shapes, under the same names (a pruned checkpoint; the new variables are trainable and
/// come after the others among `vs`'s trainable variables).
fn apply_tt(vs: &VarStore, name: &str, layer: &mut TtLinear, src: TtSource) -> Result<()> {
    let ranked = layer.ranked();
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
        return tch::no_grad(|| -> Result<()> {
            for (var, t) in ranked.cores().iter().zip(&src.cores) {
                var.shallow_clone().f_copy_(t)?;
            }
            for (var, t) in ranked.rank_vars().iter().zip(&src.rank_vars) {
                var.shallow_clone().f_copy_(t)?;
            }
            Ok(())
        });
    }
    let mut old: Vec<(String, Tensor)> = ranked
        .core_names()
        .iter()
        .cloned()
        .zip(ranked.cores().iter().map(Tensor::shallow_clone))
        .chain(
            ranked
                .rank_var_names()
                .iter()
                .cloned()
                .zip(ranked.rank_vars().iter().map(Tensor::shallow_clone)),
        )
        .collect();
    let bias = layer.bias().map(|b| b.detach().copy());
    if let Some(b) = layer.bias() {
        old.push((format!("{name}.bias"), b.shallow_clone()));
    }
    {
        let mut vars = vs
            .variables_
            .lock()
            .map_err(|_| Error::Msg("var store lock poisoned".into()))?;
        for (n, t) in &old {
            vars.named_variables.remove(n);
            let (ptr, size) = (t.data_ptr(), t.size());
            vars.trainable_variables
                .retain(|v| !(v.tensor.data_ptr() == ptr && v.tensor.size() == size));
        }
    }
    let mut path = vs.root();
    for part in name.split('.') {
        path = path.sub(part);
    }
    let threshold = layer.ranked().threshold();
    let mut new = TtLinear::from_cores(
        &path,
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
    let file = SafetensorsFile::open(path)?;
    let names = file.names();
    let mut replacements = Vec::new();
    let mut tt_sources = Vec::new();
    let mut tt_vars = HashSet::new();
    for (i, (name, layer)) in linears.iter().enumerate() {
        if let Some(t) = layer.tt() {
            tt_sources.push((i, tt_source(&file, &names, name, t, layer.tt_eps(), path)?));
            let ranked = t.ranked();
            tt_vars.extend(ranked.core_names().iter().cloned());
            tt_vars.extend(ranked.rank_var_names().iter().cloned());
            continue;
        }
        let Some(q) = layer.quantized() else {
            continue;
        };
        let want = vec![q.out_features as i64, q.in_features as i64];
        let has = |key: &str| names.binary_search_by(|n| n.as_str().cmp(key)).is_ok();
        let get = |key: &str| file.tensor(key, tch::Device::Cpu).ok();
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
        replacements.push((i, weight));
    }
    let vars: Vec<(String, Tensor)> = named_variables(vs)
        .into_iter()
        .filter(|(n, _)| !tt_vars.contains(n))
        .collect();
    check_variables(&vars, &file, path)?;
    for (i, src) in tt_sources {
        let (name, layer) = &mut linears[i];
        if let Some(t) = layer.tt_mut() {
            apply_tt(vs, name, t, src)?;
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
