//! Pod networks: a network namespace per pod, bind-mounted under
//! `/run/netns`, and the CNI plugins of the first network configuration in
//! the configured directory run in it (CNI spec 1.0: ADD, CHECK and DEL
//! through each plugin of a conflist, the previous plugin's result chained
//! in). What ADD was run with and returned is cached in the pod's state, so
//! DEL after an arrow-cri restart passes the same arguments.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::model::PortMapping;
use crate::error::{Error, Result};

/// Where `ip netns` and containerd keep named network namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// The pod's interface name inside its namespace (the shim moves it into
/// the guest).
pub const IFNAME: &str = "eth0";

/// A network configuration list (`.conflist`, or a single `.conf` plugin).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkList {
    /// The file it came from.
    pub file: PathBuf,
    pub name: String,
    pub cni_version: String,
    pub plugins: Vec<Value>,
}

/// Everything DEL needs, saved after a successful ADD.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attachment {
    pub network: NetworkList,
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    pub cni_args: String,
    pub port_mappings: Vec<PortMapping>,
    /// The last plugin's result.
    pub result: Value,
}

impl Attachment {
    /// The pod's addresses from the result, IPv4 first.
    pub fn ips(&self) -> Vec<String> {
        let mut ips: Vec<String> = self
            .result
            .get("ips")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.get("address").and_then(Value::as_str))
            .map(|a| a.split('/').next().unwrap_or(a).to_string())
            .collect();
        ips.sort_by_key(|ip| ip.contains(':'));
        ips
    }
}

#[derive(Debug, Clone)]
pub struct Cni {
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
}

impl Cni {
    /// The network pods join: the first `*.conflist`, `*.conf` or `*.json`
    /// of the configuration directory in name order, as containerd and
    /// kubelet pick it.
    pub fn network(&self) -> Result<NetworkList> {
        let entries = std::fs::read_dir(&self.conf_dir).map_err(|e| {
            Error::FailedPrecondition(format!(
                "no CNI network: reading {}: {e} (put a .conflist there, or set [cni] conf_dir)",
                self.conf_dir.display()
            ))
        })?;
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
            })
            .collect();
        files.sort();
        let file = files.into_iter().next().ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "no CNI network: {} has no .conflist, .conf or .json file",
                self.conf_dir.display()
            ))
        })?;
        let text = std::fs::read_to_string(&file)
            .map_err(|e| Error::Internal(format!("reading {}: {e}", file.display())))?;
        parse_network(&file, &text)
    }

    /// Runs ADD of every plugin of `network` for a pod.
    pub async fn add(
        &self,
        network: &NetworkList,
        container_id: &str,
        netns: &Path,
        cni_args: &str,
        port_mappings: &[PortMapping],
    ) -> Result<Attachment> {
        let mut attachment = Attachment {
            network: network.clone(),
            container_id: container_id.to_string(),
            netns: netns.to_path_buf(),
            ifname: IFNAME.to_string(),
            cni_args: cni_args.to_string(),
            port_mappings: port_mappings.to_vec(),
            result: Value::Null,
        };
        let mut previous: Option<Value> = None;
        for plugin in &network.plugins {
            let conf = plugin_config(network, plugin, previous.as_ref(), port_mappings);
            let out = self.exec("ADD", &attachment, plugin, &conf).await?;
            previous = Some(out);
        }
        attachment.result = previous.unwrap_or(Value::Null);
        Ok(attachment)
    }

    /// Runs CHECK of every plugin (the network is still as ADD made it).
    pub async fn check(&self, a: &Attachment) -> Result<()> {
        for plugin in &a.network.plugins {
            let conf = plugin_config(&a.network, plugin, Some(&a.result), &a.port_mappings);
            self.exec("CHECK", a, plugin, &conf).await?;
        }
        Ok(())
    }

    /// Runs DEL of every plugin in reverse order. Every plugin is asked
    /// even if one fails; the first error is returned.
    pub async fn del(&self, a: &Attachment) -> Result<()> {
        let mut first_error = None;
        for plugin in a.network.plugins.iter().rev() {
            let conf = plugin_config(&a.network, plugin, Some(&a.result), &a.port_mappings);
            if let Err(e) = self.exec("DEL", a, plugin, &conf).await {
                tracing::warn!(container = %a.container_id, "CNI DEL: {e}");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn exec(
        &self,
        command: &str,
        a: &Attachment,
        plugin: &Value,
        conf: &Value,
    ) -> Result<Value> {
        let kind = plugin.get("type").and_then(Value::as_str).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: a plugin has no \"type\"",
                a.network.file.display()
            ))
        })?;
        if kind.contains('/') || kind.starts_with('.') {
            return Err(Error::InvalidArgument(format!(
                "{}: plugin type {kind:?} is not a plain name",
                a.network.file.display()
            )));
        }
        let binary = self.bin_dir.join(kind);
        let stdin = serde_json::to_vec(conf)
            .map_err(|e| Error::Internal(format!("encoding the CNI config: {e}")))?;
        let mut child = tokio::process::Command::new(&binary)
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &a.container_id)
            .env("CNI_NETNS", &a.netns)
            .env("CNI_IFNAME", &a.ifname)
            .env("CNI_ARGS", &a.cni_args)
            .env("CNI_PATH", &self.bin_dir)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                Error::FailedPrecondition(format!(
                    "CNI plugin {}: {e} (is it installed in [cni] bin_dir?)",
                    binary.display()
                ))
            })?;
        if let Some(mut input) = child.stdin.take() {
            use tokio::io::AsyncWriteExt;
            input.write_all(&stdin).await.map_err(|e| {
                Error::Internal(format!("CNI plugin {kind}: writing its config: {e}"))
            })?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| Error::Internal(format!("CNI plugin {kind}: {e}")))?;
        if !out.status.success() {
            return Err(Error::Internal(format!(
                "CNI plugin {kind} {command} failed ({}): {}",
                out.status,
                plugin_error(&out.stdout, &out.stderr)
            )));
        }
        if command != "ADD" || out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            Error::Internal(format!(
                "CNI plugin {kind} ADD: its result is not JSON: {e}"
            ))
        })
    }
}

/// The CNI error object's message, else what the plugin printed.
fn plugin_error(stdout: &[u8], stderr: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(stdout) {
        let msg = v.get("msg").and_then(Value::as_str).unwrap_or("");
        let details = v.get("details").and_then(Value::as_str).unwrap_or("");
        if !msg.is_empty() {
            return if details.is_empty() {
                msg.to_string()
            } else {
                format!("{msg}: {details}")
            };
        }
    }
    let text = String::from_utf8_lossy(if stdout.is_empty() { stderr } else { stdout });
    text.trim().chars().take(1000).collect()
}

/// Parses a `.conflist` (or a `.conf` holding one plugin).
pub fn parse_network(file: &Path, text: &str) -> Result<NetworkList> {
    let bad = |why: &str| Error::InvalidArgument(format!("CNI config {}: {why}", file.display()));
    let v: Value = serde_json::from_str(text).map_err(|e| bad(&e.to_string()))?;
    let name = v
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no \"name\""))?
        .to_string();
    let cni_version = v
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or("1.0.0")
        .to_string();
    let plugins = match v.get("plugins") {
        Some(Value::Array(p)) if !p.is_empty() => p.clone(),
        Some(_) => return Err(bad("\"plugins\" must be a non-empty list")),
        None if v.get("type").is_some() => vec![v.clone()],
        None => return Err(bad("neither \"plugins\" nor \"type\"")),
    };
    Ok(NetworkList {
        file: file.to_path_buf(),
        name,
        cni_version,
        plugins,
    })
}

/// One plugin's stdin: its own object with the list's name and version, the
/// previous result and the runtime config for the capabilities it declares.
pub fn plugin_config(
    network: &NetworkList,
    plugin: &Value,
    previous: Option<&Value>,
    port_mappings: &[PortMapping],
) -> Value {
    let mut conf = plugin.clone();
    if let Value::Object(map) = &mut conf {
        map.insert("name".into(), json!(network.name));
        map.insert("cniVersion".into(), json!(network.cni_version));
        if let Some(prev) = previous {
            if !prev.is_null() {
                map.insert("prevResult".into(), prev.clone());
            }
        }
        let wants_ports = plugin
            .get("capabilities")
            .and_then(|c| c.get("portMappings"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if wants_ports && !port_mappings.is_empty() {
            let ports: Vec<Value> = port_mappings
                .iter()
                .map(|p| {
                    json!({
                        "hostPort": p.host_port,
                        "containerPort": p.container_port,
                        "protocol": p.protocol,
                        "hostIP": p.host_ip,
                    })
                })
                .collect();
            map.insert("runtimeConfig".into(), json!({ "portMappings": ports }));
        }
    }
    conf
}

/// CNI_ARGS as kubelet's CNI users pass them.
pub fn cni_args(namespace: &str, name: &str, sandbox_id: &str, uid: &str) -> String {
    let args: BTreeMap<&str, &str> = [
        ("IgnoreUnknown", "1"),
        ("K8S_POD_NAMESPACE", namespace),
        ("K8S_POD_NAME", name),
        ("K8S_POD_INFRA_CONTAINER_ID", sandbox_id),
        ("K8S_POD_UID", uid),
    ]
    .into_iter()
    .collect();
    args.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(";")
}

/// Makes a new network namespace and pins it at `/run/netns/<name>`.
pub fn create_netns(name: &str) -> Result<PathBuf> {
    let path = Path::new(NETNS_DIR).join(name);
    let fail = |what: &str, e: std::io::Error| {
        Error::Internal(format!(
            "creating network namespace {}: {what}: {e}",
            path.display()
        ))
    };
    std::fs::create_dir_all(NETNS_DIR).map_err(|e| fail("mkdir", e))?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| fail("creating the mount point", e))?;
    let target = path.clone();
    // unshare(CLONE_NEWNET) changes the calling thread's namespace: a
    // thread of its own does it and ends, so no runtime thread is moved.
    let pinned = std::thread::spawn(move || -> std::io::Result<()> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        // `lo` up, as containerd's CRI plugin has it (its loopback CNI
        // call): port-forward dials 127.0.0.1 here. The child runs in
        // this thread's namespace.
        let lo = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()?;
        if !lo.success() {
            return Err(std::io::Error::other(format!("ip link set lo up: {lo}")));
        }
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )?;
        Ok(())
    })
    .join()
    .map_err(|_| fail("pinning", std::io::Error::other("the thread panicked")))?;
    if let Err(e) = pinned {
        let _ = std::fs::remove_file(&path);
        return Err(fail("pinning", e));
    }
    Ok(path)
}

/// Unpins and removes a namespace made by [`create_netns`]; a missing one
/// is no error.
pub fn remove_netns(path: &Path) -> Result<()> {
    match nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => {
            return Err(Error::Internal(format!(
                "unmounting network namespace {}: {e}",
                path.display()
            )))
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Internal(format!("removing {}: {e}", path.display()))),
    }
}

/// Writes `text` to a new file `path`; used for the pod's resolv.conf,
/// hostname and hosts.
pub fn write_file(path: &Path, text: &str) -> Result<()> {
    let mut f = std::fs::File::create(path)
        .map_err(|e| Error::Internal(format!("creating {}: {e}", path.display())))?;
    f.write_all(text.as_bytes())
        .map_err(|e| Error::Internal(format!("writing {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFLIST: &str = r#"{
      "cniVersion": "1.0.0", "name": "net",
      "plugins": [
        {"type": "bridge", "bridge": "br9", "ipam": {"type": "host-local"}},
        {"type": "portmap", "capabilities": {"portMappings": true}}
      ]}"#;

    #[test]
    fn conflists_and_single_plugin_files() {
        let n = parse_network(Path::new("/x.conflist"), CONFLIST).unwrap();
        assert_eq!(n.name, "net");
        assert_eq!(n.plugins.len(), 2);
        let single =
            parse_network(Path::new("/x.conf"), r#"{"name":"a","type":"bridge"}"#).unwrap();
        assert_eq!(single.plugins.len(), 1);
        assert_eq!(single.cni_version, "1.0.0");
        assert!(parse_network(Path::new("/x"), r#"{"name":"a"}"#).is_err());
        assert!(parse_network(Path::new("/x"), r#"{"type":"a"}"#).is_err());
        assert!(parse_network(Path::new("/x"), "nope").is_err());
    }

    #[test]
    fn plugin_config_chains_results_and_ports() {
        let n = parse_network(Path::new("/x.conflist"), CONFLIST).unwrap();
        let ports = vec![PortMapping {
            protocol: "tcp".into(),
            container_port: 80,
            host_port: 8080,
            host_ip: String::new(),
        }];
        let prev = json!({"ips": [{"address": "10.99.0.5/16"}]});
        let first = plugin_config(&n, &n.plugins[0], None, &ports);
        assert_eq!(first["name"], "net");
        assert!(first.get("prevResult").is_none());
        assert!(first.get("runtimeConfig").is_none());
        let second = plugin_config(&n, &n.plugins[1], Some(&prev), &ports);
        assert_eq!(second["prevResult"], prev);
        assert_eq!(second["runtimeConfig"]["portMappings"][0]["hostPort"], 8080);
    }

    #[test]
    fn ips_from_a_result_ipv4_first() {
        let n = parse_network(Path::new("/x.conflist"), CONFLIST).unwrap();
        let a = Attachment {
            network: n,
            container_id: "c".into(),
            netns: "/run/netns/x".into(),
            ifname: IFNAME.into(),
            cni_args: String::new(),
            port_mappings: vec![],
            result: json!({"ips": [{"address": "fd00::5/64"}, {"address": "10.99.0.5/16"}]}),
        };
        assert_eq!(a.ips(), vec!["10.99.0.5", "fd00::5"]);
    }

    #[test]
    fn the_first_config_file_wins() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("20-b.conflist"), CONFLIST).unwrap();
        std::fs::write(
            dir.path().join("10-a.conf"),
            r#"{"name":"a","type":"bridge"}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("05-readme.txt"), "x").unwrap();
        let cni = Cni {
            conf_dir: dir.path().into(),
            bin_dir: "/nonexistent".into(),
        };
        assert_eq!(cni.network().unwrap().name, "a");
        let empty = tempfile::tempdir().unwrap();
        let none = Cni {
            conf_dir: empty.path().into(),
            bin_dir: "/x".into(),
        };
        assert!(matches!(none.network(), Err(Error::FailedPrecondition(_))));
    }

    #[test]
    fn args() {
        assert_eq!(
            cni_args("ns", "p", "id", "u"),
            "IgnoreUnknown=1;K8S_POD_INFRA_CONTAINER_ID=id;K8S_POD_NAME=p;K8S_POD_NAMESPACE=ns;K8S_POD_UID=u"
        );
    }
}
