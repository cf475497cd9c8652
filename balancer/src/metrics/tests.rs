//! The metrics endpoint over loopback, with a fake supervisor that counts what reaches it.
use std::sync::atomic::{AtomicU32, Ordering};

use super::*;

/// A supervisor that answers every status request with a slot that steered as many
/// connections as there were requests so far, and counts them.
fn supervisor() -> (mpsc::Sender<Command>, Arc<AtomicU32>) {
    let (commands, mut requests) = mpsc::channel::<Command>(4);
    let count = Arc::new(AtomicU32::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Some((request, reply)) = requests.recv().await {
            assert_eq!(request, Request::Status);
            let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
            let _ = reply.send(Ok(Reply::Status(render::sample(u64::from(n)))));
        }
    });
    (commands, count)
}

/// One scrape: the status line and the body; fails after 5 s.
async fn scrape(addr: SocketAddr, request: &[u8]) -> (String, String) {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        text
    };
    let text = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .expect("an answer within 5 s");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, body.to_owned())
}

const GET: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";

/// Scrapes until the first snapshot is served; fails after 5 s.
async fn first_snapshot(addr: SocketAddr) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = scrape(addr, GET).await;
        if status == "HTTP/1.1 200 OK" {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no snapshot: {status}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn scrapes_are_served_from_the_snapshot_and_never_reach_the_supervisor() {
    let (commands, count) = supervisor();
    let addr = serve_every(
        "127.0.0.1:0".parse().unwrap(),
        commands,
        Duration::from_secs(3600),
    )
    .await
    .unwrap();
    let first = first_snapshot(addr).await;
    assert!(
        first.contains("balancer_selections_total{slot=\"0\",path=\"cpu\"} 1\n"),
        "{first}"
    );
    for _ in 0..50 {
        let (status, body) = scrape(addr, GET).await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(body, first, "the same snapshot until the next refresh");
    }
    assert_eq!(count.load(Ordering::SeqCst), 1, "one status for 51 scrapes");
}

#[tokio::test]
async fn the_snapshot_follows_the_supervisor_on_every_refresh() {
    let (commands, _) = supervisor();
    let addr = serve_every(
        "127.0.0.1:0".parse().unwrap(),
        commands,
        Duration::from_millis(20),
    )
    .await
    .unwrap();
    first_snapshot(addr).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    // The counter the snapshot shows moves on with the refreshes.
    loop {
        let (_, body) = scrape(addr, GET).await;
        // Only the served body counts: the supervisor being asked is not enough.
        if body.contains("path=\"cpu\"} 3\n") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn idle_connections_of_the_same_peer_give_way_to_a_scrape() {
    let (commands, _) = supervisor();
    let addr = serve_every(
        "127.0.0.1:0".parse().unwrap(),
        commands,
        Duration::from_secs(3600),
    )
    .await
    .unwrap();
    first_snapshot(addr).await;
    let mut idle = Vec::new();
    for _ in 0..MAX_CLIENTS + 8 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    // Accepted in order: the scrape comes after every idle connection and still answers.
    let (status, _) = scrape(addr, GET).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    // The idle ones that gave way were closed: all but the newest few read end of stream.
    let mut closed = 0;
    for s in &mut idle {
        let mut b = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(200), s.read(&mut b)).await {
            closed += 1;
        }
    }
    assert!(
        closed >= idle.len() - MAX_PER_PEER,
        "{closed} of {} closed",
        idle.len()
    );
}

#[tokio::test]
async fn other_requests_get_their_status_and_head_gets_no_body() {
    let (commands, _) = supervisor();
    let addr = serve_every(
        "127.0.0.1:0".parse().unwrap(),
        commands,
        Duration::from_secs(3600),
    )
    .await
    .unwrap();
    first_snapshot(addr).await;
    for (request, expected) in [
        (&b"GET /nope HTTP/1.1\r\n\r\n"[..], "HTTP/1.1 404 Not Found"),
        (
            b"DELETE /metrics HTTP/1.1\r\n\r\n",
            "HTTP/1.1 405 Method Not Allowed",
        ),
        (b"hello\r\n\r\n", "HTTP/1.1 400 Bad Request"),
    ] {
        assert_eq!(scrape(addr, request).await.0, expected);
    }
    let (status, body) = scrape(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", ""));
}
