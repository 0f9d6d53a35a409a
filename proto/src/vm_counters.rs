//! The live counters of a pod VM's devices, which the jailed `arrow-vmm`
//! publishes as a file in its own directory (`<pod>/vmm/counters.json`)
//! and `arrow monitor` reads at scrape time: one type, so writer and
//! reader cannot drift apart. Feature `vm-record`.
//!
//! The writer is the VMM, which handles everything a hostile guest sends:
//! readers must treat the file as untrusted input. [`VmCounters::parse`]
//! is strict (a size cap, no unknown fields, every counter present and an
//! unsigned integer) and never panics.

use serde::{Deserialize, Serialize};

/// The file's name in the VMM's directory.
pub const FILE_NAME: &str = "counters.json";

/// The longest file [`VmCounters::parse`] accepts. A real one is about
/// 300 bytes; the cap bounds what a compromised VMM can make a reader
/// load.
pub const MAX_LEN: usize = 4096;

/// Counters of the VM's devices since the VMM created them (a clone's
/// start from zero); they only grow while the VMM runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmCounters {
    /// None for a VM without a NIC.
    pub net: Option<NetCounters>,
    /// None for a VM without a shared directory.
    pub fs: Option<FsCounters>,
}

/// The virtio-net device's traffic (vmm-core's `NetStats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Their bytes, without the virtio-net header.
    pub rx_bytes: u64,
    /// Frames from the tap dropped (malformed guest buffers, frames too
    /// big for them).
    pub rx_dropped: u64,
    /// Frames the guest sent that went to the tap.
    pub tx_frames: u64,
    /// Their bytes, without the virtio-net header.
    pub tx_bytes: u64,
    /// Guest frames dropped (malformed chains or headers, tap errors).
    pub tx_dropped: u64,
}

/// The virtio-fs device's work (vmm-core's `FsStats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsCounters {
    /// FUSE requests taken from the queues, answered or not.
    pub requests: u64,
    /// Requests answered with an error number (`ENOENT` of a lookup
    /// included).
    pub errors: u64,
    /// Requests that got no answer (malformed).
    pub unanswered: u64,
    /// File data returned by reads, in bytes.
    pub read_bytes: u64,
    /// File data taken by writes, in bytes.
    pub write_bytes: u64,
}

/// Why a counters file was refused.
#[derive(Debug, thiserror::Error)]
pub enum CountersError {
    #[error("{0} bytes, more than the {MAX_LEN} a counters file may hold")]
    TooLong(usize),
    #[error("not a counters record: {0}")]
    Malformed(#[from] serde_json::Error),
}

impl VmCounters {
    /// The file's contents.
    pub fn to_json(&self) -> Vec<u8> {
        // Plain structs of integers: serialising cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a file as [`VmCounters::to_json`] wrote it; anything else
    /// (too long, not UTF-8, other or missing fields, negative or
    /// fractional numbers, trailing bytes) is an error.
    pub fn parse(bytes: &[u8]) -> Result<VmCounters, CountersError> {
        if bytes.len() > MAX_LEN {
            return Err(CountersError::TooLong(bytes.len()));
        }
        Ok(serde_json::from_slice(bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmCounters {
        VmCounters {
            net: Some(NetCounters {
                rx_frames: 10,
                rx_bytes: 1500,
                rx_dropped: 0,
                tx_frames: 12,
                tx_bytes: 2000,
                tx_dropped: 1,
            }),
            fs: Some(FsCounters {
                requests: 300,
                errors: 20,
                unanswered: 0,
                read_bytes: 1 << 20,
                write_bytes: u64::MAX,
            }),
        }
    }

    #[test]
    fn round_trips_and_fits_the_cap() {
        let c = sample();
        let text = c.to_json();
        assert_eq!(VmCounters::parse(&text).unwrap(), c);
        assert!(text.len() < MAX_LEN / 4, "{}", text.len());
        let none = VmCounters::default();
        assert_eq!(none.to_json(), br#"{"net":null,"fs":null}"#);
        assert_eq!(VmCounters::parse(&none.to_json()).unwrap(), none);
        // Absent devices may be left out.
        assert_eq!(VmCounters::parse(b"{}").unwrap(), none);
    }

    #[test]
    fn refuses_anything_else() {
        let good = String::from_utf8(sample().to_json()).unwrap();
        let bad: Vec<String> = vec![
            String::new(),
            "{".into(),
            "null".into(),
            "[]".into(),
            good.replace("\"rx_frames\":10", "\"rx_frames\":-1"),
            good.replace("\"rx_frames\":10", "\"rx_frames\":1.5"),
            good.replace("\"rx_frames\":10", "\"rx_frames\":\"10\""),
            good.replace("\"rx_frames\":10", "\"rx_frames\":18446744073709551616"),
            good.replace("\"rx_frames\":10,", ""),
            good.replace("\"requests\"", "\"requests_x\""),
            good.replace("{\"net\"", "{\"extra\":1,\"net\""),
            format!("{good}x"),
            format!("{good}{good}"),
        ];
        for text in bad {
            assert!(VmCounters::parse(text.as_bytes()).is_err(), "{text}");
        }
        assert!(VmCounters::parse(&[0xff, 0xfe]).is_err());
        let long = format!("{good}{}", " ".repeat(MAX_LEN));
        assert!(matches!(
            VmCounters::parse(long.as_bytes()),
            Err(CountersError::TooLong(_))
        ));
    }
}
