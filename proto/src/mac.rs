//! MAC addresses as text: the VMM's command line, the agent's interface
//! configuration and the shim's logs all spell them the same way.

/// Formats a MAC address as `xx:xx:xx:xx:xx:xx`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `xx:xx:xx:xx:xx:xx` (hex, `:` or `-` separated).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for byte in &mut mac {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Whether `mac` may be a NIC's own address: unicast, not all zeroes.
pub fn mac_is_valid(mac: &[u8; 6]) -> bool {
    mac[0] & 1 == 0 && mac.iter().any(|&b| b != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_back() {
        let mac = [0x02, 0xa7, 0x72, 0x00, 0x0f, 0xff];
        assert_eq!(format_mac(&mac), "02:a7:72:00:0f:ff");
        assert_eq!(parse_mac("02:a7:72:00:0f:ff"), Some(mac));
        assert_eq!(parse_mac("02-a7-72-0-f-ff"), Some(mac));
    }

    #[test]
    fn refuses_malformed_text() {
        for bad in [
            "",
            "02:a7:72:00:0f",
            "02:a7:72:00:0f:ff:00",
            "02:a7:72:00:0f:fff",
            "0g:00:00:00:00:00",
            "02::72:00:0f:ff",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_unicast_non_zero_macs_are_valid() {
        assert!(mac_is_valid(&[0x02, 0, 0, 0, 0, 1]));
        assert!(!mac_is_valid(&[0x01, 0, 0, 0, 0, 1]));
        assert!(!mac_is_valid(&[0; 6]));
    }
}
