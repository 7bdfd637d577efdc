//! Sealed secrets (SPEC 11): `lks1:...` is a secret encrypted with HPKE (RFC 9180,
//! base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305) to the public
//! half of latchkey's `seal.key`, together with the hosts it may be sent to. Only the
//! holder of `seal.key` can open it, so a config holding only sealed values can be
//! committed; the hosts are readable without the key and bound to the ciphertext (they
//! are the AEAD's associated data), so a reviewer sees where the secret may go and nobody
//! can change it.
//!
//! Wire form: `lks1:` + URL-safe base64 (no padding) of
//! `count:u8 | (len:u16be | host pattern)* | enc (32 bytes) | ciphertext+tag`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem, OpModeR, OpModeS, Serializable};
use zeroize::Zeroizing;

use crate::policy::Pattern;
use crate::policy::pattern::HostPattern;
use crate::secrets::Secret;

pub const PREFIX: &str = "lks1:";
/// HPKE `info`: separates latchkey's sealed secrets from any other use of the key.
const INFO: &[u8] = b"latchkey sealed secret v1";
const ENC_LEN: usize = 32;
const TAG_LEN: usize = 16;
/// Longest sealed value accepted (characters): a secret of a few KiB and its hosts.
pub const MAX_SEALED_LEN: usize = 16 * 1024;

type PrivateKey = <X25519HkdfSha256 as Kem>::PrivateKey;
type PublicKey = <X25519HkdfSha256 as Kem>::PublicKey;

const PRIVATE_PREFIX: &str = "x25519-private/";
const PUBLIC_PREFIX: &str = "x25519/";

/// `seal.key`: the private key that opens sealed values.
pub struct SealKey {
    private: PrivateKey,
    public: PublicKey,
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealKey({})", self.public_text())
    }
}

impl SealKey {
    /// A fresh key, as the text written to `seal.key`.
    pub fn generate_text() -> Result<Zeroizing<String>, String> {
        let mut ikm = Zeroizing::new([0u8; 32]);
        aws_lc_rs::rand::fill(ikm.as_mut()).map_err(|_| "the system has no randomness".to_string())?;
        let (private, _) = X25519HkdfSha256::derive_keypair(ikm.as_ref());
        let bytes = Zeroizing::new(private.to_bytes().to_vec());
        Ok(Zeroizing::new(format!("{PRIVATE_PREFIX}{}\n", hex::encode(bytes.as_slice()))))
    }

    pub fn from_text(text: &str) -> Result<SealKey, String> {
        let hex_part = text.trim().strip_prefix(PRIVATE_PREFIX).ok_or("not an x25519-private/ key")?;
        let bytes = Zeroizing::new(hex::decode(hex_part).map_err(|_| "the key is not hex")?);
        let private = PrivateKey::from_bytes(&bytes).map_err(|_| "not a 32-byte X25519 key")?;
        let public = X25519HkdfSha256::sk_to_pk(&private);
        Ok(SealKey { private, public })
    }

    /// `x25519/<hex>`: what `seal --pubkey` reads.
    pub fn public_text(&self) -> String {
        format!("{PUBLIC_PREFIX}{}", hex::encode(self.public.to_bytes()))
    }
}

/// The public half, as `latchkey seal --pubkey FILE` reads it (`x25519/<hex>`; blank
/// lines and `#` comments around it are ignored).
pub fn parse_public(text: &str) -> Result<SealPublic, String> {
    let line = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .find(|l| !l.is_empty())
        .ok_or("empty public key file")?;
    let hex_part = line
        .strip_prefix(PUBLIC_PREFIX)
        .ok_or("expected x25519/<hex> (from `latchkey seal --export-pubkey`)")?;
    let bytes = hex::decode(hex_part).map_err(|_| "the key is not hex")?;
    Ok(SealPublic(PublicKey::from_bytes(&bytes).map_err(|_| "not a 32-byte X25519 public key")?))
}

pub struct SealPublic(PublicKey);

impl SealKey {
    pub fn public(&self) -> SealPublic {
        SealPublic(self.public.clone())
    }
}

/// Seal `secret` for the holder of `to`, to be sent only to `hosts` (config patterns).
pub fn seal(to: &SealPublic, hosts: &[String], secret: &str) -> Result<String, String> {
    if hosts.is_empty() {
        return Err("name at least one --host the secret may be sent to".into());
    }
    let hosts = hosts.iter().map(|h| normalise_host(h)).collect::<Result<Vec<_>, _>>()?;
    let header = encode_hosts(&hosts)?;
    let aad = associated_data(&header);
    let (enc, ct) = hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256>(
        &OpModeS::Base,
        &to.0,
        INFO,
        secret.as_bytes(),
        &aad,
    )
    .map_err(|e| format!("sealing failed: {e}"))?;
    let mut out = header;
    out.extend_from_slice(&enc.to_bytes());
    out.extend_from_slice(&ct);
    Ok(format!("{PREFIX}{}", B64.encode(out)))
}

/// What the AEAD authenticates besides the secret: the version and the host list, so
/// that neither can be changed without the value failing to open.
fn associated_data(header: &[u8]) -> Vec<u8> {
    [PREFIX.as_bytes(), header].concat()
}

fn normalise_host(raw: &str) -> Result<String, String> {
    let p = Pattern::parse(raw).map_err(|e| format!("--host {raw:?}: {e}"))?;
    if p.matches_everything() {
        return Err(format!("--host {raw:?} matches every host; name the hosts the secret belongs to"));
    }
    Ok(raw.trim().to_string())
}

fn encode_hosts(hosts: &[String]) -> Result<Vec<u8>, String> {
    let count = u8::try_from(hosts.len()).map_err(|_| "at most 255 hosts".to_string())?;
    let mut out = vec![count];
    for h in hosts {
        let len = u16::try_from(h.len()).map_err(|_| format!("host {h:?} is too long"))?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(h.as_bytes());
    }
    Ok(out)
}

/// A sealed value, parsed without any key: its hosts are readable, its secret is not.
#[derive(Clone, Debug)]
pub struct Sealed {
    pub hosts: Vec<String>,
    /// The host patterns, parsed.
    pub patterns: Vec<Pattern>,
    header_len: usize,
    body: Vec<u8>,
}

/// Parse `lks1:...`. Never panics, whatever the input.
pub fn parse(text: &str) -> Result<Sealed, String> {
    let text = text.trim();
    let rest =
        text.strip_prefix(PREFIX).ok_or("a sealed value starts with lks1: (made by `latchkey seal`)")?;
    if text.len() > MAX_SEALED_LEN {
        return Err(format!("a sealed value is at most {MAX_SEALED_LEN} characters"));
    }
    let body = B64.decode(rest.trim_end_matches('=')).map_err(|e| format!("not base64url: {e}"))?;
    let (&count, mut at) = (body.first().ok_or("empty sealed value")?, &body[1..]);
    let mut hosts = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let (len, tail) = at.split_first_chunk::<2>().ok_or("truncated (hosts)")?;
        let len = u16::from_be_bytes(*len) as usize;
        let host = tail.get(..len).ok_or("truncated (hosts)")?;
        hosts.push(String::from_utf8(host.to_vec()).map_err(|_| "a host is not UTF-8")?);
        at = &tail[len..];
    }
    if hosts.is_empty() {
        return Err("the sealed value names no host".into());
    }
    if at.len() < ENC_LEN + TAG_LEN {
        return Err("truncated (ciphertext)".into());
    }
    let patterns = hosts
        .iter()
        .map(|h| Pattern::parse(h).map_err(|e| format!("sealed host {h:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let header_len = body.len() - at.len();
    Ok(Sealed { hosts, patterns, header_len, body })
}

impl Sealed {
    /// The secret, when `key` is the one it was sealed to and nothing was altered.
    pub fn open(&self, key: &SealKey) -> Result<Secret, String> {
        let (header, rest) = self.body.split_at(self.header_len);
        let (enc, ct) = rest.split_at(ENC_LEN);
        let enc =
            <X25519HkdfSha256 as Kem>::EncappedKey::from_bytes(enc).map_err(|_| "bad encapsulated key")?;
        let aad = associated_data(header);
        let plain = Zeroizing::new(
            hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256>(
                &OpModeR::Base,
                &key.private,
                &enc,
                INFO,
                ct,
                &aad,
            )
            .map_err(|_| {
                format!(
                    "cannot be opened with this latchkey's seal.key ({}): sealed for another key, or altered",
                    key.public_text()
                )
            })?,
        );
        let text = std::str::from_utf8(&plain).map_err(|_| "the sealed secret is not UTF-8")?;
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err("the sealed secret is empty".into());
        }
        Ok(Secret::new(trimmed.to_string()))
    }

    /// The credential domain patterns (with the credential's `ports`) that no sealed
    /// host covers.
    pub fn uncovered<'a>(&self, domains: &'a [Pattern], ports: &[u16]) -> Vec<&'a Pattern> {
        domains.iter().filter(|d| !self.patterns.iter().any(|s| covers(s, d, ports))).collect()
    }
}

/// Does sealed host pattern `s` cover every host and port credential pattern `d`
/// (with the credential's `ports`) can match?
pub fn covers(s: &Pattern, d: &Pattern, ports: &[u16]) -> bool {
    let port_ok = match s.port {
        None => true,
        Some(p) => match (d.port, ports.is_empty()) {
            (Some(dp), _) => dp == p,
            (None, false) => ports.iter().all(|x| *x == p),
            (None, true) => false,
        },
    };
    port_ok && host_covers(&s.host, &d.host)
}

fn under(name: &str, domain: &str) -> bool {
    name.len() > domain.len()
        && name.ends_with(domain)
        && name.as_bytes()[name.len() - domain.len() - 1] == b'.'
}

fn host_covers(s: &HostPattern, d: &HostPattern) -> bool {
    use HostPattern::*;
    match (s, d) {
        (Exact(a), Exact(b)) => a == b,
        (Suffix(a), Exact(b) | Suffix(b) | Glob(b)) => a == b || under(b, a),
        (Glob(a), Exact(b) | Suffix(b)) => under(b, a),
        (Glob(a), Glob(b)) => a == b || under(b, a),
        (Ip(a), Ip(b)) => a == b,
        (Cidr(n), Ip(b)) => n.contains(b),
        (Cidr(n), Cidr(m)) => n.contains(m),
        (Regex(a), Regex(b)) => a.as_str() == b.as_str(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SealKey {
        SealKey::from_text(&SealKey::generate_text().unwrap()).unwrap()
    }

    #[test]
    fn round_trip_binds_hosts_and_key() {
        let k = key();
        let blob = seal(&k.public(), &["api.anthropic.com".into()], "sk-ant-REAL\n").unwrap();
        assert!(blob.starts_with(PREFIX) && !blob.contains("sk-ant"));
        let sealed = parse(&blob).unwrap();
        assert_eq!(sealed.hosts, ["api.anthropic.com"]);
        assert_eq!(sealed.open(&k).unwrap().expose(), "sk-ant-REAL");
        let other = key();
        assert!(sealed.open(&other).unwrap_err().contains("another key"));
        // Another host list spliced onto the same ciphertext: the AEAD refuses it.
        let forged = seal(&k.public(), &["evil.example.net".into()], "x").unwrap();
        let (f, o) = (parse(&forged).unwrap(), parse(&blob).unwrap());
        let mut body = f.body[..f.header_len].to_vec();
        body.extend_from_slice(&o.body[o.header_len..]);
        let spliced = format!("{PREFIX}{}", B64.encode(body));
        assert!(parse(&spliced).unwrap().open(&k).is_err());
        assert_eq!(parse_public(&k.public_text()).unwrap().0, k.public);
    }

    #[test]
    fn bad_input_is_an_error_never_a_panic() {
        let k = key();
        let blob = seal(&k.public(), &["a.example.com".into()], "secret").unwrap();
        for cut in 0..blob.len() {
            if let Ok(s) = parse(&blob[..cut]) {
                assert!(s.open(&k).is_err(), "truncated at {cut}");
            }
        }
        let bytes = B64.decode(&blob[PREFIX.len()..]).unwrap();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            if let Ok(s) = parse(&format!("{PREFIX}{}", B64.encode(&b))) {
                assert!(s.open(&k).is_err(), "bit flip at byte {i} opened");
            }
        }
        for junk in ["", "lks1:", "lks1:AA", "lks2:xx", "lks1:////", &format!("lks1:{}", "A".repeat(20000))] {
            assert!(parse(junk).is_err(), "{junk:.20}");
        }
    }

    #[test]
    fn coverage() {
        let p = |s: &str| Pattern::parse(s).unwrap();
        let ok = |s: &str, d: &str| covers(&p(s), &p(d), &[]);
        assert!(ok("api.x.com", "api.x.com"));
        assert!(!ok("api.x.com", "x.com"));
        assert!(ok(".x.com", "x.com") && ok(".x.com", "a.b.x.com") && ok(".x.com", "*.x.com"));
        assert!(!ok(".x.com", "evil-x.com") && !ok(".x.com", "x.com.evil.net"));
        assert!(ok("*.x.com", "a.x.com") && !ok("*.x.com", "x.com") && !ok("*.x.com", ".x.com"));
        assert!(ok("*.x.com", ".a.x.com"));
        assert!(ok("10.0.0.0/8", "10.1.2.3") && !ok("10.0.0.0/8", "11.0.0.1"));
        assert!(ok("x.com", "x.com:8443") && !ok("x.com:8443", "x.com"));
        assert!(covers(&p("x.com:8443"), &p("x.com"), &[8443]));
        assert!(!ok("~.*\\.x\\.com", "a.x.com"), "a regex covers only itself");
    }
}
