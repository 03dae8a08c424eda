//! Who may connect and where they may publish.
//!
//! Passwords are stored as PHC strings (argon2id by default; any argon2
//! variant verifies). Verifying one costs tens of milliseconds (x86) to a
//! few hundred (Raspberry Pi) and ~19 MiB with our parameters
//! (`HASH_PARAMS`), so at most one runs at a time, off the async runtime,
//! and a success is remembered as a keyed 64-bit fingerprint of the password
//! (never the password itself), so reconnecting devices do not pay again.
//! Secrets are never logged.
//!
//! Under attack (issue 19, H2): at most [`MAX_WAITING_CHECKS`] logins wait
//! for a check, later ones are refused at once ([`Login::Busy`]) rather than
//! queued behind them, and the caller bounds the wait by `connect_timeout`.
//! An unknown user is checked against a dummy hash with the same
//! parameters, so a refusal takes as long whether the name exists or not.

use super::config::BrokerConfig;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString, rand_core::OsRng};
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;

/// Logins that may wait for the one password check at a time; more are
/// refused at once. Eight checks take ~0.2 s on x86 and ~1-2 s on a
/// Raspberry Pi 3/4, inside the default 5 s `connect_timeout`.
pub const MAX_WAITING_CHECKS: usize = 8;

/// argon2id, 19 MiB, 2 passes, 1 lane: OWASP's first recommended setting
/// (the argon2 crate's default, written out so an upgrade cannot change
/// it). On a Pi it costs ~100-300 ms per check and 19 MiB while it runs;
/// with one check at a time that is one core and 19 MiB at most under
/// attack, while an offline guess at a leaked hash costs as much.
/// `hash-password` uses these; verifying uses whatever the PHC string says.
pub fn hash_params() -> argon2::Params {
    argon2::Params::new(19 * 1024, 2, 1, None).expect("valid argon2 parameters")
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("password_file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("password_file {path}:{line}: {message}")]
    Line { path: String, line: usize, message: String },
}

/// `Ok` when `s` is a PHC string we can verify against.
pub fn check_hash(s: &str) -> Result<(), String> {
    let h = PasswordHash::new(s)
        .map_err(|e| format!("not a PHC password hash ({e}); make one with `edge-gateway hash-password`"))?;
    match h.algorithm.as_str() {
        "argon2id" | "argon2i" | "argon2d" => Ok(()),
        other => Err(format!("hash algorithm {other:?} is not supported; use argon2 (`edge-gateway hash-password`)")),
    }
}

/// A new argon2id PHC string for `password` (default parameters).
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, hash_params())
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with valid params")
        .to_string()
}

struct User {
    hash: String,
    publish: Option<Vec<String>>,
}

/// Outcome of a login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Login {
    /// Allowed; `publish` lists the allowed topic prefixes (None = anywhere).
    Ok {
        user: Option<String>,
        publish: Option<Arc<[String]>>,
    },
    BadCredentials,
    NotAuthorized,
    /// Too many checks waiting: refused without one (try again later).
    Busy,
}

pub struct Users {
    users: HashMap<String, User>,
    allow_anonymous: bool,
    /// Fingerprints of passwords that verified, per user.
    verified: Mutex<HashMap<String, u64>>,
    keys: std::collections::hash_map::RandomState,
    one_at_a_time: Arc<Semaphore>,
    /// Logins waiting for (or in) a password check.
    waiting: AtomicUsize,
    /// Checked for unknown users: a random password, hashed like the users'.
    dummy: String,
}

/// Gives back a waiting place when the login ends or is dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Users {
    /// Reads `password_file` and hashes the dummy password: blocking, tens
    /// to hundreds of milliseconds (call it off the async runtime).
    pub fn load(cfg: &BrokerConfig) -> Result<Users, AuthError> {
        let mut users = HashMap::new();
        let mut first_hash = None;
        if let Some(path) = &cfg.password_file {
            for (name, hash) in read_password_file(path)? {
                first_hash.get_or_insert_with(|| hash.clone());
                users.insert(name, User { hash, publish: None });
            }
        }
        for u in &cfg.users {
            first_hash.get_or_insert_with(|| u.password_hash.clone());
            users.insert(u.name.clone(), User { hash: u.password_hash.clone(), publish: u.publish.clone() });
        }
        Ok(Users {
            dummy: if users.is_empty() { String::new() } else { dummy_hash(first_hash.as_deref()) },
            users,
            allow_anonymous: cfg.allow_anonymous,
            verified: Mutex::new(HashMap::new()),
            keys: Default::default(),
            one_at_a_time: Arc::new(Semaphore::new(1)),
            waiting: AtomicUsize::new(0),
        })
    }

    pub fn count(&self) -> usize {
        self.users.len()
    }

    fn fingerprint(&self, password: &[u8]) -> u64 {
        let mut h = self.keys.build_hasher();
        h.write(password);
        h.finish()
    }

    /// Check a CONNECT's credentials (None = no username).
    pub async fn login(self: &Arc<Self>, creds: Option<(&str, &str)>) -> Login {
        let Some((name, password)) = creds else {
            return if self.allow_anonymous { Login::Ok { user: None, publish: None } } else { Login::NotAuthorized };
        };
        let user = self.users.get(name);
        let fp = self.fingerprint(password.as_bytes());
        if user.is_some() && self.verified.lock().unwrap_or_else(|e| e.into_inner()).get(name) == Some(&fp) {
            return Login::Ok {
                user: Some(name.to_string()),
                publish: user.and_then(|u| u.publish.clone()).map(Into::into),
            };
        }
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= MAX_WAITING_CHECKS {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Login::Busy;
        }
        let _waiting = Waiting(&self.waiting);
        let Ok(permit) = self.one_at_a_time.clone().acquire_owned().await else {
            return Login::Busy;
        };
        // Unknown users cost a check too (against the dummy), and fail.
        let hash = user.map_or_else(|| self.dummy.clone(), |u| u.hash.clone());
        let pw = password.to_string();
        // The permit goes with the check: if this login is dropped (its
        // connect_timeout passed), the next check still waits for this one.
        let verified = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            PasswordHash::new(&hash).is_ok_and(|h| argon2::Argon2::default().verify_password(pw.as_bytes(), &h).is_ok())
        })
        .await
        .unwrap_or(false);
        let Some(user) = user else {
            return Login::BadCredentials;
        };
        let ok = Login::Ok { user: Some(name.to_string()), publish: user.publish.clone().map(Into::into) };
        if verified {
            self.verified.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), fp);
            ok
        } else {
            Login::BadCredentials
        }
    }
}

/// A hash of a random password with the parameters of `like` (a user's
/// PHC string), or ours when it has none we can use.
fn dummy_hash(like: Option<&str>) -> String {
    let mut secret = [0u8; 16];
    argon2::password_hash::rand_core::RngCore::fill_bytes(&mut OsRng, &mut secret);
    let salt = SaltString::generate(&mut OsRng);
    let parsed = like.and_then(|h| PasswordHash::new(h).ok());
    let (algorithm, version, params) = parsed
        .and_then(|h| {
            let algorithm = argon2::Algorithm::try_from(h.algorithm).ok()?;
            let version = h.version.and_then(|v| argon2::Version::try_from(v).ok()).unwrap_or_default();
            Some((algorithm, version, argon2::Params::try_from(&h).ok()?))
        })
        .unwrap_or((argon2::Algorithm::Argon2id, argon2::Version::V0x13, hash_params()));
    argon2::Argon2::new(algorithm, version, params)
        .hash_password(&secret, &salt)
        .map(|h| h.to_string())
        .unwrap_or_else(|_| hash_password("dummy"))
}

/// May a client with these prefixes publish to `topic`?
pub fn may_publish(publish: &Option<Arc<[String]>>, topic: &str) -> bool {
    publish.as_ref().is_none_or(|prefixes| prefixes.iter().any(|p| topic.starts_with(p.as_str())))
}

fn read_password_file(path: &Path) -> Result<Vec<(String, String)>, AuthError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read { path: shown.clone(), source })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |message: String| AuthError::Line { path: shown.clone(), line: i + 1, message };
        let (name, hash) = line.split_once(':').ok_or_else(|| err("expected `user:PHC-hash`".into()))?;
        if name.is_empty() {
            return Err(err("empty user name".into()));
        }
        check_hash(hash).map_err(err)?;
        out.push((name.to_string(), hash.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passwords_verify_and_prefixes_limit_publishing() {
        let hash = hash_password("s3cret");
        assert!(check_hash(&hash).is_ok(), "{hash}");
        assert!(check_hash("plain").is_err());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("passwd");
        std::fs::write(&file, format!("# comment\nbob:{hash}\n")).unwrap();
        let cfg = BrokerConfig {
            password_file: Some(file.clone()),
            users: vec![crate::broker::config::BrokerUser {
                name: "site1".into(),
                password_hash: hash.clone(),
                publish: Some(vec!["sensors/site1-".into()]),
                devices: None,
            }],
            ..Default::default()
        };
        let users = Arc::new(Users::load(&cfg).unwrap());
        assert_eq!(users.login(None).await, Login::NotAuthorized);
        assert_eq!(users.login(Some(("bob", "nope"))).await, Login::BadCredentials);
        assert_eq!(users.login(Some(("eve", "s3cret"))).await, Login::BadCredentials);
        assert_eq!(users.login(Some(("bob", "s3cret"))).await, Login::Ok { user: Some("bob".into()), publish: None });
        // Remembered: the second login does not verify again, and a wrong password still fails.
        assert!(matches!(users.login(Some(("bob", "s3cret"))).await, Login::Ok { .. }));
        assert_eq!(users.login(Some(("bob", "s3cret!"))).await, Login::BadCredentials);
        let Login::Ok { publish, .. } = users.login(Some(("site1", "s3cret"))).await else { panic!() };
        assert!(may_publish(&publish, "sensors/site1-w1/hr"));
        assert!(!may_publish(&publish, "sensors/site2-w1/hr"));
        assert!(may_publish(&None, "anything"));

        std::fs::write(&file, "bob\n").unwrap();
        let e = Users::load(&cfg).err().unwrap().to_string();
        assert!(e.contains("passwd:1:"), "{e}");
    }
}
