//! File permissions for what the gateway keeps (issue 19, Low): the queue
//! holds workers' readings, the config and `password_file` hold password
//! hashes and BTHome bindkeys, key files hold private keys.
//!
//! * Everything the gateway creates is private: the process umask is set to
//!   0077 and `data_dir` is created 0700 (files then come out 0600).
//! * Secrets someone else made readable are warned about at start-up (not
//!   changed: the operator may have reasons, e.g. a group of admins).

use crate::config::Config;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// umask 0077 for the whole process, and `data_dir` created 0700 if missing.
/// An existing `data_dir` open to group or others is warned about.
pub fn private_data_dir(dir: &Path) -> std::io::Result<()> {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    if !dir.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    } else if let Ok(m) = std::fs::metadata(dir) {
        let mode = m.permissions().mode() & 0o777;
        if mode & 0o007 != 0 {
            tracing::warn!(
                "data_dir {} has mode {mode:o}: others can read the queued readings; chmod o-rwx it",
                dir.display()
            );
        }
    }
    Ok(())
}

/// Warn about each file holding a secret that group or others may read.
pub fn warn_readable_secrets(cfg: &Config, config_path: Option<&Path>) {
    let mut secrets: Vec<(&str, &Path)> = Vec::new();
    if let Some(p) = &cfg.broker.password_file {
        secrets.push(("broker.password_file", p));
    }
    if let Some(p) = cfg.broker.tls_key.as_deref().filter(|_| cfg.broker.tls.is_some()) {
        secrets.push(("broker.tls_key", p));
    }
    if let Some(p) = cfg.upstream.as_ref().and_then(|u| u.key_file.as_deref()) {
        secrets.push(("upstream.key_file", p));
    }
    let config_has_secrets = !cfg.broker.users.is_empty() || cfg.ble.iter().any(|b| b.bindkey.is_some());
    if let Some(p) = config_path.filter(|_| config_has_secrets) {
        secrets.push(("the config (password hashes, bindkeys)", p));
    }
    for (what, path) in secrets {
        let Ok(m) = std::fs::metadata(path) else { continue };
        let mode = m.permissions().mode() & 0o777;
        // Group-readable is how a service reads a root-owned file (0640
        // root:edge-gateway): fine when that group is ours.
        // /proc/self belongs to our effective uid and gid.
        let our_gid = std::fs::metadata("/proc/self").map(|p| std::os::unix::fs::MetadataExt::gid(&p)).ok();
        let foreign_group = Some(std::os::unix::fs::MetadataExt::gid(&m)) != our_gid;
        if mode & 0o004 != 0 || (mode & 0o040 != 0 && foreign_group) {
            tracing::warn!(
                "{what} {} has mode {mode:o}: readable by group or others; chmod 0600 (or 0640 with the service's group)",
                path.display()
            );
        }
    }
}
