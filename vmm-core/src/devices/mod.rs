//! Legacy platform devices and the buses that reach them.

pub mod bus;
pub mod console_log;
pub mod i8042;
pub mod irq;
pub mod serial;
