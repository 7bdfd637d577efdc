//! A TLS origin on rustls, for `bench/cpu.py --origin rustls` (issue 20).
//!
//! The bench's nginx (Debian's, on OpenSSL 3.0) is the origin of every row, but its TLS
//! 1.3 handshake costs three times what rustls' does, so a "new connection per request"
//! row against it measures OpenSSL more than latchkey. This origin answers the same
//! paths as the bench's nginx with the handshake latchkey itself does (rustls, aws-lc,
//! the X25519MLKEM768 hybrid, TLS 1.3 tickets): direct and proxied then pay for the
//! same kind of handshake, and the row compares latchkey with an origin like it.
//!
//! One thread, as the bench's nginx has one worker.
//!
//!     cargo build --release --example origin
//!     target/release/examples/origin 127.0.0.1:8443 up.pem up.key SECRET

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, cert, key, secret] = &args[..] else {
        eprintln!("usage: origin ADDR CERT.pem KEY.pem SECRET");
        std::process::exit(2);
    };
    let certs = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let mut config = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let secret: Arc<str> = secret.as_str().into();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr.as_str()).await?;
        loop {
            let (tcp, _) = listener.accept().await?;
            let (acceptor, secret) = (acceptor.clone(), secret.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                if let Ok(tls) = acceptor.accept(tcp).await {
                    serve(tls, secret).await;
                }
            });
        }
    })
}

async fn serve(tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>, secret: Arc<str>) {
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(tls);
    let service = hyper::service::service_fn(move |req| answer(req, secret.clone()));
    let _ = if h2 {
        hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(io, service).await
    } else {
        hyper::server::conn::http1::Builder::new().serve_connection(io, service).await
    };
}

/// The bench's nginx's answers: `/`, `/upload`, and `/check` (was the credential written in?).
async fn answer(req: Request<Incoming>, secret: Arc<str>) -> Result<Response<Full<Bytes>>, Error> {
    let (status, text) = match req.uri().path() {
        "/" => (200, "hello from upstream\n"),
        "/upload" => (200, "uploaded\n"),
        "/check" if req.headers().get("x-api-key").is_some_and(|v| v.as_bytes() == secret.as_bytes()) => {
            (200, "injected\n")
        }
        "/check" => (403, "no credential\n"),
        _ => (404, "not found\n"),
    };
    let mut resp = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *resp.status_mut() = hyper::StatusCode::from_u16(status)?;
    Ok(resp)
}
