//! The protocol's frames and messages: round trips, limits, refusals.
use super::*;
use tokio::net::UnixStream;

#[tokio::test]
async fn requests_and_replies_round_trip_over_a_socket_pair() {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let req = Request::SetPolicy {
        policy: PolicyName::Hash,
        weights: Some(vec![1, 3]),
        spill_depth: None,
    };
    write_frame(&mut a, &encode_request(&req).unwrap())
        .await
        .unwrap();
    let got = decode_request(&read_frame(&mut b).await.unwrap()).unwrap();
    assert_eq!(got, req);
    let reply: Outcome = Err(ErrorReply::new(ErrorKind::Busy, "busy"));
    write_frame(&mut b, &encode_reply(&reply)).await.unwrap();
    let back = decode_reply(&read_frame(&mut a).await.unwrap()).unwrap();
    assert_eq!(back, reply);
    drop(a);
    assert!(matches!(read_frame(&mut b).await, Err(FrameError::Closed)));
}

#[tokio::test]
async fn oversized_frames_are_refused_before_reading_them() {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    a.write_all(&(MAX_FRAME as u32 + 1).to_be_bytes())
        .await
        .unwrap();
    assert!(matches!(
        read_frame(&mut b).await,
        Err(FrameError::TooLarge(_))
    ));
    assert!(write_frame(&mut a, &vec![b' '; MAX_FRAME + 1])
        .await
        .is_err());
}

#[test]
fn bad_requests_are_told_apart() {
    let kind = |p: &[u8]| decode_request(p).unwrap_err().kind;
    assert_eq!(kind(b"\x00garbage"), ErrorKind::Malformed);
    assert_eq!(
        kind(br#"{"request":{"type":"status"}}"#),
        ErrorKind::Malformed
    );
    assert_eq!(
        kind(br#"{"version":2,"request":{"type":"status"}}"#),
        ErrorKind::WrongVersion
    );
    assert_eq!(
        kind(br#"{"version":1,"request":{"type":"explode"}}"#),
        ErrorKind::UnknownRequest
    );
    assert_eq!(
        kind(br#"{"version":1,"request":{"type":"scale","workers":"many"}}"#),
        ErrorKind::UnknownRequest
    );
    assert_eq!(
        decode_request(br#"{"version":1,"request":{"type":"drain","slot":2}}"#).unwrap(),
        Request::Drain { slot: 2 }
    );
}

#[test]
fn a_huge_unknown_request_gets_a_reply_that_fits_a_frame() {
    let big = format!(
        r#"{{"version":1,"request":{{"type":"{}"}}}}"#,
        "x".repeat(MAX_FRAME - 100)
    );
    let e = decode_request(big.as_bytes()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::UnknownRequest);
    assert!(encode_reply(&Err(e)).len() < 1024);
}

#[test]
fn a_path_that_is_not_utf8_is_refused_with_the_fix_not_a_panic() {
    use std::os::unix::ffi::OsStrExt;
    // Found by the cli_args fuzz target: `balancer upgrade --binary $'\xff'` panicked.
    let binary = std::path::PathBuf::from(std::ffi::OsStr::from_bytes(b"/usr/bin/\xff"));
    let e = encode_request(&Request::Upgrade {
        binary: Some(binary),
    })
    .unwrap_err();
    assert!(e.to_string().contains("not valid UTF-8"), "{e}");
    let good = Request::Upgrade {
        binary: Some("/usr/bin/balancer".into()),
    };
    assert_eq!(
        decode_request(&encode_request(&good).unwrap()).unwrap(),
        good
    );
}

#[test]
fn only_changes_need_privilege() {
    assert!(!Request::Status.changes_state());
    assert!(!Request::Policy.changes_state());
    assert!(Request::Scale { workers: 2 }.changes_state());
}
