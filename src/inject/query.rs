//! `auth_type = "query"`: the secret as one query parameter, and its builder.

use std::borrow::Cow;

use http::request::Parts;

use super::build::{BuildError, Built, Sources};
use super::{InjectError, Injector, Slot, encode_component};
use crate::config::raw::RawCredential;
use crate::policy::{Destination, RequestHead};
use crate::secrets::{Secret, SecretValue};

/// `auth_type = "query"`: the secret as one query parameter.
#[derive(Debug)]
pub struct QueryInjector {
    param: String,
    value: SecretValue,
}

impl QueryInjector {
    pub fn new(param: String, value: SecretValue) -> Self {
        QueryInjector { param, value }
    }

    fn is_param(&self, pair: &str) -> bool {
        let name = pair.split('=').next().unwrap_or("");
        let decoded = crate::policy::percent_decode(name.replace('+', " ").as_bytes());
        decoded == self.param.as_bytes()
    }
}

impl Injector for QueryInjector {
    fn inject(
        &self,
        parts: &mut Parts,
        captures: &[(String, String)],
        _: Option<&[u8]>,
    ) -> Result<(), InjectError> {
        let secret = self
            .value
            .get(captures)
            .ok_or_else(|| InjectError::Unavailable("no secret for this destination".into()))?;
        let path = parts.uri.path();
        let mut pairs: Vec<&str> = parts
            .uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty() && !self.is_param(p))
            .collect();
        let ours = format!("{}={}", encode_component(&self.param), encode_component(secret.expose()));
        pairs.push(&ours);
        let pq = format!("{path}?{}", pairs.join("&"));
        let mut uri = parts.uri.clone().into_parts();
        uri.path_and_query =
            Some(pq.parse().map_err(|_| InjectError::Unavailable("cannot build the query string".into()))?);
        parts.uri = http::Uri::from_parts(uri)
            .map_err(|_| InjectError::Unavailable("cannot build the request URI".into()))?;
        Ok(())
    }

    fn carries_placeholder(&self, _: &Destination, head: &RequestHead<'_>, placeholder: &str) -> bool {
        let query = head.target.split_once('?').map(|(_, q)| q).unwrap_or("");
        query.split('&').any(|p| {
            self.is_param(p)
                && p.split_once('=').map(|(_, v)| crate::policy::percent_decode(v.as_bytes()))
                    == Some(placeholder.as_bytes().to_vec())
        })
    }

    fn presented<'h>(&self, _: &Destination, head: &RequestHead<'h>) -> Option<Cow<'h, str>> {
        let query = head.target.split_once('?')?.1;
        let (_, value) = query.split('&').find(|p| self.is_param(p))?.split_once('=')?;
        Some(Cow::Owned(
            String::from_utf8_lossy(&crate::policy::percent_decode(value.as_bytes())).into_owned(),
        ))
    }

    fn slots(&self) -> Vec<Slot> {
        vec![Slot::Query { query: self.param.clone() }]
    }

    fn secrets(&self, out: &mut Vec<Secret>) {
        self.value.add_to(out)
    }
}

/// `param` names the parameter; `value` (or a file or command) the secret.
pub fn build(c: &RawCredential, sources: &mut Sources<'_>) -> Result<Built, BuildError> {
    let param = c.param.clone().ok_or_else(|| BuildError::new("param", "query auth needs `param`"))?;
    if c.header.is_some() {
        return Err(BuildError::new("header", "query auth writes `param`, not a header"));
    }
    let src = sources.source("value", c.value.as_ref())?;
    let v = sources.resolve_or_unset(&src);
    Ok(Built::new(Box::new(QueryInjector::new(param, v)), src))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inject::header::tests::{parts, placeholder_in, secret};

    #[test]
    fn query_overrides_every_copy() {
        let inj = QueryInjector::new("key".into(), secret("S/1"));
        let mut p = parts("https://x.com/v1?key=a&KEY=b&k%65y=c&other=1&key", &[]);
        assert!(placeholder_in(&inj, &parts("/?key=ph", &[]), "ph"));
        inj.inject(&mut p, &[], None).unwrap();
        assert_eq!(p.uri.query().unwrap(), "KEY=b&other=1&key=S%2F1");
        assert_eq!(p.uri.path(), "/v1");
    }
}
