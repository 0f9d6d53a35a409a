//! A bare-metal test guest: a few hundred bytes of x86_64 machine code in an
//! ELF file, which the VMM loads like a `vmlinux` and which starts in long
//! mode. It boots in milliseconds even where guest kernel code is emulated,
//! so VMM and device tests and the VMM-overhead benchmark use it instead of
//! Linux.
//!
//! The program is assembled here from a handful of instruction encodings, so
//! no assembler is needed on the machine.

use std::io;
use std::path::Path;

use crate::arch::x86_64::layout::{HIMEM_START, I8042_PORT, SERIAL_PORT};

/// Where the program is loaded and starts.
pub const ENTRY: u64 = HIMEM_START;

/// A straight-line guest program under construction.
#[derive(Clone, Debug, Default)]
pub struct GuestProgram {
    code: Vec<u8>,
}

impl GuestProgram {
    /// An empty program.
    pub fn new() -> Self {
        Self::default()
    }

    fn mov_rbx(&mut self, value: u64) {
        self.code.extend_from_slice(&[0x48, 0xbb]);
        self.code.extend_from_slice(&value.to_le_bytes());
    }

    fn mov_dx(&mut self, port: u16) {
        self.code.extend_from_slice(&[0x66, 0xba]);
        self.code.extend_from_slice(&port.to_le_bytes());
    }

    /// Writes bytes to a port, one `out` each.
    pub fn port_write(&mut self, port: u16, bytes: &[u8]) -> &mut Self {
        self.mov_dx(port);
        for b in bytes {
            self.code.extend_from_slice(&[0xb0, *b, 0xee]); // mov al, b; out dx, al
        }
        self
    }

    /// Writes bytes to the serial console.
    pub fn serial_write(&mut self, bytes: &[u8]) -> &mut Self {
        self.port_write(SERIAL_PORT as u16, bytes)
    }

    /// Reads a byte from `port` and writes it to the serial console.
    pub fn port_read_to_serial(&mut self, port: u16) -> &mut Self {
        self.mov_dx(port);
        self.code.push(0xec); // in al, dx
        self.mov_dx(SERIAL_PORT as u16);
        self.code.push(0xee); // out dx, al
        self
    }

    /// Stores a 32-bit value at a guest physical address (RAM or MMIO).
    pub fn write32(&mut self, addr: u64, value: u32) -> &mut Self {
        self.mov_rbx(addr);
        self.code.extend_from_slice(&[0xc7, 0x03]); // mov dword [rbx], imm32
        self.code.extend_from_slice(&value.to_le_bytes());
        self
    }

    /// Stores a 64-bit value at a guest physical address.
    pub fn write64(&mut self, addr: u64, value: u64) -> &mut Self {
        self.write32(addr, value as u32)
            .write32(addr + 4, (value >> 32) as u32)
    }

    /// Stores a 16-bit value at a guest physical address.
    pub fn write16(&mut self, addr: u64, value: u16) -> &mut Self {
        self.mov_rbx(addr);
        self.code.extend_from_slice(&[0x66, 0xc7, 0x03]); // mov word [rbx], imm16
        self.code.extend_from_slice(&value.to_le_bytes());
        self
    }

    /// Stores one byte at a guest physical address.
    pub fn write8(&mut self, addr: u64, value: u8) -> &mut Self {
        self.mov_rbx(addr);
        self.code.extend_from_slice(&[0xc6, 0x03, value]); // mov byte [rbx], imm8
        self
    }

    /// Loads a 32-bit value from `addr` and writes its four bytes (little
    /// endian) to the serial console.
    pub fn read32_to_serial(&mut self, addr: u64) -> &mut Self {
        self.mov_rbx(addr);
        self.code.extend_from_slice(&[0x8b, 0x03]); // mov eax, [rbx]
        self.mov_dx(SERIAL_PORT as u16);
        for _ in 0..4 {
            self.code.push(0xee); // out dx, al
            self.code.extend_from_slice(&[0xc1, 0xe8, 0x08]); // shr eax, 8
        }
        self
    }

    /// Spins until the 32-bit value at `addr` differs from `value`.
    pub fn wait_until_changed32(&mut self, addr: u64, value: u32) -> &mut Self {
        self.mov_rbx(addr);
        let top = self.code.len();
        self.code.extend_from_slice(&[0x81, 0x3b]); // cmp dword [rbx], imm32
        self.code.extend_from_slice(&value.to_le_bytes());
        self.code.push(0x74); // je top
        let rel = top as i64 - (self.code.len() as i64 + 1);
        self.code.push(rel as i8 as u8);
        self
    }

    /// Asks the i8042 to reset the machine, which ends the VM.
    pub fn reset(&mut self) -> &mut Self {
        self.code
            .extend_from_slice(&[0xb0, 0xfe, 0xe6, (I8042_PORT + 4) as u8]); // out 0x64, 0xfe
        self
    }

    /// Increments the 64-bit counter at `addr` forever.
    pub fn count_forever(&mut self, addr: u64) -> &mut Self {
        self.mov_rbx(addr);
        self.code.extend_from_slice(&[0x48, 0xff, 0x03, 0xeb, 0xfb]); // inc qword [rbx]; jmp -5
        self
    }

    /// Halts forever (interrupts stay off).
    pub fn halt_forever(&mut self) -> &mut Self {
        self.code.extend_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]); // cli; hlt; jmp -3
        self
    }

    /// The program's machine code.
    pub fn code(&self) -> &[u8] {
        &self.code
    }

    /// The program as a loadable ELF64 image with one segment at [`ENTRY`].
    pub fn elf(&self) -> Vec<u8> {
        const EHDR: u16 = 64;
        const PHDR: u16 = 56;
        let offset = u64::from(EHDR + PHDR);
        let mut elf = Vec::with_capacity(offset as usize + self.code.len());
        // e_ident: magic, 64-bit, little endian, version 1, System V.
        elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
        elf.extend_from_slice(&[0; 8]);
        elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        elf.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
        elf.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
        elf.extend_from_slice(&ENTRY.to_le_bytes());
        elf.extend_from_slice(&u64::from(EHDR).to_le_bytes()); // e_phoff
        elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        elf.extend_from_slice(&EHDR.to_le_bytes());
        elf.extend_from_slice(&PHDR.to_le_bytes());
        elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
        elf.extend_from_slice(&[0; 6]); // no section headers
                                        // Program header: PT_LOAD, R+X.
        elf.extend_from_slice(&1u32.to_le_bytes());
        elf.extend_from_slice(&5u32.to_le_bytes());
        elf.extend_from_slice(&offset.to_le_bytes());
        elf.extend_from_slice(&ENTRY.to_le_bytes()); // p_vaddr
        elf.extend_from_slice(&ENTRY.to_le_bytes()); // p_paddr
        let len = self.code.len() as u64;
        elf.extend_from_slice(&len.to_le_bytes());
        elf.extend_from_slice(&len.to_le_bytes());
        elf.extend_from_slice(&0x1000u64.to_le_bytes());
        elf.extend_from_slice(&self.code);
        elf
    }

    /// Writes the ELF image to `path`.
    pub fn write_elf(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, self.elf())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_header_is_well_formed() {
        let mut p = GuestProgram::new();
        p.serial_write(b"x").reset();
        let elf = p.elf();
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(u64::from_le_bytes(elf[24..32].try_into().unwrap()), ENTRY);
        assert_eq!(elf.len(), 120 + p.code().len());
        assert_eq!(&elf[120..], p.code());
    }

    #[test]
    fn encodes_known_instructions() {
        let mut p = GuestProgram::new();
        p.serial_write(b"A");
        assert_eq!(p.code(), &[0x66, 0xba, 0xf8, 0x03, 0xb0, b'A', 0xee]);
        let mut p = GuestProgram::new();
        p.reset();
        assert_eq!(p.code(), &[0xb0, 0xfe, 0xe6, 0x64]);
    }

    #[test]
    fn wait_loop_jumps_back_to_the_compare() {
        let mut p = GuestProgram::new();
        p.wait_until_changed32(0x1000, 7);
        let code = p.code();
        // mov rbx (10 bytes), cmp (6), je rel8 (2): the jump lands on the cmp.
        assert_eq!(code.len(), 18);
        assert_eq!(code[16], 0x74);
        assert_eq!(code[17] as i8, -8);
    }
}
