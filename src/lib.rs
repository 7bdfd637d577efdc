//! latchkey: a credential-injecting egress proxy for AI agents and other untrusted code.
//!
//! Data flows one way: accept → identify destination → decide → (intercept) → inject →
//! forward → log. Each step has its module.

pub mod admin;
pub mod audit;
pub mod ca;
pub mod cli;
pub mod config;
pub mod explain;
pub mod fsutil;
#[doc(hidden)]
pub mod fuzzing;
pub mod inject;
pub mod jail;
pub mod limits;
pub mod metrics;
pub mod otlp;
pub mod policy;
pub mod proxy;
pub mod redact;
pub mod seal;
pub mod secrets;
pub mod token;
pub mod usage;
