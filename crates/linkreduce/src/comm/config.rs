//! What a caller tunes: per communicator ([`Config`], the same on every
//! rank) and per call ([`CallOptions`]).

use std::time::Duration;

use crate::algorithm::{AlgorithmChoice, Tuning};
use crate::error::{Error, Result};
use crate::kernels::{
    chunk_slot_bytes_needed, MAX_BLOCKS, MAX_RANKS, MAX_TABLE_ENTRIES, PACKET_BYTES,
    SCRATCH_TAIL_BYTES,
};

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
    /// Launch the all-reduce kernels as programmatic dependent launches, so
    /// that each may start while the kernel before it on the stream ends
    /// (docs/design.md, "Programmatic dependent launch"). None reads
    /// `LINKREDUCE_PDL` (0 or 1), on where it is not set. Only on sm_90
    /// and newer with one rank per GPU; elsewhere ignored
    /// ([`Communicator::programmatic_launch`](crate::Communicator::programmatic_launch)
    /// says what a rank does).
    pub programmatic_launch: Option<bool>,
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
            programmatic_launch: None,
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

    /// The variable [`programmatic_launch`](Self::programmatic_launch)
    /// falls back on.
    pub const PDL_VAR: &'static str = "LINKREDUCE_PDL";

    /// Whether the caller asked for programmatic launches: the field where
    /// set, else `LINKREDUCE_PDL`, else yes (measured faster on 2 x H200:
    /// docs/design.md, "Programmatic dependent launch").
    pub fn wants_programmatic_launch(&self) -> Result<bool> {
        match self.programmatic_launch {
            Some(wanted) => Ok(wanted),
            None => switch_from_var(Self::PDL_VAR, std::env::var_os(Self::PDL_VAR)),
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::InvalidConfig(what));
        self.wants_programmatic_launch()?;
        if self.timeout.is_zero() {
            return bad("timeout must be positive".into());
        }
        if self.staging_bytes < PACKET_BYTES {
            return bad(format!("staging_bytes must be at least {PACKET_BYTES}"));
        }
        // Two-stage needs a packet per rank and its tail; chunked push a
        // packet per slot of every ring (kernels::chunk_slot_bytes).
        let least_scratch =
            ((MAX_RANKS + 2) * PACKET_BYTES + SCRATCH_TAIL_BYTES).max(chunk_slot_bytes_needed());
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

/// An on/off variable: 1 or 0; unset or empty means on. Anything else is
/// refused rather than guessed at, so that a typo cannot silently time the
/// wrong configuration.
fn switch_from_var(name: &str, value: Option<std::ffi::OsString>) -> Result<bool> {
    match value.as_ref().map(|v| v.to_str()) {
        Some(Some("0")) => Ok(false),
        None | Some(Some("" | "1")) => Ok(true),
        Some(_) => Err(Error::InvalidConfig(format!(
            "{name}={:?}: set it to 1 (on) or 0 (off)",
            value.unwrap_or_default()
        ))),
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
    /// At most this many blocks per launch of the all-reduce kernels (0
    /// counts as 1, and never more than the group's limit; the fused,
    /// reduce-scatter and all-gather kernels keep their own grids). It
    /// must be the same on every rank: a mismatch is not detected, and
    /// times out or (chunked push, whose chunks then differ) gives wrong
    /// sums. None: the tuning table's grid for the size where it names one
    /// (`linkreduce tune` measures grids), else one packet per thread up to
    /// the group's limit.
    pub max_blocks: Option<u32>,
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

    #[test]
    fn the_pdl_variable_is_1_or_0_and_on_when_unset() {
        let var = |value: Option<&str>| switch_from_var("LINKREDUCE_PDL", value.map(Into::into));
        assert_eq!(var(None).ok(), Some(true));
        assert_eq!(var(Some("")).ok(), Some(true));
        assert_eq!(var(Some("0")).ok(), Some(false));
        assert_eq!(var(Some("1")).ok(), Some(true));
        for bad in ["yes", "on", "2", " 1", "true"] {
            let error = var(Some(bad)).map_err(|e| e.to_string());
            assert_eq!(
                error,
                Err(format!(
                    "invalid configuration: LINKREDUCE_PDL={bad:?}: set it to 1 (on) or 0 (off)"
                )),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_config_field_overrides_the_variable_and_defaults_to_it() {
        // The variable is not read where the field decides, so these hold
        // whatever the environment says.
        for wanted in [true, false] {
            let config = Config {
                programmatic_launch: Some(wanted),
                ..Config::default()
            };
            assert_eq!(config.wants_programmatic_launch().ok(), Some(wanted));
            assert!(config.validate().is_ok());
        }
        assert_eq!(Config::default().programmatic_launch, None);
    }
}
