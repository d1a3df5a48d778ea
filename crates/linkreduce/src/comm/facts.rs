//! What ranks learn about each other at set-up to choose a path
//! (docs/design.md, "Path choice"): which host each is on, which GPU it
//! uses, and, where the kernels may serve the group, whether each reaches
//! every peer's GPU directly. The decision itself is `crate::path`'s.

use cudarc::driver::CudaContext;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::memory::{gpu_uuid, reach};
use crate::path::{group_blocker, Plan, RankFacts, Reach};
use crate::rendezvous::{agree, all_gather_u64s, u64_at, Rendezvous};

/// Names this process's host; processes with different values count as
/// different hosts (how tests pose one machine as several).
pub const HOST_ID_VAR: &str = "LINKREDUCE_HOST_ID";

/// This host's identity: `LINKREDUCE_HOST_ID`, else the hostname and the
/// boot id (a hostname alone may repeat across containers and machines).
fn host_identity() -> Result<String> {
    identify_host(std::env::var_os(HOST_ID_VAR), |path| {
        std::fs::read_to_string(path)
    })
}

/// [`host_identity`] from the variable's value and a file reader.
fn identify_host(
    variable: Option<std::ffi::OsString>,
    read: impl Fn(&str) -> std::io::Result<String>,
) -> Result<String> {
    if let Some(id) = variable {
        return Ok(id.to_string_lossy().into_owned());
    }
    let read = |path: &str| read(path).map(|text| text.trim().to_string());
    match (
        read("/proc/sys/kernel/hostname"),
        read("/proc/sys/kernel/random/boot_id"),
    ) {
        (Err(_), Err(_)) => Err(Error::InvalidConfig(format!(
            "cannot tell which host this is (/proc/sys/kernel/hostname and boot_id are not \
             readable); set {HOST_ID_VAR} to a name unique to this machine"
        ))),
        (hostname, boot_id) => Ok(format!(
            "{} {}",
            hostname.unwrap_or_default(),
            boot_id.unwrap_or_default()
        )),
    }
}

/// Collective: gathers every rank's facts and returns the plan, the same
/// on every rank. A rank that cannot say its facts fails every rank.
pub(super) fn gather_plan(rendezvous: &dyn Rendezvous, ctx: &CudaContext) -> Result<Plan> {
    let what = "choosing a path";
    let mine = host_identity().and_then(|host| {
        let gpu = gpu_uuid(ctx)?;
        Ok([u64_at(&Sha256::digest(host.as_bytes())), gpu[0], gpu[1]])
    });
    let mine = agree(rendezvous, what, mine)?;
    let ranks: Vec<RankFacts> = all_gather_u64s(rendezvous, what, &mine)?
        .into_iter()
        .map(|words| RankFacts {
            host: words[0],
            gpu: [words[1], words[2]],
        })
        .collect();
    // Peer access matters only where nothing else rules the kernels out
    // (ranks on other hosts have GPUs this rank cannot ask about).
    if group_blocker(&ranks).is_some() {
        return Plan::decide(&ranks, None);
    }
    let what = "checking peer access";
    let mine = ranks
        .iter()
        .map(|peer| reach(ctx, peer.gpu).map(|r| u64::from(r.to_byte())))
        .collect::<Result<Vec<u64>>>();
    let mine = agree(rendezvous, what, mine)?;
    let reach = all_gather_u64s(rendezvous, what, &mine)?
        .into_iter()
        .enumerate()
        .map(|(rank, words)| {
            words
                .into_iter()
                .map(|word| {
                    u8::try_from(word)
                        .ok()
                        .and_then(Reach::from_byte)
                        .ok_or_else(|| Error::RankMismatch {
                            what,
                            detail: format!("rank {rank} sent an unknown reach {word}"),
                        })
                })
                .collect::<Result<Vec<Reach>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    Plan::decide(&ranks, Some(&reach))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(path: &str) -> std::io::Result<String> {
        match path {
            "/proc/sys/kernel/hostname" => Ok("node7\n".into()),
            "/proc/sys/kernel/random/boot_id" => Ok("b00t\n".into()),
            _ => Err(std::io::ErrorKind::NotFound.into()),
        }
    }

    #[test]
    fn the_variable_overrides_hostname_and_boot_id() {
        assert_eq!(identify_host(None, files).unwrap(), "node7 b00t");
        assert_eq!(
            identify_host(Some("fake-host-1".into()), files).unwrap(),
            "fake-host-1"
        );
        let nothing =
            |_: &str| -> std::io::Result<String> { Err(std::io::ErrorKind::NotFound.into()) };
        let error = identify_host(None, nothing).unwrap_err();
        assert!(error.to_string().contains(HOST_ID_VAR), "{error}");
    }

    #[test]
    fn this_machine_has_an_identity() {
        assert!(!host_identity().unwrap().trim().is_empty());
    }
}
