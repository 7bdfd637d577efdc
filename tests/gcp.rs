//! Google Cloud: latchkey mints tokens from a service-account key; the client library
//! (google-auth) holds a stub ADC file and gets a vended dummy token; the API sees the
//! real token; refresh before expiry and one retry after a 401.

mod common;

use common::*;

/// The Google stand-in (tokens living `expires_in` seconds) and a latchkey with a gcp
/// credential on .googleapis.com from a fresh service-account key.
fn setup(expires_in: u32) -> (PyServer, Latchkey) {
    setup_with(expires_in, false)
}

/// As `setup`, with an authorized_user file (refresh token) instead of a key when `user`.
fn setup_with(expires_in: u32, user: bool) -> (PyServer, Latchkey) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("up.crt"), dir.path().join("up.key"));
    std::fs::write(&cert, &pki().cert_pem).unwrap();
    std::fs::write(&key, &pki().key_pem).unwrap();
    let sa_key = rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
    let public = dir.path().join("sa-public.pem");
    std::fs::write(&public, sa_key.public_key_pem()).unwrap();
    let sa = if user {
        serde_json::json!({
            "type": "authorized_user",
            "client_id": "cli.apps.googleusercontent.com",
            "client_secret": "real-client-secret",
            "refresh_token": "real-refresh-token",
        })
    } else {
        serde_json::json!({
            "type": "service_account",
            "client_email": "agent@project.iam.gserviceaccount.com",
            "private_key": sa_key.serialize_pem(),
            "token_uri": "https://oauth2.googleapis.com/token",
        })
    };
    let sa_file = dir.path().join("sa.json");
    std::fs::write(&sa_file, sa.to_string()).unwrap();
    set_mode(&sa_file, 0o600);
    let mut cmd = py("gcp_server.py");
    cmd.args([&cert, &key, &public]).arg(expires_in.to_string());
    let (server, addr) = python_upstream(cmd);
    let cfg = format!(
        "[credentials.gcp]\nauth_type = \"gcp\"\ncredentials_file = \"{}\"\ndomains = [\".googleapis.com\"]\n",
        sa_file.display()
    );
    let port = free_port();
    let config = write_config(dir.path(), port, Some(addr), &cfg);
    let lk = Latchkey::spawn(dir, port, config, &[]);
    (server, lk)
}

#[test]
fn google_auth_library_gets_a_vended_token_and_the_api_the_real_one() {
    let (_server, lk) = setup(3600);
    let client = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/gcp_client.py");
    let out = latchkey_cmd(lk.dir.path(), &[])
        .args(["exec", "--config"])
        .arg(&lk.config_path)
        .args(["--", "python3"])
        .arg(client)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}\n{}", String::from_utf8_lossy(&out.stderr), lk.stderr());
    let v = json(text.trim());
    assert_eq!(v["status"], 200);
    assert_eq!(
        v["api"]["authorization"],
        serde_json::json!(["Bearer real-token-1"]),
        "the API saw the real token"
    );
    assert_eq!(
        v["library_token"], "latchkey-vended-gcp-token",
        "the agent's library only ever held the dummy"
    );
    // The stub the agent was pointed at holds nothing real.
    let stub = std::fs::read_to_string(lk.dir.path().join("ca/gcp-adc-stub.json")).unwrap();
    assert!(stub.contains("latchkey-stub") && !stub.contains("PRIVATE KEY"));
    // Token endpoints that mint credentials never get the real token.
    let (code, body) = lk.curl(&["-H", "authorization: Bearer x", "https://oauth2.googleapis.com/tokeninfo"]);
    assert_eq!(code, 403, "{body}");
}

#[test]
fn tokens_are_refreshed_before_they_expire() {
    // 301 s: outside the 300 s refresh margin for about a second.
    let (_server, lk) = setup(301);
    let (_, body) = lk.curl(&["https://storage.googleapis.com/v1/a"]);
    assert_eq!(json(&body)["authorization"], serde_json::json!(["Bearer real-token-1"]));
    let (_, body) = lk.curl(&["https://storage.googleapis.com/v1/b"]);
    assert_eq!(json(&body)["minted"], 1, "still fresh: cached");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let (_, body) = lk.curl(&["https://storage.googleapis.com/v1/c"]);
    assert_eq!(json(&body)["authorization"], serde_json::json!(["Bearer real-token-2"]));
    assert_eq!(json(&body)["minted"], 2);
}

#[test]
fn a_401_is_retried_once_with_a_fresh_token() {
    let (_server, lk) = setup(3600);
    let (code, body) = lk.curl(&["https://storage.googleapis.com/reject-first"]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["authorization"], serde_json::json!(["Bearer real-token-2"]));
    assert_eq!(json(&body)["minted"], 2);
}

#[test]
fn authorized_user_refresh_tokens_mint_tokens_too() {
    let (_server, lk) = setup_with(3600, true);
    let (code, body) = lk.curl(&["https://storage.googleapis.com/v1/user"]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["authorization"], serde_json::json!(["Bearer real-token-1"]));
}
