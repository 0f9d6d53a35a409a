//! The `arrow.*` settings arrow-init takes from the kernel command line (the
//! VMM's only channel to init before the agent is up).

use proto::{AGENT_PORT, FORWARD_PORT, STDIO_PORT};

/// Settings for this boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Vsock port of the agent RPC service (`arrow.agent_port=`).
    pub agent_port: u32,
    /// Vsock port of the stdio service (`arrow.stdio_port=`).
    pub stdio_port: u32,
    /// Vsock port of the port-forward service (`arrow.forward_port=`).
    pub forward_port: u32,
    /// Boot line on the console and debug records in kmsg (`arrow.debug`).
    pub debug: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            agent_port: AGENT_PORT,
            stdio_port: STDIO_PORT,
            forward_port: FORWARD_PORT,
            debug: false,
        }
    }
}

/// Parses a command line. Unknown or malformed `arrow.*` settings are
/// returned as complaints for the log and otherwise ignored: a typo must not
/// stop the guest from booting.
pub fn parse(cmdline: &str) -> (Settings, Vec<String>) {
    let mut settings = Settings::default();
    let mut complaints = Vec::new();
    for word in words(cmdline) {
        let Some(setting) = word.strip_prefix("arrow.") else {
            continue;
        };
        let (key, value) = match setting.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (setting, None),
        };
        match (key, value) {
            ("agent_port", Some(v)) => match parse_port(v) {
                Some(port) => settings.agent_port = port,
                None => complaints.push(format!("bad port in {word:?}")),
            },
            ("stdio_port", Some(v)) => match parse_port(v) {
                Some(port) => settings.stdio_port = port,
                None => complaints.push(format!("bad port in {word:?}")),
            },
            ("forward_port", Some(v)) => match parse_port(v) {
                Some(port) => settings.forward_port = port,
                None => complaints.push(format!("bad port in {word:?}")),
            },
            ("debug", None | Some("1" | "on" | "true" | "yes")) => settings.debug = true,
            ("debug", Some("0" | "off" | "false" | "no")) => settings.debug = false,
            _ => complaints.push(format!("unknown setting {word:?}")),
        }
    }
    (settings, complaints)
}

fn parse_port(v: &str) -> Option<u32> {
    v.parse().ok().filter(|&p| p != 0 && p != u32::MAX)
}

/// Splits like the kernel does: on whitespace, with double quotes grouping
/// (quotes removed).
fn words(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut started = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                started = true;
            }
            c if c.is_whitespace() && !quoted => {
                if started {
                    out.push(std::mem::take(&mut cur));
                    started = false;
                }
            }
            c => {
                cur.push(c);
                started = true;
            }
        }
    }
    if started {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_arrow_settings() {
        let (s, complaints) = parse("console=ttyS0 reboot=k panic=-1 rdinit=/.arrow/init\n");
        assert_eq!(s, Settings::default());
        assert!(complaints.is_empty());
    }

    #[test]
    fn reads_ports_and_debug() {
        let (s, complaints) = parse(
            "quiet arrow.agent_port=2000 arrow.stdio_port=2001 arrow.forward_port=2002 arrow.debug",
        );
        assert_eq!(
            s,
            Settings {
                agent_port: 2000,
                stdio_port: 2001,
                forward_port: 2002,
                debug: true
            }
        );
        assert!(complaints.is_empty());
        assert!(!parse("arrow.debug=0").0.debug);
        assert!(parse("arrow.debug=1").0.debug);
    }

    #[test]
    fn bad_values_are_complaints_not_failures() {
        let (s, complaints) =
            parse("arrow.agent_port=x arrow.stdio_port=0 arrow.forward_port=-1 arrow.frob=1");
        assert_eq!(s, Settings::default());
        assert_eq!(complaints.len(), 4);
    }

    #[test]
    fn quotes_group_words() {
        assert_eq!(
            words(r#"a "b c" arrow.debug  d"#),
            vec!["a", "b c", "arrow.debug", "d"]
        );
        assert_eq!(words("  "), Vec::<String>::new());
    }
}
