//! Compression of one cluster into whole 4 KiB units, and bounded decompression.
//!
//! A compressed payload is `u32 little-endian compressed length` followed by the compressed bytes
//! and zero padding up to a whole number of 4 KiB units. A raw payload is the cluster itself.
//! Decompression writes into a buffer of exactly one cluster and fails unless the output is
//! exactly one cluster long, so hostile payloads can neither grow memory nor leave stale bytes.

use super::format::{alg, BLOCK_USIZE};
use super::Compression;

/// Per-thread codec state (contexts are expensive to create per call).
#[derive(Default)]
pub struct Codecs {
    zstd_compressor: Option<(i32, zstd::bulk::Compressor<'static>)>,
    zstd_decompressor: Option<zstd::bulk::Decompressor<'static>>,
    snap_encoder: Option<snap::raw::Encoder>,
    snap_decoder: Option<snap::raw::Decoder>,
}

impl std::fmt::Debug for Codecs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Codecs")
    }
}

/// Size of the scratch buffer [`Codecs::compress`] needs for clusters of `cluster` bytes.
pub fn scratch_len(cluster: usize) -> usize {
    let bound = lz4_flex::block::get_maximum_output_size(cluster)
        .max(snap::raw::max_compress_len(cluster))
        .max(zstd::zstd_safe::compress_bound(cluster));
    (bound + 4).div_ceil(BLOCK_USIZE) * BLOCK_USIZE
}

impl Codecs {
    /// Compresses `input` (one cluster) with `algo` into `out` (resized to whole units, padded
    /// with zeros). Returns the algorithm code and unit count, or `None` when compression would
    /// not save a single 4 KiB unit (the caller then stores the cluster raw).
    pub fn compress(
        &mut self,
        algo: Compression,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Option<(u8, u8)> {
        let max = scratch_len(input.len());
        if out.len() < max {
            out.resize(max, 0);
        }
        let body = &mut out[4..];
        let (code, n) = match algo {
            Compression::None => return None,
            Compression::Lz4 => (alg::LZ4, lz4_flex::block::compress_into(input, body).ok()?),
            Compression::Snappy => {
                let enc = self
                    .snap_encoder
                    .get_or_insert_with(snap::raw::Encoder::new);
                (alg::SNAPPY, enc.compress(input, body).ok()?)
            }
            Compression::Zstd { level } => {
                if self.zstd_compressor.as_ref().map(|(l, _)| *l) != Some(level) {
                    let c = zstd::bulk::Compressor::new(level).ok()?;
                    self.zstd_compressor = Some((level, c));
                }
                let (_, c) = self.zstd_compressor.as_mut()?;
                (alg::ZSTD, c.compress_to_buffer(input, body).ok()?)
            }
        };
        let units = (n + 4).div_ceil(BLOCK_USIZE);
        if units >= input.len() / BLOCK_USIZE {
            return None;
        }
        out[..4].copy_from_slice(&(n as u32).to_le_bytes());
        let end = units * BLOCK_USIZE;
        out[4 + n..end].fill(0);
        Some((code, units as u8))
    }

    /// Decodes a stored payload of algorithm `code` into `out` (exactly one cluster).
    pub fn decompress(&mut self, code: u8, stored: &[u8], out: &mut [u8]) -> Result<(), String> {
        if code == alg::RAW {
            if stored.len() != out.len() {
                return Err("raw payload has the wrong length".into());
            }
            out.copy_from_slice(stored);
            return Ok(());
        }
        if stored.len() < 4 {
            return Err("payload too short".into());
        }
        let mut len = [0u8; 4];
        len.copy_from_slice(&stored[..4]);
        let len = u32::from_le_bytes(len) as usize;
        let Some(body) = stored.get(4..4 + len) else {
            return Err(format!("compressed length {len} exceeds the payload"));
        };
        let produced = match code {
            alg::LZ4 => lz4_flex::block::decompress_into(body, out).map_err(|e| e.to_string())?,
            alg::SNAPPY => {
                let want = snap::raw::decompress_len(body).map_err(|e| e.to_string())?;
                if want != out.len() {
                    return Err(format!("snappy payload decodes to {want} bytes"));
                }
                let dec = self
                    .snap_decoder
                    .get_or_insert_with(snap::raw::Decoder::new);
                dec.decompress(body, out).map_err(|e| e.to_string())?
            }
            alg::ZSTD => {
                if self.zstd_decompressor.is_none() {
                    self.zstd_decompressor =
                        Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
                }
                let Some(d) = self.zstd_decompressor.as_mut() else {
                    return Err("no zstd context".into());
                };
                d.decompress_to_buffer(body, out)
                    .map_err(|e| e.to_string())?
            }
            other => return Err(format!("unknown algorithm code {other}")),
        };
        if produced != out.len() {
            return Err(format!(
                "payload decodes to {produced} bytes, not {}",
                out.len()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compressible(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i / 97 % 7) as u8 + b'a').collect()
    }

    #[test]
    fn every_algorithm_round_trips_a_compressible_cluster_in_fewer_units() {
        let input = compressible(65536);
        for algo in [
            Compression::Lz4,
            Compression::Snappy,
            Compression::Zstd { level: 1 },
            Compression::Zstd { level: 19 },
        ] {
            let mut c = Codecs::default();
            let mut out = Vec::new();
            let (code, units) = c.compress(algo, &input, &mut out).expect("compresses");
            assert!(units < 16, "{algo}: {units} units");
            let stored = &out[..units as usize * BLOCK_USIZE];
            let mut back = vec![0u8; 65536];
            c.decompress(code, stored, &mut back).expect("decompress");
            assert_eq!(back, input, "{algo}");
        }
    }

    #[test]
    fn incompressible_data_is_left_to_be_stored_raw() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let input: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut c = Codecs::default();
        let mut out = Vec::new();
        assert!(c.compress(Compression::Lz4, &input, &mut out).is_none());
        assert!(c.compress(Compression::None, &input, &mut out).is_none());
    }

    #[test]
    fn a_payload_that_decodes_to_the_wrong_length_is_refused() {
        let input = compressible(16384);
        let mut c = Codecs::default();
        let mut out = Vec::new();
        let (code, units) = c
            .compress(Compression::Lz4, &input, &mut out)
            .expect("compresses");
        let stored = &out[..units as usize * BLOCK_USIZE];
        let mut big = vec![0u8; 65536];
        assert!(c.decompress(code, stored, &mut big).is_err());
        let mut hostile = stored.to_vec();
        hostile[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut back = vec![0u8; 16384];
        assert!(c.decompress(code, &hostile, &mut back).is_err());
        for code in [alg::SNAPPY, alg::ZSTD, 77] {
            let garbage = vec![0x5au8; 4096];
            assert!(c.decompress(code, &garbage, &mut back).is_err());
        }
    }
}
