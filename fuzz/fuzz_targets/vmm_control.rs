//! The shim ↔ VMM control channel from a hostile peer: the shim reads what
//! a VMM (which handles everything the guest sends) writes, the VMM reads
//! the shim's requests. Messages are read one after another from the same
//! bytes until the first error. Oracles: no read takes more than
//! `MAX_LINE` bytes of one line, and every message read survives a
//! write/read round trip unchanged.

#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use proto::vmm_control::{read_message, write_message, ControlRequest, VmmMessage, MAX_LINE};
use serde::de::DeserializeOwned;
use serde::Serialize;

fn check<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(bytes: &[u8]) {
    // A cursor, not a `BufReader`: its position is exactly what the reads
    // took (a `BufReader`'s buffer holds at most 8 KiB of what is left).
    let mut reader = Cursor::new(bytes);
    loop {
        let before = reader.position();
        let result = read_message::<T>(&mut reader);
        let taken = reader.position() - before;
        assert!(taken <= MAX_LINE as u64 + 1, "read {taken} bytes");
        let Ok(msg) = result else { return };
        let mut out = Vec::new();
        write_message(&mut out, &msg).expect("a message read can be written");
        let again: T = read_message(&mut out.as_slice()).expect("own line reads");
        assert_eq!(again, msg, "round trip changed the message");
    }
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((kind, rest)) if kind % 2 == 0 => check::<VmmMessage>(rest),
        Some((_, rest)) => check::<ControlRequest>(rest),
        None => {}
    }
});
