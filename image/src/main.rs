//! Writes an OCI image layout tarball from a directory tree, for
//! `ctr images import` and other OCI tools: one reproducible gzip layer, the
//! image config, the manifest, and an `index.json` naming the image.
//! Prints the manifest digest (the image's digest in containerd).
//!
//! `arrow-image --rootfs DIR --name localhost/arrow/busybox:latest --cmd sh
//!  --output busybox.tar`

use std::path::PathBuf;

use anyhow::Context;
use arrow_image::{write_oci_archive, ImageSettings};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Writes an OCI image layout tarball from a directory tree")]
struct Args {
    /// The tree that becomes the image's only layer.
    #[arg(long)]
    rootfs: PathBuf,
    /// Full image reference, e.g. localhost/arrow/busybox:latest.
    #[arg(long)]
    name: String,
    /// Where to write the tarball.
    #[arg(long, short)]
    output: PathBuf,
    /// Entrypoint, one argument per flag, or a JSON array.
    #[arg(long)]
    entrypoint: Vec<String>,
    /// Cmd, one argument per flag, or a JSON array.
    #[arg(long)]
    cmd: Vec<String>,
    /// Environment variable KEY=VALUE (repeatable); PATH gets a default.
    #[arg(long)]
    env: Vec<String>,
    /// Working directory.
    #[arg(long, default_value = "/")]
    workdir: String,
    /// User to run as (empty: root).
    #[arg(long, default_value = "")]
    user: String,
    /// Label KEY=VALUE (repeatable).
    #[arg(long)]
    label: Vec<String>,
}

/// A single argument that is a JSON array stands for the whole list.
fn arg_list(args: Vec<String>) -> anyhow::Result<Vec<String>> {
    match args.as_slice() {
        [one] if one.trim_start().starts_with('[') => {
            serde_json::from_str(one).with_context(|| format!("not a JSON array of strings: {one}"))
        }
        _ => Ok(args),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut settings = ImageSettings::new(&args.name);
    settings.entrypoint = arg_list(args.entrypoint)?;
    settings.cmd = arg_list(args.cmd)?;
    settings.env = args.env;
    settings.working_dir = args.workdir;
    settings.user = args.user;
    for label in args.label {
        let (key, value) = label
            .split_once('=')
            .with_context(|| format!("label {label:?} is not KEY=VALUE"))?;
        settings.labels.insert(key.to_string(), value.to_string());
    }
    let built = write_oci_archive(&args.rootfs, &settings, &args.output)?;
    println!("{}", built.manifest_digest);
    Ok(())
}
