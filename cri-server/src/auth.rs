//! Registry credentials: the CRI `AuthConfig` of a pull (kubelet's image
//! pull secrets, `crictl pull --creds`), else a docker `config.json`
//! (`auths` entries with `auth` or `username`/`password`; credential helpers
//! are not run).

use std::path::Path;

use base64::Engine;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use crate::reference::DOCKER_HUB;

/// Credentials from a CRI `AuthConfig`, or `None` if it carries none.
pub fn from_cri(auth: &k8s_cri::v1::AuthConfig) -> Result<Option<RegistryAuth>, String> {
    if !auth.registry_token.is_empty() {
        return Ok(Some(RegistryAuth::Bearer(auth.registry_token.clone())));
    }
    if !auth.username.is_empty() || !auth.password.is_empty() {
        return Ok(Some(RegistryAuth::Basic(
            auth.username.clone(),
            auth.password.clone(),
        )));
    }
    if !auth.auth.is_empty() {
        return decode_basic(&auth.auth).map(Some);
    }
    if !auth.identity_token.is_empty() {
        return Err("AuthConfig.identity_token (an OAuth refresh token) is not supported; pass a username and password or a registry_token".into());
    }
    Ok(None)
}

/// `base64(user:password)`.
fn decode_basic(encoded: &str) -> Result<RegistryAuth, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|e| format!("AuthConfig.auth is not base64: {e}"))?;
    let text = String::from_utf8(bytes).map_err(|_| "AuthConfig.auth is not UTF-8".to_string())?;
    let (user, password) = text
        .split_once(':')
        .ok_or_else(|| "AuthConfig.auth is not base64 of user:password".to_string())?;
    Ok(RegistryAuth::Basic(user.to_string(), password.to_string()))
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: std::collections::HashMap<String, DockerAuth>,
}

#[derive(Deserialize)]
struct DockerAuth {
    #[serde(default)]
    auth: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    registrytoken: String,
}

/// The key of `auths` as the host it names: Docker writes
/// `https://index.docker.io/v1/` for Docker Hub and bare hosts for others.
fn key_host(key: &str) -> &str {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let k = k.split('/').next().unwrap_or(k);
    match k {
        "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB,
        other => other,
    }
}

/// Credentials for `host` (the endpoint spoken to) or `registry` (the name
/// in the reference) from the docker config at `path`.
pub fn from_docker_config(path: &Path, host: &str, registry: &str) -> Option<RegistryAuth> {
    if path.as_os_str().is_empty() {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let config: DockerConfig = match serde_json::from_str(&text) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "docker config.json unreadable; ignored");
            return None;
        }
    };
    let host = key_host(host);
    for wanted in [host, registry] {
        for (key, entry) in &config.auths {
            if key_host(key) != wanted {
                continue;
            }
            if !entry.registrytoken.is_empty() {
                return Some(RegistryAuth::Bearer(entry.registrytoken.clone()));
            }
            if !entry.username.is_empty() {
                return Some(RegistryAuth::Basic(
                    entry.username.clone(),
                    entry.password.clone(),
                ));
            }
            if !entry.auth.is_empty() {
                match decode_basic(&entry.auth) {
                    Ok(a) => return Some(a),
                    Err(e) => {
                        tracing::warn!(key = %key, error = %e, "docker config.json entry ignored")
                    }
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_auth() {
        let mut a = k8s_cri::v1::AuthConfig::default();
        assert!(from_cri(&a).unwrap().is_none());
        a.auth = base64::engine::general_purpose::STANDARD.encode("u:p:q");
        match from_cri(&a).unwrap() {
            Some(RegistryAuth::Basic(u, p)) => assert_eq!((u.as_str(), p.as_str()), ("u", "p:q")),
            other => panic!("{other:?}"),
        }
        a.username = "x".into();
        a.password = "y".into();
        assert!(matches!(from_cri(&a).unwrap(), Some(RegistryAuth::Basic(u, _)) if u == "x"));
    }

    #[test]
    fn docker_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let enc = base64::engine::general_purpose::STANDARD.encode("hub:pw");
        std::fs::write(
            &path,
            format!(r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{enc}"}},"127.0.0.1:5000":{{"username":"a","password":"b"}}}}}}"#),
        )
        .unwrap();
        assert!(matches!(
            from_docker_config(&path, "registry-1.docker.io", "docker.io"),
            Some(RegistryAuth::Basic(u, _)) if u == "hub"
        ));
        assert!(matches!(
            from_docker_config(&path, "127.0.0.1:5000", "docker.io"),
            Some(RegistryAuth::Basic(u, _)) if u == "a"
        ));
        assert!(from_docker_config(&path, "other:1", "other:1").is_none());
    }
}
