//! Calibration: short microbenchmarks of this machine with the kernels the model runs
//! (`flexgen_core::kernels::linear`, `flexgen_quant::linear_packed`, dense and packed
//! attention) and the runtime's own disk files (`O_DIRECT`), giving a [`HardwareProfile`].
//! [`load_or_calibrate`] reuses a saved profile until it is stale.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use flexgen_core::kernels::{attention, linear, AttentionShape};
use flexgen_core::{DType, Matrix};
use flexgen_quant::{
    attention_packed, linear_packed, CompressionConfig, PackedKvCache, QuantizedTensor,
};

use super::error::Result;
use super::hardware::{
    unix_now, Fingerprint, HardwareProfile, LinearKind, RateCurve, PROFILE_VERSION,
};
use crate::disk::{AlignedBuf, DiskFile, IoStats};
use crate::offload_dir::OffloadDir;

/// Sizes and durations of the microbenchmarks.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationSettings {
    /// Row counts `m` at which linear layers are timed (micro-batch sizes for decode,
    /// `micro-batch × prompt` for prefill), increasing.
    pub linear_rows: Vec<usize>,
    /// `(out, in)` of the weight timed for `m <=` [`CalibrationSettings::small_rows`]: large
    /// enough not to fit in the CPU caches, as a model's weights do not.
    pub gemv_shape: (usize, usize),
    /// `(out, in)` of the weight timed for larger `m` (compute-bound; kept small so that the
    /// large row counts stay quick).
    pub gemm_shape: (usize, usize),
    /// Largest `m` timed on [`CalibrationSettings::gemv_shape`].
    pub small_rows: usize,
    /// Prompt lengths at which prefill attention is timed, increasing.
    pub attention_prefill_lens: Vec<usize>,
    /// Hidden size and heads of the attention benchmarks.
    pub attention_dims: (usize, usize),
    /// Sequences and cached tokens of the decode-attention benchmarks.
    pub decode_batch_kv: (usize, usize),
    /// Bytes copied by the memory-copy benchmark.
    pub copy_bytes: usize,
    /// Bytes written then read by the disk benchmark.
    pub disk_bytes: usize,
    /// Bytes per disk request.
    pub disk_chunk: usize,
    /// Reads in flight in the disk-read benchmark (the runtime's I/O threads).
    pub io_threads: usize,
    /// Each timing repeats its call until this many seconds have passed (at least twice
    /// after a warm-up) and keeps the fastest.
    pub min_time_s: f64,
}

impl Default for CalibrationSettings {
    /// About 10-20 s on a 2-core machine.
    fn default() -> Self {
        CalibrationSettings {
            linear_rows: vec![1, 2, 4, 8, 16, 32, 64, 128, 512, 1024],
            gemv_shape: (16384, 2048),
            gemm_shape: (2048, 2048),
            small_rows: 64,
            attention_prefill_lens: vec![128, 512],
            attention_dims: (2048, 32),
            decode_batch_kv: (8, 1024),
            copy_bytes: 256 << 20,
            disk_bytes: 1 << 30,
            disk_chunk: 16 << 20,
            io_threads: 4,
            min_time_s: 0.05,
        }
    }
}

impl CalibrationSettings {
    /// Tiny sizes for tests (well under a second; the numbers are not representative).
    pub fn quick() -> Self {
        CalibrationSettings {
            linear_rows: vec![1, 16, 256],
            gemv_shape: (512, 256),
            gemm_shape: (256, 256),
            small_rows: 16,
            attention_prefill_lens: vec![32, 64],
            attention_dims: (256, 4),
            decode_batch_kv: (2, 64),
            copy_bytes: 4 << 20,
            disk_bytes: 8 << 20,
            disk_chunk: 1 << 20,
            io_threads: 2,
            min_time_s: 0.002,
        }
    }
}

/// Where the profile in use came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProfileOrigin {
    /// Read from the saved file, still fresh.
    Loaded,
    /// Measured now (and saved), for this reason.
    Calibrated(String),
}

/// The saved profile at `path` if it is fresh for this machine and `offload_dir`; otherwise
/// (or with `recalibrate`) calibrates, saves to `path` and returns the new one.
pub fn load_or_calibrate(
    path: &Path,
    offload_dir: &Path,
    recalibrate: bool,
    settings: &CalibrationSettings,
    progress: &mut dyn FnMut(&str),
) -> Result<(HardwareProfile, ProfileOrigin)> {
    let reason = if recalibrate {
        "recalibration asked for".to_string()
    } else if !path.exists() {
        "no saved profile".to_string()
    } else {
        match HardwareProfile::load(path) {
            Ok(p) => match p.staleness(&Fingerprint::current(offload_dir), offload_dir) {
                None => return Ok((p, ProfileOrigin::Loaded)),
                Some(why) => format!("saved profile is stale: {why}"),
            },
            Err(e) => format!("saved profile unusable: {e}"),
        }
    };
    let profile = calibrate(offload_dir, settings, progress)?;
    profile.save(path)?;
    Ok((profile, ProfileOrigin::Calibrated(reason)))
}

/// Runs every microbenchmark (see [`CalibrationSettings`]) and returns the profile; the disk
/// benchmark uses a private directory inside `offload_dir`, removed afterwards.
pub fn calibrate(
    offload_dir: &Path,
    settings: &CalibrationSettings,
    progress: &mut dyn FnMut(&str),
) -> Result<HardwareProfile> {
    let t0 = Instant::now();
    let mut linear = Vec::new();
    for kind in LinearKind::ALL {
        progress(&format!("linear layers, {kind} weights"));
        linear.push((kind, linear_curve(kind, settings)?));
    }
    progress("attention");
    let attention_prefill = prefill_curve(settings)?;
    let (attention_decode_bw, attention_decode_packed_bw) = decode_rates(settings)?;
    progress("memory copy");
    let copy_bw = copy_rate(settings);
    progress("disk");
    let disk = disk_rates(offload_dir, settings)?;
    Ok(HardwareProfile {
        version: PROFILE_VERSION,
        created_unix_s: unix_now(),
        fingerprint: Fingerprint::current(offload_dir),
        offload_dir: offload_dir.to_path_buf(),
        linear,
        attention_prefill,
        attention_decode_bw,
        attention_decode_packed_bw,
        copy_bw,
        disk_read_bw: disk.read_bw,
        disk_write_bw: disk.write_bw,
        disk_direct: disk.direct,
        io_compute_ratio: disk.io_compute_ratio,
        calibration_s: t0.elapsed().as_secs_f64(),
    })
}

/// Fastest seconds of `f` after one untimed warm-up, repeated until `min_s` passed (at
/// least twice, at most 100 times): the fastest run is the one least disturbed by other
/// processes, i.e. what the machine does when the benchmark has it to itself.
fn time_best(min_s: f64, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 2 || (start.elapsed().as_secs_f64() < min_s && times.len() < 100) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(times.into_iter().fold(f64::INFINITY, f64::min).max(1e-9))
}

/// Deterministic values in `[-1, 1)` (a cheap LCG; the kernels' speed does not depend on
/// them).
fn pattern(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect()
}

/// A weight of `(out, in)` in the format of `kind`.
enum Weight {
    Dense(Matrix),
    Packed(QuantizedTensor),
}

impl Weight {
    /// `y = x · Wᵀ + bias` with the kernel the model uses for this format.
    fn linear(&self, x: &[f32], m: usize, bias: Option<&[f32]>, y: &mut [f32]) -> Result<()> {
        match self {
            Weight::Dense(w) => linear(x, m, w, bias, y)?,
            Weight::Packed(w) => linear_packed(x, m, w, bias, y)?,
        }
        Ok(())
    }
}

fn make_weight(kind: LinearKind, (n, k): (usize, usize)) -> Result<Weight> {
    let m = Matrix::from_f32(n, k, pattern(n * k, (n * 31 + k) as u64))?;
    Ok(match kind {
        LinearKind::F32 => Weight::Dense(m),
        LinearKind::F16 => Weight::Dense(m.to_dtype(DType::F16)),
        LinearKind::Bf16 => Weight::Dense(m.to_dtype(DType::BF16)),
        LinearKind::Q4 => Weight::Packed(QuantizedTensor::from_matrix(
            &m,
            CompressionConfig::WEIGHT_4BIT,
        )?),
    })
}

fn linear_curve(kind: LinearKind, s: &CalibrationSettings) -> Result<RateCurve> {
    let mut points = Vec::new();
    for (shape, rows) in [
        (
            s.gemv_shape,
            s.linear_rows
                .iter()
                .copied()
                .filter(|&m| m <= s.small_rows)
                .collect::<Vec<_>>(),
        ),
        (
            s.gemm_shape,
            s.linear_rows
                .iter()
                .copied()
                .filter(|&m| m > s.small_rows)
                .collect(),
        ),
    ] {
        if rows.is_empty() {
            continue;
        }
        let w = make_weight(kind, shape)?;
        let (n, k) = shape;
        let bias = vec![0.1f32; n];
        for m in rows {
            let x = pattern(m * k, m as u64);
            let mut y = vec![0.0f32; m * n];
            let t = time_best(s.min_time_s, || w.linear(&x, m, Some(&bias), &mut y))?;
            points.push((m as f64, 2.0 * (m * n * k) as f64 / t));
        }
    }
    Ok(RateCurve { points })
}

fn prefill_curve(s: &CalibrationSettings) -> Result<RateCurve> {
    let (hidden, heads) = s.attention_dims;
    let mut points = Vec::new();
    for &len in &s.attention_prefill_lens {
        let q = pattern(len * hidden, 1);
        let k = pattern(len * hidden, 2);
        let v = pattern(len * hidden, 3);
        let valid = vec![true; len];
        let mut out = vec![0.0f32; len * hidden];
        let shape = AttentionShape {
            batch: 1,
            n_heads: heads,
            head_dim: hidden / heads,
            q_len: len,
            kv_len: len,
            kv_capacity: len,
        };
        let scale = 1.0 / ((hidden / heads) as f32).sqrt();
        let t = time_best(s.min_time_s, || {
            attention(&q, &k, &v, &valid, &shape, scale, &mut out)?;
            Ok(())
        })?;
        points.push((len as f64, 4.0 * (len * len * hidden) as f64 / t));
    }
    Ok(RateCurve { points })
}

/// Bytes of cache read per second by one decode step's attention: over an `f32` cache and
/// over a 4-bit packed cache.
fn decode_rates(s: &CalibrationSettings) -> Result<(f64, f64)> {
    let (hidden, heads) = s.attention_dims;
    let (batch, kv) = s.decode_batch_kv;
    let head_dim = hidden / heads;
    let k = pattern(batch * kv * hidden, 4);
    let v = pattern(batch * kv * hidden, 5);
    let q = pattern(batch * hidden, 6);
    let valid = vec![true; batch * kv];
    let mut out = vec![0.0f32; batch * hidden];
    let shape = AttentionShape {
        batch,
        n_heads: heads,
        head_dim,
        q_len: 1,
        kv_len: kv,
        kv_capacity: kv,
    };
    let scale = 1.0 / (head_dim as f32).sqrt();
    let t = time_best(s.min_time_s, || {
        attention(&q, &k, &v, &valid, &shape, scale, &mut out)?;
        Ok(())
    })?;
    let dense = (2 * batch * kv * hidden * 4) as f64 / t;
    let mut cache =
        PackedKvCache::new(CompressionConfig::FLEXGEN_CACHE, batch, heads, head_dim, kv)?;
    cache.store(0, &k, &v, kv)?;
    let t = time_best(s.min_time_s, || {
        attention_packed(&q, &cache, &valid, &shape, scale, &mut out)?;
        Ok(())
    })?;
    let packed = cache.nbytes() as f64 / t;
    Ok((dense, packed))
}

fn copy_rate(s: &CalibrationSettings) -> f64 {
    let src = vec![1u8; s.copy_bytes];
    let mut dst = vec![0u8; s.copy_bytes];
    let t = time_best(s.min_time_s, || {
        dst.copy_from_slice(&src);
        Ok(())
    })
    .unwrap_or(1.0);
    std::hint::black_box(&dst);
    s.copy_bytes as f64 / t
}

/// What the disk benchmark measured.
struct DiskRates {
    read_bw: f64,
    write_bw: f64,
    direct: bool,
    io_compute_ratio: f64,
}

/// Bytes/s of `O_DIRECT` writes (one stream) and reads (as many in flight as `io_threads`) of a
/// file in a private directory under `offload_dir`, and how much those reads slow compute
/// ([`compute_under_reads`]).
fn disk_rates(offload_dir: &Path, s: &CalibrationSettings) -> Result<DiskRates> {
    let dir = OffloadDir::create(offload_dir)?;
    let file = DiskFile::create(dir.path().join("calibration"), true, IoStats::new())?;
    let chunk = s.disk_chunk.max(4096);
    let chunks = s.disk_bytes.div_ceil(chunk).max(1);
    let mut buf = AlignedBuf::new(chunk);
    for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let t = Instant::now();
    for c in 0..chunks {
        file.write_at((c * chunk) as u64, buf.as_mut_slice())?;
    }
    let write_bw = (chunks * chunk) as f64 / t.elapsed().as_secs_f64().max(1e-9);
    let threads = s.io_threads.clamp(1, chunks);
    let t = Instant::now();
    read_in_threads(&file, chunk, chunks, threads, None)?;
    let read_bw = (chunks * chunk) as f64 / t.elapsed().as_secs_f64().max(1e-9);
    let io_compute_ratio = compute_under_reads(&file, chunk, chunks, threads, s)?;
    Ok(DiskRates {
        read_bw,
        write_bw,
        direct: file.is_direct(),
        io_compute_ratio,
    })
}

/// Reads `chunks` chunks of `file` on `threads` threads, chunk `c` on thread `c % threads`:
/// once, or with `until`, over and over until it is set.
fn read_in_threads(
    file: &DiskFile,
    chunk: usize,
    chunks: usize,
    threads: usize,
    until: Option<&AtomicBool>,
) -> Result<()> {
    std::thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = (0..threads)
            .map(|th| {
                scope.spawn(move || -> crate::Result<()> {
                    let mut buf = AlignedBuf::new(chunk);
                    loop {
                        for c in (th..chunks).step_by(threads) {
                            if until.is_some_and(|stop| stop.load(Ordering::Relaxed)) {
                                return Ok(());
                            }
                            file.read_at((c * chunk) as u64, buf.as_mut_slice())?;
                        }
                        if until.is_none() {
                            return Ok(());
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| crate::Error::Worker("a disk benchmark thread panicked".into()))??;
        }
        Ok(())
    })
}

/// Speed of a decode-sized linear layer (`f16` weights of [`CalibrationSettings::gemv_shape`],
/// 16 rows) while `threads` threads keep reading `file`, as a fraction of its speed alone:
/// median times, alone before and after, so that a slow phase of a shared machine does not
/// pass for interference. In `(0, 1]`.
fn compute_under_reads(
    file: &DiskFile,
    chunk: usize,
    chunks: usize,
    threads: usize,
    s: &CalibrationSettings,
) -> Result<f64> {
    const REPS: usize = 7;
    let (n, k) = s.gemv_shape;
    let m = 16;
    let w = make_weight(LinearKind::F16, s.gemv_shape)?;
    let x = pattern(m * k, 16);
    let mut y = vec![0.0f32; m * n];
    let mut median_time = || -> Result<f64> {
        let mut times = Vec::with_capacity(REPS);
        w.linear(&x, m, None, &mut y)?;
        for _ in 0..REPS {
            let t = Instant::now();
            w.linear(&x, m, None, &mut y)?;
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        Ok(times[REPS / 2].max(1e-9))
    };
    let before = median_time()?;
    let stop = AtomicBool::new(false);
    let under = std::thread::scope(|scope| -> Result<f64> {
        let readers = scope.spawn(|| read_in_threads(file, chunk, chunks, threads, Some(&stop)));
        // Let the reads get going before timing.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let under = median_time();
        stop.store(true, Ordering::Relaxed);
        readers
            .join()
            .map_err(|_| crate::Error::Worker("a disk benchmark thread panicked".into()))??;
        under
    })?;
    let after = median_time()?;
    Ok((0.5 * (before + after) / under).clamp(0.05, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_calibration_saves_and_reloads() {
        let tmp = tempfile::tempdir().unwrap();
        let offload = tmp.path().join("offload");
        let path = tmp.path().join("profile.json");
        let mut steps = Vec::new();
        let (p, origin) = load_or_calibrate(
            &path,
            &offload,
            false,
            &CalibrationSettings::quick(),
            &mut |s| steps.push(s.to_string()),
        )
        .unwrap();
        assert_eq!(origin, ProfileOrigin::Calibrated("no saved profile".into()));
        assert!(steps.iter().any(|s| s == "disk"), "{steps:?}");
        p.validate().unwrap();
        assert_eq!(p.linear.len(), 4);
        assert!(p.linear.iter().all(|(_, c)| c.points.len() == 3));
        // The private disk-benchmark directory is gone, the offload dir is left.
        assert_eq!(std::fs::read_dir(&offload).unwrap().count(), 0);
        // Fresh: loaded as is.
        let (q, origin) = load_or_calibrate(
            &path,
            &offload,
            false,
            &CalibrationSettings::quick(),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(origin, ProfileOrigin::Loaded);
        assert_eq!(
            (q.created_unix_s, &q.fingerprint, &q.offload_dir),
            (p.created_unix_s, &p.fingerprint, &p.offload_dir)
        );
        // JSON keeps every rate to within the last bit or so.
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * a.abs();
        assert!(close(q.disk_read_bw, p.disk_read_bw) && close(q.copy_bw, p.copy_bw));
        for ((ka, ca), (kb, cb)) in q.linear.iter().zip(&p.linear) {
            assert_eq!(ka, kb);
            for (a, b) in ca.points.iter().zip(&cb.points) {
                assert!(a.0 == b.0 && close(a.1, b.1), "{a:?} {b:?}");
            }
        }
        // Another offload dir, an old profile, a corrupt file: recalibrated with the reason.
        let other = tmp.path().join("elsewhere");
        let (_, origin) = load_or_calibrate(
            &path,
            &other,
            false,
            &CalibrationSettings::quick(),
            &mut |_| {},
        )
        .unwrap();
        assert!(
            matches!(&origin, ProfileOrigin::Calibrated(r) if r.contains("offload directory")),
            "{origin:?}"
        );
        let mut old = HardwareProfile::load(&path).unwrap();
        old.created_unix_s = 0;
        assert!(old
            .staleness(&Fingerprint::current(&other), &other)
            .unwrap()
            .contains("days ago"));
        std::fs::write(&path, "{ not json").unwrap();
        let e = HardwareProfile::load(&path).unwrap_err().to_string();
        assert!(e.contains("profile.json"), "{e}");
        let (_, origin) = load_or_calibrate(
            &path,
            &other,
            false,
            &CalibrationSettings::quick(),
            &mut |_| {},
        )
        .unwrap();
        assert!(
            matches!(&origin, ProfileOrigin::Calibrated(r) if r.contains("unusable")),
            "{origin:?}"
        );
        let (_, origin) = load_or_calibrate(
            &path,
            &other,
            true,
            &CalibrationSettings::quick(),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(
            origin,
            ProfileOrigin::Calibrated("recalibration asked for".into())
        );
    }
}
