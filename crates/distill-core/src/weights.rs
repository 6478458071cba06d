//! Reading safetensors files one tensor at a time: [`each_tensor`] hands each tensor to the
//! caller as soon as it is read, so loading pretrained weights into a model holds at most one
//! tensor beside the model's own (candle's `safetensors::load` reads the whole file, then copies
//! every tensor out of it: the file and its tensors at once, 174 MB for MiniLM's 87 MB).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// The largest header this reader accepts (the format's own limit).
const MAX_HEADER: u64 = 100_000_000;

/// Bytes read per call while a tensor's values are decoded.
const CHUNK: usize = 1 << 20;

/// One tensor's entry in a safetensors header.
struct Entry {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    begin: u64,
    end: u64,
}

/// The dtype a safetensors header names, if candle has it.
fn dtype(name: &str) -> Option<DType> {
    Some(match name {
        "F32" => DType::F32,
        "F64" => DType::F64,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "I64" => DType::I64,
        "U32" => DType::U32,
        "U8" => DType::U8,
        _ => return None,
    })
}

/// The tensors a safetensors header lists, in the order of their data.
fn entries(path: &Path, header: &[u8], data_len: u64) -> Result<Vec<Entry>> {
    let bad = |message: String| Error::data(path, message);
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header)
        .map_err(|e| bad(format!("the safetensors header is not a JSON object: {e}")))?;
    let mut entries = Vec::new();
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let field = |key: &str| {
            info.get(key)
                .ok_or_else(|| bad(format!("tensor `{name}` has no `{key}`")))
        };
        let dtype = field("dtype")?.as_str().and_then(dtype).ok_or_else(|| {
            bad(format!(
                "tensor `{name}`: unsupported dtype {}",
                info["dtype"]
            ))
        })?;
        let numbers = |key: &str| -> Result<Vec<u64>> {
            field(key)?
                .as_array()
                .and_then(|a| a.iter().map(|v| v.as_u64()).collect::<Option<Vec<u64>>>())
                .ok_or_else(|| bad(format!("tensor `{name}`: `{key}` is not a list of sizes")))
        };
        let shape: Vec<usize> = numbers("shape")?.into_iter().map(|d| d as usize).collect();
        let (begin, end) = match numbers("data_offsets")?[..] {
            [begin, end] if begin <= end && end <= data_len => (begin, end),
            _ => return Err(bad(format!("tensor `{name}`: bad `data_offsets`"))),
        };
        let bytes = shape.iter().product::<usize>() * dtype.size_in_bytes();
        if end - begin != bytes as u64 {
            return Err(bad(format!(
                "tensor `{name}`: {} bytes of data for shape {shape:?} of {dtype:?}",
                end - begin
            )));
        }
        entries.push(Entry {
            name,
            dtype,
            shape,
            begin,
            end,
        });
    }
    entries.sort_by_key(|e| e.begin);
    if entries.windows(2).any(|w| w[0].end > w[1].begin) {
        return Err(bad("tensors' data overlap".into()));
    }
    Ok(entries)
}

/// Reads one tensor's `len` values from `reader`; f32 and f64 are decoded chunk by chunk into
/// their own vector, other dtypes through one buffer of their bytes.
fn read_tensor(reader: &mut impl Read, e: &Entry, device: &Device) -> std::io::Result<Tensor> {
    let len = (e.end - e.begin) as usize;
    let mut chunk = vec![0u8; CHUNK.min(len)];
    let mut decode = |width: usize, push: &mut dyn FnMut(&[u8])| -> std::io::Result<()> {
        let mut left = len;
        while left > 0 {
            let n = chunk.len().min(left);
            reader.read_exact(&mut chunk[..n])?;
            chunk[..n].chunks_exact(width).for_each(&mut *push);
            left -= n;
        }
        Ok(())
    };
    let to_io = |e: candle_core::Error| std::io::Error::other(e.to_string());
    match e.dtype {
        DType::F32 => {
            let mut values = Vec::with_capacity(len / 4);
            decode(4, &mut |b| {
                values.push(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            })?;
            Tensor::from_vec(values, e.shape.as_slice(), device).map_err(to_io)
        }
        DType::F64 => {
            let mut values = Vec::with_capacity(len / 8);
            decode(8, &mut |b| {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                values.push(f64::from_le_bytes(a))
            })?;
            Tensor::from_vec(values, e.shape.as_slice(), device).map_err(to_io)
        }
        dtype => {
            let mut bytes = vec![0u8; len];
            reader.read_exact(&mut bytes)?;
            Tensor::from_raw_buffer(&bytes, dtype, &e.shape, device).map_err(to_io)
        }
    }
}

/// Calls `f(name, tensor)` for every tensor of the safetensors file at `path`, in the order of
/// their data, each read just before its call. A malformed file is an error naming it.
pub fn each_tensor(
    path: &Path,
    device: &Device,
    mut f: impl FnMut(String, Tensor) -> Result<()>,
) -> Result<()> {
    let io = |e: std::io::Error| Error::data(path, format!("cannot read the weights: {e}"));
    let file = File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let mut reader = BufReader::new(file);
    let mut len = [0u8; 8];
    reader.read_exact(&mut len).map_err(io)?;
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_HEADER || 8 + header_len > size {
        return Err(Error::data(
            path,
            "not a safetensors file (bad header length)",
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    reader.read_exact(&mut header).map_err(io)?;
    let mut at = 0;
    for e in entries(path, &header, size - 8 - header_len)? {
        std::io::copy(&mut (&mut reader).take(e.begin - at), &mut std::io::sink()).map_err(io)?;
        let tensor = read_tensor(&mut reader, &e, device).map_err(io)?;
        at = e.end;
        f(e.name, tensor)?;
    }
    Ok(())
}

/// Every tensor of the safetensors file at `path` by name (the file's bytes are never held
/// whole: see [`each_tensor`]).
pub fn load(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut tensors = HashMap::new();
    each_tensor(path, device, |name, t| {
        tensors.insert(name, t);
        Ok(())
    })?;
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tensors written by candle read back equal, in every dtype the kernels use, and a
    /// damaged file is an error that names it.
    #[test]
    fn reads_what_candle_writes() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("distill-weights-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::Invalid(e.to_string()))?;
        let path = dir.join("w.safetensors");
        let big = Tensor::arange(0f32, (3 * CHUNK / 4 + 5) as f32, &Device::Cpu)?;
        let written: HashMap<String, Tensor> = [
            (
                "a.weight",
                Tensor::new(&[[1.5f32, -2.0], [3.0, 4.25]], &Device::Cpu)?,
            ),
            ("b", Tensor::new(&[0.1f64, 0.2, 0.3], &Device::Cpu)?),
            ("c", Tensor::new(&[7u32, 8], &Device::Cpu)?),
            ("big", big),
        ]
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
        candle_core::safetensors::save(&written, &path)?;
        let read = load(&path, &Device::Cpu)?;
        assert_eq!(read.len(), written.len());
        for (name, t) in &written {
            let r = &read[name];
            assert_eq!((r.dtype(), r.dims()), (t.dtype(), t.dims()), "{name}");
            let (a, b) = (r.to_dtype(DType::F64)?, t.to_dtype(DType::F64)?);
            let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
            assert_eq!(diff, 0.0, "{name}");
        }
        let bytes = std::fs::read(&path).map_err(|e| Error::Invalid(e.to_string()))?;
        std::fs::write(&path, &bytes[..bytes.len() - 3])
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let err = load(&path, &Device::Cpu).err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("w.safetensors")),
            "{err:?}"
        );
        std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\xff{}")
            .map_err(|e| Error::Invalid(e.to_string()))?;
        assert!(load(&path, &Device::Cpu).is_err());
        std::fs::remove_dir_all(&dir).map_err(|e| Error::Invalid(e.to_string()))?;
        Ok(())
    }
}
