//! Loading and saving a model's variables as safetensors, with shape checks that name the
//! tensor and the file.

use frugal_core::safetensors_io::{self, SafetensorsFile};
use frugal_core::{Error, Result};
use std::path::Path;
use tch::{nn::VarStore, Tensor};

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

/// Copies every variable of `vs` from `path`. A missing tensor or another shape is an error
/// naming the tensor, the file and both shapes; nothing is half-loaded on a shape error
/// (shapes are checked before any copy).
pub fn load(vs: &mut VarStore, path: &Path) -> Result<()> {
    let file = SafetensorsFile::open(path)?;
    let vars = named_variables(vs);
    for (name, var) in &vars {
        let (shape, _) = file.info(name)?;
        if shape != var.size() {
            return Err(Error::Msg(format!(
                "{}: tensor '{name}' has shape {shape:?}, the model expects {:?} (checkpoint of a different model shape?)",
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
