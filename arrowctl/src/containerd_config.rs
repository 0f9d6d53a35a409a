//! Adds runtime `arrow` to a containerd `config.toml`, and takes it out again.
//!
//! The file is edited with `toml_edit`, not rewritten: every other key,
//! comment and blank line stays as the operator left it, and a file that
//! already has the runtime comes back byte for byte unchanged. Only the
//! config versions whose layout we know are touched: 2 (containerd 1.x)
//! and 3 (containerd 2.x); version 1 (no `version` key) and anything newer
//! are refused rather than guessed at.

use toml_edit::{Array, DocumentMut, Item, Table, Value};

use crate::error::{Error, Result};

/// containerd's runtime type for the Arrow shim (`containerd-shim-arrow-v1`).
pub const RUNTIME_TYPE: &str = "io.containerd.arrow.v1";
/// The runtime handler name pods ask for (`runtimeClassName: arrow`).
pub const HANDLER: &str = "arrow";
/// Annotations the CRI plugin must pass to the shim (per-pod VM settings).
pub const ANNOTATIONS: &str = "io.arrow.*";

/// The containerd config versions this tool understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigVersion {
    /// containerd 1.x (`version = 2`).
    V2,
    /// containerd 2.x (`version = 3`).
    V3,
}

impl ConfigVersion {
    /// The version a new config gets for containerd `major` (1 or 2).
    pub fn for_containerd_major(major: u32) -> Self {
        if major >= 2 {
            ConfigVersion::V3
        } else {
            ConfigVersion::V2
        }
    }

    fn number(self) -> i64 {
        match self {
            ConfigVersion::V2 => 2,
            ConfigVersion::V3 => 3,
        }
    }

    /// The CRI plugin's table that holds `containerd.runtimes`.
    pub fn cri_plugin(self) -> &'static str {
        match self {
            ConfigVersion::V2 => "io.containerd.grpc.v1.cri",
            ConfigVersion::V3 => "io.containerd.cri.v1.runtime",
        }
    }

    /// The path of table `runtimes.arrow`, from the document's root.
    fn runtime_path(self) -> [&'static str; 5] {
        [
            "plugins",
            self.cri_plugin(),
            "containerd",
            "runtimes",
            HANDLER,
        ]
    }

    /// The `[...]` header of the arrow runtime's table.
    pub fn runtime_header(self) -> String {
        format!(
            "[plugins.\"{}\".containerd.runtimes.{HANDLER}]",
            self.cri_plugin()
        )
    }
}

/// The version a config declares, refusing those we do not know.
pub fn version_of(doc: &DocumentMut) -> Result<ConfigVersion> {
    match doc.get("version") {
        None => Err(Error::UnsupportedVersion(
            "no `version` key (version 1); convert it with `containerd config migrate` \
             or add runtime arrow by hand (README)"
                .into(),
        )),
        Some(item) => match item.as_integer() {
            Some(2) => Ok(ConfigVersion::V2),
            Some(3) => Ok(ConfigVersion::V3),
            Some(n) => Err(Error::UnsupportedVersion(format!(
                "version = {n}; arrow knows versions 2 (containerd 1.x) and 3 (containerd 2.x)"
            ))),
            None => Err(Error::UnsupportedVersion(format!(
                "`version` is {}, not an integer",
                item.to_string().trim()
            ))),
        },
    }
}

fn parse(text: &str) -> Result<DocumentMut> {
    text.parse::<DocumentMut>()
        .map_err(|e| Error::Toml(e.to_string()))
}

/// A fresh config holding only the arrow runtime, for a host without one
/// (containerd's defaults then apply to everything else).
pub fn new_config(version: ConfigVersion) -> String {
    format!(
        "# Written by `arrow install`: containerd's defaults, plus runtime arrow.\n\
         version = {}\n\n{}",
        version.number(),
        runtime_block(version)
    )
}

/// The arrow runtime's table as text (the README's snippet; k3s templates).
pub fn runtime_block(version: ConfigVersion) -> String {
    format!(
        "{}\n  runtime_type = \"{RUNTIME_TYPE}\"\n  pod_annotations = [\"{ANNOTATIONS}\"]\n  container_annotations = [\"{ANNOTATIONS}\"]\n",
        version.runtime_header()
    )
}

/// Returns `text` with runtime arrow configured. Unchanged (byte for byte)
/// when it already is; refuses when `runtimes.arrow` names another runtime
/// type, rather than take over a handler someone else set up.
pub fn add_runtime(text: &str) -> Result<String> {
    let mut doc = parse(text)?;
    let version = version_of(&doc)?;
    let last = last_position(doc.as_table());
    let path = version.runtime_path();
    let (parents, name) = path.split_at(path.len() - 1);
    let mut table = doc.as_table_mut();
    let mut walked = Vec::new();
    for key in parents {
        walked.push(*key);
        let item = table.entry(key).or_insert_with(|| {
            let mut t = Table::new();
            t.set_implicit(true);
            Item::Table(t)
        });
        table = item
            .as_table_mut()
            .ok_or_else(|| Error::NotATable(walked.join(".")))?;
    }
    match table.get_mut(name[0]) {
        None => {
            let mut arrow = Table::new();
            arrow.decor_mut().set_prefix(
                "\n# Runtime arrow: pods as KVM microVMs (added by `arrow install`).\n",
            );
            // Last in the file, so the operator's text is left as it was,
            // a prefix of the new file.
            arrow.set_position(Some(last.saturating_add(1)));
            arrow.insert("runtime_type", toml_edit::value(RUNTIME_TYPE));
            arrow.insert("pod_annotations", toml_edit::value(annotations()));
            arrow.insert("container_annotations", toml_edit::value(annotations()));
            for key in ["runtime_type", "pod_annotations", "container_annotations"] {
                if let Some(mut k) = arrow.key_mut(key) {
                    k.leaf_decor_mut().set_prefix("  ");
                }
            }
            table.insert(name[0], Item::Table(arrow));
        }
        Some(item) => {
            let arrow = item
                .as_table_mut()
                .ok_or_else(|| Error::NotATable(path.join(".")))?;
            match arrow.get("runtime_type").and_then(Item::as_str) {
                Some(RUNTIME_TYPE) => {}
                Some(other) => {
                    return Err(Error::Conflict(format!(
                    "runtime {HANDLER} already has runtime_type {other:?}, not {RUNTIME_TYPE:?}; \
                         remove or rename it first"
                )))
                }
                None => {
                    arrow.insert("runtime_type", toml_edit::value(RUNTIME_TYPE));
                }
            }
            for key in ["pod_annotations", "container_annotations"] {
                ensure_listed(arrow, key, &path)?;
            }
        }
    }
    Ok(doc.to_string())
}

/// The highest document position of any table in `table` (0 if none).
fn last_position(table: &Table) -> isize {
    table
        .iter()
        .filter_map(|(_, item)| item.as_table())
        .map(|t| t.position().unwrap_or(0).max(last_position(t)))
        .max()
        .unwrap_or(0)
}

fn annotations() -> Array {
    let mut a = Array::new();
    a.push(ANNOTATIONS);
    a
}

/// Makes sure array `key` of `table` lists [`ANNOTATIONS`], keeping its
/// other entries.
fn ensure_listed(table: &mut Table, key: &str, path: &[&str]) -> Result<()> {
    match table.get_mut(key) {
        None => {
            table.insert(key, toml_edit::value(annotations()));
        }
        Some(item) => {
            let array = item.as_array_mut().ok_or_else(|| {
                Error::Conflict(format!("{}.{key} is not an array", path.join(".")))
            })?;
            if !array.iter().any(|v| v.as_str() == Some(ANNOTATIONS)) {
                array.push(ANNOTATIONS);
            }
        }
    }
    Ok(())
}

/// Returns `text` without runtime arrow (for a config changed since `arrow
/// install` wrote it, where the backup would lose those changes).
pub fn remove_runtime(text: &str) -> Result<String> {
    let mut doc = parse(text)?;
    let version = version_of(&doc)?;
    let path = version.runtime_path();
    let (parents, name) = path.split_at(path.len() - 1);
    let mut table = doc.as_table_mut();
    for key in parents {
        match table.get_mut(key).and_then(Item::as_table_mut) {
            Some(t) => table = t,
            None => return Ok(text.to_string()),
        }
    }
    table.remove(name[0]);
    Ok(doc.to_string())
}

/// Whether the config has runtime arrow with Arrow's runtime type.
pub fn has_runtime(text: &str) -> Result<bool> {
    let doc = parse(text)?;
    let version = version_of(&doc)?;
    let mut item: &Item = doc.as_item();
    for key in version.runtime_path() {
        match item.get(key) {
            Some(next) => item = next,
            None => return Ok(false),
        }
    }
    Ok(item.get("runtime_type").and_then(Item::as_str) == Some(RUNTIME_TYPE))
}

/// The CNI plugin directory the config names (`cni.bin_dir` of the CRI
/// plugin), if any.
pub fn cni_bin_dir(text: &str) -> Option<String> {
    let doc = parse(text).ok()?;
    let version = version_of(&doc).ok()?;
    let plugin = match version {
        ConfigVersion::V2 => "io.containerd.grpc.v1.cri",
        ConfigVersion::V3 => "io.containerd.cri.v1.runtime",
    };
    doc.get("plugins")?
        .get(plugin)?
        .get("cni")?
        .get("bin_dir")?
        .as_value()
        .and_then(Value::as_str)
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debian 12's /etc/containerd/config.toml, with a comment of ours.
    const DEBIAN: &str = "version = 2\n\n# Our CNI.\n[plugins]\n  [plugins.\"io.containerd.grpc.v1.cri\"]\n    [plugins.\"io.containerd.grpc.v1.cri\".cni]\n      bin_dir = \"/usr/lib/cni\"\n      conf_dir = \"/etc/cni/net.d\"\n  [plugins.\"io.containerd.internal.v1.opt\"]\n    path = \"/var/lib/containerd/opt\"\n";

    #[test]
    fn adds_keeping_everything_else() {
        let out = add_runtime(DEBIAN).unwrap();
        assert!(out.starts_with(DEBIAN.trim_end()), "{out}");
        assert!(has_runtime(&out).unwrap());
        assert!(!has_runtime(DEBIAN).unwrap());
        assert!(out.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.arrow]"));
        assert_eq!(
            add_runtime(&out).unwrap(),
            out,
            "a second run changes nothing"
        );
        assert_eq!(remove_runtime(&out).unwrap().trim_end(), DEBIAN.trim_end());
        assert_eq!(cni_bin_dir(&out).as_deref(), Some("/usr/lib/cni"));
    }

    #[test]
    fn version_3_uses_the_runtime_plugin() {
        let out = add_runtime("version = 3\n").unwrap();
        assert!(
            out.contains("[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.arrow]"),
            "{out}"
        );
        assert!(has_runtime(&out).unwrap());
        let fresh = new_config(ConfigVersion::V3);
        assert!(has_runtime(&fresh).unwrap());
        assert_eq!(add_runtime(&fresh).unwrap(), fresh);
    }

    #[test]
    fn refuses_unknown_versions() {
        for text in [
            "",
            "[plugins]\n",
            "version = 1\n",
            "version = 4\n",
            "version = \"2\"\n",
        ] {
            match add_runtime(text) {
                Err(Error::UnsupportedVersion(_)) => {}
                other => panic!("{text:?}: {other:?}"),
            }
        }
        assert!(matches!(add_runtime("version = ["), Err(Error::Toml(_))));
    }

    #[test]
    fn completes_an_existing_arrow_runtime() {
        let text = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.arrow]\n  runtime_type = \"io.containerd.arrow.v1\"\n  pod_annotations = [\"x.*\"]\n";
        let out = add_runtime(text).unwrap();
        assert!(
            out.contains("pod_annotations = [\"x.*\", \"io.arrow.*\"]"),
            "{out}"
        );
        assert!(
            out.contains("container_annotations = [\"io.arrow.*\"]"),
            "{out}"
        );
    }

    #[test]
    fn refuses_a_foreign_arrow_runtime() {
        let text = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.arrow]\n  runtime_type = \"io.containerd.runc.v2\"\n";
        assert!(matches!(add_runtime(text), Err(Error::Conflict(_))));
        let text = "version = 2\nplugins = 3\n";
        assert!(matches!(add_runtime(text), Err(Error::NotATable(_))));
    }
}
