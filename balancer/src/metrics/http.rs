//! Just enough HTTP/1.x for a scraper: the request head is read whole (up to [`MAX_HEAD`]
//! bytes) and judged by its request line; every answer closes the connection.

/// Longest request head accepted.
pub const MAX_HEAD: usize = 8 * 1024;

/// The answers the endpoint gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// 200: the metrics.
    Ok,
    /// 400: not an HTTP/1 request line.
    BadRequest,
    /// 404: a path other than /metrics or /.
    NotFound,
    /// 405: a method other than GET or HEAD.
    MethodNotAllowed,
    /// 408: the head did not arrive within the deadline.
    RequestTimeout,
    /// 429: the peer has as many connections as it may.
    TooManyRequests,
    /// 431: the head is over [`MAX_HEAD`].
    HeadersTooLarge,
    /// 503: no snapshot (yet, or any more), or the endpoint is full.
    Unavailable,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::RequestTimeout => "408 Request Timeout",
            Status::TooManyRequests => "429 Too Many Requests",
            Status::HeadersTooLarge => "431 Request Header Fields Too Large",
            Status::Unavailable => "503 Service Unavailable",
        }
    }
}

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask {
    /// The metrics (`head_only`: HEAD, the headers without the body).
    Metrics {
        /// A HEAD request.
        head_only: bool,
    },
    /// Something answered with this error.
    Refused(Status),
}

/// Judges the bytes of a request read so far: `None` while its head is incomplete (and
/// under [`MAX_HEAD`]).
pub fn parse_head(buf: &[u8]) -> Option<Ask> {
    let end = find(buf, b"\r\n\r\n").or_else(|| find(buf, b"\n\n"));
    if end.is_none() {
        return (buf.len() >= MAX_HEAD).then_some(Ask::Refused(Status::HeadersTooLarge));
    }
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Ok(line) = std::str::from_utf8(line) else {
        return Some(Ask::Refused(Status::BadRequest));
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Some(Ask::Refused(Status::BadRequest));
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Some(Ask::Refused(Status::BadRequest));
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Some(Ask::Refused(Status::MethodNotAllowed)),
    };
    let path = target.split('?').next().unwrap_or_default();
    Some(match path {
        "/metrics" | "/" => Ask::Metrics { head_only },
        _ => Ask::Refused(Status::NotFound),
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A whole response: status, headers, and (unless `head_only`) `body`.
pub fn response(status: Status, body: &str, head_only: bool) -> Vec<u8> {
    let content_type = match status {
        Status::Ok => "text/plain; version=0.0.4",
        _ => "text/plain",
    };
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        status.line(),
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_is_a_request_for_the_metrics() {
        for (req, head_only) in [
            (
                &b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n"[..],
                false,
            ),
            (b"GET / HTTP/1.0\r\n\r\n", false),
            (b"GET /metrics?x=1 HTTP/1.1\n\n", false),
            (b"HEAD /metrics HTTP/1.1\r\n\r\n", true),
        ] {
            assert_eq!(
                parse_head(req),
                Some(Ask::Metrics { head_only }),
                "{}",
                String::from_utf8_lossy(req)
            );
        }
    }

    #[test]
    fn an_incomplete_head_waits_until_it_is_too_large() {
        assert_eq!(parse_head(b""), None);
        assert_eq!(parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), None);
        let mut slow = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        slow.resize(MAX_HEAD - 1, b'a');
        assert_eq!(parse_head(&slow), None);
        slow.push(b'a');
        assert_eq!(
            parse_head(&slow),
            Some(Ask::Refused(Status::HeadersTooLarge))
        );
    }

    #[test]
    fn other_requests_are_refused_with_their_status() {
        for (req, status) in [
            (
                &b"POST /metrics HTTP/1.1\r\n\r\n"[..],
                Status::MethodNotAllowed,
            ),
            (b"GET /admin HTTP/1.1\r\n\r\n", Status::NotFound),
            (b"GET /metrics\r\n\r\n", Status::BadRequest),
            (b"GET /metrics HTTP/2 extra\r\n\r\n", Status::BadRequest),
            (b"GET metrics HTTP/1.1\r\n\r\n", Status::BadRequest),
            (b"\xff\xfe HTTP/1.1\r\n\r\n", Status::BadRequest),
            (b"SSH-2.0-OpenSSH\r\n\r\n", Status::BadRequest),
        ] {
            assert_eq!(
                parse_head(req),
                Some(Ask::Refused(status)),
                "{}",
                String::from_utf8_lossy(req)
            );
        }
    }

    #[test]
    fn responses_carry_their_length_and_close() {
        let r = String::from_utf8(response(Status::Ok, "a 1\n", false)).unwrap();
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("Content-Length: 4\r\n") && r.contains("Connection: close\r\n"));
        assert!(r.ends_with("\r\n\r\na 1\n"), "{r}");
        let head = String::from_utf8(response(Status::Ok, "a 1\n", true)).unwrap();
        assert!(
            head.ends_with("Content-Length: 4\r\nConnection: close\r\n\r\n"),
            "{head}"
        );
        let busy = String::from_utf8(response(Status::TooManyRequests, "x\n", false)).unwrap();
        assert!(
            busy.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
            "{busy}"
        );
    }
}
