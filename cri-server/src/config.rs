//! `arrow-cri`'s configuration: a TOML file (every key optional, the defaults
//! below), then the command line's overrides.
//!
//! ```toml
//! # /etc/arrow-cri/config.toml — every value shown is the default.
//! listen = "/run/arrow/arrow-cri.sock"   # the CRI socket (mode 0660)
//! root = "/var/lib/arrow-cri"            # images: blobs, layers, metadata
//! state = "/run/arrow-cri"               # runtime state: pods, containers, their shims
//! log_level = "info"                     # error|warn|info|debug|trace or a tracing filter
//! stream_address = "127.0.0.1:0"         # exec/attach/port-forward URLs (host:port)
//!
//! [cni]                                  # pod networks: the first conflist in conf_dir
//! conf_dir = "/etc/cni/net.d"
//! bin_dir = "/opt/cni/bin"
//!
//! [runtime]
//! # The shim every pod runs under (a path, or a name looked up on PATH).
//! shim = "containerd-shim-arrow-v1"
//!
//! [registry]
//! # containerd-style hosts.toml per registry: <config_path>/<host>/hosts.toml
//! # (mirrors, plain HTTP, skip_verify, CA); "" disables it.
//! config_path = "/etc/arrow-cri/certs.d"
//! # Credentials for pulls that bring no CRI AuthConfig; "" disables it.
//! docker_config = "/root/.docker/config.json"
//! max_concurrent_downloads = 3
//!
//! [image]
//! # Reported as pinned (kubelet's image GC keeps them) and not removable.
//! pinned_images = ["registry.k8s.io/pause:3.10"]
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

pub const DEFAULT_CONFIG: &str = "/etc/arrow-cri/config.toml";

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: PathBuf,
    pub root: PathBuf,
    pub state: PathBuf,
    pub log_level: String,
    pub stream_address: String,
    pub cni: CniConfig,
    pub runtime: RuntimeConfig,
    pub registry: RegistryConfig,
    pub image: ImageConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    pub shim: PathBuf,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            shim: "containerd-shim-arrow-v1".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CniConfig {
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    pub config_path: PathBuf,
    pub docker_config: PathBuf,
    pub max_concurrent_downloads: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageConfig {
    pub pinned_images: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "/run/arrow/arrow-cri.sock".into(),
            root: "/var/lib/arrow-cri".into(),
            state: "/run/arrow-cri".into(),
            log_level: "info".into(),
            stream_address: "127.0.0.1:0".into(),
            cni: CniConfig::default(),
            runtime: RuntimeConfig::default(),
            registry: RegistryConfig::default(),
            image: ImageConfig::default(),
        }
    }
}

impl Default for CniConfig {
    fn default() -> Self {
        CniConfig {
            conf_dir: "/etc/cni/net.d".into(),
            bin_dir: "/opt/cni/bin".into(),
        }
    }
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            config_path: "/etc/arrow-cri/certs.d".into(),
            docker_config: "/root/.docker/config.json".into(),
            max_concurrent_downloads: 3,
        }
    }
}

impl Default for ImageConfig {
    fn default() -> Self {
        ImageConfig {
            pinned_images: vec!["registry.k8s.io/pause:3.10".into()],
        }
    }
}

impl Config {
    /// Reads `path`; a missing file is the defaults when `required` is false
    /// (the default path), an error when the user named it.
    pub fn load(path: &Path, required: bool) -> Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Config::default())
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Config::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Config> {
        Ok(toml::from_str(text)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_defaults_parse_to_the_defaults() {
        // The module documentation's example is the defaults, written out.
        let doc = include_str!("config.rs");
        let example: String = doc
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| l.trim_start_matches("//!").trim_start_matches(' '))
            .collect::<Vec<_>>()
            .join("\n");
        let parsed = Config::parse(&example).unwrap();
        let default = Config::default();
        assert_eq!(format!("{parsed:?}"), format!("{default:?}"));
    }

    #[test]
    fn partial_file_and_unknown_keys() {
        let c = Config::parse("root = \"/x\"\n[registry]\nmax_concurrent_downloads = 8\n").unwrap();
        assert_eq!(c.root, PathBuf::from("/x"));
        assert_eq!(c.registry.max_concurrent_downloads, 8);
        assert_eq!(c.listen, Config::default().listen);
        assert!(Config::parse("nope = 1").is_err());
    }
}
