use super::*;
use proptest::prelude::*;

/// Encodes a masked client frame, as a browser would send it.
pub(crate) fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    encode_masked(fin, opcode, payload, [0x37, 0xfa, 0x21, 0x3d])
}

fn decode_all(bytes: &[u8]) -> Result<Vec<Incoming>, ProtocolError> {
    let mut decoder = MessageDecoder::new(1 << 16, 1 << 17);
    let mut out = Vec::new();
    decoder.decode(bytes, &mut out)?;
    Ok(out)
}

#[test]
fn encodes_each_length_form() {
    assert_eq!(&encode(Opcode::Text, b"hi")[..], b"\x81\x02hi");
    let medium = encode(Opcode::Binary, &[0; 200]);
    assert_eq!(&medium[..4], &[0x82, 126, 0, 200]);
    let large = encode(Opcode::Binary, &[0; 70_000]);
    assert_eq!(&large[..2], &[0x82, 127]);
    assert_eq!(large.len(), 70_010);
}

#[test]
fn decodes_text_binary_and_control() {
    let mut bytes = client_frame(true, 1, b"hello");
    bytes.extend(client_frame(true, 2, &[1, 2, 3]));
    bytes.extend(client_frame(true, 9, b"p"));
    bytes.extend(client_frame(true, 8, &[0x03, 0xe8, b'b', b'y', b'e']));
    assert_eq!(
        decode_all(&bytes).unwrap(),
        vec![
            Incoming::Text("hello".into()),
            Incoming::Binary(vec![1, 2, 3]),
            Incoming::Ping(b"p".to_vec()),
            Incoming::Close(Some(1000), "bye".into()),
        ]
    );
}

#[test]
fn reassembles_fragments_with_interleaved_ping() {
    let mut bytes = client_frame(false, 1, b"hel");
    bytes.extend(client_frame(true, 9, b""));
    bytes.extend(client_frame(true, 0, b"lo"));
    assert_eq!(
        decode_all(&bytes).unwrap(),
        vec![Incoming::Ping(vec![]), Incoming::Text("hello".into())]
    );
}

#[test]
fn limits_and_violations_map_to_close_codes() {
    let mut decoder = MessageDecoder::new(10, 15);
    let err = decoder
        .decode(&client_frame(true, 1, &[b'a'; 11]), &mut Vec::new())
        .unwrap_err();
    assert_eq!(err.close_code(), close_code::TOO_BIG);

    let mut decoder = MessageDecoder::new(10, 15);
    let mut bytes = client_frame(false, 1, &[b'a'; 10]);
    bytes.extend(client_frame(true, 0, &[b'a'; 10]));
    let err = decoder.decode(&bytes, &mut Vec::new()).unwrap_err();
    assert!(matches!(
        err,
        ProtocolError::MessageTooLarge { size: 20, .. }
    ));

    let err = decode_all(&client_frame(true, 1, &[0xff, 0xfe])).unwrap_err();
    assert_eq!(err.close_code(), close_code::INVALID_PAYLOAD);

    let unmasked = [0x81, 0x01, b'a'];
    assert_eq!(
        decode_all(&unmasked).unwrap_err().close_code(),
        close_code::PROTOCOL_ERROR
    );
    let err = decode_all(&client_frame(true, 0, b"x")).unwrap_err();
    assert_eq!(err.close_code(), close_code::PROTOCOL_ERROR);
}

#[test]
fn a_huge_claimed_length_under_huge_limits_waits_instead_of_overflowing() {
    // Found by the frame_decoder fuzz target with limits no config can set.
    let mut decoder = MessageDecoder::new(usize::MAX, usize::MAX);
    let header = [
        0x82, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4,
    ];
    assert_eq!(decoder.decode(&header, &mut Vec::new()), Ok(()));
}

#[test]
fn invalid_utf8_in_a_fragment_fails_before_the_last_one() {
    let mut decoder = MessageDecoder::new(100, 1000);
    let mut out = Vec::new();
    // "é" split across fragments is fine...
    let mut bytes = client_frame(false, 1, &[b'a', 0xc3]);
    bytes.extend(client_frame(false, 0, &[0xa9]));
    decoder.decode(&bytes, &mut out).unwrap();
    // ...a byte that can never be UTF-8 fails at once, with the message unfinished.
    let err = decoder
        .decode(&client_frame(false, 0, &[0xff]), &mut out)
        .unwrap_err();
    assert_eq!(err, ProtocolError::InvalidUtf8);
    assert!(out.is_empty());
}

#[test]
fn invalid_close_codes_are_protocol_errors() {
    for code in [
        0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000,
    ] {
        let err = decode_all(&client_frame(true, 8, &code.to_be_bytes())).unwrap_err();
        assert_eq!(err.close_code(), close_code::PROTOCOL_ERROR, "{code}");
    }
    for code in [
        1000u16, 1001, 1002, 1003, 1007, 1011, 1013, 3000, 3999, 4000, 4999,
    ] {
        let closed = decode_all(&client_frame(true, 8, &code.to_be_bytes())).unwrap();
        assert_eq!(closed, vec![Incoming::Close(Some(code), String::new())]);
    }
}

#[test]
fn oversize_frame_is_refused_from_its_header_alone() {
    let mut decoder = MessageDecoder::new(100, 100);
    let frame = client_frame(true, 2, &[0; 1000]);
    let err = decoder.decode(&frame[..8], &mut Vec::new()).unwrap_err();
    assert!(matches!(
        err,
        ProtocolError::FrameTooLarge { size: 1000, .. }
    ));
}

#[test]
fn idle_decoder_holds_no_buffer() {
    let mut decoder = MessageDecoder::new(1000, 1000);
    let frame = client_frame(true, 1, b"split across reads");
    let mut out = Vec::new();
    decoder.decode(&frame[..5], &mut out).unwrap();
    assert!(decoder.pending.capacity() > 0);
    decoder.decode(&frame[5..], &mut out).unwrap();
    assert_eq!(decoder.pending.capacity(), 0);
    assert_eq!(out, vec![Incoming::Text("split across reads".into())]);
}

#[test]
fn one_read_of_small_compressed_frames_inflates_a_budget_at_a_time() {
    // 100 frames of about 30 bytes, each inflating to 16 KiB: 1.6 MiB from one read.
    let packed = crate::compression::compress(&[b'z'; 16 << 10], 6, 15).unwrap();
    let frame = client_frame(true, 0x42, &packed);
    let bytes: Vec<u8> = frame
        .iter()
        .copied()
        .cycle()
        .take(frame.len() * 100)
        .collect();
    let mut decoder = MessageDecoder::new(1 << 16, 1 << 17).inflating();
    let mut out = Vec::new();
    decoder.decode(&bytes, &mut out).unwrap();
    // At most the budget (128 KiB) of inflated messages at once; the rest is held.
    assert_eq!(out.len(), 8);
    assert!(decoder.is_holding());
    let mut batches = 1;
    while decoder.is_holding() {
        decoder.decode(&[], &mut out).unwrap();
        batches += 1;
    }
    assert_eq!((out.len(), batches), (100, 13));
    assert!(
        out.iter()
            .all(|m| *m == Incoming::Binary(vec![b'z'; 16 << 10]))
    );
}

#[test]
fn a_compressed_message_at_the_limit_may_carry_deflates_overhead() {
    let mut state = 1_u32;
    let noise: Vec<u8> = (0..1 << 16)
        .map(|_| {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (state >> 16) as u8
        })
        .collect();
    let packed = crate::compression::compress(&noise, 6, 15).unwrap();
    assert!(packed.len() > noise.len(), "noise does not compress");
    let mut decoder = MessageDecoder::new(1 << 16, 1 << 16).inflating();
    let mut out = Vec::new();
    decoder
        .decode(&client_frame(true, 0x42, &packed), &mut out)
        .unwrap();
    assert_eq!(out, [Incoming::Binary(noise.clone())]);
    // One byte more inflated is over the limit.
    let over = crate::compression::compress(&[noise, vec![0]].concat(), 6, 15).unwrap();
    let refused = decoder.decode(&client_frame(true, 0x42, &over), &mut out);
    assert!(
        matches!(refused, Err(ProtocolError::MessageTooLarge { .. })),
        "{refused:?}"
    );
}

proptest! {
    #[test]
    fn decode_never_panics(chunks in proptest::collection::vec(
        proptest::collection::vec(any::<u8>(), 0..64), 0..8)) {
        let mut decoder = MessageDecoder::new(128, 256);
        let mut out = Vec::new();
        for chunk in chunks {
            if decoder.decode(&chunk, &mut out).is_err() {
                break;
            }
        }
    }

    #[test]
    fn any_split_yields_the_same_messages(
        texts in proptest::collection::vec("[a-z\u{e9}\u{4e16}]{0,200}", 1..5),
        split in any::<prop::sample::Index>(),
    ) {
        let bytes: Vec<u8> = texts
            .iter()
            .flat_map(|t| client_frame(true, 1, t.as_bytes()))
            .collect();
        let at = split.index(bytes.len() + 1);
        let mut decoder = MessageDecoder::new(1 << 16, 1 << 16);
        let mut out = Vec::new();
        decoder.decode(&bytes[..at], &mut out).unwrap();
        decoder.decode(&bytes[at..], &mut out).unwrap();
        let expected: Vec<Incoming> =
            texts.into_iter().map(Incoming::Text).collect();
        prop_assert_eq!(out, expected);
    }
}
