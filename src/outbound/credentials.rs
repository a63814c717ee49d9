//! Username and password for the proxy outbounds (SOCKS5 per RFC 1929,
//! HTTP Basic), and their validation from the config file.

use std::fmt;

/// A username and password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    // Never print the password, not even in a debug dump of the config.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// The credentials a proxy outbound's `username`, `password` and
/// `password_env` give: the password from the file or from the
/// environment, never both. Problems go to `issue` (`key` names the
/// outbound); None when there are no credentials or they are wrong.
pub fn validate(
    key: &str,
    username: &Option<String>,
    password: &Option<String>,
    password_env: &Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
    issue: &mut dyn FnMut(&str, String),
) -> Option<Credentials> {
    let password: Result<Option<String>, ()> = match (password, password_env) {
        (Some(_), Some(_)) => {
            issue(
                &format!("{key}.password"),
                "set either password or password_env, not both".into(),
            );
            Err(())
        }
        (Some(p), None) => Ok(Some(p.clone())),
        (None, Some(var)) => match env(var) {
            Some(p) => Ok(Some(p)),
            None => {
                issue(
                    &format!("{key}.password_env"),
                    format!("environment variable {var} is not set"),
                );
                Err(())
            }
        },
        (None, None) => Ok(None),
    };
    match (username, password) {
        (_, Err(())) | (None, Ok(None)) => None,
        (Some(u), Ok(Some(p))) => {
            // RFC 1929 carries each in one length byte.
            if u.is_empty() || u.len() > 255 {
                issue(
                    &format!("{key}.username"),
                    "must be 1 to 255 bytes (RFC 1929)".into(),
                );
            }
            if p.is_empty() || p.len() > 255 {
                issue(
                    &format!("{key}.password"),
                    "must be 1 to 255 bytes (RFC 1929)".into(),
                );
            }
            Some(Credentials {
                username: u.clone(),
                password: p,
            })
        }
        (Some(_), Ok(None)) => {
            issue(
                &format!("{key}.password"),
                "username is set but no password".into(),
            );
            None
        }
        (None, Ok(Some(_))) => {
            issue(
                &format!("{key}.username"),
                "password is set but no username".into(),
            );
            None
        }
    }
}
