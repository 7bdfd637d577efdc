//! Test harness: a loopback TLS echo upstream (hyper + rustls) that answers with what it
//! received as JSON, a git smart-HTTP backend behind it, and the real `latchkey` binary.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// Hosts the test upstream certificate covers; tests map them to loopback with
/// `[upstream.resolve]`.
pub const UPSTREAM_HOSTS: &[&str] = &[
    "api.anthropic.com",
    "api.openai.com",
    "api.github.com",
    "github.com",
    "raw.githubusercontent.com",
    "api.example.com",
    "other.example.com",
    "evil.example.net",
    "a.b.example.org",
    "example.org",
    "evil-example.org",
    "example.org.evil.net",
    // Built-in provider hosts.
    "myres.openai.azure.com",
    "generativelanguage.googleapis.com",
    "gitlab.com",
    "huggingface.co",
    "api.mistral.ai",
    "api.groq.com",
    "openrouter.ai",
    "api2.cursor.sh",
    "api.pagerduty.com",
    "sentry.io",
    "prod.k8s.example.com",
    "staging.k8s.example.com",
    "dev.k8s.example.com",
    "bedrock-runtime.us-east-1.amazonaws.com",
    "mybucket.s3.us-west-2.amazonaws.com",
    "oauth2.googleapis.com",
    "storage.googleapis.com",
];

pub struct UpstreamPki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// A client certificate (clientAuth) the upstream CA signed, for mTLS tests.
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

/// One CA and one leaf for all upstream hosts, made once per test binary.
pub fn pki() -> &'static UpstreamPki {
    static PKI: OnceLock<UpstreamPki> = OnceLock::new();
    PKI.get_or_init(|| {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "upstream test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let mut names: Vec<String> = UPSTREAM_HOSTS.iter().map(|s| s.to_string()).collect();
        names.push("127.0.0.1".into());
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(names).unwrap().signed_by(&leaf_key, &issuer).unwrap();
        let client_key = KeyPair::generate().unwrap();
        let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
        client.distinguished_name.push(DnType::CommonName, "latchkey-client");
        client.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let client = client.signed_by(&client_key, &issuer).unwrap();
        UpstreamPki {
            ca_pem: ca_cert.pem(),
            cert_pem: leaf.pem(),
            key_pem: leaf_key.serialize_pem(),
            client_cert_pem: client.pem(),
            client_key_pem: client_key.serialize_pem(),
        }
    })
}

/// What the upstream saw.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Which upstream connection carried it (accept order).
    pub conn: usize,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Request trailers (chunked HTTP/1.1 trailer section, HTTP/2 trailing HEADERS).
    pub trailers: Vec<(String, String)>,
}

impl Seen {
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone()).collect()
    }
    pub fn trailer_all(&self, name: &str) -> Vec<String> {
        self.trailers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone()).collect()
    }
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// TCP connections accepted so far.
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    /// Connections open now, and the most that were open at once.
    pub open: Arc<OpenCount>,
    /// `/sse` sends its second event only once this is notified.
    pub sse_next: Arc<tokio::sync::Notify>,
}

/// Connections open at once, counted by a guard each connection's task holds.
#[derive(Default)]
pub struct OpenCount {
    now: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
}

impl OpenCount {
    fn enter(self: &Arc<Self>) -> impl Drop + Send + use<> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.now.fetch_add(1, SeqCst) + 1;
        self.peak.fetch_max(now, SeqCst);
        struct Leave(Arc<OpenCount>);
        impl Drop for Leave {
            fn drop(&mut self) {
                self.0.now.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        Leave(self.clone())
    }

    pub fn peak(&self) -> usize {
        self.peak.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn now(&self) -> usize {
        self.now.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Upstream {
    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// The text of `path` once it contains `what`, waited for up to 5 s: a log record is
/// written when its exchange ends, which may be just after the client has its answer.
pub fn wait_for_text(path: &Path, what: &str) -> String {
    for _ in 0..100 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(what) {
            return text;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what:?} never appeared in {}", path.display());
}

pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
    })
}

#[derive(Default)]
pub struct UpstreamOpts {
    pub tls: bool,
    /// Offer only `h2` by ALPN (an HTTP/2-only server).
    pub h2_only: bool,
    /// Offer `h2` before `http/1.1` (a server that speaks both and prefers h2).
    pub h2_too: bool,
    /// Require a client certificate signed by the test CA (mTLS).
    pub client_auth: bool,
    pub git: Option<GitServer>,
    /// Listen on this address instead of 127.0.0.1 (a veth address in a netns test).
    pub bind: Option<std::net::IpAddr>,
}

/// Start an echo upstream on loopback (TLS when `tls`); `git` enables /org/.
pub fn upstream(tls: bool, git: Option<GitServer>) -> Upstream {
    upstream_with(UpstreamOpts { tls, git, ..Default::default() })
}

type EchoBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

pub fn upstream_with(opts: UpstreamOpts) -> Upstream {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let ip = opts.bind.unwrap_or(std::net::Ipv4Addr::LOCALHOST.into());
    let listener = runtime().block_on(TcpListener::bind((ip, 0))).unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = opts.tls.then(|| {
        use rustls::pki_types::pem::PemObject;
        let p = pki();
        let certs = vec![rustls::pki_types::CertificateDer::from_pem_slice(p.cert_pem.as_bytes()).unwrap()];
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(p.key_pem.as_bytes()).unwrap();
        let builder = rustls::ServerConfig::builder();
        let builder = if opts.client_auth {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(rustls::pki_types::CertificateDer::from_pem_slice(p.ca_pem.as_bytes()).unwrap())
                .unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).build().unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut cfg = builder.with_single_cert(certs, key).unwrap();
        cfg.alpn_protocols = match (opts.h2_only, opts.h2_too) {
            (true, _) => vec![b"h2".to_vec()],
            (false, true) => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            (false, false) => vec![b"http/1.1".to_vec()],
        };
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
    });
    let git = opts.git.map(Arc::new);
    let log = seen.clone();
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let accepted = connections.clone();
    let open = Arc::new(OpenCount::default());
    let counted = open.clone();
    let sse_next = Arc::new(tokio::sync::Notify::new());
    let sse = sse_next.clone();
    runtime().spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let conn = accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (log, acceptor, git, sse) = (log.clone(), acceptor.clone(), git.clone(), sse.clone());
            let guard = counted.enter();
            tokio::spawn(async move {
                let _open = guard;
                let svc = service_fn(move |req| echo(req, conn, log.clone(), git.clone(), sse.clone()));
                match acceptor {
                    Some(a) => {
                        let Ok(s) = a.accept(tcp).await else { return };
                        if s.get_ref().1.alpn_protocol() == Some(b"h2") {
                            let b = hyper::server::conn::http2::Builder::new(
                                hyper_util::rt::TokioExecutor::new(),
                            );
                            let _ = b.serve_connection(TokioIo::new(s), svc).await;
                        } else {
                            let b = hyper::server::conn::http1::Builder::new();
                            let _ = b.serve_connection(TokioIo::new(s), svc).await;
                        }
                    }
                    None => {
                        let b = hyper::server::conn::http1::Builder::new();
                        let _ = b.serve_connection(TokioIo::new(tcp), svc).await;
                    }
                }
            });
        }
    });
    Upstream { addr, seen, connections, open, sse_next }
}

fn full(b: impl Into<Bytes>) -> EchoBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A streamed body: the handler sends frames (data, then trailers) as it likes.
fn channel() -> (http_body_util::channel::Sender<Bytes, hyper::Error>, EchoBody) {
    let (tx, body) = http_body_util::Channel::<Bytes, hyper::Error>::new(4);
    (tx, body.boxed())
}

async fn echo(
    req: Request<Incoming>,
    conn: usize,
    log: Arc<Mutex<Vec<Seen>>>,
    git: Option<Arc<GitServer>>,
    sse_next: Arc<tokio::sync::Notify>,
) -> Result<Response<EchoBody>, hyper::Error> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    // Streaming endpoints: never hold a whole body.
    if path == "/sink" {
        let mut body = body;
        let mut n: u64 = 0;
        while let Some(frame) = body.frame().await {
            if let Some(d) = frame?.data_ref() {
                n += d.len() as u64;
            }
        }
        return Ok(Response::new(full(n.to_string())));
    }
    if let Some(n) = path.strip_prefix("/source?bytes=") {
        let total: u64 = n.parse().unwrap();
        let (mut tx, body) = channel();
        tokio::spawn(async move {
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let mut left = total;
            while left > 0 {
                let take = left.min(chunk.len() as u64) as usize;
                if tx.send_data(chunk.slice(..take)).await.is_err() {
                    return;
                }
                left -= take as u64;
            }
        });
        let resp = Response::builder().header("content-length", total.to_string()).body(body);
        return Ok(resp.unwrap());
    }
    if path == "/sse" {
        let (mut tx, body) = channel();
        tokio::spawn(async move {
            let _ = tx.send_data(Bytes::from_static(b"data: one\n\n")).await;
            sse_next.notified().await;
            let _ = tx.send_data(Bytes::from_static(b"data: two\n\n")).await;
        });
        let resp = Response::builder().header("content-type", "text/event-stream").body(body);
        return Ok(resp.unwrap());
    }
    if path == "/echo-body" {
        // An upload-then-download endpoint: the request body comes back as one chunk,
        // then a newline chunk, then the end (what an agent can make a paste service do).
        let data = body.collect().await?.to_bytes();
        let (mut tx, body) = channel();
        tokio::spawn(async move {
            let _ = tx.send_data(data).await;
            let _ = tx.send_data(Bytes::from_static(b"\n")).await;
        });
        return Ok(Response::builder().header("content-type", "text/plain").body(body).unwrap());
    }
    if path == "/answer-then-read" {
        // Answered at once; the upload read on after, logged when it ends (whole or cut).
        let (method, headers) = (parts.method.to_string(), headers.clone());
        tokio::spawn(async move {
            let mut body = body;
            let mut got = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                got.extend_from_slice(frame.data_ref().map_or(&[][..], |d| &d[..]));
            }
            let seen = Seen { conn, method, path, headers, body: got, trailers: Vec::new() };
            log.lock().unwrap().push(seen);
        });
        return Ok(Response::new(full("early")));
    }
    if path == "/answer-and-hold" {
        // Answered at once; the upload then left unread, its stream's window never
        // opened again, for 8 s.
        log.lock().unwrap().push(Seen {
            conn,
            method: parts.method.to_string(),
            path,
            headers,
            body: Vec::new(),
            trailers: Vec::new(),
        });
        tokio::spawn(async move {
            let _held = body;
            tokio::time::sleep(std::time::Duration::from_secs(8)).await;
        });
        return Ok(Response::new(full("early")));
    }
    if path == "/trailers" {
        let (mut tx, body) = channel();
        tokio::spawn(async move {
            let _ = tx.send_data(Bytes::from_static(b"payload")).await;
            let mut t = http::HeaderMap::new();
            t.insert("x-checksum", "abc123".parse().unwrap());
            let _ = tx.send_trailers(t).await;
        });
        return Ok(Response::builder().header("trailer", "x-checksum").body(body).unwrap());
    }
    // Reflection endpoints: give back the credential the upstream received.
    let credential = parts
        .headers
        .get("x-api-key")
        .or_else(|| parts.headers.get("authorization"))
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    if path.starts_with("/reflect/") {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("xy{credential}"));
        let (mut tx, body) = channel();
        let (what, cred) = (path.clone(), credential.clone());
        tokio::spawn(async move {
            match what.as_str() {
                "/reflect/split" => {
                    let (a, b) = cred.split_at(cred.len() / 2);
                    let _ = tx.send_data(Bytes::from(format!("before {a}"))).await;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    let _ = tx.send_data(Bytes::from(format!("{b} after"))).await;
                }
                "/reflect/sse" => {
                    let _ = tx.send_data(Bytes::from_static(b"data: first\n\n")).await;
                    let _ = tx.send_data(Bytes::from(format!("data: {cred}\n\n"))).await;
                }
                w if w.starts_with("/reflect/query?") => {
                    let q = w.split_once('?').map(|(_, q)| q.to_string()).unwrap_or_default();
                    let _ = tx.send_data(Bytes::from(format!("query was {q}"))).await;
                }
                "/reflect/base64" => {
                    let _ = tx.send_data(Bytes::from(b64)).await;
                }
                _ => {
                    let _ = tx.send_data(Bytes::from(format!("you sent {cred}"))).await;
                }
            }
        });
        let mut b = Response::builder().header("x-echo", credential.as_str());
        if path == "/reflect/gzip" {
            b = b.header("content-encoding", "gzip");
        }
        return Ok(b.body(body).unwrap());
    }
    let collected = body.collect().await?;
    let trailers: Vec<(String, String)> = collected
        .trailers()
        .map(|t| {
            t.iter()
                .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                .collect()
        })
        .unwrap_or_default();
    let body = collected.to_bytes().to_vec();
    let version = format!("{:?}", parts.version);
    let seen = Seen {
        conn,
        method: parts.method.to_string(),
        path: path.clone(),
        headers: headers.clone(),
        body: body.clone(),
        trailers: trailers.clone(),
    };
    log.lock().unwrap().push(seen);
    if let (Some(git), true) = (git, path.starts_with("/org/")) {
        return Ok(git.serve(&parts, body).map(full));
    }
    if let Some(to) = path.strip_prefix("/redirect?to=") {
        return Ok(Response::builder().status(302).header("location", to).body(full(Bytes::new())).unwrap());
    }
    if path == "/slow" {
        tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    }
    if let Some(ms) = path.strip_prefix("/pause?ms=").and_then(|ms| ms.parse().ok()) {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let mut b = Response::builder().header("content-type", "application/json");
    if path.starts_with("/cookie") {
        b = b.header("set-cookie", "session=abc; Secure");
    }
    let json = json!({
        "method": parts.method.as_str(),
        "path": path,
        "version": version,
        "headers": headers,
        "trailers": trailers,
        "body": String::from_utf8_lossy(&body),
    });
    Ok(b.body(full(json.to_string())).unwrap())
}

/// `git http-backend` as CGI, behind basic auth with one accepted credential.
pub struct GitServer {
    pub root: PathBuf,
    pub expect_authorization: String,
}

impl GitServer {
    fn serve(&self, parts: &http::request::Parts, body: Vec<u8>) -> Response<Bytes> {
        let auth = parts.headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
        if auth != self.expect_authorization {
            return Response::builder()
                .status(401)
                .header("www-authenticate", "Basic realm=\"git\"")
                .body(Bytes::from_static(b"unauthorized"))
                .unwrap();
        }
        let mut child = Command::new("git")
            .arg("http-backend")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("GIT_PROJECT_ROOT", &self.root)
            .env("GIT_HTTP_EXPORT_ALL", "1")
            .env("REQUEST_METHOD", parts.method.as_str())
            .env("PATH_INFO", parts.uri.path())
            .env("QUERY_STRING", parts.uri.query().unwrap_or(""))
            .env(
                "CONTENT_TYPE",
                parts.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or(""),
            )
            .env("CONTENT_LENGTH", body.len().to_string())
            .env("REMOTE_USER", "x-access-token")
            .env("REMOTE_ADDR", "127.0.0.1")
            .env(
                "GIT_PROTOCOL",
                parts.headers.get("git-protocol").and_then(|v| v.to_str().ok()).unwrap_or(""),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&body).unwrap();
        let out = child.wait_with_output().unwrap();
        let split = out
            .stdout
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| (i, 4))
            .or_else(|| out.stdout.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)));
        let (head_end, sep) = split.unwrap_or((0, 0));
        let head = String::from_utf8_lossy(&out.stdout[..head_end]).into_owned();
        let mut b = Response::builder();
        for line in head.lines() {
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("status") {
                    b = b.status(v.trim()[..3].parse::<u16>().unwrap());
                } else {
                    b = b.header(k.trim(), v.trim());
                }
            }
        }
        b.body(Bytes::from(out.stdout[head_end + sep..].to_vec())).unwrap()
    }
}

/// A request log in a directory of its own: the `[proxy.logging]` lines that turn it
/// on, and its records once written.
pub struct RequestLog {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl RequestLog {
    pub fn new() -> RequestLog {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("requests.log");
        RequestLog { _dir: dir, path }
    }

    /// `[proxy.logging]` writing every request to this log (a config's proxy part).
    pub fn config(&self) -> String {
        format!("[proxy.logging]\nlog_requests = true\nlog_file = \"{}\"\n", self.path.display())
    }

    /// The records, once at least `n` are written (a record is written when its exchange
    /// ends, which may be just after the client has its answer); what there is after 5 s.
    pub fn records(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&self.path).unwrap_or_default();
            let records: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
            if records.len() >= n || Instant::now() > deadline {
                return records;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A running `latchkey run`.
pub struct Latchkey {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub child: Child,
    pub config_path: PathBuf,
    pub stderr_path: PathBuf,
}

/// Process `pid` holds the socket listening on TCP `port` (/proc/net/tcp's inode among
/// its descriptors).
pub fn listens(pid: u32, port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let inode = table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let local_port = f.get(1)?.rsplit_once(':')?.1;
        (u16::from_str_radix(local_port, 16).ok()? == port && f.get(3)? == &"0A")
            .then(|| f.get(9).copied())?
    });
    let Some(inode) = inode else { return false };
    let socket = format!("socket:[{inode}]");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten();
    fds.filter_map(|fd| std::fs::read_link(fd.path()).ok()).any(|link| link.to_string_lossy() == socket)
}

/// A port nothing listens on, for a server a test starts later. Not one the kernel picks
/// (`bind(:0)`): the kernel hands the same ephemeral range to every outgoing connection of
/// the parallel tests, and one of them took such a port before latchkey bound it (CI,
/// "Address already in use"). Ports outside that range are handed out once per test
/// binary from a counter, starting at a place that differs per process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, span) = outside_ephemeral_range();
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let port = (low + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {low}..{}", low + span);
}

/// The larger stretch of ports above 10,000 that the kernel's ephemeral range leaves out:
/// (first port, how many).
fn outside_ephemeral_range() -> (u32, u32) {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut ends = range.split_whitespace().filter_map(|p| p.parse::<u32>().ok());
    let (first, last) = (ends.next().unwrap_or(32_768), ends.next().unwrap_or(60_999));
    let below = first.saturating_sub(10_000);
    let above = 65_535u32.saturating_sub(last.max(10_000));
    match below.max(above) {
        // The whole port space ephemeral: no stretch without the race.
        0..1_000 => (10_000, 55_535),
        _ if below >= above => (10_000, below),
        _ => (last.max(10_000) + 1, above),
    }
}

/// Write the test PKI's files into `dir`: (upstream CA, client cert, client key).
pub fn write_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let p = pki();
    let files = (dir.join("pki-ca.pem"), dir.join("client.crt"), dir.join("client.key"));
    std::fs::write(&files.0, &p.ca_pem).unwrap();
    std::fs::write(&files.1, &p.client_cert_pem).unwrap();
    std::fs::write(&files.2, &p.client_key_pem).unwrap();
    set_mode(&files.2, 0o600);
    files
}

/// Write a config with the standard test preamble plus `body`. Every upstream host
/// resolves to `upstream` (when given); the upstream CA is trusted via ca_file.
pub fn write_config(dir: &Path, port: u16, upstream: Option<SocketAddr>, body: &str) -> PathBuf {
    write_config2(dir, port, upstream, upstream, body)
}

/// Like `write_config`, with port 80 of every host going to `plain`.
pub fn write_config2(
    dir: &Path,
    port: u16,
    upstream: Option<SocketAddr>,
    plain: Option<SocketAddr>,
    body: &str,
) -> PathBuf {
    let ca_file = dir.join("upstream-ca.pem");
    std::fs::write(&ca_file, &pki().ca_pem).unwrap();
    // Tests read what the upstream received from its echo, so response redaction (which
    // would mask that echo) is off here and tested on its own in tests/redaction.rs.
    let mut cfg = format!("[proxy]\nport = {port}\nca_dir = \"{}\"\n", dir.join("ca").display());
    let (proxy_extra, rest) = match body.split_once("#END-PROXY\n") {
        Some((p, r)) => (p, r),
        None => ("", body),
    };
    if !proxy_extra.contains("redact_responses") {
        cfg.push_str("redact_responses = false\n");
    }
    cfg.push_str(proxy_extra.strip_prefix("[proxy]\n").unwrap_or(proxy_extra));
    // Keys of [upstream] itself (a corporate proxy) come before `#END-UPSTREAM`.
    let (upstream_extra, rest) = rest.split_once("#END-UPSTREAM\n").unwrap_or(("", rest));
    cfg.push_str(&format!("\n[upstream]\nca_file = \"{}\"\n{upstream_extra}", ca_file.display()));
    cfg.push_str("[upstream.resolve]\n");
    for h in UPSTREAM_HOSTS {
        if let Some(addr) = upstream {
            cfg.push_str(&format!("\"{h}:443\" = \"{addr}\"\n"));
        }
        if let Some(addr) = plain {
            cfg.push_str(&format!("\"{h}:80\" = \"{addr}\"\n"));
        }
    }
    cfg.push('\n');
    cfg.push_str(rest);
    let path = dir.join("config.toml");
    std::fs::write(&path, cfg).unwrap();
    set_mode(&path, 0o600);
    path
}

pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_latchkey")
}

/// A `latchkey` command with a clean environment (HOME in `dir`) plus `env`.
pub fn latchkey_cmd(dir: &Path, env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(bin());
    latchkey_env(&mut c, dir, env);
    c
}

/// The clean environment latchkey runs with in tests (HOME in `dir`) plus `env`, set on
/// `c`: latchkey itself or a launcher that runs it (unshare, `ip netns exec`, setpriv).
pub fn latchkey_env<'c>(c: &'c mut Command, dir: &Path, env: &[(&str, &str)]) -> &'c mut Command {
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("RUST_LOG", "debug")
        .envs(env.iter().copied())
}

impl Latchkey {
    /// Start `latchkey run` with a config written by `write_config`.
    pub fn start(upstream: Option<&Upstream>, body: &str, env: &[(&str, &str)]) -> Latchkey {
        Self::start_with(|dir, port| write_config(dir, port, upstream.map(|u| u.addr), body), env)
    }

    /// With a plain-HTTP upstream on port 80 of every test host.
    pub fn start_plain(tls: &Upstream, plain: &Upstream, body: &str, env: &[(&str, &str)]) -> Latchkey {
        Self::start_with(|dir, port| write_config2(dir, port, Some(tls.addr), Some(plain.addr), body), env)
    }

    /// On a port `free_port()` found; a parallel test may take it before latchkey binds
    /// it, and then latchkey is started again on another.
    fn start_with(config: impl Fn(&Path, u16) -> PathBuf, env: &[(&str, &str)]) -> Latchkey {
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let port = free_port();
            let config_path = config(dir.path(), port);
            match Self::try_spawn(dir, port, config_path, env) {
                Ok(lk) => return lk,
                Err(stderr) if stderr.contains("Address already in use") => continue,
                Err(stderr) => panic!("latchkey did not start: {stderr}"),
            }
        }
        panic!("latchkey found its port taken three times");
    }

    pub fn spawn(dir: tempfile::TempDir, port: u16, config_path: PathBuf, env: &[(&str, &str)]) -> Latchkey {
        Self::try_spawn(dir, port, config_path, env)
            .unwrap_or_else(|stderr| panic!("latchkey did not start: {stderr}"))
    }

    /// Started and listening on `port`, or its stderr.
    fn try_spawn(
        dir: tempfile::TempDir,
        port: u16,
        config_path: PathBuf,
        env: &[(&str, &str)],
    ) -> Result<Latchkey, String> {
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let child = latchkey_cmd(dir.path(), env)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let mut lk = Latchkey { port, dir, child, config_path, stderr_path };
        lk.wait_ready()?;
        Ok(lk)
    }

    /// This process listening on the port (a connect could reach another test's
    /// latchkey that took the port), or its stderr once it exited or after 20 s.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !listens(self.child.id(), self.port) {
            if self.child.try_wait().ok().flatten().is_some() || Instant::now() > deadline {
                return Err(self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn proxy_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn bundle(&self) -> PathBuf {
        self.dir.path().join("ca").join("bundle.pem")
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Replace the config file the way editors and Kubernetes do: `write` writes the new
    /// one (`write_config` and the like) into the directory it is given, which is then
    /// renamed over the one in force, keeping this instance's CA directory.
    pub fn replace_config(&self, write: impl FnOnce(&Path) -> PathBuf) {
        let dir = self.dir.path().join("next");
        std::fs::create_dir_all(&dir).unwrap();
        let written = write(&dir);
        let text = std::fs::read_to_string(&written).unwrap().replace(
            &dir.join("ca").display().to_string(),
            &self.dir.path().join("ca").display().to_string(),
        );
        std::fs::write(&written, text).unwrap();
        std::fs::rename(&written, &self.config_path).unwrap();
    }

    /// curl through the proxy; returns (status, body).
    pub fn curl(&self, args: &[&str]) -> (u16, String) {
        let out = Command::new("curl")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .args(["-sS", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}"])
            .args(["-x", &self.proxy_url(), "--cacert"])
            .arg(self.bundle())
            .args(args)
            .output()
            .unwrap();
        parse_curl(out)
    }

    /// A latchkey subcommand against this instance's config.
    pub fn cli(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        latchkey_cmd(self.dir.path(), env).args(args).arg("--config").arg(&self.config_path).output().unwrap()
    }
}

pub fn parse_curl(out: Output) -> (u16, String) {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    let code = code.trim().parse().unwrap_or(0);
    if code == 0 {
        return (0, String::from_utf8_lossy(&out.stderr).into_owned());
    }
    (code, body.to_string())
}

impl Drop for Latchkey {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Header values as the upstream echoed them.
pub fn echoed(body: &str, name: &str) -> Vec<String> {
    json(body)["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p[0].as_str().unwrap().eq_ignore_ascii_case(name))
        .map(|p| p[1].as_str().unwrap().to_string())
        .collect()
}

/// A Python upstream from tests/py that prints its port on its first line; killed on drop.
pub struct PyServer(std::process::Child);

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `python3 tests/py/<script>`, ready for arguments.
pub fn py(script: &str) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py").join(script));
    cmd
}

/// A Python client kept running (it holds on until its stdin closes), and the first
/// line it printed (what it reports once it is where the test wants it).
pub fn py_held<S: AsRef<std::ffi::OsStr>>(script: &str, args: &[S]) -> (Child, String) {
    let mut child = py(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 with h2 (scripts/test.sh installs it)");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.as_mut().unwrap()), &mut line)
        .unwrap();
    (child, line)
}

/// Start a Python upstream and read the loopback port it listens on.
pub fn python_upstream(mut cmd: Command) -> (PyServer, SocketAddr) {
    use std::io::{BufRead, BufReader};
    let mut server = PyServer(cmd.stdout(Stdio::piped()).spawn().unwrap());
    let mut line = String::new();
    BufReader::new(server.0.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let addr = format!("127.0.0.1:{}", line.trim()).parse().expect("the server printed its port");
    (server, addr)
}

pub fn env_map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Raw client side of the proxy: CONNECT, TLS with any SNI, raw HTTP bytes.
pub mod raw {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::sync::Arc;
    use std::time::Duration;

    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    pub fn connect(port: u16) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s
    }

    /// Send bytes, read the whole answer (the server closes, or the timeout hits).
    pub fn exchange(port: u16, bytes: &[u8]) -> String {
        let mut s = connect(port);
        s.write_all(bytes).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Open a CONNECT tunnel; returns the stream and the proxy's status line.
    pub fn tunnel(port: u16, target: &str) -> (TcpStream, String) {
        let mut s = connect(port);
        write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut b).unwrap_or(0) == 0 {
                break;
            }
            head.push(b[0]);
        }
        let mut text = String::from_utf8_lossy(&head).into_owned();
        let length = text
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
            })
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        if !text.starts_with("HTTP/1.1 200") && length > 0 {
            let mut rest = vec![0u8; length];
            let _ = s.read_exact(&mut rest);
            text.push_str(&String::from_utf8_lossy(&rest));
        }
        (s, text)
    }

    #[derive(Debug)]
    struct AcceptAnything;

    impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::aws_lc_rs::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    /// A client config that accepts any certificate (the attacker's own client).
    pub fn client_config() -> rustls::ClientConfig {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        rustls::ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything))
            .with_no_client_auth()
    }

    /// TLS over a tunnel with whatever SNI the attacker likes (certificate not checked).
    pub fn tls(stream: TcpStream, sni: &str) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
        let cfg = client_config();
        let name = ServerName::try_from(sni.to_string()).unwrap();
        let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
        rustls::StreamOwned::new(conn, stream)
    }

    /// Write a request and read until the peer closes.
    pub fn request<S: Read + Write>(mut s: S, bytes: &str) -> String {
        s.write_all(bytes.as_bytes()).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// An HTTP/2 client (hyper) inside a CONNECT tunnel, sending whatever `:authority` the
/// caller writes. Returns (status, trailers-or-headers note, body) per request.
pub mod h2 {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub struct Reply {
        pub status: u16,
        pub body: Bytes,
        pub trailers: Option<http::HeaderMap>,
    }

    /// An HTTP/2 connection through a CONNECT tunnel to `target`, TLS with `sni`.
    pub async fn connect(
        port: u16,
        target: &str,
        sni: &str,
    ) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
        let tls = tunnel(port, target, sni).await;
        let (sender, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        sender
    }

    /// The same on the `h2` crate itself: streams whose flow control the test drives.
    pub async fn connect_h2(port: u16, target: &str, sni: &str) -> ::h2::client::SendRequest<Bytes> {
        let tls = tunnel(port, target, sni).await;
        let (sender, conn) = ::h2::client::handshake(tls).await.unwrap();
        tokio::spawn(conn);
        sender
    }

    /// hyper's HTTP/2 client over `tunnel`, its connection driven on a task of its own.
    pub async fn hyper_h2<B>(port: u16, target: &str, sni: &str) -> hyper::client::conn::http2::SendRequest<B>
    where
        B: http_body::Body + Unpin + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let tls = tunnel(port, target, sni).await;
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        sender
    }

    /// A CONNECT tunnel to `target` through latchkey, TLS with `sni` and ALPN h2.
    pub async fn tunnel(
        port: u16,
        target: &str,
        sni: &str,
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        tcp.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(tcp.read_u8().await.unwrap());
        }
        assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
        let mut cfg = raw::client_config();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "latchkey offers h2");
        tls
    }

    pub fn requests(port: u16, target: &str, sni: &str, reqs: Vec<Request<Full<Bytes>>>) -> Vec<Reply> {
        runtime().block_on(async move {
            let sender = connect(port, target, sni).await;
            let tasks: Vec<_> = reqs
                .into_iter()
                .map(|r| {
                    let mut s = sender.clone();
                    tokio::spawn(async move {
                        let resp = s.send_request(r).await.unwrap();
                        let status = resp.status().as_u16();
                        let collected = resp.into_body().collect().await.unwrap();
                        let trailers = collected.trailers().cloned();
                        Reply { status, body: collected.to_bytes(), trailers }
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        })
    }

    pub fn get(authority: &str, path: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
        let mut b = Request::builder().uri(format!("https://{authority}{path}"));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Full::new(Bytes::new())).unwrap()
    }
}

/// One request head as a scripted upstream read it.
pub struct ScriptedRequest {
    pub path: String,
    /// The credential the upstream received (`x-api-key`, else `authorization`).
    pub credential: String,
    pub headers: Vec<(String, String)>,
}

pub type Script = Arc<dyn Fn(&ScriptedRequest) -> Vec<u8> + Send + Sync>;

/// TLS for a hand-written test upstream: the test leaf, HTTP/1.1 by ALPN.
pub fn h1_tls_acceptor() -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let p = pki();
    let certs = vec![rustls::pki_types::CertificateDer::from_pem_slice(p.cert_pem.as_bytes()).unwrap()];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(p.key_pem.as_bytes()).unwrap();
    let mut cfg = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key).unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
}

/// A TLS upstream (HTTP/1.1 by ALPN) that answers each connection's first request with
/// exactly the bytes `script` returns, then closes: for responses no well-behaved
/// server library would send (duplicate codings, secrets in the status line, raw
/// WebSocket frames).
pub fn scripted_upstream(script: Script) -> Upstream {
    raw_upstream(Arc::new(move |RawConn { conn, stream, seen }| {
        Box::pin(serve_scripted(conn, stream, seen, script.clone()))
    }))
}

/// One connection of `scripted_upstream`: its first request answered, then closed.
async fn serve_scripted(conn: usize, mut s: RawStream, seen: Arc<Mutex<Vec<Seen>>>, script: Script) {
    use tokio::io::AsyncWriteExt;
    let Some(Seen { path, headers, .. }) = read_request_head(&mut s, conn).await else { return };
    let find = |n: &str| headers.iter().find(|(k, _): &&(String, String)| k == n).map(|(_, v)| v.clone());
    let credential = find("x-api-key").or_else(|| find("authorization")).unwrap_or_default();
    let req = ScriptedRequest { path: path.clone(), credential, headers: headers.clone() };
    let reply = script(&req);
    seen.lock().unwrap().push(Seen {
        conn,
        method: String::new(),
        path,
        headers,
        body: Vec::new(),
        trailers: Vec::new(),
    });
    let _ = s.write_all(&reply).await;
    let _ = s.flush().await;
    // Let the proxy read everything before the close.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = s.shutdown().await;
}

/// What `keepalive_scripted_upstream` does with one request: write `bytes`, then (when
/// set) `later` after a pause, then close after `close` or read the connection's next
/// request.
pub struct Reply {
    pub bytes: Vec<u8>,
    pub later: Option<(Duration, Vec<u8>)>,
    pub close: Option<Duration>,
}

impl Reply {
    /// Write `bytes` and wait for the connection's next request.
    pub fn keep(bytes: impl Into<Vec<u8>>) -> Reply {
        Reply { bytes: bytes.into(), later: None, close: None }
    }

    /// Write `bytes`, then close the connection `after` that long.
    pub fn close(bytes: impl Into<Vec<u8>>, after: Duration) -> Reply {
        Reply { bytes: bytes.into(), later: None, close: Some(after) }
    }

    /// Also write `bytes` this long after the reply.
    pub fn then_later(self, pause: Duration, bytes: impl Into<Vec<u8>>) -> Reply {
        Reply { later: Some((pause, bytes.into())), ..self }
    }
}

/// A request as `keepalive_scripted_upstream` read it, with where it came.
pub struct KeptRequest {
    /// Which upstream connection carried it (accept order).
    pub conn: usize,
    /// Its place on that connection, from 0.
    pub index: usize,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

pub type KeepaliveScript = Arc<dyn Fn(&KeptRequest) -> Reply + Send + Sync>;

/// A TLS upstream (HTTP/1.1 by ALPN) that serves MANY requests per connection, each
/// answered with exactly the bytes `script` returns for it (request bodies framed by
/// `Content-Length` or chunked are read first): for the framing of pooled upstream
/// connections. `connections` counts accepted connections, `seen` logs every request
/// with its connection.
pub fn keepalive_scripted_upstream(script: KeepaliveScript) -> Upstream {
    raw_upstream(Arc::new(move |RawConn { conn, stream, seen }| {
        Box::pin(serve_kept(conn, stream, seen, script.clone()))
    }))
}

/// One connection of `keepalive_scripted_upstream`: requests read and answered in turn.
async fn serve_kept(conn: usize, stream: RawStream, seen: Arc<Mutex<Vec<Seen>>>, script: KeepaliveScript) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let mut s = BufReader::new(stream);
    for index in 0.. {
        let Some(Seen { method, path, headers, .. }) = read_request_head(&mut s, conn).await else { return };
        let find = |n: &str| headers.iter().find(|(k, _): &&(String, String)| k == n).map(|(_, v)| v.clone());
        let mut body = Vec::new();
        if find("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
            loop {
                let mut size = String::new();
                if s.read_line(&mut size).await.unwrap_or(0) == 0 {
                    return;
                }
                let hex = size.trim().split(';').next().unwrap_or("");
                let Ok(n) = usize::from_str_radix(hex, 16) else { return };
                if n == 0 {
                    // Trailers, up to the blank line.
                    loop {
                        let mut l = String::new();
                        if s.read_line(&mut l).await.unwrap_or(0) == 0 || l == "\r\n" {
                            break;
                        }
                    }
                    break;
                }
                let mut chunk = vec![0u8; n + 2];
                if s.read_exact(&mut chunk).await.is_err() {
                    return;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(n) = find("content-length").and_then(|v| v.parse::<usize>().ok()) {
            body = vec![0u8; n];
            if s.read_exact(&mut body).await.is_err() {
                return;
            }
        }
        let req = KeptRequest { conn, index, method, path, headers, body };
        let reply = script(&req);
        let KeptRequest { method, path, headers, body, .. } = req;
        seen.lock().unwrap().push(Seen { conn, method, path, headers, body, trailers: Vec::new() });
        let s = s.get_mut();
        let _ = s.write_all(&reply.bytes).await;
        let _ = s.flush().await;
        if let Some((pause, bytes)) = reply.later {
            tokio::time::sleep(pause).await;
            let _ = s.write_all(&bytes).await;
            let _ = s.flush().await;
        }
        if let Some(after) = reply.close {
            tokio::time::sleep(after).await;
            let _ = s.shutdown().await;
            return;
        }
    }
}

/// The server side of one connection `raw_upstream` accepted: TLS, HTTP/1.1 by ALPN.
pub type RawStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// One connection `raw_upstream` accepted: its place in accept order, the stream, and
/// the upstream's log (`Upstream::seen`) for what the handler read.
pub struct RawConn {
    pub conn: usize,
    pub stream: RawStream,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

pub type RawServe =
    Arc<dyn Fn(RawConn) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send + Sync>;

/// A TLS upstream (HTTP/1.1 by ALPN) that hands each connection to `serve` as it is:
/// for exchanges no request-then-response script can play (an answer before the body
/// was read, a body echoed back as it is read, a close in the middle of an upload).
/// `connections` counts accepted connections; `serve` logs to `seen` as it likes.
pub fn raw_upstream(serve: RawServe) -> Upstream {
    let acceptor = h1_tls_acceptor();
    let listener = runtime().block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (log, accepted) = (seen.clone(), connections.clone());
    runtime().spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let conn = accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (acceptor, serve, seen) = (acceptor.clone(), serve.clone(), log.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else { return };
                serve(RawConn { conn, stream, seen }).await;
            });
        }
    });
    Upstream { addr, seen, connections, open: Arc::default(), sse_next: Arc::new(tokio::sync::Notify::new()) }
}

/// Read one request head off `s` byte by byte (nothing past it): as a `Seen` of
/// connection `conn` with no body yet (header names lowercased). `None`: the connection
/// ended first.
pub async fn read_request_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S, conn: usize) -> Option<Seen> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.ok()?);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.lines();
    let mut line = lines.next().unwrap_or("").split(' ');
    let method = line.next().unwrap_or("").to_string();
    let path = line.next().unwrap_or("/").to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(Seen { conn, method, path, headers, body: Vec::new(), trailers: Vec::new() })
}

/// Write `chunk` `times` over into a peer that reads nothing (the writer's write timeout
/// set well above 15 s): latchkey must close `what` within 15 s, so the write fails
/// with the connection's end, not with its own timeout.
pub fn assert_let_go_while_writing(w: &mut impl Write, chunk: &[u8], times: usize, what: &str) {
    let started = std::time::Instant::now();
    let ended = (0..times).find_map(|_| w.write_all(chunk).err());
    let after = started.elapsed();
    let ended =
        ended.unwrap_or_else(|| panic!("{} bytes went into a peer that reads nothing", chunk.len() * times));
    assert!(
        !matches!(ended.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
        "{what} was still open after {after:?}: the client's write timed out ({ended})"
    );
    assert!(after < Duration::from_secs(15), "{what} let go only after {after:?}");
}
