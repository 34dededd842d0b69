//! Runs the initializer jobs of a lowered graph: each weight is pulled a chunk of rows at a
//! time, encoded on all cores, and written into the external data file; the returned tensor
//! descriptions point at where the bytes landed.

use rayon::prelude::*;

use super::builder::{Encoding, InitSpec, Job, Payload};
use super::data::{DataFile, Extent};
use super::pack::{block_codes, f16_bytes, f32_bytes, nbits_row, pack_zero_points};
use super::proto::{StringStringEntryProto, TensorProto, DATA_LOCATION_EXTERNAL};
use crate::error::{Error, Result};
use crate::export::graph::{DecoderGraph, Weight};
use crate::progress::Progress;
use crate::quant::int8::symmetric_row;

/// Streams every job into `data`; `location` is the data file's name relative to the model.
pub fn write_jobs(
    g: &DecoderGraph,
    jobs: &[Job],
    data: &mut DataFile,
    location: &str,
    progress: &dyn Progress,
) -> Result<Vec<TensorProto>> {
    let total: u64 = jobs
        .iter()
        .map(|j| match &j.payload {
            Payload::Weight { id, .. } => g.weights[*id].numel() as u64,
            Payload::Bytes(_) => 0,
        })
        .sum();
    progress.start("writing ONNX", total);
    let mut tensors = Vec::new();
    for job in jobs {
        let extents = match &job.payload {
            Payload::Bytes(b) => vec![data.put(b)?],
            Payload::Weight { id, enc } => encode(&g.weights[*id], *enc, data, progress)?,
        };
        if extents.len() != job.outputs.len() {
            return Err(Error::Invalid(format!(
                "ONNX export: {} produced {} tensors for {} initializers",
                job.outputs[0].name,
                extents.len(),
                job.outputs.len()
            )));
        }
        for (spec, ext) in job.outputs.iter().zip(extents) {
            tensors.push(external(spec, ext, location));
        }
    }
    progress.finish();
    Ok(tensors)
}

fn external(spec: &InitSpec, ext: Extent, location: &str) -> TensorProto {
    let kv = |k: &str, v: String| StringStringEntryProto {
        key: k.into(),
        value: v,
    };
    TensorProto {
        dims: spec.dims.clone(),
        data_type: spec.dtype,
        name: spec.name.clone(),
        external_data: vec![
            kv("location", location.to_string()),
            kv("offset", ext.offset.to_string()),
            kv("length", ext.len.to_string()),
        ],
        data_location: DATA_LOCATION_EXTERNAL,
        ..Default::default()
    }
}

/// Chunks of rows of `w`: `(first row, values)`; `even` keeps chunk starts even (int4 pairs).
fn for_chunks(
    w: &Weight,
    even: bool,
    progress: &dyn Progress,
    mut f: impl FnMut(usize, Vec<f32>) -> Result<()>,
) -> Result<()> {
    let n = w.n_rows();
    let mut step = w.rows_per_chunk();
    if even {
        step = (step & !1).max(2);
    }
    let mut r = 0;
    while r < n {
        let end = (r + step).min(n);
        let vals = w.rows_f32(r..end)?;
        progress.advance(vals.len() as u64, &w.name);
        f(r, vals)?;
        r = end;
    }
    Ok(())
}

fn encode(
    w: &Weight,
    enc: Encoding,
    data: &mut DataFile,
    progress: &dyn Progress,
) -> Result<Vec<Extent>> {
    let (n, k) = (w.n_rows(), w.row_len());
    match enc {
        Encoding::Float { f16, transpose } => {
            let esize = if f16 { 2 } else { 4 };
            let ext = data.reserve((n * k * esize) as u64)?;
            for_chunks(w, false, progress, |r0, vals| {
                let bytes = if f16 {
                    f16_bytes(&vals)
                } else {
                    f32_bytes(&vals)
                };
                if transpose {
                    data.scatter_transposed(ext, &bytes, esize, r0, n, k)
                } else {
                    data.write_at(ext.offset + (r0 * k * esize) as u64, &bytes)
                }
            })?;
            Ok(vec![ext])
        }
        Encoding::NBits {
            bits,
            block,
            symmetric,
        } => {
            let kb = k.div_ceil(block);
            let row_bytes = kb * block * bits as usize / 8;
            let ext = data.reserve((n * row_bytes) as u64)?;
            let mut scales = Vec::with_capacity(n * kb);
            let mut zps = Vec::new();
            for_chunks(w, false, progress, |r0, vals| {
                let rows: Vec<(Vec<u8>, Vec<f32>, Vec<u8>)> = vals
                    .par_chunks(k)
                    .map(|row| {
                        let (mut q, mut s, mut z) = (Vec::new(), Vec::new(), Vec::new());
                        nbits_row(row, block, bits, symmetric, &mut q, &mut s, &mut z);
                        let mut zp = Vec::new();
                        pack_zero_points(&z, bits, &mut zp);
                        (q, s, zp)
                    })
                    .collect();
                let mut bytes = Vec::with_capacity(rows.len() * row_bytes);
                for (q, s, z) in rows {
                    bytes.extend(q);
                    scales.extend(s);
                    zps.extend(z);
                }
                data.write_at(ext.offset + (r0 * row_bytes) as u64, &bytes)
            })?;
            let mut out = vec![ext, data.put(&f32_bytes(&scales))?];
            if !symmetric {
                out.push(data.put(&zps)?);
            }
            Ok(out)
        }
        Encoding::Int8Transposed => {
            let ext = data.reserve((n * k) as u64)?;
            let mut scales = Vec::with_capacity(n);
            for_chunks(w, false, progress, |r0, vals| {
                let rows: Vec<(Vec<u8>, f32)> = vals
                    .par_chunks(k)
                    .map(|row| {
                        let mut q = vec![0i8; k];
                        let s = symmetric_row(row, &mut q);
                        (bytemuck::cast_slice(&q).to_vec(), s)
                    })
                    .collect();
                let mut bytes = Vec::with_capacity(rows.len() * k);
                for (q, s) in rows {
                    bytes.extend(q);
                    scales.push(s);
                }
                data.scatter_transposed(ext, &bytes, 1, r0, n, k)
            })?;
            Ok(vec![ext, data.put(&f32_bytes(&scales))?])
        }
        Encoding::Int4Transposed { block, symmetric } => {
            if n % 2 != 0 {
                return Err(Error::Invalid(format!(
                    "{}: int4 with --ops standard needs an even number of output channels, not {n}",
                    w.name
                )));
            }
            let kb = k.div_ceil(block);
            let ext = data.reserve((n * k / 2) as u64)?;
            let mut scales = vec![0f32; kb * n];
            let mut zps = vec![0u8; kb * n];
            for_chunks(w, true, progress, |r0, vals| {
                let rows: Vec<(Vec<u8>, Vec<f32>, Vec<u8>)> = vals
                    .par_chunks(k)
                    .map(|row| {
                        let mut codes = vec![0u8; block];
                        let (mut all, mut s, mut z) =
                            (Vec::with_capacity(k), Vec::new(), Vec::new());
                        for vals in row.chunks(block) {
                            let (sc, zp) = block_codes(vals, 4, symmetric, &mut codes);
                            // Signed int4 in two's complement is the offset code with its
                            // top bit flipped.
                            all.extend(codes[..vals.len()].iter().map(|&c| {
                                if symmetric {
                                    c ^ 8
                                } else {
                                    c
                                }
                            }));
                            s.push(sc);
                            z.push(zp);
                        }
                        (all, s, z)
                    })
                    .collect();
                let nr = rows.len();
                for (i, (_, s, z)) in rows.iter().enumerate() {
                    for b in 0..kb {
                        scales[b * n + r0 + i] = s[b];
                        zps[b * n + r0 + i] = z[b];
                    }
                }
                // Column kk of these rows, two output channels per byte (low nibble first).
                let mut col = vec![0u8; nr.div_ceil(2)];
                for kk in 0..k {
                    col.iter_mut().enumerate().for_each(|(j, byte)| {
                        let lo = rows[2 * j].0[kk];
                        let hi = rows.get(2 * j + 1).map_or(0, |r| r.0[kk]);
                        *byte = lo | (hi << 4);
                    });
                    data.write_at(ext.offset + ((kk * n + r0) / 2) as u64, &col)?;
                }
                Ok(())
            })?;
            let mut out = vec![ext, data.put(&f32_bytes(&scales))?];
            if !symmetric {
                let packed: Vec<u8> = zps
                    .chunks(2)
                    .map(|p| p[0] | (p.get(1).copied().unwrap_or(0) << 4))
                    .collect();
                out.push(data.put(&packed)?);
            }
            Ok(out)
        }
    }
}
