//! Property tests: any size and chunk exponent round-trips; any tampering is refused.

use proptest::prelude::*;
use veil_keys::{
    BlobParams, HEADER_LEN, Header, KeyId, Opener, Purpose, Sealer, SecretKey, Uuid, open, seal,
};

fn key() -> SecretKey {
    SecretKey::from_bytes([0x42; 32])
}

fn params(e: u8, task: bool) -> BlobParams {
    let sid = Uuid::from_bytes([1; 16]);
    let id = if task {
        KeyId::task(9, sid, Uuid::from_bytes([2; 16]))
    } else {
        KeyId::session(9, sid)
    };
    BlobParams::new(id, Purpose::Prompt)
        .with_chunk_exp(e)
        .unwrap()
}

/// (chunk exponent, plaintext of any size from 0 to 3 chunks + 1 byte).
fn sized() -> impl Strategy<Value = (u8, Vec<u8>)> {
    (10u8..=16).prop_flat_map(|e| {
        let max = 3 * (1usize << e) + 1;
        (
            Just(e),
            prop_oneof![
                // Sizes around chunk boundaries are where framing bugs live.
                (0usize..=3, -1i64..=1).prop_map(move |(k, d)| (k as i64 * (1i64 << e) + d)
                    .clamp(0, max as i64)
                    as usize),
                0usize..=max,
            ],
        )
            .prop_map(|(e, len)| (e, (0..len).map(|i| (i * 31 + 7) as u8).collect()))
    })
}

fn frame_spans(blob: &[u8]) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut at = HEADER_LEN;
    while at < blob.len() {
        let w = u32::from_be_bytes(blob[at..at + 4].try_into().unwrap());
        let end = at + 4 + (w & 0x7fff_ffff) as usize;
        spans.push((at, end));
        at = end;
    }
    spans
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn whole_round_trip((e, data) in sized(), task in any::<bool>()) {
        let blob = seal(&key(), &params(e, task), &data).unwrap();
        let c = 1usize << e;
        let frames = data.len() / c + 1;
        prop_assert_eq!(blob.len(), HEADER_LEN + data.len() + frames * 20);
        let opened = open(&key(), &blob).unwrap();
        prop_assert_eq!(&opened.plaintext[..], &data[..]);
        prop_assert_eq!(opened.header.chunk_exp, e);
    }

    /// The streaming sealer, fed in arbitrary pieces with arbitrary flushes,
    /// produces a blob that both openers accept; without flushes it equals the
    /// whole-buffer framing.
    #[test]
    fn streaming_round_trip((e, data) in sized(), cuts in prop::collection::vec((1usize..5000, any::<bool>()), 1..20), slice in 1usize..4096) {
        let k = key();
        let mut sealer = Sealer::new(&k, &params(e, true)).unwrap();
        let mut blob = Vec::new();
        let mut rest = &data[..];
        let mut flushed = false;
        for (n, flush) in cuts.iter().cycle().take(200) {
            if rest.is_empty() { break; }
            let n = (*n).min(rest.len());
            sealer.update(&rest[..n], &mut blob).unwrap();
            rest = &rest[n..];
            if *flush { sealer.flush(&mut blob).unwrap(); flushed = true; }
        }
        sealer.update(rest, &mut blob).unwrap();
        sealer.finish(&mut blob).unwrap();
        prop_assert_eq!(&open(&k, &blob).unwrap().plaintext[..], &data[..]);
        if !flushed {
            prop_assert_eq!(blob.len(), HEADER_LEN + data.len() + (data.len() / (1 << e) + 1) * 20);
        }
        let mut opener = Opener::new(&k);
        let mut got = Vec::new();
        for piece in blob.chunks(slice) {
            for c in opener.push(piece).unwrap() { got.extend_from_slice(&c); }
        }
        opener.finish().unwrap();
        prop_assert_eq!(got, data);
    }

    #[test]
    fn any_bit_flip_is_refused((e, data) in sized(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut blob = seal(&key(), &params(e, true), &data).unwrap();
        let i = pos.index(blob.len());
        blob[i] ^= 1 << bit;
        prop_assert!(open(&key(), &blob).is_err(), "flip at {} accepted", i);
        let mut opener = Opener::new(&key());
        let pushed = opener.push(&blob);
        prop_assert!(pushed.is_err() || opener.finish().is_err());
    }

    #[test]
    fn any_truncation_is_refused((e, data) in sized(), cut in any::<prop::sample::Index>()) {
        let blob = seal(&key(), &params(e, false), &data).unwrap();
        let n = cut.index(blob.len()); // strictly shorter than the blob
        prop_assert!(open(&key(), &blob[..n]).is_err());
        let mut opener = Opener::new(&key());
        let pushed = opener.push(&blob[..n]);
        prop_assert!(pushed.is_err() || opener.finish().is_err());
    }

    #[test]
    fn any_extension_is_refused((e, data) in sized(), extra in prop::collection::vec(any::<u8>(), 1..64)) {
        let mut blob = seal(&key(), &params(e, true), &data).unwrap();
        blob.extend_from_slice(&extra);
        prop_assert_eq!(open(&key(), &blob).unwrap_err().code(), "trailing_data");
    }

    #[test]
    fn any_chunk_swap_or_duplicate_is_refused(e in 10u8..=12, chunks in 2usize..6, a in any::<prop::sample::Index>(), b in any::<prop::sample::Index>(), tail in 1usize..1000) {
        let c = 1usize << e;
        let data: Vec<u8> = (0..(chunks - 1) * c + tail.min(c - 1)).map(|i| i as u8).collect();
        let blob = seal(&key(), &params(e, true), &data).unwrap();
        let spans = frame_spans(&blob);
        let (i, j) = (a.index(spans.len()), b.index(spans.len()));
        let piece = |k: usize| &blob[spans[k].0..spans[k].1];
        // Swap frames i and j (when distinct).
        if i != j {
            let mut order: Vec<usize> = (0..spans.len()).collect();
            order.swap(i, j);
            let mut swapped = blob[..HEADER_LEN].to_vec();
            for k in order { swapped.extend_from_slice(piece(k)); }
            prop_assert!(open(&key(), &swapped).is_err());
        }
        // Duplicate frame i right after itself.
        let mut dup = blob[..spans[i].1].to_vec();
        dup.extend_from_slice(piece(i));
        dup.extend_from_slice(&blob[spans[i].1..]);
        prop_assert!(open(&key(), &dup).is_err());
        // Drop frame i.
        let mut dropped = blob[..spans[i].0].to_vec();
        dropped.extend_from_slice(&blob[spans[i].1..]);
        prop_assert!(open(&key(), &dropped).is_err());
    }

    /// Parsers never panic on arbitrary bytes.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400), magic in any::<bool>()) {
        let mut bytes = bytes;
        if magic && bytes.len() >= 8 {
            bytes[..5].copy_from_slice(b"VEIL\x01");
        }
        let _ = Header::parse(&bytes);
        prop_assert!(open(&key(), &bytes).is_err());
        let mut opener = Opener::new(&key());
        let _ = opener.push(&bytes);
    }
}

#[test]
fn opener_releases_only_authenticated_chunks_before_a_failure() {
    let k = key();
    let p = params(10, true);
    let data = vec![7u8; 3000];
    let mut blob = seal(&k, &p, &data).unwrap();
    let spans = frame_spans(&blob);
    // Corrupt the third frame: the first two chunks come out, then the error.
    blob[spans[2].0 + 8] ^= 1;
    let mut opener = Opener::new(&k);
    let first = opener.push(&blob[..spans[2].0 + 10]).unwrap();
    assert_eq!(first.len(), 2);
    assert_eq!(first.iter().map(|c| c.len()).sum::<usize>(), 2048);
    assert_eq!(
        opener.push(&blob[spans[2].0 + 10..]).unwrap_err().code(),
        "decrypt"
    );
    assert_eq!(opener.push(b"").unwrap_err().code(), "poisoned");
    assert_eq!(opener.finish().unwrap_err().code(), "poisoned");
}

#[test]
fn a_partial_chunk_is_never_released() {
    let k = key();
    let blob = seal(&k, &params(10, false), &[1u8; 1500]).unwrap();
    let mut opener = Opener::new(&k);
    // Everything but the last byte of the first frame's tag.
    let first_end = HEADER_LEN + 4 + 1024 + 16;
    assert!(opener.push(&blob[..first_end - 1]).unwrap().is_empty());
    assert_eq!(
        opener.push(&blob[first_end - 1..first_end]).unwrap().len(),
        1
    );
}

#[test]
fn early_flush_sends_each_token_as_its_own_frame() {
    let k = key();
    let mut sealer = Sealer::new(&k, &params(16, true)).unwrap();
    let mut out = Vec::new();
    sealer.update(b"tok", &mut out).unwrap();
    assert_eq!(
        out.len(),
        HEADER_LEN,
        "nothing but the header before a flush"
    );
    sealer.flush(&mut out).unwrap();
    assert_eq!(out.len(), HEADER_LEN + 4 + 3 + 16);
    sealer.flush(&mut out).unwrap(); // nothing pending: no empty frame
    assert_eq!(out.len(), HEADER_LEN + 4 + 3 + 16);
    sealer.finish(&mut out).unwrap();
    assert_eq!(out.len(), HEADER_LEN + 2 * 20 + 3);
    assert_eq!(&open(&k, &out).unwrap().plaintext[..], b"tok");
}

#[test]
fn distinct_salts_per_blob() {
    let a = seal(&key(), &params(16, true), b"same").unwrap();
    let b = seal(&key(), &params(16, true), b"same").unwrap();
    assert_ne!(a[44..76], b[44..76]);
    assert_ne!(a[HEADER_LEN..], b[HEADER_LEN..]);
}

#[test]
fn wrong_key_is_reported_before_any_aead_work() {
    let blob = seal(&key(), &params(16, true), b"x").unwrap();
    let other = SecretKey::from_bytes([0x43; 32]);
    assert_eq!(open(&other, &blob).unwrap_err().code(), "wrong_key");
    let mut opener = Opener::new(&other);
    assert_eq!(
        opener.push(&blob[..HEADER_LEN]).unwrap_err().code(),
        "wrong_key"
    );
}
