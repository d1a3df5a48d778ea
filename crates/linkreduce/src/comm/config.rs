//! What a caller tunes: per communicator ([`Config`], the same on every
//! rank) and per call ([`CallOptions`]).

use std::time::Duration;

use crate::algorithm::{AlgorithmChoice, Tuning};
use crate::error::{Error, Result};
use crate::kernels::{MAX_BLOCKS, MAX_RANKS, MAX_TABLE_ENTRIES, PACKET_BYTES, SCRATCH_TAIL_BYTES};

/// Tunables of a communicator. Every rank must use the same values.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long a kernel waits for a peer at a barrier before giving up.
    pub timeout: Duration,
    /// How long set-up and registration wait for the other ranks.
    pub rendezvous_timeout: Duration,
    /// Staging buffer for inputs that peers cannot read where they are
    /// (not registered, misaligned, or in place where that is unsafe), and
    /// the largest piece a call is cut into: larger messages take several
    /// launches, on every rank alike.
    pub staging_bytes: usize,
    /// Scratch for the two-stage algorithm's reduced slices; larger
    /// messages are split into several launches.
    pub scratch_bytes: usize,
    /// Largest push launch in bytes; each rank's push area holds
    /// `3 x world size` times this. Larger pushes are split.
    pub push_bytes: usize,
    /// Buffer-table entries per rank: the staging buffer, registered
    /// buffers, and buffers that captured graphs read (at most 65536).
    pub max_records: usize,
    /// Measured algorithm choices for automatic calls; None reads the file
    /// `LINKREDUCE_TUNING` names, if set, else the table shipped for the
    /// GPU and world size, if any. Every rank must use the same.
    pub tuning: Option<Tuning>,
    /// Upper bound on blocks per launch, further limited so that every
    /// rank's grid stays resident (ranks sharing a GPU together use at most
    /// half its SMs: docs/design.md, "Ranks sharing a GPU"). Large messages need many blocks to reach
    /// NVLink bandwidth; small ones use few whatever this is.
    pub max_blocks: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            timeout: Duration::from_secs(5),
            rendezvous_timeout: Duration::from_secs(60),
            staging_bytes: 32 << 20,
            scratch_bytes: 32 << 20,
            push_bytes: 1 << 20,
            max_records: 65536,
            tuning: None,
            max_blocks: MAX_BLOCKS as u32,
        }
    }
}

impl Config {
    /// Sets the staging size and keeps the push size within it (push
    /// launches are staged through it, which `validate` requires), for
    /// callers that expose one size and not the other.
    pub fn set_staging_bytes(&mut self, bytes: usize) {
        self.staging_bytes = bytes;
        self.push_bytes = self.push_bytes.min(bytes);
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::InvalidConfig(what));
        if self.timeout.is_zero() {
            return bad("timeout must be positive".into());
        }
        if self.staging_bytes < PACKET_BYTES {
            return bad(format!("staging_bytes must be at least {PACKET_BYTES}"));
        }
        let least_scratch = (MAX_RANKS + 2) * PACKET_BYTES + SCRATCH_TAIL_BYTES;
        if self.scratch_bytes < least_scratch {
            return bad(format!("scratch_bytes must be at least {least_scratch}"));
        }
        // A push that must be staged (misaligned input) goes through
        // staging in the same pieces as any other push.
        if self.push_bytes < PACKET_BYTES
            || self.push_bytes > self.staging_bytes.min(MAX_PUSH_BYTES)
        {
            return bad(format!(
                "push_bytes must be in {PACKET_BYTES}..={} and at most staging_bytes",
                MAX_PUSH_BYTES
            ));
        }
        if !(1..=MAX_TABLE_ENTRIES).contains(&self.max_records) {
            return bad(format!(
                "max_records must be in 1..={MAX_TABLE_ENTRIES} (one is the staging buffer's)"
            ));
        }
        if self.max_blocks < 1 || self.max_blocks as usize > MAX_BLOCKS {
            return bad(format!("max_blocks must be in 1..={MAX_BLOCKS}"));
        }
        Ok(())
    }
}

/// The largest push segment: 3 x 8 x this stays far from overflow and
/// within reason for a buffer every peer maps.
const MAX_PUSH_BYTES: usize = 64 << 20;

/// Per-call options.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallOptions {
    pub algorithm: AlgorithmChoice,
    /// Refuse (instead of copying into staging) an input that is not
    /// registered.
    pub zero_copy: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_staging_size_below_the_push_size_takes_the_push_size_down_with_it() {
        let mut config = Config {
            staging_bytes: 64 << 10,
            ..Config::default()
        };
        assert!(config.validate().is_err(), "the push size outgrew staging");
        config.set_staging_bytes(64 << 10);
        assert_eq!(config.push_bytes, 64 << 10);
        assert!(config.validate().is_ok());
        config.set_staging_bytes(64 << 20);
        assert_eq!(config.push_bytes, 64 << 10, "never raised");
    }
}
