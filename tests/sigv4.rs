//! AWS SigV4 re-signing, verified by an independent implementation (botocore) holding
//! the real secret, while the client (curl --aws-sigv4) only ever holds dummy keys.

mod common;

use common::*;

const AKID: &str = "AKIAREALKEY123456789";
const SECRET: &str = "real/Secret+Key0123456789abcdefghijklmnop";
const TOKEN: &str = "real-session-token-xyz";

fn setup(with_token: bool, extra: &str) -> (PyServer, Latchkey) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("up.crt"), dir.path().join("up.key"));
    std::fs::write(&cert, &pki().cert_pem).unwrap();
    std::fs::write(&key, &pki().key_pem).unwrap();
    let mut cmd = py("sigv4_server.py");
    cmd.args([&cert, &key]).args([AKID, SECRET]);
    if with_token {
        cmd.arg(TOKEN);
    }
    let (server, addr) = python_upstream(cmd);
    let port = free_port();
    let config = write_config(dir.path(), port, Some(addr), extra);
    let mut env = vec![("AWS_ACCESS_KEY_ID", AKID), ("AWS_SECRET_ACCESS_KEY", SECRET)];
    if with_token {
        env.push(("AWS_SESSION_TOKEN", TOKEN));
    }
    let lk = Latchkey::spawn(dir, port, config, &env);
    (server, lk)
}

/// curl signing with the dummy keys the agent holds.
fn signed_curl(lk: &Latchkey, scope: &str, args: &[&str]) -> (u16, String) {
    let mut all = vec!["--aws-sigv4", scope, "--user", "latchkey-bedrock:latchkey-bedrock"];
    all.extend_from_slice(args);
    lk.curl(&all)
}

#[test]
fn bedrock_requests_are_re_signed_with_the_real_keys() {
    // Zero config: the built-in Bedrock provider from AWS_ACCESS_KEY_ID & co.
    let (_server, lk) = setup(true, "");
    let url =
        "https://bedrock-runtime.us-east-1.amazonaws.com/model/anthropic.claude-3-haiku-20240307-v1:0/invoke";
    let (code, body) = signed_curl(
        &lk,
        "aws:amz:us-east-1:bedrock",
        &["-H", "content-type: application/json", "--data", r#"{"prompt":"hi"}"#, url],
    );
    assert_eq!(code, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["verified"], true);
    assert_eq!(v["service"], "bedrock", "signs as bedrock, not bedrock-runtime");
    assert_eq!(v["region"], "us-east-1");
    assert_eq!(v["body_bytes"], 15);
    // The agent's environment only ever had placeholders.
    let o = lk.cli(&["env", "--format", "json"], &[]);
    let env = json(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(env["AWS_ACCESS_KEY_ID"], "latchkey-bedrock");
    assert_eq!(env["AWS_SECRET_ACCESS_KEY"], "latchkey-bedrock");
    assert!(env.get("AWS_SESSION_TOKEN").is_none());
    assert!(!lk.stderr().contains(SECRET) && !lk.stderr().contains(TOKEN));
}

#[test]
fn s3_uses_unsigned_payload_and_streams() {
    let extra = format!(
        "[credentials.s3]\nauth_type = \"aws_sigv4\"\naccess_key_id = \"{AKID}\"\nsecret_access_key = \"${{AWS_SECRET_ACCESS_KEY}}\"\nmax_signed_body = 16\ndomains = [\"mybucket.s3.us-west-2.amazonaws.com\"]\n"
    );
    let (_server, lk) = setup(false, &extra);
    let big = "x".repeat(100_000);
    let (code, body) = signed_curl(
        &lk,
        "aws:amz:us-west-2:s3",
        &["-X", "PUT", "--data-binary", &big, "https://mybucket.s3.us-west-2.amazonaws.com/notes/a.txt"],
    );
    assert_eq!(code, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["service"], "s3");
    assert_eq!(v["body_bytes"], 100_000, "not limited by max_signed_body: the payload is unsigned");
}

#[test]
fn forms_latchkey_cannot_sign_are_refused() {
    let extra = format!(
        "[credentials.bedrock]\nauth_type = \"aws_sigv4\"\naccess_key_id = \"{AKID}\"\nsecret_access_key = \"${{AWS_SECRET_ACCESS_KEY}}\"\nmax_signed_body = 64\ndomains = [\"bedrock-runtime.us-east-1.amazonaws.com\"]\n"
    );
    let (_server, lk) = setup(false, &extra);
    let base = "https://bedrock-runtime.us-east-1.amazonaws.com/model/m/invoke";
    let presigned = format!("{base}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=x&X-Amz-Signature=abc");
    let (code, body) = lk.curl(&[&presigned]);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("presigned"), "{body}");
    let (code, body) =
        lk.curl(&["-H", "x-amz-content-sha256: STREAMING-AWS4-HMAC-SHA256-PAYLOAD", "--data", "x", base]);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("STREAMING"), "{body}");
    let (code, body) = lk.curl(&["-H", "Authorization: AWS4-ECDSA-P256-SHA256 Credential=x", base]);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("SigV4a"), "{body}");
    let (code, body) = lk.curl(&["--data", &"y".repeat(65), base]);
    assert_eq!(code, 413, "{body}");
    let (code, body) = lk.curl(&["--data", &"y".repeat(64), base]);
    assert_eq!(code, 200, "at the limit: {body}");
}
