//! The i8042 keyboard controller, reduced to what a microVM guest uses: the
//! "pulse CPU reset" command, which Linux issues on reboot (`reboot=k`) and
//! Arrow treats as the end of the VM.

use vm_superio::I8042Device;

use super::bus::BusDevice;
use crate::exit::ExitNotifier;

/// The i8042 at ports 0x60..=0x64.
pub struct I8042 {
    inner: I8042Device<ExitNotifier>,
}

impl I8042 {
    /// Creates a controller whose reset command reports [`crate::exit::VmExit::Reset`].
    pub fn new(exit: ExitNotifier) -> Self {
        Self {
            inner: I8042Device::new(exit),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.inner.read(offset),
            (_, data) => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            // Infallible: the trigger only records the exit.
            let _ = self.inner.write(offset, *byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::VmExit;

    #[test]
    fn reset_command_ends_the_vm() {
        let exit = ExitNotifier::new();
        let mut dev = I8042::new(exit.clone());
        dev.write(0, &[0xfe]);
        assert_eq!(exit.exit(), None, "data port writes do nothing");
        dev.write(4, &[0xfe, 0xfe]);
        assert_eq!(exit.exit(), None, "wide writes are ignored");
        dev.write(4, &[0xfe]);
        assert_eq!(exit.exit(), Some(VmExit::Reset));
    }
}
