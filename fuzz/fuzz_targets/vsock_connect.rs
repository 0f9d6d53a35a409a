//! The `CONNECT <port>\n` line a host client sends the vsock muxer: never a
//! panic, and a port only for the one canonical shape (no sign, no spaces,
//! digits only, optional `\r`), which formats back to the same port.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm_core::virtio::vsock::muxer::parse_connect_line;

fuzz_target!(|line: &[u8]| {
    if let Ok(port) = parse_connect_line(line) {
        assert_ne!(port, u32::MAX);
        let digits = line
            .strip_prefix(b"CONNECT ")
            .and_then(|l| l.strip_suffix(b"\n"))
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .expect("accepted lines have the prefix and the newline");
        assert!(!digits.is_empty() && digits.iter().all(u8::is_ascii_digit));
        assert_eq!(
            parse_connect_line(format!("CONNECT {port}\n").as_bytes()),
            Ok(port)
        );
    }
});
