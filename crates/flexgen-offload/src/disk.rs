//! The disk tier's files (in an [`crate::offload_dir::OffloadDir`]), read and written with
//! positioned I/O (`pread`/`pwrite`), bypassing the page cache with `O_DIRECT`
//! where the filesystem allows, so that disk-tier bytes never stay resident.
//!
//! `O_DIRECT` needs the file offset, length and memory address aligned to [`ALIGN`]. A
//! transfer is cut into an unaligned head and tail (done through the page cache) and an aligned
//! body. The body goes straight into the caller's buffer when its address is aligned too (the
//! runtime lays files out so that buffers from the allocator line up, see
//! [`crate::disk::alloc_phase`]), otherwise through a reusable aligned bounce buffer per thread.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};

/// Alignment of direct I/O (offsets, lengths and addresses).
pub const ALIGN: usize = 4096;

/// Size of the per-thread bounce buffer used when a buffer is not aligned.
const BOUNCE_BYTES: usize = 8 << 20;

/// A zeroed byte buffer whose start is [`ALIGN`]-aligned, built safely from an over-allocated
/// `Vec`.
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes at an aligned address.
    pub fn new(len: usize) -> Self {
        let raw = vec![0u8; len + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN).min(ALIGN);
        AlignedBuf { raw, start, len }
    }

    /// Whether the buffer really is aligned (`align_offset` may decline).
    pub fn is_aligned(&self) -> bool {
        (self.raw[self.start..].as_ptr() as usize).is_multiple_of(ALIGN)
    }

    /// The bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// Where large heap buffers start relative to [`ALIGN`] (glibc serves them from `mmap` with a
/// 16-byte header). The runtime places each disk region at a file offset with this remainder,
/// so that reading into a freshly allocated buffer is direct I/O without a bounce copy.
pub fn alloc_phase() -> usize {
    static PHASE: OnceLock<usize> = OnceLock::new();
    *PHASE.get_or_init(|| {
        let probe: Vec<u8> = vec![0u8; 64 << 20];
        probe.as_ptr() as usize % ALIGN
    })
}

/// Rounds `offset` up to the next offset `≡ alloc_phase() (mod ALIGN)`.
pub fn phase_aligned(offset: u64) -> u64 {
    let a = ALIGN as u64;
    let phase = alloc_phase() as u64;
    let base = offset.div_ceil(a) * a;
    if base >= a && base - a + phase >= offset {
        base - a + phase
    } else {
        base + phase
    }
}

/// Counters of disk traffic: bytes and seconds spent reading and writing.
#[derive(Debug, Default)]
pub struct IoStats {
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    read_ns: AtomicU64,
    write_ns: AtomicU64,
    direct_fallbacks: AtomicU64,
}

/// A snapshot of [`IoStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct IoTotals {
    /// Bytes read from disk-tier files.
    pub read_bytes: u64,
    /// Bytes written to disk-tier files.
    pub write_bytes: u64,
    /// Seconds spent in reads (summed over I/O threads).
    pub read_s: f64,
    /// Seconds spent in writes (summed over I/O threads).
    pub write_s: f64,
}

impl IoStats {
    /// Fresh counters.
    pub fn new() -> Arc<Self> {
        Arc::new(IoStats::default())
    }

    /// The totals so far.
    pub fn totals(&self) -> IoTotals {
        IoTotals {
            read_bytes: self.read_bytes.load(Ordering::Relaxed),
            write_bytes: self.write_bytes.load(Ordering::Relaxed),
            read_s: self.read_ns.load(Ordering::Relaxed) as f64 * 1e-9,
            write_s: self.write_ns.load(Ordering::Relaxed) as f64 * 1e-9,
        }
    }

    /// How many files gave up direct I/O because the filesystem refused it.
    pub fn direct_fallbacks(&self) -> u64 {
        self.direct_fallbacks.load(Ordering::Relaxed)
    }
}

impl std::ops::Sub for IoTotals {
    type Output = IoTotals;
    fn sub(self, o: IoTotals) -> IoTotals {
        IoTotals {
            read_bytes: self.read_bytes - o.read_bytes,
            write_bytes: self.write_bytes - o.write_bytes,
            read_s: self.read_s - o.read_s,
            write_s: self.write_s - o.write_s,
        }
    }
}

/// A file of the disk tier with thread-safe positioned reads and writes.
#[derive(Debug)]
pub struct DiskFile {
    path: PathBuf,
    buffered: File,
    direct: Option<File>,
    direct_ok: AtomicBool,
    stats: Arc<IoStats>,
}

thread_local! {
    static BOUNCE: RefCell<Option<AlignedBuf>> = const { RefCell::new(None) };
}

fn is_unsupported(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full_at(f: &File, buf: &mut [u8], mut off: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                off += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl DiskFile {
    /// Creates (or truncates) a read-write file; `direct_io` asks for `O_DIRECT`, silently
    /// falling back to buffered I/O where the filesystem refuses it.
    pub fn create(path: impl Into<PathBuf>, direct_io: bool, stats: Arc<IoStats>) -> Result<Self> {
        let path = path.into();
        let buffered = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| Error::io("create", &path, e))?;
        let direct = if direct_io {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
                .ok()
        } else {
            None
        };
        Ok(Self::from_parts(path, buffered, direct, stats))
    }

    /// Opens an existing file read-only (e.g. a checkpoint whose tensors are read in place).
    pub fn open_read(
        path: impl Into<PathBuf>,
        direct_io: bool,
        stats: Arc<IoStats>,
    ) -> Result<Self> {
        let path = path.into();
        let buffered = File::open(&path).map_err(|e| Error::io("open", &path, e))?;
        let direct = if direct_io {
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
                .ok()
        } else {
            None
        };
        Ok(Self::from_parts(path, buffered, direct, stats))
    }

    fn from_parts(
        path: PathBuf,
        buffered: File,
        direct: Option<File>,
        stats: Arc<IoStats>,
    ) -> Self {
        if direct.is_none() {
            stats.direct_fallbacks.fetch_add(1, Ordering::Relaxed);
        }
        DiskFile {
            path,
            direct_ok: AtomicBool::new(direct.is_some()),
            buffered,
            direct,
            stats,
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether transfers use `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct_ok.load(Ordering::Relaxed)
    }

    /// Sets the file's length (sparse; reserves nothing).
    pub fn set_len(&self, len: u64) -> Result<()> {
        self.buffered
            .set_len(len)
            .map_err(|e| Error::io("resize", &self.path, e))
    }

    fn direct_file(&self) -> Option<&File> {
        if self.direct_ok.load(Ordering::Relaxed) {
            self.direct.as_ref()
        } else {
            None
        }
    }

    fn give_up_direct(&self) {
        if self.direct_ok.swap(false, Ordering::Relaxed) {
            self.stats.direct_fallbacks.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Fills `dst` with the bytes at `offset`; the whole range must exist.
    pub fn read_at(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        let t = Instant::now();
        self.read_inner(offset, dst)
            .map_err(|e| Error::io("read", &self.path, e))?;
        self.stats
            .read_bytes
            .fetch_add(dst.len() as u64, Ordering::Relaxed);
        self.stats
            .read_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Writes `src` at `offset` (extending the file if needed).
    pub fn write_at(&self, offset: u64, src: &[u8]) -> Result<()> {
        let t = Instant::now();
        self.write_inner(offset, src)
            .map_err(|e| Error::io("write", &self.path, e))?;
        self.stats
            .write_bytes
            .fetch_add(src.len() as u64, Ordering::Relaxed);
        self.stats
            .write_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn read_buffered(&self, offset: u64, dst: &mut [u8]) -> std::io::Result<()> {
        let n = read_full_at(&self.buffered, dst, offset)?;
        if n < dst.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "{} bytes at offset {offset} past the end of the file",
                    dst.len() - n
                ),
            ));
        }
        Ok(())
    }

    /// `(head, body)` lengths of a transfer: the head reaches the next aligned file offset,
    /// the body is whole aligned blocks, the rest is the tail.
    fn split(offset: u64, len: usize) -> (usize, usize) {
        let head = ((ALIGN - (offset as usize % ALIGN)) % ALIGN).min(len);
        let body = (len - head) / ALIGN * ALIGN;
        (head, body)
    }

    fn read_inner(&self, offset: u64, dst: &mut [u8]) -> std::io::Result<()> {
        let Some(direct) = self.direct_file() else {
            return self.read_buffered(offset, dst);
        };
        let (head, body) = Self::split(offset, dst.len());
        if body == 0 {
            return self.read_buffered(offset, dst);
        }
        let (h, rest) = dst.split_at_mut(head);
        let (b, tail) = rest.split_at_mut(body);
        let body_off = offset + head as u64;
        self.read_buffered(offset, h)?;
        let res = if (b.as_ptr() as usize).is_multiple_of(ALIGN) {
            read_full_at(direct, b, body_off).and_then(|n| {
                if n == b.len() {
                    Ok(())
                } else {
                    Err(std::io::ErrorKind::UnexpectedEof.into())
                }
            })
        } else {
            with_bounce(|bounce| {
                let mut done = 0;
                while done < b.len() {
                    let n = (b.len() - done).min(bounce.len());
                    let got = read_full_at(direct, &mut bounce[..n], body_off + done as u64)?;
                    if got < n {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    b[done..done + n].copy_from_slice(&bounce[..n]);
                    done += n;
                }
                Ok(())
            })
        };
        match res {
            Ok(()) => {}
            Err(e) if is_unsupported(&e) => {
                self.give_up_direct();
                self.read_buffered(body_off, b)?;
            }
            Err(e) => return Err(e),
        }
        self.read_buffered(body_off + body as u64, tail)
    }

    fn write_inner(&self, offset: u64, src: &[u8]) -> std::io::Result<()> {
        let Some(direct) = self.direct_file() else {
            return self.buffered.write_all_at(src, offset);
        };
        let (head, body) = Self::split(offset, src.len());
        if body == 0 {
            return self.buffered.write_all_at(src, offset);
        }
        let (h, rest) = src.split_at(head);
        let (b, tail) = rest.split_at(body);
        let body_off = offset + head as u64;
        self.buffered.write_all_at(h, offset)?;
        let res = if (b.as_ptr() as usize).is_multiple_of(ALIGN) {
            direct.write_all_at(b, body_off)
        } else {
            with_bounce(|bounce| {
                let mut done = 0;
                while done < b.len() {
                    let n = (b.len() - done).min(bounce.len());
                    bounce[..n].copy_from_slice(&b[done..done + n]);
                    direct.write_all_at(&bounce[..n], body_off + done as u64)?;
                    done += n;
                }
                Ok(())
            })
        };
        match res {
            Ok(()) => {}
            Err(e) if is_unsupported(&e) => {
                self.give_up_direct();
                self.buffered.write_all_at(b, body_off)?;
            }
            Err(e) => return Err(e),
        }
        self.buffered.write_all_at(tail, body_off + body as u64)
    }
}

fn with_bounce<R>(f: impl FnOnce(&mut [u8]) -> std::io::Result<R>) -> std::io::Result<R> {
    BOUNCE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let buf = slot.get_or_insert_with(|| AlignedBuf::new(BOUNCE_BYTES));
        if !buf.is_aligned() {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        f(buf.as_mut_slice())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload_dir::OffloadDir;

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn round_trips_at_any_offset_and_alignment() {
        let parent = tempfile::tempdir().unwrap();
        let dir = OffloadDir::create(parent.path()).unwrap();
        for direct in [true, false] {
            let stats = IoStats::new();
            let f = DiskFile::create(dir.path().join(format!("f{direct}")), direct, stats.clone())
                .unwrap();
            f.set_len(1 << 20).unwrap();
            let mut expect = vec![0u8; 1 << 20];
            // Offsets and lengths around block boundaries, aligned and unaligned buffers.
            for (i, &(off, len)) in [
                (0u64, 4096usize),
                (1, 5000),
                (4095, 9000),
                (8192, 3 * 4096 + 7),
                (100_000, 200_000),
                (3, 2),
            ]
            .iter()
            .enumerate()
            {
                let data = pattern(len, i as u8);
                let mut aligned = AlignedBuf::new(len);
                aligned.as_mut_slice().copy_from_slice(&data);
                if i % 2 == 0 {
                    f.write_at(off, aligned.as_mut_slice()).unwrap();
                } else {
                    f.write_at(off, &data).unwrap();
                }
                expect[off as usize..off as usize + len].copy_from_slice(&data);
            }
            for &(off, len) in &[(0u64, 1usize << 20), (1, 4096), (4096, 8192), (77, 300_000)] {
                let mut got = vec![0u8; len];
                f.read_at(off, &mut got).unwrap();
                assert_eq!(
                    got,
                    expect[off as usize..off as usize + len],
                    "direct={direct} off={off}"
                );
                let mut al = AlignedBuf::new(len);
                f.read_at(off, al.as_mut_slice()).unwrap();
                assert_eq!(al.as_mut_slice(), &expect[off as usize..off as usize + len]);
            }
            let t = stats.totals();
            assert!(t.read_bytes > 0 && t.write_bytes > 0);
            // Reading past the end is an error naming the file.
            let mut big = vec![0u8; 10];
            let e = f.read_at((1 << 20) - 5, &mut big).unwrap_err().to_string();
            assert!(
                e.contains("read") && e.contains(&format!("f{direct}")),
                "{e}"
            );
        }
    }

    #[test]
    fn phase_alignment() {
        let p = alloc_phase() as u64;
        for off in [0u64, 1, 15, 16, 17, 4095, 4096, 4097, 10_000] {
            let q = phase_aligned(off);
            assert!(q >= off && q < off + ALIGN as u64 + 1, "{off} -> {q}");
            assert_eq!(q % ALIGN as u64, p);
        }
    }
}
