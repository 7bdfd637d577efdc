//! The hyper server settings latchkey serves clients with.

use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;

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
