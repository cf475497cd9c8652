//! Arbitrary bytes from a control-socket client, through the server's own path
//! (`serve_stream`: framing, JSON decoding, authorization, forwarding, error replies).
//!
//! Oracles: nothing panics; every complete frame gets exactly one reply frame that the CLI
//! can decode (plus a `too-large` reply for an oversized length, after which the server hangs
//! up); exactly the decodable requests reach the supervisor; and a decodable request encodes
//! and decodes back to itself.
#![no_main]

use std::sync::OnceLock;

use balancer::control::{
    protocol::{
        decode_reply, decode_request, encode_request, ErrorKind, Reply, Request, MAX_FRAME,
    },
    server::{serve_stream, Command},
};
use libfuzzer_sys::fuzz_target;
use tokio::sync::mpsc;

/// The controller's uid as the peer's: every decodable request passes authorization.
const OWN_UID: u32 = 1000;

/// What the server must do with the input, worked out independently of it.
struct Expected {
    /// Complete frames (each gets a reply).
    frames: usize,
    /// Of those, the ones that decode (each is forwarded).
    requests: Vec<Request>,
    /// Whether a length over the limit ends the stream (answered with `too-large`).
    too_large: bool,
}

fn expected(mut rest: &[u8]) -> Expected {
    let mut e = Expected {
        frames: 0,
        requests: Vec::new(),
        too_large: false,
    };
    while let Some((len, after)) = rest.split_first_chunk::<4>() {
        let len = u32::from_be_bytes(*len) as usize;
        if len > MAX_FRAME {
            e.too_large = true;
            break;
        }
        let Some((payload, after)) = after.split_at_checked(len) else {
            break;
        };
        e.frames += 1;
        if let Ok(request) = decode_request(payload) {
            e.requests.push(request);
        }
        rest = after;
    }
    e
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime")
    })
}

/// The reply frames the server wrote, decoded.
fn replies(mut rest: &[u8]) -> Vec<Result<Reply, balancer::control::protocol::ErrorReply>> {
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (len, after) = rest
            .split_first_chunk::<4>()
            .expect("the server writes whole frames");
        let len = u32::from_be_bytes(*len) as usize;
        assert!(len <= MAX_FRAME, "a reply of {len} bytes is over the limit");
        let (payload, after) = after.split_at(len);
        out.push(decode_reply(payload).expect("every reply decodes"));
        rest = after;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let want = expected(data);
    for request in &want.requests {
        let again = decode_request(&encode_request(request).expect("a decoded request encodes"))
            .expect("an encoded request decodes");
        assert_eq!(&again, request, "round trip");
    }
    let mut written = Vec::new();
    let forwarded = runtime().block_on(async {
        let (commands, mut received) = mpsc::channel::<Command>(4);
        let stream = tokio::io::join(data, &mut written);
        let supervisor = async {
            let mut forwarded = Vec::new();
            while let Some((request, reply)) = received.recv().await {
                forwarded.push(request);
                let _ = reply.send(Ok(Reply::Done {
                    message: "ok".into(),
                }));
            }
            forwarded
        };
        let ((), forwarded) = tokio::join!(
            serve_stream(stream, Some(OWN_UID), OWN_UID, commands, None),
            supervisor
        );
        forwarded
    });
    assert_eq!(
        forwarded, want.requests,
        "exactly the decodable requests are forwarded"
    );
    let replies = replies(&written);
    assert_eq!(
        replies.len(),
        want.frames + usize::from(want.too_large),
        "one reply per complete frame"
    );
    if want.too_large {
        let last = replies.last().expect("a too-large reply");
        assert!(
            matches!(last, Err(e) if e.kind == ErrorKind::TooLarge),
            "{last:?}"
        );
    }
    assert_eq!(
        replies.iter().filter(|r| r.is_ok()).count(),
        want.requests.len(),
        "exactly the forwarded requests succeed"
    );
});
