//! [`HugePageAlloc`]: a global allocator that asks Linux to back large allocations with
//! transparent huge pages.
//!
//! Decoding streams every weight (and, at larger batches, the KV cache) from memory once per
//! token. With 4 KiB pages that stream crosses a page, and needs a TLB entry, every 4 KiB,
//! and each first touch of a fresh page is a page fault. Many distributions (Debian, Ubuntu)
//! set transparent huge pages to `madvise`, so anonymous memory gets 2 MiB pages only where
//! the program asks for them with `madvise(MADV_HUGEPAGE)`. On the development VM the read
//! probe (`tools/probes/read_bandwidth.c`) reads 1 GiB at 56-62 GB/s on huge pages against
//! 31-45 GB/s on 4 KiB pages in the same minutes.
//!
//! The allocator is [`std::alloc::System`] plus that advice for every allocation of
//! [`HugePageAlloc::MIN_BYTES`] or more: the whole 2 MiB-aligned part of the block is advised
//! before the caller first writes it. Smaller allocations are untouched. Elsewhere than
//! Linux, and where transparent huge pages are `never`, it is `System` unchanged.
//!
//! Install it in a binary with:
//!
//! ```
//! #[global_allocator]
//! static ALLOC: flexgen_core::HugePageAlloc = flexgen_core::HugePageAlloc;
//! # fn main() {}
//! ```

use std::alloc::{GlobalAlloc, Layout, System};

/// [`System`] with `madvise(MADV_HUGEPAGE)` on large blocks (see the [module docs](self)).
#[derive(Debug, Clone, Copy, Default)]
pub struct HugePageAlloc;

/// Size of a transparent huge page on x86-64 and most aarch64 kernels.
const HUGE_PAGE: usize = 2 << 20;

impl HugePageAlloc {
    /// Allocations of at least this many bytes are advised (smaller ones could not hold an
    /// aligned huge page once glibc's header is in front of them).
    pub const MIN_BYTES: usize = 4 << 20;
}

/// Advises the 2 MiB-aligned pages inside `[ptr, ptr + size)` for huge pages.
fn advise(ptr: *mut u8, size: usize) {
    if ptr.is_null() || size < HugePageAlloc::MIN_BYTES {
        return;
    }
    let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
    let end = (ptr as usize + size) / HUGE_PAGE * HUGE_PAGE;
    if end <= start {
        return;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: `[start, end)` lies inside the block the allocator has just handed out, which
    // its caller owns; MADV_HUGEPAGE changes how the kernel backs those pages, never their
    // contents. An error (a kernel without transparent huge pages) leaves the block as it
    // was, so the result is ignored.
    unsafe {
        libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
    }
}

// SAFETY: every method forwards to `System` with the same arguments and returns its result;
// `advise` only adds a hint about pages inside the returned block.
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded from the caller.
        let p = unsafe { System.alloc(layout) };
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded from the caller.
        let p = unsafe { System.alloc_zeroed(layout) };
        advise(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded from the caller.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded from the caller.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        advise(p, new_size);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `VmFlags` of the mapping of `/proc/self/smaps` that contains `addr`.
    #[cfg(target_os = "linux")]
    fn vm_flags_at(addr: usize) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((a, b)) = range.split_once('-') {
                    if let (Ok(a), Ok(b)) =
                        (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                    {
                        inside = (a..b).contains(&addr);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return Some(flags.trim().to_string());
                }
            }
        }
        None
    }

    /// Blocks of every size keep what is written to them through allocation, growth and
    /// shrinking, as with `System`.
    #[test]
    fn behaves_like_system() {
        let a = HugePageAlloc;
        for size in [1usize, 4096, HugePageAlloc::MIN_BYTES - 1, 9 << 20] {
            let layout = Layout::from_size_align(size, 64).unwrap();
            // SAFETY: non-zero sizes; every block is freed with the layout it has.
            unsafe {
                let z = a.alloc_zeroed(layout);
                assert!(!z.is_null());
                assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                a.dealloc(z, layout);
                let p = a.alloc(layout);
                assert!(!p.is_null() && (p as usize).is_multiple_of(64));
                for i in 0..size {
                    *p.add(i) = (i % 251) as u8;
                }
                let grown = a.realloc(p, layout, 2 * size + 3 * HUGE_PAGE);
                assert!(!grown.is_null());
                assert!((0..size).all(|i| *grown.add(i) == (i % 251) as u8));
                let big = Layout::from_size_align(2 * size + 3 * HUGE_PAGE, 64).unwrap();
                let shrunk = a.realloc(grown, big, size.div_ceil(2));
                assert!((0..size.div_ceil(2)).all(|i| *shrunk.add(i) == (i % 251) as u8));
                a.dealloc(
                    shrunk,
                    Layout::from_size_align(size.div_ceil(2), 64).unwrap(),
                );
            }
        }
    }

    /// A large block's aligned middle is advised (`hg` in its mapping's flags) wherever the
    /// kernel offers transparent huge pages; a small block's mapping is not changed.
    #[cfg(target_os = "linux")]
    #[test]
    fn large_blocks_are_advised() {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        let a = HugePageAlloc;
        let layout = Layout::from_size_align(32 << 20, 64).unwrap();
        // SAFETY: a non-zero size, freed with its layout.
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            let mid = (p as usize + (16 << 20)) / HUGE_PAGE * HUGE_PAGE;
            let flags = vm_flags_at(mid).expect("the block is mapped");
            if thp.contains('[') && !thp.contains("[never]") {
                assert!(flags.split(' ').any(|f| f == "hg"), "{flags}");
            }
            a.dealloc(p, layout);
        }
    }
}
