//! Legacy platform devices and the buses that reach them.

pub mod bus;
pub mod i8042;
pub mod irq;
pub mod serial;
