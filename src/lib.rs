//! latchkey: a credential-injecting egress proxy for AI agents and other untrusted code.
//!
//! Data flows one way: accept → identify destination → decide → (intercept) → inject →
//! forward → log. Each step has its module.

pub mod policy;
pub mod fsutil;
pub mod inject;
pub mod secrets;
pub mod config;
pub mod ca;
pub mod audit;
pub mod proxy;
pub mod cli;
