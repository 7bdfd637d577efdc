//! File-system checks for what latchkey trusts: nobody else may be able to write it.

use std::fs::Metadata;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

/// Ok when the file is owned by us (or root) and not writable by group or others.
pub fn owner_only_writable(meta: &Metadata) -> Result<(), String> {
    let uid = unsafe { libc::geteuid() };
    if meta.uid() != uid && meta.uid() != 0 {
        return Err(format!("is owned by uid {}, not by this user", meta.uid()));
    }
    if meta.permissions().mode() & 0o022 != 0 {
        return Err(format!(
            "is writable by other users (mode {:o}); run chmod go-w on it",
            meta.permissions().mode() & 0o777
        ));
    }
    Ok(())
}

/// `~/` expansion for paths in the config.
pub fn expand_home(raw: &str) -> std::path::PathBuf {
    match raw.strip_prefix("~/") {
        Some(rest) => home_dir().join(rest),
        None if raw == "~" => home_dir(),
        None => raw.into(),
    }
}

pub fn home_dir() -> std::path::PathBuf {
    std::env::var_os("HOME").map(Into::into).unwrap_or_else(|| "/".into())
}
