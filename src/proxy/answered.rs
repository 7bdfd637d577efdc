//! The rest of an upload once its answer is over: `[proxy] timeout` at most.
//!
//! An upstream may answer before it has read a whole upload (a 413, a short reply). The
//! rest of the body still goes up, from whatever drives the upstream connection — the
//! own client's upload task, the HTTP/2 leg's — and that waits on the
//! client. A client that stops sending but keeps its connection or stream open would
//! hold the upstream connection (and its own) for ever, its own no longer counted once
//! its connection task had given up on it. So a request body is [`bounded`]: once its
//! response body has ended (or was dropped), the rest of the upload has `limit` to
//! arrive in all (a total, as `timeout` bounds a request before its answer), or it fails
//! and the upstream sees the upload cut short. While the response still streams, nothing
//! is timed: a duplex exchange (an echo, a gRPC stream) lasts as long as it is used.
//!
//! The timer runs while the body is polled, that is while the upstream leg wants more
//! of it: an upstream that stops reading an upload it has answered leaves the upload
//! waiting for room to write, the body unpolled and untimed. So both upload tasks have
//! a deadline of their own for that: the own client's (`client::finish_upload`) and
//! the HTTP/2 leg's (`h2_client`), which waits for the stream's window. (hyper's
//! client, which took some uploads until the thirteenth session, had none.)

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::oneshot;
use tokio::time::Sleep;

use super::{Body, BoxError};

/// A request body that must end within `limit` of its response's end.
pub struct Bounded {
    body: Body,
    /// Until the response has ended.
    answer: Option<oneshot::Receiver<()>>,
    limit: Duration,
    deadline: Option<Pin<Box<Sleep>>>,
}

/// A response body that tells its request body when it has ended (or was dropped).
pub struct Answered<B> {
    body: B,
    over: Option<oneshot::Sender<()>>,
}

/// `body` bounded by `limit` from its answer's end; the answer's body is to be wrapped
/// by the returned function.
pub fn bounded(body: Body, limit: Duration) -> (Bounded, impl FnOnce(Body) -> Answered<Body>) {
    let (tx, rx) = oneshot::channel();
    let bounded = Bounded { body, answer: Some(rx), limit, deadline: None };
    (bounded, move |body| Answered { body, over: Some(tx) })
}

#[derive(Debug, thiserror::Error)]
#[error("the rest of the request body did not come within {0}s of the response's end")]
pub struct Late(u64);

impl HttpBody for Bounded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        // The body waits on the client; once the answer is over, so does a timer.
        if let Some(answer) = &mut this.answer {
            // Sent or dropped, either way the answer is over.
            ready!(Pin::new(answer).poll(cx)).ok();
            this.answer = None;
            this.deadline = Some(Box::pin(tokio::time::sleep(this.limit)));
        }
        if let Some(deadline) = &mut this.deadline {
            ready!(deadline.as_mut().poll(cx));
        }
        Poll::Ready(Some(Err(Box::new(Late(this.limit.as_secs())))))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl<B> HttpBody for Answered<B>
where
    B: HttpBody<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            this.over = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    /// A body the test feeds frame by frame.
    struct Fed(mpsc::Receiver<Bytes>);

    impl HttpBody for Fed {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        }
    }

    fn fed() -> (Body, mpsc::Sender<Bytes>) {
        let (tx, rx) = mpsc::channel(1);
        (Fed(rx).boxed(), tx)
    }

    const LIMIT: Duration = Duration::from_secs(300);

    #[tokio::test(start_paused = true)]
    async fn an_upload_stalled_past_its_answers_end_fails_at_the_limit_and_not_before() {
        let (body, tx) = fed();
        let (mut upload, answered) = bounded(body, LIMIT);
        let (response, more) = fed();
        let mut response = answered(response);
        tx.send(Bytes::from_static(b"one")).await.unwrap();
        assert!(upload.frame().await.unwrap().is_ok());
        // The response still streams: a stalled upload waits as long as it takes.
        let waited = tokio::time::timeout(Duration::from_secs(3600), upload.frame()).await;
        assert!(waited.is_err(), "timed while the answer went on");
        drop(more);
        assert!(response.frame().await.is_none(), "the answer's end");
        let started = tokio::time::Instant::now();
        let failed = upload.frame().await.unwrap();
        assert!(failed.unwrap_err().to_string().contains("within 300s"));
        assert_eq!(started.elapsed(), LIMIT);
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_answer_is_over_and_an_upload_that_ends_in_time_is_passed_on_whole() {
        let (body, tx) = fed();
        let (mut upload, answered) = bounded(body, LIMIT);
        drop(answered(fed().0));
        let feeder = tokio::spawn(async move {
            for _ in 0..2 {
                tokio::time::sleep(Duration::from_secs(100)).await;
                tx.send(Bytes::from_static(b"more")).await.unwrap();
            }
        });
        // Each frame awaited (the timer running) while the feeder sleeps.
        for _ in 0..2 {
            assert!(upload.frame().await.unwrap().is_ok());
        }
        feeder.await.unwrap();
        assert!(upload.frame().await.is_none(), "the end, before the limit");
    }
}
