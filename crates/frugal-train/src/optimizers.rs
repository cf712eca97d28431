//! Builds the optimizer `optim.name` names over the model's parameters: AdamW, 8-bit AdamW or
//! Adafactor, and for `galore-*` the same with a GaLore projector on every 2-D weight that
//! `optim.galore.target_modules` matches.

use crate::config::{GaloreSettings, OptimConfig, OptimizerName};
use frugal_core::{Error, Result};
use frugal_galore::{GaloreConfig, GaloreProjector};
use frugal_optim::{Adafactor, AdafactorConfig, AdamW, AdamW8bit, AdamW8bitConfig, Optimizer};
use tch::Tensor;

/// The projector settings of `optim.galore`, seeded by `seed` (the randomized SVD's sketches).
pub fn galore_config(g: &GaloreSettings, seed: u64) -> Result<GaloreConfig> {
    let c = GaloreConfig {
        rank: g.rank as i64,
        update_proj_gap: g.update_proj_gap as i64,
        scale: g.scale,
        proj_type: g.proj_type,
        svd: g.svd.method(),
        seed,
        lazy_refresh: g.lazy_refresh,
        reproject_moments: g.reproject_moments,
        ..GaloreConfig::default()
    };
    c.validate()?;
    Ok(c)
}

/// The optimizer of section `o` (`[optim]`) over `params` (name, tensor), at learning rate
/// `lr`; `seed` (`train.seed`) seeds GaLore's randomized sketches.
pub fn build(
    o: &OptimConfig,
    seed: u64,
    params: Vec<(String, Tensor)>,
    lr: f64,
) -> Result<Box<dyn Optimizer>> {
    let projected: Vec<String> = params
        .iter()
        .filter(|(n, t)| o.projects(n, &t.size()))
        .map(|(n, _)| n.clone())
        .collect();
    if o.is_galore() && projected.is_empty() {
        return Err(Error::config(
            "optim.galore.target_modules",
            format!(
                "'{}' matches no 2-D weight of the model",
                o.galore.target_modules
            ),
        ));
    }
    let galore = if o.is_galore() {
        Some(galore_config(&o.galore, seed)?)
    } else {
        None
    };
    let projector = |name: &str| -> Result<Box<dyn frugal_galore::GradientProjector>> {
        let c = galore.clone().expect("GaLore optimizer");
        Ok(Box::new(GaloreProjector::new(c)?.with_name(name)))
    };
    macro_rules! with_projectors {
        ($opt:expr) => {{
            let mut opt = $opt;
            for name in &projected {
                opt = opt.with_projector(name, projector(name)?)?;
            }
            Box::new(opt) as Box<dyn Optimizer>
        }};
    }
    Ok(match o.base() {
        OptimizerName::Adamw => with_projectors!(AdamW::new(params, o.adamw(lr))),
        OptimizerName::Adamw8bit => with_projectors!(AdamW8bit::new(
            params,
            AdamW8bitConfig {
                lr,
                beta1: o.beta1,
                beta2: o.beta2,
                eps: o.eps,
                weight_decay: o.weight_decay,
                ..AdamW8bitConfig::default()
            }
        )),
        OptimizerName::Adafactor => with_projectors!(Adafactor::new(
            params,
            AdafactorConfig {
                lr,
                weight_decay: o.weight_decay,
                ..o.adafactor
            }
        )?),
        galore => unreachable!("{galore}: base() strips GaLore"),
    })
}
