//! The admin endpoint (`[admin] listen`, off by default; keep it on loopback):
//! `/healthz`, `/readyz`, `/metrics`, `/ca.crt` and `/config`. It is a separate
//! listener, and latchkey refuses its address as a proxy destination (invariant 12), so
//! an agent cannot reach it through the proxy.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::policy::CredState;
use crate::proxy::Proxy;

type Reply = Response<Full<bytes::Bytes>>;

pub async fn serve(proxy: Arc<Proxy>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(answer(&proxy, &req)) }
            });
            let mut b = http1::Builder::new();
            b.timer(TokioTimer::new()).header_read_timeout(std::time::Duration::from_secs(10));
            let _ = b.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<bytes::Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    r.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    r
}

fn answer(proxy: &Proxy, req: &Request<Incoming>) -> Reply {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "latchkey: the admin endpoint is read-only\n");
    }
    match req.uri().path() {
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n"),
        "/readyz" if proxy.is_ready() => reply(StatusCode::OK, TEXT, "ready\n"),
        "/readyz" => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "not ready\n"),
        "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            proxy.telemetry.metrics.encode(),
        ),
        "/ca.crt" => reply(StatusCode::OK, "application/x-pem-file", proxy.ca.cert_pem().to_string()),
        "/config" => {
            let body =
                serde_json::to_string_pretty(&effective(&proxy.generation().config)).unwrap_or_default();
            reply(StatusCode::OK, "application/json", body + "\n")
        }
        _ => reply(StatusCode::NOT_FOUND, TEXT, "latchkey: /healthz /readyz /metrics /ca.crt /config\n"),
    }
}

/// The config in force, with every secret replaced by where it comes from.
pub fn effective(config: &Config) -> Value {
    let p = &config.proxy;
    let patterns =
        |ps: &[crate::policy::pattern::Pattern]| ps.iter().map(|x| x.source.clone()).collect::<Vec<_>>();
    let credentials: Vec<Value> = config
        .policy
        .credentials
        .iter()
        .zip(&config.credentials)
        .map(|(rule, cred)| {
            let (state, why) = match &rule.state {
                CredState::Active => ("active", None),
                CredState::Inactive(w) => ("inactive", Some(w.clone())),
                CredState::Failed(w) => ("failed", Some(w.clone())),
            };
            json!({
                "name": cred.name,
                "auth_type": cred.auth_type,
                "source": cred.source,
                "state": state,
                "state_reason": why,
                "builtin": cred.builtin,
                "domains": patterns(&rule.patterns),
                "paths": rule.paths,
                "methods": rule.methods,
                "ports": rule.ports,
                "allow_http": rule.allow_http,
                "placeholder": cred.placeholder,
                "env": cred.env,
                "requests_per_minute": rule.limits.requests_per_minute,
                "tokens_per_day": rule.limits.tokens_per_day,
            })
        })
        .collect();
    let agents: Vec<Value> = config
        .agents
        .iter()
        .zip(&config.policy.agents)
        .map(|(a, rule)| {
            json!({
                "name": a.name,
                "token": if a.token.is_some() { "[set]" } else { "[unreadable]" },
                "credentials": rule.credentials.as_ref().map(|ids| {
                    ids.iter().filter_map(|i| config.credentials.get(*i)).map(|c| c.name.clone()).collect::<Vec<_>>()
                }),
                "allowed_domains": patterns(&rule.allowed),
                "requests_per_minute": rule.limits.requests_per_minute,
                "tokens_per_day": rule.limits.tokens_per_day,
                "client_certs": a.client_certs.len(),
                "client_ca": a.client_ca.is_some(),
            })
        })
        .collect();
    let f = &config.policy.filters;
    json!({
        "file": config.file.as_ref().map(|f| f.display().to_string()),
        "proxy": {
            "listen": p.listen.to_string(),
            "ca_dir": p.ca_dir.display().to_string(),
            "allowed_clients": p.allowed_clients.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "allow_private": p.allow_private.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "redact_responses": p.redact_responses,
            "via": p.via,
            "log_requests": p.log_requests,
            "log_file": p.log_file.display().to_string(),
            "timeout_secs": p.timeout.as_secs(),
            "tls": p.tls,
            "tls_names": p.tls_names,
            "ca_export_dir": p.ca_export_dir.as_ref().map(|d| d.display().to_string()),
        },
        "filters": {
            "blocked_domains": patterns(&f.blocked),
            "allowlist_only": f.allowlist_only,
            "allowed_domains": patterns(&f.allowed),
            "blocked_patterns": f.content.sources(),
        },
        "admin": config.admin.map(|a| a.to_string()),
        "telemetry": {
            "otlp_endpoint": config.telemetry.otlp_endpoint,
            "service_name": config.telemetry.service_name,
            "capture_body_bytes": config.telemetry.capture_body_bytes,
        },
        "credentials": credentials,
        "agents": agents,
    })
}
