//! Legacy platform devices and the buses that reach them.

pub mod bus;
pub mod irq;
