//! Random and damaged control frames (a stable-toolchain stand-in for fuzzing): the decoder
//! never panics, every refusal fits a frame, and the server forwards nothing it refused.
use super::protocol::{
    decode_request, encode_reply, encode_request, PolicyName, Request, MAX_FRAME,
};

/// A small deterministic generator (xorshift), so that a failure names its seed.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub(super) fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Valid requests, noise, and valid requests cut, flipped or spliced with JSON-ish noise.
pub(crate) fn payload(seed: u64) -> Vec<u8> {
    let valid: Vec<Vec<u8>> = [
        Request::Status,
        Request::Policy,
        Request::Scale { workers: 3 },
        Request::Drain { slot: 1 },
        Request::Restart { slot: None },
        Request::SetPolicy {
            policy: PolicyName::Hash,
            weights: Some(vec![1, 3]),
            spill_depth: Some(4),
        },
        Request::Upgrade { binary: None },
    ]
    .iter()
    .map(|r| encode_request(r).unwrap())
    .collect();
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut payload = valid[rng.below(valid.len())].clone();
    match rng.below(5) {
        0 => payload = (0..rng.below(300)).map(|_| rng.next() as u8).collect(),
        1 => payload.truncate(rng.below(payload.len())),
        2 => {
            for _ in 0..=rng.below(4) {
                let at = rng.below(payload.len());
                payload[at] = rng.next() as u8;
            }
        }
        3 => {
            let at = rng.below(payload.len());
            let alphabet = b"{}[]\\\",:0aZ-9";
            let noise: Vec<u8> = (0..rng.below(2000))
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect();
            payload.splice(at..at, noise);
        }
        _ => {}
    }
    payload
}

#[test]
fn random_payloads_never_panic_and_refusals_fit_a_frame() {
    for seed in 1..=20_000u64 {
        if let Err(e) = decode_request(&payload(seed)) {
            assert!(
                encode_reply(&Err(e)).len() <= MAX_FRAME,
                "seed {seed}: an error reply over the frame limit"
            );
        }
    }
}
