//! The admin listener (`[admin] listen`, off by default; keep it on loopback):
//! `/healthz`, `/readyz` and `/ca.crt` for anyone; with the admin token (`auth`):
//! `/metrics`, `/config`, the approvals and live-view API (`api`, `events`) and the
//! web view at `/` (`ui`, `[admin] ui = true`). It is a separate listener, and
//! latchkey refuses its address as a proxy destination (invariant 12), so an agent
//! cannot reach it through the proxy (nor from a jail, whose only way out is the proxy).

mod api;
pub mod auth;
mod events;
mod ui;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::config::Config;
use crate::policy::CredState;
use crate::proxy::Proxy;
use auth::{Proof, Token};

type Reply = Response<BoxBody<Bytes, Infallible>>;

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

/// What every admin connection shares.
pub struct Admin {
    pub proxy: Arc<Proxy>,
    /// `None` when the token file could not be read or created: then only the public
    /// endpoints answer (fail closed, but health probes keep working).
    pub token: Option<Token>,
}

pub async fn serve(proxy: Arc<Proxy>, token: Option<Token>, listener: TcpListener) {
    let admin = Arc::new(Admin { proxy, token });
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let admin = admin.clone();
        tokio::spawn(async move {
            // A live-view watcher that stops reading is cut here: its connection is
            // dropped, not left to hold the feed back.
            let cut = Arc::new(Notify::new());
            let service = {
                let cut = cut.clone();
                service_fn(move |req| {
                    let (admin, cut) = (admin.clone(), cut.clone());
                    async move { Ok::<_, Infallible>(secured(answer(&admin, req, cut).await)) }
                })
            };
            let mut b = http1::Builder::new();
            b.timer(TokioTimer::new()).header_read_timeout(std::time::Duration::from_secs(10));
            let served = b.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = served => {}
                _ = cut.notified() => {}
            }
        });
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json_reply(status: StatusCode, value: &Value) -> Reply {
    reply(status, JSON, serde_json::to_string(value).unwrap_or_default() + "\n")
}

/// Headers every admin answer carries: nothing cached, no framing by another page, no
/// type sniffing, no referrer, and the view's scripts from the view only.
fn secured(mut r: Reply) -> Reply {
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    r
}

fn refused(status: StatusCode, why: &str) -> Reply {
    reply(status, TEXT, format!("latchkey: {why}\n"))
}

async fn answer(admin: &Admin, req: Request<Incoming>, cut: Arc<Notify>) -> Reply {
    let proxy = &admin.proxy;
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/healthz" if get => return reply(StatusCode::OK, TEXT, "ok\n"),
        "/readyz" if get && proxy.is_ready() => return reply(StatusCode::OK, TEXT, "ready\n"),
        "/readyz" if get => return reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "not ready\n"),
        "/ca.crt" if get => {
            return reply(StatusCode::OK, "application/x-pem-file", proxy.ca.cert_pem().to_string());
        }
        _ => {}
    }
    if auth::foreign_origin(req.headers()) {
        return refused(
            StatusCode::FORBIDDEN,
            "this request comes from another origin than the admin listener's own",
        );
    }
    let ui = proxy.generation().config.admin_access.ui;
    if ui && let Some(asset) = ui::asset(req.method(), &path) {
        return asset;
    }
    let Some(token) = &admin.token else {
        return refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "no admin token ([admin] token_file could not be read or created; see latchkey's log): only /healthz, /readyz and /ca.crt are served",
        );
    };
    if path == "/login" && req.method() == Method::POST {
        return api::login(token, req).await;
    }
    let Some(proof) = token.proof(req.headers()) else {
        let mut r = refused(
            StatusCode::UNAUTHORIZED,
            "the admin token is needed (Authorization: Bearer, from [admin] token_file)",
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"latchkey\""));
        return r;
    };
    let changes_state = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if changes_state
        && proof == Proof::Cookie
        && !(req.headers().contains_key(header::ORIGIN) && token.csrf_ok(req.headers()))
    {
        return refused(
            StatusCode::FORBIDDEN,
            "a change made with the view's session needs its Origin and CSRF token",
        );
    }
    authorized(admin, token, req, &path, cut).await
}

async fn authorized(
    admin: &Admin,
    token: &Token,
    req: Request<Incoming>,
    path: &str,
    cut: Arc<Notify>,
) -> Reply {
    let proxy = &admin.proxy;
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    match path {
        "/metrics" if get => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            proxy.telemetry.metrics.encode(),
        ),
        "/config" if get => {
            let body =
                serde_json::to_string_pretty(&effective(&proxy.generation().config)).unwrap_or_default();
            reply(StatusCode::OK, JSON, body + "\n")
        }
        "/api/session" if get => json_reply(StatusCode::OK, &json!({ "csrf": token.csrf() })),
        "/api/events" if get => events::stream(proxy, cut),
        "/api/approvals" if get => match proxy.approvals.pending().await {
            Ok(list) => json_reply(StatusCode::OK, &json!(list)),
            Err(e) => refused(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        },
        "/api/credentials" if get => {
            json_reply(StatusCode::OK, &api::credentials(&proxy.generation().config))
        }
        "/api/usage" if get => json_reply(StatusCode::OK, &api::usage(proxy)),
        p if p.starts_with("/api/approvals/") && req.method() == Method::POST => {
            let id = p.trim_start_matches("/api/approvals/").to_string();
            api::decide(proxy, &id, req).await
        }
        _ if !get => refused(StatusCode::METHOD_NOT_ALLOWED, "not a method this endpoint answers"),
        _ => refused(
            StatusCode::NOT_FOUND,
            "/healthz /readyz /ca.crt /metrics /config /api/events /api/approvals /api/credentials /api/usage",
        ),
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
