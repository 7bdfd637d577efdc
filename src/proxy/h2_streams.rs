//! What both HTTP/2 legs do with a stream's body: read one from it ([`Received`]),
//! write one into it ([`pipe`]). The client-facing server (`h2_server`) reads requests
//! and writes responses; the upstream client (`h2_client`) the other way round.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::{HeaderMap, header};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::oneshot;

use super::{Body, BoxError};

/// How [`pipe`] ended without an error.
pub enum Piped {
    /// The body went whole, its end with it.
    Whole,
    /// The other side reset the stream (or went away below it) first.
    Reset,
}

/// What a sender keeps of what it sent on a stream, to send it again (`h2_client`: a
/// stream the upstream refused unprocessed). `()` keeps nothing.
pub trait Keep {
    fn data(&mut self, data: &Bytes);
    fn trailers(&mut self, trailers: &HeaderMap);
}

impl Keep for () {
    fn data(&mut self, _: &Bytes) {}
    fn trailers(&mut self, _: &HeaderMap) {}
}

/// Each frame of `body` up `send` (shown to `keep` first), waiting for room in the
/// stream's window after each data frame (so a slow reader slows the body, not
/// latchkey's memory), for `stall` at most each time when given. An error is for the
/// stream to be reset, with the body's own error if it failed. `body` stays the
/// caller's: what is left of it can be sent again.
pub async fn pipe(
    send: &mut SendStream<Bytes>,
    body: &mut Body,
    keep: &mut impl Keep,
    stall: Option<Duration>,
) -> Result<Piped, Option<BoxError>> {
    loop {
        let frame = tokio::select! {
            biased;
            reason = poll_fn(|cx| send.poll_reset(cx)) => {
                tracing::debug!("the stream's reader reset it: {reason:?}");
                return Ok(Piped::Reset);
            }
            frame = body.frame() => frame,
        };
        let frame = match frame {
            None => return send.send_data(Bytes::new(), true).map(|()| Piped::Whole).map_err(|_| None),
            Some(Err(e)) => return Err(Some(e)),
            Some(Ok(frame)) => frame,
        };
        let frame = match frame.into_data() {
            Ok(data) => {
                let eos = body.is_end_stream();
                let sent = data.len();
                keep.data(&data);
                send.send_data(data, eos).map_err(|_| None)?;
                if eos {
                    return Ok(Piped::Whole);
                }
                if sent != 0 {
                    // Room for this chunk before the next is read: a slow reader slows
                    // the body, and a stream holds one chunk at most. Waiting after the
                    // send, not before, lets a small answer go out in the turn it came
                    // in. A claim of one byte (as hyper, #4003), so a stream waiting
                    // here does not pin the connection's window.
                    send.reserve_capacity(1);
                    wait_for_room(send, stall).await?;
                }
                continue;
            }
            Err(frame) => frame,
        };
        if let Ok(trailers) = frame.into_trailers() {
            send.reserve_capacity(0);
            keep.trailers(&trailers);
            return send.send_trailers(trailers).map(|()| Piped::Whole).map_err(|_| None);
        }
    }
}

/// Until the stream has room for at least a byte; an error when it was reset, or when
/// `stall` passed without room (a reader that reads frames and opens no window is not
/// reading). The timer is made only when there is no room already.
async fn wait_for_room(
    send: &mut SendStream<Bytes>,
    stall: Option<Duration>,
) -> Result<(), Option<BoxError>> {
    if send.capacity() != 0 {
        return Ok(());
    }
    let room = async {
        while send.capacity() == 0 {
            match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Err(None),
            }
        }
        Ok(())
    };
    let Some(stall) = stall else { return room.await };
    tokio::time::timeout(stall, room).await.unwrap_or_else(|_| {
        tracing::debug!("h2: no window opened for {}s, resetting the stream", stall.as_secs());
        Err(None)
    })
}

/// A body read from a stream (a response upstream, a request from a client): its
/// window returned as it is read, its end (or its drop) told to whoever waits for it.
pub struct Received {
    recv: RecvStream,
    data_done: bool,
    /// What `Content-Length` says is left.
    remaining: Option<u64>,
    over: Option<oneshot::Sender<()>>,
}

impl Received {
    /// The body of a stream whose head was `headers`; `over` is sent (or dropped) when
    /// the body has ended or is dropped.
    pub fn new(recv: RecvStream, headers: &HeaderMap, over: Option<oneshot::Sender<()>>) -> Received {
        Received { recv, data_done: false, remaining: content_length(headers), over }
    }
}

impl http_body::Body for Received {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    if let Some(left) = &mut this.remaining {
                        *left = left.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                None => this.data_done = true,
            }
        }
        let trailers = ready!(this.recv.poll_trailers(cx));
        this.over = None;
        Poll::Ready(match trailers {
            Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
            Ok(None) => None,
            Err(e) => Some(Err(e.into())),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(left) => SizeHint::with_exact(left),
            None => SizeHint::default(),
        }
    }
}

/// `Content-Length`, when it is there once and a number.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    value.to_str().ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_content_length_counts_only_when_it_is_one_number() {
        let length = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append(header::CONTENT_LENGTH, v.parse().unwrap());
            }
            content_length(&headers)
        };
        assert_eq!(length(&["42"]), Some(42));
        assert_eq!(length(&[]), None);
        assert_eq!(length(&["4x"]), None);
        assert_eq!(length(&["42", "42"]), None);
    }
}
