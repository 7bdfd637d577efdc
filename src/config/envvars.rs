//! `LATCHKEY_*` environment variables that override config keys, for containers where
//! configuration by environment is the habit. They are written into the parsed file
//! before it is compiled, so they get exactly the file's validation; an error in a value
//! that came from a variable names the variable (see [`Overrides::variable_for`]).

use super::raw::{RawAdmin, RawConfig};

/// One overridable key: the variable, the key path it overrides, and how it is written.
struct Var {
    name: &'static str,
    key: &'static str,
    kind: Kind,
}

enum Kind {
    /// `ip:port` → `proxy.bind` and `proxy.port`.
    Listen,
    Str(fn(&mut RawConfig) -> &mut String),
    OptStr(fn(&mut RawConfig) -> &mut Option<String>),
    /// Comma-separated; blanks dropped.
    List(fn(&mut RawConfig) -> &mut Vec<String>),
    Bool(fn(&mut RawConfig) -> &mut bool),
}

/// Every variable, in the order they are applied (and documented).
const VARS: &[Var] = &[
    Var { name: "LATCHKEY_LISTEN", key: "proxy.bind", kind: Kind::Listen },
    Var { name: "LATCHKEY_CA_DIR", key: "proxy.ca_dir", kind: Kind::Str(|r| &mut r.proxy.ca_dir) },
    Var {
        name: "LATCHKEY_CA_EXPORT_DIR",
        key: "proxy.ca_export_dir",
        kind: Kind::OptStr(|r| &mut r.proxy.ca_export_dir),
    },
    Var {
        name: "LATCHKEY_ALLOWED_CLIENTS",
        key: "proxy.allowed_clients",
        kind: Kind::List(|r| &mut r.proxy.allowed_clients),
    },
    Var {
        name: "LATCHKEY_ALLOWED_DOMAINS",
        key: "proxy.filters.allowed_domains",
        kind: Kind::List(|r| &mut r.proxy.filters.allowed_domains),
    },
    Var {
        name: "LATCHKEY_ALLOWLIST_ONLY",
        key: "proxy.filters.allowlist_only",
        kind: Kind::Bool(|r| &mut r.proxy.filters.allowlist_only),
    },
    Var {
        name: "LATCHKEY_BLOCKED_DOMAINS",
        key: "proxy.filters.blocked_domains",
        kind: Kind::List(|r| &mut r.proxy.filters.blocked_domains),
    },
    Var {
        name: "LATCHKEY_ALLOW_PRIVATE",
        key: "proxy.allow_private",
        kind: Kind::List(|r| &mut r.proxy.allow_private),
    },
    Var { name: "LATCHKEY_INTERCEPT", key: "proxy.intercept", kind: Kind::Str(|r| &mut r.proxy.intercept) },
    Var {
        name: "LATCHKEY_SECRETS_DIR",
        key: "proxy.secrets_dir",
        kind: Kind::Str(|r| &mut r.proxy.secrets_dir),
    },
    Var {
        name: "LATCHKEY_TRANSPARENT",
        key: "proxy.transparent",
        kind: Kind::OptStr(|r| &mut r.proxy.transparent),
    },
    Var {
        name: "LATCHKEY_TRANSPARENT_AGENT",
        key: "proxy.transparent_agent",
        kind: Kind::OptStr(|r| &mut r.proxy.transparent_agent),
    },
    Var { name: "LATCHKEY_PROXY_TLS", key: "proxy.tls", kind: Kind::Bool(|r| &mut r.proxy.tls) },
    Var { name: "LATCHKEY_TLS_NAMES", key: "proxy.tls_names", kind: Kind::List(|r| &mut r.proxy.tls_names) },
    Var {
        name: "LATCHKEY_LOG_REQUESTS",
        key: "proxy.logging.log_requests",
        kind: Kind::Bool(|r| &mut r.proxy.logging.log_requests),
    },
    Var {
        name: "LATCHKEY_LOG_FILE",
        key: "proxy.logging.log_file",
        kind: Kind::Str(|r| &mut r.proxy.logging.log_file),
    },
    Var {
        name: "LATCHKEY_ADMIN_LISTEN",
        key: "admin.listen",
        kind: Kind::OptStr(|r| &mut r.admin.get_or_insert_with(RawAdmin::default).listen),
    },
    Var {
        name: "LATCHKEY_REDIS",
        key: "cluster.redis",
        kind: Kind::OptStr(|r| &mut r.cluster.get_or_insert_with(Default::default).redis),
    },
    Var {
        name: "LATCHKEY_ON_STORE_ERROR",
        key: "cluster.on_store_error",
        kind: Kind::OptStr(|r| &mut r.cluster.get_or_insert_with(Default::default).on_store_error),
    },
];

/// The names of every overriding variable (for docs and `check`).
pub fn names() -> impl Iterator<Item = &'static str> {
    VARS.iter().map(|v| v.name)
}

/// Which keys came from which variable.
#[derive(Debug, Default)]
pub struct Overrides {
    applied: Vec<(&'static str, &'static str)>,
}

impl Overrides {
    /// The variable that set `key` (a dotted path), if one did. `LATCHKEY_LISTEN` sets
    /// both `proxy.bind` and `proxy.port`.
    pub fn variable_for(&self, key: &str) -> Option<&'static str> {
        self.applied.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    pub fn is_empty(&self) -> bool {
        self.applied.is_empty()
    }
}

/// A value that cannot even be read as its type (an address, a boolean).
pub struct BadValue {
    pub variable: &'static str,
    pub key: &'static str,
    pub message: String,
}

/// Write every set `LATCHKEY_*` variable into `raw`.
pub fn apply(raw: &mut RawConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Overrides, BadValue> {
    let mut out = Overrides::default();
    for var in VARS {
        let Some(value) = env(var.name) else { continue };
        let fail = |message: String| BadValue { variable: var.name, key: var.key, message };
        match var.kind {
            Kind::Listen => {
                let addr: std::net::SocketAddr = value.trim().parse().map_err(|_| {
                    fail(format!("{value:?} is not ip:port (e.g. 0.0.0.0:3128 or [::]:3128)"))
                })?;
                raw.proxy.bind = addr.ip().to_string();
                raw.proxy.port = addr.port();
                out.applied.push(("proxy.port", var.name));
            }
            Kind::Str(field) => *field(raw) = value,
            Kind::OptStr(field) => *field(raw) = Some(value),
            Kind::List(field) => *field(raw) = split_list(&value),
            Kind::Bool(field) => {
                *field(raw) = parse_bool(&value)
                    .ok_or_else(|| fail(format!("{value:?} is not a boolean (true/false, 1/0, yes/no)")))?
            }
        }
        // An allowlist given by variable is meant to be enforced (paude's ALLOWED_DOMAINS
        // habit; empty means no allowlist): turn allowlist_only on unless
        // LATCHKEY_ALLOWLIST_ONLY (applied after this one) says otherwise.
        if var.name == "LATCHKEY_ALLOWED_DOMAINS" && !raw.proxy.filters.allowed_domains.is_empty() {
            raw.proxy.filters.allowlist_only = true;
        }
        out.applied.push((var.key, var.name));
    }
    Ok(out)
}

fn split_list(value: &str) -> Vec<String> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
}

fn parse_bool(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" | "" => Some(false),
        _ => None,
    }
}
