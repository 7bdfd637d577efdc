//! An HTTP/2 request body latchkey stops reading early — a refusal decided on the head,
//! an upstream that answered before the upload ended — is read to its end (up to
//! `MAX_BYTES` or `MAX_TIME`) and thrown away instead of reset at once. Resetting a
//! stream the client is still uploading on makes clients such as curl report a stream
//! error instead of the response (the 403 they should read); draining lets the upload
//! finish, so the stream closes cleanly after the refusal. This is HTTP/2's lingering
//! close: HTTP/1.1 has it in hyper (the connection closes after the response).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::BoxError;

const MAX_BYTES: usize = 16 << 20;
const MAX_TIME: Duration = Duration::from_secs(5);

/// A client's request body: hyper's HTTP/1.1 server's, the own HTTP/2 server's
/// (`h2_server`), or the own HTTP/1.1 server's (`h1`).
pub enum ClientBody {
    Hyper(Incoming),
    /// A stream of the own HTTP/2 server (`h2_server`).
    H2(super::h2_streams::Received),
    Own(super::Body),
}

impl ClientBody {
    pub fn empty() -> ClientBody {
        ClientBody::own(http_body_util::Empty::new().map_err(|e| match e {}).boxed())
    }

    pub fn own(body: super::Body) -> ClientBody {
        ClientBody::Own(body)
    }
}

impl From<Incoming> for ClientBody {
    fn from(body: Incoming) -> ClientBody {
        ClientBody::Hyper(body)
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(|e| Box::new(e) as BoxError),
            ClientBody::H2(b) => Pin::new(b).poll_frame(cx),
            ClientBody::Own(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Hyper(b) => b.is_end_stream(),
            ClientBody::H2(b) => b.is_end_stream(),
            ClientBody::Own(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Hyper(b) => b.size_hint(),
            ClientBody::H2(b) => b.size_hint(),
            ClientBody::Own(b) => b.size_hint(),
        }
    }
}

/// A client's request body that drains itself when dropped unfinished (HTTP/2 only).
pub struct Lingering {
    body: Option<ClientBody>,
}

impl Lingering {
    pub fn new(body: ClientBody) -> Lingering {
        Lingering { body: Some(body) }
    }
}

impl Body for Lingering {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.body.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.body.as_ref().map(|b| b.size_hint()).unwrap_or_default()
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(ClientBody::H2(body)) = self.body.take() else { return };
        if body.is_end_stream() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(drain(body));
        }
    }
}

async fn drain(mut body: super::h2_streams::Received) {
    let read = async {
        let mut n = 0;
        while let Some(Ok(frame)) = body.frame().await {
            n += frame.data_ref().map_or(0, |d| d.len());
            if n > MAX_BYTES {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(MAX_TIME, read).await;
}
