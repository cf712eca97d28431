//! `frugal quantize` and `frugal dequantize`: files or Hugging Face model folders.

use frugal_core::memory::human_bytes;
use frugal_core::{atomic, Error, Result};
use frugal_quant::convert::{self, Format, Row, Selection};
use std::path::{Path, PathBuf};

/// Options of `frugal quantize`.
#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    /// `int8`, `int4`, `nf4`, `fp4` or `ternary`.
    pub format: String,
    /// NF4/FP4 block size.
    pub block_size: usize,
    /// int4 group size.
    pub group_size: usize,
    /// NF4/FP4 double quantization.
    pub double_quant: bool,
    /// Only tensors matching this regex.
    pub include: Option<String>,
    /// Never tensors matching this regex.
    pub exclude: Option<String>,
}

fn qerr(e: frugal_quant::QuantError) -> Error {
    Error::Msg(e.to_string())
}

fn regex(flag: &str, r: &Option<String>) -> Result<Option<regex::Regex>> {
    r.as_deref()
        .map(|s| {
            regex::Regex::new(s).map_err(|e| {
                // regex's message spans lines (a caret under the pattern): keep its last line.
                let msg = e.to_string();
                let last = msg.lines().last().unwrap_or("").trim().to_string();
                Error::Msg(format!("{flag} '{s}': invalid regex ({last})"))
            })
        })
        .transpose()
}

/// The model file of a folder: `model.safetensors`, or the index of a sharded checkpoint
/// (read through its shards; the output is written as one file).
pub(crate) fn model_file(dir: &Path) -> Result<PathBuf> {
    frugal_core::safetensors_io::model_weights(dir).ok_or_else(|| {
        Error::Msg(format!(
            "{}: no model.safetensors (nor model.safetensors.index.json)",
            dir.display()
        ))
    })
}

/// Copies every file of `from` but the model (single or sharded) and config into `to`.
pub(crate) fn copy_side_files(from: &Path, to: &Path) -> Result<()> {
    for e in std::fs::read_dir(from)
        .map_err(|e| Error::io(from, e))?
        .flatten()
    {
        let name = e.file_name();
        let n = name.to_string_lossy();
        let shard = n.starts_with("model-") && n.ends_with(".safetensors");
        if e.path().is_file()
            && n != "model.safetensors"
            && n != "model.safetensors.index.json"
            && !shard
            && n != "config.json"
            && n != "quantize_config.json"
        {
            std::fs::copy(e.path(), to.join(&name))
                .map_err(|err| Error::io(to.join(&name), err))?;
        }
    }
    Ok(())
}

/// Rewrites `config.json` from `from` into `to` with `edit` applied (nothing when absent).
pub(crate) fn edit_config(
    from: &Path,
    to: &Path,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> Result<()> {
    let src = from.join("config.json");
    if !src.is_file() {
        return Ok(());
    }
    let text = std::fs::read_to_string(&src).map_err(|e| Error::io(&src, e))?;
    let mut v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::Msg(format!("{}: {e}", src.display())))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| Error::Msg(format!("{}: not a JSON object", src.display())))?;
    edit(obj);
    atomic::write(
        &to.join("config.json"),
        serde_json::to_string_pretty(&v).expect("json").as_bytes(),
    )
}

fn print_rows(rows: &[Row]) {
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
    println!(
        "{:<width$}  {:<8}  {:<14}  {:>12}  {:>12}",
        "name", "format", "shape", "before", "after"
    );
    for r in rows {
        println!(
            "{:<width$}  {:<8}  {:<14}  {:>12}  {:>12}",
            r.name,
            r.format,
            format!("{:?}", r.shape),
            human_bytes(r.bytes_before),
            human_bytes(r.bytes_after)
        );
    }
    let (b, a): (u64, u64) = rows
        .iter()
        .fold((0, 0), |(b, a), r| (b + r.bytes_before, a + r.bytes_after));
    println!(
        "total: {} -> {} ({:.2}x smaller)",
        human_bytes(b),
        human_bytes(a),
        b as f64 / a.max(1) as f64
    );
}

/// `frugal quantize IN OUT --format ...`.
pub fn quantize(input: &Path, output: &Path, o: &QuantizeOptions) -> Result<u8> {
    let format =
        Format::parse(&o.format, o.block_size, o.group_size, o.double_quant).map_err(qerr)?;
    let sel = Selection {
        include: regex("--include", &o.include)?,
        exclude: regex("--exclude", &o.exclude)?,
    };
    let rows = if input.is_dir() {
        std::fs::create_dir_all(output).map_err(|e| Error::io(output, e))?;
        let rows = convert::quantize_file(
            &model_file(input)?,
            &output.join("model.safetensors"),
            &format,
            &sel,
        )
        .map_err(qerr)?;
        copy_side_files(input, output)?;
        let qc = convert::quantization_config(&format);
        if let Format::Int4 { .. } = format {
            atomic::write(
                &output.join("quantize_config.json"),
                serde_json::to_string_pretty(&qc).expect("json").as_bytes(),
            )?;
        }
        edit_config(input, output, |c| {
            c.insert("quantization_config".into(), qc);
        })?;
        rows
    } else {
        convert::quantize_file(input, output, &format, &sel).map_err(qerr)?
    };
    print_rows(&rows);
    Ok(0)
}

/// `frugal dequantize IN OUT`.
pub fn dequantize(input: &Path, output: &Path) -> Result<u8> {
    let rows = if input.is_dir() {
        std::fs::create_dir_all(output).map_err(|e| Error::io(output, e))?;
        let rows = convert::dequantize_file(&model_file(input)?, &output.join("model.safetensors"))
            .map_err(qerr)?;
        copy_side_files(input, output)?;
        edit_config(input, output, |c| {
            c.remove("quantization_config");
        })?;
        rows
    } else {
        convert::dequantize_file(input, output).map_err(qerr)?
    };
    print_rows(&rows);
    Ok(0)
}
