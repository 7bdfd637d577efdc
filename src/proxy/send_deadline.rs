//! A client that takes none of what latchkey writes to it for `[proxy.limits]
//! idle_timeout` is let go (nginx's `send_timeout`). While a write waits on the client,
//! the upstream connection whose body it carries waits too: without a deadline a client
//! that stopped reading held that connection for as long as it kept its own open.
//!
//! Only a wait counts: each write that moves a byte starts the clock again, so a slow
//! reader is never cut, one that reads nothing is. The clock is made on the first wait
//! and set again only when a wait begins, not per write.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

pub struct SendDeadline<S> {
    io: S,
    after: Duration,
    /// Made on the first write that waits.
    sleep: Option<Pin<Box<Sleep>>>,
    /// A write is waiting on the peer: `sleep` is set for this wait.
    waiting: bool,
    /// Who takes the writes, for the error: "client" or "upstream".
    peer: &'static str,
}

impl<S> SendDeadline<S> {
    /// Writes to a client.
    pub fn new(io: S, after: Duration) -> Self {
        SendDeadline { io, after, sleep: None, waiting: false, peer: "client" }
    }

    /// Writes to an upstream (a blind tunnel's: an intercepted request's upload has
    /// `[proxy] timeout` instead).
    pub fn upstream(io: S, after: Duration) -> Self {
        SendDeadline { peer: "upstream", ..Self::new(io, after) }
    }

    /// The inner write is waiting: start the clock if this wait just began; an error once
    /// it ran out.
    fn wait<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        if !self.waiting {
            self.waiting = true;
            let deadline = Instant::now() + self.after;
            match &mut self.sleep {
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        let Some(sleep) = &mut self.sleep else { return Poll::Pending };
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the {} took no byte for {}s (idle_timeout)", self.peer, self.after.as_secs()),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn done<T>(&mut self, done: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match done {
            Poll::Pending => self.wait(cx),
            done => {
                self.waiting = false;
                done
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendDeadline<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let done = Pin::new(&mut self.io).poll_write(cx, data);
        self.done(done, cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let done = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.done(done, cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let done = Pin::new(&mut self.io).poll_flush(cx);
        self.done(done, cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let done = Pin::new(&mut self.io).poll_shutdown(cx);
        self.done(done, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_takes_nothing_is_cut_a_slow_one_is_not() {
        let (a, mut b) = tokio::io::duplex(16);
        let mut w = SendDeadline::new(a, Duration::from_secs(10));
        // Slow: 16 bytes every 9 s, 30 times; never 10 s without a byte taken.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            for _ in 0..30 {
                tokio::time::sleep(Duration::from_secs(9)).await;
                b.read_exact(&mut buf).await.unwrap();
            }
            b
        });
        w.write_all(&[7u8; 16 * 31]).await.unwrap();
        let _b = reader.await.unwrap();
        // Now nothing is read: the next write that waits fails 10 s after it began.
        let started = Instant::now();
        let err = w.write_all(&[7u8; 64]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }
}
