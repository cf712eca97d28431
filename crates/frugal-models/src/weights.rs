//! Loading and saving a model's weights as safetensors, with shape checks that name the tensor
//! and the file: the variables of its `VarStore`, and the frozen quantized weights of its
//! quantized linear layers (stored in their format's layout, see `docs/formats.md`).

use crate::linear::Linear;
use frugal_core::safetensors_io::{self, SafetensorsFile};
use frugal_core::{Error, Result};
use frugal_quant::layer::QuantizedWeight;
use std::path::Path;
use tch::{nn::VarStore, Kind, Tensor};

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
/// `linears` (name, layer) to `path`, atomically.
pub fn save_model(vs: &VarStore, linears: &[(String, &dyn Linear)], path: &Path) -> Result<()> {
    let mut tensors = named_variables(vs);
    for (name, layer) in linears {
        if let Some(q) = layer.quantized() {
            tensors.extend(q.weight.to_tensors(name));
        }
    }
    safetensors_io::save(path, &tensors, None)
}

/// Copies every variable of `vs` from `path`. A missing tensor or another shape is an error
/// naming the tensor, the file and both shapes; nothing is half-loaded on a shape error
/// (shapes are checked before any copy).
pub fn load(vs: &mut VarStore, path: &Path) -> Result<()> {
    let file = SafetensorsFile::open(path)?;
    load_variables(vs, &file, path)
}

fn load_variables(vs: &mut VarStore, file: &SafetensorsFile, path: &Path) -> Result<()> {
    let vars = named_variables(vs);
    let names = file.names();
    for (name, var) in &vars {
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
    let device = vs.device();
    tch::no_grad(|| -> Result<()> {
        for (name, var) in &vars {
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

/// Loads a model: the variables of `vs` (as [`load`]) and, for every quantized layer among
/// `linears`, its weight: read as stored when the file holds a quantized weight for it (any
/// supported format, whatever the layer was built with), else quantized from the file's dense
/// `NAME.weight` in the layer's format. Every layer is read before any is replaced, so an
/// error leaves the quantized layers as they were.
pub fn load_model(
    vs: &mut VarStore,
    linears: &mut [(String, &mut Box<dyn Linear>)],
    path: &Path,
) -> Result<()> {
    let file = SafetensorsFile::open(path)?;
    let names = file.names();
    let mut replacements = Vec::new();
    for (i, (name, layer)) in linears.iter().enumerate() {
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
    load_variables(vs, &file, path)?;
    for (i, weight) in replacements {
        if let Some(q) = linears[i].1.quantized_mut() {
            q.weight = weight;
        }
    }
    Ok(())
}
