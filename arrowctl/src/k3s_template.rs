//! Adds runtime `arrow` to k3s's containerd template, and takes it out.
//!
//! k3s renders `config.toml.tmpl` (`config-v3.toml.tmpl` for containerd 2)
//! with Go templates, so the file is not TOML and cannot be edited as such.
//! A missing or empty template becomes k3s's own base config
//! (`{{ template "base" . }}`) followed by our table; an existing one gets
//! our table appended between marker comments, which `remove_block` finds
//! again. The table is appended after everything else, where a later
//! `[table]` header cannot swallow keys that belong to another table.

use crate::containerd_config::{runtime_block, ConfigVersion, HANDLER};
use crate::error::{Error, Result};

/// Where k3s (server or agent) reads its containerd template.
pub const DEFAULT_TEMPLATE: &str = "/var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl";
/// What k3s's template uses to include the config it would write itself.
pub const BASE: &str = "{{ template \"base\" . }}";
const BEGIN: &str =
    "# BEGIN arrow: runtime arrow, added by `arrow install` (`arrow uninstall` removes it)";
const END: &str = "# END arrow";

/// The containerd config version a template file name implies.
pub fn version_for(file_name: &str) -> ConfigVersion {
    if file_name.starts_with("config-v3") {
        ConfigVersion::V3
    } else {
        ConfigVersion::V2
    }
}

fn block(version: ConfigVersion) -> String {
    format!("{BEGIN}\n{}{END}\n", runtime_block(version))
}

/// Returns the template with runtime arrow; unchanged when our block is
/// already there. Refuses a template that configures runtime arrow itself.
pub fn add_block(text: &str, version: ConfigVersion) -> Result<String> {
    if text.contains(BEGIN) {
        return Ok(text.to_string());
    }
    if text.contains(&format!(".containerd.runtimes.{HANDLER}]")) {
        return Err(Error::Conflict(format!(
            "the template already configures runtime {HANDLER} outside arrow's block; \
             remove that table or leave the template as it is"
        )));
    }
    if text.trim().is_empty() {
        return Ok(format!("{BASE}\n\n{}", block(version)));
    }
    let mut out = text.to_string();
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&block(version));
    Ok(out)
}

/// Returns the template without our block (and the blank line before it).
pub fn remove_block(text: &str) -> String {
    let Some(start) = text.find(BEGIN) else {
        return text.to_string();
    };
    let end = text[start..]
        .find(&format!("{END}\n"))
        .map(|i| start + i + END.len() + 1)
        .unwrap_or(text.len());
    let mut head = &text[..start];
    if let Some(stripped) = head.strip_suffix("\n\n") {
        head = &text[..stripped.len() + 1];
    }
    format!("{head}{}", &text[end..])
}

/// Whether the template has our block.
pub fn has_block(text: &str) -> bool {
    text.contains(BEGIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_from_base() {
        let out = add_block("", ConfigVersion::V2).unwrap();
        assert!(out.starts_with(BASE), "{out}");
        assert!(out.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.arrow]"));
        assert_eq!(add_block(&out, ConfigVersion::V2).unwrap(), out);
        assert!(has_block(&out));
    }

    #[test]
    fn appends_and_removes_byte_for_byte() {
        for original in [
            "{{ template \"base\" . }}\n\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  # mirrors\n",
            "{{ template \"base\" . }}\n# no newline at the end",
        ] {
            let out = add_block(original, ConfigVersion::V2).unwrap();
            assert!(out.starts_with(original));
            assert_eq!(add_block(&out, ConfigVersion::V2).unwrap(), out);
            let back = remove_block(&out);
            assert_eq!(back.trim_end(), original.trim_end());
        }
    }

    #[test]
    fn refuses_a_hand_written_arrow_runtime() {
        let text = "{{ template \"base\" . }}\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.arrow]\n";
        assert!(matches!(
            add_block(text, ConfigVersion::V2),
            Err(Error::Conflict(_))
        ));
    }

    #[test]
    fn v3_templates() {
        assert_eq!(version_for("config-v3.toml.tmpl"), ConfigVersion::V3);
        assert_eq!(version_for("config.toml.tmpl"), ConfigVersion::V2);
        let out = add_block("", ConfigVersion::V3).unwrap();
        assert!(out.contains("io.containerd.cri.v1.runtime"), "{out}");
    }
}
