//! Refusals latchkey answers itself (SPEC 6). A refusal is a kind — which fixes its HTTP
//! status and its `X-Latchkey-Error` token — and a message for the client. How it is
//! written back (latchkey's text line, or a gRPC status) is the proxy's business
//! (`proxy::respond`); what it means is decided here.

/// What latchkey refused, and so its status and `X-Latchkey-Error` token. Several kinds
/// may share a token where clients already rely on it (`credential-refused`,
/// `head-too-large`); a kind never changes its status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefusalKind {
    /// A `blocked_domains` pattern names the destination.
    BlockedDomain,
    /// Outside `allowed_domains` (global with `allowlist_only`, or the agent's own).
    NotAllowlisted,
    /// Unlisted with `on_unlisted = "ask"`, and a person denied it or nobody answered.
    NotApproved,
    /// A `blocked_patterns` entry in the request line, headers, body or trailers.
    BlockedPattern,
    /// Outbound scanning (`[proxy.dlp]`) found a secret that may not go there, or one of
    /// latchkey's own live secrets (always), or a body it cannot scan.
    Dlp,
    /// The destination resolves to a private, loopback or metadata address (invariant 12).
    Ssrf,
    /// A credential would go over plain HTTP (invariant 6).
    PlainHttp,
    /// The client is not in `allowed_clients`.
    ClientNotAllowed,
    /// `[agents]` are configured and the client named none, or named one wrongly.
    ProxyAuth,
    /// The agent may not use the credential the request would get.
    AgentCredential,
    /// `require_placeholder`, and the request does not carry it.
    PlaceholderRequired,
    /// `except_paths` keep a `require_placeholder` credential off this path.
    ExceptPath,
    /// TRACE/TRACK (or a method override naming them) on a credentialed route.
    TraceRefused,
    /// The credential is never written to this host: it would mint new credentials.
    MintingEndpoint,
    /// A scoped token in the credential's slot is refused (damaged, foreign, revoked,
    /// for another credential, or outside its scope), or `require_token` and none is
    /// there.
    Token,
    /// The request is in a form the credential cannot be applied to (presigned URL,
    /// chunk signatures...).
    CannotApply,
    /// The credential's configuration cannot serve this destination (no signing scope).
    CredentialUnusable,
    /// The credential's secret source or token refresh failed (invariant 10).
    CredentialFailed,
    /// The request names another host than the connection's destination (invariant 1).
    Misdirected,
    /// Malformed: host, target, request line, header, chunking; CONNECT inside a tunnel.
    BadRequest,
    /// Content-Length together with Transfer-Encoding.
    Smuggling,
    /// The request head is over `[proxy.limits]`.
    HeadTooLarge,
    /// The request target is longer than any server accepts.
    UriTooLong,
    /// A body the credential must hash (SigV4) is over its limit.
    BodyTooLarge,
    /// A credential's or agent's `requests_per_minute` / `tokens_per_day` is spent.
    RateLimited,
    /// The upstream could not be resolved or connected to.
    UpstreamUnreachable,
    /// TLS to the upstream failed (verification, no common protocol).
    UpstreamTls,
    /// The upstream reset or broke the exchange.
    UpstreamReset,
    /// The upstream answered in an encoding latchkey cannot scan for secrets.
    UpstreamEncoding,
    /// The upstream accepted a WebSocket extension latchkey did not offer.
    UpstreamWebSocket,
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// No upstream connection is free under the fan-out limits right now.
    UpstreamBusy,
    /// `[cluster]` with `on_store_error = "closed"`: the request is under a shared limit
    /// and Redis, which keeps it, does not answer.
    SharedState,
    /// The request log is required (`on_log_error = "block"`) and cannot be written.
    LogUnavailable,
    /// latchkey is stopping (SIGTERM, SIGINT): it finishes the requests in flight and
    /// takes no new one, so none is answered after its log line could be flushed. The
    /// connection closes; a client sends it again on a new one (another replica).
    ShuttingDown,
    /// Something latchkey itself could not do.
    Internal,
}

impl RefusalKind {
    pub fn status(self) -> u16 {
        use RefusalKind::*;
        match self {
            BlockedDomain | NotAllowlisted | NotApproved | BlockedPattern | Dlp | Ssrf | PlainHttp
            | ClientNotAllowed | AgentCredential | PlaceholderRequired | ExceptPath | TraceRefused
            | MintingEndpoint | Token => 403,
            ProxyAuth => 407,
            Misdirected => 421,
            BadRequest | Smuggling | CannotApply => 400,
            HeadTooLarge => 431,
            UriTooLong => 414,
            BodyTooLarge => 413,
            RateLimited => 429,
            CredentialFailed | CredentialUnusable | UpstreamUnreachable | UpstreamTls | UpstreamReset
            | UpstreamEncoding | UpstreamWebSocket => 502,
            UpstreamTimeout => 504,
            UpstreamBusy | SharedState | LogUnavailable | ShuttingDown => 503,
            Internal => 500,
        }
    }

    /// The `X-Latchkey-Error` value.
    pub fn token(self) -> &'static str {
        use RefusalKind::*;
        match self {
            BlockedDomain => "blocked-domain",
            NotAllowlisted => "not-allowlisted",
            NotApproved => "not-approved",
            BlockedPattern => "blocked-pattern",
            Dlp => "dlp",
            Ssrf => "ssrf",
            PlainHttp => "plain-http",
            ClientNotAllowed => "client-not-allowed",
            ProxyAuth => "proxy-auth",
            AgentCredential => "agent-credential",
            PlaceholderRequired => "placeholder-required",
            ExceptPath => "except-path",
            TraceRefused => "trace-refused",
            MintingEndpoint | CannotApply | CredentialUnusable => "credential-refused",
            Token => "token",
            CredentialFailed => "credential-failed",
            Misdirected => "misdirected",
            BadRequest => "bad-request",
            Smuggling => "smuggling",
            HeadTooLarge | UriTooLong => "head-too-large",
            BodyTooLarge => "body-too-large",
            RateLimited => "rate-limited",
            UpstreamUnreachable => "upstream-unreachable",
            UpstreamTls => "upstream-tls",
            UpstreamReset => "upstream-reset",
            UpstreamEncoding => "upstream-encoding",
            UpstreamWebSocket => "upstream-websocket",
            UpstreamTimeout => "upstream-timeout",
            UpstreamBusy => "upstream-busy",
            SharedState => "shared-state",
            LogUnavailable => "log-unavailable",
            ShuttingDown => "shutting-down",
            Internal => "internal",
        }
    }

    /// After this refusal the client's byte stream cannot be trusted to be framed as
    /// the client meant: the connection closes.
    pub fn closes_connection(self) -> bool {
        matches!(self, RefusalKind::Smuggling | RefusalKind::ShuttingDown)
    }
}

/// A refusal latchkey answers itself: its kind and one line for the client (after
/// `latchkey: `), which names what to do. Never a secret value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub kind: RefusalKind,
    pub message: String,
    /// Seconds for a `Retry-After` header (429, 503).
    pub retry_after: Option<u64>,
}

impl Refusal {
    pub fn new(kind: RefusalKind, message: impl Into<String>) -> Self {
        Refusal { kind, message: message.into(), retry_after: None }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Refusal::new(RefusalKind::BadRequest, message)
    }

    pub fn misdirected(message: impl Into<String>) -> Self {
        Refusal::new(RefusalKind::Misdirected, message)
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    /// The `X-Latchkey-Error` value.
    pub fn token(&self) -> &'static str {
        self.kind.token()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_keep_the_statuses_and_tokens_clients_rely_on() {
        let cases = [
            (RefusalKind::BlockedDomain, 403, "blocked-domain"),
            (RefusalKind::ProxyAuth, 407, "proxy-auth"),
            (RefusalKind::Misdirected, 421, "misdirected"),
            (RefusalKind::Smuggling, 400, "smuggling"),
            (RefusalKind::UriTooLong, 414, "head-too-large"),
            (RefusalKind::HeadTooLarge, 431, "head-too-large"),
            (RefusalKind::MintingEndpoint, 403, "credential-refused"),
            (RefusalKind::Token, 403, "token"),
            (RefusalKind::NotApproved, 403, "not-approved"),
            (RefusalKind::Dlp, 403, "dlp"),
            (RefusalKind::CannotApply, 400, "credential-refused"),
            (RefusalKind::CredentialUnusable, 502, "credential-refused"),
            (RefusalKind::RateLimited, 429, "rate-limited"),
            (RefusalKind::UpstreamBusy, 503, "upstream-busy"),
            (RefusalKind::SharedState, 503, "shared-state"),
            (RefusalKind::LogUnavailable, 503, "log-unavailable"),
            (RefusalKind::ShuttingDown, 503, "shutting-down"),
            (RefusalKind::UpstreamTimeout, 504, "upstream-timeout"),
        ];
        for (kind, status, token) in cases {
            assert_eq!((kind.status(), kind.token()), (status, token), "{kind:?}");
        }
        assert!(RefusalKind::Smuggling.closes_connection());
        assert!(RefusalKind::ShuttingDown.closes_connection());
        assert!(!RefusalKind::BadRequest.closes_connection());
    }
}
