//! `arrow-cri`: see the crate documentation and the README.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use cri_server::config::{Config, DEFAULT_CONFIG};

/// Arrow's CRI server: kubelet, k3s and crictl talk to it on a Unix socket.
#[derive(Parser, Debug)]
#[command(name = "arrow-cri", version)]
struct Args {
    /// The TOML configuration file (missing is fine when not given).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The CRI socket to serve.
    #[arg(long, value_name = "SOCKET")]
    listen: Option<PathBuf>,
    /// Images and other persistent data.
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Runtime state.
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    #[arg(long, value_name = "DIR")]
    cni_conf_dir: Option<PathBuf>,
    #[arg(long, value_name = "DIR")]
    cni_bin_dir: Option<PathBuf>,
    /// The shim binary pods run under.
    #[arg(long, value_name = "PATH")]
    shim: Option<PathBuf>,
    /// The streaming server's address (exec, attach, port-forward).
    #[arg(long, value_name = "ADDR")]
    stream_address: Option<String>,
    /// error, warn, info, debug, trace, or a tracing filter.
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut config = match &args.config {
        Some(path) => Config::load(path, true)?,
        None => Config::load(std::path::Path::new(DEFAULT_CONFIG), false)?,
    };
    if let Some(v) = args.listen {
        config.listen = v;
    }
    if let Some(v) = args.root {
        config.root = v;
    }
    if let Some(v) = args.state {
        config.state = v;
    }
    if let Some(v) = args.cni_conf_dir {
        config.cni.conf_dir = v;
    }
    if let Some(v) = args.cni_bin_dir {
        config.cni.bin_dir = v;
    }
    if let Some(v) = args.shim {
        config.runtime.shim = v;
    }
    if let Some(v) = args.stream_address {
        config.stream_address = v;
    }
    if let Some(v) = args.log_level {
        config.log_level = v;
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .map_err(|e| anyhow::anyhow!("log_level {:?}: {e}", config.log_level))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(cri_server::server::run(config));
    if let Err(e) = &result {
        tracing::error!("{e:#}");
    }
    result
}
