//! Large preallocated tables on transparent huge pages.
//!
//! A conntrack index for a million flows is tens of megabytes read at random: on 4 KiB
//! pages nearly every lookup also misses the TLB, and a prefetch that misses the TLB
//! may be dropped or stall on a page walk. Where transparent huge pages are in `madvise`
//! mode (Debian's default), memory only gets them if it asks: [`HugeTable`] allocates an
//! anonymous mapping, advises `MADV_HUGEPAGE` before anything touches it, and views it as
//! a slice of plain-old-data values (zeroed, as a fresh mapping is). If the mapping
//! cannot be made, or the advice is refused (THP `never`, or no THP in the kernel), the
//! table still works, on whatever pages the kernel gives; it falls back to the heap only
//! if no mapping can be made at all.

use bytemuck::{Pod, Zeroable};
use memmap2::{Advice, MmapMut, MmapOptions};

/// A fixed-length array of `T`, zero-initialised, on huge pages where the kernel allows.
pub(crate) struct HugeTable<T> {
    storage: Storage<T>,
    /// Values held.
    len: usize,
    /// Whether the kernel accepted the huge-page advice.
    huge: bool,
}

enum Storage<T> {
    Mapped(MmapMut),
    Heap(Vec<T>),
}

impl<T: Pod + Zeroable> HugeTable<T> {
    /// `len` zeroed values.
    pub(crate) fn zeroed(len: usize) -> Self {
        let bytes = len.saturating_mul(core::mem::size_of::<T>());
        if bytes > 0 && core::mem::align_of::<T>() <= 4096 {
            if let Ok(map) = MmapOptions::new().len(bytes).map_anon() {
                let huge = map.advise(Advice::HugePage).is_ok();
                return Self {
                    storage: Storage::Mapped(map),
                    len,
                    huge,
                };
            }
        }
        Self {
            storage: Storage::Heap(vec![T::zeroed(); len]),
            len,
            huge: false,
        }
    }

    #[inline]
    pub(crate) fn as_slice(&self) -> &[T] {
        match &self.storage {
            // A mapping is page-aligned and exactly `len` values long, so the cast holds.
            Storage::Mapped(m) => bytemuck::try_cast_slice(&m[..]).unwrap_or(&[]),
            Storage::Heap(v) => v,
        }
    }

    #[inline]
    pub(crate) fn as_mut_slice(&mut self) -> &mut [T] {
        match &mut self.storage {
            Storage::Mapped(m) => bytemuck::try_cast_slice_mut(&mut m[..]).unwrap_or(&mut []),
            Storage::Heap(v) => v,
        }
    }

    /// Whether the memory was advised onto huge pages (the kernel decides the rest).
    pub(crate) fn huge_pages_advised(&self) -> bool {
        self.huge
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        self.len * core::mem::size_of::<T>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_writable_and_sized() {
        for len in [0usize, 1, 3, 100_000] {
            let mut t = HugeTable::<[u32; 16]>::zeroed(len);
            assert_eq!(t.as_slice().len(), len);
            assert!(t.as_slice().iter().all(|x| x.iter().all(|&w| w == 0)));
            for (i, x) in t.as_mut_slice().iter_mut().enumerate() {
                x[0] = i as u32;
            }
            assert!(t
                .as_slice()
                .iter()
                .enumerate()
                .all(|(i, x)| x[0] == i as u32));
        }
    }
}
