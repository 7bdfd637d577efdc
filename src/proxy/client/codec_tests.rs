//! The client codec's framing, case by case, and differentially against hyper's own
//! HTTP/1.1 client: the same response bytes, fed to both, must give the same head, body,
//! trailers and verdict, except where the codec is stricter on purpose.

use super::*;
use crate::fuzzing::{ClientEnd, ClientRead, client_read};

/// The stream read whole, and a byte at a time, with the same result.
fn read(stream: &[u8], head_request: bool) -> ClientRead {
    let whole = client_read(stream, head_request, &[]);
    let every: Vec<usize> = (1..stream.len()).collect();
    assert_eq!(client_read(stream, head_request, &every), whole, "a byte at a time");
    whole
}

fn failed(stream: &[u8], head_request: bool) -> Malformed {
    match read(stream, head_request).end {
        ClientEnd::Failed(e) => e,
        end => panic!("read: {end:?}"),
    }
}

/// A stream whose body ends: its framing, reusability, body and what is left.
fn done(stream: &[u8], head_request: bool) -> (Framing, bool, Vec<u8>, Vec<u8>) {
    let r = read(stream, head_request);
    let ClientEnd::Done { left } = r.end else { panic!("not done: {:?}", r.end) };
    let head = r.head.expect("a head");
    (head.framing, head.reusable, r.body, left)
}

fn final_head(stream: &[u8], head_request: bool) -> Result<Head, Malformed> {
    let mut buf = BytesMut::from(stream);
    loop {
        match parse_head(&mut buf, head_request)? {
            Parsed::Final(head) => return Ok(head),
            Parsed::Interim => {}
            Parsed::Partial => panic!("partial"),
        }
    }
}

#[test]
fn length_body_leaves_the_next_bytes() {
    let (framing, reusable, body, left) =
        done(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhelloHTTP/1.1 204", false);
    assert_eq!((framing, reusable), (Framing::Length(5), true));
    assert_eq!((&body[..], &left[..]), (&b"hello"[..], &b"HTTP/1.1 204"[..]));
    let (framing, _, body, left) = done(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nx", false);
    assert_eq!((framing, &body[..], &left[..]), (Framing::Length(0), &b""[..], &b"x"[..]));
    let head = final_head(b"HTTP/1.1 404 Gone Away\r\nContent-Length: 0\r\nX-A: 1\r\nx-a: 2\r\n\r\n", false)
        .unwrap();
    assert_eq!(head.response.status(), StatusCode::NOT_FOUND);
    let values: Vec<_> = head.response.headers().get_all("x-a").iter().collect();
    assert_eq!(values, ["1", "2"]);
    let reason = head.response.extensions().get::<hyper::ext::ReasonPhrase>().unwrap();
    assert_eq!(reason.as_bytes(), b"Gone Away");
}

#[test]
fn length_body_cut_short_is_truncated() {
    assert_eq!(failed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhell", false), Malformed::Truncated);
    let r = read(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhell", false);
    assert_eq!(r.body, b"hell");
}

#[test]
fn chunked_with_extensions_and_trailers() {
    let stream = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
        5;a=b\r\nhello\r\n3 ;x=\"q;r\"\r\n, w\r\nA\t;y\r\n0123456789\r\n\
        0;last\r\nX-Checksum: abc\r\nX-More: d\r\n\r\nNEXT";
    let r = read(stream, false);
    assert_eq!(r.body, b"hello, w0123456789");
    let trailers = r.trailers.expect("trailers");
    assert_eq!(trailers, [("x-checksum".into(), b"abc".to_vec()), ("x-more".into(), b"d".to_vec())]);
    assert_eq!(r.end, ClientEnd::Done { left: b"NEXT".to_vec() });
    assert_eq!(r.head.as_ref().map(|h| (h.framing, h.reusable)), Some((Framing::Chunked, true)));
    let (framing, reusable, body, left) =
        done(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nab\r\n000\r\n\r\n", false);
    assert_eq!((framing, reusable, &body[..], &left[..]), (Framing::Chunked, true, &b"ab"[..], &b""[..]));
}

#[test]
fn chunked_cut_short_is_truncated() {
    for stream in [
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel"[..],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: y\r\n",
    ] {
        assert_eq!(failed(stream, false), Malformed::Truncated);
    }
}

#[test]
fn no_length_reads_to_the_close() {
    let (framing, reusable, body, left) = done(b"HTTP/1.1 200 OK\r\n\r\nall of it\r\n\r\nHTTP/1.1", false);
    assert_eq!((framing, reusable), (Framing::Close, false));
    assert_eq!((&body[..], &left[..]), (&b"all of it\r\n\r\nHTTP/1.1"[..], &b""[..]));
    let (framing, _, body, _) = done(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n", false);
    assert_eq!((framing, &body[..]), (Framing::Close, &b""[..]));
}

#[test]
fn interim_heads_are_skipped() {
    let stream =
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\nContent-Length: 9\r\n\r\n\
        HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    let r = read(stream, false);
    assert_eq!(r.interim, 2);
    assert_eq!(r.body, b"ok");
    assert_eq!(r.head.map(|h| h.status), Some(200));
    let mut buf = BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 2"[..]);
    assert!(matches!(parse_head(&mut buf, false), Ok(Parsed::Interim)));
    assert_eq!(&buf[..], b"HTTP/1.1 2");
    assert!(matches!(parse_head(&mut buf, false), Ok(Parsed::Partial)));
    // A stream that ends after its 1xx heads has no response.
    assert_eq!(read(b"HTTP/1.1 100 Continue\r\n\r\n", false).end, ClientEnd::Closed);
}

#[test]
fn switching_protocols_refused() {
    let stream = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
    assert_eq!(failed(stream, false), Malformed::Switch);
    assert_eq!(failed(stream, true), Malformed::Switch);
    assert_eq!(failed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 x\r\n\r\n", false), Malformed::Switch);
}

#[test]
fn no_body_after_204_304_or_head_whatever_the_headers() {
    for (status, head_request) in [(200, true), (204, false), (304, false), (204, true), (404, true)] {
        for fields in [
            "Content-Length: 5\r\n",
            "Transfer-Encoding: chunked\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            "",
        ] {
            let stream = format!("HTTP/1.1 {status} X\r\n{fields}\r\nhello");
            let (framing, reusable, body, left) = done(stream.as_bytes(), head_request);
            assert_eq!((framing, reusable, &body[..]), (Framing::Empty, true, &b""[..]), "{stream:?}");
            assert_eq!(left, b"hello");
        }
    }
    // Even a length that would be refused, or chunked in HTTP/1.0.
    let (framing, ..) =
        done(b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: x\r\n\r\n", true);
    assert_eq!(framing, Framing::Empty);
    let (_, reusable, ..) = done(b"HTTP/1.1 304 Not Modified\r\nConnection: close\r\n\r\n", false);
    assert!(!reusable);
}

#[test]
fn http10_keep_alive_rules() {
    let reusable = |stream: &str| done(stream.as_bytes(), false).1;
    assert!(!reusable("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"), "1.0 closes by default");
    assert!(reusable("HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: Keep-Alive\r\n\r\n"));
    assert!(reusable("HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: foo, keep-alive\r\n\r\n"));
    assert!(!reusable("HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive, close\r\n\r\n"));
    assert!(!reusable(
        "HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n"
    ));
    assert!(!reusable(
        "HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n"
    ));
    assert!(!reusable("HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive2\r\n\r\n"));
    // hyper reads a field only when its value is visible ASCII.
    assert!(!reusable("HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: \u{e9}, keep-alive\r\n\r\n"));
    assert!(reusable("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), "1.1 keeps by default");
    assert!(reusable("HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n"));
    // An HTTP/1.0 response with no length is read to the close whatever it says.
    assert!(!reusable("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\nx"));
}

#[test]
fn connection_close_is_not_reusable() {
    for fields in [
        "Connection: close",
        "connection: CLOSE",
        "Connection: keep-alive, close",
        "Connection: x\r\nConnection: close",
    ] {
        for body in ["Content-Length: 1\r\n\r\nx", "Transfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n"] {
            let stream = format!("HTTP/1.1 200 OK\r\n{fields}\r\n{body}");
            let (_, reusable, got, left) = done(stream.as_bytes(), false);
            assert!(!reusable, "{stream:?}");
            assert_eq!((&got[..], &left[..]), (&b"x"[..], &b""[..]));
        }
    }
    assert!(done(b"HTTP/1.1 200 OK\r\nConnection: closed\r\nContent-Length: 0\r\n\r\n", false).1);
}

#[test]
fn bad_content_lengths_refused() {
    for value in [
        "5\r\nContent-Length: 6",
        "5, 6",
        "5,",
        ",5",
        "",
        "-1",
        "+5",
        "5 5",
        "0x5",
        "5.0",
        "1e3",
        "99999999999999999999",
        "18446744073709551616",
        "184467440737095516150",
    ] {
        let stream = format!("HTTP/1.1 200 OK\r\nContent-Length: {value}\r\n\r\n");
        assert_eq!(failed(stream.as_bytes(), false), Malformed::Length, "{value:?}");
    }
}

#[test]
fn equal_content_lengths_accepted() {
    for value in ["3, 3", "3,3,3", " 3 ", "3\r\nContent-Length: 3", "3,\t3\r\ncontent-length: 3", "0003"] {
        let stream = format!("HTTP/1.1 200 OK\r\nContent-Length: {value}\r\n\r\nabcdef");
        let (framing, reusable, body, left) = done(stream.as_bytes(), false);
        assert_eq!((framing, reusable), (Framing::Length(3), true), "{value:?}");
        assert_eq!((&body[..], &left[..]), (&b"abc"[..], &b"def"[..]));
    }
    let stream = b"HTTP/1.1 200 OK\r\nContent-Length: 9999999999999999999\r\n\r\nab";
    assert_eq!(final_head(stream, false).unwrap().framing, Framing::Length(9_999_999_999_999_999_999));
}

#[test]
fn transfer_coding_not_ending_in_chunked_reads_to_the_close() {
    for te in [
        "chunked, gzip",
        "gzip",
        "identity",
        "chunked\r\nTransfer-Encoding: gzip",
        "",
        "chunkedx",
        "\u{e9}, chunked",
    ] {
        let stream =
            format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: {te}\r\nContent-Length: 2\r\n\r\n0\r\n\r\n");
        let (framing, reusable, body, _) = done(stream.as_bytes(), false);
        assert_eq!((framing, reusable, &body[..]), (Framing::Close, false, &b"0\r\n\r\n"[..]), "{te:?}");
    }
    let (framing, ..) = done(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: CHUNKED\r\n\r\n0\r\n\r\n",
        false,
    );
    assert_eq!(framing, Framing::Chunked);
}

#[test]
fn transfer_coding_and_length_read_chunked_but_not_reused() {
    let stream = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\nrest";
    let (framing, reusable, body, left) = done(stream, false);
    assert_eq!((framing, reusable), (Framing::Chunked, false));
    assert_eq!((&body[..], &left[..]), (&b"ab"[..], &b"rest"[..]));
    // Even a length that would be refused alone.
    let stream = b"HTTP/1.1 200 OK\r\nContent-Length: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    assert_eq!(done(stream, false).0, Framing::Chunked);
}

#[test]
fn transfer_coding_in_http10_refused() {
    for te in ["chunked", "gzip"] {
        let stream = format!("HTTP/1.0 200 OK\r\nTransfer-Encoding: {te}\r\n\r\n0\r\n\r\n");
        assert_eq!(failed(stream.as_bytes(), false), Malformed::OldChunked);
    }
}

const CHUNKED: &str = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";

#[test]
fn chunk_size_overflow() {
    for line in [
        "10000000000000000",
        "00000000000000001",
        "fffffffffffffffff",
        "",
        "x",
        " 1",
        "-1",
        "0x1",
        "1 2",
        "1;a\rb",
    ] {
        let stream = format!("{CHUNKED}{line}\r\nx\r\n0\r\n\r\n");
        assert_eq!(failed(stream.as_bytes(), false), Malformed::ChunkSize, "{line:?}");
    }
    // The largest size parses; the body is then cut short, without a panic.
    let stream = format!("{CHUNKED}ffffffffffffffff\r\nabc");
    let r = read(stream.as_bytes(), false);
    assert_eq!((r.body, r.end), (b"abc".to_vec(), ClientEnd::Failed(Malformed::Truncated)));
    let mut decoder = Decoder::new(Framing::Chunked);
    let mut buf = BytesMut::from(&b"FFFFFFFFFFFFFFFF\r\n"[..]);
    assert!(matches!(decoder.step(&mut buf), Ok(Step::More)));
    assert_eq!(decoder.remaining(), None);
}

#[test]
fn bare_lf_refused_in_chunk_lines_and_trailers() {
    for body in [
        "5\nhello\r\n0\r\n\r\n",
        "5;a\nhello\r\n0\r\n\r\n",
        "5 \nhello\r\n0\r\n\r\n",
        "5\r\nhello\r\n0\n\r\n",
        "\n5\r\nhello\r\n0\r\n\r\n",
    ] {
        assert_eq!(failed(format!("{CHUNKED}{body}").as_bytes(), false), Malformed::ChunkSize, "{body:?}");
    }
    for body in
        ["0\r\n\nX", "0\r\n\nX: y\r\n\r\n", "0\r\nX: y\n\r\n", "0\r\nX: y\r\n\n", "0\r\nX: y\nZ: w\r\n\r\n"]
    {
        assert_eq!(failed(format!("{CHUNKED}{body}").as_bytes(), false), Malformed::Trailers, "{body:?}");
    }
}

#[test]
fn chunk_data_without_its_crlf_refused() {
    for body in [
        "5\r\nhelloX\r\n0\r\n\r\n",
        "5\r\nhello\n0\r\n\r\n",
        "5\r\nhello\r0\r\n\r\n",
        "2\r\nhello\r\n0\r\n\r\n",
    ] {
        assert_eq!(failed(format!("{CHUNKED}{body}").as_bytes(), false), Malformed::ChunkEnd, "{body:?}");
    }
}

#[test]
fn chunk_lines_and_their_extensions_capped() {
    let ext = "a".repeat(MAX_CHUNK_LINE);
    assert_eq!(failed(format!("{CHUNKED}1;{ext}\r\nx\r\n0\r\n\r\n").as_bytes(), false), Malformed::ChunkSize);
    // Unended, the line is refused at the cap, not waited on.
    let mut decoder = Decoder::new(Framing::Chunked);
    let mut buf = BytesMut::from(format!("1;{ext}").as_bytes());
    assert_eq!(decoder.step(&mut buf).unwrap_err(), Malformed::ChunkSize);
    // Lines within the cap, whose extensions add up to hyper's limit for a body.
    let ext = "e".repeat(4000);
    let ok = format!("{CHUNKED}{}0\r\n\r\n", format!("1;{ext}\r\nx\r\n").repeat(4));
    assert_eq!(done(ok.as_bytes(), false).2, b"xxxx");
    let over = format!("{CHUNKED}{}0\r\n\r\n", format!("1;{ext}\r\nx\r\n").repeat(5));
    assert_eq!(failed(over.as_bytes(), false), Malformed::ChunkSize);
}

#[test]
fn heads_over_the_cap_are_too_large() {
    // Fewer than 100 fields: too large by its bytes, not its fields.
    let field = format!("X-Big: {}\r\n", "v".repeat(5000));
    let big = format!("HTTP/1.1 200 OK\r\n{}", field.repeat(MAX_HEAD / field.len() + 1));
    // Unended: refused once the buffer holds the cap, complete: refused by its length.
    let mut buf = BytesMut::from(big.as_bytes());
    assert_eq!(parse_head(&mut buf, false).unwrap_err(), Malformed::HeadTooLarge);
    let whole = format!("{big}\r\n");
    assert_eq!(final_head(whole.as_bytes(), false).unwrap_err(), Malformed::HeadTooLarge);
    assert_eq!(
        client_read(whole.as_bytes(), false, &[1000, 100_000]).end,
        ClientEnd::Failed(Malformed::HeadTooLarge)
    );
    let mut short = BytesMut::from(&big.as_bytes()[..MAX_HEAD - 1]);
    assert!(matches!(parse_head(&mut short, false), Ok(Parsed::Partial)));
}

#[test]
fn more_than_100_fields_too_large() {
    let fields = |n: usize| (0..n).map(|i| format!("X-{i}: v\r\n")).collect::<String>();
    let ok = format!("HTTP/1.1 200 OK\r\n{}Content-Length: 0\r\n\r\n", fields(99));
    assert_eq!(final_head(ok.as_bytes(), false).unwrap().response.headers().len(), 100);
    let over = format!("HTTP/1.1 200 OK\r\n{}\r\n", fields(101));
    assert_eq!(failed(over.as_bytes(), false), Malformed::HeadTooLarge);
}

#[test]
fn trailer_sections_capped() {
    let field = format!("X-T: {}\r\n", "t".repeat(1000));
    let over = format!("{CHUNKED}0\r\n{}\r\n", field.repeat(MAX_TRAILERS / field.len() + 1));
    assert_eq!(failed(over.as_bytes(), false), Malformed::Trailers);
    // Unended, refused at the cap.
    let mut decoder = Decoder::new(Framing::Chunked);
    let mut buf = BytesMut::from(&over.as_bytes()[CHUNKED.len()..over.len() - 2]);
    assert_eq!(decoder.step(&mut buf).unwrap_err(), Malformed::Trailers);
    // hyper's limit counts the section's blank line: 16 KiB in all is over.
    let pad = |total: usize| {
        let value = "v".repeat(total - "X: \r\n\r\n".len());
        format!("{CHUNKED}0\r\nX: {value}\r\n\r\n")
    };
    assert_eq!(failed(pad(MAX_TRAILERS).as_bytes(), false), Malformed::Trailers);
    assert!(read(pad(MAX_TRAILERS - 1).as_bytes(), false).trailers.is_some());
    let many = (0..101).map(|i| format!("T{i}: v\r\n")).collect::<String>();
    assert_eq!(failed(format!("{CHUNKED}0\r\n{many}\r\n").as_bytes(), false), Malformed::Trailers);
    let hundred = (0..100).map(|i| format!("T{i}: v\r\n")).collect::<String>();
    assert_eq!(
        read(format!("{CHUNKED}0\r\n{hundred}\r\n").as_bytes(), false).trailers.map(|t| t.len()),
        Some(100)
    );
}

#[test]
fn malformed_heads_refused() {
    for stream in [
        &b"HTTP/1.1 2000 OK\r\n\r\n"[..],
        b"HTTP/1.1 099 Low\r\n\r\n",
        b"HTTP/2.0 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
    ] {
        assert_eq!(failed(stream, false), Malformed::Head, "{:?}", String::from_utf8_lossy(stream));
    }
}

#[test]
fn request_heads_encoded_as_hyper_writes_them() {
    let mut headers = HeaderMap::new();
    headers.insert(header::HOST, HeaderValue::from_static("a.example"));
    headers.append("x-a", HeaderValue::from_static("1"));
    headers.append("x-a", HeaderValue::from_static("2"));
    let mut out = Vec::new();
    encode_head(&http::Method::GET, "/p?q", None, &headers, &mut out);
    assert_eq!(out, b"GET /p?q HTTP/1.1\r\nhost: a.example\r\nx-a: 1\r\nx-a: 2\r\n\r\n");
    headers.remove(header::HOST);
    out.clear();
    encode_head(&http::Method::GET, "/", Some("b.example:8443"), &headers, &mut out);
    assert_eq!(out, b"GET / HTTP/1.1\r\nhost: b.example:8443\r\nx-a: 1\r\nx-a: 2\r\n\r\n");
}

mod differential {
    //! The codec against hyper 1's HTTP/1.1 client, on generated response streams.

    use super::super::Framing;
    use crate::fuzzing::{ClientEnd, ClientRead, client_read, fields_of};
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use proptest::prelude::*;
    use proptest::sample::Index;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    type Fields = Vec<(String, Vec<u8>)>;

    /// What hyper's client made of a response stream.
    #[derive(Debug, Default)]
    struct HyperRead {
        head: Option<(u16, http::Version, Option<Vec<u8>>, Fields)>,
        body: Vec<u8>,
        trailers: Option<Fields>,
        /// The response and its body were read without an error.
        ok: bool,
        /// How hyper's connection task ended.
        conn: Option<Result<(), String>>,
    }

    /// Send one GET or HEAD through hyper's client, answer it with `pieces`, then close.
    async fn hyper_read(pieces: Vec<Vec<u8>>, head_request: bool) -> HyperRead {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let io = hyper_util::rt::TokioIo::new(client);
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, http_body_util::Empty<Bytes>>(io)
            .await
            .expect("handshake");
        let conn = tokio::spawn(conn);
        let upstream = tokio::spawn(async move {
            // The request first: bytes before it are an idle connection's, which hyper refuses.
            let mut request = Vec::new();
            let mut scratch = [0u8; 512];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match server.read(&mut scratch).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&scratch[..n]),
                }
            }
            for piece in pieces {
                if server.write_all(&piece).await.is_err() {
                    return;
                }
                tokio::task::yield_now().await;
            }
            let _ = server.shutdown().await;
            while matches!(server.read(&mut scratch).await, Ok(n) if n > 0) {}
        });
        let method = if head_request { http::Method::HEAD } else { http::Method::GET };
        let request = http::Request::builder()
            .method(method)
            .uri("/")
            .header("host", "upstream.test")
            .body(http_body_util::Empty::new())
            .unwrap();
        let mut read = HyperRead::default();
        if let Ok(response) = sender.send_request(request).await {
            let reason =
                response.extensions().get::<hyper::ext::ReasonPhrase>().map(|r| r.as_bytes().to_vec());
            let status = response.status().as_u16();
            read.head = Some((status, response.version(), reason, fields_of(response.headers())));
            let mut body = response.into_body();
            read.ok = loop {
                match body.frame().await {
                    None => break true,
                    Some(Err(_)) => break false,
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => read.body.extend_from_slice(&data),
                        Err(frame) => {
                            if let Ok(map) = frame.into_trailers() {
                                read.trailers = Some(fields_of(&map));
                            }
                        }
                    },
                }
            };
        }
        read.conn = Some(conn.await.expect("hyper's connection task").map_err(|e| e.to_string()));
        drop(sender);
        let _ = upstream.await;
        read
    }

    fn hyper_read_blocking(pieces: Vec<Vec<u8>>, head_request: bool) -> HyperRead {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(10), hyper_read(pieces, head_request))
                .await
                .expect("hyper finished")
        })
    }

    /// A field's value, as `Some` only when hyper reads it: visible ASCII and tabs.
    fn values<'a>(fields: &'a Fields, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        fields.iter().filter(move |(n, _)| n == name).map(|(_, v)| &v[..])
    }

    /// The stream holds a chunk line the codec refuses on purpose: more than 16 hex
    /// digits, or over its line cap.
    fn stricter_chunk_line(stream: &[u8]) -> bool {
        let hex_run = stream.split(|b| !b.is_ascii_hexdigit()).any(|run| run.len() > 16);
        hex_run || stream.split(|&b| b == b'\n').any(|line| line.len() + 1 >= super::MAX_CHUNK_LINE)
    }

    /// The stream holds a bare LF after a last chunk: the codec refuses trailers with one.
    fn bare_lf_in_trailers(stream: &[u8]) -> bool {
        stream.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r')
    }

    /// Both read the stream alike, but where the codec is stricter on purpose.
    fn compare(stream: &[u8], head_request: bool, ours: &ClientRead, theirs: &HyperRead) {
        let ours_ok = matches!(ours.end, ClientEnd::Done { .. });
        if ours.end == ClientEnd::Failed(super::Malformed::Switch) {
            // hyper hands a 101 over as an upgrade; latchkey never asks for one.
            assert_eq!(theirs.head.as_ref().map(|h| h.0), Some(101));
            return;
        }
        if let (Some(h), Some(t)) = (&ours.head, &theirs.head) {
            assert_eq!(h.status, t.0, "status");
            assert_eq!(h.version, t.1, "version");
            let hyper_reason = t.2.clone().filter(|r| !r.is_empty());
            assert_eq!(h.reason, hyper_reason, "reason phrase");
            assert_eq!(h.fields, t.3, "fields of {}", stream.escape_ascii());
        }
        if ours_ok != theirs.ok {
            let deliberate = match ours.end {
                ClientEnd::Failed(super::Malformed::ChunkSize) => stricter_chunk_line(stream),
                ClientEnd::Failed(super::Malformed::Trailers) => bare_lf_in_trailers(stream),
                ClientEnd::Failed(super::Malformed::Length) => ours.head.is_none() && long_length(stream),
                _ => false,
            };
            assert!(
                deliberate && !ours_ok,
                "ours {:?} vs hyper's {theirs:?} on {}",
                ours.end,
                stream.escape_ascii()
            );
            return;
        }
        if !ours_ok {
            return;
        }
        assert_eq!(ours.body, theirs.body, "body of {}", stream.escape_ascii());
        assert_eq!(
            ours.trailers.clone().unwrap_or_default(),
            theirs.trailers.clone().unwrap_or_default(),
            "trailers of {}",
            stream.escape_ascii()
        );
        let (ClientEnd::Done { left }, Some(head)) = (&ours.end, &ours.head) else { unreachable!() };
        if !left.is_empty() {
            // Bytes after the response: hyper's idle connection refuses them if it kept
            // the connection; the codec must not keep one hyper would not.
            let kept = matches!(&theirs.conn, Some(Err(e)) if e.contains("unexpected message"));
            assert!(
                !head.reusable || kept,
                "reusable where hyper is not: {:?} on {}",
                theirs.conn,
                stream.escape_ascii()
            );
            if kept && !head.reusable {
                let both = values(&head.fields, "transfer-encoding").next().is_some()
                    && values(&head.fields, "content-length").next().is_some()
                    && head.framing == Framing::Chunked;
                let close_in_obs_text = values(&head.fields, "connection").any(|v| {
                    v.iter().any(|&b| b >= 0x80) && v.to_ascii_lowercase().windows(5).any(|w| w == b"close")
                });
                assert!(both || close_in_obs_text, "not reused where hyper would: {}", stream.escape_ascii());
            }
        }
        let _ = head_request;
    }

    /// A `Content-Length` of more than 19 digits (leading zeros): hyper takes it, the
    /// codec refuses it.
    fn long_length(stream: &[u8]) -> bool {
        stream.split(|b| !b.is_ascii_digit()).any(|run| run.len() > 19)
    }

    fn status_line() -> impl Strategy<Value = Vec<u8>> {
        let version = prop_oneof![
            16 => Just("HTTP/1.1"),
            4 => Just("HTTP/1.0"),
            1 => prop::sample::select(vec!["HTTP/2.0", "HTTP/1."])
        ];
        let status = prop_oneof![
            12 => Just(200u16),
            6 => prop::sample::select(vec![201u16, 404, 500, 302]),
            1 => prop::sample::select(vec![204u16, 304]),
            1 => prop::sample::select(vec![101u16, 100, 103, 199, 99, 999]),
        ];
        let reason = prop::sample::select(vec![&b" OK"[..], b" OK", b"", b" ", b" Not Found", b" Fine \xe9"]);
        (version, status, reason).prop_map(|(v, s, r)| [format!("{v} {s:03}").as_bytes(), r].concat())
    }

    /// Fields besides the one that frames the body.
    fn field() -> impl Strategy<Value = Vec<u8>> {
        let cl = prop::sample::select(vec![
            "0",
            "3",
            "7",
            "3, 3",
            "3,4",
            "-1",
            "+5",
            "5 5",
            "0x5",
            "",
            "99999999999999999999",
            "18446744073709551615",
            "00000000000000000003",
            " 3 ",
            "3,",
            ",3",
        ]);
        let te = prop::sample::select(vec![
            &b"chunked"[..],
            b"Chunked",
            b"gzip, chunked",
            b"chunked, gzip",
            b"gzip",
            b"identity",
            b"chunked \xe9",
            b"\xe9, chunked",
            b"chunked,",
            b"x chunked",
        ]);
        let connection = prop::sample::select(vec![
            &b"close"[..],
            b"keep-alive",
            b"Keep-Alive, close",
            b"upgrade",
            b"close, \xe9",
            b"\xe9, keep-alive",
            b"x, keep-alive",
            b"keep-alive\r\nConnection: close",
        ]);
        let value =
            prop::collection::vec(prop_oneof![8 => 0x20u8..0x7f, 1 => Just(b'\t'), 1 => 0x80u8..=0xff], 0..8);
        prop_oneof![
            2 => cl.prop_map(|v| format!("Content-Length: {v}").into_bytes()),
            2 => te.prop_map(|v| [&b"Transfer-Encoding: "[..], v].concat()),
            6 => connection.prop_map(|v| [&b"Connection: "[..], v].concat()),
            6 => ("[a-z]{1,4}", value).prop_map(|(n, v)| [format!("X-{n}: ").as_bytes(), &v].concat()),
            1 => prop::sample::select(vec![&b"Bad Name: x"[..], b"NoColon", b": empty", b" X: folded", b"X : sp"])
                .prop_map(|v| v.to_vec()),
        ]
    }

    fn chunk() -> impl Strategy<Value = Vec<u8>> {
        let off = prop_oneof![20 => Just(0i64), 1 => Just(1), 1 => Just(-1)];
        let style = prop_oneof![
            10 => Just("x"), 2 => Just("X"), 2 => Just("0x"), 1 => Just("max"), 1 => Just("17")
        ];
        let ext = prop_oneof![
            10 => Just(&b""[..]),
            6 => prop::sample::select(vec![&b";a=b"[..], b" ; x", b"\t;q=\"v;w\"", b";", b"  ", b";\xe9"]),
            1 => prop::sample::select(vec![&b";a\rb"[..], b"g", b";\x00", b"\x0b"]),
        ];
        let eol = prop_oneof![20 => Just(&b"\r\n"[..]), 1 => Just(&b"\n"[..]), 1 => Just(&b"\r"[..])];
        let end = prop_oneof![20 => Just(&b"\r\n"[..]), 1 => prop::sample::select(vec![&b""[..], b"\n", b"x\r\n", b"\r"])];
        (prop::collection::vec(any::<u8>(), 1..20), off, style, ext, eol, end).prop_map(
            |(data, off, style, ext, eol, end)| {
                let n = (data.len() as i64 + off) as u64;
                let size = match style {
                    "x" => format!("{n:x}"),
                    "X" => format!("{n:X}"),
                    "0x" => format!("000{n:x}"),
                    "max" => "ffffffffffffffff".to_owned(),
                    _ => format!("{n:017x}"),
                };
                [size.as_bytes(), ext, eol, &data, end].concat()
            },
        )
    }

    fn chunked_body() -> impl Strategy<Value = Vec<u8>> {
        let last = prop_oneof![
            10 => Just(&b"0\r\n"[..]),
            2 => prop::sample::select(vec![&b"000;e=1\r\n"[..], b"0 \r\n"]),
            1 => prop::sample::select(vec![&b"0\n"[..], b"0\r"]),
        ];
        let trailer = prop_oneof![
            8 => prop::sample::select(vec![&b"X-Sum: abc\r\n"[..], b"Y: 1\r\n", b"Z: \xe9\r\n", b"T: \r\n"]),
            1 => prop::sample::select(vec![&b"bad line\r\n"[..], b"X: a\n", b"\n", b"\r", b"X: a\r\n b\r\n"]),
        ];
        let end =
            prop_oneof![20 => Just(&b"\r\n"[..]), 1 => prop::sample::select(vec![&b""[..], b"\n", b"\r"])];
        (prop::collection::vec(chunk(), 0..4), last, prop::collection::vec(trailer, 0..3), end).prop_map(
            |(chunks, last, trailers, end)| {
                [chunks.concat(), last.to_vec(), trailers.concat(), end.to_vec()].concat()
            },
        )
    }

    fn trailing() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            3 => Just(Vec::new()),
            1 => prop::collection::vec(any::<u8>(), 1..8),
            1 => Just(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec()),
        ]
    }

    fn interims() -> impl Strategy<Value = Vec<u8>> {
        let interim = prop::sample::select(vec![
            &b"HTTP/1.1 100 Continue\r\n\r\n"[..],
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\nContent-Length: 4\r\n\r\n",
        ]);
        prop_oneof![4 => Just(Vec::new()), 1 => prop::collection::vec(interim, 1..3).prop_map(|v| v.concat())]
    }

    /// How the head frames the body generated for it.
    #[derive(Debug, Clone, Copy)]
    enum Frame {
        Chunked,
        /// `Content-Length`, off by this much.
        Length(i64),
        Close,
    }

    /// A body and the field that frames it (perhaps wrongly).
    fn framed_body() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
        let frame = prop_oneof![
            5 => Just(Frame::Chunked),
            4 => prop_oneof![10 => Just(0i64), 1 => Just(1), 1 => Just(-1)].prop_map(Frame::Length),
            1 => Just(Frame::Close),
        ];
        let raw = prop::collection::vec(any::<u8>(), 0..40);
        (frame, chunked_body(), raw).prop_map(|(frame, chunked, raw)| match frame {
            Frame::Chunked => (b"Transfer-Encoding: chunked".to_vec(), chunked),
            Frame::Length(off) => {
                let n = (raw.len() as i64 + off).max(0);
                (format!("Content-Length: {n}").into_bytes(), raw)
            }
            Frame::Close => (Vec::new(), raw),
        })
    }

    /// A response stream: 1xx heads, a head, a body framed any way, bytes after, perhaps
    /// cut short or with a byte changed.
    fn stream() -> impl Strategy<Value = Vec<u8>> {
        let eol = prop_oneof![12 => Just(&b"\r\n"[..]), 1 => Just(&b"\n"[..])];
        let damage = prop_oneof![12 => Just(None), 1 => (any::<Index>(), any::<u8>()).prop_map(Some)];
        let head = (status_line(), prop::collection::vec(field(), 0..3), any::<Index>(), eol);
        (interims(), head, framed_body(), trailing(), prop::option::weighted(0.15, any::<Index>()), damage)
            .prop_map(|(interims, (line, mut fields, at, eol), (framing, body), trailing, cut, damage)| {
                if !framing.is_empty() {
                    fields.insert(at.index(fields.len() + 1), framing);
                }
                let mut s = interims;
                for part in std::iter::once(line).chain(fields) {
                    s.extend_from_slice(&part);
                    s.extend_from_slice(eol);
                }
                s.extend_from_slice(eol);
                s.extend_from_slice(&body);
                s.extend_from_slice(&trailing);
                if let Some((at, byte)) = damage {
                    let at = at.index(s.len());
                    s[at] = byte;
                }
                if let Some(cut) = cut {
                    s.truncate(cut.index(s.len() + 1));
                }
                s
            })
    }

    fn check(stream: &[u8], head_request: bool, cuts: &[Index]) {
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
        points.sort_unstable();
        let ours = client_read(stream, head_request, &points);
        assert_eq!(client_read(stream, head_request, &[]), ours, "whole vs cut");
        let mut pieces = Vec::new();
        let mut at = 0;
        for p in points.into_iter().chain([stream.len()]) {
            if p > at {
                pieces.push(stream[at..p].to_vec());
                at = p;
            }
        }
        let theirs = hyper_read_blocking(pieces, head_request);
        compare(stream, head_request, &ours, &theirs);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn codec_reads_as_hyper(stream in stream(), head_request in prop::bool::weighted(0.1),
                                cuts in prop::collection::vec(any::<Index>(), 0..4)) {
            check(&stream, head_request, &cuts);
        }

        #[test]
        fn codec_reads_garbage_as_hyper(stream in prop::collection::vec(any::<u8>(), 0..60),
                                        cuts in prop::collection::vec(any::<Index>(), 0..3)) {
            let mut s = b"HTTP/1.1 200 OK\r\n".to_vec();
            s.extend_from_slice(&stream);
            check(&s, false, &cuts);
        }
    }

    /// Streams where the codec and hyper once parted (each fixed in the codec).
    #[test]
    fn known_cases() {
        for stream in [
            // hyper reads a `Transfer-Encoding` it cannot read as text to the close.
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: \xe9, chunked\r\n\r\n0\r\n\r\n"[..],
            // In HTTP/1.0 a `close` wins over a `keep-alive`, and a `keep-alive` counts only as text.
            b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: keep-alive, close\r\n\r\nxHTTP",
            b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: \xe9, keep-alive\r\n\r\nx",
            // A bare LF in trailers: hyper reads it as part of a line, not as their end.
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: a\nZ: b\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\nX: y\r\n\r\nHTTP",
        ] {
            check(stream, false, &[]);
        }
    }
}
