//! safetensors I/O through memory maps: each tensor is copied into libtorch once (never the whole
//! file into memory first), and files are written atomically with the `{"format": "pt"}`
//! metadata that Python tools expect.

use crate::{Error, Result};
use safetensors::tensor::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// The tch kind of a safetensors dtype.
pub fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F64 => Kind::Double,
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// The safetensors dtype of a tch kind.
pub fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Double => Dtype::F64,
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

/// An open safetensors file, memory-mapped; tensors are read one at a time. It may also be a
/// sharded checkpoint opened through its index (`model.safetensors.index.json`): every shard
/// is mapped, and each tensor is read from the shard the index's `weight_map` names.
pub struct SafetensorsFile {
    path: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name -> shard, for a sharded checkpoint.
    weight_map: Option<HashMap<String, usize>>,
}

struct Shard {
    path: PathBuf,
    mmap: memmap2::Mmap,
}

impl Shard {
    fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; a file changed underneath us by another process is
        // outside what we promise (as for every reader of memory-mapped files).
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let this = Self {
            path: path.to_path_buf(),
            mmap,
        };
        this.parse()?;
        Ok(this)
    }

    /// Drops the pages of `data` (a range of this map, already copied out) from the process's
    /// resident set: a model read tensor by tensor then holds one tensor's pages at a time,
    /// not the whole file's (2.5 GB of a 1B model in bf16 stayed resident until the file was
    /// closed, on top of the model built from it). The pages stay in the page cache; a later
    /// read faults them back in.
    fn release(&self, data: &[u8]) {
        let page = 4096;
        let base = self.mmap.as_ptr() as usize;
        let start = (data.as_ptr() as usize - base) / page * page;
        let end = (data.as_ptr() as usize - base + data.len()).min(self.mmap.len());
        if end > start {
            // SAFETY: the map is a read-only, shared file mapping: MADV_DONTNEED only unmaps
            // its pages, whose contents a later access reads back unchanged from the file; no
            // reference into the range is used after this (the tensor holds its own copy).
            // A failure only keeps the pages resident.
            let _ = unsafe {
                self.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                )
            };
        }
    }

    fn parse(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.mmap).map_err(|e| Error::Safetensors {
            path: self.path.clone(),
            reason: e.to_string(),
        })
    }
}

/// The weights file of model folder `dir`: `model.safetensors`, or the index of a sharded
/// checkpoint (`model.safetensors.index.json`); None when it has neither.
pub fn model_weights(dir: &Path) -> Option<PathBuf> {
    ["model.safetensors", "model.safetensors.index.json"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
}

impl SafetensorsFile {
    /// Opens and validates `path` (header, offsets, length: a truncated file is an error here).
    /// A path ending in `.index.json` opens a sharded checkpoint: the index's `weight_map`
    /// names each tensor's shard (beside the index); every shard is opened and validated, and
    /// a tensor the index places in a shard that lacks it is an error naming both.
    pub fn open(path: &Path) -> Result<Self> {
        if path.to_string_lossy().ends_with(".index.json") {
            return Self::open_index(path);
        }
        Ok(Self {
            path: path.to_path_buf(),
            shards: vec![Shard::open(path)?],
            weight_map: None,
        })
    }

    fn open_index(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Safetensors {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("index is not JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("index has no 'weight_map' object".into()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut files: Vec<String> = Vec::new();
        let mut weight_map = HashMap::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .filter(|f| !f.contains('/') && !f.is_empty())
                .ok_or_else(|| bad(format!("'{name}' maps to {file}, not a shard file name")))?;
            let i = match files.iter().position(|f| f == file) {
                Some(i) => i,
                None => {
                    files.push(file.to_string());
                    files.len() - 1
                }
            };
            weight_map.insert(name.clone(), i);
        }
        let shards = files
            .iter()
            .map(|f| Shard::open(&dir.join(f)))
            .collect::<Result<Vec<_>>>()?;
        for (name, &i) in &weight_map {
            let st = shards[i].parse()?;
            if st.tensor(name).is_err() {
                return Err(bad(format!(
                    "the index places '{name}' in {}, which does not hold it",
                    files[i]
                )));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            shards,
            weight_map: Some(weight_map),
        })
    }

    /// The file's path (the index, for a sharded checkpoint).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted (all shards').
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = match &self.weight_map {
            Some(map) => map.keys().cloned().collect(),
            None => {
                let st = self.shards[0].parse().expect("validated on open");
                st.names().into_iter().map(str::to_string).collect()
            }
        };
        names.sort();
        names
    }

    /// The file's `__metadata__` (empty when it has none; the first shard's for a sharded
    /// checkpoint).
    pub fn metadata(&self) -> HashMap<String, String> {
        let (_, meta) =
            SafeTensors::read_metadata(&self.shards[0].mmap).expect("validated on open");
        meta.metadata().clone().unwrap_or_default()
    }

    fn shard(&self, name: &str) -> Result<&Shard> {
        match &self.weight_map {
            None => Ok(&self.shards[0]),
            Some(map) => map
                .get(name)
                .map(|&i| &self.shards[i])
                .ok_or_else(|| self.missing(name)),
        }
    }

    /// Shape and dtype of tensor `name`, without reading it.
    pub fn info(&self, name: &str) -> Result<(Vec<i64>, Dtype)> {
        let st = self.shard(name)?.parse()?;
        let view = st.tensor(name).map_err(|_| self.missing(name))?;
        Ok((
            view.shape().iter().map(|&d| d as i64).collect(),
            view.dtype(),
        ))
    }

    fn missing(&self, name: &str) -> Error {
        Error::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        }
    }

    /// Reads tensor `name` onto `device` (one copy out of the map).
    pub fn tensor(&self, name: &str, device: tch::Device) -> Result<Tensor> {
        let shard = self.shard(name)?;
        let st = shard.parse()?;
        let view = st.tensor(name).map_err(|_| self.missing(name))?;
        let kind = kind_of(view.dtype()).ok_or_else(|| Error::Safetensors {
            path: shard.path.clone(),
            reason: format!(
                "tensor '{name}' has dtype {:?}, which libtorch cannot hold",
                view.dtype()
            ),
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)?;
        shard.release(view.data());
        Ok(if device == tch::Device::Cpu {
            t
        } else {
            t.to_device(device)
        })
    }
}

/// Reads every tensor of `path` onto `device`, sorted by name.
pub fn load(path: &Path, device: tch::Device) -> Result<Vec<(String, Tensor)>> {
    let f = SafetensorsFile::open(path)?;
    f.names()
        .into_iter()
        .map(|n| Ok((n.clone(), f.tensor(&n, device)?)))
        .collect()
}

/// One tensor to save: a tch tensor, or bytes lent by their owner (so that state kept outside
/// tch, like 8-bit optimizer codes, is written without a copy).
#[derive(Debug)]
pub enum SavePart<'a> {
    /// A tensor (moved to the CPU and made contiguous if it is not).
    Tensor(Tensor),
    /// Raw little-endian bytes of `kind` elements with `shape`.
    Bytes {
        /// The elements' bytes.
        data: &'a [u8],
        /// The element kind.
        kind: Kind,
        /// The shape.
        shape: Vec<i64>,
    },
}

/// A CPU, contiguous tensor or borrowed bytes, lent to the safetensors writer without another
/// copy.
enum PartView<'a> {
    Tensor {
        t: Tensor,
        dtype: Dtype,
        shape: Vec<usize>,
    },
    Bytes {
        data: &'a [u8],
        dtype: Dtype,
        shape: Vec<usize>,
    },
}

impl View for &PartView<'_> {
    fn dtype(&self) -> Dtype {
        match self {
            PartView::Tensor { dtype, .. } | PartView::Bytes { dtype, .. } => *dtype,
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            PartView::Tensor { shape, .. } | PartView::Bytes { shape, .. } => shape,
        }
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            PartView::Bytes { data, .. } => Cow::Borrowed(data),
            PartView::Tensor { t, .. } => {
                let len = self.data_len();
                if len == 0 {
                    return Cow::Borrowed(&[]);
                }
                // SAFETY: `t` is a contiguous CPU tensor that lives as long as `self`; its
                // storage holds `len` bytes from `data_ptr`, and nothing writes to it while
                // the writer reads.
                Cow::Borrowed(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, len) })
            }
        }
    }
    fn data_len(&self) -> usize {
        match self {
            PartView::Bytes { data, .. } => data.len(),
            PartView::Tensor { t, .. } => t.numel() * t.kind().elt_size_in_bytes(),
        }
    }
}

/// Writes `tensors` to `path` atomically, with metadata `{"format": "pt"}` plus `metadata`.
pub fn save(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let parts: Vec<(String, SavePart)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), SavePart::Tensor(t.shallow_clone())))
        .collect();
    save_parts(path, &parts, metadata)
}

/// [`save`] for tensors and borrowed bytes; errors name the part whose dtype cannot be saved
/// or whose bytes do not fill its shape.
pub fn save_parts(
    path: &Path,
    parts: &[(String, SavePart)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut views = Vec::with_capacity(parts.len());
    let dtype = |name: &str, kind: Kind| {
        dtype_of(kind).ok_or_else(|| Error::Msg(format!("{name}: dtype {kind:?} cannot be saved")))
    };
    for (name, part) in parts {
        let view = match part {
            SavePart::Tensor(t) => {
                let dtype = dtype(name, t.kind())?;
                let t = t.detach().to_device(tch::Device::Cpu).contiguous();
                let shape = t.size().iter().map(|&d| d as usize).collect();
                PartView::Tensor { t, dtype, shape }
            }
            SavePart::Bytes { data, kind, shape } => {
                let dtype = dtype(name, *kind)?;
                let n: i64 = shape.iter().product();
                if n < 0 || n as usize * kind.elt_size_in_bytes() != data.len() {
                    return Err(Error::Msg(format!(
                        "{name}: {} bytes do not hold a {kind:?} tensor of shape {shape:?}",
                        data.len()
                    )));
                }
                let shape = shape.iter().map(|&d| d as usize).collect();
                PartView::Bytes { data, dtype, shape }
            }
        };
        views.push((name.clone(), view));
    }
    let mut meta = metadata.unwrap_or_default();
    meta.insert("format".into(), "pt".into());
    crate::atomic::write_with(path, |tmp| {
        safetensors::serialize_to_file(views.iter().map(|(n, v)| (n.as_str(), v)), Some(meta), tmp)
            .map_err(|e| {
                Error::Msg(format!(
                    "{}: cannot write safetensors ({e})",
                    path.display()
                ))
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_names_shapes_dtypes_values() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let a = Tensor::arange(12, (Kind::Float, tch::Device::Cpu)).reshape([3, 4]);
        let b = Tensor::from_slice(&[1i64, -2, 3]);
        let c = Tensor::arange(6, (Kind::Float, tch::Device::Cpu))
            .to_kind(Kind::BFloat16)
            .reshape([2, 3])
            .tr();
        save(
            &p,
            &[
                ("a".into(), a.shallow_clone()),
                ("b".into(), b.shallow_clone()),
                ("c".into(), c.shallow_clone()),
            ],
            None,
        )
        .unwrap();
        let f = SafetensorsFile::open(&p).unwrap();
        assert_eq!(f.names(), vec!["a", "b", "c"]);
        assert_eq!(f.metadata().get("format").map(String::as_str), Some("pt"));
        let back = load(&p, tch::Device::Cpu).unwrap();
        assert!(back[0].1.equal(&a));
        assert!(back[1].1.equal(&b));
        assert_eq!(back[2].1.kind(), Kind::BFloat16);
        assert!(
            back[2].1.equal(&c),
            "transposed (non-contiguous) tensor saved in logical order"
        );
    }

    #[test]
    fn borrowed_bytes_save_as_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.safetensors");
        let codes: Vec<u8> = (0..12).collect();
        let parts = [
            (
                "codes".to_string(),
                SavePart::Bytes {
                    data: &codes,
                    kind: Kind::Uint8,
                    shape: vec![3, 4],
                },
            ),
            (
                "x".to_string(),
                SavePart::Tensor(Tensor::from_slice(&[1.5f32])),
            ),
        ];
        save_parts(&p, &parts, None).unwrap();
        let back = load(&p, tch::Device::Cpu).unwrap();
        let expect = Tensor::from_slice(&codes).reshape([3, 4]);
        assert!(back[0].1.equal(&expect) && back[0].1.kind() == Kind::Uint8);
        let short = [(
            "codes".to_string(),
            SavePart::Bytes {
                data: &codes[..5],
                kind: Kind::Uint8,
                shape: vec![3, 4],
            },
        )];
        let err = save_parts(&p, &short, None).unwrap_err().to_string();
        assert!(err.contains("codes") && err.contains("[3, 4]"), "{err}");
    }

    #[test]
    fn truncated_file_is_a_named_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        save(
            &p,
            &[(
                "a".into(),
                Tensor::ones([64], (Kind::Float, tch::Device::Cpu)),
            )],
            None,
        )
        .unwrap();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
        let err = SafetensorsFile::open(&p)
            .err()
            .expect("truncated file must not open")
            .to_string();
        assert!(
            err.contains("t.safetensors") && err.contains("not a valid safetensors"),
            "{err}"
        );
    }

    #[test]
    fn missing_tensor_names_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        save(
            &p,
            &[(
                "a".into(),
                Tensor::ones([2], (Kind::Float, tch::Device::Cpu)),
            )],
            None,
        )
        .unwrap();
        let err = SafetensorsFile::open(&p)
            .unwrap()
            .tensor("b", tch::Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'b'") && err.contains("t.safetensors"),
            "{err}"
        );
    }
}
