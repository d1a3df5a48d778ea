//! Multi-rank tests of the TCP rendezvous; every rank is a thread and every
//! connection goes over 127.0.0.1. Rank 0 binds port 0 itself (through
//! `TcpRendezvous::with_listener`) so that tests never race for a port.

use std::collections::HashMap;
use std::net::TcpListener;
use std::thread;
use std::time::{Duration, Instant};

use linkreduce::rendezvous::{Rendezvous, RendezvousError, TcpRendezvous, TcpRendezvousConfig};

const TIMEOUT: Duration = Duration::from_secs(3);

fn config(rank: usize, world_size: usize, port: u16, timeout: Duration) -> TcpRendezvousConfig {
    TcpRendezvousConfig {
        rank,
        world_size,
        addr: "127.0.0.1".to_string(),
        port,
        timeout,
    }
}

/// A listener on a free port of 127.0.0.1, and that port.
fn free_listener() -> (TcpListener, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let port = listener.local_addr().expect("local_addr").port();
    (listener, port)
}

/// Starts a rendezvous of `world_size` ranks, every rank in its own thread
/// running `body`, and returns each rank's result in rank order.
fn run_ranks<T: Send + 'static>(
    world_size: usize,
    timeout: Duration,
    body: impl Fn(TcpRendezvous) -> T + Send + Sync + Clone + 'static,
) -> Vec<Result<T, RendezvousError>> {
    let (listener, port) = free_listener();
    let mut joins = Vec::new();
    {
        let body = body.clone();
        joins.push(thread::spawn(move || {
            TcpRendezvous::with_listener(config(0, world_size, port, timeout), listener).map(body)
        }));
    }
    for rank in 1..world_size {
        let body = body.clone();
        joins.push(thread::spawn(move || {
            TcpRendezvous::connect(config(rank, world_size, port, timeout)).map(body)
        }));
    }
    joins
        .into_iter()
        .map(|join| join.join().expect("rank thread panicked"))
        .collect()
}

fn payload(rank: usize, round: usize) -> Vec<u8> {
    let len = match round % 5 {
        0 => 0,
        1 => (1 << 20) + rank,
        2 => 1,
        3 => 1000 * rank,
        _ => 37 * round + rank,
    };
    (0..len)
        .map(|i| (i as u64 * 31 + rank as u64 * 7 + round as u64) as u8)
        .collect()
}

#[test]
fn four_ranks_gather_twenty_rounds_in_rank_order() {
    let world_size = 4;
    let results = run_ranks(world_size, TIMEOUT, move |rdzv| {
        assert_eq!(rdzv.world_size(), world_size);
        let rank = rdzv.rank();
        for round in 0..20 {
            let gathered = rdzv.all_gather(&payload(rank, round)).expect("all_gather");
            let expected: Vec<Vec<u8>> = (0..world_size).map(|r| payload(r, round)).collect();
            assert!(
                gathered == expected,
                "rank {rank} round {round}: wrong result"
            );
        }
        rdzv.barrier().expect("barrier");
        rdzv.all_gather(b"after the barrier")
            .expect("all_gather after barrier");
        rank
    });
    for (rank, result) in results.into_iter().enumerate() {
        assert_eq!(result.expect("rendezvous"), rank);
    }
}

#[test]
fn a_world_of_one_needs_no_network() {
    // Port 1 would need privileges to listen on: nothing is bound at all.
    let rdzv = TcpRendezvous::connect(config(0, 1, 1, TIMEOUT)).expect("connect");
    assert_eq!(
        rdzv.all_gather(b"alone").expect("all_gather"),
        vec![b"alone".to_vec()]
    );
    rdzv.barrier().expect("barrier");
    let too_big = vec![0u8; TcpRendezvous::MAX_MESSAGE_BYTES + 1];
    assert!(matches!(
        rdzv.all_gather(&too_big),
        Err(RendezvousError::Protocol(_))
    ));
}

#[test]
fn a_rank_that_drops_out_is_named_by_every_other_rank() {
    let world_size = 4;
    let dead = 2;
    let started = Instant::now();
    let results = run_ranks(world_size, TIMEOUT, move |rdzv| {
        rdzv.barrier().expect("first barrier");
        if rdzv.rank() == dead {
            drop(rdzv);
            return None;
        }
        Some(rdzv.all_gather(b"anyone there?"))
    });
    let elapsed = started.elapsed();
    for (rank, result) in results.into_iter().enumerate() {
        let outcome = result.expect("rendezvous");
        if rank == dead {
            continue;
        }
        match outcome {
            Some(Err(RendezvousError::PeerLost { rank: named, .. }))
            | Some(Err(RendezvousError::Timeout { rank: named, .. })) => {
                assert_eq!(named, dead, "rank {rank} named the wrong rank")
            }
            Some(Err(other)) => panic!("rank {rank}: expected PeerLost, got {other}"),
            Some(Ok(_)) => panic!("rank {rank}: all_gather succeeded without rank {dead}"),
            None => unreachable!(),
        }
    }
    // Rank 0 notices the closed connection and tells the others at once.
    assert!(elapsed < TIMEOUT, "took {elapsed:?}, not failing fast");
}

#[test]
fn rank_0_dropping_out_is_named_by_the_others() {
    let started = Instant::now();
    let results = run_ranks(3, TIMEOUT, |rdzv| {
        rdzv.barrier().expect("first barrier");
        if rdzv.rank() == 0 {
            return None;
        }
        Some(rdzv.all_gather(b"x"))
    });
    for result in results.into_iter().skip(1) {
        match result.expect("rendezvous") {
            Some(Err(RendezvousError::PeerLost { rank: 0, .. })) => {}
            Some(other) => panic!("expected PeerLost naming rank 0, got {other:?}"),
            None => unreachable!(),
        }
    }
    assert!(started.elapsed() < TIMEOUT);
}

#[test]
fn a_rank_that_never_comes_is_named_by_rank_0() {
    let timeout = Duration::from_secs(1);
    let (listener, port) = free_listener();
    let started = Instant::now();
    let root = thread::spawn(move || {
        TcpRendezvous::with_listener(config(0, 3, port, timeout), listener).map(|_| ())
    });
    let present =
        thread::spawn(move || TcpRendezvous::connect(config(1, 3, port, timeout)).map(|_| ()));
    match root.join().expect("rank 0 panicked") {
        Err(RendezvousError::Timeout {
            rank: 2,
            timeout: t,
        }) => assert_eq!(t, timeout),
        other => panic!("expected rank 0 to time out naming rank 2, got {other:?}"),
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= timeout && elapsed < timeout + Duration::from_secs(1),
        "{elapsed:?}"
    );
    // Rank 1 hears about rank 2 from rank 0, or times out on its own first.
    match present.join().expect("rank 1 panicked") {
        Err(RendezvousError::Timeout { rank: 0 | 2, .. }) => {}
        other => panic!("expected rank 1 to time out, got {other:?}"),
    }
}

#[test]
fn a_rank_whose_rank_0_never_answers_names_rank_0() {
    let timeout = Duration::from_millis(500);
    // Listening but never accepting: the connection succeeds, no reply comes.
    let (_listener, port) = free_listener();
    let started = Instant::now();
    match TcpRendezvous::connect(config(1, 2, port, timeout)) {
        Err(RendezvousError::Timeout { rank: 0, .. }) => {}
        other => panic!(
            "expected a timeout naming rank 0, got {:?}",
            other.map(|_| ())
        ),
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= timeout && elapsed < timeout + Duration::from_secs(1),
        "{elapsed:?}"
    );
}

#[test]
fn ranks_started_before_rank_0_wait_for_it() {
    let (listener, port) = free_listener();
    // Nobody listens on the port until rank 0 starts: connecting is refused
    // and must be retried.
    drop(listener);
    let member = thread::spawn(move || {
        let rdzv = TcpRendezvous::connect(config(1, 2, port, TIMEOUT))?;
        rdzv.all_gather(b"one")
    });
    thread::sleep(Duration::from_millis(200));
    let root = TcpRendezvous::connect(config(0, 2, port, TIMEOUT)).expect("rank 0 connect");
    let expected = vec![b"zero".to_vec(), b"one".to_vec()];
    assert_eq!(
        root.all_gather(b"zero").expect("rank 0 all_gather"),
        expected
    );
    assert_eq!(
        member.join().expect("rank 1 panicked").expect("rank 1"),
        expected
    );
}

#[test]
fn a_stray_connection_does_not_disturb_the_rendezvous() {
    use std::io::Write;
    let (listener, port) = free_listener();
    let mut stray = std::net::TcpStream::connect(("127.0.0.1", port)).expect("stray connect");
    stray
        .write_all(b"GET / HTTP/1.0\r\n\r\n")
        .expect("stray write");
    let results = run_ranks_on(listener, port, 2, TIMEOUT);
    for result in results {
        result.expect("rendezvous despite a stray connection");
    }
}

/// Like `run_ranks` with a body of one all-gather, on a given listener.
fn run_ranks_on(
    listener: TcpListener,
    port: u16,
    world_size: usize,
    timeout: Duration,
) -> Vec<Result<Vec<Vec<u8>>, RendezvousError>> {
    let root = thread::spawn(move || {
        TcpRendezvous::with_listener(config(0, world_size, port, timeout), listener)?
            .all_gather(&[0])
    });
    let others: Vec<_> = (1..world_size)
        .map(|rank| {
            thread::spawn(move || {
                TcpRendezvous::connect(config(rank, world_size, port, timeout))?
                    .all_gather(&[rank as u8])
            })
        })
        .collect();
    std::iter::once(root)
        .chain(others)
        .map(|join| join.join().expect("rank thread panicked"))
        .collect()
}

fn expect_config(result: Result<impl Sized, RendezvousError>, needles: &[&str]) -> String {
    match result {
        Err(RendezvousError::Config(message)) => {
            for needle in needles {
                assert!(
                    message.contains(needle),
                    "{message:?} does not mention {needle:?}"
                );
            }
            message
        }
        Err(other) => panic!("expected a configuration error, got {other}"),
        Ok(_) => panic!("expected a configuration error, got success"),
    }
}

#[test]
fn two_ranks_claiming_the_same_rank_are_refused_on_every_side() {
    let (listener, port) = free_listener();
    let started = Instant::now();
    let root = thread::spawn(move || {
        TcpRendezvous::with_listener(config(0, 3, port, TIMEOUT), listener).map(|_| ())
    });
    let twins: Vec<_> = (0..2)
        .map(|_| {
            thread::spawn(move || TcpRendezvous::connect(config(1, 3, port, TIMEOUT)).map(|_| ()))
        })
        .collect();
    expect_config(
        root.join().expect("rank 0 panicked"),
        &["two processes claim rank 1", "RANK"],
    );
    for twin in twins {
        expect_config(
            twin.join().expect("twin panicked"),
            &["two processes claim rank 1"],
        );
    }
    assert!(started.elapsed() < TIMEOUT);
}

#[test]
fn a_rank_with_another_world_size_is_refused_on_both_sides() {
    let (listener, port) = free_listener();
    let root = thread::spawn(move || {
        TcpRendezvous::with_listener(config(0, 2, port, TIMEOUT), listener).map(|_| ())
    });
    let other = TcpRendezvous::connect(config(1, 3, port, TIMEOUT)).map(|_| ());
    expect_config(other, &["WORLD_SIZE=3", "WORLD_SIZE=2"]);
    expect_config(
        root.join().expect("rank 0 panicked"),
        &["WORLD_SIZE=3", "WORLD_SIZE=2"],
    );
}

#[test]
fn a_port_in_use_is_a_configuration_error() {
    let (_taken, port) = free_listener();
    expect_config(
        TcpRendezvous::connect(config(0, 2, port, TIMEOUT)),
        &["already in use", "MASTER_PORT", &port.to_string()],
    );
}

#[test]
fn connect_refuses_bad_configurations() {
    expect_config(
        TcpRendezvous::connect(config(1, 2, 0, TIMEOUT)),
        &["port 0"],
    );
    expect_config(
        TcpRendezvous::connect(config(2, 2, 29500, TIMEOUT)),
        &["rank 2"],
    );
    expect_config(
        TcpRendezvous::connect(config(0, 0, 29500, TIMEOUT)),
        &["world size 0"],
    );
    expect_config(
        TcpRendezvous::connect(config(1, 2, 29500, Duration::ZERO)),
        &["timeout"],
    );
    let (listener, _) = free_listener();
    expect_config(
        TcpRendezvous::with_listener(config(1, 2, 0, TIMEOUT), listener),
        &["rank 0"],
    );
}

/// A variable lookup over fixed name/value pairs.
fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| map.get(name).cloned()
}

/// A complete, valid set of torchrun variables.
const GOOD: &[(&str, &str)] = &[("RANK", "1"), ("WORLD_SIZE", "4"), ("MASTER_PORT", "29500")];

/// `GOOD` with `name` set to `value`, or removed when `value` is `None`.
fn good_but<'a>(name: &'a str, value: Option<&'a str>) -> Vec<(&'a str, &'a str)> {
    let mut pairs: Vec<(&str, &str)> = GOOD.iter().copied().filter(|(k, _)| *k != name).collect();
    if let Some(value) = value {
        pairs.push((name, value));
    }
    pairs
}

#[test]
fn from_vars_reads_torchrun_variables_with_defaults() {
    let config = TcpRendezvousConfig::from_vars(vars(GOOD)).expect("good variables");
    assert_eq!(
        config,
        TcpRendezvousConfig {
            rank: 1,
            world_size: 4,
            addr: "127.0.0.1".to_string(),
            port: 29500,
            timeout: Duration::from_secs(60),
        }
    );
    let mut pairs = GOOD.to_vec();
    pairs.push(("MASTER_ADDR", " node7 "));
    pairs.push(("LINKREDUCE_RENDEZVOUS_TIMEOUT_S", "2.5"));
    let config = TcpRendezvousConfig::from_vars(vars(&pairs)).expect("good variables");
    assert_eq!(config.addr, "node7");
    assert_eq!(config.timeout, Duration::from_millis(2500));
}

#[test]
fn from_vars_names_the_variable_to_fix() {
    let check = |name: &str, value: Option<&str>, needles: &[&str]| {
        let result = TcpRendezvousConfig::from_vars(vars(&good_but(name, value)));
        expect_config(result, needles);
    };
    check("RANK", None, &["RANK is not set"]);
    check("WORLD_SIZE", None, &["WORLD_SIZE is not set"]);
    check("MASTER_PORT", None, &["MASTER_PORT is not set"]);
    check("RANK", Some("-1"), &["RANK=\"-1\"", "set RANK"]);
    check(
        "WORLD_SIZE",
        Some("four"),
        &["WORLD_SIZE=\"four\"", "set WORLD_SIZE"],
    );
    check("WORLD_SIZE", Some("0"), &["WORLD_SIZE=0", "set WORLD_SIZE"]);
    check("RANK", Some("4"), &["RANK=4", "WORLD_SIZE=4", "0..=3"]);
    check(
        "MASTER_PORT",
        Some("70000"),
        &["MASTER_PORT=\"70000\"", "set MASTER_PORT"],
    );
    check("MASTER_PORT", Some("http"), &["MASTER_PORT=\"http\""]);
    check("MASTER_PORT", Some("0"), &["MASTER_PORT=\"0\""]);
    check("MASTER_ADDR", Some(""), &["MASTER_ADDR", "empty"]);
    for bad in ["0", "soon", "-5", "NaN", "inf"] {
        check(
            "LINKREDUCE_RENDEZVOUS_TIMEOUT_S",
            Some(bad),
            &["LINKREDUCE_RENDEZVOUS_TIMEOUT_S", bad],
        );
    }
}

#[test]
fn local_rank_defaults_to_rank() {
    let local = |pairs: &[(&str, &str)]| TcpRendezvousConfig::local_rank_from_vars(vars(pairs));
    assert_eq!(local(&[("RANK", "3")]).expect("RANK"), 3);
    assert_eq!(
        local(&[("RANK", "3"), ("LOCAL_RANK", "1")]).expect("LOCAL_RANK"),
        1
    );
    expect_config(local(&[("LOCAL_RANK", "x")]), &["LOCAL_RANK=\"x\""]);
    expect_config(local(&[]), &["LOCAL_RANK", "RANK"]);
}

#[test]
fn the_handle_can_move_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<TcpRendezvous>();
    let boxed: Box<dyn Rendezvous> =
        Box::new(TcpRendezvous::connect(config(0, 1, 29500, TIMEOUT)).expect("connect"));
    assert_eq!(boxed.world_size(), 1);
}
