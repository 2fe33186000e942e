//! Memory tiers, their byte budgets, and accounting of what each holds (current and peak).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;

use crate::error::{Error, Result};

/// Where a tensor lives.
///
/// On the CPU backend `Compute` and `Host` are both RAM (FlexGen's GPU and CPU memory); a
/// policy may still split them, and each has its own budget. `Disk` is files in the offload
/// directory (or the checkpoint file itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// Memory the kernels compute from (FlexGen's GPU).
    #[default]
    Compute,
    /// Staging memory (FlexGen's CPU DRAM).
    Host,
    /// Files on disk.
    Disk,
}

impl Tier {
    /// Every tier, fastest first.
    pub const ALL: [Tier; 3] = [Tier::Compute, Tier::Host, Tier::Disk];

    /// Whether the tier is RAM on the CPU backend.
    pub fn is_ram(self) -> bool {
        self != Tier::Disk
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tier::Compute => "compute",
            Tier::Host => "host",
            Tier::Disk => "disk",
        })
    }
}

/// Byte budgets of the tiers. `ram` bounds compute + host together, since both are RAM here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Budgets {
    /// Compute tier.
    pub compute: u64,
    /// Host tier.
    pub host: u64,
    /// Compute and host together.
    pub ram: u64,
    /// Disk tier (offload directory).
    pub disk: u64,
}

/// Share of the machine's memory limit that plans may use by default (the rest is left for
/// the program, the allocator and the operating system; FlexGen's cost model uses 0.8).
pub const DEFAULT_RAM_FRACTION: f64 = 0.85;

impl Budgets {
    /// No limits.
    pub fn unlimited() -> Self {
        Budgets {
            compute: u64::MAX,
            host: u64::MAX,
            ram: u64::MAX,
            disk: u64::MAX,
        }
    }

    /// [`DEFAULT_RAM_FRACTION`] of [`ram_limit_bytes`] for compute and host (each and
    /// together); no disk limit.
    pub fn detect() -> Self {
        let ram = ram_limit_bytes()
            .map(|b| (b as f64 * DEFAULT_RAM_FRACTION) as u64)
            .unwrap_or(u64::MAX);
        Budgets {
            compute: ram,
            host: ram,
            ram,
            disk: u64::MAX,
        }
    }

    /// The budget of one tier.
    pub fn of(&self, tier: Tier) -> u64 {
        match tier {
            Tier::Compute => self.compute,
            Tier::Host => self.host,
            Tier::Disk => self.disk,
        }
    }

    /// Checks a plan's per-tier bytes (`[compute, host, disk]`) against the budgets; `what`
    /// describes the plan.
    pub fn check(&self, bytes: [u64; 3], what: &str) -> Result<()> {
        for tier in Tier::ALL {
            let needed = bytes[tier.index()];
            let budget = self.of(tier);
            if needed > budget {
                return Err(budget_error(tier, what, needed, budget, match tier {
                    Tier::Compute => "lower the compute percentages (wg, cg), the batch size or the sequence length",
                    Tier::Host => "lower the host percentages (wc, cc) or the batch size",
                    Tier::Disk => "free space in --offload-dir or raise the disk budget",
                }));
            }
        }
        let ram = bytes[0].saturating_add(bytes[1]);
        if ram > self.ram {
            return Err(budget_error(
                Tier::Host,
                &format!("{what} (compute and host tiers together, both RAM)"),
                ram,
                self.ram,
                "move weights or cache to disk (lower wg+wc or cg+cc) or shrink the block",
            ));
        }
        Ok(())
    }
}

fn budget_error(tier: Tier, what: &str, needed: u64, budget: u64, hint: &str) -> Error {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    Error::Budget {
        tier,
        what: what.to_string(),
        needed,
        needed_gib: gib(needed),
        budget,
        budget_gib: gib(budget),
        hint: hint.to_string(),
    }
}

/// The memory this process may use: the smallest of `MemTotal` and the memory limits of its
/// cgroup and the cgroup's ancestors (v2 `memory.max`, v1 `memory.limit_in_bytes`). `None`
/// when nothing can be read (non-Linux).
pub fn ram_limit_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let total = meminfo.as_deref().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    });
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| cgroup_limit(&c));
    match (total, cgroup) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    }
}

/// The smallest memory limit along this process's cgroup path (v2 or v1 layout).
fn cgroup_limit(proc_cgroup: &str) -> Option<u64> {
    let mut best: Option<u64> = None;
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let (root, file) = if controllers.is_empty() {
            ("/sys/fs/cgroup", "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes")
        } else {
            continue;
        };
        let mut dir = std::path::PathBuf::from(root);
        let mut limits = Vec::new();
        limits.push(dir.join(file));
        for comp in path.split('/').filter(|c| !c.is_empty()) {
            dir.push(comp);
            limits.push(dir.join(file));
        }
        for f in limits {
            if let Some(v) = std::fs::read_to_string(&f)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
            {
                // v1 reports "no limit" as a huge page-aligned number.
                if v < (1u64 << 60) {
                    best = Some(best.map_or(v, |b| b.min(v)));
                }
            }
        }
    }
    best
}

/// Bytes currently held and the peak, per tier; shared by every owner of tier memory.
#[derive(Debug, Default)]
pub struct MemoryTracker {
    current: [AtomicU64; 3],
    peak: [AtomicU64; 3],
}

impl MemoryTracker {
    /// A tracker with nothing held.
    pub fn new() -> Arc<Self> {
        Arc::new(MemoryTracker::default())
    }

    /// Records `bytes` more held on `tier` until the returned [`Charge`] is dropped.
    pub fn charge(self: &Arc<Self>, tier: Tier, bytes: u64) -> Charge {
        let i = tier.index();
        let now = self.current[i].fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak[i].fetch_max(now, Ordering::Relaxed);
        Charge {
            tracker: Some(Arc::clone(self)),
            tier,
            bytes,
        }
    }

    /// Bytes held on `tier` now.
    pub fn current(&self, tier: Tier) -> u64 {
        self.current[tier.index()].load(Ordering::Relaxed)
    }

    /// The most bytes `tier` held at once.
    pub fn peak(&self, tier: Tier) -> u64 {
        self.peak[tier.index()].load(Ordering::Relaxed)
    }

    /// Restarts peak tracking from the current amounts.
    pub fn reset_peaks(&self) {
        for i in 0..3 {
            self.peak[i].store(self.current[i].load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }
}

/// Bytes held on a tier, released when dropped.
#[derive(Debug, Default)]
pub struct Charge {
    tracker: Option<Arc<MemoryTracker>>,
    tier: Tier,
    bytes: u64,
}

impl Charge {
    /// The tier charged.
    pub fn tier(&self) -> Tier {
        self.tier
    }

    /// The bytes charged.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some(t) = &self.tracker {
            t.current[self.tier.index()].fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_counts_current_and_peak() {
        let t = MemoryTracker::new();
        let a = t.charge(Tier::Compute, 100);
        let b = t.charge(Tier::Compute, 50);
        let d = t.charge(Tier::Disk, 7);
        assert_eq!(
            (t.current(Tier::Compute), t.peak(Tier::Compute)),
            (150, 150)
        );
        drop(a);
        assert_eq!((t.current(Tier::Compute), t.peak(Tier::Compute)), (50, 150));
        t.reset_peaks();
        assert_eq!(t.peak(Tier::Compute), 50);
        assert_eq!((b.bytes(), d.tier()), (50, Tier::Disk));
        drop(d);
        assert_eq!((t.current(Tier::Disk), t.peak(Tier::Disk)), (0, 7));
        assert_eq!(t.current(Tier::Host), 0);
    }

    #[test]
    fn budgets_name_the_tier() {
        let b = Budgets {
            compute: 100,
            host: 100,
            ram: 150,
            disk: 10,
        };
        b.check([100, 50, 10], "plan").unwrap();
        let e = b.check([101, 0, 0], "weights").unwrap_err().to_string();
        assert!(e.contains("compute tier") && e.contains("101 bytes"), "{e}");
        let e = b.check([0, 0, 11], "weights").unwrap_err().to_string();
        assert!(e.contains("disk tier"), "{e}");
        let e = b.check([100, 60, 0], "weights").unwrap_err().to_string();
        assert!(e.contains("together"), "{e}");
        Budgets::unlimited()
            .check([u64::MAX, u64::MAX, 0], "x")
            .unwrap();
    }

    #[test]
    fn cgroup_paths_parse() {
        // Unreadable paths give no limit rather than an error.
        assert_eq!(cgroup_limit("0::/no/such/cgroup/for/test"), None);
        assert_eq!(cgroup_limit("garbage"), None);
        assert!(ram_limit_bytes().is_some());
    }
}
