//! latchkey: a credential-injecting egress proxy for AI agents and other untrusted code.
//!
//! Data flows one way: accept → identify destination → decide → (intercept) → inject →
//! forward → redact → log. The decision is one pure function (`policy::decision`, asked
//! through `Config::decide`); the proxy's exchange runs in named phases
//! (`proxy::exchange`). `docs/architecture.md` is the map.

/// An error that is one message for the user (it names the file, rule or command at
/// fault): a `thiserror` type around the text, made from a `String` or `&str` by `?`.
macro_rules! message_error {
    ($(#[$doc:meta])* $vis:vis $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
        #[error("{0}")]
        $vis struct $name(pub String);

        impl From<String> for $name {
            fn from(message: String) -> Self {
                $name(message)
            }
        }

        impl From<&str> for $name {
            fn from(message: &str) -> Self {
                $name(message.to_string())
            }
        }
    };
}

pub mod admin;
pub mod approvals;
pub mod ca;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod dlp;
pub mod explain;
/// Fuzz entry points, for `fuzz/` (feature `fuzzing`) and the unit tests.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod inject;
pub mod jail;
pub mod limits;
pub mod policy;
pub mod proxy;
pub mod redact;
pub mod seal;
pub mod secrets;
pub mod telemetry;
pub mod token;
