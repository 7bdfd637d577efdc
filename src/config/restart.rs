//! What a reload cannot change in a running process (listeners, the CA, the log, the
//! span exporter, the serving threads, the process-wide connection limits): such a
//! config is refused and the running one stays.

use super::Config;

/// What a reload cannot change in a running process.
pub fn restart_needed(old: &Config, new: &Config) -> Option<&'static str> {
    let (a, b) = (old.proxy.listen, new.proxy.listen);
    if a.ip() != b.ip() || (a.port() != b.port() && b.port() != 0) {
        return Some("[proxy] port or bind");
    }
    if old.proxy.ca_dir != new.proxy.ca_dir {
        return Some("[proxy] ca_dir");
    }
    if old.proxy.tls != new.proxy.tls || old.proxy.tls_names != new.proxy.tls_names {
        return Some("[proxy] tls or tls_names");
    }
    if old.proxy.threads != new.proxy.threads {
        return Some("[proxy] threads");
    }
    if old.proxy.transparent != new.proxy.transparent {
        return Some("[proxy] transparent");
    }
    if old.cluster != new.cluster {
        return Some("[cluster]");
    }
    if old.admin != new.admin {
        return Some("[admin] listen");
    }
    if old.admin_access.ui != new.admin_access.ui
        || old.admin_access.token_file != new.admin_access.token_file
    {
        return Some("[admin] ui or token_file");
    }
    if old.proxy.log_requests != new.proxy.log_requests
        || old.proxy.log_file != new.proxy.log_file
        || old.proxy.hmac_key_file != new.proxy.hmac_key_file
        || old.proxy.on_log_error != new.proxy.on_log_error
    {
        return Some("[proxy.logging]");
    }
    if old.telemetry.otlp_endpoint != new.telemetry.otlp_endpoint
        || old.telemetry.service_name != new.telemetry.service_name
    {
        return Some("[telemetry]");
    }
    if old.proxy.limits.max_connections != new.proxy.limits.max_connections {
        return Some("[proxy.limits] max_connections");
    }
    if old.proxy.limits.max_upstream_connections != new.proxy.limits.max_upstream_connections {
        return Some("[proxy.limits] max_upstream_connections");
    }
    None
}
