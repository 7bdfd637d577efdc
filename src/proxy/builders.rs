//! The hyper server settings latchkey serves clients with.

use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// HTTP/2 server settings for intercepted tunnels that negotiated `h2`.
pub(super) fn h2_builder(
    limits: &crate::config::Limits,
) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(256)
        .enable_connect_protocol()
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// HTTP/1.1 server settings shared by the proxy port and intercepted tunnels.
pub(super) fn server_builder(limits: &crate::config::Limits) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        // The idle wait between keep-alive requests; the head itself is timed by
        // `framing::Guarded` with `header_read_timeout`.
        .header_read_timeout(limits.idle_timeout)
        .max_header_size(limits.max_header_bytes)
        .keep_alive(true)
        // hyper otherwise reads the socket while a request is answered, to notice a
        // client that went away, and that read reserves a second read buffer (the
        // request's head still holds the first): 8-16 KiB more per busy connection and
        // an allocation per request. A client that shuts its sending side (a half-close)
        // still gets its answer, as HTTP allows; one that went away is noticed when the
        // answer is written.
        .half_close(true);
    // hyper's default is 100 on the stack; any explicit value costs a heap allocation.
    if limits.max_headers != 100 {
        b.max_headers(limits.max_headers);
    }
    b
}
