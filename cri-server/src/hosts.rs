//! Where to pull a registry's images from: containerd's `hosts.toml`
//! (<https://github.com/containerd/containerd/blob/main/docs/hosts.md>), read
//! from `<config_path>/<registry>/hosts.toml`, else
//! `<config_path>/_default/hosts.toml`:
//!
//! ```toml
//! server = "https://registry-1.docker.io"      # the upstream (optional)
//!
//! [host."http://127.0.0.1:5000"]               # tried first, in file order
//!   capabilities = ["pull", "resolve"]
//!   skip_verify = false                         # accept any TLS certificate
//!   ca = "/etc/arrow-cri/certs.d/my-ca.pem"     # extra CA (string or list)
//! ```
//!
//! Hosts without `pull` are skipped; the scheme says plain HTTP or TLS. A
//! registry on a loopback address with no file is spoken to over plain HTTP,
//! as Docker and containerd do. URL paths other than `/v2` are not supported.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::reference::DOCKER_HUB;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host[:port]` spoken to.
    pub host: String,
    pub plain_http: bool,
    pub skip_verify: bool,
    pub ca: Vec<PathBuf>,
    /// A host other than the registry itself (requests carry `?ns=`).
    pub mirror: bool,
}

#[derive(Debug, Default, Deserialize)]
struct HostsFile {
    server: Option<String>,
    #[serde(default)]
    capabilities: Option<Vec<String>>,
    #[serde(default)]
    skip_verify: Option<bool>,
    #[serde(default)]
    ca: Option<StringOrList>,
    #[serde(default)]
    host: toml::Table,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    fn paths(&self) -> Vec<PathBuf> {
        match self {
            StringOrList::One(s) => vec![s.into()],
            StringOrList::Many(v) => v.iter().map(PathBuf::from).collect(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct HostEntry {
    capabilities: Option<Vec<String>>,
    skip_verify: Option<bool>,
    ca: Option<StringOrList>,
    // Accepted, not used: headers, override_path, client.
    #[serde(flatten)]
    _rest: toml::Table,
}

pub fn is_loopback(host: &str) -> bool {
    let name = host_without_port(host);
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    name.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

fn host_without_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// Splits `scheme://host[:port][/v2]` into host and plain-HTTP-ness.
fn parse_url(url: &str) -> Result<(String, bool)> {
    let (plain, rest) = if let Some(r) = url.strip_prefix("http://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("https://") {
        (false, r)
    } else {
        bail!("{url:?}: a host must be an http:// or https:// URL");
    };
    let (host, path) = match rest.split_once('/') {
        Some((h, p)) => (h, p.trim_end_matches('/')),
        None => (rest, ""),
    };
    if !path.is_empty() && path != "v2" {
        bail!("{url:?}: URL paths other than /v2 are not supported");
    }
    if host.is_empty() {
        bail!("{url:?}: no host");
    }
    Ok((host.to_string(), plain))
}

/// The upstream of `registry` when no file names one.
fn default_server(registry: &str) -> Endpoint {
    if registry == DOCKER_HUB {
        return Endpoint {
            host: "registry-1.docker.io".into(),
            plain_http: false,
            skip_verify: false,
            ca: Vec::new(),
            mirror: false,
        };
    }
    Endpoint {
        host: registry.to_string(),
        plain_http: is_loopback(registry),
        skip_verify: false,
        ca: Vec::new(),
        mirror: false,
    }
}

/// The endpoints to try for `registry`, in order: the file's hosts, then the
/// server.
pub fn endpoints(config_path: &Path, registry: &str) -> Result<Vec<Endpoint>> {
    if config_path.as_os_str().is_empty() {
        return Ok(vec![default_server(registry)]);
    }
    let mut file = config_path.join(registry).join("hosts.toml");
    if !file.exists() {
        file = config_path.join("_default").join("hosts.toml");
        if !file.exists() {
            return Ok(vec![default_server(registry)]);
        }
    }
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    parse_hosts(&text, registry).with_context(|| format!("in {}", file.display()))
}

fn parse_hosts(text: &str, registry: &str) -> Result<Vec<Endpoint>> {
    let parsed: HostsFile = toml::from_str(text)?;
    let mut out = Vec::new();
    for (url, value) in parsed.host {
        let entry: HostEntry = value.try_into().with_context(|| format!("host {url:?}"))?;
        let caps = entry
            .capabilities
            .unwrap_or_else(|| vec!["pull".into(), "resolve".into()]);
        if !caps.iter().any(|c| c == "pull") {
            continue;
        }
        let (host, plain_http) = parse_url(&url)?;
        let mirror =
            !(host == registry || (registry == DOCKER_HUB && host == "registry-1.docker.io"));
        out.push(Endpoint {
            host,
            plain_http,
            skip_verify: entry.skip_verify.unwrap_or(false),
            ca: entry.ca.map(|c| c.paths()).unwrap_or_default(),
            mirror,
        });
    }
    // The upstream comes last, unless its capabilities leave out pull.
    let server_pulls = parsed
        .capabilities
        .as_ref()
        .is_none_or(|c| c.iter().any(|c| c == "pull"));
    if server_pulls {
        let mut server = match &parsed.server {
            Some(url) => {
                let (host, plain_http) = parse_url(url)?;
                let mirror = !(host == registry
                    || (registry == DOCKER_HUB && host == "registry-1.docker.io"));
                Endpoint {
                    host,
                    plain_http,
                    skip_verify: false,
                    ca: Vec::new(),
                    mirror,
                }
            }
            None => default_server(registry),
        };
        server.skip_verify = parsed.skip_verify.unwrap_or(false);
        server.ca = parsed.ca.map(|c| c.paths()).unwrap_or_default();
        out.push(server);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback() {
        assert!(is_loopback("localhost"));
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("127.5.0.1"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("registry.k8s.io"));
        assert!(!is_loopback("10.0.0.1:5000"));
    }

    #[test]
    fn defaults() {
        let e = endpoints(Path::new(""), "docker.io").unwrap();
        assert_eq!(e[0].host, "registry-1.docker.io");
        assert!(!e[0].plain_http);
        let e = endpoints(Path::new("/nonexistent"), "127.0.0.1:5000").unwrap();
        assert!(e[0].plain_http && !e[0].mirror);
    }

    #[test]
    fn hosts_file() {
        let text = r#"
server = "https://registry-1.docker.io"
[host."http://127.0.0.1:5000"]
  capabilities = ["pull", "resolve"]
[host."https://push-only.example"]
  capabilities = ["push"]
[host."https://mirror.example/v2"]
  skip_verify = true
  ca = ["/a.pem"]
"#;
        let e = parse_hosts(text, "docker.io").unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].host, "127.0.0.1:5000");
        assert!(e[0].plain_http && e[0].mirror);
        assert_eq!(e[1].host, "mirror.example");
        assert!(e[1].skip_verify && !e[1].plain_http);
        assert_eq!(e[1].ca, vec![PathBuf::from("/a.pem")]);
        assert_eq!(e[2].host, "registry-1.docker.io");
        assert!(!e[2].mirror);
        assert!(parse_hosts("[host.\"ftp://x\"]\n", "x").is_err());
    }
}
