//! latchkey's own HTTP/1.1 upstream client (issue 20), through the real binary: every
//! request without a body goes out on a pooled HTTP/1.1 connection the own client
//! drives, and that connection then carries the next request. A response read one byte
//! short of its end, or past it, would become another client's answer; so each test
//! asserts what the client sees AND how many upstream connections carried it. The
//! upstream is hand-scripted (`keepalive_scripted_upstream`): it writes exactly the bytes
//! given, many requests per connection.

mod common;
use common::*;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

const CRED: &str = r#"
[credentials.anthropic]
header = "x-api-key"
value = "${ANTHROPIC_API_KEY}"
domains = ["api.anthropic.com"]
"#;
const SECRET: &str = "sk-ant-REAL-0123456789";
const ENV: &[(&str, &str)] = &[("ANTHROPIC_API_KEY", SECRET)];
const HOST: &str = "https://api.anthropic.com";

/// A body that looks like more HTTP: it must arrive as body, byte for byte.
fn body_for(tag: &str) -> String {
    match tag {
        "empty" => String::new(),
        "big" => (0..100_000u32).map(|i| char::from(b'a' + (i % 26) as u8)).collect(),
        _ => format!("{tag}: one\r\nHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged\n0\r\n\r\n{tag} end"),
    }
}

fn with_length(tag: &str) -> Vec<u8> {
    let body = body_for(tag);
    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Tag: {tag}\r\n\r\n{body}", body.len()).into_bytes()
}

/// `body_for(tag)` in chunks with extensions, then trailers.
fn chunked(tag: &str) -> Vec<u8> {
    let body = body_for(tag);
    let mut out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n".to_vec();
    // Small chunks, and big ones for a big body (hyper caps a body's extensions at 16 KiB
    // in all, and so does latchkey).
    let size = if body.len() > 1000 { 4096 } else { 7 };
    for (i, piece) in body.as_bytes().chunks(size).enumerate() {
        out.extend_from_slice(format!("{:x};piece={i};q=\"a b\"\r\n", piece.len()).as_bytes());
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("0;last\r\nx-checksum: sum-{tag}\r\nx-more: 1\r\n\r\n").as_bytes());
    out
}

/// What a server smuggling a second response would append.
const FORGED: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged";

/// The upstream most tests use: the path says how to answer.
fn script() -> KeepaliveScript {
    Arc::new(|req: &KeptRequest| {
        let mut parts = req.path.trim_start_matches('/').splitn(2, '/');
        let (kind, tag) = (parts.next().unwrap_or(""), parts.next().unwrap_or("x"));
        if req.method == "HEAD" {
            // What a correct server sends: the length a GET would have, no body.
            return Reply::keep(&b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"[..]);
        }
        match kind {
            "cl" => Reply::keep(with_length(tag)),
            "chunked" => Reply::keep(chunked(tag)),
            "eof" => Reply::close(format!("HTTP/1.1 200 OK\r\n\r\n{}", body_for(tag)), Duration::ZERO),
            "close" => {
                let body = body_for(tag);
                let head = format!("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\n\r\n", body.len());
                // The connection stays open: only latchkey's reading of the head keeps it
                // out of the pool.
                Reply::keep(head + &body)
            }
            "http10" => {
                let body = body_for(tag);
                Reply::keep(format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len()))
            }
            "http10ka" => {
                let body = body_for(tag);
                let head = format!("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: {}\r\n\r\n", body.len());
                Reply::keep(head + &body)
            }
            "early" => {
                let interim = "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n\
                               HTTP/1.1 100 Continue\r\n\r\n\
                               HTTP/1.1 103 Early Hints\r\nLink: </app.js>; rel=preload\r\n\r\n";
                match tag.starts_with("split") {
                    // The final head a moment after the interim ones.
                    true => Reply::keep(interim).then_later(Duration::from_millis(30), with_length(tag)),
                    false => Reply::keep([interim.as_bytes(), &with_length(tag)].concat()),
                }
            }
            "204" => Reply::keep(&b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"[..]),
            "304" => Reply::keep(&b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\nETag: \"e\"\r\n\r\n"[..]),
            // The bogus length's bytes really sent: they belong to no response.
            "204-body" => Reply::keep(&b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello"[..]),
            "stray" => Reply::keep([&b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"[..], FORGED].concat()),
            "stray-later" => Reply::keep(&b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"[..])
                .then_later(Duration::from_millis(50), FORGED),
            "two-lengths" => {
                Reply::keep(&b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"[..])
            }
            "te-and-cl" => Reply::keep(
                &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n"[..],
            ),
            // The length is the decoded size: the client can be given the body whole.
            "te-and-cl5" => Reply::keep(
                &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n"[..],
            ),
            "switch" => Reply::keep(
                &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"[..],
            ),
            "cut-cl" => {
                Reply::close([&b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"[..], &[b'a'; 10]].concat(), Duration::ZERO)
            }
            "cut-chunked" => Reply::close(
                [&b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n"[..], &[b'a'; 10]].concat(),
                Duration::ZERO,
            ),
            "echo" => {
                let body = [&b"got: "[..], &req.body].concat();
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                Reply::keep([head.as_bytes(), &body].concat())
            }
            _ => Reply::keep(&b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"[..]),
        }
    })
}

fn start(script: KeepaliveScript) -> (Upstream, Latchkey) {
    let up = keepalive_scripted_upstream(script);
    let lk = Latchkey::start(Some(&up), CRED, ENV);
    (up, lk)
}

/// One transfer of a curl run, as curl reported it.
#[derive(Debug)]
struct Transfer {
    status: u16,
    /// New connections curl made for it (0: it reused the one before).
    connects: u32,
    body: String,
}

/// curl through latchkey, one transfer per entry of `transfers` (its own arguments,
/// joined by `--next`), all in one run: curl keeps one client connection for them.
/// Returns curl's exit code, each transfer, and stderr.
fn curl_many(lk: &Latchkey, transfers: &[&[&str]]) -> (i32, Vec<Transfer>, String) {
    let proxy = lk.proxy_url();
    let bundle = lk.bundle();
    let mut cmd = Command::new("curl");
    cmd.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
    for (i, args) in transfers.iter().enumerate() {
        if i > 0 {
            cmd.arg("--next");
        }
        cmd.args(["-sS", "--max-time", "10", "-w", "\n<<%{http_code} %{num_connects}>>\n", "-x", &proxy])
            .arg("--cacert")
            .arg(&bundle)
            .args(*args);
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut rest = text.as_str();
    let mut got = Vec::new();
    while let Some(at) = rest.find("\n<<") {
        let end = at + rest[at..].find(">>\n").expect("a whole write-out");
        let (status, connects) = rest[at + 3..end].split_once(' ').unwrap();
        got.push(Transfer {
            status: status.parse().unwrap(),
            connects: connects.parse().unwrap(),
            body: rest[..at].to_string(),
        });
        rest = &rest[end + 3..];
    }
    (out.status.code().unwrap_or(-1), got, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn get(path: &str) -> Vec<String> {
    vec!["--http1.1".into(), format!("{HOST}{path}")]
}

/// `curl_many` over GETs (HTTP/1.1 to latchkey) of `paths`.
fn get_all(lk: &Latchkey, paths: &[&str]) -> Vec<Transfer> {
    let args: Vec<Vec<String>> = paths.iter().map(|p| get(p)).collect();
    run(lk, &args)
}

/// `curl_many`, asserting curl ran every transfer.
fn run(lk: &Latchkey, transfers: &[Vec<String>]) -> Vec<Transfer> {
    let refs: Vec<Vec<&str>> = transfers.iter().map(|t| t.iter().map(String::as_str).collect()).collect();
    let slices: Vec<&[&str]> = refs.iter().map(Vec::as_slice).collect();
    let (exit, got, stderr) = curl_many(lk, &slices);
    assert_eq!(got.len(), transfers.len(), "curl exit {exit}: {got:?} {stderr}\n{}", lk.stderr());
    got
}

/// Which upstream connection (accept order) carried each request, in order.
fn conns(up: &Upstream) -> Vec<usize> {
    up.requests().iter().map(|s| s.conn).collect()
}

fn connections(up: &Upstream) -> usize {
    up.connections.load(SeqCst)
}

fn statuses(got: &[Transfer]) -> Vec<u16> {
    got.iter().map(|t| t.status).collect()
}

#[test]
fn content_length_bodies_arrive_byte_exact_and_one_upstream_connection_carries_them_all() {
    let (up, lk) = start(script());
    let tags = ["a", "big", "empty", "b"];
    let paths: Vec<String> = tags.iter().map(|t| format!("/cl/{t}")).collect();
    let got = get_all(&lk, &paths.iter().map(String::as_str).collect::<Vec<_>>());
    for (t, tag) in got.iter().zip(tags) {
        assert_eq!(t.status, 200, "{tag}: {t:?}");
        assert!(t.body == body_for(tag), "{tag}: byte-exact body, got {} bytes: {:?}", t.body.len(), t);
    }
    assert_eq!(got.iter().map(|t| t.connects).collect::<Vec<_>>(), [1, 0, 0, 0], "one client connection");
    assert_eq!(conns(&up), [0, 0, 0, 0], "every request on the first upstream connection");
    assert!(up.requests().iter().all(|s| s.header_all("x-api-key") == [SECRET]), "injected on each");

    // An HTTP/2 client's bodiless requests take the own client too (its own pool).
    let h2: Vec<Vec<String>> =
        ["a", "b", "c"].iter().map(|t| vec!["--http2".into(), format!("{HOST}/cl/{t}")]).collect();
    let got = run(&lk, &h2);
    for (t, tag) in got.iter().zip(["a", "b", "c"]) {
        assert_eq!((t.status, t.body.as_str()), (200, body_for(tag).as_str()), "h2 {tag}");
    }
    assert_eq!(connections(&up), 2, "one more upstream connection, for the h2 clients' pool");
    assert_eq!(conns(&up), [0, 0, 0, 0, 1, 1, 1]);
}

#[test]
fn chunked_bodies_with_extensions_and_trailers_arrive_byte_exact_over_one_upstream_connection() {
    let (up, lk) = start(script());
    let dump = lk.dir.path().join("headers.txt");
    let paths = ["/chunked/a", "/chunked/big", "/cl/c", "/chunked/d"];
    let args: Vec<Vec<String>> = paths
        .iter()
        .map(|p| {
            let mut a = get(p);
            a.extend(["-H".into(), "TE: trailers".into(), "-D".into(), dump.display().to_string()]);
            a
        })
        .collect();
    let got = run(&lk, &args);
    for (t, p) in got.iter().zip(paths) {
        let tag = p.rsplit('/').next().unwrap();
        assert_eq!(t.status, 200, "{p}");
        assert!(t.body == body_for(tag), "{p}: byte-exact body, got {} bytes: {t:?}", t.body.len());
    }
    assert_eq!(got.iter().map(|t| t.connects).collect::<Vec<_>>(), [1, 0, 0, 0]);
    assert_eq!(conns(&up), [0, 0, 0, 0], "chunked bodies read to their last chunk, the connection reused");
    // The last transfer's head and trailers (curl's -D keeps the last).
    let headers = std::fs::read_to_string(&dump).unwrap().to_ascii_lowercase();
    assert!(headers.contains("x-checksum: sum-d"), "the trailers reach the client: {headers}");
}

#[test]
fn bodies_read_to_the_close_arrive_whole_and_each_takes_a_new_upstream_connection() {
    let (up, lk) = start(script());
    let got = get_all(&lk, &["/eof/a", "/eof/big", "/eof/c"]);
    for (t, tag) in got.iter().zip(["a", "big", "c"]) {
        assert_eq!(t.status, 200, "{tag}");
        assert!(t.body == body_for(tag), "{tag}: byte-exact body, got {} bytes", t.body.len());
    }
    assert_eq!(connections(&up), 3, "a connection read to its close is spent");
    assert_eq!(conns(&up), [0, 1, 2]);
}

#[test]
fn connection_close_and_http10_responses_are_never_reused_http10_keep_alive_is() {
    let (up, lk) = start(script());
    let paths = ["/close/a", "/close/b", "/http10/c", "/http10/d", "/http10ka/e", "/http10ka/f", "/cl/g"];
    let got = get_all(&lk, &paths);
    for (t, p) in got.iter().zip(paths) {
        let tag = p.rsplit('/').next().unwrap();
        assert_eq!((t.status, t.body.as_str()), (200, body_for(tag).as_str()), "{p}");
    }
    // Every upstream connection here stayed open: only latchkey's reading of
    // `Connection: close` and of HTTP/1.0 without keep-alive kept them out of the pool.
    assert_eq!(conns(&up), [0, 1, 2, 3, 4, 4, 4]);
    assert_eq!(connections(&up), 5);
}

#[test]
fn informational_responses_are_skipped_and_the_final_response_delivered() {
    let (up, lk) = start(script());
    let dump = lk.dir.path().join("headers.txt");
    let paths = ["/early/a", "/early/split-b", "/cl/c", "/early/d"];
    let args: Vec<Vec<String>> = paths
        .iter()
        .map(|p| {
            let mut a = get(p);
            a.extend(["-D".into(), dump.display().to_string()]);
            a
        })
        .collect();
    let got = run(&lk, &args);
    for (t, p) in got.iter().zip(paths) {
        let tag = p.rsplit('/').next().unwrap();
        assert_eq!((t.status, t.body.as_str()), (200, body_for(tag).as_str()), "{p}");
    }
    let headers = std::fs::read_to_string(&dump).unwrap();
    assert!(headers.to_ascii_lowercase().contains("x-tag: d"), "the final head: {headers}");
    assert!(!headers.contains(" 103 ") && !headers.contains(" 100 "), "1xx not passed on: {headers}");
    assert_eq!(conns(&up), [0, 0, 0, 0], "1xx heads consumed exactly: the connection reused");
}

#[test]
fn no_body_is_read_after_204_304_or_head_and_the_next_request_gets_its_own_answer() {
    let (up, lk) = start(script());
    let head = vec!["--http1.1".to_string(), "-I".into(), format!("{HOST}/head")];
    let got = run(&lk, &[get("/204"), get("/cl/a"), get("/304"), get("/cl/b"), head, get("/cl/c")]);
    assert_eq!(statuses(&got), [204, 200, 304, 200, 200, 200], "{got:?}");
    for (i, tag) in [(1, "a"), (3, "b"), (5, "c")] {
        assert!(got[i].body == body_for(tag), "the answer after a bodiless one is its own: {:?}", got[i]);
    }
    assert!(got[0].body.is_empty() && got[2].body.is_empty(), "{got:?}");
    assert!(got[4].body.to_ascii_lowercase().contains("content-length: 100"), "HEAD's head: {:?}", got[4]);
    assert_eq!(got.iter().map(|t| t.connects).sum::<u32>(), 1, "one client connection");
    assert_eq!(conns(&up), [0; 6], "one upstream connection for all six");
    assert_eq!(up.requests()[4].method, "HEAD");
}

#[test]
fn bytes_past_a_response_keep_its_connection_out_of_the_pool() {
    let (up, lk) = start(script());
    // A 204 followed by the 5 bytes its bogus length names, and a response followed by
    // a second one nobody asked for: each connection is dropped, never handed on.
    let got = get_all(&lk, &["/204-body", "/cl/a", "/stray", "/cl/b"]);
    assert_eq!(statuses(&got), [204, 200, 200, 200], "{got:?}");
    assert_eq!(got[2].body, "hello");
    assert!(got[1].body == body_for("a") && got[3].body == body_for("b"), "never the stray bytes: {got:?}");
    assert_eq!(conns(&up), [0, 1, 1, 2]);

    // Stray bytes that come once the connection is idle in the pool.
    let got = get_all(&lk, &["/stray-later"]);
    assert_eq!((got[0].status, got[0].body.as_str()), (200, "hello"));
    std::thread::sleep(Duration::from_millis(300));
    let got = get_all(&lk, &["/cl/c"]);
    assert!(got[0].status == 200 && got[0].body == body_for("c"), "not the forged answer: {got:?}");
    assert_eq!(conns(&up), [0, 1, 1, 2, 2, 3], "the connection with stray bytes was not reused");
    assert_eq!(connections(&up), 4);
}

/// A 502 of latchkey's own: its body starts with `latchkey: `.
fn assert_latchkey_502(t: &Transfer, what: &str) {
    assert_eq!(t.status, 502, "{what}: {t:?}");
    assert!(t.body.starts_with("latchkey: "), "{what}: in latchkey's words: {t:?}");
}

#[test]
fn conflicting_content_lengths_are_a_502_and_that_connection_is_dropped() {
    let (up, lk) = start(script());
    let got = get_all(&lk, &["/two-lengths", "/cl/a"]);
    assert_latchkey_502(&got[0], "Content-Length 5 and 6");
    assert!(got[1].status == 200 && got[1].body == body_for("a"), "{got:?}");
    assert_eq!(conns(&up), [0, 1]);
}

#[test]
fn chunked_with_a_content_length_is_read_as_chunked_and_the_connection_not_reused() {
    let (up, lk) = start(script());
    let got = get_all(&lk, &["/te-and-cl5", "/cl/a"]);
    assert_eq!((got[0].status, got[0].body.as_str()), (200, "hello"), "decoded as chunked: {got:?}");
    assert!(got[1].status == 200 && got[1].body == body_for("a"), "{got:?}");
    // The connection stayed open upstream: only latchkey's reading kept it out.
    assert_eq!(conns(&up), [0, 1], "a response framed two ways leaves its connection untrusted");

    // A length that is not the decoded size: the body by its coding, never 3 bytes of it.
    let got = get_all(&lk, &["/te-and-cl", "/cl/b"]);
    assert_eq!((got[0].status, got[0].body.as_str()), (200, "hello"), "{got:?}");
    assert!(got[1].status == 200 && got[1].body == body_for("b"), "{got:?}");
    // `/cl/a` left its connection fit: `/te-and-cl` went on it, and took it out of the pool.
    assert_eq!(conns(&up), [0, 1, 1, 2], "each response framed two ways leaves its connection untrusted");
}

/// RFC 9112 §6.3: an intermediary forwarding a response with both headers removes the
/// `Content-Length`. Kept (as it was), the client's copy was framed as 3 bytes with 5 to
/// send: the client got nothing at all (curl: 52, empty reply; HTTP/2 clients no
/// response either), on the own client and on hyper's alike.
#[test]
fn chunked_with_a_content_length_reaches_the_client_as_its_chunked_body() {
    let (_up, lk) = start(script());
    let post = vec!["--http1.1".to_string(), "-d".into(), "x".into(), format!("{HOST}/te-and-cl")];
    let h2 = vec!["--http2".to_string(), format!("{HOST}/te-and-cl")];
    let got = run(&lk, &[get("/te-and-cl"), post, h2]);
    for t in &got {
        assert_eq!((t.status, t.body.as_str()), (200, "hello"), "decoded as chunked, the length ignored");
    }
}

#[test]
fn a_101_to_a_plain_get_is_a_502() {
    let (up, lk) = start(script());
    let got = get_all(&lk, &["/switch", "/cl/a"]);
    assert_latchkey_502(&got[0], "101 to a GET without Upgrade");
    assert!(got[1].status == 200 && got[1].body == body_for("a"), "{got:?}");
    assert_eq!(conns(&up), [0, 1]);
}

#[test]
fn an_idle_connection_the_upstream_closed_is_replaced_not_answered_with_a_502() {
    // Each connection closes 100 ms after its first answer, without saying so.
    let (up, lk) =
        start(Arc::new(|_: &KeptRequest| Reply::close(with_length("a"), Duration::from_millis(100))));
    for i in 0..3 {
        let got = get_all(&lk, &["/x"]);
        assert!(got[0].status == 200 && got[0].body == body_for("a"), "request {i}: {got:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(conns(&up), [0, 1, 2]);

    // Closed as the request arrives (nothing answered): a GET is sent again on a new
    // connection.
    let (up, lk) = start(Arc::new(|req: &KeptRequest| match req.index {
        0 => Reply::keep(with_length("a")),
        _ => Reply::close(Vec::new(), Duration::ZERO),
    }));
    let got = get_all(&lk, &["/one", "/two", "/three"]);
    assert_eq!(statuses(&got), [200, 200, 200], "{got:?}");
    assert!(got.iter().all(|t| t.body == body_for("a")));
    let paths: Vec<(usize, String)> = up.requests().iter().map(|s| (s.conn, s.path.clone())).collect();
    let want = [(0, "/one"), (0, "/two"), (1, "/two"), (1, "/three"), (2, "/three")];
    assert_eq!(paths, want.map(|(c, p)| (c, p.to_string())), "each retried once, on a new connection");
}

#[test]
fn a_bodiless_post_on_a_connection_closed_under_it_is_not_sent_twice() {
    let (up, lk) = start(Arc::new(|req: &KeptRequest| match req.index {
        0 => Reply::keep(with_length("a")),
        _ => Reply::close(Vec::new(), Duration::ZERO),
    }));
    let post = vec!["--http1.1".to_string(), "-X".into(), "POST".into(), format!("{HOST}/post")];
    let got = run(&lk, &[get("/one"), post]);
    assert_eq!(got[0].status, 200);
    assert_latchkey_502(&got[1], "a POST the upstream may have seen");
    let seen: Vec<(usize, String, String)> =
        up.requests().iter().map(|s| (s.conn, s.method.clone(), s.path.clone())).collect();
    assert_eq!(seen, [(0, "GET".into(), "/one".into()), (0, "POST".into(), "/post".into())]);
}

/// curl through latchkey: (exit code, status, body and stderr).
fn curl_raw(lk: &Latchkey, args: &[&str]) -> (i32, u16, String) {
    let (exit, got, stderr) = curl_many(lk, &[args]);
    match got.first() {
        Some(t) => (exit, t.status, format!("{}{stderr}", t.body)),
        None => (exit, 0, stderr),
    }
}

#[test]
fn a_body_cut_short_is_an_aborted_transfer_never_a_complete_short_one() {
    let (up, lk) = start(script());
    for (path, http) in [
        ("/cut-cl", "--http1.1"),
        ("/cut-chunked", "--http1.1"),
        ("/cut-cl", "--http2"),
        ("/cut-chunked", "--http2"),
    ] {
        let (exit, status, text) = curl_raw(&lk, &[http, &format!("{HOST}{path}")]);
        assert!(
            exit != 0 && (status == 200 || status == 0),
            "{path} {http}: the client sees the body cut off (curl exit {exit}, status {status}): {text}"
        );
    }
    let got = get_all(&lk, &["/cl/a"]);
    assert!(got[0].status == 200 && got[0].body == body_for("a"), "{got:?}");
    // Each cut connection is spent; the h1 and h2 clients' pools dial one each after.
    assert_eq!(connections(&up), 5);
}

#[test]
fn a_request_with_a_body_after_bodiless_ones_goes_over_the_same_upstream_connection() {
    let (up, lk) = start(script());
    let post = |data: &str| {
        vec!["--http1.1".to_string(), "--data-binary".into(), data.into(), format!("{HOST}/echo")]
    };
    let got = run(
        &lk,
        &[get("/cl/a"), get("/cl/b"), post("first upload"), get("/cl/c"), post("second"), get("/cl/d")],
    );
    assert_eq!(statuses(&got), [200; 6], "{got:?}");
    let bodies: Vec<String> = got.iter().map(|t| t.body.clone()).collect();
    let (a, b, c, d) = (body_for("a"), body_for("b"), body_for("c"), body_for("d"));
    assert_eq!(bodies, [a, b, "got: first upload".into(), c, "got: second".into(), d]);
    assert_eq!(conns(&up), [0; 6], "bodiless and bodied requests alternate on one upstream connection");
    let seen = up.requests();
    assert_eq!((seen[2].method.as_str(), &seen[2].body[..]), ("POST", &b"first upload"[..]));
}

// Requests with a body of known length (Content-Length) go by the own client too: the
// body goes up while the response head is awaited; an answer that comes before the
// whole body was written leaves the rest to go up from a task of its own, and that
// connection is never pooled again.

/// `n` bytes, not all alike (a byte dropped, doubled or moved would show), from `seed`.
fn payload(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add((i / 251) as u8).wrapping_add(seed)).collect()
}

/// A body's length and SHA-256, as the upstreams here answer them.
fn digest(data: &[u8]) -> String {
    let sum = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    format!("{} {}", data.len(), hex::encode(sum.as_ref()))
}

/// An upstream that reads each request's body whole (by its Content-Length), then
/// answers with its method, length and SHA-256, keeping the connection.
fn hashing() -> KeepaliveScript {
    Arc::new(|req: &KeptRequest| {
        let body = format!("{} {}", req.method, digest(&req.body));
        Reply::keep(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len()))
    })
}

/// Write `data` to a file of `lk`'s directory; `@path` for curl's `--data-binary`.
fn body_file(lk: &Latchkey, name: &str, data: &[u8]) -> String {
    let path = lk.dir.path().join(name);
    std::fs::write(&path, data).unwrap();
    format!("@{}", path.display())
}

/// curl arguments: `method` with the body in `file` (`@path`), to `path` on HOST.
fn upload(http: &str, method: &str, file: &str, path: &str) -> Vec<String> {
    [http, "-X", method, "--data-binary", file, &format!("{HOST}{path}")].map(String::from).to_vec()
}

#[test]
fn posts_of_10_bytes_100_kib_and_3_mib_arrive_byte_exact_and_share_one_upstream_connection() {
    let (up, lk) = start(hashing());
    let bodies = [payload(10, 1), payload(100 * 1024, 2), payload(3 << 20, 3)];
    let files: Vec<String> =
        bodies.iter().enumerate().map(|(i, b)| body_file(&lk, &format!("b{i}"), b)).collect();
    // Each size twice, interleaved: a connection left one byte off by an upload would
    // turn the next answer into garbage.
    let order = [0, 1, 2, 0, 2, 1];
    let h1: Vec<Vec<String>> =
        order.iter().map(|&i| upload("--http1.1", "POST", &files[i], "/post")).collect();
    let got = run(&lk, &h1);
    for (t, &i) in got.iter().zip(&order) {
        assert_eq!((t.status, t.body.as_str()), (200, format!("POST {}", digest(&bodies[i])).as_str()));
    }
    assert_eq!(got.iter().map(|t| t.connects).sum::<u32>(), 1, "one client connection: {got:?}");
    assert_eq!(conns(&up), [0; 6], "every upload on the first upstream connection");
    for (seen, &i) in up.requests().iter().zip(&order) {
        assert!(
            seen.body == bodies[i],
            "byte-exact upstream: {} bytes for {}",
            seen.body.len(),
            bodies[i].len()
        );
        assert_eq!(seen.header_all("content-length"), [bodies[i].len().to_string()]);
        assert_eq!(seen.header_all("x-api-key"), [SECRET], "injected on each");
    }

    // HTTP/2 clients' uploads (DATA frames, a content-length) go by the own client too.
    let h2: Vec<Vec<String>> = order.iter().map(|&i| upload("--http2", "POST", &files[i], "/post")).collect();
    let got = run(&lk, &h2);
    for (t, &i) in got.iter().zip(&order) {
        assert_eq!((t.status, t.body.as_str()), (200, format!("POST {}", digest(&bodies[i])).as_str()), "h2");
    }
    assert_eq!(conns(&up)[6..], [1; 6], "one more upstream connection, for the h2 clients' pool");
    assert!(up.requests()[6..].iter().zip(&order).all(|(s, &i)| s.body == bodies[i]));
    assert_eq!(connections(&up), 2);
}

#[test]
fn a_mixed_get_post_put_delete_sequence_shares_one_upstream_connection() {
    let (up, lk) = start(hashing());
    let (small, mid, big) = (payload(10, 7), payload(100 * 1024, 8), payload(3 << 20, 9));
    let (fs, fm, fb) = (body_file(&lk, "s", &small), body_file(&lk, "m", &mid), body_file(&lk, "b", &big));
    let get = |p: &str| vec!["--http1.1".to_string(), format!("{HOST}{p}")];
    let transfers = [
        get("/one"),
        upload("--http1.1", "POST", &fs, "/two"),
        upload("--http1.1", "PUT", &fm, "/three"),
        upload("--http1.1", "DELETE", &fs, "/four"),
        get("/five"),
        upload("--http1.1", "PATCH", &fb, "/six"),
        get("/seven"),
        upload("--http1.1", "DELETE", &fm, "/eight"),
    ];
    let want: [(&str, &[u8]); 8] = [
        ("GET", b""),
        ("POST", &small),
        ("PUT", &mid),
        ("DELETE", &small),
        ("GET", b""),
        ("PATCH", &big),
        ("GET", b""),
        ("DELETE", &mid),
    ];
    let got = run(&lk, &transfers);
    for (t, (method, body)) in got.iter().zip(want) {
        assert_eq!((t.status, t.body.as_str()), (200, format!("{method} {}", digest(body)).as_str()));
    }
    let seen: Vec<(usize, String, usize)> =
        up.requests().iter().map(|s| (s.conn, s.method.clone(), s.body.len())).collect();
    let expect: Vec<(usize, String, usize)> = want.iter().map(|(m, b)| (0, m.to_string(), b.len())).collect();
    assert_eq!(seen, expect, "all eight on one upstream connection, each body whole");
    assert_eq!(connections(&up), 1);
}

/// Read up to `want` body bytes into `into`; `false`: the connection ended first.
async fn read_body(s: &mut RawStream, into: &mut Vec<u8>, want: usize) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 16 * 1024];
    while into.len() < want {
        let take = buf.len().min(want - into.len());
        match s.read(&mut buf[..take]).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => into.extend_from_slice(&buf[..n]),
        }
    }
    true
}

async fn write(s: &mut RawStream, bytes: &[u8]) -> bool {
    use tokio::io::AsyncWriteExt;
    s.write_all(bytes).await.is_ok() && s.flush().await.is_ok()
}

/// The by-hand upstream, by path. Every request is logged (to `Upstream::seen`) with
/// the body bytes it read: fewer than its Content-Length when the upload ended first.
/// - `/duplex`: `200`, chunked, right after the head; then the body echoed back a chunk
///   for each read as it is read (full duplex). A body cut short: closed without the
///   last chunk.
/// - `/answer-and-stall`: `200` right after the head, then nothing read for 8 s, then
///   the rest read; logged once the connection ends, if within 5 s more.
/// - `/reject`: `413` with `Connection: close` after the head, nothing of the body read;
///   then the write side closed and the body read and thrown away (a lingering close).
/// - `/reject-now`: the same `413`, then closed at once, the body unread.
/// - `/continue`: `100 Continue` after the head, then as any other path.
/// - any other: the body read whole, then its method, length and SHA-256 as the
///   answer, and the next request on the connection.
fn by_hand() -> RawServe {
    Arc::new(|c: RawConn| Box::pin(serve_by_hand(c)))
}

async fn serve_by_hand(RawConn { conn, mut stream, seen }: RawConn) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = &mut stream;
    while let Some(mut req) = read_request_head(s, conn).await {
        let length: usize = req.header_all("content-length").first().map_or(0, |v| v.parse().unwrap());
        match req.path.as_str() {
            "/duplex" => {
                if !write(s, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").await {
                    return;
                }
                let mut whole = true;
                let mut buf = vec![0u8; 16 * 1024];
                while req.body.len() < length {
                    // What one read gives, echoed at once.
                    let take = buf.len().min(length - req.body.len());
                    let piece = match s.read(&mut buf[..take]).await {
                        Ok(0) | Err(_) => &[][..],
                        Ok(n) => &buf[..n],
                    };
                    req.body.extend_from_slice(piece);
                    let chunk = [format!("{:x}\r\n", piece.len()).as_bytes(), piece, b"\r\n"].concat();
                    if piece.is_empty() || !write(s, &chunk).await {
                        whole = false;
                        break;
                    }
                }
                seen.lock().unwrap().push(req);
                if !whole || !write(s, b"0\r\n\r\n").await {
                    return;
                }
            }
            "/answer-early" => {
                // Answered before a byte of the body is read, the connection kept open;
                // the request is logged when the upload's end is seen, whole or not.
                if !write(s, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly").await {
                    return;
                }
                let chunked = !req.header_all("transfer-encoding").is_empty();
                let want = if chunked { usize::MAX } else { length };
                let _ =
                    tokio::time::timeout(Duration::from_secs(30), read_body(s, &mut req.body, want)).await;
                seen.lock().unwrap().push(req);
                return;
            }
            "/answer-and-stall" => {
                // Answered at once, then nothing read for 8 s (a sender's writes block),
                // then read to the connection's end: logged only if it ended within 5 s.
                if !write(s, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly").await {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(8)).await;
                let drained = read_body(s, &mut req.body, usize::MAX);
                if tokio::time::timeout(Duration::from_secs(5), drained).await.is_ok() {
                    seen.lock().unwrap().push(req);
                }
                return;
            }
            "/reject" | "/reject-now" => {
                let now = req.path == "/reject-now";
                seen.lock().unwrap().push(req);
                let answer = b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\nContent-Length: 9\r\n\r\ntoo large";
                if !write(s, answer).await || now {
                    return;
                }
                let _ = s.shutdown().await;
                let mut sink = Vec::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), read_body(s, &mut sink, usize::MAX)).await;
                return;
            }
            path => {
                if path == "/continue" && !write(s, b"HTTP/1.1 100 Continue\r\n\r\n").await {
                    return;
                }
                let whole = read_body(s, &mut req.body, length).await;
                let answer = format!("{} {}", req.method, digest(&req.body));
                seen.lock().unwrap().push(req);
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", answer.len());
                if !whole || !write(s, (head + &answer).as_bytes()).await {
                    return;
                }
            }
        }
    }
}

/// Each request the upstream logged as `connection path`, in order.
fn trail(up: &Upstream) -> Vec<String> {
    up.requests().iter().map(|s| format!("{} {}", s.conn, s.path)).collect()
}

fn start_by_hand() -> (Upstream, Latchkey) {
    let up = raw_upstream(by_hand());
    let lk = Latchkey::start(Some(&up), CRED, ENV);
    (up, lk)
}

/// The upstream's log once it holds `n` requests (a request cut short is logged when
/// the upstream sees its end, which may be after the client is done).
fn wait_requests(up: &Upstream, n: usize) -> Vec<Seen> {
    wait_requests_within(up, n, Duration::from_secs(5))
}

fn wait_requests_within(up: &Upstream, n: usize, within: Duration) -> Vec<Seen> {
    let started = std::time::Instant::now();
    while started.elapsed() < within {
        if up.count() >= n {
            return up.requests();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the upstream logged {} requests, not {n}: {:?}", up.count(), trail(up));
}

/// TCP connections established to `port` on this machine (`ss`: the connecting ends).
fn established_to(port: u16) -> usize {
    let filter = format!("( dport = :{port} )");
    let out =
        Command::new("ss").args(["-Htn", "state", "established", &filter]).output().expect("ss (iproute2)");
    assert!(out.status.success(), "ss: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn a_4_mib_upload_echoed_back_as_the_upstream_reads_it_arrives_whole_and_its_connection_is_not_reused() {
    let (up, lk) = start_by_hand();
    let body = payload(4 << 20, 5);
    let file = body_file(&lk, "up", &body);
    let echo = lk.dir.path().join("echo");
    // curl sends `Expect: 100-continue` for a body this big (latchkey's hyper server
    // side); without it, the own HTTP/1.1 server side; and HTTP/2. Paced (~50 MB/s),
    // the upload is still going when the answer comes, always: the answer-first path.
    // Unpaced, latchkey may write the whole body before it reads the answer.
    let paced = ["--limit-rate", "50M"];
    for (what, client) in [
        ("HTTP/1.1, Expect", vec!["--http1.1"]),
        ("HTTP/1.1, no Expect", vec!["--http1.1", "-H", "Expect:"]),
        ("HTTP/2", vec!["--http2"]),
        ("HTTP/1.1, unpaced", vec!["--http1.1"]),
        ("HTTP/2, unpaced", vec!["--http2"]),
    ] {
        let _ = std::fs::remove_file(&echo);
        let mut duplex: Vec<String> = client.iter().map(|a| a.to_string()).collect();
        if !what.ends_with("unpaced") {
            duplex.extend(paced.map(String::from));
        }
        duplex.extend(["--data-binary".into(), file.clone(), "-o".into(), echo.display().to_string()]);
        duplex.push(format!("{HOST}/duplex"));
        let after = vec![client[0].to_string(), format!("{HOST}/after")];
        let started = std::time::Instant::now();
        let got = run(&lk, &[duplex, after]);
        let took = started.elapsed();
        assert_eq!(statuses(&got), [200, 200], "{what}: {got:?}");
        let echoed = std::fs::read(&echo).unwrap_or_default();
        assert!(echoed == body, "{what}: the echo whole and byte-exact, got {} bytes", echoed.len());
        assert_eq!(got[1].body, format!("GET {}", digest(b"")), "{what}");
        assert!(took < Duration::from_secs(8), "{what}: no stall, took {took:?}");
        let seen = up.requests();
        let [.., duplex, after] = &seen[..] else { panic!("{what}: {seen:?}") };
        assert!(duplex.path == "/duplex" && duplex.body == body, "{what}: the upstream read it all");
        if !what.ends_with("unpaced") {
            // The duplex exchange's connection is spent: the request after it dials anew.
            assert_eq!(after.conn, connections(&up) - 1, "{what}: {:?}", trail(&up));
            assert!(after.conn > duplex.conn, "{what}: {:?}", trail(&up));
        }
    }
    // The h1 clients' pool keeps the connection each `/after` used; the h2 clients'
    // pool starts empty.
    assert_eq!(trail(&up)[..6], ["0 /duplex", "1 /after", "1 /duplex", "2 /after", "3 /duplex", "4 /after"]);
}

/// Read chunks off `r` (past the response head) until `echo` holds `want` bytes;
/// `false`: the last chunk or the end came first.
fn read_chunks(r: &mut impl std::io::BufRead, echo: &mut Vec<u8>, want: usize) -> bool {
    while echo.len() < want {
        let mut size = String::new();
        if r.read_line(&mut size).unwrap_or(0) == 0 {
            return false;
        }
        let n = usize::from_str_radix(size.trim().split(';').next().unwrap(), 16).unwrap();
        if n == 0 {
            return false;
        }
        let mut chunk = vec![0u8; n + 2];
        r.read_exact(&mut chunk).unwrap();
        assert!(chunk.ends_with(b"\r\n"), "a chunk's end");
        echo.extend_from_slice(&chunk[..n]);
    }
    true
}

/// Read a response head off `r`, lowercased.
fn read_head(r: &mut impl std::io::BufRead) -> String {
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        if r.read_line(&mut head).unwrap_or(0) == 0 {
            break;
        }
    }
    head.to_ascii_lowercase()
}

/// Full duplex without any socket buffer to hide in: the client sends each piece of
/// the upload only once the echo of the one before reached it. A client written that
/// way waits for ever on a proxy that reads the answer only once the upload is done.
#[test]
fn an_upstream_answering_as_it_reads_is_relayed_in_lock_step_with_the_upload() {
    use std::io::{BufRead, Read, Write};
    let (up, lk) = start_by_hand();
    let pieces: Vec<Vec<u8>> = (0..8).map(|i| payload(64 * 1024 + i * 7, i as u8)).collect();
    let total: usize = pieces.iter().map(Vec::len).sum();
    let (tcp, status) = raw::tunnel(lk.port, "api.anthropic.com:443");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut r = std::io::BufReader::new(raw::tls(tcp, "api.anthropic.com"));
    let head = format!("POST /duplex HTTP/1.1\r\nHost: api.anthropic.com\r\nContent-Length: {total}\r\n\r\n");
    r.get_mut().write_all(head.as_bytes()).unwrap();
    let mut echo = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        r.get_mut().write_all(piece).unwrap();
        r.get_mut().flush().unwrap();
        if i == 0 {
            let head = read_head(&mut r);
            assert!(
                head.starts_with("http/1.1 200") && head.contains("transfer-encoding: chunked"),
                "{head}"
            );
        }
        let want = echo.len() + piece.len();
        assert!(
            read_chunks(&mut r, &mut echo, want),
            "piece {i}'s echo before the next piece: {}",
            echo.len()
        );
    }
    assert!(!read_chunks(&mut r, &mut echo, total + 1), "then the last chunk");
    let mut end = String::new();
    r.read_line(&mut end).unwrap();
    assert_eq!(end, "\r\n", "no trailers");
    assert!(echo == pieces.concat(), "byte-exact echo");
    // The client connection goes on; the upstream one does not.
    r.get_mut().write_all(b"GET /after HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n").unwrap();
    let head = read_head(&mut r);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let want = format!("GET {}", digest(b""));
    let mut body = vec![0u8; want.len()];
    r.read_exact(&mut body).unwrap();
    assert_eq!(String::from_utf8_lossy(&body), want);
    assert_eq!(trail(&up), ["0 /duplex", "1 /after"]);
    assert!(up.requests()[0].body == pieces.concat());
}

#[test]
fn an_upstream_refusing_a_2_mib_upload_after_its_head_gets_its_413_to_the_client_and_latchkey_stays_up() {
    let (up, lk) = start_by_hand();
    let file = body_file(&lk, "up", &payload(2 << 20, 6));
    let post = |path: &str| upload("--http1.1", "POST", &file, path);
    let h2 = |path: &str| upload("--http2", "POST", &file, path);
    // The upstream closes its write side and reads the rest of the body away (what
    // nginx does): the client gets the 413 exactly.
    let started = std::time::Instant::now();
    for (what, refused) in [("--http1.1", post("/reject")), ("--http2", h2("/reject"))] {
        let got = run(&lk, &[refused, vec![what.to_string(), format!("{HOST}/cl/a")]]);
        assert_eq!((got[0].status, got[0].body.as_str()), (413, "too large"), "{what}: {got:?}");
        assert_eq!((got[1].status, got[1].body.as_str()), (200, format!("GET {}", digest(b"")).as_str()));
    }
    // The upstream closes at once, the body unread: its kernel resets the connection
    // while latchkey still writes the body, and whether the 413 is read before the
    // reset is a race. The client gets the 413 or latchkey's 502, at once, never a hang.
    for http in ["--http1.1", "--http2"] {
        let got = run(
            &lk,
            &[upload(http, "POST", &file, "/reject-now"), vec![http.into(), format!("{HOST}/cl/b")]],
        );
        let (status, body) = (got[0].status, got[0].body.as_str());
        assert!(
            (status, body) == (413, "too large") || (status == 502 && body.starts_with("latchkey: ")),
            "{got:?}"
        );
        assert_eq!((got[1].status, got[1].body.as_str()), (200, format!("GET {}", digest(b"")).as_str()));
    }
    assert!(started.elapsed() < Duration::from_secs(8), "no stall: {:?}", started.elapsed());
    // Each refusing connection is spent; `/reject-now` went on the connection `/cl/a`
    // left in its pool.
    let want = [
        "0 /reject",
        "1 /cl/a",
        "2 /reject",
        "3 /cl/a",
        "1 /reject-now",
        "4 /cl/b",
        "3 /reject-now",
        "5 /cl/b",
    ];
    assert_eq!(trail(&up), want, "never reused after a 413");
    assert!(up.requests().iter().all(|s| s.body.is_empty()));
}

/// A request through a CONNECT tunnel to HOST, by hand: TLS (no ALPN: HTTP/1.1).
fn by_hand_client(lk: &Latchkey) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let (tcp, status) = raw::tunnel(lk.port, "api.anthropic.com:443");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    raw::tls(tcp, "api.anthropic.com")
}

/// Read off `s` until `what` has been read (or the stream ends); all that was read.
fn read_until(s: &mut impl std::io::Read, what: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.windows(what.len()).any(|w| w == what) {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}

#[test]
fn an_upload_the_client_abandons_never_reaches_the_upstream_whole_and_latchkey_stays_up() {
    use std::io::Write;
    let (up, lk) = start_by_hand();
    let sent = payload(1000, 4);
    let head = |path: &str| {
        format!("POST {path} HTTP/1.1\r\nHost: api.anthropic.com\r\nContent-Length: 100000\r\n\r\n")
    };

    // The upstream waits for the whole body before it answers: the upload fails before
    // any answer, and the upstream connection is dropped under it.
    let mut tls = by_hand_client(&lk);
    tls.write_all(&[head("/hash").as_bytes(), &sent].concat()).unwrap();
    tls.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(tls);
    let seen = wait_requests(&up, 1);
    assert_eq!(seen[0].header_all("content-length"), ["100000"]);
    assert!(seen[0].body == sent, "the 1000 bytes sent, then the end: {} bytes", seen[0].body.len());
    let got = get_all(&lk, &["/after"]);
    assert_eq!((got[0].status, got[0].body.as_str()), (200, format!("GET {}", digest(b"")).as_str()));

    // The upstream answered at once and echoes as it reads: the rest of the upload was
    // going up from a task of its own when the client left. It ends the upload: the
    // upstream sees the body end at 1000 bytes, not a connection held open.
    let mut tls = by_hand_client(&lk);
    tls.write_all(&[head("/duplex").as_bytes(), &sent].concat()).unwrap();
    tls.flush().unwrap();
    let answer = read_until(&mut tls, b"\r\n\r\n");
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
    drop(tls);
    let seen = wait_requests(&up, 3);
    assert!(seen[2].body == sent, "the 1000 bytes sent, then the end: {} bytes", seen[2].body.len());
    let got = get_all(&lk, &["/after"]);
    assert_eq!((got[0].status, got[0].body.as_str()), (200, format!("GET {}", digest(b"")).as_str()));
    assert_eq!(trail(&up), ["0 /hash", "1 /after", "1 /duplex", "2 /after"], "neither cut connection reused");
}

/// An upstream that answered at once goes on reading the upload; a client that then
/// sends nothing more must not hold that upstream connection (and its own) for ever:
/// the rest of the upload gets `[proxy] timeout`, as a held body does.
#[test]
fn the_rest_of_an_upload_after_an_early_answer_is_bounded_in_time() {
    use std::io::{Read, Write};
    let up = raw_upstream(by_hand());
    let lk = Latchkey::start(Some(&up), &format!("timeout = 2\n#END-PROXY\n{CRED}"), ENV);
    let sent = payload(1000, 6);
    // A body of known length, and a chunked one (both by the own client).
    let length = [&b"Content-Length: 100000\r\n\r\n"[..], &sent].concat();
    let chunked = [&b"Transfer-Encoding: chunked\r\n\r\n3e8\r\n"[..], &sent, b"\r\n"].concat();
    // The upstream reads the chunked body as bytes: the one chunk (its size line and
    // end, 7 bytes of framing in all), and no last one.
    let cases = [("length", length, 0), ("chunked", chunked, 7)];
    for (i, (what, framing, framed)) in cases.iter().enumerate() {
        let mut tls = by_hand_client(&lk);
        let head = "POST /answer-early HTTP/1.1\r\nHost: api.anthropic.com\r\n";
        tls.write_all(&[head.as_bytes(), framing].concat()).unwrap();
        tls.flush().unwrap();
        let answer = read_until(&mut tls, b"early");
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{what}: {}", String::from_utf8_lossy(&answer));
        // The client stalls, its connection open. Within the timeout (and the poll's
        // 5 s), the upstream sees the upload end short.
        let started = std::time::Instant::now();
        let seen = wait_requests(&up, i + 1);
        let got = &seen[i].body;
        let whole = got.len() == sent.len() + framed && got.windows(sent.len()).any(|w| w == sent);
        assert!(whole, "{what}: what was sent, then the end: {}", String::from_utf8_lossy(got));
        assert!(started.elapsed() < Duration::from_secs(5), "{what}: {:?}", started.elapsed());
        // And the stalled client's connection is let go too.
        tls.sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let ended = tls.read_to_end(&mut Vec::new());
        let waited = |e: &std::io::Error| {
            matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
        };
        assert!(!ended.as_ref().is_err_and(waited), "{what}: the client's connection still open: {ended:?}");
    }
    let got = get_all(&lk, &["/after"]);
    assert_eq!((got[0].status, got[0].body.as_str()), (200, format!("GET {}", digest(b"")).as_str()));
}

/// An upstream that answers at once and then stops reading the upload must not hold
/// the upload, the client's connection and its own for ever: `[proxy] timeout` after
/// the answer latchkey lets go of both (the upstream sees its connection end), for a
/// body of known length and a chunked one alike. (Chunked uploads went by hyper's
/// client, whose connection task stayed blocked on the write, untimed.)
#[test]
fn an_upstream_that_answers_and_stops_reading_an_upload_is_let_go() {
    use std::io::{Read, Write};
    let up = raw_upstream(by_hand());
    let lk = Latchkey::start(Some(&up), &format!("timeout = 2\n#END-PROXY\n{CRED}"), ENV);
    let piece = payload(64 * 1024, 9);
    let chunk = [format!("{:x}\r\n", piece.len()).as_bytes(), &piece, b"\r\n"].concat();
    // An HTTP/1.0 client's upload too, its connection kept alive so that it goes on
    // sending (its request goes upstream as HTTP/1.1, by the own client).
    let cases = [
        ("length", "HTTP/1.1", "Content-Length: 1000000000\r\n", piece.clone()),
        ("chunked", "HTTP/1.1", "Transfer-Encoding: chunked\r\n", chunk),
        ("HTTP/1.0", "HTTP/1.0", "Connection: keep-alive\r\nContent-Length: 1000000000\r\n", piece.clone()),
    ];
    let waited = |e: &std::io::Error| {
        matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
    };
    for (i, (what, version, framing, unit)) in cases.iter().enumerate() {
        let mut tls = by_hand_client(&lk);
        let head = format!("POST /answer-and-stall {version}\r\nHost: api.anthropic.com\r\n{framing}\r\n");
        tls.write_all(&[head.as_bytes(), unit].concat()).unwrap();
        tls.flush().unwrap();
        let answer = read_until(&mut tls, b"early");
        let ok = format!("{version} 200 ");
        assert!(answer.starts_with(ok.as_bytes()), "{what}: {}", String::from_utf8_lossy(&answer));
        // The client goes on sending for as long as latchkey takes it.
        tls.sock.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
        tls.sock.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        let answered = std::time::Instant::now();
        let ended = loop {
            if answered.elapsed() > Duration::from_secs(15) {
                panic!("{what}: the client's connection still open 15 s after the answer");
            }
            let wrote = tls.write_all(unit);
            let read = tls.read(&mut [0u8; 1024]);
            if wrote.is_err_and(|e| !waited(&e)) || matches!(read, Ok(0)) || read.is_err_and(|e| !waited(&e))
            {
                break answered.elapsed();
            }
        };
        assert!(ended < Duration::from_secs(6), "{what}: let go only after {ended:?}");
        // latchkey's end of the upstream connection is closed while the upstream still
        // reads nothing (it could not see a close it does not read).
        while established_to(up.addr.port()) > 0 {
            let held = answered.elapsed();
            assert!(
                held < Duration::from_secs(6),
                "{what}: the upstream connection held {held:?} after the answer"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let seen = wait_requests_within(&up, i + 1, Duration::from_secs(15));
        assert_eq!(seen[i].path, "/answer-and-stall", "{what}: the upstream's connection ended");
    }
    let got = get_all(&lk, &["/after"]);
    assert_eq!((got[0].status, got[0].body.as_str()), (200, format!("GET {}", digest(b"")).as_str()));
}

#[test]
fn an_expect_100_continue_upload_is_answered_and_an_upstreams_own_100_is_skipped() {
    let (up, lk) = start_by_hand();
    let body = payload(2 << 20, 11);
    let file = body_file(&lk, "up", &body);
    // curl asks `Expect: 100-continue` for a body over 1 MiB and waits for latchkey's 100.
    let post = |path: &str| {
        let mut a = upload("--http1.1", "POST", &file, path);
        a.insert(0, "-v".into());
        a
    };
    let refs: Vec<Vec<String>> = vec![post("/hash"), post("/continue"), get("/after")];
    let args: Vec<Vec<&str>> = refs.iter().map(|t| t.iter().map(String::as_str).collect()).collect();
    let slices: Vec<&[&str]> = args.iter().map(Vec::as_slice).collect();
    let (exit, got, stderr) = curl_many(&lk, &slices);
    assert_eq!(exit, 0, "{stderr}");
    assert_eq!(stderr.matches("> Expect: 100-continue").count(), 2, "curl asked: {stderr}");
    assert_eq!(stderr.matches("< HTTP/1.1 100 Continue").count(), 2, "latchkey's 100, once each: {stderr}");
    let want = format!("POST {}", digest(&body));
    assert_eq!(statuses(&got), [200, 200, 200], "{got:?}");
    assert_eq!((got[0].body.as_str(), got[1].body.as_str()), (want.as_str(), want.as_str()));
    assert_eq!(got[2].body, format!("GET {}", digest(b"")));
    assert_eq!(got.iter().map(|t| t.connects).sum::<u32>(), 1, "one client connection");
    // The upstream's `100 Continue` came in the middle of the upload and was read as
    // an interim head; the connection stayed in step.
    assert_eq!(trail(&up), ["0 /hash", "0 /continue", "0 /after"]);
    assert!(up.requests()[..2].iter().all(|s| s.body == body));
}

/// Made-up AWS key id and secret in the bundled formats (none is a real credential).
const AWS_ID: &str = "AKIAZ7QWERTY2UIOPLKJ";
const AWS_SECRET: &str = "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";

fn has(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn a_secret_past_hold_bytes_in_a_content_length_upload_is_refused_and_never_reaches_the_upstream() {
    let up = raw_upstream(by_hand());
    let dlp = "[proxy.dlp]\nenabled = true\naction = \"block\"\nhold_bytes = 65536\n#END-PROXY\n";
    let lk = Latchkey::start(Some(&up), &format!("{dlp}{CRED}"), ENV);
    let filler = |n: usize| "lorem ipsum dolor sit amet ".repeat(n / 27);
    let env = format!("AWS_ACCESS_KEY_ID={AWS_ID}\nAWS_SECRET_ACCESS_KEY={AWS_SECRET}\n");
    let body = format!("{}{env}{}", filler(200_000), filler(50_000));
    let file = body_file(&lk, "leak", body.as_bytes());
    let clean = body_file(&lk, "clean", filler(300_000).as_bytes());

    // The upstream waits for the whole body: the refusal comes before any answer.
    let got = run(
        &lk,
        &[upload("--http1.1", "POST", &file, "/hash"), upload("--http1.1", "POST", &clean, "/hash")],
    );
    assert_eq!(got[0].status, 403, "{got:?}");
    assert!(got[0].body.starts_with("latchkey: ") && got[0].body.contains("aws-access-key"), "{got:?}");
    assert_eq!(
        (got[1].status, got[1].body.clone()),
        (200, format!("POST {}", digest(filler(300_000).as_bytes())))
    );
    let seen = wait_requests(&up, 2);
    let cut = &seen[0].body;
    assert!(!has(cut, AWS_ID) && !has(cut, AWS_SECRET), "the upstream got the secret");
    assert!(
        cut.len() >= 65536 && cut.len() < body.len(),
        "the held part went up, then the end: {}",
        cut.len()
    );
    assert!(body.as_bytes().starts_with(cut), "what went up is the body's start");
    assert_eq!(trail(&up), ["0 /hash", "1 /hash"], "the cut connection is not reused");

    // The upstream answers at once and echoes as it reads: the secret comes while the
    // rest of the upload goes up from a task of its own. The upload is cut there.
    use std::io::Write;
    let (first, rest) = (filler(100_000), format!("{}{env}{}", filler(50_000), filler(50_000)));
    let mut tls = by_hand_client(&lk);
    let total = first.len() + rest.len();
    let head = format!("POST /duplex HTTP/1.1\r\nHost: api.anthropic.com\r\nContent-Length: {total}\r\n\r\n");
    tls.write_all(&[head.as_bytes(), first.as_bytes()].concat()).unwrap();
    tls.flush().unwrap();
    let answer = read_until(&mut tls, b"\r\n\r\n");
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "answered before the body ended: {}",
        String::from_utf8_lossy(&answer)
    );
    tls.write_all(rest.as_bytes()).unwrap();
    tls.flush().unwrap();
    let answer = [answer, read_until(&mut tls, b"\r\n0\r\n\r\n")].concat();
    assert!(!answer.ends_with(b"\r\n0\r\n\r\n"), "the echo is cut, never a complete answer");
    let seen = wait_requests(&up, 3);
    let cut = &seen[2].body;
    assert!(!has(cut, AWS_ID) && !has(cut, AWS_SECRET), "the upstream got the secret");
    // What went up stops 16 KiB (the longest match the stream scan holds back) short
    // of what the scan had cleared before the secret came.
    assert!(cut.len() >= first.len() - 16 * 1024 && cut.len() < total, "{} of {total} bytes", cut.len());
    assert!(rest.contains(AWS_ID) && [first.as_bytes(), rest.as_bytes()].concat().starts_with(cut));
    let got = run(&lk, &[upload("--http1.1", "POST", &clean, "/hash")]);
    assert_eq!(got[0].status, 200, "{got:?}");
    assert_eq!(trail(&up), ["0 /hash", "1 /hash", "1 /duplex", "2 /hash"]);
}
