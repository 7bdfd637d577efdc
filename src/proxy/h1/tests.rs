//! The own server against a client on the other end of an in-memory pipe, with the
//! framing guard in between as on a real connection. Time is paused (tokio advances it
//! when every task waits), so timeouts are exact and the tests take no wall time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

use super::super::framing::Guarded;
use super::super::linger::ClientBody;
use super::super::respond;
use super::{Served, Settings};

const HEAD_TIMEOUT: Duration = Duration::from_secs(1);
const IDLE: Duration = Duration::from_secs(3);

/// What the service saw: each request's path and body, as it read them.
type Seen = Arc<Mutex<Vec<String>>>;

/// The own server on one end of a pipe; its service answers `ok:<path>` at once and
/// reads the request's body after `read_after` (before answering when zero).
fn start(read_after: Duration, parked: Gauge) -> (DuplexStream, Seen, JoinHandle<bool>) {
    let (client, server) = tokio::io::duplex(1 << 20);
    let mut limits = crate::config::Config::defaults().unwrap().proxy.limits.clone();
    limits.header_read_timeout = HEAD_TIMEOUT;
    limits.idle_timeout = IDLE;
    let seen = Seen::default();
    let log = seen.clone();
    let served = tokio::spawn(async move {
        let io = Box::new(Guarded::new(server, &limits));
        let settings = Settings {
            idle_timeout: IDLE,
            max_headers: limits.max_headers,
            max_header_bytes: limits.max_header_bytes,
        };
        let service = move |req: Request<ClientBody>| {
            let log = log.clone();
            async move {
                let path = req.uri().path().to_string();
                let answer = Bytes::from(format!("ok:{path}"));
                let body = req.into_body();
                let read = async move {
                    let got = match body.collect().await {
                        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
                        Err(e) => format!("error: {e}"),
                    };
                    log.lock().unwrap().push(format!("{path}:{got}"));
                };
                if read_after.is_zero() {
                    read.await;
                } else {
                    tokio::spawn(async move {
                        tokio::time::sleep(read_after).await;
                        read.await;
                    });
                }
                Response::new(respond::full(answer))
            }
        };
        matches!(super::serve(io, false, &settings, &parked, service).await, Served::Closed)
    });
    (client, seen, served)
}

/// Everything the server writes until `wait` passes with nothing more, or it closes.
async fn read_for(c: &mut DuplexStream, wait: Duration) -> (String, bool) {
    let (mut got, mut buf) = (String::new(), vec![0u8; 1 << 16]);
    loop {
        match tokio::time::timeout(wait, c.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.push_str(&String::from_utf8_lossy(&buf[..n])),
            Ok(_) => return (got, true),
            Err(_) => return (got, false),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_later_head_is_timed_from_its_own_first_byte() {
    let (mut c, _, _) = start(Duration::ZERO, Gauge::default());
    c.write_all(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    assert!(read_for(&mut c, Duration::from_millis(100)).await.0.contains("ok:/1"));
    // Longer than the head timeout after the first head, the next one comes in pieces,
    // and a large one (more than one read of the guard's).
    tokio::time::sleep(HEAD_TIMEOUT * 2).await;
    c.write_all(b"GET /2 HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(HEAD_TIMEOUT / 2).await;
    c.write_all(b"Host: a\r\n\r\n").await.unwrap();
    let (got, closed) = read_for(&mut c, Duration::from_millis(100)).await;
    assert!(got.contains("ok:/2") && !closed, "{got:?}, closed: {closed}");
    tokio::time::sleep(HEAD_TIMEOUT * 2).await;
    let cookie = "x".repeat(20_000);
    c.write_all(format!("GET /3 HTTP/1.1\r\nHost: a\r\nCookie: {cookie}\r\n\r\n").as_bytes()).await.unwrap();
    let (got, closed) = read_for(&mut c, Duration::from_millis(100)).await;
    assert!(got.contains("ok:/3") && !closed, "{got:?}, closed: {closed}");
    // A head that really is late still is refused.
    c.write_all(b"GET /4 HTTP/1.1\r\n").await.unwrap();
    let (got, closed) = read_for(&mut c, HEAD_TIMEOUT * 2).await;
    assert!(got.is_empty() && closed, "{got:?}, closed: {closed}");
}

#[tokio::test(start_paused = true)]
async fn empty_lines_between_requests_do_not_hold_a_connection_open() {
    let (mut c, _, served) = start(Duration::ZERO, Gauge::default());
    c.write_all(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    assert!(read_for(&mut c, Duration::from_millis(10)).await.0.contains("ok:/1"));
    // An empty line a little more often than the idle timeout: the rest goes on.
    let started = tokio::time::Instant::now();
    while !served.is_finished() && started.elapsed() < IDLE * 4 {
        let _ = c.write_all(b"\r\n").await;
        tokio::time::sleep(IDLE / 4).await;
    }
    assert!(started.elapsed() <= IDLE + IDLE / 4, "open {:?} after its last request", started.elapsed());
    assert!(served.await.unwrap(), "closed");
    // Nor can a flood of them, sent faster than they are read: the rest has its time.
    let (mut c, _, served) = start(Duration::ZERO, Gauge::default());
    c.write_all(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    assert!(read_for(&mut c, Duration::from_millis(10)).await.0.contains("ok:/1"));
    c.write_all(&[b'\n'; 256 * 1024]).await.unwrap(); // all there before the server reads
    tokio::time::advance(IDLE * 2).await;
    let _ = c.write_all(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let (got, closed) = read_for(&mut c, Duration::from_millis(10)).await;
    assert!(!got.contains("ok:/2") && closed, "{got:?}, closed: {closed}");
    assert!(served.await.unwrap(), "closed");
    // Between requests they are skipped, and the next request is served.
    let (mut c, _, _) = start(Duration::ZERO, Gauge::default());
    c.write_all(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let (got, _) = read_for(&mut c, Duration::from_millis(10)).await;
    assert!(got.contains("ok:/1") && got.contains("ok:/2"), "{got:?}");
}

/// A body that came whole with its head is handed over as bytes: the connection is not
/// held for it, so a request pipelined after it is served at once even while the first
/// body is still unread (an answer that did not wait for its upload).
#[tokio::test(start_paused = true)]
async fn a_body_that_came_with_its_head_does_not_hold_the_connection() {
    for read_after in [Duration::ZERO, Duration::from_secs(1)] {
        let (mut c, seen, _) = start(read_after, Gauge::default());
        c.write_all(b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let (got, closed) = read_for(&mut c, Duration::from_millis(10)).await;
        assert!(got.contains("ok:/a") && got.contains("ok:/b") && !closed, "{got:?}, closed: {closed}");
        tokio::time::sleep(read_after * 2).await;
        let mut seen = seen.lock().unwrap().clone();
        seen.sort();
        assert_eq!(seen, ["/a:hello", "/b:"], "read after {read_after:?}");
    }
}

/// An upstream may answer before the upload ends (and hyper's client keeps sending
/// it): the client's next bytes are still that body's, whole, and the request the
/// client sends after it is a request, not the body's tail.
#[tokio::test(start_paused = true)]
async fn a_body_read_after_its_answer_arrives_whole_and_the_next_request_is_served() {
    let (mut c, seen, _) = start(Duration::from_secs(1), Gauge::default());
    c.write_all(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n01234").await.unwrap();
    assert!(read_for(&mut c, Duration::from_millis(10)).await.0.contains("ok:/up"));
    c.write_all(b"56789").await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    c.write_all(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let (got, closed) = read_for(&mut c, Duration::from_secs(2)).await;
    assert_eq!(*seen.lock().unwrap(), ["/up:0123456789", "/next:"]);
    assert!(got.contains("ok:/next") && !closed, "{got:?}, closed: {closed}");
}

#[tokio::test(start_paused = true)]
async fn a_parked_connection_is_uncounted_however_its_serving_ends() {
    let parked = Gauge::default();
    let (mut c, _, served) = start(Duration::ZERO, parked.clone());
    c.write_all(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    read_for(&mut c, Duration::from_millis(10)).await;
    tokio::time::sleep(super::PARK_AFTER * 2).await;
    assert_eq!(parked.get(), 1);
    served.abort();
    let _ = served.await;
    assert_eq!(parked.get(), 0, "dropped while parked");
}
