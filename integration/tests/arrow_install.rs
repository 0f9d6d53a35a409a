//! `arrow install`, `uninstall` and `check`, as an operator runs them (the
//! binary `hack/build.sh` stages): into copies of Debian's and containerd's
//! stock configs and into k3s templates (absent, empty, existing), checking
//! that the result parses (by containerd itself), keeps every other key and
//! comment, has runtime arrow, that a second run changes nothing and that
//! uninstall restores the original byte for byte; then a private containerd
//! started with such a config runs an `arrow` pod; and `arrow check` on this
//! host and with `/dev/kvm` hidden in a mount namespace.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use integration::containerd::{skip_unless_root, ADDRESS, BUSYBOX_IMAGE, LOG, NAMESPACE};
use integration::cri::{log_text, read_cri_log, unique_name, CriClient};
use integration::{arrow_cli, bin_dir, kernel, workspace_root};
use toml_edit::{DocumentMut, Item};

/// Debian 12's /etc/containerd/config.toml (package containerd 1.6.20),
/// with comments an operator might have added.
const DEBIAN_CONFIG: &str = r#"# Managed by hand: see the wiki.
version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    # Debian's plugins live here.
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"#;

/// What `arrow install` writes in a containerd config.
const ARROW_TABLE: &str = "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.arrow]";

fn arrow(args: &[&str]) -> Output {
    Command::new(arrow_cli())
        .args(args)
        .output()
        .expect("running arrow")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Every leaf key of a TOML document as a dotted path, with its value.
fn leaves(text: &str) -> BTreeMap<String, String> {
    fn walk(prefix: &str, item: &Item, out: &mut BTreeMap<String, String>) {
        match item.as_table_like() {
            Some(table) => {
                for (k, v) in table.iter() {
                    walk(&format!("{prefix}.{k}"), v, out);
                }
            }
            None => {
                out.insert(prefix.to_string(), item.to_string().trim().to_string());
            }
        }
    }
    let doc: DocumentMut = text
        .parse()
        .unwrap_or_else(|e| panic!("not TOML: {e}\n{text}"));
    let mut out = BTreeMap::new();
    walk("", doc.as_item(), &mut out);
    out
}

/// Whether containerd itself loads `config` and sees runtime arrow.
fn containerd_loads_with_arrow(config: &Path) -> bool {
    let out = Command::new("containerd")
        .args(["--config", path_str(config), "config", "dump"])
        .output()
        .expect("running containerd config dump");
    assert!(
        out.status.success(),
        "containerd rejects {}: {}",
        config.display(),
        text(&out)
    );
    let dump = String::from_utf8_lossy(&out.stdout);
    let Some(at) = dump.find(".containerd.runtimes.arrow]") else {
        return false;
    };
    dump[at..]
        .lines()
        .take_while(|l| !l.trim_start().starts_with("[plugins") || l.contains("runtimes.arrow]"))
        .any(|l| l.trim() == "runtime_type = \"io.containerd.arrow.v1\"")
}

fn have_containerd() -> bool {
    Command::new("containerd")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// containerd's own defaults (`containerd config default`), with comments.
fn stock_config() -> String {
    let out = Command::new("containerd")
        .args(["config", "default"])
        .output()
        .expect("containerd config default");
    assert!(out.status.success());
    let stock = String::from_utf8(out.stdout).expect("UTF-8");
    format!(
        "# containerd config default, kept as shipped.\n{}",
        stock.replace("[grpc]\n", "[grpc]\n  # the socket kubelet uses\n")
    )
}

/// install, install again, uninstall on a copy of `original`.
fn containerd_round_trip(original: &str) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let record = dir.path().join("install.json");
    fs::write(&config, original).unwrap();
    let args = [
        "install",
        "--config-only",
        "--containerd",
        path_str(&config),
        "--record",
        path_str(&record),
    ];
    let out = arrow(&args);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("replaced"), "{stdout}");
    assert!(stdout.contains("systemctl restart containerd"), "{stdout}");
    let installed = fs::read_to_string(&config).unwrap();
    // Everything the operator had, comments and layout included, is still
    // there, unchanged and first; the rest is runtime arrow.
    assert!(installed.starts_with(original), "{installed}");
    assert!(installed.contains(ARROW_TABLE), "{installed}");
    let (before, after) = (leaves(original), leaves(&installed));
    for (key, value) in &before {
        assert_eq!(after.get(key), Some(value), "{key} changed");
    }
    let added: Vec<_> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    assert!(
        added.iter().all(|k| k.contains(".runtimes.arrow.")),
        "{added:?}"
    );
    assert!(containerd_loads_with_arrow(&config));
    assert_eq!(
        fs::read(dir.path().join("config.toml.arrow-backup")).unwrap(),
        original.as_bytes()
    );

    let again = arrow(&args);
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("unchanged"),
        "{}",
        text(&again)
    );
    assert_eq!(
        fs::read_to_string(&config).unwrap(),
        installed,
        "a second run changed it"
    );

    let undo = arrow(&["uninstall", "--record", path_str(&record)]);
    assert!(undo.status.success(), "{}", text(&undo));
    assert_eq!(fs::read(&config).unwrap(), original.as_bytes());
    assert!(!dir.path().join("config.toml.arrow-backup").exists());
    assert!(!record.exists());
}

#[test]
fn install_into_debians_config() {
    if !have_containerd() {
        eprintln!("skipping install_into_debians_config: no containerd (hack/deps.sh)");
        return;
    }
    containerd_round_trip(DEBIAN_CONFIG);
}

#[test]
fn install_into_containerds_default_config() {
    if !have_containerd() {
        eprintln!("skipping install_into_containerds_default_config: no containerd (hack/deps.sh)");
        return;
    }
    containerd_round_trip(&stock_config());
}

#[test]
fn refuses_a_version_1_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let original = "[plugins.cri]\n  sandbox_image = \"pause\"\n";
    fs::write(&config, original).unwrap();
    let record = dir.path().join("install.json");
    let out = arrow(&[
        "install",
        "--config-only",
        "--containerd",
        path_str(&config),
        "--record",
        path_str(&record),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("version 1"),
        "{}",
        text(&out)
    );
    assert_eq!(fs::read_to_string(&config).unwrap(), original);
    assert!(!record.exists());
    assert!(!dir.path().join("config.toml.arrow-backup").exists());
}

/// k3s renders the template with `{{ template "base" . }}` replaced by the
/// config it would write; containerd's default stands in for it.
fn render_k3s(template: &str, base: &str) -> String {
    template.replace("{{ template \"base\" . }}", base)
}

#[test]
fn install_into_k3s_templates() {
    if !have_containerd() {
        eprintln!("skipping install_into_k3s_templates: no containerd (hack/deps.sh)");
        return;
    }
    let base = stock_config();
    let existing = "{{ template \"base\" . }}\n\n# Our registry mirror.\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\n  endpoint = [\"https://mirror.example\"]\n";
    for original in [None, Some(""), Some(existing)] {
        let dir = tempfile::tempdir().unwrap();
        let template = dir.path().join("agent/etc/containerd/config.toml.tmpl");
        if let Some(t) = original {
            fs::create_dir_all(template.parent().unwrap()).unwrap();
            fs::write(&template, t).unwrap();
        }
        let record = dir.path().join("install.json");
        let args = [
            "install",
            "--config-only",
            "--k3s",
            path_str(&template),
            "--record",
            path_str(&record),
        ];
        let out = arrow(&args);
        assert!(out.status.success(), "{original:?}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("systemctl restart k3s"),
            "{}",
            text(&out)
        );
        let installed = fs::read_to_string(&template).unwrap();
        assert!(
            installed.starts_with("{{ template \"base\" . }}"),
            "{installed}"
        );
        assert!(
            installed.starts_with(original.unwrap_or_default()),
            "{installed}"
        );
        assert!(installed.contains(ARROW_TABLE), "{installed}");
        let rendered = dir.path().join("rendered.toml");
        fs::write(&rendered, render_k3s(&installed, &base)).unwrap();
        let keys = leaves(&fs::read_to_string(&rendered).unwrap());
        if original == Some(existing) {
            assert!(keys.contains_key(
                ".plugins.io.containerd.grpc.v1.cri.registry.mirrors.docker.io.endpoint"
            ));
        }
        assert!(containerd_loads_with_arrow(&rendered), "{installed}");

        let again = arrow(&args);
        assert!(again.status.success(), "{}", text(&again));
        assert_eq!(fs::read_to_string(&template).unwrap(), installed);

        let undo = arrow(&["uninstall", "--record", path_str(&record)]);
        assert!(undo.status.success(), "{}", text(&undo));
        match original {
            None => assert!(!template.exists()),
            Some(t) => assert_eq!(fs::read(&template).unwrap(), t.as_bytes()),
        }
    }
}

#[test]
fn install_binaries_and_kernel_into_a_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("bin");
    let cache = dir.path().join("cache");
    let config = dir.path().join("config.toml");
    fs::write(&config, DEBIAN_CONFIG).unwrap();
    let record = dir.path().join("install.json");
    let kernel = kernel();
    let run = || {
        Command::new(arrow_cli())
            .env("ARROW_CACHE", &cache)
            .env_remove("ARROW_KERNEL")
            .args([
                "install",
                "--containerd",
                path_str(&config),
                "--prefix",
                path_str(&prefix),
            ])
            .args([
                "--from",
                path_str(&bin_dir()),
                "--kernel",
                path_str(&kernel),
            ])
            .args(["--record", path_str(&record)])
            .output()
            .unwrap()
    };
    let out = run();
    assert!(out.status.success(), "{}", text(&out));
    for name in [
        "containerd-shim-arrow-v1",
        "arrow-vmm",
        "arrow-init",
        "arrow",
    ] {
        assert_eq!(
            fs::read(prefix.join(name)).unwrap(),
            fs::read(bin_dir().join(name)).unwrap(),
            "{name}"
        );
    }
    assert_eq!(
        fs::read(cache.join("kernel/vmlinux")).unwrap(),
        fs::read(&kernel).unwrap()
    );
    let again = run();
    assert!(again.status.success(), "{}", text(&again));
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert_eq!(stdout.matches("unchanged").count(), 6, "{stdout}");
    let undo = arrow(&["uninstall", "--record", path_str(&record)]);
    assert!(undo.status.success(), "{}", text(&undo));
    assert_eq!(fs::read_dir(&prefix).unwrap().count(), 0);
    assert!(!cache.join("kernel/vmlinux").exists());
    assert_eq!(fs::read_to_string(&config).unwrap(), DEBIAN_CONFIG);
}

/// `arrow check` with the staged binaries as the installed ones.
fn check_command() -> Command {
    let mut cmd = Command::new(arrow_cli());
    cmd.args(["check", "--prefix", path_str(&bin_dir())])
        .args(["--kernel", path_str(&kernel())]);
    cmd
}

fn line<'a>(out: &'a str, what: &str) -> &'a str {
    out.lines()
        .find(|l| {
            l.get(5..)
                .is_some_and(|rest| rest.split_whitespace().next() == Some(what))
        })
        .unwrap_or_else(|| panic!("no {what} line in:\n{out}"))
}

const CHECKS: [&str; 10] = [
    "kvm",
    "kernel",
    "binaries",
    "containerd",
    "runtime",
    "cgroup",
    "cni",
    "tun",
    "vsock",
    "memory",
];

#[test]
fn check_on_this_host() {
    if skip_unless_root("check_on_this_host") {
        return;
    }
    let out = check_command().output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    for what in CHECKS {
        line(&stdout, what);
    }
    let kvm = line(&stdout, "kvm");
    assert!(kvm.starts_with("ok"), "{stdout}");
    if Path::new("/sys/module/kvm_pvm").exists() {
        assert!(kvm.contains("kvm_pvm"), "{kvm}");
    }
    assert!(line(&stdout, "kernel").starts_with("ok"), "{stdout}");
    assert!(line(&stdout, "binaries").starts_with("ok"), "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(stdout.ends_with("this host can run Arrow\n"), "{stdout}");
}

#[test]
fn check_with_kvm_hidden() {
    if skip_unless_root("check_with_kvm_hidden") {
        return;
    }
    // In a mount namespace of its own, /dev/kvm is /dev/null (a character
    // device that is not KVM) or an empty file.
    for (hide, says) in [
        ("mount --bind /dev/null /dev/kvm", "does not answer as KVM"),
        (
            "f=$(mktemp) && mount --bind \"$f\" /dev/kvm",
            "not a character device",
        ),
    ] {
        let check = check_command();
        let args: Vec<String> = std::iter::once(check.get_program())
            .chain(check.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let out = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(format!("{hide} && exec \"$@\""))
            .arg("sh")
            .args(&args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let kvm = line(&stdout, "kvm");
        assert!(kvm.starts_with("FAIL"), "{stdout}");
        assert!(kvm.contains(says), "{kvm}");
        assert!(line(&stdout, "kernel").starts_with("ok"), "{stdout}");
        assert!(stdout.ends_with("fix the FAIL lines\n"), "{stdout}");
    }
    // Outside, /dev/kvm is untouched.
    let outside = check_command().output().unwrap();
    assert!(outside.status.success(), "{}", text(&outside));
}

/// hack/containerd.sh with `ARROW_CONTAINERD_CONFIG` = `config`.
fn containerd_sh(config: &Path, cmd: &str) -> Output {
    Command::new(workspace_root().join("hack/containerd.sh"))
        .env("ARROW_CONTAINERD_CONFIG", config)
        .arg(cmd)
        .output()
        .unwrap()
}

/// Sets `path` (dotted, from the root) in `doc` to `value`.
fn set(doc: &mut DocumentMut, path: &[&str], value: Item) {
    let (last, parents) = path.split_last().unwrap();
    let mut table = doc.as_table_mut();
    for key in parents {
        table = table
            .entry(key)
            .or_insert_with(toml_edit::table)
            .as_table_mut()
            .unwrap_or_else(|| panic!("{key} is not a table"));
    }
    table.insert(last, value);
}

/// containerd's default config, pointed at hack/containerd.sh's private
/// root, state, sockets, CNI network and test images (taken from the config
/// that script writes), so its stop cleans up after it.
fn private_stock_config() -> String {
    let private = Command::new(workspace_root().join("hack/containerd.sh"))
        .arg("config")
        .env_remove("ARROW_CONTAINERD_CONFIG")
        .output()
        .unwrap();
    assert!(private.status.success(), "{}", text(&private));
    let private: DocumentMut = String::from_utf8_lossy(&private.stdout).parse().unwrap();
    let mut doc: DocumentMut = stock_config().parse().unwrap();
    let cri = "io.containerd.grpc.v1.cri";
    let keys: &[&[&str]] = &[
        &["root"],
        &["state"],
        &["disabled_plugins"],
        &["grpc", "address"],
        &["ttrpc", "address"],
        &["debug", "address"],
        &["plugins", "io.containerd.internal.v1.opt", "path"],
        &["plugins", cri, "sandbox_image"],
        &["plugins", cri, "restrict_oom_score_adj"],
        &["plugins", cri, "stream_server_address"],
        &["plugins", cri, "stream_server_port"],
        &["plugins", cri, "disable_apparmor"],
        &["plugins", cri, "netns_mounts_under_state_dir"],
        &[
            "plugins",
            cri,
            "containerd",
            "runtimes",
            "runc",
            "options",
            "SystemdCgroup",
        ],
        &[
            "plugins",
            cri,
            "containerd",
            "runtimes",
            "runc",
            "options",
            "Root",
        ],
        &["plugins", cri, "cni", "bin_dir"],
        &["plugins", cri, "cni", "conf_dir"],
        &["plugins", cri, "cni", "max_conf_num"],
    ];
    for path in keys {
        let mut item = private.as_item();
        for k in *path {
            item = item
                .get(k)
                .unwrap_or_else(|| panic!("{path:?} not in hack/containerd.sh's config"));
        }
        set(&mut doc, path, item.clone());
    }
    doc.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installed_config_runs_an_arrow_pod() {
    if skip_unless_root("installed_config_runs_an_arrow_pod") {
        return;
    }
    // No other test of this binary uses the private containerd; test
    // binaries run one after another.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let record = dir.path().join("install.json");
    let original = private_stock_config();
    fs::write(&config, &original).unwrap();
    let out = arrow(&[
        "install",
        "--config-only",
        "--containerd",
        path_str(&config),
        "--record",
        path_str(&record),
    ]);
    assert!(out.status.success(), "{}", text(&out));

    // The shared test containerd makes way for ours (same root and
    // socket); the next test binary starts it again.
    let _ = Command::new(workspace_root().join("hack/containerd.sh"))
        .arg("stop")
        .output();
    let started = containerd_sh(&config, "start");
    assert!(started.status.success(), "{}", text(&started));
    let result = run_one_arrow_pod().await;
    let stopped = containerd_sh(&config, "stop");
    result.unwrap_or_else(|e| panic!("{e:#}"));
    assert!(stopped.status.success(), "{}", text(&stopped));

    let undo = arrow(&["uninstall", "--record", path_str(&record)]);
    assert!(undo.status.success(), "{}", text(&undo));
    assert_eq!(fs::read_to_string(&config).unwrap(), original);
}

/// The end of the private containerd's log, for failure messages.
fn log_tail() -> String {
    let text = fs::read_to_string(LOG).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// One pod of handler `arrow` through the CRI of the containerd running
/// the installed config (not `Containerd::start`, which would restart it
/// with hack/containerd.sh's own config).
async fn run_one_arrow_pod() -> anyhow::Result<()> {
    let images = Command::new(workspace_root().join("hack/images.sh"))
        .args(["import", ADDRESS, NAMESPACE])
        .output()?;
    anyhow::ensure!(
        images.status.success(),
        "hack/images.sh import: {}",
        text(&images)
    );
    let cri = CriClient::connect(ADDRESS).await?;
    cri.wait_ready(Duration::from_secs(30)).await?;
    let pod = cri
        .run_pod_sandbox(&unique_name("installed"), "arrow")
        .await
        .map_err(|e| e.context(log_tail()))?;
    let result = async {
        let id = cri
            .create_container(
                &pod,
                "hello",
                BUSYBOX_IMAGE,
                &["sh", "-c", "echo hello from $(uname -r)"],
                "hello/0.log",
            )
            .await?;
        cri.start_container(&id).await?;
        let code = cri
            .wait_container_exit(&id, Duration::from_secs(120))
            .await?;
        anyhow::ensure!(code == 0, "exit code {code}");
        let lines = read_cri_log(pod.log_file("hello/0.log"))?;
        let out = log_text(&lines, Some("stdout"));
        // The guest's kernel, not the host's: the pod ran in a microVM.
        let host = fs::read_to_string("/proc/sys/kernel/osrelease")?;
        anyhow::ensure!(
            out.starts_with("hello from ") && out.trim() != format!("hello from {}", host.trim()),
            "{out:?}"
        );
        Ok(())
    }
    .await;
    cri.remove_pod(&pod).await?;
    result
}
