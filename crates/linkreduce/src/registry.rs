//! The buffer registry: host-side bookkeeping for the device table of peer
//! pointer records (one record per registered buffer, see SPEC.md).
//!
//! The device table itself is written by the communicator; this module only
//! decides which record a buffer uses, so it is testable without a GPU.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Where an input lives in the table: its record and the byte offset of the
/// input from the start of the registered buffer (the same on every rank).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Located {
    pub record: usize,
    pub offset: u64,
}

#[derive(Debug)]
pub(crate) struct Registry {
    capacity: usize,
    next_free: usize,
    /// Registered buffers by start address: (length in bytes, record).
    buffers: BTreeMap<u64, (u64, usize)>,
    /// Records reserved during stream capture, filled after it (record,
    /// local pointer), in the order the calls were captured.
    pending: Vec<(usize, u64)>,
}

impl Registry {
    pub fn new(capacity: usize) -> Self {
        Registry {
            capacity,
            next_free: 0,
            buffers: BTreeMap::new(),
            pending: Vec::new(),
        }
    }

    /// Takes the next free record; the table never overwrites one silently.
    pub fn reserve(&mut self) -> Result<usize> {
        if self.next_free >= self.capacity {
            return Err(Error::RecordTableFull {
                capacity: self.capacity,
            });
        }
        self.next_free += 1;
        Ok(self.next_free - 1)
    }

    /// Remembers that `bytes` at `start` use `record` (registered eagerly).
    /// A later registration of the same start address replaces the earlier,
    /// whose record is returned.
    pub fn insert(&mut self, start: u64, bytes: u64, record: usize) -> Option<usize> {
        self.buffers
            .insert(start, (bytes, record))
            .map(|(_, replaced)| replaced)
    }

    /// The record of the buffer registered at `start`.
    pub fn record_of(&self, start: u64) -> Option<usize> {
        self.buffers.get(&start).map(|&(_, record)| record)
    }

    /// Forgets the buffer registered at `start`; returns its record.
    pub fn remove(&mut self, start: u64) -> Option<usize> {
        self.buffers.remove(&start).map(|(_, record)| record)
    }

    /// The registered buffer that holds all of `[ptr, ptr + bytes)`.
    pub fn lookup(&self, ptr: u64, bytes: u64) -> Option<Located> {
        let (&start, &(len, record)) = self.buffers.range(..=ptr).next_back()?;
        let offset = ptr - start;
        (offset.checked_add(bytes)? <= len).then_some(Located { record, offset })
    }

    /// Reserves a record for a pointer seen during stream capture; it is
    /// filled by [`Registry::take_pending`]'s caller once capture ends.
    pub fn reserve_pending(&mut self, ptr: u64) -> Result<usize> {
        let record = self.reserve()?;
        self.pending.push((record, ptr));
        Ok(record)
    }

    /// The records reserved during capture and their local pointers.
    pub fn pending(&self) -> &[(usize, u64)] {
        &self.pending
    }

    pub fn take_pending(&mut self) -> Vec<(usize, u64)> {
        std::mem::take(&mut self.pending)
    }

    pub fn records_used(&self) -> usize {
        self.next_free
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registering_a_start_again_returns_the_replaced_record() {
        let mut registry = Registry::new(4);
        let first = registry.reserve().unwrap();
        assert_eq!(registry.insert(0x1000, 256, first), None);
        let second = registry.reserve().unwrap();
        assert_eq!(registry.insert(0x1000, 512, second), Some(first));
        assert_eq!(registry.record_of(0x1000), Some(second));
        assert_eq!(registry.remove(0x1000), Some(second));
        assert_eq!(registry.record_of(0x1000), None);
    }

    #[test]
    fn records_are_handed_out_in_order_until_the_table_is_full() {
        let mut registry = Registry::new(3);
        assert_eq!(registry.reserve().unwrap(), 0);
        assert_eq!(registry.reserve().unwrap(), 1);
        assert_eq!(registry.reserve_pending(0x1000).unwrap(), 2);
        match registry.reserve() {
            Err(Error::RecordTableFull { capacity: 3 }) => {}
            other => panic!("expected a full table, got {other:?}"),
        }
        assert!(registry.reserve_pending(0x2000).is_err());
        assert_eq!(registry.records_used(), 3);
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
                record: 4,
                offset: 0
            })
        );
        assert_eq!(
            at(0x1010, 0x20),
            Some(Located {
                record: 4,
                offset: 0x10
            })
        );
        assert_eq!(at(0x10f0, 0x20), None, "runs past the end");
        assert_eq!(at(0x1800, 0x10), None, "between buffers");
        assert_eq!(at(0x0fff, 0x1), None, "before the first buffer");
        assert_eq!(
            at(0x2000, 0x40),
            Some(Located {
                record: 5,
                offset: 0
            })
        );
        assert_eq!(at(u64::MAX, 2), None, "overflowing range");
        registry.remove(0x1000);
        assert_eq!(registry.lookup(0x1010, 0x20), None, "removed");
    }

    #[test]
    fn pending_records_keep_capture_order_and_are_not_deduplicated() {
        let mut registry = Registry::new(8);
        registry.reserve().unwrap();
        let a = registry.reserve_pending(0x5000).unwrap();
        let b = registry.reserve_pending(0x5000).unwrap();
        assert_ne!(a, b);
        assert_eq!(registry.take_pending(), vec![(1, 0x5000), (2, 0x5000)]);
        assert!(registry.take_pending().is_empty());
    }
}
