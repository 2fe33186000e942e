//! [`HardwareProfile`]: what calibration measured on this machine (linear-layer FLOP/s per
//! weight format and row count, attention rates, memory and disk bandwidths), saved as JSON
//! and reused until stale; and [`MemoryLimits`], measured fresh at every search.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use flexgen_core::DType;
use serde::{Deserialize, Serialize};

use super::error::{Result, SearchError};

/// Format of the profile file; a different number makes a saved profile stale.
pub const PROFILE_VERSION: u32 = 2;

/// A saved profile older than this is recalibrated.
pub const MAX_PROFILE_AGE_S: u64 = 30 * 24 * 3600;

/// How a linear layer's weight is stored, as far as its speed goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinearKind {
    /// Dense `f32`.
    F32,
    /// Dense `f16`.
    F16,
    /// Dense `bf16`.
    Bf16,
    /// 4-bit group-wise compressed (the runtime's weight compression).
    Q4,
}

impl LinearKind {
    /// Every kind, in calibration order.
    pub const ALL: [LinearKind; 4] = [
        LinearKind::F32,
        LinearKind::F16,
        LinearKind::Bf16,
        LinearKind::Q4,
    ];

    /// The kind of a weight stored in `dtype`, or compressed.
    pub fn of(dtype: DType, compressed: bool) -> Self {
        match (compressed, dtype) {
            (true, _) => LinearKind::Q4,
            (false, DType::F32) => LinearKind::F32,
            (false, DType::F16) => LinearKind::F16,
            (false, DType::BF16) => LinearKind::Bf16,
        }
    }
}

impl std::fmt::Display for LinearKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LinearKind::F32 => "f32",
            LinearKind::F16 => "f16",
            LinearKind::Bf16 => "bf16",
            LinearKind::Q4 => "q4",
        })
    }
}

/// A rate measured at several sizes: `(size, rate)` points sorted by size, interpolated
/// linearly in log-log space and held constant beyond both ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RateCurve {
    /// `(size, rate)` points, sizes increasing.
    pub points: Vec<(f64, f64)>,
}

impl RateCurve {
    /// The rate at `size` (never below the smallest measured rate divided by 1e3, never zero).
    pub fn at(&self, size: f64) -> f64 {
        let pts = &self.points;
        let Some(&(x0, y0)) = pts.first() else {
            return f64::MIN_POSITIVE;
        };
        if size <= x0 || pts.len() == 1 {
            return y0;
        }
        for w in pts.windows(2) {
            let ((xa, ya), (xb, yb)) = (w[0], w[1]);
            if size <= xb {
                let t = (size.ln() - xa.ln()) / (xb.ln() - xa.ln());
                return (ya.ln() + t * (yb.ln() - ya.ln())).exp();
            }
        }
        pts[pts.len() - 1].1
    }

    fn is_valid(&self) -> bool {
        !self.points.is_empty()
            && self
                .points
                .iter()
                .all(|&(x, y)| x > 0.0 && y > 0.0 && x.is_finite() && y.is_finite())
            && self.points.windows(2).all(|w| w[0].0 < w[1].0)
    }
}

/// What identifies the machine a profile was measured on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// CPU model name (`/proc/cpuinfo`).
    pub cpu_model: String,
    /// Logical CPUs this process may use.
    pub cpus: usize,
    /// Compute threads (`RAYON_NUM_THREADS` when set, else `cpus`).
    pub threads: usize,
    /// SIMD level the kernels use.
    pub simd: String,
    /// Total RAM (`MemTotal`).
    pub mem_total_bytes: u64,
    /// Device number of the offload directory's filesystem.
    pub offload_device: u64,
}

impl Fingerprint {
    /// This machine now, with the offload directory `offload_dir` (or its nearest existing
    /// ancestor).
    pub fn current(offload_dir: &Path) -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|s| s.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or(cpus);
        Fingerprint {
            cpu_model,
            cpus,
            threads,
            simd: format!("{:?}", flexgen_core::simd_level()),
            mem_total_bytes: meminfo("MemTotal:").unwrap_or(0),
            offload_device: device_of(offload_dir).unwrap_or(0),
        }
    }
}

/// Everything calibration measured. Rates are per second: FLOP/s for compute, bytes/s for
/// bandwidths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HardwareProfile {
    /// [`PROFILE_VERSION`] when written.
    pub version: u32,
    /// Seconds since the Unix epoch when measured.
    pub created_unix_s: u64,
    /// The machine measured.
    pub fingerprint: Fingerprint,
    /// The offload directory whose disk was measured.
    pub offload_dir: PathBuf,
    /// Linear-layer FLOP/s (`2·m·n·k` per call) against the row count `m`, per weight kind.
    pub linear: Vec<(LinearKind, RateCurve)>,
    /// Prefill attention FLOP/s (`4·s²·hidden` per sequence) against the prompt length `s`.
    pub attention_prefill: RateCurve,
    /// Decode attention over an `f32` cache: cache bytes read per second.
    pub attention_decode_bw: f64,
    /// Decode attention over a 4-bit packed cache: packed bytes read per second.
    pub attention_decode_packed_bw: f64,
    /// Single-thread `memcpy` bandwidth (cache gathers into workspaces).
    pub copy_bw: f64,
    /// Disk read bandwidth of the offload directory with `O_DIRECT`, as many reads in flight
    /// as the runtime's I/O threads.
    pub disk_read_bw: f64,
    /// Disk write bandwidth of the offload directory with `O_DIRECT`.
    pub disk_write_bw: f64,
    /// Whether the filesystem accepted `O_DIRECT` (if not, disk numbers may include the page
    /// cache and overstate the disk).
    pub disk_direct: bool,
    /// Compute speed while the I/O threads read the offload disk, as a fraction of its speed
    /// alone (1 = no interference). On a machine with few cores the I/O threads' system calls,
    /// interrupts and (in a VM) the host's disk emulation take CPU time from the compute
    /// threads; the cost model charges that to the layers whose I/O overlaps compute.
    pub io_compute_ratio: f64,
    /// Seconds the calibration took.
    pub calibration_s: f64,
}

impl HardwareProfile {
    /// The linear FLOP/s of `kind` at `rows` rows.
    pub fn linear_flops(&self, kind: LinearKind, rows: usize) -> f64 {
        self.linear
            .iter()
            .find(|(k, _)| *k == kind)
            .map_or(f64::MIN_POSITIVE, |(_, c)| c.at(rows.max(1) as f64))
    }

    /// Prefill attention FLOP/s at prompt length `s`.
    pub fn attention_prefill_flops(&self, s: usize) -> f64 {
        self.attention_prefill.at(s.max(1) as f64)
    }

    /// Why this profile should not be used on `now` (or `None` when it is fresh).
    pub fn staleness(&self, now: &Fingerprint, offload_dir: &Path) -> Option<String> {
        if self.version != PROFILE_VERSION {
            return Some(format!(
                "format version {} (this build writes {PROFILE_VERSION})",
                self.version
            ));
        }
        let age = unix_now().saturating_sub(self.created_unix_s);
        if age > MAX_PROFILE_AGE_S {
            return Some(format!("measured {} days ago", age / 86400));
        }
        if self.fingerprint != *now {
            return Some(format!(
                "measured on a different machine or setup ({:?}, now {:?})",
                self.fingerprint, now
            ));
        }
        if self.offload_dir != offload_dir {
            return Some(format!(
                "measured for offload directory {} (now {})",
                self.offload_dir.display(),
                offload_dir.display()
            ));
        }
        None
    }

    /// Checks every number is positive and finite.
    pub fn validate(&self) -> std::result::Result<(), String> {
        for kind in LinearKind::ALL {
            match self.linear.iter().find(|(k, _)| *k == kind) {
                Some((_, c)) if c.is_valid() => {}
                _ => return Err(format!("missing or invalid linear rates for {kind}")),
            }
        }
        if !self.attention_prefill.is_valid() {
            return Err("invalid attention_prefill rates".into());
        }
        for (what, v) in [
            ("attention_decode_bw", self.attention_decode_bw),
            (
                "attention_decode_packed_bw",
                self.attention_decode_packed_bw,
            ),
            ("copy_bw", self.copy_bw),
            ("disk_read_bw", self.disk_read_bw),
            ("disk_write_bw", self.disk_write_bw),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("{what} = {v} is not a positive number"));
            }
        }
        if !(self.io_compute_ratio > 0.0 && self.io_compute_ratio <= 1.0) {
            return Err(format!(
                "io_compute_ratio = {} is not in (0, 1]",
                self.io_compute_ratio
            ));
        }
        Ok(())
    }

    /// Reads a profile saved by [`HardwareProfile::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| SearchError::io("read", path, e))?;
        let p: HardwareProfile = serde_json::from_str(&text).map_err(|e| SearchError::Profile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        p.validate().map_err(|reason| SearchError::Profile {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(p)
    }

    /// Writes the profile as pretty JSON (to a temporary file renamed into place, so a
    /// crash never leaves half a profile), creating the parent directory.
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| SearchError::io("create directory", dir, e))?;
        }
        let text = serde_json::to_string_pretty(self).map_err(|e| SearchError::Profile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let tmp = path.with_extension(format!("json.tmp{}", std::process::id()));
        std::fs::write(&tmp, text).map_err(|e| SearchError::io("write", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            SearchError::io("rename into", path, e)
        })
    }
}

/// Where profiles are kept by default: `$FLEXGEN_PROFILE` if set, else
/// `$XDG_CACHE_HOME/flexgen-rs/hardware-profile.json`, else under `~/.cache`, else the temp
/// dir.
pub fn default_profile_path() -> PathBuf {
    if let Some(p) = std::env::var_os("FLEXGEN_PROFILE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("flexgen-rs").join("hardware-profile.json")
}

/// Memory the search may plan with (before the relaxation factor).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLimits {
    /// RAM (the compute and host tiers together).
    pub ram_bytes: u64,
    /// Disk space of the offload directory.
    pub disk_bytes: u64,
}

impl MemoryLimits {
    /// Measured now: RAM = `MemAvailable` (capped by this process's memory limit, see
    /// [`crate::ram_limit_bytes`]); disk = free space of `offload_dir`'s filesystem (its
    /// nearest existing ancestor when it does not exist yet).
    pub fn measure(offload_dir: &Path) -> Self {
        let avail = meminfo("MemAvailable:");
        let limit = crate::tier::ram_limit_bytes();
        let ram_bytes = match (avail, limit) {
            (Some(a), Some(l)) => a.min(l),
            (a, l) => a.or(l).unwrap_or(u64::MAX),
        };
        MemoryLimits {
            ram_bytes,
            disk_bytes: disk_free(offload_dir).unwrap_or(u64::MAX),
        }
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A `/proc/meminfo` field in bytes.
fn meminfo(key: &str) -> Option<u64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = m.lines().find(|l| l.starts_with(key))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// `path` or its nearest existing ancestor.
fn existing_ancestor(path: &Path) -> Option<&Path> {
    path.ancestors().find(|p| p.exists())
}

fn device_of(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    Some(std::fs::metadata(existing_ancestor(path)?).ok()?.dev())
}

/// Free bytes (for unprivileged users) of the filesystem holding `path`, from `df -Pk`
/// (POSIX output in KiB; no `unsafe` FFI needed).
fn disk_free(path: &Path) -> Option<u64> {
    let dir = existing_ancestor(path)?;
    let out = std::process::Command::new("df")
        .arg("-Pk")
        .arg(dir)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_df_avail_kib(&String::from_utf8_lossy(&out.stdout)).map(|k| k * 1024)
}

/// The "Available" column (KiB) of `df -Pk` output for one filesystem.
fn parse_df_avail_kib(text: &str) -> Option<u64> {
    text.lines().nth(1)?.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_interpolate_in_log_space_and_clamp() {
        let c = RateCurve {
            points: vec![(1.0, 10.0), (100.0, 1000.0)],
        };
        assert_eq!(c.at(0.5), 10.0);
        assert_eq!(c.at(1e6), 1000.0);
        assert!((c.at(10.0) - 100.0).abs() < 1e-9);
        assert!(c.is_valid());
        assert!(!RateCurve {
            points: vec![(2.0, 1.0), (1.0, 1.0)]
        }
        .is_valid());
    }

    #[test]
    fn limits_and_fingerprint_are_measured() {
        let dir = std::env::temp_dir().join("surely/not/there/yet");
        let l = MemoryLimits::measure(&dir);
        assert!(l.ram_bytes > 0 && l.ram_bytes < u64::MAX);
        assert!(l.disk_bytes > 0 && l.disk_bytes < u64::MAX);
        let f = Fingerprint::current(&dir);
        assert!(f.cpus >= 1 && f.threads >= 1 && f.mem_total_bytes > 0);
        assert_eq!(f, Fingerprint::current(&dir));
        let df = "Filesystem 1024-blocks Used Available Capacity Mounted on\n\
                  /dev/vda 264000000 26000000 70000000 27% /\n";
        assert_eq!(parse_df_avail_kib(df), Some(70_000_000));
        assert_eq!(parse_df_avail_kib("garbage"), None);
    }
}
