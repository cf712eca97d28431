//! `frugal compress` (dense 2-D weights to tensor-train cores, by TT-SVD) and `frugal
//! decompress` (TT cores, and quantized weights, back to dense): files or model folders.
//!
//! A compressed weight `NAME.weight` `(out, in)` becomes the cores `NAME.cores.{k}` of
//! `frugal_tt::TtLinear` (input modes descending, output modes ascending, as
//! `model.linear.kind = "tt"` builds them), described in the file's metadata
//! (`frugal_models::weights::TT_METADATA_KEY`: modes, ranks, the original dtype), so that the
//! file loads into a TT model as it is and decompresses without one.

use crate::quantize_cmd::{copy_side_files, edit_config, model_file};
use frugal_core::safetensors_io::{self, SafetensorsFile};
use frugal_core::{atomic, Error, Result};
use frugal_models::weights::{self, TtInfo};
use frugal_tt::{balanced_modes, TtLinear};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{nn::VarStore, Device, Kind, Tensor};

/// The `config.json` key a compressed model folder records its options under.
pub const TT_CONFIG_KEY: &str = "tt_config";

/// Options of `frugal compress`: exactly one of `tt_rank` and `tt_eps`.
#[derive(Debug, Clone)]
pub struct CompressOptions {
    /// The largest TT rank of every bond.
    pub tt_rank: Option<i64>,
    /// The relative Frobenius accuracy of each TT-SVD (ranks as small as it allows).
    pub tt_eps: Option<f64>,
    /// Modes per side (fewer when a dimension has too few prime factors, at least 2).
    pub order: usize,
    /// Also compress embeddings and the output head (`embed`, `lm_head`, `wte`, `wpe` in the
    /// name).
    pub include_embeddings: bool,
}

impl CompressOptions {
    /// Checks the options; errors name the flag.
    pub fn validate(&self) -> Result<()> {
        match (self.tt_rank, self.tt_eps) {
            (Some(_), Some(_)) => {
                return Err(Error::Msg(
                    "give either --tt-rank or --tt-eps, not both".into(),
                ))
            }
            (None, None) => {
                return Err(Error::Msg(
                    "give --tt-rank R (largest rank) or --tt-eps E (relative accuracy)".into(),
                ))
            }
            (Some(r), None) if r < 1 => {
                return Err(Error::Msg(format!(
                    "--tt-rank {r}: a TT rank must be at least 1"
                )))
            }
            (None, Some(e)) if !(e.is_finite() && e > 0.0 && e < 1.0) => {
                return Err(Error::Msg(format!(
                    "--tt-eps {e}: the relative accuracy must be in (0, 1)"
                )))
            }
            _ => {}
        }
        if self.order < 2 {
            return Err(Error::Msg(format!(
                "--order {}: a TT layer needs at least 2 modes per side",
                self.order
            )));
        }
        Ok(())
    }
}

/// One converted weight of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct TtRow {
    /// The weight's name (`model.layers.0.mlp.up_proj.weight`).
    pub name: String,
    /// Its shape `(out, in)`.
    pub shape: Vec<i64>,
    /// Modes and ranks of its cores.
    pub info: TtInfo,
    /// Parameters of the dense weight.
    pub params_before: i64,
    /// Parameters of the cores.
    pub params_after: i64,
    /// `||W - W_tt||_F / ||W||_F`.
    pub rel_error: f64,
}

/// The report of a compression: the converted weights, and the tensors kept as they were.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CompressReport {
    /// One row per converted weight.
    pub rows: Vec<TtRow>,
    /// Tensors kept as they were, and their parameters.
    pub kept: usize,
    /// Parameters of the tensors kept.
    pub kept_params: i64,
}

/// The modes of one side: `dim` in `order` balanced modes, or fewer (down to 2) when `dim`
/// has too few prime factors; None when not even 2 fit.
fn side_modes(dim: i64, order: usize) -> Option<Vec<i64>> {
    (2..=order).rev().find_map(|k| balanced_modes(dim, k).ok())
}

/// Whether `name` is an embedding or output head (left dense unless asked).
fn is_embedding(name: &str) -> bool {
    [
        "embed",
        "lm_head",
        "wte",
        "wpe",
        "word_embeddings",
        "position_embeddings",
    ]
    .iter()
    .any(|k| name.contains(k))
}

/// The name of a dtype as [`TtInfo::dtype`] records it.
fn dtype_name(kind: Kind) -> Option<&'static str> {
    Some(match kind {
        Kind::Float => "f32",
        Kind::BFloat16 => "bf16",
        Kind::Half => "f16",
        Kind::Double => "f64",
        _ => return None,
    })
}

fn dtype_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "f32" => Kind::Float,
        "bf16" => Kind::BFloat16,
        "f16" => Kind::Half,
        "f64" => Kind::Double,
        _ => return None,
    })
}

/// Relative Frobenius error `||a - b|| / ||b||`, in f64.
fn rel_error(approx: &Tensor, exact: &Tensor) -> f64 {
    let exact = exact.to_kind(Kind::Double);
    let diff = (approx.to_kind(Kind::Double) - &exact)
        .norm()
        .double_value(&[]);
    diff / exact.norm().double_value(&[]).max(f64::MIN_POSITIVE)
}

/// Compresses one dense weight `w` `(out, in)` named `name` into TT cores over `in_modes` |
/// `out_modes`, and reports it.
fn compress_weight(
    name: &str,
    w: &Tensor,
    in_modes: &[i64],
    out_modes: &[i64],
    o: &CompressOptions,
    file: &Path,
) -> Result<(Vec<Tensor>, TtRow)> {
    let vs = VarStore::new(Device::Cpu);
    let wf = w.to_kind(Kind::Float);
    let layer = TtLinear::from_dense(
        &vs.root(),
        &wf,
        None,
        in_modes,
        out_modes,
        o.tt_rank,
        o.tt_eps,
        Kind::Float,
    )
    .map_err(|e| Error::Msg(format!("{}: {name}: {e}", file.display())))?;
    let approx = tch::no_grad(|| layer.to_dense());
    let mut info = TtInfo::of(&layer);
    info.dtype = dtype_name(w.kind()).map(str::to_string);
    let row = TtRow {
        name: name.to_string(),
        shape: w.size(),
        params_before: w.numel() as i64,
        params_after: info.num_params(),
        rel_error: rel_error(&approx, w),
        info,
    };
    let cores = layer
        .ranked()
        .cores()
        .iter()
        .map(|c| c.detach().copy())
        .collect();
    Ok((cores, row))
}

/// Compresses safetensors file `input` into `output` (atomically): every floating 2-D
/// `*.weight` whose both dimensions factor into at least 2 modes (embeddings and the head
/// only with `include_embeddings`) becomes TT cores; everything else is copied as it is.
pub fn compress_file(input: &Path, output: &Path, o: &CompressOptions) -> Result<CompressReport> {
    o.validate()?;
    let f = SafetensorsFile::open(input)?;
    let mut meta = f.metadata();
    let mut layers = weights::read_tt_metadata(&f)?;
    let mut out = Vec::new();
    let mut report = CompressReport::default();
    for name in f.names() {
        let t = f.tensor(&name, Device::Cpu)?;
        let modes = match (name.strip_suffix(".weight"), t.size().as_slice()) {
            (Some(prefix), &[rows, cols])
                if t.is_floating_point() && (o.include_embeddings || !is_embedding(&name)) =>
            {
                side_modes(cols, o.order)
                    .zip(side_modes(rows, o.order))
                    .map(|(mut i, out_modes)| {
                        i.reverse();
                        (prefix.to_string(), i, out_modes)
                    })
            }
            _ => None,
        };
        match modes {
            Some((prefix, in_modes, out_modes)) => {
                let (cores, row) = compress_weight(&name, &t, &in_modes, &out_modes, o, input)?;
                for (k, c) in cores.into_iter().enumerate() {
                    out.push((weights::tt_core_name(&prefix, k), c));
                }
                layers.insert(prefix, row.info.clone());
                report.rows.push(row);
            }
            None => {
                report.kept += 1;
                report.kept_params += t.numel() as i64;
                out.push((name, t));
            }
        }
    }
    if report.rows.is_empty() {
        return Err(Error::Msg(format!(
            "{}: no tensor to compress (floating 2-D '*.weight' tensors whose dimensions factor \
             into at least 2 modes each; embeddings only with --include-embeddings)",
            input.display()
        )));
    }
    meta.extend(weights::tt_metadata(&layers));
    safetensors_io::save(output, &out, Some(meta))?;
    Ok(report)
}

fn print_report(r: &CompressReport) {
    let width = r
        .rows
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "{:<width$}  {:<12}  {:<22}  {:<26}  {:>10}  {:>9}  {:>8}  {:>9}",
        "name", "shape", "modes (in | out)", "ranks", "before", "after", "ratio", "rel.err"
    );
    for row in &r.rows {
        println!(
            "{:<width$}  {:<12}  {:<22}  {:<26}  {:>10}  {:>9}  {:>7.1}x  {:>9.2e}",
            row.name,
            format!("{:?}", row.shape),
            modes_text(&row.info),
            format!("{:?}", row.info.ranks),
            row.params_before,
            row.params_after,
            row.params_before as f64 / row.params_after.max(1) as f64,
            row.rel_error
        );
    }
    let before: i64 = r.rows.iter().map(|x| x.params_before).sum();
    let after: i64 = r.rows.iter().map(|x| x.params_after).sum();
    println!(
        "compressed {} weights: {before} -> {after} parameters ({:.1}x compression), largest relative \
         error {:.2e}",
        r.rows.len(),
        before as f64 / after.max(1) as f64,
        r.rows.iter().map(|x| x.rel_error).fold(0.0, f64::max)
    );
    println!(
        "whole file: {} -> {} parameters ({:.2}x compression); {} tensors kept as they were",
        before + r.kept_params,
        after + r.kept_params,
        (before + r.kept_params) as f64 / (after + r.kept_params).max(1) as f64,
        r.kept
    );
}

/// `[12, 8, 8] | [8, 8, 12]`; a table's `[20, 16, ...] x [4, 4, ...]` (vocabulary modes by
/// dimension modes).
pub fn modes_text(info: &TtInfo) -> String {
    let sep = if info.vocab.is_some() { "x" } else { "|" };
    format!("{:?} {sep} {:?}", info.in_modes, info.out_modes)
}

/// `frugal compress IN OUT (--tt-rank R | --tt-eps E) [--order K] [--include-embeddings]`.
pub fn compress(input: &Path, output: &Path, o: &CompressOptions) -> Result<u8> {
    o.validate()?;
    let report = if input.is_dir() {
        let src = model_file(input)?;
        let mut report = CompressReport::default();
        atomic::write_dir(output, |tmp| {
            report = compress_file(&src, &tmp.join("model.safetensors"), o)?;
            copy_side_files(input, tmp)?;
            edit_config(input, tmp, |c| {
                c.insert(
                    TT_CONFIG_KEY.into(),
                    serde_json::json!({
                        "order": o.order,
                        "tt_rank": o.tt_rank,
                        "tt_eps": o.tt_eps,
                        "include_embeddings": o.include_embeddings,
                    }),
                );
            })
        })?;
        report
    } else {
        if !input.exists() {
            return Err(Error::Msg(format!("{}: no such file", input.display())));
        }
        compress_file(input, output, o)?
    };
    print_report(&report);
    Ok(0)
}

/// One restored weight of `frugal decompress`.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoredRow {
    /// The restored weight's name.
    pub name: String,
    /// `tt` or the quantized family.
    pub from: String,
    /// Its shape.
    pub shape: Vec<i64>,
    /// Parameters (or bytes for quantized weights) before.
    pub stored: u64,
}

/// Restores dense `NAME.weight` from the TT cores of `input` (rank variables applied when
/// present) into `output` (atomically); other tensors are copied. Returns the restored rows.
pub fn decompress_tt_file(input: &Path, output: &Path) -> Result<Vec<RestoredRow>> {
    let f = SafetensorsFile::open(input)?;
    let names = f.names();
    let layers = weights::read_tt_metadata(&f)?;
    for p in weights::tt_prefixes(&names) {
        if !layers.contains_key(&p) {
            return Err(Error::Msg(format!(
                "{}: '{}' has no TT description in the metadata ('{}'): modes and ranks \
                 unknown",
                input.display(),
                weights::tt_core_name(&p, 0),
                weights::TT_METADATA_KEY
            )));
        }
    }
    let owned = |n: &str| {
        layers.keys().any(|p| {
            n.strip_prefix(p.as_str())
                .is_some_and(|r| r.starts_with(".cores.") || r.starts_with(".rank_vars."))
        })
    };
    let mut out = Vec::new();
    let mut rows = Vec::new();
    for (p, info) in &layers {
        let kind = info
            .dtype
            .as_deref()
            .and_then(dtype_kind)
            .unwrap_or(Kind::Float);
        let w = weights::read_tt_dense(&f, p, info)?
            .to_kind(kind)
            .contiguous();
        let name = format!("{p}.weight");
        if names.binary_search(&name).is_ok() {
            return Err(Error::Msg(format!(
                "{}: holds both '{name}' and TT cores for it",
                input.display()
            )));
        }
        rows.push(RestoredRow {
            name: name.clone(),
            from: "tt".into(),
            shape: w.size(),
            stored: info.num_params() as u64,
        });
        out.push((name, w));
    }
    for n in &names {
        if !owned(n) {
            out.push((n.clone(), f.tensor(n, Device::Cpu)?));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    let mut meta = f.metadata();
    meta.remove(weights::TT_METADATA_KEY);
    safetensors_io::save(output, &out, Some(meta))?;
    Ok(rows)
}

/// Decompresses one file: TT cores, then quantized weights (through
/// `frugal_quant::convert::dequantize_file`).
fn decompress_file(input: &Path, output: &Path) -> Result<Vec<RestoredRow>> {
    let f = SafetensorsFile::open(input)?;
    let has_tt = !weights::tt_prefixes(&f.names()).is_empty();
    let quantized = frugal_quant::convert::describe(&f)
        .map_err(|e| Error::Msg(format!("{}: {e}", input.display())))?;
    drop(f);
    if !has_tt && quantized.is_empty() {
        return Err(Error::Msg(format!(
            "{}: holds no TT cores and no quantized weights: nothing to decompress",
            input.display()
        )));
    }
    let mut rows = Vec::new();
    if has_tt && quantized.is_empty() {
        return decompress_tt_file(input, output);
    }
    let src = if has_tt {
        let tmp = atomic::temp_sibling(&output.with_extension("tt.safetensors"));
        rows = decompress_tt_file(input, &tmp)?;
        Some(tmp)
    } else {
        None
    };
    let q = frugal_quant::convert::dequantize_file(src.as_deref().unwrap_or(input), output)
        .map_err(|e| Error::Msg(format!("{}: {e}", input.display())));
    if let Some(tmp) = &src {
        let _ = std::fs::remove_file(tmp);
    }
    for r in q? {
        if quantized
            .iter()
            .any(|x| r.name == format!("{}.weight", x.prefix))
        {
            rows.push(RestoredRow {
                name: r.name,
                from: r.format,
                shape: r.shape,
                stored: r.bytes_before,
            });
        }
    }
    Ok(rows)
}

/// `frugal decompress IN OUT`: TT cores (and quantized weights) back to dense weights.
pub fn decompress(input: &Path, output: &Path) -> Result<u8> {
    let rows = if input.is_dir() {
        let src = model_file(input)?;
        let mut rows = Vec::new();
        atomic::write_dir(output, |tmp| {
            rows = decompress_file(&src, &tmp.join("model.safetensors"))?;
            copy_side_files(input, tmp)?;
            edit_config(input, tmp, |c| {
                c.remove(TT_CONFIG_KEY);
                c.remove("quantization_config");
            })
        })?;
        rows
    } else {
        if !input.exists() {
            return Err(Error::Msg(format!("{}: no such file", input.display())));
        }
        decompress_file(input, output)?
    };
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
    println!("{:<width$}  {:<8}  {:<14}", "name", "from", "shape");
    for r in &rows {
        println!(
            "{:<width$}  {:<8}  {:<14}",
            r.name,
            r.from,
            format!("{:?}", r.shape)
        );
    }
    println!("restored {} dense weights", rows.len());
    Ok(0)
}

/// A TT layer as `frugal inspect` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct TtLayerView {
    /// The layer's name (`model.layers.0.mlp.up_proj`).
    pub name: String,
    /// Its modes and ranks.
    pub info: TtInfo,
    /// The live ranks (rank-variable entries above the pruning threshold), when the file has
    /// rank variables.
    pub live_ranks: Option<Vec<i64>>,
}

/// The TT layers of `file` for `frugal inspect`, as its metadata describes them (checked
/// against the cores), with their live ranks.
pub fn describe_tt(file: &SafetensorsFile) -> Result<Vec<TtLayerView>> {
    let layers: BTreeMap<String, TtInfo> = weights::read_tt_metadata(file)?;
    let names = file.names();
    let mut out = Vec::new();
    for (name, info) in layers {
        let d = info.ranks.len() - 1;
        let live_ranks = if names
            .binary_search(&weights::tt_rank_var_name(&name, 0))
            .is_ok()
        {
            let mut live = vec![1];
            for i in 0..d - 1 {
                let v = file.tensor(&weights::tt_rank_var_name(&name, i), Device::Cpu)?;
                live.push(
                    v.abs()
                        .gt(frugal_tt::PRUNE_THRESHOLD)
                        .sum(Kind::Int64)
                        .int64_value(&[]),
                );
            }
            live.push(1);
            Some(live)
        } else {
            None
        };
        out.push(TtLayerView {
            name,
            info,
            live_ranks,
        });
    }
    Ok(out)
}

/// Prints the TT layers of `file` (modes, ranks and live ranks, parameters, compression) for
/// `frugal inspect`, names padded to `width`; nothing when it has none.
pub fn print_tt_layers(file: &SafetensorsFile, width: usize) -> Result<()> {
    let tt = describe_tt(file)?;
    if tt.is_empty() {
        return Ok(());
    }
    println!("  tensor-train layers:");
    println!(
        "    {:<width$}  {:<12}  {:<22}  {:<26}  {:>10}  {:>9}  {:>8}",
        "name", "shape", "modes (in | out)", "ranks", "dense", "cores", "ratio"
    );
    for v in &tt {
        let dense: i64 = v.info.dense_shape().iter().product();
        let ranks = match &v.live_ranks {
            Some(l) if l != &v.info.ranks => format!("{:?} live {l:?}", v.info.ranks),
            _ => format!("{:?}", v.info.ranks),
        };
        println!(
            "    {:<width$}  {:<12}  {:<22}  {ranks:<26}  {dense:>10}  {:>9}  {:>7.1}x",
            v.name,
            format!("{:?}", v.info.dense_shape()),
            modes_text(&v.info),
            v.info.num_params(),
            dense as f64 / v.info.num_params().max(1) as f64
        );
    }
    let dense: i64 = tt
        .iter()
        .map(|v| v.info.dense_shape().iter().product::<i64>())
        .sum();
    let cores: i64 = tt.iter().map(|v| v.info.num_params()).sum();
    println!(
        "    {} TT layers: {dense} dense parameters in {cores} core parameters ({:.1}x \
         compression)",
        tt.len(),
        dense as f64 / cores.max(1) as f64
    );
    Ok(())
}
