//! Where the ranks of a TCP rendezvous meet: [`TcpRendezvousConfig`], read
//! from the variables torchrun sets, and the checks and name resolution that
//! turn a bad setting into an error saying which variable to fix.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use crate::rendezvous::RendezvousError;

/// Where and how the ranks of a [`TcpRendezvous`](super::TcpRendezvous) meet.
///
/// Usually built by [`TcpRendezvousConfig::from_env`] from the variables that
/// torchrun (and most launchers) set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpRendezvousConfig {
    /// This process's rank, in `0..world_size`.
    pub rank: usize,
    /// How many ranks take part.
    pub world_size: usize,
    /// Host name or IP address of rank 0; rank 0 listens on it, the others
    /// connect to it.
    pub addr: String,
    /// TCP port rank 0 listens on.
    pub port: u16,
    /// Longest wait of any one operation (start-up, one all-gather) for the
    /// other ranks.
    pub timeout: Duration,
}

impl TcpRendezvousConfig {
    /// `MASTER_ADDR` when the variable is not set: single-node jobs are the
    /// common case.
    pub const DEFAULT_ADDR: &'static str = "127.0.0.1";

    /// Timeout when `LINKREDUCE_RENDEZVOUS_TIMEOUT_S` is not set: long enough
    /// for ranks that start slowly (CUDA initialisation, model loading before
    /// the communicator is built), short enough that a lost rank is noticed.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

    /// The variable that overrides the timeout, in seconds.
    pub const TIMEOUT_VAR: &'static str = "LINKREDUCE_RENDEZVOUS_TIMEOUT_S";

    /// Reads the configuration from the process environment: `RANK`,
    /// `WORLD_SIZE` and `MASTER_PORT` are required, `MASTER_ADDR` defaults to
    /// `127.0.0.1` and `LINKREDUCE_RENDEZVOUS_TIMEOUT_S` (seconds, fractions
    /// allowed) to 60.
    pub fn from_env() -> Result<Self, RendezvousError> {
        Self::from_vars(env_var)
    }

    /// Like [`from_env`](Self::from_env), but reads variables through
    /// `lookup`, so that the parsing can be tested (or fed from another
    /// source) without changing the process environment.
    pub fn from_vars(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, RendezvousError> {
        let rank = parse_index("RANK", required(&lookup, "RANK", RANK_HINT)?, RANK_HINT)?;
        let world_size = parse_index(
            "WORLD_SIZE",
            required(&lookup, "WORLD_SIZE", WORLD_SIZE_HINT)?,
            WORLD_SIZE_HINT,
        )?;
        if world_size == 0 {
            return Err(RendezvousError::Config(format!(
                "WORLD_SIZE=0: at least one rank must take part; {WORLD_SIZE_HINT}"
            )));
        }
        if rank >= world_size {
            return Err(RendezvousError::Config(format!(
                "RANK={rank} is out of range for WORLD_SIZE={world_size}; set RANK to one of 0..={} \
                 (or WORLD_SIZE to the real number of ranks)",
                world_size - 1
            )));
        }
        let addr = match lookup("MASTER_ADDR") {
            None => Self::DEFAULT_ADDR.to_string(),
            Some(value) if value.trim().is_empty() => {
                return Err(RendezvousError::Config(
                    "MASTER_ADDR is set but empty; set it to the host name or IP address of \
                     rank 0, or unset it to use 127.0.0.1"
                        .to_string(),
                ))
            }
            Some(value) => value.trim().to_string(),
        };
        let port_text = required(&lookup, "MASTER_PORT", PORT_HINT)?;
        let port = match port_text.trim().parse::<u16>() {
            Ok(port) if port != 0 => port,
            _ => {
                return Err(RendezvousError::Config(format!(
                    "MASTER_PORT={port_text:?} is not a usable TCP port; {PORT_HINT}"
                )))
            }
        };
        let timeout = match lookup(Self::TIMEOUT_VAR) {
            None => Self::DEFAULT_TIMEOUT,
            Some(text) => parse_timeout(&text)?,
        };
        Ok(TcpRendezvousConfig {
            rank,
            world_size,
            addr,
            port,
            timeout,
        })
    }

    /// This process's rank among the ranks of its node: `LOCAL_RANK`, or
    /// `RANK` when `LOCAL_RANK` is not set (a single-node job, where the two
    /// agree). Used to pick the GPU.
    pub fn local_rank_from_env() -> Result<usize, RendezvousError> {
        Self::local_rank_from_vars(env_var)
    }

    /// Like [`local_rank_from_env`](Self::local_rank_from_env), reading
    /// variables through `lookup`.
    pub fn local_rank_from_vars(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<usize, RendezvousError> {
        const HINT: &str = "set LOCAL_RANK to this process's rank on its node \
                            (0 .. number of GPUs used on the node - 1)";
        match lookup("LOCAL_RANK") {
            Some(value) => parse_index("LOCAL_RANK", value, HINT),
            None => match lookup("RANK") {
                Some(value) => parse_index("RANK", value, RANK_HINT),
                None => Err(RendezvousError::Config(format!(
                    "neither LOCAL_RANK nor RANK is set; {HINT}"
                ))),
            },
        }
    }

    /// Checks what `connect` needs before any socket is touched.
    pub(super) fn validate(&self, allow_port_zero: bool) -> Result<(), RendezvousError> {
        if self.world_size == 0 {
            return Err(RendezvousError::Config(
                "world size 0: at least one rank must take part".to_string(),
            ));
        }
        if self.rank >= self.world_size {
            return Err(RendezvousError::Config(format!(
                "rank {} is out of range for world size {}; ranks are 0..={}",
                self.rank,
                self.world_size,
                self.world_size - 1
            )));
        }
        if self.timeout.is_zero() {
            return Err(RendezvousError::Config(
                "the rendezvous timeout is zero; give the ranks time to meet (e.g. 60 s)"
                    .to_string(),
            ));
        }
        if self.addr.trim().is_empty() {
            return Err(RendezvousError::Config(
                "the rendezvous address (MASTER_ADDR) is empty; set it to rank 0's host"
                    .to_string(),
            ));
        }
        if self.port == 0 && !allow_port_zero {
            return Err(RendezvousError::Config(
                "port 0 cannot be used: the other ranks could not know which port rank 0 got; \
                 set MASTER_PORT to a fixed free port (tests can pass a listener bound to port 0 \
                 to TcpRendezvous::with_listener)"
                    .to_string(),
            ));
        }
        Ok(())
    }
}

const RANK_HINT: &str = "set RANK to this process's rank, 0..WORLD_SIZE-1 \
                         (torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)";
const WORLD_SIZE_HINT: &str = "set WORLD_SIZE to the number of ranks (processes) taking part";
const PORT_HINT: &str = "set MASTER_PORT to a free TCP port in 1..=65535 that rank 0 listens on \
                         and every rank is given";

/// Reads a variable; a value that is not valid Unicode is passed on (lossily)
/// so that it is reported as malformed rather than as missing.
fn env_var(name: &str) -> Option<String> {
    std::env::var_os(name).map(|value| value.to_string_lossy().into_owned())
}

fn required(
    lookup: &impl Fn(&str) -> Option<String>,
    name: &str,
    hint: &str,
) -> Result<String, RendezvousError> {
    lookup(name).ok_or_else(|| RendezvousError::Config(format!("{name} is not set; {hint}")))
}

fn parse_index(name: &str, value: String, hint: &str) -> Result<usize, RendezvousError> {
    value.trim().parse::<usize>().map_err(|_| {
        RendezvousError::Config(format!(
            "{name}={value:?} is not a non-negative integer; {hint}"
        ))
    })
}

fn parse_timeout(text: &str) -> Result<Duration, RendezvousError> {
    let invalid = || {
        RendezvousError::Config(format!(
            "{}={text:?} is not a positive number of seconds; set it to e.g. 60, \
             or unset it to use the default of 60 s",
            TcpRendezvousConfig::TIMEOUT_VAR
        ))
    };
    let seconds: f64 = text.trim().parse().map_err(|_| invalid())?;
    if seconds.is_nan() || seconds <= 0.0 {
        return Err(invalid());
    }
    let timeout = Duration::try_from_secs_f64(seconds).map_err(|_| invalid())?;
    if timeout.is_zero() {
        return Err(invalid());
    }
    Ok(timeout)
}

/// Resolves rank 0's address: rank 0 listens on one of the results, the
/// other ranks try each in turn.
pub(super) fn resolve(addr: &str, port: u16) -> Result<Vec<SocketAddr>, RendezvousError> {
    let addrs: Vec<SocketAddr> = (addr, port)
        .to_socket_addrs()
        .map_err(|error| {
            RendezvousError::Config(format!(
                "MASTER_ADDR={addr} does not resolve ({error}); set MASTER_ADDR to the host \
                 name or IP address of rank 0"
            ))
        })?
        .collect();
    if addrs.is_empty() {
        return Err(RendezvousError::Config(format!(
            "MASTER_ADDR={addr} resolves to no address; set MASTER_ADDR to the host name or IP \
             address of rank 0"
        )));
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message of a configuration error; anything else fails the test.
    fn config_error<T: std::fmt::Debug>(result: Result<T, RendezvousError>) -> String {
        match result {
            Err(RendezvousError::Config(message)) => message,
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }

    /// A variable lookup over fixed pairs, instead of the process
    /// environment (which every test thread shares).
    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.to_string())
        }
    }

    #[test]
    fn timeouts_are_positive_seconds_with_fractions() {
        assert_eq!(parse_timeout("60").unwrap(), Duration::from_secs(60));
        assert_eq!(
            parse_timeout(" 2.5\n").unwrap(),
            Duration::from_millis(2500)
        );
        assert_eq!(parse_timeout("0.001").unwrap(), Duration::from_millis(1));
        assert_eq!(parse_timeout("1e3").unwrap(), Duration::from_secs(1000));
    }

    #[test]
    fn unusable_timeouts_name_the_variable_and_value() {
        // Too small for a nanosecond, too large for a `Duration`, or no number.
        for bad in ["0", "-1", "NaN", "inf", "1e-12", "1e30", "", "soon"] {
            assert_eq!(
                config_error(parse_timeout(bad)),
                format!(
                    "LINKREDUCE_RENDEZVOUS_TIMEOUT_S={bad:?} is not a positive number of seconds; \
                     set it to e.g. 60, or unset it to use the default of 60 s"
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn indices_are_non_negative_integers() {
        assert_eq!(
            parse_index("RANK", " 7 ".to_string(), RANK_HINT).unwrap(),
            7
        );
        assert_eq!(
            config_error(parse_index("RANK", "-1".to_string(), RANK_HINT)),
            format!("RANK=\"-1\" is not a non-negative integer; {RANK_HINT}")
        );
        assert_eq!(
            config_error(parse_index(
                "WORLD_SIZE",
                "2.0".to_string(),
                WORLD_SIZE_HINT
            )),
            format!("WORLD_SIZE=\"2.0\" is not a non-negative integer; {WORLD_SIZE_HINT}")
        );
    }

    #[test]
    fn from_vars_refuses_a_rank_outside_the_world() {
        let pairs = [("RANK", "4"), ("WORLD_SIZE", "4"), ("MASTER_PORT", "29500")];
        assert_eq!(
            config_error(TcpRendezvousConfig::from_vars(vars(&pairs))),
            "RANK=4 is out of range for WORLD_SIZE=4; set RANK to one of 0..=3 \
             (or WORLD_SIZE to the real number of ranks)"
        );
        let pairs = [("RANK", "0"), ("WORLD_SIZE", "0"), ("MASTER_PORT", "29500")];
        assert_eq!(
            config_error(TcpRendezvousConfig::from_vars(vars(&pairs))),
            format!("WORLD_SIZE=0: at least one rank must take part; {WORLD_SIZE_HINT}")
        );
    }

    #[test]
    fn from_vars_refuses_ports_outside_1_to_65535() {
        for port in ["0", "65536", "-1", "http", ""] {
            let pairs = [("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", port)];
            assert_eq!(
                config_error(TcpRendezvousConfig::from_vars(vars(&pairs))),
                format!("MASTER_PORT={port:?} is not a usable TCP port; {PORT_HINT}")
            );
        }
        let pairs = [
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_PORT", " 65535 "),
        ];
        let config = TcpRendezvousConfig::from_vars(vars(&pairs)).unwrap();
        assert_eq!(config.port, 65535);
    }

    fn valid() -> TcpRendezvousConfig {
        TcpRendezvousConfig {
            rank: 1,
            world_size: 2,
            addr: "127.0.0.1".to_string(),
            port: 29500,
            timeout: Duration::from_secs(60),
        }
    }

    #[test]
    fn validate_refuses_what_connect_cannot_use() {
        assert!(valid().validate(false).is_ok());
        let with = |change: fn(&mut TcpRendezvousConfig)| {
            let mut config = valid();
            change(&mut config);
            config
        };
        assert_eq!(
            config_error(with(|c| c.world_size = 0).validate(false)),
            "world size 0: at least one rank must take part"
        );
        assert_eq!(
            config_error(with(|c| c.rank = 2).validate(false)),
            "rank 2 is out of range for world size 2; ranks are 0..=1"
        );
        assert!(
            config_error(with(|c| c.timeout = Duration::ZERO).validate(false))
                .starts_with("the rendezvous timeout is zero")
        );
        assert!(
            config_error(with(|c| c.addr = " ".to_string()).validate(false))
                .starts_with("the rendezvous address (MASTER_ADDR) is empty")
        );
        let port_zero = with(|c| c.port = 0);
        assert!(config_error(port_zero.validate(false)).starts_with("port 0 cannot be used"));
        assert!(port_zero.validate(true).is_ok());
    }

    #[test]
    fn numeric_addresses_resolve_without_a_name_service() {
        assert_eq!(
            resolve("127.0.0.1", 29500).unwrap(),
            vec![SocketAddr::from(([127, 0, 0, 1], 29500))]
        );
        assert_eq!(
            resolve("::1", 1).unwrap(),
            vec![SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], 1))]
        );
    }
}
