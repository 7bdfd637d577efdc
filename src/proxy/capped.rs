//! `[proxy.limits] max_tunnel_bytes`: a CONNECT tunnel that has carried this many bytes
//! (both directions together, counted on the client side) is cut. Bounds what one tunnel
//! can move — an exfiltration or abuse budget — whether latchkey intercepts it or not.
//! It also counts what moved each way, so a tunnel's log line has its bytes however the
//! tunnel ended (cap, error, timeout).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct Capped<S> {
    io: S,
    left: Option<u64>,
    read: u64,
    written: u64,
}

impl<S> Capped<S> {
    pub fn new(io: S, cap: Option<u64>) -> Self {
        Capped { io, left: cap, read: 0, written: 0 }
    }

    /// Bytes read from and written to the inner stream so far.
    pub fn moved(&self) -> (u64, u64) {
        (self.read, self.written)
    }

    /// How many bytes may move next (`usize::MAX` without a cap); `Err` once spent.
    fn room(&self) -> io::Result<usize> {
        match self.left {
            None => Ok(usize::MAX),
            Some(0) => Err(io::Error::other("tunnel byte cap (max_tunnel_bytes) reached")),
            Some(n) => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
        }
    }

    fn charge(&mut self, n: usize) {
        if let Some(left) = &mut self.left {
            *left -= n as u64;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Capped<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let room = self.room()?;
        if room >= buf.remaining() {
            let before = buf.filled().len();
            std::task::ready!(Pin::new(&mut self.io).poll_read(cx, buf))?;
            let n = buf.filled().len() - before;
            self.charge(n);
            self.read += n as u64;
            return Poll::Ready(Ok(()));
        }
        // Read no further than the cap.
        let mut limited = ReadBuf::new(buf.initialize_unfilled_to(room));
        std::task::ready!(Pin::new(&mut self.io).poll_read(cx, &mut limited))?;
        let n = limited.filled().len();
        buf.advance(n);
        self.charge(n);
        self.read += n as u64;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Capped<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let room = self.room()?;
        let n = std::task::ready!(Pin::new(&mut self.io).poll_write(cx, &data[..data.len().min(room)]))?;
        self.charge(n);
        self.written += n as u64;
        Poll::Ready(Ok(n))
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let room = self.room()?;
        let total = bufs.iter().map(|b| b.len()).fold(0usize, usize::saturating_add);
        if total > room {
            // Near the cap: one slice, cut at it, as `poll_write` does.
            let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &b[..]);
            return self.poll_write(cx, first);
        }
        let n = std::task::ready!(Pin::new(&mut self.io).poll_write_vectored(cx, bufs))?;
        self.charge(n);
        self.written += n as u64;
        Poll::Ready(Ok(n))
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn both_directions_count_against_one_cap() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut capped = Capped::new(a, Some(10));
        capped.write_all(b"123456").await.unwrap();
        b.write_all(b"abcd").await.unwrap();
        let mut got = [0u8; 4];
        capped.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"abcd", "exactly at the cap is fine");
        assert!(capped.write_all(b"x").await.is_err(), "one byte more is not");
        assert_eq!(capped.moved(), (4, 6), "what moved, counted after the cap too");
        let (a, mut b) = tokio::io::duplex(1024);
        let mut capped = Capped::new(a, Some(5));
        b.write_all(b"0123456789").await.unwrap();
        let mut got = Vec::new();
        assert!(capped.read_to_end(&mut got).await.is_err());
        assert_eq!(got, b"01234", "reads stop exactly at the cap");
        let (a, _b) = tokio::io::duplex(64);
        let mut free = Capped::new(a, None);
        free.write_all(&[0u8; 32]).await.unwrap();
    }

    /// rustls hands a handshake flight or a download's records over as several slices:
    /// they go out in one write, and the cap still holds to the byte.
    #[tokio::test]
    async fn vectored_writes_go_whole_and_stop_at_the_cap() {
        use std::io::IoSlice;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (mut server, _) = server.unwrap();
        let mut capped = Capped::new(client.unwrap(), Some(10));
        assert!(capped.is_write_vectored(), "a TCP stream's vectored writes are not flattened");
        let n = capped.write_vectored(&[IoSlice::new(b"abc"), IoSlice::new(b"defg")]).await.unwrap();
        assert_eq!(n, 7, "both slices in one write");
        let n = capped.write_vectored(&[IoSlice::new(b""), IoSlice::new(b"hijkl")]).await.unwrap();
        assert_eq!(n, 3, "cut at the cap");
        assert!(capped.write_vectored(&[IoSlice::new(b"m")]).await.is_err());
        assert_eq!(capped.moved(), (0, 10));
        drop(capped);
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"abcdefghij");
    }
}
