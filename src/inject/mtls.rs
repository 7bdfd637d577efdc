//! `auth_type = "mtls"`: the credential is the client certificate latchkey presents on
//! the upstream connection (its own pool: invariant 7); nothing is written into the
//! request.

use http::request::Parts;

use super::build::{BuildError, Built, Sources};
use super::{InjectError, Injector, Slot};
use crate::config::raw::RawCredential;
use crate::policy::{Destination, RequestHead};
use crate::secrets::{Secret, Source};

/// Writes nothing (mtls, and a gcp credential without a key file).
#[derive(Debug)]
pub struct NoInjection;

impl Injector for NoInjection {
    fn inject(&self, _: &mut Parts, _: &[(String, String)], _: Option<&[u8]>) -> Result<(), InjectError> {
        Ok(())
    }
    fn carries_placeholder(&self, _: &Destination, _: &RequestHead<'_>, _: &str) -> bool {
        false
    }
    fn slots(&self) -> Vec<Slot> {
        vec![]
    }
    fn secrets(&self, _: &mut Vec<Secret>) {}
}

/// `client_cert` and `client_key` (loaded with the other TLS material by the compiler).
pub fn build(c: &RawCredential, sources: &mut Sources<'_>) -> Result<Built, BuildError> {
    let (Some(cert), Some(_)) = (&c.client_cert, &c.client_key) else {
        return Err(BuildError::new("client_cert", "auth_type \"mtls\" needs client_cert and client_key"));
    };
    Ok(Built::new(Box::new(NoInjection), Source::File(sources.path(cert))))
}
