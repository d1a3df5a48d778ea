//! The buffer registry: which entry of the buffer table each of this rank's
//! buffers uses (docs/design.md, "Buffer table").
//!
//! Every rank numbers its own buffers; entry `index` of owner `r` in every
//! rank's table holds the address of rank r's buffer `index` as that rank
//! reaches it. Kernels learn at their start barrier which index and offset
//! each peer reads from, so ranks need not agree on how they number
//! buffers, nor on whether a call's input is registered, staged or
//! captured. This module only does the numbering, so it is testable
//! without a GPU; the communicator writes the table.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Index of the staging buffer, registered at set-up on every rank.
pub(crate) const STAGING_INDEX: usize = 0;

/// Where an input lives in this rank's numbering: the buffer's index and
/// the byte offset of the input from the buffer's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Located {
    pub index: usize,
    pub offset: u64,
}

#[derive(Debug)]
pub(crate) struct Registry {
    capacity: usize,
    /// Indices never handed out start here.
    next_unused: usize,
    /// Indices handed out and given back, reused first.
    free: Vec<usize>,
    /// Eagerly registered buffers by start address: (length in bytes, index).
    buffers: BTreeMap<u64, (u64, usize)>,
    /// Indices reserved during stream capture, with their pointers, in the
    /// order the calls were captured; shared once capture ends.
    pending: Vec<(usize, u64)>,
    /// Indices that registered graphs use, until their buffers are released.
    graphs: Vec<usize>,
}

impl Registry {
    pub fn new(capacity: usize) -> Self {
        Registry {
            capacity,
            next_unused: 0,
            free: Vec::new(),
            buffers: BTreeMap::new(),
            pending: Vec::new(),
            graphs: Vec::new(),
        }
    }

    /// Takes a free index; a full table is an error, never an overwrite.
    pub fn reserve(&mut self) -> Result<usize> {
        if let Some(index) = self.free.pop() {
            return Ok(index);
        }
        if self.next_unused >= self.capacity {
            return Err(Error::RecordTableFull {
                capacity: self.capacity,
            });
        }
        self.next_unused += 1;
        Ok(self.next_unused - 1)
    }

    /// Gives `index` back for reuse.
    pub fn release(&mut self, index: usize) {
        self.free.push(index);
    }

    /// Remembers that `bytes` at `start` use `index` (registered eagerly).
    /// A later registration of the same start address replaces the earlier,
    /// whose index is returned (still taken: the caller releases it once
    /// its peer mappings are gone).
    pub fn insert(&mut self, start: u64, bytes: u64, index: usize) -> Option<usize> {
        self.buffers
            .insert(start, (bytes, index))
            .map(|(_, replaced)| replaced)
    }

    /// The index of the buffer registered at `start`.
    pub fn index_of(&self, start: u64) -> Option<usize> {
        self.buffers.get(&start).map(|&(_, index)| index)
    }

    /// Forgets the buffer registered at `start` and frees its index.
    pub fn remove(&mut self, start: u64) -> Option<usize> {
        let (_, index) = self.buffers.remove(&start)?;
        self.release(index);
        Some(index)
    }

    /// The registered buffer that holds all of `[ptr, ptr + bytes)`.
    pub fn lookup(&self, ptr: u64, bytes: u64) -> Option<Located> {
        let (&start, &(len, index)) = self.buffers.range(..=ptr).next_back()?;
        let offset = ptr - start;
        (offset.checked_add(bytes)? <= len).then_some(Located { index, offset })
    }

    /// Reserves an index for a pointer seen during stream capture.
    pub fn reserve_pending(&mut self, ptr: u64) -> Result<usize> {
        let index = self.reserve()?;
        self.pending.push((index, ptr));
        Ok(index)
    }

    /// The indices reserved during capture and their local pointers.
    pub fn pending(&self) -> &[(usize, u64)] {
        &self.pending
    }

    /// Moves the pending indices to the registered graphs' and returns them.
    pub fn adopt_pending(&mut self) -> Vec<(usize, u64)> {
        let pending = std::mem::take(&mut self.pending);
        self.graphs.extend(pending.iter().map(|&(index, _)| index));
        pending
    }

    /// Frees the indices of every registered graph.
    pub fn release_graphs(&mut self) {
        let graphs = std::mem::take(&mut self.graphs);
        graphs.into_iter().for_each(|index| self.release(index));
    }

    /// Indices in use (the staging buffer's included): what the tests
    /// check the accounting by.
    #[cfg(test)]
    pub fn in_use(&self) -> usize {
        self.next_unused - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registering_a_start_again_returns_the_replaced_index() {
        let mut registry = Registry::new(4);
        let first = registry.reserve().unwrap();
        assert_eq!(registry.insert(0x1000, 256, first), None);
        let second = registry.reserve().unwrap();
        assert_eq!(registry.insert(0x1000, 512, second), Some(first));
        registry.release(first);
        assert_eq!(registry.index_of(0x1000), Some(second));
        assert_eq!(registry.remove(0x1000), Some(second));
        assert_eq!(registry.index_of(0x1000), None);
        assert_eq!(registry.in_use(), 0);
    }

    #[test]
    fn indices_are_reused_after_release_and_the_table_never_overflows() {
        let mut registry = Registry::new(3);
        assert_eq!(registry.reserve().unwrap(), 0);
        assert_eq!(registry.reserve().unwrap(), 1);
        assert_eq!(registry.reserve_pending(0x1000).unwrap(), 2);
        match registry.reserve() {
            Err(Error::RecordTableFull { capacity: 3 }) => {}
            other => panic!("expected a full table, got {other:?}"),
        }
        assert!(registry.reserve_pending(0x2000).is_err());
        assert_eq!(registry.in_use(), 3);
        registry.insert(0x4000, 64, 1);
        registry.remove(0x4000);
        assert_eq!(registry.reserve().unwrap(), 1, "a removed index is reused");
        assert_eq!(registry.adopt_pending(), vec![(2, 0x1000)]);
        registry.release_graphs();
        assert_eq!(registry.reserve().unwrap(), 2, "a released graph's index");
    }

    #[test]
    fn lookup_finds_inputs_inside_registered_buffers_only() {
        let mut registry = Registry::new(8);
        registry.insert(0x1000, 0x100, 4);
        registry.insert(0x2000, 0x40, 5);
        let at = |ptr, bytes| registry.lookup(ptr, bytes);
        assert_eq!(
            at(0x1000, 0x100),
            Some(Located {
                index: 4,
                offset: 0
            })
        );
        assert_eq!(
            at(0x1010, 0x20),
            Some(Located {
                index: 4,
                offset: 0x10
            })
        );
        assert_eq!(at(0x10f0, 0x20), None, "runs past the end");
        assert_eq!(at(0x1800, 0x10), None, "between buffers");
        assert_eq!(at(0x0fff, 0x1), None, "before the first buffer");
        assert_eq!(
            at(0x2000, 0x40),
            Some(Located {
                index: 5,
                offset: 0
            })
        );
        assert_eq!(at(u64::MAX, 2), None, "overflowing range");
        registry.remove(0x1000);
        assert_eq!(registry.lookup(0x1010, 0x20), None, "removed");
    }

    #[test]
    fn pending_indices_keep_capture_order_and_are_not_deduplicated() {
        let mut registry = Registry::new(8);
        registry.reserve().unwrap();
        let a = registry.reserve_pending(0x5000).unwrap();
        let b = registry.reserve_pending(0x5000).unwrap();
        assert_ne!(a, b);
        assert_eq!(registry.adopt_pending(), vec![(1, 0x5000), (2, 0x5000)]);
        assert!(registry.pending().is_empty());
    }
}
