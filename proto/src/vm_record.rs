//! The record of a pod's VM that the shim writes into the pod's state
//! directory once the VM is ready, and `arrow monitor` reads: one type, so
//! writer and reader cannot drift apart. Feature `vm-record`.

use std::fs;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// What the shim knows of a pod's VM once it is ready (`vm.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The guest's memory size.
    pub guest_memory_bytes: u64,
    pub vcpus: u8,
    /// Restored from a template (true) or booted (false).
    pub cloned: bool,
    /// From spawning arrow-vmm to its ready line (a restore or a boot).
    pub vmm_ready_ms: u64,
    /// From the ready line to the agent connected and `InitClone` done.
    pub agent_ready_ms: u64,
}

impl VmRecord {
    /// Writes the record whole (a temporary file renamed over it), so a
    /// reader never sees half of it.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        let tmp = path.with_extension("json.tmp");
        fs::write(&tmp, serde_json::to_vec(self)?)?;
        fs::rename(&tmp, path)
    }

    /// Parses a record as [`VmRecord::write`] wrote it.
    pub fn parse(text: &str) -> Result<VmRecord, serde_json::Error> {
        serde_json::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_whole_and_read_back() {
        let dir = std::env::temp_dir().join(format!("vm-record-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.json");
        let record = VmRecord {
            guest_memory_bytes: 256 << 20,
            vcpus: 2,
            cloned: true,
            vmm_ready_ms: 412,
            agent_ready_ms: 35,
        };
        record.write(&path).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            r#"{"guest_memory_bytes":268435456,"vcpus":2,"cloned":true,"vmm_ready_ms":412,"agent_ready_ms":35}"#
        );
        assert_eq!(VmRecord::parse(&text).unwrap(), record);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "no temporary left");
        fs::remove_dir_all(&dir).unwrap();
        assert!(VmRecord::parse("{\"vcpus\":1}").is_err());
    }
}
