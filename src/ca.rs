//! The latchkey CA: created once (atomically, 0600 key in a 0700 directory), then
//! used to mint one leaf certificate per intercepted host. Leaves share one key and
//! are cached in a bounded LRU; concurrent first requests for a host mint it once.

use std::io::Write;
use std::num::NonZeroUsize;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use lru::LruCache;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SerialNumber,
};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use time::{Duration, OffsetDateTime};

use crate::policy::Host;

const LEAF_CACHE: usize = 1024;
const LEAF_DAYS: i64 = 30;

#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct CaError(pub String);

/// The crypto provider of both TLS legs: aws-lc-rs, with the AES-128-GCM suites first.
/// Both AES-GCM sizes are safe; AES-128 costs ten rounds a block against fourteen, and
/// its TLS 1.3 suite's key schedule hashes with SHA-256, which most x86 and ARM CPUs run
/// in hardware (SHA-384's SHA-512 runs in software on some: the handshake's HKDF was 14%
/// of latchkey's CPU per new connection on an AMD EPYC). Chrome, Go and BoringSSL make
/// the same choice. Intercepted clients get it whatever their own order
/// (`ignore_client_order`); upstream servers that follow the client's order get it too.
pub fn crypto_provider() -> CryptoProvider {
    use rustls::CipherSuite as S;
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    let aes128 = [
        S::TLS13_AES_128_GCM_SHA256,
        S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ];
    provider.cipher_suites.sort_by_key(|s| !aes128.contains(&s.suite()));
    provider
}

fn err(e: impl std::fmt::Display) -> CaError {
    CaError(e.to_string())
}

type LeafSlot = Arc<OnceLock<Result<Arc<ServerConfig>, CaError>>>;

pub struct CertAuthority {
    pub dir: PathBuf,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    ca_not_after: OffsetDateTime,
    leaf_key: KeyPair,
    leaf_signer: Arc<dyn rustls::sign::SigningKey>,
    provider: Arc<CryptoProvider>,
    tickets: Arc<dyn rustls::server::ProducesTickets>,
    sessions: Arc<dyn rustls::server::StoresServerSessions>,
    leaves: Mutex<LruCache<Host, LeafSlot>>,
    alpn: Vec<Vec<u8>>,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAuthority").field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// How to obtain the CA.
pub struct CaOptions<'a> {
    pub dir: &'a Path,
    pub generate: bool,
    pub lifetime_days: u32,
    pub regenerate: bool,
}

impl CertAuthority {
    /// Load the CA from `dir`, creating it when allowed. Refuses a directory or key that
    /// another user could write or read. Replicas starting together on one empty `dir`
    /// agree on one CA: creation happens under an exclusive lock on `dir/ca.lock`, and
    /// every process signs with the pair it then reads back from disk.
    pub fn open(opts: &CaOptions<'_>, provider: Arc<CryptoProvider>) -> Result<Self, CaError> {
        let dir = opts.dir;
        ensure_private_dir(dir)?;
        let key_path = dir.join("ca.key");
        let cert_path = dir.join("ca.crt");
        // Held until the pair is read (and bundle.pem written): `None` in a read-only dir.
        let lock = DirLock::exclusive(dir)?;
        let (has_key, has_cert) = (key_path.exists(), cert_path.exists());
        if !(has_key && has_cert) || opts.regenerate {
            if has_key != has_cert && !opts.regenerate {
                let (there, missing) = if has_key { ("ca.key", "ca.crt") } else { ("ca.crt", "ca.key") };
                return Err(CaError(format!(
                    "{} holds {there} but no {missing}; restore it, or replace both with `latchkey ca regenerate` (clients must then trust the new ca.crt)",
                    dir.display()
                )));
            }
            if !opts.generate && !opts.regenerate {
                return Err(CaError(format!(
                    "no CA in {} and generate_certs = false: create one with `latchkey ca regenerate` or set generate_certs = true",
                    dir.display()
                )));
            }
            if lock.is_none() {
                return Err(CaError(format!(
                    "ca_dir {} is read-only and holds no CA: create one where it is writable (`latchkey ca regenerate`) and provide ca.crt and ca.key there",
                    dir.display()
                )));
            }
            generate(dir, opts.lifetime_days, &provider)?;
        }
        let Pair { key_pem, cert_pem } = read_pair(&key_path, &cert_path)?;
        let ca_key =
            KeyPair::from_pem(&key_pem).map_err(|e| CaError(format!("{}: {e}", key_path.display())))?;
        if !pair_matches(&ca_key, &cert_pem) {
            return Err(CaError(format!(
                "{} and {} are not one key pair; restore the matching pair, or replace both with `latchkey ca regenerate` (clients must then trust the new ca.crt)",
                key_path.display(),
                cert_path.display()
            )));
        }
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, ca_key)
            .map_err(|e| CaError(format!("{}: {e}", cert_path.display())))?;
        let ca_not_after =
            ca_not_after(&cert_pem).unwrap_or_else(|| OffsetDateTime::now_utc() + Duration::days(30));
        match (&lock, write_bundle(dir, &cert_pem)) {
            (_, Ok(())) => {}
            (None, Err(e)) => tracing::warn!("read-only ca_dir: {e}; clients need bundle.pem from elsewhere"),
            (Some(_), Err(e)) => return Err(e),
        }
        drop(lock);

        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let leaf_signer = provider.key_provider.load_private_key(der).map_err(err)?;
        let tickets = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(err)?;
        Ok(CertAuthority {
            dir: dir.to_path_buf(),
            cert_pem,
            issuer,
            ca_not_after,
            leaf_key,
            leaf_signer,
            provider,
            tickets,
            sessions: rustls::server::ServerSessionMemoryCache::new(4096),
            leaves: Mutex::new(LruCache::new(NonZeroUsize::new(LEAF_CACHE).expect("non-zero"))),
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The TLS server config presenting a leaf for `host`, minted once per host.
    pub fn server_config(&self, host: &Host) -> Result<Arc<ServerConfig>, CaError> {
        self.server_config_counted(host).0
    }

    /// As [`Self::server_config`], and whether the leaf was already cached.
    pub fn server_config_counted(&self, host: &Host) -> (Result<Arc<ServerConfig>, CaError>, bool) {
        let (slot, hit) = {
            let mut leaves = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
            let hit = leaves.contains(host);
            (leaves.get_or_insert(host.clone(), || Arc::new(OnceLock::new())).clone(), hit)
        };
        (slot.get_or_init(|| self.mint(host)).clone(), hit)
    }

    fn mint(&self, host: &Host) -> Result<Arc<ServerConfig>, CaError> {
        let name = match host {
            Host::Domain(d) => d.clone(),
            Host::Ip(ip) => ip.to_string(),
        };
        let mut p = CertificateParams::new(vec![name.clone()]).map_err(err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        p.distinguished_name = dn;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(random_serial(&self.provider)?);
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::days(1);
        p.not_after = (now + Duration::days(LEAF_DAYS)).min(self.ca_not_after);
        let leaf = p.signed_by(&self.leaf_key, &self.issuer).map_err(err)?;
        let certified = CertifiedKey::new(vec![leaf.der().clone()], self.leaf_signer.clone());
        let mut cfg = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(err)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
        cfg.alpn_protocols = self.alpn.clone();
        cfg.ignore_client_order = true; // see `crypto_provider`
        cfg.ticketer = self.tickets.clone();
        cfg.session_storage = self.sessions.clone();
        Ok(Arc::new(cfg))
    }
}

impl CertAuthority {
    /// A leaf for the proxy's own names and addresses (`[proxy] tls`), signed by this CA
    /// with the shared leaf key; valid `LEAF_DAYS`, never past the CA.
    pub fn own_leaf(&self, names: &[String]) -> Result<Arc<CertifiedKey>, CaError> {
        let mut p = CertificateParams::new(names.to_vec()).map_err(err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names.first().cloned().unwrap_or_else(|| "latchkey".into()));
        dn.push(DnType::OrganizationName, "latchkey proxy");
        p.distinguished_name = dn;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(random_serial(&self.provider)?);
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::days(1);
        p.not_after = (now + Duration::days(LEAF_DAYS)).min(self.ca_not_after);
        let leaf = p.signed_by(&self.leaf_key, &self.issuer).map_err(err)?;
        Ok(Arc::new(CertifiedKey::new(vec![leaf.der().clone()], self.leaf_signer.clone())))
    }

    /// Write the public half — `ca.crt` and `bundle.pem`, nothing else — into `dir`
    /// (`[proxy] ca_export_dir`), for agents that must trust latchkey but may not see
    /// `ca_dir` (which holds the key). Created 0755 when missing.
    pub fn export_public(&self, dir: &Path) -> Result<(), CaError> {
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .map_err(|e| CaError(format!("cannot create {}: {e}", dir.display())))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(err)?;
        }
        write_atomic(&dir.join("ca.crt"), self.cert_pem.as_bytes(), 0o644)?;
        write_bundle(dir, &self.cert_pem)
    }

    pub fn provider(&self) -> Arc<CryptoProvider> {
        self.provider.clone()
    }
}

fn random_serial(provider: &CryptoProvider) -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    provider.secure_random.fill(&mut bytes).map_err(|_| CaError("the system has no randomness".into()))?;
    bytes[0] &= 0x7f; // positive
    Ok(SerialNumber::from_slice(&bytes))
}

/// Create (or tighten) a directory only its owner can use. A directory that cannot be
/// tightened (read-only) is accepted when nobody else can write it: the key file's own
/// mode is checked on its own.
pub(crate) fn ensure_private_dir(dir: &Path) -> Result<(), CaError> {
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(|e| CaError(format!("cannot create {}: {e}", dir.display())))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    let meta = std::fs::metadata(dir).map_err(err)?;
    // A read-only mount cannot be written through whatever its mode says (a Kubernetes
    // Secret volume is a world-writable, sticky tmpfs mounted read-only).
    if !on_read_only_mount(dir) {
        crate::secrets::owner_only_writable(&meta)
            .map_err(|w| CaError(format!("ca_dir {} {w}", dir.display())))?;
    }
    if meta.permissions().mode() & 0o077 != 0
        && let Err(e) = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
    {
        tracing::warn!("cannot make ca_dir {} private (mode 0700): {e}", dir.display());
    }
    Ok(())
}

/// An exclusive `flock` on `<ca_dir>/ca.lock`, released on drop. Replicas (separate
/// processes, possibly in separate containers sharing the directory) serialise CA
/// creation on it, and the creation of the token and seal keys (`crate::token::keys`).
pub(crate) struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    /// `Ok(None)` when the directory is read-only (nothing can be created there, so
    /// there is nothing to serialise).
    pub(crate) fn exclusive(dir: &Path) -> Result<Option<DirLock>, CaError> {
        use std::os::fd::AsRawFd;
        let path = dir.join("ca.lock");
        let file = match std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(f) => f,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(CaError(format!("cannot open {}: {e}", path.display()))),
        };
        // SAFETY: flock(2) on a descriptor this function owns; blocks until granted.
        while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(CaError(format!("cannot lock {}: {e}", path.display())));
            }
        }
        Ok(Some(DirLock { _file: file }))
    }
}

/// A CA key and its certificate, as PEM.
struct Pair {
    key_pem: zeroize::Zeroizing<String>,
    cert_pem: String,
}

/// The key (checked: ours, 0600) and the certificate.
fn read_pair(key_path: &Path, cert_path: &Path) -> Result<Pair, CaError> {
    let meta = std::fs::metadata(key_path).map_err(err)?;
    crate::secrets::owner_only_writable(&meta).map_err(|w| CaError(format!("{} {w}", key_path.display())))?;
    if meta.permissions().mode() & 0o077 != 0 && !secret_mount_key(key_path, &meta) {
        return Err(CaError(format!(
            "{} is readable by other users; run chmod 600 on it",
            key_path.display()
        )));
    }
    let key_pem = zeroize::Zeroizing::new(std::fs::read_to_string(key_path).map_err(err)?);
    let cert_pem = std::fs::read_to_string(cert_path).map_err(err)?;
    Ok(Pair { key_pem, cert_pem })
}

/// Is `dir` on a file system mounted read-only?
fn on_read_only_mount(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return false };
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs reads a NUL-terminated path and fills the struct it is given.
    unsafe { libc::statvfs(c.as_ptr(), &mut st) == 0 && st.f_flag & libc::ST_RDONLY != 0 }
}

/// A key as Kubernetes mounts a Secret for a pod with `fsGroup`: on a read-only mount,
/// owned by root, writable by nobody, readable by the owner and by a group this process
/// is in (kubelet adds the group read bit whatever `defaultMode` says), by no one else.
fn secret_mount_key(path: &Path, meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    let mode = meta.permissions().mode() & 0o777;
    meta.uid() == 0
        && mode & !0o440 == 0
        && mode & 0o040 != 0
        && in_group(meta.gid())
        && on_read_only_mount(path)
}

/// Is `gid` this process's effective group or one of its supplementary groups?
fn in_group(gid: u32) -> bool {
    // SAFETY: getegid has no arguments; getgroups fills at most `groups.len()` entries.
    unsafe {
        if libc::getegid() == gid {
            return true;
        }
        let mut groups = [0 as libc::gid_t; 256];
        let n = libc::getgroups(groups.len() as libc::c_int, groups.as_mut_ptr());
        n > 0 && groups[..n as usize].contains(&gid)
    }
}

/// Does `cert_pem` certify `key`'s public key? A mismatched pair (written by two
/// processes at once before the lock existed) would sign leaves no client trusts.
fn pair_matches(key: &KeyPair, cert_pem: &str) -> bool {
    let Some(Ok(der)) = CertificateDer::pem_slice_iter(cert_pem.as_bytes()).next() else { return false };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else { return false };
    cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw()
}

/// Generate a fresh CA: P-256, pathLen 0, written atomically.
fn generate(dir: &Path, lifetime_days: u32, provider: &CryptoProvider) -> Result<(), CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("latchkey CA ({})", hostname()));
    dn.push(DnType::OrganizationName, "latchkey");
    p.distinguished_name = dn;
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::days(1);
    p.not_after = now + Duration::days(lifetime_days as i64);
    p.serial_number = Some(random_serial(provider)?);
    let cert = p.self_signed(&key).map_err(err)?;
    let key_pem = zeroize::Zeroizing::new(key.serialize_pem());
    write_atomic(&dir.join("ca.key"), key_pem.as_bytes(), 0o600)?;
    write_atomic(&dir.join("ca.crt"), cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

/// Write via a temporary file created with `mode`, then rename: readers see the old
/// file or the new one, and a key never exists with looser permissions.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| CaError(format!("cannot write {}: {e}", tmp.display())))?;
    f.write_all(data).and_then(|_| f.sync_all()).map_err(err)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(|e| CaError(format!("cannot write {}: {e}", path.display())))
}

/// `bundle.pem`: the system trust store (or the public roots) plus the latchkey CA, so
/// that clients given only this file still verify hosts latchkey tunnels blind.
fn write_bundle(dir: &Path, ca_pem: &str) -> Result<(), CaError> {
    let path = dir.join("bundle.pem");
    if let Ok(existing) = std::fs::read_to_string(&path)
        && existing.ends_with(ca_pem)
    {
        return Ok(());
    }
    let mut bundle = system_roots_pem().unwrap_or_else(public_roots_pem);
    if !bundle.ends_with('\n') {
        bundle.push('\n');
    }
    bundle.push_str(ca_pem);
    write_atomic(&path, bundle.as_bytes(), 0o644)
}

fn system_roots_pem() -> Option<String> {
    [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/cert.pem",
        "/etc/ssl/ca-bundle.pem",
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok().filter(|s| s.contains("BEGIN CERTIFICATE")))
}

fn public_roots_pem() -> String {
    use base64::Engine;
    let mut out = String::new();
    for der in webpki_root_certs::TLS_SERVER_ROOT_CERTS {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

fn ca_not_after(pem: &str) -> Option<OffsetDateTime> {
    let der = CertificateDer::pem_slice_iter(pem.as_bytes()).next()?.ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    Some(cert.validity().not_after.to_datetime())
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "local".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    /// A CA generated in a fresh `ca` directory under `tmp`.
    fn fresh(tmp: &tempfile::TempDir) -> (PathBuf, CertAuthority) {
        let dir = tmp.path().join("ca");
        let ca = CertAuthority::open(&options(&dir), provider()).unwrap();
        (dir, ca)
    }

    fn options(dir: &Path) -> CaOptions<'_> {
        CaOptions { dir, generate: true, lifetime_days: 10, regenerate: false }
    }

    #[test]
    fn creates_private_files_and_mints_single_san_leaves() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, ca) = fresh(&tmp);
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        assert_eq!(std::fs::metadata(dir.join("ca.key")).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(dir.join("ca.crt")).unwrap().mode() & 0o777, 0o644);
        let bundle = std::fs::read_to_string(dir.join("bundle.pem")).unwrap();
        assert!(bundle.ends_with(ca.cert_pem()) && bundle.matches("BEGIN CERT").count() > 10);

        let der = CertificateDer::pem_slice_iter(ca.cert_pem().as_bytes()).next().unwrap().unwrap();
        let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
        let bc = c.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca && bc.path_len_constraint == Some(0));

        let host = Host::parse("api.example.com").unwrap();
        let a = ca.server_config(&host).unwrap();
        let b = ca.server_config(&host).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "cached");

        // Re-open keeps the same CA; generate=false without files refuses.
        let again = CertAuthority::open(&options(&dir), provider()).unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
        let empty = tmp.path().join("none");
        let opts = CaOptions { generate: false, ..options(&empty) };
        assert!(CertAuthority::open(&opts, provider()).unwrap_err().0.contains("generate_certs = false"));
    }

    #[test]
    fn concurrent_first_requests_mint_once() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = Arc::new(fresh(&tmp).1);
        let host = Host::parse("burst.example.com").unwrap();
        let configs: Vec<Arc<ServerConfig>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8).map(|_| s.spawn(|| ca.server_config(&host).unwrap())).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(configs.iter().all(|c| Arc::ptr_eq(c, &configs[0])));
    }

    #[test]
    fn refuses_loose_key() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, _) = fresh(&tmp);
        std::fs::set_permissions(dir.join("ca.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(CertAuthority::open(&options(&dir), provider()).unwrap_err().0.contains("chmod 600"));
    }

    /// Before the lock, two processes could leave one's key beside the other's cert.
    #[test]
    fn a_mismatched_or_partial_pair_is_refused_never_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, _) = fresh(&tmp);
        let other = tmp.path().join("other");
        CertAuthority::open(&options(&other), provider()).unwrap();
        std::fs::copy(other.join("ca.crt"), dir.join("ca.crt")).unwrap();
        let e = CertAuthority::open(&options(&dir), provider()).unwrap_err().0;
        assert!(e.contains("not one key pair"), "{e}");
        std::fs::remove_file(dir.join("ca.crt")).unwrap();
        let key = std::fs::read(dir.join("ca.key")).unwrap();
        let e = CertAuthority::open(&options(&dir), provider()).unwrap_err().0;
        assert!(e.contains("holds ca.key but no ca.crt"), "{e}");
        assert_eq!(std::fs::read(dir.join("ca.key")).unwrap(), key, "never overwritten");
        let opts = CaOptions { regenerate: true, ..options(&dir) };
        assert!(CertAuthority::open(&opts, provider()).is_ok(), "regenerate replaces both");
    }

    /// A client connection and the proxy's side of it for `host`, in memory.
    fn pair(
        client: &Arc<rustls::ClientConfig>,
        server: &Arc<ServerConfig>,
    ) -> (rustls::ClientConnection, rustls::ServerConnection) {
        let name = rustls::pki_types::ServerName::try_from("api.example.com").unwrap();
        (
            rustls::ClientConnection::new(client.clone(), name).unwrap(),
            rustls::ServerConnection::new(server.clone()).unwrap(),
        )
    }

    /// Carry records both ways until neither side has anything to send: the handshake,
    /// then the session tickets the server sends after it.
    fn pump(c: &mut rustls::ClientConnection, s: &mut rustls::ServerConnection) -> rustls::HandshakeKind {
        // Both ways each round (`|`, not `||`): a side may have to answer what it read.
        while carry(&mut **c, &mut **s) | carry(&mut **s, &mut **c) {}
        assert!(!c.is_handshaking() && !s.is_handshaking());
        c.handshake_kind().unwrap()
    }

    /// What `from` has to send, read by `to`; `false` when there was nothing.
    fn carry<A, B>(from: &mut rustls::ConnectionCommon<A>, to: &mut rustls::ConnectionCommon<B>) -> bool {
        let mut buf = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut buf).unwrap();
        }
        if buf.is_empty() {
            return false;
        }
        to.read_tls(&mut &buf[..]).unwrap();
        to.process_new_packets().unwrap();
        true
    }

    /// Clients resume: each connection leaves its client tickets for the next ones (two,
    /// rustls' default: a burst of parallel connections after a few sequential ones
    /// resumes every one of them).
    #[test]
    fn each_connection_leaves_its_client_tickets_for_the_next() {
        use rustls::HandshakeKind::{Full, Resumed};
        let tmp = tempfile::tempdir().unwrap();
        let ca = fresh(&tmp).1;
        let server = ca.server_config(&Host::parse("api.example.com").unwrap()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::pem_slice_iter(ca.cert_pem().as_bytes()).next().unwrap().unwrap()).unwrap();
        let client = Arc::new(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        let one = |_| {
            let (mut c, mut s) = pair(&client, &server);
            pump(&mut c, &mut s)
        };
        assert_eq!((0..3).map(one).collect::<Vec<_>>(), [Full, Resumed, Resumed]);
        let together = |expected: [rustls::HandshakeKind; 2]| {
            let (mut c1, mut s1) = pair(&client, &server);
            let (mut c2, mut s2) = pair(&client, &server);
            assert_eq!([pump(&mut c1, &mut s1), pump(&mut c2, &mut s2)], expected);
        };
        together([Resumed, Resumed]);
    }

    /// Threads opening their own lock file contend like processes do (flock is per open
    /// file): all of them end up with the one CA on disk.
    #[test]
    fn concurrent_opens_on_an_empty_dir_agree() {
        for _ in 0..5 {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("ca");
            let pems: Vec<String> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..6)
                    .map(|_| s.spawn(|| CertAuthority::open(&options(&dir), provider()).unwrap().cert_pem))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let on_disk = std::fs::read_to_string(dir.join("ca.crt")).unwrap();
            assert!(pems.iter().all(|p| *p == on_disk));
        }
    }
}
