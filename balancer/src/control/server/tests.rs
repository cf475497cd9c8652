//! The control server's unit tests: one client over a socket pair, a fake supervisor.
use tokio::{io::AsyncWriteExt, task::JoinHandle};

use super::*;
use crate::control::protocol::{
    decode_reply, encode_request, Outcome, PolicyName, Reply, StatusReport,
};

/// The controller's uid in these tests (any non-root uid: the tests need no privilege).
const OWN: u32 = 1000;
const FOREIGN: u32 = 65534;

fn status_report() -> StatusReport {
    StatusReport {
        pid: 42,
        uptime_secs: 1.5,
        policy: PolicyName::Hash,
        weights: None,
        spill_depth: 16,
        sample_interval_us: 1000,
        sampling_cost_us_per_sec: 0.5,
        sampling: None,
        controller_cpu_secs: 0.0,
        controller_cpu_window_secs: 0.0,
        listen: vec!["127.0.0.1:8080".into()],
        slots: Vec::new(),
        bpf_ns_per_selection: None,
        bpf_runs: None,
    }
}

/// A client end, the server task serving the other end of the pair as a peer of
/// `peer_uid`, and the supervisor's end of the command channel.
fn serve(peer_uid: Option<u32>) -> (UnixStream, JoinHandle<()>, mpsc::Receiver<Command>) {
    let (client, server) = UnixStream::pair().unwrap();
    let (commands, requests) = mpsc::channel(4);
    let task = tokio::spawn(serve_stream(server, peer_uid, OWN, commands, None));
    (client, task, requests)
}

/// Sends one frame and returns the decoded reply; fails rather than hangs when none comes
/// (as it would if a request were forwarded to a supervisor that never answers).
async fn exchange(client: &mut UnixStream, payload: &[u8]) -> Outcome {
    write_frame(client, payload).await.unwrap();
    reply(client).await
}

/// The next reply frame, decoded; fails after 20 s without one.
async fn reply(client: &mut UnixStream) -> Outcome {
    let frame = next_frame(client).await.expect("a reply frame");
    decode_reply(&frame).unwrap()
}

/// The next frame or why there is none; fails after 20 s without either (longer than the
/// server's own deadlines, which the paused-clock tests let expire).
async fn next_frame(client: &mut UnixStream) -> Result<bytes::BytesMut, FrameError> {
    tokio::time::timeout(Duration::from_secs(20), read_frame(client))
        .await
        .expect("a frame or the end of the stream within 20 s")
}

/// Answers the next command with `outcome`, checking it is `expected`.
fn supervisor(
    mut requests: mpsc::Receiver<Command>,
    expected: Request,
    outcome: Outcome,
) -> JoinHandle<mpsc::Receiver<Command>> {
    tokio::spawn(async move {
        let (request, reply) = requests.recv().await.expect("a forwarded command");
        assert_eq!(request, expected);
        reply.send(outcome).unwrap();
        requests
    })
}

/// Closes the client, waits for the server task to end, and asserts that nothing more
/// reached the command channel.
async fn nothing_more_forwarded(
    client: UnixStream,
    task: JoinHandle<()>,
    mut requests: mpsc::Receiver<Command>,
) {
    drop(client);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the server task ends once the client is gone")
        .unwrap();
    match requests.try_recv() {
        Err(mpsc::error::TryRecvError::Disconnected) => {}
        Ok((request, _)) => panic!("{request:?} reached the command channel"),
        Err(e) => panic!("the server still holds the channel: {e}"),
    }
}

#[tokio::test]
async fn a_status_request_is_forwarded_and_its_outcome_returned() {
    // A foreign uid may read.
    let (mut client, task, requests) = serve(Some(FOREIGN));
    let answer: Outcome = Ok(Reply::Status(status_report()));
    let supervisor = supervisor(requests, Request::Status, answer.clone());
    let got = exchange(&mut client, &encode_request(&Request::Status).unwrap()).await;
    assert_eq!(got, answer);
    nothing_more_forwarded(client, task, supervisor.await.unwrap()).await;
}

#[tokio::test]
async fn a_change_from_a_foreign_uid_is_refused_and_never_forwarded() {
    let (mut client, task, requests) = serve(Some(FOREIGN));
    let got = exchange(
        &mut client,
        &encode_request(&Request::Scale { workers: 1 }).unwrap(),
    )
    .await;
    let e = got.unwrap_err();
    assert_eq!(e.kind, ErrorKind::PermissionDenied, "{e:?}");
    assert!(e.message.contains(&format!("uid {FOREIGN} ")), "{e:?}");
    nothing_more_forwarded(client, task, requests).await;
}

#[tokio::test]
async fn a_too_large_frame_is_answered_then_the_connection_closed() {
    let (mut client, task, requests) = serve(Some(OWN));
    client
        .write_all(&(MAX_FRAME as u32 + 1).to_be_bytes())
        .await
        .unwrap();
    let e = reply(&mut client).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::TooLarge, "{e:?}");
    // The server hung up: end of stream, and its task is over.
    assert!(matches!(
        next_frame(&mut client).await,
        Err(FrameError::Closed)
    ));
    nothing_more_forwarded(client, task, requests).await;
}

#[tokio::test]
async fn malformed_json_is_answered_and_the_connection_stays_usable() {
    let (mut client, task, requests) = serve(Some(OWN));
    let got = exchange(&mut client, b"{{{ not json").await;
    assert_eq!(got.unwrap_err().kind, ErrorKind::Malformed);
    // The next frame on the same connection is served: a change, from the own uid.
    let request = Request::Drain { slot: 1 };
    let answer: Outcome = Ok(Reply::Done {
        message: "slot 1 drained".into(),
    });
    let supervisor = supervisor(requests, request.clone(), answer.clone());
    assert_eq!(
        exchange(&mut client, &encode_request(&request).unwrap()).await,
        answer
    );
    nothing_more_forwarded(client, task, supervisor.await.unwrap()).await;
}

#[test]
fn reading_is_for_anyone() {
    for peer in [Some(0), Some(OWN), Some(FOREIGN), None] {
        for request in [Request::Status, Request::Policy] {
            assert_eq!(
                authorize(peer, OWN, &request),
                Ok(()),
                "{peer:?} {request:?}"
            );
        }
    }
}

#[test]
fn changing_is_for_root_and_the_own_uid() {
    let change = Request::SetPolicy {
        policy: PolicyName::Hash,
        weights: None,
        spill_depth: None,
    };
    assert_eq!(authorize(Some(0), OWN, &change), Ok(()), "root changes");
    assert_eq!(
        authorize(Some(OWN), OWN, &change),
        Ok(()),
        "own uid changes"
    );
    for (peer, shown) in [(Some(FOREIGN), "uid 65534 "), (None, "uid ? ")] {
        let e = authorize(peer, OWN, &change).unwrap_err();
        assert_eq!(e.kind, ErrorKind::PermissionDenied, "{peer:?}");
        assert!(e.message.starts_with(shown), "{peer:?}: {e:?}");
        assert!(e.message.contains("run the command as root"), "{e:?}");
    }
    // A controller running as root lets only root change it.
    assert_eq!(authorize(Some(0), 0, &change), Ok(()));
    assert_eq!(
        authorize(Some(OWN), 0, &change).unwrap_err().kind,
        ErrorKind::PermissionDenied
    );
}

/// Random and damaged frames: each gets a reply, exactly the decodable ones reach the
/// supervisor, and the connection stays usable throughout.
#[tokio::test]
async fn random_frames_are_answered_and_only_valid_ones_forwarded() {
    let (mut client, task, mut requests) = serve(Some(OWN));
    // A supervisor that answers whatever reaches it, and counts.
    let counter = tokio::spawn(async move {
        let mut n = 0u32;
        while let Some((_, reply)) = requests.recv().await {
            n += 1;
            let _ = reply.send(Ok(Reply::Done {
                message: "ok".into(),
            }));
        }
        n
    });
    let mut expected = 0u32;
    for seed in 1..=2_000u64 {
        let payload = crate::control::random_frames::payload(seed);
        let valid = crate::control::protocol::decode_request(&payload).is_ok();
        expected += u32::from(valid);
        let outcome = exchange(&mut client, &payload).await;
        assert_eq!(outcome.is_ok(), valid, "seed {seed}: {outcome:?}");
    }
    drop(client);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the server task ends once the client is gone")
        .unwrap();
    assert_eq!(counter.await.unwrap(), expected);
}

/// A request whose first bytes come but not the rest is answered (typed) and the connection
/// closed after [`REQUEST_DEADLINE`], long before [`IDLE`]: a slow client cannot keep its
/// place by trickling.
#[tokio::test(start_paused = true)]
async fn a_request_that_stops_halfway_is_cut_off_after_the_request_deadline() {
    let (mut client, task, requests) = serve(Some(OWN));
    let started = tokio::time::Instant::now();
    client.write_all(&[0, 0, 0, 40, b'{']).await.unwrap();
    let e = reply(&mut client).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Malformed, "{e:?}");
    assert!(e.message.contains("within 5 s"), "{e:?}");
    assert!(started.elapsed() < IDLE, "{:?}", started.elapsed());
    assert!(matches!(
        next_frame(&mut client).await,
        Err(FrameError::Closed)
    ));
    nothing_more_forwarded(client, task, requests).await;
}

/// A client that asks and asks but never reads: once the socket buffer is full the
/// connection's reply cannot be written, and after [`WRITE_DEADLINE`] the server hangs up
/// and its task ends (without the deadline it waits for the client forever).
#[tokio::test(start_paused = true)]
async fn a_client_that_never_reads_its_replies_is_disconnected_after_the_write_deadline() {
    let (mut client, task, mut requests) = serve(Some(OWN));
    // Each reply is about 60 KB: a few fill any socket buffer.
    let big = "x".repeat(60_000);
    let answering = tokio::spawn(async move {
        let mut n = 0u32;
        while let Some((_, reply)) = requests.recv().await {
            n += 1;
            let _ = reply.send(Ok(Reply::Done {
                message: big.clone(),
            }));
        }
        n
    });
    let request = encode_request(&Request::Status).unwrap();
    for _ in 0..100 {
        write_frame(&mut client, &request).await.unwrap();
    }
    tokio::time::timeout(WRITE_DEADLINE * 3, task)
        .await
        .expect("the server gives up on a client that does not read")
        .unwrap();
    let answered = answering.await.unwrap();
    assert!(
        (1..100).contains(&answered),
        "{answered} requests reached the supervisor"
    );
    drop(client);
}
