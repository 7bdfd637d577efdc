//! latchkey: a credential-injecting egress proxy for AI agents and other untrusted code.
//!
//! Data flows one way: accept → identify destination → decide → (intercept) → inject →
//! forward → log. Each step has its module.

pub mod admin;
pub mod ca;
pub mod cli;
pub mod config;
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
pub mod secrets;
pub mod telemetry;
