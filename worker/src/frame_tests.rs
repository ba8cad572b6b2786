//! Tests for the data-plane wire format, including property tests on
//! untrusted input.

use std::pin::pin;
use std::task::{Context, Poll, Waker};

use proptest::prelude::*;

use super::*;

/// Runs `read_frame` on an in-memory buffer (which never blocks).
fn read_sync(mut bytes: &[u8]) -> Result<Option<Frame>, FrameError> {
    ready(read_frame(&mut bytes))
}

/// The output of a future that reads from memory (and so never waits).
fn ready<T>(fut: impl Future<Output = T>) -> T {
    match pin!(fut).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(result) => result,
        Poll::Pending => panic!("reading from a slice never blocks"),
    }
}

fn activations(rows: u32, hidden: u32, sample: bool) -> Frame {
    let data = (0..rows * hidden).map(|i| i as f32 * 0.5 - 3.0).collect();
    Frame::Activations {
        session: 0x0102_0304_0506_0708,
        start_pos: 17,
        rows,
        hidden,
        sample,
        data,
    }
}

fn token() -> Frame {
    Frame::Token {
        session: u64::MAX,
        position: 99,
        token: 128_000,
    }
}

/// Offset of the flags byte in an encoded activations frame (with prefix).
const FLAGS_AT: usize = 4 + 4 + 1 + 8 + 4 + 4 + 4;
const DTYPE_AT: usize = FLAGS_AT + 1;
const PAYLOAD_AT: usize = DTYPE_AT + 1;

#[test]
fn activations_round_trip() {
    for frame in [activations(3, 5, true), activations(1, 1, false)] {
        let bytes = encode(&frame);
        let declared = u32::from_le_bytes(bytes[..4].try_into().unwrap());
        assert_eq!(declared as usize, bytes.len() - 4);
        assert_eq!(&bytes[4..8], b"SVF1");
        assert_eq!(decode_body(&bytes[4..]), Ok(frame.clone()));
        assert_eq!(read_sync(&bytes), Ok(Some(frame)));
    }
}

#[test]
fn token_round_trip_and_layout() {
    let bytes = encode(&token());
    assert_eq!(bytes.len(), 4 + 21);
    assert_eq!(&bytes[..4], &21u32.to_le_bytes());
    assert_eq!(bytes[8], 2, "kind byte");
    assert_eq!(decode_body(&bytes[4..]), Ok(token()));
    assert_eq!(read_sync(&bytes), Ok(Some(token())));
}

#[test]
fn activations_layout_is_little_endian() {
    let bytes = encode(&activations(2, 3, true));
    assert_eq!(bytes.len(), 4 + 27 + 2 * 3 * 4);
    assert_eq!(bytes[8], 1, "kind byte");
    assert_eq!(&bytes[9..17], &0x0102_0304_0506_0708u64.to_le_bytes());
    assert_eq!(&bytes[17..21], &17u32.to_le_bytes());
    assert_eq!(&bytes[21..25], &2u32.to_le_bytes());
    assert_eq!(&bytes[25..29], &3u32.to_le_bytes());
    assert_eq!(bytes[FLAGS_AT], 1);
    assert_eq!(bytes[DTYPE_AT], 1);
    assert_eq!(&bytes[PAYLOAD_AT..PAYLOAD_AT + 4], &(-3.0f32).to_le_bytes());
}

#[tokio::test]
async fn frames_stream_in_order_then_clean_eof() {
    let (mut tx, mut rx) = tokio::io::duplex(64);
    let frames = vec![activations(4, 8, false), token(), activations(1, 2, true)];
    let sent = frames.clone();
    let writer = tokio::spawn(async move {
        for frame in &sent {
            write_frame(&mut tx, frame).await.unwrap();
        }
    });
    for expected in frames {
        assert_eq!(read_frame(&mut rx).await, Ok(Some(expected)));
    }
    writer.await.unwrap();
    assert_eq!(read_frame(&mut rx).await, Ok(None));
}

#[test]
fn four_gib_declaration_is_refused_as_too_large() {
    let mut bytes = u32::MAX.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"SVF1");
    let expected = FrameError::TooLarge {
        declared: u64::from(u32::MAX),
        max: MAX_FRAME_BYTES,
    };
    assert_eq!(read_sync(&bytes), Err(expected));
    let just_over = (MAX_FRAME_BYTES + 1).to_le_bytes();
    assert!(matches!(
        read_sync(&just_over),
        Err(FrameError::TooLarge { .. })
    ));
}

#[test]
fn eof_inside_a_frame_is_truncated() {
    assert_eq!(read_sync(&[]), Ok(None));
    assert_eq!(
        read_sync(&[5, 0]),
        Err(FrameError::Truncated { needed: 4, got: 2 })
    );
    let bytes = encode(&token());
    assert_eq!(
        read_sync(&bytes[..10]),
        Err(FrameError::Truncated {
            needed: 25,
            got: 10
        })
    );
    let mut huge = largest_frame_start();
    huge.resize(104, 0);
    assert!(matches!(
        read_sync(&huge),
        Err(FrameError::Truncated { got: 104, .. })
    ));
}

#[test]
fn non_finite_values_are_refused() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut bytes = encode(&activations(2, 2, true));
        let at = PAYLOAD_AT + 4 * 3;
        bytes[at..at + 4].copy_from_slice(&bad.to_le_bytes());
        assert_eq!(
            decode_body(&bytes[4..]),
            Err(FrameError::NonFinite { index: 3 })
        );
        let Frame::Activations { mut data, .. } = activations(2, 2, true) else {
            unreachable!()
        };
        data[1] = bad;
        let frame = Frame::Activations {
            session: 1,
            start_pos: 0,
            rows: 2,
            hidden: 2,
            sample: false,
            data,
        };
        assert_eq!(validate(&frame), Err(FrameError::NonFinite { index: 1 }));
    }
}

#[test]
fn wrong_dtype_is_refused() {
    let mut bytes = encode(&activations(1, 4, false));
    bytes[DTYPE_AT] = 2;
    assert_eq!(decode_body(&bytes[4..]), Err(FrameError::UnknownDtype(2)));
    bytes[DTYPE_AT] = 0;
    assert_eq!(read_sync(&bytes), Err(FrameError::UnknownDtype(0)));
}

#[test]
fn unknown_flag_bits_are_refused() {
    for flags in [0x02, 0x03, 0x80, 0xff] {
        let mut bytes = encode(&activations(1, 4, false));
        bytes[FLAGS_AT] = flags;
        assert_eq!(
            decode_body(&bytes[4..]),
            Err(FrameError::UnknownFlags(flags))
        );
    }
}

#[test]
fn a_head_names_the_frame_before_its_payload_is_read() {
    for frame in [activations(3, 5, true), token()] {
        let bytes = encode(&frame);
        // Prefix and head alone (a token's first 13 body bytes, all of an activations
        // frame's fields): the rest has not arrived.
        let head_bytes = match frame {
            Frame::Token { .. } => HEAD_BYTES,
            Frame::Activations { .. } => ACTIVATIONS_HEADER_BYTES,
        };
        let mut start = &bytes[..4 + head_bytes];
        let head = ready(read_head(&mut start)).unwrap().unwrap();
        assert!(
            start.is_empty(),
            "the head read no further than its own bytes"
        );
        assert_eq!(head.session(), frame.session());
        assert_eq!(head.is_token(), matches!(frame, Frame::Token { .. }));
        assert_eq!(head.body_len(), body_len(&frame));
        let mut rest = &bytes[4 + head_bytes..];
        assert_eq!(ready(read_rest(&mut rest, &head)), Ok(frame.clone()));
        assert!(rest.is_empty());

        // Skipping a frame leaves the stream at the next one.
        let mut two = bytes.clone();
        two.extend_from_slice(&encode(&token()));
        let mut stream = &two[..];
        let head = ready(read_head(&mut stream)).unwrap().unwrap();
        ready(skip_rest(&mut stream, &head)).unwrap();
        assert_eq!(ready(read_frame(&mut stream)), Ok(Some(token())));
        let mut cut = &bytes[..bytes.len() - 1];
        let head = ready(read_head(&mut cut)).unwrap().unwrap();
        assert_eq!(
            ready(skip_rest(&mut cut, &head)),
            Err(FrameError::Truncated {
                needed: bytes.len() as u64,
                got: bytes.len() as u64 - 1
            })
        );
    }
}

/// The prefix and the fields of the largest activations frame allowed (one row), without
/// its payload.
fn largest_frame_start() -> Vec<u8> {
    let hidden = (MAX_FRAME_BYTES as usize - ACTIVATIONS_HEADER_BYTES) / 4;
    let declared = (ACTIVATIONS_HEADER_BYTES + hidden * 4) as u32;
    let mut bytes = declared.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"SVF1\x01");
    bytes.extend_from_slice(&7u64.to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&1u32.to_le_bytes());
    bytes.extend_from_slice(&(hidden as u32).to_le_bytes());
    bytes.extend_from_slice(&[0, DTYPE_F32]);
    bytes
}

#[test]
fn a_head_checks_the_length_against_the_kind_and_shape() {
    // A token's body is 21 bytes; any other declared length is refused from its head.
    for declared in [22u32, 64 << 20] {
        let mut bytes = declared.to_le_bytes().to_vec();
        bytes.extend_from_slice(&encode(&token())[4..4 + HEAD_BYTES]);
        assert_eq!(
            ready(read_head(&mut &bytes[..])),
            Err(FrameError::TokenLength(declared))
        );
    }
    // Activations: rows × hidden × 4 payload bytes exactly, checked before the payload.
    let frame = encode(&activations(2, 4, false));
    let fields = &frame[4..4 + ACTIVATIONS_HEADER_BYTES];
    for (payload, expected) in [
        (
            28,
            FrameError::ShapeMismatch {
                rows: 2,
                hidden: 4,
                payload_bytes: 28,
            },
        ),
        (36, FrameError::TrailingBytes(4)),
    ] {
        let declared = (ACTIVATIONS_HEADER_BYTES + payload) as u32;
        let mut bytes = declared.to_le_bytes().to_vec();
        bytes.extend_from_slice(fields);
        assert_eq!(ready(read_head(&mut &bytes[..])), Err(expected));
    }
    // The largest frame allowed: its head is whole without any of its 64 MiB payload.
    let start = largest_frame_start();
    let head = ready(read_head(&mut &start[..])).unwrap().unwrap();
    assert_eq!(head.session(), 7);
    assert!(head.body_len() <= MAX_FRAME_BYTES as usize);
}

#[test]
fn a_head_is_refused_before_the_rest_arrives() {
    let bytes = encode(&activations(2, 4, false));
    let mut bad_magic = bytes[..4 + HEAD_BYTES].to_vec();
    bad_magic[4] = b'X';
    assert_eq!(
        ready(read_head(&mut &bad_magic[..])),
        Err(FrameError::BadMagic)
    );
    let mut bad_kind = bytes[..4 + HEAD_BYTES].to_vec();
    bad_kind[8] = 9;
    assert_eq!(
        ready(read_head(&mut &bad_kind[..])),
        Err(FrameError::UnknownKind(9))
    );
    // A token whose declared body is too short for one, once its kind is known.
    let mut short = 5u32.to_le_bytes().to_vec();
    short.extend_from_slice(b"SVF1\x02");
    assert_eq!(
        ready(read_head(&mut &short[..])),
        Err(FrameError::TokenLength(5))
    );
    // A body too short to hold even a kind is read (it is short) and refused.
    let mut shorter = 3u32.to_le_bytes().to_vec();
    shorter.extend_from_slice(b"SVF");
    assert_eq!(
        ready(read_head(&mut &shorter[..])),
        Err(FrameError::Truncated { needed: 4, got: 3 })
    );
    // A wrong magic is refused before the rest of the head has arrived.
    let mut early = 21u32.to_le_bytes().to_vec();
    early.extend_from_slice(b"XVF1\x02");
    assert_eq!(ready(read_head(&mut &early[..])), Err(FrameError::BadMagic));
}

#[test]
fn header_errors() {
    let mut body = encode(&token())[4..].to_vec();
    assert_eq!(
        decode_body(&body[..2]),
        Err(FrameError::Truncated { needed: 4, got: 2 })
    );
    body[4] = 7;
    assert_eq!(decode_body(&body), Err(FrameError::UnknownKind(7)));
    body[0] = b'X';
    assert_eq!(decode_body(&body), Err(FrameError::BadMagic));
    let mut long = encode(&token())[4..].to_vec();
    long.extend_from_slice(&[0, 0, 0]);
    assert_eq!(decode_body(&long), Err(FrameError::TrailingBytes(3)));
}

#[test]
fn shape_errors() {
    let good = encode(&activations(2, 3, false));
    // In the body, rows is at bytes 17..21 and hidden at 21..25.
    let set_u32 = |at: usize, v: u32| {
        let mut body = good[4..].to_vec();
        body[at..at + 4].copy_from_slice(&v.to_le_bytes());
        body
    };
    assert_eq!(decode_body(&set_u32(17, 0)), Err(FrameError::ZeroRows));
    assert_eq!(decode_body(&set_u32(21, 0)), Err(FrameError::ZeroRows));
    assert_eq!(
        decode_body(&set_u32(17, 3)),
        Err(FrameError::ShapeMismatch {
            rows: 3,
            hidden: 3,
            payload_bytes: 24
        })
    );
    assert_eq!(
        decode_body(&set_u32(17, 1)),
        Err(FrameError::TrailingBytes(12))
    );
    let overflow = {
        let mut body = set_u32(17, u32::MAX);
        body[21..25].copy_from_slice(&u32::MAX.to_le_bytes());
        body
    };
    assert!(matches!(
        decode_body(&overflow),
        Err(FrameError::ShapeMismatch { .. })
    ));
}

#[tokio::test]
async fn write_frame_refuses_invalid_frames() {
    let mismatched = Frame::Activations {
        session: 1,
        start_pos: 0,
        rows: 2,
        hidden: 2,
        sample: true,
        data: vec![1.0; 3],
    };
    let empty = Frame::Activations {
        session: 1,
        start_pos: 0,
        rows: 0,
        hidden: 2,
        sample: true,
        data: vec![],
    };
    let mut sink = Vec::new();
    assert!(matches!(
        write_frame(&mut sink, &mismatched).await,
        Err(FrameError::ShapeMismatch { .. })
    ));
    assert_eq!(
        write_frame(&mut sink, &empty).await,
        Err(FrameError::ZeroRows)
    );
    assert!(sink.is_empty(), "nothing is written for a refused frame");
}

fn finite_f32() -> impl Strategy<Value = f32> {
    prop::num::f32::NORMAL | prop::num::f32::SUBNORMAL | prop::num::f32::ZERO
}

fn valid_frame() -> impl Strategy<Value = Frame> {
    let acts = (1u32..8, 1u32..64)
        .prop_flat_map(|(rows, hidden)| {
            let data = prop::collection::vec(finite_f32(), (rows * hidden) as usize);
            (
                any::<u64>(),
                any::<u32>(),
                Just(rows),
                Just(hidden),
                any::<bool>(),
                data,
            )
        })
        .prop_map(
            |(session, start_pos, rows, hidden, sample, data)| Frame::Activations {
                session,
                start_pos,
                rows,
                hidden,
                sample,
                data,
            },
        );
    let tok = (any::<u64>(), any::<u32>(), any::<u32>()).prop_map(|(session, position, token)| {
        Frame::Token {
            session,
            position,
            token,
        }
    });
    prop_oneof![3 => acts, 1 => tok]
}

/// Same variant and, for activations, the same shape; and valid.
fn same_shape(a: &Frame, b: &Frame) -> bool {
    let shape = |f: &Frame| match f {
        Frame::Activations {
            rows, hidden, data, ..
        } => Some((*rows, *hidden, data.len())),
        Frame::Token { .. } => None,
    };
    shape(a) == shape(b) && validate(b).is_ok()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decode_body_never_panics(body in prop::collection::vec(any::<u8>(), 0..4096)) {
        let _ = decode_body(&body);
    }

    #[test]
    fn decode_body_never_panics_past_the_magic(
        kind in 0u8..4,
        rest in prop::collection::vec(any::<u8>(), 0..4096),
    ) {
        let mut body = MAGIC.to_vec();
        body.push(kind);
        body.extend_from_slice(&rest);
        let _ = decode_body(&body);
        let _ = read_sync(&body);
    }

    #[test]
    fn valid_frames_round_trip(frame in valid_frame()) {
        let bytes = encode(&frame);
        prop_assert_eq!(validate(&frame), Ok(()));
        let decoded = decode_body(&bytes[4..]).unwrap();
        prop_assert_eq!(&decoded, &frame);
        if let (Frame::Activations { data: a, .. }, Frame::Activations { data: b, .. }) =
            (&decoded, &frame)
        {
            prop_assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
        }
        prop_assert_eq!(read_sync(&bytes), Ok(Some(frame)));
    }

    #[test]
    fn corrupted_frames_never_panic(
        frame in valid_frame(),
        pick in any::<prop::sample::Index>(),
        xor in 1u8..=255,
        truncate in any::<bool>(),
    ) {
        let mut bytes = encode(&frame);
        let at = pick.index(bytes.len());
        if truncate {
            bytes.truncate(at);
        } else {
            bytes[at] ^= xor;
        }
        match read_sync(&bytes) {
            Ok(Some(decoded)) => prop_assert!(same_shape(&frame, &decoded)),
            Ok(None) => prop_assert!(truncate && at == 0),
            Err(_) => {}
        }
        if bytes.len() > 4
            && let Ok(decoded) = decode_body(&bytes[4..])
        {
            prop_assert!(same_shape(&frame, &decoded));
        }
    }
}

#[tokio::test]
async fn a_head_must_follow_its_first_byte_in_time_but_a_quiet_stream_may_wait() {
    let limit = std::time::Duration::from_millis(200);
    // A stream with nothing on it: no frame has started, so no limit applies.
    let (_tx, mut rx) = tokio::io::duplex(64);
    let quiet = tokio::time::timeout(limit * 3, read_head_within(&mut rx, limit)).await;
    assert!(quiet.is_err(), "a quiet stream was cut off: {quiet:?}");
    // Two bytes of a prefix, then nothing: the head has stalled.
    let (mut tx, mut rx) = tokio::io::duplex(64);
    tokio::io::AsyncWriteExt::write_all(&mut tx, &[21, 0])
        .await
        .unwrap();
    let stalled = tokio::time::timeout(limit * 3, read_head_within(&mut rx, limit))
        .await
        .expect("the limit ends the read");
    assert_eq!(stalled, Err(FrameError::Stalled(limit)));
}
