//! Which path a call takes, the custom kernels or NCCL, and why
//! (docs/design.md, "Path choice"). Pure functions over facts that every
//! rank gathered alike at set-up, so that every rank takes the same path
//! for the same call without another exchange.

use std::fmt;

use crate::algorithm::{reference_rule, Algorithm, AlgorithmChoice, TunedPath, Tuning};
use crate::error::{Error, Result};
use crate::kernels::WORLD_SIZES;

/// What one rank tells the others about itself at set-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankFacts {
    /// A hash of its host's identity (`LINKREDUCE_HOST_ID`, or the
    /// hostname and boot id).
    pub host: u64,
    /// Its GPU's uuid.
    pub gpu: [u64; 2],
}

/// Whether a rank can read and write a peer's GPU memory directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    Direct,
    /// The driver says the two GPUs have no peer access.
    NoPeerAccess,
    /// The peer's GPU is not visible to this rank (CUDA_VISIBLE_DEVICES),
    /// so the driver cannot be asked.
    NotVisible,
}

impl Reach {
    pub fn to_byte(self) -> u8 {
        match self {
            Reach::Direct => 1,
            Reach::NoPeerAccess => 0,
            Reach::NotVisible => 2,
        }
    }

    pub fn from_byte(byte: u8) -> Option<Reach> {
        [Reach::Direct, Reach::NoPeerAccess, Reach::NotVisible]
            .into_iter()
            .find(|reach| reach.to_byte() == byte)
    }
}

/// Why a call goes through NCCL instead of the custom kernels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NcclReason {
    /// A group of one rank.
    SingleRank,
    /// More ranks than the kernels cover.
    TooManyRanks { world_size: usize },
    /// Ranks on several hosts: the kernels reach only GPUs of one host.
    SeveralHosts { hosts: usize },
    /// `rank`'s GPU cannot reach `peer`'s directly.
    NoPeerAccess { rank: usize, peer: usize },
    /// `rank` does not see `peer`'s GPU, so it cannot reach it directly.
    PeerNotVisible { rank: usize, peer: usize },
    /// The tuning table names NCCL for this size (a measured crossover).
    Tuned,
    /// The call asked for NCCL.
    Forced,
}

impl fmt::Display for NcclReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (low, high) = (WORLD_SIZES.start(), WORLD_SIZES.end());
        match self {
            NcclReason::SingleRank => {
                write!(f, "a single rank (the kernels cover {low} to {high})")
            }
            NcclReason::TooManyRanks { world_size } => {
                write!(f, "{world_size} ranks (the kernels cover {low} to {high})")
            }
            NcclReason::SeveralHosts { hosts } => write!(
                f,
                "ranks on {hosts} hosts (the kernels reach only GPUs of one host)"
            ),
            NcclReason::NoPeerAccess { rank, peer } => {
                write!(f, "rank {rank}'s GPU has no peer access to rank {peer}'s")
            }
            NcclReason::PeerNotVisible { rank, peer } => write!(
                f,
                "rank {rank} does not see rank {peer}'s GPU (CUDA_VISIBLE_DEVICES), so it cannot \
                 reach it directly"
            ),
            NcclReason::Tuned => f.write_str("the tuning table names NCCL for this size"),
            NcclReason::Forced => f.write_str("the call asked for NCCL"),
        }
    }
}

/// The path one call takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallPath {
    Custom(Algorithm),
    Nccl(NcclReason),
}

impl CallPath {
    /// The kernels' algorithm, when the call takes them.
    pub fn algorithm(&self) -> Option<Algorithm> {
        match self {
            CallPath::Custom(algorithm) => Some(*algorithm),
            CallPath::Nccl(_) => None,
        }
    }

    /// `one-stage`, `two-stage`, `push` or `nccl`.
    pub fn name(&self) -> &'static str {
        match self {
            CallPath::Custom(algorithm) => algorithm.name(),
            CallPath::Nccl(_) => "nccl",
        }
    }
}

impl fmt::Display for CallPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallPath::Custom(algorithm) => write!(f, "{algorithm} (custom kernels)"),
            CallPath::Nccl(reason) => write!(f, "nccl: {reason}"),
        }
    }
}

/// Why the custom kernels cannot serve a group, from what every rank said
/// in the first set-up exchange (world size and hosts); None: peer access
/// decides ([`Plan::decide`]).
pub fn group_blocker(ranks: &[RankFacts]) -> Option<NcclReason> {
    let world_size = ranks.len();
    if world_size < *WORLD_SIZES.start() {
        return Some(NcclReason::SingleRank);
    }
    if world_size > *WORLD_SIZES.end() {
        return Some(NcclReason::TooManyRanks { world_size });
    }
    let mut hosts: Vec<u64> = ranks.iter().map(|r| r.host).collect();
    hosts.sort_unstable();
    hosts.dedup();
    (hosts.len() > 1).then_some(NcclReason::SeveralHosts { hosts: hosts.len() })
}

/// What set-up decided for the whole group; the same on every rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Why the custom kernels cannot serve this group; None: they can.
    pub custom_blocked: Option<NcclReason>,
    /// Two ranks on one GPU, which NCCL refuses; None: NCCL can run.
    pub shared_gpu: Option<(usize, usize)>,
}

impl Plan {
    /// The plan from every rank's facts and, where [`group_blocker`] found
    /// nothing, every rank's reach of every peer (`reach[rank][peer]`).
    /// An error when neither path can serve the group.
    pub fn decide(ranks: &[RankFacts], reach: Option<&[Vec<Reach>]>) -> Result<Plan> {
        let custom_blocked = group_blocker(ranks).or_else(|| {
            let reach = reach?;
            reach.iter().enumerate().find_map(|(rank, peers)| {
                peers.iter().enumerate().find_map(|(peer, &r)| match r {
                    Reach::Direct => None,
                    Reach::NoPeerAccess => Some(NcclReason::NoPeerAccess { rank, peer }),
                    Reach::NotVisible => Some(NcclReason::PeerNotVisible { rank, peer }),
                })
            })
        });
        let shared_gpu = ranks.iter().enumerate().find_map(|(second, facts)| {
            let first = ranks[..second].iter().position(|r| r.gpu == facts.gpu)?;
            Some((first, second))
        });
        if let (Some(reason), Some((first, second))) = (&custom_blocked, shared_gpu) {
            return Err(Error::NoPath {
                reason: reason.clone(),
                first,
                second,
            });
        }
        Ok(Plan {
            custom_blocked,
            shared_gpu,
        })
    }

    /// Whether every call goes through NCCL, so that it may be set up at
    /// once (never during a capture).
    pub fn nccl_only(&self) -> bool {
        self.custom_blocked.is_some()
    }

    /// The path of a call of `bytes` bytes on `world_size` ranks with the
    /// caller's `choice`: [`auto_path`](Self::auto_path) for automatic
    /// calls; forcing a path that cannot serve the group is an error that
    /// says why.
    pub fn path(
        &self,
        world_size: usize,
        bytes: usize,
        choice: AlgorithmChoice,
        tuning: Option<&Tuning>,
    ) -> Result<CallPath> {
        match (choice, &self.custom_blocked) {
            (AlgorithmChoice::Auto, _) => Ok(self.auto_path(world_size, bytes, tuning)),
            (AlgorithmChoice::Nccl, _) => match self.shared_gpu {
                None => Ok(CallPath::Nccl(NcclReason::Forced)),
                Some((first, second)) => Err(Error::NcclSharedGpu { first, second }),
            },
            (AlgorithmChoice::Force(algorithm), Some(reason)) => Err(Error::CustomUnavailable {
                algorithm,
                reason: reason.clone(),
            }),
            (AlgorithmChoice::Force(algorithm), None) => Ok(CallPath::Custom(algorithm)),
        }
    }

    /// The path of a reduce-scatter or all-gather whose larger buffer holds
    /// `bytes`: automatic calls take the kernels wherever they serve the
    /// group, at every size (measured against NCCL up to 256 MiB blocks:
    /// docs/scatter_gather.md, "Path choice"); forcing any of the kernels'
    /// algorithms takes the kernels (they have one algorithm for these
    /// collectives, reported as one-stage); forcing NCCL takes NCCL. Tuning
    /// tables, measured for the all-reduce, are not consulted.
    pub fn scatter_gather_path(
        &self,
        world_size: usize,
        bytes: usize,
        choice: AlgorithmChoice,
    ) -> Result<CallPath> {
        if choice != AlgorithmChoice::Auto {
            return Ok(match self.path(world_size, bytes, choice, None)? {
                CallPath::Custom(_) => CallPath::Custom(Algorithm::OneStage),
                nccl => nccl,
            });
        }
        Ok(self.scatter_gather_auto_path())
    }

    /// The path of an automatic reduce-scatter or all-gather, the same at
    /// every size (see [`scatter_gather_path`](Self::scatter_gather_path)).
    pub fn scatter_gather_auto_path(&self) -> CallPath {
        match &self.custom_blocked {
            Some(reason) => CallPath::Nccl(reason.clone()),
            None => CallPath::Custom(Algorithm::OneStage),
        }
    }

    /// The path of an automatic call: the kernels wherever they serve the
    /// group, with the tuning table's choice where it covers the size (an
    /// NCCL entry only where NCCL can run) and the reference rule
    /// elsewhere; NCCL where the kernels cannot serve the group.
    pub fn auto_path(&self, world_size: usize, bytes: usize, tuning: Option<&Tuning>) -> CallPath {
        if let Some(reason) = &self.custom_blocked {
            return CallPath::Nccl(reason.clone());
        }
        match tuning.and_then(|t| t.pick(world_size, bytes)) {
            Some(TunedPath::Custom(algorithm)) => CallPath::Custom(algorithm),
            Some(TunedPath::Nccl) if self.shared_gpu.is_none() => CallPath::Nccl(NcclReason::Tuned),
            _ => CallPath::Custom(reference_rule(world_size, bytes)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `world` ranks, each on its own GPU, on the hosts `host(rank)` says.
    fn ranks(world: usize, host: impl Fn(usize) -> u64) -> Vec<RankFacts> {
        (0..world)
            .map(|rank| RankFacts {
                host: host(rank),
                gpu: [rank as u64, 7],
            })
            .collect()
    }

    fn all_direct(world: usize) -> Vec<Vec<Reach>> {
        vec![vec![Reach::Direct; world]; world]
    }

    fn plan_of(ranks: &[RankFacts], reach: &[Vec<Reach>]) -> Plan {
        let reach = group_blocker(ranks).is_none().then_some(reach);
        Plan::decide(ranks, reach).unwrap()
    }

    const AUTO: AlgorithmChoice = AlgorithmChoice::Auto;

    #[test]
    fn one_host_with_peer_access_takes_the_kernels() {
        for world in 2..=8 {
            let plan = plan_of(&ranks(world, |_| 1), &all_direct(world));
            assert_eq!(plan.custom_blocked, None);
            assert!(!plan.nccl_only());
            assert_eq!(
                plan.path(world, 1 << 10, AUTO, None).unwrap(),
                CallPath::Custom(Algorithm::OneStage)
            );
            assert_eq!(
                plan.path(world, 1 << 30, AUTO, None).unwrap(),
                CallPath::Custom(reference_rule(world, 1 << 30))
            );
        }
    }

    #[test]
    fn world_sizes_outside_the_kernels_take_nccl() {
        let single = plan_of(&ranks(1, |_| 1), &all_direct(1));
        assert_eq!(single.custom_blocked, Some(NcclReason::SingleRank));
        let large = plan_of(&ranks(9, |_| 1), &[]);
        assert_eq!(
            large.custom_blocked,
            Some(NcclReason::TooManyRanks { world_size: 9 })
        );
        for plan in [single, large] {
            assert!(plan.nccl_only());
            let path = plan.path(9, 1 << 10, AUTO, None).unwrap();
            assert!(matches!(path, CallPath::Nccl(_)), "{path}");
        }
    }

    #[test]
    fn ranks_on_several_hosts_take_nccl_and_need_no_peer_facts() {
        let facts = ranks(4, |rank| (rank / 2) as u64);
        let reason = NcclReason::SeveralHosts { hosts: 2 };
        assert_eq!(group_blocker(&facts), Some(reason.clone()));
        let plan = Plan::decide(&facts, None).unwrap();
        assert_eq!(
            plan.path(4, 1 << 20, AUTO, None).unwrap(),
            CallPath::Nccl(reason)
        );
        assert!(plan
            .path(4, 1 << 20, AUTO, None)
            .unwrap()
            .to_string()
            .contains("2 hosts"));
    }

    #[test]
    fn a_pair_without_direct_access_sends_the_group_to_nccl() {
        let facts = ranks(3, |_| 1);
        let mut reach = all_direct(3);
        reach[2][1] = Reach::NoPeerAccess;
        let plan = plan_of(&facts, &reach);
        assert_eq!(
            plan.custom_blocked,
            Some(NcclReason::NoPeerAccess { rank: 2, peer: 1 })
        );
        reach[2][1] = Reach::NotVisible;
        let plan = Plan::decide(&facts, Some(&reach)).unwrap();
        assert_eq!(
            plan.path(3, 64, AUTO, None).unwrap(),
            CallPath::Nccl(NcclReason::PeerNotVisible { rank: 2, peer: 1 })
        );
    }

    #[test]
    fn forcing_a_kernel_where_it_cannot_serve_says_why() {
        let plan = plan_of(&ranks(2, |rank| rank as u64), &[]);
        let forced = AlgorithmChoice::Force(Algorithm::TwoStage);
        match plan.path(2, 64, forced, None) {
            Err(Error::CustomUnavailable { algorithm, reason }) => {
                assert_eq!(algorithm, Algorithm::TwoStage);
                assert_eq!(reason, NcclReason::SeveralHosts { hosts: 2 });
            }
            other => panic!("expected CustomUnavailable, got {other:?}"),
        }
        // Where the kernels serve, forcing wins over the rule and the table.
        let plan = plan_of(&ranks(2, |_| 1), &all_direct(2));
        assert_eq!(
            plan.path(2, 1 << 30, forced, None).unwrap(),
            CallPath::Custom(Algorithm::TwoStage)
        );
        assert_eq!(
            plan.path(2, 64, AlgorithmChoice::Nccl, None).unwrap(),
            CallPath::Nccl(NcclReason::Forced)
        );
    }

    #[test]
    fn a_tuning_table_may_send_sizes_past_a_crossover_to_nccl() {
        let entries = Tuning::from_fastest(
            2,
            &[
                (1 << 20, TunedPath::Custom(Algorithm::Push), None),
                (64 << 20, TunedPath::Nccl, None),
            ],
        );
        let tuning = Tuning {
            measured_on: "test".into(),
            entries,
        };
        let plan = plan_of(&ranks(2, |_| 1), &all_direct(2));
        let path = |bytes| plan.path(2, bytes, AUTO, Some(&tuning)).unwrap();
        assert_eq!(path(1 << 20), CallPath::Custom(Algorithm::Push));
        assert_eq!(path(32 << 20), CallPath::Nccl(NcclReason::Tuned));
        // Past the largest size measured the reference rule decides.
        assert_eq!(path(1 << 30), CallPath::Custom(Algorithm::OneStage));
        // Other world sizes keep the reference rule.
        let four = plan_of(&ranks(4, |_| 1), &all_direct(4));
        assert_eq!(
            four.path(4, 32 << 20, AUTO, Some(&tuning)).unwrap(),
            CallPath::Custom(Algorithm::TwoStage)
        );
    }

    #[test]
    fn scatter_gather_takes_the_kernels_at_every_size() {
        let plan = plan_of(&ranks(4, |_| 1), &all_direct(4));
        let path = |bytes, choice| plan.scatter_gather_path(4, bytes, choice).unwrap();
        let custom = CallPath::Custom(Algorithm::OneStage);
        assert_eq!(path(16, AUTO), custom);
        assert_eq!(path(1 << 30, AUTO), custom);
        let forced = AlgorithmChoice::Force(Algorithm::Push);
        assert_eq!(path(1 << 30, forced), custom);
        assert_eq!(
            path(16, AlgorithmChoice::Nccl),
            CallPath::Nccl(NcclReason::Forced)
        );
        // NCCL refuses ranks sharing a GPU: the kernels keep every size.
        let mut facts = ranks(3, |_| 1);
        facts[2].gpu = facts[0].gpu;
        let shared = plan_of(&facts, &all_direct(3));
        assert_eq!(
            shared.scatter_gather_path(3, 1 << 30, AUTO).unwrap(),
            custom
        );
        // Groups the kernels cannot serve take NCCL at every size.
        let hosts = Plan::decide(&ranks(2, |rank| rank as u64), None).unwrap();
        assert!(matches!(
            hosts.scatter_gather_path(2, 16, AUTO).unwrap(),
            CallPath::Nccl(NcclReason::SeveralHosts { hosts: 2 })
        ));
        assert!(matches!(
            hosts.scatter_gather_path(2, 16, forced),
            Err(Error::CustomUnavailable { .. })
        ));
    }

    #[test]
    fn ranks_sharing_a_gpu_keep_the_kernels_because_nccl_refuses_them() {
        let mut facts = ranks(3, |_| 1);
        facts[2].gpu = facts[0].gpu;
        let plan = plan_of(&facts, &all_direct(3));
        assert_eq!(plan.shared_gpu, Some((0, 2)));
        let tuning = Tuning {
            measured_on: "test".into(),
            entries: Tuning::from_fastest(3, &[(1 << 30, TunedPath::Nccl, None)]),
        };
        assert_eq!(
            plan.path(3, 64, AUTO, Some(&tuning)).unwrap(),
            CallPath::Custom(Algorithm::OneStage)
        );
        assert!(matches!(
            plan.path(3, 64, AlgorithmChoice::Nccl, None),
            Err(Error::NcclSharedGpu {
                first: 0,
                second: 2
            })
        ));
        // Neither path: the kernels are blocked and NCCL refuses.
        facts[1].host = 2;
        match Plan::decide(&facts, None) {
            Err(Error::NoPath { first, second, .. }) => assert_eq!((first, second), (0, 2)),
            other => panic!("expected NoPath, got {other:?}"),
        }
    }

    #[test]
    fn reach_bytes_round_trip() {
        for reach in [Reach::Direct, Reach::NoPeerAccess, Reach::NotVisible] {
            assert_eq!(Reach::from_byte(reach.to_byte()), Some(reach));
        }
        assert_eq!(Reach::from_byte(9), None);
    }
}
