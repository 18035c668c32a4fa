//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): lookup tables built off the
//! fast path, indexed by the fast path. (Helper is filling this in.)

/// One backend as Maglev sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MaglevBackend {
    /// Stable identity (e.g. a hash of address and port): decides the permutation, so a
    /// backend keeps its slots when others come and go.
    pub id: u64,
    /// Relative weight; 0 means no slots.
    pub weight: u32,
}

/// Sizing of Maglev tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaglevConfig {
    pub slots_per_backend: usize,
    pub min_size: usize,
    pub max_size: usize,
}

impl Default for MaglevConfig {
    fn default() -> Self {
        Self {
            slots_per_backend: 100,
            min_size: 251,
            max_size: 65_537,
        }
    }
}

/// A built lookup table: slot -> index into the backend slice it was built from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MaglevTable {
    slots: Box<[u16]>,
}

impl MaglevTable {
    pub fn build(_backends: &[MaglevBackend], _cfg: &MaglevConfig) -> Self {
        Self::default()
    }
    pub fn empty() -> Self {
        Self::default()
    }
    #[inline]
    pub fn lookup(&self, hash: u64) -> Option<u16> {
        if self.slots.is_empty() {
            return None;
        }
        let i = ((hash >> 32) * self.slots.len() as u64) >> 32;
        Some(self.slots[i as usize])
    }
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
    pub fn size(&self) -> usize {
        self.slots.len()
    }
}
