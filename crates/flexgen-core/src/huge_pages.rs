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
//! The allocator is [`std::alloc::System`] plus, for every allocation of
//! [`HugePageAlloc::MIN_BYTES`] or more, a 2 MiB alignment (so that an 8 MiB weight is four
//! whole huge pages, not three and two partial ones) and that advice, given before the caller
//! first writes the block. Smaller allocations are untouched. Elsewhere than Linux, and where
//! transparent huge pages are `never`, large blocks are only aligned.
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
    /// Allocations of at least this many bytes are aligned and advised. Below it, a 2 MiB
    /// alignment would cost up to 2 MiB of address space per block for at most one huge page.
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
    #[cfg(not(target_os = "linux"))]
    let _ = (start, end);
}

/// The layout `System` is asked for: `layout` itself, or for large blocks the same size at a
/// 2 MiB alignment. A function of the caller's layout alone, so `dealloc` recomputes what
/// `alloc` used.
fn system_layout(layout: Layout) -> Layout {
    if layout.size() >= HugePageAlloc::MIN_BYTES && layout.align() < HUGE_PAGE {
        Layout::from_size_align(layout.size(), HUGE_PAGE).unwrap_or(layout)
    } else {
        layout
    }
}

// SAFETY: every block comes from `System` with `system_layout` of the caller's layout, which
// satisfies the caller's size and alignment, and goes back to `System` with the same layout;
// `advise` only adds a hint about pages inside a block just handed out.
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: `system_layout` keeps the caller's non-zero size.
        let p = unsafe { System.alloc(system_layout(layout)) };
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        let p = unsafe { System.alloc_zeroed(system_layout(layout)) };
        advise(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc*` or `realloc` with this `layout`, so from `System`
        // with `system_layout(layout)`.
        unsafe { System.dealloc(ptr, system_layout(layout)) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (old, new) = (
            system_layout(layout),
            // SAFETY: the caller guarantees `new_size` with `layout.align()` is a valid layout.
            system_layout(unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) }),
        );
        if old.align() == new.align() {
            // SAFETY: `ptr` is a `System` block of layout `old`; `new_size` is valid at its
            // alignment (the same as `new`'s).
            let p = unsafe { System.realloc(ptr, old, new_size) };
            advise(p, new_size);
            return p;
        }
        // Crossing `MIN_BYTES` changes the alignment: move the block.
        // SAFETY: `new` has a non-zero size; the old block is valid for `layout.size()` bytes
        // and the new one for `new_size`; the old block is freed with its own layout.
        unsafe {
            let p = System.alloc(new);
            if !p.is_null() {
                advise(p, new_size);
                std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                System.dealloc(ptr, old);
            }
            p
        }
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
                if size >= HugePageAlloc::MIN_BYTES {
                    assert!((p as usize).is_multiple_of(HUGE_PAGE));
                }
                for i in 0..size {
                    *p.add(i) = (i % 251) as u8;
                }
                let grown = a.realloc(p, layout, 2 * size + 3 * HUGE_PAGE);
                assert!(!grown.is_null() && (grown as usize).is_multiple_of(HUGE_PAGE));
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
