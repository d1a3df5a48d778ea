//! Golden bytes and round trips for every message of the wire format, and
//! the refusals of bytes that break it; byte slices stand in for sockets.

use super::*;

/// The opening every hello and handshake reply starts with, spelled out
/// byte by byte so that a change of the wire format fails here.
const OPENING: [u8; 12] = *b"LNKRDZV\0\x01\0\0\0";

fn le(value: u64) -> [u8; 8] {
    value.to_le_bytes()
}

fn is_eof(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::UnexpectedEof
}

#[test]
fn hello_has_its_documented_bytes_and_round_trips() {
    let hello = Hello {
        rank: 3,
        world_size: 8,
    };
    let bytes = encode_hello(hello);
    let mut expected = OPENING.to_vec();
    expected.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 0]);
    expected.extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(bytes, expected);

    let mut source = &bytes[..];
    read_opening(&mut source).unwrap();
    assert_eq!(read_hello_body(&mut source).unwrap(), hello);
    assert!(source.is_empty());

    // Values that do not fit the world are carried as sent, for rank 0
    // to name in its refusal.
    let odd = Hello {
        rank: u64::MAX,
        world_size: 1 << 40,
    };
    let bytes = encode_hello(odd);
    let mut source = &bytes[..];
    read_opening(&mut source).unwrap();
    assert_eq!(read_hello_body(&mut source).unwrap(), odd);
}

#[test]
fn welcome_is_the_opening_then_its_kind() {
    let bytes = encode_welcome();
    assert_eq!(bytes[..12], OPENING);
    assert_eq!(bytes[12..], [1]);
    let mut source = &bytes[..];
    read_opening(&mut source).unwrap();
    assert_eq!(read_reply_kind(&mut source).unwrap(), ReplyKind::Welcome);
    assert!(source.is_empty());
}

#[test]
fn an_abort_can_end_the_handshake() {
    let mut bytes = encode_opening();
    bytes.extend_from_slice(&encode_abort(&RendezvousError::Timeout {
        rank: 2,
        timeout: Duration::from_millis(1500),
    }));
    let mut source = &bytes[..];
    read_opening(&mut source).unwrap();
    assert_eq!(read_reply_kind(&mut source).unwrap(), ReplyKind::Abort);
    let error = read_abort_body(&mut source, Duration::from_secs(9));
    assert!(
        matches!(error, RendezvousError::Timeout { rank: 2, timeout }
            if timeout == Duration::from_millis(1500)),
        "{error:?}"
    );
    assert!(source.is_empty());
}

#[test]
fn contributions_round_trip_back_to_back() {
    let mut bytes = encode_contribution_header(7, 3);
    let mut expected = vec![1];
    expected.extend_from_slice(&le(7));
    expected.extend_from_slice(&le(3));
    assert_eq!(bytes, expected);
    bytes.extend_from_slice(b"abc");
    bytes.extend_from_slice(&encode_contribution_header(8, 0));

    let mut source = &bytes[..];
    assert_eq!(
        read_contribution(&mut source).unwrap(),
        Contribution {
            round: 7,
            bytes: b"abc".to_vec()
        }
    );
    assert_eq!(
        read_contribution(&mut source).unwrap(),
        Contribution {
            round: 8,
            bytes: Vec::new()
        }
    );
    assert!(source.is_empty());
    // The connection closing between frames.
    assert!(matches!(
        read_contribution(&mut source),
        Err(FrameError::Io(ref error)) if is_eof(error)
    ));
}

#[test]
fn results_round_trip_with_empty_contributions() {
    let gathered = vec![b"rank 0".to_vec(), Vec::new(), vec![0xab; 300], Vec::new()];
    let bytes = encode_result(41, &gathered);
    let mut expected = vec![2];
    expected.extend_from_slice(&le(41));
    expected.extend_from_slice(&le(4));
    expected.extend_from_slice(&le(6));
    expected.extend_from_slice(b"rank 0");
    expected.extend_from_slice(&le(0));
    expected.extend_from_slice(&le(300));
    expected.extend_from_slice(&[0xab; 300]);
    expected.extend_from_slice(&le(0));
    assert_eq!(bytes, expected);

    let mut source = &bytes[..];
    assert_eq!(read_reply_kind(&mut source).unwrap(), ReplyKind::Result);
    assert_eq!(read_result_body(&mut source, 41, 4).unwrap(), gathered);
    assert!(source.is_empty());

    let nothing = vec![Vec::new(), Vec::new()];
    let bytes = encode_result(0, &nothing);
    assert_eq!(bytes.len(), 1 + 8 + 8 + 2 * 8);
    let mut source = &bytes[1..];
    assert_eq!(read_result_body(&mut source, 0, 2).unwrap(), nothing);
    assert!(source.is_empty());
}

/// Encodes `error`, checks the code and rank fields on the wire, and
/// decodes what the other ranks would report.
fn abort_round_trip(error: &RendezvousError, code: u8, rank: u64) -> RendezvousError {
    let bytes = encode_abort(error);
    assert_eq!(bytes[..2], [REPLY_ABORT, code]);
    assert_eq!(bytes[2..10], le(rank));
    let mut source = &bytes[..];
    assert_eq!(read_reply_kind(&mut source).unwrap(), ReplyKind::Abort);
    let decoded = read_abort_body(&mut source, Duration::from_secs(9));
    assert!(source.is_empty(), "{} bytes left", source.len());
    decoded
}

#[test]
fn every_abort_code_round_trips_with_its_rank_timeout_and_reason() {
    let timeout = RendezvousError::Timeout {
        rank: 5,
        timeout: Duration::from_millis(2500),
    };
    let bytes = encode_abort(&timeout);
    let mut expected = vec![3, 1];
    expected.extend_from_slice(&le(5));
    expected.extend_from_slice(&le(2500));
    expected.extend_from_slice(&le(0));
    assert_eq!(bytes, expected);
    match abort_round_trip(&timeout, ABORT_TIMEOUT, 5) {
        RendezvousError::Timeout { rank, timeout } => {
            assert_eq!(rank, 5);
            assert_eq!(timeout, Duration::from_millis(2500));
        }
        other => panic!("{other:?}"),
    }

    // Milliseconds on the wire: less is cut off.
    let fine = RendezvousError::Timeout {
        rank: 1,
        timeout: Duration::from_micros(2999),
    };
    match abort_round_trip(&fine, ABORT_TIMEOUT, 1) {
        RendezvousError::Timeout { timeout, .. } => {
            assert_eq!(timeout, Duration::from_millis(2))
        }
        other => panic!("{other:?}"),
    }

    let lost = RendezvousError::PeerLost {
        rank: 3,
        reason: "connection reset".to_string(),
    };
    match abort_round_trip(&lost, ABORT_PEER_LOST, 3) {
        RendezvousError::PeerLost { rank, reason } => {
            assert_eq!(rank, 3);
            assert_eq!(reason, "reported by rank 0: connection reset");
        }
        other => panic!("{other:?}"),
    }

    let config = RendezvousError::Config("two ranks 1".to_string());
    match abort_round_trip(&config, ABORT_CONFIG, 0) {
        RendezvousError::Config(message) => {
            assert_eq!(message, "rank 0 ended the rendezvous: two ranks 1")
        }
        other => panic!("{other:?}"),
    }

    let io = RendezvousError::Io {
        context: "accepting".to_string(),
        source: io::Error::other("boom"),
    };
    match abort_round_trip(&io, ABORT_IO, 0) {
        RendezvousError::Io { context, source } => {
            assert_eq!(context, "rank 0 ended the rendezvous");
            assert_eq!(source.kind(), io::ErrorKind::Other);
            assert_eq!(
                source.to_string(),
                "rendezvous I/O error at accepting: boom"
            );
        }
        other => panic!("{other:?}"),
    }

    let protocol = RendezvousError::Protocol("round 4 against 3".to_string());
    match abort_round_trip(&protocol, ABORT_PROTOCOL, 0) {
        RendezvousError::Protocol(message) => {
            assert_eq!(message, "rank 0 ended the rendezvous: round 4 against 3")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_overlong_abort_reason_is_cut_to_the_limit() {
    let long = RendezvousError::Protocol("x".repeat(MAX_REASON_BYTES + 10));
    let bytes = encode_abort(&long);
    assert_eq!(bytes[18..26], le(MAX_REASON_BYTES as u64));
    assert_eq!(bytes.len(), 26 + MAX_REASON_BYTES);
    match abort_round_trip(&long, ABORT_PROTOCOL, 0) {
        RendezvousError::Protocol(message) => assert_eq!(
            message,
            format!(
                "rank 0 ended the rendezvous: {}",
                "x".repeat(MAX_REASON_BYTES)
            )
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_opening_without_the_magic_is_refused_after_twelve_bytes() {
    let bytes = b"GET / HTTP/1.1\r\n";
    let mut source = &bytes[..];
    assert!(matches!(
        read_opening(&mut source),
        Err(OpeningError::NotLinkreduce)
    ));
    assert_eq!(source, b".1\r\n");
}

#[test]
fn an_opening_of_another_version_is_refused_naming_it() {
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&2u32.to_le_bytes());
    assert!(matches!(
        read_opening(&mut &bytes[..]),
        Err(OpeningError::Version(2))
    ));
    bytes[8..].copy_from_slice(&0x0102_0304u32.to_le_bytes());
    assert!(matches!(
        read_opening(&mut &bytes[..]),
        Err(OpeningError::Version(0x0102_0304))
    ));
}

#[test]
fn truncated_frames_are_reported_as_a_closed_connection() {
    assert!(matches!(
        read_opening(&mut &OPENING[..11]),
        Err(OpeningError::Io(ref error)) if is_eof(error)
    ));

    let hello = encode_hello(Hello {
        rank: 1,
        world_size: 2,
    });
    let mut source = &hello[..hello.len() - 1];
    read_opening(&mut source).unwrap();
    assert!(read_hello_body(&mut source).is_err_and(|error| is_eof(&error)));

    let mut contribution = encode_contribution_header(0, 10);
    contribution.extend_from_slice(b"short");
    assert!(matches!(
        read_contribution(&mut &contribution[..]),
        Err(FrameError::Io(ref error)) if is_eof(error)
    ));

    let result = encode_result(3, &[b"ab".to_vec(), b"cd".to_vec()]);
    assert!(matches!(
        read_result_body(&mut &result[1..result.len() - 1], 3, 2),
        Err(ResultError::Io(ref error)) if is_eof(error)
    ));

    let abort = encode_abort(&RendezvousError::Config("why".to_string()));
    let error = read_abort_body(&mut &abort[1..abort.len() - 1], Duration::from_secs(9));
    assert!(
        matches!(error, RendezvousError::PeerLost { rank: 0, ref reason }
            if reason == "connection closed"),
        "{error:?}"
    );
}

#[test]
fn length_prefixes_over_the_limit_are_refused_before_reading_on() {
    // No bytes follow the prefix: the refusal must not wait for them.
    let mut contribution = vec![FRAME_CONTRIBUTION];
    contribution.extend_from_slice(&le(0));
    contribution.extend_from_slice(&le(MAX_MESSAGE_BYTES as u64 + 1));
    assert!(matches!(
        read_contribution(&mut &contribution[..]),
        Err(FrameError::TooLong(len)) if len == MAX_MESSAGE_BYTES as u64 + 1
    ));
    contribution[9..].copy_from_slice(&le(u64::MAX));
    assert!(matches!(
        read_contribution(&mut &contribution[..]),
        Err(FrameError::TooLong(u64::MAX))
    ));

    let mut result = le(6).to_vec();
    result.extend_from_slice(&le(2));
    result.extend_from_slice(&le(0));
    result.extend_from_slice(&le(MAX_MESSAGE_BYTES as u64 + 1));
    assert!(matches!(
        read_result_body(&mut &result[..], 6, 2),
        Err(ResultError::TooLong { rank: 1, len }) if len == MAX_MESSAGE_BYTES as u64 + 1
    ));

    let mut abort = vec![ABORT_PROTOCOL];
    abort.extend_from_slice(&le(0));
    abort.extend_from_slice(&le(0));
    abort.extend_from_slice(&le(MAX_REASON_BYTES as u64 + 1));
    match read_abort_body(&mut &abort[..], Duration::from_secs(9)) {
        RendezvousError::Protocol(message) => assert_eq!(
            message,
            "rank 0 sent an abort reason of 65537 bytes, more than the limit of 65536"
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_result_for_another_round_or_world_is_refused() {
    let bytes = encode_result(5, &[Vec::new(), b"x".to_vec(), Vec::new()]);
    let mut source = &bytes[1..];
    assert!(matches!(
        read_result_body(&mut source, 6, 3),
        Err(ResultError::Round(5))
    ));
    // Nothing after the round was read.
    assert_eq!(source.len(), bytes.len() - 9);
    assert!(matches!(
        read_result_body(&mut &bytes[1..], 5, 4),
        Err(ResultError::Count(3))
    ));
}

#[test]
fn unknown_kinds_and_codes_are_refused_naming_them() {
    let mut frame = &[7u8, 0, 0][..];
    assert!(matches!(
        read_contribution(&mut frame),
        Err(FrameError::UnknownKind(7))
    ));
    assert_eq!(frame, [0, 0], "nothing after the kind is read");

    let kind = read_reply_kind(&mut &[9u8][..]).unwrap();
    assert_eq!(kind, ReplyKind::Unknown(9));
    assert_eq!(kind.code(), 9);
    assert_eq!(ReplyKind::Welcome.code(), 1);
    assert_eq!(ReplyKind::Result.code(), 2);
    assert_eq!(ReplyKind::Abort.code(), 3);

    let mut abort = vec![9u8];
    abort.extend_from_slice(&le(1));
    abort.extend_from_slice(&le(0));
    abort.extend_from_slice(&le(3));
    abort.extend_from_slice(b"why");
    match read_abort_body(&mut &abort[..], Duration::from_secs(9)) {
        RendezvousError::Protocol(message) => assert_eq!(
            message,
            "rank 0 ended the rendezvous with unknown error code 9: why"
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn io_errors_become_timeouts_lost_peers_or_io_errors() {
    let timeout = Duration::from_secs(4);
    let kind = |kind: io::ErrorKind| classify(kind.into(), 2, timeout, "reading");
    assert!(matches!(
        kind(io::ErrorKind::TimedOut),
        RendezvousError::Timeout { rank: 2, timeout: t } if t == timeout
    ));
    assert!(matches!(
        kind(io::ErrorKind::WouldBlock),
        RendezvousError::Timeout { rank: 2, .. }
    ));
    assert!(matches!(
        kind(io::ErrorKind::UnexpectedEof),
        RendezvousError::PeerLost { rank: 2, ref reason } if reason == "connection closed"
    ));
    assert!(matches!(
        kind(io::ErrorKind::ConnectionReset),
        RendezvousError::PeerLost { rank: 2, .. }
    ));
    assert!(matches!(
        kind(io::ErrorKind::PermissionDenied),
        RendezvousError::Io { ref context, .. } if context == "reading (rank 2)"
    ));
}

#[test]
fn an_absurd_timeout_still_gives_a_deadline() {
    assert!(deadline_after(Duration::MAX) > Instant::now());
}
